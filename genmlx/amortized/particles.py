"""B data items × K particles as ONE batched computation, with batched base noise.

``batched_particles(fn, key, data, K)`` evaluates ``fn(k, x)`` (one particle of one
data item → array or tuple of arrays) for K particles of each of the B items; every
output gets shape [B, K, …]. It is ``mx.vmap`` over the items of ``mx.vmap`` over the
particles, with two savings over splitting keys inside the vmaps:

* particle keys are ``key + [1 + b·K + k, 0]`` (one add of a constant table; threefry
  keys act as stream ids, and the handlers vary the *second* word per site, so no
  particle/site pair shares a key) instead of a threefry split per level;
* the first generative function ``fn`` runs draws its reparameterizable sites
  (``_noise_kind``) from batched base noise (:class:`genmlx.core.handlers.BatchNoise`):
  N(0, 1)/U(0, 1) noise for all B·K particles from ONE sampler call per site kind
  and shape outside the vmaps, as a hand-batched program does. The sites are recorded
  on the first call (a plan keyed by B, K and the data's shapes); until then each
  particle gathers its row, with identical values. The noise keys are ``key + [0, c_s]``
  (the first noise site: ``key`` itself, no add), never a particle key (first word ≥ 1).

With ``particle_axis=False`` and K = 1 the outputs are [B, …] (for objectives whose
arithmetic does not need the particle axis): inserting the size-1 axis is a reshape,
which ``mx.compile`` does not fuse across, so every output would cost a kernel more.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from genmlx.core.handlers import BatchNoise, batch_noise_scope, planned_noise
from genmlx.core.pytree import tree_flatten
from genmlx.core.validation import under_transformation, vmap_level

_OFFSETS: dict[tuple, mx.array] = {}


def particle_offsets(B: int, K: int) -> mx.array:
    """The uint32 key offsets ``[1 + b·K + k, 0]``, shaped [B, K, 2] ([B, 2] when K = 1);
    cached constants."""
    c = _OFFSETS.get((B, K))
    if c is None:
        lead = (B,) if K == 1 else (B, K)
        first = mx.arange(1, B * K + 1, dtype=mx.uint32).reshape(*lead, 1)
        c = mx.concatenate([first, mx.zeros(lead + (1,), dtype=mx.uint32)], axis=-1)
        mx.eval(c)
        _OFFSETS[(B, K)] = c
    return c


class NoisePlans:
    """Recorded noise sites {site: (kind, shape)} per call signature (B, K, data shapes);
    the ``max_plans`` most recent signatures are kept."""

    max_plans = 64

    def __init__(self):
        self._plans: dict = {}

    def signature(self, B: int, K: int, data):
        leaves, td = tree_flatten(data)
        sig = (B, K, repr(td), tuple((tuple(x.shape), x.dtype) for x in leaves if isinstance(x, mx.array)))
        try:
            hash(sig)
        except TypeError:
            return None
        return sig

    def get(self, sig) -> dict | None:
        return None if sig is None else self._plans.get(sig)

    def record(self, sig, plan: dict) -> None:
        if sig is not None:
            self._plans.pop(sig, None)
            self._plans[sig] = dict(plan)
            if len(self._plans) > self.max_plans:  # drop the oldest signature
                self._plans.pop(next(iter(self._plans)))


def _planned_rows(key, plan: dict | None, B: int, K: int):
    """(sites, rows [B, K, *shape] — [B, *shape] when K = 1) of the recorded sites, drawn
    outside the vmaps."""
    sites, rows = planned_noise(key, plan, B * K)
    if K > 1:
        rows = [r.reshape((B, K) + r.shape[1:]) for r in rows]
    return sites, rows


def batched_particles(fn: Callable, key: mx.array, data, B: int, K: int, plans: NoisePlans,
                      particle_axis: bool = True):
    """``fn(k, x)`` for K particles of each of the B items of ``data``: outputs [B, K, …]
    (see the module docstring). With ``particle_axis=False`` and K = 1 they are [B, …]:
    no size-1 axis is inserted, since that reshape would stop ``mx.compile`` fusing the
    elementwise work on either side of it (an extra kernel per output)."""
    sig = plans.signature(B, K, data)
    had_plan = plans.get(sig) is not None
    keys = key + particle_offsets(B, K)
    idx = mx.arange(B * K) if K == 1 else mx.arange(B * K).reshape(B, K)
    n = B * K

    def run():
        sites, rows = _planned_rows(key, plans.get(sig), B, K)
        box: dict = {}

        def one(k, i, x, *r):
            bn = BatchNoise(key, i, n, {s: (spec, row) for (s, spec), row in zip(sites, r)})
            with batch_noise_scope(bn):
                out = fn(k, x)
            box["plan"] = bn.plan
            return out

        if K == 1:
            with vmap_level():
                out = mx.vmap(one)(keys, idx, data, *rows)
            if particle_axis:
                out = tuple(o[:, None] for o in out) if isinstance(out, tuple) else out[:, None]
        else:
            def per_item(k, i, x, *r):
                with vmap_level():
                    return mx.vmap(one, in_axes=(0, 0, None, *([0] * len(r))))(k, i, x, *r)

            with vmap_level():
                out = mx.vmap(per_item)(keys, idx, data, *rows)
        plans.record(sig, box.get("plan", {}))
        return out

    out = run()
    # first call under mx.compile / vmap: trace again with the planned noise inputs, so the
    # traced graph draws the noise once outside instead of gathering rows per particle
    if not had_plan and plans.get(sig) and under_transformation(key):
        out = run()
    return out
