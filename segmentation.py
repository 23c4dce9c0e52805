"""Siamese U-Net for bi-temporal change detection (OSCD) on a pretrained backbone, as in SeCo / DINO-MC.

Both dates go through the same encoder; at every level the features are fused by their absolute difference
|f1 - f2|, so anything identical on both dates cancels and the decoder sees only what changed. The decoder
(EVALUATION.md) goes up one level at a time: upsample x2, conv3x3, concatenate the skip, conv3x3 + BN + ReLU
+ Dropout2d(0.3); a last upsampling to the input size and a 1x1 convolution give one change logit per pixel.

Encoders give a list of feature maps, shallow to deep:

- ResNet / WRN (torchvision): after conv1+bn+relu (64 ch, stride 2), layer1 (4), layer2 (8), layer3 (16),
  layer4 (32) -- 64 / 256 / 512 / 1024 / 2048 channels for ResNet-50.
- ViT: the patch tokens of 4 evenly spaced blocks (e.g. 3, 6, 9, 12 of 12), layer-normed, reshaped to maps
  and resampled bilinearly to strides 4, 8, 16, 32 (a ViT has one resolution; the U-Net needs a pyramid).
- Swin (torchvision): the outputs of its 4 stages (strides 4, 8, 16, 32).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils


class ResNetEncoder(nn.Module):
    """The five feature maps of a torchvision ResNet / Wide ResNet (stem, layer1..layer4)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = self.backbone
        stem = b.relu(b.bn1(b.conv1(x)))
        f1 = b.layer1(b.maxpool(stem))
        f2 = b.layer2(f1)
        f3 = b.layer3(f2)
        return [stem, f1, f2, f3, b.layer4(f3)]


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
    """The outputs of the 4 stages of a torchvision Swin (channels-last inside, returned as NCHW)."""

    STAGES = (1, 3, 5, 7)  # indexes in swin.features: stage blocks, between the patch-merging layers

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

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


class Up(nn.Module):
    """One decoder level: upsample x2, conv3x3, concatenate the skip, conv3x3 + BN + ReLU + Dropout2d."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, dropout: float = 0.3):
        super().__init__()
        self.up_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.fuse = nn.Sequential(
            nn.Conv2d(out_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # Upsampling to the skip's size is x2, and also right when an odd size was rounded down on the way in.
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([self.up_conv(x), skip], dim=1))


class SiameseUNet(nn.Module):
    """Change logits (B, 1, H, W) for a pair of images (B, C, H, W), with a shared, optionally frozen encoder."""

    def __init__(self, backbone: nn.Module, in_chans: int, freeze_encoder: bool = True, probe_size: int = 64):
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
        self.ups = nn.ModuleList(
            Up(channels[i + 1], channels[i], channels[i]) for i in reversed(range(len(channels) - 1))
        )
        self.head = nn.Conv2d(channels[0], 1, kernel_size=1)

    def train(self, mode: bool = True) -> SiameseUNet:
        """A frozen encoder stays in eval mode (its BatchNorm statistics are part of the pretrained weights)."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            return self.encoder(x)

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        batch = img1.shape[0]
        features = self.encode(torch.cat([img1, img2]))  # both dates in one pass through the shared encoder
        diffs = [(f[:batch] - f[batch:]).abs() for f in features]
        x = diffs[-1]
        for up, skip in zip(self.ups, reversed(diffs[:-1])):
            x = up(x, skip)
        x = F.interpolate(x, size=img1.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(x)
