"""Shared helpers for the benchmarks: timing with warm-up, peak memory, machine info.

Timing protocol: call ``fn`` a few times untimed (compilation, caches, OpenBLAS
threads), then time ``repeats`` calls, each ending in ``mx.eval`` of everything ``fn``
returns (MLX is lazy: without the eval nothing would be measured), and report the median.
Import ``genmlx`` before this module so the fast BLAS is loaded before ``mlx.core``.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import genmlx as gm  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Timing:
    """Seconds per call: ``median`` over ``times`` (each one call, eval included)."""

    median: float
    min: float
    times: tuple[float, ...]

    def __str__(self) -> str:
        return f"{fmt_seconds(self.median)} (min {fmt_seconds(self.min)}, {len(self.times)} runs)"


def timeit(fn: Callable[..., Any], *args, warmup: int = 2, repeats: int = 7,
           min_total: float = 0.0) -> Timing:
    """Median wall time of ``mx.eval(fn(*args))`` after ``warmup`` untimed calls.

    With ``min_total`` > 0, keeps repeating (beyond ``repeats``) until the timed calls
    add up to at least that many seconds, for fast functions.
    """
    for _ in range(warmup):
        mx.eval(fn(*args))
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_total:
        t0 = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return Timing(statistics.median(times), min(times), tuple(times))


def device_time_us(fn: Callable[[], Any], repeats: int) -> float:
    """Median µs of ``mx.eval(fn())`` followed by ``mx.synchronize()`` (the device's queue
    drained inside the timed region) over ``repeats`` calls after one warm-up call."""
    mx.eval(fn())
    mx.synchronize()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        ts.append(time.perf_counter() - t)
    return float(statistics.median(ts)) * 1e6


def timeit_interleaved(fns: dict[str, Callable[..., Any]], *args, warmup: int = 2,
                       repeats: int = 7, min_total: float = 0.0) -> dict[str, Timing]:
    """Like :func:`timeit` for several functions, timed round-robin (one call of each per
    round) so that varying machine load hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            mx.eval(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < repeats or min(sum(v) for v in times.values()) < min_total:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            mx.eval(fn(*args))
            times[name].append(time.perf_counter() - t0)
        rounds += 1
        if rounds >= 1000:
            break
    return {k: Timing(statistics.median(v), min(v), tuple(v)) for k, v in times.items()}


def jax_env(platform: str) -> dict:
    """Environment of a JAX peer's subprocess on ``platform`` ("cpu" or "cuda"): the CPU
    run sees no GPU; the CUDA run keeps the caller's environment (library paths) and
    allocates GPU memory on demand (genmlx's process may still hold some)."""
    if platform == "cpu":  # no CUDA libraries or MLX BLAS settings; the module and command
        # paths stay (a peer named as `python3` may be a venv's, found through PATH)
        keep = {k: os.environ[k] for k in ("PYTHONPATH", "HOME", "PATH") if k in os.environ}
        return {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", **keep}
    return dict(os.environ, JAX_PLATFORMS=platform, XLA_PYTHON_CLIENT_PREALLOCATE="false")


def peak_memory(fn: Callable[..., Any], *args) -> int:
    """Peak bytes held by MLX's allocator during one evaluated call of ``fn``.

    Uses ``mx.reset_peak_memory`` / ``mx.get_peak_memory`` (MLX ≥ 0.2x, CPU included);
    inputs already alive count too, so compare functions with the same inputs.
    """
    mx.eval(fn(*args))  # compile / warm first so the measured call is the steady state
    mx.clear_cache()
    mx.reset_peak_memory()
    out = fn(*args)
    mx.eval(out)
    peak = mx.get_peak_memory()
    del out
    return int(peak)


def fmt_seconds(t: float) -> str:
    if t < 1e-3:
        return f"{t * 1e6:.0f} µs"
    if t < 1:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"


def git_commit() -> str:
    """Short commit hash of the repository, with ``+dirty`` when files are modified. A
    snapshot without its own ``.git`` (``git archive`` for the GPU machine, which may sit
    inside another checkout) names its commit in a ``COMMIT`` file instead."""
    stamp = REPO / "COMMIT"
    if not (REPO / ".git").exists() and stamp.exists():
        return stamp.read_text().strip() + " (snapshot)"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> str:
    """One line: CPU, cores, memory, OS, Python, MLX version, device, BLAS."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem_s = f"{mem:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        mem_s = "RAM unknown"
    blas = gm.describe_blas().removeprefix("genmlx BLAS: ").split(" [")[0]
    return (f"{cpu_model()}, {os.cpu_count()} cores, {mem_s}; {platform.system()} "
            f"{platform.machine()}; Python {platform.python_version()}; MLX {mx.__version__} "
            f"({mx.default_device()}); BLAS: {blas}")


def results_header(title: str, note: str = "") -> str:
    """Markdown heading + date / machine / commit lines for ``benchmarks/RESULTS.md``."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {title}", "", f"- Date: {now}", f"- Machine: {machine_info()}",
             f"- Commit: {git_commit()}", f"- Command: `{' '.join([Path(sys.executable).name] + sys.argv)}`"]
    try:
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        lines.append(f"- Load average at start (1/5/15 min): {load}")
    except OSError:
        pass
    if note:
        lines.append(f"- Note: {note}")
    return "\n".join(lines) + "\n"


def append_results(title: str, body: str, note: str = "") -> Path:
    """Append a section (header from :func:`results_header`, then ``body``) to
    ``benchmarks/RESULTS.md``; returns the file's path."""
    out = Path(__file__).resolve().parent / "RESULTS.md"
    with out.open("a") as f:
        f.write("\n" + results_header(title, note) + "\n" + body)
    print(f"appended to {out}")
    return out


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"
