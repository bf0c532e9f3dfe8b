"""MCMC and importance-sampling diagnostics (Vehtari, Gelman, Simpson, Carpenter and
Bürkner 2021, "Rank-normalization, folding, and localization"; Vehtari, Simpson, Gelman,
Yao and Gabry 2024, "Pareto smoothed importance sampling").

Draws are arrays ``[chains, draws, *shape]``; every statistic is computed per element
of ``shape``. Computations run in float64 NumPy (diagnostics are not a hot path).

- split chains: each chain is cut into two halves, giving 2M chains of N/2 draws;
- rank normalisation: z = Φ⁻¹((r − 3/8)/(S + 1/4)) of the pooled average ranks r;
- R̂ = max(R̂(z-split), R̂(z-split of folded |x − median|)) with
  R̂ = sqrt(var⁺/W), var⁺ = (N−1)/N·W + B/N;
- ESS = M·N / τ, τ = −1 + 2 Σ P_t, P_t = ρ̂_{2t} + ρ̂_{2t+1} (Geyer's initial positive,
  monotone sequence), ρ̂_t = 1 − (W − mean_m acov_m(t)) / var⁺;
- bulk ESS: ESS of rank-normalised split chains; tail ESS: min ESS of the indicators
  I(x ≤ q₀.₀₅), I(x ≤ q₀.₉₅);
- MCSE of the mean: sd / sqrt(ESS of the raw split chains).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import special, stats

__all__ = ["r_hat", "ess", "ess_bulk", "ess_tail", "mcse_mean", "psis_khat", "summary",
           "Summary", "split_chains", "rank_normalize"]


def _as_draws(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < 2:
        raise ValueError(f"draws must have shape [chains, draws, ...], got shape {a.shape}")
    if a.shape[1] < 4:
        raise ValueError(f"need at least 4 draws per chain for split diagnostics, got {a.shape[1]}")
    return a


def split_chains(x) -> np.ndarray:
    """[M, N, ...] → [2M, N//2, ...] (the middle draw of odd N is dropped)."""
    x = _as_draws(x)
    h = x.shape[1] // 2
    return np.concatenate([x[:, :h], x[:, x.shape[1] - h:]], axis=0)


def rank_normalize(x) -> np.ndarray:
    """Φ⁻¹((r − 3/8)/(S + 1/4)) of the pooled average ranks over the first two axes."""
    x = np.asarray(x, dtype=np.float64)
    m, n = x.shape[:2]
    flat = x.reshape(m * n, -1)
    r = stats.rankdata(flat, axis=0, method="average")
    z = special.ndtri((r - 0.375) / (m * n + 0.25))
    return z.reshape(x.shape)


def _rhat_basic(x: np.ndarray) -> np.ndarray:
    m, n = x.shape[:2]
    means = x.mean(axis=1)
    W = x.var(axis=1, ddof=1).mean(axis=0)
    B = n * means.var(axis=0, ddof=1)
    var_plus = (n - 1) / n * W + B / n
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt(var_plus / W)
    return np.where(W > 0, r, np.nan)


def r_hat(x) -> np.ndarray | float:
    """Split, rank-normalised, folded R̂ (Vehtari et al. 2021) per element."""
    s = split_chains(x)
    bulk = _rhat_basic(rank_normalize(s))
    folded = np.abs(s - np.median(s.reshape(-1, *s.shape[2:]), axis=0))
    tail = _rhat_basic(rank_normalize(folded))
    return _scalar(np.maximum(bulk, tail))


def _autocov(x: np.ndarray) -> np.ndarray:
    """Biased autocovariance along axis 1 of [M, N, K] via FFT."""
    n = x.shape[1]
    xc = x - x.mean(axis=1, keepdims=True)
    nfft = 1 << int(np.ceil(np.log2(2 * n)))
    f = np.fft.rfft(xc, n=nfft, axis=1)
    ac = np.fft.irfft(f * np.conj(f), n=nfft, axis=1)[:, :n]
    return ac / n


def _ess_raw(x: np.ndarray) -> np.ndarray:
    """ESS of chains x [M, N, ...] (already split / transformed as wanted)."""
    m, n = x.shape[:2]
    shape = x.shape[2:]
    x = x.reshape(m, n, -1)
    out = np.full(x.shape[2], np.nan)
    acov = _autocov(x)  # [M, N, K]
    W = x.var(axis=1, ddof=1).mean(axis=0)
    means = x.mean(axis=1)
    var_plus = (n - 1) / n * W + (means.var(axis=0, ddof=1) if m > 1 else 0.0)
    for k in range(x.shape[2]):
        if not np.isfinite(var_plus[k]) or var_plus[k] <= 0:
            continue
        rho = 1.0 - (W[k] - acov[:, :, k].mean(axis=0)) / var_plus[k]
        rho[0] = 1.0
        out[k] = m * n / _geyer_tau(rho, m * n)
    return out.reshape(shape)


def _geyer_tau(rho: np.ndarray, total: int) -> float:
    """τ = −1 + 2 Σ_{t} P̂_t over the initial positive, monotone sequence of
    P̂_t = ρ̂_{2t} + ρ̂_{2t+1}; for antithetic chains τ is bounded below by 1/log10(S)."""
    n = len(rho)
    pairs = []
    t = 0
    while t + 1 < n:
        p = rho[t] + rho[t + 1]
        if p < 0:
            break
        pairs.append(p)
        t += 2
    if not pairs:
        return 1.0
    pairs = np.minimum.accumulate(np.array(pairs))
    tau = -1.0 + 2.0 * pairs.sum()
    return max(tau, 1.0 / np.log10(max(total, 10)))


def ess(x, method: str = "bulk") -> np.ndarray | float:
    """Effective sample size: ``method`` is "bulk" (rank-normalised split chains),
    "tail" (min over the 5% and 95% quantile indicators) or "mean" (raw split chains)."""
    if method == "bulk":
        return ess_bulk(x)
    if method == "tail":
        return ess_tail(x)
    if method == "mean":
        return _scalar(_ess_raw(split_chains(x)))
    raise ValueError(f"ess: method must be 'bulk', 'tail' or 'mean', got {method!r}")


def ess_bulk(x) -> np.ndarray | float:
    return _scalar(_ess_raw(rank_normalize(split_chains(x))))


def ess_tail(x) -> np.ndarray | float:
    s = split_chains(x)
    flat = s.reshape(-1, *s.shape[2:])
    out = None
    for q in (0.05, 0.95):
        qv = np.quantile(flat, q, axis=0)
        e = _ess_raw((s <= qv).astype(np.float64))
        out = e if out is None else np.fmin(out, e)
    return _scalar(out)


def mcse_mean(x) -> np.ndarray | float:
    """Monte Carlo standard error of the posterior mean: sd / sqrt(ESS_mean)."""
    a = _as_draws(x)
    sd = a.reshape(-1, *a.shape[2:]).std(axis=0, ddof=1)
    return _scalar(sd / np.sqrt(_ess_raw(split_chains(a))))


def _scalar(a):
    a = np.asarray(a)
    return float(a) if a.ndim == 0 else a


# -- Pareto-smoothed importance sampling: k̂ ---------------------------------------------


def _gpd_fit_zhang_stephens(x: np.ndarray) -> tuple[float, float]:
    """(k, σ) of a generalized Pareto fit to exceedances x ≥ 0 (sorted ascending) by the
    empirical-Bayes estimator of Zhang & Stephens (2009) with the weakly informative
    prior of Vehtari et al.: θ_j = 1/x_(n) + (1 − sqrt(m/(j − ½)))/(3·x_(⌊n/4+½⌋)),
    k(θ) = mean log(1 − θx), profile log-lik ℓ(θ) = n(log(−θ/k) − k − 1),
    θ̂ = Σ θ_j w_j with w ∝ exp ℓ(θ_j); k̂ = mean log(1 − θ̂x), σ̂ = −k̂/θ̂;
    then k̂ ← (n k̂ + 10·½)/(n + 10)."""
    n = len(x)
    m = 30 + int(np.sqrt(n))
    j = np.arange(1, m + 1, dtype=np.float64)
    xstar = x[int(np.floor(n / 4 + 0.5)) - 1]
    theta = 1.0 / x[-1] + (1.0 - np.sqrt(m / (j - 0.5))) / (3.0 * xstar)
    k = np.log1p(-theta[:, None] * x[None, :]).mean(axis=1)
    ll = n * (np.log(-theta / k) - k - 1.0)
    w = np.exp(ll - special.logsumexp(ll))
    th = float(np.sum(theta * w))
    kh = float(np.log1p(-th * x).mean())
    sigma = -kh / th
    kh = (n * kh + 10 * 0.5) / (n + 10)
    return kh, sigma


def psis_khat(log_weights) -> float:
    """Pareto k̂ of importance weights: a generalized Pareto fit to the M largest
    weights, M = min(S/5, 3√S), as exceedances over the (M+1)-th largest. k̂ < 0.5:
    finite variance; 0.5–0.7: usable with PSIS; > 0.7: unreliable."""
    lw = np.asarray(log_weights, dtype=np.float64).ravel()
    lw = lw[np.isfinite(lw)]
    s = len(lw)
    if s < 10:
        raise ValueError(f"psis_khat needs at least 10 finite log-weights, got {s}")
    m = int(np.ceil(min(0.2 * s, 3 * np.sqrt(s))))
    lw = np.sort(lw - lw.max())
    tail = np.exp(lw[-m:])
    cut = np.exp(lw[-m - 1])
    exc = tail - cut
    if m < 5 or np.all(exc <= 0):
        return float("-inf")
    k, _ = _gpd_fit_zhang_stephens(exc)
    return k


# -- summary ---------------------------------------------------------------------------


class Summary:
    """A table of per-parameter statistics: ``rows`` is a list of dicts with keys
    name, mean, sd, q5, q50, q95, mcse_mean, ess_bulk, ess_tail, r_hat."""

    columns = ("mean", "sd", "q5", "q50", "q95", "mcse_mean", "ess_bulk", "ess_tail", "r_hat")

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __getitem__(self, name: str) -> dict:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(f"no parameter named {name!r} in the summary; have {[r['name'] for r in self.rows]}")

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def to_dict(self) -> dict:
        return {r["name"]: {c: r[c] for c in self.columns} for r in self.rows}

    def __str__(self) -> str:
        w = max([len(r["name"]) for r in self.rows] + [4])
        head = f"{'name':<{w}} " + " ".join(f"{c:>10}" for c in self.columns)
        lines = [head]
        for r in self.rows:
            vals = []
            for c in self.columns:
                v = r[c]
                vals.append(f"{v:>10.0f}" if c.startswith("ess") and np.isfinite(v) else f"{v:>10.4g}")
            lines.append(f"{r['name']:<{w}} " + " ".join(vals))
        return "\n".join(lines)

    __repr__ = __str__


def _element_names(name: str, shape: tuple) -> list[str]:
    if not shape:
        return [name]
    return [f"{name}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape)]


def summary(samples: Mapping) -> Summary:
    """Per-element summary of ``{name: draws [chains, draws, *shape]}``."""
    rows = []
    for name, v in samples.items():
        a = _as_draws(v)
        shape = a.shape[2:]
        flat = a.reshape(a.shape[0], a.shape[1], -1)
        pooled = flat.reshape(-1, flat.shape[2])
        rh = np.atleast_1d(r_hat(flat))
        eb = np.atleast_1d(ess_bulk(flat))
        et = np.atleast_1d(ess_tail(flat))
        mc = np.atleast_1d(mcse_mean(flat))
        qs = np.quantile(pooled, [0.05, 0.5, 0.95], axis=0)
        label = name if isinstance(name, str) else (str(name[0]) if isinstance(name, tuple) and len(name) == 1 else str(name))
        for i, en in enumerate(_element_names(label, shape)):
            rows.append(dict(name=en, mean=float(pooled[:, i].mean()), sd=float(pooled[:, i].std(ddof=1)),
                             q5=float(qs[0, i]), q50=float(qs[1, i]), q95=float(qs[2, i]),
                             mcse_mean=float(mc[i]), ess_bulk=float(eb[i]), ess_tail=float(et[i]),
                             r_hat=float(rh[i])))
    return Summary(rows)
