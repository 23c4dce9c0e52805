"""How a process finds its rank and its device: plain ``srun`` (SLURM's variables, no submitit), torchrun, and
the CUDA device of each process, with ``torch.cuda`` mocked so that the CUDA paths run on any machine."""

from __future__ import annotations

import argparse
import builtins
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime
import utils
from datasets.demo import write_seco_demo

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARIABLES = (
    *("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"),
    *("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_ID"),
    *("SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", *utils.SLURM_GPU_VARIABLES),
)


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variable from the test's own environment (a test session may itself run under SLURM);
    ``print`` restored afterwards (init_distributed_mode silences it on ranks above 0)."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.setenv(name, "")  # recorded, so that what the test's code exports is undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setattr(builtins, "print", builtins.print)
    return monkeypatch


@pytest.fixture
def fake_gpus(clean_env):
    """``torch.cuda`` of a machine with N GPUs (set ``fake_gpus.count``); set_device calls are recorded, process
    group creation is a no-op, and the TF32 setting is put back afterwards."""
    calls = argparse.Namespace(count=2, set_device=[])
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: calls.count)
    clean_env.setattr(torch.cuda, "set_device", calls.set_device.append)
    clean_env.setattr(runtime.dist, "init_process_group", lambda **kwargs: None)
    clean_env.setattr(runtime.dist, "barrier", lambda: None)
    before = torch.backends.cuda.matmul.fp32_precision
    yield calls
    torch.backends.cuda.matmul.fp32_precision = before


def device_args(device: str = "auto") -> argparse.Namespace:
    return argparse.Namespace(device=device, dist_url="env://")


@pytest.mark.parametrize(
    "nodelist, host",
    [("node7", "node7"), ("gpu[003-010,012],cpu1", "gpu003"), ("a1,a2", "a1"), ("x-[9,11]", "x-9")],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert utils.first_slurm_host(nodelist) == host


def test_srun_task_variables_become_torchrun_ones(clean_env):
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_NTASKS_PER_NODE", "4")
    clean_env.setenv("SLURM_JOB_ID", "123456")
    clean_env.setenv("SLURM_JOB_NODELIST", "gpu[12-13]")
    assert utils.started_by_srun()
    utils.export_slurm_task_env()
    exported = {name: os.environ[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    assert exported == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert os.environ["MASTER_ADDR"] == "gpu12" and os.environ["MASTER_PORT"] == str(20000 + 123456 % 40000)
    assert not utils.started_by_srun()  # RANK is set now: a second call changes nothing


def test_srun_started_tasks_train_as_one_job_without_submitit(clean_env, tmp_path):
    """Two tasks with only the variables srun sets (no RANK, no submitit): one gloo job of world size 2."""
    seco = write_seco_demo(tmp_path / "seco", n_locations=2, n_acquisitions=2)
    out = tmp_path / "out"
    flags = ["--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "64", "--batch_size_per_gpu", "1"]
    flags += ["--epochs", "1", "--global_crops_size", "32", "--local_crops_number", "2", "--size_crops", "24", "16"]
    flags += ["--num_workers", "0", "--precision", "fp32", "--device", "cpu", "--data_path", str(seco)]
    port = utils.MASTER_PORTS[0] + os.getpid() % 20000  # a job id of its own: concurrent sessions differ
    tasks = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}
        env.update(SLURM_NTASKS="2", SLURM_JOB_ID=str(port - utils.MASTER_PORTS[0]), SLURM_JOB_NODELIST="localhost")
        command = [sys.executable, "main_dino_mc.py", *flags, "--output_dir", str(out)]
        tasks.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = [task.communicate(timeout=240)[0].decode() for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "distributed init (rank 0/2, gloo)" in logs[0]
    checkpoint = torch.load(out / "checkpoint.pth")
    assert checkpoint["args"]["world_size"] == 2 and len(checkpoint["rng_state"]) == 2


@pytest.mark.parametrize(
    "local_rank, local_world_size, visible, device",
    [(0, 2, 2, 0), (1, 2, 2, 1), (3, 4, 8, 3), (1, 2, 1, 0), (7, 8, 1, 0)],
)
def test_each_process_takes_its_own_gpu(fake_gpus, clean_env, local_rank, local_world_size, visible, device):
    """The local rank's GPU; a task that sees one GPU (srun --gpus-per-task) takes it, whatever its local rank."""
    fake_gpus.count = visible
    clean_env.setenv("RANK", str(local_rank))
    clean_env.setenv("WORLD_SIZE", str(local_world_size))
    clean_env.setenv("LOCAL_RANK", str(local_rank))
    clean_env.setenv("LOCAL_WORLD_SIZE", str(local_world_size))
    args = device_args()
    utils.init_distributed_mode(args)
    assert (args.device, args.gpu, fake_gpus.set_device) == (f"cuda:{device}", device, [device])
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_srun_task_without_local_world_size_takes_the_gpu_of_its_local_rank(fake_gpus, clean_env):
    fake_gpus.count = 4
    for name, value in (("SLURM_PROCID", "6"), ("SLURM_LOCALID", "2"), ("SLURM_NTASKS", "8"), ("SLURM_JOB_ID", "9")):
        clean_env.setenv(name, value)
    args = device_args()
    utils.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.device) == (6, 8, "cuda:2")


@pytest.mark.parametrize("local_rank", [0, 3])
def test_more_processes_than_gpus_stops_every_process_with_one_line(fake_gpus, clean_env, capsys, local_rank):
    """Every process of the node stops alike (rank 0 included), instead of ranks above the GPU count failing
    with "invalid device ordinal" while the others wait for them."""
    for name, value in (("RANK", local_rank), ("WORLD_SIZE", 4), ("LOCAL_RANK", local_rank), ("LOCAL_WORLD_SIZE", 4)):
        clean_env.setenv(name, str(value))
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(SystemExit) as exc:
        utils.init_distributed_mode(device_args())
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and fake_gpus.set_device == []
    assert err == [
        "error: 4 processes on this node but 2 visible GPUs (CUDA_VISIBLE_DEVICES=0,1): start one process per "
        "GPU (torchrun --nproc_per_node 2, srun --ntasks-per-node 2) or give each task its own GPU "
        "(srun --gpus-per-task 1)"
    ]


@pytest.fixture
def no_gpu(clean_env, tmp_path):
    """A node whose driver is 535.104.05 while torch sees no GPU (a torch build the driver is too old for)."""
    driver = tmp_path / "version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n")
    clean_env.setattr(runtime, "NVIDIA_DRIVER_FILE", driver)
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    clean_env.setattr(torch.version, "cuda", "13.0")
    return clean_env


@pytest.mark.parametrize(
    "device, gpus, reason",
    [
        ("cuda", None, "--device cuda was asked for"),
        ("auto", "0,1", "this SLURM job was given GPUs (SLURM_JOB_GPUS=0,1)"),
    ],
)
def test_gpus_asked_and_none_seen_is_one_line_naming_cuda_and_driver(no_gpu, capsys, device, gpus, reason):
    if gpus:
        no_gpu.setenv("SLURM_JOB_GPUS", gpus)
    with pytest.raises(SystemExit) as exc:
        utils.init_distributed_mode(device_args(device))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert err == [
        f"error: {reason}, but torch sees no CUDA device: torch {torch.__version__} built for CUDA 13.0, NVIDIA "
        "driver 535.104.05; install a torch build for this driver, or run with --device cpu"
    ]


def test_gpu_job_told_to_use_the_cpu_runs_there(no_gpu, capsys):
    no_gpu.setenv("SLURM_JOB_GPUS", "0")
    args = device_args("cpu")
    utils.init_distributed_mode(args)
    assert args.device == "cpu" and capsys.readouterr().err == ""


def test_auto_on_a_node_with_a_driver_torch_cannot_use_warns(no_gpu, capsys):
    args = device_args()
    utils.init_distributed_mode(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert args.device == "cpu"
    assert err == [
        f"warning: torch sees no CUDA device (torch {torch.__version__} built for CUDA 13.0, NVIDIA driver "
        "535.104.05): running on the CPU"
    ]
