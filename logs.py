"""Logging: DINO's metric logger, the JSON log, progress with an ETA, TensorBoard."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.hub

from checkpoints import write_atomically
from cli import bool_flag
from runtime import is_dist_avail_and_initialized, is_main_process


class SmoothedValue:
    """Track a series of values; give smoothed values over a window and the global average."""

    def __init__(self, window_size: int = 20, fmt: str | None = None):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.6f} ({global_avg:.6f})"

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over ranks (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor(
            [self.count, self.total], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu"
        )
        dist.barrier()
        dist.all_reduce(t)
        self.count = int(t[0].item())
        self.total = t[1].item()

    @property
    def median(self) -> float:
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self) -> float:
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(self.deque)

    @property
    def value(self) -> float:
        return self.deque[-1]

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


class MetricLogger:
    """DINO's metric logger: ``log_every`` yields the items and prints a line with ETA every ``print_freq``."""

    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v))

    def __getattr__(self, attr: str):
        if attr in self.__dict__.get("meters", {}):
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "") -> Iterator:
        start_time = time.time()
        end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.6f}")
        data_time = SmoothedValue(fmt="{avg:.6f}")
        total = len(iterable)  # type: ignore[arg-type]
        space_fmt = ":" + str(len(str(total))) + "d"
        parts = [header, "[{0" + space_fmt + "}/{1}]", "eta: {eta}", "{meters}", "time: {time}", "data: {data}"]
        if torch.cuda.is_available():
            parts.append("max mem: {memory:.0f}")
        log_msg = self.delimiter.join(parts)
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta_string = str(datetime.timedelta(seconds=int(iter_time.global_avg * (total - i))))
                fields = dict(eta=eta_string, meters=str(self), time=str(iter_time), data=str(data_time))
                if torch.cuda.is_available():
                    fields["memory"] = torch.cuda.max_memory_allocated() / 1024.0**2
                print(log_msg.format(i, total, **fields), flush=True)
            end = time.time()
        total_time = time.time() - start_time
        total_time_str = str(datetime.timedelta(seconds=int(total_time)))
        print(f"{header} Total time: {total_time_str} ({total_time / max(total, 1):.6f} s / it)", flush=True)


def append_json_log(path: str | Path, stats: dict) -> None:
    """Add one JSON line (one epoch) to ``log.txt``, on disk before the checkpoint is written.

    The file is rewritten atomically (:func:`write_atomically`) rather than appended to: an append cut by a
    kill leaves half a line, which the next run's :func:`trim_json_log` could not parse. A log has one line
    per epoch, so rewriting it costs nothing.
    """
    path = Path(path)
    previous = path.read_bytes() if path.is_file() else b""
    write_atomically(path, lambda f: f.write(previous + (json.dumps(stats) + "\n").encode()))


def trim_json_log(path: str | Path, next_epoch: int) -> None:
    """On resume, drop log lines of epochs >= ``next_epoch``: they belong to an epoch whose checkpoint was
    never written (a kill between the two writes) and will be run and logged again."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("epoch", -1) < next_epoch]
    if len(kept) != len(lines):
        write_atomically(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


class Progress:
    """Progress of a long step with an ETA: a tqdm bar on a terminal, else a line every ``print_freq`` items
    (a log file gets a few readable lines instead of a bar redrawn thousands of times); rank 0 only.

    Wraps an iterable (``for batch in Progress(loader, "features", 10)``) or counts ``update()`` calls
    (``Progress(None, "store locations", 1000, total=n)``).
    """

    def __init__(self, iterable: Iterable | None, desc: str, print_freq: int, total: int | None = None):
        self.iterable = iterable
        self.total = total if total is not None else len(iterable)  # type: ignore[arg-type]
        self.desc, self.print_freq = desc, max(1, print_freq)
        self.count, self.start = 0, time.time()
        self.bar = None
        if is_main_process() and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total or None, desc=desc, dynamic_ncols=True)

    def __iter__(self) -> Iterator:
        for item in self.iterable:  # type: ignore[union-attr]
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1, info: str = "") -> None:
        """Count ``n`` more items; ``info`` (rates, ratios) is shown after the counts."""
        before, self.count = self.count, self.count + n
        crossed = self.count // self.print_freq > before // self.print_freq
        if self.bar is not None:
            if info:
                self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(n)
        elif is_main_process() and self.count > 0 and (crossed or self.count == self.total):
            elapsed = datetime.timedelta(seconds=int(time.time() - self.start))
            counts = f"[{self.count}]"  # a total of 0 is unknown (a download without its size): no ETA
            if self.total:
                eta = (time.time() - self.start) / self.count * max(self.total - self.count, 0)
                counts = f"[{self.count}/{self.total}] eta: {datetime.timedelta(seconds=int(eta))}"
            print(f"{self.desc} {counts} elapsed: {elapsed}{', ' + info if info else ''}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def add_tensorboard_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tensorboard",
        default=False,
        type=bool_flag,
        help="Also write the scalars of log.txt to output_dir/tb/ for TensorBoard (rank 0).",
    )


class TensorBoardLog:
    """The scalars of ``log.txt`` (one point per epoch) as TensorBoard events in ``output_dir/tb``; a no-op
    unless ``enabled`` and on rank 0.

    A resumed run starts at ``start_step``. The writer records it as a restart (``purge_step``): TensorBoard
    then drops the points of steps >= ``start_step`` left by the interrupted run (an epoch that was logged but
    never checkpointed, which is run again), so a resumed curve has each step once. Nested dicts (per-class
    or health metrics) become ``name/key`` tags; values that are not numbers (lists, strings) are skipped.
    """

    def __init__(self, output_dir: str | Path, enabled: bool, start_step: int = 0):
        self.writer = None
        if enabled and is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tb"), purge_step=start_step)

    def write(self, stats: dict, step: int) -> None:
        if self.writer is None:
            return
        for tag, value in _scalar_items(stats):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # on disk at each epoch, as log.txt

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def resume_logs(output_dir: str | Path, tensorboard: bool, start_epoch: int) -> TensorBoardLog:
    """The logs of a run that (re)starts at ``start_epoch``: ``log.txt`` trimmed to the epochs before it (rank 0),
    and the TensorBoard writer, which drops the events of later epochs too."""
    if is_main_process():
        trim_json_log(Path(output_dir) / "log.txt", start_epoch)
    return TensorBoardLog(output_dir, tensorboard, start_epoch)


def _scalar_items(stats: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in stats.items():
        if key == "epoch":
            continue
        if isinstance(value, dict):
            yield from _scalar_items(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)
