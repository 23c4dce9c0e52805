"""Our readers and torchgeo's own dataset classes on the same trees, in torchgeo's layouts (torchgeo 0.8)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from datasets.bands import RESOLUTION_M, canonical_band
from datasets.bigearthnet import BigEarthNet, class_names
from datasets.demo import write_seco_demo
from datasets.eurosat import EuroSAT
from datasets.oscd import OSCD
from datasets.oscd import normalize as oscd_normalize
from datasets.seco import SeCoDataset
from tests.downstream_fixtures import write_bigearthnet_lists, write_eurosat_ms, write_eurosat_split_files, write_oscd

torchgeo_datasets = pytest.importorskip("torchgeo.datasets", reason="torchgeo is a development requirement")

COUNTS = {"AnnualCrop": 5, "Forest": 4, "Pasture": 4, "SeaLake": 5}  # torchvision needs every class in every split


@pytest.fixture(scope="module")
def eurosat_ms(tmp_path_factory) -> Path:
    """The MS archive as torchgeo unpacks it, with SeCo's split lists (JPEG names, as distributed)."""
    root = tmp_path_factory.mktemp("eurosat")
    write_eurosat_ms(root, COUNTS, size=16)
    split = {"train": [], "val": [], "test": []}
    for cls, count in COUNTS.items():
        names = [f"{cls}_{n}.jpg" for n in range(1, count + 1)]
        split["train"] += names[:2]
        split["val"] += names[2:3]
        split["test"] += names[3:]
    write_eurosat_split_files(root, split)
    return root


@pytest.mark.parametrize("split", ["train", "val", "test"])
@pytest.mark.parametrize("bands", ["RGB", "ALL"])
def test_eurosat_ms_matches_torchgeo(eurosat_ms, split, bands):
    """Same images per split, same labels and class order, same values for every band both read (theirs holds
    B10 too, which our 12-band ALL leaves out; both map the file's B8A-last order by name)."""
    theirs = torchgeo_datasets.EuroSAT(eurosat_ms, split=split)
    ours = EuroSAT(eurosat_ms, split=split, bands=bands)
    assert ours.classes == theirs.classes == sorted(COUNTS)
    their_bands = [canonical_band(b) for b in theirs.bands]
    their_items = {Path(path).name: label for path, label in theirs.samples}
    our_items = {Path(path).name: label for path, label in ours.samples}
    assert our_items == their_items and len(ours) == len(theirs) > 0
    by_name = {Path(path).name: i for i, (path, _) in enumerate(theirs.samples)}
    for index, (path, label) in enumerate(ours.samples):
        sample = theirs[by_name[Path(path).name]]
        image, our_label = ours[index]
        assert our_label == label == int(sample["label"])
        for c, band in enumerate(ours.bands):
            torch.testing.assert_close(image[c], sample["image"][their_bands.index(band)], atol=0, rtol=0)


@pytest.fixture(scope="module")
def seco_100k(tmp_path_factory) -> Path:
    """SeCo-100K's layout (band files at 264 / 132 / 44 px) under torchgeo's expected folder name."""
    root = tmp_path_factory.mktemp("seco")
    write_seco_demo(root / "seasonal_contrast_100k", n_locations=2, n_acquisitions=3, seed=0)
    return root


def test_seco_matches_torchgeo(seco_100k):
    """The same acquisition gives the same 10 m bands and, for the 20 m and 60 m bands both bring to the 10 m
    grid bilinearly, values within half a grey level: torchgeo keeps PIL's float result, we round to SeCo's uint8
    scale. (torchgeo resizes every band under 264 px to 264 x 264; we resize to the acquisition's own 10 m
    grid, which is 264 px for SeCo itself and keeps other trees' shapes.)"""
    bands = ["B8", "B5", "B1", "B12"]
    theirs = torchgeo_datasets.SeasonalContrastS2(seco_100k, version="100k", seasons=1, bands=bands)
    ours = SeCoDataset(seco_100k / "seasonal_contrast_100k", bands=bands)
    for index in range(len(ours)):
        folder = seco_100k / "seasonal_contrast_100k" / f"{index:06d}"
        random.seed(index)
        subdirs = [f for f in os.listdir(folder) if (folder / f).is_dir()]
        (chosen,) = random.sample(subdirs, 1)
        random.seed(index)
        their_image = theirs[index]["image"]
        our_image = ours.load(index, ours.acquisition_names(index).index(chosen)).float()
        assert our_image.shape == their_image.shape == (4, 264, 264)
        assert torch.equal(our_image[0], their_image[0])  # B8: 10 m, read as stored
        assert (our_image[1:] - their_image[1:]).abs().max() <= 0.5 + 1e-4


@pytest.fixture(scope="module")
def bigearthnet_root(shared_data, tmp_path_factory) -> Path:
    """The 6 real patches under torchgeo's folder name, with its (S2, S1) csv lists."""
    source = shared_data / "bigearthnet-v1" / "BigEarthNet-v1.0"
    patches = sorted(p.name for p in source.iterdir() if p.is_dir())
    root = tmp_path_factory.mktemp("bigearthnet")
    (root / "BigEarthNet-v1.0").mkdir()
    for patch in patches:
        (root / "BigEarthNet-v1.0" / patch).symlink_to(source / patch, target_is_directory=True)
    write_bigearthnet_lists(
        root,
        {"train": patches[:4], "val": patches[4:5], "test": patches[5:]},
        "bigearthnet-{split}.csv",
        columns="s2,s1",
    )
    return root


@pytest.mark.parametrize("num_classes", [19, 43])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_bigearthnet_matches_torchgeo(bigearthnet_root, num_classes, split):
    """Same patches per split in the same order, same multi-hot targets in the same class order (19 and 43),
    the same 10 m bands, and the 20 m / 60 m bands within one unit: both upsample them bilinearly to 120 px and
    round, torchgeo through GDAL's resampling, we through torch's."""
    theirs = torchgeo_datasets.BigEarthNet(bigearthnet_root, split=split, bands="s2", num_classes=num_classes)
    ours = BigEarthNet(bigearthnet_root, split=split, bands="ALL", num_classes=num_classes)
    assert [Path(f["s2"]).name for f in theirs.folders] == ours.patches
    assert list(class_names(num_classes)) == theirs.class_sets[num_classes]
    for index, patch in enumerate(ours.patches):
        sample = theirs[index]
        assert torch.equal(torch.from_numpy(ours.targets[index]).long(), sample["label"])
        stack = torch.from_numpy(ours.load_stack(patch).astype("float32"))
        image = sample["image"]  # torchgeo's S2 order: B01 .. B08, B8A, B09, B11, B12 = our ALL
        for c, band in enumerate(ours.bands):
            if RESOLUTION_M[band] == 10:
                assert torch.equal(stack[c], image[c]), band
            else:
                assert (stack[c] - image[c]).abs().max() <= 1.0, band


@pytest.fixture(scope="module")
def oscd_root(tmp_path_factory) -> Path:
    """OSCD as its three archives unpack (the layout torchgeo reads), 13 bands on the 10 m grid per date."""
    root = tmp_path_factory.mktemp("oscd")
    cities = {"bercy": (40, 52), "paris": (36, 30), "rio": (44, 38), "dubai": (30, 41)}
    write_oscd(root, cities, train=["bercy", "paris"], test=["rio", "dubai"])
    return root


@pytest.mark.parametrize("split", ["train", "test"])
def test_oscd_matches_torchgeo(oscd_root, split):
    """Same cities per split, same change masks, and both dates' bands: torchgeo's raw values, stretched with
    our per-band normalisation, are our images."""
    theirs = torchgeo_datasets.OSCD(oscd_root, split=split)
    ours = OSCD(oscd_root, split=split, bands="ALL")
    their_cities = {files["region"]: i for i, files in enumerate(theirs.files)}
    assert sorted(their_cities) == sorted(ours.cities)
    their_bands = [canonical_band(b) for b in theirs.bands]
    channels = [their_bands.index(b) for b in ours.bands]
    for city in ours.cities:
        sample = theirs[their_cities[city]]
        assert torch.equal(ours.labels[city].long(), sample["mask"])
        for date in range(2):
            raw = sample["image"][date, channels].numpy()
            assert torch.equal(ours.images[city][date], torch.from_numpy(oscd_normalize(raw, ours.bands)))
