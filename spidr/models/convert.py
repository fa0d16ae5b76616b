"""Conversion of original DinoSR (fairseq) checkpoints to this library's state-dict layout (SPEC 1.9)."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

_TOP_LEVEL = {
    "mask_emb": "mask_embedding",
    "layer_norm.weight": "feature_projection.layer_norm.weight",
    "layer_norm.bias": "feature_projection.layer_norm.bias",
    "post_extract_proj.weight": "feature_projection.projection.weight",
    "post_extract_proj.bias": "feature_projection.projection.bias",
    "encoder.layer_norm.weight": "student.layer_norm.weight",
    "encoder.layer_norm.bias": "student.layer_norm.bias",
}
_PATTERNS = [
    (
        re.compile(r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)"),
        r"feature_extractor.conv_layers.\1.conv.\2",
    ),
    # layer_norm extractor: Sequential(TransposeLast, LayerNorm, TransposeLast); group_norm: GroupNorm at index 2
    (
        re.compile(r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)"),
        r"feature_extractor.conv_layers.\1.layer_norm.\2",
    ),
    (
        re.compile(r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)"),
        r"feature_extractor.conv_layers.\1.layer_norm.\2",
    ),
    (re.compile(r"encoder\.pos_conv\.(\d+)\.0\.(weight|bias)"), r"student.pos_conv_embed.convs.\1.\2"),
    (re.compile(r"_codebook(\d+)"), r"codebooks.\1.codebook"),
    (re.compile(r"_codebook_cnts(\d+)"), r"codebooks.\1.counts"),
    (re.compile(r"heads\.(\d+)\.(weight|bias)"), r"heads.\1.0.\2"),
]
_EMA_PATTERNS = [
    (re.compile(r"layer_norm\.(weight|bias)"), r"teacher.layer_norm.\1"),
    (re.compile(r"pos_conv\.(\d+)\.0\.(weight|bias)"), r"teacher.pos_conv_embed.convs.\1.\2"),
]
_LAYER_PARTS = {
    "fc1": "feed_forward.intermediate_dense",
    "fc2": "feed_forward.output_dense",
    "final_layer_norm": "final_layer_norm",
    "self_attn.out_proj": "attention.proj",
    "self_attn_layer_norm": "layer_norm",
}
_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")
_LAYER_KEY = re.compile(r"(\d+)\.(.+)\.(weight|bias)")


def _map_layer_key(prefix: str, rest: str, qkv: dict[str, dict[str, Tensor]], value: Tensor) -> str | None:
    """Name of the converted layer key, or None when the tensor is one of q/k/v (kept in ``qkv``)."""
    match = _LAYER_KEY.fullmatch(rest)
    if match is None:
        return ""
    index, part, kind = match.groups()
    qkv_match = _QKV.fullmatch(f"{part}.{kind}")
    if qkv_match is not None:
        qkv.setdefault(f"{prefix}.{index}.attention.qkv.{kind}", {})[qkv_match.group(1)] = value
        return None
    if part not in _LAYER_PARTS:
        return ""
    return f"{prefix}.{index}.{_LAYER_PARTS[part]}.{kind}"


def state_dict_from_dinosr_fairseq_checkpoint(checkpoint: Mapping[str, Any]) -> OrderedDict[str, Tensor]:
    """Convert an original DinoSR fairseq checkpoint into a state dict for ``DinoSR(encoder_qkv_bias=True)``.

    Args:
        checkpoint: the loaded fairseq checkpoint: ``{"model": {... , "_ema": {...}}, "last_optimizer_state": ...}``.
            Layer, codebook and conv counts are read from the keys, so any depth or width converts.

    Returns:
        The converted state dict: q, k and v projections concatenated (in that order) into ``qkv``,
        the ``_ema`` teacher under ``teacher.*``, and ``current_step`` from the optimiser step (0 if absent).

    Raises:
        KeyError: ``model`` or ``model._ema`` is missing.
        ValueError: a key that has no counterpart, or an incomplete q/k/v triple (the key is named).
    """
    if "model" not in checkpoint or not isinstance(checkpoint["model"], Mapping):
        raise KeyError("not a fairseq checkpoint: no 'model' state dict in it")
    model = checkpoint["model"]
    if "_ema" not in model:
        raise KeyError("not an original DinoSR checkpoint: 'model' has no '_ema' teacher state dict")

    converted: OrderedDict[str, Tensor] = OrderedDict()
    qkv: dict[str, dict[str, Tensor]] = {}

    def convert(key: str, value: Tensor, *, teacher: bool) -> None:
        where = f"model._ema.{key}" if teacher else f"model.{key}"
        if teacher:
            target = None
            if key.startswith("layers."):
                target = _map_layer_key("teacher.layers", key.removeprefix("layers."), qkv, value)
                if target is None:
                    return
            else:
                target = next((p.sub(r, key) for p, r in _EMA_PATTERNS if p.fullmatch(key)), "")
        elif key in _TOP_LEVEL:
            target = _TOP_LEVEL[key]
        elif key.startswith("encoder.layers."):
            target = _map_layer_key("student.layers", key.removeprefix("encoder.layers."), qkv, value)
            if target is None:
                return
        else:
            target = next((p.sub(r, key) for p, r in _PATTERNS if p.fullmatch(key)), "")
        if not target:
            raise ValueError(f"fairseq checkpoint key {where!r} has no counterpart in DinoSR")
        converted[target] = value

    for key, value in model.items():
        if key != "_ema":
            convert(key, value, teacher=False)
    for key, value in model["_ema"].items():
        convert(key, value, teacher=True)

    def layer_order(name: str) -> tuple[int, int, int]:
        prefix, _, index, *_rest, kind = name.split(".")
        return (prefix != "student", int(index), kind != "weight")

    for name in sorted(qkv, key=layer_order):
        parts = qkv[name]
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise ValueError(f"fairseq checkpoint lacks the {'/'.join(missing)} projection for {name}")
        converted[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)

    try:
        step = int(checkpoint["last_optimizer_state"]["state"][0]["step"])
    except (KeyError, TypeError, IndexError):
        step = 0
    converted["current_step"] = torch.tensor([step], dtype=torch.int64)
    return converted
