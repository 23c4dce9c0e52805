"""Our readers and torchgeo's own dataset classes on the same trees, in torchgeo's layouts (torchgeo 0.8)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from downstream_fixtures import write_eurosat_ms, write_eurosat_split_files

from datasets.bands import canonical_band
from datasets.eurosat import EuroSAT

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
