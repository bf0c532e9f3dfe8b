"""Checkpoint files: atomic writes, truncation/corruption detection with fallback to the
previous good checkpoint, mismatch errors, unwritable directories and full disks."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

import genmlx  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from genmlx.harness.checkpoint import CheckpointError, CheckpointManager, flat_opt_state, flat_params, restore
from genmlx.harness.config import load_config
from genmlx.harness.runner import TrainingError, train
from tests.harness.conftest import run_cli, toy_config


def _setup(tmp_path, keep_last=3):
    net = nn.Linear(3, 2)
    opt = optim.Adam(1e-3)
    opt.init(net.trainable_parameters())
    return CheckpointManager(tmp_path, keep_last=keep_last), net, opt


def _save(mgr, net, opt, step):
    net.update({"weight": mx.full((2, 3), float(step)), "bias": mx.full((2,), float(step))})
    return mgr.save(step, flat_params(net), flat_opt_state(opt), {"step": step})


def test_roundtrip_and_keep_last(tmp_path):
    mgr, net, opt = _setup(tmp_path, keep_last=2)
    for s in (10, 20, 30):
        _save(mgr, net, opt, s)
    assert mgr.steps() == [20, 30]
    ck = mgr.load_latest()
    net2 = nn.Linear(3, 2)
    opt2 = optim.Adam(1e-3)
    opt2.init(net2.trainable_parameters())
    restore(net2, opt2, ck)
    assert np.array_equal(np.asarray(net2.weight), np.full((2, 3), 30.0))
    assert set(opt2.state) == set(opt.state)
    assert not [p for p in mgr.dir.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_arrays", "bad_json"])
def test_broken_latest_falls_back_to_previous(tmp_path, damage):
    mgr, net, opt = _setup(tmp_path)
    _save(mgr, net, opt, 10)
    m = _save(mgr, net, opt, 20)
    st = m.with_suffix(".safetensors")
    if damage == "truncate":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif damage == "flip":
        b = bytearray(st.read_bytes())
        b[-5] ^= 0xFF
        st.write_bytes(bytes(b))
    elif damage == "delete_arrays":
        st.unlink()
    else:
        m.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="ckpt-000000020") as w:
        ck = mgr.load_latest()
    assert ck.meta["step"] == 10
    assert any("previous good checkpoint ckpt-000000010" in str(x.message) for x in w)
    with pytest.raises(CheckpointError, match="ckpt-000000020"):
        mgr.read(m)


def test_all_broken_is_an_error_naming_them(tmp_path):
    mgr, net, opt = _setup(tmp_path)
    m = _save(mgr, net, opt, 10)
    m.with_suffix(".safetensors").write_bytes(b"xx")
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError, match="(?s)no usable checkpoint.*ckpt-000000010"):
        mgr.load_latest()


def test_mismatched_model_lists_differences(tmp_path):
    mgr, net, opt = _setup(tmp_path)
    _save(mgr, net, opt, 10)
    other = nn.Linear(4, 2)
    with pytest.raises(CheckpointError, match=r"shape differs: weight \(2, 3\) vs \(2, 4\)"):
        restore(other, None, mgr.load_latest())
    seq = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match="missing in the checkpoint: layers.0.bias"):
        restore(seq, None, mgr.load_latest())


def test_full_disk_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    mgr, net, opt = _setup(tmp_path)
    _save(mgr, net, opt, 10)
    before = {p.name: p.read_bytes() for p in mgr.dir.iterdir()}

    def no_space(path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mx, "save_safetensors", no_space)
    with pytest.raises(CheckpointError, match="No space left on device.*ckpt-000000010 is intact"):
        _save(mgr, net, opt, 20)
    assert {p.name: p.read_bytes() for p in mgr.dir.iterdir()} == before
    assert mgr.load_latest().meta["step"] == 10


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_unwritable_run_dir_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(TrainingError, match="not writable"):
            train(load_config(toy_config(tmp_path)), ro / "run")
    finally:
        ro.chmod(0o700)


def test_unwritable_run_dir_cli(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = run_cli("train", toy_config(tmp_path), "--run-dir", blocker / "run")
    assert r.returncode == 1 and "is not writable" in r.stderr
