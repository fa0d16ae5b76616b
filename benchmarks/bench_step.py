"""One SpidR training step: ours (default and ``torch`` ops backends) against the reference release, in one process.

    python benchmarks/bench_step.py --reference /path/to/spidr-0.2.0-py3-none-any.whl   # base size, 2 x 4 s, CPU
    SPIDR_REFERENCE=/path/to/wheel python benchmarks/bench_step.py --device cuda --compile --batch 19 \\
        --utterance-samples 200000                                 # one 3.8 M-sample batch per GPU, as training
    python benchmarks/bench_step.py --quick                        # tiny model, 2 x 1 s: a smoke run
    python benchmarks/bench_step.py --profile                      # where the time goes, phase by phase

A step is what one training iteration does on one device: forward (student, teacher, codebook assignment
and EMA update of the codebooks, heads and loss), backward, gradient clipping, AdamW step, learning-rate
schedule, EMA update of the teacher. The model is the base-size SpidR (``SpidRConfig()`` defaults, which are
the release's base config) in train mode. Rows:

- ``ours``: ``spidr.train.Trainer.train_step``, our training loop's own step function, with the ``spidr.ops``
  backend the registry picks (named in the note);
- ``ours-torch``: the same with ``spidr.ops.use_backend("torch")`` (the plain-PyTorch reference ops);
- ``release`` (reference row): the reference release (spidr 0.2.0): its model, its ``build_optimizer``
  (fused AdamW, GradScaler, SequentialLR schedule) and the body of its training loop (``spidr/train.py``)
  without the distributed calls, on a single device. The release is a package also named ``spidr``: it is
  loaded under a private alias from ``--reference PATH`` or ``SPIDR_REFERENCE`` (its wheel, or a directory
  holding its ``spidr/`` package), see :func:`load_release`. Without it the row is skipped, with the reason,
  and the ratios are taken against ``ours-torch``. The release's ``setup_pytorch`` is not applied: it sets
  process-wide options (TF32 and cudnn.benchmark off, torch's defaults anyway, and an Inductor lowering of
  the convolution backward for dynamic shapes) that would change our rows too.

Every row starts from the same weights (our model's state dict, loaded into the release model), sees the same
batch (seeded random waveforms, cropped and masked by our collate function: span masks of
``spidr.data.masks.compute_mask_indices`` with the default masking config) and the same optimiser settings
(``OptimizerConfig()`` defaults: AdamW lr 5e-4, betas (0.9, 0.95), weight decay 0.01, eps 1e-6, clipping 10).
Precision: float32 on the CPU (the release's autocast is CUDA-only), bf16 autocast on CUDA (as in training);
``--dtype`` overrides. The first step of every row runs from the same torch RNG state (so the same dropout
masks) and is the warm-up; its losses are compared in a note (they must agree to about 1e-5 relative in
float32 without ``--compile``). Times are the median of ``--repeats`` steps after that warm-up, with the
spread (min-max); each row's model keeps training across its steps.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import spidr
import spidr.config
import spidr.data.collate
import spidr.models
import spidr.ops
import spidr.optim
import spidr.train
from benchmarks.harness import Row, Suite, machine_line, measure, sync
from spidr.config import Config, DataConfig, MaskingConfig, OptimizerConfig, RunConfig, SpidRConfig
from spidr.data.collate import Batch, collate
from spidr.models import SpidR

REFERENCE_ENV = "SPIDR_REFERENCE"
ROWS = ("ours", "ours-torch", "release")
# The release modules a training step needs (their own imports pull in the rest: components, metrics, utils).
RELEASE_MODULES = ("spidr.config", "spidr.models", "spidr.optimizer")
OUR_FILE = Path(spidr.__file__).resolve()


class ReleaseError(RuntimeError):
    """The reference release cannot be loaded from the given path (the message says why)."""


# ----------------------------------------------------------------------------- configurations
def quick_config() -> SpidRConfig:
    """A tiny SpidR (3 layers of width 64, 2 codebooks of 16) for smoke runs: every code path of a step."""
    return SpidRConfig(
        extractor_conv_layer_config=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
        encoder_embed_dim=64,
        encoder_num_layers=3,
        encoder_num_heads=4,
        encoder_ff_interm_features=128,
        encoder_pos_conv_groups=4,
        codebook_size=16,
        num_codebooks=2,
    )


def default_dtype(device: str) -> str:
    """float32 on the CPU (the release's autocast is CUDA-only), bfloat16 on CUDA (the training default)."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def make_batch(cfg: SpidRConfig, batch: int, utterance_samples: int, *, seed: int = 0) -> Batch:
    """``batch`` seeded standard-normal waveforms of ``utterance_samples`` samples, collated as in training.

    The waveforms are already standardised (zero mean, unit variance). All rows have the same length, so
    nothing is cropped or padded (no attention mask); the span masks come from our collate function, i.e.
    :func:`spidr.data.masks.compute_mask_indices` with the ``MaskingConfig()`` defaults, seeded.
    """
    g = torch.Generator().manual_seed(seed)
    waves = [torch.randn(utterance_samples, generator=g) for _ in range(batch)]
    masking = MaskingConfig()
    return collate(
        waves,
        list(range(batch)),
        conv_layers=cfg.extractor_conv_layer_config,
        max_sample_size=None,
        mask_prob=masking.mask_prob,
        mask_length=masking.mask_length,
        mask_selection=masking.mask_selection,
        mask_other=masking.mask_other,
        no_mask_overlap=masking.no_mask_overlap,
        mask_min_space=masking.mask_min_space,
        rng=seed,
    )


# ----------------------------------------------------------------------------- the reference release
def _spidr_modules() -> dict[str, ModuleType]:
    return {name: mod for name, mod in sys.modules.items() if name == "spidr" or name.startswith("spidr.")}


def _take_spidr_modules() -> dict[str, ModuleType]:
    """Remove every ``spidr`` / ``spidr.*`` entry from ``sys.modules`` and return them."""
    taken = _spidr_modules()
    for name in taken:
        del sys.modules[name]
    return taken


def _import_ours_fully() -> None:
    """Import every module of ours a step can reach, so none is imported while the release is swapped in."""
    for name in ("spidr.config", "spidr.models", "spidr.ops", "spidr.optim", "spidr.train", "spidr.data.collate"):
        importlib.import_module(name)
    spidr.ops.registered()  # runs the ops' lazy loaders now (spidr.ops.compiled, spidr.ops.triton_backend)


def _release_version(entry: Path) -> str:
    """The version in the release's ``spidr-*.dist-info/METADATA`` (wheel or directory), else ``"unknown"``."""
    try:
        if entry.is_file():
            with zipfile.ZipFile(entry) as wheel:
                name = next((n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")), None)
                text = wheel.read(name).decode() if name else ""
        else:
            metadata = next(iter(sorted(entry.glob("spidr-*.dist-info/METADATA"))), None)
            text = metadata.read_text() if metadata else ""
    except (OSError, zipfile.BadZipFile, KeyError):
        return "unknown"
    return next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Version:")), "unknown"
    )


@dataclass
class Release:
    """The reference release's modules, imported under a private alias (our ``spidr`` stays in ``sys.modules``).

    Attributes:
        entry: the ``sys.path`` entry it was imported from (a wheel, or a directory holding ``spidr/``).
        version: from its metadata, ``"unknown"`` when it has none.
        modules: its ``spidr*`` modules by name, as its own imports left them.
    """

    entry: Path
    version: str
    modules: dict[str, ModuleType] = field(default_factory=dict)

    def module(self, name: str) -> ModuleType:
        """The release's module ``name`` (for example ``"spidr.models"``)."""
        return self.modules[name]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Swap the release's modules into ``sys.modules`` for the block, ours back afterwards.

        Its modules import each other by absolute name (``from spidr.x import ...``): an import inside one of
        its functions at call time then finds the release's module, not ours. Modules it imports during the
        block join its stash.
        """
        ours = _take_spidr_modules()
        sys.modules.update(self.modules)
        try:
            yield
        finally:
            self.modules.update(_take_spidr_modules())
            sys.modules.update(ours)


def load_release(path: str | os.PathLike[str]) -> Release:
    """Import the reference release (``spidr`` 0.2.0) from its wheel or from a directory holding its package.

    Our ``spidr`` modules are imported completely first, moved out of ``sys.modules``, the release's path is
    put first on ``sys.path`` and its modules imported (:data:`RELEASE_MODULES` and what they import); then its
    modules are stashed in the returned :class:`Release`, ``sys.path`` and ``sys.modules`` are restored, and
    ``spidr`` is checked to be ours again.

    Args:
        path: the release's wheel (``.whl``), a directory holding its ``spidr/`` package (a site-packages
            directory), or that ``spidr/`` directory itself.

    Raises:
        ReleaseError: the path does not exist, holds no ``spidr`` package, or the release does not import.
    """
    given = Path(path).expanduser()
    if not given.exists():
        raise ReleaseError(f"reference release not found: {given} does not exist")
    given = given.resolve()
    if given.is_file():
        if not zipfile.is_zipfile(given):
            raise ReleaseError(f"{given} is neither a wheel nor a directory holding the spidr package")
        entry = given
    elif (given / "spidr" / "__init__.py").is_file():
        entry = given
    elif given.name == "spidr" and (given / "__init__.py").is_file():
        entry = given.parent
    else:
        raise ReleaseError(f"no spidr/ package in {given}")
    if entry == OUR_FILE.parent.parent:
        raise ReleaseError(f"{given} holds our own spidr package, not the reference release")
    _import_ours_fully()
    ours = _take_spidr_modules()
    sys.path.insert(0, str(entry))
    importlib.invalidate_caches()
    try:
        for name in RELEASE_MODULES:
            importlib.import_module(name)
        loaded = Path(sys.modules["spidr"].__file__ or "")
        if not str(loaded).startswith(str(entry)):
            raise ReleaseError(f"importing spidr from {entry} gave {loaded} instead")
        release = Release(entry=entry, version=_release_version(entry), modules=_take_spidr_modules())
    except ReleaseError:
        raise
    except Exception as error:  # any import failure of third-party code: report it as the reason to skip
        raise ReleaseError(f"cannot import the reference release from {entry}: {error!r}") from error
    finally:
        _take_spidr_modules()  # whatever a failed import left behind
        sys.path.remove(str(entry))
        sys.path_importer_cache.pop(str(entry), None)
        importlib.invalidate_caches()
        sys.modules.update(ours)
    import spidr as check  # a fresh import statement must find ours

    if Path(check.__file__ or "").resolve() != OUR_FILE:
        raise ReleaseError(f"after loading the release, spidr is {check.__file__}, not ours ({OUR_FILE})")
    for name in ("spidr.models", "spidr.optimizer", "spidr.config"):
        if name not in release.modules:
            raise ReleaseError(f"the release at {entry} has no module {name}")
    return release


def reference_path(given: str | os.PathLike[str] | None = None) -> Path | None:
    """``given``, else the ``SPIDR_REFERENCE`` environment variable, else None (there is no default)."""
    if given:
        return Path(given)
    env = os.environ.get(REFERENCE_ENV)
    return Path(env) if env else None


# ----------------------------------------------------------------------------- the steps
@dataclass
class StepRunner:
    """A row's training step as a zero-argument callable, with what it needs kept alive.

    ``losses`` collects the mean per-frame loss of every step (a float, or a 0-d tensor read after the timings
    so the release's step is not made to wait for it); ``trainer`` is our Trainer (None for the release).
    """

    name: str
    step: Callable[[], None]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    losses: list[float | torch.Tensor] = field(default_factory=list)
    trainer: Any = None


def _our_trainer(model: SpidR, opt_cfg: OptimizerConfig, device: torch.device, *, compile_model: bool) -> Any:
    """A :class:`spidr.train.Trainer` around ``model``, without its training data.

    ``Trainer.__init__`` builds the data loader from a manifest, which a benchmark has none of, so the fields
    ``train_step`` reads are set here the way ``__init__`` and ``run`` set them: optimiser and scheduler from
    ``spidr.optim.build_optimizer``, a GradScaler enabled for float16 only, ``forward`` compiled like
    ``run.compile`` does.
    """
    trainer = spidr.train.Trainer.__new__(spidr.train.Trainer)
    workdir = tempfile.gettempdir()
    trainer.cfg = Config(
        run=RunConfig(workdir=workdir, wandb_project="bench", wandb_name="step", model_type="spidr"),
        data=DataConfig(manifest="unused.csv"),
        model=model.cfg,
        optimizer=opt_cfg,
        masking=MaskingConfig(),
        validation={},
    )
    trainer.env = spidr.train.Env(device=device)
    trainer.model = model
    trainer.optimizer, trainer.scheduler = spidr.optim.build_optimizer(model, opt_cfg)
    trainer.scaler = torch.amp.GradScaler(device.type, enabled=opt_cfg.dtype == "float16")
    trainer.step, trainer.epoch = 0, 0
    trainer.nonfinite_in_a_row = 0
    trainer.counters = {"skipped_steps": 0}
    trainer.forward = torch.compile(model) if compile_model else model
    return trainer


def our_runner(
    name: str,
    cfg: SpidRConfig,
    state: dict[str, torch.Tensor],
    batch: Batch,
    opt_cfg: OptimizerConfig,
    device: torch.device,
    *,
    backend: str | None,
    compile_model: bool,
) -> StepRunner:
    """Our model loaded with ``state``, stepped by ``Trainer.train_step``; ``backend`` forces a spidr.ops backend."""
    model = SpidR(cfg)
    model.load_state_dict(state)
    model.to(device).train()
    trainer = _our_trainer(model, opt_cfg, device, compile_model=compile_model)

    runner = StepRunner(name=name, step=lambda: None, model=model, optimizer=trainer.optimizer, trainer=trainer)

    def step() -> None:
        with spidr.ops.use_backend(backend) if backend else contextlib.nullcontext():
            metrics = trainer.train_step(batch)
        runner.losses.append(math.nan if metrics is None else metrics["loss"])

    runner.step = step
    return runner


def release_model(
    release: Release, cfg: SpidRConfig, state: dict[str, torch.Tensor], device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The release's SpidR built from the same config as ours (field by field) and loaded with ``state``.

    Raises:
        ReleaseError: the release's ``SpidRConfig`` does not have the same fields as ours.
    """
    rel_cfg_mod = release.module("spidr.config")
    with release.active():
        fields = {f.name for f in dataclasses.fields(rel_cfg_mod.SpidRConfig)}
        ours = {f.name for f in dataclasses.fields(cfg)}
        if fields != ours:
            raise ReleaseError(f"the release's SpidRConfig fields differ from ours: {sorted(fields ^ ours)}")
        rel_cfg = rel_cfg_mod.SpidRConfig(**{name: copy.deepcopy(getattr(cfg, name)) for name in fields})
        model = release.module("spidr.models").SpidR(rel_cfg)
        model.load_state_dict(state)
    return model.to(device)


def release_runner(
    release: Release,
    cfg: SpidRConfig,
    state: dict[str, torch.Tensor],
    batch: Batch,
    opt_cfg: OptimizerConfig,
    device: torch.device,
    *,
    compile_model: bool,
) -> StepRunner:
    """The release's model loaded with ``state``, stepped as the body of the release's training loop.

    That body (release ``spidr/train.py``), minus what a single process does not need (DDP, the all-reduce of
    the frame count, meters, logging, checkpoints): autocast forward, ``loss.sum() * world_size / frames``,
    scaled backward, unscale, ``clip_grad_norm_`` over all parameters, scaler step and update, ``zero_grad``,
    scheduler step, ``update_ema``. Its autocast is on ``"cuda"``; here on the batch's device type, which is
    the same on CUDA and disabled on the CPU in float32 either way.
    """
    rel_cfg_mod = release.module("spidr.config")
    model = release_model(release, cfg, state, device)
    with release.active():
        model.train()
        opt_fields = {f.name for f in dataclasses.fields(rel_cfg_mod.OptimizerConfig)}
        rel_opt = rel_cfg_mod.OptimizerConfig(**{n: copy.deepcopy(getattr(opt_cfg, n)) for n in opt_fields})
        optimizer, scaler, scheduler = release.module("spidr.optimizer").build_optimizer(model, rel_opt)
        if compile_model:
            model.compile(dynamic=True)  # as the release's train() does with run.compile
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[rel_opt.dtype]
    waveforms = batch.waveforms.to(device)
    mask_indices = batch.mask_indices.to(device)
    attention_mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
    world_size = 1
    counter = {"step": 0}
    runner = StepRunner(name="release", step=lambda: None, model=model, optimizer=optimizer)

    def step() -> None:
        with release.active():
            num_frames = torch.full((), mask_indices.numel(), dtype=torch.int64, device=device)
            with torch.autocast(device.type, dtype, rel_opt.mixed_precision):
                loss, _outputs = model(waveforms, mask_indices=mask_indices, attention_mask=attention_mask)
            loss = loss.sum() * world_size / num_frames
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), rel_opt.max_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.get_last_lr()
            scheduler.step()
            counter["step"] += 1
            model.update_ema(counter["step"])
        runner.losses.append(loss.detach())

    runner.step = step
    return runner


def seeded_first_step(runner: StepRunner, seed: int) -> Callable[[], None]:
    """``runner.step``, with the torch RNG reset to ``seed`` before its first call (same dropout masks in every
    row's first step, which is the warm-up and the loss check)."""
    calls = [0]

    def step() -> None:
        if calls[0] == 0:
            torch.manual_seed(seed)
        calls[0] += 1
        runner.step()

    return step


# ----------------------------------------------------------------------------- the suite
@dataclass
class Setup:
    """What every row shares."""

    cfg: SpidRConfig
    batch: Batch
    state: dict[str, torch.Tensor]
    opt_cfg: OptimizerConfig
    device: torch.device
    compile_model: bool
    release: Release | None
    skipped: list[str]


def prepare(
    *,
    quick: bool,
    device: str,
    reference: str | os.PathLike[str] | None,
    compile_model: bool,
    batch: int | None,
    utterance_samples: int | None,
    dtype: str | None,
    seed: int,
    want_release: bool = True,
) -> Setup:
    """Model config, batch, initial weights, optimiser config and (when given and loadable) the release."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    cfg = quick_config() if quick else SpidRConfig()
    batch = batch or 2
    utterance_samples = utterance_samples or (16_000 if quick else 64_000)
    skipped: list[str] = []
    release = None
    path = reference_path(reference)
    if not want_release:
        pass
    elif path is None:
        skipped.append(
            f"`release`: no reference release given (--reference PATH or {REFERENCE_ENV}=PATH: its wheel or a "
            "directory holding its spidr/ package); ratios are against `ours-torch`"
        )
    else:
        try:
            release = load_release(path)
        except ReleaseError as error:
            skipped.append(f"`release`: {error}; ratios are against `ours-torch`")
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in SpidR(cfg).state_dict().items()}
    opt_cfg = OptimizerConfig(dtype=dtype or default_dtype(device))  # type: ignore[arg-type]
    return Setup(
        cfg=cfg,
        batch=make_batch(cfg, batch, utterance_samples, seed=seed).to(torch.device(device)),
        state=state,
        opt_cfg=opt_cfg,
        device=torch.device(device),
        compile_model=compile_model,
        release=release,
        skipped=skipped,
    )


def build_runner(name: str, setup: Setup) -> StepRunner:
    """The row ``name`` (one of :data:`ROWS`) on ``setup``."""
    args = (setup.cfg, setup.state, setup.batch, setup.opt_cfg, setup.device)
    if name == "ours":
        runner = our_runner(name, *args, backend=None, compile_model=setup.compile_model)
    elif name == "ours-torch":
        runner = our_runner(name, *args, backend="torch", compile_model=setup.compile_model)
    elif name == "release":
        if setup.release is None:
            raise ReleaseError("the reference release is not loaded")
        runner = release_runner(setup.release, *args, compile_model=setup.compile_model)
    else:
        raise ValueError(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
    return runner


def _release_memory() -> None:
    """Collect the dropped row (its step closure and runner form a cycle) and return cached CUDA blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def loss_note(first: dict[str, float], setup: Setup) -> str:
    """The first-step losses of the rows and their largest relative difference to the reference row's."""
    if not first:
        return ""
    ref = "release" if "release" in first else next(iter(first))
    values = ", ".join(f"`{name}` {loss:.8f}" for name, loss in first.items())
    diffs = [abs(loss - first[ref]) / abs(first[ref]) for name, loss in first.items() if name != ref and first[ref]]
    exact = setup.opt_cfg.dtype == "float32" and not setup.compile_model
    expected = "about 1e-5 (float32, eager)" if exact else "about 1e-2 (reduced precision or compiled dropout)"
    verdict = ""
    if diffs:
        worst = max(diffs)
        ok = worst <= (1e-5 if exact else 1e-2)
        verdict = f"; largest relative difference to `{ref}`: {worst:.1e} ({'agree' if ok else 'DISAGREE'}, "
        verdict += f"expected {expected})"
    return f"First-step loss (same weights, batch and dropout RNG): {values}{verdict}."


def _row_note(name: str, setup: Setup) -> str:
    if name == "ours":
        forced = os.environ.get(spidr.ops.registry.ENV_VAR)
        return f"spidr.ops backend `{spidr.ops.last_backend()}`" + (
            f" (forced by {spidr.ops.registry.ENV_VAR})" if forced else ""
        )
    if name == "ours-torch":
        return "spidr.ops forced to `torch`"
    assert setup.release is not None
    return f"spidr {setup.release.version} from {setup.release.entry.name}"


def _sequential_rows(setup: Setup, names: Sequence[str], repeats: int, seed: int) -> tuple[list[Row], dict]:
    """One row at a time: build, warm up, time, free (one model in memory at once)."""
    rows, first = [], {}
    for name in names:
        if setup.compile_model:
            import torch._dynamo  # only when compiling: it imports triton and inductor

            torch._dynamo.reset()  # a fresh cache per row: the ops backend is baked into the traced graph
        runner = build_runner(name, setup)
        row = measure(name, seeded_first_step(runner, seed), repeats=repeats, device=str(setup.device))
        row.note = _row_note(name, setup)  # right after the row's steps: last_backend() is this row's
        first[name] = float(runner.losses[0])
        rows.append(row)
        runner = None  # the next row's model is built only after this one's is freed
        _release_memory()
    return rows, first


def _interleaved_rows(setup: Setup, names: Sequence[str], repeats: int, seed: int) -> tuple[list[Row], dict]:
    """All rows' models at once; each round times one step of every row in turn, so a change in the machine's
    load (other processes on a shared machine) hits every row alike."""
    runners = [build_runner(name, setup) for name in names]
    steps = [seeded_first_step(runner, seed) for runner in runners]
    notes = {}
    for runner, step in zip(runners, steps, strict=True):  # the warm-up and loss-check step
        step()
        notes[runner.name] = _row_note(runner.name, setup)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(max(1, repeats)):
        for runner, step in zip(runners, steps, strict=True):
            sync(setup.device)
            start = time.perf_counter()
            step()
            sync(setup.device)
            times[runner.name].append(time.perf_counter() - start)
    rows = [
        Row(
            name=name,
            median_s=statistics.median(t),
            min_s=min(t),
            max_s=max(t),
            runs=len(t),
            note=notes[name],
        )
        for name, t in times.items()
    ]
    first = {runner.name: float(runner.losses[0]) for runner in runners}
    runners.clear()
    _release_memory()
    return rows, first


def run_suite(
    *,
    repeats: int = 5,
    quick: bool = False,
    device: str = "cpu",
    reference: str | os.PathLike[str] | None = None,
    compile_model: bool = False,
    batch: int | None = None,
    utterance_samples: int | None = None,
    dtype: str | None = None,
    seed: int = 0,
    rows: Sequence[str] = ROWS,
    interleave: bool | None = None,
) -> Suite:
    """Time one training step per row; see the module docstring.

    Args:
        repeats: timed steps per row, after one warm-up step.
        quick: the tiny :func:`quick_config` model and 2 x 1 s (a smoke run).
        device: ``"cpu"`` or ``"cuda"``.
        reference: the release's wheel or directory; default ``$SPIDR_REFERENCE``; none: the row is skipped.
        compile_model: ``torch.compile`` the model's forward as each training loop does with ``run.compile``.
        batch, utterance_samples: the batch shape (default 2 x 64000 samples, 2 x 16000 when ``quick``).
        dtype: ``float32``, ``bfloat16`` or ``float16`` (default :func:`default_dtype`).
        seed: seeds the weights, the waveforms, the masks and the first step's dropout.
        rows: which of :data:`ROWS` to run.
        interleave: keep every row's model in memory and time their steps in turn (round robin) instead of
            one row after the other (default: interleaved unless ``compile_model``). One after the other, the
            first rows pay the process's warm-up (allocator growth, page faults): on the 2-core CPU VM the same
            step measured 10-15% slower as the first row than as the last.

    Raises:
        ValueError: an unknown row, or ``interleave`` with ``compile_model``.
    """
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    if interleave is None:
        interleave = not compile_model
    if interleave and compile_model:
        raise ValueError("interleave needs eager rows: each compiled row resets torch.compile's caches")
    setup = prepare(
        quick=quick,
        device=device,
        reference=reference,
        compile_model=compile_model,
        batch=batch,
        utterance_samples=utterance_samples,
        dtype=dtype,
        seed=seed,
        want_release="release" in rows,
    )
    names = [name for name in rows if name != "release" or setup.release is not None]
    timed = _interleaved_rows if interleave else _sequential_rows
    measured, first = timed(setup, names, repeats, seed)
    b, samples = setup.batch.waveforms.shape
    for row in measured:
        row.extra["samples/s"] = round(b * samples / row.median_s, 1)
        row.extra["samples/step"] = b * samples
    reference_row = "release" if any(r.name == "release" for r in measured) else "ours-torch"
    size = "tiny test SpidR" if quick else "base SpidR"
    masked = setup.batch.mask_indices.shape[1]
    frames = setup.batch.frame_lengths[0].item()
    order = "rows interleaved step by step" if interleave else "one row after the other"
    notes = [
        f"{size}, batch {b} x {samples} samples ({samples / 16000:g} s; {frames} frames, {masked} masked per row), "
        f"{setup.opt_cfg.dtype}, {'torch.compile' if setup.compile_model else 'eager'}, {setup.device.type}, "
        f"train mode. One step = forward + backward + clipping + AdamW + schedule + EMA teacher update "
        f"(codebook update inside the forward). Median of {repeats} steps after a warm-up step, {order}.",
        loss_note(first, setup),
    ]
    return Suite(
        name="step",
        title=f"Training step, {size}, {b} x {samples / 16000:g} s, {setup.device.type}",
        rows=measured,
        reference=reference_row,
        notes=[n for n in notes if n],
        skipped=setup.skipped,
    ).finish()


# ----------------------------------------------------------------------------- profiling
PHASES = ("extractor", "projection", "student", "teacher", "codebooks", "clip", "optimizer", "ema")


def _instrument(runner: StepRunner, device: torch.device, phases: dict[str, float]) -> Callable[[], None]:
    """Wrap the parts of ``runner``'s model and optimiser in timers (instance attributes); return an undo.

    Both models have the same submodule names: ``feature_extractor``, ``feature_projection``, ``student``
    (SpidR reads it through ``get_intermediate_outputs``), ``teacher`` and ``codebooks.quantize``. The optimiser
    step is timed by its step hooks; gradient clipping by wrapping ``torch.nn.utils.clip_grad_norm_``, which
    both steps look up at call time. The forward's remainder (masking, heads, loss, perplexities) and the
    backward are what is left of the step.
    """
    model = runner.model
    undo: list[Callable[[], None]] = []

    def timed(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            phases[key] = phases.get(key, 0.0) + time.perf_counter() - start
            return out

        return wrapper

    def wrap(obj: Any, attr: str, key: str) -> None:
        original = getattr(obj, attr)
        setattr(obj, attr, timed(key, original))
        undo.append(lambda: delattr(obj, attr) if attr in vars(obj) else None)

    wrap(model.feature_extractor, "forward", "extractor")
    wrap(model.feature_projection, "forward", "projection")
    wrap(model.student, "get_intermediate_outputs", "student")
    wrap(model.student, "forward", "student")
    wrap(model.teacher, "get_intermediate_outputs", "teacher")
    wrap(model.codebooks, "quantize", "codebooks")
    wrap(model, "update_ema", "ema")
    clip = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = timed("clip", clip)
    undo.append(lambda: setattr(torch.nn.utils, "clip_grad_norm_", clip))
    start: list[float] = [0.0]

    def pre(*_: Any) -> None:
        sync(device)
        start[0] = time.perf_counter()

    def post(*_: Any) -> None:
        sync(device)
        phases["optimizer"] = phases.get("optimizer", 0.0) + time.perf_counter() - start[0]

    handles = [runner.optimizer.register_step_pre_hook(pre), runner.optimizer.register_step_post_hook(post)]
    undo += [h.remove for h in handles]

    trainer = runner.trainer
    if trainer is not None:  # Trainer.train_step calls trainer.forward (the model, or its compiled wrapper)
        original = trainer.forward
        trainer.forward = timed("forward", original)
        undo.append(lambda: setattr(trainer, "forward", original))
    else:  # the release's step calls model(...), i.e. its forward
        wrap(model, "forward", "forward")

    def restore() -> None:
        for fn in reversed(undo):
            fn()

    return restore


def profile(setup: Setup, rows: Sequence[str], steps: int, top_ops: int) -> str:
    """Per row, the median over ``steps`` steps (after a warm-up) of the time in each phase, as Markdown; with
    ``top_ops`` > 0, also torch.profiler's heaviest operators (self time) of one step per row.

    All rows' models are built first and their steps interleaved (one step of each row in turn), so a change
    in the machine's load affects every row alike.
    """
    names = [name for name in rows if name != "release" or setup.release is not None]
    runners = [build_runner(name, setup) for name in names]
    for runner in runners:
        runner.step()  # warm-up
    per_step: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for _ in range(steps):
        for runner in runners:
            phases: dict[str, float] = {}
            restore = _instrument(runner, setup.device, phases)
            try:
                sync(setup.device)
                start = time.perf_counter()
                runner.step()
                sync(setup.device)
                phases["step"] = time.perf_counter() - start
            finally:
                restore()
            inner = sum(phases.get(k, 0.0) for k in ("extractor", "projection", "student", "teacher", "codebooks"))
            phases["forward rest"] = phases.get("forward", 0.0) - inner
            outer = sum(phases.get(k, 0.0) for k in ("forward", "clip", "optimizer", "ema"))
            phases["backward + rest"] = phases["step"] - outer
            per_step[runner.name].append(phases)
    keys = [*PHASES[:5], "forward rest", "forward", "backward + rest", *PHASES[5:], "step"]
    table = {name: {k: statistics.median(p.get(k, 0.0) for p in per_step[name]) for k in keys} for name in names}
    op_tables: list[str] = []
    if top_ops > 0:
        sort = "self_cuda_time_total" if setup.device.type == "cuda" else "self_cpu_time_total"
        for runner in runners:
            with torch.profiler.profile(activities=_activities(setup.device)) as prof:
                runner.step()
            op_tables.append(
                f"#### `{runner.name}`: top {top_ops} operators by self time, one step\n\n```\n"
                + prof.key_averages().table(sort_by=sort, row_limit=top_ops)
                + "\n```\n"
            )
    runners.clear()
    _release_memory()
    lines = [f"### Where a step's time goes (median ms per phase over {steps} steps, rows interleaved)", ""]
    lines.append("| phase | " + " | ".join(f"`{n}`" for n in names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for key in keys:
        cells = [f"{table[n][key] * 1e3:.1f}" for n in names]
        label = f"**{key}**" if key in ("forward", "step") else key
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Forward = extractor + projection + student + teacher + codebooks + forward rest (masking, heads, loss, "
        "perplexities). `backward + rest` = step - forward - clip - optimizer - ema (the backward, zero_grad, "
        "scaler and scheduler). Each timer synchronises the device."
    )
    return "\n".join(lines) + "\n" + "\n".join(op_tables)


def _activities(device: torch.device) -> list[torch.profiler.ProfilerActivity]:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench_step.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the step runs (default cpu)")
    parser.add_argument(
        "--reference",
        metavar="PATH",
        help=f"the reference release: its wheel or a directory holding its spidr/ package (default ${REFERENCE_ENV}; "
        "without either the release row is skipped)",
    )
    parser.add_argument("--batch", type=int, help="utterances per batch (default 2)")
    parser.add_argument(
        "--utterance-samples", type=int, help="samples per utterance, 16 kHz (default 64000 = 4 s; 16000 with --quick)"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="autocast dtype (default: float32 on cpu, bf16 on cuda)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model as run.compile does (off)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row after a warm-up step (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 x 1 s: a smoke run of every code path")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, batch, masks and dropout (0)")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="time one row after the other (the default without --compile is interleaved: all rows' models in "
        "memory, their steps timed in turn, so no row pays the process's warm-up or a busy moment alone)",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the table as JSON to OUT")
    parser.add_argument(
        "--profile", action="store_true", help="instead of the table: time each phase of the step (eager only)"
    )
    parser.add_argument("--top-ops", type=int, default=0, help="with --profile: also torch.profiler's N heaviest ops")
    args = parser.parse_args(argv)
    if args.compile and not args.sequential:
        args.sequential = True  # compiled rows run one after the other
    print(machine_line())
    print()
    if args.profile:
        if args.compile:
            parser.error("--profile times the eager step; drop --compile")
        setup = prepare(
            quick=args.quick,
            device=args.device,
            reference=args.reference,
            compile_model=False,
            batch=args.batch,
            utterance_samples=args.utterance_samples,
            dtype=args.dtype,
            seed=args.seed,
            want_release="release" in args.rows,
        )
        for reason in setup.skipped:
            print(f"Skipped: {reason}\n")
        print(profile(setup, args.rows, max(1, args.repeats), args.top_ops))
        return
    suite = run_suite(
        repeats=args.repeats,
        quick=args.quick,
        device=args.device,
        reference=args.reference,
        compile_model=args.compile,
        batch=args.batch,
        utterance_samples=args.utterance_samples,
        dtype=args.dtype,
        seed=args.seed,
        rows=args.rows,
        interleave=not args.sequential,
    )
    print(suite.markdown())
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "suites": [suite.to_dict()]}, indent=2))


if __name__ == "__main__":
    main()
