"""timm backbones (``--arch timm/<name>``) through pretraining, k-NN and checkpoint loading.

One ViT-style, one ResNet-style and one ConvNeXt-style model: the last pools and normalises its pre-logit
feature in its ``head`` (``head.global_pool``, ``head.norm``), which the multi-crop wrapper must keep and the
evaluation loader must load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import eval_knn
import main_dino_mc
import utils
import vision_transformer as vits

TIMM_ARCHS = ["timm/vit_tiny_patch16_224", "timm/resnet18", "timm/convnext_atto"]


@pytest.fixture(scope="module")
def seco_root(seco_demo) -> Path:
    return seco_demo(2, 2, seed=3)


@pytest.fixture(scope="module")
def eurosat_root(eurosat_demo) -> Path:
    return eurosat_demo(4)


def test_wrapper_keeps_a_pooling_head_and_removes_a_classifier():
    convnext, dim = utils.build_backbone("timm/convnext_atto")
    wrapped = utils.MultiCropWrapper(convnext, vits.DINOHead(dim, 16, hidden_dim=32, bottleneck_dim=8))
    assert "backbone.head.norm.weight" in wrapped.state_dict()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = convnext.forward_head(convnext.forward_features(x), pre_logits=True)  # timm's own feature
        torch.testing.assert_close(wrapped.backbone(x), expected)
        assert wrapped(x).shape == (2, 16)
    classifier = torch.nn.Module()
    classifier.fc = torch.nn.Linear(4, 10)
    assert isinstance(utils.MultiCropWrapper(classifier, torch.nn.Identity()).backbone.fc, torch.nn.Identity)


@pytest.mark.parametrize("arch", TIMM_ARCHS)
def test_pretrain_then_knn_and_load_round_trip(seco_root, eurosat_root, tmp_path, arch):
    out = tmp_path / "pretrain"
    main_dino_mc.run(
        ["--arch", arch, "--data_mode", "mc", "--data_path", str(seco_root), "--output_dir", str(out)]
        + ["--epochs", "1", "--batch_size_per_gpu", "2", "--out_dim", "64", "--num_workers", "0"]
        + ["--precision", "fp32", "--device", "cpu", "--local_crops_number", "2", "--global_crops_size", "64"]
        + ["--size_crops", "48", "32"]
    )
    checkpoint = torch.load(out / "checkpoint.pth")
    teacher_backbone, dim = utils.build_backbone(arch)
    teacher = utils.MultiCropWrapper(teacher_backbone, vits.DINOHead(dim, 64))
    teacher.load_state_dict(checkpoint["teacher"])

    loaded = utils.load_pretrained_weights(utils.build_backbone(arch)[0], str(out / "checkpoint.pth"))
    assert set(loaded.state_dict()) == set(teacher_backbone.state_dict())  # head.norm.* of ConvNeXt included
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), teacher_backbone.eval()(x))

    knn_out = tmp_path / "knn"
    eval_knn.run(
        ["--arch", arch, "--pretrained_weights", str(out / "checkpoint.pth"), "--data_path", str(eurosat_root)]
        + ["--output_dir", str(knn_out), "--resize_size", "32", "--crop_size", "32", "--nb_knn", "1"]
        + ["--num_workers", "0", "--batch_size_per_gpu", "8", "--device", "cpu"]
    )
    top1 = json.loads((knn_out / "knn.json").read_text())["1"]["top1"]
    assert top1 == 100.0  # each class is one flat colour: identical features within a class
