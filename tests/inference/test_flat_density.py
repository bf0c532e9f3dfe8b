"""The flat unconstrained density equals the generic (generate-based) one — values and
gradients — on models with vector latents, dependent supports, multivariate and
derived-parameter families, nested @gm.gen calls and combinators; hoisting happens
where it should; non-static or non-dynamic models fall back to the generic path."""

import mlx.core as mx
import numpy as np
import pytest

import genmlx as gm
from genmlx.distributions import constraints
from genmlx.distributions.base import param
from genmlx.inference.flat_density import FlatDensity, make_density
from genmlx.inference.unconstrained import UnconstrainedDensity

RNG = np.random.default_rng(0)
XS = mx.array(RNG.uniform(-2, 2, (20, 3)).astype(np.float32))
YS = mx.array(RNG.normal(0, 1, 20).astype(np.float32))


@gm.gen
def regression(X):
    w = gm.trace("w", gm.normal(mx.zeros(3), 1.0))
    sigma = gm.trace("sigma", gm.half_normal(1.0))
    return gm.trace("y", gm.normal(X @ w, sigma))


@gm.gen
def dependent(sigma):
    a = gm.trace("a", gm.uniform(0.0, 1.0))
    b = gm.trace("b", gm.uniform(0.0, 1.0 - a))
    c = gm.trace("c", gm.flat(0.0, 1.0 - a))
    return gm.trace("y", gm.normal(a + b + c, sigma))


@gm.gen
def eight_schools(sigma):
    mu = gm.trace("mu", gm.normal(0.0, 5.0))
    tau = gm.trace("tau", gm.half_cauchy(5.0))
    tt = gm.trace("theta_tilde", gm.normal(mx.zeros(sigma.shape), 1.0))
    return gm.trace("y", gm.normal(mu + tau * tt, sigma))


@gm.gen
def inner(scale):
    z = gm.trace("z", gm.normal(0.0, scale))
    return gm.trace("obs", gm.normal(z, 0.5))


class ScaledNormal(gm.Distribution):
    """A user-defined family storing an array derived from its parameters (log σ), so
    it cannot be re-parameterised outside the vmap: scored inside it."""

    name = "scaled_normal"
    reparameterized = True

    def __init__(self, mu, scale):
        self.mu, self.scale = param(mu), param(scale)
        self.log_scale = mx.log(self.scale)
        self._init({"mu": self.mu, "scale": self.scale})

    @property
    def support(self):
        return constraints.real

    def _log_prob(self, x):
        z = (x - self.mu) / self.scale
        return -0.5 * z * z - self.log_scale - 0.9189385332046727


@gm.gen
def mixed():
    s = gm.trace("s", gm.log_normal(0.0, 0.5))
    d = gm.trace("d", ScaledNormal(0.5, s))
    v = gm.trace("v", gm.mv_normal(mx.zeros(2), mx.array([[1.0, 0.3], [0.3, 2.0]])))
    sub = gm.trace("sub", inner(s))
    e = gm.trace("e", gm.exponential(s))
    gm.trace("y", gm.normal(sub + d * v[0] + e, 1.0))


@gm.gen
def kernel_step(x):
    return gm.trace("e", gm.normal(x, 1.0))


@gm.gen
def with_map(xs):
    m = gm.trace("m", gm.normal(0.0, 1.0))
    return gm.trace("k", gm.Map(kernel_step)(xs + m))


@gm.gen
def families(y_pos):
    """Normal / HalfNormal / HalfCauchy sites in every parameter layout the closed-form
    per-chain sums handle: constant (scalar and per-element) and latent-dependent
    (scalar, per-element, broadcast by ``shape=``) parameters, latent and observed values."""
    a = gm.trace("a", gm.normal(mx.array([0.5, -1.0, 2.0, 0.0]), mx.array([1.0, 2.0, 0.5, 3.0])))
    s = gm.trace("s", gm.half_normal(mx.array([1.0, 2.0, 0.5, 1.5])))
    t = gm.trace("t", gm.half_cauchy(2.5))
    b = gm.trace("b", gm.normal(a, s))  # per-element latent σ
    c = gm.trace("c", gm.normal(0.0, t, shape=(3,)))  # scalar latent σ broadcast by shape=
    gm.trace("h", gm.half_normal(t * mx.ones(2), shape=(2,)))
    gm.trace("q", gm.half_cauchy(t + s[:2]))
    gm.trace("yn", gm.half_normal(s[0] + 0.5 * t, shape=y_pos.shape))
    gm.trace("y", gm.normal(b.sum() + c, 0.7))


FAMILIES_OBS = {"q": mx.array([0.3, 1.7]), "yn": mx.array([0.2, 0.9, 2.5]), "y": mx.array([0.1, -0.4, 1.2])}

CASES = {
    "families": (families, (mx.zeros(3),), FAMILIES_OBS),
    "regression": (regression, (XS,), {"y": YS}),
    "dependent": (dependent, (0.1,), {"y": 0.7}),
    "eight_schools": (eight_schools, (mx.array([15.0, 10, 16, 11, 9, 11, 10, 18]),),
                      {"y": mx.array([28.0, 8, -3, 7, -1, 1, 18, 12])}),
    "mixed": (mixed, (), {"y": 0.3, ("sub", "obs"): 0.2}),
    "map": (with_map, (mx.array([0.1, -0.4, 0.9]),), {("k", 1, "e"): 0.5}),
}


def _points(dim, n=6, seed=3):
    return mx.random.uniform(-2.0, 2.0, (n, dim), key=mx.random.key(seed))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("hoist", [True, False])
def test_flat_equals_generic(name, hoist):
    model, args, obs = CASES[name]
    obs = gm.choicemap(obs)
    gen = UnconstrainedDensity(model, args, obs)
    fd = FlatDensity(model, args, obs, latents=gen.latents, hoist=hoist)
    U = _points(gen.dim)
    lp0, g0 = gen.value_and_grad(U)
    lp1, g1 = fd.value_and_grad(U)
    np.testing.assert_allclose(np.array(lp1), np.array(lp0), rtol=2e-6, atol=2e-5)
    np.testing.assert_allclose(np.array(g1), np.array(g0), rtol=1e-5, atol=1e-4)
    # unbatched and batched evaluations, and constrained values, agree too
    np.testing.assert_allclose(np.array(fd.batched_log_density(U)), np.array(lp0), rtol=2e-6, atol=2e-5)
    np.testing.assert_allclose(float(fd.log_density(U[2])), float(lp0[2]), rtol=2e-6, atol=2e-5)
    c0, c1 = gen.constrain(U), fd.constrain(U)
    for p in c0:
        np.testing.assert_allclose(np.array(c1[p]), np.array(c0[p]), rtol=1e-6, atol=1e-6)


def test_closed_form_sites():
    """The families model uses the closed-form per-chain sums at every site, and they
    agree with the family's elementwise log densities (fast=False) and the generic path;
    an observed value outside a half-normal's support falls back to the elementwise
    path (log π = −∞ everywhere, as the generic density says)."""
    model, args, obs = CASES["families"]
    fd = make_density(model, args, gm.choicemap(obs), flat=True)
    assert fd.fast
    U = _points(fd.dim, 5, seed=9)
    lp1, g1 = fd.value_and_grad(U)
    assert all(s.hoisted and s.fast for s in fd.last_plan.sites)
    slow = FlatDensity(model, args, gm.choicemap(obs), latents=fd.latents, fast=False)
    lp0, g0 = slow.value_and_grad(U)
    np.testing.assert_allclose(np.array(lp1), np.array(lp0), rtol=2e-6, atol=2e-5)
    np.testing.assert_allclose(np.array(g1), np.array(g0), rtol=1e-5, atol=1e-4)
    bad = dict(obs, yn=mx.array([0.2, -0.9, 2.5]))
    fb = FlatDensity(model, args, gm.choicemap(bad), latents=fd.latents)
    gen = UnconstrainedDensity(model, args, gm.choicemap(bad))
    assert np.all(np.isneginf(np.array(fb.batched_log_density(U))))
    assert np.all(np.isneginf(np.array(gen.batched_log_density(U))))


def test_hoisting_plan():
    model, args, obs = CASES["mixed"]
    fd = make_density(model, args, gm.choicemap(obs), flat=True)
    assert isinstance(fd, FlatDensity) and fd.hoist
    fd.value_and_grad(_points(fd.dim, 2))
    hoisted = [s.hoisted for s in fd.last_plan.sites]
    # d (derived array attribute) and v (multivariate) are scored in the vmap
    assert hoisted == [True, False, False, True, True, True, True]
    reg = make_density(regression, (XS,), gm.choicemap({"y": YS}), flat=True)
    reg.value_and_grad(_points(reg.dim, 2))
    sites = reg.last_plan.sites
    assert all(s.hoisted for s in sites)
    assert sites[0].names == () and set(sites[0].consts) == {"mu", "sigma"}  # prior: constants
    assert sites[2].names == ("mu", "sigma")  # likelihood: both depend on the latents


def test_flat_is_faster_graph():
    """The flat path's compiled value-and-gradient graph has fewer nodes."""
    import io
    import re

    gen = UnconstrainedDensity(regression, (XS,), gm.choicemap({"y": YS}))
    fd = make_density(regression, (XS,), gm.choicemap({"y": YS}), flat=True)
    U = _points(gen.dim, 4)

    def nodes(f):
        out = f(U)
        mx.eval(out)
        out = f(U)
        buf = io.StringIO()
        mx.export_to_dot(buf, *out)
        return len(re.findall(r'label ="', buf.getvalue()))

    assert nodes(fd._vg) < nodes(gen._vg)


@gm.gen
def branching():
    a = gm.trace("a", gm.normal(0.0, 1.0))
    if float(a) > 0.0:  # the set of addresses depends on a latent's value
        gm.trace("b", gm.normal(0.0, 1.0))
    else:
        gm.trace("c", gm.normal(0.0, 1.0))


def test_fallbacks():
    # a top-level combinator is not a @gm.gen model: generic path
    d = make_density(gm.Map(kernel_step), (mx.array([0.0, 1.0]),), gm.choicemap({}))
    assert type(d) is UnconstrainedDensity
    with pytest.raises(ValueError, match="not a @gm.gen"):
        make_density(gm.Map(kernel_step), (mx.array([0.0, 1.0]),), None, flat=True)
    # structure depending on the latents: detected at the probe points
    d = make_density(branching, (), None)
    assert type(d) is UnconstrainedDensity
    with pytest.raises(ValueError, match="depend on the latent values|failed"):
        make_density(branching, (), None, flat=True)
    # explicitly generic
    assert type(make_density(regression, (XS,), gm.choicemap({"y": YS}), flat=False)) is UnconstrainedDensity


def test_drivers_use_flat_density():
    r = gm.inference.hmc(mx.random.key(0), regression, (XS,), gm.choicemap({"y": YS}), num_samples=5,
                         num_warmup=0, num_chains=2, step_size=0.05, num_steps=3, progress=False)
    assert isinstance(r.density, FlatDensity)
    r = gm.inference.nuts(mx.random.key(0), regression, (XS,), gm.choicemap({"y": YS}), num_samples=5,
                          num_warmup=5, num_chains=2, progress=False)
    assert isinstance(r.density, FlatDensity)


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_form(name):
    """split/join invert each other and the block gradient is the joined gradient."""
    model, args, obs = CASES[name]
    d = make_density(model, args, gm.choicemap(obs))
    U = _points(d.dim, 4)
    blocks = d.split(U)
    assert len(blocks) == (len(d.latents) if isinstance(d, FlatDensity) else 1)
    np.testing.assert_array_equal(np.array(d.join(blocks)), np.array(U))
    lp0, g0 = d.value_and_grad(U)
    lp1, gb = d.value_and_grad_blocks(blocks)
    np.testing.assert_array_equal(np.array(lp1), np.array(lp0))
    np.testing.assert_array_equal(np.array(d.join(gb)), np.array(g0))


@pytest.mark.parametrize("kind", ["identity", "diag"])
def test_block_transition_equals_joined(kind):
    """One HMC transition in block form (u, ∇ kept as the density's blocks, the
    trajectory on the blocks) equals a reference transition on the joined [C, D] arrays
    with the same random numbers, for the flat and the generic density; the joined-state
    step agrees too."""
    from genmlx.inference.hmc import HMCKernel, joined
    from genmlx.inference.metric import kinetic, leapfrog, metric_from_inverse

    obs = gm.choicemap({"y": YS})
    for d in (make_density(regression, (XS,), obs, flat=True), make_density(regression, (XS,), obs, flat=False)):
        U = _points(d.dim, 3, seed=5)
        inv = np.ones((3, d.dim)) if kind == "identity" else np.random.default_rng(8).uniform(0.5, 2.0, (3, d.dim))
        m = metric_from_inverse(inv, 3, d.dim)
        if kind == "identity":
            from genmlx.inference.metric import identity_metric

            m = identity_metric(3, d.dim, "identity")
        eps = mx.array([0.01, 0.02, 0.05])
        key = mx.random.key(11)
        kern = HMCKernel(d, 5)
        sb, ib = kern.step(key, kern.init_blocks(U), eps, m)
        sj, ij = kern.step(key, kern.init(U), eps, m)
        assert isinstance(sb.u, tuple) and not isinstance(sj.u, tuple)
        # reference: the joined leapfrog with the same draws
        lp, g = d.value_and_grad(U)
        k1, k2 = mx.random.split(key)
        p = m.mfac * mx.random.normal(U.shape, key=k1)
        h0 = -lp + kinetic(p, m.minv, False)
        u2, p2, g2, lp2 = U, p, g, lp
        for _ in range(5):
            u2, p2, g2, lp2 = leapfrog(d.value_and_grad, u2, p2, g2, eps[:, None], m.minv, False)
        dh = np.array(h0 - (-lp2 + kinetic(p2, m.minv, False)))
        acc = np.log(np.array(mx.random.uniform(shape=(3,), key=k2))) < np.where(np.isnan(dh), -np.inf, dh)
        ref_u = np.where(acc[:, None], np.array(u2), np.array(U))
        ref_g = np.where(acc[:, None], np.array(g2), np.array(g))
        for st, info in ((joined(d, sb), ib), (sj, ij)):
            np.testing.assert_array_equal(np.array(info.accepted), acc)
            # the same arithmetic in another order of kernels: equal to a few float32 ulps
            # (bit-equal on the CPU)
            np.testing.assert_allclose(np.array(st.u), ref_u, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(np.array(st.grad), ref_g, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(np.array(info.accept_prob), np.exp(np.minimum(dh, 0)), rtol=1e-6, atol=1e-6)


def _transition_graph(kind: str, blocks: bool) -> str:
    """DOT text of one compiled 20-step HMC transition on the regression model."""
    import io

    from genmlx.inference.hmc import HMCKernel
    from genmlx.inference.metric import identity_metric

    d = make_density(regression, (XS,), gm.choicemap({"y": YS}), flat=True)
    kern = HMCKernel(d, 20)
    m = identity_metric(4, d.dim, kind)
    U = _points(d.dim, 4)
    st = kern.init_blocks(U) if blocks else kern.init(U)
    mx.eval(st)
    f = kern._fn(kind, blocks)
    mets = ((), ()) if kind == "identity" else kern._metric_blocks(m) if blocks else (m.minv, m.mfac)
    a = (mx.random.key(0), st.u, st.lp, st.grad, mx.full((4,), 0.01), *mets)
    mx.eval(f(*a))
    buf = io.StringIO()
    mx.export_to_dot(buf, *[x for o in f(*a) for x in (o if isinstance(o, (tuple, list)) else [o])])
    return buf.getvalue()


@pytest.mark.parametrize("kind,blocks", [("diag", False), ("identity", True)])
def test_hmc_transition_graph_size(kind, blocks):
    """The compiled 20-step HMC transition on the regression model stays small: the
    diagonal-metric trajectory integrates the latents' blocks (no per-step slicing of
    U or concatenation of ∇), the Normal / HalfNormal sites are closed-form per-chain
    sums with a written-out reverse mode, and a block-form state has no split/join at
    all. Counts on MLX 0.32.4 (CPU): joined diag 505 → 444 → 398 nodes; block form,
    identity metric 430 → 384 (hand-written: 439)."""
    import re

    text = _transition_graph(kind, blocks)
    assert len(re.findall(r'label ="Slice', text)) == 0  # splits once (one Split node per array)
    if blocks:
        assert len(re.findall(r'label ="Concatenate', text)) == 0  # no join
        assert len(re.findall(r'label ="Split', text)) == 2  # the key's and the momentum draw's
    else:
        assert len(re.findall(r'label ="Concatenate', text)) <= 2  # joins u and ∇ once per transition
    if mx.default_device() == mx.cpu:  # fusion differs by backend
        assert len(re.findall(r'label ="', text)) <= (390 if blocks else 405)
