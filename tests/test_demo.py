"""The demo generator: structured spectra, the exact SeCo and EuroSAT layouts, and reading them back."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

from datasets.bands import S2_BANDS, parse_bands
from datasets.demo import EUROSAT_CLASSES, FIELD, Scene, write_eurosat_demo, write_seco_demo
from datasets.seco import SeCoDataset

REPO = Path(__file__).parents[1]
ACQUISITION_ID = re.compile(r"^\d{8}T\d{6}_\d{8}T\d{6}_T\d{2}[A-Z]{3}$")
B4, B8 = S2_BANDS.index("B4"), S2_BANDS.index("B8")


def _ndvi(reflectance: np.ndarray) -> np.ndarray:
    return (reflectance[B8] - reflectance[B4]) / (reflectance[B8] + reflectance[B4] + 1e-6)


@pytest.fixture(scope="module")
def seco_demo(tmp_path_factory) -> Path:
    return write_seco_demo(tmp_path_factory.mktemp("demo") / "seco", n_locations=2, n_acquisitions=3, seed=0)


def test_land_covers_have_their_spectral_signatures():
    rng = np.random.default_rng(0)
    water = Scene("water", 64, rng)
    forest = Scene("forest", 64, rng)
    water_refl, forest_refl = water.render(200), forest.render(200)
    assert water_refl.shape == (12, 64, 64) and water_refl.dtype == np.float32
    assert water_refl[B8].mean() < 0.05  # water absorbs NIR
    assert _ndvi(forest_refl).mean() > 0.6  # dense canopy: high NIR, low red
    urban = Scene("industrial", 64, rng).render(200)
    b11 = S2_BANDS.index("B11")
    assert urban[b11].mean() > forest_refl[b11].mean() + 0.03  # built-up: high SWIR
    assert urban[B4].mean() > 3 * forest_refl[B4].mean()  # and bright in the visible


def test_fields_change_with_the_seasons():
    scene = Scene("fields", 64, np.random.default_rng(3))
    fields = scene.cover == FIELD
    winter, summer = _ndvi(scene.render(15))[fields].mean(), _ndvi(scene.render(180))[fields].mean()
    assert summer > winter + 0.2


def test_seco_demo_layout(seco_demo):
    locations = sorted(p.name for p in seco_demo.iterdir())
    assert locations == ["000000", "000001"]
    acquisitions = sorted((seco_demo / "000000").iterdir())
    assert len(acquisitions) == 3 and all(ACQUISITION_ID.match(a.name) for a in acquisitions)
    files = sorted(p.name for p in acquisitions[0].iterdir())
    assert files == sorted([f"{b}.tif" for b in S2_BANDS] + ["metadata.json"])
    for band, side in {"B2": 264, "B5": 132, "B1": 44}.items():
        with rasterio.open(acquisitions[0] / f"{band}.tif") as src:
            assert (src.count, src.height, src.width, src.dtypes[0]) == (1, side, side, "uint8")
            assert src.compression.name == "jpeg" and src.crs.is_projected
            assert src.res == (10.0 * 264 / side, 10.0 * 264 / side)


def test_seco_demo_reads_back_in_all_bands_and_rgb(seco_demo):
    dataset = SeCoDataset(seco_demo, bands=parse_bands("ALL"), data_mode="tp")
    images = dataset[1]
    assert len(images) == 3 and all(i.shape == (12, 264, 264) and i.dtype == torch.uint8 for i in images)
    assert not torch.equal(images[0], images[1])  # a new season, not a copy
    rgb = SeCoDataset(seco_demo, data_mode="mc")[0][0]
    assert rgb.shape == (3, 264, 264) and 20 < rgb.float().mean() < 235


def test_eurosat_demo_layout_and_splits(tmp_path):
    root = write_eurosat_demo(tmp_path, n_per_class=5, seed=0)
    assert sorted(p.name for p in (root / "2750").iterdir()) == sorted(EUROSAT_CLASSES)
    all_files = set()
    for name in EUROSAT_CLASSES:
        files = sorted(p.name for p in (root / "2750" / name).iterdir())
        assert files == sorted(f"{name}_{n}.jpg" for n in range(1, 6))
        all_files.update(files)
    with Image.open(root / "2750" / "Forest" / "Forest_1.jpg") as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
    splits = {s: (root / f"eurosat-{s}.txt").read_text().splitlines() for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [30, 10, 10]
    assert set().union(*splits.values()) == all_files and sum(len(v) for v in splits.values()) == 50
    assert sum(f.startswith("Forest_") for f in splits["val"]) == 1  # stratified


def test_eurosat_classes_differ_visually(tmp_path):
    root = write_eurosat_demo(tmp_path, n_per_class=3, seed=1)

    def mean_rgb(name: str) -> np.ndarray:
        return np.mean([np.asarray(Image.open(p)).mean((0, 1)) for p in (root / "2750" / name).iterdir()], axis=0)

    sea, forest, industrial = mean_rgb("SeaLake"), mean_rgb("Forest"), mean_rgb("Industrial")
    assert sea[2] > sea[0]  # water is bluish
    assert forest[1] > forest[0] and forest[1] > forest[2]  # vegetation is green
    assert industrial.mean() > forest.mean() + 30  # built-up is bright


def test_cli_writes_both_datasets_and_rejects_bad_arguments(tmp_path):
    cmd = [sys.executable, "-m", "datasets.demo", "--output_dir", str(tmp_path)]
    small = ["--n_locations", "1", "--n_acquisitions", "2", "--n_per_class", "1", "--seed", "4"]
    # both commands at once: the refused one writes nothing, so they cannot interfere
    good, bad = (
        subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv in (cmd + small, cmd + ["--n_locations", "0"])
    )
    good_out, good_err = good.communicate(timeout=120)
    _, bad_err = bad.communicate(timeout=120)
    assert good.returncode == 0, good_err
    assert "wrote 1 locations x 2 acquisitions" in good_out
    assert len(list((tmp_path / "seco" / "000000").iterdir())) == 2
    assert (tmp_path / "eurosat" / "eurosat-train.txt").exists()
    assert bad.returncode == 2 and "--n_locations must be >= 1" in bad_err
