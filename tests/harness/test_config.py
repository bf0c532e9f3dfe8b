"""Config loading: unknown keys, wrong types and bad values fail with the key path."""

from __future__ import annotations

import pytest

from genmlx.harness.config import ConfigError, config_diff, load_config, parse_override
from tests.harness.conftest import REPO


@pytest.mark.parametrize("override, message", [
    ('optim.lr="fast"', 'optim.lr: expected a positive float, got "fast"'),
    ("optim.lr=fast", 'optim.lr: expected a positive float, got "fast"'),
    ("optim.lr=-1e-3", "optim.lr: expected a positive float, got -0.001"),
    ("data.batchsize=3", "data.batchsize: unknown key (did you mean 'batch_size'?)"),
    ("train.steps=1.5", "train.steps: expected a positive int, got 1.5"),
    ("train.steps=true", "train.steps: expected a positive int, got True"),
    ("model.kind=resnet", 'model.kind: expected one of "vae", "sbn"'),
    ("model.hidden=[64,0]", "model.hidden[1]: expected a positive int, got 0"),
    ("train.compile=1", "train.compile: expected a boolean, got 1"),
    ("log.progress=loud", 'log.progress: expected one of "auto", "bar", "lines", "off", got "loud"'),
    ("bogus=1", "bogus: unknown key"),
    ("optim=3", "optim: expected a table, got 3"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "experiments" / "digits_vae.toml", [override])
    assert message in str(e.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="objective.kind: the sigmoid belief net has discrete latents"):
        load_config(None, ["model.kind=sbn", "objective.kind=iwae"])
    with pytest.raises(ConfigError, match="data.dataset: the sbibm model 'two_moons'|data.dataset: the sbibm model"):
        load_config(None, ["model.kind=two_moons", "objective.kind=neural_is"])


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[optim]\nlr = 1e-3\nbeta = [0.9, 0.99]\n')
    with pytest.raises(ConfigError, match=r"optim.beta: unknown key \(did you mean 'betas'\?\)"):
        load_config(p)
    p.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(p)


def test_overrides_are_typed_and_frozen():
    c = load_config(None, ["optim.lr=3e-4", "model.hidden=[100, 50]", "name=abc", "train.nan_policy=skip"])
    assert c.optim.lr == 3e-4 and c.model.hidden == (100, 50) and c.name == "abc"
    assert c.optim.lr.__class__ is float and c.train.nan_policy == "skip"
    with pytest.raises(Exception):
        c.optim.lr = 1.0  # frozen
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0  # ints widen to floats
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_override("optim.lr")
    assert config_diff(c.to_dict(), load_config(None, ["optim.lr=3e-4"]).to_dict()) == [
        "model.hidden", "name", "train.nan_policy"]


def test_shipped_configs_are_valid():
    files = sorted((REPO / "experiments").glob("*.toml"))
    assert len(files) >= 9
    for f in files:
        load_config(f)


def test_cli_reports_config_errors_before_training(tmp_path):
    from tests.harness.conftest import run_cli

    r = run_cli("train", REPO / "experiments" / "digits_vae.toml", "--run-dir", tmp_path / "run", "optim.lr=fast")
    assert r.returncode == 2
    assert 'optim.lr: expected a positive float, got "fast"' in r.stderr
    assert not (tmp_path / "run").exists()
