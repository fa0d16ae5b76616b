"""The ``triton`` backend: the kernels of ``spidr.kernels`` as torch.library custom ops.

Registered whenever triton is installed (checked without importing it); usable on CUDA devices,
and on the CPU only under Triton's interpreter (``TRITON_INTERPRET=1``, for tests: it is slow).
The kernels are imported at the first call, so ``import spidr`` never imports triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from spidr.ops import reference
from spidr.ops.registry import Backend, register


@torch.library.custom_op("spidr_triton::assign_codes", mutates_args=())
def _assign_codes(x: Tensor, codebooks: Tensor, counts: Tensor) -> Tensor:
    from spidr.kernels import codebooks as kernels

    return kernels.assign_codes(x, codebooks, counts)


@_assign_codes.register_fake
def _(x: Tensor, codebooks: Tensor, counts: Tensor) -> Tensor:
    return x.new_empty(x.shape[:2], dtype=torch.int64)


@torch.library.custom_op("spidr_triton::segment_sums", mutates_args=())
def _segment_sums(x: Tensor, labels: Tensor, num_codewords: int) -> tuple[Tensor, Tensor]:
    from spidr.kernels import codebooks as kernels

    return kernels.segment_sums(x, labels, num_codewords)


@_segment_sums.register_fake
def _(x: Tensor, labels: Tensor, num_codewords: int) -> tuple[Tensor, Tensor]:
    c, _, d = x.shape
    return x.new_empty((c, num_codewords), dtype=torch.float32), x.new_empty(
        (c, num_codewords, d), dtype=torch.float32
    )


@torch.library.custom_op("spidr_triton::mpl_forward", mutates_args=())
def _mpl_forward(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    from spidr.kernels import loss as kernels

    return kernels.mpl_forward(h, weight, bias, labels)


@_mpl_forward.register_fake
def _(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n = h.shape[-2]
    return (
        h.new_empty((n,), dtype=torch.float32),
        h.new_empty(tuple(bias.shape), dtype=torch.float32),
        h.new_empty((weight.shape[0], n), dtype=torch.float32),
    )


@torch.library.custom_op("spidr_triton::mpl_backward", mutates_args=())
def _mpl_backward(
    grad_loss: Tensor, h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    from spidr.kernels import loss as kernels

    return kernels.mpl_backward(grad_loss, h, weight, bias, labels, lse)


@_mpl_backward.register_fake
def _(grad_loss, h, weight, bias, labels, lse):
    return torch.empty_like(h), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output) -> None:
    h, weight, bias, labels = inputs
    _, mean_probs, lse = output
    ctx.save_for_backward(h, weight, bias, labels, lse)
    ctx.mark_non_differentiable(mean_probs, lse)


def _backward(ctx, grad_loss, _grad_probs, _grad_lse):
    h, weight, bias, labels, lse = ctx.saved_tensors
    grad_h, grad_w, grad_b = _mpl_backward(grad_loss.contiguous(), h, weight, bias, labels, lse)
    return grad_h, grad_w, grad_b, None


_mpl_forward.register_autograd(_backward, setup_context=_setup_context)


def assign_codes(x: Tensor, codebooks: Tensor, counts: Tensor) -> Tensor:
    return _assign_codes(x, codebooks.float().contiguous(), counts.float().contiguous())


def codebook_update_(
    codebooks: Tensor, counts: Tensor, x: Tensor, labels: Tensor, decay: float, *, group: object | None = None
) -> None:
    count, memory = _segment_sums(x, labels.contiguous(), codebooks.shape[1])
    count, memory = reference.all_reduce_sums(count, memory, group)
    reference.apply_ema_(codebooks, counts, count, memory, decay)


def masked_prediction_loss(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    loss, mean_probs, _ = _mpl_forward(h, weight, bias, labels.contiguous())
    return loss, mean_probs


def _available(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET") == "1"


def register_backend() -> None:
    """Register ``triton`` when the package is installed."""
    if importlib.util.find_spec("triton") is None:
        return
    register(
        Backend(
            name="triton",
            # On the CPU it only runs interpreted: ranked below the reference, used when forced.
            priorities={"cuda": 20, "cpu": -10},
            available=_available,
            assign_codes=assign_codes,
            codebook_update_=codebook_update_,
            masked_prediction_loss=masked_prediction_loss,
        )
    )
