"""Change detection on OSCD with a Siamese U-Net on a pretrained (frozen) encoder, as in SeCo / DINO-MC.

    python finetune_oscd.py --arch resnet50 --pretrained_weights CKPT --data_path /data/OSCD --output_dir runs/oscd

Protocol (docs/evaluation.md): 96x96 tiles (edge tiles zero-padded), random flips and 90-degree rotations; the
encoder is frozen unless ``--finetune_encoder``; BCEWithLogits; Adam lr 0.003 (not scaled with the batch),
weight decay 1e-4, ExponentialLR 0.95 per epoch, 50 epochs, batch 32, seed 42. Precision, recall, F1 and IoU
of the change class at probability 0.5 are counted over ALL valid test pixels (padding excluded), not
averaged per batch (docs/differences.md). The result is the LAST epoch's test metrics: the published script kept
the epoch with the best test F1, an optimistic number. ``checkpoint_best.pth`` is picked on ``--val_cities``
(train cities held out of training; default none: "best" is then the last epoch), or on the test cities with
``--select_on_test true`` (the published selection, for comparison); ``metrics.json`` says which
(``best_selected_on``). Cities come from ``train.txt`` / ``test.txt``, else from the label folders (said in one
line). Writes ``metrics.json`` (with the F1 of predicting change everywhere, the trivial baseline) and one
full-size change map per test city in ``output_dir/change_maps/<city>.png``.
See segmentation.py for the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchmetrics
from PIL import Image
from torchmetrics import classification as tmc

import engine
import segmentation
import utils
from datasets.bands import IMAGENET_MEAN, IMAGENET_STD, is_rgb, parse_bands
from datasets.oscd import OSCD, split_cities, stitch_tiles
from segmentation import SiameseUNet


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("OSCD change detection", add_help=False)
    utils.add_backbone_args(parser, arch="resnet50")
    engine.add_finetune_args(parser, epochs=50, lr=0.003, batch_size=32, seed=42, lr_scaled=False)
    parser.add_argument("--data_path", default=None, type=str, help="OSCD root (archive or DINO-MC layout).")
    parser.add_argument("--tile_size", default=96, type=int, help="Side of the square tiles cut from each city.")
    parser.add_argument(
        "--finetune_encoder",
        default=False,
        type=utils.bool_flag,
        help="Train the encoder too (default: frozen, only the U-Net decoder learns).",
    )
    parser.add_argument("--weight_decay", default=1e-4, type=float, help="Adam weight decay.")
    parser.add_argument("--lr_gamma", default=0.95, type=float, help="ExponentialLR factor per epoch.")
    parser.add_argument(
        "--val_cities",
        default="",
        type=str,
        help="Comma-separated train cities held out of training to select checkpoint_best.pth by their F1 "
        "(default: none; 'best' is then the last epoch). The reported result is always the last epoch on test.",
    )
    parser.add_argument(
        "--select_on_test",
        default=False,
        type=utils.bool_flag,
        help="Select checkpoint_best.pth by the test F1, as the published main_oscd.py did (optimistic; "
        "metrics.json records it).",
    )
    return parser


class BandNormalize(nn.Module):
    """Standardise the [0, 1] stretched OSCD bands: ImageNet statistics for B4,B3,B2 (what RGB backbones
    were pretrained with), else (v - 0.5) / 0.25, since the reader maps mean +- 2 std of a band to [0, 1]."""

    def __init__(self, bands: list[str]):
        super().__init__()
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if is_rgb(bands) else ([0.5] * len(bands), [0.25] * len(bands))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ChangeDetector(nn.Module):
    """Normalisation + Siamese U-Net, so a checkpoint holds everything that maps raw tiles to logits."""

    def __init__(self, backbone: nn.Module, bands: list[str], freeze_encoder: bool):
        super().__init__()
        self.normalize = BandNormalize(bands)
        self.unet = SiameseUNet(backbone, len(bands), freeze_encoder=freeze_encoder)

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        return self.unet(self.normalize(img1), self.normalize(img2))


def from_published_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A published ``main_oscd.py`` Lightning checkpoint's ``state_dict`` under :class:`ChangeDetector`'s names
    (its U-Net is ``unet``; the normalisation has no weights); this script's own state dicts pass unchanged."""
    if not any(key.startswith("model.") for key in state_dict):
        return state_dict
    return {f"unet.{key}": value for key, value in segmentation.from_published_state_dict(state_dict).items()}


def tile_logits(model: nn.Module, batch: dict, device: str) -> torch.Tensor:
    return model(batch["img1"].to(device, non_blocking=True), batch["img2"].to(device, non_blocking=True))


def masked_pixels(model: nn.Module, batch: dict, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the valid pixels only: the zero padding of edge tiles is neither trained nor scored."""
    mask = batch["mask"].to(device, non_blocking=True)
    labels = batch["label"].to(device, non_blocking=True)
    return tile_logits(model, batch, device)[mask], labels[mask]


class ChangeFraction(torchmetrics.Metric):
    """Fraction of change pixels among the scored ones, accumulated and synchronised like the other metrics."""

    def __init__(self):
        super().__init__()
        self.add_state("positives", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.positives += target.sum()
        self.total += target.numel()

    def compute(self) -> torch.Tensor:
        return (self.positives / self.total).float()


def add_baseline(metrics: dict) -> dict:
    """F1 (%) of predicting change everywhere (precision = change fraction p, recall 1): 2p / (1 + p)."""
    p = metrics["change_fraction"] / 100.0
    return {"all_change_f1": 100.0 * 2 * p / (1 + p)}


def change_task() -> engine.Task:
    return engine.Task(
        criterion=nn.BCEWithLogitsLoss(),
        metrics=torchmetrics.MetricCollection(
            {
                "precision": tmc.BinaryPrecision(threshold=0.5),
                "recall": tmc.BinaryRecall(threshold=0.5),
                "f1": tmc.BinaryF1Score(threshold=0.5),
                "iou": tmc.BinaryJaccardIndex(threshold=0.5),
                "change_fraction": ChangeFraction(),
            }
        ),
        main_metric="f1",
        forward=masked_pixels,
        activation=torch.sigmoid,
        summarize=add_baseline,
    )


def held_out_cities(args: argparse.Namespace) -> list[str]:
    """``--val_cities`` as a list, checked against the train cities (never a test city, never all of them)."""
    val_cities = [c.strip() for c in args.val_cities.split(",") if c.strip()]
    if not val_cities:
        return []
    if args.select_on_test:
        raise utils.ConfigError("--val_cities and --select_on_test both choose checkpoint_best.pth; give one")
    train_cities = split_cities(args.data_path, "train")[0]
    unknown = [c for c in val_cities if c not in train_cities]
    if unknown:
        raise utils.ConfigError(
            f"--val_cities {','.join(unknown)}: not a train city of {args.data_path} ({','.join(train_cities)})"
        )
    if set(val_cities) == set(train_cities):
        raise utils.ConfigError(f"--val_cities {args.val_cities} holds out every train city; none is left to train")
    return val_cities


def build_datasets(args: argparse.Namespace) -> tuple[torch.utils.data.Dataset, OSCD | None, OSCD, list[str]]:
    """Train (minus ``--val_cities``), validation (those cities, or None) and test datasets, and the bands."""
    if args.data_path is None or not Path(args.data_path).is_dir():
        raise utils.ConfigError(f"--data_path {args.data_path} is not a folder (expected an OSCD root)")
    if args.tile_size < 32:
        raise utils.ConfigError(f"--tile_size {args.tile_size}: expected >= 32 (the encoder downsamples 32x)")
    with utils.config_errors():
        bands = parse_bands(args.bands)
        val_cities = held_out_cities(args)
        kept = [c for c in split_cities(args.data_path, "train")[0] if c not in val_cities]
        train = OSCD(args.data_path, "train", bands, tile_size=args.tile_size, augment=True, cities=kept)
        val = OSCD(args.data_path, "train", bands, tile_size=args.tile_size, cities=val_cities) if val_cities else None
        test = OSCD(args.data_path, "test", bands, tile_size=args.tile_size, augment=False)
    unlisted = [dataset for dataset in (train, test) if dataset.list_file is None]
    if unlisted:
        print(
            f"OSCD: no {' / '.join(f'{d.split}.txt' for d in unlisted)}: cities taken from the folders of "
            f"{' and '.join(str(d.label_dir) for d in unlisted)}"
        )
    held_out = f", {len(val.cities)} validation cities ({len(val)} tiles)" if val is not None else ""
    print(
        f"OSCD: {len(train.cities)} train cities ({len(train)} tiles){held_out}, {len(test.cities)} test cities "
        f"({len(test)} tiles), bands {','.join(bands)}"
    )
    indices = engine.subset_indices(len(train), args.train_frac, args.seed)
    if len(indices) < len(train):
        if utils.is_main_process():
            lines = [f"{city},{row},{col}\n" for city, row, col in (train.tiles[i] for i in indices)]
            (Path(args.output_dir) / "train_tiles.txt").write_text("".join(lines))
        print(f"--train_frac {args.train_frac}: {len(indices)} of {len(train)} train tiles (train_tiles.txt)")
        return torch.utils.data.Subset(train, indices), val, test, bands
    return train, val, test, bands


@torch.no_grad()
def save_change_maps(model: nn.Module, test: OSCD, args: argparse.Namespace, precision: str) -> list[Path]:
    """Predict every test tile, stitch each city back to its full size, write ``change_maps/<city>.png``
    (255 = change at probability >= 0.5)."""
    model.eval()
    loader = torch.utils.data.DataLoader(test, batch_size=args.batch_size_per_gpu, num_workers=args.num_workers)
    tiles: dict[str, list] = {city: [] for city in test.cities}
    for batch in loader:
        with utils.autocast(precision, args.device):
            logits = tile_logits(model, batch, args.device).float().cpu()
        for logit, city, row, col in zip(logits, batch["city"], batch["row"].tolist(), batch["col"].tolist()):
            tiles[city].append((logit, row, col))
    out_dir = Path(args.output_dir) / "change_maps"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for city, items in tiles.items():
        stacked = torch.stack([logit for logit, _, _ in items])
        full = stitch_tiles(stacked, [r for _, r, _ in items], [c for _, _, c in items], test.city_shape(city))
        change = (full[0] > 0).numpy().astype(np.uint8) * 255
        path = out_dir / f"{city}.png"
        Image.fromarray(change).save(path)
        written.append(path)
    print(f"Change maps of {len(written)} test cities written to {out_dir}")
    return written


def main(args: argparse.Namespace) -> dict:
    precision = engine.setup(args)
    train_set, val_set, test_set, bands = build_datasets(args)
    backbone, _ = utils.load_backbone(
        args.arch, args.patch_size, bands, args.pretrained_weights, args.checkpoint_key, args.adapt_input
    )
    with utils.config_errors(f"--arch {args.arch}"):
        model = ChangeDetector(backbone, bands, freeze_encoder=not args.finetune_encoder).to(args.device)
    task = change_task()
    eval_loader = engine.make_loader(test_set, args, train=False)

    if args.evaluate is not None:
        result = engine.evaluate_checkpoint(
            model, task, eval_loader, precision, args, from_published=from_published_state_dict
        )
    else:
        train_loader = engine.make_loader(train_set, args, train=True)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_gamma)
        select_loader = engine.make_loader(val_set, args, train=False) if val_set is not None else None
        result = engine.fit(
            model,
            task,
            train_loader,
            eval_loader,
            optimizer,
            scheduler,
            precision,
            args,
            eval_split="test",
            select_loader=select_loader,
            select_split=f"val_cities:{','.join(val_set.cities)}" if val_set is not None else None,
            select_best=val_set is not None or args.select_on_test,
        )
        selected = result["best_selected_on"]
        chosen = f"selected on {selected}" if selected else "no selection split: the last epoch"
        print(f"Result: the last epoch on test; checkpoint_best.pth is epoch {result['best']['epoch']} ({chosen})")
    if utils.is_main_process():
        save_change_maps(model, test_set, args, precision)
        final = result["metrics"] if args.evaluate is not None else result["last"]["metrics"]
        print(
            f"Change class (%): precision {final['precision']:.2f} recall {final['recall']:.2f} F1 {final['f1']:.2f} "
            f"IoU {final['iou']:.2f} (all-change baseline F1 {final['all_change_f1']:.2f})"
        )
    return result


def run(argv: list[str] | None = None) -> None:
    """Command-line entry: bad arguments or bad data end with one line and exit code 2."""
    utils.run_cli("OSCD change detection", get_args_parser, main, argv)


if __name__ == "__main__":
    run()
