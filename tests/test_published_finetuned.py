"""The published fine-tuned models evaluate: EuroSAT ``luc_checkpoint_best.pth.tar`` and OSCD Lightning ``.ckpt``.

Files are written in exactly those formats (numpy 1.x pickles, numpy floats in the optimizer) by
``published_checkpoints``; each is evaluated with ``--evaluate`` and must give the metrics of the same weights
saved in this project's own format. The Siamese U-Net is compared layer by layer with the published one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import engine
import finetune_eurosat
import finetune_oscd
import utils
from segmentation import SiameseUNet, from_published_state_dict
from tests.downstream_fixtures import write_oscd
from tests.published_checkpoints import PublishedUNet, write_published_eurosat, write_published_oscd


def _published_unet(ours: SiameseUNet, backbone_arch: str) -> PublishedUNet:
    """The published U-Net holding the weights of ``ours``, through the published checkpoint's key names."""
    channels = [m.num_features for m in (getattr(ours, f"batchnorm{i}") for i in range(ours.levels))]
    deepest = getattr(ours, f"shrink{ours.levels - 1}").in_channels
    reference = PublishedUNet(utils.build_backbone(backbone_arch)[0], [*channels, deepest])
    reference.load_state_dict(
        {k.replace("encoder.backbone.", "encoder.encoder."): v for k, v in ours.state_dict().items()}
    )
    return reference.eval()


def test_unet_equals_the_published_one_layer_by_layer():
    torch.manual_seed(0)
    ours = SiameseUNet(utils.build_backbone("resnet18")[0], in_chans=3).eval()
    for i in range(ours.levels):  # non-trivial BatchNorm statistics in the decoder
        bn = getattr(ours, f"batchnorm{i}")
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    reference = _published_unet(ours, "resnet18")
    a, b = torch.randn(2, 3, 96, 96), torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        for mine, theirs in zip(ours.encoder(a), reference.encoder(a), strict=True):  # conv1 (pre-BN), layer1..4
            torch.testing.assert_close(mine, theirs)
        logits = ours(a, b)
        expected = reference(a, b)
        diffs = [(f[:2] - f[2:]).abs() for f in ours.encode(torch.cat([a, b]))]
        x = diffs[-1]
        for i, published_step in zip(reversed(range(ours.levels)), reference.steps, strict=True):
            x = ours.decode_step(i, x, diffs[i])
            torch.testing.assert_close(x, published_step)
    torch.testing.assert_close(logits, expected)
    assert logits.shape == (2, 1, 96, 96)


def test_published_oscd_key_names_map_exactly():
    ours = SiameseUNet(utils.build_backbone("resnet18")[0], in_chans=3)
    published = {f"model.{k.replace('encoder.backbone.', 'encoder.encoder.')}": v for k, v in ours.state_dict().items()}
    published["model.encoder.encoder.fc.weight"] = torch.empty(0, 512)
    converted = from_published_state_dict(published)
    assert set(converted) == set(ours.state_dict())
    assert set(from_published_state_dict(ours.state_dict())) == set(ours.state_dict())


def _metrics(path) -> dict:
    return json.loads(path.read_text())["metrics"]


def test_oscd_evaluate_accepts_the_published_lightning_checkpoint(tmp_path):
    cities = {"aa": (64, 64), "tt": (64, 70)}
    data = write_oscd(tmp_path / "data", cities, train=["aa"], test=["tt"]).parent
    args = ["--arch", "resnet18", "--pretrained_weights", "none", "--tile_size", "32", "--num_workers", "0"]
    args += ["--data_path", str(data)]
    torch.manual_seed(0)
    model = finetune_oscd.ChangeDetector(utils.build_backbone("resnet18")[0], ["B4", "B3", "B2"], True)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    ours_file = tmp_path / "ours.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, ours_file)
    unet_state = {k.removeprefix("unet."): v for k, v in model.state_dict().items()}
    unet_state = {k.replace("encoder.backbone.", "encoder.encoder."): v for k, v in unet_state.items()}
    published = write_published_oscd(tmp_path / "epoch=49.ckpt", unet_state, feat_dim=512)

    finetune_oscd.run([*args, "--output_dir", str(tmp_path / "a"), "--evaluate", str(ours_file)])
    finetune_oscd.run([*args, "--output_dir", str(tmp_path / "b"), "--evaluate", str(published)])
    expected, got = _metrics(tmp_path / "a" / "evaluate.json"), _metrics(tmp_path / "b" / "evaluate.json")
    assert got["f1"] == pytest.approx(expected["f1"]) and got["precision"] == pytest.approx(expected["precision"])
    assert got["recall"] == pytest.approx(expected["recall"])


@pytest.fixture(scope="module")
def eurosat_root(eurosat_demo) -> Path:
    return eurosat_demo(5)


def _published_classifier_state(model: engine.Classifier, arch: str) -> dict[str, torch.Tensor]:
    """The published whole-classifier state dict: backbone keys without prefix, ``fc.*`` for ResNet / WRN,
    ``head.*`` for the DINO ViT and Swin."""
    classifier = "fc" if arch.startswith(("resnet", "wide_resnet")) else "head"
    state = {k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    state.update({f"{classifier}.{k}": v for k, v in model.head.state_dict().items()})
    return state


@pytest.mark.parametrize("arch", ["vit_tiny", "resnet18", "wide_resnet50_2", "swin_t"])
def test_eurosat_evaluate_accepts_the_published_checkpoint(eurosat_root, tmp_path, arch):
    args = ["--arch", arch, "--patch_size", "16", "--input_size", "32", "--num_workers", "0"]
    args += ["--pretrained_weights", "none", "--data_path", str(eurosat_root), "--batch_size_per_gpu", "8"]
    torch.manual_seed(0)
    backbone, dim = utils.build_backbone(arch, 16)
    model = engine.Classifier(backbone, dim, 3)
    torch.nn.init.normal_(model.head.weight)
    ours_file = tmp_path / "ours.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, ours_file)
    published = write_published_eurosat(
        tmp_path / "luc_checkpoint_best.pth.tar", _published_classifier_state(model, arch)
    )

    finetune_eurosat.run([*args, "--output_dir", str(tmp_path / "a"), "--evaluate", str(ours_file)])
    finetune_eurosat.run([*args, "--output_dir", str(tmp_path / "b"), "--evaluate", str(published)])
    expected, got = _metrics(tmp_path / "a" / "evaluate.json"), _metrics(tmp_path / "b" / "evaluate.json")
    assert got["acc"] == pytest.approx(expected["acc"]) and got["confusion_matrix"] == expected["confusion_matrix"]


def test_a_checkpoint_of_another_model_is_one_short_line(eurosat_root, tmp_path, capsys):
    torch.manual_seed(0)
    backbone, dim = utils.build_backbone("vit_tiny", 16)
    published = write_published_eurosat(
        tmp_path / "vit.pth.tar", _published_classifier_state(engine.Classifier(backbone, dim, 3), "vit_tiny")
    )
    with pytest.raises(SystemExit) as exit_info:
        finetune_eurosat.run(
            ["--arch", "resnet18", "--input_size", "32", "--num_workers", "0", "--pretrained_weights", "none"]
            + ["--data_path", str(eurosat_root), "--output_dir", str(tmp_path / "out"), "--evaluate", str(published)]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and len(err[0]) < 500, err
    assert "does not fit this model" in err[0] and "missing (first: " in err[0] and "unexpected (first: " in err[0]
