"""The warm-up / sampling loop shared by HMC, MALA and NUTS, and their result object.

Chains advance together: every iteration is one batched kernel call on [C, D]
positions. During warm-up the step size follows dual averaging and the metric is
re-estimated at the end of each slow window (:mod:`genmlx.inference.adaptation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from genmlx.core.choicemap import ChoiceMap
from genmlx.core.indexing import row
from genmlx.inference.adaptation import (
    DualAveraging,
    adaptation_windows,
    estimate_metric,
    find_reasonable_step_size,
)
from genmlx.inference.metric import KINDS, Metric, identity_metric, metric_from_inverse
from genmlx.inference.hmc import joined
from genmlx.inference.unconstrained import UnconstrainedDensity, initial_positions, path_key


@dataclass
class MCMCResult:
    """Draws of every latent, ``samples[addr]`` shaped [chains, draws, *value_shape]
    (constrained values), plus sampler statistics, each [chains, draws]."""

    samples: dict
    unconstrained: np.ndarray  # [C, S, D]
    divergences: np.ndarray  # bool [C, S]
    accept_prob: np.ndarray
    num_steps: np.ndarray
    step_size: np.ndarray  # [C] after warm-up
    metric: Metric
    density: UnconstrainedDensity = field(repr=False)
    tree_depth: np.ndarray | None = None

    @property
    def num_divergences(self) -> int:
        return int(self.divergences.sum())

    @property
    def num_chains(self) -> int:
        return self.unconstrained.shape[0]

    @property
    def num_draws(self) -> int:
        return self.unconstrained.shape[1]

    def summary(self):
        """Per-element mean, sd, quantiles, MCSE, bulk/tail ESS and split-R̂."""
        from genmlx.diagnostics import summary

        return summary({_label(k): np.asarray(v) for k, v in self.samples.items()})

    def choicemap(self, chain: int, draw: int) -> ChoiceMap:
        """The latent choices of one draw."""
        cm = ChoiceMap.empty()
        for k, v in self.samples.items():
            path = k if isinstance(k, tuple) else (k,)
            cm = cm.set_submap(path, ChoiceMap.leaf(mx.array(v[chain, draw])))
        return cm


def _label(k) -> str:
    return k if isinstance(k, str) else str(k)


def _resolve_metric(mass, num_chains, dim, adapt_mass):
    if isinstance(mass, str):
        if mass not in KINDS:
            raise ValueError(f"mass must be one of {KINDS} or an inverse mass matrix array, got {mass!r}")
        adapt = (mass != "identity") if adapt_mass is None else adapt_mass
        return identity_metric(num_chains, dim, mass), adapt, mass
    m = metric_from_inverse(mass, num_chains, dim)
    return m, bool(adapt_mass), m.kind


def _stack_positions(density: UnconstrainedDensity, states: list) -> np.ndarray:
    """Positions [C, n, D] (numpy) from a list of n position arrays [C, D] or block tuples
    (each block [C, *ushape]; stacked per block, then joined once)."""
    if not states or not isinstance(states[0], tuple):
        return np.stack([np.array(b) for b in states], axis=1)
    c, n = states[0][0].shape[0], len(states)
    cols = [np.array(mx.stack([s[i] for s in states], axis=1)).reshape(c, n, -1)
            for i in range(len(states[0]))]
    return np.concatenate(cols, axis=2)


def _work_elements(density: UnconstrainedDensity, num_chains: int) -> int:
    """Elements of the model's array arguments and observations times the chains: the
    size of a gradient's largest products, for the BLAS thread policy."""
    from genmlx.core.pytree import tree_flatten

    leaves, _ = tree_flatten((tuple(density.args), density.observations))
    n = sum(int(np.prod(np.shape(x))) for x in leaves if hasattr(x, "shape"))
    return max(n, density.dim) * num_chains


def run_mcmc(kernel, density: UnconstrainedDensity, key, **kw) -> MCMCResult:
    """The chains' loop (:func:`_run`), with OpenBLAS on one thread when the model's
    data are small and the computation runs on the CPU (``genmlx._blas.blas_threads_for``:
    tiny matrix-vector products are slower when handed to worker threads;
    ``GENMLX_SMALL_BLAS_THREADS`` changes or disables this)."""
    from genmlx._blas import blas_threads_for

    c = kw.get("num_chains")
    cpu = mx.default_device() == mx.cpu
    with blas_threads_for(_work_elements(density, c if isinstance(c, int) and c > 0 else 1), cpu=cpu):
        return _run(kernel, density, key, **kw)


def _run(kernel, density: UnconstrainedDensity, key, *, num_samples: int, num_warmup: int,
         num_chains: int, step_size, mass, adapt_step_size: bool, adapt_mass, target_accept: float,
         init, progress: bool, desc: str, thin: int = 1) -> MCMCResult:
    for name, v in (("num_samples", num_samples), ("num_chains", num_chains)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{desc}: {name} must be a positive int, got {v!r}")
    if not isinstance(num_warmup, int) or num_warmup < 0:
        raise ValueError(f"{desc}: num_warmup must be a non-negative int, got {num_warmup!r}")
    if not 0.0 < target_accept < 1.0:
        raise ValueError(f"{desc}: target_accept must be in (0, 1), got {target_accept}")
    c, d = num_chains, density.dim
    metric, adapt_mass, kind = _resolve_metric(mass, c, d, adapt_mass)
    key, k_init, k_eps = mx.random.split(key, 3)
    u0 = initial_positions(density, k_init, c, init)
    # diagonal metrics: a kernel that can keeps u and ∇ in the density's blocks throughout
    blocks = getattr(kernel, "block_form", False) and not metric.dense
    state = kernel.init_blocks(u0) if blocks else kernel.init(u0)
    if step_size is None:
        js = joined(density, state)
        eps = find_reasonable_step_size(k_eps, density, js.u, js.lp, js.grad, metric, mx.ones((c,)))
    else:
        if not float(step_size) > 0:
            raise ValueError(f"{desc}: step_size must be positive, got {step_size}")
        eps = mx.full((c,), float(step_size))
    adapting = adapt_step_size and num_warmup > 0
    da = DualAveraging.start(eps, target_accept) if adapting else None
    windows = adaptation_windows(num_warmup) if adapt_mass else []
    win_end = {e: s for s, e in windows}
    win_of = {i: True for s, e in windows for i in range(s, e)}
    buf: list = []

    draws, accs, divs, steps, depths = [], [], [], [], []
    total = num_warmup + num_samples * thin
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, leave=False)
    keys = mx.random.split(key, total)
    for i in range(total):
        warm = i < num_warmup
        cur = da.step_size if (warm and da is not None) else eps
        state, info = kernel.step(row(keys, i), state, cur, metric)
        if warm:
            if da is not None:
                da.update(info.accept_prob)
            if i in win_of:
                buf.append(state.u)
            if (i + 1) in win_end:
                metric = estimate_metric(_stack_positions(density, buf), kind)
                buf = []
                key, k = mx.random.split(key)
                base = da.step_size if da is not None else eps
                js = joined(density, state)
                eps = find_reasonable_step_size(k, density, js.u, js.lp, js.grad, metric, base)
                if da is not None:
                    da = DualAveraging.start(eps, target_accept)
            if i + 1 == num_warmup and da is not None:
                eps = da.final_step_size
            mx.eval(state, info.accept_prob, *([da.log_eps_bar] if da is not None else []))
        elif (i - num_warmup) % thin == thin - 1:
            draws.append(state.u)
            accs.append(info.accept_prob)
            divs.append(info.diverging)
            steps.append(info.num_steps)
            depths.append(info.accepted)
            mx.eval(state, info)
        else:
            mx.eval(state)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    U = mx.array(_stack_positions(density, draws)) if blocks else mx.stack(draws, axis=1)  # [C, S, D]
    vals = density.constrain(U)
    samples = {path_key(p): np.array(v) for p, v in vals.items()}

    def st(xs, dt=None):
        a = np.array(mx.stack(xs, axis=1))
        return a.astype(dt) if dt else a

    return MCMCResult(samples=samples, unconstrained=np.array(U), divergences=st(divs, bool),
                      accept_prob=st(accs), num_steps=st(steps), step_size=np.array(eps),
                      metric=metric, density=density,
                      tree_depth=st(depths) if desc == "nuts" else None)
