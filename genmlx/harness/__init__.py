"""The training harness behind the ``genmlx`` command line: experiment configs
(:mod:`~genmlx.harness.config`), mlx-data pipelines (:mod:`~genmlx.harness.data`), the
model zoo (:mod:`~genmlx.harness.zoo`), exact-resume checkpoints
(:mod:`~genmlx.harness.checkpoint`), logging (:mod:`~genmlx.harness.logging`), the
training loop (:mod:`~genmlx.harness.runner`), evaluation and inference with trained
guides (:mod:`~genmlx.harness.evaluate`) and sweeps (:mod:`~genmlx.harness.sweep`).

    from genmlx.harness import load_config, train
    cfg = load_config("experiments/digits_vae.toml", ["optim.lr=1e-3"])
    results = train(cfg, "runs/digits")
"""

from genmlx.harness.config import ConfigError, ExperimentConfig, load_config
from genmlx.harness.evaluate import eval_run_dir, infer_run_dir, load_run
from genmlx.harness.runner import NonFiniteError, TrainingError, evaluate_run, train
from genmlx.harness.sweep import run_sweep

__all__ = ["load_config", "ExperimentConfig", "ConfigError", "train", "evaluate_run", "TrainingError",
           "NonFiniteError", "load_run", "eval_run_dir", "infer_run_dir", "run_sweep"]
