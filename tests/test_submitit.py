"""run_with_submitit.py without SLURM: local multi-task jobs on CPU, requeue after the preemption signal, the
generated sbatch file, sbatch's refusals and scontrol's retries through stand-in binaries, pass-through.

The local executor runs the same Trainer, distributed set-up and requeue logic as processes on this machine;
tests/test_slurm.py runs the launcher against a real SLURM cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
import types
from pathlib import Path

import pytest
import submitit
import torch
from submitit.slurm.slurm import SlurmExecutor

import run_with_submitit
from datasets.demo import write_seco_demo

REPO = Path(__file__).resolve().parents[1]
EPOCHS_BEFORE_REQUEUE_TEST = 4


@pytest.fixture(scope="module")
def seco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seco")
    write_seco_demo(root, n_locations=4, n_acquisitions=3)
    return root


def tiny_run(seco_root: Path, output_dir: Path, *extra: str) -> list[str]:
    """Launcher flags for a local job of a tiny pretraining (2 tasks: one iteration per epoch on 4 locations;
    small crops and head so that an epoch takes a fraction of a second)."""
    return [
        *("--cluster", "local", "--timeout", "30"),
        *("--arch", "vit_tiny", "--patch_size", "16", "--data_mode", "mc", "--batch_size_per_gpu", "2"),
        *("--out_dim", "64", "--precision", "fp32", "--seed", "0", "--local_crops_number", "2"),
        *("--global_crops_size", "64", "--size_crops", "48", "32", "--device", "cpu"),
        *("--saveckp_freq", "0", "--data_path", str(seco_root), "--output_dir", str(output_dir)),
        *extra,
    ]


@pytest.fixture
def local_jobs(monkeypatch):
    """Submit local jobs from the repository (the tasks import run_with_submitit to unpickle the Trainer),
    one intra-op thread per task (two tasks share two cores); cancel what is still running at the end."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    jobs = []

    def submit(argv: list[str]):
        job = run_with_submitit.run(argv)
        jobs.append(job)
        return job

    yield submit
    for job in jobs:
        if not job.done():
            job.cancel()


def wait_for(condition, what: str, timeout_s: float = 240) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def read_log(output_dir: Path) -> list[dict]:
    path = output_dir / "log.txt"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (tasks and their DataLoader workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def test_two_task_cpu_only_local_job_trains_one_epoch(seco_root, tmp_path, local_jobs):
    out = tmp_path / "run"
    job = local_jobs(
        tiny_run(seco_root, out, "--ngpus", "0", "--tasks_per_node", "2", "--epochs", "1", "--num_workers", "0")
    )
    wait_for(job.done, "the local job")
    assert job.results() == [None, None]  # raises with the task's traceback if one failed
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False, map_location="cpu")
    assert checkpoint["epoch"] == 1
    assert checkpoint["args"]["world_size"] == 2 and checkpoint["args"]["distributed"]
    assert len(checkpoint["rng_state"]) == 2  # one RNG stream gathered from each rank
    assert [e["epoch"] for e in read_log(out)] == [0]
    assert (out / job.job_id / f"{job.job_id}_1_log.out").is_file()  # default --job_dir output_dir/%j


def test_preempted_job_checkpoints_requeues_and_finishes(seco_root, tmp_path, local_jobs):
    out = tmp_path / "run"
    epochs = EPOCHS_BEFORE_REQUEUE_TEST
    # a DataLoader worker per task, since SLURM signals every process of the job, workers included
    job = local_jobs(tiny_run(seco_root, out, "--ngpus", "2", "--epochs", str(epochs), "--num_workers", "1"))
    # the first epoch's checkpoint (written after its log line), so the requeued job has something to resume
    wait_for(lambda: (out / "checkpoint.pth").exists() or job.done(), "the first checkpoint")
    assert not job.done(), job.task(0).stderr()
    tasks = descendants(int(job.job_id))  # job_id is the local controller's pid; signal what runs below it
    assert len(tasks) >= 2
    for pid in tasks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR2)
    wait_for(job.done, "the requeued job")
    assert job.results() == [None, None]
    stdout = job.task(0).stdout()
    # requeued once, by the rank-0 task: not a second time by its DataLoader worker, which got the signal too;
    # the requeued run knows it was requeued (the count that --max_requeues limits)
    assert stdout.count("Requeued job") == 1
    assert stdout.count("requeued 0 times so far") == stdout.count("requeued 1 times so far") == 1
    starts = [int(e) for e in re.findall(r"Starting mc training from epoch (\d+)", stdout)]
    assert starts[0] == 0 and len(starts) == 2 and 1 <= starts[1] < epochs, starts
    assert [e["epoch"] for e in read_log(out)] == list(range(epochs))
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False, map_location="cpu")
    assert checkpoint["epoch"] == epochs


def sbatch_directives(text: str) -> dict[str, str]:
    lines = [line.removeprefix("#SBATCH --") for line in text.splitlines() if line.startswith("#SBATCH --")]
    return dict(line.split("=", 1) for line in lines if "=" in line)


def test_sbatch_file_holds_the_cluster_settings(monkeypatch, tmp_path):
    # generate the file the SLURM executor would submit, on a machine without srun
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    argv = [
        *("--nodes", "2", "--ngpus", "4", "--partition", "gpu", "--timeout", "2880", "--account", "proj"),
        *("--qos", "high", "--constraint", "a100", "--comment", "dino-mc run", "--mail", "me@example.org"),
        *("--mem_per_gpu", "32", "--cpus_per_task", "8", "--signal_delay_s", "180"),
        *("--arch", "vit_small", "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "mc")),
    ]
    args = run_with_submitit.parse_args(argv)
    executor = run_with_submitit.build_executor(args)._executor
    text = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    directives = sbatch_directives(text)
    expected = {
        "nodes": "2",
        "gpus-per-node": "4",
        "ntasks-per-node": "4",
        "partition": "gpu",
        "time": "2880",
        "signal": "USR2@180",
        "cpus-per-task": "8",
        "mem": "128GB",
        "account": "proj",
        "qos": "high",
        "constraint": "a100",
        "comment": "'dino-mc run'",
        "mail-user": "me@example.org",
        "mail-type": "END,FAIL",
        "job-name": "main_dino_mc",
        "output": f"{tmp_path}/mc/%j/%j_0_log.out",
    }
    assert {k: directives.get(k) for k in expected} == expected
    assert re.search(r"^srun --unbuffered .* -u -m submitit.core._submit ", text, re.MULTILINE)


def fake_script(seen: dict) -> types.ModuleType:
    """A stand-in script module that records what it was handed."""
    module = types.ModuleType("finetune_oscd")

    def get_args_parser():
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--lr", type=float, default=0.1)
        parser.add_argument("--batch_size", type=int, default=8)
        parser.add_argument("--time", type=int, default=0)  # a prefix of the launcher's --timeout
        parser.add_argument("--output_dir", default=".")
        return parser

    def main(args):
        args.rank = 0  # scripts write run-time state into their namespace
        seen["args"] = args

    module.get_args_parser, module.main = get_args_parser, main
    return module


def test_script_flags_pass_through(monkeypatch, tmp_path):
    seen: dict = {}
    monkeypatch.setitem(sys.modules, "finetune_oscd", fake_script(seen))
    argv = ["--cluster", "debug", "--script", "finetune_oscd", "--timeout", "5", "--lr", "0.5", "--time", "7"]
    job = run_with_submitit.run([*argv, "--output_dir", str(tmp_path)])
    args = seen["args"]
    assert (args.lr, args.batch_size, args.time, args.output_dir) == (0.5, 8, 7, str(tmp_path))
    assert not hasattr(args, "cluster") and not hasattr(args, "timeout")
    assert not hasattr(job.submission().function.args, "rank")  # the requeued job gets the pristine arguments


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cluster", "local", "--nodes", "2"], "error: --cluster local runs on this machine only: use --nodes 1"),
        (["--cluster", "debug", "--ngpus", "2"], "error: --cluster debug runs one task in this process"),
        (["--cluster", "local", "--ngpus", "-1"], "error: --ngpus must be 0 (CPU only) or a positive number, got -1"),
        (["--ngpus", "2", "--tasks_per_node", "4"], "error: --tasks_per_node 4: a GPU job runs one task per GPU"),
        (["--ngpus", "0", "--tasks_per_node", "0"], "error: --tasks_per_node must be a positive number, got 0"),
        (["--ngpus", "0", "--device", "cuda"], "error: --device cuda: a --ngpus 0 job gets no GPU"),
        (["--cluster", "debug", "--ngpus", "0", "--tasks_per_node", "2"], "error: --cluster debug runs one task"),
        (["--max_requeues", "-1"], "error: --max_requeues must be 0 or more, got -1"),
        (["--script", "finetune_oscd"], "error: --script finetune_oscd: there is no finetune_oscd.py in"),
        (["--cluster", "slurm"], "error: --cluster slurm: srun is not on PATH here; submit from a SLURM login node"),
    ],
)
def test_bad_launcher_settings_one_line_exit_2(monkeypatch, capsys, tmp_path, argv, message):
    monkeypatch.setitem(sys.modules, "finetune_oscd", None)  # an import that fails, whatever is on disk
    monkeypatch.setattr(run_with_submitit.shutil, "which", lambda name: None)  # a machine without SLURM
    with pytest.raises(SystemExit) as exc:
        run_with_submitit.run([*argv, "--output_dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


def test_unknown_script_flag_is_rejected_before_submission(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        run_with_submitit.run(["--cluster", "debug", "--no_such_flag", "1", "--output_dir", str(tmp_path)])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no_such_flag 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cpu_only_sbatch_file_asks_no_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    argv = ["--ngpus", "0", "--tasks_per_node", "3", "--mem_per_gpu", "4", "--partition", "cpu"]
    args = run_with_submitit.parse_args([*argv, "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "mc")])
    executor = run_with_submitit.build_executor(args)._executor
    text = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    directives = sbatch_directives(text)
    assert (directives["ntasks-per-node"], directives["mem"], directives["partition"]) == ("3", "12GB", "cpu")
    assert not re.search(r"gpu|gres", "\n".join(line for line in text.splitlines() if line.startswith("#SBATCH")))
    assert re.search(r"^srun .*--kill-on-bad-exit=1 ", text, re.MULTILINE)  # a failed task ends the job


def fake_binary(folder: Path, name: str, script: str) -> None:
    """A stand-in for a SLURM command: a shell script on PATH."""
    path = folder / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


@pytest.mark.parametrize(
    "stderr, message",
    [
        (
            "sbatch: error: Invalid generic resource (gres) specification",
            "error: sbatch refused the job: Invalid generic resource (gres) specification; change --ngpus 2",
        ),
        (
            "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
            "error: sbatch failed: Unable to contact slurm controller (connect failure)",
        ),
    ],
)
def test_sbatch_failure_is_one_line_exit_2(monkeypatch, capsys, tmp_path, stderr, message):
    """sbatch's stderr (which submitit also echoes) becomes one line with the flag to change; nothing is left
    queued. A cluster without GPU generic resources refuses --ngpus this way."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_binary(bin_dir, "srun", "exit 0")
    fake_binary(bin_dir, "sbatch", f"echo '{stderr}' >&2; exit 1")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    with pytest.raises(SystemExit) as exc:
        run_with_submitit.run(["--ngpus", "2", "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "mc")])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == message and captured.out == ""


@pytest.fixture
def fake_scontrol(monkeypatch, tmp_path):
    """scontrol that fails ``requeue`` the first ``failures`` times with ``error``, and reports ``state``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(run_with_submitit, "REQUEUE_RETRY_S", 0.01)
    calls = tmp_path / "calls"

    def install(failures: int, error: str, state: str = "RUNNING") -> Path:
        fake_binary(
            bin_dir,
            "scontrol",
            f'if [ "$1" = show ]; then echo "JobId=$4 JobState={state} Restarts=0"; exit 0; fi\n'
            f'echo "$@" >> {calls}\n'
            f'[ "$(wc -l < {calls})" -gt {failures} ] && exit 0\n'
            f'echo "{error}" >&2; exit 1',
        )
        return calls

    return install


def test_requeue_is_retried_while_slurm_is_busy(fake_scontrol, capsys):
    calls = fake_scontrol(2, "Job can not be altered now, try again later for job 7")
    run_with_submitit.requeue_job("7", countdown=2)
    assert calls.read_text().splitlines() == ["requeue 7"] * 3
    assert capsys.readouterr().out == "Requeued job 7 (2 remaining timeouts)\n"


@pytest.mark.parametrize("error, state", [("Job is pending execution for job 7", "RUNNING"), ("timeout", "PENDING")])
def test_requeue_already_done_is_not_retried(fake_scontrol, capsys, error, state):
    """A job already back in the queue (another requeue won the race) is requeued: no retry, no error."""
    calls = fake_scontrol(10, error, state)
    run_with_submitit.requeue_job("7", countdown=0)
    assert calls.read_text().splitlines() == ["requeue 7"]
    assert capsys.readouterr().out == "Requeued job 7 (0 remaining timeouts)\n"


def test_requeue_that_keeps_failing_is_one_line(fake_scontrol, capsys):
    calls = fake_scontrol(100, "Invalid job id specified for job 7")
    with pytest.raises(SystemExit) as exc:
        run_with_submitit.requeue_job("7", countdown=1)
    assert exc.value.code == 1
    assert len(calls.read_text().splitlines()) == run_with_submitit.REQUEUE_ATTEMPTS
    err = capsys.readouterr().err
    assert err == (
        f"error: could not requeue job 7 after {run_with_submitit.REQUEUE_ATTEMPTS} tries (scontrol: Invalid job id "
        "specified for job 7); submit the same command again to continue from its last checkpoint\n"
    )


@pytest.mark.parametrize(
    "requeues, reason, expected",
    [
        (
            3,
            "Job not requeued because: timed-out too many times.",
            "it reached --timeout 60 min more than --max_timeouts 2 times",
        ),
        (
            5,
            "Job not requeued because: checkpoint function returned None.",
            "it was requeued 5 times already (--max_requeues 5)",
        ),
    ],
)
def test_job_past_its_limits_stops_in_one_line(monkeypatch, capsys, tmp_path, requeues, reason, expected):
    """Past --max_requeues the Trainer gives no submission to requeue; when submitit then declines (or the
    timeouts ran out) the signal handler ends the task with one line instead of a traceback."""
    launch = argparse.Namespace(ngpus=0, timeout=60, max_timeouts=2, max_requeues=5)
    trainer = run_with_submitit.Trainer("main_dino_mc", argparse.Namespace(output_dir=str(tmp_path)), launch, requeues)
    assert (trainer.checkpoint() is None) == (requeues >= 5)

    def submitit_handler(signum, frame):
        raise submitit.core.utils.UncompletedJobError(reason)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        run_with_submitit.handle_requeue_signal(trainer)
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(1)  # the handler runs at the next bytecode boundary
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert exc.value.code == 1
    assert capsys.readouterr().err == (
        f"error: main_dino_mc: job not requeued: {expected}. Its last checkpoint in {tmp_path} is kept: submit "
        "again to continue\n"
    )
