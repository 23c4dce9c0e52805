"""Siamese U-Net for bi-temporal change detection (OSCD) on a pretrained backbone, as in SeCo / DINO-MC.

Both dates go through the same encoder; at every level the features are fused by their absolute difference
|f1 - f2|, so anything identical on both dates cancels and the decoder sees only what changed. The decoder is
the published one (``main_oscd.py``'s U-Net, docs/evaluation.md), layer for layer and under its parameter names, so
its Lightning checkpoints load (:func:`from_published_state_dict`). Decoder step i, from the deepest level:
nearest x2 upsampling, ``shrink{i}`` (conv3x3 from level i+1's channels to level i's, with bias), concatenation
of level i's skip, ``shrink2{i}`` (conv3x3, no bias), ``batchnorm{i}``, ReLU, Dropout2d(0.3); then a nearest
upsampling to the input size and ``outc.conv`` (1x1 conv to one change logit per pixel).

Encoders give a list of feature maps, shallow to deep:

- ResNet / WRN (torchvision children 0, 4, 5, 6, 7, as published): the conv1 output (64 ch, stride 2, before
  bn1 and ReLU), layer1 (4), layer2 (8), layer3 (16), layer4 (32) -- 64 / 256 / 512 / 1024 / 2048 channels for
  ResNet-50.
- ViT (not in the published code): the patch tokens of 4 evenly spaced blocks (e.g. 3, 6, 9, 12 of 12),
  layer-normed, reshaped to maps and resampled bilinearly to strides 4, 8, 16, 32 (a ViT has one resolution;
  the U-Net needs a pyramid).
- Swin (torchvision, not in the published code): the outputs of its 4 stages (strides 4, 8, 16, 32).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

DECODER_DROPOUT = 0.3  # Dropout2d after every decoder step, as published


class ResNetEncoder(nn.Module):
    """The five feature maps of a torchvision ResNet / Wide ResNet: conv1 (before bn1 / ReLU), layer1..layer4."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = self.backbone
        conv1 = b.conv1(x)
        f1 = b.layer1(b.maxpool(b.relu(b.bn1(conv1))))
        f2 = b.layer2(f1)
        f3 = b.layer3(f2)
        return [conv1, f1, f2, f3, b.layer4(f3)]


class ViTEncoder(nn.Module):
    """Patch-token maps of ``levels`` evenly spaced blocks of a ViT, resampled to strides 4, 8, 16, 32."""

    STRIDES = (4, 8, 16, 32)

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        depth = len(backbone.blocks)
        step = depth // len(self.STRIDES)
        self.block_indexes = [step * (i + 1) - 1 for i in range(len(self.STRIDES))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        height, width = x.shape[-2:]
        patch = self.backbone.patch_embed.patch_size
        grid = (height // patch, width // patch)
        tokens = self.backbone.prepare_tokens(x)
        maps = []
        for i, block in enumerate(self.backbone.blocks):
            tokens = block(tokens)
            if i in self.block_indexes:
                patches = self.backbone.norm(tokens)[:, 1:]
                maps.append(patches.transpose(1, 2).reshape(x.shape[0], -1, *grid))
        return [
            F.interpolate(m, size=(height // s, width // s), mode="bilinear", align_corners=False)
            for m, s in zip(maps, self.STRIDES)
        ]


class SwinEncoder(nn.Module):
    """The outputs of the 4 stages of a torchvision Swin (channels-last inside, returned as NCHW).

    The backbone's final LayerNorm (``norm``, before the classifier's pooling) is not on this path: it is
    frozen, since a trainable parameter that never gets a gradient stops DistributedDataParallel at its second
    step ("Expected to have finished reduction") when the encoder is fine-tuned on several processes.
    """

    STAGES = (1, 3, 5, 7)  # indexes in swin.features: stage blocks, between the patch-merging layers

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        backbone.norm.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for i, layer in enumerate(self.backbone.features):
            x = layer(x)
            if i in self.STAGES:
                maps.append(x.permute(0, 3, 1, 2))
        return maps


def build_encoder(backbone: nn.Module) -> nn.Module:
    """The multi-level encoder for a backbone from ``utils.build_backbone`` (ResNet/WRN, ViT or Swin)."""
    if utils.is_vit(backbone):
        return ViTEncoder(backbone)
    if hasattr(backbone, "layer4"):
        return ResNetEncoder(backbone)
    if hasattr(backbone, "features") and hasattr(backbone, "permute"):
        return SwinEncoder(backbone)
    raise ValueError(f"no change-detection encoder for {type(backbone).__name__}; use a ResNet/WRN, ViT or Swin")


class OutConv(nn.Module):
    """The published U-Net's ``outc``: a 1x1 convolution to one logit (its own module, for the key names)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SiameseUNet(nn.Module):
    """Change logits (B, 1, H, W) for a pair of images (B, C, H, W), with a shared, optionally frozen encoder."""

    def __init__(
        self,
        backbone: nn.Module,
        in_chans: int,
        freeze_encoder: bool = True,
        probe_size: int = 64,
        dropout: float = DECODER_DROPOUT,
    ):
        super().__init__()
        self.encoder = build_encoder(backbone)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            for p in self.encoder.parameters():
                p.requires_grad = False
        with torch.no_grad():  # the channels of every level, read off a probe input
            was_training = self.encoder.training
            probe = self.encoder.eval()(torch.zeros(1, in_chans, probe_size, probe_size))
            self.encoder.train(was_training)
        channels = [f.shape[1] for f in probe]
        self.levels = len(channels) - 1
        for i in range(self.levels):
            setattr(self, f"shrink{i}", nn.Conv2d(channels[i + 1], channels[i], 3, padding=1))
            setattr(self, f"shrink2{i}", nn.Conv2d(2 * channels[i], channels[i], 3, padding=1, bias=False))
            setattr(self, f"batchnorm{i}", nn.BatchNorm2d(channels[i]))
        self.dropout = nn.Dropout2d(dropout)
        self.outc = OutConv(channels[0])

    def train(self, mode: bool = True) -> SiameseUNet:
        """A frozen encoder stays in eval mode (its BatchNorm statistics are part of the pretrained weights)."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            return self.encoder(x)

    def decode_step(self, i: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Decoder step ``i``: x2 nearest, shrink{i}, concatenate the skip, shrink2{i} + batchnorm{i} + ReLU +
        dropout. A skip of another size is brought to x's (nearest; the published x4 where it is 4x smaller)."""
        x = getattr(self, f"shrink{i}")(F.interpolate(x, scale_factor=2, mode="nearest"))
        if skip.shape[-2:] != x.shape[-2:]:
            skip = F.interpolate(skip, size=x.shape[-2:], mode="nearest")
        x = getattr(self, f"shrink2{i}")(torch.cat([x, skip], dim=1))
        return self.dropout(F.relu(getattr(self, f"batchnorm{i}")(x)))

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        batch = img1.shape[0]
        features = self.encode(torch.cat([img1, img2]))  # both dates in one pass through the shared encoder
        diffs = [(f[:batch] - f[batch:]).abs() for f in features]
        x = diffs[-1]
        for i in reversed(range(self.levels)):
            x = self.decode_step(i, x, diffs[i])
        return self.outc(F.interpolate(x, size=img1.shape[-2:], mode="nearest"))


def from_published_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published ``main_oscd.py`` Lightning checkpoint's ``state_dict`` under this module's names.

    Published: ``model.encoder.encoder.<torchvision names>`` (the backbone, built with ``num_classes=0``, so
    an empty ``fc.weight`` [0, 2048]) and ``model.{shrink,shrink2,batchnorm}{i}.*``, ``model.outc.conv.*``.
    Here: ``encoder.backbone.*`` (no classifier) and the decoder under the same names. A state dict already in
    this module's names is returned as it is.
    """
    if not any(key.startswith("model.") for key in state_dict):
        return state_dict
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("model.")
        if key.startswith("encoder.encoder."):
            key = "encoder.backbone." + key.removeprefix("encoder.encoder.")
            if key.startswith("encoder.backbone.fc."):
                continue
        converted[key] = value
    return converted
