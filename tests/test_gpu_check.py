"""benchmarks/gpu_check.sh end to end with --device cpu --quick: its plumbing (every check runs and reports one
JSON line on stdout and in the file); its figures mean something only on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_check_on_the_cpu(tmp_path):
    output = tmp_path / "gpu_check.jsonl"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    command = ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick", "--num_workers", "1"]
    done = subprocess.run(
        [*command, "--output", str(output)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [json.loads(line) for line in output.read_text().splitlines()] == lines
    checks = [line["check"] for line in lines]
    assert checks == ["environment", "cuda_vs_cpu", "precision", "precision", "resume"] + ["throughput"] * 4 + [
        "loader",
        "loader",
        "torchrun",
    ]
    assert all(line["ok"] for line in lines)
    by_check = {line["check"]: line for line in lines}
    # the CPU against itself, and a resumed CPU run, are exact
    assert by_check["cuda_vs_cpu"]["loss_rel_diff"] == 0.0 and by_check["resume"]["max_teacher_diff"] == 0.0
    assert by_check["resume"]["killed_returncode"] == -9
    assert {line["precision"] for line in lines if line["check"] == "precision"} == {"bf16", "fp16"}
    configurations = {(r["patch_size"], r["batch_size_per_gpu"], r["precision"]) for r in lines[5:9]}
    assert configurations == {(p, 2, q) for p in (16, 8) for q in ("bf16", "fp16")}
    assert all(r["imgs_per_s"] > 0 and r["gflop_per_step"] > 0 for r in lines[5:9])
    loaders = [line for line in lines if line["check"] == "loader"]
    assert [line["augment_on"] for line in loaders] == ["workers", "device"]
    assert all(line["step_imgs_per_s"] == lines[5]["imgs_per_s"] for line in loaders)  # ViT/16, larger batch, bf16
    assert loaders[1]["device_augment_ms_per_batch"] > 0 and "device_augment_ms_per_batch" not in loaders[0]
    assert (by_check["torchrun"]["world_size"], by_check["torchrun"]["backend"]) == (2, "gloo")


def test_gpu_check_without_a_gpu_is_one_line(tmp_path):
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--output", str(tmp_path / "out.jsonl")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == "" and not (tmp_path / "out.jsonl").exists()
    assert done.stderr.startswith("error: --device cuda, but torch sees no CUDA device: torch ")
    assert len(done.stderr.splitlines()) == 1
