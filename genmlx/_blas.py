"""Load an optimized BLAS before MLX on Linux.

MLX's Linux backend wheels (``mlx-cpu``, and ``mlx-cuda-*`` for CPU-stream ops) link the
netlib *reference* BLAS/LAPACK that they ship in ``mlx_cpu.libs`` / ``mlx_cuda_*.libs``
(about 6 GFLOP/s for a float32 1024² matmul). Loading OpenBLAS from the
``cmeel-openblas`` wheel with ``RTLD_GLOBAL`` *before* ``mlx.core``
is imported puts OpenBLAS's ``cblas_*`` / LAPACK symbols in the process's global
lookup scope, which the dynamic linker searches before MLX's own dependencies, so
MLX's calls resolve to OpenBLAS (30× faster matmul, identical results up to float32
rounding).

``cmeel-openblas`` needs ``libgfortran.so.5`` but does not ship it. When the system has
none, we take the libgfortran that MLX's backend wheel (or numpy/scipy) bundles: those copies
are renamed by auditwheel (SONAME ``libgfortran-<hash>.so.5.0.0``), so the dynamic
linker would not accept them for ``libgfortran.so.5``. We load an in-memory copy
(``memfd``) whose SONAME is rewritten to ``libgfortran.so.5``; nothing is written to
disk and no installed file is touched.

This runs once, from ``import genmlx``. ``GENMLX_OPENBLAS=0`` keeps the reference BLAS;
``describe_blas()`` gives a one-line report of the BLAS in use. It is a no-op on
macOS (Accelerate) and whenever MLX does not ship the reference BLAS.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import struct
import sys
import warnings

_state: dict = {"blas": None, "path": None, "detail": None, "fds": []}

_OPT_OUT_VALUES = ("0", "false", "no", "off")
_GFORTRAN = "libgfortran.so.5"


# -- locating the libraries ---------------------------------------------------------
def _site_dirs() -> list[str]:
    return [e for e in sys.path if e and os.path.isdir(e)]


def _openblas_path() -> str | None:
    """``cmeel.prefix/lib/libopenblas.so*`` from the first site directory that has it."""
    for entry in _site_dirs():
        cands = sorted(glob.glob(os.path.join(entry, "cmeel.prefix", "lib", "libopenblas.so*")))
        if cands:
            return cands[0]
    return None


def _mlx_locations() -> list[str]:
    """Directories of the ``mlx`` package (a namespace package: there may be several)."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return []
    return list(spec.submodule_search_locations)


def _mlx_libs_dir() -> str | None:
    """The libraries bundled with MLX's Linux backend wheel (``mlx_cpu.libs``,
    ``mlx_cuda_13.libs``, …) beside an ``mlx`` directory: the one holding a reference
    ``libblas``, or None."""
    for loc in _mlx_locations():
        for d in sorted(glob.glob(os.path.join(os.path.dirname(loc), "mlx_*.libs"))):
            if glob.glob(os.path.join(d, "libblas-*.so*")):
                return d
    return None


def _mlx_uses_reference_blas() -> bool:
    """True when the installed MLX backend ships (and so links) the netlib reference BLAS."""
    return _mlx_libs_dir() is not None


def _check_linux_backend() -> None:
    """On Linux the ``mlx`` wheel alone has no backend library: say how to get one.

    Only when no ``mlx/lib/libmlx.so`` is found is ``mlx.core`` imported to check (other
    layouts, e.g. conda builds, import fine and are left alone)."""
    locs = _mlx_locations()
    if not locs or any(os.path.exists(os.path.join(loc, "lib", "libmlx.so")) for loc in locs):
        return
    try:
        import mlx.core  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "genmlx: MLX is installed without a backend (no mlx/lib/libmlx.so). On Linux "
            "install one: pip install 'genmlx[cpu]' (CPU) or 'genmlx[cuda]' (NVIDIA GPU, "
            "CUDA 13), or equivalently 'mlx[cpu]' / 'mlx[cuda13]'"
        ) from e


def _bundled_gfortrans() -> list[str]:
    """libgfortran copies bundled by wheels: MLX's backend's first, then numpy's, scipy's."""
    dirs = [_mlx_libs_dir()] + [
        os.path.join(e, name) for e in _site_dirs() for name in ("numpy.libs", "scipy.libs")
    ]
    out = []
    for d in dirs:
        if d and os.path.isdir(d):
            out += sorted(glob.glob(os.path.join(d, "libgfortran*.so*")))
    return out


# -- a minimal ELF64 reader: the dynamic section's NEEDED and SONAME --------------------
def _elf_dynamic(data: bytes) -> tuple[int, list[str], tuple[int, str] | None]:
    """(file offset of .dynstr, NEEDED names, (file offset, value) of SONAME or None).

    Only 64-bit little-endian ELF (x86-64, aarch64 Linux); raises ValueError otherwise.
    """
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize
        )
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        raise ValueError("no dynamic section")
    tags: list[tuple[int, int]] = []
    for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:  # DT_NULL
            break
        tags.append((tag, val))
    strtab_vaddr = next(v for t, v in tags if t == 5)  # DT_STRTAB
    strtab = next(
        (off + strtab_vaddr - va for va, off, sz in loads if va <= strtab_vaddr < va + sz), None
    )
    if strtab is None:
        raise ValueError("DT_STRTAB outside the loadable segments")

    def string(o: int) -> str:
        end = data.index(b"\0", strtab + o)
        return data[strtab + o:end].decode()

    needed = [string(v) for t, v in tags if t == 1]  # DT_NEEDED
    soname = next(((strtab + v, string(v)) for t, v in tags if t == 14), None)  # DT_SONAME
    return strtab, needed, soname


def _renamed_copy(data: bytes, soname: str) -> bytes:
    """``data`` with its SONAME overwritten in place by the (not longer) ``soname``."""
    _, _, old = _elf_dynamic(data)
    if old is None or len(old[1]) < len(soname):
        raise ValueError("no SONAME long enough to rewrite")
    off = old[0]
    new = soname.encode() + b"\0"
    return data[:off] + new + data[off + len(new):]


def _load_from_memory(data: bytes) -> ctypes.CDLL:
    fd = os.memfd_create("genmlx-libgfortran", 0)
    os.write(fd, data)
    _state["fds"].append(fd)  # kept open: the /proc/self/fd/N name must stay unique
    return ctypes.CDLL(f"/proc/self/fd/{fd}", mode=ctypes.RTLD_GLOBAL)


def _preload_bundled_gfortran() -> str:
    """Load a bundled libgfortran under the SONAME ``libgfortran.so.5``; its path."""
    errors = []
    for path in _bundled_gfortrans():
        try:
            with open(path, "rb") as f:
                data = f.read()
            _, needed, _ = _elf_dynamic(data)
            folder = os.path.dirname(path)
            for dep in needed:  # the renamed libquadmath next to it ($ORIGIN rpath)
                dep_path = os.path.join(folder, dep)
                if os.path.exists(dep_path):
                    ctypes.CDLL(dep_path, mode=ctypes.RTLD_GLOBAL)
            _load_from_memory(_renamed_copy(data, _GFORTRAN))
            return path
        except (OSError, ValueError, StopIteration) as e:
            errors.append(f"{os.path.basename(path)}: {e}")
    raise OSError("no usable bundled libgfortran (" + "; ".join(errors or ["none found"]) + ")")


def _load_openblas(path: str) -> str:
    """dlopen OpenBLAS globally; returns where libgfortran came from."""
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        return "system libgfortran"
    except OSError as e:
        if "libgfortran" not in str(e):
            raise
    source = _preload_bundled_gfortran()
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return f"libgfortran from {os.path.basename(os.path.dirname(source))}"


def _openblas_config() -> str:
    """``openblas_get_config()`` of the globally visible OpenBLAS, e.g. 'OpenBLAS 0.3.31 …'."""
    fn = ctypes.CDLL(None).openblas_get_config
    fn.restype = ctypes.c_char_p
    return fn().decode().strip()


def active_blas_library() -> str | None:
    """The file that ``cblas_sgemm`` resolves to in the global symbol scope (what MLX's
    CPU backend calls once OpenBLAS is loaded globally), or None when none is global."""
    libc = ctypes.CDLL(None)
    try:
        addr = ctypes.cast(libc.cblas_sgemm, ctypes.c_void_p).value
    except AttributeError:
        return None

    class _DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    info = _DlInfo()
    if not libc.dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) or not info.dli_fname:
        return None
    return info.dli_fname.decode()


# -- public ---------------------------------------------------------------------------
def ensure_fast_blas() -> str:
    """Load OpenBLAS globally when MLX would otherwise use the reference BLAS.

    Returns the one-line report of :func:`describe_blas`. Must run before ``mlx.core`` is
    imported to take effect; afterwards (or a second time) it only reports.
    """
    if _state["blas"] is not None:
        return describe_blas()
    _state["blas"] = _decide()
    return describe_blas()


def _decide() -> str:
    if not sys.platform.startswith("linux"):
        return "platform BLAS (Accelerate on macOS)"
    _check_linux_backend()
    reference = _mlx_uses_reference_blas()
    if not reference:
        return "MLX's own BLAS (no reference BLAS bundled with MLX)"
    if os.environ.get("GENMLX_OPENBLAS", "1").strip().lower() in _OPT_OUT_VALUES:
        return f"reference BLAS (netlib, bundled in {os.path.basename(_mlx_libs_dir())}; GENMLX_OPENBLAS=0)"
    path = _openblas_path()
    if "mlx.core" in sys.modules:
        if path is not None:
            warnings.warn(
                "genmlx: mlx.core was imported before genmlx, so MLX keeps its reference BLAS "
                "(~30x slower matmul); import genmlx before mlx.core",
                RuntimeWarning, stacklevel=4,
            )
        return "reference BLAS (mlx.core was imported before genmlx; import genmlx first)"
    if path is None:
        return "reference BLAS (install cmeel-openblas for ~30x faster matmul)"
    try:
        detail = _load_openblas(path)
        config = _openblas_config()
    except (OSError, AttributeError) as e:
        return f"reference BLAS (loading {path} failed: {e})"
    _state["path"], _state["detail"] = path, f"{config}; {detail}"
    return "OpenBLAS"


def describe_blas() -> str:
    """One line saying which BLAS MLX's CPU backend uses in this process."""
    b = _state["blas"] or "not determined (ensure_fast_blas not run)"
    line = f"genmlx BLAS: {b}"
    if _state["detail"]:
        line += f" ({_state['detail']})"
    if _state["path"]:
        line += f" [{_state['path']}]"
    return line


# -- worker threads -------------------------------------------------------------------
# OpenBLAS parallelises a matmul over its worker threads. For the tiny matrix-vector
# products of an MCMC gradient (a few chains times a small design matrix, thousands of
# times a second) the hand-off to and from the workers costs more than the product, and
# the workers spin while waiting for the next call: on a loaded machine with few cores
# they take CPU time from MLX's own thread (NUTS on a 100×5 regression ran 1.4–2× faster
# with one OpenBLAS thread on a shared 2-core machine). Large products (``a @ b`` at
# 1024²) still want every thread, so the thread count is set per run of small work, not
# once per process: the MCMC drivers run under :func:`blas_threads_for` (see there).
_THREAD_ENV = "GENMLX_SMALL_BLAS_THREADS"
SMALL_WORK_ELEMENTS = 1 << 16  # data (× chains) below this: one BLAS thread for the run


def _openblas_fn(name: str):
    if _state["blas"] != "OpenBLAS":
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except AttributeError:
        return None


def get_blas_threads() -> int | None:
    """OpenBLAS's current worker-thread count, or None when OpenBLAS is not in use."""
    fn = _openblas_fn("openblas_get_num_threads")
    return None if fn is None else int(fn())


def set_blas_threads(n: int) -> int | None:
    """Set OpenBLAS's worker-thread count (n ≥ 1); returns the previous count, or None
    (and does nothing) when OpenBLAS is not in use."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_blas_threads: n must be a positive int, got {n!r}")
    fn = _openblas_fn("openblas_set_num_threads")
    if fn is None:
        return None
    prev = get_blas_threads()
    fn(ctypes.c_int(n))
    return prev


def small_work_threads() -> int | None:
    """The thread count for small work, from ``GENMLX_SMALL_BLAS_THREADS``: unset or
    ``auto`` → 1; a positive integer → that count; ``keep`` → None (leave OpenBLAS's
    setting alone)."""
    v = os.environ.get(_THREAD_ENV, "auto").strip().lower()
    if v in ("", "auto"):
        return 1
    if v == "keep":
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{_THREAD_ENV} must be 'auto', 'keep' or a positive int, got {v!r}")
    return n


class blas_threads_for:
    """Context manager: while the block runs, OpenBLAS uses :func:`small_work_threads`
    threads when ``elements`` (the work's size, e.g. data elements × chains) is below
    :data:`SMALL_WORK_ELEMENTS` and computation runs on the CPU; otherwise (or without
    OpenBLAS) nothing changes. The previous count is restored on exit."""

    def __init__(self, elements: int, cpu: bool = True):
        self.elements, self.cpu, self.prev = int(elements), cpu, None

    def __enter__(self):
        n = small_work_threads() if self.cpu and self.elements < SMALL_WORK_ELEMENTS else None
        if n is not None:
            cur = get_blas_threads()
            if cur is not None and cur != n:
                self.prev = set_blas_threads(n)
        return self

    def __exit__(self, *exc):
        if self.prev is not None:
            set_blas_threads(self.prev)
            self.prev = None
        return False
