"""Pretrained weights: what a --pretrained_weights spec names; download once, load strictly."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import sys
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.hub
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

import weight_formats
from checkpoints import load_checkpoint_safely
from cli import ConfigError, key_mismatch, one_line
from runtime import is_dist_avail_and_initialized

DEFAULT_CACHE_DIR = Path("~/.cache/dino_mc")


DRIVE_ID_PATTERNS = (
    re.compile(r"drive\.google\.com/file/d/([\w-]+)"),
    re.compile(r"drive\.google\.com/.*[?&]id=([\w-]+)"),
)


BARE_DRIVE_ID = re.compile(r"[\w-]{25,}")


def add_pretrained_args(parser: argparse.ArgumentParser) -> None:
    """--pretrained_weights and --checkpoint_key, shared by every evaluation and fine-tuning script."""
    group = parser.add_argument_group("pretrained weights")
    group.add_argument(
        "--pretrained_weights",
        default=None,
        type=str,
        help="Checkpoint to evaluate: a local path, an http(s) URL, a Google Drive share link or file id "
        "(downloaded once into $DINO_MC_CACHE, default ~/.cache/dino_mc), or 'none' for random weights.",
    )
    group.add_argument(
        "--checkpoint_key",
        default="teacher",
        type=str,
        help="Entry of the checkpoint that holds the network: teacher (default, the evaluated one) or student.",
    )


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept: $DINO_MC_CACHE, else ~/.cache/dino_mc."""
    return Path(os.environ.get("DINO_MC_CACHE", DEFAULT_CACHE_DIR)).expanduser()


def google_drive_id(spec: str) -> str | None:
    """The file id of a Google Drive share link (``/file/d/<id>/view``, ``open?id=<id>``, ``uc?id=<id>``) or of
    a bare id (25+ letters, digits, ``-`` or ``_``, as in the published checkpoint table); None otherwise."""
    for pattern in DRIVE_ID_PATTERNS:
        match = pattern.search(spec)
        if match:
            return match.group(1)
    if BARE_DRIVE_ID.fullmatch(spec) and not Path(spec).exists():
        return spec
    return None


def _download_once(target: Path, download: Callable[[Path], None], source: str) -> Path:
    """Fetch ``source`` into ``target`` unless it is cached; rank 0 of each node downloads, the others wait.

    The download goes to a partial file with a random name beside ``target`` and is renamed only when
    complete: an interrupted run leaves no file that a re-run would mistake for a finished download, and
    several nodes downloading into one shared cache folder each write their own file (the renames are
    atomic, the last one wins with identical bytes). Every rank learns whether the download failed anywhere
    (one all-gather instead of a barrier), so a failure stops all ranks with its message instead of leaving
    the others waiting in a collective until the timeout.
    """
    error = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not target.is_file():
        try:
            _download_to(target, download, source)
        except Exception as err:  # network, HTTP, Drive and file-system errors: report them as one line
            error = f"--pretrained_weights {source}: download failed: {one_line(err)}"
    if is_dist_avail_and_initialized():
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise ConfigError(error)
    if not target.is_file():
        raise ConfigError(f"--pretrained_weights {source}: {target} is missing after the download")
    return target


def _download_to(target: Path, download: Callable[[Path], None], source: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    print(f"Downloading {source} to {target}", flush=True)
    try:
        download(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def resolve_weights_path(spec: str, cache: str | Path | None = None) -> Path:
    """A local checkpoint file for ``spec``: a path (must exist: no fallback to other weights), an http(s) URL
    or a Google Drive link / id (downloaded once into ``cache``, default :func:`cache_dir`)."""
    cache = Path(cache).expanduser() if cache is not None else cache_dir()
    if spec.startswith(("http://", "https://")) and "drive.google.com" not in spec:
        name = Path(urllib.parse.urlparse(spec).path).name or "checkpoint.pth"
        digest = hashlib.sha256(spec.encode()).hexdigest()[:8]  # two URLs ending in the same name stay apart

        def fetch(dst: Path) -> None:
            torch.hub.download_url_to_file(spec, str(dst), progress=sys.stderr.isatty())

        return _download_once(cache / f"{digest}-{name}", fetch, spec)
    drive_id = google_drive_id(spec)
    if drive_id is not None:

        def fetch(dst: Path) -> None:
            from torchvision.datasets.utils import download_file_from_google_drive

            download_file_from_google_drive(drive_id, str(dst.parent), filename=dst.name)

        return _download_once(cache / f"gdrive-{drive_id}.pth", fetch, spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"--pretrained_weights {spec} does not exist")
    return path


def load_weights_file(path: Path) -> Any:
    """A checkpoint or a bare state dict; ``.safetensors`` files (timm / Hugging Face weights, this repo's
    ``export_weights.py``) by their suffix, as timm tells them apart, everything else through the safe torch.load."""
    if path.suffix != ".safetensors":
        return load_checkpoint_safely(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"cannot read safetensors file {path}: {one_line(err)}") from None


def _pick_state_dict(checkpoint: Any, checkpoint_key: str, path: Path) -> dict[str, torch.Tensor]:
    """``checkpoint[checkpoint_key]`` when present, else the checkpoint itself if it is a bare state dict
    (DINO's official backbone releases)."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get(checkpoint_key), dict):
        print(f"Taking key '{checkpoint_key}' of {path}")
        return checkpoint[checkpoint_key]
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        print(f"{path} is a plain state dict (no '{checkpoint_key}' entry)")
        return checkpoint
    entries = sorted(k for k, v in checkpoint.items() if isinstance(v, dict)) if isinstance(checkpoint, dict) else []
    raise ConfigError(
        f"--checkpoint_key {checkpoint_key}: {path} has no such entry and is not a state dict "
        f"(entries holding dicts: {', '.join(entries) or 'none'})"
    )


def _strip_prefixes(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's entries of a checkpoint's state dict, named as in ``expected`` (the backbone's own).

    DDP's ``module.`` prefix goes. Of a multi-crop wrapper's state (``backbone.*`` + the projection ``head.*``)
    the backbone is kept. A bare backbone state dict (DINO's releases) loses its classifier (``fc.*`` or
    ``head.*``) unless the backbone has such keys itself: a timm ConvNeXt's ``head.norm`` is part of its feature.
    """
    state = {key.removeprefix("module."): value for key, value in state_dict.items()}
    if any(key.startswith("backbone.") for key in state):
        return {key.removeprefix("backbone."): v for key, v in state.items() if key.startswith("backbone.")}
    return {key: v for key, v in state.items() if key in expected or not key.startswith(("head.", "fc."))}


def _resample_pos_embed(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Resample a ViT checkpoint's position embeddings trained on another image size to the model's grid."""
    target = model.state_dict().get("pos_embed")
    pos = state_dict.get("pos_embed")
    if target is None or pos is None or pos.shape == target.shape or pos.shape[-1] != target.shape[-1]:
        return
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(target.shape[1] - 1)
    if old * old != pos.shape[1] - 1:
        return  # not a square grid + CLS: left to the shape check, which reports it
    print(f"Resampling pos_embed from a {old}x{old} to a {new}x{new} patch grid")
    state_dict["pos_embed"] = resample_abs_pos_embed(
        pos, new_size=(new, new), old_size=(old, old), num_prefix_tokens=1, interpolation="bicubic", antialias=False
    )


def load_pretrained_weights(
    model: nn.Module, pretrained_weights: str | None, checkpoint_key: str = "teacher"
) -> nn.Module:
    """Load a backbone from any supported checkpoint into ``model`` (built by :func:`build_backbone`), strictly.

    Accepts this project's ``checkpoint.pth``, the published DINO-MC checkpoints and DINO's official bare
    state dicts (ViT or torchvision names). Missing and unexpected keys are printed; a missing or wrongly
    shaped backbone weight raises ConfigError, because evaluating half-random weights gives plausible but
    meaningless numbers. ``"none"`` keeps the random initialisation on purpose (a baseline).
    """
    if pretrained_weights is None:
        raise ConfigError(
            "--pretrained_weights is required: a checkpoint path, an http(s) URL, a Google Drive link or id, "
            "or 'none' for random weights"
        )
    if pretrained_weights.lower() == "none":
        print("--pretrained_weights none: using randomly initialised weights")
        return model
    path = resolve_weights_path(pretrained_weights)
    state_dict = _strip_prefixes(_pick_state_dict(load_weights_file(path), checkpoint_key, path), model.state_dict())
    state_dict = weight_formats.from_timm(state_dict, model.state_dict())  # timm names (torchgeo, HF hub)
    _resample_pos_embed(model, state_dict)

    expected = model.state_dict()
    # BatchNorm's step counter is unused at evaluation and absent from some older torchvision-format releases.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if unexpected or missing:
        print(f"Keys of {path} against the backbone: {key_mismatch(expected, state_dict)} (unexpected ones ignored)")
    if missing or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} backbone weights missing (first: {missing[0]})")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} with the wrong shape (first: {wrong_shape[0]})")
        raise ConfigError(
            f"--pretrained_weights {pretrained_weights} does not fit this backbone: {'; '.join(problems)}; "
            "check --arch, --patch_size, --bands and --checkpoint_key"
        )
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
    print(f"Pretrained weights found at {path} and loaded ({len(expected)} tensors, key '{checkpoint_key}')")
    return model
