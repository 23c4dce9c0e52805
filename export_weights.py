"""Export the backbone of a checkpoint (teacher by default) in a format other tools load without this repo.

    python export_weights.py runs/mc/checkpoint.pth vits8.pth                        # this repo's / DINO's format
    python export_weights.py runs/mc/checkpoint.pth vits8_timm.pth --format timm     # timm's names
    python export_weights.py runs/mc/checkpoint.pth vits8.safetensors --format timm safetensors
    python export_weights.py dino_mc_vits8 dino_mc_vits8_timm.pth --format timm           # a published one

CHECKPOINT is the name of a published checkpoint (``published.py``: ``dino_mc_vits8``, ``dino_tp_swin_t``,
...; its Drive id, architecture and bands come from that table) or anything ``--pretrained_weights`` takes
(this project's ``checkpoint.pth``, a published DINO-MC checkpoint, DINO's backbone-only release, a timm state
dict; a path, an http(s) URL or a Google Drive link / id). It is loaded into the backbone strictly, exactly as
the evaluation scripts load it, and the backbone's weights are written:

- ``--format dino`` (default): keys without prefixes and without the projection head, a plain state dict
  (``torch.load(path, weights_only=True)``); this repo's ``--pretrained_weights`` and DINO's loaders read it;
- ``--format timm``: the names of the matching timm model (``--timm_model``; inferred from the checkpoint's
  ``args`` when omitted), checked against that model before writing, for
  ``timm.create_model(name, num_classes=0, in_chans=C, pretrained=True, pretrained_cfg_overlay=dict(file=OUTPUT))``;
- add ``safetensors`` (``--format timm safetensors`` or ``--format dino safetensors``) for a ``.safetensors``
  file instead of torch's pickle format.

The architecture comes from the published table for a published name, else from the checkpoint's ``args``
(arch, patch_size, bands); ``--arch`` / ``--patch_size`` / ``--bands`` override either. A checkpoint without them
(DINO's releases, a bare state dict) needs ``--arch`` / ``--patch_size`` / ``--bands``. The output is written
atomically and never overwrites an existing file. At the end the script prints the lines that load the file
in timm, in torchgeo and in this repo.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

import published
import utils
import weight_formats
from datasets.bands import parse_bands

SAFETENSORS_SUFFIX = ".safetensors"  # how timm (and safetensors' users) tell the two formats apart


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Export a backbone for timm / torchgeo / DINO", add_help=False)
    parser.add_argument(
        "checkpoint",
        type=str,
        help="Checkpoint: a published name (published.py, e.g. dino_mc_vits8), a path, an http(s) URL or a Google "
        "Drive link / id.",
    )
    parser.add_argument("output", type=str, help="File to write (.pth, or .safetensors with 'safetensors').")
    parser.add_argument(
        "--format",
        nargs="+",
        default=["dino"],
        choices=["dino", "timm", "safetensors"],
        help="Names: dino (default) or timm; add 'safetensors' for a .safetensors file.",
    )
    parser.add_argument(
        "--timm_model", default=None, type=str, help="timm model to name the weights for (default: from the args)."
    )
    parser.add_argument("--checkpoint_key", default="teacher", type=str, help="teacher (default) or student.")
    parser.add_argument("--arch", default=None, type=str, help="Backbone (default: the checkpoint's args.arch).")
    parser.add_argument("--patch_size", default=None, type=int, help="ViT patch size (default: from the args).")
    parser.add_argument("--bands", default=None, type=str, help="Input bands (default: from the args, else RGB).")
    return parser


def check_args(args: argparse.Namespace) -> tuple[str, bool]:
    """The naming ('dino' or 'timm') and whether to write safetensors; the output must be a new file."""
    names = [f for f in args.format if f != "safetensors"]
    if len(set(names)) > 1:
        raise utils.ConfigError(f"--format {' '.join(args.format)}: choose one of dino and timm")
    safetensors = "safetensors" in args.format
    if safetensors != args.output.endswith(SAFETENSORS_SUFFIX):
        raise utils.ConfigError(
            f"{args.output}: a safetensors file must end in {SAFETENSORS_SUFFIX} and only a safetensors file may "
            "(timm picks the reader by that suffix); add or drop 'safetensors' in --format, or rename the output"
        )
    if os.path.exists(args.output):
        raise utils.ConfigError(f"{args.output} already exists; remove it or choose another output")
    return (names[0] if names else "dino"), safetensors


def run_args(checkpoint: Any) -> dict[str, Any]:
    """The training flags stored in a checkpoint (a dict here, an argparse.Namespace in published ones)."""
    stored = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    return vars(stored) if isinstance(stored, argparse.Namespace) else dict(stored or {})


def backbone_spec(args: argparse.Namespace, stored: dict[str, Any]) -> tuple[str, int, list[str]]:
    """(arch, patch size, bands): the flags when given, else the checkpoint's args."""
    arch = args.arch or stored.get("arch")
    if arch is None:
        raise utils.ConfigError(f"{args.checkpoint} stores no args: pass --arch (and --patch_size, --bands)")
    patch_size = args.patch_size or stored.get("patch_size") or 16
    bands = args.bands or stored.get("bands") or "RGB"
    with utils.config_errors("--bands"):
        return arch.replace("deit", "vit"), int(patch_size), parse_bands(bands)


def check_timm_keys(name: str, in_chans: int, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse to write a file that timm would load with missing, unexpected or wrongly shaped weights."""
    import timm

    if not timm.is_model(name):
        raise utils.ConfigError(f"--timm_model {name}: timm {timm.__version__} has no such model")
    expected = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans).state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise utils.ConfigError(
            f"--timm_model {name} does not match this backbone: {len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(wrong)} wrongly shaped weights (first: {first})"
        )


def write_weights(state_dict: dict[str, torch.Tensor], output: Path, safetensors: bool, metadata: dict) -> None:
    """Write atomically (temporary name, then rename), as every file of this repo."""
    if not safetensors:
        utils.save_checkpoint(state_dict, output)
        return
    from safetensors.torch import save_file

    tmp = output.with_name(f".{output.name}.tmp.{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


def usage_lines(
    output: Path, names: str, timm_name: str | None, arch: str, patch_size: int, bands: list[str]
) -> list[str]:
    """What a user pastes to load the file, in each tool that reads this format."""
    path, in_chans = str(output.resolve()), len(bands)
    if output.suffix == SAFETENSORS_SUFFIX:
        imports, read = "from safetensors.torch import load_file", f'load_file("{path}")'
    else:
        imports, read = "import torch", f'torch.load("{path}", weights_only=True)'
    flags = f"--arch {arch} --patch_size {patch_size} --bands {','.join(bands)}"
    lines = [f"this repo: --pretrained_weights {path} {flags}"]
    if names == "timm":
        lines += [
            "timm:",
            "    import timm",
            f'    model = timm.create_model("{timm_name}", num_classes=0, in_chans={in_chans}, pretrained=True,',
            f'                              pretrained_cfg_overlay=dict(file="{path}"))',
            "torchgeo (its classification models are timm models; only the new head stays missing):",
            f"    {imports}",
            "    from torchgeo.trainers import ClassificationTask",
            f'    task = ClassificationTask(model="{timm_name}", weights=None, in_channels={in_chans}, num_classes=10)',
            f"    missing, unexpected = task.model.load_state_dict({read}, strict=False)",
        ]
    else:
        lines += [
            "PyTorch (this repo's / DINO's backbone names):",
            f"    {imports}",
            f"    model.load_state_dict({read})",
            "timm / torchgeo: export again with --format timm",
        ]
    return lines


def checkpoint_source(spec: str) -> tuple[str, dict[str, Any]]:
    """(what ``--pretrained_weights`` takes, the architecture the published table knows for it): a published
    name becomes its Drive id and its table entry's arch / patch size / bands; anything else stays as it is."""
    entry = published.BY_NAME.get(spec)
    if entry is None:
        return spec, {}
    return entry.drive_id, {"arch": entry.arch, "patch_size": entry.patch_size, "bands": ",".join(entry.bands)}


def main(args: argparse.Namespace) -> None:
    names, safetensors = check_args(args)
    source, known = checkpoint_source(args.checkpoint)
    path = utils.resolve_weights_path(source, flag="checkpoint")
    arch, patch_size, bands = backbone_spec(args, run_args(utils.load_weights_file(path)) | known)
    model, _ = utils.load_backbone(arch, patch_size, bands, str(path), args.checkpoint_key)
    state_dict = model.state_dict()

    timm_name = None
    if names == "timm":
        try:
            timm_name = args.timm_model or weight_formats.timm_model_name(arch, patch_size)
        except ValueError as err:
            raise utils.ConfigError(f"{err}; pass --timm_model") from None
        state_dict = weight_formats.to_timm(state_dict, arch)
        check_timm_keys(timm_name, len(bands), state_dict)

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"arch": arch, "patch_size": str(patch_size), "bands": ",".join(bands), "names": names}
    if timm_name:
        metadata["timm_model"] = timm_name
    write_weights(state_dict, output, safetensors, metadata)
    print(f"Wrote {output}: {len(state_dict)} tensors of the {args.checkpoint_key} {arch} backbone, {names} names")
    print("\n".join(usage_lines(output, names, timm_name, arch, patch_size, bands)))


def run(argv: list[str] | None = None) -> None:
    utils.run_cli("Export a backbone for timm / torchgeo / DINO", get_args_parser, main, argv)


if __name__ == "__main__":
    run()
