"""A supervised toy for engine.fit: three Gaussian blobs, a small MLP, and the fine-tuning flags around them.

Shared by the engine's tests, the downstream protocol tests, TensorBoard's and the kill-safe writers' (which run
``train_toy`` in a child process as ``from tests.engine_toy import ...``, from the repository root).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torchmetrics
from torchmetrics import classification as tmc

import engine


def make_args(tmp_path, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    engine.add_finetune_args(parser, epochs=3, lr=0.5, batch_size=4)
    args = parser.parse_args(["--output_dir", str(tmp_path), "--num_workers", "0", "--pretrained_weights", "none"])
    for key, value in overrides.items():
        setattr(args, key, value)
    args.device, args.distributed = "cpu", False
    return args


def toy_data(n: int = 30, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Three Gaussian blobs in 2-D: learnable in a few epochs by a small MLP."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
    points = centres[labels] + 0.5 * torch.randn(n, 2, generator=generator)
    return torch.utils.data.TensorDataset(points, labels)


def toy_task() -> engine.Task:
    return engine.Task(
        criterion=nn.CrossEntropyLoss(),
        metrics=torchmetrics.MetricCollection({"acc": tmc.MulticlassAccuracy(3, average="micro")}),
        main_metric="acc",
        activation=lambda x: x.softmax(-1),
    )


def train_toy(args) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    train = engine.make_loader(toy_data(), args, train=True)
    evaluation = engine.make_loader(toy_data(seed=1), args, train=False)
    result = engine.fit(model, toy_task(), train, evaluation, optimizer, scheduler, "fp32", args)
    return model, result
