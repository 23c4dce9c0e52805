"""The shared supervised loop: whole-split metrics, exact resume after an interruption, checkpoints, logs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import engine
import utils
from tests.engine_toy import make_args, toy_data, toy_task, train_toy


def test_shard_sampler_covers_every_sample_once():
    shards = [list(engine.ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(10))
    assert [len(s) for s in shards] == [4, 3, 3]


def test_subset_indices_without_replacement_and_seeded():
    chosen = engine.subset_indices(100, 0.1, seed=3)
    assert len(chosen) == len(set(chosen)) == 10 and chosen == sorted(chosen)
    assert chosen == engine.subset_indices(100, 0.1, seed=3) != engine.subset_indices(100, 0.1, seed=4)
    assert engine.subset_indices(5, 1.0, seed=0) == [0, 1, 2, 3, 4]


def test_evaluate_counts_the_whole_split_not_batch_means(tmp_path):
    """7 samples in batches of 4 + 3: per-batch averaging would give (3/4 + 3/3) / 2 = 0.875, not 6/7."""
    args = make_args(tmp_path)
    logits = torch.eye(3)[torch.tensor([0, 1, 2, 0, 0, 0, 1])]
    labels = torch.tensor([0, 1, 2, 1, 0, 0, 1])
    dataset = torch.utils.data.TensorDataset(logits, labels)
    metrics = engine.evaluate(nn.Identity(), toy_task(), engine.make_loader(dataset, args, False), "fp32", args)
    assert metrics["acc"] == pytest.approx(100 * 6 / 7)  # percent


def test_fit_writes_checkpoints_log_and_metrics(tmp_path):
    args = make_args(tmp_path)
    _, result = train_toy(args)
    assert result["last"]["epoch"] == 2 and result["last"]["metrics"]["acc"] > 90
    lines = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2]
    assert {"train_loss", "train_lr", "val_acc", "val_loss"} <= set(lines[0])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["main_metric"] == "acc" and metrics["last"] == json.loads(json.dumps(result["last"]))
    best_epoch = max(lines, key=lambda line: line["val_acc"])["epoch"]
    assert metrics["best"]["epoch"] == best_epoch
    assert torch.load(tmp_path / "checkpoint_best.pth")["epoch"] == best_epoch + 1
    assert torch.load(tmp_path / "checkpoint.pth")["epoch"] == 3


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    reference_model, reference = train_toy(make_args(tmp_path / "straight"))

    resumed_dir = tmp_path / "resumed"
    original = engine.train_one_epoch

    def killed_at_epoch_2(*args, **kwargs):
        if args[4] == 2:
            raise KeyboardInterrupt  # the process dies after epoch 1's checkpoint was written
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_toy(make_args(resumed_dir))
    assert torch.load(resumed_dir / "checkpoint.pth")["epoch"] == 2
    monkeypatch.setattr(engine, "train_one_epoch", original)
    model, result = train_toy(make_args(resumed_dir))

    for a, b in zip(reference_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert result == reference
    log = [json.loads(line) for line in (resumed_dir / "log.txt").read_text().splitlines()]
    straight = [json.loads(line) for line in (tmp_path / "straight" / "log.txt").read_text().splitlines()]
    assert log == straight


def test_evaluate_checkpoint_reproduces_the_best_epoch_and_refuses_a_missing_file(tmp_path):
    args = make_args(tmp_path)
    model, result = train_toy(args)
    args.evaluate = "checkpoint_best.pth"
    evaluation = engine.make_loader(toy_data(seed=1), args, train=False)
    evaluated = engine.evaluate_checkpoint(model, toy_task(), evaluation, "fp32", args)
    assert evaluated["metrics"]["acc"] == result["best"]["metrics"]["acc"]
    assert json.loads((tmp_path / "evaluate.json").read_text())["epoch"] == result["best"]["epoch"] + 1
    args.evaluate = "nope.pth"
    with pytest.raises(utils.ConfigError, match="nope.pth"):
        engine.evaluate_checkpoint(model, toy_task(), evaluation, "fp32", args)


def test_train_split_smaller_than_a_batch_gets_its_size_as_the_batch_with_one_warning(tmp_path, capsys):
    data = toy_data()
    args = make_args(tmp_path, batch_size_per_gpu=len(data) + 10)
    loader = engine.make_loader(data, args, train=True)
    assert args.batch_size_per_gpu == len(data) and len(loader) == 1 and len(next(iter(loader))[0]) == len(data)
    assert capsys.readouterr().err.count("warning: --batch_size_per_gpu") == 1
    with pytest.raises(utils.ConfigError, match="fewer than one batch"):  # nothing to train on at all
        engine.make_loader(torch.utils.data.Subset(data, []), args, train=True)


def test_a_run_saved_with_fractions_resumes_in_percent(tmp_path):
    """Checkpoints written before scores were percent hold fractions: a resumed run converts them, so that the
    best epoch is still chosen by comparing like with like (unconverted, 1.0 would lose to any later epoch)."""
    train_toy(make_args(tmp_path, epochs=1))
    checkpoint = torch.load(tmp_path / "checkpoint.pth")
    del checkpoint["score_unit"]
    for key in ("best", "last"):
        checkpoint[key]["metrics"]["acc"] = 1.0  # all right, as a fraction
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    _, resumed = train_toy(make_args(tmp_path, epochs=2))
    assert resumed["best"]["epoch"] == 0 and resumed["best"]["metrics"]["acc"] == 100.0
    assert torch.load(tmp_path / "checkpoint.pth")["score_unit"] == "percent"
