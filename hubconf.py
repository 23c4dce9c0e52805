"""torch.hub entry points of the published DINO-MC and DINO-TP backbones (DINO's convention).

    import torch
    model = torch.hub.load("/path/to/repo", "dino_mc_vits8", source="local")   # a clone of this repository

Each entry returns the TEACHER backbone (the evaluated network) with its projection head removed: a ViT gives
the CLS token after the final norm, a ResNet / WRN / Swin its pooled feature. ``pretrained=True`` fetches the
published checkpoint (Google Drive) through the loader of ``--pretrained_weights``: downloaded once into
``$DINO_MC_CACHE`` (default ``~/.cache/dino_mc``; an interrupted download is started again, never used), loaded
with ``torch.load(weights_only=True)`` and strictly. Keyword arguments: ``checkpoint_key`` ("teacher" or
"student") and those of ``utils.build_backbone`` (``drop_path_rate``; ``in_chans`` only with
``pretrained=False``, the published weights being RGB).

The entries, their Drive ids, inputs and published EuroSAT numbers come from the table in ``published.py``;
each entry's docstring gives them.
"""

from __future__ import annotations

import torch.nn as nn

import published
import utils

dependencies = ["torch", "torchvision", "timm", "numpy"]


def _load(entry: published.Published, pretrained: bool = True, **kwargs) -> nn.Module:
    """The backbone, with the published checkpoint's ``checkpoint_key`` entry (teacher by default) loaded."""
    checkpoint_key = kwargs.pop("checkpoint_key", "teacher")
    model, _ = utils.build_backbone(entry.arch, entry.patch_size, **kwargs)
    if pretrained:  # errors name the published checkpoint, not a command-line flag
        utils.load_pretrained_weights(model, entry.drive_id, checkpoint_key, flag=f"published checkpoint {entry.name}")
    return model


def _entry_point(entry: published.Published):
    """A module-level function for ``entry``: torch.hub lists and loads the public callables of hubconf (so
    nothing else public here may be callable: no return annotation, no ``typing`` import)."""

    def load(pretrained: bool = True, **kwargs) -> nn.Module:
        return _load(entry, pretrained, **kwargs)

    load.__name__ = load.__qualname__ = entry.name
    load.__doc__ = entry.docstring()
    load.__module__ = __name__
    return load


for _entry in published.PUBLISHED:
    globals()[_entry.name] = _entry_point(_entry)
del _entry
