"""Preemption (preemption): a signal is only noted, every rank agrees on it with the step's one all-reduce."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import preemption


def test_a_signal_is_recorded_and_agreed_with_the_loss_and_the_health_signals():
    watch = preemption.PreemptionWatch()
    try:
        loss, not_finite, signals = preemption.agree_on_step(torch.tensor(2.5), watch, torch.tensor([0.25, 4.0]))
        assert (loss, not_finite, signals, watch.agreed) == (2.5, 0, [0.25, 4.0], set())
        os.kill(os.getpid(), signal.SIGUSR2)  # handled, not fatal: the handler only notes it
        loss, not_finite, _ = preemption.agree_on_step(torch.tensor(float("nan")), watch)
        assert not_finite == 1 and watch.agreed == {signal.SIGUSR2}
    finally:
        watch.restore()
    assert signal.getsignal(signal.SIGUSR2) is not watch._record


def test_stop_after_preemption_calls_the_previous_handler_then_exits_with_its_code(capsys):
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    watch = preemption.PreemptionWatch()
    try:
        watch.agreed = {signal.SIGTERM}
        with pytest.raises(SystemExit) as stopped:
            preemption.stop_after_preemption(watch, epoch=3, iteration=7)
        assert stopped.value.code == preemption.PREEMPTED_EXIT_CODE and calls == [signal.SIGTERM]
        assert "preempted at epoch 3, iteration 7" in capsys.readouterr().out
    finally:
        watch.restore()
        signal.signal(signal.SIGTERM, previous)
