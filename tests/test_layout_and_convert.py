"""State-dict layout of the three base models, and conversion of original DinoSR fairseq checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from spidr.config import DinoSRConfig
from spidr.models import DinoSR, dinosr_base_original, dinosr_base_reproduced, spidr_base
from spidr.models import state_dict_from_dinosr_fairseq_checkpoint as convert
from tests.conftest import FIXTURES, load_fixture

LAYOUT = json.loads((FIXTURES / "state_dict_layout.json").read_text())


@pytest.mark.parametrize(
    ("name", "constructor"),
    [
        ("spidr_base", spidr_base),
        ("dinosr_base_reproduced", dinosr_base_reproduced),
        ("dinosr_base_original", dinosr_base_original),
    ],
)
def test_base_layout_matches_release(name, constructor):
    with torch.device("meta"):
        model = constructor(pretrained=False)
    assert not model.training
    layout = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    expected = [(k, shape, dtype) for k, (shape, dtype) in LAYOUT[name].items()]
    assert layout == expected


def test_fresh_base_model_builds_on_cpu():
    model = spidr_base(pretrained=False)
    assert model.current_step.tolist() == [0]
    assert all(not p.requires_grad for p in model.teacher.parameters())
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and not n.startswith("teacher.")]
    assert frozen == ["student.layers.11.final_layer_norm.weight", "student.layers.11.final_layer_norm.bias"]


def test_fairseq_conversion_matches_release():
    fixture = load_fixture("dinosr_fairseq_small.pt")
    converted = convert(fixture["fairseq_checkpoint"])
    expected = fixture["converted_state_dict"]
    assert list(converted) == list(expected)
    for key, value in expected.items():
        assert converted[key].dtype == value.dtype, key
        assert torch.equal(converted[key], value), key
    model = DinoSR(DinoSRConfig(**fixture["config"]))
    model.load_state_dict(converted, strict=True)
    assert model.current_step.item() == 123456


def test_fairseq_conversion_without_optimizer_state_starts_at_step_zero():
    checkpoint = dict(load_fixture("dinosr_fairseq_small.pt")["fairseq_checkpoint"])
    del checkpoint["last_optimizer_state"]
    assert convert(checkpoint)["current_step"].tolist() == [0]


def test_fairseq_conversion_names_unknown_key():
    checkpoint = load_fixture("dinosr_fairseq_small.pt")["fairseq_checkpoint"]
    broken = {"model": {**checkpoint["model"], "encoder.something_new": torch.zeros(1)}}
    with pytest.raises(ValueError, match="model.encoder.something_new"):
        convert(broken)
    with pytest.raises(KeyError, match="_ema"):
        convert({"model": {"mask_emb": torch.zeros(2)}})
