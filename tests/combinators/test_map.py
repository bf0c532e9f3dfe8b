"""Map: GFI laws, one batched kernel execution, equivalence with an unrolled model,
VectorDiff updates, length errors."""

import mlx.core as mx
import numpy as np
import pytest

import genmlx as gm
from tests.gfi_laws import check_gfi_laws

CALLS = [0]


@gm.gen
def point(x, s):
    CALLS[0] += 1
    z = gm.normal(x, s) @ "z"
    return gm.normal(2.0 * z, 0.5) @ "y"


@gm.gen
def unrolled(xs, ss):
    return mx.stack([point(xs[i], ss[i]) @ i for i in range(xs.shape[0])])


XS, SS = mx.array([0.0, 1.0, -1.0, 2.0]), mx.array([1.0, 0.5, 2.0, 1.0])


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_map_gfi_laws():
    check_gfi_laws(gm.Map(point), (XS, SS), mx.random.key(0),
                   update_addrs=[(1, "y"), (3, "z")], regen_addrs=[(2, "z")])


def test_map_nested_in_model_laws():
    @gm.gen
    def model(xs):
        s = gm.normal(1.0, 0.1) @ "s"
        return gm.Map(point)(xs, s * mx.ones(xs.shape)) @ "pts"

    check_gfi_laws(model, (XS,), mx.random.key(1), update_addrs=["s", ("pts", 0, "y")],
                   regen_addrs=[("pts", 1, "z")])


def test_map_is_one_batched_execution():
    CALLS[0] = 0
    gm.Map(point).simulate(mx.random.key(0), (mx.zeros(50), mx.ones(50)))
    assert CALLS[0] == 1  # the kernel body ran once (vmapped), not 50 times
    CALLS[0] = 0
    gm.Map(point).generate(mx.random.key(0), (mx.zeros(50), mx.ones(50)),
                           gm.choicemap({(i, "y"): 0.0 for i in range(0, 50, 2)}))
    assert CALLS[0] == 2  # one vmapped call per constraint pattern (constrained / not)


def test_map_matches_unrolled_model():
    M = gm.Map(point)
    tr = M.simulate(mx.random.key(2), (XS, SS))
    lp, r = unrolled.assess((XS, SS), tr.choices)
    close(tr.score, lp, 1e-6)
    close(tr.retval, r, 1e-6)
    close(M.assess((XS, SS), tr.choices)[0], lp, 1e-6)
    dtr, w = unrolled.generate(mx.random.key(3), (XS, SS), tr.choices)
    _, wm = M.generate(mx.random.key(3), (XS, SS), tr.choices)
    close(w, wm, 1e-6)
    c = gm.choicemap({(0, "z"): 0.5, (2, "y"): 1.0})
    _, w1, _, d1 = M.update(mx.random.key(4), tr, c)
    _, w2, _, d2 = unrolled.update(mx.random.key(4), dtr, c)
    close(w1, w2)
    assert d1 == d2
    sel = gm.select((1, "z"), (3,))
    close(M.project(tr, sel), unrolled.project(dtr, sel))


def test_map_vectordiff_updates_only_listed_elements():
    M = gm.Map(point)
    tr = M.simulate(mx.random.key(5), (XS, SS))
    new_xs = XS + mx.array([0.0, 0.0, 3.0, 0.0])
    new, w, rd, disc = M.update(mx.random.key(6), tr, gm.ChoiceMap.empty(), args=(new_xs, SS),
                                argdiffs=(gm.VectorDiff(changed=(2,)), gm.NoChange))
    old_s, new_s = np.asarray(tr.element_scores), np.asarray(new.element_scores)
    assert np.array_equal(old_s[[0, 1, 3]], new_s[[0, 1, 3]])
    close(w, new_s[2] - old_s[2])
    assert rd == gm.VectorDiff(changed=(2,)) and disc.is_empty()
    # identical to a full update with UnknownChange
    full, w2, _, _ = M.update(mx.random.key(6), tr, gm.ChoiceMap.empty(), args=(new_xs, SS),
                              argdiffs=(gm.UnknownChange, gm.UnknownChange))
    close(w, w2)
    close(new.score, full.score)


def test_map_length_change_on_update():
    M = gm.Map(point)
    tr = M.simulate(mx.random.key(7), (XS, SS))
    new, w, _, disc = M.update(mx.random.key(8), tr, gm.choicemap({(4, "y"): 0.0}),
                               args=(mx.concatenate([XS, mx.array([5.0])]), mx.concatenate([SS, mx.array([1.0])])))
    assert new.length == 5
    close(new.score, M.assess(new.args, new.choices)[0])
    shrunk, w2, _, disc2 = M.update(mx.random.key(9), tr, gm.ChoiceMap.empty(), args=(XS[:2], SS[:2]))
    close(w2, -(tr.element_scores[2] + tr.element_scores[3]))
    assert set(disc2.children()) == {2, 3}


def test_map_mismatched_lengths_error():
    with pytest.raises(ValueError, match="Map.*same leading length"):
        gm.Map(point).simulate(mx.random.key(0), (mx.zeros(3), mx.ones(4)))


def test_map_constraint_out_of_range_error():
    with pytest.raises(gm.UnvisitedConstraintError, match="Map"):
        gm.Map(point).generate(mx.random.key(0), (XS, SS), gm.choicemap({(9, "y"): 0.0}))


def test_map_over_a_distribution_family():
    """``Map(gm.normal)``: one choice per element at (i,), as an iid-plate shorthand."""
    M = gm.Map(gm.normal)
    mus, sig = mx.array([0.0, 1.0, 2.0]), mx.array([1.0, 0.5, 2.0])
    check_gfi_laws(M, (mus, sig), mx.random.key(3), update_addrs=[1], regen_addrs=[2])
    ys = mx.array([0.3, 0.9, 1.0])
    lp, r = M.assess((mus, sig), gm.choicemap({i: ys[i] for i in range(3)}))
    close(lp, mx.sum(gm.normal(mus, sig).log_prob(ys)))
    close(r, ys)
