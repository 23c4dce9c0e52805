"""What only a GPU can show: the CUDA device, TF32, the CUDA generator and the low-precision steps on CUDA.
Marked ``gpu``: skipped where torch sees no GPU (tests/conftest.py); benchmarks/gpu_check.sh covers the rest."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

import main_dino_mc
import utils
import vision_transformer as vits
from datasets import pretraining
from datasets.demo import write_seco_demo

pytestmark = pytest.mark.gpu


def test_a_plain_process_takes_the_first_gpu_with_tf32(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(device="auto", dist_url="env://")
    utils.init_distributed_mode(args)
    assert args.device == "cuda:0" and torch.cuda.current_device() == 0
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_seeded_samples_leave_the_gpus_generator_where_it_was():
    torch.cuda.manual_seed(5)
    before = torch.cuda.get_rng_state()
    pretraining.SeededSamples(list(range(4)))[2, 99]
    assert torch.equal(torch.cuda.get_rng_state(), before)


def test_checkpointed_cuda_generator_continues_its_stream():
    state = utils.get_rng_state("cuda:0")
    expected = torch.rand(4, device="cuda:0")
    utils.set_rng_state(state, "cuda:0")
    assert torch.equal(torch.rand(4, device="cuda:0"), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_norm_backward_on_cuda_is_as_accurate_as_the_formula(dtype):
    torch.manual_seed(0)
    layer = vits.WeightNormLinear(256, 4096).cuda()
    x = F.normalize(torch.randn(64, 256, device="cuda"), dim=-1).requires_grad_()
    grad = torch.randn(64, 4096, device="cuda") / 64
    v, g = layer.weight_v, layer.weight_g
    exact = torch.autograd.grad(
        F.linear(x.double(), (g.double() * v.double() / v.double().norm(dim=1, keepdim=True))), (x, v), grad.double()
    )
    with torch.autocast("cuda", dtype=dtype):
        formula = torch.autograd.grad(F.linear(x, g * v / v.norm(dim=1, keepdim=True)).float(), (x, v), grad)
        mine = torch.autograd.grad(layer(x).float(), (x, v), grad)
    for a, b, t in zip(mine, formula, exact, strict=True):
        error, reference = ((m.double() - t).norm() / t.norm() for m in (a, b))
        assert error <= 1.1 * reference + 1e-6


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pretraining_on_cuda_trains_finite_weights(tmp_path, precision):
    seco = write_seco_demo(tmp_path / "seco", n_locations=4, n_acquisitions=2)
    main_dino_mc.run(
        [*("--arch", "vit_tiny", "--patch_size", "16", "--out_dim", "1024", "--batch_size_per_gpu", "2"), "--epochs"]
        + ["2", "--global_crops_size", "64", "--local_crops_number", "2", "--size_crops", "32", "--num_workers", "0"]
        + ["--precision", precision, "--device", "cuda", "--data_path", str(seco), "--output_dir", str(tmp_path / "o")]
    )
    checkpoint = torch.load(tmp_path / "o" / "checkpoint.pth")
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["precision"] == precision
    assert all(torch.isfinite(t).all() for t in checkpoint["teacher"].values() if t.is_floating_point())
    assert ("fp16_scaler" in checkpoint) == (precision == "fp16")
