"""Argument validation shared by every backend of :mod:`spidr.ops`.

Checks look at shapes, dtypes and devices, which costs nothing on the GPU and does not break
``torch.compile`` graphs. Label values are checked only for CPU tensors outside ``torch.compile``:
on the GPU that would wait for the device, so there, labels outside [0, K) are the caller's error.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_tensor(name: str, t: object, ndim: int, dtypes: tuple[torch.dtype, ...] | None = None) -> Tensor:
    """``t`` must be a tensor of rank ``ndim`` (and one of ``dtypes`` when given)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _require(t.dim() == ndim, f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(t.dtype).removeprefix('torch.')}")
    return t


def check_labels_in_range(labels: Tensor, k: int) -> None:
    """Label values in [0, k), checked for CPU tensors when not tracing (see the module docstring)."""
    if labels.device.type != "cpu" or labels.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = int(labels.min()), int(labels.max())
    _require(0 <= low and high < k, f"labels must be in [0, K={k}), got values in [{low}, {high}]")


def check_same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on the same device: {listing}")


def check_assign(x: Tensor, codebooks: Tensor, counts: Tensor) -> None:
    """x (C, N, D) float, codebooks (C, K, D) float, counts (C, K) float."""
    check_tensor("x", x, 3, FLOAT_DTYPES)
    check_tensor("codebooks", codebooks, 3, FLOAT_DTYPES)
    check_tensor("counts", counts, 2, FLOAT_DTYPES)
    c, _, d = x.shape
    _require(
        codebooks.shape[0] == c and codebooks.shape[2] == d,
        f"codebooks must have shape (C={c}, K, D={d}) to match x {tuple(x.shape)}, got {tuple(codebooks.shape)}",
    )
    k = codebooks.shape[1]
    _require(k > 0, "codebooks must hold at least one codeword (K > 0)")
    _require(
        tuple(counts.shape) == (c, k),
        f"counts must have shape (C={c}, K={k}) to match codebooks, got {tuple(counts.shape)}",
    )
    check_same_device(x=x, codebooks=codebooks, counts=counts)


def check_update(codebooks: Tensor, counts: Tensor, x: Tensor, labels: Tensor, decay: float) -> None:
    """codebooks (C, K, D) float32, counts (C, K) float32, x (C, N, D) float, labels (C, N) int64."""
    check_tensor("codebooks", codebooks, 3, (torch.float32, torch.float64))
    check_tensor("counts", counts, 2, (torch.float32, torch.float64))
    check_tensor("x", x, 3, FLOAT_DTYPES)
    check_tensor("labels", labels, 2, (torch.int64,))
    c, k, d = codebooks.shape
    _require(k > 0, "codebooks must hold at least one codeword (K > 0)")
    _require(tuple(counts.shape) == (c, k), f"counts must have shape (C={c}, K={k}), got {tuple(counts.shape)}")
    _require(
        x.shape[0] == c and x.shape[2] == d,
        f"x must have shape (C={c}, N, D={d}) to match codebooks, got {tuple(x.shape)}",
    )
    _require(
        tuple(labels.shape) == tuple(x.shape[:2]),
        f"labels must have shape (C, N) = {tuple(x.shape[:2])} to match x, got {tuple(labels.shape)}",
    )
    _require(counts.dtype == codebooks.dtype, "counts and codebooks must have the same dtype")
    _require(codebooks.is_contiguous() and counts.is_contiguous(), "codebooks and counts must be contiguous")
    try:
        value = float(decay)
    except (TypeError, ValueError):
        raise TypeError(f"decay must be a number, got {type(decay).__name__}") from None
    _require(0.0 <= value <= 1.0, f"decay must be in [0, 1], got {decay}")
    check_same_device(codebooks=codebooks, counts=counts, x=x, labels=labels)
    check_labels_in_range(labels, k)


def check_loss(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> None:
    """h (N, D) or (C, N, D) float, weight (C, K, D), bias (C, K), labels (C, N) int64."""
    if not isinstance(h, Tensor):
        raise TypeError(f"h must be a torch.Tensor, got {type(h).__name__}")
    _require(h.dim() in (2, 3), f"h must be (N, D) or (C, N, D), got shape {tuple(h.shape)}")
    if h.dtype not in FLOAT_DTYPES:
        raise TypeError(f"h must be a floating-point tensor, got {h.dtype}")
    check_tensor("weight", weight, 3, FLOAT_DTYPES)
    check_tensor("bias", bias, 2, FLOAT_DTYPES)
    check_tensor("labels", labels, 2, (torch.int64,))
    c, k, d = weight.shape
    _require(c > 0, "weight must hold at least one head (C > 0)")
    _require(k > 0, "weight must hold at least one codeword (K > 0)")
    _require(h.shape[-1] == d, f"h must have D={d} features to match weight {tuple(weight.shape)}, got {h.shape[-1]}")
    n = h.shape[-2]
    if h.dim() == 3:
        _require(h.shape[0] == c, f"h must have C={c} heads to match weight, got shape {tuple(h.shape)}")
    _require(tuple(bias.shape) == (c, k), f"bias must have shape (C={c}, K={k}), got {tuple(bias.shape)}")
    _require(tuple(labels.shape) == (c, n), f"labels must have shape (C={c}, N={n}), got {tuple(labels.shape)}")
    check_same_device(h=h, weight=weight, bias=bias, labels=labels)
    check_labels_in_range(labels, k)
