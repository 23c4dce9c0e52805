"""The pretraining data stream: dataset, multi-crop augmentation, samplers and loader.

Every sample's augmentation is drawn from a seed fixed by (--seed, epoch, the sample's position in the epoch),
so that the stream is a pure function of them and a preempted run resumes mid-epoch on exactly the same
samples, whatever the number of loader workers.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import torch

from cli import ConfigError, config_errors
from datasets import device_augment
from datasets.device_augment import DeviceAugment, RegionCutter
from datasets.seco import SeCoDataset
from datasets.seco_store import SeCoStore
from datasets.transforms import MultiCropAugmentation
from runtime import derive_seed


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
            yield indices[local], derive_seed("sample", self.seed, self.epoch, positions[local])

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
        generator = torch.Generator().manual_seed(derive_seed("shards", self.seed, self.epoch))
        order = [
            location for i in torch.randperm(len(shards), generator=generator) for location in self.by_shard[shards[i]]
        ]
        order = (order * -(-self.total_size // len(order)))[: self.total_size]  # equal shares, as DistributedSampler
        first = self.rank * self.num_samples
        block = order[first : first + self.num_samples]
        generator.manual_seed(derive_seed("block", self.seed, self.epoch, self.rank))
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


def build_transform(args: argparse.Namespace) -> MultiCropAugmentation:
    """The multi-crop augmentation of the mode; it validates the crop flags (ConfigError names the flag)."""
    with config_errors():
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
            raise ConfigError(f"--shard_shuffle needs a Zarr store (prepare_data.py); {args.data_path} is a tree")
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
        raise ConfigError(
            f"--data_path {args.data_path} has {len(dataset)} locations, fewer than one batch of "
            f"{args.batch_size_per_gpu} x {args.world_size} processes"
        )
    print(f"Data loaded: {len(dataset)} locations, {len(loader)} iterations per epoch, bands {args.bands}.")
    return dataset, loader, to_crops
