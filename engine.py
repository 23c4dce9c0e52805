"""The supervised loop shared by eval_linear.py and the fine-tuning scripts (EuroSAT, BigEarthNet, OSCD).

A script builds its datasets, model, optimizer, scheduler and a :class:`Task` (loss, how a batch becomes
predictions and targets, torchmetrics metrics), then calls :func:`fit` or :func:`evaluate_checkpoint`.
Everything else is here, once:

- plain process, torchrun or SLURM (``utils.init_distributed_mode``), CPU or CUDA, ``--precision``;
- metrics accumulated over the WHOLE evaluation split with torchmetrics (exact, synchronised across
  processes at ``compute()``), never averaged per batch (docs/differences.md);
- ``output_dir/checkpoint.pth`` every epoch and ``checkpoint_best.pth`` on a new best, both atomic
  (``utils.save_checkpoint``), resumed from automatically; the random generators are re-seeded from
  ``--seed`` and the epoch at the start of every epoch, so a resumed run repeats the uninterrupted one;
- one JSON line per epoch in ``output_dir/log.txt`` and ``output_dir/metrics.json`` with the best and the
  last metrics, and the split on which "best" was chosen (``best_selected_on``).
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torchmetrics

import utils


def add_finetune_args(
    parser: argparse.ArgumentParser,
    epochs: int = 100,
    lr: float = 0.001,
    batch_size: int = 32,
    seed: int = 0,
    lr_scaled: bool = True,
) -> None:
    """Flags every supervised script shares; the defaults are each protocol's (docs/evaluation.md).

    ``lr_scaled``: whether the script applies DINO's linear scaling rule (:func:`scaled_lr`) to ``--lr``.
    """
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", default=epochs, type=int, help="Number of training epochs.")
    lr_help = (
        "Learning rate for a total batch of 256 (scaled by batch x GPUs / 256)." if lr_scaled else "Learning rate."
    )
    group.add_argument("--lr", default=lr, type=float, help=lr_help)
    group.add_argument("--batch_size_per_gpu", default=batch_size, type=int, help="Samples per process and step.")
    group.add_argument("--num_workers", default=utils.default_workers(4), type=int, help="Loader workers (<= CPUs).")
    group.add_argument(
        "--train_frac",
        default=1.0,
        type=float,
        help="Fraction of the train split used, drawn without replacement from --seed (0 < f <= 1).",
    )
    group.add_argument(
        "--evaluate",
        nargs="?",
        const="checkpoint_best.pth",
        default=None,
        metavar="CHECKPOINT",
        help="Only evaluate a saved checkpoint on the evaluation split (default file: "
        "output_dir/checkpoint_best.pth) and write output_dir/evaluate.json.",
    )
    group.add_argument("--output_dir", default=".", type=str, help="Checkpoints, logs and metrics go here.")
    group.add_argument("--seed", default=seed, type=int, help="Random seed.")
    group.add_argument("--print_freq", default=20, type=int, help="Log a line every this many iterations.")
    utils.add_tensorboard_args(group)
    utils.add_pretrained_args(parser)
    utils.add_precision_args(parser)
    utils.add_distributed_args(parser)


def check_finetune_args(args: argparse.Namespace) -> None:
    """Reject impossible values of the shared flags before any work starts (ConfigError names the flag)."""
    utils.check_numbers(
        args, positive=("epochs", "batch_size_per_gpu", "print_freq"), non_negative=("lr", "num_workers")
    )
    if not 0.0 < args.train_frac <= 1.0:
        raise utils.ConfigError(f"--train_frac must be in (0, 1], got {args.train_frac}")


def setup(args: argparse.Namespace) -> str:
    """Distributed mode, device, seeds and output folder; returns the precision to run at (a resumed run's
    checkpoint's unless --precision asks for another)."""
    utils.init_distributed_mode(args)
    check_finetune_args(args)
    utils.fix_random_seeds(args.seed)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    return utils.resolve_precision(args, args.device, Path(args.output_dir) / "checkpoint.pth")


def scaled_lr(args: argparse.Namespace) -> float:
    """The linear scaling rule of DINO's evaluations: ``--lr`` x total batch / 256."""
    return args.lr * args.batch_size_per_gpu * utils.get_world_size() / 256.0


# ============================================================================================ data


def subset_indices(n: int, frac: float, seed: int) -> list[int]:
    """``frac`` of ``range(n)`` drawn WITHOUT replacement from ``seed``, sorted (docs/differences.md)."""
    if frac >= 1.0:
        return list(range(n))
    count = max(1, round(frac * n))
    return sorted(np.random.default_rng(seed).choice(n, size=count, replace=False).tolist())


class ShardSampler(torch.utils.data.Sampler):
    """Every ``world_size``-th index from ``rank``: each sample is evaluated exactly once over all processes.

    DistributedSampler pads the last shard with repeated samples, which would count them twice in the
    metrics; the shards here may differ in length by one, which evaluation (no collective per batch) allows.
    """

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(dataset, args: argparse.Namespace, train: bool) -> torch.utils.data.DataLoader:
    """Train: shuffled per epoch from ``--seed`` (DistributedSampler, also in a plain process), last partial
    batch dropped; evaluation: every sample exactly once, in order. Workers are not persistent: they are
    re-seeded from the (re-seeded) torch generator every epoch, which makes resumed runs exact.

    A train split smaller than one batch per process sets --batch_size_per_gpu to its share, with one warning
    line, before the learning rate is scaled from it: a small dataset runs with the defaults."""
    share = len(dataset) // utils.get_world_size()
    if train and 0 < share < args.batch_size_per_gpu:
        utils.warn(
            f"--batch_size_per_gpu {args.batch_size_per_gpu}: the train split has {len(dataset)} samples for "
            f"{utils.get_world_size()} processes; using batches of {share}"
        )
        args.batch_size_per_gpu = share
    if train:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=utils.get_world_size(), rank=utils.get_rank(), shuffle=True, seed=args.seed
        )
    else:
        sampler = ShardSampler(len(dataset), utils.get_rank(), utils.get_world_size())
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=str(args.device).startswith("cuda"),
        drop_last=train,
    )
    if train and len(loader) == 0:
        raise utils.ConfigError(
            f"the train split has {len(dataset)} samples, fewer than one batch of --batch_size_per_gpu "
            f"{args.batch_size_per_gpu} x {utils.get_world_size()} processes"
        )
    return loader


# ============================================================================================ task


def classification_batch(model: nn.Module, batch: Any, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, targets)`` batches: the model's logits and the targets, on ``device``."""
    images, targets = batch
    return model(images.to(device, non_blocking=True)), targets.to(device, non_blocking=True)


@dataclass
class Task:
    """What differs between the supervised tasks.

    ``forward(model, batch, device)`` returns (logits, targets) for ``criterion``; the metrics are updated
    with ``activation(logits)`` (probabilities: torchmetrics guesses per batch whether floats are logits,
    which could treat batches differently) and the targets. ``main_metric`` (a key of the computed
    metrics, higher is better) selects ``checkpoint_best.pth``; ``summarize`` may add derived metrics.
    """

    criterion: nn.Module
    metrics: torchmetrics.MetricCollection
    main_metric: str
    forward: Callable[[nn.Module, Any, str], tuple[torch.Tensor, torch.Tensor]] = classification_batch
    activation: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid
    summarize: Callable[[dict[str, Any]], dict[str, Any]] | None = None


def to_python(value: Any) -> Any:
    """Tensors -> floats or nested lists, so metrics can be written as JSON."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The single-number metrics (for the per-epoch log line)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


# ============================================================================================ loop


def train_one_epoch(
    model: nn.Module,
    task: Task,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    scaler: torch.amp.GradScaler | None,
    precision: str,
    args: argparse.Namespace,
) -> dict[str, float]:
    """One pass over the train loader; returns the mean loss and the learning rate."""
    model.train()
    metric_logger = utils.MetricLogger(delimiter="  ")
    header = f"Epoch: [{epoch}/{args.epochs}]"
    for batch in metric_logger.log_every(loader, args.print_freq, header):
        with utils.autocast(precision, args.device):
            logits, targets = task.forward(model, batch, args.device)
            loss = task.criterion(logits.float(), targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            print(f"Loss is {loss_value} at epoch {epoch}: stopping; the last checkpoint is kept.", force=True)
            sys.exit(1)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        metric_logger.update(loss=loss_value, lr=optimizer.param_groups[0]["lr"])
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


COUNT_METRICS = ("confusion_matrix",)  # every other metric is a score in [0, 1], reported in percent
SCORE_UNIT = "percent"  # recorded in the checkpoints: older ones hold fractions


def fractions_to_percent(entry: dict | None) -> dict | None:
    """A best / last entry of a checkpoint written with scores as fractions, its scores in percent."""
    if entry is None:
        return None

    def scaled(key: str, value: Any) -> Any:
        if key in COUNT_METRICS or key == "loss" or value is None:
            return value
        if isinstance(value, dict):
            return {k: scaled(key, v) for k, v in value.items()}
        return [scaled(key, v) for v in value] if isinstance(value, list) else 100.0 * value

    metrics = ("metrics", "selection_metrics")
    return {k: ({m: scaled(m, v) for m, v in value.items()} if k in metrics else value) for k, value in entry.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, loader: torch.utils.data.DataLoader, precision: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Metrics over the whole split (all processes' shards together), as Python numbers and lists.

    Pass the model without its DDP wrapper: shards may differ by one batch, and DDP's forward could wait
    on a collective that the shorter shard never joins.
    """
    model.eval()
    task.metrics.reset()
    task.metrics.to(args.device)
    metric_logger = utils.MetricLogger(delimiter="  ")
    for batch in metric_logger.log_every(loader, args.print_freq, "Test:"):
        with utils.autocast(precision, args.device):
            logits, targets = task.forward(model, batch, args.device)
            loss = task.criterion(logits.float(), targets)
        task.metrics.update(task.activation(logits.float()), targets.long())  # torchmetrics wants integer labels
        metric_logger.update(loss=loss.item())
    metric_logger.synchronize_between_processes()
    # Scores in percent, as DINO reports accuracy, in the console and in every JSON file; counts as they are.
    results = {k: to_python(v if k in COUNT_METRICS else 100.0 * v) for k, v in task.metrics.compute().items()}
    results["loss"] = metric_logger.loss.global_avg if "loss" in metric_logger.meters else float("nan")
    if task.summarize is not None:
        results.update(task.summarize(results))
    scores = "  ".join(f"{k} {v:.2f}" for k, v in scalars(results).items() if k != "loss")
    print(f"Evaluation (%): {scores}  (loss {results['loss']:.4f})")
    return results


def fit(
    model: nn.Module,
    task: Task,
    train_loader: torch.utils.data.DataLoader,
    eval_loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    precision: str,
    args: argparse.Namespace,
    checkpoint_module: nn.Module | None = None,
    eval_split: str = "val",
    select_loader: torch.utils.data.DataLoader | None = None,
    select_split: str | None = None,
    select_best: bool = True,
) -> dict[str, Any]:
    """Train for ``args.epochs`` epochs, evaluating after each; resume from ``output_dir/checkpoint.pth``.

    ``scheduler`` is stepped once per epoch. ``checkpoint_module`` is what the checkpoints hold (default:
    the whole model; the linear probe saves only its classifier). Returns ``{"best": ..., "last": ...,
    "best_selected_on": ...}``, each entry ``{"epoch": int, "metrics": {...}}`` with the metrics of the
    ``eval_split`` evaluated by ``eval_loader`` (logged per epoch as ``<eval_split>_<metric>``); the same is
    written to ``output_dir/metrics.json``.

    Which split picks "best" (and ``checkpoint_best.pth``) is always recorded as ``best_selected_on``, since a
    best epoch picked on the split it is then reported on is an optimistic number: by default the evaluated
    split itself; with ``select_loader`` another split, ``select_split`` (e.g. validation cities held out of
    the train set), whose metrics go in each entry's ``selection_metrics``; with ``select_best=False`` none
    (``best_selected_on`` null, "best" is the last epoch).
    """
    if select_loader is not None and (select_split is None or not select_best):
        raise ValueError("a select_loader needs its select_split name and select_best=True")
    best_selected_on = (select_split if select_loader is not None else eval_split) if select_best else None
    selection_key = "selection_metrics" if select_loader is not None else "metrics"
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_module = checkpoint_module if checkpoint_module is not None else model
    scaler = utils.make_grad_scaler(precision, args.device)
    train_model = model
    if args.distributed:
        on_cuda = str(args.device).startswith("cuda")
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if on_cuda else None)

    state = {"epoch": 0, "best": None, "last": None, "score_unit": "fraction"}  # checkpoints before percent
    utils.restart_from_checkpoint(
        output_dir / "checkpoint.pth",
        run_variables=state,
        state_dict=checkpoint_module,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
    )
    if state.pop("score_unit") != SCORE_UNIT:  # a run saved with scores as fractions continues in percent
        state["best"], state["last"] = (fractions_to_percent(state[key]) for key in ("best", "last"))
    start_epoch = state["epoch"]
    log_path = output_dir / "log.txt"
    tensorboard = utils.resume_logs(output_dir, args.tensorboard, start_epoch)
    if start_epoch >= args.epochs:
        print(f"The checkpoint in {output_dir} already finished {start_epoch} epochs; nothing to train.")

    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        utils.fix_random_seeds(args.seed, epoch)  # a resumed run draws exactly what the uninterrupted one did
        train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(train_model, task, train_loader, optimizer, epoch, scaler, precision, args)
        scheduler.step()
        metrics = evaluate(model, task, eval_loader, precision, args)
        state["last"] = {"epoch": epoch, "metrics": metrics}
        if select_loader is not None:
            state["last"]["selection_metrics"] = evaluate(model, task, select_loader, precision, args)
        score = state["last"][selection_key][task.main_metric]
        best = state["best"]
        is_best = not select_best or best is None or score > best[selection_key][task.main_metric]
        if is_best:
            state["best"] = state["last"]
        chosen = "last epoch: no selection" if not select_best else f"selected on {best_selected_on}"
        done = epoch + 1 - start_epoch
        eta = datetime.timedelta(seconds=int((time.time() - start_time) / done * (args.epochs - epoch - 1)))
        print(
            f"Epoch {epoch}/{args.epochs}: {eval_split} {task.main_metric} {metrics[task.main_metric]:.2f} % "
            f"(best at epoch {state['best']['epoch']}, {chosen}); run eta {eta}"
        )

        if utils.is_main_process():
            log_stats = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()}}
            log_stats.update({f"{eval_split}_{k}": v for k, v in scalars(metrics).items()})
            if select_loader is not None:
                log_stats.update({f"select_{k}": v for k, v in scalars(state["last"][selection_key]).items()})
            utils.append_json_log(log_path, log_stats)
            tensorboard.write(log_stats, epoch)
            checkpoint = {
                "state_dict": checkpoint_module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "best": state["best"],
                "last": state["last"],
                "args": utils.plain_args(args),
                "score_unit": SCORE_UNIT,
            }
            if scaler is not None:
                checkpoint["scaler"] = scaler.state_dict()
            # The best first: a kill between the two writes then redoes this epoch, which writes the best again.
            # In the other order checkpoint.pth would already call this epoch the best while
            # checkpoint_best.pth still held an older model, and no later epoch would overwrite it.
            if is_best:
                utils.save_checkpoint(checkpoint, output_dir / "checkpoint_best.pth")
            utils.save_checkpoint(checkpoint, output_dir / "checkpoint.pth")
            summary = {"main_metric": task.main_metric, "eval_split": eval_split, "best_selected_on": best_selected_on}
            utils.write_json(output_dir / "metrics.json", {**summary, "best": state["best"], "last": state["last"]})
    tensorboard.close()
    total = datetime.timedelta(seconds=int(time.time() - start_time))
    print(f"Training time {total}")
    return {"best": state["best"], "last": state["last"], "best_selected_on": best_selected_on}


def evaluate_checkpoint(
    model: nn.Module,
    task: Task,
    eval_loader: torch.utils.data.DataLoader,
    precision: str,
    args: argparse.Namespace,
    checkpoint_module: nn.Module | None = None,
    from_published: Callable[[dict], dict] | None = None,
) -> dict[str, Any]:
    """``--evaluate``: load ``checkpoint_module`` (default: the model) from the checkpoint and evaluate it.

    The checkpoint is looked up as given, then inside ``output_dir``; a missing one is an error (never a
    silent evaluation of the untrained model). ``from_published`` renames the state dict of the published
    script's checkpoints (given as they are) to the module's names. Writes ``output_dir/evaluate.json``.
    """
    path = Path(args.evaluate)
    if not path.is_file():
        path = Path(args.output_dir) / args.evaluate
    if not path.is_file():
        raise utils.ConfigError(f"--evaluate: no checkpoint {args.evaluate} (nor {path})")
    checkpoint_module = checkpoint_module if checkpoint_module is not None else model
    checkpoint = utils.load_checkpoint_safely(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise utils.ConfigError(f"--evaluate {path}: not a checkpoint of this script (no 'state_dict' entry)")
    state_dict = checkpoint["state_dict"]
    if from_published is not None:
        state_dict = from_published(state_dict)
    expected = checkpoint_module.state_dict()
    if set(state_dict) != set(expected):
        mismatch = utils.key_mismatch(expected, state_dict)
        raise utils.ConfigError(f"--evaluate {path} does not fit this model: {mismatch}; check --arch and --bands")
    try:
        checkpoint_module.load_state_dict(state_dict)
    except RuntimeError as err:  # same keys, other shapes: torch names the first tensors
        raise utils.ConfigError(f"--evaluate {path} does not fit this model: {utils.one_line(err)}") from None
    print(f"Evaluating {path} (trained for {checkpoint.get('epoch', '?')} epochs)")
    metrics = evaluate(model, task, eval_loader, precision, args)
    result = {"checkpoint": str(path), "epoch": checkpoint.get("epoch"), "metrics": metrics}
    if utils.is_main_process():
        utils.write_json(Path(args.output_dir) / "evaluate.json", result)
    return result


# ============================================================================================ reporting


def save_confusion_matrix_png(matrix: list[list[int]], class_names: list[str], path: str | Path) -> Path:
    """Confusion matrix (rows: true class, columns: predicted) as a PNG with the counts written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    size = max(4.0, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=90)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            colour = "white" if counts[i, j] > threshold else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# ============================================================================================ models


class Classifier(nn.Module):
    """Backbone + linear head for full fine-tuning; the head starts as DINO's linear classifier does
    (normal std 0.01, bias 0), so the first steps do not disturb the pretrained features much."""

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feat_dim, num_classes)
        self.head.weight.data.normal_(mean=0.0, std=0.01)
        self.head.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
