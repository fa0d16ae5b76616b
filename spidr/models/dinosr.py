"""DinoSR: masked prediction of online-clustered teacher targets from the student's final output."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from spidr import ops
from spidr.config import DinoSRConfig
from spidr.models.codebooks import Codebook, Codebooks
from spidr.models.components import (
    FeatureExtractor,
    FeatureProjection,
    Transformer,
    num_frames,
    receptive_field,
)

PPL_EPS = 1e-8


def dinosr_ema_decay(step: int, cfg: DinoSRConfig) -> float:
    """Linear from ``ema_start_decay`` to ``ema_final_decay`` at ``ema_final_step``, then 1 from ``freeze_step``."""
    if step < cfg.ema_final_step:
        remaining = 1 - step / cfg.ema_final_step
        return cfg.ema_final_decay - (cfg.ema_final_decay - cfg.ema_start_decay) * remaining
    if step < cfg.freeze_step:
        return cfg.ema_final_decay
    return 1.0


def mask_from_indices(mask_indices: Tensor, frames: int) -> Tensor:
    """Boolean (batch, frames) mask, True at the positions listed in ``mask_indices`` (batch, count)."""
    mask = torch.zeros((mask_indices.shape[0], frames), dtype=torch.bool, device=mask_indices.device)
    return mask.scatter_(1, mask_indices, True)


def select_masked(x: Tensor, mask_indices: Tensor) -> Tensor:
    """Gather the frames of x (batch, frames, dim) at ``mask_indices`` row by row: (batch * count, dim)."""
    offsets = torch.arange(x.shape[0], device=mask_indices.device).unsqueeze(1) * x.shape[1]
    return x.flatten(0, 1).index_select(0, (mask_indices + offsets).reshape(-1))


def perplexity(mean_probs: Tensor) -> Tensor:
    """``2 ** entropy`` (bits) of each row of ``mean_probs`` (C, K): (C,)."""
    return torch.exp2(-(mean_probs * (mean_probs + PPL_EPS).log2()).sum(-1))


class DinoSR(nn.Module):
    """DinoSR (Liu et al., 2023) as in the reference release; SpidR derives from it.

    Submodules: ``feature_extractor``, ``feature_projection``, ``student`` and ``teacher`` (two
    :class:`~spidr.models.components.Transformer` encoders), ``heads`` (Linear + LogSoftmax per
    codebook) and ``codebooks``. The input waveforms (batch, samples) are float, 16 kHz, and must
    already be standardised per utterance: the model does not standardise.
    """

    current_step: Tensor

    def __init__(self, cfg: DinoSRConfig | None = None) -> None:
        super().__init__()
        cfg = DinoSRConfig() if cfg is None else cfg
        if not isinstance(cfg, DinoSRConfig):
            raise TypeError(f"cfg must be a DinoSRConfig or SpidRConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        dim = cfg.encoder_embed_dim
        self.feature_extractor = FeatureExtractor(cfg)
        self.feature_projection = FeatureProjection(cfg.extractor_conv_layer_config[-1][0], dim)
        self.student = Transformer(cfg)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, cfg.codebook_size), nn.LogSoftmax(dim=-1)) for _ in range(cfg.num_codebooks)
        )
        self.codebooks = Codebooks(
            Codebook(dim, cfg.codebook_size, cfg.codebook_decay) for _ in range(cfg.num_codebooks)
        )
        self.teacher = self._make_teacher(self.student)
        self.projection_dropout = nn.Dropout(cfg.encoder_projection_dropout)
        self.mask_embedding = nn.Parameter(torch.empty(dim, dtype=torch.float32))
        nn.init.uniform_(self.mask_embedding)
        self.register_buffer("current_step", torch.zeros(1, dtype=torch.int64))
        self._extractor_frozen = False

    @staticmethod
    def _make_teacher(student: Transformer) -> Transformer:
        teacher = copy.deepcopy(student).float()
        teacher.apply(Transformer.init_weights)
        teacher.eval()
        teacher.requires_grad_(False)
        return teacher

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
        """The teacher's EMA decay after optimiser step ``step`` (SPEC 1.4, DinoSR schedule)."""
        return dinosr_ema_decay(step, self.cfg)

    @torch.no_grad()
    def update_ema(self, step: int) -> float:
        """Move the teacher towards the student after optimiser step ``step``; return the decay used.

        Freezes the extractor once ``step >= freeze_step``. When ``0 < decay < 1``, every teacher
        parameter becomes ``lerp(teacher, student, 1 - decay)``, except those under
        ``ema_exclude_layers``, which are copied, as are all buffers.
        """
        self.current_step.fill_(step)
        decay = self.ema_decay(step)
        if not self._extractor_frozen and step >= self.cfg.freeze_step:
            self.freeze_extractor()
        if 0.0 < decay < 1.0:
            lerp_t, lerp_s, copy_t, copy_s = [], [], [], []
            exclude = tuple(self.cfg.ema_exclude_layers)
            for (name, t), s in zip(self.teacher.named_parameters(), self.student.parameters(), strict=True):
                if exclude and name.startswith(exclude):
                    copy_t.append(t)
                    copy_s.append(s)
                else:
                    lerp_t.append(t)
                    lerp_s.append(s)
            for t, s in zip(self.teacher.buffers(), self.student.buffers(), strict=True):
                copy_t.append(t)
                copy_s.append(s)
            if lerp_t:
                torch._foreach_lerp_(lerp_t, lerp_s, 1 - decay)
            if copy_t:
                torch._foreach_copy_(copy_t, copy_s)
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
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or attention_mask.dtype != torch.bool:
                raise TypeError("attention_mask must be a bool tensor (True = attend)")
            if tuple(attention_mask.shape) != (batch, 1, 1, frames):
                raise ValueError(
                    f"attention_mask must have shape (batch, 1, 1, frames) = {(batch, 1, 1, frames)} for waveforms "
                    f"{tuple(waveforms.shape)}, got {tuple(attention_mask.shape)}"
                )
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
        self, waveforms: Tensor, *, attention_mask: Tensor | None = None, onehot: bool = False
    ) -> list[Tensor | None]:
        """Per layer: None for the first ``num_layers - num_codebooks`` layers, then each head's
        probabilities (exp of its log-softmax, squeezed), or the one-hot argmax when ``onehot``."""
        self._check_inputs(waveforms, attention_mask)
        x = self._features(waveforms)
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
            attention_mask: bool (batch, 1, 1, frames), True on real frames; None without padding.

        Returns:
            ``(loss, {"target_ppl", "pred_ppl"})``: loss (batch * count,) in the order of
            ``mask_indices`` row by row. In training mode the codebooks are updated (after the
            labels used here were assigned).
        """
        frames = self._check_inputs(waveforms, attention_mask, mask_indices)
        feats = self._features(waveforms)
        x = self.projection_dropout(feats.clone())
        if mask_indices is not None:
            mask = mask_from_indices(mask_indices, frames)
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
