"""export_weights.py and weight_formats.py: our backbones in timm's format and back, for every family.

The checks are the features: a backbone exported from a training checkpoint and loaded by timm itself
(``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``) must compute our teacher's
features at 224 px; a timm model's own ``state_dict()`` loaded through ``--pretrained_weights`` must compute
the timm model's. Weights are random but distinct per tensor (BatchNorm statistics included), so a weight
that went missing or to the wrong place changes the features.
"""

from __future__ import annotations

import argparse
import re

import pytest
import timm
import torch

import export_weights
import published
import utils
import vision_transformer as vits
import weight_formats
from datasets.bands import parse_bands

# (arch, patch size, bands, timm model): every family, ViT patch 8 and 16, one to four input bands.
FAMILIES = [
    ("vit_small", 8, "RGB", "vit_small_patch8_224"),
    ("vit_tiny", 16, "B4,B3,B2,B8", "vit_tiny_patch16_224"),
    ("resnet50", 16, "B8,B4", "resnet50"),
    ("wide_resnet50_2", 16, "RGB", "wide_resnet50_2"),
    ("swin_t", 16, "B4,B3,B2,B8", "swin_tiny_patch4_window7_224"),
]
TOLERANCE = 1e-5


def random_backbone(arch: str, patch_size: int, bands: str, seed: int) -> tuple[torch.nn.Module, int]:
    """(backbone in eval mode whose every parameter and BatchNorm statistic is random, not the init's; its
    feature size)."""
    model, dim = utils.build_backbone(arch, patch_size, len(parse_bands(bands)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator)
                tensor.copy_(noise.abs() + 0.5 if name.endswith("running_var") else tensor + 0.02 * noise)
    return model.eval(), dim


def training_checkpoint(path, arch, patch_size, bands, namespace_args=False):
    """main_dino_mc's checkpoint (teacher and DDP student with DINO heads), or the published one's args style."""
    teacher, dim = random_backbone(arch, patch_size, bands, seed=1)
    student, _ = random_backbone(arch, patch_size, bands, seed=2) if arch.startswith("vit") else (teacher, dim)
    stored = {"arch": arch, "patch_size": patch_size, "bands": bands}

    def with_head(backbone):
        return utils.MultiCropWrapper(backbone, vits.DINOHead(dim, 8, hidden_dim=16, bottleneck_dim=8)).state_dict()

    torch.save(
        {
            "teacher": with_head(teacher),
            "student": {f"module.{k}": v for k, v in with_head(student).items()},
            "epoch": 2,
            "args": argparse.Namespace(**stored) if namespace_args else stored,
        },
        path,
    )
    return teacher, student


def image(bands: str) -> torch.Tensor:
    return torch.randn(1, len(parse_bands(bands)), 224, 224, generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def assert_same_features(ours: torch.nn.Module, theirs: torch.nn.Module, bands: str) -> None:
    x = image(bands)
    a, b = ours.eval()(x), theirs.eval()(x)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(("arch", "patch_size", "bands", "timm_name"), FAMILIES)
def test_timm_loads_the_export_and_gives_our_features(tmp_path, capsys, arch, patch_size, bands, timm_name):
    teacher, _ = training_checkpoint(tmp_path / "checkpoint.pth", arch, patch_size, bands)
    output = tmp_path / "timm.pth"
    export_weights.run([str(tmp_path / "checkpoint.pth"), str(output), "--format", "timm"])
    printed = capsys.readouterr().out
    assert f'timm.create_model("{timm_name}", num_classes=0, in_chans={len(parse_bands(bands))}' in printed
    assert "torchgeo" in printed

    model = timm.create_model(
        timm_name,
        num_classes=0,
        in_chans=len(parse_bands(bands)),
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(output)),
    )
    assert_same_features(teacher, model, bands)

    # The other way: the timm model's own state_dict(), with a 1000-class classifier as timm's
    # releases have, through --pretrained_weights, gives the timm model's features.
    model.reset_classifier(1000)
    torch.save(model.state_dict(), tmp_path / "timm_own.pth")
    ours = utils.load_pretrained_weights(
        utils.build_backbone(arch, patch_size, len(parse_bands(bands)))[0], str(tmp_path / "timm_own.pth")
    )
    model.reset_classifier(0)
    assert_same_features(ours, model, bands)


def test_published_style_args_student_and_safetensors(tmp_path):
    """args as an argparse.Namespace (published checkpoints), --checkpoint_key student, a .safetensors file
    that timm reads by its suffix and that --pretrained_weights reads back."""
    _, student = training_checkpoint(tmp_path / "ckpt.pth", "vit_tiny", 16, "RGB", namespace_args=True)
    output = tmp_path / "student.safetensors"
    export_weights.run(
        [str(tmp_path / "ckpt.pth"), str(output), "--format", "timm", "safetensors", "--checkpoint_key", "student"]
    )
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=str(output))
    )
    assert_same_features(student, model, "RGB")
    reloaded = utils.load_pretrained_weights(utils.build_backbone("vit_tiny", 16)[0], str(output))
    assert_same_features(student, reloaded, "RGB")


def test_dino_format_is_a_plain_backbone_state_dict(tmp_path):
    teacher, _ = training_checkpoint(tmp_path / "ckpt.pth", "swin_t", 16, "RGB")
    export_weights.run([str(tmp_path / "ckpt.pth"), str(tmp_path / "new_folder" / "swin.pth")])
    state = torch.load(tmp_path / "new_folder" / "swin.pth", weights_only=True)
    assert set(state) == set(teacher.state_dict())  # no module. / backbone. prefix, no head
    for key, value in teacher.state_dict().items():
        assert torch.equal(state[key], value), key


def test_swin_names_round_trip():
    model, _ = utils.build_backbone("swin_t", 16)
    ours = model.state_dict()
    timm_names = weight_formats.to_timm(ours, "swin_t")
    assert set(timm_names) == set(timm.create_model("swin_tiny_patch4_window7_224", num_classes=0).state_dict())
    back = weight_formats.from_timm(timm_names, ours)
    assert set(back) == set(ours)
    assert all(back[k] is ours[k] for k in ours)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "safetensors"], "must end in .safetensors"),
        (["--format", "dino", "timm"], "choose one of dino and timm"),
        (["--format", "timm", "--timm_model", "vit_small_patch16_224"], "does not match this backbone"),
        (["--format", "timm", "--timm_model", "no_such_net"], "timm .* has no such model"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, capsys, extra, message):
    training_checkpoint(tmp_path / "ckpt.pth", "vit_tiny", 16, "RGB")
    with pytest.raises(SystemExit) as exit_info:
        export_weights.run([str(tmp_path / "ckpt.pth"), str(tmp_path / "out.pth"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err)
    assert not (tmp_path / "out.pth").exists()


def test_existing_output_is_never_overwritten(tmp_path, capsys):
    training_checkpoint(tmp_path / "ckpt.pth", "vit_tiny", 16, "RGB")
    (tmp_path / "out.pth").write_bytes(b"keep me")
    with pytest.raises(SystemExit):
        export_weights.run([str(tmp_path / "ckpt.pth"), str(tmp_path / "out.pth")])
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out.pth").read_bytes() == b"keep me"


def test_bare_state_dict_needs_the_arch(tmp_path, capsys):
    torch.save(random_backbone("vit_tiny", 16, "RGB", 3)[0].state_dict(), tmp_path / "bare.pth")
    with pytest.raises(SystemExit):
        export_weights.run([str(tmp_path / "bare.pth"), str(tmp_path / "out.pth")])
    assert "stores no args: pass --arch" in capsys.readouterr().err
    export_weights.run(
        [str(tmp_path / "bare.pth"), str(tmp_path / "out.pth"), "--arch", "vit_tiny", "--format", "timm"]
    )
    assert set(torch.load(tmp_path / "out.pth", weights_only=True)) == set(
        timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict()
    )


def test_published_name_takes_its_drive_id_and_arch_from_the_table(tmp_path, capsys, monkeypatch):
    """``export_weights.py dino_mc_vits8 OUT --format timm`` (the docstring's example): the table's Drive id is
    what gets fetched (here already in the download cache, so no network), and its arch, patch size and bands
    build the backbone of a checkpoint that stores no args."""
    entry = published.BY_NAME["dino_mc_vits8"]
    teacher, dim = random_backbone(entry.arch, entry.patch_size, ",".join(entry.bands), seed=4)
    head = vits.DINOHead(dim, 8, hidden_dim=16, bottleneck_dim=8)
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save({"teacher": utils.MultiCropWrapper(teacher, head).state_dict()}, cache / f"gdrive-{entry.drive_id}.pth")
    monkeypatch.setenv("DINO_MC_CACHE", str(cache))

    output = tmp_path / "dino_mc_vits8_timm.pth"
    export_weights.run([entry.name, str(output), "--format", "timm"])
    assert 'timm.create_model("vit_small_patch8_224", num_classes=0, in_chans=3' in capsys.readouterr().out
    model = timm.create_model(
        "vit_small_patch8_224", num_classes=0, pretrained=True, pretrained_cfg_overlay=dict(file=str(output))
    )
    assert_same_features(teacher, model, "RGB")


def test_timm_model_name_of_every_arch():
    assert weight_formats.timm_model_name("vit_small", 8) == "vit_small_patch8_224"
    assert weight_formats.timm_model_name("vit_small", 16) == "vit_small_patch16_224"
    assert weight_formats.timm_model_name("resnet50", 8) == "resnet50"
    assert weight_formats.timm_model_name("timm/convnext_tiny", 16) == "convnext_tiny"
    with pytest.raises(ValueError, match="timm has no model matching --arch vit_tiny --patch_size 8"):
        weight_formats.timm_model_name("vit_tiny", 8)
    assert all(timm.is_model(name) for name in weight_formats.TIMM_MODELS.values())


@pytest.mark.parametrize(
    ("builder", "arch", "patch_size"), [("vit_small_patch16_224", "vit_small", 16), ("resnet50", "resnet50", 16)]
)
def test_torchgeo_builders_load_the_timm_export_strictly(tmp_path, builder, arch, patch_size):
    """torchgeo's own model builders (12 Sentinel-2 bands in) take the export with strict keys and compute our
    teacher's features."""
    torchgeo_models = pytest.importorskip("torchgeo.models", reason="torchgeo is a development requirement")
    teacher, _ = training_checkpoint(tmp_path / "checkpoint.pth", arch, patch_size, "ALL")
    output = tmp_path / "timm.pth"
    export_weights.run([str(tmp_path / "checkpoint.pth"), str(output), "--format", "timm"])
    model = getattr(torchgeo_models, builder)(weights=None, num_classes=0, in_chans=12)
    model.load_state_dict(torch.load(output, weights_only=True), strict=True)
    assert_same_features(teacher, model, "ALL")
