"""Cost of the pretraining health metrics per training step, on the tensors of a real step's shapes.

    python benchmarks/health_overhead.py --batch_size_per_gpu 8 --out_dim 65536 --embed_dim 384 --threads 2

``health.step_metrics`` and ``PrototypeUsage.update`` run once per step on the teacher's probabilities
(global crops x batch, out_dim) and backbone features (global crops x batch, embed_dim), with no gradient
and no synchronisation of their own. Prints one JSON line: the median milliseconds over ``--repeats`` calls,
to set against ``benchmarks/train_step.py``'s ``step_ms_median`` of the same settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import health  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Health-metric overhead per step")
    parser.add_argument("--batch_size_per_gpu", default=8, type=int)
    parser.add_argument("--global_crops_number", default=2, type=int, help="Teacher crops (3 for DINO-TP).")
    parser.add_argument("--out_dim", default=65536, type=int)
    parser.add_argument("--embed_dim", default=384, type=int, help="Backbone feature size (ViT-S 384).")
    parser.add_argument("--threads", default=2, type=int)
    parser.add_argument("--repeats", default=50, type=int)
    parser.add_argument("--device", default="cpu")
    return parser


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = args.global_crops_number * args.batch_size_per_gpu
    probs = torch.randn(rows, args.out_dim, device=args.device).div_(0.04).softmax(dim=-1)
    features = torch.randn(rows, args.embed_dim, device=args.device)
    loss = torch.tensor(7.0, device=args.device)
    usage = health.PrototypeUsage(args.out_dim, args.device)
    times = []
    for _ in range(args.repeats + 3):
        start = time.perf_counter()
        _, winners = health.step_metrics(probs, loss, features, args.global_crops_number)
        usage.update(winners)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {
        "benchmark": "health_overhead",
        "device": args.device,
        "threads": args.threads,
        "rows": rows,
        "out_dim": args.out_dim,
        "embed_dim": args.embed_dim,
        "health_ms_median": round(float(np.median(times[3:])) * 1000.0, 3),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
