"""NUTS in compiled blocks: the vectorized per-block bookkeeping equals a leaf-by-leaf
reference (stops, divergences, counts, weights), trees do not depend on the block size
(checkpoints of sub-subtrees spanning blocks), and the block's multinomial proposal
(Gumbel-max, progressive across blocks) selects leaves with probability ∝ exp(−ΔH)."""

import importlib

import mlx.core as mx
import numpy as np
import pytest

import genmlx as gm
from genmlx.inference.flat_density import cached_density
from genmlx.inference.metric import dense_metric, identity_metric, kinetic, leapfrog, metric_from_inverse

N = importlib.import_module("genmlx.inference.nuts")


@gm.gen
def funnel():
    v = gm.trace("v", gm.normal(0.0, 3.0))
    return gm.trace("x", gm.normal(mx.zeros(5), mx.exp(v / 2)))


def _turned(rho, pa, pb, minv):
    """The generalized U-turn criterion (identity/diagonal metric) for momentum sum ρ and
    end momenta pa, pb, written out for the oracle."""
    return (mx.sum(rho * minv * pa, axis=-1) <= 0) | (mx.sum(rho * minv * pb, axis=-1) <= 0)


def _reference_leaves(vg, s, h0, minv, count):
    """Leaf-by-leaf NUTS subtree bookkeeping (iterative checkpoints), the oracle: a
    sub-subtree of size ≥ 4 with halves A, B also turns when A extended by B's first
    leaf, or B extended by A's last leaf, turns (Stan's checks between subtrees)."""
    e = s.eps[:, None]
    u, p, g, psum, logw = s.u, s.p, s.g, s.psum, s.logw
    on, bad, div_all, nsteps, accsum = s.on, s.bad, s.div, s.nsteps, s.accsum
    sizes = [2**k for k in range(1, 12) if 2**k <= count]
    ck, mid = {}, {}
    for n in range(count):
        u, p1, g, lp = leapfrog(vg, u, p, g, e, minv, False)
        dh = (-lp + kinetic(p1, minv, False)) - h0
        dh = mx.where(mx.isnan(dh), mx.inf, dh)
        div = dh > N.MAX_ENERGY_ERROR
        logw = mx.logaddexp(logw, -dh)
        for size in sizes:
            if n % size == 0:
                ck[size] = (p1, psum)
            if size >= 4 and n % size == size // 2:
                mid[size] = (p1, p, psum)  # B's first leaf, A's last leaf, Σ before B
        psum = psum + p1
        turn = mx.zeros(on.shape, dtype=mx.bool_)
        for size in sizes:
            if (n + 1) % size == 0:
                cp, cr = ck[size]
                turn = turn | _turned(psum - cr, cp, p1, minv)
                if size >= 4:
                    bm, aq, hm = mid[size]
                    turn = turn | _turned(hm - cr + bm, cp, bm, minv)
                    turn = turn | _turned(psum - hm + aq, aq, p1, minv)
        stop = turn | div
        bad = bad | (on & stop)
        div_all = div_all | (on & div)
        nsteps = nsteps + on.astype(mx.int32)
        accsum = accsum + mx.where(on, mx.exp(mx.minimum(-dh, 0.0)), 0.0)
        on = on & ~stop
        p = p1
    return dict(u=u, p=p, logw=logw, psum=psum, on=on, bad=bad, div=div_all, nsteps=nsteps, accsum=accsum)


@pytest.fixture(scope="module")
def dens():
    return cached_density(funnel, (), None)


def test_block_bookkeeping_matches_leaf_by_leaf(dens):
    C, D = 16, dens.dim
    m = identity_metric(C, D)
    seen_stop = seen_div = 0
    for trial in range(4):
        U = mx.random.normal((C, D), key=mx.random.key(trial))
        lp, g = dens.value_and_grad(U)
        eps = mx.random.uniform(0.05, 1.5, (C,), key=mx.random.key(100 + trial))
        t = N._start(False, mx.random.key(trial), U, lp, g, m.minv, m.mfac)
        for n in (1, 2, 4, 8):
            s0 = N._sub_init(t, mx.random.key(7), eps, 0)
            r = mx.random.uniform(shape=(n + 2, C), key=mx.random.key(9))
            ref = _reference_leaves(dens.value_and_grad, s0, t.h0, m.minv, n)
            got = N._leaves(dens.value_and_grad, False, s0, t.h0, r, m.minv, n)
            # the fresh-subtree shortcut: the same subtree and the same proposal
            got_fresh = N._leaves(dens.value_and_grad, False, s0, t.h0, r, m.minv, n, fresh=True)
            for f, x in ref.items():
                x, y, z = np.array(x), np.array(getattr(got, f)), np.array(getattr(got_fresh, f))
                if x.dtype.kind == "f":
                    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5, err_msg=f)
                    np.testing.assert_allclose(z, x, rtol=1e-5, atol=1e-5, err_msg=f)
                else:
                    np.testing.assert_array_equal(y, x, err_msg=f)
                    np.testing.assert_array_equal(z, x, err_msg=f)
            for f in ("us", "lps", "gs"):
                np.testing.assert_array_equal(np.array(getattr(got_fresh, f)), np.array(getattr(got, f)))
            seen_stop += int(np.array(got.bad).sum())
            seen_div += int(np.array(got.div).sum())
    assert seen_stop > 20 and seen_div > 5  # the comparison exercised stops and divergences


def test_trees_do_not_depend_on_block_size(dens):
    """Sub-subtree checks spanning blocks (carried checkpoints) give the same trees."""
    C, D = 8, dens.dim
    m = identity_metric(C, D)
    runs = {}
    for B in (2, 16):
        K = N.NUTSKernel(dens, 8, block=B, fused=1)
        out = []
        for trial in range(6):
            st = K.init(mx.random.normal((C, D), key=mx.random.key(trial)))
            eps = mx.random.uniform(0.02, 0.6, (C,), key=mx.random.key(100 + trial))
            _, info = K.step(mx.random.key(50 + trial), st, eps, m)
            out.append([np.array(a) for a in (info.num_steps, info.accepted, info.diverging, info.accept_prob)])
        runs[B] = out
    depths = np.concatenate([o[1] for o in runs[2]])
    assert depths.max() >= 5  # long doublings, split into many blocks of 2
    for a, b in zip(runs[2], runs[16]):
        for x, y in zip(a[:3], b[:3]):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(a[3], b[3], rtol=1e-5)


def test_block_proposal_is_multinomial(dens):
    """Two blocks of 4 leaves from one state, many chains: the selected leaf's
    frequency matches w_i / Σ w within 3.5 binomial standard errors."""
    C, D = 4000, dens.dim
    m = identity_metric(C, D)
    U = mx.broadcast_to(mx.array([[0.3, 0.5, -0.2, 0.1, 0.4, -0.6]]), (C, D))
    lp, g = dens.value_and_grad(U)
    t = N._start(False, mx.random.key(0), U, lp, g, m.minv, m.mfac)
    t = t._replace(pl=mx.broadcast_to(t.pl[:1], (C, D)), pr=mx.broadcast_to(t.pl[:1], (C, D)))
    t = t._replace(h0=-lp + kinetic(t.pl, m.minv, False))
    eps = mx.full((C,), 0.25)
    s = N._sub_init(t, mx.random.key(1), eps, 0)
    s = s._replace(fwd=mx.ones((C,), dtype=mx.bool_), eps=eps, u=U, p=t.pl, g=g)
    s1 = N._leaves(dens.value_and_grad, False, s, t.h0, mx.random.uniform(shape=(6, C), key=mx.random.key(2)), m.minv, 4)
    s2 = N._leaves(dens.value_and_grad, False, s1, t.h0, mx.random.uniform(shape=(6, C), key=mx.random.key(3)), m.minv, 4)
    # the 8 leaves (identical for every chain) and their weights
    ref = _reference_leaves(dens.value_and_grad, s._replace(on=mx.ones((C,), dtype=mx.bool_)), t.h0, m.minv, 8)
    leaves, u, p, gg = [], U[:1], t.pl[:1], g[:1]
    for _ in range(8):
        u, p, gg, lpi = leapfrog(dens.value_and_grad, u, p, gg, eps[:1, None], m.minv[:1], False)
        leaves.append((np.array(u[0]), float(-(-lpi + kinetic(p, m.minv[:1], False)) [0] + t.h0[0])))
    w = np.exp(np.array([lw for _, lw in leaves]) - float(ref["logw"][0]))
    assert abs(w.sum() - 1) < 1e-4 and w.max() < 0.9  # a non-trivial distribution
    sel = np.array(s2.us)
    cand = np.stack([x for x, _ in leaves])
    which = np.argmin(np.abs(sel[:, None, :] - cand[None]).sum(-1), axis=1)
    freq = np.bincount(which, minlength=8) / C
    se = np.sqrt(w * (1 - w) / C)
    assert np.all(np.abs(freq - w) < 3.5 * se + 1e-9), (freq, w)


def test_block_uturn_checks_are_batched_over_sizes():
    """The U-turn checks of all balanced sub-subtrees in a block of 16 leaves (sizes 2, 4,
    8, 16; unions and the checks between halves) are one product, ONE Sum and ONE Min
    over the stacked pairs (they were a few reductions per size), and give the first
    closing leaf of a direct per-size check."""
    import io
    import re

    rng = np.random.default_rng(3)
    n, C = 16, 64
    # momenta turning slowly (a random angular speed per chain, jitter): trajectories
    # that U-turn at various leaves, some only by the checks between halves
    step = rng.uniform(0.1, 0.6, size=(1, C))
    th = np.cumsum(np.broadcast_to(step, (n, C)), axis=0) + rng.normal(0, 0.3, (n, C))
    Pn = np.stack([np.cos(th), np.sin(th), 0.3 * rng.normal(size=(n, C))], -1).astype(np.float32)
    Vn = (Pn * np.array([1.0, 0.7, 1.3])).astype(np.float32)
    P, V = mx.array(Pn), mx.array(Vn)
    first, total = N._first_turn(P, V, n)

    def turns(rho, va, vb):
        return ((rho * va).sum(-1) <= 0) | ((rho * vb).sum(-1) <= 0)

    def first_turn(between: bool):
        want = np.full(C, n)
        for s in (2, 4, 8, 16):
            for g in range(n // s):
                a, h, b = g * s, g * s + s // 2, g * s + s - 1  # first, B's first, last leaf
                turn = turns(Pn[a:b + 1].sum(axis=0), Vn[a], Vn[b])
                if between and s >= 4:  # each half extended by the other's adjacent leaf
                    turn |= turns(Pn[a:h + 1].sum(axis=0), Vn[a], Vn[h])
                    turn |= turns(Pn[h - 1:b + 1].sum(axis=0), Vn[h - 1], Vn[b])
                want = np.where(turn, np.minimum(want, b), want)
        return want

    want = first_turn(True)
    assert (want != first_turn(False)).any() and (want < n).any() and (want == n).any()
    np.testing.assert_array_equal(np.array(first), want)
    np.testing.assert_allclose(np.array(total), Pn.sum(axis=0), rtol=1e-5, atol=1e-5)
    buf = io.StringIO()
    mx.export_to_dot(buf, *N._first_turn(P + 0, V + 0, n))
    text = buf.getvalue()
    assert len(re.findall(r'label ="Sum', text)) == 1
    assert len(re.findall(r'label ="Min', text)) == 1


def _doublings_on_common_uniforms(vg, md, F, key, U, lp, g, eps, m):
    """The trajectory of doublings 0..F built one doubling at a time (start, subtree,
    merge) from the uniforms the vectorized prefix draws: direction, leaf Gumbels and
    merge uniform of doubling j at the prefix's rows for j."""
    ks = mx.random.split(key, md + 1)
    t = N._start(m.dense, ks[-1], U, lp, g, m.minv, m.mfac)
    n, C = 2 ** (F + 1), U.shape[0]
    R = mx.random.uniform(shape=(n + 2 * (F + 1), C), key=ks[0])
    for j in range(F + 1):
        d = mx.concatenate([R[n + j:n + j + 1], R[2**j:2 ** (j + 1)], R[0:1], R[n + F + 1 + j:n + F + 2 + j]])
        t = N._doubling(vg, m.dense, md, j, t, None, eps, m.minv, draws=d)
    return t


def _random_metric(kind: str, C: int, D: int):
    """The identity, a random positive diagonal or a random dense SPD inverse mass matrix
    per chain (the Gram products weight momenta by M⁻¹: unit, scaled and mixed columns)."""
    rng = np.random.default_rng(5)
    if kind == "identity":
        return identity_metric(C, D)
    if kind == "diag":
        return metric_from_inverse(rng.uniform(0.3, 2.0, (C, D)), C, D)
    A = rng.normal(size=(C, D, D))
    return dense_metric(A @ np.swapaxes(A, 1, 2) / D + 0.5 * np.eye(D))


@pytest.fixture(params=["matmul", "sum"])
def products(request, monkeypatch):
    """The Gram products as the CPU computes them (matmul) and as a GPU does (a broadcast
    product and a sum: float32 matmuls may run as TF32 there)."""
    if request.param == "sum":
        monkeypatch.setattr(N, "_mm", N._mm_exact)
    return request.param


def _assert_trees_equal(names, got, want, act, tag: str) -> None:
    """Field by field: integers and flags exactly, floats to 2e-5 (the same arithmetic
    in another order); the trajectory's ends, momentum sum and weight only for the
    chains that go on (nothing reads them after a chain stops)."""
    for name, a, b in zip(names, got, want):
        a, b = np.array(a), np.array(b)
        if name in ("ul", "pl", "gl", "ur", "pr", "gr", "psum", "logw"):
            a, b = a[act], b[act]
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=f"{name}, {tag}")
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"{name}, {tag}")


@pytest.mark.parametrize("kind", ["identity", "diag", "dense"])
@pytest.mark.parametrize("F", [0, 2, 3])
def test_prefix_equals_doubling_by_doubling(dens, F, kind, products):
    """The momentum draw and doublings 0..F with their bookkeeping vectorized over the
    whole trajectory (one stack, aligned sub-subtree blocks, one scan over doublings)
    give the tree that doubling-by-doubling merging gives on the same uniforms: stops,
    divergences, depths, counts, acceptance sums, proposals, weights — with and without
    the max-depth cap inside the prefix; for unit, diagonal and dense metrics, with the
    Gram products as matmuls and as broadcast sums."""
    C, D = 48, dens.dim
    m = _random_metric(kind, C, D)
    vg = dens.value_and_grad
    stopped_early = took = div = 0
    for trial, md in enumerate((10, 10, F + 1)):
        U = mx.random.normal((C, D), key=mx.random.key(trial))
        lp, g = vg(U)
        eps = mx.random.uniform(0.05, 1.5, (C,), key=mx.random.key(100 + trial))
        key = mx.random.key(17 + trial)
        got = N._prefix(vg, m.dense, md, F, key, U, lp, g, eps, m.minv, m.mfac)
        t = _doublings_on_common_uniforms(vg, md, F, key, U, lp, g, eps, m)
        want = N._outputs(t)
        _assert_trees_equal(list(N.Tree._fields) + ["any_active", "accept"], got, want, np.array(t.active),
                            f"F={F}")
        assert int(got[-1]) == int(np.array(t.depth).max())
        stopped_early += int((np.array(t.depth) < F + 1).sum())
        took += int((~np.all(np.array(t.uprop) == np.array(U), axis=1)).sum())
        div += int(np.array(t.diverging).sum())
    assert took > C and div > 0 and (F == 0 or stopped_early > 10)


def test_prefix_depth_follows_the_tree_depths(dens):
    """The kernel's prefix depth F (the doublings done in its first call) goes to
    ``fused`` when the recent trees are deep and down when they are shallow, and init
    resets it: the same key gives the same draws in a new run."""
    C, D = 8, dens.dim
    m = identity_metric(C, D)
    K = N.NUTSKernel(dens, 10, fused=3)
    runs = []
    for _ in range(2):
        st = K.init(mx.random.normal((C, D), key=mx.random.key(0)) * 0.1)
        assert K._prefix_depth == 3
        us, seen = [], []
        for i, e in enumerate((1.5,) * 4 + (0.02,) * 12):
            st, info = K.step(mx.random.key(i), st, mx.full((C,), e), m)
            seen.append((int(np.array(info.accepted).max()), K._prefix_depth))
            us.append(np.array(st.u))
        assert max(d for d, _ in seen[:4]) <= 2 and seen[3][1] <= 1, seen  # shallow trees: F down
        assert min(d for d, _ in seen[4:]) >= 5 and seen[-1][1] == 3, seen  # deep trees: F = fused
        runs.append(us)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["identity", "diag", "dense"])
@pytest.mark.parametrize("j", [0, 1, 3, 4])
def test_doubling_equals_subtree_leaves_merge(dens, j, kind, products):
    """A whole doubling in one Gram-matrix bookkeeping gives the tree of a fresh subtree,
    its leaves (block bookkeeping, itself tested leaf by leaf) and the merge on the same
    uniforms, from trajectories already grown (the prefix), with stops, divergences and
    inactive chains; with and without the max-depth cap; for unit, diagonal and dense
    metrics, with the Gram products as matmuls and as broadcast sums."""
    C, D = 48, dens.dim
    m = _random_metric(kind, C, D)
    vg = dens.value_and_grad
    stopped = took = div = 0
    for trial, md in enumerate((10, 10, 10, 3)):
        U = mx.random.normal((C, D), key=mx.random.key(trial))
        lp, g = vg(U)
        eps = mx.random.uniform(0.05, 1.5, (C,), key=mx.random.key(100 + trial))
        t = N.Tree(*N._prefix(vg, m.dense, md, 1, mx.random.key(17 + trial), U, lp, g, eps, m.minv, m.mfac)[:17])
        n = 2**j
        d = mx.random.uniform(shape=(n + 3, C), key=mx.random.key(40 + trial))
        got = N._doubling(vg, m.dense, md, j, t, None, eps, m.minv, draws=d)
        s = N._sub_init(t, None, eps, 0, fwd=d[0] < 0.5)
        s = N._leaves(vg, m.dense, s, t.h0, d[1:], m.minv, n, fresh=True)
        want = N._merge(m.dense, md, t, s, d[-1], m.minv)
        act = np.array(want.active)
        _assert_trees_equal(N.Tree._fields, got, want, act, f"j={j}")
        stopped += int((np.array(t.active) & ~act).sum())
        took += int((~np.all(np.array(want.uprop) == np.array(t.uprop), axis=1)).sum())
        div += int((np.array(want.diverging) & ~np.array(t.diverging)).sum())
    assert stopped > 10 and took > 10 and (j < 3 or div > 0), (stopped, took, div)
