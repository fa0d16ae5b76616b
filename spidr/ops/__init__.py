"""The seam between the models and the kernels.

Models reach codebook assignment, the EMA codebook update and the masked-prediction loss only
through the three functions here. Each dispatches to a backend: ``torch`` (plain PyTorch, the
reference, always present) and, where built, compiled or Triton kernels. The fastest usable one
runs unless ``SPIDR_OPS_BACKEND=name`` or ``with spidr.ops.use_backend(name):`` forces one; a
forced backend that cannot run raises :class:`BackendError` instead of falling back.

Shapes: C codebooks (or heads), N frames, D features, K codewords.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spidr import _extension
from spidr.ops import checks, reference
from spidr.ops.registry import (
    Backend,
    BackendError,
    _forced_name,
    add_loader,
    backends,
    last_backend,
    register,
    registered,
    select,
    use_backend,
)

__all__ = [
    "Backend",
    "BackendError",
    "assign_codes",
    "backends",
    "codebook_update_",
    "last_backend",
    "layer_norm_gelu_",
    "masked_prediction_loss",
    "registered",
    "use_backend",
]

register(
    Backend(
        name="torch",
        priorities={"*": 0},
        available=lambda device_type: True,
        assign_codes=reference.assign_codes,
        codebook_update_=reference.codebook_update_,
        masked_prediction_loss=reference.masked_prediction_loss,
    )
)


def _load_compiled() -> None:
    # Loading the extension at the first op call (not at import) keeps `import spidr` light, and
    # gives the one warning that says why when it cannot be imported.
    from spidr.ops import compiled, triton_backend

    compiled.register_backends(_extension.load() is not None)
    triton_backend.register_backend()


add_loader(_load_compiled)


def assign_codes(x: Tensor, codebooks: Tensor, counts: Tensor) -> Tensor:
    """Assign every row of ``x`` to its nearest codeword, per codebook.

    Args:
        x: (C, N, D) vectors to assign, any float dtype (computed in float32).
        codebooks: (C, K, D) decayed sums of assigned vectors.
        counts: (C, K) decayed counts; the codewords are ``codebooks / counts[..., None]``.

    Returns:
        int64 labels (C, N): the argmin over k of ``||c_k||^2 - 2 x.c_k``, ties to the lowest index.
        No (N, K) one-hot is built.

    Raises:
        TypeError, ValueError: a wrong rank, dtype, shape or device, naming the argument (K = 0 included).
        BackendError: the forced backend cannot run on these tensors.
    """
    checks.check_assign(x, codebooks, counts)
    return select(x.device).assign_codes(x, codebooks, counts)


def codebook_update_(
    codebooks: Tensor,
    counts: Tensor,
    x: Tensor,
    labels: Tensor,
    decay: float,
    *,
    group: torch.distributed.ProcessGroup | None = None,
) -> None:
    """EMA update of the codebooks in place (SPEC 1.5).

    For each codebook, ``count_k`` (rows labelled k) and ``memory_k`` (their sum) are computed, summed
    over the ranks of ``group`` in ONE all-reduce for all codebooks when torch.distributed is
    initialised, then for codewords with ``count_k > 0``:
    ``counts_k = d * counts_k + (1 - d) * count_k`` and ``codebooks_k = d * codebooks_k + (1 - d) * memory_k``.
    Codewords with no assigned row are left unchanged.

    Args:
        codebooks: (C, K, D) float32, updated in place.
        counts: (C, K) float32, updated in place.
        x: (C, N, D) assigned vectors, any float dtype (summed in float32). N may be 0.
        labels: (C, N) int64 in [0, K), as returned by :func:`assign_codes`.
        decay: d in [0, 1].
        group: the process group to reduce over (default: the world).

    Raises:
        TypeError, ValueError: a wrong rank, dtype, shape or device, naming the argument, K = 0, a decay
            outside [0, 1], or (CPU tensors) labels outside [0, K). Nothing is updated then.
        BackendError: the forced backend cannot run on these tensors.
    """
    checks.check_update(codebooks, counts, x, labels, decay)
    select(x.device).codebook_update_(codebooks, counts, x, labels, float(decay), group=group)


def masked_prediction_loss(h: Tensor, weight: Tensor, bias: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of the prediction heads against the codebook labels, averaged over heads.

    Args:
        h: (N, D) features shared by all heads (DinoSR), or (C, N, D), one per head (SpidR).
        weight: (C, K, D) the heads' Linear weights.
        bias: (C, K) the heads' Linear biases.
        labels: (C, N) int64 targets.

    Returns:
        ``loss`` (N,) float32: mean over heads of ``-log_softmax(h W^T + b)[label]``, differentiable in
        ``h``, ``weight`` and ``bias``; and ``mean_probs`` (C, K) float32: each head's softmax averaged
        over the N frames (no gradient; zeros when N = 0). The backward never keeps all heads'
        (N, K) logits alive.

    Raises:
        TypeError, ValueError: a wrong rank, dtype, shape or device, naming the argument, C = 0 or K = 0,
            or (CPU tensors) labels outside [0, K).
        BackendError: the forced backend cannot run on these tensors.
    """
    checks.check_loss(h, weight, bias, labels)
    return select(h.device).masked_prediction_loss(h, weight, bias, labels)


def layer_norm_gelu_(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``gelu(layer_norm(x))`` over the last dimension (exact erf GELU), in place where the kernel applies.

    Not one of the three ops of the seam: a fused helper for the conv extractor's and the positional
    convs' normalisation when extracting features. The ``cpp`` kernel (one pass over memory instead of two,
    no new allocation; equal to PyTorch's pair within 1e-5) runs when the extension is loaded, ``x`` is a
    contiguous float32 CPU tensor whose last dimension is a multiple of 16 and no gradient is recorded, unless
    ``use_backend("torch")`` or ``SPIDR_OPS_BACKEND=torch`` forces PyTorch; otherwise
    ``F.gelu(F.layer_norm(x, ...))``.

    Args:
        x: (..., D) activations, overwritten on the fused path.
        weight, bias: (D,) affine parameters of the LayerNorm, or None.
        eps: the LayerNorm's epsilon.

    Returns:
        The result: ``x`` itself on the fused path, a new tensor otherwise.
    """
    fused = (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.is_contiguous()
        and x.shape[-1] % 16 == 0
        and not (torch.is_grad_enabled() and (x.requires_grad or getattr(weight, "requires_grad", False)))
        and all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in (weight, bias))
        and _forced_name() != "torch"
        and _extension.load() is not None
        and hasattr(torch.ops.spidr, "layer_norm_gelu_")
    )
    if fused:
        return torch.ops.spidr.layer_norm_gelu_(x, weight, bias, float(eps))
    return torch.nn.functional.gelu(torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps))
