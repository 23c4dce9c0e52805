"""Large GeoTIFF scenes (a Landsat or Sentinel-2 scene, any band count) cut into tiles, as a source for a store.

``prepare_data.py --tile_size N`` reads ``--data_path`` (one GeoTIFF, or a folder of them) through this module:
every scene is cut into N x N tiles with a stride of N - ``overlap`` pixels (the last row and column of tiles
aligned to the scene's edge, so that every pixel is covered), tiles with more than ``max_nodata`` of their
pixels outside the data (the file's nodata value or mask, e.g. a rotated scene's black border) are skipped,
and each tile becomes a location with one acquisition, named ``<scene>_<row>_<col>`` after its top-left pixel.
Bands are picked from a scene as from any image file (``datasets/folder.py``: the bands asked, or the 12- or
13-band Sentinel-2 orders); values keep the file's dtype. Each tile's CRS and affine transform go into the
store's attributes (``georeference``), so a tile can be put back on the map.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

import utils
from datasets import DataError
from datasets.acquisition import Acquisition
from datasets.folder import select_bands
from datasets.io import GEOTIFF_EXTENSIONS, read_raster


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Offsets of the tiles along one dimension: every ``stride`` pixels, plus one aligned to the far edge."""
    if length < tile:
        return []
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def scene_files(path: str | Path) -> list[str]:
    """One GeoTIFF, or the GeoTIFFs of a folder (sorted)."""
    path = str(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"--data_path {path} does not exist (expected a GeoTIFF scene or a folder of them)")
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(GEOTIFF_EXTENSIONS))
    if not files:
        raise DataError(f"--data_path {path} holds no GeoTIFF scene ({', '.join(GEOTIFF_EXTENSIONS)})")
    return files


class SceneTiles:
    """The tiles of one or more scenes, each a location with one acquisition (see the module docstring)."""

    layout = "images"

    def __init__(self, path: str | Path, bands: list[str], tile_size: int, overlap: int = 0, max_nodata: float = 0.0):
        if tile_size < 1 or not 0 <= overlap < tile_size:
            raise utils.ConfigError(
                f"--tile_size must be >= 1 and 0 <= --tile_overlap < --tile_size, got {tile_size}, {overlap}"
            )
        if not 0.0 <= max_nodata <= 1.0:
            raise utils.ConfigError(f"--max_nodata is a fraction of the tile, 0 to 1, got {max_nodata}")
        self.root = str(path)
        self.bands = list(bands)
        self.tile = tile_size
        self.locations: list[str] = []
        self._tiles: list[tuple[str, int, int]] = []  # scene file, row, column of the top-left pixel
        self.georeference: list[dict] = []
        files = scene_files(path)
        for scene in utils.Progress(files, "scanning scenes", 1):
            self._add_scene(scene, tile_size - overlap, max_nodata)
        if not self._tiles:
            raise DataError(
                f"--data_path {path}: no {tile_size} x {tile_size} tile with at most {max_nodata:.0%} nodata "
                f"(scenes smaller than a tile, or mostly nodata)"
            )

    def _add_scene(self, scene: str, stride: int, max_nodata: float) -> None:
        try:
            with rasterio.open(scene) as src:
                valid = src.dataset_mask() > 0
                crs = src.crs.to_string() if src.crs else None
                affine = src.transform
        except rasterio.errors.RasterioError as err:
            raise DataError(f"cannot read scene {scene}: {str(err).splitlines()[0]}") from None
        # Valid pixels per tile from one integral image of the mask: O(1) per tile.
        integral = np.pad(valid.cumsum(0, dtype=np.int64).cumsum(1), ((1, 0), (1, 0)))
        stem = Path(scene).stem
        tile, area = self.tile, self.tile * self.tile
        for row in tile_starts(valid.shape[0], tile, stride):
            for col in tile_starts(valid.shape[1], tile, stride):
                inside = (
                    integral[row + tile, col + tile]
                    - integral[row, col + tile]
                    - integral[row + tile, col]
                    + integral[row, col]
                )
                if 1.0 - inside / area > max_nodata:
                    continue
                self.locations.append(f"{stem}_{row:05d}_{col:05d}")
                self._tiles.append((scene, row, col))
                a, b, c, d, e, f = affine[:6]  # the tile's transform: the scene's, moved to its top-left pixel
                self.georeference.append(
                    {"crs": crs, "transform": [a, b, a * col + b * row + c, d, e, d * col + e * row + f]}
                )

    def __len__(self) -> int:
        return len(self.locations)

    def count(self, index: int) -> int:
        return 1

    def acquisition_names(self, index: int) -> list[str]:
        return [os.path.basename(self._tiles[index][0])]

    def read(self, index: int, acquisition: int) -> Acquisition:
        scene, row, col = self._tiles[index]
        array = read_raster(scene, window=Window(col, row, self.tile, self.tile))
        name = f"{scene} (tile at row {row}, column {col})"
        bands = select_bands(array, self.bands, name)
        return Acquisition(list(bands), None, array.shape[0] == len(self.bands) == 3, name)
