"""Fused inference kernels (genmlx.kernels): dispatch, transformation safety, the
algorithms (NumPy thread-by-thread emulation) against the MLX references, and, on a GPU,
the kernels themselves against the references (skipped visibly without one)."""

from __future__ import annotations

import io
import shutil

import genmlx  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest

from genmlx import kernels as K
from genmlx.inference import resampling as R
from genmlx.inference.prefix_sums import BLOCK, slot_positions
from genmlx.kernels import _backend as B
from genmlx.kernels import cuda_check
from genmlx.kernels import emulate as E
from genmlx.kernels import resample as KR
from genmlx.kernels import sums as KS
from genmlx.kernels import selftest as S
from genmlx.kernels import weights as KW

from ._halo_cases import FLAGS, halo_cases

needs_gpu = pytest.mark.skipif(B.active_backend() is None, reason="no GPU backend: the fused kernels run only on MLX's CUDA (or Metal) device; the generic path is tested here")
needs_cuda = pytest.mark.skipif(B.active_backend() != "cuda", reason="not a CUDA device: the sum kernels run only on MLX's CUDA backend; their generic path (mx.sum) is tested here")


# -- dispatch -------------------------------------------------------------------------
def test_switch_and_env(monkeypatch):
    x = mx.zeros((8,))
    with B.override(False):
        assert B.use_kernel(x) is None and B.mode() == "0"
    monkeypatch.setenv("GENMLX_KERNELS", "bogus")
    with pytest.raises(ValueError, match="GENMLX_KERNELS"):
        B.mode()
    monkeypatch.setenv("GENMLX_KERNELS", "0")
    assert B.active_backend() is None
    with pytest.raises(ValueError, match="kernel switch"):
        with B.override("maybe"):
            pass
    assert B.use_kernel(mx.zeros((8,), dtype=mx.float16)) is None  # unsupported dtype
    assert B.use_kernel(mx.zeros((0,))) is None


def test_cpu_takes_generic_path():
    if B.gpu_backend() is not None:
        pytest.skip("the default device is a GPU, where the kernel path is taken; this checks the CPU fallback")
    assert B.active_backend() is None
    x = mx.array(np.random.default_rng(0).standard_normal(50).astype(np.float32))
    lse, ess = K.weight_summary(x)
    rl, re = KW.weight_summary_generic(x)
    assert mx.array_equal(lse, rl) and mx.array_equal(ess, re)


def test_bad_input_errors():
    lw = mx.zeros((5,))
    with pytest.raises(ValueError, match="m must be a positive int"):
        K.resample_systematic(mx.array(0.5), lw, 0)
    with pytest.raises(ValueError, match="uniforms must have shape"):
        K.resample_stratified(mx.zeros((4,)), lw, 5)
    with pytest.raises(ValueError, match="log_weights must have shape"):
        K.resample_systematic(mx.array(0.5), mx.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="at least one axis"):
        K.weight_summary(mx.array(1.0))
    assert K.resample_systematic(mx.array(0.5), lw, np.int64(5)).shape == (5,)


# -- transformation safety with stand-in kernels (runs everywhere) ----------------------
@pytest.fixture
def fake_kernels(monkeypatch):
    """Force the kernel path with MLX-op stand-ins whose outputs are recognisable: the
    weight summary is offset by +1000 and scaled ×2 (so its gradient differs), the
    search returns −7s. Under vmap/grad the generic rules must be used instead."""
    monkeypatch.setattr(B, "use_kernel", lambda x: "cuda" if x.dtype == mx.float32 else None)
    monkeypatch.setattr(K, "use_kernel", B.use_kernel)

    def fake_ws(backend, lw):
        lse, ess = KW.weight_summary_generic(lw)
        return 2 * lse + 1000, ess

    monkeypatch.setattr(KW, "_weight_summary_kernel", fake_ws)
    monkeypatch.setattr(KR, "positions_kernel", lambda lw, ends: slot_positions(R._weights(lw), ends))
    monkeypatch.setattr(KR, "search_kernel",
                        lambda pos, U, first=0: mx.full((U.shape[0],), -7, dtype=mx.int32))


def test_kernel_path_taken_when_fused_directly_and_compiled(fake_kernels):
    x = mx.array([0.0, -1.0, 2.0])
    assert float(K.weight_summary(x)[0]) > 900
    assert float(mx.compile(lambda a: K.weight_summary(a)[0])(x)) > 900
    assert float(R.log_mean_exp(x, fused=True)) > 900
    assert mx.all(R.systematic(mx.random.key(0), x, fused=True) == -7).item()
    assert mx.all(mx.compile(lambda a: R.stratified(mx.random.key(0), a, fused=True))(x) == -7).item()
    assert mx.all(R.resample_indices(mx.random.key(0), x, 3, "systematic", fused=True) == -7).item()


def test_smc_steps_ask_for_the_fused_kernels(fake_kernels):
    """The SMC resampling step (never vmapped) takes the kernel path where kernels exist:
    the stand-in's weight summary (+1000) and ancestors (−7) show up in its outputs."""
    from genmlx.inference.smc import _resample

    lw = mx.array([0.0, -30.0, -30.0, -30.0])  # ESS ≈ 1 < threshold · n: resample
    idx, new_lw, ess, do = _resample(("systematic", 0.5), mx.random.key(0), lw)
    assert bool(do) and mx.all(idx == -7).item()
    assert float(new_lw[0]) > 900  # log_mean_exp from the stand-in summary


@pytest.fixture
def unvmappable_kernels(fake_kernels, monkeypatch):
    """Stand-in kernels that, like MLX's custom kernels, cannot be vmapped: their forward
    holds a primitive without a vmap rule (QR), on the tape of anything vmapped through it."""
    def no_vmap(x):
        a = x.reshape(1, -1)[:, :1] * mx.ones((2, 2)) + mx.eye(2)
        return mx.linalg.qr(a, stream=mx.cpu)[0][0, 0] * 0

    def fake_ws(backend, lw):
        lse, ess = KW.weight_summary_generic(lw)
        return 2 * lse + 1000 + no_vmap(lw), ess

    monkeypatch.setattr(KW, "_weight_summary_kernel", fake_ws)
    def fake_positions(lw, ends):
        I, F = slot_positions(R._weights(lw), ends)
        return I, F + no_vmap(lw)

    monkeypatch.setattr(KR, "positions_kernel", fake_positions)


def test_unvmappable_stand_in_really_fails_under_vmap(unvmappable_kernels):
    """The stand-in reproduces the GPU failure (so the next test can fail)."""
    xs = mx.zeros((2, 5))
    with pytest.raises(ValueError, match="vmap"):
        mx.eval(mx.vmap(lambda a: R.log_mean_exp(a, fused=True))(xs))


def test_public_functions_vmap_with_kernels_available(unvmappable_kernels):
    """By default (fused=False) the public resampling/weight functions take the generic
    path, so they vmap (and compile) wherever kernels exist (the GPU raised
    '[Primitive::vmap] Not implemented for CustomKernel' before)."""
    xs = mx.array(np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32))
    keys = mx.random.split(mx.random.key(3), 4)
    for scheme in (R.systematic, R.stratified):
        got = mx.compile(mx.vmap(lambda k, lw: scheme(k, lw)))(keys, xs)
        with B.override(False):
            want = mx.vmap(lambda k, lw: scheme(k, lw))(keys, xs)
        assert mx.array_equal(got, want).item()
    rl, re = KW.weight_summary_generic(xs)
    assert mx.allclose(mx.vmap(R.effective_sample_size)(xs), re).item()
    assert mx.allclose(mx.vmap(R.log_mean_exp)(xs), rl - np.log(6)).item()


def test_grad_takes_generic_rules(fake_kernels):
    x = mx.array([0.3, -1.0, 2.0, 0.5])

    def f(a):
        lse, ess = K.weight_summary(a)
        return lse + 0.1 * ess

    def g(a):
        lse, ess = KW.weight_summary_generic(a)
        return lse + 0.1 * ess

    assert mx.allclose(mx.grad(f)(x), mx.grad(g)(x), atol=1e-6).item()
    assert mx.allclose(mx.compile(mx.grad(f))(x), mx.grad(g)(x), atol=1e-6).item()
    _, t = mx.jvp(f, [x], [mx.ones_like(x)])
    _, t_ref = mx.jvp(g, [x], [mx.ones_like(x)])
    assert mx.allclose(t[0], t_ref[0], atol=1e-6).item()


# -- the algorithms, emulated thread by thread in NumPy --------------------------------
def _uniforms(scheme: str, m: int, seed: int = 1) -> np.ndarray:
    shape = () if scheme == "systematic" else (m,)
    return np.array(mx.random.uniform(shape=shape, key=mx.random.key(seed)))


def _count_ancestors(pi: np.ndarray, pf: np.ndarray, U: np.ndarray, m: int) -> np.ndarray:
    """The reference decision on given slot positions: counts N_i = I_i + [U ≤ F_i]
    (``resampling._points_below``) turned into sorted ancestors."""
    N = mx.cummax(R._points_below(mx.array(pi), mx.array(pf), mx.array(U), m))
    return np.array(R._ancestors_from_cumulative(N, 0, m))


def _as_float64(pi, pf) -> np.ndarray:
    return np.asarray(pi, np.float64) + np.asarray(pf, np.float64)


@pytest.mark.parametrize("n", [1, 7, 1000])
@pytest.mark.parametrize("scheme", ["systematic", "stratified"])
def test_search_rule_equals_reference_exactly(n, scheme):
    """Given slot positions, the binary search (I_i > j, or I_i = j and U_j ≤ F_i)
    reproduces the reference's counting ancestors bit for bit; so does the CUDA kernel's
    block-guided search (each block's threads search only between the ancestors of its
    first and last slot), for any block size; also for a run of slots (first > 0)."""
    for name, lw in S.cases(n).items():
        for m in (n, 3 * n + 1):
            U = _uniforms(scheme, m)
            pi, pf = E.positions(lw, m)
            ref = _count_ancestors(pi, pf, U, m)
            for block in (None, 1, 3, 256):
                assert np.array_equal(E.search_positions(pi, pf, U, m, 0, block), ref), (name, m, block)
            if scheme == "systematic" and m > 4:
                got = E.search_positions(pi, pf, U, m - 3, 2, 3)
                assert np.array_equal(got, ref[2:m - 1]), (name, m)


def test_search_rule_on_exact_boundaries():
    """A point j + U landing exactly on a position (U = 0, dyadic weights) goes left."""
    lw = np.log(np.array([1, 1, 2, 4], np.float32))  # X = 1, 2, 4, 8 for m = 8 (exact)
    pi, pf = E.positions(lw, 8)
    assert np.array_equal(pi, [1, 2, 4, 8]) and np.all(pf == 0)
    for U in (np.float32(0.0), np.zeros(8, np.float32)):
        ref = _count_ancestors(pi, pf, U, 8)
        assert np.array_equal(E.search_positions(pi, pf, U, 8), ref)
        assert np.array_equal(ref, [0, 0, 1, 2, 2, 3, 3, 3])  # point j goes to the first X ≥ j


@pytest.mark.parametrize("n", [1, 7, 1000, 100_003])
def test_positions_scan_and_search_against_float64(n):
    """The whole algorithm (double chunked scan → search): positions within 10⁻⁶ slots of
    the float64 ones of the same float32 weights, nondecreasing, the last exactly m; every
    ancestor right for the float64 positions; equal to the generic path's wherever both
    positions are exact (dyadic and one-finite weights), and elsewhere differing from it
    in few slots (the generic int + fraction prefix sums are ~10⁻³ slots off)."""
    m = n if n <= 1000 else 2000  # the NumPy search is a Python loop: fewer slots for 1e5
    for name, lw in S.cases(n).items():
        pi, pf = E.positions(lw, m)
        X = _as_float64(pi, pf)
        X64 = S.positions64(lw, m)
        assert np.all(np.diff(X) >= 0) and pi[-1] == m and pf[-1] == 0, name
        assert np.abs(X - X64).max() <= 1e-6, (name, np.abs(X - X64).max())
        for scheme in ("systematic", "stratified"):
            U = _uniforms(scheme, m)
            anc = E.search_positions(pi, pf, U, m)
            ref = np.array(R._from_slots(mx.array(lw), mx.array(U), m))
            assert np.all(np.diff(anc) >= 0)
            assert S.explained(anc, X64, U, m, 1e-6), (name, scheme)
            if name in ("dyadic", "one_finite"):
                assert np.array_equal(anc, ref), (name, scheme)
            else:
                assert (anc != ref).sum() <= max(8, m // 1000), (name, scheme)


@pytest.mark.parametrize("n", [1000, 20_011])
def test_multiblock_positions_against_float64(n):
    """The multi-block positions (float32 segment masses → double offsets → segment
    scans; emulated with small segments so that G > 1): monotone, the last exactly m;
    within 10⁻⁶ slots of the float64 positions, also at m > 2^24 slots (where a float32
    CDF is off by whole slots), wherever the segment masses are exact in float32 (equal,
    dyadic, one-finite weights); else within the float32 rounding of the segment masses
    (exact positions of weights perturbed per segment by ~2^−23); ancestors right."""
    for m in (n, (1 << 24) + 7):
        for name, lw in S.cases(n).items():
            pi, pf = E.positions(lw, m, threads=32, segment=64)
            X = _as_float64(pi, pf)
            assert np.all(np.diff(X) >= 0) and pi[-1] == m and pf[-1] == 0, name
            tol = S.pos_tol(m) if name == "normal" else 1e-6
            assert np.abs(X - S.positions64(lw, m)).max() <= tol, name
        lw = S.cases(n)["normal"]
        pi, pf = E.positions(lw, m, threads=32, segment=64)
        k = min(m, 3000)
        U = _uniforms("stratified", k)
        anc = E.search_positions(pi, pf, U, k)
        assert S.explained(anc, S.positions64(lw, m), U, k, S.pos_tol(m))


def test_float32_cdf_cannot_resolve_2_pow_24_slots():
    """Why the CUDA kernels moved to slot positions: with a float32 CDF and the decision
    on x = m·C (Metal's kernels, the old CUDA ones), m ≥ 2^24 slots make x an even
    integer past slot 2^24, so every offspring count there comes out even (equal
    weights: 0 or 2 instead of 1); the positions give every particle exactly one."""
    n = 1 << 10
    m = (1 << 24) + (1 << 23)
    lw = np.zeros(n, np.float32)
    c = E.cdf(lw)  # exact here (dyadic)
    x = (np.float32(m) * c).astype(np.float32)
    assert np.all(x[x >= 2 ** 24] % 2 == 0)
    pi, pf = E.positions(lw, m)
    k = m // n
    assert np.array_equal(pi, k * np.arange(1, n + 1)) and np.all(pf == 0)
    anc = _count_ancestors(pi, pf, np.float32(0.3), m)
    assert np.array_equal(np.bincount(anc, minlength=n), np.full(n, k))


@pytest.mark.parametrize("n", [7, 1000])
def test_metal_search_rule_equals_float32_reference(n):
    """Metal keeps the float32 pair (m < 2^24): its emulated scan and search against the
    float32 counting reference (``resampling._from_strata``) on the same CDF."""
    for name, lw in S.cases(n).items():
        c = E.cdf(lw)
        assert np.all(np.diff(c) >= 0), name
        for scheme in ("systematic", "stratified"):
            U = _uniforms(scheme, n)
            ref = np.array(R._from_strata(mx.array(c), mx.array(U), n))
            assert np.array_equal(E.search(c, U, n), ref), (name, scheme)


def test_one_finite_weight_takes_every_slot():
    lw = np.full(1000, -np.inf, np.float32)
    lw[417] = 3.0
    pi, pf = E.positions(lw, 1000)
    anc = E.search_positions(pi, pf, _uniforms("stratified", 1000), 1000)
    assert np.all(anc == 417)


@pytest.mark.parametrize("n", [1, 7, 1000, 5003])
def test_online_weight_summary_against_generic(n):
    for name, lw in S.cases(n).items():
        lse, ess = E.weight_summary(lw)
        rl, re = (np.array(a) for a in KW.weight_summary_generic(mx.array(lw)))
        if name == "all_neg_inf":
            assert lse == -np.inf and np.isnan(ess) and rl == -np.inf and np.isnan(re)
            continue
        tol = S.lse_tol(rl, n, threads=32)
        assert abs(lse - rl) <= tol, name
        assert abs(ess - re) <= 3 * tol * re, name


def _check_weight_stats(n: int, threads: int) -> None:
    """R.weight_stats(fused=True) on the selftest cases against float64 logsumexps: within
    the rounding of lse (twice) and of log ESS (3 lse tolerances) of a ``threads``-thread
    summation; −∞ for an all −∞ row."""
    for name, lw in S.cases(n).items():
        got = np.array(R.weight_stats(mx.array(lw), fused=True))
        if name == "all_neg_inf":
            assert np.all(got == -np.inf), got
            continue
        ref = np.array([np.logaddexp.reduce(lw.astype(np.float64)), np.logaddexp.reduce(2 * lw.astype(np.float64))])
        tol = 5 * S.lse_tol(np.max(np.abs(ref)), n, threads=threads)
        assert np.all(np.abs(got - ref) <= tol), (name, got, ref, tol)


@pytest.mark.parametrize("n", [1, 7, 1000, 5003])
def test_weight_stats_by_the_summary_kernel(n, monkeypatch):
    """R.weight_stats' fused form (logsumexp(2 lw) = 2 logsumexp(lw) − log ESS, from the
    weight-summary kernel, emulated here) against the two generic logsumexps: within the
    rounding of lse (twice) and of log ESS (3 lse tolerances, as above); −∞ for −∞ rows."""
    def emulated(backend, x):
        lse, ess = E.weight_summary(np.array(x))
        return mx.array(lse), mx.array(ess)

    monkeypatch.setattr(K, "use_kernel", lambda x: "cuda")
    monkeypatch.setattr(B, "use_kernel", lambda x: "cuda")
    monkeypatch.setattr(KW, "_weight_summary_kernel", emulated)
    _check_weight_stats(n, threads=32)
    lw = S.cases(n)["normal"]  # the generic form is the two logsumexps themselves
    with B.override(False):
        monkeypatch.undo()
        assert np.array_equal(np.array(R.weight_stats(mx.array(lw), fused=True)),
                              np.array([mx.logsumexp(mx.array(lw)), mx.logsumexp(2 * mx.array(lw))]))


def test_selftest_checks_catch_a_wrong_kernel(monkeypatch):
    """The selftest's comparisons can fail: an off-by-one search and a biased lse must
    be reported as failures (emulated kernels stand in for the GPU ones)."""
    monkeypatch.setattr(B, "use_kernel", lambda x: "cuda")
    monkeypatch.setattr(KR, "positions_kernel",
                        lambda lw, m: tuple(mx.array(a) for a in E.positions(np.array(lw), m)))

    def good(pos, U, first=0):  # whole rows here: the counting reference (vectorized: m > 2^24 below)
        m = U.shape[0]
        return R._ancestors_from_cumulative(mx.cummax(R._points_below(pos[0], pos[1], U, m)), 0, m)

    monkeypatch.setattr(KR, "search_kernel", good)
    lw = S.cases(1000)["normal"]
    assert S.check_resample(lw, "stratified", 1000, exact=False)["pass"]
    assert S.check_resample(S.cases(1000)["dyadic"], "systematic", 1000, exact=True)["pass"]
    assert S.check_large_m(S.cases(1000)["equal"], 1000 * 16_778)["pass"]
    monkeypatch.setattr(KR, "search_kernel",
                        lambda pos, U, first=0: mx.minimum(good(pos, U) + 1, pos[0].shape[0] - 1))
    assert not S.check_resample(lw, "stratified", 1000, exact=False)["pass"]
    assert not S.check_large_m(S.cases(1000)["equal"], 1000 * 16_778)["pass"]

    def emulated(backend, x):
        lse, ess = E.weight_summary(np.array(x))
        return mx.array(lse), mx.array(ess)

    monkeypatch.setattr(KW, "_weight_summary_kernel", emulated)
    assert S.check_weight_summary(lw)["pass"]
    monkeypatch.setattr(KW, "_weight_summary_kernel",
                        lambda b, x: (emulated(b, x)[0] + 1e-4, emulated(b, x)[1]))
    assert not S.check_weight_summary(lw)["pass"]


def test_selftest_entry_point_runs(capsys):
    """``python -m genmlx.kernels.selftest`` prints a JSON report (checks forced on the
    generic path where no GPU is present)."""
    import json

    assert S.main(["--quick", "--force"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pass"] and report["n_checks"] > 40 and report["n_failed"] == 0


# -- the CUDA sources compile (wherever nvcc is installed; no GPU needed) ---------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed: the offline compile check of the CUDA kernel sources needs it")
def test_cuda_sources_compile():
    parts = cuda_check.kernels()
    assert set(parts) >= {"weight_summary", "weight_partial", "weight_finish", "resample_positions",
                          "resample_offsets", "resample_segments", "resample_search"}
    ok, log = cuda_check.nvcc_compile(cuda_check.translation_unit(parts))
    assert ok, log


# -- row sums: the kernel's summation order ---------------------------------------------
@pytest.mark.parametrize("k", [9, 32, 50, 77, KS.K_MAX])
def test_row_sums_reference_is_a_float32_sum(k):
    """The kernel's order (lanes over strips of 32, then the shuffle butterfly) stated in
    NumPy: the float64 row sums within the float32 bound of a k-term sum, and exactly
    the sum where every partial sum is exact (small integers)."""
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((500, k)) * 10).astype(np.float32)
    got = KS.row_sums_reference(x).astype(np.float64)
    exact = x.astype(np.float64).sum(axis=1)
    eps = float(np.finfo(np.float32).eps)
    assert np.all(np.abs(got - exact) <= (k - 1) * eps * np.abs(x).sum(axis=1) + eps * np.abs(exact))
    ints = rng.integers(-1000, 1000, (500, k)).astype(np.float32)
    assert np.array_equal(KS.row_sums_reference(ints), ints.sum(axis=1))


def test_col_sums_reference_is_the_sequential_sum():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((50, 300)) * 10).astype(np.float32)
    want = x[0].copy()
    for j in range(1, 50):
        want = (want + x[j]).astype(np.float32)
    assert np.array_equal(KS.col_sums_reference(x), want)


def test_sums_on_the_cpu_are_mlx_sums():
    if B.gpu_backend() is not None:
        pytest.skip("the default device is a GPU, where the kernels run; this checks the CPU fallback")
    x = mx.random.normal((1 << 15, 50), key=mx.random.key(0))
    assert not KS.usable(x, 1) and mx.array_equal(KS.row_sums(x), mx.sum(x, axis=1))
    assert not KS.usable(x.T, 0) and mx.array_equal(KS.col_sums(x.T), mx.sum(x.T, axis=0))


# -- the kernels themselves (GPU only) ------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("axis,shape", [
    (1, (1, 9)), (1, (3, 33)), (1, (1000, 50)), (1, (40_000, KS.K_MAX)), (1, ((1 << 21) + 77, 12)),
    (0, (9, 1)), (0, (33, 3)), (0, (50, 1000)), (0, (KS.K_MAX, 40_000)), (0, (12, (1 << 25) + 77)),
])
def test_gpu_sums(axis, shape):
    """Each sum kernel (a warp per row: axis 1; a thread per column: axis 0) equals its
    NumPy statement bit for bit (also compiled, and past its grid's warp or thread cap:
    the grid-stride loop), and its gradient is the broadcast cotangent."""
    fn, reference = (KS.row_sums, KS.row_sums_reference) if axis == 1 else (KS.col_sums, KS.col_sums_reference)
    x = mx.random.normal(shape, key=mx.random.key(shape[axis])) * 10.0
    assert KS.usable(x, axis)
    want = reference(np.array(x))
    assert np.array_equal(np.array(fn(x)), want)
    assert np.array_equal(np.array(mx.compile(fn)(x)), want)
    w = mx.random.normal((shape[1 - axis],), key=mx.random.key(7))
    g = mx.grad(lambda a: mx.sum(fn(a) * w))(x)
    assert mx.array_equal(g, mx.broadcast_to(mx.expand_dims(w, axis), shape))


@needs_cuda
def test_gpu_sums_in_vectorized_weights():
    """vgenerate of the quadratic regression (50 points) for 2^16 particles, compiled, with
    a sum kernel (no Sum node left) and without (GENMLX_KERNELS=0): the same draws,
    weights equal within float32 rounding of a 50-term sum; and the gradient of a mean
    weight through the kernel equals the generic one."""
    import genmlx as gm

    xs = mx.linspace(-1.0, 1.0, 50)
    ys = 0.5 - 1.2 * xs + 0.8 * xs**2

    @gm.gen
    def quadratic(xs):
        a = gm.trace("a", gm.normal(0.0, 1.0))
        b = gm.trace("b", gm.normal(0.0, 1.0))
        c = gm.trace("c", gm.normal(0.0, 1.0))
        return gm.trace("ys", gm.normal(a + b * xs + c * xs**2, 0.3))

    obs = gm.choicemap({"ys": ys})

    def weights(key):
        return quadratic.vgenerate(key, (xs,), obs, 1 << 16)[1]

    def mean_weight_grad(s):
        return mx.grad(lambda u: mx.mean(quadratic.vgenerate(mx.random.key(3), (xs * u,), obs, 1 << 16)[1]))(s)

    got = mx.compile(weights)(mx.random.key(1))
    dot = io.StringIO()
    mx.export_to_dot(dot, weights(mx.random.key(1)))
    assert "Sum" not in dot.getvalue()
    g = mean_weight_grad(mx.array(1.0))
    with B.override(False):
        want = mx.compile(weights)(mx.random.key(1))
        g0 = mean_weight_grad(mx.array(1.0))
    got, want = np.array(got, dtype=np.float64), np.array(want, dtype=np.float64)
    assert np.all(np.abs(got - want) <= 50 * 2 * 2.0**-24 * (np.abs(want) + 50 * 10.0))
    assert abs(float(g) - float(g0)) <= 1e-4 * (1 + abs(float(g0)))
@needs_gpu
@pytest.mark.parametrize("n", S.SIZES + (S.LARGE,))
def test_gpu_weight_summary(n):
    for name, lw in S.cases(n).items():
        r = S.check_weight_summary(lw)
        assert r["pass"], (name, r)
    rows = np.stack([S.cases(n, seed=s)["normal"] for s in range(3)])
    assert S.check_weight_summary(rows)["pass"]


@needs_gpu
@pytest.mark.parametrize("n", S.SIZES + (S.LARGE,))
def test_gpu_weight_stats(n):
    """The sharded steps' [logsumexp(lw), logsumexp(2 lw)] from the summary kernel against
    float64 logsumexps (tolerance as in test_weight_stats_by_the_summary_kernel, 1024
    threads)."""
    _check_weight_stats(n, threads=1024)


@needs_gpu
@pytest.mark.parametrize("n", S.SIZES)
@pytest.mark.parametrize("scheme", ["systematic", "stratified"])
def test_gpu_resampling(n, scheme):
    for name, lw in S.cases(n).items():
        r = S.check_resample(lw, scheme, n, exact=name in ("dyadic", "one_finite"))
        assert r["pass"], (name, r)
    for m in (37, 4099):
        assert S.check_resample(S.cases(1000)["normal"], scheme, m, exact=False)["pass"]


#: the generic slot positions' error bound: each level of the blocked fraction scan adds
#: up to BLOCK float32 partial sums below BLOCK (half an ulp of BLOCK each), two levels
#: for the rows here (n ≤ BLOCK³), plus the positions kernel's ~10⁻⁶
GENERIC_POS_TOL = 2 * BLOCK * (BLOCK * 2.0 ** -24) + 1e-6


def _cuda_only(what: str = "the positions and search kernels are",
               elsewhere: str = "Metal keeps its float32 pair"):
    """Skip (with the reason shown under ``-rs``) unless a CUDA device runs the kernels."""
    if B.active_backend() != "cuda":
        pytest.skip(f"{what} CUDA only ({elsewhere})")


@needs_gpu
def test_gpu_positions_kernel_against_float64():
    """The positions kernel (one block, and the multi-block path past SPLIT_N): monotone,
    the last exactly m, within ``pos_tol`` of the float64 positions of the same float32
    weights (the kernel's expf may differ from NumPy's by 2 ulp), within 10⁻⁶ slots where
    the weights are exact (equal, dyadic, one finite); also for m ≥ 2^24 and a slot range
    (x₀, x₁) given as int + fraction (a sharded process's)."""
    _cuda_only()
    for n in (7, 1000, KR.SPLIT_N + 1001, 1_000_003):
        for m in (n, (1 << 24) + 12_345):
            for name, lw in S.cases(n).items():
                pi, pf = KR.positions_kernel(mx.array(lw), m)
                X = _as_float64(np.array(pi), np.array(pf))
                assert np.all(np.diff(X) >= 0) and int(pi[-1]) == m and float(pf[-1]) == 0, (n, m, name)
                tol = S.pos_tol(m) if name == "normal" else 1e-6
                assert np.abs(X - S.positions64(lw, m)).max() <= tol, (n, m, name)
    lw = S.cases(1000)["normal"]
    ends = (mx.array([12_345_678, 27_345_679], dtype=mx.int32), mx.array([0.25, 0.5], dtype=mx.float32))
    pi, pf = KR.positions_kernel(mx.array(lw), ends)
    X = _as_float64(np.array(pi), np.array(pf))
    X64 = 12_345_678.25 + S.positions64(lw, 1.0) * (15_000_001.25)
    assert np.abs(X - X64).max() <= S.pos_tol(15_000_001) and X[-1] == 27_345_679.5


@needs_gpu
def test_gpu_search_kernel_exact_on_given_positions():
    """The search kernel fed slot positions reproduces the reference's counting on the
    same positions bit for bit (whole rows and runs of slots)."""
    _cuda_only()
    for n in (7, 1000, 100_003):
        for name, lw in S.cases(n).items():
            pi, pf = (mx.array(a) for a in E.positions(lw, n))
            Us = mx.random.uniform(shape=(n,), key=mx.random.key(2))
            u = mx.random.uniform(shape=(), key=mx.random.key(2))
            for U_kernel, U_ref in ((Us, Us), (mx.broadcast_to(u, (n,)), u)):
                got = KR.search_kernel((pi, pf), U_kernel)
                want = _count_ancestors(np.array(pi), np.array(pf), np.array(U_ref), n)
                assert np.array_equal(np.array(got), want), (n, name)
            if n > 4:
                got = KR.search_kernel((pi, pf), mx.broadcast_to(u, (n - 3,)), 2)
                want = _count_ancestors(np.array(pi), np.array(pf), np.array(u), n)[2:n - 1]
                assert np.array_equal(np.array(got), want), (n, name, "run")


@needs_gpu
def test_gpu_resampling_past_2_pow_24_slots():
    """m > 2^24 slots on the kernel path: counts within one of m·w_i, exactly m/n for
    equal weights (a float32 CDF gave 0 or 2 past slot 2^24)."""
    _cuda_only()
    big = 1000 * ((1 << 24) // 1000 + 1)
    for name in ("normal", "equal"):
        r = S.check_large_m(S.cases(1000)[name], big)
        assert r["pass"], (name, r)


@needs_gpu
def test_gpu_sharded_segments_by_kernel_equal_generic():
    """Sharded systematic resampling on R virtual processes: the positions kernel's
    global slot positions agree with the generic int + fraction ones (to the generic
    path's bound, ``GENERIC_POS_TOL``), and the search kernel fills each process's segment exactly as
    the generic counting path does from the same positions."""
    from genmlx.inference.sharded import SegmentPlan, _systematic_local

    _cuda_only()
    for R_, m in ((2, 1000), (3, 40_001), (4, 7), (2, 150_001)):
        for case in range(3):
            k = mx.random.key(100 * R_ + case)
            lws = [mx.random.normal((m,), key=kk) * (0.5 + 3 * case) for kk in mx.random.split(k, R_)]
            if case == 2:
                lws[0] = mx.full((m,), -mx.inf)  # a process without mass: an empty segment
            stats = mx.stack([mx.stack([mx.logsumexp(lw), mx.logsumexp(2 * lw)]) for lw in lws])
            key = mx.random.key(7 + case)
            for r, lw in enumerate(lws):
                gen = _systematic_local((R_, r, 1.0, False), key, lw, stats)
                fus = _systematic_local((R_, r, 1.0, True), key, lw, stats)
                assert mx.array_equal(gen[3], fus[3]).item()
                dx = np.abs(_as_float64(*map(np.array, gen[4])) - _as_float64(*map(np.array, fus[4])))
                assert dx.max() <= GENERIC_POS_TOL, (R_, m, case, r, dx.max())
                plan = SegmentPlan([int(v) for v in np.array(fus[3])], m)
                want = plan.segment(fus[4], fus[5], r, False)
                got = plan.segment(fus[4], fus[5], r, True)
                assert mx.array_equal(got, want).item(), (R_, m, case, r)


@needs_gpu
def test_gpu_sync_free_windows_by_kernel_equal_generic():
    """The sharded sync-free step's fixed slot runs [r·m − W, (r+1)·m + W) (first < 0 for
    r = 0, past n for the last process): the search kernel gives the generic counting
    path's ancestors on every slot of the process's segment (same positions), and the
    compiled step on R virtual processes (fused: the positions and search kernels)
    assembles the blocks the exact path (SegmentPlan, fused) assembles."""
    from genmlx.inference.sharded import SegmentPlan, _sync_free_assemble, _sync_free_search, _systematic_local

    _cuda_only()
    for R_, m, W0 in ((2, 1000, 64), (3, 40_001, 4096), (4, 7, 3)):
        n = R_ * m
        for case in range(3):
            k = mx.random.key(100 * R_ + case)
            lws = [mx.random.normal((m,), key=kk) * (0.3 + 0.5 * case) for kk in mx.random.split(k, R_)]
            W = W0
            if case == 2:
                lws[0] = mx.full((m,), -mx.inf)  # a process without mass: an empty segment
                W = m  # (its block filled from its neighbours' windows)
            stats = mx.stack([mx.stack([mx.logsumexp(lw), mx.logsumexp(2 * lw)]) for lw in lws])
            key = mx.random.key(7 + case)
            xs = [mx.random.normal((m, 2), key=mx.random.key(3 * r + case)) for r in range(R_)]
            segs, outs = [], []
            for r, lw in enumerate(lws):
                fus = _systematic_local((R_, r, 1.0, True), key, lw, stats)
                Nb = [int(v) for v in np.array(fus[3])]
                got = R.window_ancestors(fus[4], fus[5], r * m - W, m + 2 * W, n, fused=True)
                want = R.window_ancestors(fus[4], fus[5], r * m - W, m + 2 * W, n, fused=False)
                lo, hi = Nb[r] - (r * m - W), Nb[r + 1] - (r * m - W)
                lo, hi = max(lo, 0), min(hi, m + 2 * W)
                assert mx.array_equal(got[lo:hi], want[lo:hi]).item(), (R_, m, case, r)
                pay = (None, R_, r, 1.0, True, W)
                outs.append(mx.compile(lambda k_, l_, s_, x_, pay=pay: _sync_free_search(pay, k_, l_, s_, [x_]))(
                    key, lw, stats, xs[r]))
                # the exact path's head is compiled too (Shards.step_resample: cached_call)
                head = mx.compile(lambda k_, l_, s_, r=r: _systematic_local((R_, r, 1.0, True), k_, l_, s_))
                segs.append(SegmentPlan(Nb, m).segment(*head(key, lw, stats)[4:6], r, True))
            gathered = [mx.concatenate([o[6][i] for o in outs]) for i in range(2)]
            blocks = [_sync_free_assemble((None, R_, r, 1.0, True, W), o[1], o[3], o[5], [xs[r]], gathered)
                      for r, o in enumerate(outs)]
            if bool(outs[0][4]):  # overflow: the exact path redoes the run
                continue
            ref = mx.concatenate(segs)  # the segments tile the global slots in order
            got = mx.concatenate([b[1] for b in blocks])
            bad = np.flatnonzero(np.array(got) != np.array(ref))
            assert bad.size == 0, (R_, m, case, "slots", bad[:5], np.array(got)[bad[:5]], np.array(ref)[bad[:5]])
            assert mx.array_equal(mx.concatenate([b[0][0] for b in blocks]), mx.concatenate(xs)[ref]).item()


@needs_gpu
def test_gpu_kernels_under_compile_and_vmap():
    xs = mx.array(np.random.default_rng(5).standard_normal((3, 500)).astype(np.float32))
    lse, ess = mx.compile(K.weight_summary)(xs)
    rl, re = KW.weight_summary_generic(xs)
    assert mx.allclose(lse, rl, atol=1e-4).item() and mx.allclose(ess, re, rtol=1e-4).item()
    keys = mx.random.split(mx.random.key(0), 3)
    got = mx.compile(mx.vmap(R.systematic))(keys, xs)  # public default: generic, vmappable
    with B.override(False):
        want = mx.vmap(R.systematic)(keys, xs)
    assert mx.array_equal(got, want).item()
    one = mx.compile(lambda k, x: R.systematic(k, x, fused=True))(keys[0], xs[0])
    assert one.shape == (500,) and one.dtype == mx.int32
    assert int(mx.max(one)) < 500 and int(mx.min(one)) >= 0


# -- ancestral paths: the descent and the per-step gathers in one kernel -----------------
def _paths_case(T, n, seed):
    """T ancestor vectors (some the identity: no resampling) and four kinds of per-step
    arrays (float32 [n], int32 [n, 2], float16 [n, 3], bool [n])."""
    rng = np.random.default_rng(seed)
    idxs = [mx.array(rng.integers(0, n, n).astype(np.int32)) if rng.random() < 0.6
            else mx.arange(n, dtype=mx.int32) for _ in range(T)]
    xs = [[mx.array(rng.standard_normal(n).astype(np.float32)) for _ in range(T)],
          [mx.array(rng.integers(-9, 9, (n, 2)).astype(np.int32)) for _ in range(T)],
          [mx.array(rng.standard_normal((n, 3)).astype(np.float16)) for _ in range(T)],
          [mx.array(rng.random(n) < 0.5) for _ in range(T)]]
    return idxs, xs


def test_ancestral_paths_reference():
    """The reference: D_t = a_t[D_{t+1}] (numpy walk) and path_t = x_t[D_t]; the kernel
    is not used without a CUDA device or past MAX_INPUTS arrays."""
    from genmlx.kernels import paths as KP

    for T, n in ((1, 4), (5, 9), (12, 1)):
        idxs, xs = _paths_case(T, n, T + n)
        D, ps = KP.ancestral_paths_generic(idxs, xs)
        r = np.arange(n)
        for t in reversed(range(T)):
            r = np.asarray(idxs[t])[r]
            assert np.array_equal(np.asarray(D[t]), r)
            for col, p in zip(xs, ps):
                assert p.dtype == col[t].dtype
                assert np.array_equal(np.asarray(p[t]), np.asarray(col[t])[r])
    idxs, xs = _paths_case(KP.MAX_INPUTS, 3, 0)
    with B.override("1"):
        assert KP.usable(idxs, xs[:1]) is None
    assert KP.usable(*_paths_case(3, 3, 0)) is None or B.mode() == "1"  # opt-in
    if B.active_backend() != "cuda":
        with B.override("1"):
            assert KP.usable(*_paths_case(3, 3, 0)) is None


@needs_gpu
@pytest.mark.parametrize("T", [1, 2, 7, 100])
@pytest.mark.parametrize("n", [1, 33, 10_000])
def test_gpu_ancestral_paths_equal_reference(T, n):
    from genmlx.kernels import paths as KP

    _cuda_only("the ancestral-paths kernel is", "Metal takes the generic path")
    idxs, xs = _paths_case(T, n, 7 * T + n)
    with B.override("1"):  # opt-in (genmlx.kernels.paths)
        # one input per step and kind: more than MAX_INPUTS take the generic path
        fits = T * (len(xs) + 1) <= KP.MAX_INPUTS
        assert KP.usable(idxs, xs) == ("cuda" if fits else None)
        D, ps = KP.ancestral_paths(idxs, xs)
    D0, ps0 = KP.ancestral_paths_generic(idxs, xs)
    assert D.dtype == mx.int32 and mx.array_equal(D, D0).item()
    for p, p0 in zip(ps, ps0):
        assert p.dtype == p0.dtype and p.shape == p0.shape and mx.array_equal(p, p0).item()


@needs_gpu
def test_gpu_smc_end_by_kernel_equals_generic(monkeypatch):
    """SMC's end of run with the paths kernel equals the MLX-ops path bit for bit
    (particles, weights, every step's leaves)."""
    import importlib

    import genmlx as gm
    from genmlx.core.pytree import tree_flatten
    from genmlx.kernels import paths as KP

    S_ = importlib.import_module("genmlx.inference.smc")

    @gm.gen
    def step(t, x, a):
        x = gm.trace("x", gm.normal(a * x, 1.0))
        gm.trace("y", gm.normal(x, 0.5))
        return x

    T_, n = 30, 500
    obs = gm.choicemap({(t, "y"): 0.1 * t for t in range(T_)})
    used = []
    real = KP.ancestral_paths
    monkeypatch.setattr(KP, "ancestral_paths", lambda *a: used.append(1) or real(*a))

    def run():
        with B.override("1"):  # the paths kernel is opt-in (genmlx.kernels.paths)
            return S_.smc(mx.random.key(3), gm.Unfold(step), (T_, mx.array(0.0), 0.9), obs, n,
                          progress=False)

    a = run()
    assert used
    monkeypatch.setattr(KP, "usable", lambda *a: None)
    b = run()
    assert mx.array_equal(a.log_weights, b.log_weights).item()
    assert mx.array_equal(a.traces.score, b.traces.score).item()
    for t in range(T_):
        for x, y in zip(tree_flatten(a.traces.steps[t])[0], tree_flatten(b.traces.steps[t])[0]):
            assert mx.array_equal(x, y).item()


# -- row gathers: out[b, i] = x[b, idx[b, i]] in one plain kernel -------------------------
def _gather_case(dtype, row, B_, N, n, seed, sorted_idx):
    rng = np.random.default_rng(seed)
    shape = (B_, N) + row
    if dtype == mx.bool_:
        x = mx.array(rng.random(shape) < 0.5)
    elif dtype in (mx.int32, mx.int64):
        x = mx.array(rng.integers(-2**30, 2**30, shape)).astype(dtype)
    else:
        x = mx.array(rng.normal(size=shape).astype(np.float32)).astype(dtype)
    idx = rng.integers(0, N, (B_, n))
    if sorted_idx:
        idx = np.sort(idx, axis=1)
    return x, mx.array(idx.astype(np.int32))


def test_take_rows_dispatch_off_cuda_is_mlx_gather():
    """Off a CUDA device (or with kernels off) take_rows / take_rows_batched are MLX's
    gathers; the kernel is chosen only for int32 indices and known element sizes."""
    from genmlx.kernels import gather as KG

    x, idx = _gather_case(mx.float32, (2,), 3, 17, 9, 0, True)
    assert mx.array_equal(KG.take_rows_batched(x, idx),
                          mx.take_along_axis(x, idx[..., None], axis=1)).item()
    assert mx.array_equal(KG.take_rows(x[0], idx[0]), mx.take(x[0], idx[0], axis=0)).item()
    with B.override("0"):
        assert not KG.usable(x, idx, 1)
    assert not KG.usable(x, idx.astype(mx.int64), 1)
    if B.active_backend() != "cuda":
        assert not KG.usable(x, idx, 1)


@needs_gpu
@pytest.mark.parametrize("dtype,row", [(mx.float32, ()), (mx.int32, (3,)), (mx.float16, (2, 3)),
                                       (mx.bool_, ()), (mx.int64, ())])
@pytest.mark.parametrize("B_,N,n", [(1, 1, 1), (3, 33, 50), (2, 300_000, 300_000)])
def test_gpu_take_rows_equal_mlx_gather(dtype, row, B_, N, n):
    """The CUDA row-gather kernel equals MLX's gathers bit for bit (every dtype's bits
    copied as words; sorted and unsorted indices; one row, many, past a block)."""
    from genmlx.kernels import gather as KG

    _cuda_only("the row-gather kernel is", "elsewhere MLX's gather runs")
    for sorted_idx in (True, False):
        x, idx = _gather_case(dtype, row, B_, N, n, N + n, sorted_idx)
        assert KG.usable(x, idx, 1)
        got = KG.take_rows_batched(x, idx)
        want = mx.take_along_axis(x, idx.reshape(idx.shape + (1,) * len(row)), axis=1)
        assert got.dtype == x.dtype and got.shape == want.shape and mx.array_equal(got, want).item()
        got1 = KG.take_rows(x[0], idx[0])
        assert got1.shape == (n,) + row and mx.array_equal(got1, mx.take(x[0], idx[0], axis=0)).item()
    # inside a compiled function, as SMC's step runs it
    f = mx.compile(lambda a, i: KG.take_rows(a, i) * 1)
    x, idx = _gather_case(mx.float32, (), 1, N, n, 3, True)
    assert mx.array_equal(f(x[0], idx[0]), mx.take(x[0], idx[0], axis=0)).item()


def test_two_source_gathers_off_cuda_are_concatenate_and_take():
    from genmlx.kernels import gather as KG

    a, b = mx.arange(6, dtype=mx.float32).reshape(3, 2), -mx.arange(8, dtype=mx.float32).reshape(4, 2)
    pos = mx.array([0, 3, 6, 2, 4, 4], dtype=mx.int32)
    assert mx.array_equal(KG.take_rows2(a, b, pos), mx.take(mx.concatenate([a, b]), pos, axis=0)).item()
    g = mx.array([7, 9, 11, 13], dtype=mx.int32)
    want = mx.take(mx.concatenate([100 + mx.arange(3, dtype=mx.int32), g]), pos, axis=0)
    assert mx.array_equal(KG.identity_or_rows(100, 3, g, pos), want).item()


@needs_gpu
@pytest.mark.parametrize("Na,Nb,n", [(1, 1, 2), (40, 9, 50), (300_000, 20_000, 300_000)])
def test_gpu_two_source_gathers_equal_concatenate_and_take(Na, Nb, n):
    """The two-source gather kernels (the sharded step's assembly) equal MLX's
    concatenate-and-take bit for bit, inside mx.compile too."""
    from genmlx.kernels import gather as KG

    _cuda_only("the row-gather kernels are", "elsewhere MLX's gather runs")
    rng = np.random.default_rng(Na + n)
    pos = mx.array(np.sort(rng.integers(0, Na + Nb, n)).astype(np.int32))
    for dtype, row in ((mx.float32, ()), (mx.float16, (3,)), (mx.int32, ())):
        a = mx.array(rng.normal(size=(Na,) + row).astype(np.float32)).astype(dtype)
        b = mx.array(rng.normal(size=(Nb,) + row).astype(np.float32)).astype(dtype)
        want = mx.take(mx.concatenate([a, b]), pos, axis=0)
        got = KG.take_rows2(a, b, pos)
        assert got.dtype == dtype and mx.array_equal(got, want).item()
    g = mx.array(rng.integers(0, 10**6, Nb).astype(np.int32))
    want = mx.take(mx.concatenate([5000 + mx.arange(Na, dtype=mx.int32), g]), pos, axis=0)
    assert mx.array_equal(KG.identity_or_rows(5000, Na, g, pos), want).item()
    f = mx.compile(lambda gg, pp: KG.identity_or_rows(5000, Na, gg, pp) + 0)
    assert mx.array_equal(f(g, pos), want).item()


@needs_gpu
@pytest.mark.parametrize("R_,m,H", [(2, 40, 12), (3, 5000, 700)])
def test_gpu_halo_paths_equal_statement(R_, m, H):
    """The halo-paths kernel (sharded SMC's end of run) equals its NumPy
    statement on every process of R virtual ones: the paths bit for bit and the miss flag."""
    from genmlx.kernels import paths as KP

    _cuda_only("the halo-paths kernel is", "elsewhere the MLX-ops path runs")
    for h, r, idxs, EA, own, EX, want, bad in halo_cases(R_, m, H):
        midx = [mx.array(i) for i in idxs]
        mown = [[mx.array(v) for v in col] for col in own]
        with B.override("1"):
            assert KP.halo_usable(midx, FLAGS, mown) == "cuda"
            got, miss = KP.halo_paths(midx, FLAGS, mx.array(EA), mown, [mx.array(e) for e in EX], r, R_, h)
        assert bool(miss.item()) == bool(bad), (r, h)
        if not bad:
            for g, w in zip(got, want):
                assert np.array_equal(np.array(g), w), (r, h)
