"""The speed paths compute what the plain ones do: packed multi-size ViT pass, factored weight norm, fast
colour jitter and separable blur."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

import main_dino_mc
import utils
import vision_transformer as vits
from datasets import transforms

# DINO-MC's crop layout (2 globals, 6 local sizes) scaled down so the test stays fast; 36 px is not a multiple
# of the patch size, as 164 px is not in the real layout.
SIZES = [64, 64, 56, 48, 40, 36, 32, 16]


def crops(batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=generator) for s in SIZES]


def wrapper(seed: int = 0, drop_path_rate: float = 0.0) -> utils.MultiCropWrapper:
    torch.manual_seed(seed)
    backbone = vits.vit_tiny(patch_size=8, drop_path_rate=drop_path_rate)
    return utils.MultiCropWrapper(backbone, vits.DINOHead(backbone.embed_dim, 512))


def test_packed_pass_equals_one_pass_per_size():
    model = wrapper().eval()
    x = crops()
    packed = model(x)
    model.pack_crops = False
    per_size = model(x)
    assert packed.shape == (len(SIZES) * 2, 512)
    torch.testing.assert_close(packed, per_size, rtol=1e-5, atol=1e-5)


def test_packed_pass_gives_the_same_gradients_and_dino_loss():
    x = crops()
    results = []
    for pack in (True, False):
        student, teacher = wrapper(), wrapper()
        student.pack_crops = teacher.pack_crops = pack
        loss_fn = main_dino_mc.DINOLoss(512, len(SIZES), 0.04, 0.04, 0, 2)
        loss, _ = loss_fn(student(x), teacher(x[:2]), epoch=0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in student.named_parameters() if p.grad is not None}))
    (loss_packed, grads_packed), (loss_plain, grads_plain) = results
    torch.testing.assert_close(loss_packed, loss_plain, rtol=1e-6, atol=1e-6)
    assert grads_packed.keys() == grads_plain.keys() and len(grads_packed) > 100
    for name, grad in grads_packed.items():
        torch.testing.assert_close(grad, grads_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_drop_path_drops_whole_samples_with_the_right_scale():
    torch.manual_seed(0)
    block = vits.Block(16, 2, drop_path=0.3).train()
    segments = [(50, 5), (30, 3)]
    ones = torch.ones(sum(b * n for b, n in segments), 16)
    residual = torch.full_like(ones, 2.0)
    out = block._packed_residual(residual, ones, segments) - residual  # the residual sum adds x unchanged
    per_sample = torch.cat([out[:250, 0].view(50, 5), F.pad(out[250:, 0].view(30, 3), (0, 2), value=float("nan"))])
    first = per_sample[:, :1]
    assert torch.all((per_sample == first) | per_sample.isnan()), "a sample's tokens must share one factor"
    assert torch.all((first == 0) | torch.isclose(first, torch.tensor(1.0 / 0.7))), "DropPath keeps and rescales"
    kept = (first > 0).float().mean().item()
    assert 0.5 < kept < 0.9  # keep probability 0.7 over 80 samples
    assert torch.equal(block.eval()._packed_residual(residual, ones, segments), residual + ones)


def test_packed_training_pass_runs_drop_path_and_matches_in_eval():
    model = wrapper(drop_path_rate=0.5).train()
    x = crops()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b), "stochastic depth must act in training"
    model.eval()
    packed = model(x)
    model.pack_crops = False
    torch.testing.assert_close(packed, model(x), rtol=1e-5, atol=1e-5)


def test_factored_weight_norm_equals_the_materialised_weight():
    torch.manual_seed(0)
    layer = vits.WeightNormLinear(32, 300)
    torch.nn.init.normal_(layer.weight_v)
    layer.weight_g.data.uniform_(0.5, 2.0)
    x = torch.randn(8, 32)
    out = layer(x)
    reference = F.linear(x, layer.weight_v * (layer.weight_g / layer.weight_v.norm(dim=1, keepdim=True)))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [layer.weight_v, layer.weight_g])
    expected = torch.autograd.grad(reference.square().sum(), [layer.weight_v, layer.weight_g])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_fast_hue_and_blur_equal_torchvision():
    torch.manual_seed(0)
    image = torch.rand(3, 40, 48)
    image[:, :5, :5] = 0.4  # grey pixels: zero chroma
    image[0, 10:15, 10:15] = 1.0  # ties between max channels
    image[1, 10:15, 10:15] = 1.0
    for factor in (-0.5, -0.2, 0.0, 0.13, 0.5):
        expected = TF.adjust_hue(image, factor)
        torch.testing.assert_close(transforms.adjust_hue(image, factor), expected, atol=2e-6, rtol=0)
    for kernel, sigma in ((3, 0.1), (7, 1.1), (13, 2.0)):
        torch.testing.assert_close(
            transforms.gaussian_blur(image, kernel, sigma), TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        )


def test_colour_jitter_draws_like_torchvision():
    image = torch.rand(3, 24, 24)
    torch.manual_seed(5)
    ours = transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)(image)
    torch.manual_seed(5)
    theirs = transforms.v2.ColorJitter(0.8, 0.8, 0.8, 0.2)(image)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
