"""sbibm, amortize-then-refine: a NeuralIS mixture-density guide trained on a FIXED budget
of simulations, then importance resampling with the exact likelihood (and MH rejuvenation
where the guide is poor), scored by C2ST against the reference posterior samples.

Per (task, budget, seed):
  1. simulate ``budget`` pairs (θ, x) ~ p(θ) p(x | θ) once (the simulation budget);
  2. fit q_φ(θ | x) by maximizing Σ log q_φ(θᵢ | xᵢ) (NeuralIS / inclusive KL) with Adam,
     several epochs over those pairs, early stopping on a held-out 10% of them;
  3. for each observation x₀: pilot IS with 10⁴ guide proposals, w = p(θ, x₀) / q(θ | x₀);
     if PSIS k-hat ≤ 0.7 and ESS/n ≥ 0.1: importance resampling of 10⁴ draws from 10⁵
     proposals (the pilot reused) — "sir"; else (guide poor) adaptive tempered SMC from the
     guide, q^{1−β} p^β with β: 0 → 1, started from 2500 scored pilot draws, random-walk MH
     moves, the remaining budget spent at β = 1 and the last 4 sweeps kept — "smc"
     (config ``poor_guide_refinement = "mh"`` gives MH chains from SIR instead — "sir+mh").
     ≤ 10⁵ likelihood evaluations per observation either way, counted; 10⁴ posterior draws;
  4. C2ST (experiments/sbibm/c2st.py) against the 10⁴ reference draws.

    GENMLX_DATA=../shared/data PYTHONPATH=. /tmp/exp-venv/bin/python experiments/sbibm/run.py \\
        run --tasks two_moons --budgets 1000 10000 --observations 1 2 3 4 5 --seeds 0
    PYTHONPATH=. /tmp/exp-venv/bin/python experiments/sbibm/run.py report
"""

from __future__ import annotations

import argparse
import json
import math
import time
import tomllib
from pathlib import Path

import numpy as np

import genmlx as gm  # before mlx.core (fast BLAS)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from genmlx.harness.zoo.common import init_params
from genmlx.harness.zoo.sbibm import (TASKS, MixtureDensityNet, mixture_guide, reference_observations,
                                      sbibm_model)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS_DIR = HERE / "results"
NPE = {  # published C2ST of NPE (mean over 10 observations), sbibm paper
    "gaussian_linear": {1000: 0.694, 10000: 0.552, 100000: 0.506},
    "two_moons": {1000: 0.725, 10000: 0.606, 100000: 0.542},
    "slcp": {1000: 0.975, 10000: 0.901, 100000: 0.831},
}


def load_config() -> dict:
    cfg = tomllib.loads((HERE / "config.toml").read_text())
    for task in TASKS:
        arch = tomllib.loads((REPO / "experiments" / f"neural_is_{task}.toml").read_text())["model"]
        cfg.setdefault("guide", {})[task] = {k: arch[k] for k in ("guide_components", "guide_hidden", "activation")}
    return cfg


# ---------------------------------------------------------------- amortize (fixed budget)

def simulate(model, key, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n pairs (θ, x) from the model's joint: the whole simulation budget."""
    tr = model.vsimulate(key, (), n)
    th, x = tr["theta"], tr["x"]
    mx.eval(th, x)
    return np.asarray(th, dtype=np.float32), np.asarray(x, dtype=np.float32)


def mdn_log_q(net: MixtureDensityNet, theta: mx.array, x: mx.array) -> mx.array:
    """log q(θ | x) = logsumexp_c [log π_c(x) + Σ_d log N(θ_d; μ_cd(x), σ_cd(x)²)] (the
    density of ``mixture_guide(net)``), batched over rows."""
    logits, mu, sigma = net(x)
    z = (theta[:, None, :] - mu) / sigma
    comp = mx.sum(-0.5 * z * z - mx.log(sigma) - 0.5 * math.log(2 * math.pi), axis=-1)
    # not nn.log_softmax: MLX 0.32's shapeless-compiled log_softmax corrupts the heap when the
    # softmax axis has size 1 (one mixture component), giving NaN, hangs or aborts
    log_pi = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return mx.logsumexp(log_pi + comp, axis=-1)


def train_guide(task: str, theta: np.ndarray, x: np.ndarray, key, cfg: dict):
    """Fit the mixture-density guide to the fixed simulations; returns (net, info)."""
    tc, gc = cfg["train"], cfg["guide"][task]
    theta_dim, x_dim, _ = TASKS[task]
    n = len(theta)
    k_perm, k_init, k_loop = mx.random.split(key, 3)
    perm = np.asarray(mx.random.permutation(n, key=k_perm))
    n_val = max(int(round(tc["validation_fraction"] * n)), 1)
    val, trn = perm[:n_val], perm[n_val:]
    xs = x[trn].astype(np.float64)
    net = MixtureDensityNet(x_dim, theta_dim, gc["guide_components"], gc["guide_hidden"], gc["activation"],
                            xs.mean(0).astype(np.float32), (xs.std(0) + 1e-6).astype(np.float32))
    init_params(net, k_init)
    opt = optim.Adam(learning_rate=tc["lr"])
    th_t, x_t = mx.array(theta[trn]), mx.array(x[trn])
    th_v, x_v = mx.array(theta[val]), mx.array(x[val])

    def loss_fn(model, th, xx):
        return -mx.mean(mdn_log_q(model, th, xx))

    grad_fn = nn.value_and_grad(net, loss_fn)
    state = [net.state, opt.state]

    @mx.compile
    def step(th, xx):
        loss, g = grad_fn(net, th, xx)
        opt.update(net, g)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    val_loss = mx.compile(lambda th, xx: loss_fn(net, th, xx), inputs=state)
    B = min(tc["batch_size_by_budget"].get(str(n), tc["batch_size"]), len(trn))
    best, best_params, bad, steps, epoch = math.inf, None, 0, 0, 0
    t0 = time.time()
    history = []
    for epoch in range(1, tc["max_epochs"] + 1):
        k_loop, k_ep = mx.random.split(k_loop)
        order = mx.random.permutation(len(trn), key=k_ep)
        for i in range(0, len(trn) - B + 1, B):
            idx = order[i:i + B]
            mx.eval(step(th_t[idx], x_t[idx]), state)
            steps += 1
        v = float(val_loss(th_v, x_v))
        history.append(v)
        if v < best - 1e-6:
            best, bad = v, 0
            best_params = [(k, mx.array(np.array(a))) for k, a in tree_flatten(net.trainable_parameters())]  # a real copy
        else:
            bad += 1
        if bad >= tc["stop_after_epochs"] or steps >= tc["max_steps"]:
            break
    net.load_weights(best_params, strict=False)
    mx.eval(net.parameters())
    return net, {"epochs": epoch, "steps": steps, "best_valid_log_q": -best, "train_s": time.time() - t0,
                 "n_train": int(len(trn)), "n_valid": int(n_val), "batch_size": B}


# ---------------------------------------------------------------- refine (per observation)

@gm.gen
def rw_proposal(trace, scale):
    """Gaussian random walk on θ (symmetric, so the MH ratio is p(x, θ') / p(x, θ))."""
    gm.normal(trace["theta"], scale) @ "theta"


def _ess_frac(lw: np.ndarray) -> float:
    w = np.exp(lw - lw.max())
    return float(w.sum() ** 2 / np.sum(w * w) / len(w))


def _is(key, model, obs, guide, x0, n: int):
    res = gm.inference.importance_sampling(key, model, (), obs, n, proposal=guide, proposal_args=(x0,),
                                           chunk_size=10000)
    th = res.traces["theta"]
    mx.eval(th, res.log_weights)
    return np.asarray(th, dtype=np.float64), np.asarray(res.log_weights, dtype=np.float64)


def _log_joint(model, key, theta: np.ndarray, x0) -> np.ndarray:
    """log p(θᵢ, x0) for the rows of θ (one likelihood evaluation each): the weight of
    ``generate`` with every choice constrained."""
    cm = gm.choicemap({"theta": mx.array(theta.astype(np.float32)), "x": x0})
    _, w = model.vgenerate(key, (), cm, len(theta))
    return np.asarray(w, dtype=np.float64)


def _next_beta(beta: float, dl: np.ndarray, target: float) -> float:
    """Largest β' ∈ (β, 1] whose incremental weights (β' − β)·dl keep ESS/n ≥ target (bisection)."""
    def ess(b):
        lw = (b - beta) * dl
        return _ess_frac(np.where(np.isfinite(lw), lw, -np.inf)) if np.isfinite(lw).any() else 0.0
    if ess(1.0) >= target:
        return 1.0
    lo, hi = beta, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ess(mid) >= target else (lo, mid)
    return max(lo, beta + 1e-6)


def tempered_smc(key, model, net, x0, theta: np.ndarray, log_p: np.ndarray, rc: dict) -> tuple[np.ndarray, dict]:
    """Adaptive tempered SMC from the guide: targets π_β(θ) ∝ q(θ | x0)^{1−β} p(θ, x0)^β,
    β from 0 (the guide; particles = guide draws with their log p) to 1 (the posterior).
    Each stage picks β' so the incremental weights exp((β'−β)(log p − log q)) keep
    ESS/n ≥ ``smc_ess``, resamples, then applies ``smc_moves`` Gaussian random-walk MH
    moves targeting π_β' (per-dimension scale 2.38/√d × population sd, adapted towards
    acceptance 0.234). At β = 1 the remaining budget is spent on further moves and the
    last draws/N sweeps are the draws. Each move costs one likelihood evaluation per particle."""
    N, d = theta.shape
    keep = rc["draws"] // N
    budget = rc["max_likelihood_evals"] - rc["smc_init"]
    xs = mx.array(np.tile(np.asarray(x0), (N, 1)))  # contiguous (a stride-0 broadcast gave NaN here)
    lq = lambda th: np.asarray(mdn_log_q(net, mx.array(th.astype(np.float32)), xs), dtype=np.float64)  # noqa: E731
    log_q = lq(theta)
    keys = iter(mx.random.split(key, 4 * (budget // N + 2) + 2 * 1000))
    state = {"theta": theta, "log_p": log_p, "log_q": log_q, "factor": 1.0}
    accs, betas, forced = [], [0.0], False

    def move(beta):
        th, lp, lqq = state["theta"], state["log_p"], state["log_q"]
        scale = state["factor"] * 2.38 / math.sqrt(d) * (th.std(0) + 1e-12)
        prop = th + scale * np.asarray(mx.random.normal((N, d), key=next(keys)), dtype=np.float64)
        lp_new = _log_joint(model, next(keys), prop, x0)
        lq_new = lq(prop) if beta < 1.0 else lqq
        la = beta * (lp_new - lp) + ((1 - beta) * (lq_new - lqq) if beta < 1.0 else 0.0)
        la = np.where(np.isnan(la), -np.inf, la)
        u = np.log(np.asarray(mx.random.uniform(shape=(N,), key=next(keys)), dtype=np.float64))
        acc = u < la
        state.update(theta=np.where(acc[:, None], prop, th), log_p=np.where(acc, lp_new, lp),
                     log_q=np.where(acc, lq_new, lqq))
        accs.append(float(acc.mean()))
        state["factor"] *= math.exp(2.0 * (accs[-1] - 0.234))

    evals, beta = 0, 0.0
    while beta < 1.0:
        left = (budget - evals) // N
        dl = state["log_p"] - state["log_q"]
        if left < rc["smc_moves"] + keep:  # out of budget: jump to the posterior by reweighting
            nb, forced = 1.0, True
        else:
            nb = _next_beta(beta, dl, rc["smc_ess"])
        lw = (nb - beta) * dl
        lw = np.where(np.isnan(lw), -np.inf, lw)
        w = np.exp(lw - lw.max())
        idx = np.asarray(mx.random.categorical(mx.array(np.log(w / w.sum() + 1e-300).astype(np.float32)),
                                               num_samples=N, key=next(keys)))
        state.update(theta=state["theta"][idx], log_p=state["log_p"][idx], log_q=state["log_q"][idx])
        beta = nb
        betas.append(beta)
        if beta < 1.0:
            for _ in range(rc["smc_moves"]):
                move(beta)
                evals += N
    left = (budget - evals) // N
    out = []
    for r in range(left):
        move(1.0)
        evals += N
        if r >= left - keep:
            out.append(state["theta"].copy())
    return np.concatenate(out), {"smc_particles": N, "smc_stages": len(betas) - 1, "smc_betas": betas,
                                 "smc_forced_to_posterior": forced, "mh_accept": accs,
                                 "mh_accept_rw_mean": float(np.mean(accs)), "evals": evals}


def mh_population(key, model, guide, net, x0, obs, start: np.ndarray, rc: dict) -> tuple[np.ndarray, dict]:
    """C MH chains started at the resampled draws ``start`` [C, d]; sweeps cycle through
    ``rc["mh_kernels"]`` ("rw": Gaussian random walk, its per-dimension scale starting at
    2.38/sqrt(d) × the guide's mixture-averaged local sd at x0 and adapted between sweeps
    towards acceptance 0.234; "guide": the guide as independence proposal). The last
    draws/C sweeps of every chain are the draws. Each sweep costs C likelihood evaluations."""
    C, draws = len(start), rc["draws"]
    keep = draws // C
    budget = rc["max_likelihood_evals"] - rc["mh_proposals"]
    n_steps = budget // C
    if keep < 1 or n_steps < keep:
        raise ValueError(f"refine: mh_chains={C} cannot give {draws} draws within the MH budget {budget}")
    logits, mu, sigma = net(x0[None])
    pi = mx.softmax(logits[0], axis=-1)
    scale = (2.38 / math.sqrt(start.shape[1])) * mx.sum(pi[:, None] * sigma[0], axis=0)
    cm = gm.choicemap({"theta": mx.array(start.astype(np.float32)), "x": x0})
    traces, _ = model.vgenerate(key, (), cm, C)  # θ = the resampled draws
    kernels = rc["mh_kernels"]
    acc, out = [], []
    keys = mx.random.split(key, n_steps)
    for s in range(n_steps):
        kern = kernels[s % len(kernels)]
        if kern == "rw":
            traces, a = gm.inference.mh(keys[s], traces, rw_proposal, (scale,))
        else:
            traces, a = gm.inference.mh(keys[s], traces, gm.amortized.mh_proposal(guide), (x0,))
        mx.eval(a, traces["theta"])
        acc.append(float(mx.mean(a.astype(mx.float32))))
        if kern == "rw" and rc["rw_adapt"]:
            # population-level adaptation from the previous sweep only (as in adaptive SMC kernels)
            scale = scale * math.exp(4.0 * (acc[-1] - 0.234))
        if s >= n_steps - keep:
            out.append(np.asarray(traces["theta"], dtype=np.float64))
    acc_rw = [a for s, a in enumerate(acc) if kernels[s % len(kernels)] == "rw"]
    acc_g = [a for s, a in enumerate(acc) if kernels[s % len(kernels)] != "rw"]
    return np.concatenate(out), {"mh_chains": C, "mh_steps": n_steps, "mh_kept_sweeps": keep,
                                 "mh_accept_rw_mean": float(np.mean(acc_rw)) if acc_rw else None,
                                 "mh_accept_guide_mean": float(np.mean(acc_g)) if acc_g else None,
                                 "mh_accept": acc, "rw_scale": np.asarray(scale).tolist(),
                                 "evals": n_steps * C}


def refine(key, task: str, model, net, x_obs: np.ndarray, cfg: dict) -> tuple[np.ndarray, dict]:
    """Posterior draws for one observation (see the module docstring); ≤ max_likelihood_evals."""
    rc = cfg["refine"]
    guide = mixture_guide(net)
    x0 = mx.array(x_obs)
    obs = gm.choicemap({"x": x0})
    k_pilot, k_more, k_res, k_mh = mx.random.split(key, 4)
    t0 = time.time()
    th, lw = _is(k_pilot, model, obs, guide, x0, rc["pilot"])
    pilot_ess, pilot_khat = _ess_frac(lw), float(gm.diagnostics.psis_khat(lw))
    use_mh = not (pilot_khat <= rc["khat_max"] and pilot_ess >= rc["min_ess_fraction"])
    n_is = rc["mh_proposals"] if use_mh else rc["max_likelihood_evals"]
    if n_is > rc["pilot"]:  # same proposal: the pilot's particles are reused
        th2, lw2 = _is(k_more, model, obs, guide, x0, n_is - rc["pilot"])
        th, lw = np.concatenate([th, th2]), np.concatenate([lw, lw2])
    ess, khat = _ess_frac(lw), float(gm.diagnostics.psis_khat(lw))
    w = np.exp(lw - lw.max())
    w /= w.sum()
    C = rc["mh_chains"] if use_mh else rc["draws"]
    idx = np.asarray(mx.random.categorical(mx.array(np.log(w + 1e-300).astype(np.float32)),
                                           num_samples=C, key=k_res))
    draws = th[idx]
    info = {"method": "sir+mh" if use_mh else "sir", "pilot_ess_frac": pilot_ess, "pilot_khat": pilot_khat,
            "is_proposals": int(n_is), "ess_frac": ess, "ess": ess * n_is, "khat": khat,
            "log_ml": float(np.log(np.mean(np.exp(lw - lw.max()))) + lw.max()),
            "unique_frac_sir": float(len(np.unique(idx)) / len(idx))}
    evals = n_is
    if use_mh and rc["poor_guide_refinement"] == "smc":
        # tempered SMC from the guide: its first smc_particles pilot draws (already scored)
        N = rc["smc_particles"]
        lq0 = np.asarray(mdn_log_q(net, mx.array(th[:N].astype(np.float32)), mx.array(np.tile(x_obs, (N, 1)))),
                         dtype=np.float64)
        draws, minfo = tempered_smc(k_mh, model, net, x0, th[:N], lw[:N] + lq0, rc)
        info["method"] = "smc"
        evals += minfo.pop("evals")
        info.update(minfo)
    elif use_mh:
        draws, minfo = mh_population(k_mh, model, guide, net, x0, obs, draws, rc)
        evals += minfo.pop("evals")
        info.update(minfo)
    info.update({"likelihood_evals": int(evals), "refine_s": time.time() - t0})
    return draws, info


# ---------------------------------------------------------------- driver

def result_path(task: str, budget: int, seed: int) -> Path:
    return RESULTS_DIR / f"{task}_{budget}_seed{seed}.json"


def run_one(task: str, budget: int, seed: int, observations: list[int], cfg: dict, data_dir: str,
            n_folds: int) -> dict:
    from experiments.sbibm.c2st import c2st

    refs = reference_observations(task, data_dir)
    if not refs:
        raise FileNotFoundError(f"sbibm/{task}: no reference observations found (set GENMLX_DATA)")
    model = sbibm_model(task)
    key = mx.random.key(seed)
    k_sim, k_train, k_ref = mx.random.split(key, 3)
    t0 = time.time()
    theta, x = simulate(model, k_sim, budget)
    sim_s = time.time() - t0
    net, tinfo = train_guide(task, theta, x, k_train, cfg)
    print(f"[{task} {budget} seed {seed}] simulate {sim_s:.1f}s, train {tinfo['train_s']:.1f}s "
          f"({tinfo['epochs']} epochs, {tinfo['steps']} steps, valid log q {tinfo['best_valid_log_q']:.3f})", flush=True)
    out = {"task": task, "budget": budget, "seed": seed, "simulations": int(len(theta)), "simulate_s": sim_s,
           "train": tinfo, "c2st_folds": n_folds, "c2st_early_stopping": True, "observations": {}}
    old = result_path(task, budget, seed)
    if old.exists():  # observations from an earlier invocation (same seed: same simulations and guide)
        prev = json.loads(old.read_text())
        out["observations"] = {i: o for i, o in prev["observations"].items() if int(i) not in observations}
    obs_keys = mx.random.split(k_ref, max(observations))
    for i in observations:
        if i < 1 or i > len(refs):
            raise ValueError(f"--observations: {i} out of range 1..{len(refs)} for {task}")
        x_obs, ref = refs[i - 1]
        draws, info = refine(obs_keys[i - 1], task, model, net, x_obs, cfg)
        t1 = time.time()
        info["c2st"] = c2st(ref, draws, seed=seed + 1, n_folds=n_folds, early_stopping=True)
        info["c2st_s"] = time.time() - t1
        out["observations"][str(i)] = info
        out["observations"] = dict(sorted(out["observations"].items(), key=lambda kv: int(kv[0])))
        print(f"  obs {i}: {info['method']}, pilot ESS/n {info['pilot_ess_frac']:.3f}, k-hat {info['pilot_khat']:.2f}, "
              f"evals {info['likelihood_evals']}, C2ST {info['c2st']:.3f} ({info['refine_s']:.1f}s + C2ST {info['c2st_s']:.0f}s)",
              flush=True)
        _save(out)
    refine_s = sum(o["refine_s"] for o in out["observations"].values())
    out["wall_s_excl_c2st"] = sim_s + tinfo["train_s"] + refine_s
    out["mean_c2st"] = float(np.mean([o["c2st"] for o in out["observations"].values()]))
    _save(out)
    return out


def _save(out: dict) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result_path(out["task"], out["budget"], out["seed"]).write_text(json.dumps(out, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train + refine + C2ST; writes experiments/sbibm/results/*.json")
    r.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    r.add_argument("--budgets", nargs="+", type=int, default=[1000, 10000, 100000])
    r.add_argument("--observations", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    r.add_argument("--seeds", nargs="+", type=int, default=[0])
    r.add_argument("--folds", type=int, default=5, help="C2ST folds (the benchmark uses 5)")
    r.add_argument("--data-dir", default="")
    sub.add_parser("report", help="RESULTS.md sbibm section and the C2ST-vs-budget plot from the JSONs")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        cfg = load_config()
        for seed in a.seeds:
            for budget in a.budgets:
                for task in a.tasks:
                    run_one(task, budget, seed, a.observations, cfg, a.data_dir, a.folds)
    else:
        from experiments.sbibm.report import report
        report()


if __name__ == "__main__":
    main()
