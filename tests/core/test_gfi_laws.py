"""GFI laws on several dynamic models: scalar, array-valued, hierarchical, discrete."""

import mlx.core as mx
import pytest

import genmlx as gm
from tests.gfi_laws import check_gfi_laws


@gm.gen
def regression(xs):
    slope = gm.trace("slope", gm.normal(0.0, 2.0))
    intercept = gm.normal(0.0, 2.0) @ "intercept"
    return gm.trace("ys", gm.normal(slope * xs + intercept, 0.5))


@gm.gen
def group(mu, k):
    theta = gm.normal(mu, 1.0) @ "theta"
    return gm.normal(theta * mx.ones(k), 0.3) @ "obs"


@gm.gen
def hierarchical():
    mu = gm.normal(0.0, 3.0) @ "mu"
    a = group(mu, 2) @ "a"
    b = gm.trace(("groups", 1), group(mu, 3))
    return mx.concatenate([a, b])


@gm.gen
def discrete_chain():
    z1 = gm.bernoulli(0.3) @ "z1"
    z2 = gm.bernoulli(mx.where(z1, 0.9, 0.2)) @ "z2"
    x = gm.normal(mx.where(z2, 1.0, -1.0), 1.0) @ "x"
    return x


@gm.gen
def dependent_support():
    a = gm.uniform(0.0, 1.0) @ "a"
    b = gm.uniform(0.0, 1.0 - a) @ "b"
    return a + b


CASES = [
    ("regression", regression, (mx.linspace(-1, 1, 7),), ("slope",), ("intercept",)),
    ("regression-ys", regression, (mx.linspace(-1, 1, 7),), ("ys",), ("slope", "ys")),
    ("hierarchical", hierarchical, (), ("mu", ("a", "obs")), (("groups", 1, "theta"), "mu")),
    ("hierarchical-sub", hierarchical, (), (("groups", 1),), ("a",)),
    ("discrete", discrete_chain, (), ("z1",), ("z2",)),
    ("dependent", dependent_support, (), ("b",), ("a",)),
]


@pytest.mark.parametrize("name,gf,args,upd,regen", CASES, ids=[c[0] for c in CASES])
def test_gfi_laws(name, gf, args, upd, regen):
    for seed in range(3):
        check_gfi_laws(gf, args, mx.random.key(seed), update_addrs=upd, regen_addrs=regen)


def test_distribution_is_a_gf():
    d = gm.normal(mx.zeros(3), 2.0)
    check_gfi_laws(d, (), mx.random.key(1), batched=True)
    tr = d.simulate(mx.random.key(0), ())
    assert tr.retval.shape == (3,)
    assert abs(tr.score.item() - mx.sum(d.log_prob(tr.retval)).item()) < 1e-5
