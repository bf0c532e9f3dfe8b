"""Exact enumeration against hand enumeration in numpy."""

import itertools
import math

import genmlx as gm
import mlx.core as mx
import numpy as np
import pytest
from scipy.stats import norm

from genmlx.inference import NotEnumerableError, enumerate_posterior, importance_sampling

P0, PB, PC = 0.4, (0.3, 0.8), (0.1, 0.6)  # P(a); P(b | a = 0/1); P(c | b = 0/1)


@gm.gen
def chain(p0):
    a = gm.trace("a", gm.bernoulli(p0))
    b = gm.trace("b", gm.bernoulli(mx.where(a, PB[1], PB[0])))
    c = gm.trace("c", gm.bernoulli(mx.where(b, PC[1], PC[0])))
    gm.trace("y", gm.normal(mx.where(c, 1.0, -1.0), 1.0))


def hand(y):
    table = {}
    for a, b, c in itertools.product([0, 1], repeat=3):
        p = (P0 if a else 1 - P0) * (PB[a] if b else 1 - PB[a]) * (PC[b] if c else 1 - PC[b])
        table[(a, b, c)] = p * norm.pdf(y, 1.0 if c else -1.0, 1.0)
    z = sum(table.values())
    return {k: v / z for k, v in table.items()}, z


def test_bernoulli_chain_posterior_and_evidence():
    y = 0.5
    res = enumerate_posterior(chain, (P0,), gm.choicemap({"y": y}))
    post, z = hand(y)
    assert float(res.log_marginal_likelihood) == pytest.approx(math.log(z), abs=1e-5)
    rows = res.table()
    assert len(rows) == 8 and sum(p for _, p in rows) == pytest.approx(1.0, abs=1e-5)
    for cfg, p in rows:
        assert p == pytest.approx(post[(int(cfg["a"]), int(cfg["b"]), int(cfg["c"]))], abs=1e-5)
    pa = sum(v for k, v in post.items() if k[0] == 1)
    assert res.marginal("a")[True] == pytest.approx(pa, abs=1e-5)
    assert float(res.expectation("a")) == pytest.approx(pa, abs=1e-5)
    assert res.traces.batch_size == 8


def test_observed_discrete_choice_and_agreement_with_importance_sampling():
    obs = gm.choicemap({"c": True, "y": 0.2})
    res = enumerate_posterior(chain, (P0,), obs)
    assert set(res.addresses) == {("a",), ("b",)}
    assert len(res.table()) == 4
    # Ẑ from IS is unbiased for the exact evidence: check within 3.5 SE
    reps = [math.exp(float(importance_sampling(k, chain, (P0,), obs, 16).log_marginal_likelihood))
            for k in mx.random.split(mx.random.key(0), 200)]
    z = math.exp(float(res.log_marginal_likelihood))
    assert abs(np.mean(reps) - z) < 3.5 * np.std(reps, ddof=1) / math.sqrt(len(reps))


@gm.gen
def vector_model():
    bits = gm.trace("bits", gm.bernoulli(mx.array([0.2, 0.5, 0.9])))
    gm.trace("y", gm.normal(mx.sum(bits.astype(mx.float32)), 0.5))


def test_array_valued_choice_enumerated_elementwise():
    res = enumerate_posterior(vector_model, (), gm.choicemap({"y": 2.0}))
    assert res.log_joint.shape == (8,)
    probs = np.array([0.2, 0.5, 0.9])
    tot = 0.0
    for bits in itertools.product([0, 1], repeat=3):
        b = np.array(bits)
        tot += np.prod(np.where(b, probs, 1 - probs)) * norm.pdf(2.0, b.sum(), 0.5)
    assert float(res.log_marginal_likelihood) == pytest.approx(math.log(tot), abs=1e-5)


@gm.gen
def mixed():
    x = gm.trace("x", gm.normal(0.0, 1.0))
    gm.trace("y", gm.normal(x, 1.0))


def test_continuous_latent_is_named():
    with pytest.raises(NotEnumerableError, match="'x'.*normal"):
        enumerate_posterior(mixed, (), gm.choicemap({"y": 0.0}))


def test_explicit_support_and_errors():
    # an explicit support restricts the values summed over
    res = enumerate_posterior(chain, (P0,), gm.choicemap({"y": 0.5, "b": True, "c": True}),
                              support={"a": [True]})
    assert len(res.table()) == 1
    with pytest.raises(NotEnumerableError, match="'zz'"):
        enumerate_posterior(chain, (P0,), gm.choicemap({"y": 0.5}), support={"zz": [0, 1]})
    with pytest.raises(NotEnumerableError, match="max_configurations"):
        enumerate_posterior(chain, (P0,), gm.choicemap({"y": 0.5}), max_configurations=4)


@gm.gen
def inner(k):
    return gm.trace("j", gm.categorical(mx.array([0.5, 0.3, 0.2]))) + k


@gm.gen
def nested():
    i = gm.trace("i", gm.categorical(mx.array([0.1, 0.6, 0.3])))
    s = gm.trace("sub", inner(i))
    gm.trace("y", gm.normal(s.astype(mx.float32), 0.7))


def test_nested_categorical_supports_are_discovered():
    res = enumerate_posterior(nested, (), gm.choicemap({"y": 2.3}))
    assert set(res.addresses) == {("i",), ("sub", "j")}
    pi, pj = [0.1, 0.6, 0.3], [0.5, 0.3, 0.2]
    joint = {(i, j): pi[i] * pj[j] * norm.pdf(2.3, i + j, 0.7) for i in range(3) for j in range(3)}
    z = sum(joint.values())
    assert float(res.log_marginal_likelihood) == pytest.approx(math.log(z), abs=1e-5)
    m = res.marginal(("sub", "j"))
    for j in range(3):
        assert m[j] == pytest.approx(sum(v for (i, jj), v in joint.items() if jj == j) / z, abs=1e-5)
