"""Submit training runs to SLURM: ``python -m spidr CONFIG... -A ACCOUNT -N NODES -G GPUS_PER_NODE``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from spidr.config import ConfigError, read_config
from spidr.slurm import TrainTask, default_train_job_config, launch_with_submitit, slurm_config_parse_args, submit
from spidr.tools import init_logger
from spidr.train import train

__all__ = [  # the reference release's names (its imports) and ours
    "default_train_job_config",
    "init_logger",
    "launch_with_submitit",
    "main",
    "read_config",
    "slurm_config_parse_args",
    "train",
]


def main(argv: list[str] | None = None) -> int:
    try:  # a known cluster's defaults for the options below, as in the reference release
        cluster = default_train_job_config(os.environ.get("SPIDR_CLUSTER"))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="python -m spidr",
        description="Submit one SLURM training job per config through submitit: NODES x GPUS_PER_NODE tasks, "
        "one per GPU, requeued on pre-emption or time-out and resumed from the newest checkpoint. "
        "Each checkpoint is validated in a job of its own when run.slurm_validation is set.",
        epilog="Example: python -m spidr configs/base_spidr.toml -A myaccount -N 4 -G 4 -t 1200 --dump ~/submitit\n"
        "Check first: add --dry-run to print what would be submitted.\n"
        "SPIDR_CLUSTER=JZ_V100|JZ_A100|JZ_H100|FAIR_AWS_A100 sets that cluster's defaults for -c, --mem-per-gpu, -t "
        "and -C.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("configs", type=Path, nargs="+", help="training config(s), .toml or .json")
    parser.add_argument("-A", "--account", required=True, help="SLURM account")
    parser.add_argument("-N", "--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("-G", "--gpus-per-node", type=int, required=True, help="GPUs (= tasks) per node")
    parser.add_argument("-c", "--cpus-per-task", type=int, default=cluster.get("cpus_per_task"), help="CPUs per task")
    parser.add_argument("--mem-per-gpu", default=cluster.get("mem_per_gpu"), help="memory per GPU, e.g. 80G")
    parser.add_argument("-t", "--time", type=int, default=cluster.get("time"), help="time limit in minutes")
    parser.add_argument("-C", "--constraint", default=cluster.get("constraint"), help="SLURM constraint, e.g. a100")
    parser.add_argument("-p", "--partition", default=cluster.get("partition"), help="SLURM partition")
    parser.add_argument("-q", "--qos", default=cluster.get("qos"), help="SLURM QoS")
    parser.add_argument(
        "--dump",
        type=Path,
        default=os.environ.get("SPIDR_SUBMITIT_FOLDER"),
        help="submitit folder for job logs (default: $SPIDR_SUBMITIT_FOLDER, else <run dir>/submitit)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE", help="config override")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs instead of submitting them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    slurm = slurm_config_parse_args(args)
    try:  # every config is checked before anything is submitted
        configs = [(path, read_config(path, args.set)) for path in args.configs]
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path, cfg in configs:
        folder = args.dump / cfg.run.wandb_name if args.dump else Path(cfg.run.dir) / "submitit"
        task = TrainTask(str(path.resolve()), tuple(args.set))
        submit(task, slurm, folder, cfg.run.wandb_name, dry_run=args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
