"""The benchmark scripts run and report what they promise (one JSON line per result); no timing asserts."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import data_pipeline, train_step

TINY_STEP = ["--arch", "vit_tiny", "--patch_size", "16", "--batch_size_per_gpu", "2", "--out_dim", "256"]
TINY_STEP += ["--steps", "1", "--warmup", "0", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    """The benchmarks set torch's thread count for the process; later tests must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def json_lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("impl", ["current", "published"])
def test_train_step_prints_one_json_line(capsys, impl):
    train_step.run([*TINY_STEP, "--impl", impl])
    (result,) = json_lines(capsys)
    assert result["impl"] == impl and result["pack_crops"] == (impl == "current")
    assert result["crop_sizes"] == [224, 224, 184, 164, 144, 124, 104, 84]
    assert result["threads"] == 1 and result["precision"] == "fp32" and result["steps"] == 1
    assert result["step_ms_median"] > 0 and result["step_cpu_ms_median"] > 0 and result["peak_rss_mb"] > 100
    assert result["imgs_per_s"] == pytest.approx(2000.0 / result["step_ms_median"], rel=1e-2)


def test_train_step_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        train_step.run([*TINY_STEP, "--steps", "0"])
    assert exc.value.code == 2
    assert "--steps" in capsys.readouterr().err


def test_data_pipeline_reports_both_pipelines_per_band_set(capsys):
    data_pipeline.run(["--n_locations", "1", "--samples", "1", "--warmup", "0", "--modes", "mc"])
    results = json_lines(capsys)
    assert [r["bands"] for r in results] == ["B4,B3,B2", "B1,B2,B3,B4,B5,B6,B7,B8,B8A,B9,B11,B12"]
    for r in results:
        assert r["mode"] == "mc" and r["threads"] == 1 and len(r["crop_sizes"]) == 8
        assert r["speedup"] == pytest.approx(r["imgs_per_s"] / r["pil_imgs_per_s"], rel=0.05)
        assert r["packed_speedup"] == pytest.approx(r["packed_imgs_per_s"] / r["pil_imgs_per_s"], rel=0.05)
        assert 0 < r["augment_ms"] < 1000.0 / r["imgs_per_s"]
        assert 0 < r["packed_load_ms"] < 1000.0 / r["packed_imgs_per_s"]


def test_data_pipeline_packs_only_the_timed_locations(tmp_path):
    root = data_pipeline.write_seco_demo(tmp_path / "seco", n_locations=3, n_acquisitions=2, seed=0)
    packed = data_pipeline.pack_first_locations(root, ["B4", "B3", "B2"], 2, tmp_path / "pack")
    tree, pack = data_pipeline.SeCoDataset(root), data_pipeline.SeCoDataset(packed)
    assert pack.locations == tree.locations[:2]
    assert torch.equal(pack.load(1, 1), tree.load(1, 1))


def test_pil_baseline_makes_the_same_crops():
    aug = data_pipeline.MultiCropAugmentation("tp", "ALL")
    images = [torch.randint(0, 256, (12, 80, 80), dtype=torch.uint8) for _ in range(3)]
    out = data_pipeline.PILPerCrop(aug)(images)
    assert [tuple(c.shape) for c in out] == [(12, s, s) for s in aug.crop_sizes]
