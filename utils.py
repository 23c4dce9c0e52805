"""The runtime every script shares: distributed set-up, backbones, precision, schedules, logging, checkpoints.

Sections, top to bottom: small helpers; distributed (plain process, torchrun, SLURM); precision; backbones
and the multi-crop wrapper; optimisation helpers; schedules; logging; checkpoints; pretrained weights (the
loader of every evaluation script). DINO's public names (``cosine_scheduler``, ``MultiCropWrapper``,
``MetricLogger``, ``restart_from_checkpoint``, ...) are kept so that code written against facebookresearch/dino
keeps working.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import glob
import hashlib
import json
import math
import os
import pickle
import random
import re
import sys
import time
import urllib.parse
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.hub
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

import vision_transformer as vits
import weight_formats

# ============================================================================================ small helpers


def bool_flag(s: str) -> bool:
    """Parse boolean command-line values the way DINO does (``--use_fp16 false``)."""
    if s.lower() in {"off", "false", "0"}:
        return False
    if s.lower() in {"on", "true", "1"}:
        return True
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {s!r} (expected true/false)")


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


class ConfigError(ValueError):
    """A bad command-line value or combination of values; scripts report it as one line with exit code 2."""


def one_line(err: BaseException) -> str:
    """The message of an error as one line, also when it was re-raised from a DataLoader worker.

    Worker errors arrive as "Caught DataError in DataLoader worker ... Original Traceback ...": the last
    line holds the original message, prefixed with the exception's qualified name, which is dropped here.
    """
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    for name in ("datasets.DataError: ", "DataError: ", "ValueError: ", "utils.ConfigError: "):
        last = last.removeprefix(name)
    return last


def key_mismatch(expected: Iterable[str], found: Iterable[str], shown: int = 3) -> str:
    """How two sets of state-dict keys differ, in one short line: counts and the first few of each side.

    Why: torch's own message lists every key of the network (kilobytes for a ViT), which hides the cause.
    """
    expected, found = list(expected), list(found)
    missing = [k for k in expected if k not in set(found)]
    unexpected = [k for k in found if k not in set(expected)]
    parts = []
    for count_name, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = ", ..." if len(keys) > shown else ""
            parts.append(f"{len(keys)} {count_name} (first: {', '.join(keys[:shown])}{more})")
    return "; ".join(parts) or "no key differs"


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line and exit (code 2: bad arguments or bad input data)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def warn(message: str) -> None:
    """Print one warning line on stderr (the run goes on)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# What gloo says when the process at the other end of a collective is gone (killed, crashed, out of memory)
PEER_LOST_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def run_cli(description: str, get_args_parser, main, argv: list[str] | None = None) -> None:
    """Every script's command-line entry: parse the flags and :func:`run_main`."""
    parser = argparse.ArgumentParser(description, parents=[get_args_parser()])
    run_main(main, parser.parse_args(argv))


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


# ============================================================================================ distributed


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
    and unmaps them on free, so every step page-faults all its buffers in again: about 34,000 page faults and
    0.3 s of kernel time per ViT-Tiny DINO-MC step (batch 8). Serving every block from the heap and never
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


# ============================================================================================ precision

PRECISIONS = ("fp32", "fp16", "bf16")


def add_precision_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("precision")
    group.add_argument(
        "--precision",
        default=None,
        choices=[*PRECISIONS, "auto"],
        help="Training precision. Default: a resumed run's checkpoint's; else bf16 on a GPU that computes it "
        "natively (Ampere and newer), fp32 on other GPUs and on CPU. fp16 = autocast with a GradScaler (only "
        "when asked; patch-8 ViTs risk NaN losses); bf16 = autocast; auto = bf16 where the GPU or CPU computes "
        "it natively, else fp32 (docs/gpu.md).",
    )
    group.add_argument(
        "--use_fp16",
        default=None,
        type=bool_flag,
        help="DINO's flag, kept as an alias when --precision is not given: true = fp16, false = fp32.",
    )


def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX).

    Why it matters: without them torch emulates bf16 through conversions to fp32, and a CPU training step
    runs about 3x SLOWER than in fp32 (ViT-Tiny DINO-MC step: 5.7 s in bf16 against 1.7 s in fp32 on an
    AVX-512 Xeon without bf16). Other CPUs (ARM, Apple) report False: fp32 is the safe choice there.
    """
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def native_precision(on_cuda: bool) -> str:
    """bf16 where the device computes it natively (a GPU of the Ampere generation or newer, a CPU with
    AVX512-BF16 or AMX), else fp32. Never fp16: it needs a GradScaler and is known to lose DINO runs to NaN."""
    if on_cuda:
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def requested_precision(args: argparse.Namespace) -> str | None:
    """The precision the command line asks for (--precision, else DINO's --use_fp16), or None."""
    if args.precision is not None:
        return args.precision
    if getattr(args, "use_fp16", None) is not None:
        return "fp16" if args.use_fp16 else "fp32"
    return None


def checkpoint_precision(path: Path) -> str | None:
    """The precision the run that wrote checkpoint ``path`` trained in, or None (no such file, or an older
    checkpoint without a gradient scaler, whose fp32 or bf16 cannot be told apart and needs no scaler)."""
    if not path.is_file():
        return None
    checkpoint = load_checkpoint_safely(path, mmap=True)  # the tensors stay on disk: only the small entries are read
    saved = checkpoint.get("args", {}).get("precision") if isinstance(checkpoint.get("args"), dict) else None
    if saved in PRECISIONS:
        return saved
    return "fp16" if any(key.endswith("scaler") for key in checkpoint) else None


def resolve_precision(args: argparse.Namespace, device: str | torch.device, checkpoint: Path | None = None) -> str:
    """The precision to run at, recorded in ``args`` (``precision``, and DINO's ``use_fp16``) so that the run's
    checkpoints say which it was.

    What the command line asks for (:func:`requested_precision`; ``auto``: :func:`native_precision`); else the
    precision of the run being resumed from ``checkpoint``; else bf16 on a GPU with native bf16 and fp32
    elsewhere (a CPU runs bf16 only when asked: without native bf16 it is emulated and slow). A resumed run
    asked for another precision than its checkpoint's says so in one line, and so do fp16 with a patch-8 ViT
    (DINO's authors advise against mixed precision when reducing the patch size: unstable, NaN losses) and
    the emulated precisions on a CPU.
    """
    on_cuda = torch.device(device).type == "cuda"
    asked = requested_precision(args)
    saved = checkpoint_precision(checkpoint) if checkpoint is not None else None
    if asked == "auto":
        precision = native_precision(on_cuda)
        print(f"--precision auto: {precision} on this {'GPU' if on_cuda else 'CPU'}", flush=True)
    elif asked is not None:
        precision = asked
    elif saved is not None:
        precision = saved
    else:
        precision = native_precision(on_cuda) if on_cuda else "fp32"
    if saved is not None and asked is None:
        print(f"Resuming in {saved}, the precision {checkpoint} was trained in", flush=True)
    elif saved is not None and precision != saved:
        print(f"{checkpoint} was trained in {saved}: resuming in {precision}, as asked", flush=True)
    if precision == "fp16" and getattr(args, "patch_size", None) == 8 and is_vit_arch(getattr(args, "arch", "")):
        warn(
            "fp16 with a patch-8 ViT: DINO's authors advise against mixed precision when reducing the patch size "
            "(unstable training, NaN losses); bf16 (Ampere or newer GPUs) or fp32 is safer"
        )
    if not on_cuda and precision == "fp16":
        warn("--precision fp16 on a CPU is emulated and slower than fp32; it is meant for testing the GPU's fp16 path")
    if not on_cuda and precision == "bf16" and not cpu_has_native_bf16():
        warn(
            "--precision bf16 on a CPU without native bf16 (no AVX512-BF16 / AMX) runs about 3x slower than fp32; "
            "use --precision fp32 (or auto)"
        )
    args.precision, args.use_fp16 = precision, precision == "fp16"
    return precision


def autocast(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """Autocast context for the precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_grad_scaler(precision: str, device: str | torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (bf16 has fp32's range and needs none)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


# ============================================================================================ backbones

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "wide_resnet50_2", "swin_t")
VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base")
VIT_PATCH_SIZES = (8, 14, 16)


def _adapt_first_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """A copy of the stem convolution that takes ``in_chans`` channels (same kernel, stride, padding)."""
    return nn.Conv2d(
        in_chans,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )


def _build_torchvision(arch: str, in_chans: int) -> tuple[nn.Module, int]:
    import torchvision.models as tvm

    model = getattr(tvm, arch)(weights=None)
    if arch == "swin_t":
        feat_dim = model.head.in_features
        model.head = nn.Identity()
        if in_chans != 3:
            model.features[0][0] = _adapt_first_conv(model.features[0][0], in_chans)
    else:
        feat_dim = model.fc.in_features
        model.fc = nn.Identity()
        if in_chans != 3:
            model.conv1 = _adapt_first_conv(model.conv1, in_chans)
    return model, feat_dim


def _build_timm(name: str, in_chans: int, drop_path_rate: float) -> tuple[nn.Module, int]:
    import timm

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "in_chans": in_chans}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    try:  # timm ViTs need this to accept the multi-crop sizes; other models do not know the argument
        model = timm.create_model(name, dynamic_img_size=True, **kwargs)
    except TypeError:
        model = timm.create_model(name, **kwargs)
    return model, model.num_features


def build_backbone(
    arch: str, patch_size: int = 16, in_chans: int = 3, drop_path_rate: float = 0.0
) -> tuple[nn.Module, int]:
    """Build a backbone that maps (B, in_chans, H, W) to a (B, feat_dim) feature; return (model, feat_dim).

    ``vit_tiny|vit_small|vit_base`` (DINO's ViT, ``patch_size`` 8 or 16), torchvision ``resnet18|resnet34|
    resnet50|wide_resnet50_2|swin_t`` (classifier replaced by Identity: the pooled feature), or any timm
    model as ``timm/<name>``. Raises ValueError naming the flag for an unknown architecture.
    """
    arch = check_arch(arch, patch_size)
    if arch in VIT_ARCHS:
        model = getattr(vits, arch)(patch_size=patch_size, in_chans=in_chans, drop_path_rate=drop_path_rate)
        return model, model.embed_dim
    if arch in TORCHVISION_ARCHS:
        return _build_torchvision(arch, in_chans)
    return _build_timm(arch.split("/", 1)[1], in_chans, drop_path_rate)


def check_arch(arch: str, patch_size: int = 16) -> str:
    """``arch`` as :func:`build_backbone` understands it (DINO's ``deit`` alias resolved), checked without
    building anything; raises ValueError naming ``--arch`` or ``--patch_size``."""
    arch = arch.replace("deit", "vit")  # DINO's alias
    if arch in VIT_ARCHS:
        if patch_size not in VIT_PATCH_SIZES:
            raise ValueError(f"--patch_size {patch_size}: expected one of {', '.join(map(str, VIT_PATCH_SIZES))}")
        return arch
    if arch in TORCHVISION_ARCHS:
        return arch
    if arch.startswith("timm/"):
        import timm

        name = arch.split("/", 1)[1]
        if not timm.is_model(name):
            raise ValueError(f"--arch {arch}: timm has no model named {name!r}")
        return arch
    choices = ", ".join(VIT_ARCHS + TORCHVISION_ARCHS)
    raise ValueError(f"--arch {arch!r} is not supported; expected one of {choices} or timm/<model name>")


def add_backbone_args(parser: argparse.ArgumentParser, arch: str = "vit_small", patch_size: int = 8) -> None:
    """The backbone flags every script shares (published DINO-MC ViTs are ViT-S/8)."""
    group = parser.add_argument_group("backbone")
    group.add_argument(
        "--arch",
        default=arch,
        type=str,
        help="vit_tiny | vit_small | vit_base | resnet50 | wide_resnet50_2 | swin_t | resnet18 | timm/<name>.",
    )
    group.add_argument(
        "--patch_size", default=patch_size, type=int, help="ViT patch size in pixels (8 or 16 as published; 14)."
    )
    group.add_argument(
        "--bands",
        default="RGB",
        type=str,
        help="Input bands: RGB (B4,B3,B2), ALL (12 Sentinel-2 L2A bands) or a list like B4,B3,B2,B8.",
    )


def is_vit_arch(arch: str) -> bool:
    """Whether --arch names one of this project's ViTs (DINO's ``deit`` alias included)."""
    return arch.replace("deit", "vit") in VIT_ARCHS


def is_vit(model: nn.Module) -> bool:
    return isinstance(model, vits.VisionTransformer)


class MultiCropWrapper(nn.Module):
    """Run the backbone on a list of crops, grouped by resolution, then the head once on all features.

    Consecutive crops of equal size are concatenated into one batch (DINO's scheme); the features come back
    in crop order, so the output is (n_crops * B, out_dim) with crop i at rows [i*B, (i+1)*B).
    With ``pack_crops`` (default) a ViT runs all the size groups in ONE packed pass
    (``VisionTransformer.forward_packed``: same result, fewer and larger matrix products; figures in
    benchmarks/README.md); other backbones, or ``pack_crops=False``, get one pass per group as in DINO.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, pack_crops: bool = True):
        super().__init__()
        # DINO removes a classifier here. Only a plain Linear one: the ``head`` of a timm ConvNeXt / MaxViT /
        # CoAtNet built with num_classes=0 (:func:`build_backbone`) pools and normalises the pre-logit feature.
        for name in ("fc", "head"):
            if isinstance(getattr(backbone, name, None), nn.Linear):
                setattr(backbone, name, nn.Identity())
        self.backbone = backbone
        self.head = head
        self.pack_crops = pack_crops

    def forward(
        self, x: torch.Tensor | list[torch.Tensor], return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Head outputs of all crops in crop order; with ``return_features`` also the backbone features they
        came from (the health metrics read the teacher's without a second pass)."""
        if not isinstance(x, (list, tuple)):
            x = [x]
        groups = []
        start = 0
        while start < len(x):
            end = start + 1
            while end < len(x) and x[end].shape[-2:] == x[start].shape[-2:]:
                end += 1
            groups.append(torch.cat(x[start:end]) if end - start > 1 else x[start])
            start = end
        if self.pack_crops and len(groups) > 1 and is_vit(self.backbone):
            features = self.backbone.forward_packed(groups)
        else:
            outs = [self.backbone(group) for group in groups]
            features = torch.cat([out[0] if isinstance(out, tuple) else out for out in outs])
        output = self.head(features)
        return (output, features) if return_features else output


def has_batchnorms(model: nn.Module) -> bool:
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(m, bn_types) for m in model.modules())


# ============================================================================================ optimisation


def get_params_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights (decayed) and biases / norm parameters (ndim <= 1, never decayed), as DINO."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def clip_gradients(model: nn.Module, clip: float) -> list[torch.Tensor]:
    """Clip each parameter's gradient to norm ``clip`` separately (DINO's per-parameter clipping).

    One foreach norm and one foreach multiply over all gradients instead of a Python loop per parameter;
    returns the norms before clipping as tensors (DINO returns floats, which would sync the device per step).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return []
    norms = torch._foreach_norm(grads, 2)
    scales = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the prototypes' gradients during the first ``freeze_last_layer`` epochs (DINO's trick)."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


class LARS(torch.optim.Optimizer):
    """LARS (SGD + momentum + layer-wise trust ratio) as in DINO; biases / norms are excluded from adaptation."""

    def __init__(
        self,
        params,
        lr: float = 0,
        weight_decay: float = 0,
        momentum: float = 0.9,
        eta: float = 0.001,
        weight_decay_filter=None,
        lars_adaptation_filter=None,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            eta=eta,
            weight_decay_filter=weight_decay_filter,
            lars_adaptation_filter=lars_adaptation_filter,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0, torch.where(update_norm > 0, (g["eta"] * param_norm / update_norm), one), one
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def build_optimizer(name: str, params_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW or SGD with torch's fused kernels where the parameters allow them, or LARS.

    Why fused: it updates each parameter in one pass over memory. On a CPU, where torch's foreach ops are a
    Python-level loop of per-tensor kernels, one AdamW step over DINO's 65536-prototype head takes 22 ms
    fused against 173 ms foreach (2 cores); on CUDA it saves the kernel launches.
    """
    fused = all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for group in params_groups for p in group["params"]
    )
    if name == "adamw":
        return torch.optim.AdamW(params_groups, fused=fused, foreach=not fused)
    if name == "sgd":
        sgd = torch.optim.SGD(params_groups, lr=0, momentum=0.9, fused=fused, foreach=not fused)
        if fused:
            _start_momentum_buffers(sgd)
        return sgd
    if name == "lars":
        return LARS(params_groups)
    raise ValueError(f"--optimizer {name!r}: expected adamw, sgd or lars")


def _start_momentum_buffers(sgd: torch.optim.SGD) -> None:
    """Give every parameter a zero momentum buffer before the first step.

    Why: torch's fused SGD needs either no buffer at all in a group (its first step) or one for every parameter
    that has a gradient. DINO's prototypes get no gradient during the ``--freeze_last_layer`` epochs, so without
    this they join a group whose other buffers exist, and the fused kernel fails ("expected Tensor as element
    ..., but got NoneType"). Same maths: without dampening, a zero buffer's first update ``0.9 * 0 + g`` is the
    ``g`` torch copies into a new buffer.
    """
    for group in sgd.param_groups:
        for p in group["params"]:
            sgd.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


# ============================================================================================ schedules


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0,
) -> np.ndarray:
    """Per-iteration values: linear warm-up to ``base_value``, then cosine decay to ``final_value`` (DINO).

    Unlike DINO's version, a warm-up longer than the run (``--epochs 1`` with the default 10 warm-up epochs,
    as in a smoke test) is cut to the run's length instead of failing.
    """
    total_iters = epochs * niter_per_ep
    warmup_iters = min(warmup_epochs * niter_per_ep, total_iters)
    warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total_iters - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup_schedule, schedule))


# ============================================================================================ logging


class SmoothedValue:
    """Track a series of values; give smoothed values over a window and the global average."""

    def __init__(self, window_size: int = 20, fmt: str | None = None):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.6f} ({global_avg:.6f})"

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over ranks (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor(
            [self.count, self.total], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu"
        )
        dist.barrier()
        dist.all_reduce(t)
        self.count = int(t[0].item())
        self.total = t[1].item()

    @property
    def median(self) -> float:
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self) -> float:
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(self.deque)

    @property
    def value(self) -> float:
        return self.deque[-1]

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


class MetricLogger:
    """DINO's metric logger: ``log_every`` yields the items and prints a line with ETA every ``print_freq``."""

    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v))

    def __getattr__(self, attr: str):
        if attr in self.__dict__.get("meters", {}):
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "") -> Iterator:
        start_time = time.time()
        end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.6f}")
        data_time = SmoothedValue(fmt="{avg:.6f}")
        total = len(iterable)  # type: ignore[arg-type]
        space_fmt = ":" + str(len(str(total))) + "d"
        parts = [header, "[{0" + space_fmt + "}/{1}]", "eta: {eta}", "{meters}", "time: {time}", "data: {data}"]
        if torch.cuda.is_available():
            parts.append("max mem: {memory:.0f}")
        log_msg = self.delimiter.join(parts)
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta_string = str(datetime.timedelta(seconds=int(iter_time.global_avg * (total - i))))
                fields = dict(eta=eta_string, meters=str(self), time=str(iter_time), data=str(data_time))
                if torch.cuda.is_available():
                    fields["memory"] = torch.cuda.max_memory_allocated() / 1024.0**2
                print(log_msg.format(i, total, **fields), flush=True)
            end = time.time()
        total_time = time.time() - start_time
        total_time_str = str(datetime.timedelta(seconds=int(total_time)))
        print(f"{header} Total time: {total_time_str} ({total_time / max(total, 1):.6f} s / it)", flush=True)


def append_json_log(path: str | Path, stats: dict) -> None:
    """Add one JSON line (one epoch) to ``log.txt``, on disk before the checkpoint is written.

    The file is rewritten atomically (:func:`write_atomically`) rather than appended to: an append cut by a
    kill leaves half a line, which the next run's :func:`trim_json_log` could not parse. A log has one line
    per epoch, so rewriting it costs nothing.
    """
    path = Path(path)
    previous = path.read_bytes() if path.is_file() else b""
    write_atomically(path, lambda f: f.write(previous + (json.dumps(stats) + "\n").encode()))


def trim_json_log(path: str | Path, next_epoch: int) -> None:
    """On resume, drop log lines of epochs >= ``next_epoch``: they belong to an epoch whose checkpoint was
    never written (a kill between the two writes) and will be run and logged again."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("epoch", -1) < next_epoch]
    if len(kept) != len(lines):
        write_atomically(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


class Progress:
    """Progress of a long step with an ETA: a tqdm bar on a terminal, else a line every ``print_freq`` items
    (a log file gets a few readable lines instead of a bar redrawn thousands of times); rank 0 only.

    Wraps an iterable (``for batch in Progress(loader, "features", 10)``) or counts ``update()`` calls
    (``Progress(None, "store locations", 1000, total=n)``).
    """

    def __init__(self, iterable: Iterable | None, desc: str, print_freq: int, total: int | None = None):
        self.iterable = iterable
        self.total = total if total is not None else len(iterable)  # type: ignore[arg-type]
        self.desc, self.print_freq = desc, max(1, print_freq)
        self.count, self.start = 0, time.time()
        self.bar = None
        if is_main_process() and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, dynamic_ncols=True)

    def __iter__(self) -> Iterator:
        for item in self.iterable:  # type: ignore[union-attr]
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1, info: str = "") -> None:
        """Count ``n`` more items; ``info`` (rates, ratios) is shown after the counts."""
        before, self.count = self.count, self.count + n
        crossed = self.count // self.print_freq > before // self.print_freq
        if self.bar is not None:
            if info:
                self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(n)
        elif is_main_process() and self.count > 0 and (crossed or self.count == self.total):
            elapsed = time.time() - self.start
            eta = elapsed / self.count * max(self.total - self.count, 0)
            print(
                f"{self.desc} [{self.count}/{self.total}] eta: {datetime.timedelta(seconds=int(eta))} "
                f"elapsed: {datetime.timedelta(seconds=int(elapsed))}{', ' + info if info else ''}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def add_tensorboard_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tensorboard",
        default=False,
        type=bool_flag,
        help="Also write the scalars of log.txt to output_dir/tb/ for TensorBoard (rank 0).",
    )


class TensorBoardLog:
    """The scalars of ``log.txt`` (one point per epoch) as TensorBoard events in ``output_dir/tb``; a no-op
    unless ``enabled`` and on rank 0.

    A resumed run starts at ``start_step``. The writer records it as a restart (``purge_step``): TensorBoard
    then drops the points of steps >= ``start_step`` left by the interrupted run (an epoch that was logged but
    never checkpointed, which is run again), so a resumed curve has each step once. Nested dicts (per-class
    or health metrics) become ``name/key`` tags; values that are not numbers (lists, strings) are skipped.
    """

    def __init__(self, output_dir: str | Path, enabled: bool, start_step: int = 0):
        self.writer = None
        if enabled and is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tb"), purge_step=start_step)

    def write(self, stats: dict, step: int) -> None:
        if self.writer is None:
            return
        for tag, value in _scalar_items(stats):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # on disk at each epoch, as log.txt

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _scalar_items(stats: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in stats.items():
        if key == "epoch":
            continue
        if isinstance(value, dict):
            yield from _scalar_items(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


# ============================================================================================ checkpoints


def write_atomically(path: str | Path, write: Callable[[Any], Any]) -> None:
    """Call ``write(f)`` on a temporary binary file beside ``path``, fsync it, then rename it to ``path``.

    A crash or a kill at any moment leaves either the previous file or the new one, never a truncated mix,
    because ``os.replace`` within one file system is atomic. The temporary file is named after this process;
    those of earlier processes that were killed before their rename (possibly a checkpoint's size each) are
    removed first.
    """
    path = Path(path)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.tmp.<pid>`` files beside ``path`` whose process no longer runs (killed mid-write)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp.*"):
        pid = tmp.name.rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
            tmp.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def save_checkpoint(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with torch.save atomically (:func:`write_atomically`)."""
    write_atomically(path, lambda f: torch.save(obj, f))


def save_on_master(obj: Any, path: str | Path) -> None:
    if is_main_process():
        save_checkpoint(obj, path)


def get_rng_state(device: str | torch.device = "cpu") -> dict:
    """All random generators that shape a run (python, numpy, torch's CPU one, and the CUDA generator of
    ``device`` when it is a GPU), for exact resumption.

    Only the run's own GPU's generator: reading every visible GPU's would create a CUDA context on each of
    them in every process, and a resume that sees fewer GPUs (one per task) could not put them back. Held as
    tensors, ints and tuples only (numpy's key array as a tensor), so that a checkpoint carrying it loads with
    plain ``torch.load`` (weights_only) and no allowlist.
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
    }
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: str | torch.device = "cpu") -> None:
    """Put back what :func:`get_rng_state` saved; the CUDA generator goes to ``device`` when it is a GPU.
    Older checkpoints hold a list with every visible GPU's: the one of the device's index is taken."""
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))  # older checkpoints: a numpy array
    torch.set_rng_state(state["torch"])
    device = torch.device(device)
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):
        index = device.index or 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def plain_args(args: argparse.Namespace) -> dict:
    """``vars(args)`` with every value a plain Python value (str, number, bool, None, list, dict), so that a
    checkpoint's ``args`` loads with plain ``torch.load``; anything else (a Path, a device) becomes its str."""

    def plain(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, np.generic):
            return value.item()
        return str(value)

    return {key: plain(value) for key, value in vars(args).items()}


def restart_from_checkpoint(ckp_path: str | Path, run_variables: dict | None = None, **kwargs) -> bool:
    """Load the objects in ``kwargs`` (model, optimizer, scaler, loss) from a checkpoint, if it exists.

    DINO's function, made strict: a model whose keys do not match is an error rather than a printed note,
    since resuming into a different architecture silently would waste a run. ``module.`` prefixes
    (checkpoints saved from DDP) are matched either way. Returns whether a checkpoint was found.
    """
    if not os.path.isfile(ckp_path):
        return False
    print(f"Found checkpoint at {ckp_path}")
    checkpoint = load_checkpoint_safely(ckp_path)
    for key, value in kwargs.items():
        if value is None or (key.endswith("scaler") and key not in checkpoint):
            continue  # a gradient scaler starts afresh when the checkpoint's run used none (another precision)
        if key not in checkpoint:
            raise ConfigError(
                f"cannot resume from {ckp_path}: it has no '{key}' entry (not a checkpoint of this script?)"
            )
        state = checkpoint[key]
        if isinstance(value, nn.Module):
            state = _match_module_prefix(state, value.state_dict())
            if set(state) != set(value.state_dict()):
                raise ConfigError(
                    f"cannot resume from {ckp_path}: its '{key}' does not fit this model "
                    f"({key_mismatch(value.state_dict(), state)}); use the same --arch, or another --output_dir"
                )
        value.load_state_dict(state)
        print(f"=> loaded '{key}' from checkpoint '{ckp_path}'")
    if run_variables is not None:
        for var_name in run_variables:
            if var_name in checkpoint:
                run_variables[var_name] = checkpoint[var_name]
    return True


def _match_module_prefix(state: dict, target: dict) -> dict:
    """Add or strip DDP's ``module.`` prefix so that ``state`` uses the same key style as ``target``."""
    target_prefixed = next(iter(target), "").startswith("module.")
    state_prefixed = next(iter(state), "").startswith("module.")
    if state_prefixed and not target_prefixed:
        return {k.removeprefix("module."): v for k, v in state.items()}
    if target_prefixed and not state_prefixed:
        return {f"module.{k}": v for k, v in state.items()}
    return state


# ============================================================================================ pretrained weights

DEFAULT_CACHE_DIR = Path("~/.cache/dino_mc")
DRIVE_ID_PATTERNS = (
    re.compile(r"drive\.google\.com/file/d/([\w-]+)"),
    re.compile(r"drive\.google\.com/.*[?&]id=([\w-]+)"),
)
BARE_DRIVE_ID = re.compile(r"[\w-]{25,}")


def add_pretrained_args(parser: argparse.ArgumentParser) -> None:
    """--pretrained_weights and --checkpoint_key, shared by every evaluation and fine-tuning script."""
    group = parser.add_argument_group("pretrained weights")
    group.add_argument(
        "--pretrained_weights",
        default=None,
        type=str,
        help="Checkpoint to evaluate: a local path, an http(s) URL, a Google Drive share link or file id "
        "(downloaded once into $DINO_MC_CACHE, default ~/.cache/dino_mc), or 'none' for random weights.",
    )
    group.add_argument(
        "--checkpoint_key",
        default="teacher",
        type=str,
        help="Entry of the checkpoint that holds the network: teacher (default, the evaluated one) or student.",
    )


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept: $DINO_MC_CACHE, else ~/.cache/dino_mc."""
    return Path(os.environ.get("DINO_MC_CACHE", DEFAULT_CACHE_DIR)).expanduser()


def google_drive_id(spec: str) -> str | None:
    """The file id of a Google Drive share link (``/file/d/<id>/view``, ``open?id=<id>``, ``uc?id=<id>``) or of
    a bare id (25+ letters, digits, ``-`` or ``_``, as in the published checkpoint table); None otherwise."""
    for pattern in DRIVE_ID_PATTERNS:
        match = pattern.search(spec)
        if match:
            return match.group(1)
    if BARE_DRIVE_ID.fullmatch(spec) and not Path(spec).exists():
        return spec
    return None


def _download_once(target: Path, download: Callable[[Path], None], source: str) -> Path:
    """Fetch ``source`` into ``target`` unless it is cached; rank 0 of each node downloads, the others wait.

    The download goes to a partial file with a random name beside ``target`` and is renamed only when
    complete: an interrupted run leaves no file that a re-run would mistake for a finished download, and
    several nodes downloading into one shared cache folder each write their own file (the renames are
    atomic, the last one wins with identical bytes). Every rank learns whether the download failed anywhere
    (one all-gather instead of a barrier), so a failure stops all ranks with its message instead of leaving
    the others waiting in a collective until the timeout.
    """
    error = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not target.is_file():
        try:
            _download_to(target, download, source)
        except Exception as err:  # network, HTTP, Drive and file-system errors: report them as one line
            error = f"--pretrained_weights {source}: download failed: {one_line(err)}"
    if is_dist_avail_and_initialized():
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise ConfigError(error)
    if not target.is_file():
        raise ConfigError(f"--pretrained_weights {source}: {target} is missing after the download")
    return target


def _download_to(target: Path, download: Callable[[Path], None], source: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    print(f"Downloading {source} to {target}", flush=True)
    try:
        download(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def resolve_weights_path(spec: str, cache: str | Path | None = None) -> Path:
    """A local checkpoint file for ``spec``: a path (must exist: no fallback to other weights), an http(s) URL
    or a Google Drive link / id (downloaded once into ``cache``, default :func:`cache_dir`)."""
    cache = Path(cache).expanduser() if cache is not None else cache_dir()
    if spec.startswith(("http://", "https://")) and "drive.google.com" not in spec:
        name = Path(urllib.parse.urlparse(spec).path).name or "checkpoint.pth"
        digest = hashlib.sha256(spec.encode()).hexdigest()[:8]  # two URLs ending in the same name stay apart

        def fetch(dst: Path) -> None:
            torch.hub.download_url_to_file(spec, str(dst), progress=sys.stderr.isatty())

        return _download_once(cache / f"{digest}-{name}", fetch, spec)
    drive_id = google_drive_id(spec)
    if drive_id is not None:

        def fetch(dst: Path) -> None:
            from torchvision.datasets.utils import download_file_from_google_drive

            download_file_from_google_drive(drive_id, str(dst.parent), filename=dst.name)

        return _download_once(cache / f"gdrive-{drive_id}.pth", fetch, spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"--pretrained_weights {spec} does not exist")
    return path


def _numpy_globals() -> list:
    """What unpickling numpy arrays and scalars needs. DINO-style checkpoints hold both: the published loop
    writes the schedules' numpy floats into the optimizer's ``lr`` / ``weight_decay``.

    These rebuild plain values from bytes and a dtype; they call nothing named by the file, so allowing them
    keeps the guarantee of weights_only loading. Each is allowed under both of numpy's module names: the
    released checkpoints were pickled under numpy 1.x (``numpy.core.multiarray.scalar``), numpy 2 writes
    ``numpy._core.multiarray.scalar``, and the installed numpy knows its builders under one name only.
    """
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    builders = [
        (builder, f"{module}.multiarray.{builder.__name__}")
        for builder in (_reconstruct, scalar)
        for module in ("numpy.core", "numpy._core")
    ]
    return [*builders, np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64))]


def load_checkpoint_safely(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``: tensors, containers and the few allowlisted classes only.

    Published DINO / DINO-MC checkpoints store ``args`` as an ``argparse.Namespace``, which is allowlisted
    with numpy's array and scalar constructors; anything else a pickle asks for (a function to call, a class
    to build) is refused before it can run, so a downloaded file cannot execute code on load. ``mmap`` leaves
    the tensors on disk until they are used (reading a few small entries of a large checkpoint).
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *_numpy_globals()]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"it asks for {unsafe.group(1)}" if unsafe else one_line(err)
        raise ConfigError(
            f"refusing to load {path}: {what}, which could run code while unpickling "
            "(only tensors, plain containers, numpy values and argparse.Namespace are accepted)"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ConfigError(f"cannot read checkpoint {path}: {one_line(err)}") from None


def load_weights_file(path: Path) -> Any:
    """A checkpoint or a bare state dict; ``.safetensors`` files (timm / Hugging Face weights, this repo's
    ``export_weights.py``) by their suffix, as timm tells them apart, everything else through the safe torch.load."""
    if path.suffix != ".safetensors":
        return load_checkpoint_safely(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"cannot read safetensors file {path}: {one_line(err)}") from None


def _pick_state_dict(checkpoint: Any, checkpoint_key: str, path: Path) -> dict[str, torch.Tensor]:
    """``checkpoint[checkpoint_key]`` when present, else the checkpoint itself if it is a bare state dict
    (DINO's official backbone releases)."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get(checkpoint_key), dict):
        print(f"Taking key '{checkpoint_key}' of {path}")
        return checkpoint[checkpoint_key]
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        print(f"{path} is a plain state dict (no '{checkpoint_key}' entry)")
        return checkpoint
    entries = sorted(k for k, v in checkpoint.items() if isinstance(v, dict)) if isinstance(checkpoint, dict) else []
    raise ConfigError(
        f"--checkpoint_key {checkpoint_key}: {path} has no such entry and is not a state dict "
        f"(entries holding dicts: {', '.join(entries) or 'none'})"
    )


def _strip_prefixes(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's entries of a checkpoint's state dict, named as in ``expected`` (the backbone's own).

    DDP's ``module.`` prefix goes. Of a multi-crop wrapper's state (``backbone.*`` + the projection ``head.*``)
    the backbone is kept. A bare backbone state dict (DINO's releases) loses its classifier (``fc.*`` or
    ``head.*``) unless the backbone has such keys itself: a timm ConvNeXt's ``head.norm`` is part of its feature.
    """
    state = {key.removeprefix("module."): value for key, value in state_dict.items()}
    if any(key.startswith("backbone.") for key in state):
        return {key.removeprefix("backbone."): v for key, v in state.items() if key.startswith("backbone.")}
    return {key: v for key, v in state.items() if key in expected or not key.startswith(("head.", "fc."))}


def _resample_pos_embed(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Resample a ViT checkpoint's position embeddings trained on another image size to the model's grid."""
    target = model.state_dict().get("pos_embed")
    pos = state_dict.get("pos_embed")
    if target is None or pos is None or pos.shape == target.shape or pos.shape[-1] != target.shape[-1]:
        return
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(target.shape[1] - 1)
    if old * old != pos.shape[1] - 1:
        return  # not a square grid + CLS: left to the shape check, which reports it
    print(f"Resampling pos_embed from a {old}x{old} to a {new}x{new} patch grid")
    state_dict["pos_embed"] = resample_abs_pos_embed(
        pos, new_size=(new, new), old_size=(old, old), num_prefix_tokens=1, interpolation="bicubic", antialias=False
    )


def load_pretrained_weights(
    model: nn.Module, pretrained_weights: str | None, checkpoint_key: str = "teacher"
) -> nn.Module:
    """Load a backbone from any supported checkpoint into ``model`` (built by :func:`build_backbone`), strictly.

    Accepts this project's ``checkpoint.pth``, the published DINO-MC checkpoints and DINO's official bare
    state dicts (ViT or torchvision names). Missing and unexpected keys are printed; a missing or wrongly
    shaped backbone weight raises ConfigError, because evaluating half-random weights gives plausible but
    meaningless numbers. ``"none"`` keeps the random initialisation on purpose (a baseline).
    """
    if pretrained_weights is None:
        raise ConfigError(
            "--pretrained_weights is required: a checkpoint path, an http(s) URL, a Google Drive link or id, "
            "or 'none' for random weights"
        )
    if pretrained_weights.lower() == "none":
        print("--pretrained_weights none: using randomly initialised weights")
        return model
    path = resolve_weights_path(pretrained_weights)
    state_dict = _strip_prefixes(_pick_state_dict(load_weights_file(path), checkpoint_key, path), model.state_dict())
    state_dict = weight_formats.from_timm(state_dict, model.state_dict())  # timm names (torchgeo, HF hub)
    _resample_pos_embed(model, state_dict)

    expected = model.state_dict()
    # BatchNorm's step counter is unused at evaluation and absent from some older torchvision-format releases.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if unexpected or missing:
        print(f"Keys of {path} against the backbone: {key_mismatch(expected, state_dict)} (unexpected ones ignored)")
    if missing or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} backbone weights missing (first: {missing[0]})")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} with the wrong shape (first: {wrong_shape[0]})")
        raise ConfigError(
            f"--pretrained_weights {pretrained_weights} does not fit this backbone: {'; '.join(problems)}; "
            "check --arch, --patch_size, --bands and --checkpoint_key"
        )
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
    print(f"Pretrained weights found at {path} and loaded ({len(expected)} tensors, key '{checkpoint_key}')")
    return model
