"""Checkpoints (checkpoints): atomic writes that survive a kill, strict resuming, the JSON writer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import utils


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
    repo = Path(utils.__file__).parent
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


def test_resume_starts_a_new_scaler_across_a_precision_change_and_refuses_another_model(tmp_path):
    path = tmp_path / "checkpoint.pth"
    utils.save_checkpoint({"model": torch.nn.Linear(2, 2, bias=False).state_dict()}, path)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert utils.restart_from_checkpoint(path, model=torch.nn.Linear(2, 2, bias=False), scaler=scaler)
    assert scaler.state_dict()["scale"] == 2.0**10  # the checkpoint had none: the new run's scaler is kept
    with pytest.raises(utils.ConfigError, match=r"does not fit this model \(1 missing \(first: bias\)\)"):
        utils.restart_from_checkpoint(path, model=torch.nn.Linear(2, 2), scaler=None)


def test_write_json_is_atomic_and_indented(tmp_path):
    path = tmp_path / "knn.json"
    utils.write_json(path, {"10": {"top1": 91.5}})
    utils.write_json(path, {"20": {"top1": 92.0}})
    assert json.loads(path.read_text()) == {"20": {"top1": 92.0}} and path.read_text().startswith("{\n  ")
    assert [p.name for p in tmp_path.iterdir()] == ["knn.json"]


def test_resume_into_a_model_of_other_shapes_is_one_config_line(tmp_path):
    """Same key names, other sizes (vit_small's checkpoint, a vit_base run): one line, not torch's list."""
    path = tmp_path / "checkpoint.pth"
    utils.save_checkpoint({"student": nn.Linear(3, 2).state_dict()}, path)
    with pytest.raises(utils.ConfigError) as caught:
        utils.restart_from_checkpoint(path, student=nn.Linear(4, 2))
    message = str(caught.value)
    assert "\n" not in message and "weight (checkpoint (2, 3), model (2, 4))" in message and "--arch" in message
