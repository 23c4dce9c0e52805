"""main_dino_mc.py end to end on CPU: every mode, multispectral, torchrun, resume, NaN stop, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_dino_mc
import prepare_data
from tests.tiny_runs import tiny_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seco_root(seco_demo) -> Path:
    return seco_demo(2, 3, seed=1)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["vit_tiny", "resnet18"])
@pytest.mark.parametrize("mode,n_teacher,n_crops", [("dino", 2, 10), ("mc", 2, 8), ("tp", 3, 9)])
def test_one_epoch_each_mode(seco_root, tmp_path, arch, mode, n_teacher, n_crops):
    main_dino_mc.run(tiny_args(seco_root, tmp_path, "--arch", arch, "--data_mode", mode))
    ckpt = torch.load(tmp_path / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and isinstance(ckpt["args"], dict)
    assert ckpt["args"]["global_crops_number"] == n_teacher
    assert ckpt["args"]["global_crops_number"] + ckpt["args"]["local_crops_number"] == n_crops
    assert set(ckpt) >= {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"}
    assert any(k.startswith("backbone.") for k in ckpt["teacher"]) and "head.last_layer.weight_g" in ckpt["teacher"]
    assert ckpt["dino_loss"]["center"].abs().sum() > 0  # the centre moved
    (log,) = read_log(tmp_path)
    assert log["epoch"] == 0 and 0 < log["train_loss"] < 20
    assert (tmp_path / "checkpoint0000.pth").is_file()


@pytest.fixture(scope="module")
def seco_store(seco_root, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("store") / "seco.zarr"
    prepare_data.run(["--data_path", str(seco_root), "--output_path", str(store), "--bands", "ALL"])
    return store


@pytest.mark.parametrize("mode, bands", [("mc", "RGB"), ("tp", "ALL"), ("dino", "B8,B5,B1")])
def test_the_store_trains_the_trees_teacher_bit_for_bit(seco_root, seco_store, tmp_path, mode, bands):
    """Each mode and a band set of each kind (RGB with its stretch, all 12, a subset with 20 m and 60 m bands):
    the store's images are the tree's (every band subset: tests/test_seco_store.py), so is the teacher."""
    teachers = []
    for source in (seco_root, seco_store):
        out = tmp_path / Path(source).name
        main_dino_mc.run(tiny_args(source, out, "--data_mode", mode, "--bands", bands, "--out_dim", "64"))
        teachers.append(torch.load(out / "checkpoint.pth")["teacher"])
    tree, store = teachers
    assert tree.keys() == store.keys()
    assert all(torch.equal(tree[k], store[k]) for k in tree)


@pytest.mark.parametrize("mode, bands", [("mc", "RGB"), ("tp", "ALL")])
def test_augmenting_on_the_device_trains_the_workers_teacher(seco_root, tmp_path, mode, bands):
    """--augment_on device: the same crops from the same seeds, so the same teacher (to float rounding)."""
    teachers = []
    for where in ("workers", "device"):
        flags = ("--data_mode", mode, "--bands", bands, "--out_dim", "64", "--augment_on", where)
        main_dino_mc.run(tiny_args(seco_root, tmp_path / where, *flags))
        teachers.append(torch.load(tmp_path / where / "checkpoint.pth")["teacher"])
    workers, device = teachers
    assert max((workers[k].float() - device[k].float()).abs().max().item() for k in workers) <= 1e-6


def test_shard_shuffle_trains_on_a_store_and_is_refused_on_a_tree(seco_root, seco_store, tmp_path, capsys):
    main_dino_mc.run(tiny_args(seco_store, tmp_path / "store", "--shard_shuffle", "true"))
    assert torch.load(tmp_path / "store" / "checkpoint.pth")["epoch"] == 1
    with pytest.raises(SystemExit) as exc:
        main_dino_mc.run(tiny_args(seco_root, tmp_path / "tree", "--shard_shuffle", "true"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--shard_shuffle needs a Zarr store (prepare_data.py)" in err


def test_multispectral_bands_and_small_crops(seco_root, tmp_path, monkeypatch):
    sizes = []
    original = main_dino_mc.train_one_epoch

    def record_sizes(*args, **kwargs):
        loader = args[4]
        sizes.extend(crop.shape[-1] for crop in next(iter(loader)))
        return original(*args, **kwargs)

    monkeypatch.setattr(main_dino_mc, "train_one_epoch", record_sizes)
    main_dino_mc.run(
        tiny_args(
            seco_root,
            tmp_path,
            "--bands",
            "B4,B3,B2,B8",
            "--local_crops_number",
            "2",
            "--global_crops_size",
            "112",
            "--size_crops",
            "96",
            "64",
            "48",
        )
    )
    assert sizes == [112, 112, 64, 48]
    ckpt = torch.load(tmp_path / "checkpoint.pth")
    assert ckpt["teacher"]["backbone.patch_embed.proj.weight"].shape[1] == 4
    assert ckpt["args"]["bands"] == "B4,B3,B2,B8"


def run_script(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, **kwargs)


def test_torchrun_two_processes_gloo(seco_root, tmp_path):
    proc = run_script(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "main_dino_mc.py",
            *tiny_args(seco_root, tmp_path, "--batch_size_per_gpu", "1", "--local_crops_number", "2"),
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed init (rank 0/2, gloo)" in proc.stdout
    ckpt = torch.load(tmp_path / "checkpoint.pth")
    assert ckpt["args"]["world_size"] == 2 and len(ckpt["rng_state"]) == 2
    assert all(k.startswith("module.") for k in ckpt["student"])  # saved from DDP, as published checkpoints
    assert len(read_log(tmp_path)) == 1


def test_kill_and_resume_gives_same_teacher(seco_root, tmp_path):
    # resnet18 for its BatchNorm buffers, which the resume must restore too; a small head for speed
    common = ["--epochs", "3", "--local_crops_number", "2", "--saveckp_freq", "0", "--arch", "resnet18"]
    common += ["--out_dim", "64"]
    common += ["--warmup_epochs", "0", "--lr", "0.05", "--momentum_teacher", "0.9"]  # a teacher that moves
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # Every run in a fresh process with the same thread count, so that only the resume can make a difference.
    # The uninterrupted run and the one to kill are independent: they run side by side (one thread each).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(output_dir: Path, **streams) -> subprocess.Popen:
        argv = [sys.executable, "main_dino_mc.py", *tiny_args(seco_root, output_dir, *common)]
        return subprocess.Popen(argv, cwd=REPO, env=env, text=True, **streams)

    uninterrupted = start(straight, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = start(resumed, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for line in proc.stdout:  # kill as soon as the second epoch starts: epoch 0 is checkpointed
        if line.startswith("Epoch: [1/3]"):
            proc.kill()
            break
    proc.wait()
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err[-3000:]
    assert torch.load(resumed / "checkpoint.pth")["epoch"] == 1
    assert run_script(["main_dino_mc.py", *tiny_args(seco_root, resumed, *common)], timeout=300).returncode == 0

    a = torch.load(straight / "checkpoint.pth")
    b = torch.load(resumed / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 3
    diff = max((a["teacher"][k].float() - b["teacher"][k].float()).abs().max().item() for k in a["teacher"])
    assert diff <= 1e-6
    assert [e["epoch"] for e in read_log(resumed)] == [0, 1, 2]


def test_non_finite_loss_stops_and_keeps_checkpoint(seco_root, tmp_path, monkeypatch, capsys):
    main_dino_mc.run(tiny_args(seco_root, tmp_path, "--local_crops_number", "2", "--epochs", "2"))
    before = (tmp_path / "checkpoint.pth").read_bytes()
    # Restart for the second epoch with a loss that turns into NaN.
    original = main_dino_mc.DINOLoss.forward

    def nan_loss(*args, **kwargs):
        loss, probs = original(*args, **kwargs)
        return loss * float("nan"), probs

    monkeypatch.setattr(main_dino_mc.DINOLoss, "forward", nan_loss)
    args = tiny_args(seco_root, tmp_path, "--local_crops_number", "2", "--epochs", "3")
    with pytest.raises(SystemExit) as exc:
        main_dino_mc.run(args)
    assert exc.value.code == 1
    assert "Loss is nan" in capsys.readouterr().out
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    assert len(read_log(tmp_path)) == 2


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--arch", "vit_giant", "--arch 'vit_giant' is not supported"),
        ("--patch_size", "12", "--patch_size 12: expected one of 8, 14, 16"),
        ("--arch", "timm/not_a_model", "timm has no model named 'not_a_model'"),
        ("--bands", "B4,B3,B13", "unknown Sentinel-2 band 'B13'"),
        ("--global_crops_number", "3", "--global_crops_number 3 does not fit --data_mode mc"),
        ("--local_crops_scale", "0.5 0.2", "--local_crops_scale"),
    ],
)
def test_bad_arguments_one_line_exit_2(seco_root, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exc:
        main_dino_mc.run(tiny_args(seco_root, tmp_path, flag, *value.split()))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "checkpoint.pth").exists()


def test_missing_and_empty_data_path(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main_dino_mc.run(tiny_args(tmp_path / "nope", tmp_path / "out"))
    assert exc.value.code == 2 and "nope" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main_dino_mc.run(tiny_args(tmp_path / "empty", tmp_path / "out"))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "empty" in err and len(err.splitlines()) == 1


def test_truncated_tif_is_named_in_one_line(seco_root, tmp_path):
    broken = tmp_path / "seco"
    subprocess.run(["cp", "-r", str(seco_root), str(broken)], check=True)
    victims = sorted(broken.glob("*/*/B3.tif"))  # every acquisition: whichever is drawn first is broken
    for victim in victims:
        victim.write_bytes(victim.read_bytes()[:300])
    proc = run_script(["main_dino_mc.py", *tiny_args(broken, tmp_path / "out")], timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert err[0].startswith("error: ") and any(str(v) in err[0] for v in victims)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lars"])
def test_every_optimizer_trains_through_the_end_of_the_frozen_last_layer(seco_root, tmp_path, optimizer):
    """Epoch 0 keeps the prototypes frozen (--freeze_last_layer 1), epoch 1 trains them: fused SGD used to fail
    on that first step ("expected Tensor ... but got NoneType"). The checkpoints load with plain torch.load."""
    main_dino_mc.run(
        tiny_args(seco_root, tmp_path, "--optimizer", optimizer, "--epochs", "2", "--saveckp_freq", "1")
        + ["--local_crops_number", "2", "--global_crops_size", "64", "--size_crops", "48", "32", "--lr", "0.05"]
    )
    first, last = torch.load(tmp_path / "checkpoint0000.pth"), torch.load(tmp_path / "checkpoint.pth")
    key = "head.last_layer.weight_v"
    assert torch.equal(first["student"][key], first["teacher"][key])  # frozen in epoch 0
    assert not torch.equal(last["student"][key], first["student"][key])  # trained in epoch 1
    assert last["epoch"] == 2 and all(isinstance(g["lr"], float) for g in last["optimizer"]["param_groups"])


def test_resume_in_another_precision_says_so_and_drops_the_scaler(seco_root, tmp_path, capsys):
    """A checkpoint written with a GradScaler (fp16) resumed by a run asked for fp32: one line says so, and the
    run goes on without a scaler (it used to stop with exit code 2)."""
    main_dino_mc.run(tiny_args(seco_root, tmp_path, "--local_crops_number", "2"))
    checkpoint = torch.load(tmp_path / "checkpoint.pth")
    checkpoint["fp16_scaler"] = torch.amp.GradScaler("cpu").state_dict()
    checkpoint["args"]["precision"] = "fp16"
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    capsys.readouterr()
    main_dino_mc.run(tiny_args(seco_root, tmp_path, "--local_crops_number", "2", "--epochs", "2"))
    out = capsys.readouterr().out
    assert f"{tmp_path / 'checkpoint.pth'} was trained in fp16: resuming in fp32, as asked\n" in out
    resumed = torch.load(tmp_path / "checkpoint.pth")
    assert resumed["epoch"] == 2 and "fp16_scaler" not in resumed and resumed["args"]["precision"] == "fp32"


class Started(Exception):
    """Raised by a stand-in for train_one_epoch once it has recorded the weights a run starts from."""


@pytest.fixture(scope="module")
def trained_run(seco_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    main_dino_mc.run(tiny_args(seco_root, out))
    checkpoint = torch.load(out / "checkpoint.pth")  # one step at warm-up's lr 0: make student and teacher differ
    checkpoint["student"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in checkpoint["student"].items()}
    torch.save(checkpoint, out / "checkpoint.pth")
    return out / "checkpoint.pth"


def start_weights(monkeypatch, argv: list[str]) -> tuple[dict, dict, int]:
    """The student's and teacher's weights (no DDP prefix) and the epoch a run starts training from."""
    seen = {}

    def record(student, teacher, *args, **kwargs):
        seen.update(student=student.state_dict(), teacher=teacher.state_dict(), epoch=args[7])
        raise Started

    monkeypatch.setattr(main_dino_mc, "train_one_epoch", record)
    with pytest.raises(Started):
        main_dino_mc.run(argv)
    return seen["student"], seen["teacher"], seen["epoch"]


def test_init_from_starts_a_new_run_from_the_checkpoints_student_and_teacher(
    seco_root, trained_run, tmp_path, monkeypatch
):
    checkpoint = torch.load(trained_run)
    student, teacher, epoch = start_weights(
        monkeypatch, tiny_args(seco_root, tmp_path, "--init_from", str(trained_run))
    )
    assert epoch == 0 and checkpoint["epoch"] == 1
    for name, state in (("student", student), ("teacher", teacher)):
        assert state.keys() == checkpoint[name].keys()
        assert all(torch.equal(state[k], checkpoint[name][k]) for k in state), name


def test_init_from_with_another_head_keeps_the_backbones_and_a_fresh_shared_head(
    seco_root, trained_run, tmp_path, monkeypatch
):
    checkpoint = torch.load(trained_run)
    argv = tiny_args(seco_root, tmp_path, "--init_from", str(trained_run))
    student, teacher, _ = start_weights(monkeypatch, argv + ["--out_dim", "128"])
    for name, state in (("student", student), ("teacher", teacher)):
        backbone = [k for k in state if k.startswith("backbone.")]
        assert all(torch.equal(state[k], checkpoint[name][k]) for k in backbone), name
    head = [k for k in student if k.startswith("head.")]
    assert all(torch.equal(student[k], teacher[k]) for k in head)  # the teacher starts as the student's copy


def test_init_from_rgb_weights_with_more_bands_and_with_another_arch(
    seco_root, trained_run, tmp_path, monkeypatch, capsys
):
    rgb = torch.load(trained_run)["student"]["backbone.patch_embed.proj.weight"]
    argv = tiny_args(seco_root, tmp_path / "ms", "--init_from", str(trained_run), "--bands", "B2,B8,B3,B4")
    student, _, _ = start_weights(monkeypatch, argv + ["--adapt_input", "rgb"])
    weight = student["backbone.patch_embed.proj.weight"]
    assert [torch.equal(weight[:, i], rgb[:, j]) for i, j in ((0, 2), (2, 1), (3, 0))] == [True] * 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main_dino_mc.run(
            tiny_args(seco_root, tmp_path / "small", "--init_from", str(trained_run), "--arch", "vit_small")
        )
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: --init_from {trained_run} does not fit this backbone")
