"""Optimisation (optim): DINO's schedules, per-parameter gradient clipping, parameter groups, fused SGD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import utils


def test_cosine_scheduler_values():
    sched = utils.cosine_scheduler(1.0, 0.1, epochs=3, niter_per_ep=4, warmup_epochs=1, start_warmup_value=0.0)
    assert len(sched) == 12
    np.testing.assert_allclose(sched[:4], np.linspace(0, 1, 4))
    rest = np.arange(8)
    np.testing.assert_allclose(sched[4:], 0.1 + 0.45 * (1 + np.cos(np.pi * rest / 8)))
    assert sched[4] == pytest.approx(1.0) and sched[-1] > 0.1


def test_cosine_scheduler_without_warmup():
    sched = utils.cosine_scheduler(0.996, 1.0, epochs=2, niter_per_ep=5)
    assert sched[0] == pytest.approx(0.996) and np.all(np.diff(sched) > 0) and sched[-1] < 1.0


def test_clip_gradients_is_per_parameter():
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False))
    model[0].weight.grad = torch.full((2, 3), 10.0)  # norm 24.49 -> clipped to 3
    model[1].weight.grad = torch.tensor([[0.3, 0.4]])  # norm 0.5 -> unchanged
    norms = utils.clip_gradients(model, 3.0)
    assert [float(n) for n in norms] == pytest.approx([math.sqrt(600), 0.5])
    assert model[0].weight.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(model[1].weight.grad, torch.tensor([[0.3, 0.4]]))


def test_params_groups_exclude_biases_and_norms():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    decayed, not_decayed = utils.get_params_groups(model)
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 3])]
    assert len(not_decayed["params"]) == 3 and not_decayed["weight_decay"] == 0.0


def test_cosine_scheduler_warmup_longer_than_run_is_cut():
    sched = utils.cosine_scheduler(1.0, 0.0, epochs=1, niter_per_ep=5, warmup_epochs=10)
    np.testing.assert_allclose(sched, np.linspace(0, 1, 5))


def test_fused_sgd_through_a_frozen_parameter_equals_torchs_plain_sgd():
    """A parameter without gradients for the first steps (DINO's frozen prototypes), then with: the fused SGD
    (its momentum buffers started at zero) follows the plain per-tensor SGD exactly."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
        groups = utils.get_params_groups(model)
        if fused:
            optimizer = utils.build_optimizer("sgd", groups)
        else:
            optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9, foreach=False)
        for step in range(4):
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = 0.1
                if i == 0:  # the regularised group, as main_dino_mc schedules it
                    group["weight_decay"] = 0.04
            model(torch.randn(5, 4)).square().sum().backward()
            if step < 2:
                model[1].weight.grad = None  # frozen, as cancel_gradients_last_layer does
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results.append([p.detach().clone() for p in model.parameters()])
    for fused_param, plain_param in zip(*results, strict=True):
        torch.testing.assert_close(fused_param, plain_param)
