"""Writers of tiny SeCo-layout fixtures (band folders, RGB previews, plain image folders) and of Zarr stores
made from them (prepare_data.py), with the check that a store holds its tree's images.

Every image is constant per band with a value that encodes (acquisition, band), so a test can tell which
acquisition and which band a reader returned without storing any expected image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch
from PIL import Image
from rasterio.transform import Affine

import prepare_data
from datasets.bands import RESOLUTION_M, S2_BANDS
from datasets.seco import SeCoDataset

SIZE_10M = 24  # 12 px at 20 m, 4 px at 60 m


def fixture_value(acquisition: int, band_index: int) -> int:
    """The constant stored for band ``band_index`` (position in S2_BANDS or in the file) of ``acquisition``."""
    return 10 * acquisition + band_index + 1


def acquisition_id(acquisition: int) -> str:
    """A SeCo-style acquisition id, one season apart per index."""
    month = 1 + 3 * acquisition % 12
    return f"2019{month:02d}03T154559_2019{month:02d}03T154611_T18QVG"


UTM_TRANSFORM = Affine(10, 0, 300_000, 0, -10, 2_000_000)  # 10 m pixels in UTM 18N, as the SeCo files


def write_tif(
    path: Path,
    array: np.ndarray,
    compress: str | None = None,
    crs: str = "EPSG:32618",
    transform: Affine = UTM_TRANSFORM,
) -> Path:
    """Write a (C, H, W) or (H, W) array as a GeoTIFF with a UTM CRS (like the real files), in its dtype."""
    array = array[None] if array.ndim == 2 else array
    profile = {
        "driver": "GTiff",
        "count": array.shape[0],
        "height": array.shape[1],
        "width": array.shape[2],
        "dtype": array.dtype.name,
        "crs": crs,
        "transform": transform,
    }
    if compress:
        profile["compress"] = compress
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
    return path


def write_band_folder(folder: Path, acquisition: int, bands=S2_BANDS, zero_padded: bool = False) -> None:
    """One SeCo acquisition folder: a single-band uint8 GeoTIFF per band at its native resolution."""
    for band in bands:
        side = SIZE_10M * 10 // RESOLUTION_M[band]
        value = fixture_value(acquisition, S2_BANDS.index(band))
        name = f"B{int(band[1:]):02d}.tif" if zero_padded and band != "B8A" else f"{band}.tif"
        write_tif(folder / name, np.full((side, side), value, dtype=np.uint8))
    (folder / "metadata.json").write_text("{}")


def write_band_layout(root: Path, n_locations: int = 2, n_acquisitions: int = 4, zero_padded: bool = False) -> Path:
    """Layout (a): ``root/<loc>/<acquisition id>/B*.tif``."""
    for loc in range(n_locations):
        for acq in range(n_acquisitions):
            write_band_folder(root / f"{loc:06d}" / acquisition_id(acq), acq, zero_padded=zero_padded)
    return root


def write_preview_layout(root: Path, n_locations: int = 2, n_acquisitions: int = 4) -> Path:
    """Layout (b): SeCo-100K RGB previews ``root/<loc>/<acquisition id>.tif`` (3-band uint8)."""
    for loc in range(n_locations):
        for acq in range(n_acquisitions):
            rgb = np.stack([np.full((SIZE_10M, SIZE_10M), fixture_value(acq, c), np.uint8) for c in range(3)])
            write_tif(root / f"{loc:06d}" / f"{acquisition_id(acq)}.tif", rgb)
    return root


def write_image_folder_layout(root: Path, extension: str, n_locations: int = 2, n_acquisitions: int = 4) -> Path:
    """Layout (c): ``root/<loc>/<anything>.<extension>``, one RGB image per acquisition (PNG/JPEG via PIL)."""
    for loc in range(n_locations):
        folder = root / f"site_{loc}"
        folder.mkdir(parents=True, exist_ok=True)
        for acq in range(n_acquisitions):
            rgb = np.stack([np.full((SIZE_10M, SIZE_10M), fixture_value(acq, c), np.uint8) for c in range(3)], -1)
            if extension in ("tif", "tiff"):
                write_tif(folder / f"t{acq}.{extension}", rgb.transpose(2, 0, 1))
            else:
                Image.fromarray(rgb).save(folder / f"t{acq}.{extension}")
    return root


SHARD = 2  # acquisitions per shard in these tests: 9 acquisitions -> 5 shards, the last one partial


def write_store(tree: Path, output: Path, bands: str = "RGB", *extra: str) -> Path:
    prepare_data.run(
        ["--data_path", str(tree), "--output_path", str(output), "--bands", bands, "--shard_size", str(SHARD), *extra]
    )
    return output


def assert_same_images(tree: Path, store: Path | str, bands: str) -> None:
    a, b = SeCoDataset(tree, bands=bands), SeCoDataset(store, bands=bands)
    assert a.locations == b.locations and len(a) > 0
    for i in range(len(a)):
        assert a.acquisition_names(i) == b.acquisition_names(i)
        for k in range(len(a.acquisition_names(i))):
            loaded = b.load(i, k)
            assert torch.equal(loaded, a.load(i, k)) and loaded.is_contiguous()


def varied(root: Path, pattern: str, dtype=np.uint8, high: int = 256) -> Path:
    """Random pixels in the matching files (the fixtures' constant images would hide a mixed-up offset)."""
    rng = np.random.default_rng(0)
    for path in sorted(root.glob(pattern)):
        with rasterio.open(path) as src:
            shape = (src.count, src.height, src.width)
        write_tif(path, rng.integers(0, high, shape, dtype=dtype))
    return root
