"""The compiled backends: ``cpp`` (csrc/cpu, OpenMP) and ``cuda`` (csrc/cuda), both ops of ``spidr._C``.

The C++ library defines the schemas ``spidr::assign_codes``, ``spidr::segment_sums``,
``spidr::mpl_forward`` and ``spidr::mpl_backward`` (csrc/spidr_ext.cpp) with CPU and, when built
with CUDA, CUDA kernels. Here they get fake (meta) implementations, so ``torch.compile`` traces
through them, and the loss gets its autograd formula. A backend is registered only when the
extension holds kernels for all four ops on its dispatch key.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spidr.ops import reference
from spidr.ops.registry import Backend, register

OPS = ("assign_codes", "segment_sums", "mpl_forward", "mpl_backward")


def has_kernels(dispatch_key: str) -> bool:
    """Whether spidr._C registered kernels for every op on ``dispatch_key`` ("CPU" or "CUDA")."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"spidr::{op}", dispatch_key) for op in OPS)


def _register_abstract() -> None:
    @torch.library.register_fake("spidr::assign_codes")
    def _(x: Tensor, codebooks: Tensor, counts: Tensor) -> Tensor:
        return x.new_empty(x.shape[:2], dtype=torch.int64)

    @torch.library.register_fake("spidr::segment_sums")
    def _(x: Tensor, labels: Tensor, num_codewords: int) -> tuple[Tensor, Tensor]:
        c, _, d = x.shape
        return x.new_empty((c, num_codewords), dtype=torch.float32), x.new_empty(
            (c, num_codewords, d), dtype=torch.float32
        )

    @torch.library.register_fake("spidr::mpl_forward")
    def _(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor, compute_grads: bool):
        n = h.shape[-2]
        loss = h.new_empty((n,), dtype=torch.float32)
        mean_probs = h.new_empty(tuple(bias.shape), dtype=torch.float32)
        if compute_grads:
            return loss, mean_probs, torch.empty_like(h), torch.empty_like(weight), torch.empty_like(bias)
        return loss, mean_probs, h.new_empty((0,)), weight.new_empty((0,)), bias.new_empty((0,))

    @torch.library.register_fake("spidr::mpl_backward")
    def _(grad_loss, h, weight, bias, labels, grad_h, grad_weight, grad_bias):
        return torch.empty_like(h), torch.empty_like(weight), torch.empty_like(bias)

    # The two fused extraction helpers (CPU kernels only): their fakes let torch.compile trace an extraction.
    @torch.library.register_fake("spidr::layer_norm_gelu_")
    def _(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> None:
        return None  # in place on x, no output

    @torch.library.register_fake("spidr::conv_k3s2_gelu")
    def _(x, taps, conv_bias, normalize, weight, bias, eps):
        batch, frames, _ = x.shape
        return x.new_empty((batch, (frames - 3) // 2 + 1, taps.shape[-1]))

    def setup_context(ctx, inputs, output) -> None:
        h, weight, bias, labels, _ = inputs
        _, mean_probs, grad_h, grad_weight, grad_bias = output
        ctx.save_for_backward(h, weight, bias, labels, grad_h, grad_weight, grad_bias)
        ctx.mark_non_differentiable(mean_probs, grad_h, grad_weight, grad_bias)
        # The outputs other than the loss never receive a gradient; without this, autograd would
        # materialise zeros for each of them (a transient grad_h-sized buffer in every backward).
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, *_unused):
        h, weight, bias, labels, grad_h, grad_weight, grad_bias = ctx.saved_tensors
        if grad_loss is None:  # not materialised: nothing flowed into the loss
            return None, None, None, None, None
        if grad_h.numel() and not torch.compiler.is_compiling():
            # Eager fast path: a uniform upstream gradient (the training case, loss.sum() * scale)
            # scales the gradients the forward computed, in place, so no second copy of grad_h is
            # allocated. A second backward through this node then fails autograd's version check
            # instead of scaling twice.
            first = grad_loss.reshape(-1)[:1]
            if grad_loss.numel() == 0 or bool((grad_loss == first).all()):
                scale = first.to(torch.float32) if grad_loss.numel() else torch.ones(1, device=grad_loss.device)
                for grad in (grad_h, grad_weight, grad_bias):
                    grad.mul_(scale.to(grad.dtype))
                return grad_h, grad_weight, grad_bias, None, None
        gh, gw, gb = torch.ops.spidr.mpl_backward(
            grad_loss.contiguous(), h, weight, bias, labels, grad_h, grad_weight, grad_bias
        )
        return gh, gw, gb, None, None

    torch.library.register_autograd("spidr::mpl_forward", backward, setup_context=setup_context)


def assign_codes(x: Tensor, codebooks: Tensor, counts: Tensor) -> Tensor:
    return torch.ops.spidr.assign_codes(x.contiguous(), codebooks.float().contiguous(), counts.float().contiguous())


def codebook_update_(
    codebooks: Tensor, counts: Tensor, x: Tensor, labels: Tensor, decay: float, *, group: object | None = None
) -> None:
    count, memory = torch.ops.spidr.segment_sums(x.contiguous(), labels.contiguous(), codebooks.shape[1])
    count, memory = reference.all_reduce_sums(count, memory, group)
    reference.apply_ema_(codebooks, counts, count, memory, decay)


def masked_prediction_loss(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    wants_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad or bias.requires_grad)
    loss, mean_probs, *_ = torch.ops.spidr.mpl_forward(
        h.contiguous(), weight.contiguous(), bias.contiguous(), labels.contiguous(), wants_grad
    )
    return loss, mean_probs


def register_backends(extension_loaded: bool) -> None:
    """Register ``cpp`` and ``cuda`` when the loaded extension has all their kernels."""
    if not extension_loaded:
        return
    _register_abstract()
    if has_kernels("CPU"):
        register(
            Backend(
                name="cpp",
                priorities={"cpu": 10},
                available=lambda device_type: True,
                assign_codes=assign_codes,
                codebook_update_=codebook_update_,
                masked_prediction_loss=masked_prediction_loss,
            )
        )
    if has_kernels("CUDA"):
        register(
            Backend(
                name="cuda",
                priorities={"cuda": 30},
                available=lambda device_type: torch.cuda.is_available(),
                assign_codes=assign_codes,
                codebook_update_=codebook_update_,
                masked_prediction_loss=masked_prediction_loss,
            )
        )
