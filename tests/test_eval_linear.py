"""Linear probe on EuroSAT fixtures: DINO's features, frozen backbone, linear.json, resume and --evaluate."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import eval_linear
import utils
import vision_transformer as vits
from tests.downstream_fixtures import write_textured_rgb
from utils import MultiCropWrapper

FAST = ["--arch", "vit_tiny", "--patch_size", "16", "--input_size", "32", "--num_workers", "0"]
FAST += ["--batch_size_per_gpu", "6", "--lr", "20", "--print_freq", "100", "--device", "cpu"]


def dino_mc_checkpoint(path, seed: int = 1) -> dict:
    """A checkpoint in main_dino_mc.py's format: student/teacher MultiCropWrapper state dicts, DDP prefixes."""
    torch.manual_seed(seed)
    teacher = MultiCropWrapper(vits.vit_tiny(patch_size=16), vits.DINOHead(192, 64))
    student = MultiCropWrapper(vits.vit_tiny(patch_size=16), vits.DINOHead(192, 64))
    torch.save(
        {
            "teacher": teacher.state_dict(),
            "student": {f"module.{k}": v for k, v in student.state_dict().items()},
            "epoch": 3,
            "args": argparse.Namespace(arch="vit_tiny"),
        },
        path,
    )
    return teacher.backbone.state_dict()


def test_vit_features_are_cls_tokens_of_the_last_blocks():
    torch.manual_seed(0)
    backbone = vits.vit_tiny(patch_size=16)
    probe = eval_linear.LinearProbe(backbone, 192, 10, n_last_blocks=4, avgpool=True)
    assert probe.linear.in_features == 192 * 5
    assert probe.linear.weight.std().item() == pytest.approx(0.01, rel=0.1) and not probe.linear.bias.any()
    x = torch.randn(2, 3, 32, 32)
    blocks = backbone.get_intermediate_layers(x, 4)
    expected = torch.cat([b[:, 0] for b in blocks] + [blocks[-1][:, 1:].mean(1)], dim=-1)
    assert torch.allclose(probe.features(x), expected)
    assert [p.requires_grad for p in probe.parameters()].count(True) == 2  # the linear weight and bias only
    probe.train()
    assert not backbone.training and probe.linear.training


def test_cnn_feature_is_the_pooled_backbone_output():
    backbone, dim = utils.build_backbone("resnet18")
    probe = eval_linear.LinearProbe(backbone, dim, 10, n_last_blocks=4, avgpool=False).eval()
    x = torch.randn(2, 3, 32, 32)
    assert probe.linear.in_features == 512 and torch.equal(probe.features(x), backbone.eval()(x))


def test_linear_eval_on_own_checkpoint_learns_resumes_and_evaluates(tmp_path):
    data = write_textured_rgb(tmp_path / "data")
    weights = tmp_path / "checkpoint.pth"
    expected_backbone = dino_mc_checkpoint(weights)
    out = tmp_path / "out"
    common = [*FAST, "--data_path", str(data), "--output_dir", str(out), "--pretrained_weights", str(weights)]
    eval_linear.run([*common, "--epochs", "2"])

    summary = json.loads((out / "linear.json").read_text())
    assert summary["best_acc"] >= 60.0  # chance: 33.3 %
    assert set(summary["per_class_acc"]) == {"AnnualCrop", "Forest", "SeaLake"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["last_acc"] == pytest.approx(metrics["last"]["metrics"]["acc"])  # percent in both
    assert (out / "confusion_matrix.png").stat().st_size > 0
    saved = torch.load(out / "checkpoint.pth")["state_dict"]
    assert set(saved) == {"weight", "bias"}  # the classifier only; the backbone comes from --pretrained_weights

    eval_linear.run([*common, "--epochs", "3"])  # resumes at epoch 2
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in log] == [0, 1, 2]

    eval_linear.run([*common, "--evaluate"])
    evaluated = json.loads((out / "evaluate.json").read_text())
    best = json.loads((out / "metrics.json").read_text())["best"]
    assert evaluated["metrics"]["acc"] == best["metrics"]["acc"]

    probe_backbone = vits.vit_tiny(patch_size=16)
    utils.load_pretrained_weights(probe_backbone, str(weights), "teacher")
    for key, value in expected_backbone.items():
        assert torch.equal(probe_backbone.state_dict()[key], value)


def test_checkpoint_of_another_architecture_is_refused(tmp_path, capsys):
    data = write_textured_rgb(tmp_path / "data", per_class=5)
    weights = tmp_path / "vit.pth"
    dino_mc_checkpoint(weights)
    with pytest.raises(SystemExit) as exit_info:
        eval_linear.run(
            [*FAST, "--arch", "resnet18", "--data_path", str(data), "--output_dir", str(tmp_path / "out")]
            + ["--pretrained_weights", str(weights)]
        )
    assert exit_info.value.code == 2
    assert "does not fit this backbone" in capsys.readouterr().err
