"""Files and models in the formats of the published DINO-MC scripts, for tests (docs/evaluation.md).

- :func:`as_numpy1_pickle`: a torch.save file rewritten so its pickle names numpy's builders as numpy 1.x did,
  as in the released files;
- :func:`write_published_eurosat`: ``main_eurosat.py``'s ``luc_checkpoint_best.pth.tar``;
- :func:`write_published_oscd`: ``main_oscd.py``'s PyTorch Lightning ``.ckpt``;
- :class:`PublishedUNet`: that script's Siamese U-Net, computed as its description says (a test reference).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# DINO-style loops write the schedules' numpy floats into the param groups; the released files hold them.
NUMPY_OPTIMIZER = {
    "state": {},
    "param_groups": [{"lr": np.float64(5e-4), "weight_decay": np.float64(0.0), "params": [0]}],
}


def as_numpy1_pickle(path: Path) -> bytes:
    """Rewrite a torch.save file so that its pickle names numpy's builders as numpy 1.x wrote them
    (``numpy.core.multiarray.scalar`` ...), as in the released DINO-MC checkpoints; returns the new pickle.

    The pickle's GLOBAL opcodes hold module names as newline-ended text, so the rename keeps it valid.
    """
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    pickled = b""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info, data in entries:
            if info.filename.endswith("/data.pkl"):
                data = pickled = data.replace(b"numpy._core.", b"numpy.core.")
            dst.writestr(info, data)
    return pickled


def write_published_eurosat(path: Path, classifier_state: dict[str, torch.Tensor]) -> Path:
    """``luc_checkpoint_best.pth.tar``: the whole classifier (no prefix), numpy-float optimizer, numpy 1.x pickle."""
    torch.save(
        {
            "epoch": 100,
            "state_dict": classifier_state,
            "optimizer": NUMPY_OPTIMIZER,
            "scheduler": {"T_max": 100, "eta_min": 0, "base_lrs": [np.float64(1.25e-4)], "last_epoch": 100},
            "best_acc": np.float64(98.15),
        },
        path,
    )
    as_numpy1_pickle(path)
    return path


def write_published_oscd(path: Path, unet_state: dict[str, torch.Tensor], feat_dim: int) -> Path:
    """A PyTorch Lightning ``.ckpt`` of ``main_oscd.py``'s ``SiamSegment``: its U-Net under ``model.``, the
    encoder's backbone under ``model.encoder.encoder.`` with the empty classifier of ``num_classes=0``."""
    state = {f"model.{k}": v for k, v in unet_state.items()}
    state["model.encoder.encoder.fc.weight"] = torch.empty(0, feat_dim)  # nn.Linear(feat_dim, 0)
    state["model.encoder.encoder.fc.bias"] = torch.empty(0)
    torch.save(
        {
            "epoch": 49,
            "global_step": 1250,
            "pytorch-lightning_version": "1.3.8",
            "state_dict": state,
            "callbacks": {},
            "optimizer_states": [NUMPY_OPTIMIZER],
            "lr_schedulers": [{"gamma": 0.95, "base_lrs": [0.003], "last_epoch": 50}],
            "hparams_name": "kwargs",
            "hyper_parameters": {"lr": 0.003, "weight_decay": 1e-4, "backbone_type": "random"},
        },
        path,
    )
    as_numpy1_pickle(path)
    return path


class PublishedEncoder(nn.Module):
    """The published encoder: the torchvision children of a ResNet run in order, outputs 0, 4, 5, 6, 7 kept."""

    LEVELS = (0, 4, 5, 6, 7)

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.encoder = backbone

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i, child in enumerate(list(self.encoder.children())[: self.LEVELS[-1] + 1]):
            x = child(x)
            if i in self.LEVELS:
                features.append(x)
        return features


class OutConv(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PublishedUNet(nn.Module):
    """The published decoder (docs/evaluation.md): per step nearest x2, shrink{i}, cat the |f1 - f2| skip (x4 if its
    size differs), shrink2{i}, batchnorm{i}, ReLU, Dropout2d(0.3); nearest x2 and outc at the end."""

    def __init__(self, backbone: nn.Module, channels: list[int]):
        super().__init__()
        self.encoder = PublishedEncoder(backbone)
        for i in range(len(channels) - 1):
            setattr(self, f"shrink{i}", nn.Conv2d(channels[i + 1], channels[i], 3, padding=1))
            setattr(self, f"shrink2{i}", nn.Conv2d(2 * channels[i], channels[i], 3, padding=1, bias=False))
            setattr(self, f"batchnorm{i}", nn.BatchNorm2d(channels[i]))
        self.outc = OutConv(channels[0])
        self.levels = len(channels) - 1
        self.steps: list[torch.Tensor] = []

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        diffs = [(a - b).abs() for a, b in zip(self.encoder(x1), self.encoder(x2))]
        x = diffs[-1]
        self.steps = []
        for i in reversed(range(self.levels)):
            x = getattr(self, f"shrink{i}")(F.interpolate(x, scale_factor=2))
            skip = diffs[i]
            if skip.shape[-2:] != x.shape[-2:]:
                skip = F.interpolate(skip, scale_factor=4)
            x = F.relu(getattr(self, f"batchnorm{i}")(getattr(self, f"shrink2{i}")(torch.cat([x, skip], 1))))
            x = F.dropout2d(x, 0.3, self.training)
            self.steps.append(x)
        return self.outc(F.interpolate(x, scale_factor=2))
