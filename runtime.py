"""The process a script runs in: seeds, distributed set-up (plain process, torchrun, SLURM), the main wrapper."""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.hub

from cli import ConfigError, fail, one_line, warn


def derive_seed(stream: str, *keys: int) -> int:
    """A 63-bit seed that is a hash of (``stream``, ``keys``): every distinct tuple gets an unrelated seed.

    Why a hash and not a sum: ``seed + epoch + rank`` gives rank r at epoch e the stream of rank r + 1 at
    epoch e - 1, so two processes (or two epochs) would draw the same augmentations. ``stream`` names what the
    seed is for ("process", "sample"), so that seeds of different uses never coincide either.
    """
    digest = hashlib.blake2b(repr((stream, *(int(k) for k in keys))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch.manual_seed takes values below 2**63


def fix_random_seeds(seed: int = 31, *stream: int) -> None:
    """Seed torch (all devices), numpy and random from (``seed``, this rank, ``stream``), e.g. ``stream`` = the
    epoch: each rank, and each epoch of each rank, gets a stream of its own (:func:`derive_seed`)."""
    derived = derive_seed("process", seed, get_rank(), *stream)
    torch.manual_seed(derived)
    np.random.seed([derived & 0xFFFFFFFF, derived >> 32])
    random.seed(derived)


# What gloo says when the process at the other end of a collective is gone (killed, crashed, out of memory)
PEER_LOST_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def run_cli(description: str, get_args_parser, main, argv: list[str] | None = None) -> None:
    """Every script's command-line entry: parse the flags (``--help`` shows each default) and :func:`run_main`."""
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description, parents=[get_args_parser()], formatter_class=formatter)
    run_main(main, parser.parse_args(argv))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a SLURM allocation, a container's limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(preferred: int) -> int:
    """A ``--num_workers`` default: ``preferred``, but never more than the CPUs this process may use."""
    return min(preferred, usable_cpus())


def run_main(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> None:
    """Run ``main(args)`` (from the command line or a submitit task): bad arguments or bad data (ConfigError,
    DataError) end in one line with exit code 2, a collective that lost another process of the job in one line
    with exit code 1 (instead of a traceback per surviving process), and the process group is destroyed."""
    from datasets import DataError

    try:
        main(args)
    except (DataError, ConfigError) as err:
        fail(one_line(err))
    except RuntimeError as err:
        if not lost_peer(err):
            raise
        # gloo's message without its source location and its advice: "Read error [addr]: Connection reset by peer"
        cause = re.sub(r"^\[[^\]]*\] ", "", one_line(err)).split(". This is typically")[0]
        fail(
            f"another process of this job stopped ({cause}); stopping too. Its own log says why; run the same "
            "command again to resume from the last checkpoint",
            code=1,
        )
    finally:
        close_distributed()


def lost_peer(err: RuntimeError) -> bool:
    """Whether a distributed run's error is a collective that lost its peer (gloo's connection errors, NCCL's
    DistBackendError) rather than a failure of this process."""
    if not is_dist_avail_and_initialized() or get_world_size() == 1:
        return False
    return isinstance(err, dist.DistBackendError) or any(message in str(err) for message in PEER_LOST_MESSAGES)


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def close_distributed() -> None:
    """Destroy the process group, if there is one, before the process exits.

    Why: a process that leaves it to interpreter shutdown can abort there (SIGABRT, "terminate called without
    an active exception") while Gloo's worker threads still hold work (pytorch/pytorch#179291), so a run that
    finished and wrote its checkpoint exits as failed, and torchrun or SLURM report the job as failed. NCCL
    warns about the same since torch 2.4.
    """
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def setup_for_distributed(is_master: bool) -> None:
    """Silence ``print`` on non-master ranks (``print(..., force=True)`` still prints)."""
    import builtins

    builtin_print = builtins.print

    def print_(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print_


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed")
    group.add_argument(
        "--dist_url",
        default="env://",
        type=str,
        help="URL used to set up distributed training (env:// under torchrun and SLURM).",
    )
    group.add_argument("--local_rank", default=0, type=int, help="Set by old launchers; please ignore.")
    group.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto = CUDA when available, else CPU; a job that was given GPUs and cannot use them stops instead.",
    )


# Set by SLURM in a job (step) that was given GPUs as generic resources (--gres gpu:N, --gpus-per-node, ...)
SLURM_GPU_VARIABLES = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")


MASTER_PORTS = (20000, 60000)  # the range of the port derived from a SLURM job id, as submitit's


NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[003-010,012],cpu1" -> "gpu003"), without calling scontrol."""
    match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
    if match is None:
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR to the first node's name")
    return match.group(1) + (match.group(2) or "")


def export_slurm_task_env() -> None:
    """torchrun's variables for a task that ``srun`` started directly, read from SLURM's own, as DINO does.

    Rank = SLURM_PROCID, local rank = SLURM_LOCALID, world size = SLURM_NTASKS, tasks on this node =
    SLURM_NTASKS_PER_NODE where given. The master is the first node of the step and its port is derived from
    the job id, so every task finds the same address without talking to the others; MASTER_ADDR and
    MASTER_PORT set by the user are kept. Nothing here needs submitit.
    """
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "localhost")
    low, high = MASTER_PORTS
    job_id = int(os.environ.get("SLURM_JOB_ID", "0"))
    os.environ.setdefault("MASTER_ADDR", first_slurm_host(nodelist))
    os.environ.setdefault("MASTER_PORT", str(low + job_id % (high - low)))
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "SLURM_NTASKS_PER_NODE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["SLURM_NTASKS_PER_NODE"]


def started_by_srun() -> bool:
    """Whether this process is one of several tasks that srun started (and no launcher set RANK already)."""
    return "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version (Linux), or None where there is none."""
    try:
        text = NVIDIA_DRIVER_FILE.read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text)
    return match.group(1) if match else "of unknown version"


def cuda_build_and_driver() -> str:
    """Which CUDA this torch was built for and which driver the node has: why torch may see no GPU."""
    build = (
        f"torch {torch.__version__} built for CUDA {torch.version.cuda}"
        if torch.version.cuda
        else (f"torch {torch.__version__} is a CPU-only build")
    )
    driver = nvidia_driver_version()
    return f"{build}, NVIDIA driver {driver}" if driver else f"{build}, no NVIDIA driver loaded"


def gpus_expected(requested: str) -> str | None:
    """Why this process must run on a GPU (--device cuda, or a SLURM job holding GPUs), or None."""
    if requested == "cuda":
        return "--device cuda was asked for"
    if requested == "auto":
        for name in SLURM_GPU_VARIABLES:
            if os.environ.get(name):
                return f"this SLURM job was given GPUs ({name}={os.environ[name]})"
    return None


def pick_cuda_device(local_rank: int, local_world_size: int) -> int:
    """The CUDA device of the process with this local rank, of ``local_world_size`` processes on the node.

    A task that sees one GPU uses it (srun --gpus-per-task, --gpu-bind, or a per-task CUDA_VISIBLE_DEVICES:
    each task's own GPU is its device 0); otherwise each process takes the GPU of its local rank. More
    processes on a node than visible GPUs is refused by every process alike, so that none waits for the others.
    """
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if max(local_world_size, local_rank + 1) > count:
        fail(
            f"{local_world_size} processes on this node but {count} visible GPUs (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one process per GPU "
            f"(torchrun --nproc_per_node {count}, srun --ntasks-per-node {count}) or give each task its own GPU "
            "(srun --gpus-per-task 1)"
        )
    return local_rank


def enable_tf32() -> None:
    """Let fp32 matrix products on CUDA use TF32 tensor cores (Ampere and newer), as cuDNN's convolutions
    already do by default.

    Why: torch leaves fp32 matmuls in full fp32 by default, which runs an A100 / H100 at a fraction of its
    tensor-core rate in every fp32 run (``--precision fp32``, feature extraction for k-NN); TF32 keeps fp32's
    range with a 10-bit mantissa, as bf16 autocast would anyway do to the same products.
    """
    torch.backends.cuda.matmul.fp32_precision = "tf32"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the system.

    Why: a training step on a CPU allocates and frees the same large activation and gradient buffers every
    iteration (64 MB each for the 65536-prototype head). glibc serves large blocks with fresh ``mmap`` calls
    and unmaps them on free, so every step page-faults all its buffers in again, tens of thousands of faults
    per step (tests/test_runtime.py counts them). Serving every block from the heap and never
    trimming it removes both; the peak memory is the same, it is simply kept. Returns False, changing nothing,
    where the C library is not glibc (macOS, musl).
    """
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Set up the process group for a plain process, torchrun, ``srun`` or submitit, and pick the device.

    Sets ``args.rank``, ``args.world_size``, ``args.gpu`` (local device index), ``args.distributed`` and
    ``args.device``. A plain ``python script.py`` runs as world size 1 without a process group, so nothing
    needs a launcher; gloo is used on CPU and NCCL on CUDA. A process that must run on a GPU (--device cuda,
    a SLURM job given GPUs) and sees none stops with one line naming torch's CUDA build and the driver.
    """
    requested = getattr(args, "device", "auto")
    use_cuda = torch.cuda.is_available() and requested != "cpu"
    reason = gpus_expected(requested)
    if reason and not use_cuda:
        fail(
            f"{reason}, but torch sees no CUDA device: {cuda_build_and_driver()}; install a torch build for this "
            "driver, or run with --device cpu"
        )
    if requested == "auto" and not use_cuda and nvidia_driver_version():
        warn(f"torch sees no CUDA device ({cuda_build_and_driver()}): running on the CPU")

    if started_by_srun():
        export_slurm_task_env()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
    else:
        args.rank, args.world_size = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", args.rank % max(torch.cuda.device_count(), 1)))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))

    args.distributed = args.world_size > 1
    if use_cuda:
        args.gpu = pick_cuda_device(local_rank, local_world_size)
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
        enable_tf32()
    else:
        args.gpu = local_rank
        args.device = "cpu"
        keep_freed_memory()
    if args.distributed:
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(
            backend=backend, init_method=getattr(args, "dist_url", "env://"), world_size=args.world_size, rank=args.rank
        )
        print(f"| distributed init (rank {args.rank}/{args.world_size}, {backend}): {args.dist_url}", flush=True)
        dist.barrier()
    setup_for_distributed(args.rank == 0)
