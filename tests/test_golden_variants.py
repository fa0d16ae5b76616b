"""Configuration switches beyond the shipped fixtures, against outputs of the reference release.

``fixtures/variants.pt`` was produced by ``fixtures/generators/make_variants.py`` running spidr 0.2.0:
group_norm extractor with conv bias, pre-LN layers, qkv bias, an even positional kernel, padded batches.
"""

from __future__ import annotations

import pytest
import torch

from spidr.config import DinoSRConfig, SpidRConfig
from spidr.models import build_model
from tests.conftest import load_fixture

VARIANTS = load_fixture("variants.pt")


def build(entry: dict):
    cfg_class = SpidRConfig if entry["model_type"] == "spidr" else DinoSRConfig
    model = build_model(cfg=cfg_class(**entry["config"]))
    model.load_state_dict(entry["state_dict"])
    return model


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_matches_release(name):
    entry = VARIANTS[name]
    model = build(entry).eval()
    wavs, mask, idx = entry["wavs"], entry["attention_mask"], entry["mask_indices"]
    with torch.no_grad():
        for a, e in zip(
            model.get_intermediate_outputs(wavs, attention_mask=mask), entry["eval_intermediate"], strict=True
        ):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=0)
        short = wavs[:, :7100]
        codebooks = [c for c in model.get_codebooks(short) if c is not None]
        for a, e in zip(codebooks, entry["eval_codebooks"], strict=True):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=0)
        loss, ppl = model(wavs, mask_indices=idx, attention_mask=mask)
        torch.testing.assert_close(loss, entry["eval_loss"], atol=1e-5, rtol=0)
        for key in ppl:
            torch.testing.assert_close(ppl[key], entry["eval_ppl"][key], atol=1e-5, rtol=1e-6)
    model.train()
    loss, ppl = model(wavs, mask_indices=idx, attention_mask=mask)
    torch.testing.assert_close(loss.detach(), entry["train_loss"], atol=1e-5, rtol=0)
    loss.mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(entry["train_grads"])
    for n, expected in entry["train_grads"].items():
        torch.testing.assert_close(grads[n], expected, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    state = model.state_dict()
    for n, expected in entry["train_codebooks_after"].items():
        torch.testing.assert_close(state[n], expected, atol=1e-5, rtol=0)
