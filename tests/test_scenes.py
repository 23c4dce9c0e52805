"""Large scenes cut into tiles by prepare_data.py --tile_size, on a real Landsat scene with a nodata border."""

from __future__ import annotations

import pytest
import rasterio
import torch
import zarr
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

import main_dino_mc
import prepare_data
from datasets import DataError
from datasets.scenes import tile_starts
from datasets.seco import SeCoDataset

# rasterio's window transform multiplies affines with the operator affine deprecates
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")


@pytest.fixture(scope="module")
def scene(shared_data):
    return shared_data / "landsat" / "RGB.byte.tif"


def test_tile_starts_cover_the_scene_and_align_the_last_tile():
    assert tile_starts(10, 4, 4) == [0, 4, 6]
    assert tile_starts(8, 4, 4) == [0, 4]
    assert tile_starts(10, 4, 3) == [0, 3, 6]
    assert tile_starts(3, 4, 4) == []


def test_scene_tiles_skip_nodata_and_keep_their_georeference(scene, tmp_path):
    store = tmp_path / "tiles.zarr"
    flags = ["--tile_size", "128", "--tile_overlap", "32"]
    prepare_data.run(["--data_path", str(scene), "--output_path", str(store), *flags])
    meta = zarr.open_group(store, mode="r").attrs["dino_mc"]
    dataset = SeCoDataset(store)
    with rasterio.open(scene) as src:
        valid = src.dataset_mask() > 0
        rows, cols = tile_starts(src.height, 128, 96), tile_starts(src.width, 128, 96)
        full = [(r, c) for r in rows for c in cols if valid[r : r + 128, c : c + 128].all()]
        assert 0 < len(full) == len(dataset) < len(rows) * len(cols)  # the border's tiles are skipped
        for i, (row, col) in enumerate(full):
            assert dataset.locations[i] == f"RGB.byte_{row:05d}_{col:05d}"
            window = Window(col, row, 128, 128)
            assert torch.equal(dataset.load(i, 0), torch.from_numpy(src.read(window=window)))  # RGB as is
            georeference = meta["georeference"][i]
            assert georeference["crs"] == "EPSG:32618"
            assert georeference["transform"] == pytest.approx(list(window_transform(window, src.transform))[:6])
    with pytest.raises(DataError, match="--data_mode tp needs several acquisitions"):
        SeCoDataset(store, data_mode="tp")


def test_max_nodata_keeps_border_tiles_and_the_tiles_pretrain(scene, tmp_path):
    store = tmp_path / "all.zarr"
    prepare_data.run(
        ["--data_path", str(scene), "--output_path", str(store), "--tile_size", "256", "--max_nodata", "1"]
    )
    assert len(SeCoDataset(store)) == 12  # 3 x 4 tiles of 256 px cover 718 x 791 (the last ones edge-aligned)
    args = ["--arch", "vit_tiny", "--patch_size", "16", "--data_path", str(store), "--output_dir", str(tmp_path / "o")]
    args += ["--epochs", "1", "--batch_size_per_gpu", "4", "--out_dim", "64", "--num_workers", "0", "--device", "cpu"]
    args += ["--precision", "fp32", "--global_crops_size", "64", "--local_crops_number", "2"]
    args += ["--size_crops", "32", "32"]
    main_dino_mc.run(args)
    assert torch.load(tmp_path / "o" / "checkpoint.pth")["epoch"] == 1


def test_bad_tiling_arguments_are_one_line(scene, tmp_path, capsys):
    for flags, message in (
        (["--tile_size", "64", "--tile_overlap", "64"], "0 <= --tile_overlap < --tile_size"),
        (["--tile_size", "4000"], "no 4000 x 4000 tile"),
        (["--tile_size", "64", "--max_nodata", "2"], "--max_nodata is a fraction"),
    ):
        with pytest.raises(SystemExit) as exc:
            prepare_data.run(["--data_path", str(scene), "--output_path", str(tmp_path / "x.zarr"), *flags])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.zarr").exists()
