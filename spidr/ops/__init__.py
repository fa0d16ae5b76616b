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
    "conv_k3s2_gelu",
    "conv_k3s2_kernel_applies",
    "conv_k3s2_taps",
    "cpu_kernel_applies",
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


def cpu_kernel_applies(name: str, *tensors: Tensor | None) -> bool:
    """Whether the fused extraction helper ``name`` (``"layer_norm_gelu_"``, ``"conv_k3s2_gelu"``) runs its
    cpp kernel on these tensors, shapes aside: float32 CPU tensors, no gradient recorded, autocast off, the
    extension loaded, and PyTorch not forced (``use_backend("torch")`` or ``SPIDR_OPS_BACKEND=torch``).
    Callers with a faster PyTorch path of their own than the helper's reference take it otherwise."""
    return (
        all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
        and not torch.is_autocast_enabled("cpu")
        and _forced_name() != "torch"
        and _extension.load() is not None
        and hasattr(torch.ops.spidr, name)
    )


def layer_norm_gelu_(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``gelu(layer_norm(x))`` over the last dimension (exact erf GELU), in place where the kernel applies.

    Not one of the three ops of the seam: a fused helper for the conv extractor's and the positional
    convs' normalisation when extracting features. The ``cpp`` kernel (one pass over memory instead of two,
    no new allocation; equal to PyTorch's pair within 1e-5) runs when the extension is loaded, ``x`` is a
    contiguous float32 CPU tensor whose last dimension is a multiple of 16, no gradient is recorded and
    autocast is off (:func:`cpu_kernel_applies`), unless ``use_backend("torch")`` or
    ``SPIDR_OPS_BACKEND=torch`` forces PyTorch; otherwise
    ``F.gelu(F.layer_norm(x, ...))``.

    Args:
        x: (..., D) activations, overwritten on the fused path.
        weight, bias: (D,) affine parameters of the LayerNorm, or None.
        eps: the LayerNorm's epsilon.

    Returns:
        The result: ``x`` itself on the fused path, a new tensor otherwise.
    """
    fused = cpu_kernel_applies("layer_norm_gelu_", x, weight, bias) and x.is_contiguous() and x.shape[-1] % 16 == 0
    if fused:
        torch.ops.spidr.layer_norm_gelu_(x, weight, bias, float(eps))
        return x
    return torch.nn.functional.gelu(torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps))


def conv_k3s2_taps(conv_weight: Tensor) -> Tensor:
    """The tap matrices :func:`conv_k3s2_gelu` takes, from a conv weight (out, in, 3): (5, in, out) holding
    W1, W0, (W0 + W2) / 2, (W0 - W2) / 2 and W2, with W_j = ``conv_weight[:, :, j].T`` (contiguous)."""
    if conv_weight.dim() != 3 or conv_weight.shape[2] != 3:
        raise ValueError(f"conv_weight must be (out, in, 3), got shape {tuple(conv_weight.shape)}")
    w0, w1, w2 = (conv_weight[:, :, j].t() for j in range(3))
    return torch.stack([w1, w0, (w0 + w2) * 0.5, (w0 - w2) * 0.5, w2]).contiguous()


def conv_k3s2_kernel_applies(x: Tensor, conv_weight: Tensor, *tensors: Tensor | None) -> bool:
    """Whether :func:`conv_k3s2_gelu` runs its cpp kernel on ``x`` (batch, frames, in) and ``conv_weight``
    (out, in, 3) (with ``tensors``, its other arguments): :func:`cpu_kernel_applies`, at least 3 frames, in
    and out channels multiples of 16. Callers with a faster fallback of their own take it otherwise."""
    return (
        x.dim() == 3
        and x.shape[1] >= 3
        and x.shape[2] % 16 == 0
        and conv_weight.shape[0] % 16 == 0
        and cpu_kernel_applies("conv_k3s2_gelu", x, conv_weight, *tensors)
    )


def conv_k3s2_gelu(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    normalize: bool = True,
    taps: Tensor | None = None,
) -> Tensor:
    """A conv extractor block with kernel 3 and stride 2 on channels-last activations:
    ``gelu(layer_norm(conv1d(x)))`` (or ``gelu(conv1d(x))`` without ``normalize``).

    Like :func:`layer_norm_gelu_`, a fused helper outside the three ops of the seam, for feature extraction.
    The ``cpp`` kernel computes the taps on the even input rows by Winograd's minimal filtering F(3, 2)
    (seven matrix products per three outputs instead of nine; additions only in its transforms) and the
    norm and GELU while the outputs are in cache. It runs on float32 CPU tensors with channels that are
    multiples of 16, where no gradient is recorded and autocast is off, when the extension is loaded, unless
    ``use_backend("torch")`` or ``SPIDR_OPS_BACKEND=torch`` forces PyTorch; elsewhere ``F.conv1d`` then
    ``F.layer_norm`` and ``F.gelu`` (the reference of the tests). The two are equal up to float rounding.

    Args:
        x: (batch, frames, in) activations, at least 3 frames.
        conv_weight: (out, in, 3) the conv's weight; conv_bias: (out,) or None.
        weight, bias: (out,) affine parameters of the LayerNorm, or None; eps: its epsilon.
        normalize: apply the LayerNorm (False: the conv, then the GELU).
        taps: ``conv_k3s2_taps(conv_weight)`` when the caller keeps it (it is computed otherwise).

    Returns:
        (batch, (frames - 3) // 2 + 1, out).
    """
    if x.dim() != 3 or conv_weight.dim() != 3 or conv_weight.shape[1:] != (x.shape[2], 3):
        raise ValueError(
            f"x must be (batch, frames, in) and conv_weight (out, in, 3); got {tuple(x.shape)} and "
            f"{tuple(conv_weight.shape)}"
        )
    if conv_k3s2_kernel_applies(x, conv_weight, conv_bias, weight, bias):
        if taps is None:
            taps = conv_k3s2_taps(conv_weight)
        return torch.ops.spidr.conv_k3s2_gelu(x, taps, conv_bias, normalize, weight, bias, float(eps))
    y = torch.nn.functional.conv1d(x.transpose(1, 2), conv_weight, conv_bias, stride=2).transpose(1, 2)
    if normalize:
        y = torch.nn.functional.layer_norm(y, y.shape[-1:], weight, bias, eps)
    return torch.nn.functional.gelu(y)
