"""EuroSAT reader on fixtures in the real RGB (2750/) and MS (ds/images/...) layouts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from datasets import DataError
from datasets.eurosat import (
    EUROSAT_MS_MEAN_STD,
    MS_FILE_BANDS,
    MS_SUBDIR,
    RGB_SUBDIR,
    EuroSAT,
    make_stratified_split,
    normalize,
    save_split,
)
from tests.downstream_fixtures import class_colour, write_eurosat_ms, write_eurosat_rgb, write_eurosat_split_files

COUNTS = {"Forest": 5, "AnnualCrop": 10, "SeaLake": 5}
CLASSES = ["AnnualCrop", "Forest", "SeaLake"]


def test_rgb_archive_layout_classes_and_split_files(tmp_path):
    write_eurosat_rgb(tmp_path, COUNTS)
    split = {"train": ["Forest_1.jpg", "SeaLake_2.jpg", "AnnualCrop_10.jpg"], "val": ["Forest_2.jpg"]}
    write_eurosat_split_files(tmp_path, {**split, "test": ["SeaLake_5.jpg"]})
    train = EuroSAT(tmp_path, "train")
    assert train.classes == CLASSES
    assert [label for _, label in train.samples] == [1, 2, 0] == train.targets
    assert train.samples[0][0] == str(tmp_path / "2750" / "Forest" / "Forest_1.jpg")
    assert train.generated_split is None
    for image, label in train:
        assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
        expected = torch.tensor(class_colour(label), dtype=torch.float32)
        assert torch.allclose(image.float().mean(dim=(1, 2)), expected, atol=3)
    assert len(EuroSAT(tmp_path, "val")) == 1 and EuroSAT(tmp_path, "test").targets == [2]


def test_root_pointing_at_class_folders(tmp_path):
    write_eurosat_rgb(tmp_path, COUNTS, subdir="")
    ds = EuroSAT(tmp_path, "train")
    assert ds.classes == CLASSES and len(ds) == 12
    assert all(Path(path).parent == tmp_path / ds.classes[label] for path, label in ds.samples)


def test_dino_style_imagefolder_split(tmp_path):
    write_eurosat_rgb(tmp_path, COUNTS, subdir="train")
    write_eurosat_rgb(tmp_path, {"Forest": 2, "SeaLake": 1}, subdir="val")
    train, val = EuroSAT(tmp_path, "train"), EuroSAT(tmp_path, "val")
    assert len(train) == 20 and len(val) == 3
    # Val lacks AnnualCrop, yet class indices must match the train split's.
    assert val.classes == CLASSES and val.targets == [1, 1, 2]
    with pytest.raises(DataError, match="test"):
        EuroSAT(tmp_path, "test")


def test_seeded_stratified_split_without_split_files(tmp_path):
    write_eurosat_rgb(tmp_path, COUNTS)
    parts = {name: EuroSAT(tmp_path, name, seed=3) for name in ("train", "val", "test")}
    assert [len(p) for p in parts.values()] == [12, 4, 4]
    # Per class 60/20/20: AnnualCrop (10 images) gives 6/2/2.
    assert [p.targets.count(0) for p in parts.values()] == [6, 2, 2]
    paths = [set(path for path, _ in p.samples) for p in parts.values()]
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2]) and not (paths[1] & paths[2])
    assert parts["train"].generated_split == EuroSAT(tmp_path, "train", seed=3).generated_split
    assert parts["train"].generated_split != EuroSAT(tmp_path, "train", seed=4).generated_split

    written = save_split(parts["train"].generated_split, tmp_path / "out")
    assert [p.name for p in written] == ["eurosat-train.txt", "eurosat-val.txt", "eurosat-test.txt"]
    for path in written:
        (tmp_path / path.name).write_text(path.read_text())
    reloaded = EuroSAT(tmp_path, "val")
    assert reloaded.generated_split is None and reloaded.samples == parts["val"].samples


def test_make_stratified_split_counts():
    files = {"A": [f"A_{i}.jpg" for i in range(1, 3001)], "B": [f"B_{i}.jpg" for i in range(1, 2501)]}
    split = make_stratified_split(files, seed=0)
    assert [len(split[name]) for name in ("train", "val", "test")] == [3300, 1100, 1100]
    assert sum(f.startswith("A_") for f in split["train"]) == 1800
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(files["A"] + files["B"])


def test_ms_band_order_b8a_last(tmp_path):
    # Each band of the file holds its own constant, e.g. B8A (13th in the file) = 8100, B9 (9th) = 900.
    values = {band: 100 * (i + 1) for i, band in enumerate(("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8"))}
    values.update(B9=900, B10=1000, B11=1100, B12=1200, B8A=8100)
    write_eurosat_ms(tmp_path, {"Forest": 2, "River": 1}, band_values=values)
    write_eurosat_split_files(tmp_path, {"train": ["Forest_1.jpg", "River_1.jpg"]})  # RGB names map to .tif
    ds = EuroSAT(tmp_path, "train", bands="B8A,B8,B9,B10,B12,B2")
    assert ds.multispectral and ds.samples[1][0].endswith("sentinel_2/tif/River/River_1.tif")
    image, label = ds[0]
    assert image.dtype == torch.float32 and image.shape == (6, 64, 64) and label == 0
    assert image[:, 0, 0].tolist() == [8100, 800, 900, 1000, 1200, 200]
    rgb, _ = EuroSAT(tmp_path, "train")[1]
    assert rgb[:, 5, 5].tolist() == [400, 300, 200]


def test_ms_normalize_uses_file_order_statistics(tmp_path):
    values = {band: int(EUROSAT_MS_MEAN_STD[band][0] + EUROSAT_MS_MEAN_STD[band][1]) for band in MS_FILE_BANDS}
    write_eurosat_ms(tmp_path, {"Forest": 1}, band_values=values)
    bands = ["B8A", "B10", "B4"]
    # Root pointing directly at the MS class folders; the single image goes to train (round(0.6 * 1) = 1).
    ds = EuroSAT(tmp_path / MS_SUBDIR, "train", bands=bands)
    assert len(ds) == 1
    image, _ = ds[0]
    z = normalize(image, bands)
    # value = floor(mean + std) -> z just below 1 for every band, only if each band meets its own statistics.
    assert torch.all(z > 0.7) and torch.all(z <= 1.0)
    with pytest.raises(ValueError, match="3 band names"):
        normalize(image[:2], bands)


def test_errors(tmp_path):
    with pytest.raises(DataError, match="no EuroSAT class folders"):
        EuroSAT(tmp_path, "train")
    write_eurosat_rgb(tmp_path, COUNTS)
    with pytest.raises(ValueError, match="needs the EuroSAT MS GeoTIFFs"):
        EuroSAT(tmp_path, "train", bands="B4,B3,B2,B8")
    write_eurosat_split_files(tmp_path, {"train": ["Forest_1.jpg", "Forest_99.jpg"]})
    with pytest.raises(DataError, match="Forest_99"):
        EuroSAT(tmp_path, "train")
    with pytest.raises(DataError, match="eurosat-val.txt is missing"):
        EuroSAT(tmp_path, "val")
    with pytest.raises(ValueError, match="split must be one of"):
        EuroSAT(tmp_path, "validation")


@pytest.mark.parametrize(("per_class", "empty"), [(1, "val"), (2, "val"), (3, "test")])
def test_generated_split_of_a_tiny_folder_refuses_an_empty_split(tmp_path, per_class, empty):
    """1 or 2 images per class leave val without images (round(0.2 x n) = 0), 3 leave test without any."""
    write_eurosat_rgb(tmp_path, {"Forest": per_class, "River": per_class})
    assert len(EuroSAT(tmp_path, "train")) == 2 * round(0.6 * per_class)
    message = f"the EuroSAT {empty} split of {tmp_path / RGB_SUBDIR} is empty: without split files the seeded"
    with pytest.raises(DataError, match=re.escape(message) + f".* of {2 * per_class} images gives it none"):
        EuroSAT(tmp_path, empty)


def test_empty_split_folder_is_an_error(tmp_path):
    write_eurosat_rgb(tmp_path, {"Forest": 2}, subdir="train")
    (tmp_path / "val" / "Forest").mkdir(parents=True)  # the class folder is there, its images are not
    assert len(EuroSAT(tmp_path, "train")) == 2
    with pytest.raises(DataError, match=re.escape(f"the EuroSAT val split of {tmp_path} is empty: {tmp_path / 'val'}")):
        EuroSAT(tmp_path, "val")
