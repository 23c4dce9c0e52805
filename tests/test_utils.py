"""Schedules, gradient clipping, backbone builder, precision and atomic checkpoints in utils."""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import utils


def test_cosine_scheduler_values():
    sched = utils.cosine_scheduler(1.0, 0.1, epochs=3, niter_per_ep=4, warmup_epochs=1, start_warmup_value=0.0)
    assert len(sched) == 12
    np.testing.assert_allclose(sched[:4], np.linspace(0, 1, 4))
    rest = np.arange(8)
    np.testing.assert_allclose(sched[4:], 0.1 + 0.45 * (1 + np.cos(np.pi * rest / 8)))
    assert sched[4] == pytest.approx(1.0) and sched[-1] > 0.1


def test_cosine_scheduler_without_warmup():
    sched = utils.cosine_scheduler(0.996, 1.0, epochs=2, niter_per_ep=5)
    assert sched[0] == pytest.approx(0.996) and np.all(np.diff(sched) > 0) and sched[-1] < 1.0


def test_clip_gradients_is_per_parameter():
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False))
    model[0].weight.grad = torch.full((2, 3), 10.0)  # norm 24.49 -> clipped to 3
    model[1].weight.grad = torch.tensor([[0.3, 0.4]])  # norm 0.5 -> unchanged
    norms = utils.clip_gradients(model, 3.0)
    assert [float(n) for n in norms] == pytest.approx([math.sqrt(600), 0.5])
    assert model[0].weight.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(model[1].weight.grad, torch.tensor([[0.3, 0.4]]))


def test_params_groups_exclude_biases_and_norms():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    decayed, not_decayed = utils.get_params_groups(model)
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 3])]
    assert len(not_decayed["params"]) == 3 and not_decayed["weight_decay"] == 0.0


@pytest.mark.parametrize("arch,dim", [("vit_tiny", 192), ("resnet18", 512), ("swin_t", 768), ("timm/resnet18", 512)])
def test_build_backbone_any_in_chans(arch, dim):
    model, feat_dim = utils.build_backbone(arch, patch_size=16, in_chans=12)
    assert feat_dim == dim
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 12, 64, 64)).shape == (2, dim)


def test_build_backbone_rejects_unknown_arch():
    with pytest.raises(ValueError, match="--arch 'vit_huge'"):
        utils.build_backbone("vit_huge")
    with pytest.raises(ValueError, match="timm has no model"):
        utils.build_backbone("timm/not_a_model")


def test_multicrop_wrapper_groups_by_size_and_keeps_order():
    calls = []

    class Recorder(nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

    wrapper = utils.MultiCropWrapper(Recorder(), nn.Identity())
    crops = [torch.full((2, 3, s, s), float(i)) for i, s in enumerate([8, 8, 6, 4])]
    out = wrapper(crops)
    assert calls == [(4, 3, 8, 8), (2, 3, 6, 6), (2, 3, 4, 4)]
    assert out[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_precision_resolution_on_cpu():
    args = argparse.Namespace(precision=None, use_fp16=None)
    assert utils.resolve_precision(args, "cpu") == "fp32"
    args.precision = "bf16"
    assert utils.resolve_precision(args, "cpu") == "bf16"
    with utils.autocast("bf16", "cpu"):
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.bfloat16
    assert utils.make_grad_scaler("bf16", "cpu") is None
    assert isinstance(utils.make_grad_scaler("fp16", "cpu"), torch.amp.GradScaler)


def test_save_checkpoint_is_atomic_and_leaves_no_temp(tmp_path):
    path = tmp_path / "checkpoint.pth"
    utils.save_checkpoint({"epoch": 1}, path)
    utils.save_checkpoint({"epoch": 2}, path)
    assert torch.load(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


KILL_WRITER = """
import time, torch
import utils
orig_save = torch.save
def slow_save(obj, f):
    f.write(b"partial bytes of a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = slow_save
utils.save_checkpoint({{"epoch": 99}}, {path!r})
"""


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    path = tmp_path / "checkpoint.pth"
    utils.save_checkpoint({"epoch": 1, "weights": torch.arange(10)}, path)
    code = KILL_WRITER.format(path=str(path))
    repo = utils.Path(utils.__file__).parent
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=repo, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # the write is under way
    time.sleep(0.2)
    proc.kill()
    proc.wait()
    state = torch.load(path)
    assert state["epoch"] == 1 and state["weights"].tolist() == list(range(10))


def test_restart_from_checkpoint_roundtrip_and_prefix(tmp_path):
    model = nn.Linear(3, 2)
    utils.save_checkpoint(
        {"student": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 4}, tmp_path / "ck.pth"
    )
    other = nn.Linear(3, 2)
    run_vars = {"epoch": 0}
    assert utils.restart_from_checkpoint(tmp_path / "ck.pth", run_variables=run_vars, student=other)
    assert run_vars["epoch"] == 4
    torch.testing.assert_close(other.weight, model.weight)
    assert not utils.restart_from_checkpoint(tmp_path / "missing.pth", student=other)
    with pytest.raises(RuntimeError):
        utils.restart_from_checkpoint(tmp_path / "ck.pth", student=nn.Linear(4, 2))


def test_one_line_strips_worker_traceback():
    err = ValueError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        "last):\n  File x\ndatasets.DataError: cannot read raster /a/B2.tif: truncated\n"
    )
    assert utils.one_line(err) == "cannot read raster /a/B2.tif: truncated"


def test_cosine_scheduler_warmup_longer_than_run_is_cut():
    sched = utils.cosine_scheduler(1.0, 0.0, epochs=1, niter_per_ep=5, warmup_epochs=10)
    np.testing.assert_allclose(sched, np.linspace(0, 1, 5))


def test_trim_json_log_drops_epochs_without_checkpoint(tmp_path):
    log = tmp_path / "log.txt"
    for epoch in range(4):
        utils.append_json_log(log, {"epoch": epoch, "train_loss": 1.0 / (epoch + 1)})
    utils.trim_json_log(log, next_epoch=2)
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [0, 1]
    utils.trim_json_log(tmp_path / "missing.txt", 0)  # nothing to trim is fine


_REFAULT_SCRIPT = """
import resource, sys, torch
import utils
if sys.argv[1] == "keep":
    assert utils.keep_freed_memory()
def step():  # a training step in miniature: large buffers written, used, freed
    a = torch.ones(16 * 2**20)
    b = torch.ones(4 * 2**20)
    c = a[: 2**20] + b[: 2**20]
    del a, b, c
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")
def test_keep_freed_memory_stops_page_faulting_reused_buffers():
    # one process per mode (page faults are counted per process), both started at once
    procs = {
        mode: subprocess.Popen(
            [sys.executable, "-c", _REFAULT_SCRIPT, mode],
            cwd=Path(utils.__file__).parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in ("default", "keep")
    }
    page_faults_of_ten_steps = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        page_faults_of_ten_steps[mode] = int(out.strip())
    assert page_faults_of_ten_steps["default"] > 10 * 16_384  # the 64 MB buffer is mapped in anew every step
    assert page_faults_of_ten_steps["keep"] < 2 * 16_384


def test_fused_sgd_through_a_frozen_parameter_equals_torchs_plain_sgd():
    """A parameter without gradients for the first steps (DINO's frozen prototypes), then with: the fused SGD
    (its momentum buffers started at zero) follows the plain per-tensor SGD exactly."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
        groups = utils.get_params_groups(model)
        if fused:
            optimizer = utils.build_optimizer("sgd", groups)
        else:
            optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9, foreach=False)
        for step in range(4):
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = 0.1
                if i == 0:  # the regularised group, as main_dino_mc schedules it
                    group["weight_decay"] = 0.04
            model(torch.randn(5, 4)).square().sum().backward()
            if step < 2:
                model[1].weight.grad = None  # frozen, as cancel_gradients_last_layer does
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results.append([p.detach().clone() for p in model.parameters()])
    for fused_param, plain_param in zip(*results, strict=True):
        torch.testing.assert_close(fused_param, plain_param)


def test_resume_starts_a_new_scaler_across_a_precision_change_and_refuses_another_model(tmp_path):
    path = tmp_path / "checkpoint.pth"
    utils.save_checkpoint({"model": torch.nn.Linear(2, 2, bias=False).state_dict()}, path)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert utils.restart_from_checkpoint(path, model=torch.nn.Linear(2, 2, bias=False), scaler=scaler)
    assert scaler.state_dict()["scale"] == 2.0**10  # the checkpoint had none: the new run's scaler is kept
    with pytest.raises(utils.ConfigError, match=r"does not fit this model \(1 missing \(first: bias\)\)"):
        utils.restart_from_checkpoint(path, model=torch.nn.Linear(2, 2), scaler=None)


@pytest.mark.parametrize("outcome", ["finished", "config_error"])
def test_run_cli_destroys_the_process_group_on_the_way_out(tmp_path, outcome):
    # Left to interpreter shutdown, a Gloo process group can abort a finished run with SIGABRT.
    def main(args):
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        if outcome == "config_error":
            raise utils.ConfigError("--flag: bad")

    try:
        if outcome == "config_error":
            with pytest.raises(SystemExit) as stopped:
                utils.run_cli("test", lambda: argparse.ArgumentParser(add_help=False), main, [])
            assert stopped.value.code == 2
        else:
            utils.run_cli("test", lambda: argparse.ArgumentParser(add_help=False), main, [])
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
