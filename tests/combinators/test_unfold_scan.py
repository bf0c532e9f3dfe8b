"""Unfold and Scan: GFI laws, equivalence with hand-unrolled models, prefix skipping
(execution counts, identical results to full re-execution), Kalman-filter oracle."""

import math

import mlx.core as mx
import numpy as np
import pytest

import genmlx as gm
from tests.gfi_laws import check_gfi_laws

A, Q, R = 0.8, 0.7, 1.0  # x_t ~ N(A x_{t-1}, Q^2), y_t ~ N(x_t, R^2)
COUNT = [0]


@gm.gen
def lg_kernel(t, x, a, q, r):
    COUNT[0] += 1
    x = gm.normal(a * x, q) @ "x"
    gm.normal(x, r) @ "y"
    return x


@gm.gen
def scan_kernel(c, x):
    z = gm.normal(0.5 * c + x, 1.0) @ "z"
    return z, z + x


def unfold_args(T):
    return (T, mx.array(0.0), A, Q, R)


def unfold_diffs():
    return (gm.IntDiff(1), gm.NoChange, gm.NoChange, gm.NoChange, gm.NoChange)


@gm.gen
def unrolled(T, x0, a, q, r):
    x, xs = x0, []
    for t in range(T):
        x = lg_kernel(t, x, a, q, r) @ t
        xs.append(x)
    return mx.stack(xs)


@gm.gen
def unrolled_scan(c, xs):
    ys = []
    for t in range(xs.shape[0]):
        c, y = scan_kernel(c, xs[t]) @ t
        ys.append(y)
    return c, mx.stack(ys)


def close(a, b, tol=1e-4):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# -- GFI laws -------------------------------------------------------------------------
def test_unfold_gfi_laws():
    check_gfi_laws(gm.Unfold(lg_kernel), unfold_args(3), mx.random.key(1),
                   update_addrs=[(1, "y"), (2, "x")], regen_addrs=[(0, "x")])


def test_scan_gfi_laws():
    check_gfi_laws(gm.Scan(scan_kernel), (mx.array(0.3), mx.arange(3.0)), mx.random.key(2),
                   update_addrs=[(2, "z")], regen_addrs=[(1, "z")])


def test_unfold_nested_in_dynamic_model_laws():
    @gm.gen
    def model(T):
        x0 = gm.normal(0.0, 1.0) @ "x0"
        # constructed inline: recognised as the same callee on update (structural ==)
        return gm.Unfold(lg_kernel)(T, x0, A, Q, R) @ "chain"

    check_gfi_laws(model, (3,), mx.random.key(3),
                   update_addrs=["x0", ("chain", 1, "y")], regen_addrs=[("chain", 2, "x")])


# -- equivalence with hand-unrolled models ---------------------------------------------
def test_unfold_matches_unrolled_model():
    U = gm.Unfold(lg_kernel)
    tr = U.simulate(mx.random.key(4), unfold_args(4))
    ch = tr.choices
    lp_u, ret_u = U.assess(unfold_args(4), ch)
    lp_d, ret_d = unrolled.assess(unfold_args(4), ch)
    close(lp_u, lp_d, 1e-6)
    close(ret_u, ret_d, 1e-6)
    close(tr.retval, ret_d, 1e-6)
    # generate with the observations only: weight = Σ log p(y_t | x_t) for the same xs
    obs = gm.choicemap({(t, "y"): ch[t, "y"] for t in range(4)})
    tr_u, w_u = U.generate(mx.random.key(5), unfold_args(4), obs)
    cons = obs.merge(gm.choicemap({(t, "x"): tr_u[t, "x"] for t in range(4)}))
    _, w_full = unrolled.generate(mx.random.key(6), unfold_args(4), cons)
    x_part = sum(gm.normal(A * (tr_u[t - 1, "x"] if t else 0.0), Q).log_prob(tr_u[t, "x"]) for t in range(4))
    close(w_u, w_full - x_part, 1e-5)
    # update weights agree
    dtr, _ = unrolled.generate(mx.random.key(7), unfold_args(4), ch)
    new_c = gm.choicemap({(1, "x"): 0.3, (3, "y"): -1.0})
    _, wu, _, du = U.update(mx.random.key(8), tr, new_c)
    _, wd, _, dd = unrolled.update(mx.random.key(8), dtr, new_c)
    close(wu, wd, 1e-5)
    assert du == dd


def test_scan_matches_unrolled_model():
    S = gm.Scan(scan_kernel)
    args = (mx.array(0.2), mx.arange(4.0) / 3)
    tr = S.simulate(mx.random.key(9), args)
    lp_d, (c_d, ys_d) = unrolled_scan.assess(args, tr.choices)
    close(tr.score, lp_d, 1e-6)
    close(tr.retval[0], c_d, 1e-6)
    close(tr.retval[1], ys_d, 1e-6)
    dtr, _ = unrolled_scan.generate(mx.random.key(1), args, tr.choices)
    c = gm.choicemap({(2, "z"): 0.0})
    _, w1, _, _ = S.update(mx.random.key(2), tr, c)
    _, w2, _, _ = unrolled_scan.update(mx.random.key(2), dtr, c)
    close(w1, w2, 1e-5)


# -- prefix skipping -------------------------------------------------------------------
def test_extension_runs_kernel_once_unbatched_and_batched():
    U = gm.Unfold(lg_kernel)
    tr = U.simulate(mx.random.key(0), unfold_args(6))
    btr = U.vsimulate(mx.random.key(1), unfold_args(6), 8)
    for t0 in (tr, btr):
        COUNT[0] = 0
        new, w, rd, disc = U.update(mx.random.key(2), t0, gm.choicemap({(6, "y"): 0.5}),
                                    args=unfold_args(7), argdiffs=unfold_diffs())
        assert COUNT[0] == 1
        assert len(new.steps) == 7 and disc.is_empty()
        assert rd == gm.VectorDiff(changed=(6,))
        # weight = log p(y_6 | x_6), x_6 drawn from the prior
        close(w, gm.normal(new[6, "x"], R).log_prob(mx.array(0.5)), 1e-5)
        for t in range(6):  # the prefix is the very same sub-trace objects
            assert new.steps[t] is t0.steps[t]


def test_constraining_step_t0_reexecutes_nothing_before_it():
    U = gm.Unfold(lg_kernel)
    tr = U.simulate(mx.random.key(0), unfold_args(8))
    COUNT[0] = 0
    new, w, _, disc = U.update(mx.random.key(1), tr, gm.choicemap({(5, "x"): 0.1}))
    assert COUNT[0] == 3  # steps 5, 6, 7 (the state changed at 5)
    assert disc == gm.choicemap({(5, "x"): tr[5, "x"]})
    for t in range(5):
        assert new.steps[t] is tr.steps[t]


def test_particle_filter_loop_is_linear_in_T():
    U = gm.Unfold(lg_kernel)
    T = 15
    ys = mx.random.normal(shape=(T,), key=mx.random.key(3))
    btr, _ = U.vgenerate(mx.random.key(4), unfold_args(1), gm.choicemap({(0, "y"): ys[0]}), 16)
    COUNT[0] = 0
    keys = mx.random.split(mx.random.key(5), T)
    for t in range(1, T):
        btr, w, _, _ = U.update(keys[t], btr, gm.choicemap({(t, "y"): ys[t]}),
                                args=unfold_args(t + 1), argdiffs=unfold_diffs())
    assert COUNT[0] == T - 1  # O(T) kernel executions in total, not O(T^2)


def test_incremental_update_equals_full_reexecution():
    """Prefix skipping gives the same trace and weight as re-running every step."""
    U = gm.Unfold(lg_kernel)
    btr = U.vsimulate(mx.random.key(0), unfold_args(5), 6)
    c = gm.choicemap({(3, "x"): mx.linspace(-1, 1, 6), (5, "y"): 0.7})
    fast, w1, _, d1 = U.update(mx.random.key(1), btr, c, args=unfold_args(6), argdiffs=unfold_diffs())
    COUNT[0] = 0
    full, w2, _, d2 = U.update(mx.random.key(1), btr, c, args=unfold_args(6),
                               argdiffs=(gm.UnknownChange,) * 5)
    assert COUNT[0] == 6  # full re-execution visits every step
    close(w1, w2, 1e-5)
    close(fast.score, full.score, 1e-5)
    for (p, v), (q, u) in zip(fast.choices.leaves(), full.choices.leaves()):
        assert p == q
        close(v, u, 0)
    assert d1 == d2
    # and the new trace's score is the joint density of its choices
    for i in range(6):
        one = gm.unbatch(fast, i)
        close(one.score, U.assess(unfold_args(6), one.choices)[0], 1e-5)


def test_scan_extension_with_intdiff_runs_once():
    S = gm.Scan(gm.gen(lambda c, x: (lambda z: (z, z))(gm.normal(c + x, 1.0) @ "z")))
    calls = [0]

    @gm.gen
    def k(c, x):
        calls[0] += 1
        z = gm.normal(c + x, 1.0) @ "z"
        return z, z

    S = gm.Scan(k)
    tr = S.vsimulate(mx.random.key(0), (mx.array(0.0), mx.arange(5.0)), 4)
    calls[0] = 0
    new, w, _, _ = S.update(mx.random.key(1), tr, gm.choicemap({(5, "z"): 1.0}),
                            args=(mx.array(0.0), mx.arange(6.0)), argdiffs=(gm.NoChange, gm.IntDiff(1)))
    assert calls[0] == 1
    close(w, gm.normal(new.steps[4].retval[0] + 5.0, 1.0).log_prob(mx.array(1.0)), 1e-5)
    # a VectorDiff on one input re-runs from that step only
    calls[0] = 0
    xs = mx.arange(6.0) * mx.array([1, 1, 1, 1, 2, 1.0])
    _, w2, _, _ = S.update(mx.random.key(2), new, gm.ChoiceMap.empty(), args=(mx.array(0.0), xs),
                           argdiffs=(gm.NoChange, gm.VectorDiff(changed=(4,))))
    assert calls[0] == 2  # steps 4 and 5


# -- Kalman filter oracle ---------------------------------------------------------------
def kalman_loglik(ys, a, q, r):
    m, P, ll = 0.0, 0.0, 0.0  # state before step 0 is exactly 0
    for y in ys:
        m, P = a * m, a * a * P + q * q
        S = P + r * r
        ll += -0.5 * (math.log(2 * math.pi * S) + (y - m) ** 2 / S)
        K = P / S
        m, P = m + K * (y - m), (1 - K) * P
    return ll


def gaussian_posterior(ys, a, q, r):
    """Exact p(x_{0:T-1} | y) from the joint Gaussian (numpy, float64)."""
    T = len(ys)
    L = np.zeros((T, T))  # x = L e, e ~ N(0, q^2 I)
    for t in range(T):
        for s in range(t + 1):
            L[t, s] = a ** (t - s)
    Sx = q * q * L @ L.T
    Sy = Sx + r * r * np.eye(T)
    K = Sx @ np.linalg.inv(Sy)
    return K @ ys, Sx - K @ Sx


def test_unfold_joint_density_gives_exact_kalman_marginal():
    """log p(y) = log p(x, y) − log p(x | y) for any x: Unfold's assess vs Kalman."""
    T = 6
    ys = np.array([0.3, -0.5, 1.2, 0.8, -0.1, 0.4])
    mean, cov = gaussian_posterior(ys, A, Q, R)
    rng = np.random.default_rng(0)
    U = gm.Unfold(lg_kernel)
    for _ in range(3):
        x = rng.multivariate_normal(mean, cov)
        ch = gm.choicemap({**{(t, "x"): float(x[t]) for t in range(T)}, **{(t, "y"): float(ys[t]) for t in range(T)}})
        lp, _ = U.assess(unfold_args(T), ch)
        d = x - mean
        lpost = -0.5 * (T * math.log(2 * math.pi) + np.linalg.slogdet(cov)[1] + d @ np.linalg.solve(cov, d))
        assert abs(float(lp) - lpost - kalman_loglik(ys, A, Q, R)) < 2e-4


def test_unfold_importance_weights_estimate_kalman_loglik():
    """vgenerate with the observations constrained (prior proposal): log-mean-exp of
    the weights vs the exact Kalman log-likelihood, within 3.5 delta-method SEs."""
    T, n = 4, 20000
    ys = [0.3, -0.5, 1.2, 0.8]
    obs = gm.choicemap({(t, "y"): ys[t] for t in range(T)})
    _, w = gm.Unfold(lg_kernel).vgenerate(mx.random.key(11), unfold_args(T), obs, n)
    w = np.asarray(w, dtype=np.float64)
    W = np.exp(w - w.max())
    est = w.max() + math.log(W.mean())
    rel_se = W.std() / (W.mean() * math.sqrt(n))
    assert abs(est - kalman_loglik(ys, A, Q, R)) < 3.5 * rel_se + 1e-3


def test_particle_filter_by_extension_estimates_kalman_loglik():
    """A bootstrap particle filter written with Unfold extensions (resampling through
    tree_map on the batched trace): log Ẑ near the Kalman value."""
    T, n = 8, 3000
    ys = np.random.default_rng(1).normal(size=T)
    U = gm.Unfold(lg_kernel)
    key = mx.random.key(12)
    tr, w = U.vgenerate(key, unfold_args(1), gm.choicemap({(0, "y"): float(ys[0])}), n)
    logz = 0.0
    for t in range(1, T + 1):
        logz += float(mx.logsumexp(w)) - math.log(n)
        if t == T:
            break
        key, k1, k2 = mx.random.split(key, 3)
        idx = mx.random.categorical(w, shape=(n,), key=k1)
        leaves, td = gm.tree_flatten(tr)
        from dataclasses import replace
        tr = replace(gm.tree_unflatten(td, [x[idx] if x.ndim and x.shape[0] == n else x for x in leaves]),
                     batch_size=n)
        tr, w, _, _ = U.update(k2, tr, gm.choicemap({(t, "y"): float(ys[t])}),
                               args=unfold_args(t + 1), argdiffs=unfold_diffs())
    exact = kalman_loglik(ys, A, Q, R)
    # sd of this PF's log Ẑ: 0.022 (12 repeats with other seeds; mean within 0.005 of
    # the exact value); bound = 3.5 sd
    assert abs(logz - exact) < 3.5 * 0.022


# -- errors -----------------------------------------------------------------------------
def test_unfold_negative_length_error():
    with pytest.raises(ValueError, match="Unfold.*non-negative"):
        gm.Unfold(lg_kernel).simulate(mx.random.key(0), unfold_args(-1))


def test_unfold_constraint_beyond_length_error():
    with pytest.raises(gm.UnvisitedConstraintError, match="5"):
        gm.Unfold(lg_kernel).generate(mx.random.key(0), unfold_args(3), gm.choicemap({(5, "y"): 0.0}))


def test_scan_mismatched_xs_error():
    with pytest.raises(ValueError, match="Scan"):
        gm.Scan(scan_kernel).simulate(mx.random.key(0), (mx.array(0.0), (mx.zeros(3), mx.zeros(4))))


def test_zero_length_unfold():
    tr = gm.Unfold(lg_kernel).simulate(mx.random.key(0), unfold_args(0))
    assert tr.retval.shape == (0,) and float(tr.score) == 0.0 and tr.choices.is_empty()


def test_batched_extension_under_compile():
    """One particle-filter step (extend + observe) through gm.compile; keys are inputs,
    so two keys give different draws and the same key reproduces the eager result."""
    U = gm.Unfold(lg_kernel)
    btr = U.vsimulate(mx.random.key(0), unfold_args(3), 5)

    def step(key, tr, y):
        new, w, _, _ = U.update(key, tr, gm.choicemap({(3, "y"): y}), args=unfold_args(4),
                                argdiffs=unfold_diffs())
        return new, w

    c = gm.compile(step)
    new_c, w_c = c(mx.random.key(1), btr, mx.array(0.3))
    new_e, w_e = step(mx.random.key(1), btr, mx.array(0.3))
    close(w_c, w_e, 1e-5)
    close(new_c[3, "x"], new_e[3, "x"], 1e-5)
    _, w_c2 = c(mx.random.key(2), btr, mx.array(0.3))
    assert not np.allclose(np.asarray(w_c), np.asarray(w_c2))


def test_parameter_and_initial_state_changes():
    """A changed parameter re-weights every step; a changed initial carry re-runs from
    step 0: w = log p(τ; x') − log p(τ; x) with the same choices."""
    U = gm.Unfold(lg_kernel)
    tr = U.vsimulate(mx.random.key(0), unfold_args(4), 3)
    new_args = (4, mx.array(0.5), A, 0.9, R)
    COUNT[0] = 0
    new, w, _, disc = U.update(mx.random.key(1), tr, gm.ChoiceMap.empty(), args=new_args,
                               argdiffs=(gm.NoChange, gm.UnknownChange, gm.NoChange, gm.UnknownChange, gm.NoChange))
    assert COUNT[0] == 4 and disc.is_empty()
    for i in range(3):
        ch = gm.unbatch(tr, i).choices
        close(w[i], U.assess(new_args, ch)[0] - U.assess(unfold_args(4), ch)[0], 1e-5)
    S = gm.Scan(scan_kernel)
    st = S.simulate(mx.random.key(2), (mx.array(0.0), mx.arange(3.0)))
    new, w, rd, _ = S.update(mx.random.key(3), st, gm.ChoiceMap.empty(), args=(mx.array(1.0), mx.arange(3.0)),
                             argdiffs=(gm.UnknownChange, gm.NoChange))
    close(w, S.assess((mx.array(1.0), mx.arange(3.0)), st.choices)[0] - st.score, 1e-5)
    assert rd == gm.UnknownChange
    # regenerate one step of a batched Scan; weight = Δ density of the unselected rest
    bt = S.vsimulate(mx.random.key(4), (mx.array(0.0), mx.arange(3.0)), 4)
    sel = gm.select((1, "z"))
    nb, wb, _ = S.regenerate(mx.random.key(5), bt, sel)
    close(wb, (nb.score - S.project(nb, sel)) - (bt.score - S.project(bt, sel)), 1e-5)
