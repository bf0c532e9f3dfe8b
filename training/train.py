"""Train any experiment config — the same as ``genmlx train CONFIG [--run-dir DIR] [k=v …]``.

    .venv/bin/python training/train.py experiments/mnist_iwae.toml --run-dir runs/iwae optim.lr=3e-4

Resumes from the newest good checkpoint in the run directory; Ctrl-C writes one first.
"""

import sys

import genmlx  # noqa: F401  (before mlx.core: fast BLAS)
from genmlx.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
