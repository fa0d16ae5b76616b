"""SLURM jobs through submitit: training (one task per GPU, requeued on pre-emption or time-out) and
one validation job per checkpoint.

A requeued training job runs the same command again, which resumes from the newest complete
checkpoint in the run directory (SIGTERM, sent by SLURM before it stops a job, also saves one).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spidr.config import Config, SlurmConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainTask:
    """The callable a training job runs: ``python -m spidr.train CONFIG --set ...`` in every task."""

    config: str
    overrides: tuple[str, ...] = ()

    def __call__(self) -> str:
        import submitit

        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        logger.info("Task %d of %d on %s", dist_env.rank, dist_env.world_size, dist_env.master_addr)
        from spidr.train import main

        args = [self.config, *(a for o in self.overrides for a in ("--set", o))]
        code = main(args)
        if code:
            raise RuntimeError(f"training exited with status {code}")
        return self.config

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on pre-emption or time-out: requeue the same task (it resumes)."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainTask(self.config, self.overrides))


@dataclass(frozen=True)
class ValidateTask:
    """The callable a validation job runs: ``python -m spidr.validate CONFIG CHECKPOINT``."""

    config: str
    checkpoint: str

    def __call__(self) -> str:
        from spidr.validate import main

        code = main([self.config, self.checkpoint])
        if code:
            raise RuntimeError(f"validation exited with status {code}")
        return self.checkpoint


def executor_parameters(slurm: SlurmConfig, job_name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters: one task per GPU, nodes x GPUs tasks in all."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "account": slurm.account,
        "nodes": slurm.nodes,
        "ntasks_per_node": slurm.gpus_per_node,
        "gpus_per_node": slurm.gpus_per_node,
    }
    optional = {
        "cpus_per_task": slurm.cpus_per_task,
        "mem_per_gpu": slurm.mem_per_gpu,
        "time": slurm.time,
        "constraint": slurm.constraint,
        "partition": slurm.partition,
        "qos": slurm.qos,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def submit(task: Any, slurm: SlurmConfig, folder: Path, job_name: str, *, dry_run: bool = False) -> str:
    """Submit ``task`` with ``slurm``'s resources; with ``dry_run`` only describe it. Returns the job id."""
    params = executor_parameters(slurm, job_name)
    if dry_run:
        print(f"would submit {task!r}")
        print(f"  folder: {folder}")
        for key, value in params.items():
            print(f"  --{key.replace('_', '-')}={value}")
        return "dry-run"
    import submitit

    executor = submitit.SlurmExecutor(folder=folder / "%j")
    executor.update_parameters(**params)
    job = executor.submit(task)
    logger.info("Submitted %s as job %s (logs in %s)", job_name, job.job_id, folder)
    return str(job.job_id)


def submit_validation(cfg: Config, config_json: Path, checkpoint: Path) -> str | None:
    """From inside a SLURM training job: validate ``checkpoint`` in a job of its own."""
    if not cfg.validation or cfg.run.slurm_validation is None:
        return None
    folder = Path(os.environ.get("SPIDR_SUBMITIT_FOLDER", Path(cfg.run.dir) / "submitit"))
    task = ValidateTask(str(config_json), str(checkpoint))
    return submit(task, cfg.run.slurm_validation, folder, f"{cfg.run.wandb_name}-val-{checkpoint.stem}")
