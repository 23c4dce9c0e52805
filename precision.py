"""Numerical precision of a run: the fp32 / bf16 / fp16 choice, autocast and the gradient scaler."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torch.hub

from backbones import is_vit_arch
from checkpoints import load_checkpoint_safely
from cli import bool_flag, warn

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
    runs several times SLOWER than in fp32 (benchmarks/README.md). Other CPUs (ARM, Apple) report False: fp32
    is the safe choice there.
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
            "--precision bf16 on a CPU without native bf16 (no AVX512-BF16 / AMX) runs several times slower than fp32; "
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
