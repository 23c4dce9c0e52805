"""Pretrained weights: what a --pretrained_weights spec names; download once, load strictly."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.hub
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv as timm_adapt_input_conv

import published
import weight_formats
from backbones import build_backbone
from checkpoints import load_checkpoint_safely
from cli import ConfigError, config_errors, key_mismatch, one_line
from datasets.bands import RGB_BANDS, S2_L1C_BANDS
from logs import Progress
from runtime import is_dist_avail_and_initialized

DEFAULT_CACHE_DIR = Path("~/.cache/dino_mc")
DRIVE_ID_PATTERNS = (
    re.compile(r"drive\.google\.com/file/d/([\w-]+)"),
    re.compile(r"drive\.google\.com/.*[?&]id=([\w-]+)"),
)
BARE_DRIVE_ID = re.compile(r"[\w-]{25,}")
MIB = 2**20
UNKNOWN_SIZE_PRINT_MIB = 64  # a download of unknown size reports every this many MiB
HTML_START = (b"<!", b"<h", b"<H")  # what an error or quota page begins with, where weights were expected
# --adapt_input: the input bands, in order, of weights trained on other bands than the run's: the published
# RGB checkpoints, and Sentinel-2 weights over the 13 L1C bands (torchgeo's SENTINEL2_ALL_* weights).
INPUT_BANDS: dict[str, tuple[str, ...]] = {"rgb": RGB_BANDS, "s2": S2_L1C_BANDS}


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
    group.add_argument(
        "--adapt_input",
        default=None,
        choices=sorted(INPUT_BANDS),
        help="Weights trained on other bands than --bands: rgb (B4,B3,B2, the published checkpoints) or s2 (the "
        "13 Sentinel-2 L1C bands, as torchgeo's); each band's filters are taken from its own, and a band the "
        "weights lack gets timm's input-convolution adaptation of them. Default: the weights' bands are --bands.",
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


def _download_once(
    target: Path, download: Callable[[Path], None], source: str, flag: str = "--pretrained_weights"
) -> Path:
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
            error = f"{flag} {source}: download failed: {one_line(err)}"
    if is_dist_avail_and_initialized():
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise ConfigError(error)
    if not target.is_file():
        raise ConfigError(f"{flag} {source}: {target} is missing after the download")
    return target


def _download_to(target: Path, download: Callable[[Path], None], source: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    print(f"Downloading {source} to {target}", flush=True)
    try:
        download(partial)
        with open(partial, "rb") as f:
            if f.read(2) in HTML_START:
                raise OSError("the server sent a web page (an error or quota page?), not weights")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _fetch_url(url: str, dst: Path) -> None:
    """Stream ``url`` into ``dst`` in 1 MiB reads, with progress in MiB: a bar with an ETA on a terminal, a line
    per tenth of the file in a log."""
    request = urllib.request.Request(url, headers={"User-Agent": "dino-mc (torch.hub)"})
    with urllib.request.urlopen(request, timeout=60) as response, open(dst, "wb") as f:
        size = int(response.headers.get("Content-Length") or 0)
        total = math.ceil(size / MIB)
        name = Path(urllib.parse.urlparse(url).path).name
        progress = Progress(None, f"download {name} (MiB)", total // 10 if total else UNKNOWN_SIZE_PRINT_MIB, total)
        written = 0
        while chunk := response.read(MIB):
            f.write(chunk)
            before, written = written, written + len(chunk)
            progress.update(math.ceil(written / MIB) - math.ceil(before / MIB))
        progress.close()
    if size and written != size:  # a connection cut short ends the stream early instead of raising
        raise OSError(f"the server announced {size} bytes, {written} arrived")


def resolve_weights_path(spec: str, cache: str | Path | None = None, flag: str = "--pretrained_weights") -> Path:
    """A local checkpoint file for ``spec``: a path (must exist: no fallback to other weights), an http(s) URL
    or a Google Drive link / id (downloaded once into ``cache``, default :func:`cache_dir`). Errors name
    ``flag``, what the user gave the spec as (a flag, or "weights" through the Python API)."""
    cache = Path(cache).expanduser() if cache is not None else cache_dir()
    if spec in published.BY_NAME:  # a published checkpoint by its name (python published.py lists them)
        spec = published.BY_NAME[spec].drive_id
    if spec.startswith(("http://", "https://")) and "drive.google.com" not in spec:
        name = Path(urllib.parse.urlparse(spec).path).name or "checkpoint.pth"
        digest = hashlib.sha256(spec.encode()).hexdigest()[:8]  # two URLs ending in the same name stay apart

        def fetch(dst: Path) -> None:
            _fetch_url(spec, dst)

        return _download_once(cache / f"{digest}-{name}", fetch, spec, flag)
    drive_id = google_drive_id(spec)
    if drive_id is not None:

        def fetch(dst: Path) -> None:
            from torchvision.datasets.utils import download_file_from_google_drive

            download_file_from_google_drive(drive_id, str(dst.parent), filename=dst.name)

        return _download_once(cache / f"gdrive-{drive_id}.pth", fetch, spec, flag)
    path = Path(spec).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {spec} is a folder; expected a checkpoint file")
    if not path.is_file():
        raise ConfigError(f"{flag} {spec} does not exist")
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


def adapt_input_conv(
    state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], bands: list[str], adapt_input: str
) -> None:
    """Give the checkpoint's input convolution the model's ``bands`` (``--adapt_input``), in place.

    A band the weights were trained on keeps its own filters, unchanged: RGB input in B4, B3, B2 with the other
    bands at zero then gives exactly the RGB model's features. A band they lack gets the filters that
    ``timm.models.adapt_input_conv`` gives it (the trained filters repeated over the bands, scaled by
    trained / total bands, so that an input with every band alike keeps the activation's magnitude).
    """
    source = INPUT_BANDS[adapt_input]
    stem = next(
        (
            key
            for key, target in expected.items()
            if target.ndim == 4
            and key in state_dict
            and state_dict[key].shape[1] == len(source)
            and state_dict[key].shape[0] == target.shape[0]
            and state_dict[key].shape[2:] == target.shape[2:]
        ),
        None,
    )
    if stem is None:
        raise ConfigError(
            f"--adapt_input {adapt_input}: the weights have no input convolution over {len(source)} bands "
            f"({','.join(source)})"
        )
    weight = state_dict[stem]
    if list(bands) == list(source):
        return
    adapted = timm_adapt_input_conv(len(bands), weight) if len(source) == 3 else None
    columns = []
    for i, band in enumerate(bands):
        if band in source:
            columns.append(weight[:, source.index(band)])
        elif adapted is not None:
            columns.append(adapted[:, i])
        else:
            raise ConfigError(f"--adapt_input {adapt_input}: the weights have no filters for band {band}")
    state_dict[stem] = torch.stack(columns, dim=1)
    kept = [b for b in bands if b in source]
    print(
        f"--adapt_input {adapt_input}: {stem} from {len(source)} to {len(bands)} bands: {','.join(kept) or 'none'} "
        f"with their own filters, {len(bands) - len(kept)} others adapted as timm does"
    )


def load_backbone(
    arch: str,
    patch_size: int,
    bands: list[str],
    weights: str | None,
    checkpoint_key: str = "teacher",
    adapt_input: str | None = None,
    drop_path_rate: float = 0.0,
) -> tuple[nn.Module, int]:
    """``arch`` for ``bands`` with ``weights`` loaded (:func:`load_pretrained_weights`): (model, feature size).

    The one way a script gets a pretrained backbone, so that every script accepts the same checkpoints."""
    with config_errors():
        model, feat_dim = build_backbone(arch, patch_size, len(bands), drop_path_rate)
    load_pretrained_weights(model, weights, checkpoint_key, bands=bands, adapt_input=adapt_input)
    return model, feat_dim


def load_pretrained_weights(
    model: nn.Module,
    pretrained_weights: str | None,
    checkpoint_key: str = "teacher",
    bands: list[str] | None = None,
    adapt_input: str | None = None,
    flag: str = "--pretrained_weights",
) -> nn.Module:
    """Load a backbone from any supported checkpoint into ``model`` (built by :func:`build_backbone`), strictly.

    Accepts this project's ``checkpoint.pth``, the published DINO-MC checkpoints and DINO's official bare
    state dicts (ViT or torchvision names). Missing and unexpected keys are printed; a missing or wrongly
    shaped backbone weight raises ConfigError, because evaluating half-random weights gives plausible but
    meaningless numbers. ``"none"`` keeps the random initialisation on purpose (a baseline). ``flag`` is what
    the user gave the weights as, named in the errors (the Python API passes its own words).
    """
    if pretrained_weights is None:
        raise ConfigError(
            "--pretrained_weights is required: a checkpoint path, an http(s) URL, a Google Drive link or id, "
            "or 'none' for random weights"
        )
    if pretrained_weights.lower() == "none":
        print("--pretrained_weights none: using randomly initialised weights")
        return model
    path = resolve_weights_path(pretrained_weights, flag=flag)
    state_dict = _pick_state_dict(load_weights_file(path), checkpoint_key, path)
    load_backbone_state(model, state_dict, f"{flag} {pretrained_weights}", bands, adapt_input)
    print(f"Pretrained weights found at {path} and loaded (key '{checkpoint_key}')")
    return model


def load_backbone_state(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str,
    bands: list[str] | None = None,
    adapt_input: str | None = None,
) -> None:
    """Load the backbone entries of ``state_dict`` (any supported naming) into ``model``, strictly.

    ``source`` names the flag and value in the one-line ConfigError for weights that do not fit."""
    state_dict = _strip_prefixes(state_dict, model.state_dict())
    state_dict = weight_formats.from_timm(state_dict, model.state_dict())  # timm names (torchgeo, HF hub)
    _resample_pos_embed(model, state_dict)
    expected = model.state_dict()
    if adapt_input is not None:
        adapt_input_conv(state_dict, expected, list(bands or RGB_BANDS), adapt_input)

    # BatchNorm's step counter is unused at evaluation and absent from some older torchvision-format releases.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if unexpected or missing:
        print(f"Keys of {source} against the backbone: {key_mismatch(expected, state_dict)} (unexpected ones ignored)")
    if missing or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} backbone weights missing (first: {missing[0]})")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} with the wrong shape (first: {wrong_shape[0]})")
        other_bands = any(
            v.ndim == 4 and v.shape[1] != expected[k].shape[1] and v.shape[2:] == expected[k].shape[2:]
            for k, v in state_dict.items()
            if k in expected and v.shape != expected[k].shape
        )
        hint = "; weights trained on other bands load with --adapt_input rgb or s2" if other_bands else ""
        raise ConfigError(
            f"{source} does not fit this backbone: {'; '.join(problems)}; "
            f"check --arch, --patch_size, --bands and --checkpoint_key{hint}"
        )
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)


def init_from_checkpoint(
    spec: str, student: nn.Module, teacher: nn.Module, bands: list[str], adapt_input: str | None = None
) -> None:
    """``--init_from``: a new pretraining run starts from the weights of another (published or own) checkpoint.

    ``student`` and ``teacher`` are multi-crop wrappers (``backbone`` + ``head``). From a pretraining checkpoint
    each takes its own entry (the teacher's also for the student when the checkpoint has no student), the head
    included when it has the same shapes; otherwise, and from a bare backbone (an exported or timm / torchgeo
    state dict), both backbones get the weights and keep the fresh head they share. Only weights move: the
    schedules, the optimizer and the epoch start afresh, unlike a resumed run.
    """
    path = resolve_weights_path(spec, flag="--init_from")
    checkpoint = load_weights_file(path)
    entries = checkpoint if isinstance(checkpoint, dict) else {}
    for name, wrapper in (("student", student), ("teacher", teacher)):
        key = name if isinstance(entries.get(name), dict) else "teacher"
        state = _pick_state_dict(checkpoint, key, path)
        load_backbone_state(wrapper.backbone, state, f"--init_from {spec}", bands, adapt_input)
        stripped = {k.removeprefix("module."): v for k, v in state.items()}
        head = {k.removeprefix("head."): v for k, v in stripped.items() if k.startswith("head.")}
        expected = wrapper.head.state_dict()
        same_head = set(head) == set(expected) and all(head[k].shape == v.shape for k, v in expected.items())
        if same_head:
            wrapper.head.load_state_dict(head)
        print(f"--init_from {path}: {name} backbone from '{key}', {'head too' if same_head else 'fresh head'}")
    if not same_head:  # the teacher starts as the student's copy, as in a run from scratch
        teacher.head.load_state_dict(student.head.state_dict())
