"""Helpers shared by the model definitions of the zoo."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


def init_params(module: nn.Module, key: mx.array) -> nn.Module:
    """Re-initialise every parameter of ``module`` from an explicit key (never the global
    RNG): arrays named ``weight`` [out, in] and their ``bias`` get
    U(−1/√in, 1/√in) (MLX's default Linear initialisation); other arrays keep their values."""
    flat = tree_flatten(module.parameters())
    keys = mx.random.split(key, max(len(flat), 1))
    fan = {}
    for name, a in flat:
        if name.endswith("weight") and a.ndim == 2:
            fan[name[: -len("weight")]] = a.shape[1]
    out = []
    for (name, a), k in zip(flat, keys):
        stem = name.rsplit(".", 1)[0] + "." if "." in name else ""
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("weight", "bias") and stem in fan:
            s = 1.0 / math.sqrt(fan[stem])
            out.append((name, mx.random.uniform(-s, s, a.shape, key=k)))
        else:
            out.append((name, a))
    module.update(tree_unflatten(out))
    mx.eval(module.parameters())
    return module
