"""visualize_attention.py on real Sentinel-2 GeoTIFF tiles and on a 13-band EuroSAT MS file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import utils
import visualize_attention
from tests.downstream_fixtures import write_eurosat_ms

HEADS = 3  # vit_tiny


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


@pytest.mark.parametrize(("patch_size", "image_size", "expected"), [(8, "64", 64), (16, "64", 64), (16, "60", 48)])
def test_attention_pngs_have_the_image_size(shared_data, tmp_path, patch_size, image_size, expected):
    """One PNG per head plus the overlay, at the resized image cut to whole patches (60 px / 16 -> 48 px)."""
    torch.manual_seed(0)
    model = utils.build_backbone("vit_tiny", patch_size)[0]
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ckpt.pth")
    out = tmp_path / "out"
    visualize_attention.run(
        ["--arch", "vit_tiny", "--patch_size", str(patch_size), "--pretrained_weights", str(tmp_path / "ckpt.pth")]
        + ["--image_path", str(shared_data / "sentinel2-rgb-tiles" / "102.tif"), "--image_size", image_size]
        + ["--output_dir", str(out)]
    )
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted([f"attn-head{i}.png" for i in range(HEADS)] + ["attn-overlay.png", "img.png"])
    assert all(png_size(out / name) == (expected, expected) for name in names)


def test_cls_attention_is_a_distribution_over_patches(shared_data):
    """Each head's map repeats one value per patch, and the values over patches plus CLS sum to one."""
    torch.manual_seed(0)
    model = utils.build_backbone("vit_tiny", 8)[0].eval()
    args = visualize_attention.get_args_parser().parse_args(
        ["--image_path", str(shared_data / "sentinel2-rgb-tiles" / "236.tif"), "--image_size", "40", "56"]
    )
    visualize_attention.check_args(args)
    _, x = visualize_attention.prepare(visualize_attention.load_image(args), args)
    assert x.shape == (3, 40, 56)
    maps = visualize_attention.cls_attention(model, x, 8)
    assert maps.shape == (HEADS, 40, 56)
    patches = maps[:, ::8, ::8]
    assert torch.equal(maps, patches.repeat_interleave(8, 1).repeat_interleave(8, 2))
    with torch.no_grad():
        cls_to_cls = model.get_last_selfattention(x[None])[0, :, 0, 0]
    assert torch.allclose(patches.sum((1, 2)) + cls_to_cls, torch.ones(HEADS), atol=1e-5)


def test_multispectral_geotiff_with_file_bands(tmp_path):
    folder = write_eurosat_ms(tmp_path / "ms", {"Forest": 1}, size=32)
    out = tmp_path / "out"
    visualize_attention.run(
        ["--arch", "vit_tiny", "--patch_size", "16", "--pretrained_weights", "none", "--bands", "B4,B3,B2,B8"]
        + ["--file_bands", "eurosat", "--image_path", str(folder / "Forest" / "Forest_1.tif")]
        + ["--image_size", "32", "--output_dir", str(out)]
    )
    assert png_size(out / "attn-overlay.png") == (32, 32)
    picture = np.asarray(Image.open(out / "img.png"))
    assert picture.shape == (32, 32, 3) and picture.std() > 0  # the percentile stretch keeps the texture


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--arch", "resnet18"], "error: --arch resnet18: attention maps need a ViT"),
        (["--bands", "B4,B3,B2,B8"], "bands but --bands B4,B3,B2,B8 asks for 4; pass --file_bands"),
        (["--pretrained_weights", "/no/ckpt.pth"], "error: --pretrained_weights /no/ckpt.pth does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(shared_data, tmp_path, capsys, extra, message):
    argv = ["--arch", "vit_tiny", "--patch_size", "16", "--pretrained_weights", "none", "--image_size", "32"]
    argv += ["--image_path", str(shared_data / "sentinel2-rgb-tiles" / "102.tif"), "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        visualize_attention.run(argv + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
