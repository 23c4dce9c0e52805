"""DINO, DINO-MC and DINO-TP self-supervised pretraining on satellite imagery.

    python main_dino_mc.py --arch vit_small --patch_size 8 --data_mode mc --data_path DATA --output_dir OUT
    torchrun --nproc_per_node 4 main_dino_mc.py ...   (same flags)

``--data_mode`` picks the method: ``dino`` (2 global + N 96 px local crops), ``mc`` (DINO-MC: local crops of
several sizes) or ``tp`` (DINO-TP: three acquisitions of a location as three teacher views). The training
loop is DINO's; the flags keep the published names and defaults, with the published bugs fixed (README).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import signal
import sys
import threading
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
from datasets import device_augment, eurosat
from datasets.bands import parse_bands
from datasets.device_augment import DeviceAugment, RegionCutter
from datasets.seco import SeCoDataset
from datasets.seco_store import SeCoStore, is_url
from datasets.transforms import MultiCropAugmentation, eval_transform

# Per-mode defaults of the crop flags (None on the command line = take these). mc/tp are the published
# DINO-MC defaults; dino is DINO's own multi-crop.
MODE_DEFAULTS = {
    "dino": {"global_crops_scale": (0.4, 1.0), "local_crops_scale": (0.05, 0.4), "local_crops_number": 8},
    "mc": {"global_crops_scale": (0.32, 1.0), "local_crops_scale": (0.05, 0.32), "local_crops_number": 6},
    "tp": {"global_crops_scale": (0.32, 1.0), "local_crops_scale": (0.05, 0.32), "local_crops_number": 6},
}
GLOBAL_CROPS_NUMBER = {"dino": 2, "mc": 2, "tp": 3}
# What SLURM sends before it stops a job (SIGUSR2 --signal_delay_s before a timeout, SIGTERM on preemption or
# scancel), and what torchrun forwards to its workers when it is stopped.
PREEMPTION_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
PREEMPTED_EXIT_CODE = 3  # 1: a crash or a non-finite loss, 2: bad arguments


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
    parser.add_argument("--seed", default=0, type=int, help="Random seed.")
    parser.add_argument("--num_workers", default=10, type=int, help="Data loading workers per process.")
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


def resolve_crop_args(args: argparse.Namespace) -> None:
    """Fill the mode-dependent crop defaults; the crop flags are validated by the augmentation itself."""
    defaults = MODE_DEFAULTS[args.data_mode]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.min_scale_crops is not None or args.max_scale_crops is not None:
        low, high = args.local_crops_scale
        args.local_crops_scale = (
            args.min_scale_crops if args.min_scale_crops is not None else low,
            args.max_scale_crops if args.max_scale_crops is not None else high,
        )
    if args.global_crops_number is None:
        args.global_crops_number = GLOBAL_CROPS_NUMBER[args.data_mode]
    args.global_crops_scale = tuple(args.global_crops_scale)
    args.local_crops_scale = tuple(args.local_crops_scale)


def check_args(args: argparse.Namespace) -> None:
    """Validate what can be checked before any work starts; raises ConfigError with a one-line message."""
    with utils.config_errors():
        _check_args(args)


def _check_args(args: argparse.Namespace) -> None:
    if args.data_path is None:
        raise ValueError("--data_path is required (a folder in the SeCo layout, or a store from prepare_data.py)")
    if not is_url(args.data_path) and not Path(args.data_path).is_dir():
        raise ValueError(f"--data_path {args.data_path} is not a folder (a SeCo-layout tree or a Zarr store)")
    args.bands = ",".join(parse_bands("RGB" if args.bands == "RGB_BANDS" else args.bands))
    utils.check_arch(args.arch, args.patch_size)  # fails early on an unknown --arch or ViT --patch_size
    if args.batch_size_per_gpu < 1 or args.epochs < 1:
        raise ValueError("--batch_size_per_gpu and --epochs must be positive")
    if args.knn_data_path is not None and not Path(args.knn_data_path).is_dir():
        raise ValueError(f"--knn_data_path {args.knn_data_path} is not a folder (expected a EuroSAT-layout root)")
    if args.knn_every < 1:
        raise ValueError(f"--knn_every must be >= 1, got {args.knn_every}")
    if args.checkpoint_every_iters < 0:
        raise ValueError(f"--checkpoint_every_iters must be >= 0 (0 = off), got {args.checkpoint_every_iters}")
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

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        self.teacher_probs = F.softmax((teacher_output.float() - self.center) / temp, dim=-1).detach()
        teacher_out = self.teacher_probs.chunk(self.teacher_crops_number)  # kept for the health metrics

        # sum over v != i of mean_b(-q_i . logp_v) == mean_b(-q_i . (sum_v logp_v - logp_i)): one product per
        # teacher crop instead of one per (teacher, student) pair, over (B, out_dim) = (B, 65536) matrices.
        logp_sum = torch.stack(student_logp).sum(dim=0)
        total_loss = sum(
            torch.sum(-q * (logp_sum - student_logp[iq]), dim=-1).mean() for iq, q in enumerate(teacher_out)
        )
        n_loss_terms = len(teacher_out) * (self.ncrops - 1)  # every pair but the one where both see the same view
        self.update_center(teacher_output)
        return total_loss / n_loss_terms

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


def build_transform(args: argparse.Namespace) -> MultiCropAugmentation:
    """The multi-crop augmentation of the mode; it validates the crop flags (ConfigError names the flag)."""
    with utils.config_errors():
        return MultiCropAugmentation(
            args.data_mode,
            args.bands.split(","),
            global_crops_scale=args.global_crops_scale,
            local_crops_scale=args.local_crops_scale,
            local_crops_number=args.local_crops_number,
            size_crops=args.size_crops,
            global_size=args.global_crops_size,
            global_crops_number=args.global_crops_number,
        )


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler whose items are (index, sample seed) pairs, and which can start an epoch mid-way.

    Why: the seed of a sample is a hash of (--seed, epoch, its position in the epoch's global order), and the
    sample's augmentations are drawn from it (:class:`SeededSamples`) in whichever worker loads it. The data
    stream is then a pure function of the run's seed, epoch and iteration, whatever the number of workers
    and whatever a restart did to their generators. ``set_epoch(epoch, start_iteration)`` skips the batches a
    preempted run already trained on, so a resumed run sees exactly the samples the uninterrupted one saw.
    """

    def __init__(self, dataset, batch_size: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.batch_size = batch_size
        self.start = 0

    def set_epoch(self, epoch: int, start_iteration: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start_iteration * self.batch_size

    def rank_order(self) -> tuple[list[int], list[int]]:
        """This rank's indices for the epoch and their positions in the epoch's global order."""
        indices = list(super().__iter__())  # this rank's share: positions rank, rank + world, rank + 2 world, ...
        return indices, [self.rank + local * self.num_replicas for local in range(len(indices))]

    def __iter__(self):
        indices, positions = self.rank_order()
        for local in range(self.start, len(indices)):
            yield indices[local], utils.derive_seed("sample", self.seed, self.epoch, positions[local])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardBlockSampler(ResumableSampler):
    """``--shard_shuffle``: each epoch the store's shards are put in a shuffled order and cut into one block
    per rank, and a rank draws its samples from its block only, in a shuffled order.

    Why: on a shared file system or object storage a rank then opens about 1/world of the shard files per
    epoch instead of all of them, and reads each from few processes. Both shuffles are drawn from (--seed,
    epoch) and the rank, so the order stays a pure function of them and a resumed run continues exactly.
    """

    def __init__(self, dataset, shard_of_location: list[int], batch_size: int, **kwargs):
        super().__init__(dataset, batch_size, **kwargs)
        self.by_shard: dict[int, list[int]] = {}
        for location, shard in enumerate(shard_of_location):
            self.by_shard.setdefault(shard, []).append(location)

    def rank_order(self) -> tuple[list[int], list[int]]:
        shards = sorted(self.by_shard)
        generator = torch.Generator().manual_seed(utils.derive_seed("shards", self.seed, self.epoch))
        order = [
            location for i in torch.randperm(len(shards), generator=generator) for location in self.by_shard[shards[i]]
        ]
        order = (order * -(-self.total_size // len(order)))[: self.total_size]  # equal shares, as DistributedSampler
        first = self.rank * self.num_samples
        block = order[first : first + self.num_samples]
        generator.manual_seed(utils.derive_seed("block", self.seed, self.epoch, self.rank))
        shuffled = torch.randperm(len(block), generator=generator).tolist()
        return [block[i] for i in shuffled], [first + local for local in range(len(block))]


class SeededSamples(torch.utils.data.Dataset):
    """``dataset[index]`` drawn with torch's CPU generator seeded from the sample's seed (the keys of
    :class:`ResumableSampler`). Everything SeCoDataset and its augmentation draw comes from that generator;
    the caller's state is restored afterwards, since in the main process (``--num_workers 0``) it also drives
    dropout and drop-path. Only the CPU generator is seeded: ``torch.manual_seed`` would also reseed every CUDA
    generator, which ``fork_rng(devices=[])`` does not restore, and reset drop-path's stream on a GPU at
    every sample."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def build_data(
    args: argparse.Namespace,
) -> tuple[SeCoDataset, torch.utils.data.DataLoader, Callable[[Any], list[torch.Tensor]] | None]:
    """The dataset, its loader, and with --augment_on device the function that makes a loaded batch's crops on
    the device (the workers then only draw and cut regions; None: the loader's batches are the crops)."""
    aug = build_transform(args)
    transform, collate_fn, to_crops = aug, None, None
    if args.augment_on == "device":
        transform, collate_fn = RegionCutter(aug), device_augment.collate
        to_crops = functools.partial(DeviceAugment(aug), device=args.device)
    bands = args.bands.split(",")
    dataset = SeCoDataset(
        args.data_path,
        bands=bands,
        data_mode=args.data_mode,
        transform=transform,
        fixed_acquisition=args.fixed_acquisition,
        tp_with_replacement=args.tp_with_replacement,
        seed=args.seed,
    )
    ranks = {"num_replicas": args.world_size, "rank": args.rank, "shuffle": True, "seed": args.seed}
    if args.shard_shuffle:
        if not isinstance(dataset.source, SeCoStore):
            raise utils.ConfigError(f"--shard_shuffle needs a Zarr store (prepare_data.py); {args.data_path} is a tree")
        shards = [dataset.source.shard_of_location(i) for i in range(len(dataset))]
        sampler = ShardBlockSampler(dataset, shards, args.batch_size_per_gpu, **ranks)
    else:
        sampler = ResumableSampler(dataset, args.batch_size_per_gpu, **ranks)
    loader = torch.utils.data.DataLoader(
        SeededSamples(dataset),
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        collate_fn=collate_fn,
        num_workers=args.num_workers,
        pin_memory=args.device.startswith("cuda"),
        drop_last=True,
        persistent_workers=args.num_workers > 0,
        # The workers' base seed is drawn from this generator, not from the global one: a resumed run creates
        # its workers at another point of the global stream, which drop-path must not notice.
        generator=torch.Generator().manual_seed(args.seed),
    )
    if len(loader) == 0:
        raise utils.ConfigError(
            f"--data_path {args.data_path} has {len(dataset)} locations, fewer than one batch of "
            f"{args.batch_size_per_gpu} x {args.world_size} processes"
        )
    print(f"Data loaded: {len(dataset)} locations, {len(loader)} iterations per epoch, bands {args.bands}.")
    return dataset, loader, to_crops


def uses_sync_batchnorm(model: nn.Module, args: argparse.Namespace) -> bool:
    """Whether the BatchNorm layers of a distributed run are synchronised across processes: on CUDA only,
    where torch implements SyncBatchNorm (a CPU run keeps per-process statistics)."""
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
    knn_sets = build_knn_sets(args) if args.knn_data_path else None
    student, teacher, teacher_without_ddp = build_models(args)
    student_without_ddp = student.module if args.distributed else student
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
    utils.restart_from_checkpoint(
        output_dir / "checkpoint.pth",
        run_variables=to_restore,
        student=student,
        teacher=teacher,
        optimizer=optimizer,
        fp16_scaler=fp16_scaler,
        dino_loss=dino_loss,
    )
    start_epoch, start_iteration = to_restore["epoch"], resume_iteration(to_restore, args, niter)
    if utils.is_main_process():
        utils.trim_json_log(output_dir / "log.txt", start_epoch)
    tensorboard = utils.TensorBoardLog(output_dir, args.tensorboard, start_epoch)
    if to_restore["rng_state"] is not None:
        restore_rng_state(to_restore["rng_state"], args.seed, start_epoch, args.device)

    def save(epoch: int, iteration: int, meters: dict) -> dict:
        """checkpoint.pth to resume from at ``iteration`` of ``epoch`` (0: the epoch's start), with the epoch's
        running averages so far; every rank calls it, since the RNG states are gathered."""
        save_dict = {
            "student": student.state_dict(),
            "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "iteration": iteration,
            "meters": meters,
            "args": utils.plain_args(args),
            "dino_loss": dino_loss.state_dict(),
            "rng_state": gather_rng_states(args.device),
        }
        if fp16_scaler is not None:
            save_dict["fp16_scaler"] = fp16_scaler.state_dict()
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
                student,
                teacher,
                ema_pairs,
                dino_loss,
                data_loader,
                optimizer,
                lr_schedule,
                wd_schedule,
                momentum_schedule,
                epoch,
                fp16_scaler,
                precision,
                args,
                first_iteration=first_iteration,
                meters=to_restore["meters"] if first_iteration else {},
                watch=watch,
                save=save,
                to_crops=to_crops,
            )
            warning = health.collapse_warning(train_stats, args.out_dim, epoch, args.batch_size_per_gpu)
            if warning:
                print(warning, flush=True)
            log_stats = {f"train_{k}": v for k, v in train_stats.items()}
            log_stats.update(epoch=epoch, step=(epoch + 1) * niter, out_dim=args.out_dim)  # steps trained so far
            if knn_sets is not None and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
                log_stats.update(online_knn(teacher_without_ddp, knn_sets, args))
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


def build_knn_sets(args: argparse.Namespace) -> tuple[eurosat.EuroSAT, eurosat.EuroSAT]:
    """The online k-NN's memory bank (train split) and evaluated split (val) of --knn_data_path, at the
    training resolution: Resize(global size * 256 / 224) + CenterCrop(global size), eval_knn.py's transform."""
    bands = parse_bands(args.bands)
    with utils.config_errors("--knn_data_path"):
        train_set = eurosat.EuroSAT(args.knn_data_path, "train", bands, seed=args.seed)
        test_set = eurosat.EuroSAT(args.knn_data_path, "val", bands, seed=args.seed)
    normalize = (lambda image: eurosat.normalize(image, bands)) if train_set.multispectral else None
    resize = round(args.global_crops_size * 256 / 224)
    train_set.transform = test_set.transform = eval_transform(bands, resize, args.global_crops_size, normalize)
    too_large = [k for k in args.knn_nb if k > len(train_set)]
    if too_large:
        raise utils.ConfigError(f"--knn_nb {too_large[0]} is larger than the {len(train_set)} k-NN train images")
    print(f"Online k-NN on {args.knn_data_path}: {len(train_set)} train / {len(test_set)} val images.")
    return train_set, test_set


def online_knn(teacher: utils.MultiCropWrapper, knn_sets: tuple, args: argparse.Namespace) -> dict[str, float]:
    """Top-1 (%) of eval_knn.py's weighted k-NN on the teacher's backbone, for every k of --knn_nb: the same
    feature extraction and classifier (temperature 0.07), so it equals eval_knn.py run on the checkpoint."""
    backbone = teacher.backbone
    was_training = backbone.training
    backbone.eval()
    options = argparse.Namespace(
        batch_size_per_gpu=max(args.batch_size_per_gpu, 32),
        num_workers=0,
        device=args.device,
        print_freq=args.print_freq,
        distributed=utils.is_dist_avail_and_initialized(),
    )
    features = [eval_knn.extract_features(backbone, teacher.head.in_dim, d, options, "Online k-NN:") for d in knn_sets]
    labels = [torch.tensor(d.targets, dtype=torch.long, device=args.device) for d in knn_sets]
    backbone.train(was_training)
    accuracies = eval_knn.knn_classifier(
        features[0],
        labels[0],
        features[1],
        labels[1],
        args.knn_nb,
        eval_knn.DEFAULT_TEMPERATURE,
        len(knn_sets[0].classes),
    )
    print("Online k-NN top-1: " + ", ".join(f"k={k} {top1:.2f}" for k, (top1, _) in accuracies.items()))
    return {f"knn_top1_k{k}": top1 for k, (top1, _) in accuracies.items()}


def gather_rng_states(device: str) -> list[dict]:
    """Every rank's RNG state (rank order), so that a resumed multi-process run continues each stream."""
    state = utils.get_rng_state(device)
    if not utils.is_dist_avail_and_initialized():
        return [state]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def resume_iteration(checkpoint: dict, args: argparse.Namespace, niter: int) -> int:
    """The iteration of its epoch a (mid-epoch) checkpoint resumes at. Saved with another total batch (world
    size x --batch_size_per_gpu), it resumes after as many samples of the epoch's global order (which does
    not depend on the world size), rounded down: none is skipped, a few may be seen twice."""
    iteration = checkpoint["iteration"]
    saved = checkpoint["args"]
    saved_batch = saved.get("world_size", args.world_size) * saved.get("batch_size_per_gpu", args.batch_size_per_gpu)
    batch = args.world_size * args.batch_size_per_gpu
    if iteration and saved_batch != batch:
        converted = min(iteration * saved_batch // batch, niter)
        print(f"Checkpoint at iteration {iteration} of batches of {saved_batch}: resuming at {converted} of {batch}.")
        return converted
    return iteration


def restore_rng_state(states: list[dict], seed: int, epoch: int, device: str) -> None:
    """Restore this rank's RNG stream; with a different world size, reseed per rank and epoch instead."""
    if len(states) == utils.get_world_size():
        utils.set_rng_state(states[utils.get_rank()], device)
    else:
        print(
            f"Checkpoint has RNG states for {len(states)} processes, this run has {utils.get_world_size()}: "
            f"reseeding from --seed {seed} and epoch {epoch}."
        )
        utils.fix_random_seeds(seed, epoch)


class PreemptionWatch:
    """Record SIGUSR2 / SIGTERM instead of dying at once, so that the run can save where it is first.

    The handler only notes the signal. The training step shares it with the other ranks in the all-reduce
    that checks the loss (:func:`agree_on_step`), so that every rank stops after the same iteration, whichever
    rank was signalled; the agreed signals are in ``agreed``. ``previous`` holds the handlers installed before
    (submitit's, which requeues the job); :meth:`restore` puts them back. DataLoader workers forked after
    this inherit the handler, so a signal to every process of the job (as SLURM sends it) does not kill
    them under the training loop.
    """

    def __init__(self):
        self.received: set[int] = set()
        self.agreed: set[int] = set()
        self.previous: dict = {}
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self.previous = {sig: signal.signal(sig, self._record) for sig in PREEMPTION_SIGNALS}

    def _record(self, signum: int, frame) -> None:
        self.received.add(signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def agree_on_step(
    loss: torch.Tensor, watch: PreemptionWatch, signals: torch.Tensor | None = None
) -> tuple[float, int, list[float]]:
    """The mean loss over ranks, on how many ranks it is not finite, and the mean over ranks of ``signals``
    (the health metrics); sets ``watch.agreed`` to the preemption signals any rank received.

    One all-reduce of a few numbers built on the loss's device (no host-to-device copy) and one read back,
    the step's only synchronisation, as ``loss.item()`` was: every rank then takes the same decision (stop
    for a non-finite loss, save and stop for a preemption) at the same iteration, instead of one rank leaving
    while the others wait in the next collective.
    """
    loss = loss.detach().float()
    status = loss.new_zeros(2 + len(PREEMPTION_SIGNALS))
    status[0] = loss
    status[1] = ~torch.isfinite(loss)
    for k, signum in enumerate(PREEMPTION_SIGNALS):
        if signum in watch.received:
            status[2 + k] = 1.0
    if signals is not None:
        status = torch.cat([status, signals.float()])
    if utils.is_dist_avail_and_initialized():
        dist.all_reduce(status)
    values = status.tolist()
    total, not_finite = values[0], values[1]
    signalled = values[2 : 2 + len(PREEMPTION_SIGNALS)]
    world = utils.get_world_size()
    watch.agreed = {signum for signum, count in zip(PREEMPTION_SIGNALS, signalled) if count > 0}
    return total / world, int(not_finite), [v / world for v in values[2 + len(PREEMPTION_SIGNALS) :]]


def stop_after_preemption(watch: PreemptionWatch, epoch: int, iteration: int) -> None:
    """Leave after the preemption checkpoint: under submitit its handler requeues the job (rank 0) and exits;
    otherwise (plain process, torchrun) one line and exit code PREEMPTED_EXIT_CODE."""
    if utils.is_dist_avail_and_initialized():
        dist.barrier()  # the checkpoint is written before any rank exits (torchrun stops all on one exit)
    signum = signal.SIGUSR2 if signal.SIGUSR2 in watch.agreed else signal.SIGTERM
    previous = watch.previous.get(signum)
    watch.restore()
    if callable(previous):
        previous(signum, None)
    print(
        f"preempted at epoch {epoch}, iteration {iteration}: checkpoint saved; run the same command to resume",
        flush=True,
    )
    sys.exit(PREEMPTED_EXIT_CODE)


def train_one_epoch(
    student,
    teacher,
    ema_pairs,
    dino_loss,
    data_loader,
    optimizer,
    lr_schedule,
    wd_schedule,
    momentum_schedule,
    epoch,
    fp16_scaler,
    precision,
    args,
    *,
    first_iteration: int,
    meters: dict,
    watch: PreemptionWatch,
    save: Callable[[int, int, dict], dict],
    to_crops: Callable[[Any], list[torch.Tensor]] | None = None,
) -> dict:
    """One epoch from ``first_iteration`` on (a resumed preempted run), the running averages continued from
    ``meters``; mid-epoch ``save`` every --checkpoint_every_iters iterations and on a preemption. ``to_crops``
    turns a loaded batch into the crops on the device (default: the loader's crops, moved there)."""
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
            loss = dino_loss(student_output, teacher_output, epoch)
        signals, winners = health.step_metrics(
            dino_loss.teacher_probs, loss, teacher_features, args.global_crops_number
        )
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
