"""The Triton kernels of spidr.kernels against the plain-PyTorch reference (interpreter on CPU).

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before these modules are imported, so the
kernels run in Triton's interpreter: the shapes and tiles are kept small.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from spidr.kernels import codebooks as kcodebooks
from spidr.kernels import loss as kloss

from spidr.ops import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TILES = {"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 16}
K, D = 37, 40  # neither a multiple of the tiles


def _codebook_inputs(num_codebooks: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_codebooks, n, D, generator=gen)
    codebooks = torch.randn(num_codebooks, K, D, generator=gen)
    counts = torch.rand(num_codebooks, K, generator=gen) + 0.5
    # Duplicated codewords: across tiles (3 and 20 with BLOCK_K=16) and within one tile (33 and 35).
    for lo, hi in ((3, 20), (33, 35)):
        codebooks[:, hi] = codebooks[:, lo]
        counts[:, hi] = counts[:, lo]
    if n >= 8:
        # Rows sitting on the duplicated codewords: exact ties, which must go to the lowest index.
        x[:, :4] = (codebooks[:, 20] / counts[:, 20, None]).unsqueeze(1)
        x[:, 4:8] = (codebooks[:, 35] / counts[:, 35, None]).unsqueeze(1)
    return x.to(DEVICE), codebooks.to(DEVICE), counts.to(DEVICE)


def test_import_does_not_import_triton():
    code = "import sys, spidr.kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("num_codebooks", [1, 3])
@pytest.mark.parametrize("n", [0, 150])
def test_assign_codes_matches_reference(num_codebooks, n):
    x, codebooks, counts = _codebook_inputs(num_codebooks, n)
    labels = kcodebooks.assign_codes(x, codebooks, counts, **TILES)
    assert labels.dtype == torch.int64 and labels.shape == (num_codebooks, n)
    assert torch.equal(labels, reference.assign_codes(x, codebooks, counts))
    if n:
        assert (labels[:, :4] == 3).all() and (labels[:, 4:8] == 33).all()


def test_assign_codes_bfloat16_and_strided():
    x, codebooks, counts = _codebook_inputs(3, 120, seed=1)
    x16 = x.transpose(0, 1).contiguous().transpose(0, 1).to(torch.bfloat16)  # (C, N, D) with N outermost
    assert not x16.is_contiguous()
    labels = kcodebooks.assign_codes(x16, codebooks, counts, **TILES)
    assert torch.equal(labels, reference.assign_codes(x16, codebooks, counts))


def test_assign_codes_default_tiles():
    x, codebooks, counts = _codebook_inputs(1, 70, seed=2)
    labels = kcodebooks.assign_codes(x, codebooks, counts)
    assert torch.equal(labels, reference.assign_codes(x, codebooks, counts))


@pytest.mark.parametrize("num_codebooks", [1, 3])
@pytest.mark.parametrize("n", [0, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_sums_matches_reference(num_codebooks, n, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(num_codebooks, n, D, generator=gen).to(DEVICE, dtype)
    labels = torch.randint(0, K - 5, (num_codebooks, n), generator=gen).to(DEVICE)  # some empty codewords
    count, memory = kcodebooks.segment_sums(x, labels, K, BLOCK_R=16, BLOCK_D=16)
    ref_count, ref_memory = reference.segment_sums(x, labels, K)
    assert count.dtype == memory.dtype == torch.float32
    assert count.shape == (num_codebooks, K) and memory.shape == (num_codebooks, K, D)
    torch.testing.assert_close(count, ref_count, rtol=0, atol=0)
    torch.testing.assert_close(memory, ref_memory, rtol=0, atol=1e-5)


def _loss_inputs(num_heads: int, n: int, shared: bool, seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=gen) if shared else torch.randn(num_heads, n, D, generator=gen)
    weight = torch.randn(num_heads, K, D, generator=gen) * 0.3
    bias = torch.randn(num_heads, K, generator=gen)
    labels = torch.randint(0, K, (num_heads, n), generator=gen)
    grad_loss = torch.rand(n, generator=gen) * 2 - 0.5  # non-uniform, some negative
    return h.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), labels.to(DEVICE), grad_loss.to(DEVICE)


def _reference_grads(h, weight, bias, labels, grad_loss):
    leaves = [t.detach().float().requires_grad_() for t in (h, weight, bias)]
    loss, mean_probs = reference.masked_prediction_loss(*leaves, labels)
    grads = torch.autograd.grad(loss, leaves, grad_loss) if loss.numel() else [torch.zeros_like(t) for t in leaves]
    return loss.detach(), mean_probs, grads


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    if expected.numel() == 0:
        assert actual.numel() == 0
        return
    scale = expected.abs().max().clamp_min(1e-12)
    assert ((actual.float() - expected).abs().max() / scale).item() <= rel


@pytest.mark.parametrize("shared", [True, False], ids=["shared_h", "per_head_h"])
@pytest.mark.parametrize("num_heads", [1, 3])
@pytest.mark.parametrize("n", [0, 130])
def test_masked_prediction_loss_matches_reference(shared, num_heads, n):
    h, weight, bias, labels, grad_loss = _loss_inputs(num_heads, n, shared)
    loss, mean_probs, lse = kloss.mpl_forward(h, weight, bias, labels, **TILES)
    ref_loss, ref_probs, ref_grads = _reference_grads(h, weight, bias, labels, grad_loss)
    assert loss.shape == (n,) and mean_probs.shape == (num_heads, K) and lse.shape == (num_heads, n)
    assert loss.dtype == mean_probs.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(mean_probs, ref_probs, rtol=0, atol=1e-6)
    if n:
        heads = [h[i] if h.dim() == 3 else h for i in range(num_heads)]
        ref_lse = torch.stack([torch.logsumexp(heads[i] @ weight[i].t() + bias[i], -1) for i in range(num_heads)])
        torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-5)

    grads = kloss.mpl_backward(grad_loss, h, weight, bias, labels, lse, chunk_size=48, **TILES)
    for grad, ref_grad, like in zip(grads, ref_grads, (h, weight, bias), strict=True):
        assert grad.shape == like.shape and grad.dtype == like.dtype
        _assert_rel_close(grad, ref_grad)


def test_masked_prediction_loss_bfloat16_h():
    # bf16 features with float32 weights: computed in float32, so it matches the reference on upcast h.
    h, weight, bias, labels, grad_loss = _loss_inputs(3, 70, shared=False, seed=5)
    h16 = h.to(torch.bfloat16)
    loss, mean_probs, lse = kloss.mpl_forward(h16, weight, bias, labels, **TILES)
    ref_loss, ref_probs, ref_grads = _reference_grads(h16.float(), weight, bias, labels, grad_loss)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(mean_probs, ref_probs, rtol=0, atol=1e-6)
    grad_h, grad_w, grad_b = kloss.mpl_backward(grad_loss, h16, weight, bias, labels, lse, chunk_size=32, **TILES)
    assert grad_h.dtype == torch.bfloat16 and grad_w.dtype == grad_b.dtype == torch.float32
    torch.testing.assert_close(grad_h, ref_grads[0].to(torch.bfloat16), rtol=1e-2, atol=1e-5)
    _assert_rel_close(grad_w, ref_grads[1])
    _assert_rel_close(grad_b, ref_grads[2])


def test_triton_backend_custom_op_default_tiles():
    import spidr.ops as ops

    h, weight, bias, labels, grad_loss = _loss_inputs(2, 40, shared=True, seed=6)
    leaves = [t.clone().requires_grad_() for t in (h, weight, bias)]
    with ops.use_backend("triton"):
        loss, mean_probs = ops.masked_prediction_loss(*leaves, labels)
    assert ops.last_backend() == "triton"
    assert not mean_probs.requires_grad
    grads = torch.autograd.grad(loss, leaves, grad_loss)
    ref_loss, ref_probs, ref_grads = _reference_grads(h, weight, bias, labels, grad_loss)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(mean_probs, ref_probs, rtol=0, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        _assert_rel_close(grad, ref_grad)
