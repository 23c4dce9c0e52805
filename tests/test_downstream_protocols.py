"""The downstream scripts on data as other tools leave it, on empty splits, on which split "best" is chosen
(metrics.json), and the documented flag sets that reproduce the published scripts' settings (docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

import engine
import eval_knn
import eval_linear
import finetune_bigearthnet
import finetune_eurosat
import finetune_oscd
from datasets.bigearthnet import LABELS_43
from datasets.transforms import BICUBIC, eval_resize
from tests.bigearthnet_samples import DATA, EXPECTED_43, PATCHES, link_patches
from tests.downstream_fixtures import write_bigearthnet_lists, write_eurosat_rgb, write_oscd
from tests.engine_toy import make_args, toy_data, toy_task

BEN_FAST = ["--arch", "resnet18", "--pretrained_weights", "none", "--input_size", "32", "--num_workers", "0"]
BEN_FAST += ["--batch_size_per_gpu", "2", "--print_freq", "100", "--epochs", "1"]
needs_ben = pytest.mark.skipif(not DATA.is_dir(), reason=f"real sample data {DATA} missing (not in a user's clone)")


def expect_exit_2(run, argv, capsys) -> str:
    """Run a script's CLI entry, require exit code 2 and exactly one stderr line; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@needs_ben
def test_bigearthnet_torchgeo_lists_43_classes_and_published_flags(tmp_path, capsys):
    """torchgeo's downloader layout (bigearthnet-*.csv with S2,S1 pairs beside BigEarthNet-v1.0/), the 43-class
    nomenclature, and the published main_bigearthnet.py settings (no flips, values / 255, lr 1e-5, wd 2e-5)."""
    link_patches(tmp_path / "BigEarthNet-v1.0", PATCHES)
    write_bigearthnet_lists(tmp_path, {"train": PATCHES[:4], "val": PATCHES[4:]}, "bigearthnet-{split}.csv", "s2,s1")
    out = tmp_path / "out"
    published = ["--lr", "1e-5", "--weight_decay", "2e-5", "--flips", "false", "--normalize", "false"]
    argv = [*BEN_FAST, *published, "--num_classes", "43", "--data_path", str(tmp_path), "--output_dir", str(out)]
    finetune_bigearthnet.run(argv)
    printed = capsys.readouterr().out
    assert "BigEarthNet: 4 train / 2 val patches, bands B4,B3,B2, 43 classes" in printed
    assert "WARNING" not in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_split"] == "val" and metrics["best_selected_on"] == "val"
    last = metrics["last"]["metrics"]
    assert list(last["ap_per_class"]) == list(LABELS_43)
    val_classes = {LABELS_43[i] for p in PATCHES[4:] for i in EXPECTED_43[p]}
    assert {name for name, ap in last["ap_per_class"].items() if ap is not None} == val_classes
    args = torch.load(out / "checkpoint.pth", weights_only=False)["args"]
    assert (args["lr"], args["weight_decay"], args["flips"], args["normalize"]) == (1e-5, 2e-5, False, False)


@needs_ben
def test_bigearthnet_explicit_split_dir_without_lists_is_one_line_exit_2(tmp_path, capsys):
    root = link_patches(tmp_path / "BigEarthNet-v1.0", PATCHES)
    (tmp_path / "splits").mkdir()
    argv = [*BEN_FAST, "--data_path", str(root), "--split_dir", str(tmp_path / "splits"), "--output_dir", str(tmp_path)]
    line = expect_exit_2(finetune_bigearthnet.run, argv, capsys)
    assert line == (
        f"error: --split_dir {tmp_path / 'splits'} holds no BigEarthNet train list "
        "(expected bigearthnet-train.txt or bigearthnet-train.csv or train.csv)"
    )


def test_bigearthnet_published_transforms_are_resize_and_to_tensor():
    image = torch.randint(0, 256, (3, 120, 120), dtype=torch.uint8)
    train, evaluation = finetune_bigearthnet.build_transforms(["B4", "B3", "B2"], 224, flips=False, normalize=False)
    expected = v2.Resize((224, 224), interpolation=BICUBIC, antialias=True)(image).float() / 255.0
    for _ in range(8):  # no random step left: every draw is the published Resize + ToTensor
        assert torch.equal(train(image), expected)
    assert torch.equal(evaluation(image), expected)
    train, evaluation = finetune_bigearthnet.build_transforms(["B4", "B3", "B2"], 224)
    torch.manual_seed(0)
    assert any(not torch.equal(train(image), evaluation(image)) for _ in range(8))  # our default flips
    black = torch.zeros(3, 120, 120, dtype=torch.uint8)
    assert evaluation(black).max() < 0  # and standardises (ImageNet statistics: black is below the mean)


EUROSAT_FAST = ["--arch", "resnet18", "--pretrained_weights", "none", "--num_workers", "0", "--batch_size_per_gpu", "2"]
EUROSAT_SCRIPTS = {
    "eval_knn": (eval_knn.run, [*EUROSAT_FAST, "--resize_size", "32", "--crop_size", "32", "--nb_knn", "1"]),
    "eval_linear": (eval_linear.run, [*EUROSAT_FAST, "--input_size", "32", "--epochs", "1"]),
    "finetune_eurosat": (finetune_eurosat.run, [*EUROSAT_FAST, "--input_size", "32", "--epochs", "1"]),
}


@pytest.mark.parametrize("script", sorted(EUROSAT_SCRIPTS))
def test_empty_evaluation_split_is_one_line_exit_2(tmp_path, capsys, script):
    """One image per class: the generated 60/20/20 split leaves val empty. Before: ZeroDivisionError (k-NN),
    or a "successful" run with loss NaN in metrics.json (linear probe, fine-tuning)."""
    write_eurosat_rgb(tmp_path / "data", {"Forest": 1, "River": 1, "SeaLake": 1})
    run, fast = EUROSAT_SCRIPTS[script]
    out = tmp_path / "out"
    line = expect_exit_2(run, [*fast, "--data_path", str(tmp_path / "data"), "--output_dir", str(out)], capsys)
    assert line.startswith(f"error: the EuroSAT val split of {tmp_path / 'data' / '2750'} is empty")
    assert not (out / "metrics.json").exists() and not (out / "knn.json").exists()


def test_knn_on_saved_features_with_an_empty_split_is_one_line_exit_2(tmp_path, capsys):
    features = (torch.randn(4, 8), torch.tensor([0, 1, 0, 1]), torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    eval_knn.save_features(tmp_path / "features", features)
    argv = ["--load_features", str(tmp_path / "features"), "--nb_knn", "1", "--output_dir", str(tmp_path)]
    line = expect_exit_2(eval_knn.run, argv, capsys)
    assert line == f"error: --load_features {tmp_path / 'features'}: the test split is empty (0 feature rows)"


def fit_toy(args, **selection) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    train = engine.make_loader(toy_data(), args, train=True)
    evaluation = engine.make_loader(toy_data(seed=1), args, train=False)
    return engine.fit(model, toy_task(), train, evaluation, optimizer, scheduler, "fp32", args, **selection)


def read_log(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]


def test_fit_selects_best_on_the_split_it_is_given_and_says_so(tmp_path):
    # A selection split whose labels are shifted: the better the model, the worse it scores there, so the
    # epoch it selects differs from the evaluated split's best.
    points, labels = toy_data(seed=2).tensors
    shifted = torch.utils.data.TensorDataset(points, (labels + 1) % 3)
    args = make_args(tmp_path / "held_out", epochs=4, lr=0.05)  # val accuracy 0.93, 0.97, 1, 1
    select = engine.make_loader(shifted, args, train=False)
    result = fit_toy(args, eval_split="test", select_loader=select, select_split="held_out")
    log = read_log(tmp_path / "held_out")
    select_best = max(range(4), key=lambda e: (log[e]["select_acc"], -e))
    eval_best = max(range(4), key=lambda e: (log[e]["test_acc"], -e))
    assert select_best != eval_best
    metrics = json.loads((tmp_path / "held_out" / "metrics.json").read_text())
    assert (metrics["eval_split"], metrics["best_selected_on"]) == ("test", "held_out")
    assert metrics["best"]["epoch"] == result["best"]["epoch"] == select_best
    assert metrics["best"]["selection_metrics"]["acc"] == log[select_best]["select_acc"]
    assert metrics["best"]["metrics"]["acc"] == log[select_best]["test_acc"]  # reported: the test metrics
    assert torch.load(tmp_path / "held_out" / "checkpoint_best.pth", weights_only=False)["epoch"] == select_best + 1

    args = make_args(tmp_path / "default", epochs=4, lr=0.05)
    fit_toy(args, eval_split="val")
    metrics = json.loads((tmp_path / "default" / "metrics.json").read_text())
    assert (metrics["eval_split"], metrics["best_selected_on"]) == ("val", "val")
    assert metrics["best"]["epoch"] == eval_best and "selection_metrics" not in metrics["best"]

    args = make_args(tmp_path / "none", epochs=4)
    result = fit_toy(args, eval_split="test", select_best=False)
    metrics = json.loads((tmp_path / "none" / "metrics.json").read_text())
    assert metrics["best_selected_on"] is None and metrics["best"] == metrics["last"] and metrics["last"]["epoch"] == 3
    assert torch.load(tmp_path / "none" / "checkpoint_best.pth", weights_only=False)["epoch"] == 4


OSCD_CITIES = {"aa": (64, 64), "bb": (32, 64), "cc": (32, 32), "tt": (32, 64)}
OSCD_FAST = ["--arch", "resnet18", "--pretrained_weights", "none", "--tile_size", "32", "--num_workers", "0"]
OSCD_FAST += ["--batch_size_per_gpu", "4", "--print_freq", "100", "--epochs", "2"]


def test_oscd_without_city_lists_and_best_selected_on_val_cities(tmp_path, capsys):
    images = write_oscd(tmp_path / "data", OSCD_CITIES, ["aa", "bb", "cc"], ["tt"])
    (images / "train.txt").unlink()
    (images / "test.txt").unlink()
    out = tmp_path / "out"
    argv = [*OSCD_FAST, "--val_cities", "cc", "--data_path", str(tmp_path / "data"), "--output_dir", str(out)]
    finetune_oscd.run(argv)
    printed = capsys.readouterr().out.splitlines()
    notices = [line for line in printed if line.startswith("OSCD: no ")]
    labels = tmp_path / "data" / "Onera Satellite Change Detection dataset - "
    assert notices == [
        f"OSCD: no train.txt / test.txt: cities taken from the folders of {labels}Train Labels and {labels}Test Labels"
    ]
    assert "OSCD: 2 train cities (6 tiles), 1 validation cities (1 tiles), 1 test cities (2 tiles), bands B4,B3,B2" in (
        printed
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["eval_split"], metrics["best_selected_on"]) == ("test", "val_cities:cc")
    log = read_log(out)
    best = max(range(2), key=lambda e: (log[e]["select_f1"], -e))
    assert metrics["best"]["epoch"] == best and metrics["last"]["epoch"] == 1
    assert metrics["best"]["selection_metrics"]["f1"] == log[best]["select_f1"]
    assert metrics["last"]["metrics"]["f1"] == log[1]["test_f1"]  # the result: the last epoch on test
    assert any(f"Change class (%): precision {metrics['last']['metrics']['precision']:.2f}" in line for line in printed)


def test_oscd_default_and_published_selection(tmp_path):
    write_oscd(tmp_path / "data", OSCD_CITIES, ["aa", "bb", "cc"], ["tt"])
    argv = [*OSCD_FAST, "--data_path", str(tmp_path / "data")]
    finetune_oscd.run([*argv, "--output_dir", str(tmp_path / "default")])
    metrics = json.loads((tmp_path / "default" / "metrics.json").read_text())
    assert metrics["best_selected_on"] is None and metrics["best"] == metrics["last"]
    finetune_oscd.run([*argv, "--select_on_test", "true", "--output_dir", str(tmp_path / "published")])
    metrics = json.loads((tmp_path / "published" / "metrics.json").read_text())
    log = read_log(tmp_path / "published")
    assert metrics["best_selected_on"] == "test"
    assert metrics["best"]["epoch"] == max(range(2), key=lambda e: (log[e]["test_f1"], -e))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--val_cities", "tt"], "--val_cities tt: not a train city of"),
        (["--val_cities", "aa,bb,cc"], "--val_cities aa,bb,cc holds out every train city"),
        (["--val_cities", "aa", "--select_on_test", "true"], "--val_cities and --select_on_test both choose"),
    ],
)
def test_oscd_bad_selection_flags_are_one_line_exit_2(tmp_path, capsys, flags, expected):
    write_oscd(tmp_path / "data", dict.fromkeys(["aa", "bb", "cc", "tt"], (32, 32)), ["aa", "bb", "cc"], ["tt"])
    argv = [*OSCD_FAST, *flags, "--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")]
    assert expected in expect_exit_2(finetune_oscd.run, argv, capsys)


EVALUATION_DOC = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"
# The published scripts' settings (docs/evaluation.md) that each documented flag set must give, in its order.
PUBLISHED = [
    (eval_knn, {"nb_knn": [5, 10, 15, 20], "temperature": 0.07, "resize_size": 256, "crop_size": 224}),
    (eval_linear, {"lr": 0.001, "epochs": 100, "batch_size_per_gpu": 32, "n_last_blocks": 4}),
    (finetune_eurosat, {"lr": 0.001, "epochs": 100, "batch_size_per_gpu": 32, "weight_decay": 0.0}),
    (
        finetune_bigearthnet,
        {"lr": 1e-5, "weight_decay": 2e-5, "epochs": 100, "batch_size_per_gpu": 32, "train_frac": 1.0}
        | {"input_size": 224, "flips": False, "normalize": False, "num_classes": 19},
    ),
    (
        finetune_oscd,
        {"lr": 0.003, "weight_decay": 1e-4, "lr_gamma": 0.95, "epochs": 50, "batch_size_per_gpu": 32}
        | {"tile_size": 96, "seed": 42, "select_on_test": True, "val_cities": ""},
    ),
]


def test_documented_published_flag_sets_give_the_published_settings():
    """Each "Published settings:" flag set of docs/evaluation.md's protocol tables exists and yields the published
    values."""
    documented = re.findall(r"Published settings: [^`]*`([^`]*)`", EVALUATION_DOC.read_text())
    assert len(documented) == len(PUBLISHED)
    for flags, (script, expected) in zip(documented, PUBLISHED):
        parser = argparse.ArgumentParser(parents=[script.get_args_parser()])
        args = parser.parse_args([*flags.split(), "--pretrained_weights", "none"])
        if getattr(args, "resize_size", 0) is None:  # eval_knn derives it from the crop, as check_args does
            args.resize_size = eval_resize(args.crop_size)
        assert {key: getattr(args, key) for key in expected} == expected, script.__name__
        assert args.checkpoint_key == "teacher"
