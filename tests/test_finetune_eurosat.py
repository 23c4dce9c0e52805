"""EuroSAT fine-tuning end to end on small fixtures in the real RGB and MS layouts (vit_tiny, 32 px inputs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import finetune_eurosat
from datasets.eurosat import EUROSAT_MS_MEAN_STD, MS_FILE_BANDS
from tests.downstream_fixtures import TEXTURED_CLASSES, write_eurosat_ms, write_eurosat_split_files, write_textured_rgb

REPO = Path(__file__).resolve().parents[1]
FAST = ["--arch", "vit_tiny", "--patch_size", "16", "--input_size", "32", "--num_workers", "0"]
FAST += ["--batch_size_per_gpu", "6", "--lr", "2", "--print_freq", "100", "--device", "cpu"]
RANDOM = ["--pretrained_weights", "none"]


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    """One 2-epoch RGB run shared by the tests that inspect its outputs."""
    tmp = tmp_path_factory.mktemp("eurosat")
    data = write_textured_rgb(tmp / "data")
    out = tmp / "out"
    finetune_eurosat.run([*FAST, *RANDOM, "--data_path", str(data), "--output_dir", str(out), "--epochs", "2"])
    return data, out


def test_rgb_fine_tuning_learns_and_reports(rgb_run):
    _, out = rgb_run
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["last"]["metrics"]
    assert metrics["best"]["metrics"]["acc"] >= 60  # percent; 3 balanced classes: chance is 33.3
    assert {"acc", "precision_macro", "recall_macro", "f1_macro", "per_class_acc", "confusion_matrix"} <= set(last)
    matrix = np.array(last["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == 12  # the whole 20 % val split (4 per class)
    assert last["acc"] == pytest.approx(100 * np.trace(matrix) / matrix.sum())
    assert (out / "confusion_matrix.png").stat().st_size > 0
    assert [f"eurosat-{s}.txt" for s in ("test", "train", "val")] == sorted(p.name for p in out.glob("eurosat-*.txt"))
    assert len((out / "log.txt").read_text().splitlines()) == 2


def test_evaluate_saved_checkpoint_reproduces_best_epoch(rgb_run):
    data, out = rgb_run
    finetune_eurosat.run([*FAST, *RANDOM, "--data_path", str(data), "--output_dir", str(out), "--evaluate"])
    evaluated = json.loads((out / "evaluate.json").read_text())
    best = json.loads((out / "metrics.json").read_text())["best"]
    assert evaluated["metrics"]["acc"] == best["metrics"]["acc"]
    assert evaluated["metrics"]["confusion_matrix"] == best["metrics"]["confusion_matrix"]


def test_rerun_with_more_epochs_resumes(rgb_run, tmp_path):
    data, out = rgb_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("checkpoint.pth", "log.txt"):
        (resumed / name).write_bytes((out / name).read_bytes())
    finetune_eurosat.run([*FAST, *RANDOM, "--data_path", str(data), "--output_dir", str(resumed), "--epochs", "3"])
    log = [json.loads(line) for line in (resumed / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in log] == [0, 1, 2]  # epochs 0-1 were not run again


def test_multispectral_all_bands_learns(tmp_path):
    """MS GeoTIFFs (B8A stored last), 12 bands read; each class has its own constant band levels."""
    for index, cls in enumerate(TEXTURED_CLASSES):
        levels = {b: int(mean + (index - 1) * std) for b, (mean, std) in EUROSAT_MS_MEAN_STD.items()}
        write_eurosat_ms(tmp_path / "data", {cls: 10}, size=32, band_values=levels)
    assert len(MS_FILE_BANDS) == 13
    out = tmp_path / "out"
    args = [*FAST, *RANDOM, "--bands", "ALL", "--data_path", str(tmp_path / "data"), "--output_dir", str(out)]
    finetune_eurosat.run([*args, "--epochs", "2"])
    assert json.loads((out / "metrics.json").read_text())["best"]["metrics"]["acc"] > 50


def test_train_frac_subset_is_saved(rgb_run, tmp_path):
    data, _ = rgb_run
    out = tmp_path / "frac"
    finetune_eurosat.run(
        [*FAST, *RANDOM, "--data_path", str(data), "--output_dir", str(out), "--epochs", "1", "--train_frac", "0.5"]
    )
    chosen = (out / "train_subset.txt").read_text().split()
    train = (out / "eurosat-train.txt").read_text().split()
    assert len(chosen) == len(set(chosen)) == 18 and set(chosen) <= set(train)


def start_script(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, str(REPO / "finetune_eurosat.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    """A real process for the exit code; the other cases in-process (same code path, no interpreter start),
    checked while that process starts."""
    proc = start_script("--data_path", str(tmp_path / "missing"), "--pretrained_weights", "none")
    write_textured_rgb(tmp_path / "good", per_class=5)
    write_textured_rgb(tmp_path / "bad", per_class=2)
    split = {"train": ["Forest_1.jpg", "Forest_9.jpg"], "val": ["Forest_2.jpg"], "test": ["Forest_2.jpg"]}
    write_eurosat_split_files(tmp_path / "bad", split)
    for args, expected in [
        (["--data_path", str(tmp_path / "bad"), "--pretrained_weights", "none"], "Forest_9.jpg"),
        (["--data_path", str(tmp_path / "good"), "--pretrained_weights", str(tmp_path / "nope.pth")], "nope.pth"),
        (
            ["--data_path", str(tmp_path / "good"), "--pretrained_weights", "none", "--train_frac", "1.5"],
            "--train_frac",
        ),
        (["--data_path", str(tmp_path / "good"), "--pretrained_weights", "none", "--evaluate"], "checkpoint_best.pth"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            finetune_eurosat.run([*FAST, *args, "--output_dir", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.strip().splitlines() == [
        f"error: --data_path {tmp_path / 'missing'} is not a folder (expected a EuroSAT root)"
    ]


def test_torchrun_two_processes_train_and_evaluate_every_sample_once(tmp_path):
    """DDP on CPU (gloo): 9 val images split 5 + 4 over two processes give the single-process metrics."""
    data = write_textured_rgb(tmp_path / "data", per_class=13)
    out = tmp_path / "out"
    args = [*FAST, *RANDOM, "--data_path", str(data), "--output_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, str(REPO / "finetune_eurosat.py"), *args, "--epochs", "1"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "distributed init (rank 1/2, gloo)" in proc.stdout
    best = json.loads((out / "metrics.json").read_text())["best"]["metrics"]
    finetune_eurosat.run([*args, "--evaluate"])
    single = json.loads((out / "evaluate.json").read_text())["metrics"]
    assert np.array(single["confusion_matrix"]).sum() == 9
    assert single["confusion_matrix"] == best["confusion_matrix"] and single["acc"] == best["acc"]
