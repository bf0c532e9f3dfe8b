"""A flattened unconstrained log density: log π(u) computed straight from array slices.

:class:`~genmlx.inference.unconstrained.UnconstrainedDensity` evaluates

    log π(u) = Σ_obs log p(y_a | ·) + Σ_latent [log p(f_a(u_a) | ·) + log|det ∂f_a/∂u_a|]

through the model's ``generate`` (choice maps of ``UnconstrainedValue``s, traces, the
handler stack), vmapped over chains. :class:`FlatDensity` gives the same number with a
minimal handler and a smaller graph:

* the model body runs once per compilation under ``mx.vmap`` over chains (so any model
  code works), with every latent's block of U [C, D] passed in as its own vmap input
  (no per-chain slicing); each ``gm.trace`` of a distribution returns x_a = f_a(u_a)
  (latent) or the observed value, and nothing else is built — no traces, choice maps,
  keys or address bookkeeping;
* *hoisted* sites: for a scalar-event family whose array attributes are exactly its
  parameters, the vmapped body only returns the parameters (and x_a); the log density
  Σ_{elements} log p is then evaluated OUTSIDE the vmap on the batched parameters,
  aligned as [C, 1, …, 1, *param_shape] against the value [C, *shape] (or the unbatched
  observation). Under vmap every constant operand of the family's arithmetic costs
  extra reshape/broadcast/transpose nodes; batched explicitly it is one fused kernel
  plus a reduction, as in hand-written code;
  Parameters that do not depend on u (evaluable while tracing: prior constants,
  functions of the data) stay unbatched constants;
* hoisted Normal / HalfNormal / HalfCauchy sites are scored by their closed-form
  per-chain sums with the constant parts folded at trace time (``fast``), and the
  elementwise parts of sites of one shape share one reduction (see ``_fast_score``),
  differentiated by a written-out reverse mode (``mx.custom_function``): the backward
  recomputes z = (x − μ)/σ inside its own kernels and reuses the forward's Σ z² for a
  per-chain σ, where autodiff would materialize the intermediates it shares between
  the value and the gradient and reduce z² again (``_elementwise_sum``);
* latents on a fixed elementwise support (bounds independent of u): x = f(u) and
  log|J| are computed outside the vmap, and the body receives x;
* a flat prior on R (``gm.flat()`` with infinite bounds) adds nothing: log p(x) = 0 for
  every finite x = u, so its support check is not built;
* while the body is traced, ``+``, ``−`` and ``*`` put the operand with more dimensions
  first (exact: IEEE + and * commute), so that ``tau * theta`` keeps the chain axis
  leading, and a latent vector on R whose every element the body takes by an integer
  index (``beta[0]``, ``beta[1]``) is given per element (a block for each column of
  U), ``beta[i]`` returning that block: no Gather / Scatter (``_body_ops``);
* columns: a scalar per chain (a scalar latent, an element given per column) keeps the
  column [C, 1] of U that the Split gives. The body sees it as a scalar per chain (a [C]
  view of the column, built only if used so) and, lifted against a vector, as the
  column itself (``BodyOps.column``); an output of the body that is such a scalar is
  taken from the column outside the vmap. Outside the vmap every per-chain scalar is a
  column: the site terms, sums with kept dims, log π [C, 1] and its cotangent 1 [C, 1].
  So the blocks are never reshaped [C, 1] → [C] → [C, 1], their gradients come out as
  columns for the concatenation of ∇, and no sum is followed by a Squeeze;
  ``value_and_grad_col`` returns log π as [C, 1] (``value_and_grad``: [C], one view);
* other sites (multivariate families, families with derived arrays) are scored inside
  the vmap with the family's own score; calls of ``@gm.gen`` sub-functions are
  flattened; any other generative function (combinators) is evaluated by its own
  ``generate`` on the sub-choice-map, exactly as in the generic path;
* the gradient is that of Σ_c log π(U_c) (rows are independent) with respect to the
  latents' blocks, concatenated; NaN → −inf is applied after differentiation (a NaN
  state is rejected whatever its gradient);
* block form: ``split(U)`` gives the latents' blocks ([C, *ushape] each, a column
  [C, 1] for a scalar latent and per element of a latent given per element; one Split
  node), ``value_and_grad_blocks`` returns ∇ as blocks and ``join`` concatenates.
  HMC's diagonal-metric trajectory integrates the blocks (u, p, ∇ split once per
  transition, joined once at its end), so a leapfrog step has no slicing of U or
  concatenation of ∇ — the same arithmetic per element, a smaller graph.

Site scores are accumulated in execution order, as ``generate`` does (closed-form
sites' elementwise parts are reduced together at the end), so both paths agree to
float32 rounding (the hoisted sites sum elementwise log densities instead of the
family's score).

Static structure: the flat path is valid only when every chain visits the same latent
addresses with the same shapes. :func:`make_density` checks this at u = 0 and at two
random points (addresses and shapes of the generic execution agree, and the flat and
generic log densities and gradients agree there); otherwise — e.g. control flow on a
latent's value decides which addresses exist — it returns the generic
:class:`UnconstrainedDensity`. The hoisted variant with closed-form sites is tried
first, then without them, then the unhoisted one. :func:`cached_density` reuses a density (and its compiled kernels) for
repeated calls with the same model and equal data.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from genmlx.core.choicemap import ChoiceMap
from genmlx.core.dynamic import DynamicGF
from genmlx.core.handlers import run_with_handler
from genmlx.distributions.base import Distribution, UnconstrainedValue, _as_array, is_static
from genmlx.distributions.constraints import GreaterThan, _Real
from genmlx.distributions.continuous import HalfCauchy, HalfNormal, Normal
from genmlx.distributions.degenerate import Flat
from genmlx.distributions.special import HALF_LOG_2PI, LOG_2
from genmlx.inference._body_ops import BodyOps
from genmlx.inference.unconstrained import Latent, UnconstrainedDensity, _as_cm, _key0


class StructureChanged(Exception):
    """The model visited an address that is neither a known latent nor observed."""


def _total(a: mx.array) -> mx.array:
    """Σ of a site's log densities (no reduction node for a scalar)."""
    return a if a.ndim == 0 else mx.sum(a)


def _param_attrs(d: Distribution) -> dict | None:
    """{attribute: parameter name} when ``d`` can be scored outside the vmap: a
    continuous scalar-event family whose every array attribute is one of its
    parameters (nothing derived from them is stored). None otherwise."""
    if d.event_ndim != 0 or d.event_shape != () or d.discrete:
        return None
    params = getattr(d, "_params", None)
    if not params:
        return None
    out = {}
    for k, v in vars(d).items():
        if isinstance(v, mx.array):
            names = [n for n, p in params.items() if p is v]
            if not names:
                return None
            out[k] = names[0]
    if set(out.values()) != set(params):
        return None
    return out


class _Site(NamedTuple):
    """One scored site of the execution. ``hoisted``: outputs are the u-dependent
    parameters (in ``names`` order) then, for a latent, x (and log|J|); else one output,
    the site's score."""

    hoisted: bool
    dist: Distribution | None  # hoisted: the template (traced inside the vmap)
    attrs: dict | None  # hoisted: {attribute: parameter name}
    names: tuple  # parameters passed out of the vmap (batched)
    consts: dict  # parameters that do not depend on u: concrete arrays, kept unbatched
    batch_shape: tuple
    value: mx.array | None  # hoisted observed value (unbatched)
    latent: bool
    logdet: bool  # a log-Jacobian output follows (hoisted latents on a non-real support)
    path: tuple = ()  # latents: the address
    outside: bool = False  # latents on a fixed support: x and log|J| computed outside the vmap
    fast: bool = False  # score by the closed-form per-chain sum (_fast_score) when it applies


def _concrete(a: mx.array) -> bool:
    """Whether ``a`` does not depend on the traced inputs (it can be evaluated now,
    inside compile/vmap/grad tracing: a constant of the model, e.g. a prior's
    parameters or a function of the data)."""
    try:
        mx.eval(a)
        return True
    except (RuntimeError, ValueError):
        return False


def _split_params(d: Distribution):
    """(names of u-dependent parameters, {name: concrete parameter}, their arrays)."""
    names, consts, outs = [], {}, []
    for n, p in d._params.items():
        if _concrete(p):
            consts[n] = p
        else:
            names.append(n)
            outs.append(p)
    return tuple(names), consts, outs


class _Plan:
    def __init__(self):
        self.sites: list[_Site] = []
        self.outputs: list = []
        self.visited: list = []
        self.supports: dict = {}
        self.subst: dict = {}  # output index -> piece whose column [C, 1] it is


def _fixed_support(sup, shape: tuple, ushape: tuple) -> bool:
    """Whether a latent's bijection can run outside the vmap on the batched block: an
    elementwise (scalar-event) support whose bounds do not depend on u."""
    if isinstance(sup, _Real) or sup.event_ndim != 0 or tuple(shape) != tuple(ushape):
        return False
    return all(_concrete(v) for v in vars(sup).values() if isinstance(v, mx.array))


def _from_unconstrained(sup, u: mx.array) -> mx.array:
    """x = f(u) for a fixed support; (0, ∞) as exp(u), without the ``0 +``."""
    if isinstance(sup, GreaterThan) and is_static(sup.lower, 0.0):
        return mx.exp(u)
    return sup.from_unconstrained(u)


def _unscored(d: Distribution, sup) -> bool:
    """Whether a latent of ``d`` adds nothing to log π: a flat prior on all of R, whose
    log p(x) = 0 for every finite x = u (its support check x ∈ (−∞, ∞) fails only for
    u = ±∞ or NaN, where the density is not evaluated by a sampler)."""
    return type(d) is Flat and isinstance(sup, _Real)


class _FlatHandler:
    """Receives ``gm.trace`` calls inside the vmapped body (one chain)."""

    def __init__(self, dens: "FlatDensity", blocks: dict, prefix: tuple, plan: _Plan,
                 ops: BodyOps, cols: dict, scalars: dict):
        self.dens, self.blocks, self.prefix, self.plan = dens, blocks, prefix, plan
        self.ops, self.cols = ops, cols  # cols: {path: the elements of a latent given per column}
        self.scalars = scalars  # id(scalar input) -> (it, its piece): given outside as a column

    def _emit(self, site: _Site, outs: list):
        """Record a site and its outputs; an output that is a scalar latent's input is
        taken outside the vmap from that latent's column (``plan.subst``)."""
        self.plan.sites.append(site)
        for o in outs:
            hit = self.scalars.get(id(o))
            if hit is not None and hit[0] is o:
                self.plan.subst[len(self.plan.outputs)] = hit[1]
            self.plan.outputs.append(o)

    def visit(self, path, gen_fn, args):
        full = self.prefix + tuple(path)
        self.plan.visited.append(full)
        if isinstance(gen_fn, Distribution):
            ua = self.blocks.get(full)
            if ua is not None:
                sup = gen_fn.support
                self.plan.supports[full] = sup
                outside = full in self.dens._fixed
                if outside:  # ua is already x = f(u); log|J| is added outside
                    x, ld = ua, None
                else:
                    x = sup.from_unconstrained(ua)
                    ld = None if isinstance(sup, _Real) else _total(sup.log_abs_det_jacobian(ua))
                if x.ndim == 1:
                    self.ops.watch(x, full, self.cols.get(full))
                if self.dens.fast and _unscored(gen_fn, sup):
                    return x
                attrs = _param_attrs(gen_fn) if self.dens.hoist else None
                if attrs is not None:
                    names, consts, outs = _split_params(gen_fn)
                    if not outside:
                        outs += [x] + ([ld] if ld is not None else [])
                    self._emit(_Site(True, gen_fn, attrs, names, consts, tuple(gen_fn.batch_shape), None,
                                     True, ld is not None, full, outside, self.dens.fast), outs)
                else:
                    s = gen_fn._score(x)
                    self._emit(_Site(False, None, None, (), {}, (), None, True, False, full, outside),
                               [s if ld is None else s + ld])
                return x
            obs = self.dens.observations.submap_at_path(full)
            if not obs.is_leaf():
                raise StructureChanged(full)
            v = obs.get_value()
            if isinstance(v, UnconstrainedValue):
                raise StructureChanged(full)
            v = _as_array(v)
            if tuple(v.shape) != tuple(gen_fn.shape):
                raise StructureChanged(full)
            attrs = _param_attrs(gen_fn) if self.dens.hoist else None
            if attrs is not None:
                names, consts, outs = _split_params(gen_fn)
                self._emit(_Site(True, gen_fn, attrs, names, consts, tuple(gen_fn.batch_shape), v, False,
                                 False, fast=self.dens.fast), outs)
            else:
                self._emit(_Site(False, None, None, (), {}, (), None, False, False), [gen_fn._score(v)])
            return v
        if isinstance(gen_fn, DynamicGF):
            sub = _FlatHandler(self.dens, self.blocks, full, self.plan, self.ops, self.cols, self.scalars)
            return run_with_handler(sub, gen_fn.fn, tuple(args))
        # any other GF: its own generate on the latents/observations below this address
        cm = self.dens._sub_choicemap(self.blocks, full)
        tr, w = gen_fn.generate(_key0(), tuple(args), cm)
        self._emit(_Site(False, None, None, (), {}, (), None, False, False), [w])
        return tr.retval


def _aligned(p: mx.array, rank: int) -> mx.array:
    """A batched parameter [C, *ps] reshaped to [C, 1, …, 1, *ps] of rank 1 + ``rank``."""
    pad = rank - (p.ndim - 1)
    return p if pad <= 0 else p.reshape((p.shape[0],) + (1,) * pad + tuple(p.shape[1:]))


# -- closed-form per-chain sums for common families ------------------------------------
# For a hoisted site of n = |batch shape| elements, Σ_elements log p is written with the
# constant parts folded at trace time (Python numbers: no graph nodes), e.g. for
# N(μ, σ): −½ Σ z² − Σ log σ − n·½log 2π with z = (x − μ)/σ, where Σ log σ over the
# broadcast is (Σ over σ's own elements)·(n / |σ|), and the support check of a latent's
# value is dropped (x = f(u) lies in the support by construction). Same value as
# summing the family's elementwise ``_log_prob``, fewer nodes. The elementwise parts of
# the sites of one shape are one custom function with a written-out reverse mode (see
# ``_elementwise_sum``). :func:`make_density` compares the flat and generic densities
# and gradients, so a disagreement falls back to the generic path.
def _as_col(a: mx.array) -> mx.array:
    """A per-chain scalar [C] (or any [C, 1, …, 1]) as a column [C, 1]: the form of every
    per-chain quantity outside the vmap (log π, site terms, scalar latents)."""
    return a if a.shape[1:] == (1,) else a.reshape(a.shape[0], 1)


def _colsum(a: mx.array) -> mx.array:
    """Σ over every axis but the leading chain axis as a column [C, 1] (kept dims: no
    Squeeze; one element per chain: no reduction)."""
    if math.prod(a.shape[1:]) == 1:
        return _as_col(a)
    return _as_col(mx.sum(a, axis=tuple(range(1, a.ndim)), keepdims=True))


def _as_shape(a: mx.array, shape: tuple) -> mx.array:
    return a if tuple(a.shape) == tuple(shape) else a.reshape(shape)


def _const_all(a, value: float) -> bool:
    return np.all(np.asarray(a) == value)


def _log_sum(scale, batched: bool, n: int):
    """Σ log(scale) over the site's n elements: a Python float for a constant scale,
    else per chain [C, 1] (the scale batched [C, *ps])."""
    if not batched:
        a = np.asarray(scale, dtype=np.float64)
        return float(np.sum(np.log(a))) * (n / max(a.size, 1))
    per = math.prod(scale.shape[1:])
    t = _colsum(mx.log(scale))
    return t if per == n else t * (n / per)


class _Elem(NamedTuple):
    """A site's elementwise part φ(z²) [− log σ], z = (x − μ)/σ over ``rank`` element
    axes, with φ(q) = −½q (Normal, HalfNormal) or −log(1 + q) (``cauchy``); − log σ
    when ``logscale`` (σ batched per element). ``loc`` None: μ = 0, ``scale`` None:
    σ = 1; ``traced``: the fields holding batched arrays (x [C, *shape], parameters
    [C, *ps], aligned when used), the others are constants."""

    x: object
    loc: object
    scale: object
    traced: tuple
    rank: int
    cauchy: bool = False
    logscale: bool = False


def _elem(x, loc, scale, batched: set, rank: int, n: int, cauchy: bool = False) -> _Elem:
    """The elementwise part of x against (μ, σ) (``batched``: the traced fields), constant
    μ = 0 / σ = 1 dropped."""
    loc = None if "loc" not in batched and _const_all(loc, 0.0) else loc
    scale = None if "scale" not in batched and _const_all(scale, 1.0) else scale
    traced = tuple(f for f in ("x", "loc", "scale") if f in batched)
    logscale = "scale" in batched and math.prod(scale.shape[1:]) == n
    return _Elem(x, loc, scale, traced, rank, cauchy, logscale)


def _field(t: _Elem, f: str):
    """A field of ``t``, aligned against the elements if it is a batched parameter."""
    v = getattr(t, f)
    return _aligned(v, t.rank) if f in t.traced and f != "x" else v


def _forward(t: _Elem) -> mx.array:
    """φ(z²) [− log σ], elementwise."""
    x, loc, scale = _field(t, "x"), _field(t, "loc"), _field(t, "scale")
    d = x if loc is None else x - loc
    z = d if scale is None else d / scale
    e = -mx.log1p(z * z) if t.cauchy else -0.5 * (z * z)
    return e - mx.log(scale) if t.logscale else e


def _forward_sum(terms: list[_Elem]) -> mx.array:
    """Σ_s φ_s(z_s²) [− log σ_s], elementwise."""
    e = _forward(terms[0])
    for t in terms[1:]:
        e = e + _forward(t)
    return e


def _backward(t: _Elem, fld: str) -> mx.array:
    """∂/∂``fld`` of φ(z²) [− log σ], elementwise: with z' = (μ − x)/σ = −z and
    a = 2φ'(z²)·z/σ (= z'/σ for the Normal, 2z'/(σ(1 + z'²)) for the Cauchy form),
    ∂/∂x = a, ∂/∂μ = −a, ∂/∂σ = a·z' [− 1/σ]. Written from μ − x (not the forward's
    x − μ) so that compile does not merge them: a z shared by the forward and backward
    kernels would be materialized, one more kernel than recomputing it."""
    x, loc, scale = _field(t, "x"), _field(t, "loc"), _field(t, "scale")
    zn = -x if loc is None else loc - x
    if scale is not None:
        zn = zn / scale
    a = zn if scale is None else zn / scale
    if t.cauchy:
        a = 2.0 * a / (1.0 + zn * zn)
    if fld == "x":
        return a
    if fld == "loc":
        return -a
    return a * zn - 1.0 / scale if t.logscale else a * zn


class _Form(NamedTuple):
    """A closed-form family: its location and scale parameter names (``loc`` None: μ = 0),
    the per-element constant of its log density, and whether φ is the Cauchy form."""

    loc: str | None
    scale: str
    const: float
    cauchy: bool = False


_FAST = {Normal: _Form("mu", "sigma", -HALF_LOG_2PI),
         HalfNormal: _Form(None, "sigma", LOG_2 - HALF_LOG_2PI),
         HalfCauchy: _Form(None, "scale", LOG_2 - math.log(math.pi), cauchy=True)}


def _fast_part(form: _Form, P: dict, B: set, x, rank: int, n: int):
    """(elementwise part, remainder) of a closed-form site: remainder = n·const − Σ log σ
    (Σ log σ inside the elementwise part instead when σ is batched per element)."""
    loc = 0.0 if form.loc is None else P[form.loc]
    t = _elem(x, loc, P[form.scale], B, rank, n, cauchy=form.cauchy)
    return t, n * form.const - (0.0 if t.logscale else _log_sum(P[form.scale], "scale" in B, n))


_NONNEG = (HalfNormal, HalfCauchy)  # support x ≥ 0: an observed value is checked at trace time


def _fast_score(site: _Site, params: list, x: mx.array | None):
    """(elementwise part, remainder [C] or a number) of a Normal / HalfNormal /
    HalfCauchy site: Σ log p per chain = Σ_elements part + remainder. None when it does
    not apply (another family, nothing batched, or an observed value outside the
    support)."""
    form = _FAST.get(type(site.dist))
    if form is None or (x is None and not site.names):
        return None
    rank = max(len(site.batch_shape), 1)  # a scalar site as a column [C, 1]
    fields = {form.loc: "loc", form.scale: "scale"}
    batched = {fields[k] for k in site.names} | ({"x"} if x is not None else set())
    if x is None:
        x = site.value
        if type(site.dist) in _NONNEG and not np.all(np.asarray(x) >= 0):
            return None
    P = dict(site.consts)
    P.update(zip(site.names, params))
    t, rest = _fast_part(form, P, batched, x, rank, math.prod(site.batch_shape))
    if len(np.broadcast_shapes(*[_field(t, f).shape for f in t.traced])) != rank + 1:  # not batched after all
        return None
    return t, rest


def _unbroadcast(g: mx.array, shape: tuple) -> mx.array:
    """Σ of ``g`` over the axes along which an operand of ``shape`` (same rank) was broadcast."""
    axes = tuple(i for i, (a, b) in enumerate(zip(shape, g.shape)) if a == 1 and b != 1)
    return mx.sum(g, axis=axes, keepdims=True) if axes else g


def _elementwise_sum(terms: list[_Elem], shape: tuple, col: bool = False) -> mx.array:
    """Σ_elements Σ_s part_s per chain [C, 1] over element arrays of ``shape`` [C, *batch
    shape] (scalar sites: columns [C, 1]), as one custom function whose reverse mode is written out (``_backward``,
    summed over each operand's broadcast axes): autodiff of the same expression shares
    intermediates between the forward and backward kernels (each shared one is a
    kernel) and reduces again what the forward reduced. For a single Normal term
    whose σ is one number per chain, ∂/∂σ = Σ z²/σ reuses the forward's sum
    (Σ z² = −2·out). ``col``: the sum as a column [C, 1] (kept dims: no Squeeze, and
    the cotangent needs no reshape; scalar sites' arrays are columns), else [C]."""
    slots = [(i, f) for i, t in enumerate(terms) for f in t.traced]
    axes = tuple(range(1, len(shape)))  # none for scalar sites (columns [C, 1])

    def bind(arrays) -> list[_Elem]:
        ts = [t._asdict() for t in terms]
        for (i, f), a in zip(slots, arrays):
            ts[i][f] = a
        return [_Elem(**t) for t in ts]

    @mx.custom_function
    def f(*arrays):
        e = _forward_sum(bind(arrays))
        return mx.sum(e, axis=axes, keepdims=col) if axes else e

    @f.vjp
    def f_vjp(primals, cot, out):
        primals = primals if isinstance(primals, (tuple, list)) else (primals,)  # one argument: given bare
        g = cot if col or not axes else cot.reshape(cot.shape + (1,) * len(axes))
        ts = bind(primals)
        reuse = len(terms) == 1 and not terms[0].cauchy and not terms[0].logscale
        grads = []
        for (i, fld), p in zip(slots, primals):
            if fld == "scale" and reuse and math.prod(p.shape[1:]) == 1:
                grads.append(_as_shape(-2.0 * out * cot / p, p.shape))
            else:
                grads.append(_as_shape(_unbroadcast(_backward(ts[i], fld) * g, _field(ts[i], fld).shape), p.shape))
        return tuple(grads)

    out = f(*[getattr(terms[i], fld) for i, fld in slots])
    return _as_col(out) if col else out


def _group_sum(terms: list[_Elem], shape: tuple) -> mx.array:
    """Σ_elements Σ_s part_s per chain [C, 1] of the sites of one shape [C, *batch shape]:
    :func:`_elementwise_sum`, except for scalar sites (no reduction) without the Cauchy
    form, where autodiff is as small: there the custom function's output is one more
    kernel, and differentiating −½z² shares at most z."""
    if len(shape) > 1 or any(t.cauchy for t in terms):
        return _elementwise_sum(terms, shape, col=True)
    return _forward_sum(terms)


def _site_terms(site: _Site, params: list, x: mx.array | None):
    """(elementwise part or None, remainder) of a hoisted site's per-chain log density:
    the closed form where it applies, else (None, Σ log p per chain)."""
    if site.fast:
        r = _fast_score(site, params, x)
        if r is not None:
            return r
    return None, _hoisted_score(site, params, x)


def _hoisted_score(site: _Site, params: list, x: mx.array | None) -> mx.array:
    """Σ over the site's elements of log p, per chain: [C, 1] (the family's elementwise
    ``_log_prob``, summed; a scalar site as a column)."""
    rank = max(len(site.batch_shape), 1)
    d = object.__new__(type(site.dist))  # a shallow copy (GFs refuse copy/pickle)
    d.__dict__.update(vars(site.dist))
    batched = dict(site.consts)
    batched.update({n: _aligned(p, rank) for n, p in zip(site.names, params)})
    for attr, n in site.attrs.items():
        setattr(d, attr, batched[n])
    d._params = batched
    value = x if x is not None else site.value
    lp = d._log_prob(value)
    if lp.ndim == rank + 1:
        return _colsum(lp)
    if lp.ndim <= len(site.batch_shape):  # independent of the chain (a scalar, broadcast when added)
        return _total(lp)
    raise StructureChanged("log-density shape")


_ONES: dict = {}


def _ones(c: int) -> mx.array:
    """The cotangent 1 [C, 1] of Σ_c log π_c (log π as a column) as a constant input of the compiled gradient
    (differentiating ``mx.sum`` would broadcast it in the graph); one array per C, so
    that the steps of a trajectory share it."""
    if c not in _ONES:
        _ONES[c] = mx.array(np.ones((c, 1), dtype=np.float32))
    return _ONES[c]


class FlatDensity(UnconstrainedDensity):
    """log π(u) on R^D by the flat path (see the module docstring); same interface and
    values as :class:`UnconstrainedDensity`. ``hoist``: score eligible sites outside
    the vmap (smaller graph); ``fast``: hoisted Normal / HalfNormal / HalfCauchy sites by
    their closed-form per-chain sums (constants folded at trace time)."""

    def __init__(self, model, args: tuple, observations=None, latents: list[Latent] | None = None,
                 hoist: bool = True, fast: bool = True):
        if not isinstance(model, DynamicGF):
            raise TypeError("FlatDensity needs a @gm.gen model")
        self.hoist = hoist
        self.fast = hoist and fast
        if latents is None:
            super().__init__(model, args, observations)
        else:  # reuse a generic density's discovery
            self.model, self.args, self.observations = model, tuple(args), _as_cm(observations)
            self.latents = list(latents)
            self.dim = sum(l.size for l in self.latents)
        self.last_plan: _Plan | None = None  # the sites of the latest traced execution
        # latents on fixed supports (found by one traced run): transformed outside the vmap
        self._fixed: dict = {}
        # latent vectors on R whose every element the body takes by an integer index:
        # given to the body per element (one column of U each), see _body_ops
        self._columns: set = set()
        self._pieces = [(l, None) for l in self.latents]
        if hoist:
            ops = BodyOps()
            ins, cols, _, _ = self._inputs(self._blocks(mx.zeros((1, self.dim))))
            mx.vmap(lambda *b: self._body(*b, ops=ops))(*ins, *cols)
            sups = self.last_plan.supports
            self._fixed = {l.path: sups[l.path] for l in self.latents
                           if l.path in sups and _fixed_support(sups[l.path], l.shape, l.ushape)}
            if self.fast:
                self._columns = {l.path for l in self.latents
                                 if l.shape == l.ushape == (l.size,) and isinstance(sups.get(l.path), _Real)
                                 and ops.indexed.get(l.path) == set(range(l.size))}
                self._pieces = [(l, j) for l in self.latents
                                for j in (range(l.size) if l.path in self._columns else (None,))]
        self._vg = mx.compile(self._make_value_and_grad())
        self._vgc = mx.compile(self._make_value_and_grad(col=True))
        self._vgb = mx.compile(self._value_and_grad_blocks)
        self._batched = mx.compile(self._lp_mapped)
        self._constrain = mx.compile(mx.vmap(self._constrained_leaves))  # generic (not hot)

    # -- evaluation ----------------------------------------------------------------
    @staticmethod
    def _scalar(piece) -> bool:
        """Whether a piece is one number per chain (a scalar latent, or an element of a
        latent given per column): its block is a column [C, 1] of U."""
        l, j = piece
        return j is not None or l.ushape == ()

    def _blocks(self, U: mx.array) -> list:
        """The latents' blocks of U [C, D] (one Split node): [C, *ushape] each, a column
        [C, 1] for a scalar latent and for each element of a latent given per column."""
        c = U.shape[0]
        cuts = [l.offset + (j or 0) for l, j in self._pieces[1:]]
        parts = mx.split(U, cuts, axis=1) if cuts else [U]
        return [b if self._scalar((l, j)) or l.ushape == (l.size,) else b.reshape((c,) + l.ushape)
                for (l, j), b in zip(self._pieces, parts)]

    def _inputs(self, blocks: list):
        """The vmap's inputs from the blocks: one per piece ([C] for a scalar one, a view
        that is not built if the body only lifts it), then the scalar pieces' columns
        [C, 1] (their lifts, :class:`BodyOps`); x = f(u) for the latents on a fixed
        support ({path: x}) and their Σ log|J| per chain ({path: [C, 1]})."""
        ins, cols, xs, lds = [], [], {}, {}
        c = blocks[0].shape[0]
        for (l, j), b in zip(self._pieces, blocks):
            sup = None if j is not None else self._fixed.get(l.path)
            if sup is not None:  # x = f(u) and Σ log|J| per chain, batched
                b, ld = _from_unconstrained(sup, b), sup.log_abs_det_jacobian(b)
                xs[l.path] = b
                lds[l.path] = _colsum(ld)
            if self._scalar((l, j)):
                cols.append(b)
                b = b.reshape(c)
            ins.append(b)
        return ins, cols, xs, lds

    def _sub_choicemap(self, blocks: dict, prefix: tuple) -> ChoiceMap:
        """Observations and ``UnconstrainedValue`` latents below ``prefix``, relative to it."""
        cm = self.observations.submap_at_path(prefix)
        n = len(prefix)
        for path, ua in blocks.items():
            if path[:n] == prefix:
                cm = cm.set_submap(path[n:], ChoiceMap.leaf(UnconstrainedValue(ua)))
        return cm

    def _body(self, *inputs, ops: BodyOps | None = None):
        """One chain's execution (under ``mx.vmap``): ``inputs`` as :meth:`_inputs`."""
        plan = _Plan()
        n = len(self._pieces)
        blocks, lifts = inputs[:n], iter(inputs[n:])
        bl, cols, scalars = {}, {}, {}
        for k, ((l, j), b) in enumerate(zip(self._pieces, blocks)):
            if j is None:
                bl[l.path] = b
            else:
                cols.setdefault(l.path, []).append(b)
            if self._scalar((l, j)):
                scalars[id(b)] = (b, k, next(lifts))
        bl.update({p: mx.stack(c) for p, c in cols.items()})  # used only if the body uses x whole
        with ops or BodyOps() as o:
            for b, _, col in scalars.values():
                o.column(b, col)
            subst = {i: (b, k) for i, (b, k, _) in scalars.items()}
            run_with_handler(_FlatHandler(self, bl, (), plan, o, cols, subst), self.model.fn, self.args)
        self.last_plan = plan
        return plan.outputs if plan.outputs else [mx.array(0.0)]

    def _lp(self, U: mx.array) -> mx.array:
        """log π of every row of U [C, D] (NaN kept): [C]."""
        return self._lp_blocks(self._blocks(U)).reshape(U.shape[0])

    def _lp_blocks(self, blocks: list) -> mx.array:
        """log π from the blocks of U (:meth:`_blocks`) as a column [C, 1]."""
        ins, cols, xs, lds = self._inputs(blocks)
        c = blocks[0].shape[0]
        outs = mx.vmap(self._body)(*ins, *cols)
        plan = self.last_plan
        scal = [k for k, piece in enumerate(self._pieces) if self._scalar(piece)]
        colx = dict(zip(scal, cols))

        def out(i):  # a vmap output; a per-chain scalar as a column [C, 1]
            k = plan.subst.get(i)
            a = colx[k] if k is not None else outs[i]
            return _as_col(a) if a.ndim == 1 else a

        lp, i, groups = None, 0, {}
        for s in plan.sites:
            if s.hoisted:
                k = len(s.names)
                params = [out(i + r) for r in range(k)]
                i += k
                if s.outside:
                    x = xs[s.path]
                elif s.latent:
                    x = out(i)
                    i += 1
                else:
                    x = None
                elem, term = _site_terms(s, params, x)
                if elem is not None:  # with same-shape parts: one reduction per shape
                    groups.setdefault((c,) + s.batch_shape, []).append(elem)
                if s.logdet:
                    term = term + out(i)
                    i += 1
            else:
                term = out(i)
                i += 1
            if s.outside:
                term = term + lds[s.path]
            lp = term if lp is None else lp + term
        for shape, terms in groups.items():
            lp = _group_sum(terms, shape) + (0.0 if lp is None else lp)
        if lp is None or not isinstance(lp, mx.array):
            return mx.full((c, 1), 0.0 if lp is None else float(lp))
        return lp if lp.ndim == 2 else mx.broadcast_to(lp, (c, 1))

    def _lp_mapped(self, U):
        lp = self._lp(U)
        return mx.where(mx.isnan(lp), -mx.inf, lp)

    def _value_and_grad_col(self, blocks: list):
        """(log π [C, 1] with NaN → −inf, ∇ log π per latent block): the gradient of
        Σ_c log π(U_c) with respect to the blocks (rows are independent)."""
        (lp,), gb = mx.vjp(lambda *bl: [self._lp_blocks(list(bl))], list(blocks), [_ones(blocks[0].shape[0])])
        return mx.where(mx.isnan(lp), -mx.inf, lp), list(gb)

    def _value_and_grad_blocks(self, blocks: list):
        """:meth:`_value_and_grad_col` with log π [C]."""
        lp, gb = self._value_and_grad_col(blocks)
        return lp.reshape(lp.shape[0]), gb

    def _make_value_and_grad(self, col: bool = False):
        """(log π [C] (``col``: [C, 1]), ∇ log π) of U [C, D]: differentiated with respect
        to the latents' blocks and concatenated (fewer graph nodes than scattering into
        U's slices)."""
        vgb = self._value_and_grad_col if col else self._value_and_grad_blocks

        def f(U):
            lp, gb = vgb(self._blocks(U))
            return lp, self.join(gb)

        return f

    # -- block form: one block per latent, [C, *ushape] (per element: [C] each) ---------
    def split(self, U: mx.array) -> list:
        return self._blocks(U)

    def join(self, blocks: list) -> mx.array:
        c = blocks[0].shape[0]
        flat = [b if b.ndim == 2 else b.reshape(c, -1) for b in blocks]
        return flat[0] if len(flat) == 1 else mx.concatenate(flat, axis=1)

    def value_and_grad_blocks(self, blocks: list) -> tuple[mx.array, list]:
        return self._vgb(list(blocks))

    def value_and_grad_col(self, U: mx.array) -> tuple[mx.array, mx.array]:
        return self._vgc(U)

    def log_density(self, u: mx.array) -> mx.array:
        """log π(u) for one u ∈ R^D (NaN mapped to −inf)."""
        return self._lp_mapped(u[None])[0]

    def batched_log_density(self, U: mx.array) -> mx.array:
        return self._batched(U)



def _signature(dens: UnconstrainedDensity, u: mx.array):
    """(address, shape) of every choice of the generic execution at u [D], and its weight."""
    tr, w = dens.model.generate(_key0(), dens.args, dens.choicemap(u))
    return [(p, tuple(v.shape)) for p, v in tr.choices.leaves()], w


def _agrees(generic: UnconstrainedDensity, fd: FlatDensity, U: mx.array) -> str | None:
    """None if both densities give the same values and gradients at the rows of U."""
    lp0, g0 = generic.value_and_grad(U)
    lp1, g1 = fd.value_and_grad(U)
    a, b = np.array(lp0, dtype=np.float64), np.array(lp1, dtype=np.float64)
    ga, gb = np.array(g0, dtype=np.float64), np.array(g1, dtype=np.float64)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)):
        return "flat and generic densities differ in finiteness"
    fin = np.isfinite(a)
    if not np.allclose(a[fin], b[fin], rtol=1e-4, atol=1e-4):
        return f"flat and generic densities differ ({b} vs {a})"
    if not np.allclose(ga[fin], gb[fin], rtol=1e-3, atol=1e-3 * (1 + np.abs(ga[fin]).max(initial=0))):
        return "flat and generic gradients differ"
    return None


def make_density(model, args: tuple, observations=None, key: mx.array | None = None,
                 flat: bool | None = None) -> UnconstrainedDensity:
    """The density used by HMC / NUTS / MALA: a :class:`FlatDensity` when the model's
    structure is static (see the module docstring), else the generic
    :class:`UnconstrainedDensity`. ``flat=False`` forces the generic path; ``flat=True``
    raises if the flat path cannot be used."""
    generic = UnconstrainedDensity(model, args, observations, key)
    if flat is False:
        return generic
    why = "the model is not a @gm.gen function"
    if isinstance(model, DynamicGF):
        d = generic.dim
        pts = mx.concatenate([mx.zeros((1, d)),
                              mx.random.uniform(-2.0, 2.0, (2, d), key=mx.random.key(12345))])
        why = None
        try:
            ref = _signature(generic, pts[0])[0]
            for r in range(1, pts.shape[0]):
                if _signature(generic, pts[r])[0] != ref:
                    why = "the addresses or shapes of the choices depend on the latent values"
                    break
        except Exception as e:  # an execution failed at a latent value: not static
            why = f"the generic execution failed at a probe point ({type(e).__name__}: {e})"
        if why is None:
            for hoist, fast in ((True, True), (True, False), (False, False)):
                try:
                    fd = FlatDensity(model, args, observations, latents=generic.latents, hoist=hoist, fast=fast)
                    why = _agrees(generic, fd, pts)
                except StructureChanged as e:
                    why = f"the model visits {e.args[0]!r}, which is neither a latent nor observed"
                except Exception as e:
                    why = f"the flat evaluation failed ({type(e).__name__}: {e})"
                if why is None:
                    return fd
    if flat:
        raise ValueError(f"flat density unavailable: {why}")
    return generic


# -- reuse across calls -------------------------------------------------------------------
_DENSITIES: "OrderedDict[tuple, UnconstrainedDensity]" = OrderedDict()
_MAX_CACHED = 8


def _content_key(model, args, observations):
    """A hashable key of (model, argument and observation contents), or None when the
    inputs cannot be keyed (unhashable statics) or the model holds neural-network
    modules (their weights may change between calls)."""
    from genmlx.core.pytree import tree_flatten
    from genmlx.inference._util import _module_states

    if _module_states((model, args)):
        return None
    leaves, td = tree_flatten((tuple(args), _as_cm(observations)))
    h = hashlib.blake2b(digest_size=16)
    for x in leaves:
        a = np.asarray(x)
        h.update(repr((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    key = (model, td, h.hexdigest())
    try:
        hash(key)
    except TypeError:
        return None
    return key


def cached_density(model, args: tuple, observations=None) -> UnconstrainedDensity:
    """:func:`make_density`, reused for a repeated (model, args, observations) — equal
    contents — so that repeated runs reuse its compiled functions (as a jitted sampler
    is reused). Models with neural-network modules are not cached. Arrays a model
    reads from outside its arguments are captured when first compiled, as with any
    compiled function; :func:`clear_density_cache` forgets everything."""
    key = _content_key(model, args, observations)
    if key is not None and key in _DENSITIES:
        _DENSITIES.move_to_end(key)
        return _DENSITIES[key]
    d = make_density(model, args, observations)
    if key is not None:
        _DENSITIES[key] = d
        if len(_DENSITIES) > _MAX_CACHED:
            _DENSITIES.popitem(last=False)
    return d


def cached_kernel(density: UnconstrainedDensity, cls, *params):
    """One ``cls(density, *params)`` per density (its compiled steps are kept)."""
    store = density.__dict__.setdefault("_kernels", {})
    k = (cls, params)
    if k not in store:
        store[k] = cls(density, *params)
    return store[k]


def clear_density_cache() -> None:
    """Forget the cached densities (and their compiled kernels)."""
    _DENSITIES.clear()
