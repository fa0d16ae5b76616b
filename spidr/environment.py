"""Process setup of training and validation jobs: distributed environment, seeds, PyTorch settings, caches.

The reference release's names and arguments (``DistributedEnvironment``, ``distributed_environment``,
``setup_distributed``, ``setup_environment``, ``setup_pytorch``, ``setup_training``, ``set_seed``,
``keep_conv_backward_dynamic``, ``init_logger``), which ``python -m spidr.train`` uses too, plus the random
generator states that our checkpoints carry (:func:`rng_state`, :func:`set_rng_state`).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed as dist

from spidr.tools.logger import init_logger

__all__ = [
    "DistributedEnvironment",
    "Env",
    "distributed_environment",
    "init_logger",
    "keep_conv_backward_dynamic",
    "read_distributed_environment",
    "rng_state",
    "set_rng_state",
    "set_seed",
    "setup_distributed",
    "setup_environment",
    "setup_pytorch",
    "setup_training",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedEnvironment:
    """Where this process sits among the processes of a job."""

    global_rank: int
    local_rank: int
    world_size: int
    master_port: int
    master_addr: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``scontrol show hostnames`` when available)."""
    if shutil.which("scontrol"):
        hosts = subprocess.check_output(["scontrol", "show", "hostnames", nodelist], text=True).split()
        if hosts:
            return hosts[0]
    first = nodelist.split(",")[0]
    if "[" not in first:
        return first
    prefix, ranges = first.split("[", 1)
    start = ranges.rstrip("]").split(",")[0].split("-")[0]
    return f"{prefix}{start}"


def distributed_environment() -> DistributedEnvironment:
    """The process's rank, local rank and world size, and the rendezvous address, from torchrun's variables
    (``LOCAL_RANK`` set), else from SLURM's in a job step (``SLURM_JOB_ID`` and ``SLURM_PROCID`` set: the master
    is the first node, its port drawn from the job id), else a single process on a free local port. The result
    is exported as ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (what
    ``torch.distributed.init_process_group`` reads).

    Raises:
        ValueError: a variable of the launcher is missing or not an integer (named).
    """
    return _export(read_distributed_environment())


def _export(env: DistributedEnvironment) -> DistributedEnvironment:
    os.environ.update(
        RANK=str(env.global_rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.world_size),
        MASTER_PORT=str(env.master_port),
        MASTER_ADDR=env.master_addr,
    )
    return env


def read_distributed_environment() -> DistributedEnvironment:
    """:func:`distributed_environment` without exporting anything (the environment is left as it is)."""
    environ = os.environ
    try:
        if environ.get("LOCAL_RANK") is not None:  # torchrun
            env = DistributedEnvironment(
                global_rank=int(environ.get("RANK", environ["LOCAL_RANK"])),
                local_rank=int(environ["LOCAL_RANK"]),
                world_size=int(environ.get("WORLD_SIZE", "1")),
                master_port=int(environ.get("MASTER_PORT") or _free_port()),
                master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            )
        elif environ.get("SLURM_JOB_ID") is not None and environ.get("SLURM_PROCID") is not None:  # a SLURM step
            env = DistributedEnvironment(
                global_rank=int(environ["SLURM_PROCID"]),
                local_rank=int(environ.get("SLURM_LOCALID", "0")),
                world_size=int(environ.get("SLURM_NTASKS", "1")),
                master_port=random.Random(int(environ["SLURM_JOB_ID"])).randint(20_000, 60_000),
                master_addr=_first_slurm_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            )
        else:
            env = DistributedEnvironment(0, 0, 1, _free_port(), "127.0.0.1")
    except KeyError as error:
        raise ValueError(f"the launcher's variable {error.args[0]} is not set") from None
    except ValueError as error:
        raise ValueError(f"a launcher variable is not an integer: {error}") from None
    return env


@dataclass
class Env:
    """This process's place and device, as the trainer uses them."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", *, init_single_process: bool = True) -> Env:
    """Read the distributed environment (:func:`distributed_environment`), pick this process's device and
    initialise the default process group: nccl on CUDA, gloo on the CPU.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``; on CUDA the device is
            ``cuda:LOCAL_RANK``, made the current one.
        init_single_process: initialise a process group even for a single process (the reference release
            does, so that ``dist.get_rank()`` works everywhere); ``python -m spidr.train`` does not.

    Raises:
        ValueError: an unknown ``device``, or ``"cuda"`` without a GPU.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA device is available")
    env = read_distributed_environment()
    initialise = (env.world_size > 1 or init_single_process) and not dist.is_initialized()
    if initialise:  # the rendezvous variables init_process_group reads (a lone process leaves the environment alone)
        _export(env)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    chosen = torch.device("cuda", env.local_rank) if use_cuda else torch.device("cpu")
    if initialise:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        logger.debug("Process group up: rank %d of %d", env.global_rank, env.world_size)
    return Env(rank=env.global_rank, world_size=env.world_size, local_rank=env.local_rank, device=chosen)


def setup_environment(**kwargs: str) -> None:
    """Point the temporary, TorchInductor and Triton caches to a per-job directory (``/scratch/$SLURM_JOB_ID``
    when it exists, else the user's cache directory ``spidr``) and set the other given variables."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and (Path("/scratch") / job).is_dir():
        cache = Path("/scratch") / job
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spidr"
    (cache / "tmp").mkdir(parents=True, exist_ok=True)
    values = {
        "TMPDIR": str(cache / "tmp"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),
        "TRITON_HOME": str(cache),
        **kwargs,
    }
    for name, value in values.items():
        if os.environ.get(name) != str(value):
            os.environ[name] = str(value)
            logger.debug("Setting env: %s=%s", name, value)


def set_seed(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (CUDA's included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_conv_backward_dynamic() -> None:
    """Make TorchInductor run ``convolution_backward`` through ATen instead of lowering it, so that a compiled
    step does not specialise on the number of frames (recompiling for every new length)."""
    if torch.version.hip is not None:
        return
    import torch._inductor.lowering as lowering

    op = torch.ops.aten.convolution_backward.default
    if op not in lowering.lowerings:
        logger.debug("No lowering registered for %s", op)
        return
    del lowering.lowerings[op]
    lowering.make_fallback(op, warn=False, override_decomp=True)


def setup_pytorch(*, use_deterministic: bool) -> None:
    """The release's PyTorch settings for training: full float32 matrix products (no TF32), cuDNN autotuning off
    (lengths vary), no DDP graph splitting under ``torch.compile``, convolution backward kept dynamic, and with
    ``use_deterministic`` deterministic algorithms (cuBLAS workspace and Inductor's random numbers included)."""
    import torch._dynamo.config
    import torch._inductor.config

    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    torch.backends.cudnn.benchmark = False
    torch._dynamo.config.optimize_ddp = False
    keep_conv_backward_dynamic()
    if use_deterministic:
        torch.use_deterministic_algorithms(mode=True)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch._inductor.config.fallback_random = True


def setup_training(seed: int, *, use_deterministic: bool = False) -> Env:
    """Everything a training process of the release sets up: the logger, the process group, seeds (``seed`` +
    rank), PyTorch settings and caches. Returns this process's :class:`Env`."""
    init_logger()
    env = setup_distributed()
    set_seed(seed + env.rank)
    setup_pytorch(use_deterministic=use_deterministic)
    setup_environment()
    return env


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, in types that load with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output."""
    version, internal, gauss = state["python"]  # weights_only loading gives lists where getstate() had tuples
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
