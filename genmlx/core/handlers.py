"""The handler stack behind ``gm.trace``, and one small handler per GFI operation.

Running a dynamic GF's body pushes a handler; every ``gm.trace(addr, invocation)``
inside it is passed to the innermost handler's ``visit``, which calls the callee's own
GFI operation (a distribution's or a sub-GF's) and records the resulting sub-trace at
the address. The handler is popped in ``finally``, so an exception never leaves a stale
handler behind.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import mlx.core as mx
import numpy as np

from genmlx.core.address import Path, to_path
from genmlx.core.choicemap import ChoiceMap
from genmlx.core.diff import default_argdiffs
from genmlx.core.errors import (
    AddressCollisionError,
    AddressedError,
    TraceContextError,
    UnvisitedConstraintError,
)
from genmlx.core.selection import Selection

_local = threading.local()


def _stack() -> list:
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = []
    return s


def trace(addr, invocation) -> Any:
    """Make a random choice or call a GF at ``addr`` and return its value.

    ``invocation`` is a distribution with its parameters (``gm.normal(0, 1)``) or a GF
    applied to arguments (``submodel(a, b)``). Only valid inside a GF's execution.
    """
    stack = _stack()
    if not stack:
        raise TraceContextError(
            f"gm.trace({addr!r}, …) was called outside any generative-function execution; "
            "call it inside a function decorated with @gm.gen and run that function "
            "through simulate/generate/… (or trace it at an address from another model)"
        )
    from genmlx.core.gfi import GenerativeFunction, Invocation

    path = to_path(addr)
    if isinstance(invocation, Invocation):
        gen_fn, args = invocation.gen_fn, invocation.args
    elif isinstance(invocation, GenerativeFunction):
        gen_fn, args = invocation, ()
    else:
        raise TypeError(
            f"gm.trace({addr!r}, …): expected a distribution such as gm.normal(0, 1) or a "
            f"generative function applied to its arguments, got {type(invocation).__name__}"
        )
    return stack[-1].visit(path, gen_fn, args)


def run_with_handler(handler: "Handler", fn, args: tuple) -> Any:
    """Execute ``fn(*args)`` with ``handler`` receiving its ``gm.trace`` calls."""
    stack = _stack()
    stack.append(handler)
    try:
        return fn(*args)
    finally:
        stack.pop()


def standard_noise(key: mx.array, kind: str, shape: tuple) -> mx.array:
    """N(0, 1) (``kind`` "normal") or U(0, 1) ("uniform") draws of ``shape``."""
    if kind == "normal":
        return mx.random.normal(shape, key=key)
    return mx.random.uniform(shape=shape, key=key)


_U32_MAX = float(np.iinfo(np.uint32).max)
_BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
_NORMAL_LOW = float(np.nextafter(np.float32(-1.0), np.float32(0.0)))
_NORMAL_RANGE = float(np.float32(1.0) - np.float32(_NORMAL_LOW))
_SQRT2 = float(np.float32(math.sqrt(2.0)))


def noise_from_bits(bits: mx.array, kind: str) -> mx.array:
    """``standard_noise`` from its raw uint32 bits, with MLX's own transform (bit-identical:
    u = min(b / (2³² − 1), 1⁻); uniform u, or normal √2 · erfinv((1 − l) u + l) with
    l = −1⁺). For an even number of draws, ``mx.random.split(key, m).reshape(-1)`` holds
    the bits that ``mx.random.normal((2m,), key=key)`` transforms."""
    u = mx.minimum(bits / mx.array(_U32_MAX, mx.float32), mx.array(_BELOW_ONE, mx.float32))
    if kind == "normal":
        return mx.array(_SQRT2, mx.float32) * mx.erfinv(
            mx.array(_NORMAL_RANGE, mx.float32) * u + mx.array(_NORMAL_LOW, mx.float32))
    return u


def base_noise(key: mx.array, site: int, kind: str, shape: tuple,
               base_site: int | None = None) -> mx.array:
    """Standard noise of ``shape`` for site number ``site``, materialised
    (``mx.contiguous``) so that ``mx.compile`` never fuses the sampler's tail into
    consumers that broadcast it. Its key is ``key + c_site``, or ``key`` itself for
    ``site == base_site`` (the execution's first noise site: one key add fewer; distinct
    sites still get distinct keys, as c_s ≠ 0 for s ≥ 1)."""
    k = key if site == base_site else key + _site_constant(site)
    return mx.contiguous(standard_noise(k, kind, shape))


def grouped_base_noise(key: mx.array, sites: list, kind: str, shape: tuple,
                       base_site: int | None = None) -> list:
    """``[base_noise(key, s, kind, shape, base_site) for s in sites]`` (identical values)
    as ONE draw: the site keys in one add, one vmapped sampler over them, and one split of
    the flat result, instead of a key add, sampler and copy per site."""
    if len(sites) == 1:
        return [base_noise(key, sites[0], kind, shape, base_site)]
    keys = key + _site_constants(tuple(0 if s == base_site else s for s in sites))
    size = math.prod(shape)
    if size % 2 == 0:
        # raw bits of every site in one RandomBits call (a key split IS its bits), and the
        # sampler's transform outside any vmap: no per-site constants to broadcast
        bits = mx.vmap(lambda k: mx.random.split(k, size // 2))(keys).reshape(-1)
        flat = mx.contiguous(noise_from_bits(bits, kind))
    else:
        flat = mx.contiguous(mx.vmap(lambda k: standard_noise(k, kind, shape))(keys)).reshape(-1)
    parts = mx.split(flat, len(sites))
    return parts if len(shape) == 1 else [p.reshape(shape) for p in parts]


def planned_noise(key: mx.array, plan: dict | None, n: int) -> tuple[list, list]:
    """(sites, rows [n, *shape]) for the sites a plan recorded ({site: (kind, shape)}),
    drawn outside the vmap: sites of the same kind and shape in one sampler call
    (:func:`grouped_base_noise`); values are those of per-site ``base_noise``, with the
    plan's first site as ``base_site``."""
    sites = sorted(plan.items()) if plan else []
    base_site = sites[0][0] if sites else None
    groups: dict = {}
    for j, (_, spec) in enumerate(sites):
        groups.setdefault(spec, []).append(j)
    rows = [None] * len(sites)
    for (kind, shape), members in groups.items():
        drawn = grouped_base_noise(key, [sites[j][0] for j in members], kind, (n,) + shape,
                                   base_site)
        for j, r in zip(members, drawn):
            rows[j] = r
    return sites, rows


class BatchNoise:
    """Batched base randomness for the outermost handler of a vectorized execution.

    Under ``mx.vmap`` each particle would otherwise draw each choice from its own key
    (a threefry evaluation per particle and site). Instead, a distribution that can be
    sampled as a transform of standard noise (``_noise_kind`` "normal" or "uniform")
    gets its noise for all n particles from ONE unbatched key — the same work as
    hand-batched code. Each particle takes its row either from ``rows`` (noise drawn
    outside the vmap and passed in as a batched input, when the sites are known from an
    earlier call) or by gathering row ``idx`` inside the vmap. Both give identical
    values; ``plan`` records the sites drawn, so the next call can pass rows in. The
    first site (of the rows given, else the first drawn) takes ``key`` itself
    (``base_site`` of :func:`base_noise`), as in :func:`planned_noise`.
    """

    def __init__(self, key: mx.array, idx: mx.array, n: int, rows: dict | None = None):
        self.key, self.idx, self.n = key, idx, n
        self.rows = rows or {}
        self.plan: dict[int, tuple] = {}
        self.base_site = min(self.rows) if self.rows else None

    def draw(self, site: int, dist) -> mx.array:
        spec = (dist._noise_kind, tuple(dist.shape))
        self.plan[site] = spec
        if self.base_site is None:
            self.base_site = site
        row = self.rows.get(site)
        if row is not None and row[0] == spec:
            return row[1]
        return base_noise(self.key, site, spec[0], (self.n,) + spec[1], self.base_site)[self.idx]


def batch_noise_scope(noise: "BatchNoise"):
    """Context manager offering ``noise`` to the next handler created (the outermost)."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        _local.noise = noise
        try:
            yield
        finally:
            _local.noise = None

    return scope()


class Handler:
    """Shared bookkeeping: keys, address-collision checks and sub-trace records."""

    def __init__(self, fn_name: str, key: mx.array | None = None):
        self.fn_name = fn_name
        self.key = key
        self.noise = getattr(_local, "noise", None)  # only the outermost handler takes it
        _local.noise = None
        self.subtraces: dict[Path, Any] = {}
        self._prefixes: set[Path] = set()
        # None until the first term arrives: no graph node for an identity "0 + term"
        self._score: mx.array | None = None
        self._weight: mx.array | None = None
        self._count = 0

    @property
    def score(self) -> mx.array:
        """Σ of the recorded sub-traces' scores (0 before any)."""
        return mx.array(0.0) if self._score is None else self._score

    @score.setter
    def score(self, value) -> None:
        self._score = value

    @property
    def weight(self) -> mx.array:
        """The operation's accumulated weight (0 before any term)."""
        return mx.array(0.0) if self._weight is None else self._weight

    @weight.setter
    def weight(self, value) -> None:
        self._weight = value

    def add_weight(self, w) -> None:
        """weight += w, without a ``0 + w`` node for the first term."""
        self._weight = _first_term(w) if self._weight is None else self._weight + w

    def next_key(self, gen_fn=None) -> mx.array:
        """The key for the next site: the execution key with a site-specific constant
        added to its second word (threefry keys act as independent stream ids, as
        in counter-based RNG practice), which costs one elementwise op instead of a
        threefry split per site and particle. Calls of non-distribution GFs get a key
        passed through one real split, so their own sites cannot collide with ours."""
        if self.key is None:
            return mx.random.key(0)  # operations that draw nothing (assess)
        self._count += 1
        # uint32 addition wraps; (XOR would do as well, but MLX 0.32's vmap of
        # bitwise_xor with a broadcast operand returns wrong rows)
        sub = self.key + _site_constant(self._count)
        if gen_fn is not None and not getattr(gen_fn, "_is_distribution", False):
            sub = mx.random.split(sub, 2)[0]
        return sub

    def simulate_site(self, gen_fn, args: tuple):
        """Draw an unconstrained site: from batched noise where available, else by key."""
        if self.noise is not None and getattr(gen_fn, "_noise_kind", None):
            self._count += 1
            return gen_fn.simulate_from_noise(self.noise.draw(self._count, gen_fn))
        return gen_fn.simulate(self.next_key(gen_fn), args)

    def check_fresh(self, path: Path) -> None:
        if path in self._prefixes:
            raise AddressCollisionError(
                "this address (or an address below it) was already used in this execution",
                path, self.fn_name,
            )
        for i in range(1, len(path)):
            if path[:i] in self.subtraces:
                raise AddressCollisionError(
                    f"its prefix {path[:i]!r} already holds a choice in this execution",
                    path, self.fn_name,
                )

    def record(self, path: Path, sub) -> None:
        self.subtraces[path] = sub
        for i in range(1, len(path) + 1):
            self._prefixes.add(path[:i])
        if not _zero_score(sub):
            self._score = _first_term(sub.score) if self._score is None else self._score + sub.score

    def visit(self, path: Path, gen_fn, args: tuple) -> Any:
        self.check_fresh(path)
        try:
            sub = self.step(path, gen_fn, args)
        except (AddressedError, UnvisitedConstraintError) as e:
            raise e.at(path, self.fn_name if not e.gen_fn else None)
        self.record(path, sub)
        return sub.retval

    def step(self, path: Path, gen_fn, args: tuple):
        raise NotImplementedError

    def unvisited(self, constraints: ChoiceMap) -> list[Path]:
        """Constraint leaves lying under no visited address."""
        out = []
        for p, _ in constraints.leaves():
            if not any(p[:i] in self.subtraces for i in range(1, len(p) + 1)):
                out.append(p)
        return out

    def check_all_visited(self, constraints: ChoiceMap) -> None:
        left = self.unvisited(constraints)
        if left:
            raise UnvisitedConstraintError(left, self.fn_name)


def _zero_score(sub) -> bool:
    """Whether a sub-trace's score is identically 0 by construction (a deterministic GF:
    ``zero_score`` on its trace class): adding it would only put a ``+ 0`` (and, under
    ``mx.vmap``, a reshape of the 0) into the graph."""
    return getattr(sub, "zero_score", False)


def _first_term(x) -> mx.array:
    """The first term of a sum that used to start at ``mx.array(0.0)``: the same value and
    dtype as ``0.0 + x`` (float32 at least), with no op when ``x`` is already float32/64."""
    if isinstance(x, mx.array) and (x.dtype == mx.float32 or x.dtype == mx.float64):
        return x
    return mx.array(0.0) + x


_SITE_CONSTANTS: dict[int, mx.array] = {}
_STACKED_CONSTANTS: dict[tuple, mx.array] = {}


def _site_constants(sites: tuple) -> mx.array:
    """The [len(sites), 2] stacked key offsets of several sites."""
    c = _STACKED_CONSTANTS.get(sites)
    if c is None:
        c = mx.array([[0, (i * 0x9E3779B9) & 0xFFFFFFFF] for i in sites], dtype=mx.uint32)
        _STACKED_CONSTANTS[sites] = c
    return c


def _site_constant(i: int) -> mx.array:
    c = _SITE_CONSTANTS.get(i)
    if c is None:
        c = mx.array([0, (i * 0x9E3779B9) & 0xFFFFFFFF], dtype=mx.uint32)
        _SITE_CONSTANTS[i] = c
    return c


class SimulateHandler(Handler):
    def step(self, path, gen_fn, args):
        return self.simulate_site(gen_fn, args)


class GenerateHandler(Handler):
    def __init__(self, fn_name, key, constraints: ChoiceMap):
        super().__init__(fn_name, key)
        self.constraints = constraints

    def step(self, path, gen_fn, args):
        sub_c = self.constraints.submap_at_path(path)
        if sub_c.is_empty():
            return self.simulate_site(gen_fn, args)
        tr, w = gen_fn.generate(self.next_key(gen_fn), args, sub_c)
        self.add_weight(w)
        return tr


class AssessHandler(Handler):
    """Scores given choices; ``weight`` is unused, ``score`` is log p(τ)."""

    def __init__(self, fn_name, choices: ChoiceMap):
        super().__init__(fn_name, None)
        self.choices = choices

    def step(self, path, gen_fn, args):
        sub_c = self.choices.submap_at_path(path)
        lp, retval = gen_fn.assess(args, sub_c)
        return _Assessed(lp, retval, getattr(gen_fn, "zero_score", False))


class _Assessed:
    """A score-and-retval record standing in for a sub-trace during assess."""

    __slots__ = ("score", "retval", "zero_score")

    def __init__(self, score, retval, zero_score: bool = False):
        self.score, self.retval, self.zero_score = score, retval, zero_score


class UpdateHandler(Handler):
    def __init__(self, fn_name, key, prev, constraints: ChoiceMap):
        super().__init__(fn_name, key)
        self.prev = prev  # DynamicTrace
        self.constraints = constraints
        self.discard = ChoiceMap.empty()

    def step(self, path, gen_fn, args):
        sub_c = self.constraints.submap_at_path(path)
        prev_sub = self.prev.subtraces.get(path)
        if prev_sub is not None and _same_kind(gen_fn, prev_sub):
            argdiffs = default_argdiffs(prev_sub.args, args)
            tr, w, _, disc = gen_fn.update(self.next_key(gen_fn), prev_sub, sub_c, args, argdiffs)
            if not disc.is_empty():
                self.discard = self.discard.set_submap(path, disc)
        else:
            if prev_sub is not None:  # same address, different kind of callee
                self.weight = self.weight - prev_sub.score
                self.discard = self.discard.set_submap(path, prev_sub.choices)
            if sub_c.is_empty():
                return gen_fn.simulate(self.next_key(gen_fn), args)  # weight term 0
            tr, w = gen_fn.generate(self.next_key(gen_fn), args, sub_c)
        self.add_weight(w)
        return tr

    def finish_removed(self) -> None:
        """Subtract the scores of old choices the new execution no longer made."""
        for path, prev_sub in self.prev.subtraces.items():
            if path not in self.subtraces:
                self.weight = self.weight - prev_sub.score
                ch = prev_sub.choices
                if not ch.is_empty():
                    self.discard = self.discard.set_submap(path, ch)


class RegenerateHandler(Handler):
    def __init__(self, fn_name, key, prev, selection: Selection):
        super().__init__(fn_name, key)
        self.prev = prev
        self.selection = selection

    def step(self, path, gen_fn, args):
        prev_sub = self.prev.subtraces.get(path)
        if prev_sub is not None and _same_kind(gen_fn, prev_sub):
            argdiffs = default_argdiffs(prev_sub.args, args)
            sub_sel = self.selection.subselection(path)
            tr, w, _ = gen_fn.regenerate(self.next_key(gen_fn), prev_sub, sub_sel, args, argdiffs)
            self.add_weight(w)
            return tr
        return gen_fn.simulate(self.next_key(gen_fn), args)


def _same_kind(gen_fn, prev_sub) -> bool:
    """Whether ``gen_fn`` can update ``prev_sub`` in place (same GF, or same family)."""
    from genmlx.distributions.base import Distribution, DistTrace

    if isinstance(prev_sub, DistTrace):
        return isinstance(gen_fn, Distribution) and prev_sub.family is type(gen_fn)
    return prev_sub.gen_fn is gen_fn or prev_sub.gen_fn == gen_fn


def project_subtrace(sub, selection: Selection) -> mx.array:
    """``project`` of a recorded sub-trace (distribution traces need no GF object)."""
    from genmlx.distributions.base import DistTrace

    if isinstance(sub, DistTrace):
        return sub.score if selection.is_all_here() else mx.zeros_like(sub.score)
    return sub.gen_fn.project(sub, selection)
