"""Building models from configs and checkpoints, and the published pretrained models.

Pretrained weights are downloaded once into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``).
Machines without internet can pass ``checkpoint=PATH`` or set ``SPIDR_CHECKPOINT_DIR`` to a
directory holding the release's files (``spidr_base.pt``, ``dinosr_base_reproduced.pt``,
``dinosr.ckpt``).

The reference release's (spidr 0.2.0) loading functions are here too, with its arguments and
behaviour: :func:`build_model`, :func:`model_from_raw_checkpoint` and the three constructors with
``pretrained=``, ``check_hash=`` and ``progress=`` (see :mod:`spidr.models.utils`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import pickle
import re
import warnings
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


def model_from_state_dict(
    cfg: DinoSRConfig, state_dict: Mapping[str, Any], source: str, model_class: type[DinoSR] | None = None
) -> DinoSR:
    """The model of ``cfg`` holding ``state_dict``, built without a wasted random initialisation, in training
    mode (as a freshly built module). ``model_class``: the class to build (default: SpidR for a SpidRConfig,
    else DinoSR)."""
    with torch.device("meta"):
        model = _model_for(cfg) if model_class is None else model_class(cfg)
    load_state_dict_checked(model, state_dict, source, assign=True)
    return model


# --------------------------------------------------------------------------- build_model
def _model_for(cfg: DinoSRConfig) -> DinoSR:
    return SpidR(cfg) if isinstance(cfg, SpidRConfig) else DinoSR(cfg)


def _default_config_notice(path: Path, model_type: str) -> None:
    """Say that a checkpoint without ``config.json`` gets its model type's default config: in the log, and as
    the ``UserWarning`` the reference release gives."""
    logger.warning("No config.json beside %s: using the default %s config.", path, model_type)
    warnings.warn(f"No config.json beside {path}: using the default {model_type} config.", UserWarning, stacklevel=3)


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
        The model, in training mode (as the reference release returns it, a freshly built module, whether
        loaded from a checkpoint or not): call ``.eval()`` before extracting features. The published models
        (:func:`spidr_base` and the others) come in eval mode.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ConfigError: an unknown model type, or a config key or value that does not fit (named); a
            ``ValueError``, as the reference release raises. Unlike the release, ``model_type`` may be left
            out with a checkpoint whose ``config.json`` says which model it holds.
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
        _default_config_notice(path, model_type)
        cfg = model_config_class(model_type)()
    loaded = load_checkpoint_file(path)
    check_model_type(loaded, cfg, str(path))
    state_dict = extract_state_dict(loaded, str(path))
    return model_from_state_dict(cfg, state_dict, str(path))


def model_from_raw_checkpoint(model_class: type[DinoSR], config_class: type[DinoSRConfig], ckpt: str | Path) -> DinoSR:
    """``model_class(cfg)`` holding the state dict of the ``.pt`` file ``ckpt`` (the reference release's loader).

    ``cfg`` is a ``config_class`` read from ``config.json`` beside the file (its ``"model"`` table, or the
    whole file); without one, the default ``config_class()``, with a ``UserWarning``. The state dict is the
    file's ``"model"`` entry or the file itself; a ``module.`` prefix is stripped. The model is returned in
    training mode, as the release does.

    Raises:
        ValueError: ``ckpt`` does not end in ``.pt``.
        FileNotFoundError: no such file.
        ConfigError: ``config.json`` is not valid, or describes another model type.
        CheckpointError: the file is unreadable, or does not fit the model (nothing is loaded).
    """
    path = Path(ckpt)
    if path.suffix != ".pt":
        raise ValueError(f"ckpt must be a .pt file, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    model_type = "spidr" if issubclass(config_class, SpidRConfig) else "dinosr"
    config_path = path.parent / "config.json"
    cfg = _read_config_json(config_path, model_type)[0] if config_path.is_file() else None
    if cfg is not None and type(cfg) is not config_class:  # a config class of the user's, derived from ours
        cfg = config_class(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    if cfg is None:
        _default_config_notice(path, model_type)
        cfg = config_class()
    loaded = load_checkpoint_file(path)
    check_model_type(loaded, cfg, str(path))
    return model_from_state_dict(cfg, extract_state_dict(loaded, str(path)), str(path), model_class)


# --------------------------------------------------------------------------- pretrained
def hub_checkpoint_dir() -> Path:
    """torch.hub's checkpoint cache, where downloads are kept."""
    return Path(torch.hub.get_dir()) / "checkpoints"


HASH_PREFIX = re.compile(r"-([a-f0-9]*)\.")
"""torch.hub's rule: in a file name ``name-<hex>.ext``, ``<hex>`` is a prefix of the file's SHA-256."""


def hash_prefix(filename: str) -> str | None:
    """The SHA-256 prefix that ``filename`` carries by torch.hub's rule (:data:`HASH_PREFIX`), or None."""
    match = HASH_PREFIX.search(filename)
    return match.group(1) if match else None


def check_file_hash(path: Path) -> None:
    """Check ``path``'s SHA-256 against the prefix in its name; a name without one is not checked.

    Raises:
        CheckpointError: the file's SHA-256 does not start with the prefix.
    """
    prefix = hash_prefix(path.name)
    if prefix is None:
        logger.info("%s carries no hash prefix in its name: nothing to check", path.name)
        return
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(prefix):
        raise CheckpointError(
            f"{path}: its SHA-256 {digest.hexdigest()} does not start with {prefix!r}, the hash prefix in its name "
            "(a damaged or different file)"
        )


def resolve_pretrained_file(
    name: str, checkpoint: str | Path | None = None, *, progress: bool = True, check_hash: bool = False
) -> Path:
    """Local path of the published checkpoint ``name``, downloading it once if needed.

    Looks, in order, at ``checkpoint``, at ``$SPIDR_CHECKPOINT_DIR/<file>``, at torch.hub's cache, and
    then downloads into that cache with a progress bar. With ``check_hash``, the file found or downloaded
    is checked against the SHA-256 prefix its name carries (torch.hub's ``name-<hex>.ext`` rule,
    :func:`check_file_hash`); a name without one has nothing to check.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist, or the file is nowhere and cannot be
            downloaded; the message says which file to put where.
        CheckpointError: ``check_hash`` and the file's SHA-256 does not match the prefix in its name.
    """
    info = PRETRAINED[name]
    path = _find_pretrained_file(name, info, checkpoint, progress=progress, check_hash=check_hash)
    if check_hash:
        check_file_hash(path)
    return path


def _find_pretrained_file(
    name: str, info: PretrainedModel, checkpoint: str | Path | None, *, progress: bool, check_hash: bool
) -> Path:
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
    prefix = hash_prefix(info.filename) if check_hash else None
    try:
        # torch.hub checks the prefix while downloading (and keeps no file that fails)
        extra = {} if prefix is None else {"hash_prefix": prefix}
        torch.hub.download_url_to_file(info.url, str(cached), progress=progress, **extra)
    except Exception as error:  # urllib raises many kinds; all mean "not available here"
        where = f"{CHECKPOINT_DIR_ENV}={env_dir} (no {info.filename} there)" if env_dir else f"{CHECKPOINT_DIR_ENV}"
        raise FileNotFoundError(
            f"could not download the {name} weights from {info.url} ({type(error).__name__}: {error}). "
            f"Download {info.filename} on a machine with internet, then either put it at {cached}, "
            f"or into the directory named by {where}, or pass checkpoint='/path/to/{info.filename}'."
        ) from error
    return cached


def load_pretrained(
    name: str,
    *,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    check_hash: bool = False,
) -> DinoSR:
    """The published model ``name`` (a key of :data:`PRETRAINED`) in eval mode.

    Raises:
        ValueError: an unknown ``name``.
        FileNotFoundError: ``checkpoint`` does not exist, or the weights are nowhere and cannot be downloaded.
        CheckpointError: the file is unreadable, cannot be loaded safely, holds another model type, or its keys
            or shapes do not fit (the first mismatches are listed); no code in the file is ever run; with
            ``check_hash``, its SHA-256 does not match the prefix in its name.
    """
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(PRETRAINED)}")
    info = PRETRAINED[name]
    if not pretrained:
        return _model_for(info.config()).eval()
    path = resolve_pretrained_file(name, checkpoint, progress=progress, check_hash=check_hash)
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


def spidr_base(
    *,
    pretrained: bool = True,
    check_hash: bool = False,
    progress: bool = True,
    checkpoint: str | Path | None = None,
) -> SpidR:
    """SpidR base (Poli et al., 2025), trained on LibriSpeech 960 h, in eval mode.

    Args:
        pretrained: load the release's weights (downloaded once and cached); False gives fresh
            weights and works under ``with torch.device("meta"):``.
        check_hash: check the file's SHA-256 against the hash prefix in its name, by torch.hub's rule
            (``name-<hex digits>.ext``). The published file, ``spidr_base.pt``, carries no such prefix,
            so for it there is nothing to check and True changes nothing: the same as torch.hub's
            ``check_hash`` in spidr 0.2.0, which finds no prefix either. A local ``checkpoint`` named
            with a prefix is checked.
        progress: show a progress bar while downloading.
        checkpoint: a local ``spidr_base.pt`` to use instead of the cache or download.

    Raises:
        FileNotFoundError, CheckpointError: as :func:`load_pretrained`.
    """
    model = load_pretrained(
        "spidr_base", pretrained=pretrained, checkpoint=checkpoint, progress=progress, check_hash=check_hash
    )
    return cast("SpidR", model)


def dinosr_base_reproduced(
    *,
    pretrained: bool = True,
    check_hash: bool = False,
    progress: bool = True,
    checkpoint: str | Path | None = None,
) -> DinoSR:
    """DinoSR base reproduced with the SpidR codebase, in eval mode.

    Same arguments as :func:`spidr_base`; the published file, ``dinosr_base_reproduced.pt``, has no hash
    prefix in its name either, so ``check_hash`` has nothing to check for it.
    """
    return load_pretrained(
        "dinosr_base_reproduced",
        pretrained=pretrained,
        checkpoint=checkpoint,
        progress=progress,
        check_hash=check_hash,
    )


def dinosr_base_original(
    *,
    pretrained: bool = True,
    check_hash: bool = False,
    progress: bool = True,
    checkpoint: str | Path | None = None,
) -> DinoSR:
    """The original DinoSR (Liu et al., 2023), converted from its fairseq checkpoint, in eval mode.

    Same arguments as :func:`spidr_base`; the model uses a qkv bias. The published file, ``dinosr.ckpt``,
    has no hash prefix in its name, so ``check_hash`` has nothing to check for it.
    """
    return load_pretrained(
        "dinosr_base_original", pretrained=pretrained, checkpoint=checkpoint, progress=progress, check_hash=check_hash
    )
