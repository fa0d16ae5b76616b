"""DinoSR: masked prediction of online-clustered teacher targets from the student's final output."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from functools import partial
from typing import TypedDict

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from spidr import ops
from spidr.config import DinoSRConfig
from spidr.models.components import (
    Transformer,
    check_attention_mask,
    get_components,
    mask_from_index,
    num_frames,
    receptive_field,
    select_masked,
)
from spidr.models.metrics import PPL_EPS, perplexities, perplexity

__all__ = [
    "PPL_EPS",
    "DinoSR",
    "DinoSRConfig",
    "EmaTargets",
    "Transformer",
    "dinosr_ema_decay",
    "ema_scheduler",
    "ema_targets",
    "get_components",
    "init_teacher",
    "mask_from_index",
    "mask_from_indices",
    "perplexities",
    "perplexity",
    "select_masked",
]

mask_from_indices = mask_from_index  # this library's earlier name


def ema_scheduler(step: int, start_decay: float, final_decay: float, final_step: int, freeze_step: int) -> float:
    """DinoSR's EMA decay after optimiser step ``step``: linear from ``start_decay`` (step 0) to ``final_decay``
    (``final_step``), then constant, and exactly 1 (the teacher frozen) from ``freeze_step``."""
    if step < final_step:
        remaining = 1 - step / final_step
        return final_decay - (final_decay - start_decay) * remaining
    if step < freeze_step:
        return final_decay
    return 1.0


def dinosr_ema_decay(step: int, cfg: DinoSRConfig) -> float:
    """:func:`ema_scheduler` with the schedule of ``cfg`` (``ema_start_decay``, ``ema_final_decay``,
    ``ema_final_step``, ``freeze_step``)."""
    return ema_scheduler(step, cfg.ema_start_decay, cfg.ema_final_decay, cfg.ema_final_step, cfg.freeze_step)


def init_teacher(
    student: Transformer, exclude_layers: Iterable[str], *, init_weights: bool = True
) -> tuple[Transformer, set[str]]:
    """The teacher of ``student``: a float32 deep copy, re-initialised (a fresh draw) unless ``init_weights`` is
    False, in eval mode and without gradients.

    Returns:
        ``(teacher, excluded)``: ``excluded`` names the teacher's parameters under one of the prefixes
        ``exclude_layers``, which the EMA update copies from the student instead of averaging.
    """
    teacher = copy.deepcopy(student).float()
    if init_weights:
        teacher.apply(Transformer.init_weights)
    teacher.eval()
    teacher.requires_grad_(False)
    prefixes = tuple(exclude_layers)
    excluded = {name for name, _ in teacher.named_parameters() if prefixes and name.startswith(prefixes)}
    return teacher, excluded


class EmaTargets(TypedDict):
    """The tensors the EMA update moves: teacher parameters averaged towards the student's (``lerp_*``), and
    teacher parameters and buffers copied from the student (``copy_*``), pairwise in the same order."""

    lerp_teacher: list[Tensor]
    lerp_student: list[Tensor]
    copy_teacher: list[Tensor]
    copy_student: list[Tensor]


def ema_targets(teacher: nn.Module, student: nn.Module, exclude_layers: set[str]) -> EmaTargets:
    """Pair the teacher's tensors with the student's for the EMA update: parameters named in ``exclude_layers``
    and all buffers are copied, the other parameters averaged."""
    targets = EmaTargets(lerp_teacher=[], lerp_student=[], copy_teacher=[], copy_student=[])
    for (name, t), s in zip(teacher.named_parameters(), student.parameters(), strict=True):
        if name in exclude_layers:
            targets["copy_teacher"].append(t)
            targets["copy_student"].append(s)
        else:
            targets["lerp_teacher"].append(t)
            targets["lerp_student"].append(s)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        targets["copy_teacher"].append(t)
        targets["copy_student"].append(s)
    return targets


class DinoSR(nn.Module):
    """DinoSR (Liu et al., 2023) as in the reference release; SpidR derives from it.

    Submodules: ``feature_extractor``, ``feature_projection``, ``student`` and ``teacher`` (two
    :class:`~spidr.models.components.Transformer` encoders), ``heads`` (Linear + LogSoftmax per
    codebook) and ``codebooks``. The input waveforms (batch, samples) are float, 16 kHz, and must
    already be standardised per utterance: the model does not standardise.

    Attributes of the reference release kept with their meaning: ``ema_scheduler`` (step -> decay, used by
    :meth:`update_ema`; replace it to change the schedule), ``teacher_exclude_layers`` (the teacher parameters
    copied rather than averaged), ``freeze_step``, ``projection_dropout``, ``mask_embedding``, ``current_step``.
    """

    current_step: Tensor

    def __init__(self, cfg: DinoSRConfig | None = None) -> None:
        super().__init__()
        cfg = DinoSRConfig() if cfg is None else cfg
        if not isinstance(cfg, DinoSRConfig):
            raise TypeError(f"cfg must be a DinoSRConfig or SpidRConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.feature_extractor, self.feature_projection, self.student, self.heads, self.codebooks = get_components(cfg)
        self.teacher, self.teacher_exclude_layers = init_teacher(self.student, cfg.ema_exclude_layers)
        self.ema_scheduler = partial(
            ema_scheduler,
            start_decay=cfg.ema_start_decay,
            final_decay=cfg.ema_final_decay,
            final_step=cfg.ema_final_step,
            freeze_step=cfg.freeze_step,
        )
        self.projection_dropout = nn.Dropout(cfg.encoder_projection_dropout)
        self.freeze_step = cfg.freeze_step
        self._extractor_frozen = False
        self.mask_embedding = nn.Parameter(torch.empty(cfg.encoder_embed_dim, dtype=torch.float32))
        nn.init.uniform_(self.mask_embedding)
        self.register_buffer("current_step", torch.zeros(1, dtype=torch.int64))

    # ----------------------------------------------------------------- state
    def train(self, mode: bool = True) -> DinoSR:
        """Set the training mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def num_codebooks(self) -> int:
        """Number of codebooks (and of prediction heads)."""
        return len(self.codebooks)

    def freeze_extractor(self) -> None:
        """Stop training the conv feature extractor and the feature projection."""
        self.feature_extractor.requires_grad_(False)
        self.feature_projection.requires_grad_(False)
        self._extractor_frozen = True

    def ema_decay(self, step: int) -> float:
        """The teacher's EMA decay after optimiser step ``step``: ``self.ema_scheduler(step)`` (SPEC 1.4; the
        DinoSR schedule :func:`ema_scheduler` here, SpidR's in :class:`~spidr.models.spidr.SpidR`)."""
        return self.ema_scheduler(step)

    @torch.no_grad()
    def update_ema(self, step: int) -> float:
        """Move the teacher towards the student after optimiser step ``step``; return the decay used.

        Stores ``step`` in ``current_step`` and freezes the extractor once ``step >= freeze_step``. When
        ``0 < decay < 1``, every teacher parameter becomes ``lerp(teacher, student, 1 - decay)``, except those
        named in ``teacher_exclude_layers``, which are copied, as are all buffers.
        """
        self.current_step.fill_(step)
        decay = self.ema_decay(step)
        if not self._extractor_frozen and step >= self.freeze_step:
            self.freeze_extractor()
        if 0.0 < decay < 1.0:
            # paired afresh at each call: loading with assign=True or moving the model replaces tensors
            targets = ema_targets(self.teacher, self.student, self.teacher_exclude_layers)
            if targets["lerp_teacher"]:
                torch._foreach_lerp_(targets["lerp_teacher"], targets["lerp_student"], 1 - decay)
            if targets["copy_teacher"]:
                torch._foreach_copy_(targets["copy_teacher"], targets["copy_student"])
        return decay

    # ----------------------------------------------------------------- checks
    def _check_inputs(
        self, waveforms: Tensor, attention_mask: Tensor | None, mask_indices: Tensor | None = None
    ) -> int:
        if not isinstance(waveforms, Tensor):
            raise TypeError(f"waveforms must be a torch.Tensor, got {type(waveforms).__name__}")
        if waveforms.dim() != 2:
            hint = " (use waveforms.unsqueeze(0) for a single utterance)" if waveforms.dim() == 1 else ""
            raise ValueError(f"waveforms must have shape (batch, samples), got {tuple(waveforms.shape)}{hint}")
        if not waveforms.is_floating_point():
            raise TypeError(f"waveforms must be a floating-point tensor, got {waveforms.dtype}")
        layers = self.cfg.extractor_conv_layer_config
        frames = num_frames(waveforms.shape[1], layers)
        if frames == 0:
            raise ValueError(
                f"waveforms have {waveforms.shape[1]} samples, fewer than the {receptive_field(layers)} "
                "the feature extractor needs for one frame"
            )
        batch = waveforms.shape[0]
        check_attention_mask(attention_mask, batch, frames)
        if mask_indices is not None:
            if not isinstance(mask_indices, Tensor) or mask_indices.dtype != torch.int64:
                raise TypeError("mask_indices must be an int64 tensor of frame positions")
            if mask_indices.dim() != 2 or mask_indices.shape[0] != batch:
                raise ValueError(
                    f"mask_indices must have shape (batch={batch}, masked_per_row), got {tuple(mask_indices.shape)}"
                )
        return frames

    # ----------------------------------------------------------------- features
    def _features(self, waveforms: Tensor) -> Tensor:
        return self.feature_projection(self.feature_extractor(waveforms))

    def get_intermediate_outputs(
        self, waveforms: Tensor, *, attention_mask: Tensor | None = None, num_layers: int | None = None
    ) -> list[Tensor]:
        """The student's per-layer outputs before the residual, each (batch, frames, dim).

        ``num_layers`` stops after that many layers (the outputs of the first ``num_layers`` layers are
        the same as without it; the later layers are not computed).

        Raises:
            TypeError, ValueError: waveforms not (batch, samples) float, too short, a mismatched mask, or
                ``num_layers`` outside [1, number of layers].
        """
        self._check_inputs(waveforms, attention_mask)
        return self.student.get_intermediate_outputs(self._features(waveforms), attention_mask, num_layers)

    def _head_inputs(self, x: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        """What each head reads, per head (batch, frames, dim): here the student's final output for all."""
        out = self.student(x, attention_mask)
        return [out] * self.num_codebooks

    def get_codebooks(
        self, waveform: Tensor, *, attention_mask: Tensor | None = None, onehot: bool = False
    ) -> list[Tensor | None]:
        """Per layer: None for the first ``num_layers - num_codebooks`` layers, then each head's
        probabilities (exp of its log-softmax, squeezed), or the one-hot argmax when ``onehot``.

        ``waveform``: (batch, samples), as for :meth:`get_intermediate_outputs` (the reference release's name).
        """
        self._check_inputs(waveform, attention_mask)
        x = self._features(waveform)
        inputs = self._head_inputs(x, attention_mask)
        result: list[Tensor | None] = [None] * (len(self.student.layers) - self.num_codebooks)
        for head, y in zip(self.heads, inputs, strict=True):
            probs = head(y).float().exp().squeeze()
            result.append(F.one_hot(probs.argmax(-1), probs.shape[-1]) if onehot else probs)
        return result

    def get_units(self, waveforms: Tensor, *, attention_mask: Tensor | None = None) -> list[Tensor | None]:
        """Per layer: None for the first ``num_layers - num_codebooks`` layers, then each head's argmax
        over its codewords, int64 (batch, frames): the indices of ``get_codebooks(onehot=True)``, without
        building the one-hot (ties to the lowest index, as ``argmax``)."""
        self._check_inputs(waveforms, attention_mask)
        return self.units_from_features(self._features(waveforms), attention_mask)

    def units_from_features(self, x: Tensor, attention_mask: Tensor | None = None) -> list[Tensor | None]:
        """:meth:`get_units` from the projected features ``x`` (batch, frames, dim) instead of waveforms."""
        inputs = self._head_inputs(x, attention_mask)
        result: list[Tensor | None] = [None] * (len(self.student.layers) - self.num_codebooks)
        result += [head(y).argmax(-1) for head, y in zip(self.heads, inputs, strict=True)]
        return result

    # ----------------------------------------------------------------- training forward
    def _targets(self, feats: Tensor, attention_mask: Tensor | None, mask_indices: Tensor) -> Tensor:
        """(C, N, dim) float32: the teacher's last C layer results, instance-normalised, at masked frames."""
        layers = self.teacher.get_intermediate_outputs(feats, attention_mask)[-self.num_codebooks :]
        normed = [F.instance_norm(y.float().transpose(1, 2)).transpose(1, 2) for y in layers]
        return torch.stack([select_masked(y, mask_indices) for y in normed])

    def _predictions(self, x: Tensor, attention_mask: Tensor | None, mask_indices: Tensor) -> Tensor:
        """Student features the heads read at the masked frames: (N, dim) shared by all heads."""
        return select_masked(self.student(x, attention_mask), mask_indices)

    def forward(
        self, waveforms: Tensor, *, mask_indices: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Masked-prediction loss per masked frame, and the target and prediction perplexities.

        Args:
            waveforms: (batch, samples) standardised float waveforms.
            mask_indices: int64 (batch, count) masked frame positions, the same count in every row;
                None makes every frame a prediction position with nothing masked.
            attention_mask: bool (batch, 1, 1, frames), True on real frames, or (batch, 1, frames, frames), per
                query frame (see :func:`~spidr.models.components.check_attention_mask`); None without padding.

        Returns:
            ``(loss, {"target_ppl", "pred_ppl"})``: loss (batch * count,) in the order of
            ``mask_indices`` row by row. In training mode the codebooks are updated (after the
            labels used here were assigned).
        """
        frames = self._check_inputs(waveforms, attention_mask, mask_indices)
        feats = self._features(waveforms)
        x = self.projection_dropout(feats.clone())
        if mask_indices is not None:
            mask = mask_from_index(mask_indices, frames)
            x = torch.where(mask.unsqueeze(-1), self.mask_embedding.to(x.dtype).expand_as(x), x)
        else:
            mask_indices = torch.arange(frames, device=x.device).expand(x.shape[0], -1)
        h = self._predictions(x, attention_mask, mask_indices)
        with torch.no_grad():
            targets = self._targets(feats, attention_mask, mask_indices)
        labels = self.codebooks.quantize(targets)
        weight = torch.stack([head[0].weight for head in self.heads])
        bias = torch.stack([head[0].bias for head in self.heads])
        loss, mean_probs = ops.masked_prediction_loss(h, weight, bias, labels)
        target_ppl, pred_ppl = self._perplexities(labels, mean_probs)
        return loss, {"target_ppl": target_ppl, "pred_ppl": pred_ppl}

    @torch.no_grad()
    def _perplexities(self, labels: Tensor, mean_probs: Tensor) -> tuple[Tensor, Tensor]:
        num_codewords = mean_probs.shape[1]
        n = labels.shape[1]
        offsets = torch.arange(self.num_codebooks, device=labels.device).unsqueeze(1) * num_codewords
        flat = (labels + offsets).reshape(-1)
        target_sums = torch.zeros(self.num_codebooks * num_codewords, dtype=torch.float32, device=labels.device)
        target_sums = target_sums.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
        target_sums = target_sums.view(self.num_codebooks, num_codewords)
        pred_sums = mean_probs * n
        if dist.is_available() and dist.is_initialized():
            flat = torch.cat(
                [
                    torch.tensor([n], dtype=torch.float32, device=labels.device),
                    target_sums.flatten(),
                    pred_sums.flatten(),
                ]
            )
            dist.all_reduce(flat)
            total = flat[0]
            target_sums = flat[1 : 1 + target_sums.numel()].view_as(target_sums)
            pred_sums = flat[1 + target_sums.numel() :].view_as(pred_sums)
            target_mean, pred_mean = target_sums / total, pred_sums / total
        else:
            target_mean, pred_mean = target_sums / n, mean_probs
        return perplexity(target_mean).sum() / self.num_codebooks, perplexity(pred_mean).sum() / self.num_codebooks
