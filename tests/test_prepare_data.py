"""prepare_data.py and packed SeCo data: same samples as the tree, atomic writing, clear errors for bad packs."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare_data
from datasets import DataError
from datasets.pack import INDEX, MANIFEST, PIXELS, SeCoPack
from datasets.seco import SeCoDataset
from tests.fixtures import acquisition_id, write_band_layout, write_preview_layout, write_tif

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def pack(tree: Path, output: Path, bands: str = "RGB") -> Path:
    prepare_data.run(["--data_path", str(tree), "--output_path", str(output), "--bands", bands])
    return output


def assert_same_dataset(tree: Path, packed: Path, bands: str) -> None:
    a, b = SeCoDataset(tree, bands=bands), SeCoDataset(packed, bands=bands)
    assert a.locations == b.locations
    for i in range(len(a)):
        assert a.acquisition_names(i) == b.acquisition_names(i)
        for k in range(len(a.acquisition_names(i))):
            loaded = b.load(i, k)
            assert torch.equal(loaded, a.load(i, k)) and loaded.is_contiguous()


@pytest.fixture
def band_tree(tmp_path: Path) -> Path:
    """Band folders with varied pixels (the fixtures' constant images would hide a mixed-up offset)."""
    root = write_band_layout(tmp_path / "tree", n_locations=3, n_acquisitions=3)
    rng = np.random.default_rng(0)
    for path in sorted(root.glob("*/*/B[2348].tif")):
        write_tif(path, rng.integers(0, 256, (24, 24), dtype=np.uint8))
    return root


@pytest.mark.parametrize("bands", ["RGB", "B8,B2", "ALL"])
def test_all_band_pack_gives_the_trees_samples_for_any_subset(band_tree, tmp_path, bands):
    packed = pack(band_tree, tmp_path / "all.pack", "ALL")
    assert_same_dataset(band_tree, packed, bands)


def test_pack_without_a_10m_band_holds_the_10m_grid(band_tree, tmp_path):
    """--bands B5,B6 (20 m, 12 px files) packs 24x24 images, C x H x W bytes each, equal to the tree's samples."""
    packed = pack(band_tree, tmp_path / "b5b6.pack", "B5,B6")
    store = SeCoPack(packed)
    assert all(store.read(i, k)[0].shape == (2, 24, 24) for i in range(3) for k in range(3))
    assert (packed / PIXELS).stat().st_size == 3 * 3 * 2 * 24 * 24
    assert_same_dataset(band_tree, packed, "B5,B6")
    assert_same_dataset(band_tree, packed, "B6")


def test_rgb_pack_of_previews_keeps_them_unstretched(tmp_path):
    tree = write_preview_layout(tmp_path / "tree", n_locations=2, n_acquisitions=3)
    assert_same_dataset(tree, pack(tree, tmp_path / "rgb.pack"), "RGB")


def test_sampling_and_augmented_samples_match_the_tree(band_tree, tmp_path):
    packed = pack(band_tree, tmp_path / "rgb.pack")
    for mode in ("mc", "tp"):
        a = SeCoDataset(band_tree, data_mode=mode, fixed_acquisition=mode == "mc", seed=3)
        b = SeCoDataset(packed, data_mode=mode, fixed_acquisition=mode == "mc", seed=3)
        torch.manual_seed(1)
        expected = [a[i] for i in range(len(a))]
        torch.manual_seed(1)
        for got, want in zip([b[i] for i in range(len(b))], expected):
            assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_pack_pickles_without_its_memory_map(band_tree, tmp_path):
    dataset = SeCoDataset(pack(band_tree, tmp_path / "rgb.pack"))
    first = dataset.load(1, 2)
    clone = pickle.loads(pickle.dumps(dataset))
    assert dataset._pack._pixels is not None and clone._pack._pixels is None
    assert torch.equal(clone.load(1, 2), first)


def test_bands_missing_from_the_pack_name_the_fix(band_tree, tmp_path):
    packed = pack(band_tree, tmp_path / "rgb.pack")
    with pytest.raises(DataError, match="holds bands B4,B3,B2, not B8: .*prepare_data.py --bands B4,B8"):
        SeCoDataset(packed, bands="B4,B8")


def test_existing_output_is_refused_and_left_alone(band_tree, tmp_path, capsys):
    packed = pack(band_tree, tmp_path / "rgb.pack")
    before = (packed / PIXELS).read_bytes()
    with pytest.raises(SystemExit) as exc:
        pack(band_tree, packed)
    assert exc.value.code == 2 and "already exists" in capsys.readouterr().err
    assert (packed / PIXELS).read_bytes() == before


def test_a_failed_run_leaves_neither_pack_nor_partial_folder(band_tree, tmp_path, capsys):
    broken = band_tree / "000002" / acquisition_id(1) / "B3.tif"
    broken.write_bytes(broken.read_bytes()[:300])
    with pytest.raises(SystemExit) as exc:
        pack(band_tree, tmp_path / "rgb.pack")
    assert exc.value.code == 2 and str(broken) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def test_a_leftover_partial_folder_is_replaced(band_tree, tmp_path):
    leftover = tmp_path / ".rgb.pack.partial"
    leftover.mkdir()
    (leftover / PIXELS).write_bytes(b"stale")
    assert_same_dataset(band_tree, pack(band_tree, tmp_path / "rgb.pack"), "RGB")
    assert not leftover.exists()


def _truncate_pixels(root: Path) -> None:
    data = (root / PIXELS).read_bytes()
    (root / PIXELS).write_bytes(data[:-10])


def _drop_manifest(root: Path) -> None:
    (root / MANIFEST).unlink()


def _bad_index(root: Path) -> None:
    np.save(root / INDEX, np.zeros((2, 4), dtype=np.int64))


def _not_json(root: Path) -> None:
    (root / MANIFEST).write_text("{ truncated")


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_truncate_pixels, f"{PIXELS} is \\d+ bytes, expected \\d+ bytes"),
        (_drop_manifest, f"{MANIFEST} is missing"),
        (_bad_index, f"{INDEX} has shape \\(2, 4\\), expected \\(9, 4\\)"),
        (_not_json, f"unreadable {MANIFEST}: Expecting .*"),
    ],
)
def test_damaged_pack_is_one_clear_error(band_tree, tmp_path, damage, reason):
    packed = pack(band_tree, tmp_path / "rgb.pack")
    damage(packed)
    message = f"packed SeCo data {re.escape(str(packed))} is incomplete or damaged \\({reason}\\); run prepare_data.py"
    with pytest.raises(DataError, match=message):
        SeCoDataset(packed)


def test_other_format_versions_are_refused(band_tree, tmp_path):
    packed = pack(band_tree, tmp_path / "rgb.pack")
    manifest = json.loads((packed / MANIFEST).read_text())
    (packed / MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(DataError, match="format version 99; this code reads version 1"):
        SeCoPack(packed)


def test_bad_arguments_exit_2(band_tree, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        pack(band_tree, tmp_path / "x.pack", bands="B4,B13")
    assert exc.value.code == 2 and "--bands" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        pack(tmp_path / "nowhere", tmp_path / "x.pack")
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.pack").exists()
