"""Full fine-tuning on EuroSAT (RGB JPEGs or the 13-band MS GeoTIFFs) with a 10-class linear head.

    python finetune_eurosat.py --arch vit_small --patch_size 8 --pretrained_weights CKPT \
        --data_path /data/eurosat --output_dir runs/eurosat_ft
    python finetune_eurosat.py --arch resnet50 --bands ALL --pretrained_weights CKPT --data_path /data/EuroSATallBands

Protocol (docs/evaluation.md): the whole network is trained, SGD momentum 0.9, lr 0.001 x batch / 256 with a
cosine schedule to 0, 100 epochs, train RandomResizedCrop 224 + flip, evaluation Resize 256 + CenterCrop 224.
Reports accuracy, macro precision / recall / F1, per-class accuracy and the confusion matrix (also as a PNG)
of the last and the best epoch in ``output_dir/metrics.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torchmetrics
from torchmetrics import classification as tmc

import engine
import utils
from datasets import eurosat as eurosat_data
from datasets.bands import parse_bands
from datasets.transforms import eval_transform, train_transform


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("EuroSAT fine-tuning", add_help=False)
    utils.add_backbone_args(parser)
    engine.add_finetune_args(parser, epochs=100, lr=0.001, batch_size=32)
    add_eurosat_args(parser)
    parser.add_argument("--weight_decay", default=0.0, type=float, help="SGD weight decay.")
    return parser


def add_eurosat_args(parser: argparse.ArgumentParser) -> None:
    """Data flags shared with eval_linear.py, which evaluates on the same splits."""
    group = parser.add_argument_group("EuroSAT data")
    group.add_argument("--data_path", default=None, type=str, help="EuroSAT root (RGB or MS archive layout).")
    group.add_argument(
        "--eval_split", default="val", choices=["val", "test"], help="Split evaluated after every epoch."
    )
    group.add_argument(
        "--input_size",
        default=224,
        type=int,
        help="Side of the network input (protocol: 224; the 64 px images are upsampled). Evaluation resizes "
        "to input_size x 256/224 and centre-crops.",
    )


def build_datasets(args: argparse.Namespace) -> tuple[torch.utils.data.Dataset, eurosat_data.EuroSAT, list[str]]:
    """Train (possibly a ``--train_frac`` subset) and evaluation datasets with their transforms, and the classes.

    Normalised as every script normalises EuroSAT (``EuroSAT.input_normalization``).
    """
    if args.data_path is None or not Path(args.data_path).is_dir():
        raise utils.ConfigError(f"--data_path {args.data_path} is not a folder (expected a EuroSAT root)")
    with utils.config_errors():
        bands = parse_bands(args.bands)
        train = eurosat_data.EuroSAT(args.data_path, "train", bands, seed=args.seed)
        evaluation = eurosat_data.EuroSAT(args.data_path, args.eval_split, bands, seed=args.seed)
    normalize = train.input_normalization()
    train.transform = train_transform(bands, size=args.input_size, normalize=normalize)
    evaluation.transform = eval_transform(bands, crop=args.input_size, normalize=normalize)

    output_dir = Path(args.output_dir)
    if train.generated_split is not None and utils.is_main_process():
        written = eurosat_data.save_split(train.generated_split, output_dir)
        print(f"No EuroSAT split files: made a seeded stratified split, saved as {', '.join(map(str, written))}")
    indices = engine.subset_indices(len(train), args.train_frac, args.seed)
    if len(indices) < len(train):
        if utils.is_main_process():
            chosen = [Path(train.samples[i][0]).name for i in indices]
            (output_dir / "train_subset.txt").write_text("".join(f"{name}\n" for name in chosen))
        print(f"--train_frac {args.train_frac}: {len(indices)} of {len(train)} train images (train_subset.txt)")
        return torch.utils.data.Subset(train, indices), evaluation, train.classes
    return train, evaluation, train.classes


def classification_metrics(num_classes: int) -> torchmetrics.MetricCollection:
    """Accuracy, macro precision / recall / F1, per-class accuracy and confusion matrix, over the whole split."""
    return torchmetrics.MetricCollection(
        {
            "acc": tmc.MulticlassAccuracy(num_classes, average="micro"),
            "precision_macro": tmc.MulticlassPrecision(num_classes, average="macro"),
            "recall_macro": tmc.MulticlassRecall(num_classes, average="macro"),
            "f1_macro": tmc.MulticlassF1Score(num_classes, average="macro"),
            "per_class_acc": tmc.MulticlassAccuracy(num_classes, average=None),
            "confusion_matrix": tmc.MulticlassConfusionMatrix(num_classes),
        }
    )


def classification_task(num_classes: int) -> engine.Task:
    return engine.Task(
        criterion=nn.CrossEntropyLoss(),
        metrics=classification_metrics(num_classes),
        main_metric="acc",
        activation=lambda logits: logits.softmax(dim=-1),
    )


def report(metrics: dict, classes: list[str], output_dir: Path, name: str) -> None:
    """Print per-class accuracy and write the confusion matrix PNG."""
    for cls, acc in zip(classes, metrics["per_class_acc"]):
        print(f"  {cls:<24s} {acc:6.2f}")
    path = engine.save_confusion_matrix_png(metrics["confusion_matrix"], classes, output_dir / name)
    print(f"Confusion matrix written to {path}")


def from_published_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published ``main_eurosat.py`` checkpoint's ``state_dict`` under :class:`engine.Classifier`'s names.

    Published (``luc_checkpoint_best.pth.tar``): the whole classifier without a prefix, a DINO ViT or a
    torchvision model built with 10 classes, whose classifier is ``head.*`` (ViT, Swin) or ``fc.*`` (ResNet,
    WRN). Here: ``backbone.*`` + ``head.*``. A state dict already in these names is returned as it is.
    """
    if any(key.startswith("backbone.") for key in state_dict):
        return state_dict
    return {
        f"head.{key.split('.', 1)[1]}" if key.startswith(("head.", "fc.")) else f"backbone.{key}": value
        for key, value in state_dict.items()
    }


def main(args: argparse.Namespace) -> dict:
    precision = engine.setup(args)
    train_set, eval_set, classes = build_datasets(args)
    bands = parse_bands(args.bands)
    backbone, feat_dim = utils.load_backbone(
        args.arch, args.patch_size, bands, args.pretrained_weights, args.checkpoint_key, args.adapt_input
    )
    model = engine.Classifier(backbone, feat_dim, len(classes)).to(args.device)
    task = classification_task(len(classes))
    eval_loader = engine.make_loader(eval_set, args, train=False)
    print(f"EuroSAT: {len(train_set)} train / {len(eval_set)} {args.eval_split} images, {len(classes)} classes")
    output_dir = Path(args.output_dir)

    if args.evaluate is not None:
        result = engine.evaluate_checkpoint(
            model, task, eval_loader, precision, args, from_published=from_published_state_dict
        )
        if utils.is_main_process():
            report(result["metrics"], classes, output_dir, "confusion_matrix_evaluate.png")
        return result

    train_loader = engine.make_loader(train_set, args, train=True)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=engine.scaled_lr(args), momentum=0.9, weight_decay=args.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)
    result = engine.fit(
        model, task, train_loader, eval_loader, optimizer, scheduler, precision, args, eval_split=args.eval_split
    )
    if utils.is_main_process():
        report(result["last"]["metrics"], classes, output_dir, "confusion_matrix.png")
        best = result["best"]
        print(
            f"Best accuracy {best['metrics']['acc']:.2f}% at epoch {best['epoch']}; "
            f"last {result['last']['metrics']['acc']:.2f}%"
        )
    return result


def run(argv: list[str] | None = None) -> None:
    """Command-line entry: bad arguments or bad data end with one line and exit code 2."""
    utils.run_cli("EuroSAT fine-tuning", get_args_parser, main, argv)


if __name__ == "__main__":
    run()
