"""ViT and DINO head: parameter names of the published checkpoints, SDPA attention, position embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vision_transformer as vits
from tests import published_vit

LOCAL_SIZES = [184, 164, 144, 124, 104, 84]


def test_parameter_names_match_dino_checkpoints():
    keys = set(vits.vit_small(patch_size=8).state_dict())
    expected = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
    }
    for i in range(12):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    assert keys == expected
    head_keys = set(vits.DINOHead(384, 1000).state_dict())
    assert head_keys == {
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
        "mlp.4.weight",
        "mlp.4.bias",
        "last_layer.weight_g",
        "last_layer.weight_v",
    }


@pytest.mark.parametrize("arch,dim,heads", [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)])
def test_sizes(arch, dim, heads):
    model = getattr(vits, arch)(patch_size=16)
    assert model.embed_dim == dim and model.blocks[0].attn.num_heads == heads and len(model.blocks) == 12
    assert model.pos_embed.shape == (1, 1 + 14 * 14, dim)


def test_sdpa_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    attn = vits.Attention(dim=48, num_heads=3).eval()
    x = torch.randn(2, 10, 48)
    q, k, v = attn._qkv(x)
    weights = ((q @ k.transpose(-2, -1)) * (16**-0.5)).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 10, 48))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn.attention_map(x), weights)


@pytest.fixture(scope="module", params=[8, 16])
def tiny_vit(request):
    return vits.vit_tiny(patch_size=request.param).eval()


@pytest.mark.parametrize("size", LOCAL_SIZES + [96, 224])
def test_position_embedding_resampled_for_every_crop_size(tiny_vit, size):
    grid = size // tiny_vit.patch_size
    pos = tiny_vit.interpolate_pos_encoding(size, size)
    assert pos.shape == (1, 1 + grid * grid, 192)
    torch.testing.assert_close(pos[:, 0], tiny_vit.pos_embed[:, 0])  # the CLS position is never resampled
    with torch.no_grad():
        tokens = tiny_vit.prepare_tokens(torch.randn(1, 3, size, size))
    assert tokens.shape == (1, 1 + grid * grid, 192)


def test_forward_on_every_local_crop_size(tiny_vit):
    with torch.no_grad():
        for size in LOCAL_SIZES:
            assert tiny_vit(torch.randn(1, 3, size, size)).shape == (1, 192)


@pytest.mark.parametrize(
    "patch_size, in_chans, height, width", [(16, 3, 164, 164), (8, 12, 84, 100), (16, 3, 224, 224)]
)
def test_patch_embedding_equals_the_strided_convolution(patch_size, in_chans, height, width):
    """The patch matrix product is DINO's Conv2d(kernel = stride = patch): same tokens and same weight gradients,
    also where the size is not a multiple of the patch (the partial last row and column are dropped)."""
    embed = vits.PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=32)
    x = torch.randn(2, in_chans, height, width, dtype=torch.float64)
    embed.double()
    tokens = embed(x)
    expected = embed.proj(x).flatten(2).transpose(1, 2)
    assert tokens.shape == (2, (height // patch_size) * (width // patch_size), 32)
    torch.testing.assert_close(tokens, expected)
    grad = torch.randn_like(tokens)
    weight_grad, bias_grad = torch.autograd.grad(tokens, (embed.proj.weight, embed.proj.bias), grad)
    expected_grads = torch.autograd.grad(expected, (embed.proj.weight, embed.proj.bias), grad)
    torch.testing.assert_close(weight_grad, expected_grads[0])
    torch.testing.assert_close(bias_grad, expected_grads[1])


# Every crop size of the three modes, a non-square input, a large one; with patch 8 and 16.
PUBLISHED_SIZES = [(224, 224), *[(s, s) for s in LOCAL_SIZES], (96, 96), (112, 112), (96, 128), (480, 480)]


@pytest.fixture(scope="module", params=[8, 16])
def vit_and_published(request):
    """A ViT-Tiny with random (non-trivial) weights and the published ViT holding the same weights."""
    torch.manual_seed(request.param)
    model = vits.vit_tiny(patch_size=request.param).eval()
    return model, published_vit.published_copy(model)


@pytest.mark.parametrize("height, width", PUBLISHED_SIZES)
def test_features_equal_the_published_vit_at_every_size(vit_and_published, height, width):
    """Same weights, same input -> the published features (DINO's +0.1 scale-factor interpolation included),
    also the last attention map and the intermediate layers that visualisation and the linear probe use."""
    model, reference = vit_and_published
    if model.patch_size == 8 and height == 480:
        height = width = 240  # the 3600-token case adds nothing over patch 16 at 480 but seconds of CPU
    torch.manual_seed(height * width)
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)
        attention = model.get_last_selfattention(x)
        torch.testing.assert_close(attention, reference.get_last_selfattention(x), atol=1e-5, rtol=0)
        for ours, theirs in zip(model.get_intermediate_layers(x, 4), reference.get_intermediate_layers(x, 4)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_packed_multi_size_pass_equals_the_published_per_crop_forward(vit_and_published):
    """DINO-MC's crops (2 x 224 + 184..84) through the packed pass: the published features, crop by crop."""
    model, reference = vit_and_published
    torch.manual_seed(1)
    crops = [torch.randn(2, 3, 224, 224)] + [torch.randn(2, 3, s, s) for s in LOCAL_SIZES]
    with torch.no_grad():
        packed = model.forward_packed([torch.cat(crops[:1] * 2), *crops[1:]])
        expected = torch.cat([reference(c) for c in [crops[0], crops[0], *crops[1:]]])
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("height, width", [(84, 84), (96, 128)])
def test_position_embedding_gradients_equal_the_published_vit(height, width):
    """The training signal through the resampled embeddings is the published one too (backward of the scale-
    factor interpolation), so training steps from the same weights and crops stay together."""
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=16).eval().double()
    reference = published_vit.published_copy(model).double()
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    for name in ("pos_embed", "cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"):
        ours = model.get_parameter(name).grad
        torch.testing.assert_close(ours, reference.get_parameter(name).grad)


def test_position_embedding_sampled_with_dinos_scale_factor():
    """The +0.1 scale factor samples the source grid at other positions than resizing to the target size: the
    embeddings differ (this is what a size-based resampling got wrong), and a 224 input keeps them as they are."""
    model = vits.vit_tiny(patch_size=16)
    patch_pos = model.pos_embed[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    pos = model.interpolate_pos_encoding(112, 192)
    assert pos.shape == (1, 1 + 7 * 12, 192)
    by_scale = F.interpolate(patch_pos, scale_factor=(7.1 / 14, 12.1 / 14), mode="bicubic")
    by_size = F.interpolate(patch_pos, size=(7, 12), mode="bicubic")
    torch.testing.assert_close(pos[:, 1:], by_scale.permute(0, 2, 3, 1).reshape(1, 84, 192))
    assert (by_scale - by_size).abs().max() > 1e-3
    assert model.interpolate_pos_encoding(224, 224) is model.pos_embed
    assert model(torch.randn(1, 3, 112, 192)).shape == (1, 192)


def test_attention_and_intermediate_layers():
    model = vits.vit_tiny(patch_size=8, in_chans=12).eval()
    x = torch.randn(2, 12, 64, 96)
    attn = model.get_last_selfattention(x)
    assert attn.shape == (2, 3, 1 + 8 * 12, 1 + 8 * 12)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 97))
    layers = model.get_intermediate_layers(x, n=4)
    assert len(layers) == 4 and layers[0].shape == (2, 97, 192)
    torch.testing.assert_close(layers[-1][:, 0], model(x))


def test_dino_head_weight_norm_and_frozen_norm():
    head = vits.DINOHead(32, 50, norm_last_layer=True, hidden_dim=64, bottleneck_dim=16)
    assert not head.last_layer.weight_g.requires_grad
    torch.testing.assert_close(head.last_layer.weight_g, torch.ones(50, 1))
    x = torch.randn(4, 32)
    bottleneck = F.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.weight_v
    expected = bottleneck @ (v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(x), expected)
    assert vits.DINOHead(32, 50, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_weight_norm_backward_matches_autograd_of_the_formula():
    torch.manual_seed(0)
    layer = vits.WeightNormLinear(16, 40).double()
    torch.nn.init.normal_(layer.weight_v)
    torch.nn.init.uniform_(layer.weight_g, 0.5, 2.0)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(vits._WeightNormLinearFn.apply, (x, layer.weight_v, layer.weight_g))

    grad = torch.randn(5, 40, dtype=torch.float64)
    layer(x).backward(grad)
    got = [t.grad.clone() for t in (x, layer.weight_v, layer.weight_g)]
    for t in (x, layer.weight_v, layer.weight_g):
        t.grad = None
    v, g = layer.weight_v, layer.weight_g
    (x @ (g * v / v.norm(dim=1, keepdim=True)).T).backward(grad)
    for mine, reference in zip(got, (x.grad, v.grad, g.grad), strict=True):
        torch.testing.assert_close(mine, reference)


def test_weight_norm_frozen_g_under_bf16_autocast_gets_fp32_gradients():
    head = vits.DINOHead(32, 50, hidden_dim=64, bottleneck_dim=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(4, 32))
    out.float().sum().backward()
    assert head.last_layer.weight_v.grad.dtype == torch.float32 and head.last_layer.weight_g.grad is None
    assert head.mlp[0].weight.grad.abs().sum() > 0


def test_cpu_bf16_explicit_attention_equals_sdpa_forward_and_backward():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, requires_grad=True) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    expected.backward(torch.ones_like(expected))
    expected_grads = [t.grad.clone() for t in (q, k, v)]
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out = vits.attention(*low)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
    for mine, reference in zip(low, expected_grads, strict=True):
        torch.testing.assert_close(mine.grad.float(), reference, atol=5e-2, rtol=5e-2)


def test_zero_dropout_layers_are_identities_and_nonzero_ones_drop():
    model = vits.vit_tiny(drop_rate=0.0)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    dropping = vits.vit_tiny(drop_rate=0.5).train()
    assert isinstance(dropping.pos_drop, torch.nn.Dropout) and isinstance(dropping.blocks[0].mlp.drop, torch.nn.Dropout)
    tokens = torch.ones(1, 10, 192)
    assert (dropping.pos_drop(tokens) == 0).any()
