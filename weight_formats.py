"""This repo's backbones in timm's terms: the matching timm model names and the state-dict names both ways.

DINO's ViT, torchvision's ResNet / Wide ResNet and timm's models of the same size share every parameter name,
so their state dicts move between the two unchanged. Swin-T is the exception: torchvision's ``swin_t`` (the
published DINO-MC Swin) nests its stages in ``features.*`` with the patch merging between stages, timm's
``swin_tiny_patch4_window7_224`` names them ``patch_embed`` / ``layers.<stage>.blocks`` with the merging at
the start of a stage, and keeps the relative position index as a non-persistent buffer. Both compute the same
function (tested to 1e-5 on the features), so renaming is all a conversion needs.

Used by ``export_weights.py`` (ours -> timm) and ``utils.load_pretrained_weights`` (timm -> ours).
"""

from __future__ import annotations

import re

import torch

# (arch, patch size) -> timm model; CNNs and Swin ignore the patch size (None).
TIMM_MODELS: dict[tuple[str, int | None], str] = {
    ("vit_tiny", 16): "vit_tiny_patch16_224",
    ("vit_small", 8): "vit_small_patch8_224",
    ("vit_small", 16): "vit_small_patch16_224",
    ("vit_base", 8): "vit_base_patch8_224",
    ("vit_base", 16): "vit_base_patch16_224",
    ("resnet18", None): "resnet18",
    ("resnet34", None): "resnet34",
    ("resnet50", None): "resnet50",
    ("wide_resnet50_2", None): "wide_resnet50_2",
    ("swin_t", None): "swin_tiny_patch4_window7_224",
}
SWIN_INDEX_BUFFER = "relative_position_index"  # a constant of the window size, not a learned weight


def timm_model_name(arch: str, patch_size: int) -> str:
    """The timm model with exactly this backbone's architecture; ValueError when timm has none."""
    if arch.startswith("timm/"):
        return arch.split("/", 1)[1]
    name = TIMM_MODELS.get((arch, patch_size if arch.startswith("vit") else None))
    if name is None:
        known = ", ".join(f"{a}/{p}" if p else a for a, p in TIMM_MODELS)
        raise ValueError(f"timm has no model matching --arch {arch} --patch_size {patch_size} (known: {known})")
    return name


def _swin_key_to_timm(key: str) -> str:
    if m := re.fullmatch(r"features\.0\.0\.(.+)", key):
        return f"patch_embed.proj.{m[1]}"
    if m := re.fullmatch(r"features\.0\.2\.(.+)", key):
        return f"patch_embed.norm.{m[1]}"
    if m := re.fullmatch(r"features\.(\d+)\.(\d+)\.(.+)", key):  # block j of stage (i - 1) / 2
        rest = m[3].replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
        return f"layers.{(int(m[1]) - 1) // 2}.blocks.{m[2]}.{rest}"
    if m := re.fullmatch(r"features\.(\d+)\.(.+)", key):  # patch merging before stage i / 2
        return f"layers.{int(m[1]) // 2}.downsample.{m[2]}"
    return key  # the final norm


def _swin_key_from_timm(key: str) -> str:
    if m := re.fullmatch(r"patch_embed\.proj\.(.+)", key):
        return f"features.0.0.{m[1]}"
    if m := re.fullmatch(r"patch_embed\.norm\.(.+)", key):
        return f"features.0.2.{m[1]}"
    if m := re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", key):
        rest = m[3].replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
        return f"features.{2 * int(m[1]) + 1}.{m[2]}.{rest}"
    if m := re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key):
        return f"features.{2 * int(m[1])}.{m[2]}"
    return key


def to_timm(state_dict: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """A backbone state dict of ours (``--arch arch``) under the names of the matching timm model."""
    if arch != "swin_t":
        return dict(state_dict)
    return {_swin_key_to_timm(k): v for k, v in state_dict.items() if not k.endswith(SWIN_INDEX_BUFFER)}


def is_timm_swin(state_dict: dict[str, torch.Tensor]) -> bool:
    return "layers.0.blocks.0.attn.qkv.weight" in state_dict


def from_timm(state_dict: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` under our names when it is a timm Swin and the model a torchvision Swin, else unchanged.

    The relative position indices, which timm does not save, are the model's own (they depend only on the
    window size).
    """
    if not (is_timm_swin(state_dict) and "features.0.0.weight" in model_state):
        return state_dict
    print("The checkpoint is a timm Swin state dict: mapping its names to torchvision's swin_t")
    renamed = {_swin_key_from_timm(k): v for k, v in state_dict.items()}
    renamed.update({k: v for k, v in model_state.items() if k.endswith(SWIN_INDEX_BUFFER)})
    return renamed
