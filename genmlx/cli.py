"""The ``genmlx`` command line (also ``python -m genmlx``).

    genmlx train CONFIG [--run-dir DIR] [--fresh] [key.path=value …]
    genmlx eval RUN_DIR [--particles K] [--examples N] [--checkpoint best|latest]
    genmlx infer RUN_DIR (--obs FILE | --example SPLIT:I) [--method is|smc] [--proposal guide|prior]
                 [--particles N] [--out FILE]
    genmlx sweep SWEEP_CONFIG [--workers N] [--sweep-dir DIR]
    genmlx config [CONFIG] [key.path=value …]   (print the validated config, or the schema)

``train`` resumes automatically when the run directory holds a checkpoint. Exit status:
0 success, 1 training/evaluation failure, 2 bad configuration or arguments, 130/143 when
stopped by SIGINT/SIGTERM (after writing a checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import genmlx  # (loads the fast BLAS before mlx.core)


def _err(msg: str, code: int) -> int:
    print(f"genmlx: error: {msg}", file=sys.stderr)
    return code


def cmd_train(a) -> int:
    from genmlx.harness.config import load_config
    from genmlx.harness.runner import Interrupted, train

    cfg = load_config(a.config, a.overrides)
    run_dir = Path(a.run_dir) if a.run_dir else Path("runs") / cfg.name
    main = genmlx.distributed.is_main()  # under mlx.launch only rank 0 prints
    if main:
        print(f"genmlx train: {cfg.name} -> {run_dir}", flush=True)
    try:
        train(cfg, run_dir, resume=not a.fresh, final_eval=not a.no_eval)
    except Interrupted as e:
        if main:
            print(f"genmlx: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    return 0


def cmd_eval(a) -> int:
    from genmlx.harness.evaluate import eval_run_dir

    eval_run_dir(a.run_dir, particles=a.particles, examples=a.examples, checkpoint=a.checkpoint)
    return 0


def cmd_infer(a) -> int:
    from genmlx.harness.evaluate import infer_run_dir

    infer_run_dir(a.run_dir, obs=a.obs, example=a.example, method=a.method, particles=a.particles,
                  out=a.out, seed=a.seed, checkpoint=a.checkpoint, proposal=a.proposal)
    return 0


def cmd_sweep(a) -> int:
    from genmlx.harness.sweep import run_sweep

    rows = run_sweep(a.sweep_config, workers=a.workers, sweep_dir=a.sweep_dir)
    failed = sum(r["status"] != "ok" for r in rows)
    return 1 if failed == len(rows) and rows else 0


def cmd_config(a) -> int:
    from genmlx.harness.config import describe_schema, load_config

    if a.config is None and not a.overrides:
        print("\n".join(describe_schema()))
        return 0
    import json

    print(json.dumps(load_config(a.config, a.overrides).to_dict(), indent=1))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genmlx", description="genmlx experiments: train, evaluate, infer, sweep",
                                epilog="train/config take config overrides key.path=value (TOML values), e.g. optim.lr=3e-4")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train an experiment config (resumes from a checkpoint in --run-dir)")
    t.add_argument("config", help="experiment TOML (see experiments/)")
    t.add_argument("--run-dir", help="run directory (default runs/<name>)")
    t.add_argument("--fresh", action="store_true", help="start over: delete the run directory's checkpoints, logs and results first")
    t.add_argument("--no-eval", action="store_true", help="skip the final test evaluation")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="test bounds, log p(x) (K=5000) and proposal ESS of a trained run")
    e.add_argument("run_dir")
    e.add_argument("--particles", type=int, help="K for log p(x) (default: eval.particles)")
    e.add_argument("--examples", type=int, help="test examples (default: eval.examples, 0 = all)")
    e.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    e.set_defaults(fn=cmd_eval)

    i = sub.add_parser("infer", help="importance sampling or SMC on new observations with the trained guide as proposal")
    i.add_argument("run_dir")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--obs", help="observations: .csv (one row per observation, header allowed) or .npy")
    src.add_argument("--example", help="SPLIT:I — example I of the run's dataset split (test, valid, train)")
    i.add_argument("--method", default="is", choices=("is", "smc"),
                   help="is (default), or smc for sequential models (model.kind = ssm): a particle filter "
                        "with the guide as per-step proposal; --obs rows are then sequences y_0..y_T-1")
    i.add_argument("--proposal", default="guide", choices=("guide", "prior"),
                   help="guide (default): the trained guide; prior: the model's prior (bootstrap filter for smc)")
    i.add_argument("--particles", type=int, default=1000)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--out", help="write posterior draws (resampled) to this .safetensors file")
    i.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    i.set_defaults(fn=cmd_infer)

    s = sub.add_parser("sweep", help="grid / random search over config keys with parallel workers")
    s.add_argument("sweep_config")
    s.add_argument("--workers", type=int, help="parallel worker processes (default: the sweep file's)")
    s.add_argument("--sweep-dir", help="directory of the sweep (default: runs/sweeps/<name>)")
    s.set_defaults(fn=cmd_sweep)

    c = sub.add_parser("config", help="print the validated config (or, without arguments, every key)")
    c.add_argument("config", nargs="?")
    c.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    from genmlx.harness.checkpoint import CheckpointError
    from genmlx.harness.config import ConfigError
    from genmlx.harness.data import DataError
    from genmlx.harness.runner import TrainingError

    p = parser()
    a, rest = p.parse_known_args(argv)
    bad = [r for r in rest if r.startswith("-") or "=" not in r or a.cmd not in ("train", "config")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    a.overrides = rest
    try:
        return a.fn(a)
    except ConfigError as e:
        return _err(str(e), 2)
    except (TrainingError, CheckpointError, DataError) as e:
        return _err(str(e), 1)
    except KeyboardInterrupt:
        return _err("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
