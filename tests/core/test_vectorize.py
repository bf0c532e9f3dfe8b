"""Vectorized GFI: the body runs once for n particles, per-particle results equal the
unbatched operations, shared and per-particle constraints, and everything compiles."""

import mlx.core as mx
import numpy as np
import pytest

import genmlx as gm

CALLS = {"n": 0}


@gm.gen
def counted(xs):
    CALLS["n"] += 1
    a = gm.normal(0.0, 1.0) @ "a"
    b = gm.uniform(0.5, 2.0) @ "b"
    return gm.normal(a * xs, b) @ "y"


XS = mx.linspace(0.0, 1.0, 4)


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_body_runs_once(n):
    CALLS["n"] = 0
    tr = counted.vsimulate(mx.random.key(0), (XS,), n)
    assert CALLS["n"] == 1
    assert tr.score.shape == (n,) and tr["y"].shape == (n, 4) and tr["a"].shape == (n,)
    CALLS["n"] = 0
    tr, w = counted.vgenerate(mx.random.key(1), (XS,), gm.choicemap({"y": mx.ones(4)}), n)
    assert CALLS["n"] == 1 and w.shape == (n,)


def test_shared_and_per_particle_constraints():
    n = 5
    key = mx.random.key(3)
    ys = mx.random.normal((n, 4), key=mx.random.key(9))
    tr, w = counted.vgenerate(key, (XS,), gm.choicemap({"y": ys, "a": 0.5}), n)
    assert np.allclose(np.array(tr["y"]), np.array(ys))
    assert np.allclose(np.array(tr["a"]), 0.5)
    for i in range(n):
        # the unbatched generate with the same values gives the same weight
        cm = gm.choicemap({"y": ys[i], "a": 0.5, "b": tr["b"][i]})
        tr_i, w_i = counted.generate(key, (XS,), cm)
        w_i = w_i - gm.uniform(0.5, 2.0).log_prob(tr["b"][i])  # b was drawn, not constrained
        assert abs(w_i.item() - w[i].item()) < 1e-4 * max(1, abs(w_i.item()))


def test_ambiguous_leading_axis_prefers_choice_shape():
    @gm.gen
    def m():
        return gm.normal(mx.zeros(3), 1.0) @ "v"

    v = mx.array([1.0, 2.0, 3.0])
    tr, w = m.vgenerate(mx.random.key(0), (), gm.choicemap({"v": v}), 3)
    assert tr["v"].shape == (3, 3)
    assert np.allclose(np.array(tr["v"]), np.tile(np.array(v), (3, 1)))


def test_compiled_vgenerate_keys():
    obs = gm.choicemap({"y": mx.ones(4)})

    @mx.compile
    def run(key):
        tr, w = counted.vgenerate(key, (XS,), obs, 64)
        return w, tr["a"]

    w1, a1 = run(mx.random.key(1))
    w2, a2 = run(mx.random.key(2))
    w1b, a1b = run(mx.random.key(1))
    assert not np.allclose(np.array(a1), np.array(a2))
    assert np.array_equal(np.array(a1), np.array(a1b)) and np.array_equal(np.array(w1), np.array(w1b))
    # equals the uncompiled computation
    tr, w = counted.vgenerate(mx.random.key(1), (XS,), obs, 64)
    assert np.allclose(np.array(w), np.array(w1), atol=1e-4)


def test_compiled_batched_regenerate():
    obs = gm.choicemap({"y": mx.ones(4)})
    btr, _ = counted.vgenerate(mx.random.key(0), (XS,), obs, 32)
    leaves, td = gm.tree_flatten(btr)
    sel = gm.select("a")

    @mx.compile
    def step(key, *flat):
        tr = gm.tree_unflatten(td, list(flat))
        new, w, _ = counted.regenerate(key, tr, sel)
        return [w, new["a"], new["b"]]

    w1, a1, b1 = step(mx.random.key(5), *leaves)
    w2, a2, _ = step(mx.random.key(6), *leaves)
    w3, a3, _ = step(mx.random.key(5), *leaves)
    assert np.array_equal(np.array(a1), np.array(a3)) and np.array_equal(np.array(w1), np.array(w3))
    assert not np.allclose(np.array(a1), np.array(a2))
    assert np.array_equal(np.array(b1), np.array(btr["b"]))  # unselected kept
    new, w, _ = counted.regenerate(mx.random.key(5), btr, sel)
    assert np.allclose(np.array(w), np.array(w1), atol=1e-4)


def test_batched_update_changes_args():
    btr = counted.vsimulate(mx.random.key(0), (XS,), 6)
    new_xs = XS * 2
    new, w, _, disc = counted.update(mx.random.key(1), btr, gm.ChoiceMap.empty(), (new_xs,))
    assert disc.is_empty() and new.args[0] is new_xs
    expect = new.score - btr.score
    assert np.allclose(np.array(w), np.array(expect), atol=1e-4)


def test_unbatch_and_stack_round_trip():
    btr = counted.vsimulate(mx.random.key(0), (XS,), 4)
    parts = [gm.unbatch(btr, i) for i in range(4)]
    again = gm.stack_traces(parts)
    assert np.array_equal(np.array(again.score), np.array(btr.score))
    assert again.batch_size == 4


def test_gm_compile_with_traces_in_and_out():
    obs = gm.choicemap({"y": mx.ones(4)})

    @gm.compile
    def init(key):
        return counted.vgenerate(key, (XS,), obs, 16)

    @gm.compile
    def step(key, tr):
        new, w, _ = counted.regenerate(key, tr, gm.select("a"))
        return new, w

    tr, w = init(mx.random.key(0))
    assert tr.batch_size is None or tr.batch_size == 16
    assert tr.score.shape == (16,)
    new, w2 = step(mx.random.key(1), tr)
    again, w3 = step(mx.random.key(1), tr)
    assert np.array_equal(np.array(w2), np.array(w3))
    assert np.array_equal(np.array(new["b"]), np.array(tr["b"]))


@pytest.mark.parametrize("n", [9, 10])
def test_planned_noise_equals_first_call(n):
    """The first call of a signature gathers each site's noise row inside the vmap;
    later calls draw sites of equal kind and shape together outside it (one sampler
    call; raw bits and MLX's transform for an even number of draws per site): same key,
    same values, in eager and compiled use."""

    @gm.gen
    def sites(xs):
        a = gm.normal(0.0, 1.0) @ "a"
        b = gm.normal(1.0, 2.0) @ "b"
        v = gm.normal(0.0, 1.0, shape=(2,)) @ "v"
        w = gm.normal(mx.zeros(2), 0.5) @ "w"
        u = gm.uniform(0.0, 2.0) @ "u"
        u2 = gm.uniform(-1.0, 2.0) @ "u2"
        return gm.normal(a + b * xs + v[0] + w[1], u + 1.0) @ "y"

    obs = gm.choicemap({"y": mx.ones(3)})
    key = mx.random.key(5)
    first, w1 = sites.vgenerate(key, (XS[:3],), obs, n)
    later, w2 = sites.vgenerate(key, (XS[:3],), obs, n)
    compiled = mx.compile(lambda k: sites.vgenerate(k, (XS[:3],), obs, n)[1])
    for addr in ("a", "b", "v", "w", "u", "u2"):
        assert np.array_equal(np.array(first[addr]), np.array(later[addr])), addr
    assert np.array_equal(np.array(w1), np.array(w2))
    np.testing.assert_allclose(np.array(compiled(key)), np.array(w1), rtol=1e-6, atol=1e-6)
    # distinct sites get distinct noise
    assert not np.allclose(np.array(first["a"]), np.array(first["b"] - 1.0) / 2.0)


@pytest.mark.parametrize("kind", ["normal", "uniform"])
@pytest.mark.parametrize("shape", [(4,), (5,), (3, 2), (1,)])
def test_grouped_noise_equals_per_site_noise_and_mlx_samplers(kind, shape):
    """One grouped draw of several sites = each site's own draw, bit for bit, and a site's
    draw is MLX's own sampler's output for its key (even sizes go through raw bits)."""
    from genmlx.core.handlers import base_noise, grouped_base_noise

    key, sites = mx.random.key(11), [2, 5, 9]
    grouped = grouped_base_noise(key, sites, kind, shape, base_site=2)
    for s, g in zip(sites, grouped):
        single = base_noise(key, s, kind, shape, base_site=2)
        assert g.shape == shape and np.array_equal(np.array(g), np.array(single)), (s, shape)
    mlx_draw = (mx.random.normal(shape, key=key) if kind == "normal"
                else mx.random.uniform(shape=shape, key=key))
    assert np.array_equal(np.array(grouped[0]), np.array(mlx_draw))
    assert not np.array_equal(np.array(grouped[0]), np.array(grouped[1]))


def test_traced_first_call_uses_planned_noise(tmp_path):
    """A vgenerate first met under a transformation (mx.compile / mx.vmap) is traced with
    the planned noise inputs (no per-particle gathers) and equals the eager call."""

    @gm.gen
    def fresh(xs):
        a = gm.normal(0.0, 1.0) @ "a"
        b = gm.normal(0.0, 1.0) @ "b"
        return gm.normal(a + b * xs, 0.5) @ "y"

    obs = gm.choicemap({"y": mx.ones(4)})
    outer = mx.stack([mx.random.key(1), mx.random.key(2)])
    w = mx.vmap(lambda k: fresh.vgenerate(k, (XS,), obs, 8)[1])(outer)
    mx.export_to_dot(str(tmp_path / "g.dot"), w)
    assert "Gather" not in (tmp_path / "g.dot").read_text()
    for j in range(2):
        _, w_eager = fresh.vgenerate(outer[j], (XS,), obs, 8)
        np.testing.assert_allclose(np.array(w[j]), np.array(w_eager), rtol=1e-5, atol=1e-5)
