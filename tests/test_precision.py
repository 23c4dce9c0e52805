"""--precision auto and the warning for bf16 on a CPU without native bf16 (utils.resolve_precision)."""

from __future__ import annotations

import argparse

import pytest
import torch

import utils


def args_for(precision: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    utils.add_precision_args(parser)
    return parser.parse_args([] if precision is None else ["--precision", precision])


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_takes_bf16_only_where_native(monkeypatch, capsys, native, expected):
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: native)
    assert utils.resolve_precision(args_for("auto"), "cpu") == expected
    assert f"--precision auto: {expected} on this CPU" in capsys.readouterr().out


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_takes_bf16_where_native_else_fp16(monkeypatch, native, expected):
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert utils.resolve_precision(args_for("auto"), "cuda:0") == expected
    assert calls == [False]  # emulated bf16 (pre-Ampere GPUs) does not count


def test_bf16_on_cpu_without_native_bf16_warns_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)
    assert utils.resolve_precision(args_for("bf16"), "cpu") == "bf16"  # still runs: the user asked for it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --precision bf16 on a CPU without native bf16")
    assert "3x slower than fp32" in err[0]


def test_bf16_on_native_cpu_or_gpu_is_silent(monkeypatch, capsys):
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: True)
    assert utils.resolve_precision(args_for("bf16"), "cpu") == "bf16"
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)
    assert utils.resolve_precision(args_for("bf16"), "cuda") == "bf16"
    assert capsys.readouterr().err == ""


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    for avx512_bf16, amx, expected in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert utils.cpu_has_native_bf16() is expected


def test_default_is_still_dino_use_fp16():
    assert utils.resolve_precision(args_for(None), "cpu") == "fp32"
    assert utils.resolve_precision(args_for(None), "cuda") == "fp16"
