"""SMC against the Kalman filter on a linear-Gaussian state-space model; conditional
SMC / particle Gibbs invariance."""

import math

import genmlx as gm
import mlx.core as mx
import numpy as np
import pytest

from genmlx.combinators import SequenceTrace
from genmlx.combinators._sequence import StackedSteps
from genmlx.harness.zoo.ssm import kalman_filter
from genmlx.inference import conditional_smc, mh, particle_gibbs, smc

A, Q, R_ = 0.8, 1.0, 0.7


@gm.gen
def step(t, x, a, q, r):
    x = gm.trace("x", gm.normal(a * x, q))
    gm.trace("y", gm.normal(x, r))
    return x


ssm = gm.Unfold(step)


@gm.gen
def loop_ssm(T, a, q, r):
    """The same model written as a Python loop (update re-executes it: O(T) per step)."""
    x = mx.array(0.0)
    for t in range(T):
        x = gm.trace((t, "x"), gm.normal(a * x, q))
        gm.trace((t, "y"), gm.normal(x, r))
    return x


@gm.gen
def optimal(t, prev, obs, a, q, r):
    """The locally optimal proposal p(x_t | x_{t−1}, y_t)."""
    xp = mx.array(0.0) if prev is None else prev[(t - 1, "x")]
    y = obs[(t, "y")]
    prec = 1 / q**2 + 1 / r**2
    mean = (a * xp / q**2 + y / r**2) / prec
    gm.trace((t, "x"), gm.normal(mean, 1 / math.sqrt(prec)))


def kalman(ys):
    """(log p(y), filtering means) by the Kalman filter (the exact oracle)."""
    ll, means, _ = kalman_filter(ys, A, Q, R_, 0.0)
    return ll, means


T = 6
YS = np.array([0.4, 1.1, 0.3, -0.8, 0.9, 1.6], dtype=np.float32)
OBS = gm.choicemap({(t, "y"): float(YS[t]) for t in range(T)})
ARGS = (T, mx.array(0.0), A, Q, R_)


def run_many(reps, n, seed, model=ssm, args=ARGS, obs=OBS, **kw):
    """exp(log Ẑ − log Z) and the filtering-mean estimates of independent runs."""
    ll, _ = kalman(YS)
    ratios, filt = [], []
    for k in mx.random.split(mx.random.key(seed), reps):
        means = []

        def cb(t, traces, lw):
            w = mx.softmax(lw)
            means.append(float(mx.sum(w * traces[(t, "x")])))

        res = smc(k, model, args, obs, n, callback=cb, progress=False, **kw)
        ratios.append(math.exp(float(res.log_marginal_likelihood) - ll))
        filt.append(means)
    return np.array(ratios), np.array(filt)


def assert_unbiased_z(ratios):
    """Ẑ/Z over independent runs averages to 1 within 3.5 standard errors."""
    se = ratios.std(ddof=1) / math.sqrt(len(ratios))
    assert abs(ratios.mean() - 1) < 3.5 * se, (ratios.mean(), se)


def check_against_kalman(ratios, filt):
    _, kmeans = kalman(YS)
    reps = len(ratios)
    assert_unbiased_z(ratios)
    fm, fse = filt.mean(0), filt.std(0, ddof=1) / math.sqrt(reps)
    assert np.all(np.abs(fm - kmeans) < 3.5 * fse), (fm, kmeans, fse)


def test_bootstrap_filter_vs_kalman():
    ratios, filt = run_many(30, 300, 0)
    check_against_kalman(ratios, filt)


@pytest.mark.parametrize("scheme", ["multinomial", "stratified", "systematic", "residual"])
def test_resampling_schemes_give_unbiased_evidence(scheme):
    ratios, filt = run_many(25, 60, 1, resampling=scheme, ess_threshold=1.0)
    check_against_kalman(ratios, filt)


def test_locally_optimal_proposal_vs_kalman():
    ratios, filt = run_many(25, 100, 2, proposal=optimal, proposal_args=(A, Q, R_))
    # the optimal proposal gives far lower evidence variance than the bootstrap filter
    assert np.log(ratios).std() < 0.1
    check_against_kalman(ratios, filt)


def _rejuvenate(key, traces):
    last = traces.args[0] - 1
    return mh(key, traces, gm.select((last, "x")))


def test_mh_rejuvenation_vs_kalman():
    ratios, filt = run_many(25, 100, 3, rejuvenation=_rejuvenate)
    check_against_kalman(ratios, filt)


def test_hmc_rejuvenation_plugs_in():
    """Smoke test: the HMC kernel (lifted to traces) as the rejuvenation move keeps every
    particle distinct after resampling, and log Ẑ stays near the Kalman value (the
    statistical validation of the lifted kernel is in test_mh.py)."""
    from genmlx.inference import hmc_kernel, unconstrained_kernel

    T3 = 3
    obs = gm.choicemap({(t, "y"): float(YS[t]) for t in range(T3)})
    hk = unconstrained_kernel(lambda d: hmc_kernel(d, 0.3, 4), lambda p: p[-1] == "y")
    res = smc(mx.random.key(9), ssm, (T3, mx.array(0.0), A, Q, R_), obs, 200,
              rejuvenation=hk, ess_threshold=1.0, progress=False)
    ll, _ = kalman(YS[:T3])
    assert abs(float(res.log_marginal_likelihood) - ll) < 0.5
    assert len(np.unique(np.asarray(res.traces[(0, "x")]))) > 150


@gm.gen
def scan_step(x, u):
    """Scan kernel: carry x, input u (a known control added to the drift)."""
    x = gm.trace("x", gm.normal(A * x + u, Q))
    gm.trace("y", gm.normal(x, R_))
    return x, x


def test_scan_model_vs_kalman():
    scan = gm.Scan(scan_step)
    ratios, filt = run_many(20, 150, 5, model=scan, args=(mx.array(0.0), mx.zeros((T,))))
    check_against_kalman(ratios, filt)


def test_python_loop_model_with_per_step_observation_list():
    obs = [gm.choicemap({(t, "y"): float(YS[t])}) for t in range(T)]
    ratios, filt = run_many(20, 100, 4, model=loop_ssm, args=(T, A, Q, R_), obs=obs)
    check_against_kalman(ratios, filt)


def test_ess_trigger_and_history():
    never = smc(mx.random.key(0), ssm, ARGS, OBS, 50, ess_threshold=0.0, progress=False)
    always = smc(mx.random.key(0), ssm, ARGS, OBS, 50, ess_threshold=1.0, progress=False)
    assert never.resampled == (False,) * T and always.resampled == (True,) * T
    assert len(never.ess_history) == T and all(0 < e <= 50 for e in never.ess_history)
    # after resampling at the last step every weight equals log Ẑ
    lw = np.asarray(always.log_weights)
    assert np.allclose(lw, lw[0]) and lw[0] == pytest.approx(float(always.log_marginal_likelihood), abs=1e-4)
    mid = smc(mx.random.key(0), ssm, ARGS, OBS, 50, ess_threshold=0.5, progress=False)
    for e, f in zip(mid.ess_history, mid.resampled):
        assert f == (e < 25)
    assert mid.traces.batch_size == 50 and mid.traces[(T - 1, "x")].shape == (50,)


@pytest.mark.parametrize("model,args", [(ssm, ARGS), (loop_ssm, (T, A, Q, R_))])
def test_resampled_particles_are_consistent_ancestral_paths(model, args):
    """Every final particle's stored score is the log joint of its own path (resampling
    gathers every step with the right composed ancestor indices)."""
    obs = OBS if model is ssm else [gm.choicemap({(t, "y"): float(YS[t])}) for t in range(T)]
    res = smc(mx.random.key(3), model, args, obs, 64, ess_threshold=1.0, progress=False)
    assert all(res.resampled)
    for i in [0, 17, 40, 63]:
        tr = gm.unbatch(res.traces, i)
        lp, _ = model.assess(args, tr.choices)
        assert float(lp) == pytest.approx(float(res.traces.score[i]), abs=1e-4)
    # ancestral paths coalesce: fewer distinct x_0 than x_{T-1} values
    assert len(np.unique(np.asarray(res.traces[(0, "x")]))) < len(np.unique(np.asarray(res.traces[(T - 1, "x")])))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="ess_threshold"):
        smc(mx.random.key(0), ssm, ARGS, OBS, 10, ess_threshold=2.0, progress=False)
    with pytest.raises(ValueError, match="bogus"):
        smc(mx.random.key(0), ssm, ARGS, OBS, 10, resampling="bogus", progress=False)
    with pytest.raises(ValueError, match="step_args"):
        smc(mx.random.key(0), ssm, (mx.array(3),), [gm.choicemap({})], 10, progress=False)


# -- conditional SMC / particle Gibbs ---------------------------------------------------
T2 = 2


def exact_path_posterior():
    """Posterior mean/cov of (x_0, x_1) given y_0, y_1 (joint Gaussian conditioning)."""
    M = np.array([[1.0, 0.0], [A, 1.0]]) * Q  # x = M e
    cx = M @ M.T
    cy = cx + R_**2 * np.eye(2)
    ys = YS[:T2].astype(np.float64)
    gain = cx @ np.linalg.inv(cy)
    return gain @ ys, cx - gain @ cx


@pytest.mark.parametrize("use_proposal", [False, True])
def test_conditional_smc_leaves_posterior_invariant(use_proposal):
    mean, cov = exact_path_posterior()
    chains = 120
    draws = np.random.default_rng(5).multivariate_normal(mean, cov, size=chains)
    obs = gm.choicemap({(t, "y"): float(YS[t]) for t in range(T2)})
    args = (T2, mx.array(0.0), A, Q, R_)
    prop = dict(proposal=optimal, proposal_args=(A, Q, R_)) if use_proposal else {}
    out = []
    keys = mx.random.split(mx.random.key(6), chains)
    for c in range(chains):
        ref, _ = ssm.generate(keys[c], args, obs.merge(gm.choicemap({(t, "x"): float(draws[c, t]) for t in range(T2)})))
        res = conditional_smc(keys[c], ssm, args, obs, 8, ref, **prop)
        for t in range(T2):  # particle 0 is the reference
            assert float(res.traces[(t, "x")][0]) == pytest.approx(float(draws[c, t]), abs=1e-5)
        new = res.resample(mx.random.split(keys[c])[1], 1)
        out.append([float(new[(t, "x")][0]) for t in range(T2)])
    out = np.array(out)
    for t in range(T2):
        sd = math.sqrt(cov[t, t])
        assert abs(out[:, t].mean() - mean[t]) < 3.5 * sd / math.sqrt(chains)
        assert abs(out[:, t].var(ddof=1) - cov[t, t]) < 3.5 * cov[t, t] * math.sqrt(2 / (chains - 1))
    # the kernel moves: a good fraction of the chains changed their path
    assert np.mean(np.abs(out - draws) > 1e-6) > 0.3


def test_particle_gibbs_runs_and_returns_chain():
    obs = gm.choicemap({(t, "y"): float(YS[t]) for t in range(T2)})
    chain = particle_gibbs(mx.random.key(8), ssm, (T2, mx.array(0.0), A, Q, R_), obs, 8, 5, progress=False)
    assert chain.batch_size == 5 and chain[(1, "x")].shape == (5,)


# -- the fused, compiled step for Unfold/Scan models (no callback: the fast path) ---------
def run_fast(reps, n, seed, model=ssm, args=ARGS, obs=OBS, **kw):
    """exp(log Ẑ − log Z) and the final filtering mean E[x_{T−1} | y] of independent runs."""
    ll, _ = kalman(YS)
    ratios, last = [], []
    for k in mx.random.split(mx.random.key(seed), reps):
        res = smc(k, model, args, obs, n, progress=False, **kw)
        ratios.append(math.exp(float(res.log_marginal_likelihood) - ll))
        last.append(float(res.estimate((T - 1, "x"))))
    return np.array(ratios), np.array(last)


def check_fast(ratios, last):
    _, kmeans = kalman(YS)
    reps = len(ratios)
    assert_unbiased_z(ratios)
    lse = last.std(ddof=1) / math.sqrt(reps)
    assert abs(last.mean() - kmeans[-1]) < 3.5 * lse, (last.mean(), kmeans[-1], lse)


def test_compiled_step_vs_kalman():
    check_fast(*run_fast(30, 200, 10))


@gm.gen
def step_reading_t(t, x, a, q, r):
    """The SSM with a drift that depends on t (odd steps): the kernel cannot be traced
    once for all steps and must run with the real t."""
    x = gm.trace("x", gm.normal(a * x + 0.7 * (t % 2), q))
    gm.trace("y", gm.normal(x, r))
    return x


def test_kernel_reading_t_runs_with_the_real_t():
    """Identical to the uncompiled run (which always passes the real t); a t baked in
    at tracing would shift the drift of every other step."""
    m = gm.Unfold(step_reading_t)
    a = smc(mx.random.key(4), m, ARGS, OBS, 30, progress=False)
    b = smc(mx.random.key(4), m, ARGS, OBS, 30, progress=False, compile=False)
    assert np.allclose(np.asarray(a.log_weights), np.asarray(b.log_weights), atol=1e-5)
    xs = [np.asarray(a.traces[(t, "x")]) for t in range(T)]
    xb = [np.asarray(b.traces[(t, "x")]) for t in range(T)]
    assert np.allclose(xs, xb, atol=1e-5)


def test_compiled_step_equals_uncompiled_step():
    a = smc(mx.random.key(5), ssm, ARGS, OBS, 40, progress=False)
    b = smc(mx.random.key(5), ssm, ARGS, OBS, 40, progress=False, compile=False)
    assert a.resampled == b.resampled
    assert np.allclose(np.asarray(a.log_weights), np.asarray(b.log_weights), atol=1e-5)
    assert np.allclose(np.asarray(a.traces[(2, "x")]), np.asarray(b.traces[(2, "x")]), atol=1e-5)


def test_step_is_traced_once_for_all_steps():
    """The kernel body runs a number of times (tracing: the compiled step, the final
    replay) that does not grow with T: one compiled step function serves every t (no
    per-step retracing or recompilation), and a second run reuses it."""

    def counting_model(calls):
        @gm.gen
        def counted(t, x, a, q, r):
            calls.append(1)
            x = gm.trace("x", gm.normal(a * x, q))
            gm.trace("y", gm.normal(x, r))
            return x

        return gm.Unfold(counted)

    def run(m, T_, seed):
        obs = gm.choicemap({(t, "y"): 0.1 * t for t in range(T_)})
        smc(mx.random.key(seed), m, (T_, mx.array(0.0), A, Q, R_), obs, 20, progress=False)

    counts = []
    for T_ in (4, 16):
        calls = []
        m = counting_model(calls)
        run(m, T_, 0)
        first = len(calls)
        run(m, T_, 1)
        counts.append((first, len(calls) - first))
    assert counts[0] == counts[1], counts
    assert counts[0][1] < counts[0][0] and counts[0][1] <= 3, counts


def test_scan_model_compiled_step_vs_kalman():
    check_fast(*run_fast(20, 150, 12, model=gm.Scan(scan_step), args=(mx.array(0.0), mx.zeros((T,)))))


@gm.gen
def step2(t, s, a, q, r):
    """A two-dimensional state (x, a redundant copy 2x) and a vector choice."""
    z = gm.trace("z", gm.normal(a * s[0] * mx.ones((2,)), q))
    gm.trace("y", gm.normal(z[0], r))
    return mx.stack([z[0], 2 * z[0]])


def test_paths_of_vector_state_kernel_are_consistent():
    """Final particles are ancestral paths: each stored score is the log joint of its own
    choices, for a kernel with several leaves of different shapes."""
    model = gm.Unfold(step2)
    args = (T, mx.zeros((2,)), A, Q, R_)
    res = smc(mx.random.key(13), model, args, OBS, 48, ess_threshold=1.0, progress=False)
    assert all(res.resampled) and res.traces[(T - 1, "z")].shape == (48, 2)
    for i in [0, 21, 47]:
        tr = gm.unbatch(res.traces, i)
        lp, _ = model.assess(args, tr.choices)
        assert float(lp) == pytest.approx(float(res.traces.score[i]), abs=1e-4)
        z = np.asarray(res.traces[(T - 2, "z")][i])
        assert np.allclose(np.asarray(res.traces.retval[i, T - 2]), [z[0], 2 * z[0]], atol=1e-6)


def test_callback_and_proposal_see_resolved_ancestral_paths():
    """Proposals and callbacks read a lazily resolved view of the particles (not
    recorded): at every step each particle's total score equals the sum of its own
    step scores, i.e. every earlier step is in the current (resampled) row order."""
    seen = []

    def cb(t, traces, lw):
        total = sum(np.asarray(traces.steps[s].score) for s in range(t + 1))
        seen.append(np.max(np.abs(total - np.asarray(traces.score))))

    res = smc(mx.random.key(14), ssm, ARGS, OBS, 64, proposal=optimal, proposal_args=(A, Q, R_),
              callback=cb, ess_threshold=1.0, progress=False)
    assert len(seen) == T and max(seen) < 1e-4
    for i in [0, 33, 63]:
        lp, _ = ssm.assess(ARGS, gm.unbatch(res.traces, i).choices)
        assert float(lp) == pytest.approx(float(res.traces.score[i]), abs=1e-4)


def test_misspelled_observation_is_named_and_kernel_stays_shared():
    import importlib

    S = importlib.import_module("genmlx.inference.smc")
    obs = gm.choicemap({(t, "yy"): 0.1 for t in range(T)})
    with pytest.raises(gm.core.errors.UnvisitedConstraintError, match="yy"):
        smc(mx.random.key(0), ssm, ARGS, obs, 10, progress=False)
    assert not S._INDEX_DEPENDENT.get(ssm, False)  # an error is not "the kernel reads t"


@pytest.mark.parametrize("x0", [0.0, mx.array(0.0)])
def test_paths_with_python_or_array_initial_state(x0):
    """The initial state as a Python number (step 0 replayed apart: its carry has no
    array) or as an array (all steps replayed in one call) gives consistent paths."""
    args = (T, x0, A, Q, R_)
    res = smc(mx.random.key(15), ssm, args, OBS, 32, ess_threshold=1.0, progress=False)
    for i in [0, 31]:
        lp, _ = ssm.assess(args, gm.unbatch(res.traces, i).choices)
        assert float(lp) == pytest.approx(float(res.traces.score[i]), abs=1e-4)
    assert res.traces[(0, "x")].shape == (32,) and res.traces.retval.shape == (32, T)


def test_steps_without_observations():
    """Observations at some steps only: steps of two structures (two compiled step
    variants; the end replays each group of alike steps at once). Same particles as the
    uncompiled run, and consistent ancestral paths."""
    obs = gm.choicemap({(t, "y"): float(YS[t]) for t in range(T) if t % 3 != 1})
    a = smc(mx.random.key(16), ssm, ARGS, obs, 40, ess_threshold=1.0, progress=False)
    b = smc(mx.random.key(16), ssm, ARGS, obs, 40, ess_threshold=1.0, progress=False, compile=False)
    assert np.allclose(np.asarray(a.log_weights), np.asarray(b.log_weights), atol=1e-5)
    assert np.allclose(np.asarray(a.traces.score), np.asarray(b.traces.score), atol=1e-4)
    for i in [0, 39]:
        lp, _ = ssm.assess(ARGS, gm.unbatch(a.traces, i).choices)
        assert float(lp) == pytest.approx(float(a.traces.score[i]), abs=1e-4)
    # y is sampled (per particle) where unobserved, the observation elsewhere
    assert np.std(np.asarray(a.traces[(1, "y")])) > 0.1
    assert np.allclose(np.asarray(a.traces[(0, "y")]), YS[0])


@pytest.mark.parametrize("compile", [True, False])
def test_per_particle_observations_follow_the_ancestry(compile):
    """Observations given per particle slot ([n] leaves): in the final traces particle i
    holds, at step t, the observation of the slot it descends from, y_t = idx_t[y_{t+1}]
    (with y_t[j] = j for slot j and resampling at every step)."""
    from genmlx.inference.smc import run_smc

    n = 16
    obs = gm.choicemap({(t, "y"): mx.arange(n, dtype=mx.float32) for t in range(T)})
    out = run_smc(mx.random.key(17), ssm, ARGS, obs, n, ess_threshold=1.0, progress=False,
                  compile=compile)
    ys = [np.asarray(out.traces[(t, "y")]).astype(int) for t in range(T)]
    idx = [np.asarray(a) for a in out.ancestors]
    assert len(idx) == T
    assert np.array_equal(ys[T - 1], idx[T - 1])
    for t in range(T - 1):
        assert np.array_equal(ys[t], idx[t][ys[t + 1]])
    assert any(not np.array_equal(y, np.arange(n)) for y in ys)  # the ancestry did move rows


def test_smc_past_the_axis_limit_replays_step_by_step(monkeypatch):
    """When T·n rows would pass MLX's 32-bit axis limit (here made smaller than T·n) the
    steps are rebuilt one by one instead of in one T·n-row replay: the same particles,
    weights and scores."""
    import genmlx.core.indexing as I

    a = gm.inference.smc(mx.random.key(4), ssm, ARGS, OBS, 50, progress=False, ess_threshold=0.9)
    import importlib

    S = importlib.import_module("genmlx.inference.smc")
    calls, general = [], S._rebuild
    monkeypatch.setattr(S, "_rebuild", lambda *a, **k: calls.append(1) or general(*a, **k))
    gm.inference.smc(mx.random.key(4), ssm, ARGS, OBS, 50, progress=False)
    assert not calls  # the one-replay path below the limit
    monkeypatch.setattr(I, "MAX_DIM", 50 * 3)
    b = gm.inference.smc(mx.random.key(4), ssm, ARGS, OBS, 50, progress=False, ess_threshold=0.9)
    assert calls
    assert mx.array_equal(a.log_weights, b.log_weights) and sum(a.resampled) >= 2
    for t in range(T):
        assert mx.array_equal(a.traces[(t, "x")], b.traces[(t, "x")])
    assert mx.allclose(a.traces.score, b.traces.score, atol=1e-5)


def test_large_carries_replay_step_zero_apart(monkeypatch):
    """Past CARRY_COPY_MAX_BYTES of gathered carries (here 0) the end of the run replays
    step 0 on its own from the initial carry and the other steps from views of the carry
    columns (no copy into one incoming-carry block): the same particles, weights, per-step
    sub-traces and scores; the steps are still columns after the first."""
    import importlib

    S = importlib.import_module("genmlx.inference.smc")
    a = gm.inference.smc(mx.random.key(5), ssm, ARGS, OBS, 60, progress=False, ess_threshold=0.9)
    monkeypatch.setattr(S, "CARRY_COPY_MAX_BYTES", 0)
    b = gm.inference.smc(mx.random.key(5), ssm, ARGS, OBS, 60, progress=False, ess_threshold=0.9)
    assert mx.array_equal(a.log_weights, b.log_weights) and sum(a.resampled) >= 2
    assert a.traces.steps.layout.h == 0 and b.traces.steps.layout.h == 1  # step 0 apart
    for t in range(T):
        assert mx.array_equal(a.traces[(t, "x")], b.traces[(t, "x")])
        assert mx.allclose(a.traces.steps[t].score, b.traces.steps[t].score, atol=1e-5)
    assert mx.allclose(a.traces.score, b.traces.score, atol=1e-5)


# -- the end of the fused run: descent, one gather, one replay, steps kept as columns --------
def _end_graph(monkeypatch, doubling, T_=20, n=50):
    """The lazy graph left for smc's final evaluation (descent, gathers, replay) of the
    SSM run with resampling at every step (T_ − 1 ancestor compositions), and the run."""
    import importlib

    from benchmarks.graph_ops import count_graph

    S = importlib.import_module("genmlx.inference.smc")
    block, rebuild, seen = S._Descent.block, S._rebuild_columns, {}
    if doubling == "kernel":  # the ancestral-paths kernel (CUDA, opt-in)
        from genmlx.kernels import _backend as B

        monkeypatch.setattr(B, "_override", "1")
        if S.paths_kernel.usable([mx.zeros((2,), mx.int32)], [[mx.zeros((2,))]]) is None:
            pytest.skip("the ancestral-paths kernel runs on a CUDA device only")
    else:
        monkeypatch.setattr(S.paths_kernel, "usable", lambda *a: None)
        monkeypatch.setattr(S._Descent, "block", lambda self, n, doubling=doubling: block(self, n, doubling))

    def counted(*a, **k):
        out = rebuild(*a, **k)
        seen["graph"] = count_graph([out[1], out[2]])
        return out

    monkeypatch.setattr(S, "_rebuild_columns", counted)
    obs = gm.choicemap({(t, "y"): 0.1 * t for t in range(T_)})
    res = smc(mx.random.key(21), ssm, (T_, mx.array(0.0), A, Q, R_), obs, n, ess_threshold=1.0,
              progress=False)
    return seen["graph"], res


@pytest.mark.parametrize("doubling", [False, True, "kernel"])
def test_end_of_run_graph_is_bounded(monkeypatch, doubling):
    """Kernels of the end of a fused run at T = 20 with 20 resamplings. The chain
    (CPU): 19 ``take``s compose the ancestors, then one concatenation each for the
    descent block, the kept states and the replay's incoming carries, one gather, the
    fused replay and the score's sum: ≤ T + 6. Doubling (GPU without the paths
    kernel): the ancestor vectors concatenated once and ⌈log₂ T⌉ = 5
    ``take_along_axis`` rounds instead of the chain: ≤ 12. The ancestral-paths kernel
    (CUDA): it, the carries' concatenation, the replay and the sum: ≤ 6. Copies
    counted as a GPU runs them (a concatenation of m arrays is m copy kernels): ≤ 3T +
    5, resp. ≤ 2T + 12, resp. ≤ 7. The result is already evaluated and flattens to a
    few arrays (no per-step leaves: the steps are columns)."""
    from benchmarks.graph_ops import count_graph

    T_ = 20
    g, res = _end_graph(monkeypatch, doubling, T_)
    concat = g.by_name.get("Concatenate", 0)
    if doubling == "kernel":
        assert g.launches <= 6 and concat <= 1 and g.by_name.get("Gather", 0) == 0, g.by_name
    elif doubling:
        assert g.launches <= 12 and g.by_name.get("Gather", 0) == 0, g.by_name
    else:
        assert g.launches <= T_ + 6 and g.by_name.get("Gather", 0) == T_ - 1, g.by_name
    assert concat <= 3
    assert isinstance(res.traces.steps, StackedSteps) and len(res.traces.steps) == T_
    leaves = gm.core.pytree.tree_flatten(res.traces)[0]
    assert len(leaves) <= 10
    final = count_graph([res.log_weights, leaves])
    assert final.launches == 0 and final.view == 0


def test_end_of_run_copies_as_a_gpu_counts_them(monkeypatch):
    """As above with each concatenation input counted (a GPU copies each input with its
    own kernel): no T-input stack of flags or ESS, of observations, or of descent rows
    beyond the one concatenation of the ancestor vectors."""
    import re

    from benchmarks import graph_ops as G

    T_ = 20
    cases = [(False, 3 * T_ + 5), (True, 2 * T_ + 12)]
    import importlib

    from genmlx.kernels import _backend as B

    with B.override("1"):
        if importlib.import_module("genmlx.inference.smc").paths_kernel.usable(
                [mx.zeros((2,), mx.int32)], [[mx.zeros((2,))]]) is not None:
            cases.append(("kernel", 7))
    for doubling, bound in cases:
        seen = {}
        orig = G.count_graph

        def weighted(outputs, seen=seen):
            g = orig(outputs)
            leaves = [a for a in gm.core.pytree.tree_flatten(outputs)[0] if isinstance(a, mx.array)]
            text = G._dot(leaves)
            labels = dict(G._NODE.findall(text))
            inputs: dict = {}
            for a, b in re.findall(r'^"?([^"\s]+)"? -> "?([^"\s]+)"?$', text, flags=re.M):
                if b in labels:
                    inputs[b] = inputs.get(b, 0) + 1
            seen["copies"] = g.launches + sum(inputs.get(k, 1) - 1 for k, v in labels.items()
                                              if v.startswith("Concatenate"))
            return g

        monkeypatch.setattr(G, "count_graph", weighted)
        _end_graph(monkeypatch, doubling, T_)
        monkeypatch.setattr(G, "count_graph", orig)
        assert seen["copies"] <= bound, (doubling, seen)


def test_descent_block_by_doubling_equals_the_chain():
    """The descent block [T, n] by doubling (GPU) equals the stacked chain of takes
    (CPU) exactly, for any pattern of resampled steps and lengths around powers of 2."""
    from genmlx.inference.smc import _Descent

    rng = np.random.default_rng(0)
    for T_ in (1, 2, 3, 5, 8, 9, 17, 64, 100):
        for n in (1, 5, 33):
            for p in (0.0, 0.3, 1.0):
                flags = [bool(rng.random() < p) for _ in range(T_)]
                idxs = [mx.array(rng.integers(0, n, n).astype(np.int32)) if f else mx.arange(n, dtype=mx.int32)
                        for f in flags]
                d = _Descent(idxs, flags)
                a, b = d.block(n, doubling=False), d.block(n, doubling=True)
                assert a.shape == b.shape == (T_, n) and mx.array_equal(a, b), (T_, n, p)
                for t in range(T_):
                    want = np.arange(n) if d[t] is None else np.asarray(d[t])
                    assert np.array_equal(np.asarray(a[t]), want)


def _replayed(tr, args, model=ssm):
    """Particle 0's trace replayed from its choices (generate with all of them)."""
    u = gm.unbatch(tr, 0)
    g, _ = model.generate(mx.random.key(0), args, u.choices)
    return u, g


@pytest.mark.parametrize("x0", [0.0, mx.array(0.0)])
def test_stacked_steps_equal_a_replay_of_the_choices(x0):
    """Every step of the columns-held trace (read one by one, all at once, or after
    unbatching) has the structure and values of the step replayed from its choices:
    its choices, their scores, the step score and return value."""
    args = (T, x0, A, Q, R_)
    res = smc(mx.random.key(22), ssm, args, OBS, 24, ess_threshold=0.8, progress=False)
    tr = res.traces
    assert isinstance(tr.steps, StackedSteps)
    u, g = _replayed(tr, args)
    flat = gm.core.pytree.tree_flatten
    for t in range(T):
        a, ta = flat(u.steps[t])
        b, tb = flat(g.steps[t])
        assert ta == tb
        for x, y in zip(a, b):
            assert np.allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    assert float(u.score) == pytest.approx(float(g.score), abs=1e-4)
    eager = tr._canonical()
    assert isinstance(eager.steps, tuple) and eager.score is tr.score
    one_by_one = [flat(tr.steps[t]) for t in range(T)]
    all_at_once = [flat(s) for s in SequenceTrace(ssm, args, StackedSteps(
        tr.steps.head, tr.steps.cols, tr.steps.layout), tr.score, 24).steps]
    for (a, ta), (b, tb), (c, tc) in zip(one_by_one, all_at_once, (flat(s) for s in eager.steps)):
        assert ta == tb == tc
        assert all(mx.array_equal(x, y) and mx.array_equal(x, z) for x, y, z in zip(a, b, c))
    assert mx.array_equal(tr.retval, eager.retval) and tr.retval.shape == (24, T)
    assert tr.steps[-1] is tr.steps[T - 1] and len(tr.steps[1:4]) == 3


def test_stacked_trace_supports_trace_operations():
    """A columns-held SMC trace works wherever a trace goes: taking particles,
    unbatching, update (extension by a step) and regenerate, MH rejuvenation (accepts
    between its layout and the update's), concatenation and stacking with traces of
    the other layout; every result's score is the log joint of its own choices."""
    from genmlx.core.diff import IntDiff, NoChange
    from genmlx.core.vectorize import stack_traces
    from genmlx.inference._util import concat_particles, take_particles, where_trace

    args = (T, mx.array(0.0), A, Q, R_)
    res = smc(mx.random.key(23), ssm, args, OBS, 16, ess_threshold=1.0, progress=False)
    tr = res.traces

    def coherent(x, a=args):
        for i in range(x.batch_size):
            lp, _ = ssm.assess(a, gm.unbatch(x, i).choices)
            assert float(lp) == pytest.approx(float(x.score[i]), abs=1e-4)

    taken = take_particles(tr, mx.array([3, 1, 1, 0]))
    assert isinstance(taken.steps, StackedSteps)
    assert mx.array_equal(taken[(2, "x")], tr[(2, "x")][mx.array([3, 1, 1, 0])])
    coherent(taken)
    coherent(res.resample(mx.random.key(1), 5))
    new, _, _, _ = ssm.update(mx.random.key(2), tr, gm.choicemap({(T, "y"): 0.2}),
                              (T + 1, *args[1:]), (IntDiff(1),) + (NoChange,) * 4)
    assert len(new.steps) == T + 1
    coherent(new, (T + 1, *args[1:]))
    coherent(ssm.regenerate(mx.random.key(3), tr, gm.select((2, "x")))[0])
    moved = mh(mx.random.key(4), tr, gm.select((T - 1, "x"), (0, "x")))
    coherent(moved[0] if isinstance(moved, tuple) else moved)
    eager = tr._canonical()
    coherent(concat_particles([tr, eager]))
    coherent(where_trace(mx.arange(16) % 2 == 0, tr, eager))
    st = stack_traces([gm.unbatch(tr, 2), gm.unbatch(eager, 5)])
    coherent(st)
    assert gm.unbatch(tr, 2).retval.shape == (T,)
    assert tr.get_choices().get_submap(3).get_submap("x").get_value().shape == (16,)


def test_scan_model_trace_is_stacked_and_coherent():
    """gm.Scan models (return value (carry, outputs)) take the same columns."""
    model = gm.Scan(scan_step)
    args = (mx.array(0.0), mx.zeros((T,)))
    res = smc(mx.random.key(24), model, args, OBS, 20, ess_threshold=1.0, progress=False)
    assert isinstance(res.traces.steps, StackedSteps)
    carry, ys = res.traces.retval
    eager = res.traces._canonical()
    assert mx.array_equal(carry, eager.retval[0]) and mx.array_equal(ys, eager.retval[1])
    for i in [0, 19]:
        lp, _ = model.assess(args, gm.unbatch(res.traces, i).choices)
        assert float(lp) == pytest.approx(float(res.traces.score[i]), abs=1e-4)


def test_observation_values_stack_like_mx_stack():
    """Per-step observation values made one array on the host equal ``mx.stack``."""
    from genmlx.inference.smc import _stack_values

    cases = [[0.5, -1.25, 3.0], [1, 2, 3], [True, False],
             [mx.array(0.1), mx.array(-2.5)], [mx.array(1, dtype=mx.int32), mx.array(7, dtype=mx.int32)],
             [mx.array(0.3, dtype=mx.float16), mx.array(1.7, dtype=mx.float16)],
             [mx.array(0.1), 0.2], [1, 2.5], [mx.array(0.5), mx.array(1, dtype=mx.int32)],
             [mx.array([1.0, 2.0]), mx.array([3.0, 4.0])]]
    for vals in cases:
        want = mx.stack([v if isinstance(v, mx.array) else mx.array(v) for v in vals])
        got = _stack_values(vals)
        assert got.dtype == want.dtype and mx.array_equal(got, want), vals
