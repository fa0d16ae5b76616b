"""Triton kernels of the masked-prediction loss: a chunked, fused linear cross-entropy.

Shapes: C heads, N rows, D features, K codewords. Matches ``spidr.ops.reference.masked_prediction_loss``
without ever holding the (N, K) logits of a head:

* :func:`mpl_forward`: one program per (BLOCK_N rows, head). A first sweep over the K tiles builds
  each row's log-sum-exp online (running max and rescaled sum) and picks the label's logit; a second
  sweep recomputes the tiles and adds ``exp(logits - lse)`` over the block's rows into a
  (C, row blocks, K) buffer, reduced by torch into ``mean_probs`` (deterministic, no atomics).
* :func:`mpl_backward`: per chunk of rows and per head, a kernel recomputes the chunk's logits tile
  by tile and writes ``g = (softmax - onehot) * grad_loss / C`` into one reused (chunk, K) buffer;
  torch GEMMs on that chunk accumulate ``grad_h``, ``grad_weight`` and ``grad_bias`` in float32.

Logits are accumulated in float32 (``tl.dot`` with IEEE precision) whatever the input dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["mpl_backward", "mpl_forward"]


@triton.jit
def _logits_tile(
    h_rows,
    row_mask,
    w_base,
    b_base,
    ks,
    k_mask,
    dim,
    stride_hd,
    stride_wk,
    stride_wd,
    stride_bk,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Float32 logits (BLOCK_N, BLOCK_K): ``h_rows`` points at each row's first feature."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < dim
        ht = tl.load(h_rows[:, None] + ds[None, :] * stride_hd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        wt = tl.load(
            w_base + ks.to(tl.int64)[:, None] * stride_wk + ds[None, :] * stride_wd,
            mask=k_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(ht.to(tl.float32), tl.trans(wt.to(tl.float32)), acc, input_precision="ieee")
    bias = tl.load(b_base + ks * stride_bk, mask=k_mask, other=0.0).to(tl.float32)
    return acc + bias[None, :]


@triton.jit
def _mpl_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    labels_ptr,
    nll_ptr,
    lse_ptr,
    partial_ptr,
    n_rows,
    n_codewords,
    dim,
    stride_hc,
    stride_hn,
    stride_hd,
    stride_wc,
    stride_wk,
    stride_wd,
    stride_bc,
    stride_bk,
    stride_lc,
    stride_ln,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # nll, lse (C, N) and partial (C, cdiv(N, BLOCK_N), K) are contiguous float32.
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1).to(tl.int64)
    n_blocks = tl.num_programs(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    h_rows = h_ptr + pid_c * stride_hc + rows.to(tl.int64) * stride_hn
    w_base = w_ptr + pid_c * stride_wc
    b_base = b_ptr + pid_c * stride_bc
    labels = tl.load(labels_ptr + pid_c * stride_lc + rows * stride_ln, mask=row_mask, other=-1)

    # Sweep 1: online log-sum-exp and the label's logit.
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, n_codewords, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_codewords
        logits = _logits_tile(
            h_rows, row_mask, w_base, b_base, ks, k_mask, dim, stride_hd, stride_wk, stride_wd, stride_bk,
            BLOCK_N, BLOCK_K, BLOCK_D,
        )  # fmt: skip
        logits = tl.where(k_mask[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
        hit = ks[None, :] == labels[:, None]
        target += tl.sum(tl.where(hit, logits, 0.0), axis=1)
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + pid_c * n_rows + rows, lse, mask=row_mask)
    tl.store(nll_ptr + pid_c * n_rows + rows, lse - target, mask=row_mask)

    # Sweep 2: this block's column sums of the softmax, for mean_probs.
    partial_base = partial_ptr + (pid_c * n_blocks + pid_n) * n_codewords
    for k0 in range(0, n_codewords, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_codewords
        logits = _logits_tile(
            h_rows, row_mask, w_base, b_base, ks, k_mask, dim, stride_hd, stride_wk, stride_wd, stride_bk,
            BLOCK_N, BLOCK_K, BLOCK_D,
        )  # fmt: skip
        probs = tl.exp(logits - lse[:, None])
        probs = tl.where(row_mask[:, None] & k_mask[None, :], probs, 0.0)
        tl.store(partial_base + ks, tl.sum(probs, axis=0), mask=k_mask)


@triton.jit
def _mpl_grad_logits_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    labels_ptr,
    lse_ptr,
    scale_ptr,
    g_ptr,
    n_rows,
    n_codewords,
    dim,
    stride_hn,
    stride_hd,
    stride_wk,
    stride_wd,
    stride_g,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One head and one chunk of rows: h (rows, D), w (K, D), b (K,) contiguous, labels/lse/scale (rows,)
    # contiguous; g (rows, K) float32 with row stride stride_g.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < n_codewords
    h_rows = h_ptr + rows.to(tl.int64) * stride_hn
    logits = _logits_tile(
        h_rows, row_mask, w_ptr, b_ptr, ks, k_mask, dim, stride_hd, stride_wk, stride_wd, 1, BLOCK_N, BLOCK_K, BLOCK_D
    )
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    probs = tl.exp(logits - lse[:, None])
    g = tl.where(ks[None, :] == labels[:, None], probs - 1.0, probs) * scale[:, None]
    tl.store(g_ptr + rows.to(tl.int64)[:, None] * stride_g + ks[None, :], g, mask=row_mask[:, None] & k_mask[None, :])


def mpl_forward(
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    *,
    BLOCK_N: int = 64,
    BLOCK_K: int = 64,
    BLOCK_D: int = 64,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of the masked-prediction loss without materialising any (N, K) logits.

    Args:
        h: (N, D) features shared by all heads, or (C, N, D) one per head; float32, bfloat16 or float16.
        weight: (C, K, D) the heads' weights (any float dtype).
        bias: (C, K) the heads' biases (any float dtype).
        labels: (C, N) int64 targets in [0, K).
        BLOCK_N, BLOCK_K, BLOCK_D: tile sizes (powers of two, at least 16 on a GPU).

    Returns:
        ``loss`` (N,) float32, the per-head ``-log_softmax(h_i W_i^T + b_i)[label]`` summed in head order
        and divided by C; ``mean_probs`` (C, K) float32, each head's softmax averaged over the rows
        (zeros when N = 0); ``lse`` (C, N) float32, each head's log-sum-exp of the logits (for backward).
    """
    num_heads, num_codewords, dim = weight.shape
    n = labels.shape[1]
    device = h.device
    lse = torch.empty((num_heads, n), dtype=torch.float32, device=device)
    mean_probs = torch.zeros((num_heads, num_codewords), dtype=torch.float32, device=device)
    if n == 0 or num_heads == 0:
        return torch.zeros(n, dtype=torch.float32, device=device), mean_probs, lse
    nll = torch.empty((num_heads, n), dtype=torch.float32, device=device)
    n_blocks = triton.cdiv(n, BLOCK_N)
    partial = torch.empty((num_heads, n_blocks, num_codewords), dtype=torch.float32, device=device)
    stride_hc = h.stride(0) if h.dim() == 3 else 0
    _mpl_fwd_kernel[(n_blocks, num_heads)](
        h,
        weight,
        bias,
        labels,
        nll,
        lse,
        partial,
        n,
        num_codewords,
        dim,
        stride_hc,
        h.stride(-2),
        h.stride(-1),
        weight.stride(0),
        weight.stride(1),
        weight.stride(2),
        bias.stride(0),
        bias.stride(1),
        labels.stride(0),
        labels.stride(1),
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        BLOCK_D=BLOCK_D,
    )
    loss = nll[0].clone()
    for i in range(1, num_heads):
        loss += nll[i]
    loss /= num_heads
    torch.div(partial.sum(1), n, out=mean_probs)
    return loss, mean_probs, lse


def mpl_backward(
    grad_loss: Tensor,
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    labels: Tensor,
    lse: Tensor,
    *,
    chunk_size: int = 1024,
    BLOCK_N: int = 64,
    BLOCK_K: int = 64,
    BLOCK_D: int = 64,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``loss`` (from :func:`mpl_forward`) with respect to h, weight and bias.

    Rows are processed ``chunk_size`` at a time; for each chunk and head a kernel writes
    ``g = (exp(logits - lse) - onehot) * grad_loss / C`` into one reused (chunk_size, K) float32 buffer,
    then ``grad_h += g W_i``, ``grad_W_i += g^T h`` and ``grad_b_i += g.sum(0)`` run as float32 GEMMs.

    Args:
        grad_loss: (N,) gradient of the per-row loss (any float dtype).
        h: (N, D) or (C, N, D) features, as given to :func:`mpl_forward`.
        weight: (C, K, D); bias: (C, K); labels: (C, N) int64.
        lse: (C, N) float32 log-sum-exp returned by :func:`mpl_forward`.
        chunk_size: rows per chunk.
        BLOCK_N, BLOCK_K, BLOCK_D: tile sizes of the logits kernel.

    Returns:
        ``grad_h``, ``grad_weight``, ``grad_bias`` with the shapes and dtypes of h, weight and bias
        (computed in float32).
    """
    num_heads, num_codewords, dim = weight.shape
    n = labels.shape[1]
    device = h.device
    grad_h = torch.zeros(h.shape, dtype=torch.float32, device=device)
    grad_w = torch.zeros((num_heads, num_codewords, dim), dtype=torch.float32, device=device)
    grad_b = torch.zeros((num_heads, num_codewords), dtype=torch.float32, device=device)
    if n > 0 and num_heads > 0:
        weight32 = weight.float().contiguous()
        bias32 = bias.float().contiguous()
        scale = (grad_loss.float() / num_heads).contiguous()
        labels = labels.contiguous()
        lse = lse.float().contiguous()
        chunk_size = max(1, min(chunk_size, n))
        g_buf = torch.empty((chunk_size, num_codewords), dtype=torch.float32, device=device)
        for r0 in range(0, n, chunk_size):
            r1 = min(n, r0 + chunk_size)
            rows = r1 - r0
            g = g_buf[:rows]
            shared = h[r0:r1].float().contiguous() if h.dim() == 2 else None
            grid = (triton.cdiv(rows, BLOCK_N), triton.cdiv(num_codewords, BLOCK_K))
            for i in range(num_heads):
                h_chunk = shared if shared is not None else h[i, r0:r1].float().contiguous()
                _mpl_grad_logits_kernel[grid](
                    h_chunk,
                    weight32[i],
                    bias32[i],
                    labels[i, r0:r1],
                    lse[i, r0:r1],
                    scale[r0:r1],
                    g,
                    rows,
                    num_codewords,
                    dim,
                    h_chunk.stride(0),
                    h_chunk.stride(1),
                    weight32.stride(1),
                    weight32.stride(2),
                    g.stride(0),
                    BLOCK_N=BLOCK_N,
                    BLOCK_K=BLOCK_K,
                    BLOCK_D=BLOCK_D,
                )
                grad_h_chunk = grad_h[r0:r1] if h.dim() == 2 else grad_h[i, r0:r1]
                grad_h_chunk.addmm_(g, weight32[i])
                grad_w[i].addmm_(g.t(), h_chunk)
                grad_b[i] += g.sum(0)
    return grad_h.to(h.dtype), grad_w.to(weight.dtype), grad_b.to(bias.dtype)
