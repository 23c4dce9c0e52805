"""Backbones by name (DINO's ViTs, torchvision CNNs and Swin, timm models) and DINO's multi-crop wrapper."""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.hub
import torch.nn as nn

import vision_transformer as vits

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "wide_resnet50_2", "swin_t")


VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base")


VIT_PATCH_SIZES = (8, 14, 16)


def _adapt_first_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """A copy of the stem convolution that takes ``in_chans`` channels (same kernel, stride, padding)."""
    return nn.Conv2d(
        in_chans,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )


def _build_torchvision(arch: str, in_chans: int) -> tuple[nn.Module, int]:
    import torchvision.models as tvm

    model = getattr(tvm, arch)(weights=None)
    if arch == "swin_t":
        feat_dim = model.head.in_features
        model.head = nn.Identity()
        if in_chans != 3:
            model.features[0][0] = _adapt_first_conv(model.features[0][0], in_chans)
    else:
        feat_dim = model.fc.in_features
        model.fc = nn.Identity()
        if in_chans != 3:
            model.conv1 = _adapt_first_conv(model.conv1, in_chans)
    return model, feat_dim


def _build_timm(name: str, in_chans: int, drop_path_rate: float) -> tuple[nn.Module, int]:
    import timm

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "in_chans": in_chans}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    try:  # timm ViTs need this to accept the multi-crop sizes; other models do not know the argument
        model = timm.create_model(name, dynamic_img_size=True, **kwargs)
    except TypeError:
        model = timm.create_model(name, **kwargs)
    return model, model.num_features


def build_backbone(
    arch: str, patch_size: int = 16, in_chans: int = 3, drop_path_rate: float = 0.0
) -> tuple[nn.Module, int]:
    """Build a backbone that maps (B, in_chans, H, W) to a (B, feat_dim) feature; return (model, feat_dim).

    ``vit_tiny|vit_small|vit_base`` (DINO's ViT, ``patch_size`` 8 or 16), torchvision ``resnet18|resnet34|
    resnet50|wide_resnet50_2|swin_t`` (classifier replaced by Identity: the pooled feature), or any timm
    model as ``timm/<name>``. Raises ValueError naming the flag for an unknown architecture.
    """
    arch = check_arch(arch, patch_size)
    if arch in VIT_ARCHS:
        model = getattr(vits, arch)(patch_size=patch_size, in_chans=in_chans, drop_path_rate=drop_path_rate)
        return model, model.embed_dim
    if arch in TORCHVISION_ARCHS:
        return _build_torchvision(arch, in_chans)
    return _build_timm(arch.split("/", 1)[1], in_chans, drop_path_rate)


def check_arch(arch: str, patch_size: int = 16) -> str:
    """``arch`` as :func:`build_backbone` understands it (DINO's ``deit`` alias resolved), checked without
    building anything; raises ValueError naming ``--arch`` or ``--patch_size``."""
    arch = arch.replace("deit", "vit")  # DINO's alias
    if arch in VIT_ARCHS:
        if patch_size not in VIT_PATCH_SIZES:
            raise ValueError(f"--patch_size {patch_size}: expected one of {', '.join(map(str, VIT_PATCH_SIZES))}")
        return arch
    if arch in TORCHVISION_ARCHS:
        return arch
    if arch.startswith("timm/"):
        import timm

        name = arch.split("/", 1)[1]
        if not timm.is_model(name):
            raise ValueError(f"--arch {arch}: timm has no model named {name!r}")
        return arch
    choices = ", ".join(VIT_ARCHS + TORCHVISION_ARCHS)
    raise ValueError(f"--arch {arch!r} is not supported; expected one of {choices} or timm/<model name>")


def add_backbone_args(parser: argparse.ArgumentParser, arch: str = "vit_small", patch_size: int = 8) -> None:
    """The backbone flags every script shares (published DINO-MC ViTs are ViT-S/8)."""
    group = parser.add_argument_group("backbone")
    group.add_argument(
        "--arch",
        default=arch,
        type=str,
        help="vit_tiny | vit_small | vit_base | resnet50 | wide_resnet50_2 | swin_t | resnet18 | timm/<name>.",
    )
    group.add_argument(
        "--patch_size", default=patch_size, type=int, help="ViT patch size in pixels (8 or 16 as published; 14)."
    )
    group.add_argument(
        "--bands",
        default="RGB",
        type=str,
        help="Input bands: RGB (B4,B3,B2), ALL (12 Sentinel-2 L2A bands) or a list like B4,B3,B2,B8.",
    )


def is_vit_arch(arch: str) -> bool:
    """Whether --arch names one of this project's ViTs (DINO's ``deit`` alias included)."""
    return arch.replace("deit", "vit") in VIT_ARCHS


def is_vit(model: nn.Module) -> bool:
    return isinstance(model, vits.VisionTransformer)


class MultiCropWrapper(nn.Module):
    """Run the backbone on a list of crops, grouped by resolution, then the head once on all features.

    Consecutive crops of equal size are concatenated into one batch (DINO's scheme); the features come back
    in crop order, so the output is (n_crops * B, out_dim) with crop i at rows [i*B, (i+1)*B).
    With ``pack_crops`` (default) a ViT runs all the size groups in ONE packed pass
    (``VisionTransformer.forward_packed``: same result, fewer and larger matrix products; figures in
    benchmarks/README.md); other backbones, or ``pack_crops=False``, get one pass per group as in DINO.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, pack_crops: bool = True):
        super().__init__()
        # DINO removes a classifier here. Only a plain Linear one: the ``head`` of a timm ConvNeXt / MaxViT /
        # CoAtNet built with num_classes=0 (:func:`build_backbone`) pools and normalises the pre-logit feature.
        for name in ("fc", "head"):
            if isinstance(getattr(backbone, name, None), nn.Linear):
                setattr(backbone, name, nn.Identity())
        self.backbone = backbone
        self.head = head
        self.pack_crops = pack_crops

    def forward(
        self, x: torch.Tensor | list[torch.Tensor], return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Head outputs of all crops in crop order; with ``return_features`` also the backbone features they
        came from (the health metrics read the teacher's without a second pass)."""
        if not isinstance(x, (list, tuple)):
            x = [x]
        groups = []
        start = 0
        while start < len(x):
            end = start + 1
            while end < len(x) and x[end].shape[-2:] == x[start].shape[-2:]:
                end += 1
            groups.append(torch.cat(x[start:end]) if end - start > 1 else x[start])
            start = end
        if self.pack_crops and len(groups) > 1 and is_vit(self.backbone):
            features = self.backbone.forward_packed(groups)
        else:
            outs = [self.backbone(group) for group in groups]
            features = torch.cat([out[0] if isinstance(out, tuple) else out for out in outs])
        output = self.head(features)
        return (output, features) if return_features else output


def has_batchnorms(model: nn.Module) -> bool:
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(m, bn_types) for m in model.modules())
