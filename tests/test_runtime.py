"""The process a script runs in (runtime): memory tuning, the main wrapper, worker defaults, --help."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval_knn
import runtime
import utils

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


def test_default_workers_never_exceed_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
    assert runtime.default_workers(10) == 2 and runtime.default_workers(1) == 1
    assert 1 <= runtime.usable_cpus() <= (os.cpu_count() or 1)


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as stopped:
        eval_knn.run(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert stopped.value.code == 0
    assert "(default: 0.07)" in out and "(default: teacher)" in out and "(default: [10, 20, 100, 200])" in out
