"""Building blocks shared by DinoSR and SpidR: conv feature extractor, projection, transformer encoder.

Module and parameter names follow the reference release exactly, so its checkpoints load strictly.
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

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.transpose(-2, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.transpose(-2, -1)


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
    """conv -> optional norm -> exact GELU. The norm is registered first (the release's key order)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, stride: int, norm: nn.Module | None, *, bias: bool
    ):
        super().__init__()
        self.layer_norm = norm
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride, bias=bias)
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


class FeatureExtractor(nn.Module):
    """Waveforms (batch, samples) -> features (batch, frames, channels)."""

    def __init__(self, cfg: DinoSRConfig) -> None:
        super().__init__()
        blocks = []
        in_channels = 1
        for i, (out_channels, kernel, stride) in enumerate(cfg.extractor_conv_layer_config):
            norm: nn.Module | None = None
            if cfg.extractor_mode == "layer_norm":
                norm = ChannelLayerNorm(out_channels, elementwise_affine=True)
            elif i == 0:  # group_norm: only the first block is normalised, one group per channel
                norm = nn.GroupNorm(out_channels, out_channels, affine=True)
            blocks.append(ConvBlock(in_channels, out_channels, kernel, stride, norm, bias=cfg.extractor_conv_bias))
            in_channels = out_channels
        self.conv_layers = nn.ModuleList(blocks)
        # Off by default: the convolutions then match the reference release's to the last bit the golden
        # fixtures check; spidr.extract turns it on (2x faster on the CPU, equal up to float rounding).
        self.gemm_on_cpu = False

    def forward(self, waveforms: Tensor) -> Tensor:
        if self.gemm_on_cpu and waveforms.device.type == "cpu":  # see ConvBlock.forward_channels_last
            x = waveforms.unsqueeze(-1)
            for block in self.conv_layers:
                x = block.forward_channels_last(x)
            return x
        x = waveforms.unsqueeze(1)
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
    never leak into the real frames.
    """

    def __init__(self, embed_dim: int, kernel: int, groups: int, depth: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        layer_kernel = max(3, kernel // depth)
        self.num_remove = 1 if layer_kernel % 2 == 0 else 0
        self.layer_norm = ChannelLayerNorm(embed_dim, elementwise_affine=False)
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
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, embed_dim: int, num_heads: int, *, qkv_bias: bool, dropout: float) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=True)

    def forward(
        self, x: Tensor, attention_mask: Tensor | None = None, segments: Sequence[int] | None = None
    ) -> Tensor:
        """``segments``: x is (1, frames, dim) holding sequences of these lengths end to end (packed); each
        attends only within itself, as if run alone (the projections are per frame)."""
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
    """

    def __init__(self, cfg: DinoSRConfig) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.attention = SelfAttention(
            dim, cfg.encoder_num_heads, qkv_bias=cfg.encoder_qkv_bias, dropout=cfg.encoder_attention_dropout
        )
        self.dropout = nn.Dropout(cfg.encoder_dropout)
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = cfg.encoder_layer_norm_first
        self.feed_forward = FeedForward(dim, cfg.encoder_ff_interm_features, cfg.encoder_ff_interm_dropout)
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
    """The encoder (student or teacher): positional convs, LayerNorm, layers, with layer drop."""

    def __init__(self, cfg: DinoSRConfig) -> None:
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.pos_conv_embed = ConvPositionalEmbedding(
            dim, cfg.encoder_pos_conv_kernel, cfg.encoder_pos_conv_groups, cfg.encoder_pos_conv_depth
        )
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = cfg.encoder_layer_norm_first
        self.layer_drop = cfg.encoder_layer_drop
        self.dropout = nn.Dropout(cfg.encoder_dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.encoder_num_layers))
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
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        return self.dropout(x)

    def _dropped_layers(self, device: torch.device) -> Tensor | None:
        if self.layer_drop <= 0 or not self.training:
            return None
        return torch.rand(len(self.layers), device=device) <= self.layer_drop

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder output (batch, frames, dim); the final LayerNorm applies here only with pre-LN layers."""
        x = self._embed(x, attention_mask)
        dropped = self._dropped_layers(x.device)
        for i, layer in enumerate(self.layers):
            out, _ = layer(x, attention_mask)
            x = out if dropped is None else torch.where(dropped[i], x, out)
        if self.layer_norm_first:
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
                with a batch of more than one row, or not summing to the frames.
        """
        if num_layers is not None and not 0 < num_layers <= len(self.layers):
            raise ValueError(f"num_layers must be in [1, {len(self.layers)}], got {num_layers}")
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
