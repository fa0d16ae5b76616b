"""Building blocks shared by DinoSR and SpidR: conv feature extractor, projection, transformer encoder.

Module and parameter names follow the reference release exactly, so its checkpoints load strictly. The
classes also take the reference release's (spidr 0.2.0) constructor arguments, and this module has its
public names, so code written against ``spidr.models.components`` of 0.2.0 runs unchanged:

- :class:`ConvLayerBlock` is :class:`ConvBlock`, :class:`LayerNorm` is :class:`ChannelLayerNorm`;
- :class:`FeatureExtractor`, :class:`TransformerLayer` and :class:`Transformer` take either a model config
  (this library's form) or the modules and switches 0.2.0 passes;
- :func:`get_components` builds the five parts of a model from its config, :class:`Codebook` and
  :class:`Codebooks` come from :mod:`spidr.models.codebooks`, and :func:`mask_from_index` and
  :func:`select_masked` gather masked frames.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from spidr import ops
from spidr.config import DinoSRConfig
from spidr.models.codebooks import Codebook, Codebooks

__all__ = [
    "ChannelLayerNorm",
    "Codebook",
    "Codebooks",
    "ConvBlock",
    "ConvLayerBlock",
    "ConvPositionalEmbedding",
    "FeatureExtractor",
    "FeatureProjection",
    "FeedForward",
    "InvalidInputError",
    "LayerNorm",
    "SelfAttention",
    "Transformer",
    "TransformerLayer",
    "check_attention_mask",
    "get_components",
    "kept_layout",
    "mask_from_index",
    "num_frames",
    "receptive_field",
    "select_masked",
]


class InvalidInputError(ValueError, TypeError):
    """An input of the wrong type or dtype (a ``ValueError``, and a ``TypeError`` as this library raised before)."""


def check_attention_mask(attention_mask: object, batch: int, frames: int) -> None:
    """Refuse an attention mask the encoder cannot use, naming what was expected.

    Accepted: None, or a bool tensor (True = attend) of shape (batch, 1, 1, frames), a padding mask, or
    (batch, 1, frames, frames), one row of keys per query frame (as ``scaled_dot_product_attention`` takes
    it). The positional convolution reads ``attention_mask[:, :, 0]`` as its keep-mask: the padding mask
    itself, or row 0 of a (batch, 1, frames, frames) mask, as the reference release does.

    Raises:
        InvalidInputError: not a tensor, or not bool (a ``ValueError`` and a ``TypeError``).
        ValueError: any other shape.
    """
    if attention_mask is None:
        return
    if not isinstance(attention_mask, Tensor):
        raise InvalidInputError(
            f"attention_mask must be a bool tensor (True = attend) or None, got {type(attention_mask).__name__}"
        )
    if attention_mask.dtype != torch.bool:
        raise InvalidInputError(f"attention_mask must be a bool tensor (True = attend), got {attention_mask.dtype}")
    shape = tuple(attention_mask.shape)
    if shape not in ((batch, 1, 1, frames), (batch, 1, frames, frames)):
        raise ValueError(
            f"attention_mask must have shape (batch, 1, 1, frames) = {(batch, 1, 1, frames)} (padding) or "
            f"(batch, 1, frames, frames) = {(batch, 1, frames, frames)} (per query frame), got {shape}"
        )


def mask_from_index(index: Tensor, size: int) -> Tensor:
    """Boolean (batch, size) mask, True at the positions listed in ``index`` (batch, count)."""
    mask = torch.zeros((index.shape[0], size), dtype=torch.bool, device=index.device)
    return mask.scatter_(1, index, True)


def select_masked(x: Tensor, index: Tensor) -> Tensor:
    """Gather the frames of x (batch, frames, dim) at ``index`` (batch, count) row by row: (batch * count, dim).

    The same rows, in the same order, as ``x[mask_from_index(index, frames)]`` when each row of ``index`` is
    sorted."""
    offsets = torch.arange(x.shape[0], device=index.device).unsqueeze(1) * x.shape[1]
    return x.flatten(0, 1).index_select(0, (index + offsets).reshape(-1))


def num_frames(num_samples: int, conv_layers: list[tuple[int, int, int]]) -> int:
    """Frames the conv extractor outputs for ``num_samples`` samples (0 when too short)."""
    n = num_samples
    for _, kernel, stride in conv_layers:
        n = max(0, (n - kernel) // stride + 1)
    return n


def receptive_field(conv_layers: list[tuple[int, int, int]]) -> int:
    """The fewest samples that give one frame."""
    n = 1
    for _, kernel, stride in reversed(conv_layers):
        n = (n - 1) * stride + kernel
    return n


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (batch, channels, frames) tensor."""

    def forward(self, input: Tensor) -> Tensor:
        x = F.layer_norm(input.transpose(-2, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.transpose(-2, -1)


LayerNorm = ChannelLayerNorm
"""The reference release's name for :class:`ChannelLayerNorm` (its "layer norm with transpose")."""


def kept_layout(module: nn.Module, weight: Tensor, make: Callable[[], list[Tensor]]) -> list[Tensor]:
    """``make()``: copies of ``weight`` laid out for a kernel, kept on ``module`` until ``weight`` changes
    (its storage or version), so that a run over many inputs lays them out once. Where autograd records
    ``weight``, made afresh each call (the copies must carry its gradient)."""
    if torch.is_grad_enabled() and weight.requires_grad:
        return make()
    key = (weight.data_ptr(), weight._version, weight.device, weight.dtype)
    kept = module.__dict__.get("_kept_layout")
    if kept is None or kept[0] != key:
        with torch.no_grad():
            kept = (key, make())
        module.__dict__["_kept_layout"] = kept
    return kept[1]


class ConvBlock(nn.Module):
    """conv -> optional norm -> exact GELU. The norm is registered first (the release's key order).

    Also available as :data:`ConvLayerBlock`, the reference release's name, with its arguments.

    Args:
        in_channels, out_channels, kernel_size, stride: those of the ``nn.Conv1d``.
        layer_norm: the norm applied to the conv's (batch, channels, frames) output, or None.
        bias: whether the conv has a bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        layer_norm: nn.Module | None,
        *,
        bias: bool,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.layer_norm = layer_norm
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, bias=bias)
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming-normal conv weight (the bias, if any, keeps PyTorch's default)."""
        nn.init.kaiming_normal_(self.conv.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return F.gelu(x)

    def _winograd_taps(self) -> Tensor:
        """The tap matrices of :func:`spidr.ops.conv_k3s2_gelu`, kept until the weight changes."""
        return kept_layout(self.conv, self.conv.weight, lambda: [ops.conv_k3s2_taps(self.conv.weight)])[0]

    def _gemm_weights(self) -> list[Tensor]:
        """The conv weight laid out for :meth:`forward_channels_last`: one (out, kernel * in) matrix when the
        windows are one matrix, else one contiguous (in, out) matrix per tap. Outside autograd they are kept
        until the weight changes (so a run over many files lays them out once)."""
        weight = self.conv.weight
        out_channels, in_channels, kernel = weight.shape

        def make() -> list[Tensor]:
            if kernel == self.conv.stride[0] or in_channels == 1:
                return [weight.permute(0, 2, 1).reshape(out_channels, kernel * in_channels).contiguous()]
            return [weight[:, :, j].t().contiguous() for j in range(kernel)]

        return kept_layout(self, weight, make)

    def forward_channels_last(self, x: Tensor) -> Tensor:
        """The same block on (batch, frames, channels), as GEMMs over the conv's windows.

        On the CPU this runs at the BLAS rate, several times faster than the (batch, channels, frames)
        convolution and the transposes its LayerNorm needs; the result is equal up to float rounding.
        Kernel-3 stride-2 blocks outside autograd run :func:`spidr.ops.conv_k3s2_gelu` (Winograd's F(3, 2):
        7 of the 9 matrix products, the norm and GELU fused), about 0.87x the time of the three GEMMs.
        """
        conv = self.conv
        (kernel,), (stride,) = conv.kernel_size, conv.stride
        batch, frames, channels = x.shape
        out_frames = (frames - kernel) // stride + 1
        norm = self.layer_norm
        if (
            kernel == 3
            and stride == 2
            and not isinstance(norm, nn.GroupNorm)
            and ops.conv_k3s2_kernel_applies(x, conv.weight, conv.bias)
        ):  # the extractor's k=3 s=2 blocks: Winograd F(3, 2), norm and GELU in one kernel
            return ops.conv_k3s2_gelu(
                x,
                conv.weight,
                conv.bias,
                None if norm is None else norm.weight,
                None if norm is None else norm.bias,
                1e-5 if norm is None else norm.eps,
                normalize=norm is not None,
                taps=self._winograd_taps(),
            )
        weights = self._gemm_weights()
        if kernel == stride or channels == 1:  # windows as one (frames, kernel * channels) matrix
            if kernel == stride:  # disjoint: a view of x, in (kernel, channels) order
                windows = x[:, : out_frames * stride].reshape(batch, out_frames, kernel * channels)
            else:  # one channel: a small copy of the waveform's windows
                windows = x.unfold(1, kernel, stride).reshape(batch, out_frames, channels * kernel)
            y = F.linear(windows, weights[0], conv.bias)
        else:  # overlapping windows: one GEMM per tap on a strided view of x (no window copy)
            span = (out_frames - 1) * stride + 1
            if batch == 1 and not torch.is_grad_enabled():  # 2-D GEMMs read the strided rows in place
                y = torch.mm(x[0, 0:span:stride], weights[0])
                for j in range(1, kernel):  # in place, so autocast does not apply: match y's dtype
                    y.addmm_(x[0, j : j + span : stride].to(y.dtype), weights[j].to(y.dtype))
                y = y.unsqueeze(0)
            else:
                y = torch.matmul(x[:, 0:span:stride], weights[0])
                for j in range(1, kernel):
                    y = y + torch.matmul(x[:, j : j + span : stride], weights[j])
            if conv.bias is not None:
                y = y + conv.bias
        if isinstance(norm, nn.LayerNorm):  # fused with the GELU, in place (one pass over the activations)
            return ops.layer_norm_gelu_(y, norm.weight, norm.bias, norm.eps)
        if isinstance(norm, nn.GroupNorm):  # one group per channel: statistics over the frames
            var, mean = torch.var_mean(y, dim=1, keepdim=True, correction=0)
            y = (y - mean) * torch.rsqrt(var + norm.eps)
            if norm.affine:
                y = y * norm.weight + norm.bias
        return F.gelu(y)


ConvLayerBlock = ConvBlock
"""The reference release's name for :class:`ConvBlock` (same arguments)."""


def conv_blocks(cfg: DinoSRConfig) -> nn.ModuleList:
    """The extractor's conv blocks for ``cfg``: a LayerNorm in every block (``layer_norm`` mode), or a GroupNorm
    of one group per channel in the first block only (``group_norm`` mode).

    Raises:
        ValueError: ``cfg.extractor_mode`` is neither ``"layer_norm"`` nor ``"group_norm"``.
    """
    if cfg.extractor_mode not in ("layer_norm", "group_norm"):
        raise ValueError(f"extractor_mode must be 'layer_norm' or 'group_norm', got {cfg.extractor_mode!r}")
    blocks = nn.ModuleList()
    in_channels = 1
    for i, (out_channels, kernel, stride) in enumerate(cfg.extractor_conv_layer_config):
        norm: nn.Module | None = None
        if cfg.extractor_mode == "layer_norm":
            norm = ChannelLayerNorm(out_channels, elementwise_affine=True)
        elif i == 0:  # group_norm: only the first block is normalised, one group per channel
            norm = nn.GroupNorm(out_channels, out_channels, affine=True)
        blocks.append(ConvBlock(in_channels, out_channels, kernel, stride, norm, bias=cfg.extractor_conv_bias))
        in_channels = out_channels
    return blocks


class FeatureExtractor(nn.Module):
    """Waveforms (batch, samples) -> features (batch, frames, channels).

    Args:
        conv_layers: a model config (the blocks are built from it, see :func:`conv_blocks`), or the conv blocks
            themselves as an ``nn.ModuleList`` (the reference release's form), each mapping
            (batch, channels, samples) to (batch, channels', samples').
    """

    def __init__(self, conv_layers: nn.ModuleList | DinoSRConfig) -> None:
        super().__init__()
        if isinstance(conv_layers, DinoSRConfig):
            conv_layers = conv_blocks(conv_layers)
        elif not isinstance(conv_layers, nn.ModuleList):
            raise TypeError(
                "conv_layers must be a DinoSRConfig or an nn.ModuleList of conv blocks, "
                f"got {type(conv_layers).__name__}"
            )
        self.conv_layers = conv_layers
        # Off by default: the convolutions then match the reference release's to the last bit the golden
        # fixtures check; spidr.extract turns it on (2x faster on the CPU, equal up to float rounding).
        self.gemm_on_cpu = False

    def forward(self, x: Tensor) -> Tensor:
        """Features (batch, frames, channels) of the waveforms ``x`` (batch, samples)."""
        if self.gemm_on_cpu and x.device.type == "cpu":  # see ConvBlock.forward_channels_last
            x = x.unsqueeze(-1)
            for block in self.conv_layers:
                x = block.forward_channels_last(x)
            return x
        x = x.unsqueeze(1)
        for block in self.conv_layers:
            x = block(x)
        return x.transpose(1, 2)


class FeatureProjection(nn.Module):
    """LayerNorm over the extractor channels, then Linear to the encoder width."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_features)
        self.projection = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.layer_norm(x))


class ConvPositionalEmbedding(nn.Module):
    """Stack of grouped convolutions, each followed by a non-affine LayerNorm and GELU.

    With an attention mask, padded frames are zeroed before every conv and at the end, so they
    never leak into the real frames (the keep-mask is ``attention_mask[:, :, 0]``, see
    :func:`check_attention_mask`).

    Args:
        embed_dim: the encoder width.
        kernel_size: the total kernel; each of the ``depth`` convs has ``max(3, kernel_size // depth)``
            (an even one drops its last output frame, so the length is kept).
        groups: the convs' groups.
        depth: the number of convs.
    """

    def __init__(self, embed_dim: int, kernel_size: int, groups: int, depth: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.kernel_size = kernel_size
        self.groups = groups
        self.depth = depth
        self.layer_kernel_size = max(3, kernel_size // depth)
        self.num_remove = 1 if self.layer_kernel_size % 2 == 0 else 0
        self.layer_norm = ChannelLayerNorm(embed_dim, elementwise_affine=False)
        layer_kernel = self.layer_kernel_size
        self.convs = nn.ModuleList(
            nn.Conv1d(embed_dim, embed_dim, layer_kernel, padding=layer_kernel // 2, groups=groups)
            for _ in range(depth)
        )

    def forward_channels_last(self, x: Tensor) -> Tensor:
        """The same on (batch, frames, dim) without a mask, never leaving the channels-last layout: each conv is
        a 2-D convolution of height 1 on channels-last memory, and the LayerNorm reads its output in place (no
        transposes or copies; about 1.4x faster on the CPU, equal up to float rounding)."""
        h = x.transpose(1, 2).unsqueeze(2)  # (batch, dim, 1, frames) with channels-last strides
        return self._convs_channels_last(h).squeeze(2).transpose(1, 2)

    def forward_packed(self, x: Tensor, segments: Sequence[int]) -> Tensor:
        """:meth:`forward_channels_last` of each of the sequences packed end to end in ``x`` (1, frames, dim)
        with these lengths, as if each ran alone, in one convolution per layer: the sequences are laid out
        with ``kernel // 2`` zero frames between them (a convolution's zero padding, shared), and those
        frames are zeroed again after every layer. About 0.9x the time of one call per sequence."""
        if len(segments) == 1:
            return self.forward_channels_last(x)
        gap = self.convs[0].padding[0]
        starts = list(itertools.accumulate(segments, lambda start, n: start + n + gap, initial=0))[:-1]
        ends = [a + n for a, n in zip(starts, segments, strict=True)]
        keep = torch.cat([torch.arange(a, b, device=x.device) for a, b in zip(starts, ends, strict=True)])
        gaps = torch.cat([torch.arange(b, b + gap, device=x.device) for b in ends[:-1]])
        rows = x.new_zeros(ends[-1], x.shape[-1]).index_copy_(0, keep, x[0])
        h = self._convs_channels_last(rows.t().view(1, -1, 1, ends[-1]), gaps)
        return h[0, :, 0].t().index_select(0, keep).unsqueeze(0)

    def _convs_channels_last(self, h: Tensor, gaps: Tensor | None = None) -> Tensor:
        """The conv layers (each with its LayerNorm and GELU) on ``h`` (batch, dim, 1, frames) with channels-last
        strides; ``gaps``: frames set to zero after every layer."""
        for conv in self.convs:
            # the weight in channels-last layout too (else the convolution reorders it at every call)
            (weight,) = kept_layout(
                conv, conv.weight, lambda c=conv: [c.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)]
            )
            h = F.conv2d(h, weight, conv.bias, padding=(0, conv.padding[0]), groups=conv.groups)
            if self.num_remove:
                h = h[..., : -self.num_remove]
            # normalised in place through the (batch, 1, frames, dim) view
            rows = ops.layer_norm_gelu_(h.permute(0, 2, 3, 1), None, None, self.layer_norm.eps)
            if gaps is not None:
                rows.index_fill_(2, gaps, 0.0)
            h = rows.permute(0, 3, 1, 2)
        return h

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        keep = None if attention_mask is None else attention_mask[:, :, 0]  # (batch, 1, frames)
        x = x.transpose(1, 2)
        for conv in self.convs:
            if keep is not None:
                x = x * keep
            x = conv(x)
            if self.num_remove:
                x = x[..., : -self.num_remove]
            x = F.gelu(self.layer_norm(x))
        if keep is not None:
            x = x * keep
        return x.transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; ``dropout`` on the attention weights in training.

    Raises:
        ValueError: ``embed_dim`` is not a multiple of ``num_heads``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, qkv_bias: bool, dropout: float = 0.0) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=True)

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, segments: Sequence[int] | None = None
    ) -> Tensor:
        """``attention_mask``: bool, True = attend, broadcastable to (batch, heads, frames, frames), given to
        ``scaled_dot_product_attention`` as is. ``segments``: x is (1, frames, dim) holding sequences of these
        lengths end to end (packed); each attends only within itself, as if run alone (the projections are per
        frame)."""
        batch, frames, dim = x.shape
        q, k, v = (
            t.view(batch, frames, self.num_heads, dim // self.num_heads).transpose(1, 2)
            for t in self.qkv(x).split(self.embed_dim, dim=2)
        )
        dropout = self.dropout if self.training else 0.0
        if segments is None:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout)
            return self.proj(x.transpose(1, 2).reshape(batch, frames, dim))
        # Each sequence's heads written straight into the (batch, frames, heads, head_dim) layout proj reads.
        out = q.new_empty(batch, frames, self.num_heads, dim // self.num_heads)
        start = 0
        for length in segments:
            span = slice(start, start + length)
            heads = F.scaled_dot_product_attention(q[:, :, span], k[:, :, span], v[:, :, span], dropout_p=dropout)
            out[:, span] = heads.transpose(1, 2)
            start += length
        return self.proj(out.view(batch, frames, dim))


class FeedForward(nn.Module):
    """Linear -> GELU -> dropout -> Linear."""

    def __init__(self, embed_dim: int, interm_features: int, interm_dropout: float) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(embed_dim, interm_features)
        self.intermediate_dropout = nn.Dropout(interm_dropout)
        self.output_dense = nn.Linear(interm_features, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.intermediate_dense(x)
        # Outside autograd the GELU overwrites its input (same values; no second (frames, 3072) buffer to
        # allocate and fill: 3-5 % of an inference pass on the CPU).
        h = F.gelu(h) if h.requires_grad else torch.ops.aten.gelu_(h)
        return self.output_dense(self.intermediate_dropout(h))


class TransformerLayer(nn.Module):
    """Self-attention + feed-forward, post-LN (default) or pre-LN.

    ``forward`` returns ``(x, y)``: the layer output and the feed-forward output before the residual
    (the "layer result" that the targets and SpidR's heads read).

    Built from a model config, ``TransformerLayer(cfg)``, or as the reference release builds it,
    ``TransformerLayer(attention, dropout, feed_forward, layer_norm_first=...)``.

    Args:
        attention: a model config, or the :class:`SelfAttention` module.
        dropout: the dropout after attention and after the feed-forward (release form only).
        feed_forward: the :class:`FeedForward` module (release form only).
        layer_norm_first: pre-LN layers when True, post-LN when False (release form only; with a config,
            ``cfg.encoder_layer_norm_first``).
    """

    def __init__(
        self,
        attention: SelfAttention | DinoSRConfig,
        dropout: float | None = None,
        feed_forward: FeedForward | None = None,
        *,
        layer_norm_first: bool | None = None,
    ) -> None:
        super().__init__()
        if isinstance(attention, DinoSRConfig):
            cfg = attention
            if dropout is not None or feed_forward is not None or layer_norm_first is not None:
                raise TypeError("TransformerLayer(cfg) takes no dropout, feed_forward or layer_norm_first")
            attention = SelfAttention(
                cfg.encoder_embed_dim,
                cfg.encoder_num_heads,
                qkv_bias=cfg.encoder_qkv_bias,
                dropout=cfg.encoder_attention_dropout,
            )
            dropout = cfg.encoder_dropout
            feed_forward = FeedForward(
                cfg.encoder_embed_dim, cfg.encoder_ff_interm_features, cfg.encoder_ff_interm_dropout
            )
            layer_norm_first = cfg.encoder_layer_norm_first
        elif not isinstance(attention, SelfAttention):
            raise TypeError(f"attention must be a SelfAttention or a DinoSRConfig, got {type(attention).__name__}")
        elif dropout is None or feed_forward is None or layer_norm_first is None:
            raise TypeError("TransformerLayer(attention, dropout, feed_forward, *, layer_norm_first) needs all four")
        dim = attention.embed_dim
        self.attention = attention
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = layer_norm_first
        self.feed_forward = feed_forward
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, segments: Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        residual = x
        if self.layer_norm_first:
            x = residual + self.dropout(self.attention(self.layer_norm(x), attention_mask, segments))
            y = self.feed_forward(self.final_layer_norm(x))
            return x + self.dropout(y), y
        x = self.layer_norm(residual + self.dropout(self.attention(x, attention_mask, segments)))
        y = self.feed_forward(x)
        return self.final_layer_norm(x + self.dropout(y)), y


class Transformer(nn.Module):
    """The encoder (student or teacher): positional convs, LayerNorm, layers, with layer drop.

    Built from a model config, ``Transformer(cfg)``, or as the reference release builds it,
    ``Transformer(layers, pos_conv_embed, dropout, layer_drop, layer_norm_first=...)``. Either way every
    Linear is then re-initialised (:meth:`init_weights`).

    ``layer_norm_first`` has the release's sense here, the opposite of the config's
    ``encoder_layer_norm_first``: True means the encoder's ``layer_norm`` comes first, right after the
    positional embedding (the post-LN model, ``encoder_layer_norm_first=False``); False means it comes
    last, after the layers (the pre-LN model).

    Args:
        layers: a model config, or the ``nn.ModuleList`` of :class:`TransformerLayer`.
        pos_conv_embed: the :class:`ConvPositionalEmbedding` (release form only).
        dropout: the dropout after the positional embedding (release form only).
        layer_drop: the probability of skipping each layer in training (release form only).
        layer_norm_first: see above (release form only; with a config, ``not cfg.encoder_layer_norm_first``).
    """

    def __init__(
        self,
        layers: nn.ModuleList | DinoSRConfig,
        pos_conv_embed: ConvPositionalEmbedding | None = None,
        dropout: float | None = None,
        layer_drop: float | None = None,
        *,
        layer_norm_first: bool | None = None,
    ) -> None:
        super().__init__()
        if isinstance(layers, DinoSRConfig):
            cfg = layers
            if any(arg is not None for arg in (pos_conv_embed, dropout, layer_drop, layer_norm_first)):
                raise TypeError("Transformer(cfg) takes no pos_conv_embed, dropout, layer_drop or layer_norm_first")
            # the positional convs first, then the layers: the reference release's order of random draws
            pos_conv_embed = ConvPositionalEmbedding(
                cfg.encoder_embed_dim,
                cfg.encoder_pos_conv_kernel,
                cfg.encoder_pos_conv_groups,
                cfg.encoder_pos_conv_depth,
            )
            layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.encoder_num_layers))
            dropout, layer_drop, layer_norm_first = (
                cfg.encoder_dropout,
                cfg.encoder_layer_drop,
                not cfg.encoder_layer_norm_first,
            )
        elif not isinstance(layers, nn.ModuleList):
            raise TypeError(f"layers must be an nn.ModuleList or a DinoSRConfig, got {type(layers).__name__}")
        elif not isinstance(pos_conv_embed, ConvPositionalEmbedding):
            raise TypeError(f"pos_conv_embed must be a ConvPositionalEmbedding, got {type(pos_conv_embed).__name__}")
        elif dropout is None or layer_drop is None or layer_norm_first is None:
            raise TypeError(
                "Transformer(layers, pos_conv_embed, dropout, layer_drop, *, layer_norm_first) needs all five"
            )
        self.pos_conv_embed = pos_conv_embed
        self.layer_norm = nn.LayerNorm(pos_conv_embed.embed_dim)
        self.layer_norm_first = layer_norm_first
        self.layer_drop = layer_drop
        self.dropout = nn.Dropout(dropout)
        self.layers = layers
        self.apply(self.init_weights)

    @staticmethod
    def init_weights(module: nn.Module) -> None:
        """Linear: normal(0, 0.02), zero bias; attention qkv and proj: Xavier-uniform (qkv gain 1/sqrt 2)."""
        if isinstance(module, SelfAttention):
            nn.init.xavier_uniform_(module.qkv.weight, gain=1 / math.sqrt(2))
            nn.init.xavier_uniform_(module.proj.weight)
            nn.init.zeros_(module.proj.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def _embed(self, x: Tensor, attention_mask: Tensor | None, segments: Sequence[int] | None = None) -> Tensor:
        if segments is None:
            x = x + self.pos_conv_embed(x, attention_mask)
        else:  # each packed sequence convolved alone (zero padding at its own ends)
            x = x + self.pos_conv_embed.forward_packed(x, segments)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return self.dropout(x)

    def _dropped_layers(self, device: torch.device) -> Tensor | None:
        if self.layer_drop <= 0 or not self.training:
            return None
        return torch.rand(len(self.layers), device=device) <= self.layer_drop

    def _check(self, x: Tensor, attention_mask: Tensor | None) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.pos_conv_embed.embed_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (batch, frames, {self.pos_conv_embed.embed_dim}), got {shape}")
        check_attention_mask(attention_mask, x.shape[0], x.shape[1])

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder output (batch, frames, dim); the final LayerNorm applies here only with pre-LN layers.

        ``attention_mask``: None, or bool (batch, 1, 1, frames) or (batch, 1, frames, frames), True = attend
        (see :func:`check_attention_mask`).

        Raises:
            ValueError: x is not (batch, frames, dim), or the mask has another shape or dtype.
        """
        self._check(x, attention_mask)
        x = self._embed(x, attention_mask)
        dropped = self._dropped_layers(x.device)
        for i, layer in enumerate(self.layers):
            out, _ = layer(x, attention_mask)
            x = out if dropped is None else torch.where(dropped[i], x, out)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        return x

    def get_intermediate_outputs(
        self,
        x: Tensor,
        attention_mask: Tensor | None = None,
        num_layers: int | None = None,
        *,
        before_residual: bool = True,
        segments: Sequence[int] | None = None,
    ) -> list[Tensor]:
        """One tensor per layer: the layer result ``y`` (``before_residual``) or the layer output.

        A layer dropped by layer drop is still computed and listed, but does not update the running
        ``x``. ``num_layers`` stops after that many layers. ``segments`` (instead of an attention mask):
        ``x`` is (1, frames, dim) holding sequences of these lengths end to end, each computed as if it ran
        alone (packed: no padded frames are computed).

        Raises:
            ValueError: ``num_layers`` outside [1, number of layers]; ``segments`` with an attention mask,
                with a batch of more than one row, or not summing to the frames; x not (batch, frames, dim),
                or an attention mask of another shape or dtype than :meth:`forward` takes.
        """
        if num_layers is not None and not 0 < num_layers <= len(self.layers):
            raise ValueError(f"num_layers must be in [1, {len(self.layers)}], got {num_layers}")
        self._check(x, attention_mask)
        if segments is not None:
            segments = [int(n) for n in segments]
            if attention_mask is not None or x.shape[0] != 1 or sum(segments) != x.shape[1] or min(segments) < 1:
                raise ValueError(
                    f"segments need x of shape (1, frames, dim) with positive lengths summing to the frames and no "
                    f"attention mask; got x {tuple(x.shape)}, {len(segments)} segments summing to {sum(segments)}, "
                    f"mask {'given' if attention_mask is not None else 'None'}"
                )
        outputs: list[Tensor] = []
        x = self._embed(x, attention_mask, segments)
        dropped = self._dropped_layers(x.device)
        for i, layer in enumerate(self.layers):
            out, y = layer(x, attention_mask, segments)
            x = out if dropped is None else torch.where(dropped[i], x, out)
            outputs.append(y if before_residual else out)
            if num_layers is not None and len(outputs) >= num_layers:
                break
        return outputs


def get_components(
    cfg: DinoSRConfig,
) -> tuple[FeatureExtractor, FeatureProjection, Transformer, nn.ModuleList, Codebooks]:
    """The parts of a DinoSR or SpidR model of ``cfg``, built in the reference release's order (so the same seed
    gives the same weights): the feature extractor, the feature projection, the student encoder, the prediction
    heads (one ``Sequential(Linear, LogSoftmax)`` per codebook) and the codebooks.

    Raises:
        ValueError: an unknown ``cfg.extractor_mode``.
    """
    dim = cfg.encoder_embed_dim
    feature_extractor = FeatureExtractor(cfg)
    feature_projection = FeatureProjection(cfg.extractor_conv_layer_config[-1][0], dim)
    student = Transformer(cfg)
    heads = nn.ModuleList(
        nn.Sequential(nn.Linear(dim, cfg.codebook_size), nn.LogSoftmax(dim=-1)) for _ in range(cfg.num_codebooks)
    )
    codebooks = Codebooks(Codebook(dim, cfg.codebook_size, cfg.codebook_decay) for _ in range(cfg.num_codebooks))
    return feature_extractor, feature_projection, student, heads, codebooks
