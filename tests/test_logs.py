"""The JSON log (logs): trimmed to the epochs a checkpoint holds."""

from __future__ import annotations

import json

import utils


def test_trim_json_log_drops_epochs_without_checkpoint(tmp_path):
    log = tmp_path / "log.txt"
    for epoch in range(4):
        utils.append_json_log(log, {"epoch": epoch, "train_loss": 1.0 / (epoch + 1)})
    utils.trim_json_log(log, next_epoch=2)
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [0, 1]
    utils.trim_json_log(tmp_path / "missing.txt", 0)  # nothing to trim is fine
