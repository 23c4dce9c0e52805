"""Health metrics, collapse warnings, online k-NN and training curves of main_dino_mc.py runs (tiny, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import eval_knn
import main_dino_mc
import plot_log
import utils
from datasets.eurosat import EuroSAT
from datasets.transforms import eval_transform
from tests.by_hand import kl_by_hand

HEALTH_KEYS = {f"train_{k}" for k in ("teacher_entropy", "teacher_batch_entropy", "teacher_student_kl")}
HEALTH_KEYS |= {"train_feature_std", "train_feature_dims", "train_prototypes_used", "train_momentum"}


@pytest.fixture(scope="module")
def seco_root(seco_demo) -> Path:
    return seco_demo(4, 2, seed=1)


@pytest.fixture(scope="module")
def eurosat_root(eurosat_demo) -> Path:
    return eurosat_demo(6, ("Forest", "River", "SeaLake", "Highway"))


def pretrain(seco_root, out, *extra: str) -> list[str]:
    """Two tiny epochs (vit_tiny/16, 64 px globals, 16 prototypes); returns the lines printed."""
    argv = ["--arch", "vit_tiny", "--patch_size", "16", "--data_path", str(seco_root), "--output_dir", str(out)]
    argv += ["--epochs", "2", "--batch_size_per_gpu", "4", "--out_dim", "16", "--num_workers", "0"]
    argv += ["--precision", "fp32", "--device", "cpu", "--local_crops_number", "2", "--global_crops_size", "64"]
    argv += ["--size_crops", "48", "32", "--print_freq", "1", *extra]
    main_dino_mc.run(argv)
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def warnings_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning: epoch")]


def test_a_flat_teacher_warns_once_per_epoch_and_a_sharp_one_does_not(seco_root, tmp_path, capsys, monkeypatch):
    """Teacher temperature 5: every distribution is flat (uniform collapse) -> one warning per epoch, and the
    run goes on to the end. Temperature 0.02: sharp, several prototypes -> no warning."""
    log = pretrain(seco_root, tmp_path / "flat", "--teacher_temp", "5", "--warmup_teacher_temp", "5")
    flat = warnings_of(capsys.readouterr().out)
    assert len(log) == 2 and len(flat) == 2, flat
    assert all("uniform collapse" in w and "a lower --teacher_temp" in w for w in flat)
    assert not any("a higher --teacher_temp" in w for w in flat)  # the advice against the other regimes
    assert all(row["train_teacher_entropy"] > 0.9 * torch.log(torch.tensor(16.0)).item() for row in log)

    # Every step's teacher and student outputs, as the loss receives them, for a KL computed independently.
    steps, forward = [], main_dino_mc.DINOLoss.forward

    def recording(self, student_output, teacher_output, epoch):
        outputs = (student_output.detach().clone(), teacher_output.detach().clone(), self.center.clone())
        steps.append((epoch, *outputs, self.teacher_temp_schedule[epoch], self.student_temp))
        return forward(self, student_output, teacher_output, epoch)

    monkeypatch.setattr(main_dino_mc.DINOLoss, "forward", recording)
    log = pretrain(seco_root, tmp_path / "sharp", "--teacher_temp", "0.02", "--warmup_teacher_temp", "0.02")
    assert warnings_of(capsys.readouterr().out) == []
    assert HEALTH_KEYS <= set(log[0]) and log[0]["out_dim"] == 16
    assert all(row["train_prototypes_used"] >= 2 for row in log)
    # The logged KL is each epoch's mean over its steps of KL(teacher || student) over the loss's crop pairs.
    for row in log:
        kls = [kl_by_hand(s, t, c, 2, tt, ts) for epoch, s, t, c, tt, ts in steps if epoch == row["epoch"]]
        assert kls and row["train_teacher_student_kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-4, abs=1e-5)

    png = tmp_path / "sharp" / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titles = [title for title, _ in plot_log.panels_for([log])]
    assert titles == [
        "loss",
        "learning rate",
        "weight decay",
        "teacher momentum",
        "teacher entropy (nats)",
        "KL(teacher || student)",
        "feature spread",
        "feature dimensions",
        "prototypes used",
    ]


def test_online_knn_equals_eval_knn_on_the_checkpoint(seco_root, eurosat_root, tmp_path):
    out = tmp_path / "pre"
    log = pretrain(seco_root, out, "--knn_data_path", str(eurosat_root), "--knn_every", "2", "--knn_nb", "1", "3")
    assert "knn_top1_k1" not in log[0] and {"knn_top1_k1", "knn_top1_k3"} <= set(log[1])  # every 2 epochs
    eval_knn.run(
        ["--arch", "vit_tiny", "--patch_size", "16", "--pretrained_weights", str(out / "checkpoint.pth")]
        + ["--data_path", str(eurosat_root), "--output_dir", str(tmp_path / "knn"), "--nb_knn", "1", "3"]
        + ["--crop_size", "64", "--num_workers", "0", "--device", "cpu"]
    )
    offline = json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert log[1]["knn_top1_k1"] == pytest.approx(offline["1"]["top1"])
    assert log[1]["knn_top1_k3"] == pytest.approx(offline["3"]["top1"])
    assert "online k-NN top-1 (%)" in [title for title, _ in plot_log.panels_for([log])]

    other = tmp_path / "several"
    plot_log.run([str(out / "log.txt"), str(out / "log.txt"), "--labels", "a", "b", "--output", str(other)])
    assert other.read_bytes()[:4] == b"\x89PNG"


def test_bad_knn_flags_are_one_line(seco_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        pretrain(seco_root, tmp_path, "--knn_data_path", str(tmp_path / "nope"))
    assert exc.value.code == 2 and "--knn_data_path" in capsys.readouterr().err


def test_random_baseline_batchnorm_statistics_are_those_of_the_data(eurosat_root):
    """eval_knn's random baseline with batch norm: the running statistics become the data's (here: the first
    BatchNorm's mean over the 8 images equals the per-channel mean of conv1's output)."""
    dataset = EuroSAT(eurosat_root, "train", "RGB", seed=0)
    dataset.transform = eval_transform("RGB", 32, 32)
    subset = torch.utils.data.Subset(dataset, range(8))
    torch.manual_seed(0)
    model = utils.build_backbone("resnet18")[0].eval()
    eval_knn.recalibrate_batchnorm(model, subset, "cpu", batch_size=4, num_workers=0, print_freq=10)
    images = torch.stack([subset[i][0] for i in range(8)])
    with torch.no_grad():
        expected = model.conv1(images).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.bn1.running_mean, expected, atol=1e-5, rtol=1e-4)
    assert not model.training
