"""Triton kernels of the codebook ops: nearest-codeword assignment and per-codeword segment sums.

Shapes: C codebooks, N rows, D features, K codewords. Both ops match ``spidr.ops.reference``:

* :func:`assign_codes` is a tiled GEMM ``x @ c^T`` with an argmin epilogue. One program owns
  ``BLOCK_N`` rows of one codebook, walks the K codewords tile by tile (each tile a loop of
  ``tl.dot`` over D tiles accumulating in float32) and keeps a running (best distance, best index)
  per row, so the (N, K) distances never exist in memory.
* :func:`segment_sums` sorts each codebook's labels (stable), finds the segment of every codeword
  with ``searchsorted`` and sums each segment in one program per (codebook, codeword, D block):
  deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["assign_codes", "segment_sums"]


@triton.jit
def _assign_kernel(
    x_ptr,
    cw_ptr,
    norm_ptr,
    out_ptr,
    n_rows,
    n_codewords,
    dim,
    stride_xc,
    stride_xn,
    stride_xd,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # cw (C, K, D) and norm (C, K) are contiguous float32; out (C, N) is contiguous int64.
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    x_base = x_ptr + pid_c * stride_xc + rows.to(tl.int64)[:, None] * stride_xn
    cw_base = cw_ptr + pid_c * n_codewords * dim
    norm_base = norm_ptr + pid_c * n_codewords

    best_val = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_N,), dtype=tl.int64)
    for k0 in range(0, n_codewords, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_codewords
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < dim
            xt = tl.load(x_base + ds[None, :] * stride_xd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            ct = tl.load(
                cw_base + ks.to(tl.int64)[:, None] * dim + ds[None, :],
                mask=k_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(xt.to(tl.float32), tl.trans(ct), acc, input_precision="ieee")
        norms = tl.load(norm_base + ks, mask=k_mask, other=0.0)
        dist = norms[None, :] - 2.0 * acc
        dist = tl.where(k_mask[None, :], dist, float("inf"))
        # Lowest index among this tile's minima; a later tile only wins when strictly better.
        tile_idx = tl.argmin(dist, axis=1, tie_break_left=True)
        tile_val = tl.min(dist, axis=1)
        better = tile_val < best_val
        best_val = tl.where(better, tile_val, best_val)
        best_idx = tl.where(better, k0 + tile_idx.to(tl.int64), best_idx)
    tl.store(out_ptr + pid_c * n_rows + rows, best_idx, mask=row_mask)


def assign_codes(
    x: Tensor,
    codebooks: Tensor,
    counts: Tensor,
    *,
    BLOCK_N: int = 64,
    BLOCK_K: int = 64,
    BLOCK_D: int = 64,
) -> Tensor:
    """Nearest codeword of every row, per codebook, in one launch.

    Args:
        x: (C, N, D) float32, bfloat16 or float16 rows (any strides; computed in float32).
        codebooks: (C, K, D) float32 decayed sums.
        counts: (C, K) float32 decayed counts; the codewords are ``codebooks / counts[..., None]``.
        BLOCK_N, BLOCK_K, BLOCK_D: tile sizes (powers of two, at least 16 on a GPU).

    Returns:
        int64 labels (C, N): ``argmin_k ||c_k||^2 - 2 x.c_k`` in float32, ties to the lowest index.
    """
    num_codebooks, n, dim = x.shape
    num_codewords = codebooks.shape[1]
    labels = torch.empty((num_codebooks, n), dtype=torch.int64, device=x.device)
    if n == 0 or num_codebooks == 0:
        return labels
    codewords = (codebooks.float() / counts.float().unsqueeze(-1)).contiguous()
    norms = codewords.square().sum(-1).contiguous()
    grid = (triton.cdiv(n, BLOCK_N), num_codebooks)
    _assign_kernel[grid](
        x,
        codewords,
        norms,
        labels,
        n,
        num_codewords,
        dim,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        BLOCK_D=BLOCK_D,
    )
    return labels


@triton.jit
def _segment_sum_kernel(
    x_ptr,
    order_ptr,
    offsets_ptr,
    memory_ptr,
    count_ptr,
    n_rows,
    n_codewords,
    dim,
    stride_xc,
    stride_xn,
    stride_xd,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # order (C, N) int64: row indices sorted by label; offsets (C, K + 1) int64: segment bounds.
    pid_ck = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    c = pid_ck // n_codewords
    k = pid_ck % n_codewords
    start = tl.load(offsets_ptr + c * (n_codewords + 1) + k)
    end = tl.load(offsets_ptr + c * (n_codewords + 1) + k + 1)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = ds < dim
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_mask = rs < end
        idx = tl.load(order_ptr + c * n_rows + rs, mask=r_mask, other=0)
        xt = tl.load(
            x_ptr + c * stride_xc + idx[:, None] * stride_xn + ds[None, :] * stride_xd,
            mask=r_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc += xt.to(tl.float32)
    total = tl.sum(acc, axis=0)
    tl.store(memory_ptr + pid_ck * dim + ds, total, mask=d_mask)
    if pid_d == 0:
        tl.store(count_ptr + pid_ck, (end - start).to(tl.float32))


def segment_sums(
    x: Tensor,
    labels: Tensor,
    num_codewords: int,
    *,
    BLOCK_R: int = 32,
    BLOCK_D: int = 128,
) -> tuple[Tensor, Tensor]:
    """Rows per label and the sum of those rows, per codebook, deterministically (no atomics).

    Args:
        x: (C, N, D) float32, bfloat16 or float16 rows (summed in float32). N may be 0.
        labels: (C, N) int64 in [0, K).
        num_codewords: K.
        BLOCK_R, BLOCK_D: rows summed per step and features per program.

    Returns:
        ``count`` (C, K) float32 and ``memory`` (C, K, D) float32; zeros where no row has the label.
    """
    num_codebooks, n, dim = x.shape
    count = torch.zeros((num_codebooks, num_codewords), dtype=torch.float32, device=x.device)
    memory = torch.zeros((num_codebooks, num_codewords, dim), dtype=torch.float32, device=x.device)
    if n == 0 or num_codebooks == 0 or num_codewords == 0 or dim == 0:
        return count, memory
    sorted_labels, order = torch.sort(labels, dim=1, stable=True)
    bounds = torch.arange(num_codewords + 1, device=labels.device, dtype=sorted_labels.dtype)
    offsets = torch.searchsorted(sorted_labels.contiguous(), bounds.expand(num_codebooks, -1).contiguous())
    grid = (num_codebooks * num_codewords, triton.cdiv(dim, BLOCK_D))
    _segment_sum_kernel[grid](
        x,
        order.contiguous(),
        offsets.contiguous(),
        memory,
        count,
        n,
        num_codewords,
        dim,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        BLOCK_R=BLOCK_R,
        BLOCK_D=BLOCK_D,
    )
    return count, memory
