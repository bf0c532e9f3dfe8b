"""Recurse, contramap/dimap and CustomGradientGF."""

import mlx.core as mx
import numpy as np
import pytest

import genmlx as gm
from tests.gfi_laws import check_gfi_laws


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# -- Recurse ------------------------------------------------------------------------------
@gm.gen
def produce(v):
    depth, mu = v
    u = gm.normal(mu, 1.0) @ "u"
    return u, ([(depth - 1, u), (depth - 1, -u)] if depth > 0 else [])


@gm.gen
def aggregate(u, results):
    total = u + sum(results) if results else u
    return gm.normal(total, 0.5) @ "w"


def by_hand(depth, mu, node=0):
    """The same tree written as plain recursion inside one dynamic model."""
    u = gm.normal(mu, 1.0) @ ("production", node, "u")
    kids = [(depth - 1, u), (depth - 1, -u)] if depth > 0 else []
    res = [by_hand(d, m, node * 2 + j + 1) for j, (d, m) in enumerate(kids)]
    total = u + sum(res) if res else u
    return gm.normal(total, 0.5) @ ("aggregation", node, "w")


@gm.gen
def tree_by_hand(depth, mu):
    return by_hand(depth, mu)


def test_recurse_gfi_laws():
    R = gm.Recurse(produce, aggregate, max_branch=2)
    check_gfi_laws(R, ((2, mx.array(0.3)),), mx.random.key(0),
                   update_addrs=[("production", 1, "u"), ("aggregation", 0, "w")],
                   regen_addrs=[("production", 0, "u")])


def test_recurse_matches_hand_written_tree():
    R = gm.Recurse(produce, aggregate, max_branch=2)
    tr = R.simulate(mx.random.key(1), ((2, mx.array(0.3)),))
    assert len([1 for _ in tr.choices]) == 14  # 7 nodes × (u, w)
    lp, r = tree_by_hand.assess((2, mx.array(0.3)), tr.choices)
    close(tr.score, lp, 1e-6)
    close(tr.retval, r, 1e-6)
    assert R == gm.Recurse(produce, aggregate, max_branch=2)


def test_recurse_too_many_children_error():
    @gm.gen
    def bad(v):
        return gm.normal(0.0, 1.0) @ "u", [v, v, v]

    with pytest.raises(ValueError, match="max_branch"):
        gm.Recurse(bad, aggregate, max_branch=2).simulate(mx.random.key(0), (0,))


# -- contramap / dimap ---------------------------------------------------------------------
@gm.gen
def line(slope, xs):
    b = gm.normal(0.0, 1.0) @ "b"
    return gm.normal(slope * xs + b, 0.5) @ "ys"


def test_contramap_dimap():
    xs = mx.arange(3.0)
    h = gm.contramap(line, lambda s: (2.0 * s, xs))
    check_gfi_laws(h, (mx.array(0.5),), mx.random.key(2), update_addrs=["b"], regen_addrs=["ys"])
    tr = h.simulate(mx.random.key(3), (mx.array(0.5),))
    close(tr.score, line.assess((mx.array(1.0), xs), tr.choices)[0])
    d = gm.dimap(line, lambda s: (s, xs), lambda ys: ys.sum())
    tr = d.simulate(mx.random.key(4), (mx.array(0.5),))
    close(tr.retval, tr["ys"].sum())
    # argument change propagates through f: w = Δ log p of the retained choices
    new, w, _, _ = d.update(mx.random.key(5), tr, gm.ChoiceMap.empty(), args=(mx.array(1.5),))
    close(w, line.assess((mx.array(1.5), xs), tr.choices)[0] - line.assess((mx.array(0.5), xs), tr.choices)[0])


# -- CustomGradientGF -------------------------------------------------------------------
def fwd(x, k):
    return mx.sin(x) * k


def bwd(args, cot, out):
    x, k = args
    return 100.0 * cot * mx.cos(x) * k, None  # scaled so the custom rule is observable


def test_custom_gradient_gf():
    cg = gm.CustomGradientGF(fwd, bwd, differentiable=(True, False))
    assert cg.argument_differentiable == (True, False)
    check_gfi_laws(cg, (mx.array(0.3), mx.array(2.0)), mx.random.key(0))

    @gm.gen
    def model(x):
        m = cg(x, mx.array(2.0)) @ "f"
        return gm.normal(m, 1.0) @ "y"

    obs = gm.choicemap({"y": 0.5})

    def logp(x):
        return model.generate(mx.random.key(0), (x,), obs)[1]

    x = mx.array(0.3)
    g = mx.grad(logp)(x)
    # d/dx log N(0.5; 2 sin x, 1) = (0.5 − 2 sin x)·(2 cos x); the custom rule scales by 100
    expect = 100.0 * (0.5 - 2 * np.sin(0.3)) * 2 * np.cos(0.3)
    close(g, expect, 1e-3)
    # the non-differentiable argument gets a zero gradient
    gk = mx.grad(lambda k: cg.simulate(mx.random.key(0), (x, k)).retval)(mx.array(2.0))
    assert float(gk) == 0.0
    # batched: vsimulate + gradient under vmap keeps the custom rule
    gb = mx.grad(lambda xs: mx.sum(mx.vmap(lambda v: cg.simulate(mx.random.key(0), (v, mx.array(2.0))).retval)(xs)))(mx.array([0.1, 0.2]))
    close(gb, 100.0 * 2.0 * np.cos([0.1, 0.2]), 1e-3)
    with pytest.raises(gm.UnvisitedConstraintError):
        cg.generate(mx.random.key(0), (x, mx.array(2.0)), gm.choicemap({"a": 1.0}))
