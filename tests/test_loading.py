"""build_model from configs and checkpoints, the pretrained constructors' file resolution, torch.hub."""

from __future__ import annotations

import json
import logging
import urllib.error

import pytest
import torch

from spidr.config import ConfigError, DinoSRConfig, SpidRConfig
from spidr.models import CheckpointError, DinoSR, SpidR, build_model, dinosr_base_original, spidr_base
from spidr.models import pretrained as pretrained_module
from tests.conftest import REPO, load_fixture

SPIDR = load_fixture("spidr_small.pt")


def write_checkpoint(tmp_path, state_dict, config: dict | None, *, wrap: bool = True):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state_dict, "step": 3} if wrap else state_dict, path)
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return path


def test_build_model_from_config_picks_the_class():
    assert type(build_model(cfg=SpidRConfig(**SPIDR["config"]))) is SpidR
    assert type(build_model(cfg=DinoSRConfig(**load_fixture("dinosr_small.pt")["config"]))) is DinoSR
    assert type(build_model(model_type="dinosr")) is DinoSR
    with pytest.raises(ConfigError, match="model_type"):
        build_model(model_type="hubert")
    with pytest.raises(ConfigError, match="does not match"):
        build_model(cfg=SpidRConfig(), model_type="dinosr")


@pytest.mark.parametrize("layout", ["model_table", "whole_file", "training_config"])
def test_build_model_from_checkpoint(tmp_path, layout):
    config = {
        "model_table": {"model": SPIDR["config"]},
        "whole_file": SPIDR["config"],
        "training_config": {"run": {"model_type": "spidr"}, "model": SPIDR["config"]},
    }[layout]
    ddp_state = {f"module.{k}": v for k, v in SPIDR["state_dict"].items()}
    path = write_checkpoint(tmp_path, ddp_state, config)
    model = build_model(checkpoint=path, model_type=None if layout == "training_config" else "spidr")
    assert type(model) is SpidR and model.training  # in training mode, as the reference release returns it
    for key, value in SPIDR["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value)
    fresh = SpidR(SpidRConfig(**SPIDR["config"]))
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in fresh.parameters()]
    with torch.no_grad():
        loss, _ = model(SPIDR["wavs_crop"], mask_indices=SPIDR["mask_indices_crop"])
    torch.testing.assert_close(loss, SPIDR["eval_loss_crop"], atol=1e-5, rtol=0)


def test_bare_state_dict_without_config_uses_defaults(tmp_path, caplog):
    with torch.device("meta"):
        state = SpidR().state_dict()
    path = tmp_path / "bare.pt"
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}, path)
    with caplog.at_level(logging.WARNING):
        model = build_model(checkpoint=path, model_type="spidr")
    assert "No config.json" in caplog.text
    assert model.cfg == SpidRConfig()


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_model(checkpoint=tmp_path / "missing.pt", model_type="spidr")

    state = dict(SPIDR["state_dict"])
    del state["heads.0.0.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["mask_embedding"] = torch.zeros(3)
    path = write_checkpoint(tmp_path, state, {"model": SPIDR["config"]})
    with pytest.raises(CheckpointError) as info:
        build_model(checkpoint=path, model_type="spidr")
    message = str(info.value)
    assert str(path) in message
    assert "heads.0.0.bias" in message and "extra.weight" in message and "mask_embedding (checkpoint (3,)" in message

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    (tmp_path / "config.json").write_text(json.dumps({"model": SPIDR["config"]}))
    with pytest.raises(CheckpointError, match="truncated"):
        build_model(checkpoint=truncated, model_type="spidr")


def test_failed_load_changes_nothing(tmp_path):
    model = build_model(cfg=SpidRConfig(**SPIDR["config"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.full_like(v, 7) for k, v in SPIDR["state_dict"].items()}
    state["heads.1.0.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError):
        pretrained_module.load_state_dict_checked(model, state, "test")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_config_json_errors(tmp_path):
    path = write_checkpoint(tmp_path, SPIDR["state_dict"], {"model": {**SPIDR["config"], "encoder_width": 3}})
    with pytest.raises(ConfigError, match="encoder_width"):
        build_model(checkpoint=path, model_type="spidr")
    (tmp_path / "config.json").write_text(json.dumps({"run": {"model_type": "dinosr"}, "model": {}}))
    with pytest.raises(ConfigError, match="'dinosr' model"):
        build_model(checkpoint=path, model_type="spidr")
    (tmp_path / "config.json").write_text(json.dumps({"model": SPIDR["config"]}))
    with pytest.raises(ConfigError, match="model_type"):
        build_model(checkpoint=path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {**SPIDR["config"], "num_codebooks": "two"}}))
    with pytest.raises(ConfigError, match=r"num_codebooks = 'two'.*expected int"):
        build_model(checkpoint=path, model_type="spidr")


def test_checkpoints_never_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Exploit()}, path)
    with pytest.raises(CheckpointError, match="safely"):
        build_model(checkpoint=path, model_type="spidr")


@pytest.fixture
def no_download(monkeypatch, tmp_path):
    """Isolate torch.hub's cache and make every download fail as it does offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(pretrained_module.CHECKPOINT_DIR_ENV, raising=False)
    calls = []

    def fail(url, dst, progress=True):
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    return calls


def fake_release_checkpoint(path):
    with torch.device("meta"):
        state = SpidR().state_dict()
    torch.save({"model": {k: torch.full(v.shape, 0.5, dtype=v.dtype) for k, v in state.items()}}, path)


def test_pretrained_from_local_file_and_env_dir(tmp_path, monkeypatch, no_download):
    local = tmp_path / "spidr_base.pt"
    fake_release_checkpoint(local)
    model = spidr_base(checkpoint=local)
    assert model.mask_embedding[0].item() == 0.5 and not model.training

    monkeypatch.setenv(pretrained_module.CHECKPOINT_DIR_ENV, str(tmp_path))
    assert spidr_base().mask_embedding[0].item() == 0.5
    assert no_download == []


def test_pretrained_cached_after_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(pretrained_module.CHECKPOINT_DIR_ENV, raising=False)
    calls = []

    def download(url, dst, progress=True):
        calls.append((url, progress))
        fake_release_checkpoint(dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    spidr_base()
    spidr_base()
    assert calls == [("https://dl.fbaipublicfiles.com/shared/devai/assets/models/spidr_base.pt", True)]


def test_pretrained_error_says_where_to_put_the_file(tmp_path, no_download):
    with pytest.raises(FileNotFoundError) as info:
        dinosr_base_original()
    message = str(info.value)
    assert "dinosr.ckpt" in message and pretrained_module.CHECKPOINT_DIR_ENV in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        spidr_base(checkpoint=tmp_path / "nowhere.pt")


def test_original_dinosr_from_local_fairseq_file(tmp_path, no_download, monkeypatch):
    fixture = load_fixture("dinosr_fairseq_small.pt")
    path = tmp_path / "dinosr.ckpt"
    torch.save(fixture["fairseq_checkpoint"], path)
    small = pretrained_module.PretrainedModel(
        "file://nowhere", "dinosr.ckpt", "dinosr", fairseq=True, config_fields=fixture["config"]
    )
    monkeypatch.setitem(pretrained_module.PRETRAINED, "dinosr_base_original", small)
    model = dinosr_base_original(checkpoint=path)
    for key, value in fixture["converted_state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["spidr_base", "dinosr_base_reproduced", "dinosr_base_original"])
def test_torch_hub_entry_points(name):
    model = torch.hub.load(str(REPO), name, source="local", pretrained=False)
    assert isinstance(model, DinoSR)
    assert model.cfg.encoder_qkv_bias == (name == "dinosr_base_original")
