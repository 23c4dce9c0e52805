"""How fast this machine runs the matrix products of a ViT training step, to put a step's FLOP rate in context.

    python benchmarks/matmul_rate.py --arch vit_tiny --threads 2

A DINO-MC step is mostly the linear layers' matrix products (about 85% of its FLOPs for ViT-Tiny/16), so the
rate at which the device runs those exact products bounds the step: a step cannot sustain more GFLOP/s than
they do (``achieved_tflops`` of ``train_step.py`` against ``block_gflops`` here). For each precision this times
the products of one block over the packed tokens of a batch (forward, input gradient and weight gradient of
qkv, proj, fc1, fc2) and prints one JSON line with their combined rate and the rate of each product.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402

WIDTHS = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Matrix-product rate of a ViT step's shapes")
    parser.add_argument("--arch", default="vit_tiny", choices=sorted(WIDTHS), help="ViT width to take shapes from.")
    parser.add_argument(
        "--tokens",
        default=6496,
        type=int,
        help="Packed tokens per pass (6496: DINO-MC student, batch 8, patch 16, the eight crops of mode mc).",
    )
    parser.add_argument("--precisions", default="fp32,bf16", type=str, help="Comma-separated: fp32, bf16, fp16.")
    parser.add_argument("--repeats", default=10, type=int, help="Timed repeats per product (the median counts).")
    parser.add_argument("--threads", default=None, type=int, help="torch.set_num_threads; default: torch's own.")
    parser.add_argument("--device", default="cpu", type=str, help="cpu or cuda[:N].")
    return parser


def block_products(tokens: int, width: int) -> list[tuple[str, tuple[int, int], tuple[int, int], bool]]:
    """(name, left shape, right shape, left transposed) for the forward and both backward products of the four
    linear layers of a ViT block; the weight gradient multiplies a transposed activation, as autograd does."""
    products = []
    for layer, (n_in, n_out) in {
        "qkv": (width, 3 * width),
        "proj": (width, width),
        "fc1": (width, 4 * width),
        "fc2": (4 * width, width),
    }.items():
        products.append((f"{layer}.forward", (tokens, n_in), (n_in, n_out), False))
        products.append((f"{layer}.grad_input", (tokens, n_out), (n_out, n_in), False))
        products.append((f"{layer}.grad_weight", (tokens, n_out), (tokens, n_in), True))
    return products


def time_product(left: torch.Tensor, right: torch.Tensor, transposed: bool, repeats: int) -> float:
    """Median seconds of one product, synchronised on CUDA."""
    a = left.t() if transposed else left
    for _ in range(2):
        a @ right
    times = []
    for _ in range(repeats):
        if left.is_cuda:
            torch.cuda.synchronize(left.device)
        start = time.perf_counter()
        a @ right
        if left.is_cuda:
            torch.cuda.synchronize(left.device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(args: argparse.Namespace, precision: str) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    device = torch.device(args.device)
    per_product, total_flops, total_seconds = {}, 0, 0.0
    for name, left_shape, right_shape, transposed in block_products(args.tokens, WIDTHS[args.arch]):
        left = torch.randn(left_shape, dtype=dtype, device=device)
        right = torch.randn(right_shape, dtype=dtype, device=device)
        m, k = (left_shape[1], left_shape[0]) if transposed else left_shape
        flops = 2 * m * k * right_shape[1]
        seconds = time_product(left, right, transposed, args.repeats)
        per_product[name] = round(flops / seconds / 1e9, 1)
        total_flops += flops
        total_seconds += seconds
    return {
        "arch": args.arch,
        "tokens": args.tokens,
        "precision": precision,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "block_gflops": round(total_flops / total_seconds / 1e9, 1),
        "product_gflops": per_product,
        "torch": torch.__version__,
    }


def main(args: argparse.Namespace) -> None:
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = sorted(set(precisions) - {"fp32", "bf16", "fp16"})
    if unknown or not precisions:
        raise utils.ConfigError(f"--precisions takes fp32, bf16, fp16; got {args.precisions!r}")
    if args.tokens < 1 or args.repeats < 1:
        raise utils.ConfigError("--tokens and --repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for precision in precisions:
        print(json.dumps(measure(args, precision)), flush=True)


def run(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except utils.ConfigError as err:
        utils.fail(utils.one_line(err))


if __name__ == "__main__":
    run()
