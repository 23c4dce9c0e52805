"""Optimisation as DINO does it: parameter groups, per-parameter gradient clipping, LARS, cosine schedules."""

from __future__ import annotations

import numpy as np
import torch
import torch.hub
import torch.nn as nn


def get_params_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights (decayed) and biases / norm parameters (ndim <= 1, never decayed), as DINO."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def clip_gradients(model: nn.Module, clip: float) -> list[torch.Tensor]:
    """Clip each parameter's gradient to norm ``clip`` separately (DINO's per-parameter clipping).

    One foreach norm and one foreach multiply over all gradients instead of a Python loop per parameter;
    returns the norms before clipping as tensors (DINO returns floats, which would sync the device per step).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return []
    norms = torch._foreach_norm(grads, 2)
    scales = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the prototypes' gradients during the first ``freeze_last_layer`` epochs (DINO's trick)."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


class LARS(torch.optim.Optimizer):
    """LARS (SGD + momentum + layer-wise trust ratio) as in DINO; biases / norms are excluded from adaptation."""

    def __init__(
        self,
        params,
        lr: float = 0,
        weight_decay: float = 0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0, torch.where(update_norm > 0, (g["eta"] * param_norm / update_norm), one), one
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def build_optimizer(name: str, params_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW or SGD with torch's fused kernels where the parameters allow them, or LARS.

    Why fused: it updates each parameter in one pass over memory. On a CPU, where torch's foreach ops are a
    Python-level loop of per-tensor kernels, the fused step over DINO's 65536-prototype head is several times
    faster (benchmarks/README.md); on CUDA it saves the kernel launches.
    """
    fused = all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for group in params_groups for p in group["params"]
    )
    if name == "adamw":
        return torch.optim.AdamW(params_groups, fused=fused, foreach=not fused)
    if name == "sgd":
        sgd = torch.optim.SGD(params_groups, lr=0, momentum=0.9, fused=fused, foreach=not fused)
        if fused:
            _start_momentum_buffers(sgd)
        return sgd
    if name == "lars":
        return LARS(params_groups)
    raise ValueError(f"--optimizer {name!r}: expected adamw, sgd or lars")


def _start_momentum_buffers(sgd: torch.optim.SGD) -> None:
    """Give every parameter a zero momentum buffer before the first step.

    Why: torch's fused SGD needs either no buffer at all in a group (its first step) or one for every parameter
    that has a gradient. DINO's prototypes get no gradient during the ``--freeze_last_layer`` epochs, so without
    this they join a group whose other buffers exist, and the fused kernel fails ("expected Tensor as element
    ..., but got NoneType"). Same maths: without dampening, a zero buffer's first update ``0.9 * 0 + g`` is the
    ``g`` torch copies into a new buffer.
    """
    for group in sgd.param_groups:
        for p in group["params"]:
            sgd.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0,
) -> np.ndarray:
    """Per-iteration values: linear warm-up to ``base_value``, then cosine decay to ``final_value`` (DINO).

    Unlike DINO's version, a warm-up longer than the run (``--epochs 1`` with the default 10 warm-up epochs,
    as in a smoke test) is cut to the run's length instead of failing.
    """
    total_iters = epochs * niter_per_ep
    warmup_iters = min(warmup_epochs * niter_per_ep, total_iters)
    warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total_iters - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup_schedule, schedule))
