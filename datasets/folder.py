"""A user's own images: one folder of images, with or without class subfolders.

Layouts accepted (``root`` is what the user passes):

- ``root/<class>/<image>``: torchvision ImageFolder style; the label is the index of ``<class>`` in the sorted
  class folder names (``.classes``).
- ``root/<image>``: unlabelled images; the label is -1 (for k-NN feature dumps, attention maps, ...).

Images are ``.tif``/``.tiff`` (read with rasterio, any number of bands) or ``.png``/``.jpg``/``.jpeg`` (read with
PIL as RGB, i.e. B4, B3, B2). How the bands asked (``--bands``) are taken from a GeoTIFF with C bands:

- C == number of bands asked: the file is taken to hold exactly those bands, in that order (a 3-band RGB
  GeoTIFF for ``--bands RGB``, or a file the user exported with the bands they ask for);
- C == 12: the file is in Sentinel-2 L2A order (``bands.S2_BANDS``: B1..B8, B8A, B9, B11, B12) and the bands
  are picked by index;
- C == 13: the file is in Sentinel-2 L1C order (``bands.S2_L1C_BANDS``, B10 after B9) and picked by index.
  EuroSAT-MS files use another 13-band order (B8A last): read those with ``datasets/eurosat.py``.

Anything else is a DataError naming the file. Values are returned as stored: uint8 stays uint8, 16-bit
products become float32 (the contract for readers), so the caller's normalisation decides the scale.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from datasets import DataError
from datasets.bands import S2_BANDS, S2_L1C_BANDS, is_rgb, parse_bands
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


def to_tensor(array: np.ndarray, path: str | Path) -> torch.Tensor:
    """uint8 arrays -> uint8 tensor; 16-bit -> float32 tensor (readers' contract); other dtypes are a DataError."""
    if array.dtype == np.uint8:
        return torch.from_numpy(array)
    if array.dtype in (np.uint16, np.int16):
        return torch.from_numpy(array.astype(np.float32))
    raise DataError(f"{path} stores {array.dtype} values; expected uint8 or 16-bit integers")


class ImageFolderDataset(Dataset):
    """Images of ``root`` (optionally in class subfolders) -> ``(transform(image), label)``.

    ``image`` is a C x H x W tensor (uint8, or float32 for 16-bit GeoTIFFs) of ``bands`` (None = RGB).
    Class subfolders win over loose files at the top level (a README next to the class folders is ignored).
    """

    def __init__(self, root: str | Path, bands: list[str] | str | None = None, transform=None):
        self.root = Path(root)
        self.bands = parse_bands(bands)
        self.transform = transform
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a folder")
        with os.scandir(self.root) as entries:
            entries = sorted(entries, key=lambda e: e.name)
        class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        self.classes: list[str] = [e.name for e in class_dirs]
        if self.classes:
            self.samples = [
                (os.path.join(d.path, name), label)
                for label, d in enumerate(class_dirs)
                for name in sorted(os.listdir(d.path))
                if is_image_file(name)
            ]
        else:
            self.samples = [(e.path, -1) for e in entries if e.is_file() and is_image_file(e.name)]
        if not self.samples:
            where = "its class folders" if self.classes else "it"
            raise DataError(
                f"image folder {self.root} has no images in {where} (expected {', '.join(IMAGE_EXTENSIONS)})"
            )

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        array, _ = read_image(path, self.bands)
        image = to_tensor(array, path)
        return (self.transform(image) if self.transform is not None else image), label
