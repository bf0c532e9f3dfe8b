"""Exact inference by enumeration for models whose latent choices are finite and discrete.

Every joint configuration x of the latent (unobserved) choices is scored at once:
with all latents and observations y constrained, the model's ``generate`` weight is
log p(x, y). Then

    log p(y) = logsumexp_x log p(x, y),      p(x | y) = exp(log p(x, y) − log p(y)).

The configurations form one batched (vmapped) computation, in chunks for large grids.
Supports are read from each distribution's ``support`` (booleans, integer intervals)
for choices made directly by ``@gm.gen`` functions (nested ones included), or given
explicitly with ``support={address: values}``. The set of latent addresses must not
depend on the latents' values.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import mlx.core as mx
import numpy as np

from genmlx.core.address import from_path, to_path
from genmlx.core.choicemap import ChoiceMap
from genmlx.core.dynamic import DynamicGF, _as_choicemap
from genmlx.core.errors import GenMLXError, format_address
from genmlx.core.gfi import GenerativeFunction
from genmlx.core.handlers import Handler, run_with_handler
from genmlx.core.trace import Trace
from genmlx.inference._util import choice_paths, concat_particles, covered
from genmlx.distributions.base import Distribution


class NotEnumerableError(GenMLXError, ValueError):
    """A latent choice has no finite discrete support known to the enumerator."""


class _Record:
    __slots__ = ("score", "retval")

    def __init__(self, score, retval):
        self.score, self.retval = score, retval


class _SupportHandler(Handler):
    """Simulates the model, recording the distribution object behind each choice."""

    def __init__(self, fn_name, key, prefix=(), found=None):
        super().__init__(fn_name, key)
        self.prefix = prefix
        self.found = {} if found is None else found

    def step(self, path, gen_fn, args):
        full = self.prefix + path
        if isinstance(gen_fn, Distribution):
            self.found[full] = gen_fn
            return gen_fn.simulate(self.next_key())
        if isinstance(gen_fn, DynamicGF):
            h = _SupportHandler(gen_fn.name, self.next_key(), full, self.found)
            retval = run_with_handler(h, gen_fn.fn, tuple(args))
            return _Record(h.score, retval)
        return gen_fn.simulate(self.next_key(), args)


def _scalar_int(x, path) -> int:
    a = np.asarray(x)
    if a.size != 1 and not np.all(a == a.flat[0]):
        raise NotEnumerableError(
            f"at address {format_address(path)}: the support bounds differ across the "
            "choice's elements; pass support={address: values}"
        )
    return int(a.flat[0])


def _support_values(dist: Distribution, path) -> list:
    sup = dist.support
    if not getattr(sup, "discrete", False):
        raise NotEnumerableError(
            f"at address {format_address(path)}: {dist.name} is not discrete, so this latent "
            "cannot be enumerated (observe it, or use another inference method)"
        )
    kind = type(sup).__name__
    if kind == "_Boolean":
        return [False, True]
    if hasattr(sup, "lower") and hasattr(sup, "upper"):
        lo, hi = _scalar_int(sup.lower, path), _scalar_int(sup.upper, path)
        return list(range(lo, hi + 1))
    raise NotEnumerableError(
        f"at address {format_address(path)}: the support {sup!r} of {dist.name} is not finite; "
        "pass support={address: values} to enumerate a truncated range"
    )


@dataclass(frozen=True)
class EnumerationResult:
    """All K latent configurations: ``choices[addr]`` ([K, *shape]), ``log_joint`` [K]
    (log p(x, y)), ``traces`` (batched, K), ``log_marginal_likelihood`` (log p(y)) and
    ``probs`` [K] (p(x | y))."""

    addresses: tuple
    choices: dict
    log_joint: mx.array
    traces: Trace | None

    @property
    def log_marginal_likelihood(self) -> mx.array:
        return mx.logsumexp(self.log_joint)

    @property
    def log_posterior(self) -> mx.array:
        return self.log_joint - self.log_marginal_likelihood

    @property
    def probs(self) -> mx.array:
        return mx.exp(self.log_posterior)

    def table(self) -> list[tuple[dict, float]]:
        """[(configuration {address: value}, posterior probability)], most probable first."""
        p = np.asarray(self.probs)
        vals = {a: np.asarray(v) for a, v in self.choices.items()}
        rows = [({from_path(a): vals[a][k].tolist() for a in self.addresses}, float(p[k])) for k in range(len(p))]
        return sorted(rows, key=lambda r: -r[1])

    def marginal(self, addr) -> dict:
        """Posterior marginal {value: probability} of the choice at ``addr``."""
        path = to_path(addr)
        if path not in self.choices:
            raise KeyError(f"no enumerated latent at address {format_address(path)}")
        p = np.asarray(self.probs)
        vals = np.asarray(self.choices[path])
        out: dict = {}
        for k in range(len(p)):
            v = vals[k]
            key = v.item() if v.ndim == 0 else tuple(v.reshape(-1).tolist())
            out[key] = out.get(key, 0.0) + float(p[k])
        return out

    def expectation(self, addr) -> mx.array:
        """Posterior mean of the choice at ``addr``."""
        v = self.choices[to_path(addr)].astype(mx.float32)
        w = self.probs.reshape((-1,) + (1,) * (v.ndim - 1))
        return mx.sum(w * v, axis=0)


def enumerate_posterior(model: GenerativeFunction, args: tuple, observations=None, *,
                        support: Mapping[Any, Sequence] | None = None,
                        max_configurations: int = 1_000_000, chunk_size: int = 65536,
                        keep_traces: bool = True, key: mx.array | None = None) -> EnumerationResult:
    """Exact posterior over the model's discrete latents given ``observations``.

    ``support`` overrides or supplies the values of a latent: ``{address: [v1, v2, …]}``
    (for an array-valued choice, each value is a full array, or a scalar value set that
    is enumerated elementwise).
    """
    key = mx.random.key(0) if key is None else key
    args = tuple(args)
    observations = _as_choicemap(observations)
    user = {to_path(a): list(v) for a, v in (support or {}).items()}
    h = _SupportHandler(getattr(model, "name", "model"), key)
    if isinstance(model, DynamicGF):
        run_with_handler(h, model.fn, args)
    tr = model.simulate(key, args)
    obs_paths = choice_paths(observations)
    latents = [(p, v) for p, v in tr.choices.leaves() if not covered(p, obs_paths)]
    unknown = [p for p in user if p not in [q for q, _ in latents]]
    if unknown:
        raise NotEnumerableError(
            "support was given for address(es) that are not latent choices of the model: "
            + ", ".join(format_address(p) for p in unknown)
        )
    axes = []  # (path, list of full values)
    for path, v in latents:
        shape = tuple(v.shape)
        if path in user:
            vals = user[path]
            if vals and np.asarray(vals[0]).shape == shape:
                axes.append((path, [np.asarray(x) for x in vals], v.dtype))
                continue
            elem = vals
        elif path in h.found:
            elem = _support_values(h.found[path], path)
        else:
            raise NotEnumerableError(
                f"at address {format_address(path)}: the support of this choice is unknown "
                "(made inside a non-@gm.gen generative function); pass support={address: values}"
            )
        size = int(np.prod(shape)) if shape else 1
        if len(elem) ** size > max_configurations:
            raise NotEnumerableError(
                f"at address {format_address(path)}: {len(elem)}^{size} values exceed "
                f"max_configurations={max_configurations}"
            )
        full = [np.asarray(c).reshape(shape) for c in itertools.product(elem, repeat=size)]
        axes.append((path, full, v.dtype))
    K = math.prod(len(vals) for _, vals, _ in axes) if axes else 1
    if K > max_configurations:
        raise NotEnumerableError(
            f"the latents have {K} joint configurations, more than max_configurations="
            f"{max_configurations}"
        )
    grids = np.meshgrid(*[np.arange(len(vals)) for _, vals, _ in axes], indexing="ij")
    flat_idx = [g.reshape(-1) for g in grids]
    choices = {}
    for (path, vals, dtype), idx in zip(axes, flat_idx):
        table = np.stack(vals)
        choices[path] = mx.array(table[idx]).astype(dtype)
    lj, trs = [], []
    for start in range(0, K, chunk_size):
        stop = min(K, start + chunk_size)
        cons = observations
        for path, arr in choices.items():
            cons = cons.set_submap(path, ChoiceMap.leaf(arr[start:stop]))
        btr, w = model.vgenerate(key, args, cons, stop - start)
        mx.eval(w)
        lj.append(w)
        if keep_traces:
            trs.append(btr)
    log_joint = lj[0] if len(lj) == 1 else mx.concatenate(lj)
    traces = None if not keep_traces else (trs[0] if len(trs) == 1 else concat_particles(trs))
    return EnumerationResult(tuple(p for p, _, _ in axes), choices, log_joint, traces)
