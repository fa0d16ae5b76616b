"""Configuration dataclasses and their typed, strict construction from plain mappings.

The model configurations keep the field names and defaults of the reference release, so a
release ``config.json`` loads unchanged. Every constructor that reads user data goes through
:func:`from_mapping`, which rejects unknown keys and values of the wrong type by name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict, TypeVar

__all__ = [
    "DEFAULT_CONV_LAYER_CONFIG",
    "SAMPLE_RATE",
    "Config",
    "ConfigError",
    "DataConfig",
    "DinoSRConfig",
    "MaskingConfig",
    "MaskingStrategy",
    "ModelType",
    "OptimizerConfig",
    "ResumeConfig",
    "RunConfig",
    "SlurmConfig",
    "SpidRConfig",
    "config_to_dict",
    "from_mapping",
    "model_config_class",
    "parse_override",
    "read_config",
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
    # Only values that cannot work are refused (a dropout probability outside [0, 1] makes torch raise when the
    # model is built, a zero timescale divides by zero at the first step): every config the reference release
    # trains with loads here too, unusual ones (a layer drop or decay above 1, a negative freeze_step) included.
    for name in (
        "encoder_projection_dropout",
        "encoder_attention_dropout",
        "encoder_ff_interm_dropout",
        "encoder_dropout",
    ):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            fail(name, "a number in [0, 1]")
    if isinstance(cfg, SpidRConfig) and not cfg.ema_timescale > 0:  # also refuses NaN
        fail("ema_timescale", "a positive number")


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
        tables = [a for a in args if typing.is_typeddict(a) or dataclasses.is_dataclass(a)]
        if isinstance(value, Mapping) and len(tables) == 1:  # a table: report what is wrong inside it
            return _coerce(value, tables[0], where)
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
            if not math.isfinite(value):  # TOML and JSON both read nan and inf
                raise ConfigError(f"{where} = {value!r} is invalid: expected a finite number")
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
    if typing.is_typeddict(tp):
        if not isinstance(value, Mapping):
            raise bad()
        keys = typing.get_type_hints(tp)
        unknown = [k for k in value if k not in keys]
        if unknown:
            raise ConfigError(f"unknown key {where}.{unknown[0]}; valid keys: {', '.join(sorted(keys))}")
        return {str(k): _coerce(v, keys[k], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad()
        return from_mapping(tp, value, where=where)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad()


_TABLE_OF = {
    "RunConfig": "run",
    "DataConfig": "data",
    "OptimizerConfig": "optimizer",
    "MaskingConfig": "masking",
    "DinoSRConfig": "model",
    "SpidRConfig": "model",
}


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
    try:
        return cls(**kwargs)
    except ConfigError as error:
        # The range checks name their keys by the class's usual table ("data.min_sample_size"); a
        # validation table or a config.json names them by where they were read.
        table = _TABLE_OF.get(cls.__name__)
        if not where or table is None or where == table:
            raise
        raise ConfigError(re.sub(rf"\b{table}\.(?=\w)", f"{where}.", str(error))) from None


# --------------------------------------------------------------------------- training configuration
MaskingStrategy = Literal["static", "uniform", "normal", "poisson"]


def _require(ok: bool, where: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{where} = {value!r} is invalid: expected {expected}")


_MAX_SEED = 2**32 - 1  # numpy's generators take seeds in [0, 2**32 - 1]


class SlurmConfig(TypedDict):
    """SLURM resources of a job (the ``run.slurm_validation`` table; ``python -m spidr``'s options).

    A plain dict, as in the reference release: ``SlurmConfig(account="a", nodes=1, gpus_per_node=1)`` and
    ``cfg["qos"] = "high"`` both work. A ``run.slurm_validation`` table may give any subset of the keys (the
    release reads it unchecked):
    ``nodes`` and ``gpus_per_node`` default to 1, and without ``account`` the job is submitted to the SLURM
    account of the training job (``$SLURM_JOB_ACCOUNT``), else to the user's default account.
    """

    account: str
    nodes: int
    gpus_per_node: int
    qos: NotRequired[str]
    time: NotRequired[int]
    cpus_per_task: NotRequired[int]
    mem_per_gpu: NotRequired[str]
    constraint: NotRequired[str]
    partition: NotRequired[str]


@dataclass(frozen=True)
class RunConfig:
    """The ``run`` table: where the run lives, logging, checkpoints (release field names)."""

    workdir: str
    wandb_project: str
    wandb_name: str
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    random_seed: int = 0
    use_deterministic: bool = False
    log_interval: int = 200
    save_interval: int = 2_500
    init_ckpt: str | None = None
    compile: bool = True
    keep_latest: int = -1
    model_type: ModelType = "dinosr"
    slurm_validation: SlurmConfig | None = None
    max_bad_fraction: float = 0.01  # stop when more than this fraction of the files read is bad (see data.loader)
    max_nonfinite_steps: int = 10  # stop after this many consecutive steps with a non-finite loss or gradient

    def __post_init__(self) -> None:
        _require(
            0 <= self.random_seed <= _MAX_SEED, "run.random_seed", self.random_seed, f"an integer in [0, {_MAX_SEED}]"
        )
        _require(self.log_interval > 0, "run.log_interval", self.log_interval, "a positive integer")
        # save_interval <= 0 means no periodic checkpoints, keep_latest <= 0 keeps them all (the release's reading).
        _require(0 <= self.max_bad_fraction <= 1, "run.max_bad_fraction", self.max_bad_fraction, "a number in [0, 1]")
        _require(
            self.max_nonfinite_steps > 0, "run.max_nonfinite_steps", self.max_nonfinite_steps, "a positive integer"
        )

    @property
    def dir(self) -> Path:
        """The run directory, absolute: ``workdir/wandb_project/wandb_name`` with ``workdir`` resolved."""
        return Path(self.workdir).resolve() / self.wandb_project / self.wandb_name


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` table (and each ``validation.<name>`` table): manifest, batching, loading."""

    manifest: str
    enable_padding: bool = False
    rand_crop: bool = True
    normalize: bool = True
    num_buckets: int = 1000
    min_sample_size: int = 2_000
    max_sample_size: int = 320_000
    max_batch_length: int = 3_800_000
    drop_last: bool = False
    num_workers: int = 10
    pin_memory: bool = True
    prefetch_factor: int = 2
    persistent_workers: bool = True
    random_seed: int = 0
    bucket_method: Literal["uniform", "percentile"] = "uniform"
    alignments_path: str | None = None
    resample: bool = False  # resample / downmix audio that is not 16 kHz mono instead of skipping it

    def __post_init__(self) -> None:
        _require(self.num_buckets >= 0, "data.num_buckets", self.num_buckets, "a non-negative integer")
        _require(self.min_sample_size >= 0, "data.min_sample_size", self.min_sample_size, "a non-negative integer")
        for name in ("max_sample_size", "max_batch_length"):
            _require(getattr(self, name) > 0, f"data.{name}", getattr(self, name), "a positive integer")
        _require(
            self.min_sample_size <= self.max_sample_size,
            "data.min_sample_size",
            self.min_sample_size,
            f"at most data.max_sample_size ({self.max_sample_size})",
        )
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "a non-negative integer")
        _require(self.prefetch_factor > 0, "data.prefetch_factor", self.prefetch_factor, "a positive integer")
        _require(
            0 <= self.random_seed <= _MAX_SEED, "data.random_seed", self.random_seed, f"an integer in [0, {_MAX_SEED}]"
        )


@dataclass(frozen=True)
class OptimizerConfig:
    """The ``optimizer`` table: AdamW, clipping, precision and the learning-rate schedule."""

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    eps: float = 1e-6
    max_norm: float = 10.0
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    init_lr_scale: float = 0.01
    final_lr_scale: float = 0.01
    max_steps: int = 400_000
    warmup_steps: int = 12_000
    hold_steps: int = 188_000
    decay_steps: int = 200_000
    rsqrt_timescale: int = 10_000
    rsqrt_shift: int = 0
    scheduler: Literal["tristage", "cosine", "rsqrt", "constant"] = "tristage"
    exclude_from_optimizer: list[str] = field(default_factory=lambda: ["teacher"])
    to_freeze: list[str] = field(default_factory=lambda: ["feature_extractor", "feature_projection"])

    def __post_init__(self) -> None:
        _require(self.lr >= 0, "optimizer.lr", self.lr, "a non-negative number")
        for i, beta in enumerate(self.betas):
            _require(0 <= beta < 1, f"optimizer.betas[{i}]", beta, "a number in [0, 1)")
        for name in ("weight_decay", "eps", "max_norm", "init_lr_scale", "final_lr_scale"):
            _require(getattr(self, name) >= 0, f"optimizer.{name}", getattr(self, name), "a non-negative number")
        for name in ("max_steps", "warmup_steps", "hold_steps", "decay_steps", "rsqrt_shift"):
            _require(getattr(self, name) >= 0, f"optimizer.{name}", getattr(self, name), "a non-negative integer")
        if self.scheduler == "rsqrt":
            _require(
                self.rsqrt_timescale > 0,
                "optimizer.rsqrt_timescale",
                self.rsqrt_timescale,
                "a positive integer with scheduler = 'rsqrt'",
            )

    @property
    def mixed_precision(self) -> bool:
        return self.dtype != "float32"


@dataclass(frozen=True)
class MaskingConfig:
    """The ``masking`` table: fairseq's span masking (names as in the release)."""

    mask_prob: float = 0.8
    mask_selection: MaskingStrategy = "static"
    mask_other: float = 0.0
    mask_length: int = 10
    no_mask_overlap: bool = False
    mask_min_space: int = 1
    mask_channel_prob: float = 0.0
    mask_channel_selection: MaskingStrategy = "static"
    mask_channel_other: float = 0.0
    mask_channel_length: int = 10
    no_mask_channel_overlap: bool = False
    mask_channel_min_space: int = 1

    def __post_init__(self) -> None:
        _require(self.mask_prob >= 0, "masking.mask_prob", self.mask_prob, "a non-negative number")
        _require(self.mask_length >= 1, "masking.mask_length", self.mask_length, "a positive integer")
        if self.mask_selection == "normal":
            _require(
                self.mask_other >= 0,
                "masking.mask_other",
                self.mask_other,
                "a non-negative standard deviation with mask_selection = 'normal'",
            )
        if self.mask_selection == "uniform":
            _require(
                int(self.mask_other) <= 2 * self.mask_length,
                "masking.mask_other",
                self.mask_other,
                f"at most 2 * masking.mask_length ({2 * self.mask_length}) with mask_selection = 'uniform'",
            )
        _require(
            self.mask_channel_prob >= 0, "masking.mask_channel_prob", self.mask_channel_prob, "a non-negative number"
        )


@dataclass(frozen=True)
class Config:
    """A whole training configuration: the tables of a config file."""

    run: RunConfig
    data: DataConfig
    model: DinoSRConfig
    optimizer: OptimizerConfig
    masking: MaskingConfig
    validation: dict[str, DataConfig]

    def __post_init__(self) -> None:
        from spidr.models.components import receptive_field  # spidr.models imports this module

        # Every batch is cut to at most max_sample_size samples: below the receptive field no batch has a frame,
        # so that failure is certain. A min_sample_size below it is not (the files shorter than the receptive
        # field are left out when the manifest is read, with a warning naming data.min_sample_size).
        needed = receptive_field(self.model.extractor_conv_layer_config)
        tables = [("data", self.data), *((f"validation.{name}", table) for name, table in self.validation.items())]
        for where, table in tables:
            _require(
                table.max_sample_size >= needed,
                f"{where}.max_sample_size",
                table.max_sample_size,
                f"at least the model's receptive field ({needed} samples, from model.extractor_conv_layer_config)",
            )


@dataclass(frozen=True)
class ResumeConfig:
    """What a validation job needs to know about the checkpoint it validates (the reference release's type).

    Attributes:
        step: the training step of the checkpoint.
        checkpoint: the checkpoint file (``None``: nothing to validate).
        results: the JSONL file the validation results are appended to.
    """

    step: int
    checkpoint: Path | None
    results: Path


_TABLES = ("run", "data", "model", "optimizer", "masking", "validation")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"table.key=value"`` -> (``["table", "key"]``, value); the value is read as JSON when it parses
    (numbers, true/false, null, lists), as Python's True/False/None, and as a string otherwise."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like table.key=value")
    dotted, raw = text.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"override {text!r}: the key must be table.key (or validation.name.key)")
    raw = raw.strip()
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = {"True": True, "False": False, "None": None}.get(raw, raw)
    return keys, value


def read_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML or JSON training config into frozen dataclasses, strictly.

    Args:
        path: a ``.toml`` or ``.json`` file with the tables ``run``, ``data``, ``model``,
            ``optimizer``, ``masking`` and ``validation.<name>`` (only ``run`` and ``data`` required).
        overrides: ``"table.key=value"`` strings applied on top (``--set`` on the command lines);
            values are typed by the field they set.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: an unsupported suffix, invalid syntax, an unknown table or key, a wrong type or an
            out-of-range value; the message names the file and ``table.key``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(f"{path}: unsupported config format {path.suffix!r}, use .toml or .json")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (line {line}, byte 0x{data[error.start]:02x})") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: invalid {path.suffix[1:].upper()}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a table of tables")
    data = copy.deepcopy(data)
    for text_override in overrides:
        keys, value = parse_override(text_override)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text_override!r}: {key} is not a table")
        node[keys[-1]] = value
    unknown = [t for t in data if t not in _TABLES]
    if unknown:
        raise ConfigError(f"{path}: unknown table [{unknown[0]}]; valid tables: {', '.join(_TABLES)}")
    for table in ("run", "data"):
        if table not in data:
            raise ConfigError(f"{path}: missing required table [{table}]")
    try:
        run = from_mapping(RunConfig, data["run"], where="run")
        validation = data.get("validation", {})
        if not isinstance(validation, dict):
            raise ConfigError("validation must be a table of named data tables")
        return Config(
            run=run,
            data=from_mapping(DataConfig, data["data"], where="data"),
            model=from_mapping(model_config_class(run.model_type), data.get("model", {}), where="model"),
            optimizer=from_mapping(OptimizerConfig, data.get("optimizer", {}), where="optimizer"),
            masking=from_mapping(MaskingConfig, data.get("masking", {}), where="masking"),
            validation={
                name: from_mapping(DataConfig, table, where=f"validation.{name}") for name, table in validation.items()
            },
        )
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain JSON-able data (what ``config.json`` beside a checkpoint holds)."""
    return dataclasses.asdict(cfg)
