"""Full-size posteriordb runs: NUTS, 4 chains, against the reference draws.

    GENMLX_DATA=../shared/data python experiments/posteriordb/run.py [names…]
        [--warmup 1000] [--samples 1000] [--seed 0] [--out results.json]

For each posterior prints, per parameter, (mean − ref mean)/ref sd, sd/ref sd − 1,
R̂ and bulk ESS, plus wall time and divergences; optionally writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import genmlx as gm  # noqa: E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from models import POSTERIORS, compare, load  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=list(POSTERIORS))
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=str, default=None)
    a = ap.parse_args(argv)
    root = Path(os.environ.get("GENMLX_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
    results = {}
    for name in a.names:
        post, args, obs, ref = load(root, name)
        t = time.time()
        r = gm.inference.nuts(mx.random.key(a.seed), post.model, args, obs, num_samples=a.samples,
                              num_warmup=a.warmup, num_chains=a.chains, mass=post.mass, progress=False)
        wall = time.time() - t
        params = post.params(r.samples)
        cmp = compare(params, ref)
        summ = gm.diagnostics.summary(params)
        rows = {}
        print(f"== {name}: {wall:.1f}s, divergences {r.num_divergences}, mean steps "
              f"{r.num_steps.mean():.1f}, step size {np.round(r.step_size, 4)}")
        for k, (dm, ds) in cmp.items():
            row = summ[k]
            rows[k] = dict(mean_z=dm, sd_rel=ds, r_hat=row["r_hat"], ess_bulk=row["ess_bulk"])
            print(f"  {k:12s} mean {dm:+.3f} sd  sd {ds:+.3f}  r_hat {row['r_hat']:.4f}  "
                  f"ess_bulk {row['ess_bulk']:.0f}")
        results[name] = dict(wall_s=wall, divergences=r.num_divergences, params=rows,
                             warmup=a.warmup, samples=a.samples, chains=a.chains, seed=a.seed)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
