"""Configuration dataclasses and their typed, strict construction from plain mappings.

The model configurations keep the field names and defaults of the reference release, so a
release ``config.json`` loads unchanged. Every constructor that reads user data goes through
:func:`from_mapping`, which rejects unknown keys and values of the wrong type by name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

__all__ = [
    "DEFAULT_CONV_LAYER_CONFIG",
    "SAMPLE_RATE",
    "ConfigError",
    "DinoSRConfig",
    "ModelType",
    "SpidRConfig",
    "from_mapping",
    "model_config_class",
]

SAMPLE_RATE: int = 16_000
DEFAULT_CONV_LAYER_CONFIG: list[tuple[int, int, int]] = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2

ModelType = Literal["dinosr", "spidr"]


class ConfigError(ValueError):
    """A configuration value or key is not what the dataclass expects (the message names it)."""


@dataclass(frozen=True)
class DinoSRConfig:
    """DinoSR model configuration (field names and defaults of the reference release).

    The fairseq names of the original DinoSR are given in the comments.
    """

    extractor_mode: Literal["group_norm", "layer_norm"] = "layer_norm"  # model.extractor_mode
    extractor_conv_bias: bool = False  # model.conv_bias
    extractor_conv_layer_config: list[tuple[int, int, int]] = field(
        default_factory=lambda: list(DEFAULT_CONV_LAYER_CONFIG)
    )  # model.conv_feature_layers
    encoder_embed_dim: int = 768  # model.encoder_embed_dim
    encoder_projection_dropout: float = 0.0  # model.dropout_input
    encoder_pos_conv_kernel: int = 95  # model.conv_pos
    encoder_pos_conv_groups: int = 16  # model.conv_pos_groups
    encoder_pos_conv_depth: int = 5  # model.pos_conv_depth
    encoder_num_layers: int = 12  # model.encoder_layers
    encoder_num_heads: int = 12  # model.encoder_attention_heads
    encoder_attention_dropout: float = 0.1  # model.attention_dropout
    encoder_ff_interm_features: int = 3072  # model.encoder_ffn_embed_dim
    encoder_ff_interm_dropout: float = 0.0  # model.activation_dropout
    encoder_dropout: float = 0.1  # model.dropout
    encoder_layer_norm_first: bool = False  # model.layer_norm_first
    encoder_layer_drop: float = 0.05  # model.encoder_layerdrop
    encoder_qkv_bias: bool = False  # always True in fairseq (the original DinoSR)

    codebook_size: int = 256  # model.codebook_size
    codebook_decay: float = 0.9  # model.codebook_decay
    num_codebooks: int = 8  # model.average_top_k_layers
    ema_start_decay: float = 0.999  # model.ema_decay
    ema_final_decay: float = 0.9999  # model.ema_end_decay
    ema_final_step: int = 30_000  # model.ema_anneal_end_step
    ema_exclude_layers: list[str] = field(default_factory=lambda: ["pos_conv_embed"])
    freeze_step: int = 200_000  # model.freeze_teacher_step

    def __post_init__(self) -> None:
        _check_model_config(self)


@dataclass(frozen=True)
class SpidRConfig(DinoSRConfig):
    """SpidR model configuration: DinoSR's fields plus the exponential EMA schedule, no layer drop."""

    ema_timescale: float = 20_000
    ema_threshold: float = 1e-7
    encoder_layer_drop: float = 0.0


def model_config_class(model_type: str) -> type[DinoSRConfig]:
    """The config class of ``model_type`` (``"spidr"`` or ``"dinosr"``)."""
    if model_type == "spidr":
        return SpidRConfig
    if model_type == "dinosr":
        return DinoSRConfig
    raise ConfigError(f"model_type must be 'spidr' or 'dinosr', got {model_type!r}")


def _check_model_config(cfg: DinoSRConfig) -> None:
    def fail(name: str, expected: str) -> None:
        raise ConfigError(f"model.{name} = {getattr(cfg, name)!r} is invalid: expected {expected}")

    if cfg.extractor_mode not in ("group_norm", "layer_norm"):
        fail("extractor_mode", "'group_norm' or 'layer_norm'")
    if not cfg.extractor_conv_layer_config:
        fail("extractor_conv_layer_config", "a non-empty list of (out_channels, kernel, stride)")
    for layer in cfg.extractor_conv_layer_config:
        if len(layer) != 3 or any(int(v) <= 0 for v in layer):
            fail("extractor_conv_layer_config", "positive (out_channels, kernel, stride) triples")
    for name in (
        "encoder_embed_dim",
        "encoder_pos_conv_kernel",
        "encoder_pos_conv_groups",
        "encoder_pos_conv_depth",
        "encoder_num_layers",
        "encoder_num_heads",
        "encoder_ff_interm_features",
        "codebook_size",
        "num_codebooks",
    ):
        if getattr(cfg, name) <= 0:
            fail(name, "a positive integer")
    if cfg.encoder_embed_dim % cfg.encoder_num_heads:
        fail("encoder_num_heads", f"a divisor of encoder_embed_dim ({cfg.encoder_embed_dim})")
    if cfg.encoder_embed_dim % cfg.encoder_pos_conv_groups:
        fail("encoder_pos_conv_groups", f"a divisor of encoder_embed_dim ({cfg.encoder_embed_dim})")
    if cfg.num_codebooks > cfg.encoder_num_layers:
        fail("num_codebooks", f"at most encoder_num_layers ({cfg.encoder_num_layers})")
    for name in (
        "encoder_projection_dropout",
        "encoder_attention_dropout",
        "encoder_ff_interm_dropout",
        "encoder_dropout",
        "encoder_layer_drop",
        "codebook_decay",
        "ema_start_decay",
        "ema_final_decay",
    ):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            fail(name, "a number in [0, 1]")
    for name in ("ema_final_step", "freeze_step"):
        if getattr(cfg, name) < 0:
            fail(name, "a non-negative integer")


T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in the field's own form.

    JSON and TOML give lists where the dataclasses hold tuples, and integers where they hold
    floats: both are accepted. Anything else that does not fit raises :class:`ConfigError`.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad() -> ConfigError:
        return ConfigError(f"{where} = {value!r} has the wrong type: expected {_type_name(tp)}")

    if tp is Any:
        return value
    if origin is Literal:
        if value in args and type(value) is type(next(a for a in args if a == value)):
            return value
        raise bad()
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        if origin is list:
            return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad()
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad()
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad()
        return from_mapping(tp, value, where=where)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad()


def from_mapping(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``, strictly.

    Args:
        cls: a dataclass type (for example :class:`SpidRConfig`).
        data: field name -> value, as read from JSON or TOML.
        where: the name of the table, used in error messages (``"model"`` gives ``model.key``).

    Raises:
        ConfigError: an unknown key, a missing required key, or a value of the wrong type; the
            message names ``table.key``, the value and what was expected.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a table of key = value, got {type(data).__name__}")
    prefix = f"{where}." if where else ""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} in {cls.__name__}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {prefix}{name} in {cls.__name__}")
    return cls(**kwargs)
