"""Command lines of the tiny end-to-end runs that several test modules share: a one-epoch pretraining of a
ViT-Tiny on small crops (main_dino_mc.py) and a k-NN evaluation of a ViT-Tiny at 32 px (eval_knn.py).
"""

from __future__ import annotations

# eval_knn.py on the 32 px EuroSAT RGB fixture (conftest's ``rgb_root``): a ViT-Tiny/16, one batch of 8, the CPU.
TINY_KNN = ["--arch", "vit_tiny", "--patch_size", "16", "--resize_size", "32", "--crop_size", "32"]
TINY_KNN += ["--num_workers", "0", "--batch_size_per_gpu", "8", "--device", "cpu"]


def tiny_args(data_path, output_dir, *extra: str) -> list[str]:
    return [
        "--arch",
        "vit_tiny",
        "--patch_size",
        "16",
        "--data_mode",
        "mc",
        "--data_path",
        str(data_path),
        "--output_dir",
        str(output_dir),
        "--epochs",
        "1",
        "--batch_size_per_gpu",
        "2",
        "--out_dim",
        "256",
        "--num_workers",
        "0",
        "--precision",
        "fp32",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--print_freq",
        "1",
        # small crops so that a step is quick on a CPU; six local sizes, as published (mc/tp use the smallest)
        *("--global_crops_size", "64", "--size_crops", "56", "48", "40", "32", "24", "16"),
        *extra,
    ]
