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
from mlx.utils import tree_flatten, tree_map

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
class StateSnapshots:
    """Snapshots of a module's arrays and an optimizer's state, taken before every step
    (for the rollback of a non-finite step, or of a step dispatched ahead of a stop).

    The slots — (container, key) of every array in ``module.state`` and
    ``optimizer.state`` — are found once; a snapshot is then the list of their current
    arrays (arrays are immutable: nothing is copied) and a restore writes them back in
    place, so compiled steps that declared these containers as state keep seeing them.
    This is ~µs per step where rebuilding ``module.parameters()`` and mapping the
    optimizer tree cost ~0.1–0.3 ms of host time per step (on a GPU, a launch-bound step
    is ~3 ms). Should a container's structure change after the slots were found (an
    optimizer adding state lazily), the snapshot sees a different slot count and the
    slots are found again."""

    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer
        self._slots = self._find()

    def _find(self) -> list:
        slots: list = []

        def walk(node):
            if isinstance(node, dict):
                items = list(node.items())
            elif isinstance(node, list):
                items = list(enumerate(node))
            elif isinstance(node, tuple):
                raise _Immutable
            else:
                return
            for k, v in items:
                if isinstance(v, mx.array):
                    slots.append((node, k))
                else:
                    walk(v)

        try:
            walk(self.module.state)
            walk(self.optimizer.state)
        except _Immutable:
            return None  # a tuple somewhere: fall back to whole-tree snapshots
        return slots

    def _count(self) -> int:
        n = 0
        for _, leaf in tree_flatten([self.module.state, self.optimizer.state]):
            n += isinstance(leaf, mx.array)
        return n

    def take(self):
        if self._slots is None:
            return ("tree", self.module.parameters(), tree_map(lambda x: x, self.optimizer.state))
        return ("slots", self._slots, [c[k] for c, k in self._slots])

    def restore(self, snap) -> None:
        if snap[0] == "tree":
            _, params, ostate = snap
            self.module.update(params)
            self.optimizer.state.clear()
            self.optimizer.state.update(ostate)
            return
        _, slots, values = snap
        for (c, k), v in zip(slots, values):
            c[k] = v

    def check(self) -> None:
        """Find the slots again if the number of arrays changed (cheap enough for rare calls,
        e.g. after the first step)."""
        if self._slots is not None and self._count() != len(self._slots):
            self._slots = self._find()


class _Immutable(Exception):
    pass
