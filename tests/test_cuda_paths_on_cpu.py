"""The code paths a GPU run takes, exercised on a CPU: fp16 with a GradScaler (CPU fp16 autocast and
``torch.amp.GradScaler("cpu")``), the weight-norm layer's low-precision backward, the teacher's DDP wrapper
(SyncBatchNorm runs), and the CUDA generator's state in checkpoints with ``torch.cuda`` mocked."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import main_dino_mc
import preemption
import utils
import vision_transformer as vits


@pytest.fixture(scope="module")
def seco_root(seco_demo) -> Path:
    return seco_demo(4, 2, seed=3)


def fp16_args(data_path, output_dir, epochs: int) -> list[str]:
    """Two steps an epoch (4 locations, batch 2) of a tiny ViT in fp16 on the CPU."""
    return [
        *("--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "64", "--batch_size_per_gpu", "2"),
        *("--global_crops_size", "32", "--local_crops_number", "2", "--size_crops", "24", "16"),
        *("--precision", "fp16", "--device", "cpu", "--num_workers", "0", "--seed", "0", "--saveckp_freq", "1"),
        *("--warmup_epochs", "0", "--lr", "0.05", "--momentum_teacher", "0.9", "--print_freq", "100"),
        *("--data_path", str(data_path), "--output_dir", str(output_dir), "--epochs", str(epochs)),
    ]


def test_fp16_grad_scaler_skips_overflowing_steps_trains_and_resumes_exactly(seco_root, tmp_path, monkeypatch):
    """The scaler starts at 2**20 and doubles after every good step, so that it overflows the fp16 gradients
    of this small model: the overflowing steps are skipped (the scale halves), the others train. A run
    resumed from the end of epoch 0 (what a kill then leaves; scaler state from the checkpoint) ends where
    the straight run ends."""
    monkeypatch.setattr(
        utils, "make_grad_scaler", lambda precision, device: torch.amp.GradScaler("cpu", 2.0**20, growth_interval=1)
    )
    scales = []
    update = torch.amp.GradScaler.update

    def recorded_update(scaler, new_scale=None):
        update(scaler, new_scale)
        scales.append(scaler.get_scale())

    monkeypatch.setattr(torch.amp.GradScaler, "update", recorded_update)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main_dino_mc.run(fp16_args(seco_root, straight, 2))
    print(f"scale after each of the 4 steps: {scales}")
    steps = list(zip([2.0**20, *scales], scales))
    assert any(after < before for before, after in steps), "no step was skipped"
    assert any(after > before for before, after in steps), "no step was taken"
    resumed.mkdir()
    shutil.copy(straight / "checkpoint0000.pth", resumed / "checkpoint.pth")
    main_dino_mc.run(fp16_args(seco_root, resumed, 2))

    a, b = torch.load(straight / "checkpoint.pth"), torch.load(resumed / "checkpoint.pth")
    assert a["fp16_scaler"] == b["fp16_scaler"] and a["fp16_scaler"]["scale"] == scales[3]
    assert a["args"]["precision"] == "fp16" and a["args"]["use_fp16"]
    for key in a["teacher"]:
        assert torch.equal(a["teacher"][key], b["teacher"][key]), key


def weight_norm_gradients(dtype: torch.dtype | None, formula: bool) -> list[torch.Tensor]:
    """Gradients of x, v, g for DINO's prototype layer (256 -> 4096, unit-norm inputs) under ``dtype``
    autocast on the CPU (None: float64), through the layer or through autograd of g * v / ||v||."""
    torch.manual_seed(0)
    layer = vits.WeightNormLinear(256, 4096)
    torch.nn.init.kaiming_uniform_(layer.weight_v, a=5**0.5)
    torch.nn.init.uniform_(layer.weight_g, 0.5, 2.0)
    x = F.normalize(torch.randn(64, 256), dim=-1)
    grad = torch.randn(64, 4096) / 64
    if dtype is None:
        layer, x, grad = layer.double(), x.double(), grad.double()
    x.requires_grad_()
    v, g = layer.weight_v, layer.weight_g
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = F.linear(x, g * v / v.norm(dim=1, keepdim=True)) if formula else layer(x)
    out.backward(grad.to(out.dtype))
    return [x.grad, v.grad, g.grad]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_norm_backward_as_on_a_gpu_is_as_accurate_as_the_formula(monkeypatch, dtype):
    """On a GPU the layer's backward runs its two products in the forward's precision; run that choice on a CPU
    and compare with float64: each gradient is as close as autograd of the formula under the same autocast."""
    truth = weight_norm_gradients(None, formula=True)
    formula = weight_norm_gradients(dtype, formula=True)
    monkeypatch.setattr(vits, "backward_dtype", lambda product, grad_out: product.dtype)
    gpu = weight_norm_gradients(dtype, formula=False)
    for name, mine, reference, exact in zip("xvg", gpu, formula, truth, strict=True):
        error, reference_error = ((t.double() - exact).norm() / exact.norm() for t in (mine, reference))
        print(f"{dtype} d{name}: relative error {error:.2e} (formula {reference_error:.2e})")
        assert mine.dtype == reference.dtype == torch.float32
        assert error <= 1.1 * reference_error + 1e-6


def test_teacher_wrapped_in_ddp_trains_and_follows_the_student(tmp_path, monkeypatch):
    """A distributed CNN on CUDA gets SyncBatchNorm and a DDP-wrapped teacher; the same wrapping under gloo (the
    SyncBatchNorm conversion itself needs CUDA tensors and is left out): two training steps run, the EMA
    (momentum 0) moves the teacher onto the student, and the teacher's checkpoint keys carry DDP's prefix."""
    monkeypatch.setattr(main_dino_mc, "uses_sync_batchnorm", lambda model, args: args.distributed)
    monkeypatch.setattr(torch.nn.SyncBatchNorm, "convert_sync_batchnorm", lambda module: module)
    args = argparse.Namespace(arch="resnet18", patch_size=16, bands="B4,B3,B2", drop_path_rate=0.0, out_dim=32)
    args.__dict__.update(use_bn_in_head=True, norm_last_layer=True, device="cpu", gpu=0, distributed=True)
    args.__dict__.update(epochs=1, print_freq=100, global_crops_number=2, clip_grad=3.0, freeze_last_layer=0)
    args.__dict__.update(checkpoint_every_iters=0, batch_size_per_gpu=2, output_dir=str(tmp_path))
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        student, teacher, teacher_without_ddp = main_dino_mc.build_models(args)
        assert isinstance(teacher, torch.nn.parallel.DistributedDataParallel) and teacher.module is teacher_without_ddp
        assert all(key.startswith("module.") for key in teacher.state_dict())
        ema_pairs = (list(teacher_without_ddp.parameters()), list(student.module.parameters()))
        dino_loss = main_dino_mc.DINOLoss(args.out_dim, 4, 0.04, 0.04, 0, args.epochs)
        optimizer = utils.build_optimizer("adamw", utils.get_params_groups(student))
        batches = [[torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(2)]] * 2
        main_dino_mc.train_one_epoch(
            *(student, teacher, ema_pairs, dino_loss, batches, optimizer),
            *(torch.full((2,), 0.01), torch.full((2,), 0.04), torch.zeros(2), 0, None, "fp32", args),
            first_iteration=0,
            meters={},
            watch=preemption.PreemptionWatch(),
            save=lambda *unused: {},
        )
    finally:
        torch.distributed.destroy_process_group()
    for (name, trained), followed in zip(student.module.named_parameters(), teacher_without_ddp.parameters()):
        assert torch.equal(trained, followed), name
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda`` of a machine with 8 GPUs whose generator states are readable tensors; every call is logged.
    Reading all GPUs' states at once (a CUDA context on each) is an error here."""
    log = []

    def get_rng_state(device="cuda"):
        log.append(("get", str(device)))
        return torch.tensor([torch.device(device).index or 0], dtype=torch.uint8)

    def get_rng_state_all():
        raise AssertionError("every GPU's generator read: a CUDA context on each of them")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", get_rng_state_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: log.append(("set", state.item(), device)))
    return log


def test_checkpoint_holds_the_generator_of_the_runs_own_gpu(fake_cuda, tmp_path):
    """Rank 3's state is its GPU's (cuda:3) only, survives a weights_only load, and goes back to the GPU the
    resumed process runs on: cuda:0 for a task that sees its own GPU only (srun --gpus-per-task)."""
    utils.save_checkpoint({"rng_state": [utils.get_rng_state("cuda:3")]}, tmp_path / "checkpoint.pth")
    state = torch.load(tmp_path / "checkpoint.pth")["rng_state"][0]
    utils.set_rng_state(state, "cuda:0")
    assert fake_cuda == [("get", "cuda:3"), ("set", 3, torch.device("cuda:0"))]


def test_cpu_run_on_a_gpu_machine_leaves_the_gpus_alone(fake_cuda):
    state = utils.get_rng_state("cpu")
    utils.set_rng_state(state, "cpu")
    assert "cuda" not in state and fake_cuda == []


def test_older_checkpoint_with_every_gpus_generator_restores_its_own(fake_cuda):
    """Older checkpoints hold a list of all visible GPUs' states: the process takes its device's, and one
    that sees fewer GPUs than were saved does not fail on a device it does not have."""
    state = utils.get_rng_state("cpu")
    state["cuda"] = [torch.tensor([i], dtype=torch.uint8) for i in range(8)]
    utils.set_rng_state(state, "cuda:5")
    utils.set_rng_state({**state, "cuda": state["cuda"][:1]}, "cuda:5")
    assert fake_cuda == [("set", 5, torch.device("cuda:5"))]
