"""A user's own image files as the readers take them: which files are images, and the bands asked out of one.

Used by the SeCo tree reader (``datasets/seco_tree.py``: folders of one image file per acquisition) and the
scene reader (``datasets/scenes.py``). Images are ``.tif``/``.tiff`` (read with rasterio, any number of bands)
or ``.png``/``.jpg``/``.jpeg`` (read with PIL as RGB, i.e. B4, B3, B2). How the bands asked (``--bands``) are
taken from a GeoTIFF with C bands:

- C == number of bands asked: the file is taken to hold exactly those bands, in that order (a 3-band RGB
  GeoTIFF for ``--bands RGB``, or a file the user exported with the bands they ask for);
- C == 12: the file is in Sentinel-2 L2A order (``bands.S2_BANDS``: B1..B8, B8A, B9, B11, B12) and the bands
  are picked by index;
- C == 13: the file is in Sentinel-2 L1C order (``bands.S2_L1C_BANDS``, B10 after B9) and picked by index.
  EuroSAT-MS files use another 13-band order (B8A last): read those with ``datasets/eurosat.py``.

Anything else is a DataError naming the file. Values are returned as stored (uint8 stays uint8, 16-bit stays
16-bit): the caller converts them and its normalisation decides the scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from datasets import DataError
from datasets.bands import S2_BANDS, S2_L1C_BANDS, is_rgb
from datasets.io import GEOTIFF_EXTENSIONS, read_raster

IMAGE_EXTENSIONS: tuple[str, ...] = GEOTIFF_EXTENSIONS + (".png", ".jpg", ".jpeg")


def is_image_file(name: str) -> bool:
    """True for the file types the folder readers accept (case-insensitive extension)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def select_bands(array: np.ndarray, bands: list[str], path: str | Path) -> np.ndarray:
    """Pick ``bands`` out of a (C, H, W) GeoTIFF by the rules of the module docstring."""
    count = array.shape[0]
    if count == len(bands):
        return array
    for order in (S2_BANDS, S2_L1C_BANDS):
        if count == len(order):
            missing = [b for b in bands if b not in order]
            if missing:
                raise DataError(f"{path} has the {count} bands {','.join(order)}; it has no {','.join(missing)}")
            return array[[order.index(b) for b in bands]]
    raise DataError(
        f"{path} has {count} bands; expected {len(bands)} (the bands asked: {','.join(bands)}), "
        f"12 (Sentinel-2 L2A order) or 13 (Sentinel-2 L1C order)"
    )


def read_image(path: str | Path, bands: list[str]) -> tuple[np.ndarray, bool]:
    """Read one image file as a (C, H, W) array of ``bands``, in its stored dtype.

    Also returns whether the file is a visual RGB rendering (PNG/JPEG, or a GeoTIFF that holds exactly the
    three bands asked) rather than a selection out of a multi-band reflectance product: the SeCo reader
    applies its RGB quantile stretch only to the latter, since a rendered image is already stretched.
    """
    if str(path).lower().endswith(GEOTIFF_EXTENSIONS):
        array = read_raster(path)
        return select_bands(array, bands, path), array.shape[0] == len(bands) == 3
    if not is_rgb(bands):
        raise DataError(f"{path} is an RGB image (B4,B3,B2); --bands {','.join(bands)} needs multi-band GeoTIFFs")
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot read image {path}: {str(err).splitlines()[0] if str(err) else 'unreadable'}") from None
    return np.ascontiguousarray(rgb.transpose(2, 0, 1)), True
