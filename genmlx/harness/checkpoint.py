"""Checkpoints: safetensors arrays + a JSON manifest, written atomically.

A checkpoint ``ckpt-<step>`` is two files in ``<run>/checkpoints/``:

- ``ckpt-<step>.safetensors``: every trainable parameter (``params/<path>``) and the
  optimizer state (``opt/<path>``);
- ``ckpt-<step>.json``: step, data position (epoch, batch), the PRNG key of the next
  step, counters, the config, the genmlx version, and the sha256 and size of the
  safetensors file.

Each file is written to a temporary name, fsynced, and renamed; the manifest is written
last, so a checkpoint without a manifest (or whose arrays do not match the manifest's
hash) is incomplete and is skipped with a warning naming it. ``best.*`` is a copy of the
checkpoint with the best validation bound.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d+)\.json$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file."""


@dataclass
class Checkpoint:
    path: Path          # the manifest
    meta: dict
    params: list        # [(path, array)]
    opt_state: list     # [(path, array)]


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(p: Path) -> None:
    with open(p, "rb+") as f:
        os.fsync(f.fileno())


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    return h.hexdigest()


def _atomic_json(p: Path, obj: dict) -> None:
    tmp = p.with_name(f".tmp-{os.getpid()}-{p.name}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


class CheckpointManager:
    """Writes, lists, prunes and loads the checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    # -- writing ------------------------------------------------------------------------
    def save(self, step: int, params: list, opt_state: list, meta: dict, best: bool = False) -> Path:
        """Write ``ckpt-<step>`` atomically; prune to ``keep_last``; copy to best if asked.
        On any OS error (unwritable directory, full disk) the temporary files are removed,
        earlier checkpoints are untouched, and a :class:`CheckpointError` says why."""
        name = f"ckpt-{step:09d}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            manifest = self._write(name, params, opt_state, meta)
            if best:
                self._write("best", params, opt_state, meta)
        except OSError as e:
            prev = self.latest_name()
            raise CheckpointError(
                f"could not write checkpoint {self.dir / name}: {e.strerror or e}"
                f" — {'the previous checkpoint ' + prev + ' is intact' if prev else 'no earlier checkpoint exists'}"
            ) from e
        self._prune()
        return manifest

    def _write(self, name: str, params: list, opt_state: list, meta: dict) -> Path:
        arrays = {f"params/{k}": v for k, v in params}
        arrays.update({f"opt/{k}": v for k, v in opt_state})
        mx.eval(list(arrays.values()))
        st = self.dir / f"{name}.safetensors"
        tmp = self.dir / f".tmp-{os.getpid()}-{name}.safetensors"
        try:
            mx.save_safetensors(str(tmp), arrays, metadata={"format": "genmlx-checkpoint"})
            _fsync_file(tmp)
            digest, size = _sha256(tmp), tmp.stat().st_size
            os.replace(tmp, st)
            _fsync_dir(self.dir)
        finally:
            if tmp.exists():
                tmp.unlink()
        m = dict(meta)
        m.update({"format": FORMAT, "arrays": st.name, "sha256": digest, "size": size,
                  "param_names": [k for k, _ in params], "opt_names": [k for k, _ in opt_state]})
        manifest = self.dir / f"{name}.json"
        _atomic_json(manifest, m)
        _fsync_dir(self.dir)
        return manifest

    def _prune(self) -> None:
        steps = self.steps()
        for s in steps[: max(0, len(steps) - self.keep_last)]:
            for ext in (".json", ".safetensors"):
                p = self.dir / f"ckpt-{s:09d}{ext}"
                if p.exists():
                    p.unlink()

    # -- reading ------------------------------------------------------------------------
    def steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _NAME.match(p.name)))

    def latest_name(self) -> str | None:
        s = self.steps()
        return f"ckpt-{s[-1]:09d}" if s else None

    def exists(self) -> bool:
        return bool(self.steps()) or any(self.dir.glob("ckpt-*.safetensors")) if self.dir.is_dir() else False

    def read(self, manifest: Path) -> Checkpoint:
        """Read and verify one checkpoint; raises :class:`CheckpointError` naming the file
        when it is truncated, corrupt or incomplete."""
        try:
            meta = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{manifest}: unreadable manifest ({e})") from None
        st = manifest.with_name(meta.get("arrays", ""))
        if not st.is_file():
            raise CheckpointError(f"{manifest}: its arrays file {st.name} is missing")
        size = st.stat().st_size
        if size != meta.get("size"):
            raise CheckpointError(f"{st}: truncated or altered ({size} bytes, the manifest says {meta.get('size')})")
        if _sha256(st) != meta.get("sha256"):
            raise CheckpointError(f"{st}: corrupt (sha256 does not match its manifest)")
        try:
            arrays = mx.load(str(st))
        except Exception as e:  # noqa: BLE001 - mlx raises several types for bad files
            raise CheckpointError(f"{st}: cannot be read ({e})") from None
        params = [(k, arrays[f"params/{k}"]) for k in meta["param_names"]]
        opt = [(k, arrays[f"opt/{k}"]) for k in meta["opt_names"]]
        return Checkpoint(manifest, meta, params, opt)

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; broken newer ones are reported (warning
        naming the file and the problem) and skipped. None when there is none at all;
        :class:`CheckpointError` when checkpoints exist but none is usable."""
        problems = []
        for s in reversed(self.steps()):
            manifest = self.dir / f"ckpt-{s:09d}.json"
            try:
                ck = self.read(manifest)
            except CheckpointError as e:
                problems.append(str(e))
                warnings.warn(f"skipping broken checkpoint: {e}", RuntimeWarning, stacklevel=2)
                continue
            if problems:
                warnings.warn(f"resuming from the previous good checkpoint {manifest.stem}", RuntimeWarning, stacklevel=2)
            return ck
        if problems:
            raise CheckpointError("no usable checkpoint in " + str(self.dir) + ":\n  " + "\n  ".join(problems))
        return None

    def load_best(self) -> Checkpoint | None:
        p = self.dir / "best.json"
        return self.read(p) if p.exists() else self.load_latest()


# -- module / optimizer state <-> flat lists ------------------------------------------------
def flat_params(module) -> list:
    return tree_flatten(module.parameters())


def flat_opt_state(optimizer) -> list:
    return tree_flatten(optimizer.state)


def restore(module, optimizer, ck: Checkpoint) -> None:
    """Load a checkpoint's parameters into ``module`` and its state into ``optimizer``
    (which must be initialised for these parameters); mismatches raise, listing them."""
    have = dict(tree_flatten(module.parameters()))
    got = dict(ck.params)
    missing = sorted(set(have) - set(got))
    extra = sorted(set(got) - set(have))
    shape = sorted(k for k in set(have) & set(got) if tuple(have[k].shape) != tuple(got[k].shape))
    if missing or extra or shape:
        parts = []
        if missing:
            parts.append("missing in the checkpoint: " + ", ".join(missing[:8]))
        if extra:
            parts.append("not in the model: " + ", ".join(extra[:8]))
        if shape:
            parts.append("shape differs: " + ", ".join(f"{k} {tuple(got[k].shape)} vs {tuple(have[k].shape)}" for k in shape[:8]))
        raise CheckpointError(f"{ck.path}: does not match the model ({'; '.join(parts)})")
    module.update(tree_unflatten(ck.params))
    if optimizer is not None:
        state = tree_unflatten(ck.opt_state)
        optimizer.state.clear()
        optimizer.state.update(state)
