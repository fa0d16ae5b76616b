"""Validation of checkpoints: ``python -m spidr.validate CONFIG CHECKPOINT [--set ...]``.

For every ``validation.<name>`` table of the config: the mean masked-prediction loss per frame and
the mean target and prediction perplexities, in eval mode, appended as one JSON line per set to
``validation.jsonl`` in the run directory (``{"step", "group", "loss", "target_ppl", "pred_ppl"}``).
During training the trainer validates each checkpoint it saves; under SLURM each checkpoint is
validated by a job of its own that runs this module.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from spidr.config import Config, ConfigError, DataConfig, ResumeConfig, read_config
from spidr.data import build_dataloader
from spidr.environment import set_seed, setup_environment, setup_pytorch
from spidr.models import DinoSR, build_model
from spidr.tools import init_logger

__all__ = [  # the reference release's names (its imports included) and ours
    "Config",
    "DinoSR",
    "ResumeConfig",
    "build_dataloader",
    "build_model",
    "init_logger",
    "main",
    "set_seed",
    "setup_environment",
    "setup_pytorch",
    "validate",
    "validate_all",
    "validate_existing_checkpoint",
    "validate_set",
]

logger = logging.getLogger("spidr.validate")


@torch.no_grad()
def validate(model: DinoSR, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """The reference release's validation of one loader of ``(waveforms, attention_mask, mask_indices)``
    batches (:func:`spidr.data.build_dataloader`): the mean over batches of each batch's mean loss per masked
    frame, target perplexity and prediction perplexity, in eval mode.

    Raises:
        ValueError: the loader gave no batch.
    """
    model.eval()
    loss, target_ppl, pred_ppl, batches = 0.0, 0.0, 0.0, 0
    for waveforms, attention_mask, mask_indices in loader:
        out, ppl = model(
            waveforms.to(device),
            mask_indices=None if mask_indices is None else mask_indices.to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
        )
        loss += float(out.mean())
        target_ppl += float(ppl["target_ppl"])
        pred_ppl += float(ppl["pred_ppl"])
        batches += 1
    if batches == 0:
        raise ValueError("the validation loader gave no batch")
    return {"loss": loss / batches, "target_ppl": target_ppl / batches, "pred_ppl": pred_ppl / batches}


def validate_existing_checkpoint(cfg: Config, resume: ResumeConfig) -> None:
    """Validate ``resume.checkpoint`` on every validation set of ``cfg`` as the reference release does (its
    loaders and per-batch means, :func:`validate`), appending ``{"step", "group", "loss", "target_ppl",
    "pred_ppl"}`` lines to ``resume.results``; on CUDA when available."""
    if resume.checkpoint is None:
        logger.error("No checkpoint to validate at step %d", resume.step)
        return
    set_seed(cfg.run.random_seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(model_type=cfg.run.model_type, checkpoint=resume.checkpoint).eval().to(device)
    for name, data_cfg in cfg.validation.items():
        loader = build_dataloader(data_cfg, cfg.masking, conv_layer_config=cfg.model.extractor_conv_layer_config)
        record = {"step": resume.step, "group": name, **validate(model, loader, device)}
        logger.info("Validation %s at step %d: loss %.4f", name, resume.step, record["loss"])
        with Path(resume.results).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


@torch.no_grad()
def validate_set(model: DinoSR, cfg: Config, data_cfg: DataConfig, device: torch.device) -> dict[str, float]:
    """Mean loss per masked frame, and mean perplexities over the batches, of one validation set (the
    validation of ``python -m spidr.train`` and ``python -m spidr.validate``)."""
    from spidr.data.loader import TrainingData

    data = TrainingData(data_cfg, cfg.masking, cfg.model)
    was_training = model.training
    model.eval()
    loss_sum, frames, target_ppl, pred_ppl, batches = 0.0, 0, 0.0, 0.0, 0
    try:
        data.set_epoch(0)
        for batch in data.batches():
            attention_mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
            loss, ppl = model(
                batch.waveforms.to(device), mask_indices=batch.mask_indices.to(device), attention_mask=attention_mask
            )
            loss_sum += float(loss.sum())
            frames += loss.numel()
            target_ppl += float(ppl["target_ppl"])
            pred_ppl += float(ppl["pred_ppl"])
            batches += 1
    finally:
        model.train(was_training)
    if batches == 0:
        raise ValueError(f"validation manifest {data_cfg.manifest} gave no batch")
    return {"loss": loss_sum / max(frames, 1), "target_ppl": target_ppl / batches, "pred_ppl": pred_ppl / batches}


def validate_all(model: DinoSR, cfg: Config, step: int, results: Path, device: torch.device) -> list[dict]:
    """Validate on every validation set of ``cfg`` and append the results to ``results`` (JSONL)."""
    records = []
    for name, data_cfg in cfg.validation.items():
        record = {"step": step, "group": name, **validate_set(model, cfg, data_cfg, device)}
        logger.info("Validation %s at step %d: loss %.4f", name, step, record["loss"])
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spidr.validate",
        description="Validate a training checkpoint on the config's validation sets.",
        epilog="Example: python -m spidr.validate configs/demo.toml runs/demo/spidr_demo/step_20.pt",
    )
    parser.add_argument("config", type=Path, help="the training config (.toml or .json)")
    parser.add_argument("checkpoint", type=Path, help="a checkpoint of that run (step_N.pt or final.pt)")
    parser.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE", help="config override")
    parser.add_argument("--results", type=Path, help="JSONL to append to (default: validation.jsonl in the run dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = read_config(args.config, args.set)
        if not cfg.validation:
            raise ConfigError(f"{args.config} has no [validation.<name>] table")
        model = build_model(checkpoint=args.checkpoint, model_type=cfg.run.model_type).to(args.device)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    step = int(model.current_step.item())
    results = args.results or Path(cfg.run.dir) / "validation.jsonl"
    validate_all(model, cfg, step, results, torch.device(args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
