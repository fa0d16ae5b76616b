"""Every entry of the reference release's golden fixtures, reproduced through the public API.

Tolerances are those the release meets run to run on CPU float32 (fixtures/README.md): 1e-5 absolute
on activations and losses, 1e-4 relative on gradients, identical codebook labels and buffers.
"""

from __future__ import annotations

import pytest
import torch

import spidr.ops
from tests.conftest import model_from_fixture

ATOL = 1e-5


@pytest.fixture(params=spidr.ops.backends("cpu"))
def backend(request):
    with spidr.ops.use_backend(request.param):
        yield request.param


def assert_close_list(actual, expected, atol=ATOL):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.shape == e.shape, f"entry {i}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        torch.testing.assert_close(a, e, atol=atol, rtol=0, msg=lambda m, i=i: f"entry {i}: {m}")


@torch.no_grad()
def test_encoder_intermediate_outputs(golden):
    model = model_from_fixture(golden)
    feats = model.feature_projection(model.feature_extractor(golden["wavs_crop"]))
    before = model.student.get_intermediate_outputs(feats, before_residual=True)
    after = model.student.get_intermediate_outputs(feats, before_residual=False)
    assert_close_list(before, golden["eval_intermediate_before_residual"])
    assert_close_list(after, golden["eval_intermediate_after_residual"])


@torch.no_grad()
def test_model_intermediate_outputs(golden):
    model = model_from_fixture(golden)
    assert_close_list(model.get_intermediate_outputs(golden["wavs_crop"]), golden["eval_get_intermediate_outputs"])
    padded = model.get_intermediate_outputs(golden["wavs_pad"], attention_mask=golden["attention_mask_pad"])
    assert_close_list(padded, golden["eval_get_intermediate_outputs_pad"])


@torch.no_grad()
def test_get_codebooks(golden):
    model = model_from_fixture(golden)
    codebooks = model.get_codebooks(golden["wavs_crop"])
    num_layers = golden["config"]["encoder_num_layers"]
    num_codebooks = golden["config"]["num_codebooks"]
    assert len(codebooks) == num_layers
    assert all(c is None for c in codebooks[: num_layers - num_codebooks])
    assert_close_list(codebooks[num_layers - num_codebooks :], golden["eval_get_codebooks"])
    onehot = model.get_codebooks(golden["wavs_crop"], onehot=True)[num_layers - num_codebooks :]
    for o, p in zip(onehot, golden["eval_get_codebooks"], strict=True):
        assert torch.equal(o.argmax(-1), p.argmax(-1))
        assert torch.equal(o.sum(-1), torch.ones_like(o.sum(-1)))


@torch.no_grad()
def test_eval_forward(golden, backend):
    model = model_from_fixture(golden)
    loss, ppl = model(golden["wavs_crop"], mask_indices=golden["mask_indices_crop"])
    torch.testing.assert_close(loss, golden["eval_loss_crop"], atol=ATOL, rtol=0)
    for key in ("target_ppl", "pred_ppl"):
        torch.testing.assert_close(ppl[key], golden["eval_ppl_crop"][key], atol=ATOL, rtol=1e-6)
    loss, ppl = model(
        golden["wavs_pad"], mask_indices=golden["mask_indices_pad"], attention_mask=golden["attention_mask_pad"]
    )
    torch.testing.assert_close(loss, golden["eval_loss_pad"], atol=ATOL, rtol=0)
    for key in ("target_ppl", "pred_ppl"):
        torch.testing.assert_close(ppl[key], golden["eval_ppl_pad"][key], atol=ATOL, rtol=1e-6)
    assert spidr.ops.last_backend() == backend


def test_eval_forward_changes_no_state(golden):
    model = model_from_fixture(golden)
    with torch.no_grad():
        model(golden["wavs_crop"], mask_indices=golden["mask_indices_crop"])
    for key, value in golden["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_train_forward_backward_and_codebook_update(golden, backend):
    model = model_from_fixture(golden).train()
    loss, ppl = model(golden["wavs_crop"], mask_indices=golden["mask_indices_crop"])
    torch.testing.assert_close(loss, golden["train_loss_crop"], atol=ATOL, rtol=0)
    for key in ("target_ppl", "pred_ppl"):
        torch.testing.assert_close(ppl[key], golden["train_ppl_crop"][key], atol=ATOL, rtol=1e-6)
    loss.mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(golden["train_grads"])
    for name, expected in golden["train_grads"].items():
        torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    state = model.state_dict()
    for name, expected in golden["train_codebooks_after"].items():
        torch.testing.assert_close(state[name], expected, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_ema_update(golden):
    model = model_from_fixture(golden).train()
    model.student.load_state_dict(golden["student_after_nudge"])
    decays = {step: model.update_ema(step) for step in (1, 1000, 5000)}
    for step, expected in golden["ema_decays"].items():
        assert decays[step] == pytest.approx(float(expected), abs=1e-7), step
    assert model.current_step.tolist() == [5000]
    teacher = model.teacher.state_dict()
    assert sorted(teacher) == sorted(golden["teacher_after_ema"])
    for name, expected in golden["teacher_after_ema"].items():
        torch.testing.assert_close(teacher[name], expected, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
