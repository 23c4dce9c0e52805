"""The benchmark scripts run and report what they promise (one JSON line per result); no timing asserts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils
from benchmarks import data_pipeline, health_overhead, learning_curve, matmul_rate, seco_store, train_step
from datasets.demo import SECO_SIZE_10M, write_seco_demo
from tests.downstream_fixtures import write_eurosat_rgb

REPO = Path(__file__).resolve().parents[1]
TINY_STEP = ["--arch", "vit_tiny", "--patch_size", "16", "--batch_size_per_gpu", "2", "--out_dim", "256"]
TINY_STEP += ["--steps", "1", "--warmup", "0", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    """The benchmarks set torch's thread count for the process; later tests must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


PHYSICAL_MEMORY_MB = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**2


def finite_positive(*values) -> bool:
    """A duration or rate that was measured: a finite number above 0 (how large is not for a test to say)."""
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def json_lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def tiny_step_model_gflop() -> float:
    """The model FLOPs of a TINY_STEP step written out: ViT-Tiny/16 (width 192, 12 blocks, MLP 4x), DINO head
    192 -> 2048 -> 2048 -> 256 -> out_dim 256, batch 2 of each of mode mc's eight crops. The student runs every
    product forward and twice backward (input and weight gradients) but the patch embedding's input gradient
    (images need none); the teacher runs the two global crops forward."""
    width, patch, batch, out_dim = 192, 16, 2, 256
    student = teacher = 0
    for index, size in enumerate([224, 224, 184, 164, 144, 124, 104, 84]):
        patches = (size // patch) ** 2
        tokens = patches + 1
        embed = 2 * batch * patches * 3 * patch * patch * width
        blocks = 12 * (2 * batch * tokens * 12 * width**2 + 4 * batch * tokens**2 * width)
        head = 2 * batch * (width * 2048 + 2048 * 2048 + 2048 * 256 + 256 * out_dim)
        student += 2 * embed + 3 * (blocks + head)
        teacher += embed + blocks + head if index < 2 else 0
    return (student + teacher) / 1e9


@pytest.mark.parametrize("impl, precision", [("current", "fp32"), ("published", "fp32"), ("current", "bf16")])
def test_train_step_prints_one_json_line(capsys, impl, precision):
    train_step.run([*TINY_STEP, "--impl", impl, "--precision", precision])
    (result,) = json_lines(capsys)
    assert result["impl"] == impl and result["pack_crops"] == (impl == "current")
    assert result["crop_sizes"] == [224, 224, 184, 164, 144, 124, 104, 84]
    assert result["threads"] == 1 and result["precision"] == precision and result["steps"] == 1
    assert finite_positive(result["step_ms_min"], result["step_ms_median"], result["step_cpu_ms_median"])
    assert result["step_ms_min"] <= result["step_ms_median"]  # one step: the same step
    # The process holds torch and two ViT-Tiny copies with their DINO heads (> 100 MB), and no more than the machine.
    assert 100 < result["peak_rss_mb"] < PHYSICAL_MEMORY_MB
    assert math.isfinite(result["load_avg_1min"]) and result["load_avg_1min"] >= 0
    assert result["imgs_per_s"] == pytest.approx(2000.0 / result["step_ms_median"], rel=1e-2)
    # Same model FLOPs whichever attention kernel runs (fused SDPA in fp32, explicit products in bf16 or in the
    # published way), without the fused backward's recomputation; no peak is known for a CPU.
    assert result["gflop_per_step"] == pytest.approx(tiny_step_model_gflop(), abs=0.01)
    expected_rate = result["gflop_per_step"] / result["step_ms_median"]
    assert result["achieved_tflops"] == pytest.approx(expected_rate, rel=1e-2, abs=1e-4)
    assert result["peak_tflops"] is None and result["mfu"] is None


def test_train_step_mfu_against_a_given_peak(capsys):
    train_step.run([*TINY_STEP, "--peak_tflops", "0.5"])
    (result,) = json_lines(capsys)
    assert result["peak_tflops"] == 0.5
    assert result["mfu"] == pytest.approx(result["achieved_tflops"] / 0.5, rel=1e-2, abs=1e-4)


def test_data_sheet_peak_only_for_known_cards_at_half_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert train_step.data_sheet_peak_tflops(torch.device("cuda"), "bf16") == 989.4
    assert train_step.data_sheet_peak_tflops(torch.device("cuda"), "fp32") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert train_step.data_sheet_peak_tflops(torch.device("cuda"), "fp16") == 756.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080")
    assert train_step.data_sheet_peak_tflops(torch.device("cuda"), "bf16") is None
    assert train_step.data_sheet_peak_tflops(torch.device("cpu"), "bf16") is None


def test_matmul_rate_times_every_product_of_a_block(capsys):
    matmul_rate.run(["--tokens", "64", "--repeats", "1", "--threads", "1", "--precisions", "fp32,bf16"])
    results = json_lines(capsys)
    assert [r["precision"] for r in results] == ["fp32", "bf16"]
    for result in results:
        names = {
            f"{layer}.{part}"
            for layer in ("qkv", "proj", "fc1", "fc2")
            for part in ("forward", "grad_input", "grad_weight")
        }
        assert set(result["product_gflops"]) == names
        rates = list(result["product_gflops"].values())
        assert finite_positive(result["block_gflops"], *rates)
        # The block's rate is its FLOPs over its time: a FLOP-weighted harmonic mean of the products' rates, so
        # between the slowest and the fastest product (0.1: the rounding of the printed rates).
        assert min(rates) - 0.1 <= result["block_gflops"] <= max(rates) + 0.1
    shapes = {name: (left, right) for name, left, right, _ in matmul_rate.block_products(64, 192)}
    assert shapes["fc1.grad_weight"] == ((64, 768), (64, 192))  # dL/dW (768, 192) = grad_out^T @ input


def test_matmul_rate_bad_precision_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        matmul_rate.run(["--precisions", "fp8"])
    assert exc.value.code == 2 and "--precisions" in capsys.readouterr().err


def test_train_step_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        train_step.run([*TINY_STEP, "--steps", "0"])
    assert exc.value.code == 2
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        train_step.run([*TINY_STEP, "--device", "tpu"])
    assert exc.value.code == 2 and "--device" in capsys.readouterr().err


def test_train_step_on_cuda_without_a_gpu_exits_2(capsys):
    """CUDA is hidden from the test (tests/conftest.py), as on a machine without it."""
    with pytest.raises(SystemExit) as exc:
        train_step.run([*TINY_STEP, "--device", "cuda"])
    assert exc.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_data_pipeline_reports_both_pipelines_per_band_set(capsys):
    args = ["--n_locations", "1", "--samples", "1", "--warmup", "0", "--modes", "mc", "--device_batch", "2"]
    data_pipeline.run(args)
    results = json_lines(capsys)
    all_bands = "B1,B2,B3,B4,B5,B6,B7,B8,B8A,B9,B11,B12"
    expected = [("B4,B3,B2", "workers"), ("B4,B3,B2", "device"), (all_bands, "workers"), (all_bands, "device")]
    assert [(r["bands"], r["augment_on"]) for r in results] == expected
    for r in results:
        assert r["mode"] == "mc" and r["threads"] == 1 and len(r["crop_sizes"]) == 8
        assert finite_positive(r["imgs_per_s"], r["imgs_per_s_wall"], r["store_imgs_per_s"], r["store_imgs_per_s_wall"])
    for r in results[::2]:  # the workers path against the published PIL-per-crop one
        assert r["speedup"] == pytest.approx(r["imgs_per_s"] / r["pil_imgs_per_s"], rel=0.05)
        assert r["store_speedup"] == pytest.approx(r["store_imgs_per_s"] / r["pil_imgs_per_s"], rel=0.05)
        assert 0 < r["augment_ms"] < 1000.0 / r["imgs_per_s"]
        assert 0 < r["store_load_ms"] < 1000.0 / r["store_imgs_per_s"]
        assert finite_positive(r["store_decode_ms"], r["tree_decode_ms"], r["pil_imgs_per_s"])
        # a sample's time is its reading (load) and its augmentation, nothing else (0.02: rounding)
        assert r["load_ms"] >= 0 and r["load_ms"] + r["augment_ms"] == pytest.approx(1000.0 / r["imgs_per_s"], rel=0.02)
    for r, workers in zip(results[1::2], results[::2]):  # the device path: bytes and FLOPs of its batch
        assert 0 < r["cut_ms"] < 1000.0 / r["imgs_per_s"] and finite_positive(r["device_cpu_ms_per_batch"])
        channels, sizes = len(r["bands"].split(",")), workers["crop_sizes"]
        assert r["workers_path_bytes_per_sample"] == sum(channels * s * s * 4 for s in sizes)
        # uint8 regions of one 264 px acquisition, one per crop position: at most the whole image each.
        image = channels * SECO_SIZE_10M**2
        assert 0 < r["host_to_device_bytes_per_sample"] <= len(sizes) * image
        # Per crop: resizing an at most 264 x 264 region to s x s (two products) and the colour steps per output
        # value; at least the latter.
        colour = sum(data_pipeline.COLOUR_FLOPS * channels * s * s for s in sizes) / 1e9
        most = colour + sum(2 * channels * (SECO_SIZE_10M**2 * s + SECO_SIZE_10M * s * s) for s in sizes) / 1e9
        assert colour - 0.001 <= r["device_gflop_per_sample"] <= most + 0.001  # 0.001: rounding


def test_data_pipeline_stores_only_the_timed_locations(tmp_path):
    root = data_pipeline.write_seco_demo(tmp_path / "seco", n_locations=3, n_acquisitions=2, seed=0)
    stored = data_pipeline.store_first_locations(root, ["B4", "B3", "B2"], 2, tmp_path / "s.zarr")
    tree, store = data_pipeline.SeCoDataset(root), data_pipeline.SeCoDataset(stored)
    assert store.locations == tree.locations[:2]
    assert torch.equal(store.load(1, 1), tree.load(1, 1))


def test_seco_store_benchmark_reports_every_measure(capsys):
    """The store benchmark's plumbing on tiny data (the cold read drops the page cache, so it is left out)."""
    measures = ["size", "write", "resume", "startup", "locality"]
    args = ["--n_locations", "4", "--shard_size", "4", "--startup_acquisitions", "50", "--measures", *measures]
    seco_store.run(args)
    results = {r["measure"]: r for r in json_lines(capsys)}
    assert list(results) == measures
    size = results["size"]
    assert size["acquisitions"] == 20 and size["tree_files_per_1000_locations"] == 65000.0  # 5 x (12 bands + json)
    for bands, channels in (("RGB", 3), ("ALL", 12)):
        assert size[bands]["pack_bytes_per_acquisition"] == channels * 264 * 264
        assert 0 < size[bands]["store_over_pack"] < 1  # native resolution and compression
        per_acq = size[bands]["store_bytes_per_acquisition"]
        assert size[bands]["seco_1m_store_gb"] == pytest.approx(per_acq * 1e6 / 1e9, rel=0.01)
    # the 12 bands take more room than 3; what a store holds is store_over_pack of the uint8 pack
    assert 0 < size["RGB"]["store_bytes_per_acquisition"] < size["ALL"]["store_bytes_per_acquisition"]
    for bands in ("RGB", "ALL"):
        ratio = size[bands]["store_bytes_per_acquisition"] / size[bands]["pack_bytes_per_acquisition"]
        assert size[bands]["store_over_pack"] == pytest.approx(ratio, abs=0.001)
    write = results["write"]
    assert finite_positive(write["one_worker_s"], write["two_workers_s"])
    assert write["speedup"] == pytest.approx(write["one_worker_s"] / write["two_workers_s"], rel=0.05, abs=0.01)
    resume = results["resume"]
    assert resume["killed"] and resume["shards"] == 5 and 2 <= resume["recorded_before_kill"] < 5
    startup = results["startup"]
    assert startup["acquisitions"] == 50 and startup["locations"] == 10
    assert 0 <= startup["spawned_worker_pickle_mb"] < 1  # 50 acquisition names: well under a megabyte
    locality = results["locality"]
    assert len(locality["shard_shuffle"]) == len(locality["global_shuffle"]) == 4
    assert all(0 < rank["shard_files_opened"] <= locality["shards"] for rank in locality["shard_shuffle"])


def test_pil_baseline_makes_the_same_crops():
    aug = data_pipeline.MultiCropAugmentation("tp", "ALL")
    images = [torch.randint(0, 256, (12, 80, 80), dtype=torch.uint8) for _ in range(3)]
    out = data_pipeline.PILPerCrop(aug)(images)
    assert [tuple(c.shape) for c in out] == [(12, s, s) for s in aug.crop_sizes]


@pytest.mark.gpu
def test_gpu_report_script_measures_vit_small_16_and_8(tmp_path):
    output = tmp_path / "gpu.jsonl"
    env = {**os.environ, "BATCH": "2", "STEPS": "1", "WARMUP": "1", "PYTHON": sys.executable}
    subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_vit_small.sh"), str(output)], check=True, env=env)
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(r["arch"], r["patch_size"], r["precision"]) for r in results] == [
        ("vit_small", 16, "bf16"),
        ("vit_small", 8, "bf16"),
    ]
    for result in results:
        total_mb = torch.cuda.get_device_properties(0).total_memory / 1024**2
        assert 0 < result["peak_gpu_mem_mb"] < total_mb and result["gpu"] and finite_positive(result["achieved_tflops"])
        assert (result["mfu"] is None) == (result["peak_tflops"] is None)
        assert result["mfu"] is None or 0 < result["mfu"] <= 1  # no card runs above its data sheet's peak


def test_health_overhead_reports_the_step_shapes(capsys):
    args = health_overhead.get_args_parser().parse_args(["--out_dim", "1024", "--embed_dim", "32", "--repeats", "2"])
    result = health_overhead.main(args)
    assert json_lines(capsys) == [result]
    assert result["rows"] == 16 and result["out_dim"] == 1024 and finite_positive(result["health_ms_median"])


def test_learning_curve_refuses_the_flags_it_sets_per_run():
    args = learning_curve.get_args_parser().parse_args(["--", "--arch", "vit_tiny", "--seed", "3"])
    with pytest.raises(utils.ConfigError, match="--seed is set by this script per run"):
        learning_curve.pretrain_flags(args)
    args = learning_curve.get_args_parser().parse_args(["--", "--arch", "vit_tiny", "--epochs", "2"])
    assert learning_curve.pretrain_flags(args) == ["--arch", "vit_tiny", "--epochs", "2"]


def test_learning_curve_writes_the_random_point_every_evaluation_and_the_figure(tmp_path):
    """One mode, one seed, two tiny epochs: the random baseline at step 0, an online k-NN with the health
    metric's feature dimensions after each epoch, a wall-time line, and the PNG."""
    write_seco_demo(tmp_path / "data" / "seco", n_locations=4, n_acquisitions=2, seed=0)
    write_eurosat_rgb(tmp_path / "data" / "eurosat", {"Forest": 4, "River": 4, "SeaLake": 4}, size=32)
    flags = ["--arch", "vit_tiny", "--patch_size", "16", "--epochs", "2", "--batch_size_per_gpu", "4"]
    flags += ["--out_dim", "16", "--num_workers", "0", "--device", "cpu", "--precision", "fp32"]
    flags += ["--global_crops_size", "32", "--local_crops_number", "2", "--size_crops", "32", "16"]
    out = tmp_path / "curve"
    args = learning_curve.get_args_parser().parse_args(
        ["--data_dir", str(tmp_path / "data"), "--output_dir", str(out), "--modes", "mc", "--seeds", "0"]
        + ["--knn_every", "1", "--knn_nb", "1", "3", "--", *flags]
    )
    learning_curve.main(args)
    rows = [json.loads(line) for line in (out / "learning_curve.jsonl").read_text().splitlines()]
    points = [r for r in rows if "knn_top1_k1" in r]
    assert [r["step"] for r in points] == [0, 1, 2]  # 4 locations / batch 4 = 1 step per epoch
    # A participation ratio: >= 1 for features with any spread, and 4 images per teacher crop span at most 3
    # dimensions.
    assert "feature_dims" not in points[0] and all(1 - 1e-6 <= r["feature_dims"] <= 3 + 1e-6 for r in points[1:])
    assert all(0 <= r["knn_top1_k3"] <= 100 for r in points)
    assert rows[-1]["mode"] == "mc" and finite_positive(rows[-1]["wall_s"])
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
