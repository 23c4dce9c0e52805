"""OSCD reader on fixtures in the archive layout and the DINO-MC layout, rect and raw images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import DataError
from datasets.oscd import OSCD, OSCD_RGB_STRETCH, band_stretch, normalize, split_cities, stitch_tiles
from tests.downstream_fixtures import oscd_band, oscd_change_region, write_oscd

CITIES = {"paris": (100, 130), "bercy": (64, 80), "brasilia": (70, 50)}
TRAIN, TEST = ["paris", "bercy"], ["brasilia"]
RGB = ["B4", "B3", "B2"]


def expected_image(city: str, date: int, bands: list[str]) -> np.ndarray:
    return normalize(np.stack([oscd_band(b, CITIES[city], date) for b in bands]), bands)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("oscd_archive")
    write_oscd(root, CITIES, TRAIN, TEST, layout="archive")
    return root


def test_tiles_cover_each_city_with_zero_padding(archive):
    ds = OSCD(archive, "train", tile_size=48)
    assert ds.cities == TRAIN and ds.city_shape("paris") == (100, 130) and ds.city_shape("bercy") == (64, 80)
    # paris: ceil(100/48) * ceil(130/48) = 3 * 3; bercy: 2 * 2.
    assert len(ds) == 13
    assert ds.tiles[:4] == [("paris", 0, 0), ("paris", 0, 48), ("paris", 0, 96), ("paris", 48, 0)]
    item = ds[8]  # paris bottom-right tile: 100 - 96 = 4 rows and 130 - 96 = 34 columns are real
    assert (item["city"], item["row"], item["col"]) == ("paris", 96, 96)
    assert item["img1"].shape == item["img2"].shape == (3, 48, 48) and item["img1"].dtype == torch.float32
    assert item["label"].shape == item["mask"].shape == (1, 48, 48) and item["mask"].dtype == torch.bool
    assert item["mask"].sum() == 4 * 34 and item["mask"][0, :4, :34].all()
    assert item["img1"][:, 4:].abs().sum() == 0 and item["img2"][:, :, 34:].abs().sum() == 0
    assert item["img1"][:, :4, :34].min() > 0
    assert sum(int(ds[i]["mask"].sum()) for i in range(len(ds))) == 100 * 130 + 64 * 80


def test_stitching_rebuilds_the_full_city(archive):
    ds = OSCD(archive, "train", tile_size=48)
    for city in TRAIN:
        items = [ds[i] for i, (c, _, _) in enumerate(ds.tiles) if c == city]
        rows, cols = [it["row"] for it in items], [it["col"] for it in items]
        img1 = stitch_tiles(torch.stack([it["img1"] for it in items]), rows, cols, ds.city_shape(city))
        label = stitch_tiles(torch.stack([it["label"] for it in items]), rows, cols, ds.city_shape(city))
        assert np.array_equal(img1.numpy(), expected_image(city, 1, RGB))
        assert np.array_equal(label[0].numpy(), oscd_change_region(CITIES[city]).astype(np.float32))


def test_rgb_stretch_and_other_bands(archive):
    ds = OSCD(archive, "test", bands="B4,B3,B2,B8,B10", tile_size=96)
    assert ds.cities == TEST and len(ds) == 1 and ds.city_shape("brasilia") == (70, 50)
    item = ds[0]
    raw = oscd_band("B4", CITIES["brasilia"], 1)[0, 0]
    low, high = OSCD_RGB_STRETCH["B4"]
    assert item["img1"][0, 0, 0].item() == pytest.approx((raw - low) / (high - low))
    assert band_stretch("B3") == (667.0, 2969.0) and band_stretch("B2") == (885.0, 2620.0)
    assert band_stretch("B10")[0] == pytest.approx(12.11327804 - 2 * 4.77584468)
    valid = item["img1"][:, :70, :50]
    assert valid.min() >= 0 and valid.max() <= 1 and valid[3].std() > 0
    # The label marks exactly the pixels where the fixture's date 2 differs.
    changed = (item["img2"][:3] != item["img1"][:3]).any(0)
    assert torch.equal(changed[:70, :50], item["label"][0, :70, :50].bool())


def test_dinomc_layout_and_tif_labels(tmp_path):
    write_oscd(tmp_path, CITIES, TRAIN, TEST, layout="dinomc", label_format="tif")
    assert (tmp_path / "val_labels" / "brasilia" / "cm" / "brasilia-cm.tif").is_file()
    ds = OSCD(tmp_path, "test", tile_size=32)
    assert len(ds) == 3 * 2
    tiles = torch.stack([ds[i]["label"] for i in range(len(ds))])
    label = stitch_tiles(tiles, [r for _, r, _ in ds.tiles], [c for _, _, c in ds.tiles], ds.city_shape("brasilia"))
    assert np.array_equal(label[0].numpy(), oscd_change_region((70, 50)).astype(np.float32))
    assert len(OSCD(tmp_path, "train", tile_size=64)) == 2 * 3 + 1 * 2


def test_raw_fallback_resamples_to_the_10m_grid(tmp_path):
    write_oscd(tmp_path, {"paris": (100, 130)}, ["paris"], [], rect=False, raw=True)
    ds = OSCD(tmp_path, "train", bands="B4,B3,B2,B5,B1", tile_size=136)
    assert ds.city_shape("paris") == (100, 130) and len(ds) == 1
    item = ds[0]
    expected = expected_image("paris", 1, ["B4", "B3", "B2", "B5", "B1"])
    assert np.array_equal(item["img1"][:3, :100, :130].numpy(), expected[:3])  # 10 m bands: no resampling
    # B5 was stored at 20 m (50x65): after bilinear upsampling it follows the full-resolution band on average.
    assert abs(item["img1"][3, :100, :130].mean().item() - expected[3].mean()) < 0.02


def test_rect_preferred_over_raw(tmp_path):
    write_oscd(tmp_path, {"paris": (100, 130)}, ["paris"], [], rect=True, raw=True)
    paris = tmp_path / "Onera Satellite Change Detection dataset - Images" / "paris"
    for path in (paris / "imgs_1").iterdir():
        path.write_bytes(b"not a tiff")  # would fail if read
    assert OSCD(tmp_path, "train").city_shape("paris") == (100, 130)


def apply(array: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    array = torch.rot90(array, turns, dims=(-2, -1))
    return array.flip(-1) if flip else array


def test_augmentation_moves_dates_label_and_mask_together(archive):
    plain = OSCD(archive, "train", tile_size=48)
    augmented = OSCD(archive, "train", tile_size=48, augment=True)
    index = 8  # a padded, asymmetric edge tile
    reference = plain[index]
    seen = set()
    torch.manual_seed(0)
    for _ in range(40):
        item = augmented[index]
        transforms = [(k, f) for k in range(4) for f in (False, True)]
        matches = [(k, f) for k, f in transforms if torch.equal(apply(reference["img1"], k, f), item["img1"])]
        assert len(matches) == 1
        turns, flip = matches[0]
        seen.add(matches[0])
        for name in ("img2", "label", "mask"):
            assert torch.equal(apply(reference[name], turns, flip), item[name]), name
        assert (item["city"], item["row"], item["col"]) == ("paris", 96, 96)
    assert len(seen) == 8


def test_errors(tmp_path):
    write_oscd(tmp_path, CITIES, TRAIN, TEST)
    images = tmp_path / "Onera Satellite Change Detection dataset - Images"

    (images / "train.txt").write_text("paris,atlantis")
    with pytest.raises(DataError, match="atlantis"):
        OSCD(tmp_path, "train")
    (images / "train.txt").write_text("paris,bercy")

    (images / "bercy" / "imgs_2_rect" / "B03.tif").unlink()
    with pytest.raises(DataError, match="missing band file .*bercy/imgs_2_rect/B03.tif"):
        OSCD(tmp_path, "train")
    assert len(OSCD(tmp_path, "train", bands="B8")) > 0  # other bands still readable

    cm = tmp_path / "Onera Satellite Change Detection dataset - Test Labels" / "brasilia" / "cm" / "cm.png"
    Image.fromarray(np.zeros((60, 50), dtype=np.uint8)).save(cm)
    with pytest.raises(DataError, match="is 60x50 .* brasilia are 70x50"):
        OSCD(tmp_path, "test")

    with pytest.raises(DataError, match="no OSCD images"):
        OSCD(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        OSCD(tmp_path, "val")


@pytest.mark.parametrize("layout", ["archive", "dinomc"])
def test_without_city_lists_the_label_folders_give_the_cities(tmp_path, layout):
    """Copies made by other tools (torchgeo's) have no train.txt / test.txt: the Train / Test Labels folders
    then name the cities."""
    images = write_oscd(tmp_path, CITIES, TRAIN, TEST, layout=layout)
    (images / "train.txt").unlink()
    (images / "test.txt").unlink()
    train, test = OSCD(tmp_path, "train", tile_size=48), OSCD(tmp_path, "test", tile_size=48)
    assert train.cities == sorted(TRAIN) and test.cities == TEST
    assert train.list_file is None and test.list_file is None
    assert train.label_dir.name in ("Onera Satellite Change Detection dataset - Train Labels", "train_labels")
    assert len(train) == 13 and train.city_shape("paris") == (100, 130)
    assert split_cities(tmp_path, "test") == (TEST, None)
    with_lists = write_oscd(tmp_path / "listed", CITIES, TRAIN, TEST, layout=layout)
    assert split_cities(tmp_path / "listed", "train") == (TRAIN, with_lists / "train.txt")


def test_label_folder_without_cities_and_no_list_is_an_error(tmp_path):
    images = write_oscd(tmp_path, {"paris": (40, 40)}, ["paris"], [])
    (images / "test.txt").unlink()
    (tmp_path / "Onera Satellite Change Detection dataset - Test Labels").mkdir()
    with pytest.raises(DataError, match="no test.txt in .* has no city folders"):
        OSCD(tmp_path, "test")


def test_a_subset_of_the_split_cities(archive):
    ds = OSCD(archive, "train", tile_size=48, cities=["bercy"])
    assert ds.cities == ["bercy"] and len(ds) == 4
    with pytest.raises(DataError, match="OSCD train cities brasilia asked, but the train cities of .* are paris,bercy"):
        OSCD(archive, "train", cities=["brasilia"])
