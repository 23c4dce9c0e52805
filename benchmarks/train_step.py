"""Time one DINO-MC training step (model only, no data loading) and print one JSON line.

    python benchmarks/train_step.py --arch vit_small --patch_size 16 --data_mode mc --threads 2
    python benchmarks/train_step.py --arch vit_small --patch_size 16 --impl published --threads 2
    python benchmarks/train_step.py --arch vit_small --patch_size 16 --precision bf16 --threads 2

``--impl current`` times the step users run: the models, loss and optimizer come from main_dino_mc's own
builders and the step is ``main_dino_mc.train_one_epoch`` itself, fed the same pre-made random crops (of the
mode's sizes) every iteration and timed between iterations. So the figure is what training costs, not a
re-implementation's.

``--impl published`` reproduces how the published DINO / DINO-MC code runs the same maths, for a speed-up
measured on the same machine against the same work: one backbone pass per distinct crop size (no packing),
attention as an explicit softmax(QK^T / sqrt(d)) V, per-parameter Python loops for gradient clipping and the
teacher EMA, AdamW without foreach, CNNs in the default (channels-first) memory format.

The first ``--warmup`` steps are dropped (allocator and oneDNN warm-up); ``step_ms_median`` is over ``--steps``.
One more, untimed, step runs under ``torch.utils.flop_counter.FlopCounterMode``: the model FLOPs of a step
(matrix products, convolutions, attention: what MFU counts) give ``achieved_tflops``, and ``mfu`` where the
device's peak is known (``--peak_tflops``, or the data-sheet table below for NVIDIA cards at bf16/fp16).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main_dino_mc  # noqa: E402
import preemption
import utils  # noqa: E402
import vision_transformer as vits  # noqa: E402
from datasets import pretraining, transforms

# Dense bf16/fp16 tensor-core peak of NVIDIA cards in TFLOP/s (NVIDIA data sheets, no sparsity), matched in order
# against torch.cuda.get_device_name(); for other devices and precisions pass --peak_tflops.
GPU_PEAK_TFLOPS = [
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H100", 989.4),
    ("H200 NVL", 835.5),
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("RTX 4090", 165.2),
    ("L4", 121.0),
]


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The four products of attention's backward; the flop counter adds the fused kernels' recomputation of
    q k^T, which model FLOPs (and MFU) leave out and the explicit-softmax path does not run."""
    b, heads, n_q, d = query
    recomputed_scores = bmm_flop((b * heads, n_q, d), (b * heads, d, key[2]))
    return sdpa_backward_flop_count(grad_out, query, key, value) - recomputed_scores


# Fused attention counted as model FLOPs (arguments arrive as shapes): PyTorch's CPU flash kernels (fp32 SDPA on
# a CPU) are missing from the flop counter's table, and its backward formulas count the recomputation.
ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_backward: _attention_backward_flops,
    torch.ops.aten._scaled_dot_product_efficient_attention_backward: _attention_backward_flops,
    torch.ops.aten._scaled_dot_product_cudnn_attention_backward: _attention_backward_flops,
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DINO-MC training-step benchmark", add_help=False)
    utils.add_backbone_args(parser, arch="vit_small", patch_size=16)
    parser.add_argument("--data_mode", default="mc", choices=["dino", "mc", "tp"], help="Crop sizes and counts.")
    parser.add_argument("--global_crops_size", default=224, type=int, help="Side of the global crops.")
    parser.add_argument(
        "--size_crops", default=None, type=int, nargs="+", help="Local crop sizes (default: main_dino_mc's)."
    )
    parser.add_argument("--batch_size_per_gpu", default=8, type=int, help="Images per step.")
    parser.add_argument("--out_dim", default=65536, type=int, help="DINO head output dimension.")
    utils.add_precision_args(parser)
    parser.add_argument("--steps", default=5, type=int, help="Timed steps (the median is reported).")
    parser.add_argument("--warmup", default=1, type=int, help="Untimed steps before the timed ones.")
    parser.add_argument("--threads", default=None, type=int, help="torch.set_num_threads; default: torch's own.")
    parser.add_argument("--device", default="cpu", type=str, help="cpu or cuda[:N].")
    parser.add_argument(
        "--impl",
        default="current",
        choices=["current", "published"],
        help="current: main_dino_mc.train_one_epoch; published: the published code's way (see the module doc).",
    )
    parser.add_argument(
        "--pack_crops",
        default=True,
        type=utils.bool_flag,
        help="current: run all crops of a ViT in one packed backbone pass (false: one pass per crop size).",
    )
    parser.add_argument("--seed", default=0, type=int, help="Seed of the weights and of the random crops.")
    parser.add_argument(
        "--peak_tflops",
        default=None,
        type=float,
        help="Peak TFLOP/s of the device at --precision, for mfu (default: the data-sheet figure of known GPUs).",
    )
    return parser


def training_args(args: argparse.Namespace) -> argparse.Namespace:
    """main_dino_mc's own argument defaults, with the benchmark's model, crop and precision settings."""
    train_args = main_dino_mc.get_args_parser().parse_args([])
    for name in ("arch", "patch_size", "bands", "data_mode", "batch_size_per_gpu", "out_dim", "device", "precision"):
        setattr(train_args, name, getattr(args, name))
    train_args.global_crops_size = args.global_crops_size
    train_args.size_crops = args.size_crops or train_args.size_crops
    train_args.bands = ",".join(main_dino_mc.parse_bands("RGB" if args.bands == "RGB_BANDS" else args.bands))
    train_args.distributed = False
    train_args.epochs = 2  # the timed epoch is epoch 1, past --freeze_last_layer: the prototypes train too
    train_args.print_freq = 10**9
    transforms.resolve_crop_args(train_args)
    return train_args


def make_crops(args: argparse.Namespace, train_args: argparse.Namespace) -> list[torch.Tensor]:
    """One batch of normalised-looking random crops in the sizes the mode's augmentation produces."""
    sizes = pretraining.build_transform(train_args).crop_sizes
    in_chans = len(train_args.bands.split(","))
    generator = torch.Generator().manual_seed(args.seed)
    crops = [torch.randn(args.batch_size_per_gpu, in_chans, s, s, generator=generator) for s in sizes]
    return [c.to(args.device) for c in crops]


class TimedBatches:
    """The same batch ``n`` times, then once more with FLOPs counted, as a sized iterable; records the clocks each
    time the loop asks for more.

    Consecutive time stamps bracket exactly one iteration of the training loop that consumes it. Besides wall
    time it records this process's CPU time (all threads): on a shared machine other jobs stretch the wall
    time of a step but hardly its CPU time, so CPU time compares two implementations more reliably. The last,
    untimed, iteration runs under a flop counter (it slows every operation down, so it is never timed).
    """

    def __init__(self, batch: list[torch.Tensor], n: int, device: torch.device):
        self.batch, self.n, self.device = batch, n, device
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []
        self.flop_counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)

    def __len__(self) -> int:
        return self.n + 1

    def _stamp(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())

    def __iter__(self):
        for _ in range(self.n):
            self._stamp()
            yield self.batch
        self._stamp()
        with self.flop_counter:  # active while the loop runs the step on this batch, until it asks for more
            yield self.batch


def explicit_attention(self: vits.Attention, x: torch.Tensor) -> torch.Tensor:
    """DINO's published attention: the full softmax matrix materialised, then multiplied with V."""
    B, N, C = x.shape
    q, k, v = self._qkv(x)
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    attn = nn.functional.dropout(attn, self.attn_drop, self.training)
    return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))


def materialised_weight_norm(self: vits.WeightNormLinear, x: torch.Tensor) -> torch.Tensor:
    """nn.utils.weight_norm as the published head ran it: the (out, in) weight g * v / ||v|| built every call."""
    return nn.functional.linear(x, self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True)))


def to_published(model: nn.Module) -> None:
    """Make a built wrapper run as the published code did: per-size passes, explicit attention, a materialised
    weight-normalised last layer, ``nn.Dropout(0.0)`` layers (which copy their input), NCHW CNNs."""
    model.pack_crops = False
    for module in list(model.modules()):
        for name in ("drop", "proj_drop", "pos_drop"):
            if isinstance(getattr(module, name, None), nn.Identity):
                setattr(module, name, nn.Dropout(0.0))
        if isinstance(module, vits.Attention):
            module.forward = types.MethodType(explicit_attention, module)
        elif isinstance(module, vits.WeightNormLinear):
            module.forward = types.MethodType(materialised_weight_norm, module)
    model.to(memory_format=torch.contiguous_format)


def published_epoch(student, teacher, dino_loss, batches, optimizer, lr, wd, momentum, epoch, precision, args):
    """The published DINO train_one_epoch step, loops as written there (Python loops over parameters)."""
    for images in batches:
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        with utils.autocast(precision, args.device):
            teacher_output = teacher(images[: args.global_crops_number])
            student_output = student(images)
            loss, _ = dino_loss(student_output, teacher_output, epoch)
        loss.item()
        optimizer.zero_grad()
        loss.backward()
        for p in student.parameters():  # DINO's utils.clip_gradients
            if p.grad is not None:
                clip_coef = args.clip_grad / (p.grad.data.norm(2) + 1e-6)
                if clip_coef < 1:
                    p.grad.data.mul_(clip_coef)
        utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        optimizer.step()
        with torch.no_grad():
            for param_q, param_k in zip(student.parameters(), teacher.parameters(), strict=True):
                param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)


def run_steps(args: argparse.Namespace) -> dict:
    train_args = training_args(args)
    device = torch.device(args.device)
    precision = utils.resolve_precision(train_args, device)
    if device.type == "cpu" and args.impl == "current":
        utils.keep_freed_memory()  # as utils.init_distributed_mode does for every CPU run of the scripts
    torch.manual_seed(args.seed)
    with contextlib.redirect_stdout(sys.stderr):  # the JSON line is the only thing on stdout
        student, teacher, teacher_without_ddp = main_dino_mc.build_models(train_args)
    student.pack_crops = teacher.pack_crops = args.pack_crops
    ncrops = train_args.global_crops_number + train_args.local_crops_number
    dino_loss = main_dino_mc.DINOLoss(
        args.out_dim,
        ncrops,
        train_args.warmup_teacher_temp,
        train_args.teacher_temp,
        train_args.warmup_teacher_temp_epochs,
        train_args.epochs,
        teacher_crops_number=train_args.global_crops_number,
    ).to(device)
    params_groups = utils.get_params_groups(student)
    lr = train_args.lr * args.batch_size_per_gpu / 256.0
    wd, momentum, epoch = train_args.weight_decay, train_args.momentum_teacher, 1
    batches = TimedBatches(make_crops(args, train_args), args.warmup + args.steps, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    if args.impl == "published":
        to_published(student)
        to_published(teacher)
        optimizer = torch.optim.AdamW(params_groups, foreach=False)
        published_epoch(student, teacher, dino_loss, batches, optimizer, lr, wd, momentum, epoch, precision, train_args)
    else:
        optimizer = utils.build_optimizer(train_args.optimizer, params_groups)
        n = len(batches)
        schedules = [np.full(n * train_args.epochs, v) for v in (lr, wd, momentum)]
        ema_pairs = (list(teacher_without_ddp.parameters()), list(student.parameters()))
        fp16_scaler = utils.make_grad_scaler(precision, device)
        watch = preemption.PreemptionWatch()
        with contextlib.redirect_stdout(sys.stderr):
            try:
                main_dino_mc.train_one_epoch(
                    student, teacher, ema_pairs, dino_loss, batches, optimizer, *schedules,
                    epoch, fp16_scaler, precision, train_args,
                    first_iteration=0, meters={}, watch=watch, save=lambda *_: {},
                )  # fmt: skip
            finally:
                watch.restore()

    step_ms = np.diff(batches.stamps)[args.warmup :] * 1000.0
    cpu_ms = np.diff(batches.cpu_stamps)[args.warmup :] * 1000.0
    median_ms = float(np.median(step_ms))
    result = {
        "arch": args.arch,
        "patch_size": args.patch_size,
        "bands": train_args.bands,
        "data_mode": args.data_mode,
        "crop_sizes": [int(c.shape[-1]) for c in batches.batch],
        "batch_size_per_gpu": args.batch_size_per_gpu,
        "out_dim": args.out_dim,
        "precision": precision,
        "impl": args.impl,
        "pack_crops": bool(args.pack_crops and args.impl == "current" and utils.is_vit(student.backbone)),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "step_ms_median": round(median_ms, 1),
        "step_ms_min": round(float(step_ms.min()), 1),
        "imgs_per_s": round(args.batch_size_per_gpu * 1000.0 / median_ms, 3),
        "step_cpu_ms_median": round(float(np.median(cpu_ms)), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
    }
    flops = batches.flop_counter.get_total_flops()
    achieved_tflops = flops / 1e12 / (median_ms / 1000.0)
    result["gflop_per_step"] = round(flops / 1e9, 2)
    result["achieved_tflops"] = round(achieved_tflops, 4)
    if device.type == "cuda":
        result["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 1024.0**2, 1)
        result["gpu"] = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or data_sheet_peak_tflops(device, precision)
    result["peak_tflops"] = peak
    result["mfu"] = round(achieved_tflops / peak, 4) if peak else None
    return result


def data_sheet_peak_tflops(device: torch.device, precision: str) -> float | None:
    """The card's dense tensor-core peak for bf16/fp16 from GPU_PEAK_TFLOPS; None where it is not known."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key in name), None)


def main(args: argparse.Namespace) -> None:
    if args.steps < 1 or args.warmup < 0 or args.batch_size_per_gpu < 1:
        raise utils.ConfigError("--steps and --batch_size_per_gpu must be >= 1 and --warmup >= 0")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise utils.ConfigError(f"--peak_tflops must be > 0, got {args.peak_tflops}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise utils.ConfigError(f"--device must be cpu or cuda[:N], got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise utils.ConfigError(f"--device {args.device}: torch sees no CUDA device on this machine")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with utils.config_errors():
        utils.build_backbone(args.arch, args.patch_size)
    print(json.dumps(run_steps(args)), flush=True)


def run(argv: list[str] | None = None) -> None:
    utils.run_cli("DINO-MC training-step benchmark", get_args_parser, main, argv)


if __name__ == "__main__":
    run()
