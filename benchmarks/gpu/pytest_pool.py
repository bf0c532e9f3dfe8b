"""Run test files on the GPU machine one *test* per process, many processes side by side
(issue 8): a cold machine JIT-compiles every fused kernel (NVRTC, on the host), so a
heavy file run serially can take longer than a call; spread over the host's cores and
the GPUs, it finishes. ``--own-ptx`` gives each worker its own MLX PTX cache directory
(under ``$MLX_PTX_CACHE_DIR``): MLX's cache is not safe for concurrent writers (a process
died reading a kernel another was writing), but on a cold machine every worker then
compiles every kernel itself (session 7: the NUTS tests ran out of time that way), so the
shared cache is the default. Writes one log per test and a JSON
summary under --out, and prints per-file counts.

    python3 benchmarks/gpu/pytest_pool.py --out $OUT/pool --workers 14 --budget-s 400 FILE...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def collect(files: list[str]) -> list[str]:
    """Node ids of the tests in ``files`` (a file that fails to collect is one unit)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *files], capture_output=True, text=True)
    ids = [ln.strip() for ln in out.stdout.splitlines() if "::" in ln]
    seen = {i.split("::")[0] for i in ids}
    return ids + [f for f in files if f not in seen]


OWN_PTX = False  # --own-ptx
_SLOT = threading.local()
_SLOTS = itertools.count()


def _ptx_dir() -> dict:
    """This worker thread's own PTX cache directory (``MLX_PTX_CACHE_DIR``/w<slot>)."""
    base = os.environ.get("MLX_PTX_CACHE_DIR")
    if not base or not OWN_PTX:
        return {}
    if not hasattr(_SLOT, "i"):
        _SLOT.i = next(_SLOTS)
    d = Path(base) / f"w{_SLOT.i}"
    d.mkdir(parents=True, exist_ok=True)
    return {"MLX_PTX_CACHE_DIR": str(d)}


def run_one(node: str, gpu: int, deadline: float, out: Path) -> dict:
    left = deadline - time.time()
    if left < 15:
        return {"id": node, "outcome": "not run"}
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), **_ptx_dir())
    log = out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", node)[:180] + ".log")
    t = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", node],
                           capture_output=True, text=True, timeout=left, env=env)
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    log.write_text(text)
    outcome = {0: "passed", 5: "none"}.get(rc, "timeout" if rc == "timeout" else "failed")
    if rc == 0 and re.search(r"\d+ skipped", text) and not re.search(r"\d+ passed", text):
        outcome = "skipped"
    return {"id": node, "outcome": outcome, "seconds": round(time.time() - t, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--gpus", type=int, default=1, help="number of GPUs to spread the tests over")
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--own-ptx", action="store_true", help="one PTX cache directory per worker")
    ap.add_argument("--first-gpu", type=int, default=0, help="GPUs used: first-gpu … first-gpu + gpus − 1")
    a = ap.parse_args()
    global OWN_PTX
    OWN_PTX = a.own_ptx
    deadline = time.time() + a.budget_s
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    nodes = collect([f for f in a.files if Path(f).exists()])
    with ThreadPoolExecutor(a.workers) as ex:
        res = list(ex.map(lambda iv: run_one(iv[1], a.first_gpu + iv[0] % a.gpus, deadline, out), enumerate(nodes)))
    by_file: dict = {}
    for r in res:
        f = r["id"].split("::")[0]
        by_file.setdefault(f, {}).setdefault(r["outcome"], 0)
        by_file[f][r["outcome"]] += 1
    (out / "summary.json").write_text(json.dumps({"tests": res, "by_file": by_file}, indent=1))
    for f, c in by_file.items():
        print(f, c)
    bad = [r["id"] for r in res if r["outcome"] in ("failed", "timeout")]
    print("failed or timed out:", bad)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
