"""DINO, DINO-MC and DINO-TP self-supervised pretraining on satellite imagery.

    python main_dino_mc.py --arch vit_small --patch_size 8 --data_mode mc --data_path DATA --output_dir OUT
    torchrun --nproc_per_node 4 main_dino_mc.py ...   (same flags)

``--data_mode`` picks the method: ``dino`` (2 global + N 96 px local crops), ``mc`` (DINO-MC: local crops of
several sizes) or ``tp`` (DINO-TP: three acquisitions of a location as three teacher views). The training
loop is DINO's; the flags keep the published names and defaults, with the published bugs fixed (docs/differences.md).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import eval_knn
import health
import plot_log
import utils
import vision_transformer as vits
from datasets.bands import parse_bands
from datasets.pretraining import build_data
from datasets.seco_store import is_url
from datasets.transforms import resolve_crop_args
from preemption import PreemptionWatch, agree_on_step, stop_after_preemption

POSITIVE_FLAGS = ("batch_size_per_gpu", "epochs", "out_dim", "print_freq", "knn_every", "knn_nb", "teacher_temp")
NON_NEGATIVE_FLAGS = ("lr", "min_lr", "weight_decay", "weight_decay_end", "clip_grad", "drop_path_rate")
NON_NEGATIVE_FLAGS += ("warmup_epochs", "freeze_last_layer", "num_workers", "saveckp_freq", "checkpoint_every_iters")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DINO-MC", add_help=False)

    # Model parameters
    utils.add_backbone_args(parser)
    parser.add_argument("--out_dim", default=65536, type=int, help="Dimensionality of the DINO head output.")
    parser.add_argument(
        "--norm_last_layer",
        default=True,
        type=utils.bool_flag,
        help="Whether to weight-normalise (freeze the norm of) the head's last layer.",
    )
    parser.add_argument(
        "--momentum_teacher",
        default=0.996,
        type=float,
        help="Base EMA momentum of the teacher, raised to 1 with a cosine schedule.",
    )
    parser.add_argument(
        "--use_bn_in_head",
        default=False,
        type=utils.bool_flag,
        help="Whether to use batch normalisation in the projection head.",
    )
    parser.add_argument(
        "--data_mode",
        default="mc",
        choices=["dino", "mc", "tp"],
        help="dino: DINO multi-crop; mc: DINO-MC multi-sized local crops; tp: DINO-TP temporal "
        "positives (three acquisitions per location, three teacher crops).",
    )

    # Temperature teacher parameters
    parser.add_argument(
        "--warmup_teacher_temp", default=0.04, type=float, help="Initial teacher temperature (linear warm-up start)."
    )
    parser.add_argument("--teacher_temp", default=0.04, type=float, help="Teacher temperature after warm-up.")
    parser.add_argument(
        "--warmup_teacher_temp_epochs", default=0, type=int, help="Epochs of teacher temperature warm-up."
    )

    # Training / optimisation parameters
    utils.add_precision_args(parser)
    utils.add_tensorboard_args(parser)
    parser.add_argument("--weight_decay", type=float, default=0.04, help="Initial weight decay.")
    parser.add_argument("--weight_decay_end", type=float, default=0.4, help="Final weight decay (cosine schedule).")
    parser.add_argument(
        "--clip_grad", type=float, default=3.0, help="Maximal per-parameter gradient norm; 0 disables clipping."
    )
    parser.add_argument("--batch_size_per_gpu", default=8, type=int, help="Images per process and step.")
    parser.add_argument("--epochs", default=300, type=int, help="Number of epochs of training.")
    parser.add_argument(
        "--freeze_last_layer", default=1, type=int, help="Epochs during which the head's last layer is kept fixed."
    )
    parser.add_argument(
        "--lr",
        default=0.0005,
        type=float,
        help="Peak learning rate for a total batch of 256 (scaled linearly with the batch).",
    )
    parser.add_argument("--warmup_epochs", default=10, type=int, help="Epochs of linear learning-rate warm-up.")
    parser.add_argument("--min_lr", type=float, default=1e-6, help="Learning rate at the end of the cosine.")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "lars"], help="Optimizer.")
    parser.add_argument("--drop_path_rate", type=float, default=0.1, help="Stochastic depth rate.")

    # Data and multi-crop parameters
    parser.add_argument(
        "--global_crops_scale",
        type=float,
        nargs=2,
        default=None,
        help="Scale range of global crops. Default: 0.32 1 (mc, tp), 0.4 1 (dino).",
    )
    parser.add_argument(
        "--global_crops_number",
        type=int,
        default=None,
        help="Set by --data_mode (2, or 3 for tp); passing a different value is an error.",
    )
    parser.add_argument(
        "--local_crops_number",
        type=int,
        default=None,
        help="Number of local crops. Default: 6 (mc, tp), 8 (dino); 0 disables multi-crop.",
    )
    parser.add_argument(
        "--global_crops_size",
        type=int,
        default=224,
        help="Side of the global crops (224 as published; smaller values make quick CPU runs such as the demo).",
    )
    parser.add_argument(
        "--size_crops",
        type=int,
        nargs="+",
        default=[184, 164, 144, 124, 104, 84],
        help="Local crop sizes for mc/tp, one crop per size (fewer crops use the smallest).",
    )
    parser.add_argument(
        "--local_crops_scale",
        type=float,
        nargs=2,
        default=None,
        help="Scale range of local crops. Default: 0.05 0.32 (mc, tp), 0.05 0.4 (dino).",
    )
    parser.add_argument(
        "--min_scale_crops", type=float, default=None, help="Published alias of the lower bound of --local_crops_scale."
    )
    parser.add_argument(
        "--max_scale_crops", type=float, default=None, help="Published alias of the upper bound of --local_crops_scale."
    )
    parser.add_argument(
        "--fixed_acquisition",
        default=False,
        type=utils.bool_flag,
        help="mc/dino: keep ONE acquisition per location (the published code's behaviour) "
        "instead of sampling one per access.",
    )
    parser.add_argument(
        "--tp_with_replacement",
        default=False,
        type=utils.bool_flag,
        help="tp: draw the three acquisitions with replacement (the published behaviour).",
    )

    parser.add_argument(
        "--augment_on",
        default="workers",
        choices=["workers", "device"],
        help="Where the crops are resized and colour-augmented: in the loader workers (default), or on the "
        "training device as batched operations, the workers only reading and cutting regions (the same crops "
        "from the same seed; docs/data.md gives the cost of each).",
    )
    parser.add_argument(
        "--shard_shuffle",
        default=False,
        type=utils.bool_flag,
        help="Zarr store only: each epoch, every process reads a block of about 1/world of the store's shards "
        "(blocks and order drawn from --seed and the epoch) instead of locations from the whole store.",
    )

    # Misc
    parser.add_argument(
        "--data_path",
        default=None,
        type=str,
        help="Root of the SeCo-layout GeoTIFF tree, or a Zarr store written by prepare_data.py (a path, or a URL "
        "such as s3://bucket/seco.zarr with the matching fsspec package installed).",
    )
    parser.add_argument("--output_dir", default="output_dir", type=str, help="Where logs and checkpoints go.")
    parser.add_argument("--saveckp_freq", default=20, type=int, help="Keep checkpointNNNN.pth every x epochs.")
    parser.add_argument(
        "--checkpoint_every_iters",
        default=0,
        type=int,
        help="Also write checkpoint.pth every N training iterations, mid-epoch (0 = only at the end of an "
        "epoch, or when SIGUSR2 / SIGTERM announce a preemption). A resumed run continues at that iteration.",
    )
    parser.add_argument(
        "--init_from",
        default=None,
        type=str,
        help="Start a new run (epoch 0) from the weights of a pretraining checkpoint or of a backbone (path, URL or "
        "Drive id); a checkpoint in --output_dir is resumed instead.",
    )
    parser.add_argument(
        "--adapt_input",
        default=None,
        choices=sorted(utils.INPUT_BANDS),
        help="--init_from weights trained on other bands than --bands: rgb (the published checkpoints) or s2.",
    )
    parser.add_argument("--seed", default=0, type=int, help="Random seed.")
    parser.add_argument("--num_workers", default=utils.default_workers(10), type=int, help="Loader workers (<= CPUs).")
    parser.add_argument("--print_freq", default=10, type=int, help="Log a line every this many iterations.")

    # Online k-NN of the teacher (not in DINO): the same protocol as eval_knn.py, during training
    parser.add_argument(
        "--knn_data_path",
        default=None,
        type=str,
        help="A labelled EuroSAT-layout folder: evaluate the teacher by k-NN on it (train vs val split) every "
        "--knn_every epochs and log the top-1 in log.txt.",
    )
    parser.add_argument("--knn_every", default=1, type=int, help="Epochs between two online k-NN evaluations.")
    parser.add_argument("--knn_nb", default=[10, 20], type=int, nargs="+", help="k values of the online k-NN.")
    utils.add_distributed_args(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Validate what can be checked before any work starts; raises ConfigError with a one-line message."""
    with utils.config_errors():
        check_flags(args)


def check_flags(args: argparse.Namespace) -> None:
    if args.data_path is None:
        raise ValueError("--data_path is required (a folder in the SeCo layout, or a store from prepare_data.py)")
    if not is_url(args.data_path) and not Path(args.data_path).is_dir():
        raise ValueError(f"--data_path {args.data_path} is not a folder (a SeCo-layout tree or a Zarr store)")
    args.bands = ",".join(parse_bands("RGB" if args.bands == "RGB_BANDS" else args.bands))
    utils.check_arch(args.arch, args.patch_size)  # fails early on an unknown --arch or ViT --patch_size
    utils.check_numbers(args, POSITIVE_FLAGS, NON_NEGATIVE_FLAGS)
    if args.adapt_input and not args.init_from:
        raise ValueError(f"--adapt_input {args.adapt_input} adapts the weights of --init_from, which is not given")
    if args.knn_data_path is not None and not Path(args.knn_data_path).is_dir():
        raise ValueError(f"--knn_data_path {args.knn_data_path} is not a folder (expected a EuroSAT-layout root)")
    resolve_crop_args(args)


class DINOLoss(nn.Module):
    """DINO's cross-entropy between centred, sharpened teacher outputs and student outputs.

    For every teacher crop i and student crop v != i: sum(-softmax((t_i - c) / T_t) * log_softmax(s_v / T_s)),
    averaged over the batch and then over all (i, v) pairs. ``teacher_crops_number`` is 2 for DINO / DINO-MC
    and 3 for DINO-TP. The centre is an EMA of the mean teacher output, all-reduced across processes when a
    process group exists (so the loss also works in a plain process or a notebook).
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        teacher_crops_number: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.teacher_crops_number = teacher_crops_number
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
            )
        )

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss, and the teacher's centred, sharpened probabilities (the health metrics read them)."""
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_probs = F.softmax((teacher_output.float() - self.center) / temp, dim=-1).detach()
        teacher_out = teacher_probs.chunk(self.teacher_crops_number)

        # sum over v != i of mean_b(-q_i . logp_v) == mean_b(-q_i . (sum_v logp_v - logp_i)): one product per
        # teacher crop instead of one per (teacher, student) pair, over (B, out_dim) = (B, 65536) matrices.
        logp_sum = torch.stack(student_logp).sum(dim=0)
        total_loss = sum(
            torch.sum(-q * (logp_sum - student_logp[iq]), dim=-1).mean() for iq, q in enumerate(teacher_out)
        )
        n_loss_terms = len(teacher_out) * (self.ncrops - 1)  # every pair but the one where both see the same view
        self.update_center(teacher_output)
        return total_loss / n_loss_terms, teacher_probs

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the batch mean of the teacher output over all processes and teacher crops."""
        batch_center = torch.sum(teacher_output.float(), dim=0, keepdim=True)
        count = len(teacher_output)
        if utils.is_dist_avail_and_initialized():
            dist.all_reduce(batch_center)
            count *= dist.get_world_size()
        batch_center = batch_center / count
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def uses_sync_batchnorm(model: nn.Module, args: argparse.Namespace) -> bool:
    """SyncBatchNorm exists on CUDA only: a distributed CPU run keeps per-process BatchNorm statistics."""
    return args.distributed and utils.has_batchnorms(model) and args.device.startswith("cuda")


def build_models(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Student (possibly DDP-wrapped), teacher, and the teacher without its DDP wrapper."""
    in_chans = len(args.bands.split(","))
    student_backbone, embed_dim = utils.build_backbone(args.arch, args.patch_size, in_chans, args.drop_path_rate)
    teacher_backbone, _ = utils.build_backbone(args.arch, args.patch_size, in_chans)
    student = utils.MultiCropWrapper(
        student_backbone,
        vits.DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer),
    )
    teacher = utils.MultiCropWrapper(teacher_backbone, vits.DINOHead(embed_dim, args.out_dim, args.use_bn_in_head))
    student, teacher = student.to(args.device), teacher.to(args.device)
    if not utils.is_vit(student_backbone):
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)

    teacher_without_ddp = teacher
    device_ids = [args.gpu] if args.device.startswith("cuda") else None
    if uses_sync_batchnorm(student, args):
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        # SyncBatchNorm only synchronises inside DDP, hence a DDP wrapper around the teacher too
        teacher = nn.parallel.DistributedDataParallel(teacher, device_ids=device_ids)
        teacher_without_ddp = teacher.module
    if args.distributed:
        student = nn.parallel.DistributedDataParallel(student, device_ids=device_ids)
    student_without_ddp = student.module if args.distributed else student
    teacher_without_ddp.load_state_dict(student_without_ddp.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    print(f"Student and teacher are built: both are {args.arch} networks ({in_chans} input bands).")
    return student, teacher, teacher_without_ddp


def main(args: argparse.Namespace) -> None:
    utils.init_distributed_mode(args)
    check_args(args)
    utils.fix_random_seeds(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    torch.backends.cudnn.benchmark = True
    precision = utils.resolve_precision(args, args.device, output_dir / "checkpoint.pth")

    # ============ data, models, loss, optimizer, schedules ============
    dataset, data_loader, to_crops = build_data(args)
    total_batch = args.batch_size_per_gpu * args.world_size
    note = health.small_batch_advice(total_batch, args.momentum_teacher, args.local_crops_number)
    if note:
        print(note)
    bands = args.bands.split(",")  # canonical names, as check_args left them
    knn_sets = None
    if args.knn_data_path:
        with utils.config_errors("--knn_data_path"):
            knn_sets = eval_knn.knn_splits(args.knn_data_path, bands, args.global_crops_size, seed=args.seed)
        args.knn_nb = eval_knn.clamp_nb_knn(args.knn_nb, len(knn_sets[0]), "--knn_nb")
    student, teacher, teacher_without_ddp = build_models(args)
    student_without_ddp = student.module if args.distributed else student
    if args.init_from and not (output_dir / "checkpoint.pth").is_file():  # a resumed run continues its own
        utils.init_from_checkpoint(args.init_from, student_without_ddp, teacher_without_ddp, bands, args.adapt_input)
    ncrops = args.global_crops_number + args.local_crops_number
    dino_loss = DINOLoss(
        args.out_dim,
        ncrops,
        args.warmup_teacher_temp,
        args.teacher_temp,
        args.warmup_teacher_temp_epochs,
        args.epochs,
        teacher_crops_number=args.global_crops_number,
    ).to(args.device)
    optimizer = utils.build_optimizer(args.optimizer, utils.get_params_groups(student))
    fp16_scaler = utils.make_grad_scaler(precision, args.device)
    niter = len(data_loader)
    lr_schedule = utils.cosine_scheduler(
        args.lr * (args.batch_size_per_gpu * args.world_size) / 256.0,
        args.min_lr,
        args.epochs,
        niter,
        warmup_epochs=args.warmup_epochs,
    )
    wd_schedule = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter)
    momentum_schedule = utils.cosine_scheduler(args.momentum_teacher, 1, args.epochs, niter)
    print(f"Loss, optimizer and schedulers ready (precision {precision}).")

    # ============ resume ============
    to_restore = {"epoch": 0, "iteration": 0, "meters": {}, "rng_state": None, "args": {}}
    stateful = {"student": student, "teacher": teacher, "optimizer": optimizer, "dino_loss": dino_loss}
    stateful |= {"fp16_scaler": fp16_scaler} if fp16_scaler is not None else {}
    utils.restart_from_checkpoint(output_dir / "checkpoint.pth", run_variables=to_restore, **stateful)
    start_epoch, start_iteration = to_restore["epoch"], utils.resume_iteration(to_restore, args, niter)
    tensorboard = utils.resume_logs(output_dir, args.tensorboard, start_epoch)
    if to_restore["rng_state"] is not None:
        utils.restore_rng_state(to_restore["rng_state"], args.seed, start_epoch, args.device)

    def save(epoch: int, iteration: int, meters: dict) -> dict:
        """checkpoint.pth to resume from at ``iteration`` of ``epoch`` (0: the epoch's start), with the epoch's
        running averages so far; every rank calls it, since the RNG states are gathered."""
        save_dict = {name: value.state_dict() for name, value in stateful.items()}
        save_dict |= {"epoch": epoch, "iteration": iteration, "meters": meters, "args": utils.plain_args(args)}
        save_dict["rng_state"] = utils.gather_rng_states(args.device)
        utils.save_on_master(save_dict, output_dir / "checkpoint.pth")
        return save_dict

    ema_pairs = (list(teacher_without_ddp.parameters()), list(student_without_ddp.parameters()))
    watch = PreemptionWatch()  # before the loader's workers are forked: they inherit its handler
    start_time = time.time()
    print(f"Starting {args.data_mode} training from epoch {start_epoch}, iteration {start_iteration}.")
    try:
        for epoch in range(start_epoch, args.epochs):
            first_iteration = start_iteration if epoch == start_epoch else 0
            data_loader.sampler.set_epoch(epoch, first_iteration)
            train_stats = train_one_epoch(
                student, teacher, ema_pairs, dino_loss, data_loader, optimizer, lr_schedule, wd_schedule,
                momentum_schedule, epoch, fp16_scaler, precision, args, first_iteration=first_iteration,
                meters=to_restore["meters"] if first_iteration else {}, watch=watch, save=save, to_crops=to_crops,
            )  # fmt: skip
            warning = health.collapse_warning(
                train_stats, args.out_dim, epoch, args.batch_size_per_gpu, args.norm_last_layer, precision
            )
            if warning:
                print(warning, flush=True)
            log_stats = {f"train_{k}": v for k, v in train_stats.items()}
            log_stats.update(epoch=epoch, step=(epoch + 1) * niter, out_dim=args.out_dim)  # steps trained so far
            if knn_sets is not None and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
                batch = max(args.batch_size_per_gpu, 32)
                top1 = eval_knn.knn_top1(
                    teacher_without_ddp.backbone, teacher_without_ddp.head.in_dim, knn_sets, args.knn_nb,
                    args.device, batch, args.print_freq, "Online k-NN:",
                )  # fmt: skip
                print("Online k-NN top-1: " + ", ".join(f"k={k} {acc:.2f}" for k, acc in top1.items()))
                log_stats.update({f"knn_top1_k{k}": acc for k, acc in top1.items()})
            if utils.is_main_process():  # the log line first: a kill before the checkpoint leaves a line to trim
                utils.append_json_log(output_dir / "log.txt", log_stats)
                tensorboard.write(log_stats, epoch)
                plot_log.plot_logs(
                    [plot_log.read_log(output_dir / "log.txt")], [""], output_dir / "training_curves.png"
                )
            save_dict = save(epoch + 1, 0, {})
            if args.saveckp_freq and epoch % args.saveckp_freq == 0:
                utils.save_on_master(save_dict, output_dir / f"checkpoint{epoch:04d}.pth")
            if watch.agreed and epoch + 1 < args.epochs:
                stop_after_preemption(watch, epoch + 1, 0)
    finally:
        watch.restore()
    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    print(f"Training time {total_time}")
    tensorboard.close()


def train_one_epoch(
    student: nn.Module,
    teacher: nn.Module,
    ema_pairs: tuple[list[nn.Parameter], list[nn.Parameter]],
    dino_loss: DINOLoss,
    data_loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    lr_schedule: np.ndarray,
    wd_schedule: np.ndarray,
    momentum_schedule: np.ndarray,
    epoch: int,
    fp16_scaler: torch.amp.GradScaler | None,
    precision: str,
    args: argparse.Namespace,
    *,
    first_iteration: int,
    meters: dict,
    watch: PreemptionWatch,
    save: Callable[[int, int, dict], dict],
    to_crops: Callable[[Any], list[torch.Tensor]] | None = None,
) -> dict:
    """One epoch from ``first_iteration`` on (a resumed preempted run), the running averages continued from
    ``meters``; mid-epoch ``save`` every --checkpoint_every_iters iterations and on a preemption. ``to_crops``
    turns a loaded batch into the crops on the device (default: the loader's crops, moved there). ``ema_pairs``:
    the teacher's and the student's parameters, in matching order. Returns the epoch's averaged statistics."""
    metric_logger = utils.MetricLogger(delimiter="  ")
    for name in health.STEP_METRICS:  # averaged over each --print_freq window in the console line
        metric_logger.add_meter(name, utils.SmoothedValue(window_size=args.print_freq, fmt="{avg:.3f}"))
    usage = health.PrototypeUsage(args.out_dim, args.device)
    for name, (total, count) in meters.items():
        metric_logger.meters[name].total, metric_logger.meters[name].count = total, count
    header = f"Epoch: [{epoch}/{args.epochs}]"
    teacher_params, student_params = ema_pairs
    niter = len(lr_schedule) // args.epochs  # iterations of a whole epoch
    batches = metric_logger.log_every(data_loader, args.print_freq, header)
    for epoch_it, images in enumerate(batches, start=first_iteration):
        it = niter * epoch + epoch_it  # global training iteration
        for i, param_group in enumerate(optimizer.param_groups):
            param_group["lr"] = float(lr_schedule[it])  # Python floats: the checkpoint loads with torch.load
            if i == 0:  # only the first group is regularised
                param_group["weight_decay"] = float(wd_schedule[it])

        if to_crops is None:
            images = [im.to(args.device, non_blocking=True) for im in images]
        else:
            images = to_crops(images)
        with utils.autocast(precision, args.device):
            # only the global views go to the teacher; its backbone features feed the health metrics
            teacher_output, teacher_features = teacher(images[: args.global_crops_number], return_features=True)
            student_output = student(images)
            loss, teacher_probs = dino_loss(student_output, teacher_output, epoch)
        signals, winners = health.step_metrics(teacher_probs, loss, teacher_features, args.global_crops_number)
        usage.update(winners)

        loss_value, not_finite, signal_values = agree_on_step(loss, watch, signals)
        if not_finite:
            print(
                f"Loss is {loss_value} at epoch {epoch}, iteration {it} (not finite on {not_finite} of "
                f"{utils.get_world_size()} processes): stopping training. The last good checkpoint in "
                f"{args.output_dir} is left as it was."
            )
            sys.exit(1)

        optimizer.zero_grad(set_to_none=True)
        if fp16_scaler is None:
            loss.backward()
        else:
            fp16_scaler.scale(loss).backward()
            fp16_scaler.unscale_(optimizer)  # clip the true gradients
        if args.clip_grad:
            utils.clip_gradients(student, args.clip_grad)
        utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        if fp16_scaler is None:
            optimizer.step()
        else:
            fp16_scaler.step(optimizer)
            fp16_scaler.update()

        with torch.no_grad():  # EMA of the teacher, m * t + (1 - m) * s as one foreach lerp over all parameters
            torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum_schedule[it])

        metric_logger.update(loss=loss_value)
        metric_logger.update(**dict(zip(health.STEP_METRICS, signal_values)))
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        metric_logger.update(wd=optimizer.param_groups[0]["weight_decay"])
        metric_logger.update(momentum=float(momentum_schedule[it]))

        done = epoch_it + 1  # iterations of this epoch trained; the last one is saved by the caller
        every = args.checkpoint_every_iters
        if done < niter and (watch.agreed or (every and (it + 1) % every == 0)):
            # The meters are equal on every rank (the loss is the all-reduced mean): rank 0's are saved.
            save(epoch, done, {name: [m.total, m.count] for name, m in metric_logger.meters.items()})
            if watch.agreed:
                stop_after_preemption(watch, epoch, done)
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats["prototypes_used"] = usage.count()  # of the iterations this process ran (after a resume: since then)
    return stats


def run(argv: list[str] | None = None) -> None:
    utils.run_cli("DINO-MC pretraining", get_args_parser, main, argv)


if __name__ == "__main__":
    run()
