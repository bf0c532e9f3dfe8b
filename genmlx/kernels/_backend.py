"""Which kernel backend (if any) the fused inference kernels use, and the dispatch rule.

``GENMLX_KERNELS`` (environment, read at every call):
  - ``auto`` (default): the CUDA kernels when the default device is a CUDA GPU;
  - ``1``: also the Metal kernels on Apple GPUs (they are untested, hence opt-in);
  - ``0``: never; always the generic MLX-ops reference path.
:func:`override` sets the same switch for a block of code (tests, benchmarks).

A kernel is used only for a float32 input on the default GPU device. The kernels are
wrapped in ``mx.custom_function`` with vjp and jvp rules that take the generic path, so a
caller under ``mx.grad`` is still correct. They cannot run under ``mx.vmap``: MLX's custom
kernels have no vmap rule, and a custom function's own vmap rule does not help (MLX 0.32
still vmaps the forward computation, which the custom function's outputs depend on). So
the public resampling and weight functions of :mod:`genmlx.inference.resampling` take the
generic path unless called with ``fused=True``, which only drivers that are never vmapped
(the SMC steps) do.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator

import mlx.core as mx

_MODES = ("auto", "0", "1")
_override: str | None = None


def mode() -> str:
    """The current switch: ``auto``, ``0`` or ``1`` (see the module docstring)."""
    m = _override if _override is not None else os.environ.get("GENMLX_KERNELS", "auto")
    m = m.strip().lower()
    if m not in _MODES:
        raise ValueError(f"GENMLX_KERNELS must be one of {_MODES}, got {m!r}")
    return m


@contextlib.contextmanager
def override(value: str | bool) -> Iterator[None]:
    """Temporarily set the kernel switch (``True`` → ``"1"``, ``False`` → ``"0"``)."""
    global _override
    v = {True: "1", False: "0"}.get(value, value) if isinstance(value, bool) else str(value)
    if v not in _MODES:
        raise ValueError(f"kernel switch must be one of {_MODES} or a bool, got {value!r}")
    old, _override = _override, v
    try:
        yield
    finally:
        _override = old


def gpu_backend() -> str | None:
    """``"cuda"`` or ``"metal"`` when the default device is a GPU of that kind, else None."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


def active_backend() -> str | None:
    """The backend whose kernels a call would use now (None: the generic path)."""
    m = mode()
    if m == "0":
        return None
    b = gpu_backend()
    if b == "metal" and m != "1":
        return None
    return b


def use_kernel(x: mx.array) -> str | None:
    """The backend to run ``x`` through, or None for the generic path: kernels on, a
    GPU default device, and a non-empty float32 array."""
    if x.dtype != mx.float32 or x.size == 0 or x.ndim == 0:
        return None
    return active_backend()


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def with_generic_transforms(kernel_fn: Callable, generic_fn: Callable,
                            n_out: int, differentiable: bool) -> Callable:
    """``kernel_fn`` (the fused path) as an ``mx.custom_function`` whose vjp/jvp
    differentiate ``generic_fn`` (or give zero cotangents when the outputs are integers:
    ``differentiable=False``). Both functions take the same positional arrays and return
    a tuple of ``n_out`` arrays. No vmap rule: it would not be used (module docstring)."""

    @mx.custom_function
    def f(*xs):
        return tuple(kernel_fn(*xs))

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        primals = _tuple(primals)
        if not differentiable:
            return tuple(mx.zeros_like(p) for p in primals)
        _, grads = mx.vjp(lambda *a: list(generic_fn(*a)), list(primals), list(_tuple(cotangents)))
        return tuple(grads)

    @f.jvp
    def f_jvp(primals, tangents):
        primals, tangents = _tuple(primals), _tuple(tangents)
        if not differentiable:
            outs = kernel_fn(*primals)
            return tuple(mx.zeros_like(o) for o in outs)
        _, tans = mx.jvp(lambda *a: list(generic_fn(*a)), list(primals), list(tangents))
        return tuple(tans)

    return f


@functools.lru_cache(maxsize=None)
def build(backend: str, name: str, input_names: tuple, output_names: tuple, source: str,
          header: str = "", row_contiguous: bool = True) -> Callable:
    """The compiled-on-first-use ``mx.fast.{cuda,metal}_kernel`` object (cached)."""
    if backend == "cuda":
        return mx.fast.cuda_kernel(name=name, input_names=list(input_names),
                                   output_names=list(output_names), source=source,
                                   header=header, ensure_row_contiguous=row_contiguous)
    if backend == "metal":
        return mx.fast.metal_kernel(name=name, input_names=list(input_names),
                                    output_names=list(output_names), source=source,
                                    header=header, ensure_row_contiguous=row_contiguous)
    raise ValueError(f"unknown kernel backend {backend!r} (expected 'cuda' or 'metal')")
