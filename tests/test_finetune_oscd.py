"""OSCD change detection: Siamese U-Net properties, a planted change that training finds, bad input.

The fixture is the exact OSCD archive layout (downstream_fixtures.write_oscd) with a bright square planted in
date 2 (B02, B03, B04 = 3000 inside the change region). The encoder is a FROZEN randomly initialised
resnet18 (--pretrained_weights none): identical pixels give identical features, so |f1 - f2| is non-zero only
around the change and the decoder alone must learn to outline it, which it does in a few CPU epochs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

import finetune_oscd
import utils
from segmentation import SiameseUNet
from tests.downstream_fixtures import oscd_change_region, write_geotiff, write_oscd

CITIES = {"aa": (96, 96), "bb": (80, 100), "cc": (90, 96), "dd": (96, 70), "tt": (72, 100)}
TRAIN, TEST = ["aa", "bb", "cc", "dd"], ["tt"]
FAST = ["--arch", "resnet18", "--pretrained_weights", "none", "--tile_size", "32", "--num_workers", "0"]
FAST += ["--batch_size_per_gpu", "4", "--lr", "0.001", "--print_freq", "100", "--device", "cpu"]


def write_planted_oscd(root, cities=CITIES, train=TRAIN, test=TEST):
    images = write_oscd(root, cities, train=train, test=test)
    for city, shape in cities.items():
        for band in ("B02", "B03", "B04"):
            path = images / city / "imgs_2_rect" / f"{band}.tif"
            with rasterio.open(path) as src:
                values = src.read(1)
            values[oscd_change_region(shape)] = 3000
            write_geotiff(path, values)
    return images


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny", "swin_t"])
def test_siamese_unet_is_symmetric_and_blind_to_unchanged_pairs(arch):
    torch.manual_seed(0)
    backbone, _ = utils.build_backbone(arch, patch_size=16)
    model = SiameseUNet(backbone, in_chans=3).eval()
    a, b = torch.randn(2, 3, 96, 96), torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out = model(a, b)
        assert out.shape == (2, 1, 96, 96)
        assert torch.allclose(out, model(b, a), atol=1e-5)  # |f1 - f2| does not depend on the order
        # Identical dates give zero differences: the output no longer depends on the image at all.
        assert torch.allclose(model(a, a), model(b, b), atol=1e-5)
    assert all(not p.requires_grad for p in model.encoder.parameters())
    model.train()
    assert not model.encoder.training


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny", "swin_t"])
def test_fine_tuned_encoder_gives_every_trainable_parameter_a_gradient(arch):
    """DDP waits for a gradient of every trainable parameter; the Swin encoder left backbone.norm without one."""
    backbone, _ = utils.build_backbone(arch, patch_size=16)
    model = SiameseUNet(backbone, in_chans=3, freeze_encoder=False)
    model(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)).sum().backward()
    assert [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_fine_tuned_swin_encoder_trains_two_steps_under_ddp(tmp_path):
    """finetune_oscd.py --arch swin_t --finetune_encoder true on several processes failed at its second step
    ("Expected to have finished reduction in the prior iteration"); one gloo process shows the same."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        backbone, _ = utils.build_backbone("swin_t", patch_size=16)
        model = torch.nn.parallel.DistributedDataParallel(SiameseUNet(backbone, 3, freeze_encoder=False))
        stem = model.module.encoder.backbone.features[0][0].weight
        for _ in range(2):
            stem.grad = None
            model(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)).sum().backward()
            assert stem.grad is not None and stem.grad.abs().sum() > 0  # the encoder is trained, not frozen
    finally:
        torch.distributed.destroy_process_group()


def test_resnet_levels_follow_the_protocol():
    backbone, _ = utils.build_backbone("resnet50")
    features = SiameseUNet(backbone, in_chans=3).encoder(torch.zeros(1, 3, 96, 96))
    assert [f.shape[1] for f in features] == [64, 256, 512, 1024, 2048]
    assert [f.shape[-1] for f in features] == [48, 24, 12, 6, 3]


@pytest.fixture(scope="module")
def oscd_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("oscd")
    write_planted_oscd(tmp / "data")
    out = tmp / "out"
    finetune_oscd.run([*FAST, "--data_path", str(tmp / "data"), "--output_dir", str(out), "--epochs", "3"])
    return tmp / "data", out


def test_planted_change_is_found(oscd_run):
    _, out = oscd_run
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["last"]["metrics"]
    region = oscd_change_region(CITIES["tt"])
    assert last["change_fraction"] == pytest.approx(100 * region.mean())  # scores in percent
    assert last["all_change_f1"] == pytest.approx(100 * 2 * region.mean() / (1 + region.mean()))
    assert last["f1"] > last["all_change_f1"] + 30  # baseline 27
    assert 0 < last["iou"] <= last["f1"]

    change_map = np.asarray(Image.open(out / "change_maps" / "tt.png"))
    assert change_map.shape == CITIES["tt"]  # stitched at full size, padding dropped
    predicted = change_map > 0
    f1 = 2 * (predicted & region).sum() / (predicted.sum() + region.sum())
    assert 100 * f1 == pytest.approx(last["f1"], abs=0.1)  # the map is what was scored


def test_evaluate_reproduces_the_best_epoch(oscd_run):
    data, out = oscd_run
    finetune_oscd.run([*FAST, "--data_path", str(data), "--output_dir", str(out), "--evaluate"])
    evaluated = json.loads((out / "evaluate.json").read_text())["metrics"]
    best = json.loads((out / "metrics.json").read_text())["best"]["metrics"]
    assert evaluated["f1"] == pytest.approx(best["f1"]) and evaluated["precision"] == pytest.approx(best["precision"])


def _expect_exit_2(argv, capsys, expected):
    with pytest.raises(SystemExit) as exit_info:
        finetune_oscd.run(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    small = {"aa": (40, 40), "tt": (40, 40)}
    images = write_oscd(tmp_path / "missing_city", small, train=["aa"], test=["tt"])
    (images / "train.txt").write_text("aa,zz")
    argv = [*FAST, "--output_dir", str(tmp_path / "out")]
    _expect_exit_2([*argv, "--data_path", str(tmp_path / "missing_city")], capsys, "'zz'")

    images = write_oscd(tmp_path / "missing_band", small, train=["aa"], test=["tt"])
    (images / "aa" / "imgs_1_rect" / "B03.tif").unlink()
    _expect_exit_2([*argv, "--data_path", str(tmp_path / "missing_band")], capsys, "B03.tif")

    write_oscd(tmp_path / "bad_label", small, train=["aa"], test=["tt"])
    label = tmp_path / "bad_label" / "Onera Satellite Change Detection dataset - Test Labels" / "tt" / "cm" / "cm.png"
    Image.fromarray(np.zeros((30, 40), dtype=np.uint8)).save(label)
    _expect_exit_2([*argv, "--data_path", str(tmp_path / "bad_label")], capsys, "cm.png is 30x40")

    _expect_exit_2([*argv, "--data_path", str(tmp_path / "bad_label"), "--tile_size", "16"], capsys, "--tile_size")
