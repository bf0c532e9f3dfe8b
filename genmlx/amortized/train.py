"""One compiled training step for any amortized objective.

``step(key, data)`` computes the objective's loss and its gradient with respect to
``objective.trainable()`` (model, guide and baseline parameters), applies one optimizer
update, applies the objective's running-state update, and returns the metrics with
``loss`` and ``grad_norm`` (global L2 norm of the gradient, before clipping). With
``compile=True`` the whole step is one ``mx.compile``d function whose declared state is
the parameter container and the optimizer state; randomness comes only from ``key``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from genmlx.amortized.objective import Objective


_NORM_CHUNK = 1 << 24  # elements per concatenated group: bounds the transient copy (64 MiB)


def global_norm(grads) -> mx.array:
    """‖g‖₂ = sqrt(Σ_leaves Σ g²), accumulated in float32.

    Leaves are flattened and concatenated into groups of at most ``_NORM_CHUNK``
    elements, each reduced by one product and one sum: a handful of kernels for the
    whole tree instead of two per leaf (on a GPU each is a launch; a small network's
    step is launch bound). A leaf larger than a group is reduced on its own. (Not a dot
    product v·v: one kernel fewer, but MLX's CUDA gemv gives a 1 × 1 output ONE warp,
    serial over all elements, and other shapes may take reduced-precision TF32 GEMMs.)"""
    leaves = [g.reshape(-1) if g.dtype == mx.float32 else g.reshape(-1).astype(mx.float32)
              for _, g in tree_flatten(grads)]
    if not leaves:
        return mx.array(0.0)
    groups, cur, size = [], [], 0
    for g in leaves:
        if cur and size + g.size > _NORM_CHUNK:
            groups.append(cur)
            cur, size = [], 0
        cur.append(g)
        size += g.size
    groups.append(cur)

    def sq(parts):
        v = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        return mx.sum(v * v)

    total = sq(groups[0])
    for p in groups[1:]:
        total = total + sq(p)
    return mx.sqrt(total)


def make_train_step(objective: Objective, optimizer: optim.Optimizer, *, compile: bool = True,
                    max_grad_norm: float | None = None,
                    grad_reduce: Callable[[dict], dict] | None = None) -> Callable[[mx.array, mx.array], dict]:
    """``step(key, data) -> metrics`` (dict of scalar arrays incl. ``loss``, ``grad_norm``).

    ``max_grad_norm`` (optional) rescales the gradient to at most that global norm.
    ``grad_reduce`` (optional) maps ``{"grads", "loss", "metrics", "aux"}`` to the same
    tree, once per step, before the norm and the update: data-parallel training passes
    :func:`genmlx.distributed.all_mean`, so every process applies the gradient of the
    mean loss over all shards (and averaged metrics / running-state updates) inside the
    compiled step."""
    params = objective.trainable()
    if not params.trainable_parameters() or not tree_flatten(params.trainable_parameters()):
        raise ValueError(f"{type(objective).__name__}: there are no trainable parameters "
                         "(no NeuralNetGF or module reachable from the model/guide)")
    optimizer.init(params.trainable_parameters())

    def loss_fn(key, data):
        loss, metrics, aux = objective._loss_aux(key, data)
        return loss, (metrics, aux)

    loss_and_grad = nn.value_and_grad(params, loss_fn)

    def step(key, data):
        (loss, (metrics, aux)), grads = loss_and_grad(key, data)
        if grad_reduce is not None:
            r = grad_reduce({"grads": grads, "loss": loss, "metrics": metrics, "aux": aux})
            grads, loss, metrics, aux = r["grads"], r["loss"], r["metrics"], r["aux"]
        gn = global_norm(grads)
        if max_grad_norm is not None:
            s = mx.minimum(1.0, max_grad_norm / (gn + 1e-12))
            grads = tree_map(lambda g: g * s, grads)
        optimizer.update(params, grads)
        objective.update_state(aux)
        out = dict(metrics)
        out["loss"] = loss
        out["grad_norm"] = gn
        return out

    if not compile:
        return step
    state = [params.state, optimizer.state]
    return partial(mx.compile, inputs=state, outputs=state)(step)
