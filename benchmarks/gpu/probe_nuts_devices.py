"""Where a NUTS run on the GPU parts from the same run on the CPU (issue 8: an H200 took
10.3 leapfrogs per eight-schools draw against 8.3 on the CPU, same code and keys).

Run once per device (``--device gpu`` / ``--device cpu``, separate processes: compiled
NUTS calls keep the device they were traced on), each writing per warm-up iteration the
chains' acceptance statistics and step sizes, the adapted step sizes and metric, and
the sampling phase's leapfrogs per draw; ``--compare A.json B.json`` prints the first
warm-up iteration where the two runs differ and how the adaptation ends on each.

    GENMLX_DATA=… python benchmarks/gpu/probe_nuts_devices.py --device gpu --out gpu.json
    GENMLX_DATA=… python benchmarks/gpu/probe_nuts_devices.py --device cpu --out cpu.json
    python benchmarks/gpu/probe_nuts_devices.py --compare cpu.json gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "experiments" / "posteriordb"))
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402


def run(device: str, name: str, warmup: int, samples: int, seed: int, out: str) -> None:
    import genmlx as gm
    import mlx.core as mx
    from genmlx.inference import adaptation
    from models import load

    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    post, args, obs, _ = load(Path(os.environ["GENMLX_DATA"]), name)
    rec: dict = {"accept": [], "eps": []}
    real = adaptation.DualAveraging.update

    def update(self, accept_prob):
        rec["accept"].append(np.array(accept_prob).tolist())
        rec["eps"].append(np.array(self.step_size).tolist())
        return real(self, accept_prob)

    adaptation.DualAveraging.update = update
    try:
        t = time.perf_counter()
        r = gm.inference.nuts(mx.random.key(seed), post.model, args, obs, num_samples=samples,
                              num_warmup=warmup, num_chains=4, mass=post.mass, progress=False)
        wall = time.perf_counter() - t
    finally:
        adaptation.DualAveraging.update = real
    metric = r.metric
    inv = metric.minv
    res = dict(device=str(mx.default_device()), name=name, wall_s=wall, step_size=r.step_size.tolist(),
               metric=None if inv is None else np.array(inv).tolist(),
               steps_per_draw=float(r.num_steps.mean()), steps_by_chain=r.num_steps.mean(axis=1).tolist(),
               accept=float(r.accept_prob.mean()), divergences=int(r.num_divergences),
               depth_hist=np.bincount(np.asarray(r.tree_depth).reshape(-1).astype(int)).tolist()
               if r.tree_depth is not None else None, warmup=rec)
    Path(out).write_text(json.dumps(res))
    print(json.dumps({k: v for k, v in res.items() if k not in ("warmup", "metric")}))


def compare(a_path: str, b_path: str) -> None:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    for k in ("device", "wall_s", "step_size", "steps_per_draw", "steps_by_chain", "accept", "divergences",
              "depth_hist"):
        print(f"{k:>15}: {a[k]}  |  {b[k]}")
    if a["metric"] is not None and b["metric"] is not None:
        ma, mb = np.array(a["metric"]), np.array(b["metric"])
        print(f"{'metric':>15}: max relative difference {float(np.max(np.abs(ma - mb) / np.abs(ma))):.3g}")
    A, B = np.array(a["warmup"]["accept"]), np.array(b["warmup"]["accept"])
    n = min(len(A), len(B))
    diff = np.abs(A[:n] - B[:n]).max(axis=1)
    for tol in (1e-6, 1e-4, 1e-2):
        hit = np.nonzero(diff > tol)[0]
        print(f"first warm-up iteration with an acceptance difference > {tol:g}: "
              f"{int(hit[0]) if hit.size else 'none'} of {n}")
    hit = np.nonzero(diff > 1e-6)[0]
    if hit.size:
        i = int(hit[0])
        print(f"  at {i}: accept {A[i].tolist()} vs {B[i].tolist()}; step sizes "
              f"{a['warmup']['eps'][i]} vs {b['warmup']['eps'][i]}")
    Ea, Eb = np.array(a["warmup"]["eps"]), np.array(b["warmup"]["eps"])
    for q in (0.25, 0.5, 0.75, 1.0):
        j = max(0, int(q * n) - 1)
        print(f"  step sizes at warm-up {j}: {np.round(Ea[j], 4).tolist()} vs {np.round(Eb[j], 4).tolist()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "gpu"))
    ap.add_argument("--name", default="eight_schools-eight_schools_noncentered")
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--compare", nargs=2)
    a = ap.parse_args()
    if a.compare:
        compare(*a.compare)
    else:
        run(a.device, a.name, a.warmup, a.samples, a.seed, a.out)


if __name__ == "__main__":
    main()
