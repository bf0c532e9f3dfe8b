"""The main job, spelled out: train a small VAE with the IWAE bound on the 8×8 digits
shipped with genmlx, then evaluate it and use its guide as an importance sampler.

    .venv/bin/python training/digits_vae.py [runs/digits]

Steps (each a library call you can use on its own):
1. ``load_config`` reads experiments/digits_vae.toml into a frozen, validated dataclass;
2. ``train`` runs the compiled training loop with checkpoints, TensorBoard/JSONL logging
   and a final evaluation: IWAE bounds for K = 1, 5, 50, log p(x) by importance sampling
   with K = 5000 proposals from the guide, the guide's ESS/N and k̂, and samples.png;
3. ``infer_run_dir`` reloads the best checkpoint and runs importance sampling with the
   trained guide as proposal on one test image.
"""

import sys
from pathlib import Path

import genmlx  # noqa: F401  (before mlx.core: fast BLAS)
from genmlx.harness import infer_run_dir, load_config, train

REPO = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    run_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "runs" / "digits_vae"
    cfg = load_config(REPO / "experiments" / "digits_vae.toml")
    results = train(cfg, run_dir)
    print(f"\ntest NLL {results['nll']:.2f} nats (log p(x) by IS, K = {cfg.eval.particles}, "
          f"± {results['log_px_se']:.2f}); samples in {results['samples_png']}")
    print("\nthe trained guide as an importance-sampling proposal for test image 0:")
    infer_run_dir(run_dir, example="test:0", particles=2000)
