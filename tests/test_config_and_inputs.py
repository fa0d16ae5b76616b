"""Config dataclasses (release field names, strict typed loading) and model input validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spidr.config import ConfigError, DinoSRConfig, SpidRConfig, from_mapping
from spidr.models import SpidR
from tests.conftest import load_fixture, model_from_fixture

RELEASE_DINOSR_FIELDS = list(load_fixture("dinosr_small.pt")["config"])
RELEASE_SPIDR_FIELDS = list(load_fixture("spidr_small.pt")["config"])


def test_field_names_and_defaults_are_the_release_ones():
    assert [f.name for f in dataclasses.fields(DinoSRConfig)] == RELEASE_DINOSR_FIELDS
    assert sorted(f.name for f in dataclasses.fields(SpidRConfig)) == sorted(RELEASE_SPIDR_FIELDS)
    assert issubclass(SpidRConfig, DinoSRConfig)
    d, s = DinoSRConfig(), SpidRConfig()
    assert d.extractor_conv_layer_config == [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    assert (d.encoder_embed_dim, d.encoder_num_layers, d.encoder_num_heads, d.encoder_ff_interm_features) == (
        768,
        12,
        12,
        3072,
    )
    assert (d.encoder_layer_drop, s.encoder_layer_drop) == (0.05, 0.0)
    assert (d.codebook_size, d.num_codebooks, d.codebook_decay) == (256, 8, 0.9)
    assert (d.ema_start_decay, d.ema_final_decay, d.ema_final_step, d.freeze_step) == (0.999, 0.9999, 30000, 200000)
    assert (s.ema_timescale, s.ema_threshold) == (20000, 1e-7)
    assert d.ema_exclude_layers == ["pos_conv_embed"] and not d.encoder_qkv_bias
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.encoder_embed_dim = 3  # type: ignore[misc]


def test_release_config_dicts_load_unchanged():
    for name, cls in (("spidr_small.pt", SpidRConfig), ("dinosr_small.pt", DinoSRConfig)):
        config = load_fixture(name)["config"]
        assert dataclasses.asdict(from_mapping(cls, config, where="model")) == {
            k: ([tuple(x) for x in v] if k == "extractor_conv_layer_config" else v) for k, v in config.items()
        }


def test_from_mapping_rejects_by_name():
    with pytest.raises(ConfigError, match=r"unknown key model\.ema_timescale in DinoSRConfig"):
        from_mapping(DinoSRConfig, {"ema_timescale": 3}, where="model")
    with pytest.raises(ConfigError, match=r"model\.encoder_num_layers = '12' has the wrong type: expected int"):
        from_mapping(SpidRConfig, {"encoder_num_layers": "12"}, where="model")
    with pytest.raises(ConfigError, match=r"model\.encoder_qkv_bias = 1 .*expected bool"):
        from_mapping(SpidRConfig, {"encoder_qkv_bias": 1}, where="model")
    with pytest.raises(ConfigError, match=r"extractor_mode = 'batch_norm'.*'group_norm' or 'layer_norm'"):
        from_mapping(SpidRConfig, {"extractor_mode": "batch_norm"}, where="model")
    with pytest.raises(ConfigError, match=r"extractor_conv_layer_config\[0\]"):
        from_mapping(SpidRConfig, {"extractor_conv_layer_config": [[512, 10]]}, where="model")
    assert from_mapping(SpidRConfig, {"codebook_decay": 1}).codebook_decay == 1.0


def test_out_of_range_values_are_refused():
    with pytest.raises(ConfigError, match=r"model\.num_codebooks = 13 .*at most encoder_num_layers \(12\)"):
        SpidRConfig(num_codebooks=13)
    with pytest.raises(ConfigError, match=r"encoder_num_heads = 7"):
        SpidRConfig(encoder_num_heads=7)
    with pytest.raises(ConfigError, match=r"encoder_dropout = 1.5 is invalid: expected a number in \[0, 1\]"):
        DinoSRConfig(encoder_dropout=1.5)
    with pytest.raises(ConfigError, match=r"ema_timescale = 0"):
        SpidRConfig(ema_timescale=0)
    # Values the reference release trains with, however unusual, are accepted (it does not check them).
    assert DinoSRConfig(codebook_decay=1.5, freeze_step=-1, encoder_layer_drop=1.0).freeze_step == -1


@pytest.fixture(scope="module")
def small_model():
    return model_from_fixture(load_fixture("spidr_small.pt"))


def test_waveform_errors_name_the_argument(small_model):
    with pytest.raises(ValueError, match=r"waveforms must have shape \(batch, samples\), got \(16000,\).*unsqueeze"):
        small_model.get_intermediate_outputs(torch.randn(16000))
    with pytest.raises(TypeError, match="waveforms must be a floating-point tensor, got torch.int16"):
        small_model.get_intermediate_outputs(torch.zeros(1, 16000, dtype=torch.int16))
    with pytest.raises(ValueError, match="fewer than the 400"):
        small_model(torch.randn(1, 399))
    with pytest.raises(TypeError, match="waveforms must be a torch.Tensor"):
        small_model.get_codebooks([0.0] * 16000)


def test_mask_errors_name_the_argument(small_model):
    wavs = torch.randn(2, 16000)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, 1, 1, frames\) = \(2, 1, 1, 49\)"):
        small_model(wavs, attention_mask=torch.ones(2, 1, 1, 50, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask must be a bool tensor"):
        small_model(wavs, attention_mask=torch.ones(2, 1, 1, 49))
    with pytest.raises(TypeError, match="mask_indices must be an int64"):
        small_model(wavs, mask_indices=torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"mask_indices must have shape \(batch=2, masked_per_row\)"):
        small_model(wavs, mask_indices=torch.zeros(3, 3, dtype=torch.int64))


def test_num_layers_out_of_range(small_model):
    feats = torch.randn(1, 10, 64)
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 4\], got 5"):
        small_model.student.get_intermediate_outputs(feats, num_layers=5)
    assert len(small_model.student.get_intermediate_outputs(feats, num_layers=2)) == 2


def test_forward_without_mask_predicts_every_frame(small_model):
    with torch.no_grad():
        loss, ppl = small_model(torch.randn(2, 16000))
    assert loss.shape == (2 * 49,) and set(ppl) == {"target_ppl", "pred_ppl"}


def test_schedules_and_freezing():
    model = SpidR(SpidRConfig(**{**load_fixture("spidr_small.pt")["config"], "freeze_step": 3}))
    assert model.update_ema(0) == pytest.approx(0.999)
    assert model.update_ema(2) < 1.0 and model.feature_extractor.conv_layers[0].conv.weight.requires_grad
    model.update_ema(3)
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    assert not any(p.requires_grad for p in model.feature_projection.parameters())
    assert model.update_ema(10**6) == 1.0  # 1 - decay below ema_threshold: frozen teacher
    teacher = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    model.update_ema(10**6)
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher.items())
    assert model.current_step.item() == 10**6
    model.train()
    assert model.training and not model.teacher.training
