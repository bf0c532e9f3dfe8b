"""``python -m genmlx.kernels.selftest [--quick]``: every kernel against its generic
reference on the current default device; prints one JSON report (pass/fail, max error,
mismatch counts, timings) and exits 1 on any failure.

Tolerances come from float32 rounding: for the weight summary
|Δ logsumexp| ≤ 2⁻²³ (|lse| + 2 (⌈n/T⌉ + log₂ T + 2)) (serial chunk of ⌈n/T⌉ terms, a
log₂ T-level tree, the final log and add), and |Δ ESS|/ESS ≤ 3 of those (ESS = S1²/S2
here, exp(2 lse − lse₂) in the reference). Resampling: every ancestor must be right for
the float64 slot positions of the float32 weights up to :func:`pos_tol` (the kernel's
``expf`` may differ from NumPy's by 2 ulp per weight; its double accumulation adds ~10⁻⁹
slots), equal to the generic path's (``resampling._from_slots``) wherever both positions
are exact (one finite weight; a power-of-two number of equal weights among −inf ones for
n ≤ 10⁵, where their float32 prefix sums are exact), and elsewhere, for n ≤ 10⁴, differ
from it in at most max(8, m/1000) slots (the generic int + fraction prefix sums are ~10⁻³
slots off: no sharp oracle for more particles).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import genmlx  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from genmlx.inference import resampling as R
from genmlx.kernels import _backend as B
from genmlx.kernels.resample import resample_stratified, resample_systematic
from genmlx.kernels.weights import weight_summary, weight_summary_generic

EPS = 2.0 ** -23
SIZES = (1, 7, 1000, 100_003)
LARGE = 1_000_003  # weight summary: the split (two-launch) path; resampling: long scans


def lse_tol(lse: np.ndarray, n: int, threads: int = 1024) -> np.ndarray:
    """Float32 rounding bound on |Δ logsumexp| between two summation orders."""
    terms = math.ceil(n / threads) + math.log2(threads) + 2
    return EPS * (np.abs(np.nan_to_num(lse, posinf=0, neginf=0)) + 2 * terms)


def cases(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Named log-weight vectors of length n: spread, equal, one finite, dyadic {0, −inf}."""
    rng = np.random.default_rng(seed + n)
    out = {"normal": (3 * rng.standard_normal(n)).astype(np.float32),
           "equal": np.full(n, -2.5, np.float32)}
    one = np.full(n, -np.inf, np.float32)
    one[rng.integers(n)] = -1.0
    out["one_finite"] = one
    k = 1 << int(math.log2(max(1, n // 3)))  # a power of two of nonzero weights: exact CDF
    dy = np.full(n, -np.inf, np.float32)
    dy[rng.choice(n, size=k, replace=False)] = 0.0
    out["dyadic"] = dy
    out["all_neg_inf"] = np.full(n, -np.inf, np.float32)
    return out


def check_weight_summary(lw: np.ndarray) -> dict:
    x = mx.array(lw)
    lse, ess = weight_summary(x)
    rl, re = weight_summary_generic(x)
    mx.eval(lse, ess, rl, re)
    lse, ess, rl, re = (np.array(a) for a in (lse, ess, rl, re))
    n = lw.shape[-1]
    tol = lse_tol(rl, n)
    same_nan = np.array_equal(np.isnan(lse), np.isnan(rl)) and np.array_equal(np.isnan(ess), np.isnan(re))
    fin = np.isfinite(rl)
    d_lse = np.abs(lse[fin] - rl[fin])
    same_inf = np.array_equal(lse[~fin], rl[~fin])
    fe = np.isfinite(re)
    rel_ess = np.abs(ess[fe] - re[fe]) / np.abs(re[fe])
    ok = bool(same_nan and same_inf and np.all(d_lse <= tol[fin]) and np.all(rel_ess <= 3 * tol[fe]))
    return {"pass": ok, "max_abs_err_lse": float(d_lse.max(initial=0)),
            "max_rel_err_ess": float(rel_ess.max(initial=0)), "tol_lse": float(tol.max())}


def positions64(lw: np.ndarray, m: int) -> np.ndarray:
    """The float64 slot positions X_i = m · Σ_{k≤i} w_k / Σ w of the float32 weights
    w = exp(lw − max lw) (uniform when every weight is −inf)."""
    lw = np.asarray(lw, np.float32)
    M = lw.max()
    w = np.exp(lw - M).astype(np.float64) if M > -np.inf else np.ones(lw.shape, np.float64)
    c = np.cumsum(w)
    return m * c / c[-1]


def pos_tol(m: int) -> float:
    """Bound on |X_kernel − X64| in slots: 2 ulp (2^−22 relative) per weight in the
    kernel's ``expf``, accumulated over at most the m slots, plus the float32 fraction."""
    return 2.0 ** -22 * m + 1e-6


def explained(anc: np.ndarray, X: np.ndarray, U: np.ndarray, m: int, tol: float) -> bool:
    """Every slot's ancestor a is right up to ``tol`` slots: X[a−1] − tol < j + U_j ≤
    X[a] + tol for the (float64) slot positions ``X``."""
    p = np.arange(m) + np.broadcast_to(U, (m,)).astype(np.float64)
    a = anc.astype(np.int64)
    hi = np.where(a < len(X) - 1, X[a], np.inf)
    lo = np.where(a > 0, X[np.maximum(a - 1, 0)], -np.inf)
    return bool(np.all((p <= hi + tol) & (p > lo - tol)))


def check_resample(lw: np.ndarray, scheme: str, m: int, exact: bool, seed: int = 1) -> dict:
    """Kernel ancestors vs the float64 positions and the generic path (module
    docstring): equal to the generic ones when ``exact`` (both positions exact); every
    ancestor right for the float64 positions up to :func:`pos_tol`; sorted, in range."""
    x = mx.array(lw)
    key = mx.random.key(seed)
    if scheme == "systematic":
        U = mx.random.uniform(shape=(), key=key)
        anc = resample_systematic(U, x, m)
    else:
        U = mx.random.uniform(shape=(m,), key=key)
        anc = resample_stratified(U, x, m)
    ref = R._from_slots(x, U, m)
    mx.eval(anc, ref, U)
    anc, ref, U = np.array(anc), np.array(ref), np.array(U)
    n = lw.shape[0]
    X = positions64(lw, m)
    counts = np.bincount(anc, minlength=n)
    ref_counts = np.bincount(ref, minlength=n)
    mism = int((anc != ref).sum())
    sorted_ok = bool(np.all(np.diff(anc) >= 0)) and anc.min() >= 0 and anc.max() < n
    right = explained(anc, X, U, m, pos_tol(m))
    if exact:
        ok = sorted_ok and right and mism == 0
    else:  # beyond 10⁴ particles the generic positions' ~10⁻³-slot error is no sharp oracle
        ok = sorted_ok and right and (n > 10_000 or mism <= max(8, m // 1000))
    return {"pass": bool(ok), "mismatched_slots": mism, "right_for_exact_positions": right,
            "max_index_diff": int(np.abs(anc.astype(np.int64) - ref).max(initial=0)),
            "count_l1_diff": int(np.abs(counts - ref_counts).sum())}


def check_large_m(lw: np.ndarray, m: int, seed: int = 1) -> dict:
    """Systematic resampling of n particles into m slots (m ≥ 2^24 is the case a float32
    CDF cannot resolve): every offspring count within one of m·w_i (the float64 positions'
    differences, up to :func:`pos_tol`), the counts summing to m, and exactly m·w_i where
    those are integers (equal weights, m a multiple of n)."""
    x = mx.array(lw)
    U = mx.random.uniform(shape=(), key=mx.random.key(seed))
    anc = resample_systematic(U, x, m)
    counts = np.bincount(np.array(anc), minlength=lw.shape[0])
    X = positions64(lw, m)
    expect = np.diff(np.concatenate([[0.0], X]))
    dev = np.abs(counts - expect)
    ok = bool(counts.sum() == m and np.all(dev < 1 + pos_tol(m)))
    if np.all(expect == np.round(expect)):  # integer expectations: exactly those counts
        ok = ok and bool(np.array_equal(counts, expect.astype(np.int64)))
    return {"pass": ok, "max_count_dev": float(dev.max()), "m": m}


def _time(fn, reps: int) -> float:
    mx.eval(fn())
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return (time.perf_counter() - t0) / reps * 1e6


def timings(n: int) -> dict:
    x = mx.array((3 * np.random.default_rng(0).standard_normal(n)).astype(np.float32))
    U = mx.random.uniform(shape=(n,), key=mx.random.key(0))
    reps = 20
    out = {}
    for label, flag in (("kernel", "auto"), ("generic", "0")):
        with B.override(flag):
            out[f"weight_summary_{label}_us"] = _time(lambda: weight_summary(x), reps)
            out[f"stratified_{label}_us"] = _time(lambda: resample_stratified(U, x, n), reps)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="sizes up to 1000 only, no timings")
    p.add_argument("--force", action="store_true",
                   help="run the checks without a GPU backend too (generic vs generic)")
    a = p.parse_args(argv)
    backend = B.active_backend()
    report: dict = {"device": str(mx.default_device()), "backend": backend,
                    "kernel_path": backend is not None, "mode": B.mode(), "checks": []}
    if backend is None and not a.force:
        report.update(skipped="no GPU backend (or GENMLX_KERNELS=0): only the generic path "
                              "exists here; --force runs the checks on it anyway")
        report["pass"] = True
        print(json.dumps(report, indent=1))
        return 0
    sizes = [s for s in SIZES if not a.quick or s <= 1000]
    for n in sizes:
        for name, lw in cases(n).items():
            r = {"kernel": "weight_summary", "n": n, "case": name, **check_weight_summary(lw)}
            report["checks"].append(r)
            exact = name in ("dyadic", "one_finite")  # positions exact both ways at these n
            for scheme in ("systematic", "stratified"):
                r = {"kernel": f"resample_{scheme}", "n": n, "case": name,
                     **check_resample(lw, scheme, n, exact)}
                report["checks"].append(r)
        rows = np.stack([cases(n, seed=s)["normal"] for s in range(3)])
        report["checks"].append({"kernel": "weight_summary", "n": n, "case": "batched[3,n]",
                                 **check_weight_summary(rows)})
    if not a.quick:
        for name, lw in cases(LARGE).items():
            report["checks"].append({"kernel": "weight_summary", "n": LARGE, "case": name,
                                     **check_weight_summary(lw)})
            for scheme in ("systematic", "stratified"):
                report["checks"].append({"kernel": f"resample_{scheme}", "n": LARGE, "case": name,
                                         **check_resample(lw, scheme, LARGE, name == "one_finite")})
        big = 1000 * ((1 << 24) // 1000 + 1)  # > 2^24 slots, a multiple of n = 1000
        for name in ("normal", "equal"):
            report["checks"].append({"kernel": "resample_systematic", "n": 1000, "m": big, "case": name,
                                     **check_large_m(cases(1000)[name], big)})
        rows = np.stack([cases(LARGE, seed=s)["normal"] for s in range(2)])
        report["checks"].append({"kernel": "weight_summary", "n": LARGE, "case": "batched[2,n]",
                                 **check_weight_summary(rows)})
    # m != n (fewer and more slots than particles)
    lw = cases(1000)["normal"]
    for m in (37, 4099):
        for scheme in ("systematic", "stratified"):
            report["checks"].append({"kernel": f"resample_{scheme}", "n": 1000, "m": m,
                                     "case": "normal", **check_resample(lw, scheme, m, False)})
    if not a.quick:
        report["timings_us"] = {str(n): timings(n) for n in (1000, 100_000, 1_000_000)}
    report["n_checks"] = len(report["checks"])
    report["n_failed"] = sum(not c["pass"] for c in report["checks"])
    report["pass"] = report["n_failed"] == 0
    print(json.dumps(report, indent=1))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
