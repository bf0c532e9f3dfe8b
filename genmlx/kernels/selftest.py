"""``python -m genmlx.kernels.selftest [--quick]``: every kernel against its generic
reference on the current default device; prints one JSON report (pass/fail, max error,
mismatch counts, timings) and exits 1 on any failure.

Tolerances come from float32 rounding: for the weight summary
|Δ logsumexp| ≤ 2⁻²³ (|lse| + 2 (⌈n/T⌉ + log₂ T + 2)) (serial chunk of ⌈n/T⌉ terms, a
log₂ T-level tree, the final log and add), and |Δ ESS|/ESS ≤ 3 of those (ESS = S1²/S2
here, exp(2 lse − lse₂) in the reference). Ancestors must be equal wherever both CDFs are
exact in float32 (a power-of-two number of equal weights among −inf ones, one finite weight);
otherwise every ancestor must be right for the float64 CDF up to the kernel's rounding
bound, and (n ≤ 10⁴) differ from the reference's in a handful of slots at most.
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


def cdf64(lw: np.ndarray) -> np.ndarray:
    """The exact (float64) normalised CDF, uniform when every weight is −inf."""
    lw = np.asarray(lw, np.float64)
    w = np.exp(lw - lw.max()) if lw.max() > -np.inf else np.ones_like(lw)
    return np.cumsum(w) / w.sum()


def cdf_tol(n: int, threads: int = 1024) -> float:
    """Float32 rounding bound of the kernel CDF: a serial chunk of ⌈n/T⌉ terms, a
    log₂ T-level scan, the prefix add, the division, and m·C in the decision."""
    return EPS * (math.ceil(n / threads) + math.log2(threads) + 6)


def explained(anc: np.ndarray, cdf: np.ndarray, U: np.ndarray, m: int, tol: float) -> bool:
    """Every slot's ancestor a is right up to ``tol``: C[a−1] − tol < u_j ≤ C[a] + tol,
    u_j = (j + U_j)/m, for the (exact) CDF ``cdf``."""
    j = np.arange(m)
    u = (j + np.broadcast_to(U, (m,)).astype(np.float64)) / m
    a = anc.astype(np.int64)
    hi = np.where(a < len(cdf) - 1, cdf[a], np.inf)
    lo = np.where(a > 0, cdf[np.maximum(a - 1, 0)], -np.inf)
    return bool(np.all((u <= hi + tol) & (u > lo - tol)))


def check_resample(lw: np.ndarray, scheme: str, m: int, exact: bool, seed: int = 1) -> dict:
    """Kernel ancestors vs the reference: equal when ``exact`` (both CDFs exact in
    float32); otherwise every ancestor must be right for the float64 CDF up to
    :func:`cdf_tol`, and, for n ≤ 10⁴, differ from the reference's in at most
    max(8, m/1000) slots. (For larger n the reference's own serial float32 cumsum is off by
    ~√n ε — 3·10⁻⁵ at n = 10⁵ on CPU — so its ancestors are not a sharp oracle there.)"""
    x = mx.array(lw)
    key = mx.random.key(seed)
    if scheme == "systematic":
        U = mx.random.uniform(shape=(), key=key)
        anc = resample_systematic(U, x, m)
    else:
        U = mx.random.uniform(shape=(m,), key=key)
        anc = resample_stratified(U, x, m)
    cdf_ref = R._cdf(x)
    ref = R._from_strata(cdf_ref, U, m)
    mx.eval(anc, ref, cdf_ref, U)
    anc, ref, cdf_ref, U = np.array(anc), np.array(ref), np.array(cdf_ref), np.array(U)
    n = lw.shape[0]
    c64 = cdf64(lw)
    counts = np.bincount(anc, minlength=n)
    ref_counts = np.bincount(ref, minlength=n)
    mism = int((anc != ref).sum())
    sorted_ok = bool(np.all(np.diff(anc) >= 0)) and anc.min() >= 0 and anc.max() < n
    right = explained(anc, c64, U, m, cdf_tol(n))
    if exact:
        ok = sorted_ok and mism == 0 and np.array_equal(counts, ref_counts)
    else:
        ok = sorted_ok and right and (n > 10_000 or mism <= max(8, m // 1000))
    return {"pass": bool(ok), "mismatched_slots": mism, "right_for_exact_cdf": right,
            "max_index_diff": int(np.abs(anc.astype(np.int64) - ref).max(initial=0)),
            "count_l1_diff": int(np.abs(counts - ref_counts).sum()),
            "reference_cdf_err": float(np.abs(cdf_ref - c64).max())}


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
            exact = name in ("dyadic", "one_finite")  # CDFs exact in float32 both ways
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
                                         **check_resample(lw, scheme, LARGE,
                                                          name in ("dyadic", "one_finite"))})
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
