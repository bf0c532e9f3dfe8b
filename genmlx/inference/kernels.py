"""MCMC kernels as values, and combinators over them.

A *kernel* is a callable ``kernel(key, trace) -> (trace, info)`` that leaves the
posterior of the trace's model invariant (``info`` is usually the accepted flag: a bool
scalar, or [n] for a batched trace of n chains). HMC/MALA kernels from
:mod:`genmlx.inference` plug in wherever a kernel is expected (SMC rejuvenation, the
combinators below, :func:`run_kernel`).

- ``cycle(k1, …, km)``: apply k1, then k2, …; info stacked to [m, …].
- ``mix(kernels, probs)``: per chain, apply kernel j with probability probs[j]
  (every kernel is computed and one result selected per chain by ``mx.where``, which
  keeps it one fixed-shape computation); info of the chosen kernel.
- ``repeat(k, r)``: apply k r times; info stacked to [r, …].
Each preserves the target when its components do.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import mlx.core as mx
from tqdm.auto import tqdm

from genmlx.core.indexing import row
from genmlx.core.pytree import tree_flatten
from genmlx.core.selection import Selection
from genmlx.core.trace import Trace
from genmlx.inference._util import where_trace

Kernel = Callable[[mx.array, Trace], tuple]


def as_kernel_output(out) -> tuple[Trace, Any]:
    """Normalize a kernel's output: a bare trace gets ``info = None``."""
    if isinstance(out, Trace):
        return out, None
    if isinstance(out, tuple) and out and isinstance(out[0], Trace):
        return out[0], (out[1] if len(out) > 1 else None)
    raise TypeError(f"a kernel must return a trace or (trace, info), got {type(out).__name__}")


def mh_kernel(selection_or_proposal, proposal_args: tuple | None = None) -> Kernel:
    """The :func:`genmlx.inference.mh` step as a kernel."""
    from genmlx.inference.mh import mh

    def kernel(key, trace):
        return mh(key, trace, selection_or_proposal, proposal_args)

    return kernel


def _stack_infos(infos):
    if any(i is None for i in infos):
        return None
    try:
        return mx.stack([mx.array(i) for i in infos])
    except (ValueError, TypeError):
        return infos


def cycle(*kernels: Kernel) -> Kernel:
    """Apply the kernels in order."""
    if not kernels:
        raise ValueError("cycle: give at least one kernel")

    def kernel(key, trace):
        infos = []
        for k, sub in zip(mx.random.split(key, len(kernels)), kernels):
            trace, info = as_kernel_output(sub(k, trace))
            infos.append(info)
        return trace, _stack_infos(infos)

    return kernel


def repeat(kernel: Kernel, times: int) -> Kernel:
    """Apply ``kernel`` ``times`` times."""
    if not isinstance(times, int) or times < 1:
        raise ValueError(f"repeat: times must be a positive int, got {times!r}")
    return cycle(*([kernel] * times))


def mix(kernels: Sequence[Kernel], probs: Sequence[float] | None = None) -> Kernel:
    """Random-scan mixture: each chain uses kernel j with probability ``probs[j]``."""
    kernels = list(kernels)
    if not kernels:
        raise ValueError("mix: give at least one kernel")
    p = mx.array(probs if probs is not None else [1.0 / len(kernels)] * len(kernels))
    if p.shape != (len(kernels),) or bool(mx.any(p < 0).item()) or abs(float(mx.sum(p).item()) - 1) > 1e-5:
        raise ValueError(f"mix: probs must be {len(kernels)} non-negative numbers summing to 1")
    logits = mx.log(p)

    def kernel(key, trace):
        kc, *ks = mx.random.split(key, len(kernels) + 1)
        shape = () if trace.batch_size is None else (trace.batch_size,)
        choice = mx.random.categorical(logits, shape=shape, key=kc)
        outs = [as_kernel_output(k(kk, trace)) for k, kk in zip(kernels, ks)]
        new, info = outs[0]
        for j, (t, inf) in enumerate(outs[1:], start=1):
            pick = choice == j
            new = where_trace(pick, t, new)
            if info is not None and inf is not None:
                info = mx.where(pick, inf, info)
        return new, info

    return kernel


def run_kernel(key: mx.array, trace: Trace, kernel: Kernel, num_steps: int, *,
               collect: Callable[[Trace], Any] | None = None, progress: bool = True,
               eval_every: int = 1) -> tuple[Trace, list]:
    """Apply ``kernel`` ``num_steps`` times. Returns the final trace and, per step, the
    value of ``collect(trace)`` (or the kernel's info when ``collect`` is None), each
    evaluated as it is produced (the graph stays bounded)."""
    history = []
    keys = mx.random.split(key, num_steps)
    for i in tqdm(range(num_steps), disable=not progress, desc="mcmc"):
        trace, info = as_kernel_output(kernel(row(keys, i), trace))
        rec = collect(trace) if collect is not None else info
        if (i + 1) % eval_every == 0:
            mx.eval(tree_flatten(trace)[0], tree_flatten(rec)[0])
        history.append(rec)
    return trace, history


def unconstrained_kernel(make_kernel: Callable, observed) -> Kernel:
    """Lift a kernel on flat unconstrained positions to a kernel on batched traces.

    ``make_kernel(density)`` receives the :class:`~genmlx.inference.unconstrained.UnconstrainedDensity`
    of the trace's model, arguments and observed choices and returns
    ``step(key, U [n, D]) -> (U, info)`` leaving that density invariant — e.g.
    ``lambda d: hmc_kernel(d, step_size=0.2, num_steps=5)``. It is rebuilt for each call,
    so it follows a growing model (SMC rejuvenation). ``observed`` selects the observed
    choices: a :class:`Selection` or a predicate on address paths. The latents must be
    real-valued (identity bijection: the trace's values are the positions); others raise
    an error naming the address.
    """
    from genmlx.core.choicemap import ChoiceMap
    from genmlx.inference.unconstrained import UnconstrainedDensity

    is_obs = observed.contains_path if isinstance(observed, Selection) else observed

    def kernel(key, traces):
        if traces.batch_size is None:
            raise ValueError("unconstrained_kernel: expects a batched trace (n particles or chains)")
        n = traces.batch_size
        ch = traces.choices
        obs = ChoiceMap.empty()
        for p, v in ch.leaves():
            if is_obs(p):
                obs = obs.set_submap(p, ChoiceMap.leaf(v[0]))
        density = UnconstrainedDensity(traces.gen_fn, traces.args, obs)
        cols = []
        for lat in density.latents:
            if tuple(lat.ushape) != tuple(lat.shape):
                raise ValueError(f"unconstrained_kernel: the latent at address {lat.name} is not "
                                 "real-valued (its unconstrained shape differs)")
            cols.append(ch.submap_at_path(lat.path).get_value().reshape(n, -1).astype(mx.float32))
        U = mx.concatenate(cols, axis=1)
        back = density.constrain(U)
        for lat in density.latents:
            x = ch.submap_at_path(lat.path).get_value()
            if not bool(mx.allclose(back[lat.path].astype(mx.float32), x.astype(mx.float32), atol=1e-5).item()):
                raise ValueError(f"unconstrained_kernel: the latent at address {lat.name} has a "
                                 "constrained support; only real-valued latents are supported")
        U2, info = make_kernel(density)(key, U)
        cons = ChoiceMap.empty()
        for path, v in density.constrain(U2).items():
            cons = cons.set_submap(path, ChoiceMap.leaf(v))
        new, _, _, _ = traces.gen_fn.update(key, traces, cons)
        return new, info

    return kernel
