"""The compiled value-and-gradient of the flat density: kernel counts of three
posteriordb models pinned as upper bounds (NUTS on a CPU is bound by the per-kernel
cost), and the graph rewrites behind them (genmlx/inference/_body_ops.py, flat priors
on R unscored) giving the generic density's values."""

from __future__ import annotations


import mlx.core as mx
import numpy as np
import pytest

import genmlx as gm
from genmlx.inference._body_ops import BodyOps
from genmlx.inference.flat_density import FlatDensity, make_density
from genmlx.inference.unconstrained import UnconstrainedDensity
from tests.conftest import posteriordb_models, require_data

models = posteriordb_models()

# primitives surviving mx.compile (benchmarks/graph_ops.py) of value_and_grad(U [4, D]);
# before the rewrites: 15, 20 (4 of them Gather/Scatter), 13
MAX_LAUNCHES = {
    "eight_schools-eight_schools_noncentered": 14,
    "kidiq-kidscore_momiq": 12,
    "sblrc-blr": 13,
}


def _graph(dens, U):
    from benchmarks.graph_ops import count_graph

    f = mx.compile(dens.value_and_grad)
    mx.eval(U)
    return count_graph(f(U))


@pytest.mark.parametrize("name", list(MAX_LAUNCHES))
def test_value_and_grad_kernel_counts(genmlx_data, name):
    require_data(genmlx_data, "posteriordb", name, "data.json")
    post, args, obs, _ = models.load(genmlx_data, name)
    dens = make_density(post.model, args, obs)
    assert isinstance(dens, FlatDensity)
    g = _graph(dens, mx.random.normal((4, dens.dim), key=mx.random.key(0)))
    assert g.launches <= MAX_LAUNCHES[name], (g.launches, g.by_name)
    assert not any(k.startswith(("Gather", "Scatter")) for k in g.by_name), g.by_name


def _agree(model, args, obs, U, rtol=1e-5):
    flat = make_density(model, args, obs, flat=True)
    generic = UnconstrainedDensity(model, args, obs)
    (a, ga), (b, gb) = generic.value_and_grad(U), flat.value_and_grad(U)
    np.testing.assert_allclose(np.array(b), np.array(a), rtol=rtol, atol=1e-4)
    np.testing.assert_allclose(np.array(gb), np.array(ga), rtol=rtol, atol=1e-4)
    return flat


@gm.gen
def _indexed(x):
    """β used element by element (β[0], β[-1], β[1]) and once whole."""
    beta = gm.trace("beta", gm.flat(shape=(3,)))
    s = gm.trace("s", gm.half_normal(2.0))
    m = beta[0] + beta[1] * x + beta[-1] * x * x
    gm.trace("z", gm.normal(mx.sum(beta), 3.0))
    return gm.trace("y", gm.normal(m, s))


@gm.gen
def _partly_indexed(x):
    """Only β[0] of three taken by index: β stays one block."""
    beta = gm.trace("beta", gm.normal(mx.zeros(3), 1.0))
    return gm.trace("y", gm.normal(beta[0] + x * mx.sum(beta), 1.0))


@gm.gen
def _scalar_first(x):
    """A scalar per chain times a vector (the chain axis would end up last)."""
    a = gm.trace("a", gm.normal(0.0, 1.0))
    t = gm.trace("t", gm.normal(mx.zeros(x.shape), 1.0))
    return gm.trace("y", gm.normal(a + a * t - 0.5 * t, 1.0 + x * x + mx.exp(a - t)))


def test_indexed_latent_per_column_equals_generic():
    x = mx.linspace(-1.0, 1.0, 7)
    obs = gm.choicemap({"y": 0.3 + 0.5 * x - x * x, "z": mx.array(0.7)})
    U = mx.random.normal((5, 4), key=mx.random.key(1))
    flat = _agree(_indexed, (x,), obs, U)
    assert flat._columns == {("beta",)}
    assert _graph(flat, U).by_name.get("Gather", 0) == 0


def test_partly_indexed_latent_stays_one_block():
    x = mx.linspace(-1.0, 1.0, 5)
    U = mx.random.normal((3, 3), key=mx.random.key(2))
    flat = _agree(_partly_indexed, (x,), gm.choicemap({"y": x}), U)
    assert flat._columns == set()


def test_leading_operands_equal_generic_in_fewer_kernels():
    """With the chain axis kept leading the elementwise work fuses across the vmap's
    boundary: 19 kernels (23 with the chain axis last inside the body)."""
    x = mx.linspace(0.0, 1.0, 6)
    U = mx.random.normal((4, 7), key=mx.random.key(3))
    flat = _agree(_scalar_first, (x,), gm.choicemap({"y": x}), U)
    assert _graph(flat, U).launches <= 19


def test_flat_prior_on_R_adds_nothing():
    @gm.gen
    def m():
        b = gm.trace("b", gm.flat(shape=(2,)))
        return gm.trace("y", gm.normal(mx.sum(b), 1.0))

    U = mx.random.normal((3, 2), key=mx.random.key(4))
    flat = _agree(m, (), gm.choicemap({"y": mx.array(1.0)}), U)
    lp, _ = flat.value_and_grad(U)
    want = -0.5 * (1.0 - np.array(U).sum(axis=1)) ** 2 - 0.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(np.array(lp), want, rtol=1e-5)


def test_body_ops_restore_operators():
    saved = {k: getattr(mx.array, k) for k in ("__getitem__", "__add__", "__mul__", "__sub__")}
    with pytest.raises(RuntimeError):
        with BodyOps():
            assert mx.array.__add__ is not saved["__add__"]
            raise RuntimeError
    assert all(getattr(mx.array, k) is v for k, v in saved.items())


def test_body_ops_swap_is_exact_and_indices_answered():
    a, v = mx.array(0.1), mx.array([1e-8, 3.0, -7.25])
    col = mx.array(42.0)
    with BodyOps() as ops:
        ops.watch(v, ("v",), [col, col, col])
        s, p, d = a + v, a * v, a - v
        got = v[1]
        other = mx.array([5.0, 6.0])[0]
    assert got is col and ops.indexed == {("v",): {1}}
    assert float(other) == 5.0
    np.testing.assert_array_equal(np.array(s), np.array(mx.array(0.1) + v))
    np.testing.assert_array_equal(np.array(p), np.array(mx.array(0.1) * v))
    np.testing.assert_array_equal(np.array(d), np.array(mx.array(0.1) - v))
    assert s.shape == p.shape == d.shape == (3,)


def test_scalar_latents_as_columns_need_no_reshapes(genmlx_data):
    """Eight schools: the scalar latents μ, τ are columns [C, 1] of U, lifted against θ
    without Reshape / ExpandDims, their gradients come out without Squeeze / Reshape, and
    ``value_and_grad_col`` gives log π [C, 1] without a reshape: the only views left are
    U's Split and the two closed-form sums' custom functions. Same values as
    ``value_and_grad``."""
    from benchmarks.graph_ops import count_graph

    name = "eight_schools-eight_schools_noncentered"
    require_data(genmlx_data, "posteriordb", name, "data.json")
    post, args, obs, _ = models.load(genmlx_data, name)
    dens = make_density(post.model, args, obs)
    U = mx.random.normal((4, dens.dim), key=mx.random.key(5))
    mx.eval(U)
    g = count_graph(mx.compile(dens.value_and_grad_col)(U))
    assert g.view <= 3, g
    lp, gr = dens.value_and_grad(U)
    lpc, grc = dens.value_and_grad_col(U)
    assert lpc.shape == (4, 1)
    np.testing.assert_array_equal(np.array(lpc)[:, 0], np.array(lp))
    np.testing.assert_array_equal(np.array(grc), np.array(gr))


def test_body_ops_lift_a_scalar_to_its_column():
    """A registered scalar is lifted to its (1,) column (not an ExpandDims of it): the
    same values."""
    a, v = mx.array(0.3), mx.array([1.0, -2.0, 4.5])
    col = mx.array([0.3])
    with BodyOps() as ops:
        ops.column(a, col)
        s, p, d, q = a + v, v * a, a - v, v / a
    want = [mx.array(0.3) + v, v * mx.array(0.3), mx.array(0.3) - v, v / mx.array(0.3)]
    for got, w in zip((s, p, d, q), want):
        np.testing.assert_array_equal(np.array(got), np.array(w))
