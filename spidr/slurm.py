"""SLURM jobs through submitit: training (one task per GPU, requeued on pre-emption or time-out) and
one validation job per checkpoint.

A requeued training job runs the same command again, which resumes from the newest complete
checkpoint in the run directory (SIGTERM, sent by SLURM before it stops a job, also saves one).

The reference release's launcher is here too, with its names and arguments: :func:`launch_with_submitit`
(a batch of ``(function, args)`` jobs), :func:`slurm_config_parse_args`, :func:`default_train_job_config`,
:func:`validation_job_config`, :func:`make_checkpointable`. submitit is imported only when a job is submitted.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from spidr.config import Config, SlurmConfig
from spidr.tools.git import write_git_info_if_available

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
    results: str | None = None

    def __call__(self) -> str:
        from spidr.validate import main

        code = main([self.config, self.checkpoint, *(["--results", self.results] if self.results else [])])
        if code:
            raise RuntimeError(f"validation exited with status {code}")
        return self.checkpoint


_OPTIONAL_KEYS = ("cpus_per_task", "mem_per_gpu", "time", "constraint", "partition", "qos")


def executor_parameters(slurm: SlurmConfig, job_name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters: one task per GPU, nodes x GPUs tasks in all; keys beyond
    SlurmConfig's are passed to submitit as they are.

    ``nodes`` and ``gpus_per_node`` default to 1; without ``account`` the job goes to the account of the SLURM
    job this runs in (``$SLURM_JOB_ACCOUNT``), else to the user's default account.
    """
    gpus = int(slurm.get("gpus_per_node", 1))
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": int(slurm.get("nodes", 1)),
        "ntasks_per_node": gpus,
        "gpus_per_node": gpus,
    }
    account = slurm.get("account") or os.environ.get("SLURM_JOB_ACCOUNT")
    if account:
        params["account"] = account
    params.update({k: slurm[k] for k in _OPTIONAL_KEYS if slurm.get(k) is not None})  # type: ignore[literal-required]
    # Other submitit options (exclude, setup, ...) pass through as the release passes them; the config tables
    # of spidr.config only ever hold SlurmConfig's keys.
    known = {"account", "nodes", "gpus_per_node", *_OPTIONAL_KEYS}
    params.update({k: v for k, v in slurm.items() if k not in known})
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


def submit_validation(cfg: Config, config_json: Path, checkpoint: Path, *, results: Path | None = None) -> str | None:
    """From inside a SLURM training job: validate ``checkpoint`` in a job of its own (results appended to
    ``results``, by default ``validation.jsonl`` in the run directory)."""
    if not cfg.validation or cfg.run.slurm_validation is None:
        return None
    folder = Path(os.environ.get("SPIDR_SUBMITIT_FOLDER", Path(cfg.run.dir) / "submitit"))
    task = ValidateTask(str(config_json), str(checkpoint), None if results is None else str(results))
    return submit(task, cfg.run.slurm_validation, folder, f"{cfg.run.wandb_name}-val-{checkpoint.stem}")


# --------------------------------------------------------------------------------------------------------------------
# The reference release's launcher (spidr 0.2.0's names and arguments).

T = TypeVar("T")
P = ParamSpec("P")

_CLUSTERS: dict[str, dict[str, Any]] = {
    "JZ_V100": {"time": 1200, "cpus_per_task": 10, "mem_per_gpu": None, "constraint": None},
    "JZ_A100": {"time": 1200, "cpus_per_task": 8, "mem_per_gpu": None, "constraint": "a100"},
    "JZ_H100": {"time": 1200, "cpus_per_task": 24, "mem_per_gpu": None, "constraint": "h100"},
    "FAIR_AWS_A100": {"time": 4320, "cpus_per_task": 12, "mem_per_gpu": "80g", "constraint": None},
}


def default_train_job_config(cluster_name: str | None) -> dict[str, Any]:
    """Default SLURM options of a known cluster (``$SPIDR_CLUSTER``): ``{}`` for ``None``.

    Raises:
        ValueError: an unknown cluster name (the message lists the known ones).
    """
    if cluster_name is None:
        return {}
    if cluster_name not in _CLUSTERS:
        raise ValueError(f"Unknown cluster {cluster_name!r} (SPIDR_CLUSTER); known: {', '.join(_CLUSTERS)}")
    return dict(_CLUSTERS[cluster_name])


def validation_job_config() -> SlurmConfig:
    """Resources of a validation job launched from inside a SLURM job: one GPU for an hour, on the job's
    account and with its CPUs per task.

    Raises:
        ValueError: not inside a SLURM job (``SLURM_JOB_ACCOUNT`` or ``SLURM_CPUS_PER_TASK`` unset).
    """
    try:
        account, cpus = os.environ["SLURM_JOB_ACCOUNT"], os.environ["SLURM_CPUS_PER_TASK"]
    except KeyError as error:
        raise ValueError(f"validation_job_config() is for SLURM jobs only: ${error.args[0]} is not set") from None
    return SlurmConfig(account=account, nodes=1, gpus_per_node=1, time=60, cpus_per_task=int(cpus))


def slurm_config_parse_args(args: argparse.Namespace) -> SlurmConfig:
    """The :class:`~spidr.config.SlurmConfig` of parsed ``-A -N -G [-c --mem-per-gpu -t -C -p -q]`` options
    (options left unset are left out)."""
    config = SlurmConfig(account=args.account, nodes=args.nodes, gpus_per_node=args.gpus_per_node)
    for key in _OPTIONAL_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value  # type: ignore[literal-required]
    return config


def current_codebase_path() -> Path:
    """The directory that holds the ``spidr`` package (the repository root of an editable install)."""
    return Path(__file__).resolve().parent.parent


_NOT_COPIED = (
    ".git",
    "__pycache__",
    "*.pyc",
    "*.ipynb",
    "*.err",
    "*.out",
    "*.log",
    "*.pt",
    ".ruff_cache",
    ".mypy_cache",
)


def copy_code_to_submitit_folder(output_dir: Path) -> None:
    """Copy the code base (:func:`current_codebase_path`, without checkpoints, logs, caches or ``.git``) to
    ``output_dir``, so that a job runs the code as it was when it was submitted."""
    root = current_codebase_path()
    logger.info("Copying %s to %s", root, output_dir)
    shutil.copytree(root, output_dir, ignore=shutil.ignore_patterns(*_NOT_COPIED), dirs_exist_ok=True, symlinks=False)


def make_checkpointable(fn: Callable[P, T]) -> Callable[P, T]:
    """Give ``fn`` submitit's ``checkpoint`` hook: on pre-emption or time-out, the job is requeued with the
    same arguments (the training loop resumes from its newest checkpoint)."""
    import submitit

    def checkpoint(*args: P.args, **kwargs: P.kwargs) -> Any:
        return submitit.helpers.DelayedSubmission(fn, *args, **kwargs)

    try:
        fn.checkpoint = checkpoint  # type: ignore[attr-defined]
    except AttributeError:  # a builtin or another callable without attributes: wrap it
        wrapped = functools.wraps(fn)(lambda *args, **kwargs: fn(*args, **kwargs))
        wrapped.checkpoint = checkpoint  # type: ignore[attr-defined]
        return wrapped
    return fn


def launch_with_submitit(
    job_name: str,
    jobs: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]],
    dump: str | Path,
    slurm: SlurmConfig,
    *,
    copy_code: bool = False,
) -> bool:
    """Submit ``jobs`` (``(function, args)`` pairs) as one submitit batch with ``slurm``'s resources.

    The logs go to ``dump/job_name`` (``dump/job_name_<UTC time>`` when that exists), beside ``job-info.json``
    and the git state of the code; with ``copy_code`` the code base is copied there first and the jobs run from
    the copy. Every job is requeued on pre-emption or time-out. Returns False when SLURM refused the batch.
    """
    import submitit
    from submitit.core.utils import FailedJobError

    launch_time = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    folder = Path(dump) / job_name
    if folder.is_dir():
        folder = Path(dump) / f"{job_name}_{launch_time}"
    folder.mkdir(parents=True)
    write_git_info_if_available(folder)
    info = {"job_name": job_name, "launch_time": launch_time, **slurm}
    (folder / "job-info.json").write_text(json.dumps(info, indent=2))
    params = executor_parameters(slurm, job_name)
    with submitit.helpers.clean_env():
        previous = Path.cwd()
        if copy_code:
            copy_code_to_submitit_folder(folder / "code")
            os.chdir(folder / "code")  # the jobs import the copy
        try:
            executor = submitit.SlurmExecutor(folder=folder / "%j")
            executor.update_parameters(**params)
            with executor.batch():
                for fn, args in jobs:
                    executor.submit(make_checkpointable(fn), *args)
        except FailedJobError as error:
            logger.warning("SLURM refused %s: %s", job_name, error)
            return False
        finally:
            os.chdir(previous)
    logger.info("Submitted %s (%d jobs), logs in %s", job_name, len(jobs), folder)
    return True
