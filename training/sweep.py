"""Run a sweep — the same as ``genmlx sweep SWEEP_CONFIG [--workers N]``.

    .venv/bin/python training/sweep.py experiments/sweeps/digits_grid.toml --workers 2
"""

import sys

import genmlx  # noqa: F401  (before mlx.core: fast BLAS)
from genmlx.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
