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


def proposal_quality(key: mx.array, objective, x, K: int) -> dict:
    """ESS/N and PSIS k̂ of the guide as proposal on data ``x`` (K proposals each).

    When some data item has too few finite log-weights for PSIS (a fresh guide proposing
    mostly outside a bounded prior's support), k̂ is reported as +inf ("unreliable") and
    ESS/N is computed directly: (Σ w)² / (K Σ w²), 0 for an item with no finite weight."""
    import numpy as np

    import genmlx as gm

    try:
        d = gm.amortized.proposal_diagnostics(key, objective, x, K=K, chunk_size=K)
        return {"ess_per_n": d["ess_per_n"], "khat": d["khat"]}
    except ValueError:
        lw = gm.amortized.importance_log_weights(key, objective, x, K, chunk_size=K)
        ess = []
        for row in lw:
            f = row[np.isfinite(row)]
            if f.size == 0:
                ess.append(0.0)
                continue
            w = np.exp(f - f.max())
            ess.append(float(w.sum() ** 2 / (w * w).sum() / K))
        return {"ess_per_n": float(np.mean(ess)), "khat": float("inf")}
