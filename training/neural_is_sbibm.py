"""Amortize, then refine: train a mixture-density guide by NeuralIS on simulations of an
sbibm task, then use it as the importance-sampling proposal on the benchmark's reference
observations (ESS/N, log p(x), posterior-mean error in reference standard deviations).

    GENMLX_DATA=../shared/data .venv/bin/python training/neural_is_sbibm.py two_moons [k=v …]
"""

import sys
from pathlib import Path

import genmlx  # noqa: F401  (before mlx.core: fast BLAS)
from genmlx.harness import infer_run_dir, load_config, train

REPO = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    task = sys.argv[1] if len(sys.argv) > 1 else "two_moons"
    cfg = load_config(REPO / "experiments" / f"neural_is_{task}.toml", sys.argv[2:])
    run_dir = REPO / "runs" / cfg.name
    train(cfg, run_dir)
    print(f"\nsimulation budget: {cfg.train.steps * cfg.data.batch_size} model simulations")
    infer_run_dir(run_dir, example="ref:1", particles=10000)
