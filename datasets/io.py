"""Raster I/O shared by all readers: rasterio reads with clear errors, and resampling to a common grid."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from datasets import DataError

GEOTIFF_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff")


def read_raster(path: str | Path, indexes: list[int] | None = None, window: Window | None = None) -> np.ndarray:
    """Read a raster (all bands, or the 1-based ``indexes``; all pixels, or a ``window``) as a (C, H, W) array in
    its stored dtype.

    Any rasterio/GDAL failure (missing, truncated or corrupt file) becomes a DataError naming the file:
    a user with 100,000 files needs to know which one is broken, not a GDAL stack trace.
    """
    try:
        with warnings.catch_warnings():
            # Pixels are all we use: a JPEG/PNG or a damaged header without georeferencing is not a problem.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return src.read(indexes, window=window)
    except (RasterioError, OSError) as err:
        cause = err.__cause__ or err  # rasterio wraps GDAL's own message ("... truncated ...") as the cause
        reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise DataError(f"cannot read raster {path}: {reason} (corrupt or truncated file?)") from None


def read_band(path: str | Path) -> np.ndarray:
    """Read a single-band raster as an (H, W) array."""
    return read_raster(path, indexes=[1])[0]


def resize_band(band: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resample an (H, W) band to ``size``, e.g. a 20 m band onto the 10 m grid.

    Integer bands are rounded back to their own dtype, so that a stack of uint8 SeCo or uint16 BigEarthNet
    bands keeps one compact dtype; a band already at ``size`` is returned unchanged.
    """
    if band.shape == tuple(size):
        return band
    tensor = torch.from_numpy(band.astype(np.float32, copy=False))[None, None]
    resized = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    if np.issubdtype(band.dtype, np.integer):
        info = np.iinfo(band.dtype)
        return np.clip(np.rint(resized), info.min, info.max).astype(band.dtype)
    return resized


def stack_bands(bands: list[np.ndarray], size: tuple[int, int] | None = None) -> np.ndarray:
    """Stack (H, W) bands of different resolutions into (C, H, W) on the grid of ``size`` (default: the largest)."""
    if size is None:
        size = max((b.shape for b in bands), key=lambda s: s[0] * s[1])
    return np.stack([resize_band(b, size) for b in bands])
