"""SeCo (Seasonal Contrast) pretraining data, and any user time series laid out like it.

SeCo: Manas et al., "Seasonal Contrast: Unsupervised Pre-Training from Uncurated Remote Sensing Data",
ICCV 2021 (Zenodo record 4728033: ``seco_100k.zip`` -> ``seasonal_contrast_100k/``, ``seco_1m.zip``).

Layouts, detected per location folder ``<root>/<location>/``:

(a) per-band folders ``<location>/<acquisition id>/B1.tif ... B12.tif, B8A.tif`` (+ ``metadata.json``):
    single-band uint8 GeoTIFFs, value = clip(reflectance, 0, 1) * 255, 10 m bands 264x264, 20 m 132x132,
    60 m 44x44. Bands are read in the order asked and bilinearly brought to the acquisition's 10 m grid
    (264x264 for SeCo) whatever the bands: the grid of its 10 m band files, so ``--bands B5`` gives 264x264
    too (a selection without a 10 m band also reads one 10 m band file for its size; a folder with no 10 m
    band file at all takes a band's size times its native resolution / 10). Zero-padded names (``B02.tif``)
    are accepted too.
(b) SeCo-100K RGB previews ``<location>/<acquisition id>.tif`` (3-band uint8 B4, B3, B2), siblings of the
    folders of (a). The published DINO-MC code trains on these only. When both exist, (a) is used.
(c) a plain folder of images ``<location>/*.{tif,tiff,png,jpg,jpeg}``, one image per acquisition, for a
    user's own time series (band selection in multi-band GeoTIFFs: see ``datasets/folder.py``; 16-bit
    files are taken as L2A reflectance x 10000 and converted to SeCo's uint8 scale).

(d) a pack written by ``prepare_data.py`` (``datasets/pack.py``): the same acquisitions, decoded once into a
    memory-mapped file; ``root`` is the pack folder. Samples, names and sampling are those of the tree.

The tree is scanned once at construction with ``os.scandir`` (no file is opened), so a bad download fails
before training starts, with one line naming the first bad folder or file. Each sample reads only the files
it needs, one rasterio open per band file (the published reader opened the same file once per band).

Output: uint8 C x H x W tensors. RGB from reflectance bands gets SeCo's per-band quantile stretch
(``bands.SECO_RGB_STRETCH``) so that it looks like the previews and suits ImageNet normalisation;
multispectral bands stay in SeCo's uint8 reflectance scale (normalised later with ``SECO_MS_MEAN_STD``).

Sampling uses torch's global RNG, so DataLoader worker seeding and a checkpointed RNG state make runs
reproducible.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets import DataError
from datasets.bands import RESOLUTION_M, RGB_BANDS, SECO_RGB_STRETCH, canonical_band, is_rgb, parse_bands
from datasets.folder import GEOTIFF_EXTENSIONS, is_image_file, read_image
from datasets.io import read_band, stack_bands
from datasets.pack import SeCoPack, is_pack, write_pack

DATA_MODES: tuple[str, ...] = ("dino", "mc", "tp")

# SeCo acquisition ids: <sensing time>_<product time>_T<MGRS tile>, e.g. 20190803T154559_20190803T154611_T18QVG.
_PREVIEW_NAME = re.compile(r"^\d{8}T\d{6}_\d{8}T\d{6}_T[0-9A-Z]{5}\.tiff?$", re.IGNORECASE)


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

    ``np.take`` into a preallocated array is ~2x faster than fancy indexing plus ``np.stack``.
    """
    out = np.empty(rgb.shape, dtype=np.uint8)
    for i in range(3):
        np.take(_RGB_LUT[i], rgb[i], out=out[i])
    return out


def to_seco_uint8(array: np.ndarray, path: str | Path) -> np.ndarray:
    """Bring an acquisition to SeCo's uint8 scale: uint8 as is, 16-bit L2A (reflectance x 10000) converted."""
    if array.dtype == np.uint8:
        return array
    if array.dtype in (np.uint16, np.int16):
        return np.rint(np.clip(array.astype(np.float32) / 10000.0, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise DataError(f"{path} stores {array.dtype} values; expected uint8 (SeCo) or 16-bit L2A reflectance x 10000")


TEN_M_BANDS: tuple[str, ...] = tuple(band for band, metres in RESOLUTION_M.items() if metres == 10)


def native_grid(arrays: list[np.ndarray], bands: list[str]) -> tuple[int, int]:
    """(H, W) of the 10 m grid implied by bands stored at their native resolutions: a 20 m band of 132x132
    px covers the ground of 264x264 px at 10 m (the largest is taken, never downsampling a band)."""
    sizes = [(a.shape[0] * RESOLUTION_M[b] // 10, a.shape[1] * RESOLUTION_M[b] // 10) for a, b in zip(arrays, bands)]
    return max(sizes, key=lambda size: size[0] * size[1])


def _band_file_names(folder: str, bands: list[str], names: list[str]) -> tuple[str, ...]:
    """Map each requested band to its file in an acquisition folder (``B8A.tif``, or zero-padded ``B08.tif``).

    Without a 10 m band among ``bands``, a 10 m band file of the folder (when there is one) is appended: its
    size is the acquisition's 10 m grid, which the bands asked are brought to."""
    found: dict[str, str] = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() not in GEOTIFF_EXTENSIONS:
            continue
        try:
            band = canonical_band(stem)
        except ValueError:
            continue
        if band not in found or stem.upper() == band:
            found[band] = name
    for band in bands:
        if band not in found:
            raise DataError(
                f"{os.path.join(folder, band + '.tif')} is missing: every acquisition folder needs one GeoTIFF "
                f"per requested band ({','.join(bands)})"
            )
    reference = [] if any(b in TEN_M_BANDS for b in bands) else [found[b] for b in TEN_M_BANDS if b in found][:1]
    return tuple(found[band] for band in bands) + tuple(reference)


class SeCoDataset(Dataset):
    """Locations of a SeCo-style tree -> ``transform([image, ...])``.

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
        self.root = Path(root)
        self.bands = parse_bands(bands)
        self.data_mode = data_mode
        self.transform = transform
        self.tp_with_replacement = tp_with_replacement
        self.locations: list[str] = []
        # Per location, its acquisitions as (path, band file names): a folder and the file of each band in
        # the order asked, plus a 10 m band file giving the grid when none is asked (layout a), or one image
        # file and None (layouts b, c). Identical name tuples are shared, which keeps a million-acquisition
        # index small.
        self._acquisitions: list[list[tuple[str, tuple[str, ...] | None]]] = []
        # A folder written by prepare_data.py: acquisitions come from its memory map, ``_channels`` picks the
        # bands asked out of the bands it stores (None: all of them, in its order).
        self._pack: SeCoPack | None = None
        self._channels: list[int] | None = None
        if is_pack(self.root):
            self._open_pack()
        else:
            self._scan()
        self._fixed: list[int] | None = None
        if fixed_acquisition:
            generator = torch.Generator().manual_seed(seed)
            counts = [self._count(i) for i in range(len(self))]
            self._fixed = [int(torch.randint(count, (1,), generator=generator)) for count in counts]

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    def _open_pack(self) -> None:
        self._pack = SeCoPack(self.root)
        missing = [b for b in self.bands if b not in self._pack.bands]
        if missing:
            raise DataError(
                f"packed SeCo data {self.root} holds bands {','.join(self._pack.bands)}, not {','.join(missing)}: "
                f"pack the tree again with prepare_data.py --bands {','.join(self.bands)}"
            )
        if self.bands != self._pack.bands:
            self._channels = [self._pack.bands.index(b) for b in self.bands]
        self.locations = list(self._pack.locations)

    def _scan(self) -> None:
        if not self.root.is_dir():
            raise DataError(f"SeCo root {self.root} does not exist or is not a folder")
        with os.scandir(self.root) as entries:
            location_dirs = sorted((e.name, e.path) for e in entries if e.is_dir() and not e.name.startswith("."))
        if not location_dirs:
            raise DataError(f"SeCo root {self.root} has no location folders (expected <root>/<location>/...)")
        shared_names: dict[tuple[str, ...], tuple[str, ...]] = {}
        for name, path in location_dirs:
            acquisitions = self._scan_location(path, shared_names)
            self.locations.append(name)
            self._acquisitions.append(acquisitions)

    def _scan_location(
        self, location: str, shared_names: dict[tuple[str, ...], tuple[str, ...]]
    ) -> list[tuple[str, tuple[str, ...] | None]]:
        with os.scandir(location) as entries:
            folders, files = [], []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    folders.append(entry.path)
                elif is_image_file(entry.name):
                    files.append(entry.path)
        if folders:
            acquisitions = []
            for folder in sorted(folders):
                names = _band_file_names(folder, self.bands, os.listdir(folder))
                acquisitions.append((folder, shared_names.setdefault(names, names)))
            return acquisitions
        if not files:
            raise DataError(
                f"location {location} has no acquisitions (expected acquisition folders of B*.tif, "
                f"SeCo RGB previews <acquisition>.tif, or image files)"
            )
        files.sort()
        if not is_rgb(self.bands) and all(_PREVIEW_NAME.match(os.path.basename(f)) for f in files):
            raise DataError(
                f"location {location} has only SeCo RGB previews ({os.path.basename(files[0])}); "
                f"--bands {','.join(self.bands)} needs the per-band acquisition folders"
            )
        return [(f, None) for f in files]

    def __len__(self) -> int:
        return len(self.locations)

    def _count(self, index: int) -> int:
        if self._pack is not None:
            return self._pack.count(index)
        return len(self._acquisitions[index])

    def acquisition_names(self, index: int) -> list[str]:
        """Names of the acquisitions of location ``index`` (folder or file names), in sampling-index order."""
        if self._pack is not None:
            return self._pack.acquisition_names(index)
        return [os.path.basename(path) for path, _ in self._acquisitions[index]]

    def sample_acquisitions(self, index: int) -> list[int]:
        """Indices of the acquisitions one access of location ``index`` uses (1 for dino/mc, 3 for tp)."""
        count = self._count(index)
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

    def write_pack(
        self, output: str | Path, count: int | None = None, progress: Callable[[int], None] | None = None
    ) -> Path:
        """Pack the first ``count`` locations (all by default) into ``output`` (``datasets/pack.py``'s format)."""
        locations = [(name, self.acquisition_names(i)) for i, name in enumerate(self.locations[:count])]
        return write_pack(output, self.bands, locations, self.read_stored, progress)

    def read_stored(self, index: int, acquisition: int) -> tuple[np.ndarray, bool]:
        """One acquisition as stored, before the RGB stretch: a (C, H, W) uint8 array of ``bands`` on the 10 m
        grid (read-only when it comes from a pack), and whether it is an RGB rendering (no stretch)."""
        if self._pack is not None:
            array, rendered = self._pack.read(index, acquisition)
            return (array if self._channels is None else array[self._channels]), rendered
        path, names = self._acquisitions[index][acquisition]
        if names is None:
            array, rendered = read_image(path, self.bands)
            return to_seco_uint8(array, path), rendered
        arrays = []
        for name in names[: len(self.bands)]:
            band_path = os.path.join(path, name)
            arrays.append(to_seco_uint8(read_band(band_path), band_path))
        if len(names) > len(self.bands):  # no 10 m band asked: the grid is the folder's 10 m band file's
            grid = read_band(os.path.join(path, names[-1])).shape
        elif any(b in TEN_M_BANDS for b in self.bands):
            grid = None  # the 10 m bands asked are the largest: stack_bands' default
        else:
            grid = native_grid(arrays, self.bands)
        return stack_bands(arrays, grid), False

    def load(self, index: int, acquisition: int) -> torch.Tensor:
        """One acquisition of location ``index`` as a uint8 C x H x W tensor of ``bands`` on the 10 m grid."""
        array, rendered = self.read_stored(index, acquisition)
        if is_rgb(self.bands) and not rendered:
            array = stretch_rgb(array)
        elif not array.flags.writeable:
            array = array.copy()  # a pack's memory map is read-only; torch needs memory it may write
        return torch.from_numpy(np.ascontiguousarray(array))

    def __getitem__(self, index: int):
        images = [self.load(index, k) for k in self.sample_acquisitions(index)]
        return self.transform(images) if self.transform is not None else images
