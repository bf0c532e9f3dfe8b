"""Building blocks for encoders and decoders (all plain ``mlx.nn.Module``s)."""

from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from genmlx.core.batchwise import elementwise
from genmlx.core.validation import nested_vmap

_ACTIVATIONS: dict[str, Callable] = {
    "tanh": mx.tanh,
    "relu": nn.relu,
    "sigmoid": mx.sigmoid,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "elu": nn.elu,
    "softplus": nn.softplus,
    "leaky_relu": nn.leaky_relu,
    "identity": lambda x: x,
}


def activation(name_or_fn: str | Callable | None) -> Callable:
    """An activation function by name (``tanh``, ``relu``, ``sigmoid``, ``gelu``,
    ``silu``, ``elu``, ``softplus``, ``leaky_relu``, ``identity``) or a callable."""
    if name_or_fn is None:
        return _ACTIVATIONS["identity"]
    if callable(name_or_fn):
        return name_or_fn
    try:
        return _ACTIVATIONS[name_or_fn]
    except KeyError:
        raise ValueError(
            f"unknown activation {name_or_fn!r}; choose one of {sorted(_ACTIVATIONS)} or pass a callable"
        ) from None


class Activation(nn.Module):
    """An activation as a parameter-free layer (so MLPs are ``nn.Sequential``)."""

    def __init__(self, fn: str | Callable):
        super().__init__()
        self._fn = activation(fn)
        self._label = fn if isinstance(fn, str) else getattr(fn, "__name__", "fn")

    def __call__(self, x):
        return self._fn(x)

    def _extra_repr(self) -> str:
        return str(self._label)


def _affine_rows(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """``x @ weightᵀ + bias`` as one ``addmm`` on the rows of ``x`` (any rank ≥ 1)."""
    if x.ndim == 2:
        return mx.addmm(bias, x, weight.T)
    rows = x.reshape(-1, x.shape[-1])
    return mx.addmm(bias, rows, weight.T).reshape(*x.shape[:-1], weight.shape[0])


@mx.custom_function
def affine(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """``x @ weightᵀ + bias`` as ONE fused ``addmm`` (one kernel), for ``x`` of any rank
    ≥ 1. Under ``mx.vmap`` (rule below) the batch axes are folded into the rows of one
    2-D ``addmm``, so its gradient is the ordinary ``xᵀ g`` matmul, never a per-example
    weight gradient (which MLX 0.32's vmap of ``addmm`` would materialise). The rule
    returns the plain ``addmm`` (no custom-function node left in the graph), or, inside
    nested vmaps (:func:`genmlx.core.validation.nested_vmap`), ``affine`` again so that
    the enclosing vmap folds its axis into the rows too."""
    return _affine_rows(x, weight, bias)


@affine.vmap
def _affine_vmap(inputs, axes):
    x, weight, bias = inputs
    ax, aw, ab = axes
    if aw is None and ab is None:  # shared parameters: fold the batch axis into the rows
        rows = affine if nested_vmap() else _affine_rows
        return rows(x if ax == 0 else mx.moveaxis(x, ax, 0), weight, bias), 0
    # batched parameters (e.g. an ensemble): the plain formula, vmapped
    out = mx.vmap(lambda a, w, b: a @ w.T + b, in_axes=(ax, aw, ab))(x, weight, bias)
    return out, 0


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and initialisation) computing ``x Wᵀ + b`` with
    :func:`affine`: one ``addmm`` kernel, and under ``mx.vmap`` (every vectorized GFI
    operation and amortized objective runs networks under vmap) the batch folded into
    the rows. MLX 0.32's own ``nn.Linear`` (``addmm``) under vmap materializes
    per-example weight gradients ([B, in, out]) instead."""

    def __call__(self, x):
        if "bias" in self:
            return affine(x, self["weight"], self["bias"])
        return x @ self["weight"].T


def use_fast_linear(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Linear`` inside ``module`` into :class:`Linear` in place
    (same parameter arrays, same outputs); returns ``module``."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return module


def mlp(sizes: Sequence[int], activation: str | Callable = "tanh",
        out_activation: str | Callable | None = None) -> nn.Sequential:
    """Multilayer perceptron ``sizes[0] → … → sizes[-1]``: Linear layers with
    ``activation`` between them and ``out_activation`` (default none) after the last."""
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ValueError(f"mlp: sizes must list at least two positive widths, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(Linear(a, b))
        last = i == len(sizes) - 2
        if not last:
            layers.append(Activation(activation))
        elif out_activation is not None:
            layers.append(Activation(out_activation))
    return nn.Sequential(*layers)


class GaussianHead(nn.Module):
    """Linear map to a Gaussian's ``(mean, scale)``, each of size ``out_dim``, with
    scale = softplus(raw) + ``min_scale`` > 0."""

    def __init__(self, in_dim: int, out_dim: int, min_scale: float = 1e-4):
        super().__init__()
        if min_scale < 0:
            raise ValueError(f"GaussianHead: min_scale must be ≥ 0, got {min_scale}")
        self.mean = Linear(in_dim, out_dim)
        self.raw_scale = Linear(in_dim, out_dim)
        self.min_scale = min_scale

    def __call__(self, h):
        return self.mean(h), _positive_scale(self.min_scale, self.raw_scale(h))


@elementwise
def _positive_scale(min_scale: float, raw: mx.array) -> mx.array:
    """softplus(raw) + min_scale."""
    return nn.softplus(raw) + min_scale


class BernoulliHead(nn.Module):
    """Linear map to Bernoulli logits of size ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.logits = Linear(in_dim, out_dim)

    def __call__(self, h):
        return self.logits(h)


class SetEncoder(nn.Module):
    """Permutation-invariant set encoder (Deep Sets): ρ(pool_i φ(x_i)).

    Input ``[..., n, in_dim]`` (a set of n elements along axis −2), output
    ``[..., out_dim]``; ``pooling`` is ``"mean"`` or ``"sum"``. φ = mlp([in_dim, *hidden]),
    ρ = mlp([hidden[-1], hidden[-1], out_dim])."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int,
                 pooling: str = "mean", activation: str | Callable = "relu"):
        super().__init__()
        if pooling not in ("mean", "sum"):
            raise ValueError(f"SetEncoder: pooling must be 'mean' or 'sum', got {pooling!r}")
        hidden = list(hidden)
        if not hidden:
            raise ValueError("SetEncoder: hidden must list at least one width")
        self.phi = mlp([in_dim, *hidden], activation, out_activation=activation)
        self.rho = mlp([hidden[-1], hidden[-1], out_dim], activation)
        self.pooling = pooling

    def __call__(self, xs):
        h = self.phi(xs)
        pooled = mx.mean(h, axis=-2) if self.pooling == "mean" else mx.sum(h, axis=-2)
        return self.rho(pooled)
