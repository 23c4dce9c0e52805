"""SeCo-style GeoTIFF trees as a source of acquisitions (the layout SeCo's archives unpack to).

SeCo: Manas et al., "Seasonal Contrast: Unsupervised Pre-Training from Uncurated Remote Sensing Data",
ICCV 2021 (Zenodo record 4728033: ``seco_100k.zip`` -> ``seasonal_contrast_100k/``, ``seco_1m.zip``).

Layouts, detected per location folder ``<root>/<location>/``:

(a) per-band folders ``<location>/<acquisition id>/B1.tif ... B12.tif, B8A.tif`` (+ ``metadata.json``):
    single-band uint8 GeoTIFFs, value = clip(reflectance, 0, 1) * 255, 10 m bands 264x264, 20 m 132x132,
    60 m 44x44. The bands asked are brought to the acquisition's 10 m grid (264x264 for SeCo) whatever they
    are: the grid of its 10 m band files, so ``--bands B5`` gives 264x264 too (a selection without a 10 m band
    also reads one 10 m band file for its size; a folder with no 10 m band file at all takes a band's size
    times its native resolution / 10). Zero-padded names (``B02.tif``) are accepted too.
(b) SeCo-100K RGB previews ``<location>/<acquisition id>.tif`` (3-band uint8 B4, B3, B2), siblings of the
    folders of (a). The published DINO-MC code trains on these only. When both exist, (a) is used.
(c) a plain folder of images ``<location>/*.{tif,tiff,png,jpg,jpeg}``, one image per acquisition, for a
    user's own time series (band selection in multi-band GeoTIFFs: see ``datasets/folder.py``).
(d) a flat folder of images ``<root>/*.{tif,...}`` (tiles of one's own, no location folders): each image is a
    location with one acquisition.

The tree is scanned once at construction with ``os.scandir`` (no file is opened), so a bad download fails
before training starts, with one line naming the first bad folder or file. Each read opens only the files it
needs, one rasterio open per band file (the published reader opened the same file once per band).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from datasets import DataError
from datasets.acquisition import TEN_M_BANDS, Acquisition, native_grid
from datasets.bands import canonical_band, is_rgb
from datasets.folder import is_image_file, read_image
from datasets.io import GEOTIFF_EXTENSIONS, read_band

# SeCo acquisition ids: <sensing time>_<product time>_T<MGRS tile>, e.g. 20190803T154559_20190803T154611_T18QVG.
_PREVIEW_NAME = re.compile(r"^\d{8}T\d{6}_\d{8}T\d{6}_T[0-9A-Z]{5}\.tiff?$", re.IGNORECASE)


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


class SeCoTree:
    """The locations of a SeCo-style tree and their acquisitions, read as stored (see the module docstring)."""

    def __init__(self, root: str | Path, bands: list[str]):
        self.root = str(root)
        self.bands = list(bands)
        self.locations: list[str] = []
        # Per location, its acquisitions as (path, band file names): a folder and the file of each band in
        # the order asked, plus a 10 m band file giving the grid when none is asked (layout a), or one image
        # file and None (layouts b, c). Identical name tuples are shared, which keeps a million-acquisition
        # index small.
        self._acquisitions: list[list[tuple[str, tuple[str, ...] | None]]] = []
        self._scan()

    def _scan(self) -> None:
        if not os.path.isdir(self.root):
            raise DataError(f"SeCo root {self.root} does not exist or is not a folder")
        with os.scandir(self.root) as entries:
            entries = [e for e in entries if not e.name.startswith(".")]
        location_dirs = sorted((e.name, e.path) for e in entries if e.is_dir())
        if not location_dirs:
            images = sorted(e.path for e in entries if e.is_file() and is_image_file(e.name))
            if not images:
                raise DataError(
                    f"SeCo root {self.root} has no location folders (expected <root>/<location>/...) and no images"
                )
            self.locations = [os.path.basename(path) for path in images]  # a flat folder: one image a location
            self._acquisitions = [[(path, None)] for path in images]
            return
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

    @property
    def layout(self) -> str:
        """ "bands" when the first location has per-band folders (layout a), else "images" (layouts b, c)."""
        return "images" if self._acquisitions[0][0][1] is None else "bands"

    def __len__(self) -> int:
        return len(self.locations)

    def count(self, index: int) -> int:
        """Number of acquisitions of location ``index``."""
        return len(self._acquisitions[index])

    def acquisition_names(self, index: int) -> list[str]:
        """Names of the acquisitions of location ``index`` (folder or file names), in sampling-index order."""
        return [os.path.basename(path) for path, _ in self._acquisitions[index]]

    def read(self, index: int, acquisition: int) -> Acquisition:
        """Acquisition ``acquisition`` of location ``index``: the bands asked, as their files store them."""
        path, names = self._acquisitions[index][acquisition]
        if names is None:
            array, rendered = read_image(path, self.bands)
            return Acquisition(list(array), None, rendered, path)
        arrays = [read_band(os.path.join(path, name)) for name in names[: len(self.bands)]]
        if len(names) > len(self.bands):  # no 10 m band asked: the grid is the folder's 10 m band file's
            grid = read_band(os.path.join(path, names[-1])).shape
        elif any(b in TEN_M_BANDS for b in self.bands):
            grid = None  # the 10 m bands asked are the largest: stack_bands' default
        else:
            grid = native_grid(arrays, self.bands)
        return Acquisition(arrays, grid, False, path)
