"""Log densities on R^D for gradient-based inference (HMC, MALA, NUTS, ADVI).

Every unobserved (latent) continuous choice x_a of a model is reparameterized by the
bijection of its support, x_a = f_a(u_a), and all u_a are concatenated into one flat
vector u ∈ R^D. The target is

    log π(u) = log p(x(u), y; args) + Σ_a log |det ∂f_a/∂u_a|,

evaluated through the model's own ``generate`` with every latent constrained to
``UnconstrainedValue(u_a)`` (so dependent supports such as ``uniform(0, 1 − a)`` use the
bounds of the current execution, through any generative function). With all choices
constrained, generate's weight is exactly log π(u).

Assumes a fixed set of latent addresses (the addresses visited do not depend on the
values of the latents); discrete latents are rejected with an error naming them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from genmlx.core.choicemap import ChoiceMap
from genmlx.core.errors import ConstraintShapeError, format_address
from genmlx.distributions.base import UnconstrainedValue

_KEY0 = None


def _key0():
    global _KEY0
    if _KEY0 is None:
        _KEY0 = mx.random.key(0)
    return _KEY0


@dataclass(frozen=True)
class Latent:
    """One latent choice: its address path, constrained and unconstrained shapes, and
    its slice ``[offset, offset + size)`` of the flat unconstrained vector."""

    path: tuple
    shape: tuple
    ushape: tuple
    offset: int
    size: int

    @property
    def name(self) -> str:
        return format_address(self.path)


def _as_cm(obs) -> ChoiceMap:
    if obs is None:
        return ChoiceMap.empty()
    if isinstance(obs, ChoiceMap):
        return obs
    return ChoiceMap.from_mapping(obs)


class _DiscreteLatent(Exception):
    def __init__(self, path):
        self.path = path


class _Probe:
    def __init__(self, shapes: dict):
        self.shapes = shapes
        self.order: list = []


class _ProbeMap(ChoiceMap):
    """A choice map that holds the observations and, at every other address a
    distribution asks about, an ``UnconstrainedValue`` of zeros (recording the path)."""

    __slots__ = ("_obs", "_prefix", "_rec")

    def __init__(self, obs: ChoiceMap, prefix: tuple, rec: _Probe):
        super().__init__()
        self._obs, self._prefix, self._rec = obs, prefix, rec

    def submap_at_path(self, path):
        full = self._prefix + tuple(path)
        sub = self._obs.submap_at_path(full)
        if sub.is_leaf():
            return sub
        return _ProbeMap(self._obs, full, self._rec)

    def get_submap(self, addr):
        from genmlx.core.address import to_path

        return self.submap_at_path(to_path(addr))

    def is_empty(self):
        return False

    def is_leaf(self):
        return True

    def has_value(self, addr=None):
        return addr is None

    def get_value(self, addr=None):
        if addr is not None:
            return self.get_submap(addr).get_value()
        if self._prefix not in self._rec.order:
            self._rec.order.append(self._prefix)
        return UnconstrainedValue(mx.zeros(self._rec.shapes.get(self._prefix, ())))

    def leaves(self, prefix=()):
        return iter(())


class UnconstrainedDensity:
    """log π(u) of a model's latents given observations, on the flat space R^D.

    ``log_density(u)`` for one u ∈ R^D; ``value_and_grad(U)`` for a batch U ∈ R^{C×D}
    (one row per chain, one compiled computation) returns (log π [C], ∇ log π [C, D]);
    ``constrain(U)`` maps rows back to constrained values per address.
    """

    def __init__(self, model, args: tuple, observations=None, key: mx.array | None = None):
        self.model = model
        self.args = tuple(args)
        self.observations = _as_cm(observations)
        self.latents = self._discover(key)
        self.dim = sum(l.size for l in self.latents)
        self._vg = mx.compile(self._make_value_and_grad())
        self._batched = mx.compile(mx.vmap(self.log_density))
        self._constrain = mx.compile(mx.vmap(self._constrained_leaves))

    # -- discovery -------------------------------------------------------------
    def _discover(self, key) -> list[Latent]:
        """Latent paths in execution order with their shapes. First by probing (every
        unobserved choice receives an ``UnconstrainedValue``, so improper ``flat``
        choices are never sampled), then, if that does not account for every choice of
        the resulting trace, by a prior draw."""
        paths = None
        try:
            paths = self._probe()
        except _DiscreteLatent as e:
            raise ValueError(
                f"gradient-based inference needs continuous latents, but the choice at "
                f"address {format_address(e.path)} has a discrete support; observe it or use "
                "MH / enumeration for it") from None
        except Exception:
            paths = None
        latents = self._verified(paths) if paths is not None else None
        if latents is None:
            tr, _ = self.model.generate(_key0() if key is None else key, self.args, self.observations)
            paths = {}
            for path, value in tr.choices.leaves():
                if self.observations.submap_at_path(path).is_empty():
                    paths[path] = self._ushape_of(path, tuple(value.shape))
            latents = self._verified(paths)
            if latents is None:
                raise ValueError("could not determine the latent choices of the model: the set of "
                                 "addresses visited must not depend on the latent values")
        if not latents:
            raise ValueError("the model has no latent (unobserved) choices to infer")
        return latents

    def _probe(self) -> dict:
        shapes: dict = {}
        for _ in range(10_000):
            rec = _Probe(shapes)
            try:
                self.model.generate(_key0(), self.args, _ProbeMap(self.observations, (), rec))
                return {p: shapes.get(p, ()) for p in rec.order}
            except ConstraintShapeError as e:
                exp = getattr(e, "expected_shape", None)
                path = tuple(e.path)
                if exp is None or shapes.get(path, ()) == exp:
                    raise
                shapes[path] = exp
            except TypeError:
                if rec.order:
                    raise _DiscreteLatent(rec.order[-1]) from None
                raise
        raise RuntimeError("latent discovery did not converge")

    def _ushape_of(self, path, shape):
        cm = self.observations.set_submap(path, ChoiceMap.leaf(UnconstrainedValue(mx.zeros(shape))))
        try:
            self.model.generate(_key0(), self.args, cm)
        except ConstraintShapeError as e:
            exp = getattr(e, "expected_shape", None)
            if exp is not None and tuple(e.path) == tuple(path):
                return exp
        except TypeError:
            raise ValueError(
                f"gradient-based inference needs continuous latents, but the choice at address "
                f"{format_address(path)} has a discrete support; observe it or use MH / enumeration "
                "for it") from None
        except Exception:
            pass
        return shape

    def _verified(self, paths: dict) -> list[Latent] | None:
        """Latents if constraining ``paths`` (plus the observations) fixes every choice."""
        cm = self.observations
        for p, us in paths.items():
            cm = cm.set_submap(p, ChoiceMap.leaf(UnconstrainedValue(mx.zeros(us))))
        try:
            tr, _ = self.model.generate(_key0(), self.args, cm)
        except Exception:
            return None
        shapes = {}
        for path, value in tr.choices.leaves():
            if path in paths:
                shapes[path] = tuple(value.shape)
            elif self.observations.submap_at_path(path).is_empty():
                return None
        if set(shapes) != set(paths):
            return None
        out, off = [], 0
        for p, us in paths.items():
            size = int(np.prod(us)) if us else 1
            out.append(Latent(p, shapes[p], tuple(us), off, size))
            off += size
        return out

    # -- densities -------------------------------------------------------------
    def choicemap(self, u: mx.array) -> ChoiceMap:
        """Observations merged with ``UnconstrainedValue`` constraints read from u [D]."""
        cm = self.observations
        for l in self.latents:
            ua = u[l.offset : l.offset + l.size].reshape(l.ushape)
            cm = cm.set_submap(l.path, ChoiceMap.leaf(UnconstrainedValue(ua)))
        return cm

    def log_density(self, u: mx.array) -> mx.array:
        """log π(u) for one u ∈ R^D (NaN mapped to −inf)."""
        _, w = self.model.generate(_key0(), self.args, self.choicemap(u))
        return mx.where(mx.isnan(w), -mx.inf, w)

    def _make_value_and_grad(self):
        batched = mx.vmap(self.log_density)

        def total(U):
            lp = batched(U)
            return mx.sum(lp), lp

        vg = mx.value_and_grad(total)

        def f(U):
            (_, lp), g = vg(U)
            return lp, g

        return f

    def value_and_grad(self, U: mx.array) -> tuple[mx.array, mx.array]:
        """(log π(U_c), ∇ log π(U_c)) for every row of U [C, D]."""
        return self._vg(U)

    def value_and_grad_col(self, U: mx.array) -> tuple[mx.array, mx.array]:
        """:meth:`value_and_grad` with log π as a column [C, 1] (integrators that stack
        it beside [C, D] arrays take it so, without a reshape)."""
        lp, g = self.value_and_grad(U)
        return lp[:, None], g

    # -- block form (integrators keep u, p, ∇ as a list of blocks of U's columns) --------
    def split(self, U: mx.array) -> list:
        """U [C, D] as the list of blocks that :meth:`value_and_grad_blocks` takes (here
        one block, U itself; the flat density uses one block per latent)."""
        return [U]

    def join(self, blocks: list) -> mx.array:
        """The inverse of :meth:`split`: [C, D]."""
        return blocks[0]

    def value_and_grad_blocks(self, blocks: list) -> tuple[mx.array, list]:
        """(log π [C], ∇ log π as blocks) of the position given as :meth:`split` blocks."""
        lp, g = self.value_and_grad(blocks[0])
        return lp, [g]

    def batched_log_density(self, U: mx.array) -> mx.array:
        return self._batched(U)

    def _constrained_leaves(self, u):
        tr, _ = self.model.generate(_key0(), self.args, self.choicemap(u))
        ch = tr.choices
        return [ch.submap_at_path(l.path).get_value() for l in self.latents]

    def constrain(self, U: mx.array) -> dict[tuple, mx.array]:
        """Constrained values per latent path for rows of U [..., D] → [..., *shape]."""
        lead = U.shape[:-1]
        flat = U.reshape(-1, self.dim)
        vals = self._constrain(flat)
        return {l.path: v.reshape(lead + l.shape) for l, v in zip(self.latents, vals)}

    def init(self, key: mx.array, num_chains: int, radius: float = 2.0) -> mx.array:
        """Stan's default initialisation: u ~ Uniform(−radius, radius)^D per chain."""
        return mx.random.uniform(-radius, radius, (num_chains, self.dim), key=key)

    def flat_names(self) -> list[str]:
        """One readable name per coordinate of the flat unconstrained vector."""
        names = []
        for l in self.latents:
            if l.size == 1 and not l.ushape:
                names.append(l.name)
            else:
                for idx in np.ndindex(*l.ushape):
                    names.append(f"{l.name}[{','.join(map(str, idx))}]")
        return names


def path_key(path: tuple) -> Any:
    """The user-facing key of a latent path: the bare address for depth one."""
    return path[0] if len(path) == 1 else tuple(path)


def initial_positions(density: UnconstrainedDensity, key, num_chains: int, init=None,
                      max_tries: int = 100) -> mx.array:
    """Initial unconstrained positions [C, D] with finite log density and gradient.

    ``init`` may be an array [D] or [C, D] of unconstrained values; otherwise each
    chain draws Uniform(−2, 2)^D (redrawn where the density is not finite)."""
    if init is not None:
        U = mx.array(init, dtype=mx.float32)
        if U.ndim == 1 and U.shape[0] == density.dim:
            U = mx.broadcast_to(U, (num_chains, density.dim))
        if tuple(U.shape) != (num_chains, density.dim):
            raise ValueError(f"init must have shape ({density.dim},) or ({num_chains}, {density.dim}), got {tuple(U.shape)}")
        return U
    def finite(U):
        lp, g = density.value_and_grad(U)
        return mx.isfinite(lp) & mx.all(mx.isfinite(g), axis=-1)

    key, k = mx.random.split(key)
    U = density.init(k, num_chains)
    ok = finite(U)
    for _ in range(max_tries):
        if bool(mx.all(ok)):
            return U
        key, k = mx.random.split(key)
        cand = density.init(k, num_chains)
        U = mx.where(ok[:, None], U, cand)
        ok = ok | finite(cand)
    raise ValueError("could not find initial values with a finite log density and gradient "
                     f"after {max_tries} tries of Uniform(-2, 2) in unconstrained space")
