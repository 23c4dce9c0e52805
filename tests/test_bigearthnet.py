"""BigEarthNet reader on the 6 real BigEarthNet-S2 v1.0 patches of ../shared/data (split files in tmp dirs)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from datasets import DataError
from datasets.bands import BIGEARTHNET_MEAN_STD, S2_BANDS
from datasets.bigearthnet import (
    CLASSES_19,
    LABEL_43_TO_19,
    LABELS_43,
    BigEarthNet,
    labels_to_19,
    labels_to_43,
    normalize_to_uint8,
    read_patch_list,
    save_patch_list,
    subset_fraction,
)
from datasets.io import read_band
from tests.bigearthnet_samples import DATA, EXPECTED_19, EXPECTED_43, PATCHES, ROOT, link_patches
from tests.downstream_fixtures import s1_partner, write_bigearthnet_lists

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real sample data {DATA} missing (not in a user's clone)")


def multi_hot(indices: list[int], num_classes: int = 19) -> np.ndarray:
    target = np.zeros(num_classes, dtype=np.float32)
    target[indices] = 1
    return target


def test_constants_and_mapping():
    assert len(LABELS_43) == 43 and len(CLASSES_19) == 19
    assert LABELS_43[20].startswith("Land principally") and LABELS_43[42] == "Sea and ocean"
    dropped = ["Road and rail networks and associated land", "Airports", "Bare rock", "Burnt areas", "Intertidal flats"]
    assert not labels_to_19(dropped).any()
    assert labels_to_19(["Continuous urban fabric", "Discontinuous urban fabric"]).tolist() == multi_hot([0]).tolist()
    assert np.array_equal(labels_to_19(["Sparsely vegetated areas", "Estuaries", "Salines"]), multi_hot([11, 16, 18]))
    with pytest.raises(ValueError, match="unknown BigEarthNet label"):
        labels_to_19(["Moon dust"])


def test_all_patches_targets_and_shapes():
    ds = BigEarthNet(ROOT, bands="ALL")
    assert ds.patches == PATCHES and ds.split_file is None
    for i, patch in enumerate(PATCHES):
        assert np.array_equal(ds.targets[i], multi_hot(EXPECTED_19[patch])), patch
    image, target = ds[4]
    assert image.dtype == torch.uint8 and image.shape == (12, 120, 120)
    assert target.dtype == torch.float32 and target.nonzero().flatten().tolist() == [9, 10, 13, 15, 17]
    patch_dir = ROOT / PATCHES[4]
    assert read_band(patch_dir / f"{PATCHES[4]}_B01.tif").shape == (20, 20)
    assert read_band(patch_dir / f"{PATCHES[4]}_B05.tif").shape == (60, 60)
    assert read_band(patch_dir / f"{PATCHES[4]}_B02.tif").shape == (120, 120)
    stack = ds.load_stack(PATCHES[4])
    assert stack.dtype == np.uint16 and stack.shape == (12, 120, 120)
    # B01 (60 m): each raw pixel covers 6x6 output pixels; bilinear upsampling keeps the block means close.
    raw_b01 = read_band(patch_dir / f"{PATCHES[4]}_B01.tif").astype(np.float64)
    assert abs(stack[S2_BANDS.index("B1")].mean() - raw_b01.mean()) < 0.02 * raw_b01.mean()


def test_rgb_default_matches_the_published_stretch():
    ds = BigEarthNet(ROOT)
    assert ds.bands == ["B4", "B3", "B2"]
    image, _ = ds[0]
    assert image.shape == (3, 120, 120)
    patch_dir = ROOT / PATCHES[0]
    b04 = read_band(patch_dir / f"{PATCHES[0]}_B04.tif").astype(np.float64)
    mean, std = BIGEARTHNET_MEAN_STD["B4"]
    expected = np.clip((b04 - (mean - 2 * std)) / (4 * std) * 255, 0, 255).astype(np.uint8)
    assert np.array_equal(image[0].numpy(), expected)


def test_normalize_to_uint8_endpoints():
    mean, std = BIGEARTHNET_MEAN_STD["B8"]
    stack = np.array([[[0, mean - 2 * std, mean, mean + 2 * std, 20000]]], dtype=np.float64)
    # mean - 2 std is negative for B8, so reflectance 0 lands at 255 * 511.97 / 5461.82 = 23.9 -> 23 (truncated).
    assert normalize_to_uint8(stack, ["B8"]).tolist() == [[[23, 0, 127, 255, 255]]]


def test_seco_split_lists_with_snow_and_cloud_removed(tmp_path):
    (tmp_path / "bigearthnet-train.txt").write_text("\n".join(PATCHES[:5]) + "\n")
    (tmp_path / "bigearthnet-val.txt").write_text(PATCHES[5] + "\n")
    (tmp_path / "patches_with_seasonal_snow.csv").write_text(PATCHES[1] + "\n")
    (tmp_path / "patches_with_cloud_and_shadow.csv").write_text(PATCHES[3] + "\n")
    train = BigEarthNet(ROOT, "train", split_dir=tmp_path)
    assert train.patches == [PATCHES[0], PATCHES[2], PATCHES[4]]
    assert train.split_file == tmp_path / "bigearthnet-train.txt"
    assert np.array_equal(train.targets[1], multi_hot(EXPECTED_19[PATCHES[2]]))
    assert BigEarthNet(ROOT, "val", split_dir=tmp_path).patches == [PATCHES[5]]


def test_official_csv_split_with_s1_column(tmp_path):
    lines = [f"{p},S1A_IW_GRDH_1SDV_20170613T165043_33UUP_{i}_0" for i, p in enumerate(PATCHES[2:4])]
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    ds = BigEarthNet(ROOT, "test", split_dir=tmp_path)
    assert ds.patches == PATCHES[2:4] and ds.split_file.name == "test.csv"


def test_split_files_next_to_patch_folder_are_found(tmp_path):
    link_patches(tmp_path / "BigEarthNet-v1.0", PATCHES)
    (tmp_path / "val.csv").write_text(PATCHES[0] + "\n")
    assert BigEarthNet(tmp_path, "val").patches == [PATCHES[0]]
    assert BigEarthNet(tmp_path / "BigEarthNet-v1.0", "val").patches == [PATCHES[0]]


def test_no_list_anywhere_warns_and_uses_all_patches(tmp_path):
    root = link_patches(tmp_path / "BigEarthNet-v1.0", PATCHES)
    with pytest.warns(UserWarning, match="using all 6 patches"):
        ds = BigEarthNet(tmp_path, "val")
    assert ds.patches == PATCHES and ds.split_file is None
    assert BigEarthNet(root).patches == PATCHES  # split=None: every patch, no list looked for


def test_explicit_split_dir_without_lists_is_an_error(tmp_path):
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "val.txt").write_text(PATCHES[0] + "\n")  # not a published name: ignored
    expected = "holds no BigEarthNet val list (expected bigearthnet-val.txt or bigearthnet-val.csv or val.csv)"
    with pytest.raises(DataError, match=f"--split_dir {tmp_path / 'splits'} {re.escape(expected)}"):
        BigEarthNet(ROOT, "val", split_dir=tmp_path / "splits")


def test_a_split_without_its_list_beside_other_lists_is_an_error(tmp_path):
    link_patches(tmp_path / "BigEarthNet-v1.0", PATCHES)
    write_bigearthnet_lists(tmp_path, {"train": PATCHES[:4]}, "bigearthnet-{split}.csv", "s2,s1")
    assert BigEarthNet(tmp_path, "train").patches == PATCHES[:4]
    with pytest.raises(DataError, match=r"no BigEarthNet val list .* beside .*bigearthnet-train\.csv"):
        BigEarthNet(tmp_path, "val")


@pytest.mark.parametrize("pattern", ["{split}.csv", "bigearthnet-{split}.csv", "bigearthnet-{split}.txt"])
@pytest.mark.parametrize(("columns", "header"), [("s2", False), ("s2,s1", False), ("s1,s2", False), ("s2,s1", True)])
def test_every_published_list_naming_and_column_layout(tmp_path, pattern, columns, header):
    """Official names, torchgeo's downloader names, SeCo's; one column, S2,S1 pairs (either order), a header."""
    link_patches(tmp_path / "BigEarthNet-v1.0", PATCHES)
    splits = {"train": PATCHES[:3], "val": PATCHES[3:5], "test": PATCHES[5:]}
    write_bigearthnet_lists(tmp_path, splits, pattern, columns, header)
    for split, patches in splits.items():
        ds = BigEarthNet(tmp_path, split)
        assert ds.split_file == tmp_path / pattern.format(split=split)
        assert ds.patches == patches
        assert np.array_equal(ds.targets, np.stack([multi_hot(EXPECTED_19[p]) for p in patches]))


def test_seco_lists_preferred_over_the_official_ones(tmp_path):
    write_bigearthnet_lists(tmp_path, {"val": PATCHES[:1]}, "{split}.csv")
    write_bigearthnet_lists(tmp_path, {"val": PATCHES[1:2]}, "bigearthnet-{split}.csv", "s2,s1")
    assert BigEarthNet(ROOT, "val", split_dir=tmp_path).patches == PATCHES[1:2]
    write_bigearthnet_lists(tmp_path, {"val": PATCHES[2:3]}, "bigearthnet-{split}.txt")
    assert BigEarthNet(ROOT, "val", split_dir=tmp_path).patches == PATCHES[2:3]


def test_list_line_without_a_patch_name_is_an_error(tmp_path):
    (tmp_path / "train.csv").write_text(f"{PATCHES[0]},{s1_partner(PATCHES[0])}\nnot a patch,nor this\n")
    with pytest.raises(DataError, match=r"train\.csv line 2: 'not a patch,nor this' holds no Sentinel-2 patch name"):
        BigEarthNet(ROOT, "train", split_dir=tmp_path)


def test_split_emptied_by_the_exclusion_lists_is_an_error(tmp_path):
    (tmp_path / "val.csv").write_text(f"{PATCHES[1]}\n{PATCHES[3]}\n")
    (tmp_path / "patches_with_seasonal_snow.csv").write_text(PATCHES[1] + "\n")
    (tmp_path / "patches_with_cloud_and_shadow.csv").write_text(PATCHES[3] + "\n")
    expected = f"the BigEarthNet val split of {ROOT} is empty: {tmp_path / 'val.csv'} lists 2 patch(es), 2 excluded"
    with pytest.raises(DataError, match=re.escape(expected)):
        BigEarthNet(ROOT, "val", split_dir=tmp_path)


def test_43_class_order_and_targets():
    assert LABELS_43[38] == "Water courses" and LABELS_43[39] == "Water bodies"
    assert LABEL_43_TO_19[38] == LABEL_43_TO_19[39] == CLASSES_19.index("Inland waters")
    assert labels_to_43(["Water bodies", "Sea and ocean"]).nonzero()[0].tolist() == [39, 42]
    ds = BigEarthNet(ROOT, num_classes=43)
    assert ds.class_names == LABELS_43 and ds.targets.shape == (6, 43) and ds.patches == PATCHES
    for patch, target in zip(ds.patches, ds.targets):
        assert np.array_equal(target, multi_hot(EXPECTED_43[patch], 43)), patch
    assert ds[4][1].nonzero().flatten().tolist() == EXPECTED_43[PATCHES[4]]
    # Labels without a 19-class counterpart keep a patch in the 43-class task.
    assert labels_to_43(["Port areas"]).sum() == 1 and not labels_to_19(["Port areas"]).any()
    with pytest.raises(ValueError, match="19 or 43"):
        BigEarthNet(ROOT, num_classes=20)


def test_train_frac_without_replacement_seeded_and_saved(tmp_path):
    patches = [f"patch_{i}" for i in range(1000)]
    subset = subset_fraction(patches, 0.1, seed=7)
    assert len(subset) == 100 and len(set(subset)) == 100
    assert subset == subset_fraction(patches, 0.1, seed=7) != subset_fraction(patches, 0.1, seed=8)
    assert subset == sorted(subset, key=patches.index)

    (tmp_path / "train.csv").write_text("\n".join(PATCHES) + "\n")
    ds = BigEarthNet(ROOT, "train", split_dir=tmp_path, train_frac=0.5, seed=1)
    assert len(ds.patches) == 3 and set(ds.patches) <= set(PATCHES)
    for patch, target in zip(ds.patches, ds.targets):
        assert np.array_equal(target, multi_hot(EXPECTED_19[patch]))
    saved = save_patch_list(ds.patches, tmp_path / "out" / "train_patches.txt")
    assert read_patch_list(saved) == ds.patches
    with pytest.raises(ValueError, match="only applies to the train split"):
        BigEarthNet(ROOT, "val", split_dir=tmp_path, train_frac=0.1)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        subset_fraction(patches, 0.0, seed=0)


def test_patch_without_19_class_label_is_excluded(tmp_path):
    root = link_patches(tmp_path / "root", PATCHES)
    port = "S2A_MSIL2A_20170613T101031_1_1"
    (root / port).mkdir()
    (root / port / f"{port}_labels_metadata.json").write_text(json.dumps({"labels": ["Port areas", "Bare rock"]}))
    ds = BigEarthNet(root)
    assert port not in ds.patches and ds.patches == PATCHES and ds.targets.shape == (6, 19)


def test_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no BigEarthNet patch folders"):
        BigEarthNet(empty)

    (tmp_path / "bigearthnet-train.txt").write_text(f"{PATCHES[0]}\nS2A_MSIL2A_20990101T000000_9_9\n")
    with pytest.raises(DataError, match="S2A_MSIL2A_20990101T000000_9_9"):
        BigEarthNet(ROOT, "train", split_dir=tmp_path)

    patch = PATCHES[1]
    folder = tmp_path / "partial" / patch
    folder.mkdir(parents=True)
    for source in (ROOT / patch).iterdir():
        if not source.name.endswith("_B03.tif"):
            (folder / source.name).symlink_to(source.resolve())
    ds = BigEarthNet(tmp_path / "partial")
    with pytest.raises(DataError, match=f"missing band file .*{patch}_B03.tif"):
        ds[0]
    with pytest.raises(ValueError, match="no B10"):
        BigEarthNet(ROOT, bands="B4,B10")
