"""Training curves of DINO-MC runs, drawn from their ``log.txt`` (one JSON line per epoch).

    python plot_log.py runs/mc/log.txt                                  # -> runs/mc/training_curves.png
    python plot_log.py runs/a/log.txt runs/b/log.txt --output cmp.png   # several runs overlaid

One panel per quantity that the logs hold: loss, learning rate, weight decay, teacher momentum, the health
metrics (``health.py``: teacher entropy and batch entropy against ln(out_dim), teacher-student KL, feature
spread, prototypes used) and the online k-NN accuracy when it was on. ``main_dino_mc.py`` draws the same
figure into ``output_dir/training_curves.png`` after every epoch.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import utils

# (panel title, log keys drawn in it); a panel is drawn when any log has one of its keys.
PANELS: list[tuple[str, tuple[str, ...]]] = [
    ("loss", ("train_loss",)),
    ("learning rate", ("train_lr",)),
    ("weight decay", ("train_wd",)),
    ("teacher momentum", ("train_momentum",)),
    ("teacher entropy (nats)", ("train_teacher_entropy", "train_teacher_batch_entropy")),
    ("KL(teacher || student)", ("train_teacher_student_kl",)),
    ("feature spread", ("train_feature_std",)),
    ("feature dimensions", ("train_feature_dims",)),
    ("prototypes used", ("train_prototypes_used",)),
    ("online k-NN top-1 (%)", ("knn_top1",)),
]
PANEL_SIZE_IN = (5.0, 3.2)  # width, height of one panel in inches


def read_log(path: str | Path) -> list[dict]:
    """The epoch lines of a log.txt; raises ConfigError naming the file and line when one is not JSON."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        with utils.config_errors(f"{path}, line {number}: not a JSON log line"):
            rows.append(json.loads(line))
    return rows


def _series(rows: list[dict], key: str) -> dict[str, tuple[list, list]]:
    """(epochs, values) of ``key``; ``knn_top1`` expands to one series per k (``knn_top1_k<k>`` keys)."""
    keys = sorted({k for row in rows for k in row if k.startswith("knn_top1_k")}) if key == "knn_top1" else [key]
    series = {}
    for name in keys:
        points = [(row["epoch"], row[name]) for row in rows if name in row and row[name] is not None]
        if points:
            series[name] = ([e for e, _ in points], [v for _, v in points])
    return series


def panels_for(logs: list[list[dict]]) -> list[tuple[str, tuple[str, ...]]]:
    """The panels of :data:`PANELS` that at least one of the logs has data for, in order."""
    return [(title, keys) for title, keys in PANELS if any(_series(rows, k) for rows in logs for k in keys)]


def plot_logs(logs: list[list[dict]], labels: list[str], output: str | Path) -> Path:
    """Draw the panels that the logs have data for into ``output`` (PNG); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels_for(logs)
    if not panels:
        raise utils.ConfigError("the logs hold no training quantity to draw")
    columns = min(3, len(panels))
    rows_n = math.ceil(len(panels) / columns)
    width, height = PANEL_SIZE_IN[0] * columns, PANEL_SIZE_IN[1] * rows_n
    # Fixed margins in inches instead of tight_layout, which measured every tick label and took 40 % of the
    # drawing time: the PNG is redrawn after every epoch of a run.
    margins = {
        "left": 0.6 / width,
        "right": 1 - 0.15 / width,
        "bottom": 0.5 / height,
        "top": 1 - 0.35 / height,
        "wspace": 0.25,
        "hspace": 0.55,
    }
    fig, axes = plt.subplots(rows_n, columns, figsize=(width, height), squeeze=False, gridspec_kw=margins)
    for ax, (title, keys) in zip(axes.flat, panels):
        for rows, label in zip(logs, labels):
            for key in keys:
                for name, (epochs, values) in _series(rows, key).items():
                    legend = name.removeprefix("train_").replace("knn_top1_", "k = ").replace("k = k", "k = ")
                    ax.plot(epochs, values, marker="o", markersize=3, label=f"{label} {legend}".strip())
        if title.startswith("teacher entropy"):
            out_dims = {row.get("out_dim") for rows in logs for row in rows if row.get("out_dim")}
            for out_dim in sorted(out_dims):
                ax.axhline(math.log(out_dim), color="grey", linestyle="--", linewidth=1, label=f"ln {out_dim}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(output)  # a reader (or a kill) never sees half a PNG
    return output


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Plot DINO-MC training logs", add_help=False)
    parser.add_argument("logs", nargs="+", help="log.txt files of one or more runs.")
    parser.add_argument("--labels", nargs="+", default=None, help="One legend label per log (default: folders).")
    parser.add_argument(
        "--output", default=None, help="PNG to write (default: training_curves.png beside the first log)."
    )
    return parser


def main(args: argparse.Namespace) -> None:
    missing = [p for p in args.logs if not Path(p).is_file()]
    if missing:
        what = "is a folder" if Path(missing[0]).is_dir() else "does not exist"
        raise utils.ConfigError(f"{missing[0]} {what} (expected a log.txt written by main_dino_mc.py)")
    labels = args.labels or ([Path(p).parent.name for p in args.logs] if len(args.logs) > 1 else [""])
    if len(labels) != len(args.logs):
        raise utils.ConfigError(f"--labels: {len(labels)} labels for {len(args.logs)} logs")
    output = args.output or Path(args.logs[0]).with_name("training_curves.png")
    print(f"Wrote {plot_logs([read_log(p) for p in args.logs], labels, output)}")


def run(argv: list[str] | None = None) -> None:
    utils.run_cli("Plot DINO-MC training logs", get_args_parser, main, argv)


if __name__ == "__main__":
    run()
