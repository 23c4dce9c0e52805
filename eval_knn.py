"""Weighted k-NN evaluation of a pretrained backbone on EuroSAT (the DINO / DINO-MC protocol).

    python eval_knn.py --arch vit_small --patch_size 8 --pretrained_weights CKPT_OR_URL_OR_DRIVE_ID \
        --data_path /data/eurosat --output_dir runs/knn
    torchrun --nproc_per_node 4 eval_knn.py ...   (same flags: each process extracts a share of the images)

Features are the teacher backbone's output (ViT: CLS token after the final norm; ResNet / Swin: the pooled
feature, never a projection), L2-normalised, after Resize 256 (bicubic) + CenterCrop 224. Every train image is
in the memory bank; a test image's k most cosine-similar train images vote for their class with weight
exp(similarity / T). Top-1 and top-5 accuracy (%) for each k are printed and written to
``output_dir/knn.json`` as ``{"<k>": {"top1": ..., "top5": ...}}``. ``--compare_random`` also evaluates the
same architecture with random weights (``knn_random.json``), the baseline a pretraining must beat.

EuroSAT splits: the SeCo / DINO-MC lists ``eurosat-{train,val}.txt`` (16,200 / 5,400 images), DINO-style
``train/`` and ``val/`` folders, or a seeded stratified 60/20/20 split (written to ``output_dir``). The
published numbers use train vs val; ``--test_split test`` evaluates on the held-out test list instead.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import utils
from datasets import eurosat
from datasets.bands import parse_bands
from datasets.transforms import eval_resize, eval_transform

FEATURE_FILES = ("trainfeat.pth", "trainlabels.pth", "testfeat.pth", "testlabels.pth")


DEFAULT_TEMPERATURE = 0.07  # DINO's k-NN vote temperature


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DINO-MC k-NN evaluation on EuroSAT", add_help=False)
    utils.add_backbone_args(parser)
    utils.add_pretrained_args(parser)
    parser.add_argument(
        "--compare_random",
        action="store_true",
        help="Also evaluate the same architecture with random weights (knn_random.json), as a baseline.",
    )
    parser.add_argument(
        "--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int, help="Numbers of nearest neighbours."
    )
    parser.add_argument(
        "--temperature", default=DEFAULT_TEMPERATURE, type=float, help="Temperature T of the exp(sim / T) votes."
    )
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Images per process and forward pass.")
    parser.add_argument("--num_workers", default=utils.default_workers(8), type=int, help="Loader workers (<= CPUs).")
    parser.add_argument(
        "--chunk_size",
        default=1024,
        type=int,
        help="Test images compared with the whole memory bank at once (memory: chunk_size x train images).",
    )
    parser.add_argument(
        "--resize_size",
        default=None,
        type=int,
        help="Shorter side after the bicubic resize. Default: --crop_size x 256 / 224 (256 for 224), as DINO.",
    )
    parser.add_argument("--crop_size", default=224, type=int, help="Side of the centre crop fed to the network.")
    parser.add_argument(
        "--data_path",
        default=None,
        type=str,
        help="EuroSAT root: the RGB (2750/) or MS archive folder, with eurosat-*.txt lists or train/ val/ folders.",
    )
    parser.add_argument("--train_split", default="train", choices=eurosat.SPLITS, help="Memory-bank split.")
    parser.add_argument("--test_split", default="val", choices=eurosat.SPLITS, help="Evaluated split.")
    parser.add_argument("--seed", default=0, type=int, help="Seed of a generated split and of the random baseline.")
    parser.add_argument("--dump_features", default=None, type=str, help="Save the features and labels to this folder.")
    parser.add_argument(
        "--load_features",
        default=None,
        type=str,
        help="Skip the network: run the k-NN on features saved earlier with --dump_features.",
    )
    parser.add_argument("--output_dir", default=".", type=str, help="Where knn.json is written.")
    parser.add_argument(
        "--print_freq", default=10, type=int, help="Feature extraction: a progress line every this many batches."
    )
    utils.add_tensorboard_args(parser)
    utils.add_distributed_args(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse inconsistent flags before any image is read (ConfigError: one line, exit code 2)."""
    positive = ("nb_knn", "temperature", "batch_size_per_gpu", "chunk_size", "resize_size", "crop_size")
    utils.check_numbers(args, positive, non_negative=("num_workers",))
    if args.resize_size is None:
        args.resize_size = eval_resize(args.crop_size)
    if args.crop_size > args.resize_size:
        raise utils.ConfigError(f"--crop_size {args.crop_size} is larger than --resize_size {args.resize_size}")
    if args.load_features:
        if args.compare_random:
            raise utils.ConfigError("--compare_random needs the network; it cannot be used with --load_features")
        return
    if args.data_path is None:
        raise utils.ConfigError("--data_path is required (the EuroSAT folder), unless --load_features is given")
    if args.compare_random and str(args.pretrained_weights).lower() == "none":
        raise utils.ConfigError("--compare_random compares with --pretrained_weights; it cannot be 'none' too")
    with utils.config_errors("--bands"):
        args.band_list = parse_bands(args.bands)


def knn_splits(
    data_path: str | Path,
    bands: list[str],
    crop_size: int,
    resize_size: int | None = None,
    splits: tuple[str, str] = ("train", "val"),
    seed: int = 0,
) -> tuple[eurosat.EuroSAT, eurosat.EuroSAT]:
    """The memory-bank and evaluated EuroSAT splits with the evaluation transform of their format:
    Resize(``resize_size``, default :func:`eval_resize` of the crop) + CenterCrop(``crop_size``)."""
    train_set, test_set = (eurosat.EuroSAT(data_path, split, bands, seed=seed) for split in splits)
    normalize = train_set.input_normalization()
    train_set.transform = test_set.transform = eval_transform(bands, resize_size, crop_size, normalize=normalize)
    return train_set, test_set


def build_datasets(args: argparse.Namespace) -> tuple[eurosat.EuroSAT, eurosat.EuroSAT]:
    """--data_path's --train_split and --test_split; a generated split is saved to --output_dir."""
    splits = (args.train_split, args.test_split)
    with utils.config_errors():  # --bands asks for bands that this copy of EuroSAT does not hold
        train_set, test_set = knn_splits(
            args.data_path, args.band_list, args.crop_size, args.resize_size, splits, args.seed
        )
    if train_set.generated_split is not None and utils.is_main_process():
        written = eurosat.save_split(train_set.generated_split, args.output_dir)
        print(f"{args.data_path} ships no split: drew a stratified 60/20/20 split, saved as {written[0].parent}/")
    print(f"Data loaded: {len(train_set)} {args.train_split} and {len(test_set)} {args.test_split} images.")
    return train_set, test_set


def build_model(args: argparse.Namespace, weights: str | None) -> tuple[nn.Module, int]:
    """The backbone in evaluation mode with ``weights`` loaded (``"none"``: random initialisation).

    Seeded identically on every process: with random weights, each process must extract features of the
    same network, and the random baseline must be the same from run to run.
    """
    torch.manual_seed(args.seed)
    model, feat_dim = utils.load_backbone(
        args.arch, args.patch_size, args.band_list, weights, args.checkpoint_key, args.adapt_input
    )
    return model.to(args.device).eval(), feat_dim


@torch.no_grad()
def extract_features(
    model: nn.Module,
    feat_dim: int,
    dataset: torch.utils.data.Dataset,
    device: str,
    batch_size: int,
    num_workers: int = 0,
    print_freq: int = 10,
    header: str = "Features:",
) -> torch.Tensor:
    """L2-normalised features (N, feat_dim) of ``dataset`` in dataset order, on every process.

    Process r extracts images r, r + world, r + 2 world, ... (no padding, so no image is counted twice) and
    writes its rows at their dataset indices in a zero matrix; summing the matrices over processes then
    gives every row exactly once, in order.
    """
    indices = list(range(utils.get_rank(), len(dataset), utils.get_world_size()))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.startswith("cuda"),
        drop_last=False,
    )
    features = torch.zeros(len(dataset), feat_dim, device=device)
    offset = 0
    for images, _ in utils.Progress(loader, header, print_freq):
        out = F.normalize(model(images.to(device, non_blocking=True)).float(), dim=1)
        rows = torch.tensor(indices[offset : offset + len(out)], device=device)
        features.index_copy_(0, rows, out)
        offset += len(out)
    if utils.is_dist_avail_and_initialized():
        dist.all_reduce(features)
    return features


@torch.no_grad()
def knn_classifier(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: list[int],
    temperature: float,
    num_classes: int,
    chunk_size: int = 1024,
) -> dict[int, tuple[float, float]]:
    """Weighted k-NN top-1 / top-5 accuracy (%) for every k in ``ks``, on L2-normalised features.

    Test images are compared with the whole memory bank ``chunk_size`` at a time, so the similarity matrix
    in memory is chunk_size x n_train (e.g. 1024 x 16,200 floats = 66 MB) rather than n_test x n_train. One
    top-k search with the largest k serves every k: the neighbours come sorted by similarity. A class that
    got no vote is never among the top-5 predictions (with k < 5 their order would be arbitrary).
    """
    max_k = max(ks)
    train_labels = train_labels.to(train_features.device)
    correct1 = dict.fromkeys(ks, 0)
    correct5 = dict.fromkeys(ks, 0)
    n_top = min(5, num_classes)
    for start in range(0, len(test_features), chunk_size):
        feats = test_features[start : start + chunk_size]
        targets = test_labels[start : start + chunk_size].to(feats.device)
        similarity, neighbours = (feats @ train_features.T).topk(max_k, dim=1)
        neighbour_labels = train_labels[neighbours]
        weights = (similarity / temperature).exp()
        for k in ks:
            votes = torch.zeros(len(feats), num_classes, device=feats.device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            top_votes, top_classes = votes.topk(n_top, dim=1)
            hits = (top_classes == targets[:, None]) & (top_votes > 0)
            correct1[k] += int(hits[:, 0].sum())
            correct5[k] += int(hits.any(dim=1).sum())
    total = len(test_features)
    return {k: (100.0 * correct1[k] / total, 100.0 * correct5[k] / total) for k in ks}


def save_features(folder: str | Path, features: tuple[torch.Tensor, ...]) -> None:
    """Write the four tensors under DINO's file names, so either code base reads the other's dumps."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensor in zip(FEATURE_FILES, features):
        utils.save_checkpoint(tensor.cpu(), folder / name)
    print(f"Features saved to {folder}/")


def load_features(folder: str | Path) -> tuple[torch.Tensor, ...]:
    """Read the tensors written by :func:`save_features` (weights-only loading: tensors, nothing executable)."""
    folder = Path(folder)
    missing = [name for name in FEATURE_FILES if not (folder / name).is_file()]
    if missing:
        raise utils.ConfigError(f"--load_features {folder}: missing {', '.join(missing)} (written by --dump_features)")
    tensors = tuple(utils.load_checkpoint_safely(folder / name) for name in FEATURE_FILES)
    train_features, train_labels, test_features, test_labels = tensors
    if train_features.shape[1] != test_features.shape[1] or len(train_features) != len(train_labels):
        raise utils.ConfigError(f"--load_features {folder}: the feature and label files do not match")
    for name, rows in (("train", train_features), ("test", test_features)):
        if len(rows) == 0:
            raise utils.ConfigError(f"--load_features {folder}: the {name} split is empty (0 feature rows)")
    print(f"Features loaded from {folder}/: {len(train_features)} train and {len(test_features)} test rows.")
    return tensors


def clamp_nb_knn(nb_knn: list[int], n_train: int, flag: str = "--nb_knn") -> list[int]:
    """The k values, those larger than the memory bank replaced by its size (one warning line): a small
    dataset then runs with the defaults instead of stopping after the feature extraction."""
    too_large = [k for k in nb_knn if k > n_train]
    if not too_large:
        return list(nb_knn)
    utils.warn(
        f"{flag} {' '.join(map(str, too_large))}: larger than the {n_train} images of the memory bank; "
        f"using k = {n_train}"
    )
    return list(dict.fromkeys(min(k, n_train) for k in nb_knn))


def knn_top1(
    backbone: nn.Module,
    feat_dim: int,
    splits: tuple[eurosat.EuroSAT, eurosat.EuroSAT],
    nb_knn: list[int],
    device: str,
    batch_size: int,
    print_freq: int = 10,
    header: str = "k-NN:",
) -> dict[int, float]:
    """Top-1 (%) for every k of the weighted k-NN on ``backbone``'s features: this script's protocol, called by
    the pretraining's online k-NN, so that it equals this script run on the checkpoint."""
    was_training = backbone.training
    backbone.eval()
    features = [extract_features(backbone, feat_dim, d, device, batch_size, 0, print_freq, header) for d in splits]
    backbone.train(was_training)
    labels = [torch.tensor(d.targets, dtype=torch.long, device=device) for d in splits]
    accuracies = knn_classifier(
        features[0], labels[0], features[1], labels[1], nb_knn, DEFAULT_TEMPERATURE, len(splits[0].classes)
    )
    return {k: top1 for k, (top1, _) in accuracies.items()}


def evaluate(features: tuple[torch.Tensor, ...], num_classes: int, args: argparse.Namespace) -> dict:
    """Run the k-NN for every k and return knn.json's content."""
    train_features, train_labels, test_features, test_labels = features
    accuracies = knn_classifier(
        train_features,
        train_labels,
        test_features,
        test_labels,
        args.nb_knn,
        args.temperature,
        num_classes,
        args.chunk_size,
    )
    return {str(k): {"top1": top1, "top5": top5} for k, (top1, top5) in accuracies.items()}


def print_table(results: dict, random_results: dict | None) -> None:
    """One row per k: top-1 and top-5 of the weights, and of random weights when they were evaluated."""
    columns = [("top-1", results, "top1"), ("top-5", results, "top5")]
    if random_results is not None:
        columns += [("random top-1", random_results, "top1"), ("random top-5", random_results, "top5")]
    print(f"{'k':>5}" + "".join(f"  {title:>12}" for title, _, _ in columns))
    for k in results:
        print(f"{k:>5}" + "".join(f"  {table[k][key]:12.2f}" for _, table, key in columns))


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, dataset: torch.utils.data.Dataset, device: str, batch_size: int, num_workers: int, print_freq: int
) -> None:
    """Recompute a random network's BatchNorm statistics on ``dataset`` (one pass, cumulative average).

    Why: at initialisation the running statistics are 0 / 1, which fit no real input, so a random baseline
    with batch norm is handicapped, and a pretrained network "wins" by having calibrated its batch norm alone
    (measured: ResNet-18, 96 px, 30 epochs of a collapsed teacher, k-NN 60 % vs 40 %). Every process makes
    the same pass, so all hold the same statistics.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average: the mean over all batches
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    model.train()
    for images, _ in utils.Progress(loader, "BatchNorm statistics of the random network:", print_freq):
        model(images.to(device, non_blocking=True))
    model.eval()
    print(f"Random weights: BatchNorm statistics of {len(layers)} layers recomputed on {len(dataset)} images.")


def network_features(
    args: argparse.Namespace, weights: str | None, datasets: tuple[eurosat.EuroSAT, eurosat.EuroSAT], name: str
) -> tuple[torch.Tensor, ...]:
    """(train features, train labels, test features, test labels) of the backbone loaded with ``weights``."""
    model, feat_dim = build_model(args, weights)
    loading = (args.device, args.batch_size_per_gpu, args.num_workers, args.print_freq)
    if str(weights).lower() == "none" and utils.has_batchnorms(model):
        recalibrate_batchnorm(model, datasets[0], *loading)
    train_features, test_features = (
        extract_features(model, feat_dim, dataset, *loading, f"{name} {split}:")
        for dataset, split in zip(datasets, (args.train_split, args.test_split))
    )
    labels = [torch.tensor(d.targets, dtype=torch.long, device=args.device) for d in datasets]
    return train_features, labels[0], test_features, labels[1]


def main(args: argparse.Namespace) -> None:
    utils.init_distributed_mode(args)
    check_args(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()

    random_results = None
    if args.load_features:
        features = load_features(args.load_features)
        args.nb_knn = clamp_nb_knn(args.nb_knn, len(features[0]))
        num_classes = int(max(features[1].max(), features[3].max())) + 1
    else:
        datasets = build_datasets(args)
        args.nb_knn = clamp_nb_knn(args.nb_knn, len(datasets[0]))
        num_classes = len(datasets[0].classes)
        features = network_features(args, args.pretrained_weights, datasets, "pretrained")
        if args.dump_features and utils.is_main_process():
            save_features(args.dump_features, features)
        if args.compare_random:
            random_features = network_features(args, "none", datasets, "random")
            if utils.is_main_process():
                random_results = evaluate(random_features, num_classes, args)
                utils.write_json(output_dir / "knn_random.json", random_results)

    if utils.is_main_process():
        results = evaluate(features, num_classes, args)
        utils.write_json(output_dir / "knn.json", results)
        tensorboard = utils.TensorBoardLog(output_dir, args.tensorboard)
        tensorboard.write({"knn": results, "knn_random": random_results or {}}, step=0)
        tensorboard.close()
        n_train, n_test = len(features[0]), len(features[2])
        print(f"Weighted k-NN, T = {args.temperature}: {n_test} test images, memory bank of {n_train} images")
        print_table(results, random_results)
        print(f"Results written to {output_dir / 'knn.json'} ({time.time() - start:.1f} s)")
    if args.distributed:
        dist.barrier()


def run(argv: list[str] | None = None) -> None:
    utils.run_cli("DINO-MC k-NN evaluation on EuroSAT", get_args_parser, main, argv)


if __name__ == "__main__":
    run()
