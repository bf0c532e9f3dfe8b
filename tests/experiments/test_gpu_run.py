"""The GPU experiment driver's pure parts (experiments/iwae/gpu_run.py): the batch-size
choice from a throughput probe, and every table row's config + overrides validating."""

import json
import os
from pathlib import Path

import pytest

from experiments.iwae import gpu_run as G
from genmlx.harness.config import load_config


def _probe(rates):
    out = []
    for b, (sync, asyn) in rates.items():
        out.append({"batch": b, "loop": "sync", "steps_per_s": sync, "images_per_s": sync * b})
        out.append({"batch": b, "loop": "async", "steps_per_s": asyn, "images_per_s": asyn * b})
    return out


def test_choose_takes_most_images_per_s_above_the_step_rate_floor():
    # the H200 probe of the IWAE k = 50 step (pipelined loop: 363, 300, 260, 212 steps/s)
    probe = _probe({100: (284, 363), 200: (308, 300), 400: (245, 260), 800: (188, 212)})
    assert G.choose(probe, 0.7)["batch"] == 400  # 800 runs at 58 % of batch 100's rate
    assert G.choose(probe, 0.5)["batch"] == 800
    assert G.choose(probe, 0.99)["batch"] == 100  # only the smallest batch qualifies


def test_choose_reads_the_pipelined_rates():
    # the loops disagree: by the sync (unpipelined) rates batch 800 qualifies (90/100), by the
    # pipelined rates the harness actually runs at it does not (100/400)
    probe = _probe({100: (100, 400), 800: (90, 100)})
    assert G.choose(probe, 0.7)["batch"] == 100


@pytest.mark.parametrize("name", sorted(G.ROWS))
def test_every_row_config_validates(name):
    cfg_file, overrides = G.ROWS[name]
    cfg = load_config(G.EXP / cfg_file, [*overrides, "data.batch_size=100", "optim.schedule=constant"])
    assert cfg.data.batch_size == 100


def _fake_train(calls, outcome):
    """A stand-in for ``_genmlx``: records the arguments, writes a checkpoint for a train
    phase (and results.json when ``outcome`` says the steps finished)."""
    def run(*args, timeout=None, log=None):
        calls.append((args, timeout))
        if args[0] == "train":
            run_dir = Path(args[args.index("--run-dir") + 1])
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "checkpoints" / f"ckpt-{len(calls):09d}.json").write_text("{}")
            if outcome == "finished":
                (run_dir / "results.json").write_text("{}")
            return 143, float(timeout)
        return 0, 1.0
    return run


def _main_args(tmp_path, phase_s):
    import argparse
    return argparse.Namespace(run_dir=str(tmp_path / "run"), out=str(tmp_path / "out"), config="c.toml",
                              budget_s=600.0, phase_s=phase_s, batch=[400], probe_steps=10,
                              min_step_fraction=0.6, step_fill=0.9, lr=1e-3, eval_timeout_s=10.0,
                              eval_particles=0, set=[])


def _plan(tmp_path, **kw):
    run = tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    plan = {"config": "c.toml", "batch": 400, "steps": 1000, "probe": {}, "budget_s": 600.0,
            "used_s": 0.0, "phases": [], "overrides": []}
    plan.update(kw)
    (run / "plan.json").write_text(json.dumps(plan))
    return run


def test_phase_bounded_by_the_budget_is_evaluated_in_the_same_call(tmp_path, monkeypatch):
    _plan(tmp_path, used_s=200.0, phases=[{"rc": 143, "wall_s": 200.0, "start": 0.0}])
    calls = []
    monkeypatch.setattr(G, "_genmlx", _fake_train(calls, "stopped"))
    G.main_cmd(_main_args(tmp_path, phase_s=500))
    assert [c[0][0] for c in calls] == ["train", "eval"]
    assert calls[0][1] == pytest.approx(400.0)  # the budget's rest, not the phase length


def test_phase_shorter_than_the_budget_is_not_evaluated(tmp_path, monkeypatch):
    _plan(tmp_path)
    calls = []
    monkeypatch.setattr(G, "_genmlx", _fake_train(calls, "stopped"))
    G.main_cmd(_main_args(tmp_path, phase_s=300))
    assert [c[0][0] for c in calls] == ["train"]
    assert "--fresh" in calls[0][0]  # no checkpoint yet: a fresh run
    G.main_cmd(_main_args(tmp_path, phase_s=300))  # the rest (300 s) ends the budget: train + eval
    assert [c[0][0] for c in calls] == ["train", "train", "eval"]
    assert "--fresh" not in calls[1][0]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["used_s"] == pytest.approx(600.0) and len(plan["phases"]) == 2


def test_killed_phase_is_charged_and_the_run_resumed_not_wiped(tmp_path, monkeypatch):
    run = _plan(tmp_path, phases=[{"start": 1000.0}])  # a driver killed mid-phase
    (run / "checkpoints").mkdir()
    ck = run / "checkpoints" / "ckpt-000000100.json"
    ck.write_text("{}")
    os.utime(ck, (1250.0, 1250.0))  # its last write: 250 s into the phase
    calls = []
    monkeypatch.setattr(G, "_genmlx", _fake_train(calls, "stopped"))
    G.main_cmd(_main_args(tmp_path, phase_s=100))
    assert "--fresh" not in calls[0][0]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["phases"][0]["killed"] and plan["phases"][0]["wall_s"] == pytest.approx(250.0)
    assert plan["used_s"] == pytest.approx(350.0)
