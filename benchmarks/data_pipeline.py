"""Images per second per data-loading worker: read a SeCo-layout sample and make all its crops.

    python benchmarks/data_pipeline.py                      # generated demo data, modes mc dino tp, RGB and ALL
    python benchmarks/data_pipeline.py --data_path SECO --modes mc --bands RGB

One JSON line per (mode, bands). ``imgs_per_s`` is this project's pipeline (``SeCoDataset`` +
``MultiCropAugmentation``: each band decoded once per sample, crops cut from the uint8 tensor and resized alone);
``pil_imgs_per_s`` is the published way on the same files: the decoded sample turned into PIL images and
torchvision's PIL transforms run crop by crop (and, for non-RGB bands, which PIL cannot hold in one image,
band by band). Both decode the GeoTIFFs the same way, so ``speedup`` is the gain of the augmentation design;
``load_ms`` / ``augment_ms`` split this project's time per sample. ``store_imgs_per_s`` / ``store_speedup`` /
``store_load_ms``: the same pipeline reading the same samples from a Zarr store (``prepare_data.py``, written
here from the locations timed), the whole gain over the published way. ``*_wall`` figures are wall time;
``tree_decode_ms`` / ``store_decode_ms``: reading one acquisition's bands as stored (GeoTIFF decoding, or
shard reads and decompression), before they are brought to the 10 m grid.

A DataLoader worker runs single-threaded (torch sets one thread per worker), so the benchmark does too
(``--threads 1``): the figure is per worker, and a loader with N workers on N free cores scales it by ~N.
Times are this process's CPU time, so a busy shared machine (other jobs taking turns on the cores) does not
distort them; on a free core CPU time and wall time of a one-thread worker are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402
from datasets import device_augment  # noqa: E402
from datasets.bands import parse_bands  # noqa: E402
from datasets.demo import write_seco_demo  # noqa: E402
from datasets.device_augment import DeviceAugment, RegionCutter  # noqa: E402
from datasets.seco import SeCoDataset  # noqa: E402
from datasets.seco_store_writer import write_store  # noqa: E402
from datasets.seco_tree import SeCoTree  # noqa: E402
from datasets.transforms import (  # noqa: E402
    BICUBIC,
    BILINEAR,
    BLUR_SIGMA,
    CROP_RATIO,
    MultiCropAugmentation,
    Normalize,
    band_jitter,
    draw_band_jitter,
)

PIL_RESAMPLE = {BICUBIC: Image.BICUBIC, BILINEAR: Image.BILINEAR}
# Colour jitter, grayscale, 13-tap separable blur, solarize and normalisation: about this many FLOPs per output
# value when all apply (an upper estimate; most steps apply to a fraction of the crops).
COLOUR_FLOPS = 120


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DINO-MC data-pipeline benchmark", add_help=False)
    parser.add_argument("--data_path", default=None, help="SeCo-layout root; default: generate demo data.")
    parser.add_argument("--n_locations", default=8, type=int, help="Locations of the generated data.")
    parser.add_argument("--modes", nargs="+", default=["mc", "dino", "tp"], choices=["dino", "mc", "tp"])
    parser.add_argument("--bands", nargs="+", default=["RGB", "ALL"], help="Band selections to measure.")
    parser.add_argument("--samples", default=24, type=int, help="Timed samples per configuration.")
    parser.add_argument("--warmup", default=2, type=int, help="Untimed samples first.")
    parser.add_argument("--threads", default=1, type=int, help="torch threads (1 = one DataLoader worker).")
    parser.add_argument(
        "--augment_on", nargs="+", default=["workers", "device"], choices=["workers", "device"], help="Paths."
    )
    parser.add_argument("--device_batch", default=32, type=int, help="Samples per batch of the device path.")
    parser.add_argument("--seed", default=0, type=int)
    return parser


class PILBlur:
    """Published DINO GaussianBlur: PIL's filter with a radius uniform in [0.1, 2.0], with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(()) >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(()).uniform_(*BLUR_SIGMA))))


class PILSolarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if torch.rand(()) < self.p else img


class PILPerCrop:
    """The published multi-crop augmentation on PIL images, one torchvision pipeline per crop.

    RGB: DINO-MC's DataAugmentation (RandomResizedCrop bicubic, flip, ColorJitter, grayscale, PIL blur,
    solarize, ToTensor, Normalize) on one RGB PIL image. Other bands: each band a PIL "L" image; every crop
    draws its crop box once and crops, resizes, flips and blurs band by band, then applies the same per-band
    brightness / contrast as this project's pipeline, so both do the same work.
    """

    def __init__(self, aug: MultiCropAugmentation):
        self.aug = aug
        self.normalize = Normalize(aug.bands, max_value=1.0)

    def _rgb_pipeline(self, view) -> T.Compose:
        a = view.augment
        resample = PIL_RESAMPLE[view.interpolation]
        steps = [T.RandomResizedCrop(view.size, scale=view.scale, ratio=CROP_RATIO, interpolation=resample)]
        steps.append(T.RandomHorizontalFlip(a.flip_p))
        if a.jitter is not None:
            steps.append(T.RandomApply([T.ColorJitter(*a.jitter)], p=a.jitter_p))
        steps += [T.RandomGrayscale(a.gray_p), PILBlur(a.blur_p), PILSolarize(a.solarize_p), T.ToTensor()]
        return T.Compose(steps)

    def _band_ops(self, bands: list[Image.Image], augment) -> torch.Tensor:
        """Flip and blur band by band with one draw for the image, then the per-band brightness / contrast."""
        flip = bool(torch.rand(()) < augment.flip_p)
        blur = bool(augment.blur_p and torch.rand(()) < augment.blur_p)
        radius = float(torch.empty(()).uniform_(*BLUR_SIGMA))
        out = []
        for img in bands:
            if flip:
                img = ImageOps.mirror(img)
            if blur:
                img = img.filter(ImageFilter.GaussianBlur(radius=radius))
            out.append(T.functional.to_tensor(img))
        image = torch.cat(out)
        if augment.jitter is not None and torch.rand(()) < augment.jitter_p:
            image = band_jitter(image, *draw_band_jitter(image.shape[0], augment.jitter[0], augment.jitter[1]))
        return image

    def _band_crop(self, bands: list[Image.Image], view) -> torch.Tensor:
        i, j, h, w = T.RandomResizedCrop.get_params(bands[0], view.scale, CROP_RATIO)
        size = (view.size, view.size)
        resample = PIL_RESAMPLE[view.interpolation]
        return self._band_ops([b.crop((j, i, j + w, i + h)).resize(size, resample) for b in bands], view.augment)

    def _pil(self, image: torch.Tensor) -> Image.Image | list[Image.Image]:
        array = image.numpy()
        if self.aug.rgb:
            return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)))
        return [Image.fromarray(band) for band in array]

    def _whole_image(self, image: Image.Image | list[Image.Image]) -> Image.Image | list[Image.Image]:
        """DINO-TP's aug() of a whole acquisition before it is cropped."""
        a = self.aug.tp_augment
        if self.aug.rgb:
            jitter = T.RandomApply([T.ColorJitter(*a.jitter)], p=a.jitter_p)
            steps = [T.RandomHorizontalFlip(a.flip_p), jitter, T.RandomGrayscale(a.gray_p), PILBlur(a.blur_p)]
            return T.Compose(steps)(image)
        values = self._band_ops(image, a).mul_(255.0).round_().to(torch.uint8).numpy()
        return [Image.fromarray(band) for band in values]

    def __call__(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        pil = [self._pil(image) for image in images]
        sources = [pil[0]] * len(self.aug.views)
        if self.aug.data_mode == "tp":
            t0, t1, t2 = pil
            sources = [self._whole_image(t1), t2, self._whole_image(t0)] + [t0] * self.aug.n_local
        crops = []
        for source, view in zip(sources, self.aug.views):
            if self.aug.rgb:
                crops.append(self._rgb_pipeline(view)(source))
            else:
                crops.append(self._band_crop(source, view))
        return [self.normalize(c) for c in crops]


def time_samples(dataset: SeCoDataset, samples: int, warmup: int) -> tuple[float, float, float]:
    """Seconds per sample: CPU time in total and in the augmentation alone (the rest is reading and decoding),
    and wall time in total."""
    n = len(dataset)
    for i in range(warmup):
        dataset[i % n]
    transform, augment_s = dataset.transform, 0.0

    def timed(images):
        nonlocal augment_s
        start = time.process_time()
        out = transform(images)
        augment_s += time.process_time() - start
        return out

    dataset.transform = timed
    start, wall = time.process_time(), time.perf_counter()
    for i in range(samples):
        dataset[i % n]
    total, wall = time.process_time() - start, time.perf_counter() - wall
    dataset.transform = transform
    return total / samples, augment_s / samples, wall / samples


def decode_ms(dataset: SeCoDataset, samples: int) -> float:
    """CPU milliseconds to read one acquisition's bands as stored (no 10 m grid, no augmentation)."""
    n = len(dataset)
    start = time.process_time()
    for i in range(samples):
        dataset.source.read(i % n, i % dataset.source.count(i % n))
    return (time.process_time() - start) / samples * 1000.0


def store_first_locations(root: Path, bands: list[str], count: int, output: Path) -> Path:
    """A store (``prepare_data.py``'s format) of the first ``count`` locations of ``root``: the ones the timing
    reads, linked into a tree of their own so that a large tree is not written whole."""
    subset = output.with_name(output.name + "_tree")
    subset.mkdir(parents=True)
    for name in sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[:count]:
        os.symlink(root / name, subset / name)
    write_store(SeCoTree(subset, bands), output, shard_size=64)
    return output


def measure(root: Path, store: Path, mode: str, bands: str, args: argparse.Namespace) -> dict:
    band_list = parse_bands(bands)
    aug = MultiCropAugmentation(mode, band_list)
    results, datasets = {}, {}
    for impl, source, transform in (("pil", root, PILPerCrop(aug)), ("current", root, aug), ("store", store, aug)):
        torch.manual_seed(args.seed)
        dataset = SeCoDataset(source, bands=band_list, data_mode=mode, transform=transform, seed=args.seed)
        results[impl], datasets[impl] = time_samples(dataset, args.samples, args.warmup), dataset
    total, augment, wall = results["current"]
    store_total, store_augment, store_wall = results["store"]
    return {
        "mode": mode,
        "bands": ",".join(band_list),
        "augment_on": "workers",
        "crop_sizes": aug.crop_sizes,
        "threads": torch.get_num_threads(),
        "samples": args.samples,
        "imgs_per_s": round(1.0 / total, 2),
        "imgs_per_s_wall": round(1.0 / wall, 2),
        "pil_imgs_per_s": round(1.0 / results["pil"][0], 2),
        "speedup": round(results["pil"][0] / total, 2),
        "load_ms": round((total - augment) * 1000.0, 2),
        "augment_ms": round(augment * 1000.0, 2),
        "pil_augment_ms": round(results["pil"][1] * 1000.0, 2),
        "store_imgs_per_s": round(1.0 / store_total, 2),
        "store_imgs_per_s_wall": round(1.0 / store_wall, 2),
        "store_speedup": round(results["pil"][0] / store_total, 2),
        "store_load_ms": round((store_total - store_augment) * 1000.0, 2),
        "tree_decode_ms": round(decode_ms(datasets["current"], args.samples), 3),
        "store_decode_ms": round(decode_ms(datasets["store"], args.samples), 3),
    }


def measure_device(root: Path, store: Path, mode: str, bands: str, args: argparse.Namespace) -> dict:
    """--augment_on device: the worker's part (read, draw, cut) per sample, from the tree and from the store;
    the device's part per batch here on the CPU; and per sample the bytes sent to the device and the FLOPs the
    device spends, against the workers path's float crops."""
    band_list = parse_bands(bands)
    aug = MultiCropAugmentation(mode, band_list)
    cutter, device = RegionCutter(aug), DeviceAugment(aug)
    results, cuts = {}, []
    for name, source in (("tree", root), ("store", store)):
        torch.manual_seed(args.seed)
        dataset = SeCoDataset(source, bands=band_list, data_mode=mode, transform=cutter, seed=args.seed)
        results[name] = time_samples(dataset, args.samples, args.warmup)
        cuts = [dataset[i % len(dataset)] for i in range(args.device_batch)]
    batch = device_augment.collate(cuts)
    device(batch, "cpu")  # warm-up
    start = time.process_time()
    crops = device(device_augment.collate(cuts), "cpu")
    device_s = time.process_time() - start
    sent = sum(item["pixels"].numel() * item["pixels"].element_size() for item in batch) / args.device_batch
    crop_bytes = sum(c[0].numel() * c[0].element_size() for c in crops)
    return {
        "mode": mode,
        "bands": ",".join(band_list),
        "augment_on": "device",
        "crop_sizes": aug.crop_sizes,
        "threads": torch.get_num_threads(),
        "samples": args.samples,
        "imgs_per_s": round(1.0 / results["tree"][0], 2),
        "imgs_per_s_wall": round(1.0 / results["tree"][2], 2),
        "store_imgs_per_s": round(1.0 / results["store"][0], 2),
        "store_imgs_per_s_wall": round(1.0 / results["store"][2], 2),
        "cut_ms": round(results["tree"][1] * 1000.0, 3),
        "device_batch": args.device_batch,
        "device_cpu_ms_per_batch": round(device_s * 1000.0, 1),
        "device_gflop_per_sample": round(device_flops(batch, aug) / args.device_batch / 1e9, 3),
        "host_to_device_bytes_per_sample": round(sent),
        "workers_path_bytes_per_sample": crop_bytes,
    }


def device_flops(batch: list[dict[str, torch.Tensor]], aug: MultiCropAugmentation) -> float:
    """FLOPs of the device's batch: the two resize matrix products per crop position (on the padded regions or
    whole images), plus the colour steps and normalisation counted as ``COLOUR_FLOPS`` per output value."""
    total = 0.0
    for item, size in zip(batch, aug.crop_sizes):
        samples, channels, height, width = item["pixels"].shape
        total += 2.0 * samples * channels * (height * width * size + height * size * size)
        total += COLOUR_FLOPS * samples * channels * size * size
    return total


def main(args: argparse.Namespace) -> None:
    if args.samples < 1 or args.warmup < 0 or args.n_locations < 1:
        raise utils.ConfigError("--samples and --n_locations must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(sys.stderr):  # progress lines: the JSON lines are alone on stdout
            if args.data_path is None:
                root = write_seco_demo(Path(tmp) / "seco", args.n_locations, n_acquisitions=3, seed=args.seed)
            else:
                root = Path(args.data_path)
        for bands in args.bands:
            timed_locations = args.samples + args.warmup
            with contextlib.redirect_stdout(sys.stderr):
                store_path = Path(tmp) / f"store_{bands}.zarr"
                with utils.config_errors("--bands"):
                    band_list = parse_bands(bands)
                store = store_first_locations(root, band_list, timed_locations, store_path)
            for mode in args.modes:
                for where in args.augment_on:
                    measured = measure if where == "workers" else measure_device
                    print(json.dumps(measured(root, store, mode, bands, args)), flush=True)


def run(argv: list[str] | None = None) -> None:
    utils.run_cli("DINO-MC data-pipeline benchmark", get_args_parser, main, argv)


if __name__ == "__main__":
    run()
