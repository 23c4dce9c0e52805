"""Long multi-process runs: exact resume with loader workers, preemption mid-epoch, no hangs, kill-safe writers.

The multi-process tests start real gloo process groups (two ranks, each its own process) so that a rank that
leaves early, or waits for one that left, shows up as it would on a cluster.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

import checkpoints
import main_dino_mc
import preemption
import prepare_data
import pretrained
import runtime
import utils
from datasets import pretraining
from tests.engine_toy import make_args, train_toy
from tests.processes import child_env, killed_at_rename, run_script

REPO = Path(__file__).resolve().parents[1]
ITERS_PER_EPOCH = 4  # 8 locations, batch 2, one process


@pytest.fixture(scope="module")
def seco_root(seco_demo) -> Path:
    return seco_demo(8, 2, seed=2)


@pytest.fixture(scope="module")
def seco_store(seco_root, tmp_path_factory) -> Path:
    """The same locations in a Zarr store of several shards (prepare_data.py)."""
    store = tmp_path_factory.mktemp("store") / "seco.zarr"
    prepare_data.run(["--data_path", str(seco_root), "--output_path", str(store), "--shard_size", "5"])
    return store


def tiny_args(data_path: Path, output_dir: Path, *extra: str) -> list[str]:
    """A ViT whose student uses drop-path (the main process's RNG) and whose teacher moves fast."""
    return [
        *("--arch", "vit_tiny", "--patch_size", "16", "--data_mode", "mc", "--out_dim", "64"),
        *("--data_path", str(data_path), "--output_dir", str(output_dir), "--epochs", "2"),
        *("--batch_size_per_gpu", "2", "--global_crops_size", "32", "--local_crops_number", "2"),
        *("--size_crops", "24", "16", "--precision", "fp32", "--device", "cpu", "--seed", "0"),
        *("--warmup_epochs", "0", "--momentum_teacher", "0.9", "--saveckp_freq", "0", "--print_freq", "1"),
        *("--num_workers", "0"),
        *extra,
    ]


def max_teacher_diff(a: Path, b: Path) -> float:
    ta, tb = torch.load(a / "checkpoint.pth")["teacher"], torch.load(b / "checkpoint.pth")["teacher"]
    assert ta.keys() == tb.keys()
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(code_args: list[str], world_size: int = 2) -> list[subprocess.Popen]:
    """``world_size`` processes of one gloo job on this machine (the variables torchrun would set).

    Only rank 0's stdout is a pipe (tests follow its log line by line); every other stream goes to a file, so that
    a rank that writes a lot (a traceback per loader worker) never blocks on a full pipe that nobody reads."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = child_env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        stdout = subprocess.PIPE if rank == 0 else tempfile.TemporaryFile("w+")
        stderr = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(
            [sys.executable, *code_args], cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True
        )
        proc.spools = {"stdout": stdout, "stderr": stderr}
        procs.append(proc)
    return procs


def read_spool(spool) -> str:
    """Everything a finished process wrote to the temporary file ``spool``."""
    spool.seek(0)
    return spool.read()


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    """Return code, stdout and stderr of every process; a process still running after ``timeout`` (a hang) is
    killed and fails the test."""
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)  # reads rank 0's stdout pipe, waits for the others
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a rank was still waiting after the others stopped (hang)")
        results.append(
            (
                proc.returncode,
                read_spool(proc.spools["stdout"]) if out is None else out,
                read_spool(proc.spools["stderr"]),
            )
        )
    return results


# ============================================================================ seeds and the data stream


def test_process_seeds_never_coincide_across_ranks_and_epochs(monkeypatch):
    """seed + epoch + rank gave rank 1 at epoch 0 the stream of rank 0 at epoch 1; derived seeds never coincide."""
    draws = {}
    for rank in range(4):
        monkeypatch.setattr(runtime, "get_rank", lambda rank=rank: rank)
        for epoch in range(4):
            utils.fix_random_seeds(0, epoch)
            draws[rank, epoch] = torch.rand(4).tolist()
    assert len({tuple(d) for d in draws.values()}) == 16
    assert draws[1, 0] != draws[0, 1]
    seeds = {utils.derive_seed(s, 0, a, b) for s in ("process", "sample") for a in range(20) for b in range(20)}
    assert len(seeds) == 800 and all(0 <= s < 2**63 for s in seeds)


class RandomSamples(torch.utils.data.Dataset):
    """Each item is what torch's global generator draws when it is loaded, and its index."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.rand(3), index


def loader_draws(num_workers: int, epoch: int, start_iteration: int = 0, rank: int = 0) -> list[list[float]]:
    sampler = pretraining.ResumableSampler(RandomSamples(), 2, num_replicas=2, rank=rank, shuffle=True, seed=5)
    sampler.set_epoch(epoch, start_iteration)
    loader = torch.utils.data.DataLoader(
        pretraining.SeededSamples(RandomSamples()),
        sampler=sampler,
        batch_size=2,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )
    return [row for draws, _ in loader for row in draws.tolist()]


def test_data_stream_depends_only_on_seed_epoch_and_position():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    in_process = loader_draws(num_workers=0, epoch=3)
    assert torch.rand(1) == expected_next  # the caller's generator (drop-path's) is left as it was
    assert loader_draws(num_workers=2, epoch=3) == in_process  # any number of workers, any worker state
    assert loader_draws(num_workers=0, epoch=3, start_iteration=1) == in_process[2:]  # resumed mid-epoch
    other_rank, other_epoch = loader_draws(0, epoch=3, rank=1), loader_draws(0, epoch=4)
    rows = [tuple(r) for r in in_process + other_rank + other_epoch]
    assert len(set(rows)) == len(rows) == 15  # no two samples of any rank or epoch share their draws


def test_seeded_samples_leave_the_cuda_generators_alone(monkeypatch):
    """A sample loaded in the main process (--num_workers 0) used to reseed every CUDA generator with its own
    seed (torch.manual_seed), and fork_rng(devices=[]) did not restore them: drop-path on a GPU restarted
    from the sample's seed at every sample. Its CPU draws are still a function of the seed alone."""
    cuda_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    samples = pretraining.SeededSamples(RandomSamples())
    first, again = samples[3, 77], samples[3, 77]
    torch.manual_seed(77)
    assert cuda_seeds == [77]  # the spy sees torch.manual_seed's reseeding
    assert torch.equal(first[0], torch.rand(3)) and torch.equal(again[0], first[0])
    assert cuda_seeds == [77]  # and none from the two samples


# ============================================================================ preemption and exact resume


def sigusr2_after_first_step(args: list[str]) -> subprocess.CompletedProcess:
    """Run ``main_dino_mc.py args`` in its own session and send SIGUSR2 to all of its processes (the loader's
    workers too, as SLURM does) as soon as the first training step has been logged. Its stderr goes to a file,
    so that nothing it writes there can block it while the test reads its stdout."""
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "main_dino_mc.py", *args],
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"Epoch: [0/1]  [1/{ITERS_PER_EPOCH}]"):
                os.killpg(proc.pid, signal.SIGUSR2)
                break
        out, _ = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + out, read_spool(stderr))


# The tree's workers are covered by the device path, whose workers read and cut from the tree.
@pytest.mark.parametrize("source, augment_on", [("store", "workers"), ("tree", "device")])
def test_sigusr2_mid_epoch_with_workers_saves_and_resumes_to_the_same_teacher(request, tmp_path, source, augment_on):
    seco_root = request.getfixturevalue("seco_root" if source == "tree" else "seco_store")
    workers = ("--num_workers", "2", "--epochs", "1", "--augment_on", augment_on)
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    # The uninterrupted run is independent of the preempted one: it runs meanwhile, in its own process.
    uninterrupted = subprocess.Popen(
        [sys.executable, "main_dino_mc.py", *tiny_args(seco_root, straight, *workers)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc = sigusr2_after_first_step(tiny_args(seco_root, preempted, *workers))
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err[-3000:]
    assert proc.returncode == preemption.PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
    ckpt = torch.load(preempted / "checkpoint.pth")
    assert ckpt["epoch"] == 0 and 0 < ckpt["iteration"] < ITERS_PER_EPOCH  # mid-epoch, not the epoch's end
    message = f"preempted at epoch 0, iteration {ckpt['iteration']}: checkpoint saved; run the same command to resume"
    assert message in proc.stdout
    assert not (preempted / "log.txt").exists()  # no epoch finished

    proc = run_script(["main_dino_mc.py", *tiny_args(seco_root, preempted, *workers)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"from epoch 0, iteration {ckpt['iteration']}" in proc.stdout
    assert max_teacher_diff(straight, preempted) <= 1e-6
    # The epoch's averages continue across the restart: the same log as the uninterrupted run.
    for a, b in zip(read_log(straight), read_log(preempted), strict=True):
        assert a["epoch"] == b["epoch"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_checkpoint_every_iters_saves_mid_epoch(seco_root, tmp_path, monkeypatch):
    saved = []
    original = utils.save_on_master

    def record(obj, path):
        saved.append((Path(path).name, obj["epoch"], obj["iteration"], "loss" in obj["meters"]))
        original(obj, path)

    monkeypatch.setattr(utils, "save_on_master", record)
    main_dino_mc.run(tiny_args(seco_root, tmp_path, "--checkpoint_every_iters", "2", "--epochs", "1"))
    # after iterations 2 and 4 of 4: the second is the epoch's end, saved once, as the next epoch's start
    assert saved == [("checkpoint.pth", 0, 2, True), ("checkpoint.pth", 1, 0, False)]  # with the running means


def test_preemption_hands_the_signal_to_the_previous_handler(seco_root, tmp_path, monkeypatch):
    """Under submitit the task's SIGUSR2 handler checkpoints and requeues the job: it is called, after the
    mid-epoch checkpoint is written, with the signal, and put back in place."""
    seen = []

    def requeue(signum, frame):
        seen.append((signum, torch.load(tmp_path / "checkpoint.pth")["iteration"]))

    original, calls = main_dino_mc.DINOLoss.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # during the second step
            os.kill(os.getpid(), signal.SIGUSR2)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(main_dino_mc.DINOLoss, "forward", forward)
    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        with pytest.raises(SystemExit) as exc:
            main_dino_mc.run(tiny_args(seco_root, tmp_path, "--epochs", "1"))
    finally:
        restored = signal.signal(signal.SIGUSR2, previous)
    assert exc.value.code == preemption.PREEMPTED_EXIT_CODE
    assert seen == [(signal.SIGUSR2, 2)] and restored is requeue


def test_checkpoint_every_iters_must_not_be_negative(seco_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main_dino_mc.run(tiny_args(seco_root, tmp_path, "--checkpoint_every_iters", "-1"))
    assert exc.value.code == 2 and "--checkpoint_every_iters -1: expected a number >= 0" in capsys.readouterr().err


def test_signal_to_one_rank_stops_both_at_the_same_iteration(seco_root, tmp_path):
    """SIGTERM to rank 1 only: both ranks agree to stop after the same step, rank 0 saves, both exit 3."""
    procs = start_ranks(["main_dino_mc.py", *tiny_args(seco_root, tmp_path, "--batch_size_per_gpu", "1")])
    for line in procs[0].stdout:  # rank 0 logs (rank 1 prints nothing)
        if line.startswith(f"Epoch: [0/2]  [1/{ITERS_PER_EPOCH}]"):
            procs[1].send_signal(signal.SIGTERM)
            break
    results = finish(procs)
    assert [code for code, _, _ in results] == [preemption.PREEMPTED_EXIT_CODE] * 2, results[0][2][-2000:]
    ckpt = torch.load(tmp_path / "checkpoint.pth")
    assert ckpt["epoch"] == 0 and 0 < ckpt["iteration"] < ITERS_PER_EPOCH and len(ckpt["rng_state"]) == 2
    assert f"preempted at epoch 0, iteration {ckpt['iteration']}" in results[0][1]


def test_killed_rank_stops_the_other_with_one_line(seco_root, tmp_path):
    """SIGKILL to rank 1 mid-epoch (out of memory, a node lost): rank 0's next collective finds its peer gone and
    stops with one line and exit code 1, instead of a gloo traceback; the checkpoint of epoch 0 is kept."""
    procs = start_ranks(["main_dino_mc.py", *tiny_args(seco_root, tmp_path, "--batch_size_per_gpu", "1")])
    for line in procs[0].stdout:
        if line.startswith(f"Epoch: [1/2]  [1/{ITERS_PER_EPOCH}]"):
            procs[1].kill()
            break
    (code, _, err), (killed, _, _) = finish(procs)
    lines = err.strip().splitlines()
    assert (code, killed) == (1, -signal.SIGKILL), err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: another process of this job stopped (")
    assert "by peer" in lines[0] and lines[0].endswith("resume from the last checkpoint")
    assert torch.load(tmp_path / "checkpoint.pth")["epoch"] == 1


NAN_ON_RANK_1 = """
import os, sys
import main_dino_mc
original, calls = main_dino_mc.DINOLoss.forward, []
def forward(self, *args, **kwargs):
    calls.append(1)
    loss, probs = original(self, *args, **kwargs)
    return (loss * float("nan") if os.environ["RANK"] == "1" and len(calls) == 2 else loss), probs
main_dino_mc.DINOLoss.forward = forward
main_dino_mc.run(sys.argv[1:])
"""


def test_nan_on_one_rank_stops_every_rank(seco_root, tmp_path):
    procs = start_ranks(["-c", NAN_ON_RANK_1, *tiny_args(seco_root, tmp_path, "--batch_size_per_gpu", "1")])
    results = finish(procs)
    assert [code for code, _, _ in results] == [1, 1], results[0][2][-2000:]
    assert "Loss is nan at epoch 0, iteration 1 (not finite on 1 of 2 processes)" in results[0][1]
    assert not (tmp_path / "checkpoint.pth").exists()


# ============================================================================ downloads


FAILED_DOWNLOAD = """
import sys
import torch.distributed as dist
import utils
dist.init_process_group("gloo")
try:
    utils.resolve_weights_path("http://127.0.0.1:9/weights.pth", sys.argv[1])
except utils.ConfigError as err:
    print(err, flush=True)
    sys.exit(2)
finally:
    utils.close_distributed()  # as the scripts do: a gloo group left to interpreter shutdown may abort
"""


def test_failed_download_stops_every_rank_with_the_error(tmp_path):
    """Rank 0 downloads (LOCAL_RANK 0) and fails; rank 1 used to wait for it in a barrier."""
    procs = start_ranks(["-c", FAILED_DOWNLOAD, str(tmp_path / "cache")])
    results = finish(procs, timeout=120)
    assert [code for code, _, _ in results] == [2, 2], results[1][2][-2000:]
    for _, out, _ in results:
        assert "--pretrained_weights http://127.0.0.1:9/weights.pth: download failed" in out


def test_nodes_sharing_a_cache_folder_do_not_corrupt_each_other(tmp_path):
    """Two downloads of one file into one folder, interleaved: each writes its own partial file."""
    content = bytes(range(256)) * 64
    both_half_way = threading.Barrier(2)

    def download(dst: Path) -> None:
        with open(dst, "wb") as f:
            f.write(content[: len(content) // 2])
            f.flush()
            both_half_way.wait(timeout=30)
            f.write(content[len(content) // 2 :])

    target = tmp_path / "cache" / "w.pth"
    results, errors = [], []

    def node() -> None:
        try:
            results.append(pretrained._download_once(target, download, "http://example.org/w.pth"))
        except Exception as err:  # the old shared ".partial" made the second rename fail
            errors.append(err)

    threads = [threading.Thread(target=node) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and results == [target, target]
    assert target.read_bytes() == content
    assert [p.name for p in target.parent.iterdir()] == ["w.pth"]


# ============================================================================ kills at every writer


def test_kill_at_log_and_checkpoint_writes_keeps_them_and_resumes(seco_root, tmp_path):
    one_epoch = tiny_args(seco_root, tmp_path, "--epochs", "1")
    main_dino_mc.run(one_epoch)
    checkpoint, log = (tmp_path / "checkpoint.pth").read_bytes(), (tmp_path / "log.txt").read_bytes()

    killed_at_rename("log.txt", "main_dino_mc.py", *tiny_args(seco_root, tmp_path))
    assert (tmp_path / "log.txt").read_bytes() == log and (tmp_path / "checkpoint.pth").read_bytes() == checkpoint

    killed_at_rename("checkpoint.pth", "main_dino_mc.py", *tiny_args(seco_root, tmp_path))
    assert (tmp_path / "checkpoint.pth").read_bytes() == checkpoint
    assert [e["epoch"] for e in read_log(tmp_path)] == [0, 1]  # epoch 1 logged, its checkpoint never written

    main_dino_mc.run(tiny_args(seco_root, tmp_path))
    assert torch.load(tmp_path / "checkpoint.pth")["epoch"] == 2
    assert [e["epoch"] for e in read_log(tmp_path)] == [0, 1]  # the orphan line trimmed, the epoch redone
    expected = ["checkpoint.pth", "log.txt", "training_curves.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected  # killed temporaries gone


TOY_FIT_ARGS = {"epochs": 4, "lr": 0.01}
TOY_FIT = f"""
import sys
from tests.engine_toy import make_args, train_toy
train_toy(make_args(sys.argv[1], **{TOY_FIT_ARGS!r}))
"""


def test_kill_at_best_checkpoint_write_keeps_best_and_checkpoint_consistent(tmp_path):
    """The toy's validation accuracy is best at epoch 1 (0.60, 0.93, 0.93, 0.93): kill at that best's write."""
    killed_at_rename("checkpoint_best.pth", TOY_FIT, str(tmp_path), occurrence=2)
    # checkpoint.pth does not call epoch 1 the best while checkpoint_best.pth still holds epoch 0's weights.
    assert torch.load(tmp_path / "checkpoint_best.pth", weights_only=False)["epoch"] == 1
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=False)["epoch"] == 1

    train_toy(make_args(tmp_path, **TOY_FIT_ARGS))  # the next run, in this process
    saved_best = torch.load(tmp_path / "checkpoint_best.pth", weights_only=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert saved_best["epoch"] - 1 == metrics["best"]["epoch"] == 1


FAKE_WEIGHTS = b"weights " * 1000


def fake_download(url: str, dst: Path) -> None:
    """A stand-in for the URL download (pretrained._fetch_url) that writes FAKE_WEIGHTS."""
    Path(dst).write_bytes(FAKE_WEIGHTS)


FAKE_DOWNLOAD = f"""
import sys
import pretrained, utils
pretrained._fetch_url = lambda url, dst: open(dst, "wb").write({FAKE_WEIGHTS!r})
utils.resolve_weights_path("https://example.org/w.pth", sys.argv[1])
"""


def test_kill_at_download_rename_leaves_no_cached_file_and_the_next_run_downloads(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    killed_at_rename("-w.pth", FAKE_DOWNLOAD, str(cache))  # the cache's name: <digest of the URL>-w.pth
    assert [p.name.endswith(".partial") for p in cache.iterdir()] == [True]  # nothing looks like a download
    monkeypatch.setattr(pretrained, "_fetch_url", fake_download)  # the next run, in this process
    cached = utils.resolve_weights_path("https://example.org/w.pth", cache)
    assert cached.parent == cache and cached.read_bytes() == FAKE_WEIGHTS


# ============================================================================ host-device syncs of the step


def test_packed_pass_builds_its_sample_index_once_and_copies_nothing_from_the_host(monkeypatch):
    """On CUDA, a tensor made from a Python list is a blocking host-to-device copy: the packed pass used to make
    one per block and residual. Here no tensor may come from host data, and the index is built once."""
    import vision_transformer as vits

    segments = [(2, 5), (3, 2)]
    expected = torch.repeat_interleave(torch.arange(5), torch.tensor([5, 5, 2, 2, 2]))
    assert torch.equal(vits.packed_sample_index(segments, torch.device("cpu")), expected)

    model = vits.vit_tiny(patch_size=16, drop_path_rate=0.5).train()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)]
    calls = []
    build = vits.packed_sample_index
    monkeypatch.setattr(vits, "packed_sample_index", lambda *a: calls.append(a) or build(*a))

    def from_host(*args, **kwargs):
        raise AssertionError("a tensor built from host data in the packed pass")

    monkeypatch.setattr(torch, "tensor", from_host)
    monkeypatch.setattr(torch, "as_tensor", from_host)
    out = model.forward_packed(crops)
    assert out.shape == (5, model.embed_dim) and len(calls) == 1


def test_resume_iteration_with_another_total_batch():
    args = main_dino_mc.get_args_parser().parse_args(["--batch_size_per_gpu", "4"])
    args.world_size = 2
    same = {"iteration": 3, "args": {"world_size": 2, "batch_size_per_gpu": 4}}
    assert checkpoints.resume_iteration(same, args, niter=10) == 3
    assert checkpoints.resume_iteration({"iteration": 3, "args": {}}, args, niter=10) == 3  # args unknown
    # 3 batches of 4 x 1 process = 12 samples: one batch of 8 done, the next starts at the 9th sample
    one_process = {"iteration": 3, "args": {"world_size": 1, "batch_size_per_gpu": 4}}
    assert checkpoints.resume_iteration(one_process, args, niter=10) == 1
    many = {"iteration": 9, "args": {"world_size": 8, "batch_size_per_gpu": 4}}
    assert checkpoints.resume_iteration(many, args, niter=10) == 10  # never past the epoch's end
