"""read_config: TOML/JSON training configs into frozen dataclasses, --set overrides, errors by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spidr.config import Config, ConfigError, DinoSRConfig, SpidRConfig, config_to_dict, read_config
from tests.conftest import REPO

MINIMAL = """
[run]
workdir = "runs"
wandb_project = "p"
wandb_name = "n"
model_type = "spidr"

[data]
manifest = "train.csv"
"""


def write(tmp_path, text, name="cfg.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["example.toml", "base_spidr.toml", "base_dinosr.toml"])
def test_shipped_configs_load(name):
    cfg = read_config(REPO / "configs" / name)
    assert isinstance(cfg, Config)
    assert isinstance(cfg.model, SpidRConfig) == (cfg.run.model_type == "spidr")
    assert isinstance(cfg.model, DinoSRConfig)


def test_defaults_and_release_names(tmp_path):
    cfg = read_config(write(tmp_path, MINIMAL))
    assert cfg.optimizer.lr == 5e-4 and cfg.optimizer.betas == (0.9, 0.95) and cfg.optimizer.scheduler == "tristage"
    assert cfg.data.max_batch_length == 3_800_000 and cfg.data.min_sample_size == 2000
    assert cfg.masking.mask_prob == 0.8 and cfg.masking.mask_length == 10
    assert cfg.run.dir == Path("runs/p/n").resolve() and isinstance(cfg.run.dir, Path) and cfg.validation == {}
    json.dumps(config_to_dict(cfg))  # config.json beside checkpoints


def test_json_and_validation_tables(tmp_path):
    data = {
        "run": {"workdir": "w", "wandb_project": "p", "wandb_name": "n", "model_type": "dinosr"},
        "data": {"manifest": "t.csv"},
        "validation": {"dev": {"manifest": "d.csv", "enable_padding": True}},
        "model": {"encoder_layer_drop": 0.1},
    }
    cfg = read_config(write(tmp_path, json.dumps(data), "cfg.json"))
    assert type(cfg.model) is DinoSRConfig and cfg.model.encoder_layer_drop == 0.1
    assert cfg.validation["dev"].enable_padding


def test_overrides_are_typed_by_field(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = read_config(
        path,
        [
            "optimizer.max_steps=10",
            "optimizer.lr=1e-3",
            "run.compile=false",
            "model.encoder_num_layers=4",
            "model.num_codebooks=2",
            "data.manifest=other.csv",
            "optimizer.betas=[0.8, 0.9]",
            "validation.dev.manifest=dev.csv",
        ],
    )
    assert cfg.optimizer.max_steps == 10 and cfg.optimizer.lr == 1e-3 and cfg.run.compile is False
    assert cfg.model.encoder_num_layers == 4 and cfg.data.manifest == "other.csv"
    assert cfg.optimizer.betas == (0.8, 0.9) and cfg.validation["dev"].manifest == "dev.csv"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lrr=1", r"unknown key optimizer\.lrr"),
        ("run.log_interval=often", r"run\.log_interval = 'often' has the wrong type: expected int"),
        ("optimizer.max_steps=-5", r"optimizer\.max_steps = -5 is invalid: expected a non-negative integer"),
        ("masking.mask_prob=-0.5", r"masking\.mask_prob = -0\.5 is invalid: expected a non-negative number"),
        ("model.num_codebooks=20", r"model\.num_codebooks = 20 is invalid: expected at most encoder_num_layers"),
        ("model.ema_timescale=3", None),
        ("run.model_type=hubert", r"run\.model_type = 'hubert'"),
        ("data.min_sample_size=500000", r"data\.min_sample_size = 500000 is invalid"),
        ("bogus.key=1", r"unknown table \[bogus\]"),
        ("nodot=1", r"table\.key"),
    ],
)
def test_bad_values_are_refused_by_name(tmp_path, override, message):
    path = write(tmp_path, MINIMAL)
    if message is None:  # a SpidR-only key is fine for SpidR, refused for DinoSR
        read_config(path, [override])
        with pytest.raises(ConfigError, match=r"unknown key model\.ema_timescale in DinoSRConfig"):
            read_config(path, [override, "run.model_type=dinosr"])
        return
    with pytest.raises(ConfigError, match=message):
        read_config(path, [override])


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        read_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="unsupported config format"):
        read_config(write(tmp_path, "{}", "cfg.yaml"))
    with pytest.raises(ConfigError, match="invalid TOML"):
        read_config(write(tmp_path, "[run\nx=1"))
    with pytest.raises(ConfigError, match=r"missing required table \[data\]"):
        read_config(write(tmp_path, MINIMAL.split("[data]")[0]))
    with pytest.raises(ConfigError, match=r"missing required key run\.workdir"):
        read_config(write(tmp_path, MINIMAL.replace('workdir = "runs"', "")))
