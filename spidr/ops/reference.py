"""The ``torch`` backend: plain PyTorch implementations, the reference every other backend matches.

They follow SPEC 1.5 and 1.6 arithmetic for arithmetic (the release's ``||c||^2 - 2 x.c`` form with
``addmm``, its EMA formula), but never build an ``(N, K)`` one-hot: counts are a ``bincount``, sums
an ``index_add_``, and the loss keeps one head's logits alive at a time.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def assign_codes(x: Tensor, codebooks: Tensor, counts: Tensor) -> Tensor:
    """Labels (C, N) int64: squared-L2 argmin of each row of x against ``codebooks / counts``."""
    num_codebooks, n, _ = x.shape
    labels = torch.empty((num_codebooks, n), dtype=torch.int64, device=x.device)
    if n == 0:
        return labels
    with torch.autocast(x.device.type, enabled=False):
        for i in range(num_codebooks):
            codewords = codebooks[i].float() / counts[i].float().unsqueeze(1)
            distances = torch.addmm(codewords.square().sum(1), x[i].float(), codewords.t(), alpha=-2)
            labels[i] = distances.argmin(1)
    return labels


def segment_sums(x: Tensor, labels: Tensor, num_codewords: int) -> tuple[Tensor, Tensor]:
    """Per codebook: how many rows have each label (C, K) and the sum of those rows (C, K, D), in float32."""
    num_codebooks, n, dim = x.shape
    flat = (labels + torch.arange(num_codebooks, device=labels.device).unsqueeze(1) * num_codewords).reshape(-1)
    # index_add_ rather than bincount: the output size stays static, which torch.compile needs
    count = torch.zeros(num_codebooks * num_codewords, dtype=torch.float32, device=x.device)
    count.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    memory = torch.zeros(num_codebooks * num_codewords, dim, dtype=torch.float32, device=x.device)
    memory.index_add_(0, flat, x.reshape(num_codebooks * n, dim).float())  # not (-1, dim): D may be 0
    return count.view(num_codebooks, num_codewords), memory.view(num_codebooks, num_codewords, dim)


def all_reduce_sums(count: Tensor, memory: Tensor, group: object | None = None) -> tuple[Tensor, Tensor]:
    """Sum ``count`` and ``memory`` over the ranks of ``group`` in one all-reduce (no-op when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return count, memory
    flat = torch.cat([count.reshape(-1), memory.reshape(-1)])
    dist.all_reduce(flat, group=group)
    return flat[: count.numel()].view_as(count), flat[count.numel() :].view_as(memory)


def apply_ema_(codebooks: Tensor, counts: Tensor, count: Tensor, memory: Tensor, decay: float) -> None:
    """In place: ``counts = d*counts + (1-d)*count`` and likewise for sums, where ``count > 0``.

    ``memory`` is overwritten (it holds ``(1-d)*memory`` afterwards): the blend runs in place, with the
    rounding of the expression above (each product rounded, then their sum).
    """
    alpha = torch.where(count != 0, torch.tensor(decay, dtype=count.dtype, device=count.device), 1.0)
    beta = 1 - alpha
    counts.mul_(alpha).add_(beta * count)
    codebooks.mul_(alpha.unsqueeze(-1)).add_(memory.mul_(beta.unsqueeze(-1)))


@torch.no_grad()
def codebook_update_(
    codebooks: Tensor, counts: Tensor, x: Tensor, labels: Tensor, decay: float, *, group: object | None = None
) -> None:
    """EMA update of the decayed sums and counts of SPEC 1.5, in place."""
    count, memory = segment_sums(x, labels, codebooks.shape[1])
    count, memory = all_reduce_sums(count, memory, group)
    apply_ema_(codebooks, counts, count, memory, decay)


def _head_logits(h: Tensor, weight: Tensor, bias: Tensor, i: int) -> Tensor:
    hi = h[i] if h.dim() == 3 else h
    if not (h.dtype == weight.dtype == bias.dtype) and not torch.is_autocast_enabled(h.device.type):
        # Mixed dtypes outside autocast (which casts them itself): computed in float32, as the compiled backends do.
        acc = _accumulation_dtype(h)
        return torch.addmm(bias[i].to(acc), hi.to(acc), weight[i].to(acc).t())
    return torch.addmm(bias[i], hi, weight[i].t())


def _accumulation_dtype(h: Tensor) -> torch.dtype:
    # float32 whatever the input, except float64 (kept so gradcheck can verify the formula).
    return torch.float64 if h.dtype == torch.float64 else torch.float32


class _MaskedPredictionLoss(torch.autograd.Function):
    """Mean over heads of the cross-entropy, one head's (N, K) logits alive at a time.

    Forward saves only its inputs; backward recomputes each head's logits in float32, turns them
    into ``softmax - onehot`` in place and reduces them into the gradients.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        num_heads, num_codewords, _ = weight.shape
        n = labels.shape[1]
        acc = _accumulation_dtype(h)
        loss = torch.zeros(n, dtype=acc, device=h.device)
        mean_probs = torch.zeros((num_heads, num_codewords), dtype=acc, device=h.device)
        for i in range(num_heads):
            log_probs = torch.log_softmax(_head_logits(h, weight, bias, i).to(acc), dim=-1)
            loss -= log_probs.gather(1, labels[i].unsqueeze(1)).squeeze(1)
            if n:
                mean_probs[i] = log_probs.exp().sum(0) / n
        ctx.save_for_backward(h, weight, bias, labels)
        ctx.mark_non_differentiable(mean_probs)
        return loss / num_heads, mean_probs

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_probs: Tensor | None):  # type: ignore[override]
        h, weight, bias, labels = ctx.saved_tensors
        num_heads = weight.shape[0]
        acc = _accumulation_dtype(h)
        scale = (grad_loss.to(acc) / num_heads).unsqueeze(1)
        grad_h = torch.zeros_like(h, dtype=acc) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        grad_b = torch.empty_like(bias) if ctx.needs_input_grad[2] else None
        rows = torch.arange(labels.shape[1], device=labels.device)
        for i in range(num_heads):
            hi = (h[i] if h.dim() == 3 else h).to(acc)
            wi = weight[i].to(acc)
            g = torch.softmax(torch.addmm(bias[i].to(acc), hi, wi.t()), dim=-1)
            g[rows, labels[i]] -= 1.0
            g.mul_(scale)
            if grad_h is not None:
                if h.dim() == 3:
                    grad_h[i] = g @ wi
                else:
                    grad_h += g @ wi
            if grad_w is not None:
                grad_w[i] = g.t() @ hi  # cast to weight's dtype by the assignment
            if grad_b is not None:
                grad_b[i] = g.sum(0)
        if grad_h is not None:
            grad_h = grad_h.to(h.dtype)
        return grad_h, grad_w, grad_b, None


def masked_prediction_loss(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-frame loss (N,) averaged over heads, and the heads' mean probabilities (C, K)."""
    return _MaskedPredictionLoss.apply(h, weight, bias, labels)
