"""One-shot check of a GPU machine: correctness first, then speed. One JSON line per result, on stdout and in
``--output``; ``bash benchmarks/gpu_check.sh`` runs it.

    bash benchmarks/gpu_check.sh                          # the check, on one GPU (or all visible ones)
    bash benchmarks/gpu_check.sh --device cpu --quick     # its plumbing on any machine (CI runs this)

Checks, in order (``check`` names the line; ``ok`` says whether it passed):

- ``environment``: torch, its CUDA build, the driver, the GPUs, TF32.
- ``cuda_vs_cpu``: one fixed batch's DINO loss and gradients on the device in fp32 (TF32 products) against the
  CPU in fp32.
- ``precision``: the same batch's loss in bf16 and fp16 on the device: finite and close to fp32's.
- ``resume``: a ``main_dino_mc.py`` run on the demo data killed at the start of an epoch and resumed, against
  the uninterrupted run; a second uninterrupted run gives the device's own run-to-run difference.
- ``throughput``: ``train_step.py``'s step of the published mc recipe (ViT-S/16 and ViT-S/8, two batch sizes,
  bf16 and fp16): images/s, MFU, peak GPU memory.
- ``loader``: images/s of the training loader with ``--num_workers`` workers on the demo data (or
  ``--data_path``), up to the crops on the device, with ``--augment_on workers`` and ``device`` (and the time of
  the device's batched augmentation), against what the ViT-S/16 bf16 step consumes at the larger batch.
- ``torchrun``: ``main_dino_mc.py`` under ``torchrun --nproc_per_node`` = all visible GPUs (2 CPU processes
  with ``--device cpu``).

``--quick`` runs the same checks on a ViT-Tiny with small crops, batches and runs: the figures then mean
nothing; it exists so that the script itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step  # noqa: E402

import main_dino_mc  # noqa: E402
import utils  # noqa: E402
from datasets import pretraining
from datasets.demo import write_seco_demo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# What each mode runs: the published recipe on a GPU, a ViT-Tiny on 32 px crops for --quick.
SETTINGS = {
    "full": {
        "arch": "vit_small",
        "out_dim": 65536,
        "crops": ["--global_crops_size", "224"],
        "patch_sizes": (16, 8),
        "batches": (32, 64),
        "steps": ["--steps", "10", "--warmup", "3"],
        "compare_batch": 8,
        "locations": 40,  # 5 steps an epoch at batch 8: a 4-epoch run is 20 steps
        "run_batch": 8,
        "epochs": 4,
        "loader_batches": 20,
    },
    "quick": {
        "arch": "vit_tiny",
        "out_dim": 1024,
        "crops": ["--global_crops_size", "32", "--size_crops", *["16"] * 6],
        "patch_sizes": (16, 8),
        "batches": (2,),
        "steps": ["--steps", "1", "--warmup", "0"],
        "compare_batch": 2,
        "locations": 4,
        "run_batch": 2,
        "epochs": 2,
        "loader_batches": 2,
    },
}
COMPARE_TOLERANCE = {"loss": 1e-3, "gradients": 1e-2}  # relative; fp32 with TF32 products against the CPU
LOW_PRECISION_TOLERANCE = 2e-2  # relative difference of a bf16 / fp16 loss from the fp32 one
RESUME_TOLERANCE = 1e-6  # largest teacher difference accepted when the device itself repeats runs exactly
PRECISIONS = ("bf16", "fp16")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DINO-MC GPU check")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="Where to run the checks.")
    parser.add_argument("--quick", action="store_true", help="Small models and runs: tests the script itself.")
    parser.add_argument("--output", default="gpu_check.jsonl", type=str, help="JSON lines file (appended to).")
    parser.add_argument(
        "--data_path", default=None, type=str, help="SeCo-layout data for the loader check (default: demo data)."
    )
    parser.add_argument("--num_workers", default=10, type=int, help="Loader workers, as the job would use.")
    parser.add_argument("--peak_tflops", default=None, type=float, help="For the MFU of a card not in the table.")
    return parser


class Report:
    """Each result as one JSON line on stdout and appended to the output file, as soon as it is known, with the
    seconds spent since the previous line (``seconds``: where the check's time budget goes)."""

    def __init__(self, path: Path):
        self.path = path
        self.results: list[dict] = []
        self.last = time.perf_counter()

    def add(self, check: str, **fields) -> dict:
        now = time.perf_counter()
        line = {"check": check, **fields, "seconds": round(now - self.last, 1)}
        self.last = now
        self.results.append(line)
        text = json.dumps(line)
        print(text, flush=True)
        with open(self.path, "a") as f:
            f.write(text + "\n")
        return line


def environment(args: argparse.Namespace) -> dict:
    on_cuda = args.device == "cuda"
    return {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "driver": utils.nvidia_driver_version(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if on_cuda else [],
        "tf32_matmul": torch.backends.cuda.matmul.fp32_precision,
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "ok": not on_cuda or torch.cuda.is_available(),
    }


def step_args(settings: dict, device: str, patch_size: int, batch: int, precision: str) -> argparse.Namespace:
    """train_step.py's arguments for one configuration of the mode."""
    return train_step.get_args_parser().parse_args(
        [*("--arch", settings["arch"], "--patch_size", str(patch_size), "--data_mode", "mc", "--device", device)]
        + ["--batch_size_per_gpu", str(batch), "--out_dim", str(settings["out_dim"]), "--precision", precision]
        + settings["crops"]
        + settings["steps"]
    )


def fixed_batch_loss(
    settings: dict, device: str, precision: str, gradients: bool
) -> tuple[float, dict[str, torch.Tensor]]:
    """The DINO loss of one fixed batch of random crops on freshly seeded networks (no drop-path: its draws
    differ between devices), and the student's gradients (on the CPU) when asked."""
    args = step_args(settings, device, 16, settings["compare_batch"], precision)
    train_args = train_step.training_args(args)
    train_args.drop_path_rate = 0.0
    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):
        student, teacher, _ = main_dino_mc.build_models(train_args)
    crops = train_step.make_crops(args, train_args)
    ncrops = train_args.global_crops_number + train_args.local_crops_number
    dino_loss = main_dino_mc.DINOLoss(settings["out_dim"], ncrops, 0.04, 0.04, 0, 2).to(device)
    with utils.autocast(precision, device):
        loss, _ = dino_loss(student(crops), teacher(crops[:2]), 0)
    grads = {}
    if gradients:
        loss.backward()
        grads = {name: p.grad.detach().cpu() for name, p in student.named_parameters() if p.grad is not None}
    return loss.item(), grads


def relative(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_cuda_vs_cpu(report: Report, settings: dict, device: str) -> float:
    loss, grads = fixed_batch_loss(settings, device, "fp32", gradients=True)
    cpu_loss, cpu_grads = fixed_batch_loss(settings, "cpu", "fp32", gradients=True)
    loss_diff = relative(loss, cpu_loss)
    grad_diff = max(relative(grads[name], cpu_grads[name]) for name in cpu_grads)
    report.add(
        "cuda_vs_cpu",
        device=device,
        loss=loss,
        cpu_loss=cpu_loss,
        loss_rel_diff=loss_diff,
        max_grad_rel_diff=grad_diff,
        ok=loss_diff <= COMPARE_TOLERANCE["loss"] and grad_diff <= COMPARE_TOLERANCE["gradients"],
    )
    return loss


def check_precisions(report: Report, settings: dict, device: str, fp32_loss: float) -> None:
    for precision in PRECISIONS:
        loss, _ = fixed_batch_loss(settings, device, precision, gradients=False)
        difference = relative(loss, fp32_loss)
        finite = bool(torch.isfinite(torch.tensor(loss)))
        report.add(
            "precision",
            precision=precision,
            loss=loss,
            fp32_loss=fp32_loss,
            rel_diff=difference,
            ok=finite and difference <= LOW_PRECISION_TOLERANCE,
        )


def pretrain_flags(settings: dict, device: str, data: Path, output_dir: Path) -> list[str]:
    return [
        *("--arch", settings["arch"], "--patch_size", "16", "--out_dim", str(settings["out_dim"])),
        *("--batch_size_per_gpu", str(settings["run_batch"]), "--epochs", str(settings["epochs"]), *settings["crops"]),
        *("--num_workers", "2", "--device", device, "--seed", "0", "--print_freq", "1", "--saveckp_freq", "0"),
        *("--warmup_epochs", "1", "--data_path", str(data), "--output_dir", str(output_dir)),
    ]


def pretrain(flags: list[str], kill_at_epoch: int | None = None) -> subprocess.CompletedProcess:
    """main_dino_mc.py with ``flags`` in a fresh process; SIGKILLed once epoch ``kill_at_epoch`` has logged its
    first step (the previous epoch's checkpoint is then on disk)."""
    process = subprocess.Popen(
        [sys.executable, "main_dino_mc.py", *flags],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if kill_at_epoch is not None and line.startswith(f"Epoch: [{kill_at_epoch}/"):
            process.kill()
            break
    process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, "".join(lines))


def teacher_difference(a: Path, b: Path) -> float:
    ta, tb = (torch.load(p / "checkpoint.pth", map_location="cpu")["teacher"] for p in (a, b))
    return max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)


def check_resume(report: Report, settings: dict, device: str, data: Path, work: Path) -> None:
    """Kill and resume against the straight run; on a GPU also a second straight run, since some CUDA kernels
    (cuDNN's benchmark choice, atomic additions) need not repeat bit for bit: the resumed run must be as close
    as two straight runs are. The CPU repeats runs exactly, so --device cpu skips that run."""
    repeats = ("straight", "again") if device == "cuda" else ("straight",)
    runs = {name: work / name for name in ("straight", "again", "resumed")}
    failed = {}
    for name in repeats:
        done = pretrain(pretrain_flags(settings, device, data, runs[name]))
        if done.returncode:
            failed[name] = done.stdout[-2000:]
    killed = pretrain(pretrain_flags(settings, device, data, runs["resumed"]), kill_at_epoch=settings["epochs"] // 2)
    done = pretrain(pretrain_flags(settings, device, data, runs["resumed"]))
    if done.returncode:
        failed["resumed"] = done.stdout[-2000:]
    if failed:
        report.add("resume", ok=False, failed=failed)
        return
    resumed = teacher_difference(runs["straight"], runs["resumed"])
    repeat = teacher_difference(runs["straight"], runs["again"]) if "again" in repeats else 0.0
    saved_args = torch.load(runs["straight"] / "checkpoint.pth", map_location="cpu")["args"]
    report.add(
        "resume",
        steps=settings["epochs"] * (settings["locations"] // settings["run_batch"]),
        killed_returncode=killed.returncode,
        precision=saved_args["precision"],
        max_teacher_diff=resumed,
        max_teacher_diff_of_two_straight_runs=repeat,
        ok=resumed <= max(RESUME_TOLERANCE, 2 * repeat),
    )


def check_throughput(report: Report, settings: dict, device: str, peak_tflops: float | None) -> dict:
    """One train_step.py line per (patch size, batch, precision); returns them keyed by that triple."""
    results = {}
    for patch_size in settings["patch_sizes"]:
        for batch in settings["batches"]:
            for precision in PRECISIONS:
                args = step_args(settings, device, patch_size, batch, precision)
                args.peak_tflops = peak_tflops
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    with contextlib.redirect_stdout(sys.stderr):
                        result = train_step.run_steps(args)
                except torch.OutOfMemoryError:  # a batch too large for this card: the other lines still come
                    result = {"patch_size": patch_size, "batch_size_per_gpu": batch, "precision": precision}
                    report.add("throughput", **result, imgs_per_s=None, error="out of memory", ok=False)
                    continue
                results[patch_size, batch, precision] = report.add("throughput", **result, ok=True)
    return results


def check_loader(report: Report, settings: dict, args: argparse.Namespace, data: Path, need: float | None) -> None:
    """Images/s of main_dino_mc's own loader (its workers, augmentation and batch) up to the crops on the device,
    over a few batches after the first (the workers' start), against the step's images/s: once with the
    augmentation in the workers, once on the device (``--augment_on device``, whose batched augmentation is
    also timed alone)."""
    batch = settings["batches"][-1]
    for augment_on in ("workers", "device"):
        loader_args = main_dino_mc.get_args_parser().parse_args(
            ["--data_path", str(data), "--batch_size_per_gpu", str(batch), "--num_workers", str(args.num_workers)]
            + ["--augment_on", augment_on]
            + settings["crops"]
        )
        loader_args.__dict__.update(world_size=1, rank=0, device=args.device)
        main_dino_mc.check_args(loader_args)
        with contextlib.redirect_stdout(sys.stderr):
            _, loader, to_crops = pretraining.build_data(loader_args)
        loader.sampler.set_epoch(0)
        batches = iter(loader)
        next(batches)
        start, count, augment_s = time.perf_counter(), 0, 0.0
        for _ in range(min(settings["loader_batches"], len(loader) - 1)):
            loaded = next(batches)
            if to_crops is not None:
                synchronize(args.device)
                augment_start = time.perf_counter()
                to_crops(loaded)
                synchronize(args.device)
                augment_s += time.perf_counter() - augment_start
            count += batch
        rate = count / (time.perf_counter() - start)
        timing = {"device_augment_ms_per_batch": round(augment_s * 1000 * batch / max(count, 1), 2)}
        report.add(
            "loader",
            augment_on=augment_on,
            num_workers=args.num_workers,
            batch_size_per_gpu=batch,
            imgs_per_s=round(rate, 2),
            step_imgs_per_s=need,
            keeps_up=need is not None and rate >= need,
            **(timing if to_crops is not None else {}),
            ok=count > 0,
        )


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_torchrun(report: Report, settings: dict, device: str, data: Path, work: Path) -> None:
    processes = torch.cuda.device_count() if device == "cuda" else 2
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    flags = pretrain_flags(settings, device, data, work / "torchrun")
    flags += ["--epochs", "1", "--batch_size_per_gpu", "1"]
    done = subprocess.run([*command, "main_dino_mc.py", *flags], cwd=REPO, capture_output=True, text=True)
    checkpoint = work / "torchrun" / "checkpoint.pth"
    world_size = torch.load(checkpoint, map_location="cpu")["args"]["world_size"] if checkpoint.is_file() else None
    backend = "nccl" if device == "cuda" else "gloo"
    report.add(
        "torchrun",
        nproc_per_node=processes,
        returncode=done.returncode,
        world_size=world_size,
        backend=backend,
        ok=done.returncode == 0 and world_size == processes and f"rank 0/{processes}, {backend}" in done.stdout,
        **({"stderr": done.stderr[-2000:]} if done.returncode else {}),
    )


def main(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise utils.ConfigError(f"--device cuda, but torch sees no CUDA device: {utils.cuda_build_and_driver()}")
    if args.device == "cuda":
        utils.enable_tf32()
    if args.data_path is not None and not Path(args.data_path).is_dir():
        raise utils.ConfigError(f"--data_path {args.data_path} is not a folder")
    settings = SETTINGS["quick" if args.quick else "full"]
    report = Report(Path(args.output))
    report.add("environment", **environment(args))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):
            demo = write_seco_demo(work / "seco", n_locations=settings["locations"], n_acquisitions=2)
        fp32_loss = check_cuda_vs_cpu(report, settings, args.device)
        check_precisions(report, settings, args.device, fp32_loss)
        check_resume(report, settings, args.device, demo, work)
        throughput = check_throughput(report, settings, args.device, args.peak_tflops)
        need = throughput.get((16, settings["batches"][-1], "bf16"), {}).get("imgs_per_s")
        check_loader(report, settings, args, Path(args.data_path) if args.data_path else demo, need)
        check_torchrun(report, settings, args.device, demo, work)
    failed = [r["check"] for r in report.results if not r["ok"]]
    print(
        f"{len(report.results) - len(failed)} of {len(report.results)} results ok; written to {args.output}"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0


def run(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    try:
        code = main(args)
    except utils.ConfigError as err:
        utils.fail(str(err))
    sys.exit(code)


if __name__ == "__main__":
    run()
