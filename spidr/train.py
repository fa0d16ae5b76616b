"""Pretraining: ``python -m spidr.train CONFIG [--set table.key=value ...]``.

One process per device: on its own it trains on the CPU or one GPU; under ``torchrun`` it trains with
DistributedDataParallel (nccl on CUDA, gloo on the CPU). The run lives in ``run.workdir/
wandb_project/wandb_name``: ``config.json``, ``step_N.pt`` checkpoints, ``final.pt``, ``log.jsonl``.
Running the same command again resumes from the newest complete checkpoint, mid-epoch, exactly.
SIGTERM or SIGUSR1 saves a checkpoint and exits cleanly.

Exit codes: 0 done (or stopped by a signal after saving); 1 training could not go on (too many bad
files or non-finite steps, a checkpoint that could not be written); 2 bad input refused before
training started (config, manifest, checkpoint). Errors are one line on stderr (``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from spidr import optim
from spidr.checkpoint import (
    Checkpointer,
    CheckpointSaveError,
    newest_loadable,
    prune,
    remove_param_group,
    remove_temporaries,
    save_atomic,
)
from spidr.config import Config, ConfigError, ResumeConfig, config_to_dict, read_config
from spidr.data import build_dataloader
from spidr.environment import Env, rng_state, set_rng_state, set_seed, setup_distributed, setup_training
from spidr.models import CheckpointError, DinoSR, build_model
from spidr.models.pretrained import load_state_dict_checked
from spidr.optim import drop_frozen_group, load_scheduler_state
from spidr.optimizer import build_optimizer
from spidr.slurm import launch_with_submitit, validation_job_config
from spidr.tools import AverageMeters, profiler_context
from spidr.validate import validate_existing_checkpoint

__all__ = [  # the reference release's names (its imports included) and ours
    "AverageMeters",
    "Checkpointer",
    "Config",
    "Env",
    "ResumeConfig",
    "Trainer",
    "TrainingError",
    "build_dataloader",
    "build_model",
    "build_optimizer",
    "init_wandb",
    "launch_validation",
    "launch_with_submitit",
    "main",
    "profiler_context",
    "read_config",
    "remove_param_group",
    "setup_training",
    "train",
    "validate_existing_checkpoint",
    "validation_job_config",
]

logger = logging.getLogger("spidr.train")

EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 1

# What a training checkpoint holds (see Trainer.state); the reference release's lack "data" and "rng".
TRAINING_STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "data", "rng")
RESUMABLE_KEYS = ("model", "optimizer", "scheduler", "step", "epoch")


class TrainingError(RuntimeError):
    """Training cannot go on (too many bad files or non-finite steps); the message says why."""


# --------------------------------------------------------------------------- stopping on signals
class StopFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM pre-emption and time limits): the loop saves and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal = signum


# --------------------------------------------------------------------------- the loop
def unwrap(model: nn.Module) -> DinoSR:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model  # type: ignore[return-value]


def all_reduce_sum(values: list[float], env: Env) -> list[float]:
    if env.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


class Trainer:
    """Holds the state of one training process; :meth:`run` trains to ``optimizer.max_steps``."""

    def __init__(self, cfg: Config, env: Env) -> None:
        from spidr.data.loader import TrainingData  # data dependencies (polars, torchcodec) only when training
        from spidr.data.manifests import read_entries

        self.cfg, self.env = cfg, env
        self.dir = Path(cfg.run.dir)
        set_seed(cfg.run.random_seed)
        if cfg.run.use_deterministic:
            torch.use_deterministic_algorithms(True)
        model = build_model(cfg=cfg.model)
        if cfg.run.init_ckpt:
            init = build_model(checkpoint=cfg.run.init_ckpt, model_type=cfg.run.model_type)
            model.load_state_dict(init.state_dict())
        self.model = model.to(env.device).train()
        self.optimizer, self.scheduler = optim.build_optimizer(self.model, cfg.optimizer)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.optimizer.dtype == "float16")
        self.data = TrainingData(
            cfg.data,
            cfg.masking,
            cfg.model,
            rank=env.rank,
            world_size=env.world_size,
            max_bad_fraction=cfg.run.max_bad_fraction,
        )
        for table in cfg.validation.values():  # a bad validation manifest is refused now, not at the first save
            read_entries(table.manifest)
        self.step, self.epoch = 0, 0
        self.nonfinite_in_a_row = 0
        self.counters = {"skipped_steps": 0}
        self.forward = self.model
        self.stop = StopFlag()
        self.log_path = self.dir / "log.jsonl"
        self.wandb: Any = None

    # ----------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "data": self.data.state_dict(),
            "rng": rng_state(),
            "counters": dict(self.counters),
            "model_type": self.cfg.run.model_type,
        }

    def save(self, name: str, *, validate: bool = True) -> None:
        if self.env.is_main:
            save_atomic(self.state(), self.dir / name)
            prune(self.dir, self.cfg.run.keep_latest, keep=self.dir / name)
            logger.info("Saved %s at step %d", self.dir / name, self.step)
            if validate and self.cfg.validation:
                self.validate(self.dir / name)
        if self.env.world_size > 1:
            dist.barrier()

    def validate(self, checkpoint: Path) -> None:
        """Validate a saved checkpoint: in a SLURM job of its own when running under SLURM with
        ``run.slurm_validation`` set, here otherwise (with the model in memory)."""
        if validates_in_slurm(self.cfg):
            launch_validation(self.cfg, ResumeConfig(self.step, checkpoint, self.dir / "validation.jsonl"))
            return
        from spidr.validate import validate_all

        validate_all(unwrap(self.model), self.cfg, self.step, self.dir / "validation.jsonl", self.env.device)

    def resume(self) -> bool:
        """Load the newest complete checkpoint of the run directory, if any.

        The temporary files of saves that were interrupted (SIGKILL, a node failure) are removed first.

        Raises:
            CheckpointError: the newest checkpoint is unreadable or cannot be loaded safely (the message names the
                one a restart falls back to once it is moved away), is not a training checkpoint, or does not fit
                this config (another model type or size: the first mismatches are listed). Nothing is changed.
        """
        if self.env.is_main:
            for path in remove_temporaries(self.dir):
                logger.warning("Removed %s, left by a save that was interrupted", path)
        found = newest_loadable(self.dir)
        if found is None:
            return False
        path, state = found
        if not isinstance(state, dict) or any(key not in state for key in RESUMABLE_KEYS):
            present = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(
                f"{path} is not a training checkpoint of spidr.train or of the reference release (expected the "
                f"entries {', '.join(RESUMABLE_KEYS)}; found {present}); move it out of {self.dir} to start afresh"
            )
        stated = state.get("model_type", self.cfg.run.model_type)
        if stated != self.cfg.run.model_type:
            raise CheckpointError(
                f"{path} holds a {stated!r} model, but run.model_type = {self.cfg.run.model_type!r}; use another "
                "run.wandb_name for a new run"
            )
        model = unwrap(self.model)
        weights = dict(state["model"])
        consume_prefix_in_state_dict_if_present(weights, "module.")
        load_state_dict_checked(model, weights, str(path))
        # The release saves step and epoch as (1,) tensors, and its epochs count from 1: the one in progress.
        self.step = int(torch.as_tensor(state["step"]).reshape(-1)[0])
        self.epoch = int(torch.as_tensor(state["epoch"]).reshape(-1)[0])
        if self.step >= model.cfg.freeze_step:
            model.freeze_extractor()
            drop_frozen_group(self.optimizer, self.scheduler)
        self.optimizer.load_state_dict(state["optimizer"])
        load_scheduler_state(self.scheduler, state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.counters.update(state.get("counters", {}))
        if "data" in state and "rng" in state:
            self.data.load_state_dict(state["data"])
            set_rng_state(state["rng"])
        else:  # the release's checkpoint: as the release itself does, resume with the next epoch
            self.data.load_state_dict({"epoch": self.epoch, "position": 0})
            logger.warning(
                "%s holds no data position or random generator states (a checkpoint of the reference release): "
                "the model, optimizer, scheduler and step resume exactly; the data stream starts afresh at epoch %d "
                "and the random generators are seeded anew",
                path,
                self.epoch,
            )
        logger.info("Resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)
        return True

    # ----------------------------------------------------------------- one step
    def train_step(self, batch: Any) -> dict[str, float] | None:
        cfg, env = self.cfg, self.env
        model = unwrap(self.model)
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.optimizer.dtype]
        # The forward pass updates the codebooks (SPEC 1.5): keep them to undo that on a non-finite step.
        codebooks = [buffer.detach().clone() for buffer in model.codebooks.buffers()]
        waveforms = batch.waveforms.to(env.device, non_blocking=True)
        attention_mask = None if batch.attention_mask is None else batch.attention_mask.to(env.device)
        mask_indices = batch.mask_indices.to(env.device)
        with torch.autocast(env.device.type, dtype=dtype, enabled=cfg.optimizer.mixed_precision):
            loss, ppl = self.forward(waveforms, mask_indices=mask_indices, attention_mask=attention_mask)
        local_frames = float(loss.numel())
        (total_frames,) = all_reduce_sum([local_frames], env)
        scaled = loss.sum() * env.world_size / max(total_frames, 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(scaled).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.max_norm)
        loss_finite = bool(torch.isfinite(scaled.detach()))
        finite = bool(torch.isfinite(grad_norm)) and loss_finite
        if env.world_size > 1:  # every rank takes the same decision
            finite_all, loss_finite_all = all_reduce_sum([float(finite), float(loss_finite)], env)
            finite, loss_finite = finite_all == env.world_size, loss_finite_all == env.world_size
        if not finite:
            # Nothing moves: no optimiser, scheduler or EMA update, and the codebooks are restored.
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in zip(model.codebooks.buffers(), codebooks, strict=True):
                    buffer.copy_(saved)
            if self.scaler.is_enabled():
                # float16 only. A non-finite loss leaves the scale as it was (update() with the same scale only
                # ends this step for the scaler, as the next unscale_() needs). A finite loss whose scaled
                # gradients overflowed is the scaler's own signal: it lowers its scale, as GradScaler does.
                self.scaler.update(None if loss_finite else self.scaler.get_scale())
            self.nonfinite_in_a_row += 1
            self.counters["skipped_steps"] += 1
            logger.warning("Non-finite loss or gradient at step %d: step skipped", self.step + 1)
            if self.nonfinite_in_a_row >= cfg.run.max_nonfinite_steps:
                raise TrainingError(
                    f"{self.nonfinite_in_a_row} consecutive steps with a non-finite loss or gradient "
                    f"(run.max_nonfinite_steps = {cfg.run.max_nonfinite_steps}); last good checkpoint in {self.dir}"
                )
            return None
        self.nonfinite_in_a_row = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        decay = model.update_ema(self.step)
        if self.step == model.cfg.freeze_step:
            drop_frozen_group(self.optimizer, self.scheduler)
        loss_sum, target_ppl, pred_ppl = all_reduce_sum(
            [float(loss.detach().sum()), float(ppl["target_ppl"]), float(ppl["pred_ppl"])], env
        )
        return {
            "loss": loss_sum / max(total_frames, 1.0),
            "grad_norm": float(grad_norm),
            "batch_size": float(waveforms.shape[0]),
            "target_ppl": target_ppl / env.world_size,
            "pred_ppl": pred_ppl / env.world_size,
            "lr": self.scheduler.get_last_lr()[0],
            "ema_decay": decay,
        }

    def log(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb is not None:
                self.wandb.log(record, step=record["step"])

    def _init_wandb(self) -> Any:
        """wandb's run when it is installed (rank 0 only; a no-op run with run.wandb_mode = "disabled")."""
        if not self.env.is_main:
            return None
        return init_wandb(self.cfg)

    def _log_skipped_step(self) -> None:
        self.log(
            {
                "step": self.step,
                "epoch": self.epoch,
                "event": "nonfinite_step_skipped",
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                **self.counters,
            }
        )

    def _train(self, progress: Any) -> bool:
        """Train up to ``optimizer.max_steps``; True when stopped early by a signal."""
        cfg, max_steps = self.cfg, self.cfg.optimizer.max_steps
        start = time.perf_counter()
        while self.step < max_steps:
            self.data.set_epoch(self.epoch)
            started_at, yielded = self.data.position, False
            for batch in self.data.batches():
                yielded = True
                try:
                    metrics = self.train_step(batch)
                except TrainingError:  # too many non-finite steps: the state is still the last good one, keep it
                    self._log_skipped_step()
                    self.save(f"step_{self.step}.pt", validate=False)
                    raise
                if metrics is None:
                    self._log_skipped_step()
                else:
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics['loss']:.3f}")
                    if self.step % cfg.run.log_interval == 0 or self.step == 1:
                        self.log(
                            {
                                "step": self.step,
                                "epoch": self.epoch,
                                **metrics,
                                **self.counters,
                                "bad_files": self.data.bad_files,
                                "elapsed_s": time.perf_counter() - start,
                            }
                        )
                    if cfg.run.save_interval > 0 and self.step % cfg.run.save_interval == 0 and self.step < max_steps:
                        self.save(f"step_{self.step}.pt")
                if self.stop.signal is not None:
                    return True
                if self.step >= max_steps:
                    break
            else:
                if not yielded and started_at == 0:
                    raise TrainingError(
                        f"epoch {self.epoch} gave no usable batch: {self.data.bad_files} of the "
                        f"{self.data.files_read} audio files read were bad (see the warnings above), or no file of "
                        f"{cfg.data.manifest} has at least data.min_sample_size samples"
                    )
                self.epoch += 1
                if self.stop.signal is not None:
                    return True
        return False

    def _save_for_signal(self) -> Path:
        logger.warning("Received signal %d: saving and exiting", self.stop.signal)
        self.save(f"step_{self.step}.pt", validate=False)
        return self.dir / f"step_{self.step}.pt"

    # ----------------------------------------------------------------- the run
    def run(self) -> Path:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.resume()  # before config.json is replaced: a checkpoint that does not fit keeps the config it came with
        if env.is_main:
            write_config_json(cfg)
        self.wandb = self._init_wandb()
        if env.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                find_unused_parameters=cfg.model.encoder_layer_drop > 0,
            )
        self.forward = torch.compile(self.model) if cfg.run.compile else self.model
        max_steps = cfg.optimizer.max_steps
        if self.step >= max_steps:
            logger.info("Already at step %d >= optimizer.max_steps = %d: nothing to do", self.step, max_steps)
            return self.dir / "final.pt"
        progress = _progress(total=max_steps, initial=self.step, disable=not env.is_main)
        try:  # the progress bar ends its line before any error is printed
            stopped = self._train(progress)
        finally:
            progress.close()
        if stopped:
            return self._save_for_signal()
        self.save("final.pt")
        if self.wandb is not None:
            self.wandb.finish()
        return self.dir / "final.pt"


def write_config_json(cfg: Config) -> Path:
    """Write ``config.json`` (the whole config) into the run directory, which it creates; returns its path."""
    cfg.run.dir.mkdir(parents=True, exist_ok=True)
    path = cfg.run.dir / "config.json"
    path.write_text(json.dumps(config_to_dict(cfg), indent=2))
    return path


def init_wandb(cfg: Config) -> Any:
    """Start wandb's run for ``cfg`` (the reference release's ``init_wandb``): ``config.json`` written into the run
    directory, then ``wandb.init`` with the run's project, name and mode (``offline`` by default), resumed when
    it exists, and the ``train/*`` and ``<validation set>/*`` metrics each on their own step.

    The run's id is derived from ``run.wandb_name`` (characters wandb refuses in an id replaced, a hash of the
    name added then), so that a resumed training run logs into the same wandb run. In ``disabled`` mode
    ``wandb.init`` is still called, so that ``wandb.log`` elsewhere is a no-op rather than an error.

    Returns:
        wandb's run, or None when wandb is not installed (logged).
    """
    write_config_json(cfg)
    try:
        import wandb
    except ImportError:
        logger.info("wandb is not installed: metrics go to %s only", cfg.run.dir / "log.jsonl")
        return None
    run = wandb.init(
        project=cfg.run.wandb_project,
        name=cfg.run.wandb_name,
        mode=cfg.run.wandb_mode,
        dir=str(Path(cfg.run.workdir).resolve()),
        config=config_to_dict(cfg),
        resume="allow",
        id=wandb_run_id(cfg.run.wandb_name),
    )
    wandb.define_metric("train/step")
    wandb.define_metric("train/*", step_metric="train/step")
    for name in cfg.validation:
        wandb.define_metric(f"{name}/step")
        wandb.define_metric(f"{name}/*", step_metric=f"{name}/step")
    return run


def wandb_run_id(name: str) -> str:
    """A wandb run id for the run named ``name``: the name itself when wandb accepts it as an id, else the name
    with the characters wandb refuses (``:;,#?/'``, spaces) replaced by ``-`` and 8 hex digits of its hash."""
    cleaned = re.sub(r"[:;,#?/'\s]", "-", name)
    if cleaned == name:
        return name
    return f"{cleaned}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def validates_in_slurm(cfg: Config) -> bool:
    """Whether checkpoints are validated by SLURM jobs of their own: inside a SLURM job with
    ``run.slurm_validation`` set."""
    return bool(os.environ.get("SLURM_JOB_ID")) and cfg.run.slurm_validation is not None


def launch_validation(cfg: Config, resume: ResumeConfig) -> None:
    """Validate ``resume.checkpoint`` on every validation set of ``cfg`` (the reference release's function): in
    a SLURM job of its own when :func:`validates_in_slurm`, here otherwise; results are appended to
    ``resume.results``. Nothing to do without validation sets or checkpoint."""
    if not cfg.validation:
        return
    if resume.checkpoint is None:
        logger.info("No checkpoint: no validation at step %d", resume.step)
        return
    if validates_in_slurm(cfg):
        from spidr.slurm import submit_validation

        submit_validation(cfg, cfg.run.dir / "config.json", Path(resume.checkpoint), results=Path(resume.results))
        return
    from spidr.validate import validate_existing_checkpoint

    validate_existing_checkpoint(cfg, resume)


def train(cfg: Config) -> Path:
    """Train with ``cfg`` in this process (the reference release's ``train``): on the CPU, one GPU, or as one
    rank of torchrun or a SLURM step; resumes from the run directory's newest checkpoint. Returns the path of
    the final (or, when stopped by a signal, the last) checkpoint.

    Raises:
        TrainingError: training could not go on (too many bad files or non-finite steps).
        spidr.models.CheckpointError: the run directory's newest checkpoint cannot be resumed.
    """
    env = setup_distributed("auto", init_single_process=False)
    try:
        return Trainer(cfg, env).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _progress(total: int, initial: int, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spidr.train",
        description="Pretrain SpidR or DinoSR from a TOML/JSON config, on the CPU, one GPU or under torchrun.",
        epilog="Example: python -m spidr.train configs/demo.toml --set optimizer.max_steps=20\n"
        "Several GPUs: torchrun --nproc-per-node 4 -m spidr.train configs/base_spidr.toml\n"
        "Re-running the same command resumes from the newest checkpoint in the run directory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", type=Path, help="training config (.toml or .json)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="override a config value, typed by its field (repeatable), e.g. --set optimizer.lr=1e-4",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    args = parser.parse_args(argv)
    env = setup_distributed(args.device, init_single_process=False)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.INFO if env.is_main else logging.WARNING),
        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s",
    )
    from spidr.data.manifests import ManifestError  # polars is imported only when a manifest is read

    try:
        cfg = read_config(args.config, args.set)
        final = Trainer(cfg, env).run()
        logger.info("Done: %s", final)
        return 0
    except (TrainingError, CheckpointSaveError) as error:  # training started and cannot go on
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    except (ConfigError, FileNotFoundError, ManifestError, CheckpointError) as error:  # refused input
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    # Run main of the importable spidr.train, not of this __main__ copy: the errors that spidr.data.loader
    # raises are spidr.train's classes, which only that main catches.
    from spidr.train import main as _main

    sys.exit(_main())
