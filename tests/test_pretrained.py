"""Checkpoint loading (utils, "pretrained weights"): every supported format loads exactly, everything else fails.

Checkpoints are built here in the formats users have: this project's ``checkpoint.pth`` (main_dino_mc's
dict), the published DINO-MC format (``args`` as an argparse.Namespace, ``module.`` / ``backbone.``
prefixes) and DINO's bare state-dict releases, for a ViT and a torchvision ResNet.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import published
import utils
import vision_transformer as vits
from datasets.bands import S2_BANDS, S2_L1C_BANDS
from tests.published_checkpoints import as_numpy1_pickle

# numpy's own builders, under the installed numpy's module name (numpy._core on numpy 2)
NUMPY_SCALAR, NUMPY_RECONSTRUCT = np.float64(0).__reduce__()[0], np.arange(1).__reduce__()[0]
SMALL_HEAD = dict(hidden_dim=32, bottleneck_dim=16)
# DINO's loop writes the schedules' numpy floats into the param groups, so real checkpoints hold numpy scalars.
OPTIMIZER = {"state": {}, "param_groups": [{"lr": np.float64(5e-4), "weight_decay": np.float64(0.04), "params": [0]}]}


def build(arch: str, patch_size: int = 16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return utils.build_backbone(arch, patch_size)[0]


def wrapped(arch: str, patch_size: int, seed: int) -> utils.MultiCropWrapper:
    """A backbone + DINO head as main_dino_mc trains it (keys ``backbone.*`` and ``head.*``)."""
    backbone, dim = utils.build_backbone(arch, patch_size)
    torch.manual_seed(seed)
    for p in backbone.parameters():
        p.data.normal_()
    return utils.MultiCropWrapper(backbone, vits.DINOHead(dim, 8, **SMALL_HEAD))


def assert_same_backbone(model: torch.nn.Module, wrapper: utils.MultiCropWrapper) -> None:
    expected = wrapper.backbone.state_dict()
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def dino_checkpoint(path: Path, student, teacher, **entries) -> tuple[utils.MultiCropWrapper, ...]:
    """A pretraining checkpoint: the DDP student (``module.``), the teacher, the optimizer, the loss centre and
    ``entries`` (epoch, args, ...)."""
    student_state = {f"module.{k}": v for k, v in student.state_dict().items()}
    common = {"optimizer": OPTIMIZER, "dino_loss": {"center": torch.zeros(1, 8)}}
    torch.save({"student": student_state, "teacher": teacher.state_dict(), **common, **entries}, path)
    return student, teacher


def our_checkpoint(path: Path, arch: str, patch_size: int = 16) -> tuple[utils.MultiCropWrapper, ...]:
    """main_dino_mc's checkpoint.pth: args as a dict, RNG states."""
    args = {"arch": arch, "patch_size": patch_size}
    student, teacher = wrapped(arch, patch_size, 1), wrapped(arch, patch_size, 2)
    return dino_checkpoint(path, student, teacher, epoch=3, args=args, rng_state=[utils.get_rng_state()])


def published_checkpoint(path: Path, arch: str, patch_size: int) -> tuple[utils.MultiCropWrapper, ...]:
    """The published DINO-MC format: argparse.Namespace args, ``module.backbone.`` student, ``backbone.`` teacher."""
    args = argparse.Namespace(arch=arch, patch_size=patch_size, data_mode="mc", size_crops=[96, 84])
    return dino_checkpoint(path, wrapped(arch, patch_size, 3), wrapped(arch, patch_size, 4), epoch=100, args=args)


def test_our_checkpoint_teacher_by_default_and_student_on_request(tmp_path):
    path = tmp_path / "checkpoint.pth"
    student, teacher = our_checkpoint(path, "vit_tiny")
    model = utils.load_pretrained_weights(build("vit_tiny"), str(path))
    assert_same_backbone(model, teacher)
    model = utils.load_pretrained_weights(build("vit_tiny"), str(path), checkpoint_key="student")
    assert_same_backbone(model, student)


@pytest.mark.parametrize(("arch", "patch_size"), [("vit_tiny", 8), ("resnet18", 16)])
def test_published_format_loads_teacher_and_student(tmp_path, arch, patch_size):
    path = tmp_path / "dino_mc.pth"
    student, teacher = published_checkpoint(path, arch, patch_size)
    assert_same_backbone(utils.load_pretrained_weights(build(arch, patch_size), str(path)), teacher)
    assert_same_backbone(utils.load_pretrained_weights(build(arch, patch_size), str(path), "student"), student)


@pytest.mark.parametrize(("arch", "patch_size"), [("vit_tiny", 8), ("resnet18", 16)])
def test_released_checkpoint_pickled_under_numpy_1_loads(tmp_path, arch, patch_size):
    """The released files: numpy float64 lr / weight decay in the param groups, an argparse.Namespace, a
    ``module.`` student, all pickled under numpy 1.x. They load; code-running pickles are still refused."""
    path = tmp_path / "released.pth"
    student, teacher = published_checkpoint(path, arch, patch_size)
    pickled = as_numpy1_pickle(path)
    assert b"numpy.core.multiarray\nscalar\n" in pickled and b"numpy._core" not in pickled
    numpy2_names_only = [argparse.Namespace, np.ndarray, np.dtype, NUMPY_SCALAR, NUMPY_RECONSTRUCT]
    with (
        pytest.raises(pickle.UnpicklingError, match="numpy.core.multiarray"),
        torch.serialization.safe_globals(numpy2_names_only),
    ):
        torch.load(path, weights_only=True)  # the file really carries the numpy 1.x names
    assert_same_backbone(utils.load_pretrained_weights(build(arch, patch_size), str(path)), teacher)
    assert_same_backbone(utils.load_pretrained_weights(build(arch, patch_size), str(path), "student"), student)
    lr = utils.load_checkpoint_safely(path)["optimizer"]["param_groups"][0]["lr"]
    assert isinstance(lr, np.float64) and lr == 5e-4


@pytest.mark.parametrize("arch", ["vit_tiny", "resnet18"])
def test_official_dino_bare_state_dict(tmp_path, arch):
    """DINO's backbone releases: a bare state dict; the torchvision one still has its ``fc`` classifier."""
    import torchvision

    if arch == "resnet18":
        torch.manual_seed(5)
        source = torchvision.models.resnet18(weights=None)
        state = source.state_dict()
        assert "fc.weight" in state
    else:
        source = build(arch, seed=5)
        state = source.state_dict()
    torch.save(state, tmp_path / "release.pth")
    model = utils.load_pretrained_weights(build(arch, seed=6), str(tmp_path / "release.pth"))
    loaded = model.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_code_executing_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"weight": Payload()}}, path)
    with pytest.raises(utils.ConfigError, match="refusing to load .*system"):
        utils.load_pretrained_weights(build("vit_tiny"), str(path))
    assert not marker.exists()
    # The file really is armed: an unrestricted load runs the command.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_backbone_key_fails_naming_it(tmp_path):
    state = build("vit_tiny").state_dict()
    del state["blocks.11.mlp.fc2.weight"]
    torch.save({"teacher": state}, tmp_path / "partial.pth")
    with pytest.raises(utils.ConfigError, match="1 backbone weights missing .*blocks.11.mlp.fc2.weight"):
        utils.load_pretrained_weights(build("vit_tiny"), str(tmp_path / "partial.pth"))


def test_wrong_shape_fails(tmp_path):
    """A ViT-S/16 checkpoint into a ViT/8 (the published ViTs are ViT-S/8: an easy mix-up) must not load."""
    torch.save({"teacher": build("vit_tiny", 16).state_dict()}, tmp_path / "p16.pth")
    model = build("vit_tiny", 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(utils.ConfigError, match=r"wrong shape .*patch_embed.proj.weight \(checkpoint \(192, 3, 16"):
        utils.load_pretrained_weights(model, str(tmp_path / "p16.pth"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pos_embed_of_another_grid_is_resampled(tmp_path):
    """A checkpoint trained at 96 px (6x6 patches) loads into the 224 px model (14x14) with resampled positions."""
    torch.manual_seed(7)
    small = vits.vit_tiny(patch_size=16, img_size=96)
    torch.save({"teacher": small.state_dict()}, tmp_path / "p96.pth")
    model = utils.load_pretrained_weights(build("vit_tiny"), str(tmp_path / "p96.pth"))
    assert model.pos_embed.shape == (1, 197, 192)
    expected = resample_abs_pos_embed(
        small.pos_embed, new_size=(14, 14), old_size=(6, 6), num_prefix_tokens=1, antialias=False
    )
    assert torch.allclose(model.pos_embed, expected)
    assert torch.equal(model.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)


def test_missing_path_is_an_error_never_a_fallback(tmp_path):
    model = build("vit_tiny")
    before = model.pos_embed.clone()
    with pytest.raises(utils.ConfigError, match=f"--pretrained_weights {tmp_path}/nope.pth does not exist"):
        utils.load_pretrained_weights(model, str(tmp_path / "nope.pth"))
    assert torch.equal(model.pos_embed, before)


def test_weights_required_unless_none(capsys):
    with pytest.raises(utils.ConfigError, match="--pretrained_weights is required"):
        utils.load_pretrained_weights(build("vit_tiny"), None)
    model = build("vit_tiny")
    before = model.pos_embed.clone()
    assert utils.load_pretrained_weights(model, "none") is model
    assert torch.equal(model.pos_embed, before)
    assert "randomly initialised" in capsys.readouterr().out


def test_unknown_checkpoint_key_lists_entries(tmp_path):
    path = tmp_path / "checkpoint.pth"
    our_checkpoint(path, "vit_tiny")
    with pytest.raises(utils.ConfigError, match="--checkpoint_key ema: .*entries holding dicts: .*student, teacher"):
        utils.load_pretrained_weights(build("vit_tiny"), str(path), "ema")


def test_url_downloaded_once_into_cache(tmp_path, http_root, monkeypatch):
    served, base, requests = http_root
    _, teacher = published_checkpoint(served / "dino_mc.pth", "vit_tiny", 16)
    cache = tmp_path / "cache"
    monkeypatch.setenv("DINO_MC_CACHE", str(cache))
    url = f"{base}/dino_mc.pth"

    model = utils.load_pretrained_weights(build("vit_tiny"), url)
    assert_same_backbone(model, teacher)
    assert requests == ["/dino_mc.pth"]
    cached = utils.resolve_weights_path(url)
    assert cached.parent == cache and cached.name.endswith("-dino_mc.pth")
    assert cached.read_bytes() == (served / "dino_mc.pth").read_bytes()
    assert_same_backbone(utils.load_pretrained_weights(build("vit_tiny"), url), teacher)
    assert requests == ["/dino_mc.pth"]  # second and third use: the cache, no request
    assert not list(cache.glob("*.partial"))


def test_interrupted_download_restarts_cleanly(tmp_path, http_root):
    served, base, requests = http_root
    (served / "w.pth").write_bytes(b"complete file")
    url = f"{base}/w.pth"
    cache = tmp_path / "cache"
    target = utils.resolve_weights_path(url, cache)
    target.unlink()
    # What a killed run leaves behind: a truncated .partial, never the final name.
    target.with_name(target.name + ".partial").write_bytes(b"compl")
    assert utils.resolve_weights_path(url, cache).read_bytes() == b"complete file"
    assert len(requests) == 2


def test_http_error_is_one_line_and_leaves_nothing(tmp_path, http_root):
    _, base, _ = http_root
    cache = tmp_path / "cache"
    with pytest.raises(utils.ConfigError, match="download failed: HTTP Error 404"):
        utils.resolve_weights_path(f"{base}/missing.pth", cache)
    assert not list(cache.iterdir())


DRIVE_ID = published.BY_NAME["dino_mc_vits8"].drive_id


@pytest.mark.parametrize(
    "spec",
    [
        f"https://drive.google.com/file/d/{DRIVE_ID}/view?usp=sharing",
        f"https://drive.google.com/file/d/{DRIVE_ID}/view",
        f"https://drive.google.com/open?id={DRIVE_ID}",
        f"https://drive.google.com/uc?id={DRIVE_ID}&export=download",
        f"https://drive.google.com/uc?export=download&id={DRIVE_ID}",
        DRIVE_ID,
    ],
)
def test_google_drive_id_parsing(spec):
    assert utils.google_drive_id(spec) == DRIVE_ID


@pytest.mark.parametrize(
    "spec", ["checkpoint.pth", "runs/dino/checkpoint0100.pth", "https://example.org/file/d.pth", "short_id"]
)
def test_not_google_drive(spec):
    assert utils.google_drive_id(spec) is None


def test_google_drive_download_goes_to_cache_once(tmp_path, monkeypatch):
    """The Drive path calls torchvision's downloader with the id, into a .partial name, then renames it."""
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(file_id, root, filename=None, md5=None):
        calls.append((file_id, Path(root), filename))
        torch.save(build("vit_tiny", seed=9).state_dict(), Path(root) / filename)

    monkeypatch.setattr(tv_utils, "download_file_from_google_drive", fake_download)
    monkeypatch.setenv("DINO_MC_CACHE", str(tmp_path))
    link = f"https://drive.google.com/file/d/{DRIVE_ID}/view?usp=sharing"
    model = utils.load_pretrained_weights(build("vit_tiny"), link)
    assert torch.equal(model.pos_embed, build("vit_tiny", seed=9).pos_embed)
    ((file_id, root, partial),) = calls  # a partial name of its own, so nodes sharing the cache never collide
    assert (file_id, root) == (DRIVE_ID, tmp_path)
    assert partial.startswith(f".gdrive-{DRIVE_ID}.pth.") and partial.endswith(".partial")
    assert utils.resolve_weights_path(DRIVE_ID) == tmp_path / f"gdrive-{DRIVE_ID}.pth"
    assert len(calls) == 1


# ============================================================================================ other input bands


@pytest.mark.parametrize("arch", ["vit_tiny", "resnet18"])
def test_rgb_weights_on_twelve_bands_give_the_rgb_features_for_rgb_input(tmp_path, arch, capsys):
    """--adapt_input rgb: B4, B3, B2 keep the RGB filters, so an RGB image placed there (other bands at zero)
    gives exactly the RGB model's features; the other bands get timm's adapted filters, not zeros."""
    rgb = build(arch).eval()
    torch.save({"teacher": rgb.state_dict()}, tmp_path / "rgb.pth")
    bands = list(S2_BANDS)
    model, _ = utils.load_backbone(arch, 16, bands, str(tmp_path / "rgb.pth"), adapt_input="rgb")
    assert "--adapt_input rgb" in capsys.readouterr().out
    image = torch.rand(2, 3, 64, 64)
    multispectral = torch.zeros(2, len(bands), 64, 64)
    for channel, band in enumerate(("B4", "B3", "B2")):
        multispectral[:, bands.index(band)] = image[:, channel]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(multispectral), rgb(image), rtol=1e-5, atol=1e-5)
    stem = "patch_embed.proj.weight" if arch.startswith("vit") else "conv1.weight"
    weight = model.state_dict()[stem]
    assert weight.shape[1] == 12 and weight[:, bands.index("B8")].abs().sum() > 0


def test_rgb_weights_need_the_flag_and_rgb_bands_among_bands(tmp_path):
    rgb = build("vit_tiny")
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    with pytest.raises(utils.ConfigError, match="--adapt_input rgb or s2"):
        utils.load_backbone("vit_tiny", 16, ["B4", "B3", "B2", "B8"], str(tmp_path / "rgb.pth"))
    with pytest.raises(utils.ConfigError, match="--adapt_input s2: the weights have no input convolution over 13"):
        utils.load_backbone("vit_tiny", 16, ["B4", "B3", "B2", "B8"], str(tmp_path / "rgb.pth"), adapt_input="s2")


def test_sentinel2_weights_in_torchgeo_format_load_with_b10_dropped(tmp_path):
    """torchgeo's Sentinel-2 weights: a timm ViT over the 13 L1C bands (B10 included), timm key names. Our
    12-band model takes each band's own filters; with B10 at zero both give the same features."""
    torch.manual_seed(0)
    timm_model = timm.create_model("vit_tiny_patch16_224", in_chans=13, num_classes=0).eval()
    torch.save(timm_model.state_dict(), tmp_path / "s2.pth")
    model, _ = utils.load_backbone("vit_tiny", 16, list(S2_BANDS), str(tmp_path / "s2.pth"), adapt_input="s2")
    image = torch.rand(1, 12, 224, 224)
    with_b10 = torch.zeros(1, 13, 224, 224)
    for i, band in enumerate(S2_BANDS):
        with_b10[:, S2_L1C_BANDS.index(band)] = image[:, i]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image), timm_model(with_b10), rtol=1e-4, atol=1e-4)


def test_a_web_page_served_in_place_of_weights_is_not_cached(tmp_path, http_root):
    served, base, _ = http_root
    (served / "w.pth").write_text("<!DOCTYPE html><html><body>Quota exceeded</body></html>")
    with pytest.raises(utils.ConfigError, match="download failed: the server sent a web page"):
        utils.resolve_weights_path(f"{base}/w.pth", tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".partial")]
