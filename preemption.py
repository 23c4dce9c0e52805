"""Preemption: a SIGUSR2 / SIGTERM is recorded, agreed on by every rank at the next step, and answered with a
checkpoint and a clean exit (or submitit's requeue), so that a resumed run continues at that iteration."""

from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist

from runtime import get_world_size, is_dist_avail_and_initialized

# What SLURM sends before it stops a job (SIGUSR2 --signal_delay_s before a timeout, SIGTERM on preemption or
# scancel), and what torchrun forwards to its workers when it is stopped.
PREEMPTION_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
PREEMPTED_EXIT_CODE = 3  # 1: a crash or a non-finite loss, 2: bad arguments


class PreemptionWatch:
    """Record SIGUSR2 / SIGTERM instead of dying at once, so that the run can save where it is first.

    The handler only notes the signal. The training step shares it with the other ranks in the all-reduce
    that checks the loss (:func:`agree_on_step`), so that every rank stops after the same iteration, whichever
    rank was signalled; the agreed signals are in ``agreed``. ``previous`` holds the handlers installed before
    (submitit's, which requeues the job); :meth:`restore` puts them back. DataLoader workers forked after
    this inherit the handler, so a signal to every process of the job (as SLURM sends it) does not kill
    them under the training loop.
    """

    def __init__(self):
        self.received: set[int] = set()
        self.agreed: set[int] = set()
        self.previous: dict = {}
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            self.previous = {sig: signal.signal(sig, self._record) for sig in PREEMPTION_SIGNALS}

    def _record(self, signum: int, frame) -> None:
        self.received.add(signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def agree_on_step(
    loss: torch.Tensor, watch: PreemptionWatch, signals: torch.Tensor | None = None
) -> tuple[float, int, list[float]]:
    """The mean loss over ranks, on how many ranks it is not finite, and the mean over ranks of ``signals``
    (the health metrics); sets ``watch.agreed`` to the preemption signals any rank received.

    One all-reduce of a few numbers built on the loss's device (no host-to-device copy) and one read back,
    the step's only synchronisation, as ``loss.item()`` was: every rank then takes the same decision (stop
    for a non-finite loss, save and stop for a preemption) at the same iteration, instead of one rank leaving
    while the others wait in the next collective.
    """
    loss = loss.detach().float()
    status = loss.new_zeros(2 + len(PREEMPTION_SIGNALS))
    status[0] = loss
    status[1] = ~torch.isfinite(loss)
    for k, signum in enumerate(PREEMPTION_SIGNALS):
        if signum in watch.received:
            status[2 + k] = 1.0
    if signals is not None:
        status = torch.cat([status, signals.float()])
    if is_dist_avail_and_initialized():
        dist.all_reduce(status)
    values = status.tolist()
    total, not_finite = values[0], values[1]
    signalled = values[2 : 2 + len(PREEMPTION_SIGNALS)]
    world = get_world_size()
    watch.agreed = {signum for signum, count in zip(PREEMPTION_SIGNALS, signalled) if count > 0}
    return total / world, int(not_finite), [v / world for v in values[2 + len(PREEMPTION_SIGNALS) :]]


def stop_after_preemption(watch: PreemptionWatch, epoch: int, iteration: int) -> None:
    """Leave after the preemption checkpoint: under submitit its handler requeues the job (rank 0) and exits;
    otherwise (plain process, torchrun) one line and exit code PREEMPTED_EXIT_CODE."""
    if is_dist_avail_and_initialized():
        dist.barrier()  # the checkpoint is written before any rank exits (torchrun stops all on one exit)
    signum = signal.SIGUSR2 if signal.SIGUSR2 in watch.agreed else signal.SIGTERM
    previous = watch.previous.get(signum)
    watch.restore()
    if callable(previous):
        previous(signum, None)
    print(
        f"preempted at epoch {epoch}, iteration {iteration}: checkpoint saved; run the same command to resume",
        flush=True,
    )
    sys.exit(PREEMPTED_EXIT_CODE)
