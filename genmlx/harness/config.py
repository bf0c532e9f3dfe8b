"""Experiment configuration: TOML files loaded into frozen dataclasses.

Every field carries a type and, where it matters, a check; loading walks the TOML
table against the dataclass schema and fails *before training* with the full key path
of the first problem::

    optim.lr: expected a positive float, got "fast"
    data.batchsize: unknown key (did you mean 'batch_size'?)

CLI overrides ``key.path=value`` are parsed as TOML values (a bare word that is not
valid TOML is taken as a string) and validated the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, with the full key path in the message."""


# -- field checks -------------------------------------------------------------------
def _check(desc: str, pred):
    return {"desc": desc, "pred": pred}


POSITIVE = _check("positive", lambda v: v > 0)
NONNEG = _check("non-negative", lambda v: v >= 0)
PROB = _check("in [0, 1)", lambda v: 0 <= v < 1)


def one_of(*choices: str) -> dict:
    return {"desc": None, "pred": lambda v: v in choices, "choices": choices}


def _f(default, check: dict | None = None, doc: str = ""):
    meta = {"check": check, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# -- the schema -----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """Which model/guide pair of the zoo (see :mod:`genmlx.harness.zoo`)."""

    kind: str = _f("vae", one_of("vae", "sbn", "two_moons", "gaussian_linear", "slcp", "ssm", "toy"))
    latent_dim: int = _f(50, POSITIVE, "VAE latent dimension")
    hidden: tuple = _f((200, 200), None, "hidden widths of the VAE encoder/decoder MLPs")
    layers: tuple = _f((200, 200, 200), None, "SBN layer widths, data side first")
    activation: str = _f("tanh", one_of("tanh", "relu", "softplus", "gelu"))
    guide_components: int = _f(1, POSITIVE, "sbibm guides: mixture components")
    guide_hidden: tuple = _f((64, 64), None, "sbibm guides and the ssm step proposal: hidden widths")


@dataclass(frozen=True)
class ObjectiveConfig:
    kind: str = _f("elbo", one_of("elbo", "iwae", "dreg", "vimco", "nvil", "rws", "neural_is"))
    particles: int = _f(1, POSITIVE, "K, the number of importance samples per datum")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _f("digits", one_of("mnist", "binarized_mnist", "digits", "simulated", "toy"))
    binarization: str = _f("dynamic", one_of("dynamic", "fixed", "threshold", "none"))
    batch_size: int = _f(20, POSITIVE)
    valid_size: int = _f(200, NONNEG, "examples held out of the training split for validation")
    test_size: int = _f(0, NONNEG, "0 = the whole test split")
    data_dir: str = _f("", None, "directory with the data files ('' = $GENMLX_DATA or the cache)")
    download: bool = _f(True, None, "download MNIST into the cache when it is missing")
    prefetch: int = _f(2, NONNEG, "batches prefetched by the mlx-data pipeline")
    device_resident_mb: float = _f(1024.0, NONNEG, "a training split up to this size stays on the device and "
                                   "batches are gathered there (0 = always the mlx-data pipeline)")


@dataclass(frozen=True)
class OptimConfig:
    name: str = _f("adam", one_of("adam", "adamw", "sgd"))
    lr: float = _f(1e-3, POSITIVE)
    betas: tuple = _f((0.9, 0.999), None)
    eps: float = _f(1e-8, POSITIVE)
    momentum: float = _f(0.0, PROB)
    weight_decay: float = _f(0.0, NONNEG)
    schedule: str = _f("constant", one_of("constant", "exponential", "iwae", "cosine"))
    decay_rate: float = _f(0.5, POSITIVE, "exponential: lr·rate^(step/decay_steps)")
    decay_steps: int = _f(10000, POSITIVE)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _f(1000, POSITIVE, "total optimizer steps")
    nan_policy: str = _f("stop", one_of("stop", "skip"))
    max_skipped: int = _f(100, NONNEG, "skip policy: stop after this many skipped steps")
    compile: bool = _f(True)
    time_limit_s: float = _f(0.0, NONNEG, "stop after this much training wall time (0 = no limit), "
                                          "write a checkpoint and mark the result stopped early")
    pipeline: bool = _f(True, None, "dispatch step t+1 before reading step t's metrics (same results, faster)")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = _f(500, POSITIVE)
    keep_last: int = _f(2, POSITIVE)
    keep_best: bool = _f(True, None, "also keep the checkpoint with the best validation bound")


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = _f(50, POSITIVE, "scalars to JSONL/TensorBoard every n steps")
    eval_every_steps: int = _f(500, POSITIVE, "validation bound, ESS/N, k-hat every n steps")
    histogram_every_steps: int = _f(1000, POSITIVE)
    tensorboard: bool = _f(True)
    images: bool = _f(True)
    progress: str = _f("auto", one_of("auto", "bar", "lines", "off"))
    valid_particles: int = _f(50, POSITIVE, "K of the validation bound and proposal diagnostics")
    valid_examples: int = _f(100, POSITIVE)


@dataclass(frozen=True)
class EvalConfig:
    particles: int = _f(5000, POSITIVE, "K for log p(x) by importance sampling")
    chunk_size: int = _f(500, POSITIVE)
    examples: int = _f(0, NONNEG, "test examples to evaluate (0 = all)")
    bound_particles: tuple = _f((1, 5, 50), None, "K of the reported IWAE bounds")
    samples: int = _f(64, NONNEG, "model samples written to samples.png")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = _f("experiment")
    seed: int = _f(0, NONNEG)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# fields whose element type is checked (tuple fields are homogeneous)
_TUPLE_ELEMS = {"hidden": int, "layers": int, "betas": float, "guide_hidden": int, "bound_particles": int}

# keys that may differ between the run that wrote a checkpoint and the one resuming it
RESUMABLE_CHANGES = ("train.steps", "log.", "checkpoint.", "eval.", "train.compile", "train.time_limit_s",
                     "train.pipeline", "data.prefetch", "data.device_resident_mb",
                     "data.data_dir", "data.download")


# -- loading ------------------------------------------------------------------------------
def _show(v) -> str:
    return json.dumps(v) if isinstance(v, str) else repr(v)


def _type_name(tp) -> str:
    return {int: "an int", float: "a float", str: "a string", bool: "a boolean", tuple: "a list"}.get(tp, str(tp))


def _coerce(path: str, tp, v, meta: dict, name: str):
    check = meta.get("check")
    desc = None
    if check is not None and check.get("desc"):
        desc = check["desc"]
    want = _type_name(tp)
    if desc:
        want = f"{'an' if desc[0] in 'aeiou' else 'a'} {desc} {_type_name(tp).split(' ', 1)[1]}"
    if check is not None and check.get("choices"):
        want = "one of " + ", ".join(_show(c) for c in check["choices"])
    bad = ConfigError(f"{path}: expected {want}, got {_show(v)}")
    if tp is bool:
        if not isinstance(v, bool):
            raise bad
    elif tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad
    elif tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad
        v = float(v)
        if v != v or v in (float("inf"), float("-inf")):
            raise bad
    elif tp is str:
        if not isinstance(v, str):
            raise bad
    elif tp is tuple:
        et = _TUPLE_ELEMS.get(name, object)
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{path}: expected a list of {_type_name(et)[2:].strip()}s, got {_show(v)}")
        out = []
        for i, e in enumerate(v):
            ok = (et is object or (et is float and isinstance(e, (int, float)) and not isinstance(e, bool))
                  or (et is int and isinstance(e, int) and not isinstance(e, bool)))
            if not ok or (et in (int, float) and e <= 0):
                raise ConfigError(f"{path}[{i}]: expected a positive {_type_name(et)[2:].strip()}, got {_show(e)}")
            out.append(float(e) if et is float else e)
        return tuple(out)
    if check is not None and not check["pred"](v):
        raise bad
    return v


def from_dict(cls, d: Any, prefix: str = ""):
    """Build the dataclass ``cls`` from a (nested) dict, validating every key."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a table, got {_show(d)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in d:
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(fields)})"
            raise ConfigError(f"{prefix}{k}: unknown key{hint}")
    kw = {}
    for name, f in fields.items():
        if name not in d:
            continue
        tp = hints[name]
        path = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kw[name] = from_dict(tp, d[name], path + ".")
        else:
            kw[name] = _coerce(path, tp, d[name], f.metadata, name)
    return cls(**kw)


def to_dict(cfg) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` → (["optim", "lr"], 0.0003). Values are TOML; a bare word
    that is not valid TOML is a string (``model.kind=vae``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key path")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides to a raw config dict (a deep copy is returned)."""
    d = json.loads(json.dumps(d))
    for text in overrides:
        keys, value = parse_override(text)
        node = d
        for i, k in enumerate(keys[:-1]):
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(keys[:i + 1])}: is a value, not a table (override {text!r})")
            node = nxt
        node[keys[-1]] = value
    return d


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> ExperimentConfig:
    """Load a TOML experiment config (or ``base``, a raw dict), apply overrides, validate."""
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
    else:
        raw = dict(base or {})
    raw = apply_overrides(raw, list(overrides))
    cfg = from_dict(ExperimentConfig, raw)
    check_consistency(cfg)
    return cfg


def check_consistency(cfg: ExperimentConfig) -> None:
    """Cross-field checks (model ↔ data ↔ objective)."""
    m, o, d = cfg.model, cfg.objective, cfg.data
    sbi = m.kind in ("two_moons", "gaussian_linear", "slcp", "ssm")  # simulator models
    what = "the state-space model 'ssm'" if m.kind == "ssm" else f"the sbibm model {m.kind!r}"
    if sbi and d.dataset != "simulated":
        raise ConfigError(f"data.dataset: {what} trains on simulations; expected \"simulated\", got {_show(d.dataset)}")
    if d.dataset == "simulated" and not sbi:
        raise ConfigError(f"data.dataset: \"simulated\" needs an sbibm model or \"ssm\" (model.kind), got model.kind = {_show(m.kind)}")
    if o.kind == "neural_is" and not sbi:
        raise ConfigError(f"objective.kind: \"neural_is\" trains on model simulations; use it with an sbibm model or \"ssm\", got model.kind = {_show(m.kind)}")
    if sbi and o.kind != "neural_is":
        raise ConfigError(f"objective.kind: {what} trains its guide with \"neural_is\", got {_show(o.kind)}")
    if m.kind == "sbn" and o.kind in ("elbo", "iwae", "dreg"):
        raise ConfigError(f"objective.kind: the sigmoid belief net has discrete latents; use vimco, nvil or rws, got {_show(o.kind)}")
    if o.kind in ("nvil", "neural_is") and o.particles != 1:
        raise ConfigError(f"objective.particles: {o.kind} uses one sample per datum; expected 1, got {o.particles}")
    if o.kind in ("vimco",) and o.particles < 2:
        raise ConfigError(f"objective.particles: VIMCO needs at least 2 particles, got {o.particles}")
    if d.dataset == "binarized_mnist" and d.binarization not in ("fixed",):
        raise ConfigError(f"data.binarization: binarized_mnist is already binary; expected \"fixed\", got {_show(d.binarization)}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two floats in [0, 1), got {list(cfg.optim.betas)}")
    if (m.kind == "toy") != (d.dataset == "toy"):
        raise ConfigError("model.kind / data.dataset: the 'toy' model and dataset go together")


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Key paths whose values differ between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        p = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, p + ".")
        elif va != vb:
            out.append(p)
    return out


def describe_schema(cls=ExperimentConfig, prefix: str = "") -> list[str]:
    """One line per key: path, type, default, doc (used by ``genmlx train --help-config``)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe_schema(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = f.metadata.get("doc", "")
        chk = f.metadata.get("check") or {}
        extra = f" one of {list(chk['choices'])}" if chk.get("choices") else ""
        lines.append(f"{prefix}{f.name} = {json.dumps(list(default) if isinstance(default, tuple) else default)}"
                     f"  # {getattr(tp, '__name__', tp)}{extra}{'; ' + doc if doc else ''}")
    return lines


