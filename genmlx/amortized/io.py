"""Saving and loading trained guides: safetensors weights + a JSON description.

Files: ``<stem>.safetensors`` (every parameter of every module reachable from the guide,
by its path in ``gm.nn.trainable(guide)``) and ``<stem>.json``::

    {"format": "genmlx-guide", "format_version": 1, "genmlx_version": …,
     "config": <the guide's constructor config, if given>,
     "parameters": {name: {"shape": […], "dtype": …}},
     "schema": {address: {"shape": […], "dtype": …}} | null}   (addresses as "a/b/3")

The schema (the guide's choice addresses, shapes and dtypes) is recorded when example
guide arguments are given. ``path`` is a file name ending in ``.safetensors`` or a
directory (then ``guide.safetensors`` / ``guide.json`` inside it). No pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from genmlx.core.errors import GenMLXError

FORMAT = "genmlx-guide"
FORMAT_VERSION = 1


class GuideMismatchError(GenMLXError, ValueError):
    """The saved guide does not fit the guide it is loaded into."""

    def __init__(self, path: Path, differences: list[str]):
        self.differences = differences
        super().__init__(f"cannot load the guide saved at {path}: "
                         f"{len(differences)} difference(s):\n  " + "\n  ".join(differences))


def _paths(path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".safetensors":
        return p, p.with_suffix(".json")
    if p.suffix == ".json":
        return p.with_suffix(".safetensors"), p
    return p / "guide.safetensors", p / "guide.json"


def _schema(guide, example_args) -> dict | None:
    if example_args is None:
        return None
    tr = guide.simulate(mx.random.key(0), tuple(example_args))
    return {"/".join(map(str, p)): {"shape": list(v.shape), "dtype": _dtype(v)}
            for p, v in tr.choices.leaves()}


def _dtype(a) -> str:
    return str(a.dtype).replace("mlx.core.", "")


def _params(guide) -> dict:
    from genmlx.nn.params import trainable

    return dict(tree_flatten(trainable(guide).parameters()))


def save_guide(path, guide, *, config: dict | None = None, example_args: tuple | None = None) -> Path:
    """Write the guide's parameters and description (atomically: temporary files then
    rename); returns the weights path. ``config`` (JSON-serialisable) defaults to
    ``guide.config``, ``example_args`` (guide arguments used once to record the address
    schema) to ``guide.example_args``, when the guide has them."""
    import genmlx

    wpath, jpath = _paths(path)
    wpath.parent.mkdir(parents=True, exist_ok=True)
    params = _params(guide)
    if not params:
        raise ValueError("save_guide: the guide has no parameters (no NeuralNetGF or module reachable from it)")
    if config is None:
        config = getattr(guide, "config", None)
    if example_args is None:
        example_args = getattr(guide, "example_args", None)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "genmlx_version": getattr(genmlx, "__version__", "unknown"),
        "guide": getattr(guide, "name", type(guide).__name__),
        "config": config,
        "parameters": {k: {"shape": list(v.shape), "dtype": _dtype(v)} for k, v in params.items()},
        "schema": _schema(guide, example_args),
    }
    text = json.dumps(meta, indent=2, sort_keys=True)
    tmp_w = wpath.with_name(wpath.name + ".tmp.safetensors")
    tmp_j = jpath.with_name(jpath.name + ".tmp")
    mx.save_safetensors(str(tmp_w), params, metadata={"format": FORMAT})
    with open(tmp_j, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_w, wpath)
    os.replace(tmp_j, jpath)
    return wpath


def load_guide(path, guide, *, example_args: tuple | None = None, strict_config: bool = True):
    """Load saved parameters into ``guide`` (in place) and return it.

    Raises :class:`GuideMismatchError` listing every difference: parameters missing or
    unexpected, shape/dtype mismatches, a different constructor config (when both
    have one and ``strict_config``), and — when ``example_args`` are given and a schema
    was saved — differing choice addresses/shapes."""
    from genmlx.nn.params import trainable

    wpath, jpath = _paths(path)
    for p in (wpath, jpath):
        if not p.exists():
            raise FileNotFoundError(f"load_guide: {p} does not exist")
    try:
        meta = json.loads(jpath.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"load_guide: {jpath} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"load_guide: {jpath} is not a genmlx guide description (format={meta.get('format')!r})")
    saved = mx.load(str(wpath))
    current = _params(guide)
    diffs: list[str] = []
    for k in sorted(set(saved) - set(current)):
        diffs.append(f"parameter {k!r} {list(saved[k].shape)} is in the file but not in the guide")
    for k in sorted(set(current) - set(saved)):
        diffs.append(f"parameter {k!r} {list(current[k].shape)} is in the guide but not in the file")
    for k in sorted(set(saved) & set(current)):
        a, b = saved[k], current[k]
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            diffs.append(f"parameter {k!r}: file has {list(a.shape)} {a.dtype}, guide has {list(b.shape)} {b.dtype}")
    cfg_now = getattr(guide, "config", None)
    if strict_config and meta.get("config") is not None and cfg_now is not None \
            and json.loads(json.dumps(cfg_now)) != meta["config"]:
        diffs.append(f"config: file has {meta['config']}, guide has {cfg_now}")
    if example_args is not None and meta.get("schema") is not None:
        now = _schema(guide, example_args)
        old = meta["schema"]
        for a in sorted(set(old) - set(now)):
            diffs.append(f"address {a} is proposed by the saved guide but not by this one")
        for a in sorted(set(now) - set(old)):
            diffs.append(f"address {a} is proposed by this guide but not by the saved one")
        for a in sorted(set(old) & set(now)):
            if old[a] != now[a]:
                diffs.append(f"address {a}: saved {old[a]}, now {now[a]}")
    if diffs:
        raise GuideMismatchError(wpath, diffs)
    container = trainable(guide)
    container.update(tree_unflatten(list(saved.items())))
    mx.eval(container.parameters())
    return guide
