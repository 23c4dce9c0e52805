"""torch.hub entry points of the published DINO-MC and DINO-TP backbones (DINO's convention).

    import torch
    model = torch.hub.load("/path/to/this/repo", "dino_mc_vits8", source="local")
    model = torch.hub.load("OWNER/REPO:main", "dino_mc_vits8")   # the GitHub copy of this repository

Each entry returns the TEACHER backbone (the evaluated network) with its projection head removed: a ViT gives
the CLS token after the final norm, a ResNet / WRN / Swin its pooled feature. ``pretrained=True`` fetches the
published checkpoint (Google Drive) through the loader of ``--pretrained_weights``: downloaded once into
``$DINO_MC_CACHE`` (default ``~/.cache/dino_mc``; an interrupted download is started again, never used), loaded
with ``torch.load(weights_only=True)`` and strictly. Keyword arguments: ``checkpoint_key`` ("teacher" or
"student") and those of ``utils.build_backbone`` (``drop_path_rate``; ``in_chans`` only with
``pretrained=False``, the published weights being RGB).

All eight were pretrained on SeCo-100K (Sentinel-2, five seasons per location) in RGB: bands B4, B3, B2 as
SeCo's uint8 previews. Inputs: RGB scaled to [0, 1], then ImageNet's mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.225); 224 px (Resize 256 + CenterCrop 224 as in the evaluations). The EuroSAT numbers in the
docstrings are the published ones (k-NN / linear probe / full fine-tuning, top-1 %).
"""

from __future__ import annotations

import torch.nn as nn

import utils

dependencies = ["torch", "torchvision", "timm", "numpy"]


def _published(arch: str, patch_size: int, drive_id: str, pretrained: bool, **kwargs) -> nn.Module:
    """The backbone, with the published checkpoint's ``checkpoint_key`` entry (teacher by default) loaded."""
    checkpoint_key = kwargs.pop("checkpoint_key", "teacher")
    model, _ = utils.build_backbone(arch, patch_size, **kwargs)
    if pretrained:
        utils.load_pretrained_weights(model, drive_id, checkpoint_key)
    return model


def dino_mc_vits8(pretrained: bool = True, **kwargs) -> nn.Module:
    """DINO-MC ViT-S/8 (384-d CLS feature). SeCo-100K RGB, ImageNet normalisation.
    EuroSAT: k-NN 93.41, linear 94.09, fine-tuning 98.15."""
    return _published("vit_small", 8, "18RqKqZYzigOjwbyNzLsys8bmwqxrNhyt", pretrained, **kwargs)


def dino_mc_resnet50(pretrained: bool = True, **kwargs) -> nn.Module:
    """DINO-MC ResNet-50 (2048-d pooled feature). SeCo-100K RGB, ImageNet normalisation.
    EuroSAT: k-NN 93.94, linear 95.59, fine-tuning 98.69."""
    return _published("resnet50", 16, "1Tku4QoQDc3BU1BOr8PzQWFPyVStUDsVE", pretrained, **kwargs)


def dino_mc_wrn50_2(pretrained: bool = True, **kwargs) -> nn.Module:
    """DINO-MC Wide ResNet-50-2 (2048-d pooled feature). SeCo-100K RGB, ImageNet normalisation.
    EuroSAT: k-NN 95.65, linear 95.70, fine-tuning 98.78."""
    return _published("wide_resnet50_2", 16, "1WlNDoks3Uo_Al5pUHWrhQpljDrt4Ip__", pretrained, **kwargs)


def dino_mc_swin_t(pretrained: bool = True, **kwargs) -> nn.Module:
    """DINO-MC Swin-T (torchvision swin_t, 768-d pooled feature). SeCo-100K RGB, ImageNet normalisation.
    EuroSAT: k-NN 93.22, linear 90.54, fine-tuning 98.43."""
    return _published("swin_t", 16, "1rod3PxdZ2OGqNJxLp5CAtXm7vIsLO7us", pretrained, **kwargs)


def dino_tp_vits8(pretrained: bool = True, **kwargs) -> nn.Module:
    """DINO-TP ViT-S/8 (384-d CLS feature). SeCo-100K RGB, ImageNet normalisation.
    EuroSAT: k-NN 93.15, linear 93.89 (no published fine-tuning number)."""
    return _published("vit_small", 8, "1BIRR56wCwTDlB4_eQTA0DpYYPHACHfxN", pretrained, **kwargs)


def dino_tp_resnet50(pretrained: bool = True, **kwargs) -> nn.Module:
    """DINO-TP ResNet-50 (2048-d pooled feature). SeCo-100K RGB, ImageNet normalisation.
    EuroSAT: k-NN 79.05, linear 86.70 (no published fine-tuning number)."""
    return _published("resnet50", 16, "1mHR9uv5G7-9FpEzGBvdEOcJcWbnHOGEV", pretrained, **kwargs)


def dino_tp_wrn50_2(pretrained: bool = True, **kwargs) -> nn.Module:
    """DINO-TP Wide ResNet-50-2 (2048-d pooled feature). SeCo-100K RGB, ImageNet normalisation.
    EuroSAT: k-NN 86.27, linear 88.15 (no published fine-tuning number)."""
    return _published("wide_resnet50_2", 16, "1MoclNnRlSGOKhudm5lreDYSxYJqciQar", pretrained, **kwargs)


def dino_tp_swin_t(pretrained: bool = True, **kwargs) -> nn.Module:
    """DINO-TP Swin-T (torchvision swin_t, 768-d pooled feature). SeCo-100K RGB, ImageNet normalisation.
    EuroSAT: k-NN 92.83, linear 91.94 (no published fine-tuning number)."""
    return _published("swin_t", 16, "1E00rYPB2wFvnq7exmQwVRe1koQ98BECL", pretrained, **kwargs)
