"""Building models from configs and checkpoints, and the published pretrained models.

Pretrained weights are downloaded once into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``).
Machines without internet can pass ``checkpoint=PATH`` or set ``SPIDR_CHECKPOINT_DIR`` to a
directory holding the release's files (``spidr_base.pt``, ``dinosr_base_reproduced.pt``,
``dinosr.ckpt``).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from spidr.config import ConfigError, DinoSRConfig, SpidRConfig, from_mapping, model_config_class
from spidr.models.convert import state_dict_from_dinosr_fairseq_checkpoint
from spidr.models.dinosr import DinoSR
from spidr.models.spidr import SpidR

logger = logging.getLogger(__name__)

CHECKPOINT_DIR_ENV = "SPIDR_CHECKPOINT_DIR"


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or its contents do not fit the model (the message says what)."""


@dataclass(frozen=True)
class PretrainedModel:
    """Where a published checkpoint lives and how to build its model."""

    url: str
    filename: str
    model_type: str
    fairseq: bool = False
    config_fields: Mapping[str, Any] = field(default_factory=dict)

    def config(self) -> DinoSRConfig:
        """The model's config: the default of its type with ``config_fields`` changed."""
        return model_config_class(self.model_type)(**self.config_fields)


PRETRAINED: dict[str, PretrainedModel] = {
    "spidr_base": PretrainedModel(
        "https://dl.fbaipublicfiles.com/shared/devai/assets/models/spidr_base.pt", "spidr_base.pt", "spidr"
    ),
    "dinosr_base_reproduced": PretrainedModel(
        "https://dl.fbaipublicfiles.com/shared/devai/assets/models/dinosr_base_reproduced.pt",
        "dinosr_base_reproduced.pt",
        "dinosr",
    ),
    "dinosr_base_original": PretrainedModel(
        "https://data.csail.mit.edu/placesaudio/dinosr/dinosr.ckpt",
        "dinosr.ckpt",
        "dinosr",
        fairseq=True,
        config_fields={"encoder_qkv_bias": True},
    ),
}


# --------------------------------------------------------------------------- reading checkpoints
def load_checkpoint_file(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` on CPU, with errors that name the file.

    Nothing in the file can run code: ``weights_only=True`` accepts tensors and plain containers only, and
    this library never loads a checkpoint any other way.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is truncated, corrupt, not a torch checkpoint, or holds objects
            other than tensors and plain containers (which would need code execution to load).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} cannot be loaded safely: it is not a torch checkpoint, or it holds objects other than tensors "
            f"and plain containers, which weights_only=True refuses as loading them could run code "
            f"({_torch_reason(error)})"
        ) from error
    except MemoryError:
        raise
    except Exception as error:  # torch's zip reader and unpickler raise many kinds on damaged files
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint (truncated or corrupt?): {type(error).__name__}: "
            f"{_torch_reason(error)}"
        ) from error


def _torch_reason(error: BaseException) -> str:
    """The informative line of a torch.load error (its messages run over many lines of advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for before, line in itertools.pairwise(lines):
        if line.startswith("Check the documentation of torch.load"):
            return before
    return lines[0] if lines else type(error).__name__


def extract_state_dict(checkpoint: Any, source: str) -> dict[str, Tensor]:
    """The state dict inside a loaded checkpoint: its ``"model"`` entry, or the checkpoint itself.

    A ``module.`` prefix (DistributedDataParallel) is stripped.
    """
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(k, str) for k in checkpoint):
        raise CheckpointError(f"{source} does not hold a state dict (a mapping of names to tensors)")
    prefix = "module."
    if checkpoint and all(k.startswith(prefix) for k in checkpoint):
        return {k.removeprefix(prefix): v for k, v in checkpoint.items()}
    return dict(checkpoint)


def check_model_type(checkpoint: Any, cfg: DinoSRConfig, source: str) -> None:
    """Refuse a checkpoint that says it holds another model type than ``cfg`` builds (training checkpoints
    of ``spidr.train`` carry ``model_type``; SpidR and DinoSR state dicts have the same keys and shapes)."""
    stated = checkpoint.get("model_type") if isinstance(checkpoint, Mapping) else None
    wanted = "spidr" if isinstance(cfg, SpidRConfig) else "dinosr"
    if isinstance(stated, str) and stated != wanted:
        raise CheckpointError(f"{source} holds a {stated!r} model, not a {wanted!r} one")


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, Any], source: str, *, assign: bool = False
) -> None:
    """Load ``state_dict`` into ``model`` strictly, or change nothing.

    Every key, and every shape, is checked before a single tensor is copied. With ``assign`` (for a
    model built on the meta device) the checkpoint's tensors become the model's, cast to the
    model's dtypes.

    Raises:
        CheckpointError: missing keys, unexpected keys or shape mismatches (the first few of each are
            listed, with ``source``, usually the file name).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}, "
        f"model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and (not isinstance(v, Tensor) or v.shape != expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}({type(getattr(model, 'cfg', None)).__name__}): "
            + "; ".join(problems)
        )
    if assign:
        state_dict = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=assign)


def model_from_state_dict(cfg: DinoSRConfig, state_dict: Mapping[str, Any], source: str) -> DinoSR:
    """The model of ``cfg`` holding ``state_dict``, built without a wasted random initialisation."""
    with torch.device("meta"):
        model = _model_for(cfg)
    load_state_dict_checked(model, state_dict, source, assign=True)
    return model


# --------------------------------------------------------------------------- build_model
def _model_for(cfg: DinoSRConfig) -> DinoSR:
    return SpidR(cfg) if isinstance(cfg, SpidRConfig) else DinoSR(cfg)


def _read_config_json(path: Path, model_type: str | None) -> tuple[DinoSRConfig | None, str | None]:
    """The model config in ``config.json`` beside a checkpoint (its ``model`` table, or the whole file)."""
    if not path.is_file():
        return None, model_type
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    stated = data.get("run", {}).get("model_type") if isinstance(data.get("run"), dict) else None
    stated = stated or data.get("model_type")
    if model_type is not None and stated is not None and stated != model_type:
        raise ConfigError(f"{path} describes a {stated!r} model, but model_type={model_type!r} was asked for")
    model_type = model_type or stated
    if model_type is None:
        raise ConfigError(f"{path} does not say which model it describes: pass model_type='spidr' or 'dinosr'")
    table = data["model"] if "model" in data else {k: v for k, v in data.items() if k != "model_type"}
    return from_mapping(model_config_class(model_type), table, where=f"{path.name}:model"), model_type


def build_model(
    *,
    cfg: DinoSRConfig | None = None,
    model_type: str | None = None,
    checkpoint: str | Path | None = None,
) -> DinoSR:
    """Build a SpidR or DinoSR model from a config, or from a checkpoint file.

    Args:
        cfg: a :class:`~spidr.config.SpidRConfig` (gives SpidR) or :class:`~spidr.config.DinoSRConfig`
            (gives DinoSR). With ``checkpoint``, it replaces the ``config.json`` beside the file.
        model_type: ``"spidr"`` or ``"dinosr"``; with neither ``cfg`` nor a ``config.json`` that says,
            the model's default config is used.
        checkpoint: a ``.pt`` file whose ``"model"`` entry (or itself) is the state dict; a
            ``module.`` prefix is stripped. Its config is read from ``config.json`` in the same
            directory (the ``"model"`` table, or the whole file).

    Returns:
        The model, in training mode when built from a config, in eval mode when loaded from a checkpoint.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ConfigError: an unknown model type, or a config key or value that does not fit (named).
        CheckpointError: the file is unreadable, or its keys or shapes do not fit (listed); nothing is loaded.
    """
    if model_type is not None and model_type not in ("spidr", "dinosr"):
        raise ConfigError(f"model_type must be 'spidr' or 'dinosr', got {model_type!r}")
    if cfg is not None:
        if not isinstance(cfg, DinoSRConfig):
            raise ConfigError(f"cfg must be a SpidRConfig or DinoSRConfig, got {type(cfg).__name__}")
        cfg_type = "spidr" if isinstance(cfg, SpidRConfig) else "dinosr"
        if model_type is not None and model_type != cfg_type:
            raise ConfigError(f"model_type={model_type!r} does not match cfg of type {type(cfg).__name__}")
        model_type = cfg_type
    if checkpoint is None:
        if cfg is None:
            if model_type is None:
                raise ConfigError("build_model needs cfg, model_type or checkpoint")
            cfg = model_config_class(model_type)()
        return _model_for(cfg)

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if cfg is None:
        cfg, model_type = _read_config_json(path.parent / "config.json", model_type)
    if cfg is None:
        if model_type is None:
            raise ConfigError(
                f"no config.json beside {path} and no model_type given: pass model_type='spidr' or 'dinosr'"
            )
        logger.warning("No config.json beside %s: using the default %s config.", path, model_type)
        cfg = model_config_class(model_type)()
    loaded = load_checkpoint_file(path)
    check_model_type(loaded, cfg, str(path))
    state_dict = extract_state_dict(loaded, str(path))
    return model_from_state_dict(cfg, state_dict, str(path)).eval()


# --------------------------------------------------------------------------- pretrained
def hub_checkpoint_dir() -> Path:
    """torch.hub's checkpoint cache, where downloads are kept."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_pretrained_file(name: str, checkpoint: str | Path | None = None, *, progress: bool = True) -> Path:
    """Local path of the published checkpoint ``name``, downloading it once if needed.

    Looks, in order, at ``checkpoint``, at ``$SPIDR_CHECKPOINT_DIR/<file>``, at torch.hub's cache, and
    then downloads into that cache with a progress bar.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist, or the file is nowhere and cannot be
            downloaded; the message says which file to put where.
    """
    info = PRETRAINED[name]
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file for {name} not found: {path}")
        return path
    env_dir = os.environ.get(CHECKPOINT_DIR_ENV)
    if env_dir and (Path(env_dir) / info.filename).is_file():
        return Path(env_dir) / info.filename
    cached = hub_checkpoint_dir() / info.filename
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading %s to %s", info.url, cached)
    try:
        torch.hub.download_url_to_file(info.url, str(cached), progress=progress)
    except Exception as error:  # urllib raises many kinds; all mean "not available here"
        where = f"{CHECKPOINT_DIR_ENV}={env_dir} (no {info.filename} there)" if env_dir else f"{CHECKPOINT_DIR_ENV}"
        raise FileNotFoundError(
            f"could not download the {name} weights from {info.url} ({type(error).__name__}: {error}). "
            f"Download {info.filename} on a machine with internet, then either put it at {cached}, "
            f"or into the directory named by {where}, or pass checkpoint='/path/to/{info.filename}'."
        ) from error
    return cached


def load_pretrained(
    name: str, *, pretrained: bool = True, checkpoint: str | Path | None = None, progress: bool = True
) -> DinoSR:
    """The published model ``name`` (a key of :data:`PRETRAINED`) in eval mode.

    Raises:
        ValueError: an unknown ``name``.
        FileNotFoundError: ``checkpoint`` does not exist, or the weights are nowhere and cannot be downloaded.
        CheckpointError: the file is unreadable, cannot be loaded safely, holds another model type, or its keys
            or shapes do not fit (the first mismatches are listed); no code in the file is ever run.
    """
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(PRETRAINED)}")
    info = PRETRAINED[name]
    if not pretrained:
        return _model_for(info.config()).eval()
    path = resolve_pretrained_file(name, checkpoint, progress=progress)
    loaded = load_checkpoint_file(path)
    if info.fairseq:
        if not isinstance(loaded, Mapping):
            raise CheckpointError(f"{path} is not a fairseq checkpoint")
        try:
            state_dict = state_dict_from_dinosr_fairseq_checkpoint(loaded)
        except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as error:
            # a damaged file can hold anything: values that are not tensors, keys that are not strings, ...
            raise CheckpointError(f"{path} is not an original DinoSR (fairseq) checkpoint: {error}") from error
    else:
        check_model_type(loaded, info.config(), str(path))
        state_dict = extract_state_dict(loaded, str(path))
    return model_from_state_dict(info.config(), state_dict, str(path)).eval()


def spidr_base(*, pretrained: bool = True, checkpoint: str | Path | None = None, progress: bool = True) -> SpidR:
    """SpidR base (Poli et al., 2025), trained on LibriSpeech 960 h.

    Args:
        pretrained: load the release's weights (downloaded once and cached); False gives fresh
            weights and works under ``with torch.device("meta"):``.
        checkpoint: a local ``spidr_base.pt`` to use instead of the cache or download.
        progress: show a progress bar while downloading.

    Raises:
        FileNotFoundError, CheckpointError: as :func:`load_pretrained`.
    """
    return cast(
        "SpidR", load_pretrained("spidr_base", pretrained=pretrained, checkpoint=checkpoint, progress=progress)
    )


def dinosr_base_reproduced(
    *, pretrained: bool = True, checkpoint: str | Path | None = None, progress: bool = True
) -> DinoSR:
    """DinoSR base reproduced with the SpidR codebase (same arguments as :func:`spidr_base`)."""
    return load_pretrained("dinosr_base_reproduced", pretrained=pretrained, checkpoint=checkpoint, progress=progress)


def dinosr_base_original(
    *, pretrained: bool = True, checkpoint: str | Path | None = None, progress: bool = True
) -> DinoSR:
    """The original DinoSR (Liu et al., 2023), converted from its fairseq checkpoint ``dinosr.ckpt``.

    Same arguments as :func:`spidr_base`; the model uses a qkv bias.
    """
    return load_pretrained("dinosr_base_original", pretrained=pretrained, checkpoint=checkpoint, progress=progress)
