"""Multi-label fine-tuning on BigEarthNet-S2 v1.0 (19 or 43 classes), with mAP over the whole evaluation split.

    python finetune_bigearthnet.py --arch resnet50 --pretrained_weights CKPT --data_path /data/BigEarthNet-v1.0 \
        --split_dir /data/splits --train_frac 0.1 --output_dir runs/ben10

Protocol (docs/evaluation.md): the whole network + a 19-way linear head (``--num_classes 43``: the original CORINE
nomenclature); MultiLabelSoftMarginLoss; RGB by default (``--bands`` for others), patches resized to 224 bicubic;
``--train_frac 0.1`` for the 10 % setting, drawn without replacement from the train split only, seeded, the
chosen patches saved to ``output_dir/train_patches.txt`` (docs/differences.md). SGD momentum 0.9, weight decay 2e-5,
cosine to 0, 100 epochs, batch 32 as the published main_bigearthnet.py; lr 0.001 x batch / 256 instead of its
1e-5 (which cannot fine-tune; the paper's value is not stated). Training adds flips and normalises the input;
``--flips false --normalize false`` gives the published Resize + ToTensor input (docs/evaluation.md).

Metrics (torchmetrics MultilabelAveragePrecision over every patch of the split, docs/differences.md): mAP micro
(the DINO-MC number), mAP macro and the AP of every class. A class with no positive patch in the split has no
defined AP (torchmetrics would count it as 0): macro averages the classes that occur, and metrics.json lists
the others. With no split list and no ``--split_dir``, every patch found is used for training AND evaluation, and
the script says so; an explicit ``--split_dir`` without the lists, or an empty split, is a one-line error.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torchmetrics
from torchmetrics import classification as tmc
from torchvision.transforms import v2

import engine
import utils
from datasets.bands import is_rgb, parse_bands
from datasets.bigearthnet import NUM_CLASSES, BigEarthNet, save_patch_list
from datasets.transforms import BICUBIC, Normalize


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("BigEarthNet fine-tuning", add_help=False)
    utils.add_backbone_args(parser)
    engine.add_finetune_args(parser, epochs=100, lr=0.001, batch_size=32)
    parser.add_argument("--data_path", default=None, type=str, help="BigEarthNet-v1.0 folder or its parent.")
    parser.add_argument(
        "--split_dir",
        default=None,
        type=str,
        help="Folder of the split lists (bigearthnet-{train,val,test}.txt, bigearthnet-{train,val,test}.csv or "
        "{train,val,test}.csv) and the snow / cloud exclusion lists; it must hold them. Default: data_path, the "
        "patch folder and its parent (no list there: every patch, with a warning).",
    )
    parser.add_argument(
        "--num_classes",
        default=19,
        type=int,
        choices=NUM_CLASSES,
        help="19 (the nomenclature of the DINO-MC results) or 43 (the original CORINE labels).",
    )
    parser.add_argument("--eval_split", default="val", choices=["val", "test"], help="Split evaluated every epoch.")
    parser.add_argument("--input_size", default=224, type=int, help="Side the 120x120 patches are resized to.")
    parser.add_argument("--weight_decay", default=2e-5, type=float, help="SGD weight decay.")
    parser.add_argument(
        "--flips",
        default=True,
        type=utils.bool_flag,
        help="Random horizontal and vertical flips of the training patches (the published script has none).",
    )
    parser.add_argument(
        "--normalize",
        default=True,
        type=utils.bool_flag,
        help="Standardise the input (ImageNet statistics for RGB); false: values / 255, the published ToTensor.",
    )
    return parser


def stretch_normalize(image: torch.Tensor) -> torch.Tensor:
    """Z-score of a non-RGB band after the reader's stretch, which maps mean +- 2 std to 0..255."""
    return (image.float() - 127.5) / 63.75


def to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """The published input: the reader's uint8 stretch as ToTensor gives it, values / 255, no standardisation."""
    return image.float() / 255.0


def build_transforms(
    bands: list[str], size: int, flips: bool = True, normalize: bool = True
) -> tuple[v2.Compose, v2.Compose]:
    """Resize to ``size`` bicubic (+ flips for training when ``flips``); with ``normalize`` RGB takes ImageNet
    statistics and other bands :func:`stretch_normalize`, else :func:`to_unit_range`."""
    scale = (Normalize(bands) if is_rgb(bands) else stretch_normalize) if normalize else to_unit_range
    resize = v2.Resize((size, size), interpolation=BICUBIC, antialias=True)
    augment = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()] if flips else []
    return v2.Compose([resize, *augment, scale]), v2.Compose([resize, scale])


def build_datasets(args: argparse.Namespace) -> tuple[BigEarthNet, BigEarthNet, list[str]]:
    if args.data_path is None or not Path(args.data_path).is_dir():
        raise utils.ConfigError(f"--data_path {args.data_path} is not a folder (expected BigEarthNet-v1.0)")
    with utils.config_errors():
        bands = parse_bands(args.bands)
        train_tf, eval_tf = build_transforms(bands, args.input_size, args.flips, args.normalize)
        frac = args.train_frac if args.train_frac < 1.0 else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train = BigEarthNet(
                args.data_path, "train", bands, train_tf, args.split_dir, frac, args.seed, args.num_classes
            )
            evaluation = BigEarthNet(
                args.data_path, args.eval_split, bands, eval_tf, args.split_dir, num_classes=args.num_classes
            )
    for warning in caught:
        print(f"WARNING: {warning.message}")
    if train.split_file is None:
        print(f"WARNING: no split files: training and evaluating on the same {len(evaluation)} patches")
    if frac is not None and utils.is_main_process():
        path = save_patch_list(train.patches, Path(args.output_dir) / "train_patches.txt")
        print(f"--train_frac {frac}: {len(train)} train patches drawn without replacement, listed in {path}")
    print(
        f"BigEarthNet: {len(train)} train / {len(evaluation)} {args.eval_split} patches, bands {','.join(bands)}, "
        f"{args.num_classes} classes"
    )
    return train, evaluation, bands


def multilabel_task(eval_targets: torch.Tensor, names: tuple[str, ...]) -> engine.Task:
    """mAP micro (main metric) and per-class AP over the classes ``names``; ``eval_targets`` (the whole split)
    tells which classes occur."""
    present = eval_targets.sum(dim=0) > 0

    def summarize(metrics: dict) -> dict:
        per_class = torch.tensor(metrics["ap_per_class"])
        return {
            "mAP_macro": per_class[present].mean().item(),
            "ap_per_class": {
                name: (ap if ok else None) for name, ap, ok in zip(names, per_class.tolist(), present.tolist())
            },
            "classes_without_positives": [name for name, ok in zip(names, present.tolist()) if not ok],
        }

    return engine.Task(
        criterion=nn.MultiLabelSoftMarginLoss(),
        metrics=torchmetrics.MetricCollection(
            {
                "mAP_micro": tmc.MultilabelAveragePrecision(len(names), average="micro"),
                "ap_per_class": tmc.MultilabelAveragePrecision(len(names), average=None),
            }
        ),
        main_metric="mAP_micro",
        activation=torch.sigmoid,
        summarize=summarize,
    )


def print_ap_table(metrics: dict) -> None:
    print(f"{'class':<90s} AP (%)")
    for name, ap in metrics["ap_per_class"].items():
        print(f"{name:<90s} {'n/a (no positive patch)' if ap is None else f'{ap:6.2f}'}")
    print(f"mAP micro {metrics['mAP_micro']:.2f}  macro {metrics['mAP_macro']:.2f}")


def main(args: argparse.Namespace) -> dict:
    # Absent classes are reported once, in the AP table and metrics.json, rather than by torchmetrics every epoch.
    warnings.filterwarnings("ignore", message="No positive samples found in target")
    precision = engine.setup(args)
    train_set, eval_set, bands = build_datasets(args)
    backbone, feat_dim = utils.load_backbone(
        args.arch, args.patch_size, bands, args.pretrained_weights, args.checkpoint_key, args.adapt_input
    )
    model = engine.Classifier(backbone, feat_dim, len(eval_set.class_names)).to(args.device)
    task = multilabel_task(torch.from_numpy(eval_set.targets), eval_set.class_names)
    eval_loader = engine.make_loader(eval_set, args, train=False)

    if args.evaluate is not None:
        result = engine.evaluate_checkpoint(model, task, eval_loader, precision, args)
        print_ap_table(result["metrics"])
        return result
    train_loader = engine.make_loader(train_set, args, train=True)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=engine.scaled_lr(args), momentum=0.9, weight_decay=args.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)
    result = engine.fit(
        model, task, train_loader, eval_loader, optimizer, scheduler, precision, args, eval_split=args.eval_split
    )
    print_ap_table(result["last"]["metrics"])
    best = result["best"]
    print(
        f"Best mAP micro {best['metrics']['mAP_micro']:.2f} at epoch {best['epoch']} "
        f"(selected on {result['best_selected_on']})"
    )
    return result


def run(argv: list[str] | None = None) -> None:
    """Command-line entry: bad arguments or bad data end with one line and exit code 2."""
    utils.run_cli("BigEarthNet fine-tuning", get_args_parser, main, argv)


if __name__ == "__main__":
    run()
