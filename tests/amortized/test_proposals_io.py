"""Trained guides as proposals (gm.inference and gm.amortized evaluation), address
coverage errors, and guide save/load."""

from __future__ import annotations

import json
import math

import genmlx as gm
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from tests.amortized import lingauss as LG


@pytest.fixture(scope="module")
def trained():
    guide, net = LG.make_guide()
    LG.train(gm.amortized.ELBO(LG.model, guide), steps=(400,), lrs=(2e-2,), batches=(64,))
    return guide, net


def test_trained_guide_beats_prior_as_is_proposal(trained):
    guide, _ = trained
    xs = LG.model.vsimulate(mx.random.key(3), (), 20)["x"]
    d_guide = gm.amortized.proposal_diagnostics(mx.random.key(4), (LG.model, guide), xs, K=500)
    d_prior = gm.amortized.proposal_diagnostics(mx.random.key(4), (LG.model, LG.prior_guide), xs, K=500)
    assert d_guide["ess_per_n"] > 0.5
    assert d_guide["ess_per_n"] > 3 * d_prior["ess_per_n"]
    assert d_guide["khat"] < 0.5 < d_prior["khat"]  # finite-variance weights only for the guide

    # the same guide in gm.inference.importance_sampling, one observation
    x = xs[0]
    obs = gm.choicemap({"x": x})
    r_g = gm.inference.importance_sampling(mx.random.key(5), LG.model, (), obs, 2000,
                                           proposal=guide, proposal_args=(x,))
    r_p = gm.inference.importance_sampling(mx.random.key(5), LG.model, (), obs, 2000)
    assert float(r_g.ess) > 3 * float(r_p.ess)
    exact = float(LG.log_evidence(np.array(x)))
    lw = np.array(r_g.log_weights, dtype=np.float64)
    w = np.exp(lw - lw.max())
    se = np.std(w) / np.mean(w) / math.sqrt(len(w))  # delta-method SE of log p̂
    assert abs(float(r_g.log_marginal_likelihood) - exact) < 3.5 * se + 1e-3


def test_trained_guide_as_mh_proposal(trained):
    # stationarity: chains started at exact posterior draws stay at the posterior
    guide, _ = trained
    x = mx.array([1.0, 2.0, 0.0])
    n = 400
    sd = np.sqrt(np.diag(LG.SIGMA))
    mu = LG.post_mean(np.array(x))
    z0 = mx.array(mu + sd * np.random.default_rng(0).standard_normal((n, 2)), dtype=mx.float32)
    tr, _ = LG.model.vgenerate(mx.random.key(0), (), gm.choicemap({"x": x, "z": z0}), n)
    proposal = gm.amortized.mh_proposal(guide)
    key, acc = mx.random.key(1), []
    for _ in range(10):
        key, k = mx.random.split(key)
        tr, a = gm.inference.mh(k, tr, proposal, (x,))
        acc.append(np.array(a))
    z = np.array(tr["z"])
    assert np.mean(acc) > 0.7                          # a good proposal is mostly accepted
    assert np.all(np.abs(z.mean(0) - mu) < 3.5 * sd / math.sqrt(n))
    assert np.all(np.abs(z.var(0) / sd**2 - 1) < 3.5 * math.sqrt(2 / (n - 1)))


def test_coverage_errors_name_the_addresses():
    @gm.gen
    def missing(x):
        return gm.normal(0.0, 1.0) @ "w"

    obj = gm.amortized.ELBO(LG.model, missing)
    with pytest.raises(gm.amortized.AddressCoverageError) as e:
        obj.loss(mx.random.key(0), LG.model.vsimulate(mx.random.key(1), (), 4)["x"])
    msg = str(e.value)
    assert "z" in msg and "w" in msg


def test_save_load_round_trip_gives_identical_proposals(tmp_path, trained):
    guide, net = trained
    x = mx.array([0.3, -1.0, 0.2])
    path = gm.amortized.save_guide(tmp_path / "g.safetensors", guide, config={"hidden": []},
                                   example_args=(x,))
    meta = json.loads((tmp_path / "g.json").read_text())
    assert meta["schema"] == {"z": {"shape": [2], "dtype": "float32"}}
    assert meta["genmlx_version"] == gm.__version__

    fresh, fresh_net = LG.make_guide(shift=5.0)
    gm.amortized.load_guide(path, fresh, example_args=(x,))
    a = guide.simulate(mx.random.key(11), (x,))
    b = fresh.simulate(mx.random.key(11), (x,))
    assert np.array_equal(np.array(a["z"]), np.array(b["z"]))
    assert float(a.score) == float(b.score)


def test_load_into_mismatched_guide_lists_differences(tmp_path, trained):
    guide, _ = trained
    x = mx.array([0.3, -1.0, 0.2])
    path = gm.amortized.save_guide(tmp_path / "dir", guide, example_args=(x,))

    class Wider(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def __call__(self, x):
            h = self.lin(x)
            return h[:2], mx.exp(h[2:])

    net = gm.nn.NeuralNetGF(Wider())

    @gm.gen
    def other(x):
        m, s = net(x) @ "net"
        return gm.normal(m, s) @ "u"

    with pytest.raises(gm.amortized.GuideMismatchError) as e:
        gm.amortized.load_guide(tmp_path / "dir", other, example_args=(x,))
    msg = str(e.value)
    assert "log_s" in msg                      # parameter missing in the new guide
    assert "[4, 3]" in msg and "[2, 3]" in msg  # shape mismatch
    assert "address u" in msg or "u" in msg    # schema difference
    assert len(e.value.differences) >= 4
