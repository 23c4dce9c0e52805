"""BigEarthNet fine-tuning on the six real v1.0 patches: mAP over the whole split, --train_frac, bad input."""

from __future__ import annotations

import json
import shutil

import pytest

import finetune_bigearthnet
from datasets.bigearthnet import CLASSES_19
from tests.bigearthnet_samples import DATA, EXPECTED_19, PATCHES, ROOT, link_patches

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real sample data {DATA} missing (not in a user's clone)")

FAST = ["--arch", "resnet18", "--pretrained_weights", "none", "--input_size", "64", "--num_workers", "0"]
FAST += ["--batch_size_per_gpu", "2", "--lr", "1", "--print_freq", "100", "--device", "cpu"]


def test_two_epochs_on_the_real_patches_without_split_files(tmp_path, capsys):
    out = tmp_path / "out"
    finetune_bigearthnet.run([*FAST, "--data_path", str(ROOT.parent), "--output_dir", str(out), "--epochs", "2"])
    printed = capsys.readouterr().out
    assert "no split files: training and evaluating on the same 6 patches" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["main_metric"] == "mAP_micro" and metrics["last"]["epoch"] == 1
    last = metrics["last"]["metrics"]
    present = sorted({i for indices in EXPECTED_19.values() for i in indices})
    absent = [name for i, name in enumerate(CLASSES_19) if i not in present]
    assert last["classes_without_positives"] == absent
    assert [name for name, ap in last["ap_per_class"].items() if ap is None] == absent
    present_ap = [last["ap_per_class"][CLASSES_19[i]] for i in present]
    assert last["mAP_macro"] == pytest.approx(sum(present_ap) / len(present_ap))
    # Micro AP ranks all 6 x 19 scores: at least the positive rate (16 / 114) and at most 1.
    assert 100 * 16 / 114 <= last["mAP_micro"] <= 100 and 0 < last["mAP_macro"] <= 100  # percent
    assert len((out / "log.txt").read_text().splitlines()) == 2


def test_train_frac_draws_from_train_only_and_saves_the_list(tmp_path):
    root = link_patches(tmp_path / "BigEarthNet-v1.0", PATCHES)
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.csv").write_text("".join(f"{p}\n" for p in PATCHES[:4]))
    (splits / "val.csv").write_text("".join(f"{p}\n" for p in PATCHES[4:]))
    out = tmp_path / "out"
    argv = [*FAST, "--data_path", str(root), "--split_dir", str(splits), "--output_dir", str(out)]
    finetune_bigearthnet.run([*argv, "--epochs", "1", "--train_frac", "0.5"])
    chosen = (out / "train_patches.txt").read_text().split()
    assert len(chosen) == len(set(chosen)) == 2 and set(chosen) <= set(PATCHES[:4])
    metrics = json.loads((out / "metrics.json").read_text())["last"]["metrics"]
    val_classes = {CLASSES_19[i] for p in PATCHES[4:] for i in EXPECTED_19[p]}
    assert {name for name, ap in metrics["ap_per_class"].items() if ap is not None} == val_classes


def test_missing_band_file_is_one_line_exit_2(tmp_path, capsys):
    root = link_patches(tmp_path / "BigEarthNet-v1.0", PATCHES[1:])
    copy = root / PATCHES[0]
    shutil.copytree(ROOT / PATCHES[0], copy)
    (copy / f"{PATCHES[0]}_B03.tif").unlink()
    with pytest.raises(SystemExit) as exit_info:
        finetune_bigearthnet.run([*FAST, "--data_path", str(root), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: missing band file {copy / f'{PATCHES[0]}_B03.tif'}"]
