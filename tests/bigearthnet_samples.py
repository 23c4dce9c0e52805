"""The six real BigEarthNet-S2 v1.0 patches of ../shared/data: where they lie and their labels, worked out by hand.

Shared by the reader's tests (test_bigearthnet.py), the fine-tuning tests and the downstream protocol tests.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SHARED_DATA

DATA = SHARED_DATA
ROOT = DATA / "bigearthnet-v1" / "BigEarthNet-v1.0"

# 19-class indices worked out by hand from each patch's labels_metadata.json and the 43 -> 19 mapping.
EXPECTED_19 = {
    # Non-irrigated arable land (11 -> 2), Land principally occupied by agriculture... (20 -> 6)
    "S2A_MSIL2A_20170613T101031_87_48": [2, 6],
    # Non-irrigated arable land (11 -> 2), Pastures (17 -> 4)
    "S2A_MSIL2A_20170617T113321_36_85": [2, 4],
    # Pastures (17 -> 4)
    "S2A_MSIL2A_20170617T113321_4_55": [4],
    # Complex cultivation patterns (19 -> 5), Land principally... (20 -> 6), Broad-leaved forest (22 -> 8),
    # Transitional woodland/shrub (28 -> 13)
    "S2A_MSIL2A_20171221T112501_56_35": [5, 6, 8, 13],
    # Coniferous forest (23 -> 9), Mixed forest (24 -> 10), Transitional woodland/shrub (28 -> 13),
    # Peatbogs (34 -> 15), Water bodies (39 -> 17)
    "S2B_MSIL2A_20170924T93020_69_24": [9, 10, 13, 15, 17],
    # Non-irrigated arable land (11 -> 2), Coniferous forest (23 -> 9), Mixed forest (24 -> 10)
    "S2B_MSIL2A_20180204T94161_57_38": [2, 9, 10],
}
PATCHES = sorted(EXPECTED_19)
# The same patches in the original 43-class nomenclature (label_indices.json order), from the same JSON files.
EXPECTED_43 = {
    "S2A_MSIL2A_20170613T101031_87_48": [11, 20],
    "S2A_MSIL2A_20170617T113321_36_85": [11, 17],
    "S2A_MSIL2A_20170617T113321_4_55": [17],
    "S2A_MSIL2A_20171221T112501_56_35": [19, 20, 22, 28],
    "S2B_MSIL2A_20170924T93020_69_24": [23, 24, 28, 34, 39],  # 39 = Water bodies
    "S2B_MSIL2A_20180204T94161_57_38": [11, 23, 24],
}


def link_patches(root: Path, patches: list[str]) -> Path:
    """A tmp BigEarthNet root whose patch folders are symlinks to the real ones (nothing copied)."""
    root.mkdir(parents=True, exist_ok=True)
    for patch in patches:
        (root / patch).symlink_to((ROOT / patch).resolve(), target_is_directory=True)
    return root
