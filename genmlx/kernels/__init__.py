"""Fused GPU kernels for the inference hot paths (``mx.fast.cuda_kernel``, with untested
Metal twins), each beside its generic MLX-ops reference, which runs on CPU, under
``GENMLX_KERNELS=0`` and for ``mx.grad`` (custom-function rules). The kernels cannot be
vmapped (see ``_backend``): :mod:`genmlx.inference.resampling` uses them only when asked
(``fused=True``, as the SMC steps do).

- :func:`weight_summary` — (logsumexp, ESS) of log-weights in one pass per row.
- :func:`resample_systematic`, :func:`resample_stratified` — ancestors by a scan kernel
  (each particle's CDF value in units of slots, int + fraction, accumulated in double:
  exact for any number of slots) and a per-slot binary-search kernel.
- :mod:`genmlx.kernels.gather` — row gathers by ancestor indices (one and two sources),
  used by SMC's drivers on CUDA (MLX's general gather elsewhere).
- :mod:`genmlx.kernels.sums` — per-example sums of 9–256 entries over many examples
  (a warp per row, a thread per column), used by every batched score's
  :func:`genmlx.core.batchwise.example_sum` on CUDA (they run inside its vmap rule, on the
  batched arrays, so vmapped models reach them).
- :mod:`genmlx.kernels.paths` — the ancestral paths of a run in one kernel: sharded,
  through the neighbours' halo edges (on by default on CUDA); one process, opt-in
  (``GENMLX_KERNELS=1``: it gains nothing over the row-gather kernel's path yet).

``python -m genmlx.kernels.selftest`` checks every kernel against its reference on the
current device and prints a JSON report.
"""

from genmlx.kernels._backend import active_backend, gpu_backend, mode, override, use_kernel
from genmlx.kernels.resample import resample_stratified, resample_systematic
from genmlx.kernels.weights import weight_summary, weight_summary_generic

__all__ = [
    "active_backend", "gpu_backend", "mode", "override", "use_kernel",
    "resample_stratified", "resample_systematic", "weight_summary", "weight_summary_generic",
]
