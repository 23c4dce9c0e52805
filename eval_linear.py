"""Linear probe on EuroSAT: a linear classifier trained on the frozen features of a pretrained backbone.

    python eval_linear.py --arch vit_small --patch_size 8 --pretrained_weights CKPT \
        --data_path /data/eurosat --output_dir runs/linear
    python eval_linear.py ... --evaluate          (re-evaluate output_dir/checkpoint_best.pth)

DINO's protocol (docs/evaluation.md): ViT feature = CLS tokens of the last ``--n_last_blocks`` blocks concatenated
(+ the average patch token of the last block with ``--avgpool_patchtokens``); CNN / Swin feature = the pooled
feature of the backbone itself (no random projection; docs/differences.md). Linear layer initialised normal
std 0.01, bias 0; SGD momentum 0.9, weight decay 0, lr 0.001 x batch / 256, cosine to 0, 100 epochs, batch
32 per GPU; train RandomResizedCrop 224 + flip, evaluation Resize 256 + CenterCrop 224.

Writes ``output_dir/linear.json`` (``best_acc``, ``last_acc`` in %, per-class accuracy), a confusion-matrix
PNG, ``metrics.json``, ``log.txt`` and the classifier checkpoints (resumable).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn

import engine
import utils
from datasets.bands import parse_bands
from finetune_eurosat import add_eurosat_args, build_datasets, classification_task, report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Linear evaluation", add_help=False)
    utils.add_backbone_args(parser)
    parser.add_argument(
        "--n_last_blocks",
        default=4,
        type=int,
        help="ViT: concatenate the CLS tokens of this many last blocks (DINO: 4 for ViT-S, 1 for ViT-B).",
    )
    parser.add_argument(
        "--avgpool_patchtokens",
        default=False,
        type=utils.bool_flag,
        help="ViT: also concatenate the average of the last block's patch tokens (DINO: true for ViT-B).",
    )
    engine.add_finetune_args(parser, epochs=100, lr=0.001, batch_size=32)
    add_eurosat_args(parser)
    return parser


class LinearProbe(nn.Module):
    """Frozen backbone (always in eval mode, no gradients) + the trained linear layer ``linear``."""

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int, n_last_blocks: int, avgpool: bool):
        super().__init__()
        self.backbone = backbone
        self.vit = utils.is_vit(backbone)
        self.n_last_blocks = n_last_blocks
        self.avgpool = avgpool
        if self.vit:
            feat_dim = feat_dim * (n_last_blocks + int(avgpool))
        for p in self.backbone.parameters():
            p.requires_grad = False
        self.linear = nn.Linear(feat_dim, num_classes)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def train(self, mode: bool = True) -> LinearProbe:
        """Only the classifier switches to train mode: the frozen backbone's BatchNorm / dropout stay fixed."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.vit:
            return self.backbone(x)
        blocks = self.backbone.get_intermediate_layers(x, self.n_last_blocks)
        parts = [tokens[:, 0] for tokens in blocks]
        if self.avgpool:
            parts.append(blocks[-1][:, 1:].mean(dim=1))
        return torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x).float())


def check_args(args: argparse.Namespace) -> None:
    utils.check_numbers(args, positive=("n_last_blocks",))


def write_linear_json(result: dict, classes: list[str], output_dir: Path) -> Path:
    """``linear.json``: best and last accuracy and per-class accuracy, in percent (as knn.json)."""
    best, last = result["best"], result["last"]
    summary = {
        "best_acc": best["metrics"]["acc"],
        "best_epoch": best["epoch"],
        "last_acc": last["metrics"]["acc"],
        "per_class_acc": dict(zip(classes, last["metrics"]["per_class_acc"])),
        "best_per_class_acc": dict(zip(classes, best["metrics"]["per_class_acc"])),
    }
    path = output_dir / "linear.json"
    utils.write_json(path, summary)
    return path


def main(args: argparse.Namespace) -> dict:
    precision = engine.setup(args)
    check_args(args)
    train_set, eval_set, classes = build_datasets(args)
    bands = parse_bands(args.bands)
    backbone, feat_dim = utils.load_backbone(
        args.arch, args.patch_size, bands, args.pretrained_weights, args.checkpoint_key, args.adapt_input
    )
    model = LinearProbe(backbone, feat_dim, len(classes), args.n_last_blocks, args.avgpool_patchtokens)
    model = model.to(args.device)
    print(f"Linear probe on {model.linear.in_features}-d features of a frozen {args.arch}, {len(classes)} classes")
    task = classification_task(len(classes))
    eval_loader = engine.make_loader(eval_set, args, train=False)
    output_dir = Path(args.output_dir)

    if args.evaluate is not None:
        result = engine.evaluate_checkpoint(model, task, eval_loader, precision, args, checkpoint_module=model.linear)
        if utils.is_main_process():
            report(result["metrics"], classes, output_dir, "confusion_matrix_evaluate.png")
        return result

    train_loader = engine.make_loader(train_set, args, train=True)
    optimizer = torch.optim.SGD(model.linear.parameters(), lr=engine.scaled_lr(args), momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)
    result = engine.fit(
        model,
        task,
        train_loader,
        eval_loader,
        optimizer,
        scheduler,
        precision,
        args,
        checkpoint_module=model.linear,
        eval_split=args.eval_split,
    )
    if utils.is_main_process():
        report(result["last"]["metrics"], classes, output_dir, "confusion_matrix.png")
        path = write_linear_json(result, classes, output_dir)
        summary = json.loads(path.read_text())
        print(
            f"Linear accuracy: best {summary['best_acc']:.2f}% (epoch {summary['best_epoch']}), "
            f"last {summary['last_acc']:.2f}% -> {path}"
        )
    return result


def run(argv: list[str] | None = None) -> None:
    """Command-line entry: bad arguments or bad data end with one line and exit code 2."""
    utils.run_cli("Linear evaluation", get_args_parser, main, argv)


if __name__ == "__main__":
    run()
