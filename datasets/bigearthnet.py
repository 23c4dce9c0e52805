"""BigEarthNet-S2 v1.0 reader for 19-class multi-label fine-tuning.

Dataset: G. Sumbul, M. Charfuelan, B. Demir, V. Markl, "BigEarthNet: A Large-Scale Benchmark Archive for Remote
Sensing Image Understanding", IGARSS 2019; 19-class nomenclature from G. Sumbul, J. Kang, T. Kreuziger, F. Marcelino,
H. Costa, P. Benevides, M. Caetano, B. Demir, "BigEarthNet-MM", IEEE GRSM 2021 (https://bigearth.net).

On-disk format (``BigEarthNet-S2-v1.0.tar.gz`` unpacked; ``root`` is ``BigEarthNet-v1.0/`` or its parent):
``<root>/<patch>/<patch>_B01.tif .. _B09.tif, _B11.tif, _B12.tif, _B8A.tif`` (12 bands, no B10, uint16 L2A
reflectance x 10000; B02 B03 B04 B08 120x120, B05 B06 B07 B8A B11 B12 60x60, B01 B09 20x20) and
``<patch>_labels_metadata.json`` whose ``labels`` are CORINE level-3 names (the 43-class nomenclature).

Splits (looked up in ``split_dir``, else in ``root``, the patch folder and its parent), every published naming:

- ``bigearthnet-{train,val,test}.txt``: the SeCo/DINO-MC lists (preferred when several namings are present,
  since they are the DINO-MC protocol);
- ``bigearthnet-{train,val,test}.csv``: the official 19-class lists as torchgeo's downloader stores them;
- ``{train,val,test}.csv``: the official 19-class lists under their own names.

Every list holds one patch per line, alone or with its Sentinel-1 partner (``S2name,S1name``, either order: the
field that is a Sentinel-2 patch name is taken; a first line without one is a header). Patches listed in
``patches_with_seasonal_snow.csv`` / ``patches_with_cloud_and_shadow.csv`` are removed whenever those files are
present (the official lists already exclude them). An explicit ``split_dir`` without the split's list, or a list
for some splits but not this one, is a DataError (training on one list and evaluating on every patch would mix
the splits); with no list at all and no ``split_dir``, every patch is used and a warning says so. A split left
with no patch is a DataError naming the split and the folder.

Classes: ``num_classes=19`` (default, the nomenclature of the DINO-MC results) maps the CORINE labels with
:data:`LABEL_43_TO_19` and drops patches without any of the 19 classes; ``num_classes=43`` keeps the original
43 labels (:data:`LABELS_43`, in the order of BigEarthNet's ``label_indices.json``). Items are
``(image, target)``: image uint8 (C, 120, 120) after the SeCo/DINO-MC per-band stretch
(:func:`normalize_to_uint8`), target a float32 multi-hot vector over ``class_names``.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from datasets import DataError
from datasets.bands import BIGEARTHNET_MEAN_STD, parse_bands, two_std_range
from datasets.io import read_band, stack_bands

PATCH_SIZE = (120, 120)
PATCH_FOLDER = "BigEarthNet-v1.0"
PATCH_NAME = re.compile(r"^S2[AB]_MSIL2A_\d{8}T\d+_\d+_\d+$")
SPLITS = ("train", "val", "test")
# Names of a split's list, in order of preference (see the module docstring).
SPLIT_FILE_NAMES = ("bigearthnet-{split}.txt", "bigearthnet-{split}.csv", "{split}.csv")
NUM_CLASSES = (19, 43)
EXCLUSION_FILES = ("patches_with_seasonal_snow.csv", "patches_with_cloud_and_shadow.csv")

# The 43 CORINE level-3 labels in the order of BigEarthNet's label_indices.json.
LABELS_43: tuple[str, ...] = (
    "Continuous urban fabric",
    "Discontinuous urban fabric",
    "Industrial or commercial units",
    "Road and rail networks and associated land",
    "Port areas",
    "Airports",
    "Mineral extraction sites",
    "Dump sites",
    "Construction sites",
    "Green urban areas",
    "Sport and leisure facilities",
    "Non-irrigated arable land",
    "Permanently irrigated land",
    "Rice fields",
    "Vineyards",
    "Fruit trees and berry plantations",
    "Olive groves",
    "Pastures",
    "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland",
    "Moors and heathland",
    "Sclerophyllous vegetation",
    "Transitional woodland/shrub",
    "Beaches, dunes, sands",
    "Bare rock",
    "Sparsely vegetated areas",
    "Burnt areas",
    "Inland marshes",
    "Peatbogs",
    "Salt marshes",
    "Salines",
    "Intertidal flats",
    "Water courses",
    "Water bodies",
    "Coastal lagoons",
    "Estuaries",
    "Sea and ocean",
)

# The 19-class nomenclature, names as in BigEarthNet's label_indices.json ("BigEarthNet-19_labels").
CLASSES_19: tuple[str, ...] = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)

# 43-class index -> 19-class index. Labels 3-10 (artificial non-urban), 30 (bare rock), 32 (burnt areas) and
# 37 (intertidal flats) have no 19-class counterpart: they cannot be recognised from a 120x120 S2 patch.
LABEL_43_TO_19: dict[int, int] = {
    0: 0, 1: 0, 2: 1, 11: 2, 12: 2, 13: 2, 14: 3, 15: 3, 16: 3, 18: 3, 17: 4, 19: 5, 20: 6, 21: 7, 22: 8,
    23: 9, 24: 10, 25: 11, 31: 11, 26: 12, 27: 12, 28: 13, 29: 14, 33: 15, 34: 15, 35: 16, 36: 16,
    38: 17, 39: 17, 40: 18, 41: 18, 42: 18,
}  # fmt: skip


def _label_indices(labels: list[str]) -> list[int]:
    """Positions of a patch's CORINE names in :data:`LABELS_43`; an unknown name is a ValueError."""
    unknown = [name for name in labels if name not in LABELS_43]
    if unknown:
        raise ValueError(f"unknown BigEarthNet label {unknown[0]!r}; expected one of the 43 CORINE level-3 names")
    return [LABELS_43.index(name) for name in labels]


def labels_to_19(labels: list[str]) -> np.ndarray:
    """Multi-hot float32 vector over CLASSES_19 for a patch's CORINE labels; all zeros if none maps."""
    target = np.zeros(len(CLASSES_19), dtype=np.float32)
    for index in _label_indices(labels):
        if index in LABEL_43_TO_19:
            target[LABEL_43_TO_19[index]] = 1.0
    return target


def labels_to_43(labels: list[str]) -> np.ndarray:
    """Multi-hot float32 vector over LABELS_43 (the original nomenclature) for a patch's CORINE labels."""
    target = np.zeros(len(LABELS_43), dtype=np.float32)
    target[_label_indices(labels)] = 1.0
    return target


def class_names(num_classes: int) -> tuple[str, ...]:
    """The class names of the 19- or 43-class nomenclature, in target order."""
    if num_classes not in NUM_CLASSES:
        raise ValueError(f"--num_classes must be 19 or 43 (the BigEarthNet nomenclatures), got {num_classes}")
    return CLASSES_19 if num_classes == 19 else LABELS_43


def band_file_name(band: str) -> str:
    """BigEarthNet's zero-padded band suffix: ``B1`` -> ``B01``, ``B8A`` -> ``B8A``."""
    return band if band == "B8A" else f"B{int(band[1:]):02d}"


def normalize_to_uint8(stack: np.ndarray, bands: list[str]) -> np.ndarray:
    """SeCo/DINO-MC stretch of a (C, H, W) uint16 stack: each band [mean - 2 std, mean + 2 std] -> 0..255 uint8.

    The statistics are BigEarthNet's own (bands.BIGEARTHNET_MEAN_STD); values outside the range saturate and
    the scaled value is truncated like the published ``astype(np.uint8)``, so inputs match the published pipeline.
    """
    if stack.shape[0] != len(bands):
        raise ValueError(f"stack has {stack.shape[0]} bands but {len(bands)} band names were given")
    out = np.empty(stack.shape, dtype=np.uint8)
    for i, band in enumerate(bands):
        low, high = two_std_range(band, BIGEARTHNET_MEAN_STD)
        scaled = (stack[i].astype(np.float64) - low) / (high - low) * 255.0
        out[i] = np.clip(scaled, 0, 255).astype(np.uint8)
    return out


def subset_fraction(patches: list[str], frac: float, seed: int) -> list[str]:
    """Draw ``frac`` of ``patches`` WITHOUT replacement, reproducibly from ``seed``, keeping the input order.

    The published code sampled with replacement (duplicates, fewer distinct patches than reported) and also
    subsampled val; callers here apply this to the train split only.
    """
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"--train_frac must be in (0, 1], got {frac}")
    count = max(1, round(frac * len(patches)))
    chosen = np.random.default_rng(seed).choice(len(patches), size=count, replace=False)
    return [patches[i] for i in sorted(chosen)]


def save_patch_list(patches: list[str], path: str | Path) -> Path:
    """Write one patch name per line (the format of the official split lists) so a subset can be reproduced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p}\n" for p in patches))
    return path


def read_patch_list(path: Path) -> list[str]:
    """Sentinel-2 patch names of a split or exclusion file: on every non-empty line, the comma-separated field
    that is one (the official lists pair each S2 patch with its S1 partner). A first line without a patch name
    is a header and skipped; any later one is a DataError naming the file and the line."""
    patches: list[str] = []
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    for position, (number, line) in enumerate(lines):
        name = next((f.strip() for f in line.split(",") if PATCH_NAME.match(f.strip())), None)
        if name is not None:
            patches.append(name)
        elif position > 0:
            raise DataError(f"{path} line {number}: {line!r} holds no Sentinel-2 patch name (S2[AB]_MSIL2A_...)")
    return patches


def find_split_file(folders: list[Path], split: str) -> Path | None:
    """The first list of ``split`` in ``folders``, by the preference order of :data:`SPLIT_FILE_NAMES`."""
    for pattern in SPLIT_FILE_NAMES:
        for folder in folders:
            if (folder / pattern.format(split=split)).is_file():
                return folder / pattern.format(split=split)
    return None


class BigEarthNet(torch.utils.data.Dataset):
    """BigEarthNet-S2 v1.0 patches of one split with 19- or 43-class multi-hot targets.

    ``split=None`` uses every patch found. ``train_frac`` keeps a seeded fraction of the train split (only
    the train split: evaluating on a subsample makes numbers incomparable); save it with :func:`save_patch_list`.
    Labels are read once at construction (one small JSON per patch) so that label-less patches can be dropped
    and ``targets`` is available to samplers and metrics.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        bands: str | list[str] | None = None,
        transform: Callable | None = None,
        split_dir: str | Path | None = None,
        train_frac: float | None = None,
        seed: int = 0,
        num_classes: int = 19,
    ):
        if split is not None and split not in SPLITS:
            raise ValueError(f"BigEarthNet split must be one of {', '.join(SPLITS)} or None, got {split!r}")
        if train_frac is not None and split != "train":
            raise ValueError(f"--train_frac only applies to the train split, not to split={split!r}")
        self.class_names = class_names(num_classes)
        self._encode = labels_to_19 if num_classes == 19 else labels_to_43
        self.bands = parse_bands(bands)
        if "B10" in self.bands:
            raise ValueError("BigEarthNet (L2A) has no B10; choose among B1-B9, B8A, B11, B12")
        self.transform = transform
        root = Path(root)
        self.root = root / PATCH_FOLDER if (root / PATCH_FOLDER).is_dir() else root
        if not self.root.is_dir():
            raise DataError(f"BigEarthNet root {self.root} does not exist")
        available = sorted(p.name for p in self.root.iterdir() if p.is_dir() and PATCH_NAME.match(p.name))
        if not available:
            raise DataError(
                f"no BigEarthNet patch folders in {self.root}; expected <root>/S2[AB]_MSIL2A_<date>T<time>_<h>_<v>/"
            )
        if split_dir is not None:
            search = [Path(split_dir)]
        else:
            search = list(dict.fromkeys([root, self.root, self.root.parent]))

        explicit = split_dir is not None
        self.split_file = None if split is None else self._split_file(search, split, explicit, len(available))
        if self.split_file is None:
            patches = available
        else:
            patches = read_patch_list(self.split_file)
            missing = sorted(set(patches) - set(available))
            if missing:
                raise DataError(
                    f"{self.split_file} lists {len(missing)} patch(es) missing from {self.root}, e.g. {missing[0]}"
                )
        excluded = set()
        for name in EXCLUSION_FILES:
            path = next((d / name for d in search if (d / name).is_file()), None)
            if path is not None:
                excluded |= set(read_patch_list(path))
        kept = [p for p in patches if p not in excluded]

        targets = [self._read_target(p) for p in kept]
        keep = [i for i, t in enumerate(targets) if t.any()]
        self.patches = [kept[i] for i in keep]
        self.targets = np.stack([targets[i] for i in keep]) if keep else np.zeros((0, num_classes), np.float32)
        if not self.patches:
            source = f"{self.split_file} lists" if self.split_file is not None else "found"
            raise DataError(
                f"the BigEarthNet {split or 'whole'} split of {self.root} is empty: {source} {len(patches)} "
                f"patch(es), {len(patches) - len(kept)} excluded as snow / cloud, {len(kept) - len(keep)} without "
                f"any of the {num_classes} classes"
            )
        if train_frac is not None:
            chosen = set(subset_fraction(self.patches, train_frac, seed))
            rows = [i for i, p in enumerate(self.patches) if p in chosen]
            self.patches = [self.patches[i] for i in rows]
            self.targets = self.targets[rows]

    def _split_file(self, search: list[Path], split: str, explicit: bool, n_available: int) -> Path | None:
        """The list of ``split``; None (every patch, with a warning) only when no list of any split exists and
        no folder was named: a missing list next to other lists, or in an explicit ``split_dir``, is an error."""
        found = find_split_file(search, split)
        if found is not None:
            return found
        expected = " or ".join(pattern.format(split=split) for pattern in SPLIT_FILE_NAMES)
        if explicit:
            raise DataError(f"--split_dir {search[0]} holds no BigEarthNet {split} list (expected {expected})")
        others = [path for other in SPLITS if (path := find_split_file(search, other)) is not None]
        if others:
            raise DataError(
                f"no BigEarthNet {split} list ({expected}) beside {others[0]}: a split without its list would "
                f"use every patch of {self.root}, the other splits' too"
            )
        warnings.warn(
            f"no BigEarthNet split lists ({expected}) in {', '.join(map(str, search))}; "
            f"using all {n_available} patches of {self.root} (split={split!r} ignored)",
            stacklevel=3,
        )
        return None

    def _read_target(self, patch: str) -> np.ndarray:
        path = self.root / patch / f"{patch}_labels_metadata.json"
        try:
            labels = json.loads(path.read_text())["labels"]
            return self._encode(labels)
        except FileNotFoundError:
            raise DataError(f"missing label file {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}: expected JSON with a 'labels' list of CORINE names ({err})") from None

    def __len__(self) -> int:
        return len(self.patches)

    def load_stack(self, patch: str) -> np.ndarray:
        """The patch's selected bands as uint16 (C, 120, 120), 20 m and 60 m bands bilinearly upsampled."""
        arrays = []
        for band in self.bands:
            path = self.root / patch / f"{patch}_{band_file_name(band)}.tif"
            if not path.is_file():
                raise DataError(f"missing band file {path}")
            arrays.append(read_band(path))
        return stack_bands(arrays, PATCH_SIZE)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        patch = self.patches[index]
        image = torch.from_numpy(normalize_to_uint8(self.load_stack(patch), self.bands))
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.from_numpy(self.targets[index].copy())
