"""The closed-form elementwise parts of hoisted Normal / HalfNormal / HalfCauchy sites
(``flat_density._elementwise_sum``: one custom function per element shape, with a
written-out reverse mode) have the values and gradients of their plain expression —
autodiff of it and central finite differences (float64) — for every operand layout:
latent or observed x; constant, per-chain, per-element and partly broadcast
parameters; several sites in one group; compiled or not. Models with such sites keep
equal flat and generic densities and gradients."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

import genmlx as gm
from genmlx.inference.flat_density import FlatDensity, _elem, _elementwise_sum
from genmlx.inference.unconstrained import UnconstrainedDensity

C, SHAPE = 3, (2, 4)
N = int(np.prod(SHAPE))
# parameter layouts: the batched ones' shapes after the chain axis (None: a constant)
LAYOUTS = {"const": None, "const_el": None, "chain": (), "el": SHAPE, "cols": (1, 4), "rows": (2, 1)}


def _param(layout: str, rng, positive: bool):
    """(value, batched?) of a parameter in ``layout``: a constant (scalar or per
    element) or a batched array [C, *ps] (float64)."""
    draw = (lambda s: rng.uniform(0.5, 2.0, s)) if positive else (lambda s: rng.normal(0.0, 1.0, s))
    if layout == "const":
        return float(draw(())), False
    if layout == "const_el":
        return mx.array(draw(SHAPE), dtype=mx.float64), False
    return mx.array(draw((C,) + LAYOUTS[layout]), dtype=mx.float64), True


def _aligned(p):
    """[C, *ps] → [C, 1, …, *ps] against the elements (written out independently)."""
    return p.reshape((C,) + (1,) * (len(SHAPE) - (p.ndim - 1)) + p.shape[1:])


def _case(spec, seed):
    """(terms' constructor from the traced arrays, the traced arrays, reference
    elementwise sum from them). ``spec``: per site (family, x latent?, loc layout, scale layout)."""
    rng = np.random.default_rng(seed)
    sites, traced = [], []
    for fam, latent, loc_l, scale_l in spec:
        nonneg = fam != "normal"
        x = mx.array(np.abs(rng.normal(0, 1.5, (C,) + SHAPE)) if nonneg else rng.normal(0, 1.5, (C,) + SHAPE))
        x = x.astype(mx.float64) if latent else x[0].astype(mx.float64)
        loc, bl = _param(loc_l, rng, False) if fam == "normal" else (0.0, False)
        scale, bs = _param(scale_l, rng, True)
        roles = [r for r, b in (("x", latent), ("loc", bl), ("scale", bs)) if b]
        sites.append((fam, x, loc, scale, roles))
        traced += [{"x": x, "loc": loc, "scale": scale}[r] for r in roles]

    def unpack(arrays):
        it, out = iter(arrays), []
        for fam, x, loc, scale, roles in sites:
            v = {"x": x, "loc": loc, "scale": scale}
            v.update({r: next(it) for r in roles})
            out.append((fam, v, set(roles)))
        return out

    def terms(arrays):
        return [_elem(v["x"], v["loc"], v["scale"], b, len(SHAPE), N, cauchy=fam == "cauchy")
                for fam, v, b in unpack(arrays)]

    def reference(*arrays):
        tot = 0.0
        for fam, v, b in unpack(arrays):
            loc = _aligned(v["loc"]) if "loc" in b else v["loc"]
            scale = _aligned(v["scale"]) if "scale" in b else v["scale"]
            z = (v["x"] - loc) / scale
            e = -mx.log1p(z * z) if fam == "cauchy" else -0.5 * z * z
            if "scale" in b and scale.size == C * N:  # σ per element: −log σ is elementwise
                e = e - mx.log(scale)
            tot = tot + e
        return mx.sum(mx.broadcast_to(tot, (C,) + SHAPE), axis=(1, 2))

    return terms, traced, reference


def _grad(f, n: int):
    """∇ of f with respect to its n arguments, always as a tuple."""
    g = mx.grad(f, argnums=tuple(range(n)))
    return lambda *a: (lambda r: r if isinstance(r, tuple) else (r,))(g(*a))


SPECS = {
    "normal latent, per-chain σ (Σ z² reused)": [("normal", True, "const", "chain")],
    "normal observed, per-chain μ and σ": [("normal", False, "chain", "chain")],
    "normal observed, per-element μ, broadcast σ": [("normal", False, "el", "cols")],
    "normal latent, broadcast μ, per-element σ": [("normal", True, "rows", "el")],
    "normal latent, constant per-element μ and σ": [("normal", True, "const_el", "const_el")],
    "half-normal latent, broadcast σ": [("half_normal", True, "const", "rows")],
    "half-cauchy observed, per-chain σ": [("cauchy", False, "const", "chain")],
    "half-cauchy latent, per-element σ": [("cauchy", True, "const", "el")],
    "group of three": [("normal", True, "chain", "const"), ("cauchy", False, "const", "cols"),
                       ("normal", False, "el", "chain")],
}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("compiled", [False, True])
def test_elementwise_sum_equals_expression(name, compiled):
    terms, traced, reference = _case(SPECS[name], seed=sorted(SPECS).index(name))
    w = mx.array([0.7, -1.3, 2.1], dtype=mx.float64)  # a cotangent other than ones

    def custom(*a):
        return _elementwise_sum(terms(a), (C,) + SHAPE)

    def weighted(f):
        return lambda *a: mx.sum(w * f(*a))

    g_custom = _grad(weighted(custom), len(traced))
    g_custom = mx.compile(g_custom) if compiled else g_custom
    value = (mx.compile(custom) if compiled else custom)(*traced)
    np.testing.assert_allclose(np.array(value), np.array(reference(*traced)), rtol=1e-12, atol=1e-12)
    got, want = g_custom(*traced), _grad(weighted(reference), len(traced))(*traced)
    assert len(got) == len(want) == len(traced)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_elementwise_sum_finite_differences(name):
    """∂/∂(every traced element) against central differences of the custom function's
    own value (float64, h = 1e-6)."""
    terms, traced, _ = _case(SPECS[name], seed=17 + sorted(SPECS).index(name))
    w = mx.array([0.7, -1.3, 2.1], dtype=mx.float64)

    def f(*a):
        return mx.sum(w * _elementwise_sum(terms(a), (C,) + SHAPE))

    grads = _grad(f, len(traced))(*traced)
    h = 1e-6
    for k, (a, g) in enumerate(zip(traced, grads)):
        base = np.array(a)
        for idx in itertools.islice(np.ndindex(base.shape), 0, None, 3):
            step = np.zeros_like(base)
            step[idx] = h
            up = list(traced)
            up[k] = mx.array(base + step, dtype=mx.float64)
            dn = list(traced)
            dn[k] = mx.array(base - step, dtype=mx.float64)
            fd = (float(f(*up)) - float(f(*dn))) / (2 * h)
            assert abs(fd - float(np.array(g)[idx])) <= 1e-5 * (1 + abs(fd))


@gm.gen
def layouts(y_obs):
    """A latent scale per chain broadcast over a matrix site, one broadcast along a
    row, per-element latent scales of an observed half-Cauchy, and same-shape sites
    grouped in one reduction."""
    s = gm.trace("s", gm.half_normal(1.5))
    r = gm.trace("r", gm.half_normal(mx.ones((1, 3))))
    m = gm.trace("m", gm.normal(mx.zeros((2, 3)), s))  # σ per chain over [2, 3]
    v = gm.trace("v", gm.normal(0.5 * m, r))  # σ broadcast along the rows
    gm.trace("c", gm.half_cauchy(s * mx.exp(0.1 * m)))  # observed, σ per element
    gm.trace("y", gm.normal(m + v, 0.8))  # observed, μ per element: grouped with m, v


LAYOUT_OBS = {"c": mx.array([[0.3, 1.2, 0.1], [2.0, 0.7, 0.4]]), "y": mx.array([[0.2, -1.0, 0.5], [1.1, 0.0, -0.3]])}


def test_layouts_model_flat_equals_generic():
    obs = gm.choicemap(LAYOUT_OBS)
    gen = UnconstrainedDensity(layouts, (mx.zeros(1),), obs)
    fd = FlatDensity(layouts, (mx.zeros(1),), obs, latents=gen.latents)
    slow = FlatDensity(layouts, (mx.zeros(1),), obs, latents=gen.latents, fast=False)
    U = mx.random.uniform(-2.0, 2.0, (5, gen.dim), key=mx.random.key(4))
    lp0, g0 = gen.value_and_grad(U)
    # float32 both: the paths sum the same terms (|z²| up to ~10², 30 elements) in different
    # orders, so they differ by a few float32 ulps of those partial sums, not more
    for d in (fd, slow):
        lp1, g1 = d.value_and_grad(U)
        np.testing.assert_allclose(np.array(lp1), np.array(lp0), rtol=2e-6, atol=2e-5)
        np.testing.assert_allclose(np.array(g1), np.array(g0), rtol=1e-5, atol=1e-4)
    assert all(s.hoisted and s.fast for s in fd.last_plan.sites)


def test_custom_sums_under_vmap_and_grad():
    """The custom function composes with the transforms a caller may apply to the
    density: ``mx.vmap`` of the single-point log density and of its gradient, and the
    gradient of the batched one, all equal to the generic density's."""
    obs = gm.choicemap(LAYOUT_OBS)
    gen = UnconstrainedDensity(layouts, (mx.zeros(1),), obs)
    fd = FlatDensity(layouts, (mx.zeros(1),), obs, latents=gen.latents)
    U = mx.random.uniform(-2.0, 2.0, (4, gen.dim), key=mx.random.key(8))
    lp0, g0 = gen.value_and_grad(U)
    np.testing.assert_allclose(np.array(mx.vmap(fd.log_density)(U)), np.array(lp0), rtol=2e-6, atol=2e-5)
    for g in (mx.vmap(mx.grad(fd.log_density))(U), mx.grad(lambda V: mx.sum(fd.batched_log_density(V)))(U)):
        np.testing.assert_allclose(np.array(g), np.array(g0), rtol=1e-5, atol=1e-4)
