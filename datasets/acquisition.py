"""One SeCo-style acquisition as a source returns it, and the one way it becomes a training image.

A source (the GeoTIFF tree of ``datasets/seco_tree.py`` or the Zarr store of ``datasets/seco_store.py``) returns
the bands asked as they are stored, each at its own resolution and in its own dtype; :func:`to_10m_grid` turns
them into the uint8 (C, H, W) image on the 10 m grid. Both sources go through this one function, so a store
gives the tree's images bit for bit whatever the bands.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from datasets import DataError
from datasets.bands import RESOLUTION_M
from datasets.io import stack_bands

TEN_M_BANDS: tuple[str, ...] = tuple(band for band, metres in RESOLUTION_M.items() if metres == 10)

# Dtypes an acquisition may store: SeCo's uint8, or 16-bit L2A reflectance x 10000.
STORED_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16))


class Acquisition(NamedTuple):
    """The bands asked, as stored: (H, W) arrays in the order asked, at their own resolutions and dtypes.

    ``grid`` is the (H, W) of the 10 m grid they are brought to (None: the largest band's, when a 10 m band is
    among them); ``rendered`` marks an RGB rendering (SeCo preview, PNG/JPEG) that gets no RGB stretch;
    ``name`` is the file or folder that error messages name.
    """

    bands: list[np.ndarray]
    grid: tuple[int, int] | None
    rendered: bool
    name: str


def to_seco_uint8(array: np.ndarray, path: str | Path) -> np.ndarray:
    """Bring values to SeCo's uint8 scale: uint8 as is, 16-bit L2A (reflectance x 10000) converted."""
    if array.dtype == np.uint8:
        return array
    if array.dtype in (np.uint16, np.int16):
        return np.rint(np.clip(array.astype(np.float32) / 10000.0, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise DataError(f"{path} stores {array.dtype} values; expected uint8 (SeCo) or 16-bit L2A reflectance x 10000")


def native_grid(arrays: list[np.ndarray], bands: list[str]) -> tuple[int, int]:
    """(H, W) of the 10 m grid implied by bands stored at their native resolutions: a 20 m band of 132x132
    px covers the ground of 264x264 px at 10 m (the largest is taken, never downsampling a band)."""
    sizes = [(a.shape[0] * RESOLUTION_M[b] // 10, a.shape[1] * RESOLUTION_M[b] // 10) for a, b in zip(arrays, bands)]
    return max(sizes, key=lambda size: size[0] * size[1])


def to_10m_grid(acquisition: Acquisition) -> np.ndarray:
    """The (C, H, W) uint8 image: each band on SeCo's uint8 scale, then bilinearly brought to the grid."""
    arrays = [to_seco_uint8(band, acquisition.name) for band in acquisition.bands]
    return stack_bands(arrays, acquisition.grid)
