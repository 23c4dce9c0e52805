"""k-NN top-1 against training steps for DINO, DINO-MC and DINO-TP on the demo data, several seeds each.

    python benchmarks/learning_curve.py --data_dir demo_data --output_dir runs/learning_curve -- PRETRAIN_FLAGS
    make learning_curve          # the same, with the demo's pretraining flags (Makefile: DEMO_PRETRAIN)

Each (mode, seed) pretrains with ``main_dino_mc.py`` and its online k-NN (``--knn_data_path``, the same code
as ``eval_knn.py``) every ``--knn_every`` epochs; the random network's k-NN (BatchNorm statistics recomputed on
the data where it has batch norm) is the step-0 point. Prints one JSON line per evaluation and per mode
summary, appends them to ``OUTPUT_DIR/learning_curve.jsonl`` and draws ``OUTPUT_DIR/learning_curve.png``
(mean and range over the seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval_knn  # noqa: E402
import main_dino_mc  # noqa: E402
import plot_log  # noqa: E402
import utils  # noqa: E402

# Flags this script sets per run; the pretraining flags after "--" must not set them.
OWN_FLAGS = ("--data_mode", "--seed", "--data_path", "--output_dir", "--knn_data_path", "--knn_every", "--knn_nb")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DINO-MC learning curves on the demo data", add_help=False)
    parser.add_argument("--data_dir", default="demo_data", help="Output of `python -m datasets.demo`.")
    parser.add_argument("--output_dir", default="runs/learning_curve", type=str)
    parser.add_argument("--modes", nargs="+", default=["dino", "mc", "tp"], choices=["dino", "mc", "tp"])
    parser.add_argument("--seeds", nargs="+", default=[0, 1, 2], type=int)
    parser.add_argument("--knn_every", default=2, type=int, help="Epochs between two k-NN evaluations.")
    parser.add_argument("--knn_nb", default=[10, 20], type=int, nargs="+")
    parser.add_argument("pretrain_flags", nargs=argparse.REMAINDER, help="-- then main_dino_mc.py's flags.")
    return parser


def pretrain_flags(args: argparse.Namespace) -> list[str]:
    flags = args.pretrain_flags[1:] if args.pretrain_flags[:1] == ["--"] else args.pretrain_flags
    clashing = [f for f in flags if f.split("=")[0] in OWN_FLAGS]
    if clashing:
        raise utils.ConfigError(f"{clashing[0]} is set by this script per run; leave it out of the pretraining flags")
    return flags


def random_baseline(args: argparse.Namespace, flags: list[str], seed: int, out: Path) -> dict[str, float]:
    """The k-NN of the untrained network: eval_knn.py with --pretrained_weights none at the online k-NN's
    resolution (the training crop size)."""
    parsed = main_dino_mc.get_args_parser().parse_args(flags + ["--data_path", str(args.data_dir)])
    crop = parsed.global_crops_size
    eval_knn.run(
        ["--arch", parsed.arch, "--patch_size", str(parsed.patch_size), "--bands", parsed.bands]
        + ["--pretrained_weights", "none", "--data_path", str(Path(args.data_dir) / "eurosat"), "--seed", str(seed)]
        + ["--output_dir", str(out), "--crop_size", str(crop)]
        + ["--nb_knn", *map(str, args.knn_nb), "--num_workers", "0", "--device", parsed.device]
    )
    results = json.loads((out / "knn.json").read_text())
    return {f"knn_top1_k{k}": row["top1"] for k, row in results.items()}  # k clamped to a small memory bank


def emit(record: dict, jsonl: Path) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(jsonl, "a") as f:
        f.write(line + "\n")


def draw(records: list[dict], knn_nb: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(f"knn_top1_k{k}", f"k-NN top-1, k = {k} (mean, range over seeds)", "top-1 (%)") for k in knn_nb]
    panels.append(("feature_dims", "teacher feature dimensions (health)", "participation ratio"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    modes = sorted({r["mode"] for r in records})
    for ax, (key, title, ylabel) in zip(axes[0], panels):
        for mode in modes:
            points = [r for r in records if r["mode"] == mode and key in r]
            steps = sorted({r["step"] for r in points})
            values = [[r[key] for r in points if r["step"] == s] for s in steps]
            mean = np.array([np.mean(v) for v in values])
            ax.plot(steps, mean, marker="o", markersize=3, label=mode)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(args: argparse.Namespace) -> None:
    flags = pretrain_flags(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "learning_curve.jsonl"
    records = []
    for mode in args.modes:
        for seed in args.seeds:
            run_dir = out / f"{mode}_seed{seed}"
            start = time.time()
            baseline = random_baseline(args, flags, seed, run_dir / "random")
            main_dino_mc.run(
                flags
                + ["--data_mode", mode, "--seed", str(seed), "--data_path", str(Path(args.data_dir) / "seco")]
                + ["--output_dir", str(run_dir), "--knn_data_path", str(Path(args.data_dir) / "eurosat")]
                + ["--knn_every", str(args.knn_every), "--knn_nb", *map(str, args.knn_nb)]
            )
            rows = [{"mode": mode, "seed": seed, "epoch": -1, "step": 0, **baseline}]
            rows += [
                {"mode": mode, "seed": seed, "epoch": r["epoch"], "step": r["step"]}
                | {key: r[key] for key in r if key.startswith("knn_top1_k")}
                | {"feature_dims": r["train_feature_dims"]}
                for r in plot_log.read_log(run_dir / "log.txt")
                if any(key.startswith("knn_top1_k") for key in r)
            ]
            for row in rows:
                emit(row, jsonl)
            records += rows
            emit({"mode": mode, "seed": seed, "wall_s": round(time.time() - start, 1)}, jsonl)
    draw(records, args.knn_nb, out / "learning_curve.png")
    print(f"Wrote {jsonl} and {out / 'learning_curve.png'}")


if __name__ == "__main__":
    utils.run_cli("DINO-MC learning curves on the demo data", get_args_parser, main)
