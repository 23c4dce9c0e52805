"""--tensorboard: the scalars of log.txt written to output_dir/tb, read back with TensorBoard's own reader.

EventAccumulator is what TensorBoard's UI loads; it applies the restart markers that ``purge_step`` writes,
so "a resumed run has each step once" is checked as a user would see it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import eval_knn
import main_dino_mc
import utils
from tests.engine_toy import make_args, train_toy
from tests.tiny_runs import TINY_KNN, tiny_args


@pytest.fixture(scope="module")
def seco_root(seco_demo) -> Path:
    return seco_demo(2, 3, seed=1)


def read_scalars(output_dir) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(output_dir / "tb"))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def read_log(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


def test_resume_replaces_the_steps_of_the_interrupted_run(tmp_path):
    first = utils.TensorBoardLog(tmp_path, enabled=True)
    for step in range(3):
        first.write({"epoch": step, "train_loss": 1.0 + step, "health": {"grad_norm": 0.5}, "per_class": [1, 2]}, step)
    first.close()
    resumed = utils.TensorBoardLog(tmp_path, enabled=True, start_step=2)  # step 2 had no checkpoint: run again
    for step in (2, 3):
        resumed.write({"epoch": step, "train_loss": 10.0 + step}, step)
    resumed.close()
    scalars = read_scalars(tmp_path)
    assert scalars["train_loss"] == [(0, 1.0), (1, 2.0), (2, 12.0), (3, 13.0)]
    assert scalars["health/grad_norm"] == [(0, 0.5), (1, 0.5)]  # the purged step 2 is gone from every tag
    assert set(scalars) == {"train_loss", "health/grad_norm"}  # lists and the epoch counter are not scalars


def test_disabled_writes_nothing(tmp_path):
    log = utils.TensorBoardLog(tmp_path, enabled=False)
    log.write({"train_loss": 1.0}, 0)
    log.close()
    assert not (tmp_path / "tb").exists()


def test_engine_fit_resumed_after_a_kill_has_each_epoch_once(tmp_path):
    args = make_args(tmp_path, epochs=2, tensorboard=True)
    train_toy(args)
    shutil.copy(tmp_path / "checkpoint.pth", tmp_path / "after_two.pth")
    args.epochs = 3
    train_toy(args)
    # A kill after epoch 2 was logged but before its checkpoint: the rerun logs epoch 2 again.
    shutil.copy(tmp_path / "after_two.pth", tmp_path / "checkpoint.pth")
    train_toy(args)
    log = read_log(tmp_path)
    scalars = read_scalars(tmp_path)
    assert [line["epoch"] for line in log] == [0, 1, 2]
    for key in ("train_loss", "val_acc", "train_lr"):
        assert scalars[key] == [(line["epoch"], pytest.approx(line[key])) for line in log]


def test_pretraining_writes_log_txt_scalars_and_resumes(seco_root, tmp_path):
    main_dino_mc.run(tiny_args(seco_root, tmp_path, "--tensorboard", "true"))
    main_dino_mc.run(tiny_args(seco_root, tmp_path, "--tensorboard", "true", "--epochs", "2"))
    log = read_log(tmp_path)
    scalars = read_scalars(tmp_path)
    assert [line["epoch"] for line in log] == [0, 1]
    numeric = {k for k, v in log[0].items() if k != "epoch" and isinstance(v, (int, float))}
    assert numeric <= set(scalars) and "train_loss" in numeric
    assert scalars["train_loss"] == [(line["epoch"], pytest.approx(line["train_loss"])) for line in log]


def test_knn_writes_its_results(rgb_root, tmp_path):
    eval_knn.run(
        TINY_KNN
        + ["--pretrained_weights", "none", "--data_path", str(rgb_root), "--output_dir", str(tmp_path)]
        + ["--nb_knn", "1", "3", "--tensorboard", "true"]
    )
    results = json.loads((tmp_path / "knn.json").read_text())
    scalars = read_scalars(tmp_path)
    assert scalars["knn/3/top1"] == [(0, pytest.approx(results["3"]["top1"]))]
    assert scalars["knn/1/top5"] == [(0, pytest.approx(results["1"]["top5"]))]
