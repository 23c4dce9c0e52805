"""run_with_submitit.py against a real one-node SLURM cluster (tests/slurm/cluster.sh): real sbatch, srun, scancel.

The cluster is brought up once per session and torn down at the end. Its node declares two placeholder GPUs as
generic resources, so GPU job scripts are accepted; every task runs on the CPU with gloo. Without SLURM's
binaries (or without root, which slurmd needs) these tests are skipped with the reason; under CI (CI=true)
they fail instead, so CI always runs them. Waits are bounded but generous: other test runs share the machine.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eval_knn
import run_with_submitit
from datasets.demo import write_seco_demo
from tests.downstream_fixtures import write_eurosat_rgb

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "tests" / "slurm" / "cluster.sh"
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
CLUSTER_WAIT_S = 240
JOB_WAIT_S = 420
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
EPOCHS = 4  # enough for the preemption signal to land while the job trains (it is sent after epoch 0)
# A 2-task job on 8 locations: two iterations per epoch; small crops and head so that an epoch takes a second.
# On the CPU: the placeholder GPUs run nothing, and a job given GPUs stops when torch sees none.
PRETRAIN = [
    *("--arch", "vit_tiny", "--patch_size", "16", "--data_mode", "mc", "--batch_size_per_gpu", "2"),
    *("--out_dim", "256", "--precision", "fp32", "--seed", "0", "--local_crops_number", "2"),
    *("--global_crops_size", "64", "--size_crops", "48", "32", "--saveckp_freq", "0", "--num_workers", "0"),
    *("--device", "cpu"),
]
# The cluster's partition, with resources this machine has (the launcher's defaults ask for 10 CPUs a task)
SLURM = ["--partition", "debug", "--cpus_per_task", "1", "--mem_per_gpu", "1", "--timeout", "30"]


def slurm_unavailable() -> str:
    """Why the cluster cannot be brought up here, or ""."""
    missing = [name for name in SLURM_BINARIES if shutil.which(name) is None]
    if missing:
        packages = "apt-get install slurmctld slurmd slurm-client munge"
        return f"SLURM is not installed ({', '.join(missing)} missing: {packages})"
    if os.geteuid() != 0:
        return "the one-node SLURM cluster needs root (slurmd starts the jobs)"
    return ""


def free_port(count: int = 1) -> int:
    """A port that is free, and so are the ``count - 1`` after it (one slurmd port per node)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        try:
            with contextlib.ExitStack() as stack:
                for offset in range(1, count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue


@contextlib.contextmanager
def one_node_cluster(directory: Path, gpus: int, nodes: int = 1):
    """Bring up tests/slurm/cluster.sh in ``directory`` on free ports with ``gpus`` GPU generic resources (and
    ``nodes`` slurmd daemons on this host); yield its slurm.conf; down at the end. The first job id is random:
    a job's MASTER_PORT is derived from its id, so concurrent test sessions must not number their jobs alike."""
    env = {
        **os.environ,
        "SLURM_CTLD_PORT": str(free_port()),
        "SLURM_D_PORT": str(free_port(nodes)),
        "SLURM_FIRST_JOB_ID": str(random.randint(10_000, 60_000_000)),
        "SLURM_GPUS": str(gpus),
        "SLURM_NODES": str(nodes),
        "SLURM_WAIT_S": str(CLUSTER_WAIT_S // 2),
    }
    start = time.monotonic()
    try:
        up = subprocess.run(
            [CLUSTER_SCRIPT, "up", directory], env=env, capture_output=True, text=True, timeout=CLUSTER_WAIT_S
        )
        if up.returncode:
            pytest.fail(f"the SLURM cluster did not come up: {up.stderr.strip()}")
        conf = directory / "slurm.conf"
        seconds = time.monotonic() - start
        version = subprocess.run(
            ["scontrol", "--version"], env={**env, "SLURM_CONF": str(conf)}, capture_output=True, text=True, timeout=60
        ).stdout.strip()
        print(f"\nSLURM cluster ({version}, {nodes} node(s), {gpus} GPUs) up in {seconds:.1f} s: {up.stdout.strip()}")
        yield conf
    finally:
        down = subprocess.run(
            [CLUSTER_SCRIPT, "down", directory], capture_output=True, text=True, timeout=CLUSTER_WAIT_S
        )
    assert down.returncode == 0, down.stderr


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """The one-node cluster with two placeholder GPUs, SLURM_CONF exported for the tests and their jobs; skipped
    with the reason where SLURM cannot run, except under CI."""
    reason = slurm_unavailable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SLURM tests: {reason}")
        pytest.skip(reason)
    with pytest.MonkeyPatch.context() as monkeypatch, one_node_cluster(tmp_path_factory.mktemp("slurm"), 2) as conf:
        monkeypatch.setenv("SLURM_CONF", str(conf))
        yield conf


@pytest.fixture(scope="module")
def gpuless_cluster(slurm_cluster, tmp_path_factory):
    """A second cluster whose node has no GPU generic resources, as on a CPU-only cluster."""
    with one_node_cluster(tmp_path_factory.mktemp("slurm_gpuless"), 0) as conf:
        yield conf


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster, tmp_path_factory):
    """A cluster of two nodes on this host (two slurmd daemons, each with its own port, spool folder and log),
    without GPUs: multi-node jobs whose ranks talk through gloo over the loopback."""
    with one_node_cluster(tmp_path_factory.mktemp("slurm_two_nodes"), 0, nodes=2) as conf:
        yield conf


@pytest.fixture
def submit(slurm_cluster, monkeypatch):
    """Submit with the launcher from the repository (jobs import run_with_submitit to unpickle the Trainer), one
    intra-op thread per task; return the job id. Jobs still queued at the end are cancelled."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    jobs: list[str] = []

    def run(argv: list[str]) -> str:
        jobs.append(run_with_submitit.run(argv).job_id)
        return jobs[-1]

    yield run
    for job_id in jobs:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)


def scontrol_job(job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


def wait_until(condition, what: str, timeout_s: float = JOB_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def wait_for_end(job_id: str, job_dir: Path) -> dict[str, str]:
    """Wait until SLURM has finished the job for good (a requeued job passes through PENDING again)."""
    wait_until(lambda: scontrol_job(job_id).get("JobState") in FINAL_STATES, f"job {job_id} to end")
    job = scontrol_job(job_id)
    print(f"job {job_id}: {job['JobState']}, restarts {job['Restarts']}, exit code {job['ExitCode']}")
    return job


def task_log(job_dir: Path, job_id: str, task: int = 0, stream: str = "out") -> str:
    path = job_dir / job_id / f"{job_id}_{task}_log.{stream}"
    return path.read_text() if path.exists() else ""


def teacher(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["teacher"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def seco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seco")
    write_seco_demo(root, n_locations=8, n_acquisitions=2)
    return root


@pytest.fixture(scope="module")
def torchrun_reference(seco_root, tmp_path_factory) -> Path:
    """The same pretraining under torchrun --nproc_per_node 2 on the CPU: what every SLURM run must end with."""
    out = tmp_path_factory.mktemp("torchrun")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["main_dino_mc.py", *PRETRAIN, "--epochs", str(EPOCHS), "--data_path", str(seco_root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "--output_dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_WAIT_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "checkpoint.pth"


@pytest.fixture(scope="module")
def timeout_job(slurm_cluster, seco_root, tmp_path_factory) -> tuple[str, Path]:
    """A 1-task pretraining that outlasts --timeout 1 (minute) --max_timeouts 1: requeued once at its time limit,
    then stopped. It spends most of its two minutes waiting for SLURM's clock, so it is submitted by the first
    test, before anything else, and checked by the last test of this file, with the other jobs run meanwhile."""
    out = tmp_path_factory.mktemp("timeout") / "run"
    argv = ["--partition", "debug", "--cpus_per_task", "1", "--mem_per_gpu", "1", "--timeout", "1"]
    argv += ["--max_timeouts", "1", "--signal_delay_s", "5", "--ngpus", "0", *PRETRAIN, "--epochs", "100000"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(REPO)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        job_id = run_with_submitit.run(argv + data(seco_root, out)).job_id
    yield job_id, out
    subprocess.run(["scancel", job_id], capture_output=True, timeout=60)


def preempt_once_trained(job_id: str, out: Path) -> None:
    """scancel --signal=USR2 once the job has written a checkpoint (and so is past its start-up)."""

    def trained() -> bool:
        return (out / "checkpoint.pth").exists() or scontrol_job(job_id)["JobState"] in FINAL_STATES

    wait_until(trained, f"job {job_id}'s first checkpoint")
    state = scontrol_job(job_id)["JobState"]
    assert state == "RUNNING", (
        f"job {job_id} was {state} before it could be preempted: " + task_log(out, job_id, stream="err")[-3000:]
    )
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)


def test_two_task_gpu_job_equals_torchrun(submit, seco_root, timeout_job, torchrun_reference, tmp_path):
    """--ngpus 2 asks the node's GPU generic resources; the two tasks train with gloo to torchrun's weights.
    (timeout_job: started here, before the torchrun reference, see there.)"""
    out = tmp_path / "run"
    job_id = submit([*SLURM, "--ngpus", "2", *PRETRAIN, "--epochs", str(EPOCHS)] + data(seco_root, out))
    job = wait_for_end(job_id, out)
    assert job["JobState"] == "COMPLETED", task_log(out, job_id, stream="err")[-3000:]
    assert job.get("TresPerNode") == "gres:gpu:2"
    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == EPOCHS and checkpoint["args"]["world_size"] == 2
    difference = max_difference(checkpoint["teacher"], teacher(torchrun_reference))
    student = torch.load(torchrun_reference, map_location="cpu", weights_only=False)["student"]
    print(f"teacher vs torchrun: max |difference| {difference:.3g}")
    assert difference <= 1e-6
    assert max_difference(checkpoint["student"], student) <= 1e-6


def data(seco_root: Path, out: Path) -> list[str]:
    return ["--data_path", str(seco_root), "--output_dir", str(out)]


def test_preempted_cpu_job_requeues_and_ends_equal(submit, seco_root, torchrun_reference, tmp_path):
    """CPU-only 2-task job; scancel --signal=USR2 while it trains -> requeue -> resume -> torchrun's teacher.

    Only the final weights and the requeue are checked, not where the resume started, so that it holds for
    an epoch-level and for a mid-epoch resume alike.
    """
    out = tmp_path / "run"
    argv = [*SLURM, "--ngpus", "0", "--tasks_per_node", "2", *PRETRAIN, "--epochs", str(EPOCHS)]
    job_id = submit(argv + data(seco_root, out))
    assert "TresPerNode" not in scontrol_job(job_id)  # no GPU asked
    preempt_once_trained(job_id, out)
    job = wait_for_end(job_id, out)
    log = task_log(out, job_id)
    assert job["JobState"] == "COMPLETED", task_log(out, job_id, stream="err")[-3000:]
    assert job["Restarts"] == "1" and log.count("Requeued job") == 1, log[-3000:]
    print(re.findall(r".*(?:Requeued job|training from epoch).*", log))
    difference = max_difference(teacher(out / "checkpoint.pth"), teacher(torchrun_reference))
    print(f"teacher after requeue vs torchrun: max |difference| {difference:.3g}")
    assert difference <= 1e-6


def test_job_past_max_requeues_stops_instead_of_looping(submit, seco_root, tmp_path):
    """A preempted 2-task job with --max_requeues 0 is not requeued: one line from rank 0, and the job fails
    (srun ends rank 1 too)."""
    out = tmp_path / "run"
    argv = [*SLURM, "--max_requeues", "0", "--ngpus", "0", "--tasks_per_node", "2", *PRETRAIN, "--epochs", "100000"]
    job_id = submit(argv + data(seco_root, out))
    preempt_once_trained(job_id, out)
    job = wait_for_end(job_id, out)
    stop = [line for line in task_log(out, job_id, stream="err").splitlines() if line.startswith("error:")]
    print(stop)
    assert (job["JobState"], job["Restarts"]) == ("FAILED", "0")
    assert stop == [
        f"error: main_dino_mc: job not requeued: it was requeued 0 times already (--max_requeues 0). "
        f"Its last checkpoint in {out} is kept: submit again to continue"
    ]


def test_eval_knn_runs_as_a_cpu_job(submit, torchrun_reference, tmp_path):
    """--script eval_knn --ngpus 0: a one-task CPU job that writes the same knn.json and features as a plain run."""
    eurosat = tmp_path / "eurosat"
    write_eurosat_rgb(eurosat, {"AnnualCrop": 4, "Forest": 4, "River": 4}, size=32)
    common = ["--arch", "vit_tiny", "--patch_size", "16", "--resize_size", "32", "--crop_size", "32", "--nb_knn", "2"]
    common += ["--num_workers", "0", "--pretrained_weights", str(torchrun_reference), "--data_path", str(eurosat)]
    out = tmp_path / "job"
    job_id = submit(
        [*SLURM, "--script", "eval_knn", "--ngpus", "0", *common, "--output_dir", str(out)]
        + ["--dump_features", str(tmp_path / "job_features")]
    )
    eval_knn.run([*common, "--output_dir", str(tmp_path / "plain"), "--dump_features", str(tmp_path / "features")])
    job = wait_for_end(job_id, out)
    assert job["JobState"] == "COMPLETED", task_log(out, job_id, stream="err")[-3000:]
    assert "TresPerNode" not in job
    print((out / "knn.json").read_text())
    assert (out / "knn.json").read_text() == (tmp_path / "plain" / "knn.json").read_text()
    for name in eval_knn.FEATURE_FILES:
        job_features, features = torch.load(tmp_path / "job_features" / name), torch.load(tmp_path / "features" / name)
        assert torch.allclose(job_features.float(), features.float(), atol=1e-5), name


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--partition", "nosuch"],
            "error: sbatch refused the job: invalid partition specified: nosuch; Invalid partition name specified; "
            "change --partition nosuch",
        ),
        (
            ["--ngpus", "3"],
            "error: sbatch refused the job: Requested node configuration is not available; "
            "change --ngpus 3 or --cpus_per_task 1 or --mem_per_gpu 1",
        ),
        (
            ["--timeout", "120"],
            "error: sbatch refused the job: Requested time limit is invalid (missing or exceeds some limit); "
            "change --timeout 120 or --partition debug",
        ),
        (
            ["--partition", "acct", "--account", "nosuch"],
            "error: sbatch refused the job: Invalid account or account/partition combination specified; "
            "change --account nosuch or --partition acct",
        ),
        (
            ["--constraint", "a100"],
            "error: sbatch refused the job: Invalid feature specification; change --constraint a100",
        ),
        (
            ["--nodes", "2"],
            "error: sbatch refused the job: Node count specification invalid; change --nodes 2",
        ),
        (
            ["--ngpus", "0", "--mem_per_gpu", "100"],
            "error: sbatch refused the job: Memory specification can not be satisfied; Requested node configuration "
            "is not available; change --mem_per_gpu 100",
        ),
        (
            ["--ngpus", "0", "--tasks_per_node", "3", "--cpus_per_task", "4"],
            "error: sbatch refused the job: More processors requested than permitted; "
            "change --cpus_per_task 4 or --tasks_per_node 3",
        ),
    ],
)
def test_sbatch_refusal_is_one_line_exit_2(slurm_cluster, monkeypatch, capsys, seco_root, tmp_path, argv, message):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exc:
        run_with_submitit.run([*SLURM, *argv, *PRETRAIN] + data(seco_root, tmp_path / "run"))
    captured = capsys.readouterr()
    print(captured.err.strip())
    assert exc.value.code == 2
    assert captured.err.strip() == message and captured.out == ""


def test_requeue_racing_the_job_end_leaves_it_requeued(slurm_cluster, capsys):
    """requeue_job on a job SLURM is ending (COMPLETING), then again on the now requeued job ("Job is pending
    execution" from scontrol): both times the job is left requeued, and the second call is not an error."""
    sleeper = ["sbatch", "--parsable", "--output", "/dev/null", "--wrap", "trap '' TERM; sleep 30"]
    job_id = subprocess.run(sleeper, check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    try:
        wait_until(lambda: scontrol_job(job_id).get("JobState") == "RUNNING", f"job {job_id} to run")
        subprocess.run(["scancel", job_id], check=True, timeout=60)
        ending = scontrol_job(job_id)["JobState"]
        run_with_submitit.requeue_job(job_id, countdown=3)
        run_with_submitit.requeue_job(job_id, countdown=3)
        second = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        wait_until(lambda: scontrol_job(job_id).get("JobState") == "PENDING", f"job {job_id} back in the queue")
        job = scontrol_job(job_id)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
    out = capsys.readouterr().out
    with capsys.disabled():
        print(f"requeued while {ending}: {out.strip()!r}; a plain scontrol requeue then: {second.stderr.strip()!r}")
    assert second.returncode != 0  # what requeue_job takes as "already requeued"
    assert job["Restarts"] == "1"
    assert out.count(f"Requeued job {job_id} (3 remaining timeouts)") == 2


def test_gpus_asked_of_a_cluster_without_gpus_is_one_line(gpuless_cluster, monkeypatch, capsys, seco_root, tmp_path):
    """sbatch's gres refusal names --ngpus (which --ngpus 0 avoids), instead of a traceback."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("SLURM_CONF", str(gpuless_cluster))
    with pytest.raises(SystemExit) as exc:
        run_with_submitit.run([*SLURM, "--ngpus", "1", *PRETRAIN] + data(seco_root, tmp_path / "run"))
    captured = capsys.readouterr()
    print(captured.err.strip())
    assert exc.value.code == 2 and captured.out == ""
    assert captured.err == (
        "error: sbatch refused the job: Invalid generic resource (gres) specification; change --ngpus 1\n"
    )


TWO_NODES = [*SLURM, "--nodes", "2", "--ngpus", "0", "--tasks_per_node", "1", *PRETRAIN, "--epochs", str(EPOCHS)]


def task_process(job_id: str, rank: int) -> int:
    """The pid of rank ``rank``'s task process of a job, read from the processes' environments (all the
    cluster's nodes are this host)."""
    wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = set(environ.read_bytes().split(b"\0"))
            command = (environ.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if wanted <= variables and b"python" in command:
            return int(environ.parent.name)
    pytest.fail(f"no task process of rank {rank} of job {job_id}")


def test_two_node_job_requeued_resumes_on_both_nodes_to_the_two_task_teacher(
    submit, two_nodes, monkeypatch, seco_root, torchrun_reference, tmp_path
):
    """--nodes 2, one task per node: preempted with SIGUSR2 once trained, requeued, resumed on both nodes, and it
    ends with the teacher of the one-node two-task run."""
    monkeypatch.setenv("SLURM_CONF", str(two_nodes))
    out = tmp_path / "run"
    job_id = submit(TWO_NODES + data(seco_root, out))
    preempt_once_trained(job_id, out)
    job = wait_for_end(job_id, out)
    assert job["JobState"] == "COMPLETED", task_log(out, job_id, stream="err")[-3000:]
    assert job["NumNodes"] == "2" and job["Restarts"] == "1"
    starts = [int(e) for e in re.findall(r"Starting mc training from epoch (\d+)", task_log(out, job_id))]
    assert len(starts) == 2 and starts[0] == 0 < starts[1], starts
    assert task_log(out, job_id, task=1).count("distributed init (rank 1/2, gloo)") == 2  # node 2 ran twice
    difference = max_difference(teacher(out / "checkpoint.pth"), teacher(torchrun_reference))
    print(f"two-node teacher after a requeue vs torchrun --nproc_per_node 2: max |difference| {difference:.3g}")
    assert difference <= 1e-6


def test_rank_killed_on_node_2_ends_the_job_and_the_rerun_resumes(
    submit, two_nodes, monkeypatch, seco_root, torchrun_reference, tmp_path
):
    """SIGKILL to the task on node 2 once the job has a checkpoint: the job fails (no rank left waiting), rank 0
    on node 1 says why in one line, and the same command submitted again resumes and ends as the uninterrupted
    run would."""
    monkeypatch.setenv("SLURM_CONF", str(two_nodes))
    out = tmp_path / "run"
    job_id = submit(TWO_NODES + data(seco_root, out))
    wait_until(lambda: (out / "checkpoint.pth").exists(), f"job {job_id}'s first checkpoint")
    os.kill(task_process(job_id, 1), signal.SIGKILL)
    wait_until(lambda: scontrol_job(job_id).get("JobState") in FINAL_STATES, f"job {job_id} to end", timeout_s=120)
    err = task_log(out, job_id, stream="err")
    print([line for line in err.splitlines() if "error" in line])
    assert scontrol_job(job_id)["JobState"] == "FAILED"
    assert "error: another process of this job stopped (" in err or "task 1: Killed" in err, err[-3000:]
    rerun = submit(TWO_NODES + data(seco_root, out))
    job = wait_for_end(rerun, out)
    assert job["JobState"] == "COMPLETED", task_log(out, rerun, stream="err")[-3000:]
    starts = [int(e) for e in re.findall(r"Starting mc training from epoch (\d+)", task_log(out, rerun))]
    assert len(starts) == 1 and starts[0] > 0, starts
    assert max_difference(teacher(out / "checkpoint.pth"), teacher(torchrun_reference)) <= 1e-6


def test_srun_on_two_nodes_launches_main_dino_mc_directly(two_nodes, seco_root, torchrun_reference, tmp_path):
    """DINO's way: srun starts the script itself on each node, no submitit; SLURM's variables give the ranks."""
    out = tmp_path / "run"
    srun = ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "1", "--mem", "1000", "--time", "30"]
    command = [*srun, "--kill-on-bad-exit=1", sys.executable, "main_dino_mc.py", *PRETRAIN, "--epochs", str(EPOCHS)]
    env = {**os.environ, "SLURM_CONF": str(two_nodes), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command + data(seco_root, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_WAIT_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distributed init (rank 1/2, gloo)" in done.stdout
    assert max_difference(teacher(out / "checkpoint.pth"), teacher(torchrun_reference)) <= 1e-6


def test_torchrun_on_two_nodes_with_c10d_equals_two_processes_on_one(seco_root, torchrun_reference, tmp_path):
    """torchrun --nnodes 2 with c10d rendezvous, one agent per "node" (both on this host), one process each."""
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    agent += ["--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", f"dino{os.getpid()}"]
    command = [*agent, "main_dino_mc.py", *PRETRAIN, "--epochs", str(EPOCHS), *data(seco_root, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)
    ]
    logs = [agent.communicate(timeout=JOB_WAIT_S)[0].decode() for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert checkpoint["args"]["world_size"] == 2
    assert max_difference(checkpoint["teacher"], teacher(torchrun_reference)) <= 1e-6


def test_job_past_max_timeouts_stops_with_one_line(timeout_job):
    """--timeout 1 (minute) --max_timeouts 1: requeued once at its time limit, then it stops and says why.
    Last in this file: the other tests ran while the job waited for its time limits."""
    job_id, out = timeout_job
    job = wait_for_end(job_id, out)
    err = task_log(out, job_id, stream="err")
    stop = [line for line in err.splitlines() if line.startswith("error:")]
    print(stop)
    assert job["Restarts"] == "1" and job["JobState"] == "FAILED", err[-3000:]
    assert stop == [
        f"error: main_dino_mc: job not requeued: it reached --timeout 1 min more than --max_timeouts 1 times. "
        f"Its last checkpoint in {out} is kept: submit again to continue"
    ]
    starts = [int(e) for e in re.findall(r"Starting mc training from epoch (\d+)", task_log(out, job_id))]
    assert len(starts) == 2 and starts[0] == 0 < starts[1], starts  # the second run resumed
