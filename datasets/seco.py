"""SeCo (Seasonal Contrast) pretraining data, and any user time series laid out like it.

SeCo: Manas et al., "Seasonal Contrast: Unsupervised Pre-Training from Uncurated Remote Sensing Data",
ICCV 2021 (Zenodo record 4728033: ``seco_100k.zip`` -> ``seasonal_contrast_100k/``, ``seco_1m.zip``).

``SeCoDataset`` samples acquisitions of locations and hands them to the multi-crop transform. Where they come
from is chosen once from the path, behind one small interface (locations, acquisitions of a location, read an
acquisition's bands):

- a GeoTIFF tree as SeCo's archives unpack to, or a user's own time series (``datasets/seco_tree.py``);
- a Zarr store written from such a tree by ``prepare_data.py`` (``datasets/seco_store.py``): a ``.zarr`` path
  or a URL. It gives the tree's images bit for bit, so a run trains the same teacher on either.

Output: uint8 C x H x W tensors on the 10 m grid. RGB from reflectance bands gets SeCo's per-band quantile
stretch (``bands.SECO_RGB_STRETCH``) so that it looks like the previews and suits ImageNet normalisation;
multispectral bands stay in SeCo's uint8 reflectance scale (normalised later with ``SECO_MS_MEAN_STD``).

Sampling uses torch's global RNG, so DataLoader worker seeding and a checkpointed RNG state make runs
reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets import DataError
from datasets.acquisition import Acquisition, to_10m_grid
from datasets.bands import RGB_BANDS, SECO_RGB_STRETCH, is_rgb, parse_bands
from datasets.seco_store import SeCoStore, is_store, refuse_old_pack
from datasets.seco_tree import SeCoTree

DATA_MODES: tuple[str, ...] = ("dino", "mc", "tp")


def _stretch_lut() -> np.ndarray:
    """(3, 256) lookup table of SeCo's RGB quantile stretch, so a stretch is one indexing per band."""
    values = np.arange(256, dtype=np.float32)
    rows = []
    for band in RGB_BANDS:
        lo, hi = SECO_RGB_STRETCH[band]
        rows.append(np.rint(np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0))
    return np.stack(rows).astype(np.uint8)


_RGB_LUT = _stretch_lut()


def stretch_rgb(rgb: np.ndarray) -> np.ndarray:
    """Apply SeCo's quantile stretch (B4 [0,129], B3 [2,103], B2 [3,88] -> [0,255]) to a (3, H, W) uint8 array.

    ``np.take`` into a preallocated array: no temporary per band, unlike fancy indexing plus ``np.stack``.
    """
    out = np.empty(rgb.shape, dtype=np.uint8)
    for i in range(3):
        np.take(_RGB_LUT[i], rgb[i], out=out[i])
    return out


class Source(Protocol):
    """What SeCoDataset needs of where acquisitions come from (``SeCoTree``, ``SeCoStore``)."""

    locations: list[str]

    def count(self, index: int) -> int: ...

    def acquisition_names(self, index: int) -> list[str]: ...

    def read(self, index: int, acquisition: int) -> Acquisition: ...


def open_source(root: str | Path, bands: list[str]) -> SeCoTree | SeCoStore:
    """A store for a ``.zarr`` path, a URL or a folder with Zarr metadata; a GeoTIFF tree otherwise."""
    if is_store(root):
        return SeCoStore(root, bands)
    refuse_old_pack(root)
    return SeCoTree(root, bands)


class SeCoDataset(Dataset):
    """Locations of a SeCo-style tree or store -> ``transform([image, ...])``.

    ``data_mode`` "dino"/"mc": one acquisition per access, drawn at random each time (``fixed_acquisition=True``
    keeps the published behaviour: one acquisition per location, drawn once with ``seed``).
    ``data_mode`` "tp": three acquisitions [t0, t1, t2], distinct when the location has at least three
    (``tp_with_replacement=True`` keeps the published behaviour of drawing them with replacement).
    """

    def __init__(
        self,
        root: str | Path,
        bands: list[str] | str | None = None,
        data_mode: str = "mc",
        transform=None,
        fixed_acquisition: bool = False,
        tp_with_replacement: bool = False,
        seed: int = 0,
    ):
        if data_mode not in DATA_MODES:
            raise ValueError(f"--data_mode {data_mode!r} is not one of {', '.join(DATA_MODES)}")
        self.root = root
        self.bands = parse_bands(bands)
        self.data_mode = data_mode
        self.transform = transform
        self.tp_with_replacement = tp_with_replacement
        self.source = open_source(root, self.bands)
        self.locations = self.source.locations
        if data_mode == "tp" and all(self.source.count(i) == 1 for i in range(len(self))):
            raise DataError(
                f"--data_mode tp needs several acquisitions (dates) per location; every location of {root} has "
                f"one (a flat folder of images is one acquisition per image): use --data_mode mc or dino"
            )
        self._fixed: list[int] | None = None
        if fixed_acquisition:
            generator = torch.Generator().manual_seed(seed)
            counts = [self.source.count(i) for i in range(len(self))]
            self._fixed = [int(torch.randint(count, (1,), generator=generator)) for count in counts]

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    def __len__(self) -> int:
        return len(self.locations)

    def acquisition_names(self, index: int) -> list[str]:
        """Names of the acquisitions of location ``index`` (folder or file names), in sampling-index order."""
        return self.source.acquisition_names(index)

    def sample_acquisitions(self, index: int) -> list[int]:
        """Indices of the acquisitions one access of location ``index`` uses (1 for dino/mc, 3 for tp)."""
        count = self.source.count(index)
        if self.data_mode != "tp":
            if self._fixed is not None:
                return [self._fixed[index]]
            return [int(torch.randint(count, (1,)))]
        if self.tp_with_replacement:
            return torch.randint(count, (3,)).tolist()
        # Without replacement; a location with fewer than 3 acquisitions repeats its permutation, so that
        # every acquisition it has is still used.
        order = torch.randperm(count)
        return order[torch.arange(3) % count].tolist()

    def load(self, index: int, acquisition: int) -> torch.Tensor:
        """One acquisition of location ``index`` as a uint8 C x H x W tensor of ``bands`` on the 10 m grid."""
        stored = self.source.read(index, acquisition)
        array = to_10m_grid(stored)
        if is_rgb(self.bands) and not stored.rendered:
            array = stretch_rgb(array)
        return torch.from_numpy(np.ascontiguousarray(array))

    def __getitem__(self, index: int):
        images = [self.load(index, k) for k in self.sample_acquisitions(index)]
        return self.transform(images) if self.transform is not None else images
