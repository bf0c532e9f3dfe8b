"""update/regenerate with changing control flow: new, removed and retained choices."""

import math

import mlx.core as mx
import numpy as np

import genmlx as gm


def lnorm(x, m, s):
    return -0.5 * ((x - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)


@gm.gen
def branching(k):
    x = gm.normal(0.0, 1.0) @ "x"
    for i in range(k):
        gm.normal(x, 2.0) @ ("z", i)
    return x


def test_update_grow_and_shrink():
    tr, _ = branching.generate(mx.random.key(0), (2,), gm.choicemap({"x": 0.5, ("z", 0): 1.0, ("z", 1): -1.0}))
    # grow: new choice ("z", 2) constrained -> weight = its log density
    new, w, _, disc = branching.update(mx.random.key(1), tr, gm.choicemap({("z", 2): 0.0}), (3,))
    assert abs(w.item() - lnorm(0.0, 0.5, 2.0)) < 1e-5 and disc.is_empty()
    # grow unconstrained -> weight 0 (drawn from the prior)
    new, w, _, _ = branching.update(mx.random.key(1), tr, gm.ChoiceMap.empty(), (3,))
    assert abs(w.item()) < 1e-6 and ("z", 2) in new.choices
    # shrink: removed choice's density is subtracted, it lands in the discard
    new, w, _, disc = branching.update(mx.random.key(1), tr, gm.ChoiceMap.empty(), (1,))
    assert abs(w.item() + lnorm(-1.0, 0.5, 2.0)) < 1e-5
    assert disc[("z", 1)].item() == -1.0 and ("z", 1) not in new.choices
    # change x: retained z's rescored
    new, w, _, disc = branching.update(mx.random.key(1), tr, gm.choicemap({"x": -0.5}), (2,))
    expect = (lnorm(-0.5, 0, 1) - lnorm(0.5, 0, 1) + lnorm(1.0, -0.5, 2) - lnorm(1.0, 0.5, 2)
              + lnorm(-1.0, -0.5, 2) - lnorm(-1.0, 0.5, 2))
    assert abs(w.item() - expect) < 1e-5 and disc["x"].item() == 0.5


def test_regenerate_changes_args():
    tr, _ = branching.generate(mx.random.key(0), (2,), gm.choicemap({"x": 0.5, ("z", 0): 1.0, ("z", 1): -1.0}))
    new, w, _ = branching.regenerate(mx.random.key(3), tr, gm.select("x"), (1,))
    # unselected retained ("z", 0) rescored under the new x; removed ("z", 1) contributes 0
    x2 = new["x"].item()
    assert abs(w.item() - (lnorm(1.0, x2, 2.0) - lnorm(1.0, 0.5, 2.0))) < 1e-5
    assert ("z", 1) not in new.choices


def test_update_no_change_is_identity():
    tr = branching.simulate(mx.random.key(0), (2,))
    new, w, retdiff, disc = branching.update(mx.random.key(1), tr, gm.ChoiceMap.empty())
    assert new is tr and w.item() == 0.0 and retdiff is gm.NoChange and disc.is_empty()


def test_mh_with_regenerate_targets_posterior():
    """Batched selection-MH built on regenerate leaves the conjugate posterior invariant."""

    @gm.gen
    def m():
        mu = gm.normal(0.0, 1.0) @ "mu"
        return gm.normal(mu, 0.5) @ "y"

    n = 2000
    post_var = 1 / (1 + 4)
    post_mean = post_var * 4 * 1.0
    # stationarity: start from exact posterior draws (per-particle constraints)
    mu0 = post_mean + math.sqrt(post_var) * mx.random.normal((n,), key=mx.random.key(7))
    tr, _ = m.vgenerate(mx.random.key(0), (), gm.choicemap({"y": 1.0, "mu": mu0}), n)
    key = mx.random.key(1)
    sel = gm.select("mu")
    leaves, td = gm.tree_flatten(tr)
    for _ in range(30):
        key, k1, k2 = mx.random.split(key, 3)
        tr = gm.tree_unflatten(td, leaves)
        tr = type(tr)(**{**tr.__dict__, "args": (), "batch_size": n})
        new, w, _ = m.regenerate(k1, tr, sel)
        acc = mx.log(mx.random.uniform(shape=(n,), key=k2)) < w
        nl, _ = gm.tree_flatten(new)
        leaves = [mx.where(acc.reshape((n,) + (1,) * (a.ndim - 1)), a, b) for a, b in zip(nl, leaves)]
    mu = np.asarray(gm.tree_unflatten(td, leaves).subtraces[("mu",)].value)
    se = math.sqrt(post_var / n)
    assert abs(mu.mean() - post_mean) < 3.5 * se
    assert abs(mu.var() - post_var) < 3.5 * post_var * math.sqrt(2 / n)
