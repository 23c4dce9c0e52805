"""Every script, fed each kind of bad input a user gives: one line on stderr that names it, exit code 2.

The table crosses the scripts with the inputs: a missing path, a folder where a file is expected, a text file
and a truncated file as a checkpoint, another architecture's checkpoint, an output folder holding another
architecture's run (resume), an empty data folder, and zero or negative numbers. Warnings may come before the
error line; nothing else may (no traceback, no second error line).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import eval_knn
import eval_linear
import export_weights
import finetune_bigearthnet
import finetune_eurosat
import finetune_oscd
import main_dino_mc
import plot_log
import prepare_data
import utils
import vision_transformer as vits
import visualize_attention
from tests.bigearthnet_samples import DATA as BIGEARTHNET_DATA
from tests.bigearthnet_samples import ROOT as BIGEARTHNET_ROOT
from tests.downstream_fixtures import write_oscd
from tests.tiny_runs import TINY_KNN, tiny_args

OSCD_CITIES = {"aa": (40, 40), "tt": (40, 40)}
SUPERVISED = ["--epochs", "1", "--num_workers", "0", "--device", "cpu", "--print_freq", "100"]


@pytest.fixture(scope="module")
def bad(tmp_path_factory, rgb_root, seco_demo) -> dict[str, Path]:
    """The inputs: files and folders a user could pass by mistake, and the data the scripts' valid runs need."""
    root = tmp_path_factory.mktemp("bad")
    paths = {"missing": root / "no_such_file.pth", "folder": root / "a_folder", "empty": root / "empty_folder"}
    paths["folder"].mkdir()
    paths["empty"].mkdir()
    paths["text"] = root / "notes.pth"
    paths["text"].write_text("epoch 1: loss 3.2\nepoch 2: loss 2.9\n")
    torch.manual_seed(0)
    tiny = utils.MultiCropWrapper(vits.vit_tiny(patch_size=16), vits.DINOHead(192, 256))
    good = root / "vit_tiny.pth"
    torch.save({"teacher": tiny.state_dict(), "student": tiny.state_dict()}, good)
    paths["truncated"] = root / "truncated.pth"
    paths["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    other = utils.MultiCropWrapper(utils.build_backbone("resnet18")[0], vits.DINOHead(512, 256))
    paths["other_arch"] = root / "resnet18.pth"
    torch.save(
        {"teacher": other.state_dict(), "student": other.state_dict(), "args": {"arch": "resnet18"}},
        paths["other_arch"],
    )
    # output folders that hold another architecture's run: a pretraining and a fine-tuning checkpoint.pth
    paths["pretrain_run"] = root / "pretrain_run"
    paths["pretrain_run"].mkdir()
    torch.save(
        {"student": other.state_dict(), "teacher": other.state_dict(), "epoch": 1},
        paths["pretrain_run"] / "checkpoint.pth",
    )
    paths["finetune_run"] = root / "finetune_run"
    paths["finetune_run"].mkdir()
    classifier = {f"backbone.{k}": v for k, v in other.backbone.state_dict().items()}
    torch.save({"state_dict": classifier, "epoch": 1}, paths["finetune_run"] / "checkpoint.pth")
    paths["seco"] = seco_demo(2, 2, seed=1)
    paths["eurosat"] = rgb_root
    paths["oscd"] = write_oscd(root / "oscd", OSCD_CITIES, train=["aa"], test=["tt"]).parent
    paths["image"] = root / "image.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (40, 90, 30)).save(paths["image"])
    return paths


def knn(p, out):
    return eval_knn.run, [*TINY_KNN, "--data_path", str(p["eurosat"]), "--nb_knn", "1", "--output_dir", str(out)]


def linear(p, out):
    argv = ["--arch", "vit_tiny", "--patch_size", "16", "--input_size", "32", "--batch_size_per_gpu", "4"]
    return eval_linear.run, [*argv, *SUPERVISED, "--data_path", str(p["eurosat"]), "--output_dir", str(out)]


def eurosat(p, out):
    argv = ["--arch", "vit_tiny", "--patch_size", "16", "--input_size", "32", "--batch_size_per_gpu", "4"]
    return finetune_eurosat.run, [*argv, *SUPERVISED, "--data_path", str(p["eurosat"]), "--output_dir", str(out)]


def bigearthnet(p, out):
    argv = ["--arch", "vit_tiny", "--patch_size", "16", "--input_size", "32", "--batch_size_per_gpu", "2"]
    return finetune_bigearthnet.run, [
        *argv, *SUPERVISED, "--data_path", str(BIGEARTHNET_ROOT.parent), "--output_dir", str(out)
    ]  # fmt: skip


def oscd(p, out):
    argv = ["--arch", "vit_tiny", "--patch_size", "16", "--tile_size", "32", "--batch_size_per_gpu", "2"]
    return finetune_oscd.run, [*argv, *SUPERVISED, "--data_path", str(p["oscd"]), "--output_dir", str(out)]


def pretrain(p, out):
    return main_dino_mc.run, tiny_args(p["seco"], out)


def attention(p, out):
    argv = ["--arch", "vit_tiny", "--patch_size", "16", "--image_size", "32", "--image_path", str(p["image"])]
    return visualize_attention.run, [*argv, "--output_dir", str(out)]


SCRIPTS = {"eval_knn": knn, "eval_linear": linear, "finetune_eurosat": eurosat, "finetune_oscd": oscd}
SCRIPTS |= {"finetune_bigearthnet": bigearthnet, "visualize_attention": attention}
WEIGHTS = {"main_dino_mc": "--init_from"} | dict.fromkeys(SCRIPTS, "--pretrained_weights")
SCRIPTS["main_dino_mc"] = pretrain

# (script, what is wrong, extra flags given as names of ``bad`` in braces, expected start of the message)
CASES = []
for script, flag in WEIGHTS.items():
    CASES += [
        (script, "missing checkpoint", [flag, "{missing}"], f"error: {flag} {{missing}} does not exist"),
        (script, "folder as checkpoint", [flag, "{folder}"], f"error: {flag} {{folder}} is a folder"),
        (script, "text file as checkpoint", [flag, "{text}"], "error: {text} is not a PyTorch checkpoint"),
        (script, "truncated checkpoint", [flag, "{truncated}"], "error: cannot read checkpoint {truncated}"),
        (script, "other arch's checkpoint", [flag, "{other_arch}"], f"error: {flag} {{other_arch}} does not fit"),
    ]
CASES += [
    (script, "empty data folder", ["--data_path", "{empty}"], "{empty}")
    for script in (
        "eval_knn",
        "eval_linear",
        "finetune_eurosat",
        "finetune_oscd",
        "finetune_bigearthnet",
        "main_dino_mc",
    )
]
CASES += [
    ("main_dino_mc", "resume another arch", ["--output_dir", "{pretrain_run}"], "error: cannot resume from"),
    ("finetune_eurosat", "resume another arch", ["--output_dir", "{finetune_run}"], "error: cannot resume from"),
    ("eval_linear", "resume another arch", ["--output_dir", "{finetune_run}"], "error: cannot resume from"),
    ("main_dino_mc", "--adapt_input without --init_from", ["--adapt_input", "rgb"], "error: --adapt_input rgb adapts"),
    ("main_dino_mc", "zero epochs", ["--epochs", "0"], "error: --epochs 0: expected a positive number"),
    ("main_dino_mc", "negative batch", ["--batch_size_per_gpu", "-2"], "error: --batch_size_per_gpu -2: expected"),
    ("main_dino_mc", "negative learning rate", ["--lr", "-0.1"], "error: --lr -0.1: expected a number >= 0"),
    ("main_dino_mc", "zero workers is fine, negative is not", ["--num_workers", "-1"], "error: --num_workers -1"),
    ("eval_knn", "zero batch", ["--batch_size_per_gpu", "0"], "error: --batch_size_per_gpu 0"),
    ("eval_knn", "negative k", ["--nb_knn", "-5"], "error: --nb_knn -5"),
    ("eval_knn", "zero temperature", ["--temperature", "0"], "error: --temperature 0"),
    ("finetune_eurosat", "zero epochs", ["--epochs", "0"], "error: --epochs 0: expected a positive number"),
    ("finetune_eurosat", "negative learning rate", ["--lr", "-1"], "error: --lr -1"),
    ("finetune_oscd", "negative batch", ["--batch_size_per_gpu", "-1"], "error: --batch_size_per_gpu -1: expected"),
    ("finetune_bigearthnet", "zero fraction", ["--train_frac", "0"], "error: --train_frac must be in (0, 1]"),
    ("visualize_attention", "missing image", ["--image_path", "{missing}"], "{missing}"),
    ("visualize_attention", "folder as image", ["--image_path", "{folder}"], "{folder}"),
    ("visualize_attention", "text file as image", ["--image_path", "{text}"], "{text}"),
]


def expand(items: list[str], paths: dict[str, Path]) -> list[str]:
    return [item.format(**{k: str(v) for k, v in paths.items()}) for item in items]


def assert_one_error_line(err: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize(("script", "what", "extra", "expected"), CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_one_line_and_exit_2(bad, tmp_path, capsys, script, what, extra, expected):
    if script == "finetune_bigearthnet" and not BIGEARTHNET_DATA.is_dir():
        pytest.skip(f"real sample data {BIGEARTHNET_DATA} missing (not in a user's clone)")
    run, argv = SCRIPTS[script](bad, tmp_path / "out")
    if "--pretrained_weights" not in extra and script != "main_dino_mc":
        argv += ["--pretrained_weights", "none"]
    with pytest.raises(SystemExit) as stopped:
        run(argv + expand(extra, bad))
    assert stopped.value.code == 2
    assert_one_error_line(capsys.readouterr().err, expand([expected], bad)[0])


@pytest.mark.parametrize(
    ("run", "argv", "expected"),
    [
        (export_weights.run, ["{missing}", "{folder}/out.pth"], "error: checkpoint {missing} does not exist"),
        (export_weights.run, ["{folder}", "{empty}/out.pth"], "error: checkpoint {folder} is a folder"),
        (export_weights.run, ["{text}", "{empty}/out.pth"], "error: {text} is not a PyTorch checkpoint"),
        (export_weights.run, ["{truncated}", "{empty}/out.pth"], "error: cannot read checkpoint {truncated}"),
        (prepare_data.run, ["--data_path", "{missing}", "--output_path", "{folder}/s.zarr"], "{missing}"),
        (prepare_data.run, ["--data_path", "{empty}", "--output_path", "{folder}/s.zarr"], "{empty}"),
        (
            prepare_data.run,
            ["--data_path", "{seco}", "--output_path", "{folder}/s.zarr", "--workers", "0"],
            "--workers",
        ),
        (plot_log.run, ["{missing}"], "{missing}"),
        (plot_log.run, ["{text}"], "{text}, line 1: not a JSON log line"),
        (plot_log.run, ["{folder}"], "{folder}"),
    ],
    ids=lambda value: value.__module__ if callable(value) else None,
)
def test_tools_bad_input_is_one_line_and_exit_2(bad, capsys, run, argv, expected):
    with pytest.raises(SystemExit) as stopped:
        run(expand(argv, bad))
    assert stopped.value.code == 2
    assert_one_error_line(capsys.readouterr().err, expand([expected], bad)[0])
