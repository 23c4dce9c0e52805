"""Backbones by name (backbones) and DINO's multi-crop wrapper."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import utils


@pytest.mark.parametrize("arch,dim", [("vit_tiny", 192), ("resnet18", 512), ("swin_t", 768), ("timm/resnet18", 512)])
def test_build_backbone_any_in_chans(arch, dim):
    model, feat_dim = utils.build_backbone(arch, patch_size=16, in_chans=12)
    assert feat_dim == dim
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 12, 64, 64)).shape == (2, dim)


def test_build_backbone_rejects_unknown_arch():
    with pytest.raises(ValueError, match="--arch 'vit_huge'"):
        utils.build_backbone("vit_huge")
    with pytest.raises(ValueError, match="timm has no model"):
        utils.build_backbone("timm/not_a_model")


def test_multicrop_wrapper_groups_by_size_and_keeps_order():
    calls = []

    class Recorder(nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

    wrapper = utils.MultiCropWrapper(Recorder(), nn.Identity())
    crops = [torch.full((2, 3, s, s), float(i)) for i, s in enumerate([8, 8, 6, 4])]
    out = wrapper(crops)
    assert calls == [(4, 3, 8, 8), (2, 3, 6, 6), (2, 3, 4, 4)]
    assert out[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
