"""Per-step pieces of the training loop: keys, optimizers, the train step, rollback.

Keys are a pure function of ``(seed, step)`` (SplitMix64 of the pair seeds
``mx.random.key``), so a resumed run draws exactly the keys an uninterrupted run would.
"""

from __future__ import annotations

import math
import warnings

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from genmlx.amortized.train import global_norm

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def step_key(seed: int, step: int, salt: int = 0) -> mx.array:
    """The PRNG key of optimizer step ``step`` (``salt`` separates other streams, such as
    validation): a pure function of its arguments."""
    return mx.random.key(_splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ salt))


# -- optimizers and schedules -------------------------------------------------------------------
def learning_rate(cfg_optim, steps_per_epoch: int):
    """The learning rate, a constant or a schedule ``step -> lr`` (an mx function).

    - exponential: lr·rate^(step/decay_steps)
    - cosine: cosine decay to 0 over decay_steps
    - iwae (Burda et al.): pass p runs at lr·10^(−i/7) for stage i = ⌊log₃(2p+1)⌋, i.e.
      stage i lasts 3^i passes over the data.
    """
    c = cfg_optim
    if c.schedule == "constant":
        return c.lr
    if c.schedule == "exponential":
        return optim.exponential_decay(c.lr, c.decay_rate ** (1.0 / c.decay_steps))
    if c.schedule == "cosine":
        return optim.cosine_decay(c.lr, c.decay_steps)
    if c.schedule == "iwae":
        nb, log3, lr0 = float(steps_per_epoch), math.log(3.0), c.lr

        def iwae(step):
            p = mx.floor(step.astype(mx.float32) / nb)
            stage = mx.floor(mx.log(2.0 * p + 1.0) / log3 + 1e-4)
            return lr0 * mx.power(10.0, -stage / 7.0)

        return iwae
    raise ValueError(f"optim.schedule: unknown schedule {c.schedule!r}")


def build_optimizer(cfg_optim, steps_per_epoch: int = 1):
    c = cfg_optim
    lr = learning_rate(c, steps_per_epoch)
    if c.name == "adam":
        return optim.Adam(lr, betas=list(c.betas), eps=c.eps)
    if c.name == "adamw":
        return optim.AdamW(lr, betas=list(c.betas), eps=c.eps, weight_decay=c.weight_decay)
    if c.name == "sgd":
        return optim.SGD(lr, momentum=c.momentum, weight_decay=c.weight_decay)
    raise ValueError(f"optim.name: unknown optimizer {c.name!r}")


# -- the step ----------------------------------------------------------------------------------------
def local_train_step(objective, optimizer, compile: bool = True, grad_reduce=None):
    """``step(key, data) -> metrics`` (loss, grad_norm, objective metrics): one gradient
    step of the objective on all parameters of ``objective.trainable()``, then the
    objective's running-state update (``_loss_aux``/``update_state`` when it has them).
    ``grad_reduce`` maps ``{"grads", "loss", "metrics", "aux"}`` to the same tree inside
    the step (data-parallel: :func:`genmlx.distributed.all_mean`, one all-reduce).

    The compiled function returns ONE stacked array of the scalar metrics, unpacked
    outside: MLX 0.32.4's compiler fails (``IndexError: _Map_base::at``) on a
    value_and_grad whose outputs include both the loss and a stop_gradient'ed
    function of it (IWAE's ``loss`` and ``bound``)."""
    module = objective.trainable()
    has_aux = hasattr(objective, "_loss_aux")

    def loss_fn(key, data):
        if has_aux:
            loss, metrics, aux = objective._loss_aux(key, data)
        else:
            (loss, metrics), aux = objective.loss(key, data), None
        return loss, (metrics, aux)

    vg = nn.value_and_grad(module, loss_fn)
    names: list = []

    def step(key, data):
        (loss, (metrics, aux)), grads = vg(key, data)
        if grad_reduce is not None:
            r = grad_reduce({"grads": grads, "loss": loss, "metrics": metrics, "aux": aux})
            grads, loss, metrics, aux = r["grads"], r["loss"], r["metrics"], r["aux"]
        gn = global_norm(grads)
        optimizer.update(module, grads)
        if aux:
            objective.update_state(aux)
        names[:] = [k for k in sorted(metrics) if k not in ("loss", "grad_norm") and metrics[k].size == 1]
        return mx.stack([loss.reshape(()), gn] + [metrics[k].reshape(()).astype(mx.float32) for k in names])

    if compile:
        state = [module.state, optimizer.state]
        step = mx.compile(step, inputs=state, outputs=state)

    def unpacked(key, data):
        v = step(key, data)
        out = {"loss": v[0], "grad_norm": v[1]}
        out.update({k: v[i + 2] for i, k in enumerate(names)})
        return out

    return unpacked


def make_train_step(objective, optimizer, compile: bool = True, grad_reduce=None):
    """``gm.amortized.make_train_step`` for amortized objectives, falling back to
    :func:`local_train_step` when it is unavailable or its compiled form fails to build
    (the failure happens while tracing, before any state changes). ``grad_reduce``: see
    :func:`local_train_step` (None on one process)."""
    if getattr(objective, "harness_local", False):
        return local_train_step(objective, optimizer, compile, grad_reduce)
    try:
        from genmlx.amortized import make_train_step as mts
    except ImportError:
        return local_train_step(objective, optimizer, compile, grad_reduce)
    kw = {"grad_reduce": grad_reduce} if grad_reduce is not None else {}
    box = {"fn": mts(objective, optimizer, compile=compile, **kw), "fallback": False}

    def step(key, data):
        try:
            return box["fn"](key, data)
        except IndexError as e:
            if box["fallback"]:
                raise
            warnings.warn(f"gm.amortized.make_train_step failed to compile ({e}); using the harness's "
                          "packed-metrics step instead", RuntimeWarning, stacklevel=2)
            box["fn"], box["fallback"] = local_train_step(objective, optimizer, compile, grad_reduce), True
            return box["fn"](key, data)

    return step


# -- rollback of a bad step ------------------------------------------------------------------------
def snapshot(module, optimizer):
    """References to the current parameters and optimizer state (arrays are immutable,
    so this copies nothing)."""
    return module.parameters(), tree_map(lambda x: x, optimizer.state)


def rollback(module, optimizer, snap) -> None:
    """Put back a :func:`snapshot` (in place, so compiled steps keep seeing the state)."""
    params, ostate = snap
    module.update(params)
    optimizer.state.clear()
    optimizer.state.update(ostate)
