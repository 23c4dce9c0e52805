"""SeCoDataset on the real SeCo-layout sample and on generated fixtures of its three layouts; one image file read."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from datasets import DataError
from datasets.bands import RGB_BANDS, S2_BANDS, SECO_RGB_STRETCH, parse_bands
from datasets.folder import read_image
from datasets.seco import SeCoDataset
from tests.conftest import SHARED_DATA
from tests.fixtures import (
    SIZE_10M,
    acquisition_id,
    fixture_value,
    write_band_folder,
    write_band_layout,
    write_image_folder_layout,
    write_preview_layout,
    write_tif,
)

REAL_SECO = SHARED_DATA / "seco-layout-real"
needs_real = pytest.mark.skipif(not REAL_SECO.is_dir(), reason=f"real sample data not found at {REAL_SECO}")
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _stretched(value: float, band: str) -> int:
    lo, hi = SECO_RGB_STRETCH[band]
    return int(np.rint(np.clip((value - lo) / (hi - lo), 0, 1) * 255))


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


@needs_real
def test_real_sample_all_bands_match_the_files_in_the_order_asked():
    bands = parse_bands("ALL")[::-1]  # reversed, so a reader that ignores the order fails
    dataset = SeCoDataset(REAL_SECO, bands=bands, data_mode="mc")
    assert dataset.locations == ["000000"]
    assert dataset.num_bands == 12
    for k, name in enumerate(dataset.acquisition_names(0)):
        image = dataset.load(0, k)
        assert image.dtype == torch.uint8 and image.shape == (12, 101, 100)
        for channel, band in enumerate(bands):
            expected = _read(REAL_SECO / "000000" / name / f"{band}.tif")
            np.testing.assert_array_equal(image[channel].numpy(), expected)


@needs_real
def test_real_sample_rgb_gets_the_seco_quantile_stretch():
    dataset = SeCoDataset(REAL_SECO, data_mode="mc")
    image = dataset.load(0, 2).numpy()
    folder = REAL_SECO / "000000" / dataset.acquisition_names(0)[2]
    for channel, band in enumerate(RGB_BANDS):
        raw = _read(folder / f"{band}.tif").astype(np.float64)
        lo, hi = SECO_RGB_STRETCH[band]
        expected = np.rint(np.clip((raw - lo) / (hi - lo), 0, 1) * 255)
        np.testing.assert_array_equal(image[channel], expected)
    assert image.mean() > _read(folder / "B2.tif").mean()  # the stretch brightens the dark raw reflectance


def test_band_folders_native_resolutions_are_brought_to_10m_grid(tmp_path):
    write_band_layout(tmp_path, n_locations=2, n_acquisitions=3)
    dataset = SeCoDataset(tmp_path, bands=["B8A", "B1", "B4"], data_mode="mc")
    assert dataset.locations == ["000000", "000001"]
    image = dataset.load(1, 2)
    assert image.shape == (3, SIZE_10M, SIZE_10M) and image.dtype == torch.uint8
    for channel, band in enumerate(["B8A", "B1", "B4"]):
        assert torch.all(image[channel] == fixture_value(2, S2_BANDS.index(band)))


BAND_SUBSETS = [*S2_BANDS, "B5,B6", "B1,B9", "B12,B1,B5", "B8A,B11,B12,B5,B6,B7", "B2,B5", "B5,B1,B4", "ALL"]


@pytest.mark.parametrize("bands", BAND_SUBSETS)
def test_every_band_subset_is_on_the_10m_grid(tmp_path, bands):
    """20 m (12 px) and 60 m (4 px) bands asked alone or together still give the 10 m grid (24 px)."""
    write_band_layout(tmp_path, n_locations=1, n_acquisitions=2)
    dataset = SeCoDataset(tmp_path, bands=bands, data_mode="mc")
    image = dataset.load(0, 1)
    assert image.shape == (len(dataset.bands), SIZE_10M, SIZE_10M)
    for channel, band in enumerate(dataset.bands):
        assert torch.all(image[channel] == fixture_value(1, S2_BANDS.index(band))), band


def test_folder_without_any_10m_band_file_uses_the_native_resolutions(tmp_path):
    write_band_folder(tmp_path / "000000" / acquisition_id(0), 0, bands=("B5", "B1"))
    image = SeCoDataset(tmp_path, bands="B1,B5").load(0, 0)
    assert image.shape == (2, SIZE_10M, SIZE_10M)  # 4 px x 60 / 10 and 12 px x 20 / 10


@needs_real
@pytest.mark.parametrize("band", ["B5", "B1", "B11"])
def test_real_sample_bands_already_on_one_grid_are_not_upsampled(band):
    """The real sample stores every band at 101x100: the grid is its 10 m files', not size x resolution / 10."""
    dataset = SeCoDataset(REAL_SECO, bands=band)
    image = dataset.load(0, 0)
    assert image.shape == (1, 101, 100)
    expected = _read(REAL_SECO / "000000" / dataset.acquisition_names(0)[0] / f"{band}.tif")
    np.testing.assert_array_equal(image[0].numpy(), expected)


def test_zero_padded_band_file_names_are_accepted(tmp_path):
    write_band_layout(tmp_path, n_locations=1, n_acquisitions=2, zero_padded=True)
    assert (tmp_path / "000000" / acquisition_id(0) / "B02.tif").exists()
    image = SeCoDataset(tmp_path, bands=["B2", "B11"]).load(0, 1)
    assert image[0, 0, 0] == fixture_value(1, S2_BANDS.index("B2"))
    assert image[1, 0, 0] == fixture_value(1, S2_BANDS.index("B11"))


def test_previews_are_read_as_stored_and_band_folders_win_when_both_exist(tmp_path):
    write_preview_layout(tmp_path, n_locations=1, n_acquisitions=3)
    previews = SeCoDataset(tmp_path)
    assert previews.acquisition_names(0) == [f"{acquisition_id(k)}.tif" for k in range(3)]
    assert previews.load(0, 1)[:, 0, 0].tolist() == [fixture_value(1, c) for c in range(3)]  # not stretched

    write_band_folder(tmp_path / "000000" / acquisition_id(0), 0)
    both = SeCoDataset(tmp_path)
    assert both.acquisition_names(0) == [acquisition_id(0)]
    expected = [_stretched(fixture_value(0, S2_BANDS.index(b)), b) for b in RGB_BANDS]
    assert both.load(0, 0)[:, 0, 0].tolist() == expected


def test_previews_only_cannot_give_other_bands(tmp_path):
    write_preview_layout(tmp_path, n_locations=1, n_acquisitions=2)
    with pytest.raises(DataError, match="only SeCo RGB previews.*B8"):
        SeCoDataset(tmp_path, bands=["B4", "B3", "B2", "B8"])


@pytest.mark.parametrize("extension", ["png", "jpg", "tif"])
def test_plain_image_folders_per_location(tmp_path, extension):
    write_image_folder_layout(tmp_path, extension, n_locations=2, n_acquisitions=3)
    dataset = SeCoDataset(tmp_path, data_mode="tp", transform=None)
    assert dataset.locations == ["site_0", "site_1"]
    images = dataset[1]
    assert len(images) == 3 and all(i.shape == (3, SIZE_10M, SIZE_10M) for i in images)
    firsts = sorted(int(i[0].float().mean().round()) for i in images)
    assert firsts == [fixture_value(k, 0) for k in range(3)]


def test_plain_folder_multiband_tif_bands_picked_by_s2_index(tmp_path):
    stack = np.stack([np.full((8, 8), fixture_value(0, j), np.uint8) for j in range(12)])
    write_tif(tmp_path / "site" / "t0.tif", stack)
    image = SeCoDataset(tmp_path, bands=["B12", "B8"]).load(0, 0)
    assert image[:, 0, 0].tolist() == [fixture_value(0, 11), fixture_value(0, 7)]


def test_mc_samples_a_new_acquisition_per_access_unless_fixed(tmp_path):
    write_band_layout(tmp_path, n_locations=2, n_acquisitions=4)
    torch.manual_seed(0)
    dataset = SeCoDataset(tmp_path, bands=["B2"], data_mode="mc")
    seen = {int(dataset[0][0][0, 0, 0]) for _ in range(40)}
    assert seen == {fixture_value(k, 1) for k in range(4)}

    fixed = SeCoDataset(tmp_path, bands=["B2"], data_mode="mc", fixed_acquisition=True, seed=3)
    assert len({int(fixed[0][0][0, 0, 0]) for _ in range(20)}) == 1
    again = SeCoDataset(tmp_path, bands=["B2"], data_mode="mc", fixed_acquisition=True, seed=3)
    assert [again.sample_acquisitions(i) for i in range(2)] == [fixed.sample_acquisitions(i) for i in range(2)]


def test_sampling_follows_torch_rng(tmp_path):
    write_band_layout(tmp_path, n_locations=1, n_acquisitions=5)
    dataset = SeCoDataset(tmp_path, bands=["B2"], data_mode="tp")
    torch.manual_seed(7)
    first = [dataset.sample_acquisitions(0) for _ in range(5)]
    torch.manual_seed(7)
    assert [dataset.sample_acquisitions(0) for _ in range(5)] == first


def test_tp_gives_three_distinct_acquisitions(tmp_path):
    write_band_layout(tmp_path, n_locations=1, n_acquisitions=3)
    dataset = SeCoDataset(tmp_path, bands=["B2"], data_mode="tp")
    for _ in range(30):
        images = dataset[0]
        assert len(images) == 3
        assert len({int(i[0, 0, 0]) for i in images}) == 3
    old = SeCoDataset(tmp_path, bands=["B2"], data_mode="tp", tp_with_replacement=True)
    assert any(len(set(old.sample_acquisitions(0))) < 3 for _ in range(50))


def test_transform_receives_the_list_of_images(tmp_path):
    write_band_layout(tmp_path, n_locations=1, n_acquisitions=3)
    dataset = SeCoDataset(tmp_path, bands=["B2", "B3"], data_mode="tp", transform=lambda imgs: [len(imgs)])
    assert dataset[0] == [3]


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope"))):
        SeCoDataset(tmp_path / "nope")


def test_empty_root(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path} has no location folders")):
        SeCoDataset(tmp_path)


def test_a_flat_folder_of_real_tiles_is_one_location_per_image(shared_data):
    """Real Sentinel-2 RGB tiles (3-band uint8 GeoTIFFs) straight in --data_path: each tile a location with one
    acquisition, read as the image it is (a rendering: no SeCo stretch); DINO-TP needs several dates."""
    tiles = shared_data / "sentinel2-rgb-tiles"
    dataset = SeCoDataset(tiles, data_mode="mc")
    names = sorted(p.name for p in tiles.glob("*.tif"))
    assert dataset.locations == names and all(dataset.acquisition_names(i) == [n] for i, n in enumerate(names))
    with rasterio.open(tiles / names[0]) as src:
        assert torch.equal(dataset.load(0, 0), torch.from_numpy(src.read()))
    with pytest.raises(DataError, match="--data_mode tp needs several acquisitions .* use --data_mode mc or dino"):
        SeCoDataset(tiles, data_mode="tp")


def test_location_without_acquisitions(tmp_path):
    write_band_layout(tmp_path, n_locations=1, n_acquisitions=2)
    (tmp_path / "000001").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / '000001'} has no acquisitions")):
        SeCoDataset(tmp_path)


def test_missing_band_file_is_named(tmp_path):
    write_band_layout(tmp_path, n_locations=2, n_acquisitions=2)
    missing = tmp_path / "000001" / acquisition_id(1) / "B8A.tif"
    os.remove(missing)
    SeCoDataset(tmp_path, bands="RGB")  # the RGB bands are all there
    with pytest.raises(DataError, match=re.escape(f"{missing} is missing")):
        SeCoDataset(tmp_path, bands="ALL")


def test_truncated_tif_is_named_at_read_time(tmp_path):
    write_band_layout(tmp_path, n_locations=1, n_acquisitions=2)
    broken = tmp_path / "000000" / acquisition_id(1) / "B3.tif"
    write_tif(broken, np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    broken.write_bytes(broken.read_bytes()[:300])
    dataset = SeCoDataset(tmp_path)
    dataset.load(0, 0)
    with pytest.raises(DataError, match=re.escape(str(broken))):
        dataset.load(0, 1)


def test_unknown_band_and_mode_are_value_errors(tmp_path):
    write_band_layout(tmp_path, n_locations=1, n_acquisitions=2)
    with pytest.raises(ValueError, match="B13"):
        SeCoDataset(tmp_path, bands=["B4", "B13"])
    with pytest.raises(ValueError, match="--data_mode"):
        SeCoDataset(tmp_path, data_mode="simclr")


def test_read_image_picks_bands_of_a_uint16_tif_by_position(tmp_path):
    """A 12-band GeoTIFF is in Sentinel-2 L2A order: B8A is its 9th band, B2 its 2nd; values stay uint16."""
    stack = np.stack([np.full((8, 8), 1000 * (j + 1), np.uint16) for j in range(12)])
    write_tif(tmp_path / "a.tif", stack)
    array, rendered = read_image(tmp_path / "a.tif", ["B8A", "B2"])
    assert array.dtype == np.uint16 and array[:, 0, 0].tolist() == [9000, 2000] and not rendered
    with pytest.raises(DataError, match="a.tif has the 12 bands.*no B10"):
        read_image(tmp_path / "a.tif", ["B10"])


def test_read_image_of_an_rgb_file(tmp_path):
    write_image_folder_layout(tmp_path, "jpg", n_locations=1, n_acquisitions=1)
    array, rendered = read_image(tmp_path / "site_0" / "t0.jpg", RGB_BANDS)
    assert array.dtype == np.uint8 and array.shape == (3, SIZE_10M, SIZE_10M) and rendered
    with pytest.raises(DataError, match="t0.jpg is an RGB image"):
        read_image(tmp_path / "site_0" / "t0.jpg", ["B8"])
