"""utils.resolve_precision: the defaults (bf16 on a GPU with native bf16, fp32 elsewhere, fp16 only when asked),
--precision auto, a resumed run's precision, and the one-line warnings."""

from __future__ import annotations

import argparse

import pytest
import torch

import precision
import utils


def args_for(precision: str | None, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    utils.add_precision_args(parser)
    utils.add_backbone_args(parser)
    return parser.parse_args([*extra] if precision is None else ["--precision", precision, *extra])


@pytest.fixture
def gpu_bf16(monkeypatch):
    """Set ``gpu_bf16(True)`` for a GPU with native bf16 (Ampere or newer), False for an older one."""

    def native(value: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: value)

    return native


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_takes_bf16_only_where_native(monkeypatch, capsys, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert utils.resolve_precision(args_for("auto"), "cpu") == expected
    assert f"--precision auto: {expected} on this CPU" in capsys.readouterr().out


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_takes_bf16_where_native_else_fp32(monkeypatch, native, expected):
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert utils.resolve_precision(args_for("auto"), "cuda:0") == expected
    assert calls == [False]  # emulated bf16 (pre-Ampere GPUs) does not count


def test_bf16_on_cpu_without_native_bf16_warns_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert utils.resolve_precision(args_for("bf16"), "cpu") == "bf16"  # still runs: the user asked for it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --precision bf16 on a CPU without native bf16")
    assert "several times slower than fp32" in err[0]


def test_bf16_on_native_cpu_or_gpu_is_silent(monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert utils.resolve_precision(args_for("bf16"), "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert utils.resolve_precision(args_for("bf16"), "cuda") == "bf16"
    assert capsys.readouterr().err == ""


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    for avx512_bf16, amx, expected in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert utils.cpu_has_native_bf16() is expected


@pytest.mark.parametrize(("native", "on_gpu"), [(True, "bf16"), (False, "fp32")])
def test_default_is_bf16_on_a_gpu_with_native_bf16_else_fp32_and_never_fp16(monkeypatch, gpu_bf16, native, on_gpu):
    """DINO's default (--use_fp16 true: fp16 + GradScaler on CUDA) is no longer the default."""
    gpu_bf16(native)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert utils.resolve_precision(args_for(None), "cuda") == on_gpu
    assert utils.resolve_precision(args_for(None), "cpu") == "fp32"  # bf16 on a CPU only when asked


@pytest.mark.parametrize(("flag", "expected"), [("true", "fp16"), ("false", "fp32")])
def test_use_fp16_is_an_alias_recorded_in_args(gpu_bf16, flag, expected):
    gpu_bf16(True)
    args = args_for(None, "--use_fp16", flag)
    assert utils.resolve_precision(args, "cuda") == expected
    assert (args.precision, args.use_fp16) == (expected, expected == "fp16")  # what a checkpoint's args hold


@pytest.mark.parametrize("arch", ["vit_small", "deit_small"])
def test_fp16_with_a_patch_8_vit_warns_in_one_line(capsys, arch):
    assert utils.resolve_precision(args_for("fp16", "--arch", arch, "--patch_size", "8"), "cuda") == "fp16"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "warning: fp16 with a patch-8 ViT: DINO's authors advise against mixed precision when reducing the patch "
        "size (unstable training, NaN losses); bf16 (Ampere or newer GPUs) or fp32 is safer"
    ]


@pytest.mark.parametrize(("arch", "patch"), [("vit_small", "16"), ("resnet50", "8")])
def test_fp16_elsewhere_is_silent_on_a_gpu(capsys, arch, patch):
    assert utils.resolve_precision(args_for("fp16", "--arch", arch, "--patch_size", patch), "cuda") == "fp16"
    assert capsys.readouterr().err == ""


def test_fp16_on_a_cpu_runs_with_a_warning(capsys):
    """CPU fp16 autocast and torch.amp.GradScaler("cpu") work: the GPU's fp16 path can be tested on a CPU."""
    assert utils.resolve_precision(args_for("fp16", "--arch", "resnet18"), "cpu") == "fp16"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --precision fp16 on a CPU is emulated")


def write_checkpoint(path, precision: str | None, scaler: bool) -> object:
    checkpoint = {"args": {} if precision is None else {"precision": precision}}
    if scaler:
        checkpoint["fp16_scaler"] = torch.amp.GradScaler("cpu").state_dict()
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("saved", "scaler", "expected"),
    [("fp32", False, "fp32"), ("fp16", True, "fp16"), ("bf16", False, "bf16"), (None, True, "fp16")],
)
def test_resume_takes_the_checkpoints_precision(tmp_path, capsys, gpu_bf16, saved, scaler, expected):
    """A checkpoint trained on a CPU (fp32) resumes in fp32 on a GPU with native bf16, instead of being refused
    for want of the gradient scaler DINO's default fp16 wanted; older checkpoints: fp16 when they hold one."""
    gpu_bf16(True)
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pth", saved, scaler)
    assert utils.resolve_precision(args_for(None), "cuda", checkpoint) == expected
    assert capsys.readouterr().out == f"Resuming in {expected}, the precision {checkpoint} was trained in\n"


def test_resume_asked_for_another_precision_says_so_in_one_line(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pth", "fp16", True)
    assert utils.resolve_precision(args_for("fp32"), "cuda", checkpoint) == "fp32"
    assert capsys.readouterr().out == f"{checkpoint} was trained in fp16: resuming in fp32, as asked\n"
    assert utils.resolve_precision(args_for("fp16"), "cuda", checkpoint) == "fp16"
    assert capsys.readouterr().out == ""  # the same precision: nothing to say


def test_old_checkpoint_without_scaler_or_precision_takes_the_default(tmp_path, capsys, gpu_bf16):
    gpu_bf16(True)
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pth", None, False)
    assert utils.resolve_precision(args_for(None), "cuda", checkpoint) == "bf16"
    assert capsys.readouterr().out == ""


def test_precision_resolution_on_cpu():
    args = argparse.Namespace(precision=None, use_fp16=None)
    assert utils.resolve_precision(args, "cpu") == "fp32"
    args.precision = "bf16"
    assert utils.resolve_precision(args, "cpu") == "bf16"
    with utils.autocast("bf16", "cpu"):
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.bfloat16
    assert utils.make_grad_scaler("bf16", "cpu") is None
    assert isinstance(utils.make_grad_scaler("fp16", "cpu"), torch.amp.GradScaler)
