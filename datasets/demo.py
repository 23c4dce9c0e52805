"""Synthetic Sentinel-2-like demo data in the real SeCo and EuroSAT layouts.

Neither SeCo nor EuroSAT can be downloaded everywhere (CI, air-gapped clusters), yet the whole pipeline —
pretraining, k-NN, linear evaluation — should run end to end on a laptop. Noise would make every number
meaningless, so the generator draws *structured* scenes whose land covers have distinct spectra, shapes and
seasonal behaviour, which is what DINO-MC has to learn:

- agricultural fields: rectangular parcels, each with its own crop calendar (bare soil in winter, green with
  high NIR and low red at its peak);
- forest: textured canopy, high NIR and low red all year, deciduous patches greener in summer;
- grassland / pasture: moderate, seasonally varying greenness;
- orchards: rows of trees over grass;
- water: low in every band, lowest in NIR/SWIR;
- roads: straight bright asphalt lines;
- urban: bright blocks, high SWIR, a little garden vegetation.

Reflectance (0..1) is produced for the 12 L2A bands (``bands.S2_BANDS``). ``write_seco_demo`` stores it as SeCo
does (single-band uint8 JPEG GeoTIFFs, clip(reflectance, 0, 1) * 255, 10/20/60 m grids, UTM georeferencing,
``metadata.json``); ``write_eurosat_demo`` writes the EuroSAT RGB layout with split files, rendering RGB with
the same SeCo quantile stretch as the pretraining reader so that both look alike.

CLI: ``python -m datasets.demo --output_dir DIR`` writes ``DIR/seco`` and ``DIR/eurosat``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.transform import Affine

import utils
from datasets.bands import RESOLUTION_M, RGB_BANDS, S2_BANDS
from datasets.seco import stretch_rgb

SECO_SIZE_10M = 264  # SeCo patch side at 10 m; 132 at 20 m, 44 at 60 m
EUROSAT_SIZE = 64

# Typical L2A surface reflectance of the materials the scenes are mixed from, per band of S2_BANDS
# (B1 B2 B3 B4 B5 B6 B7 B8 B8A B9 B11 B12).
SPECTRA: dict[str, np.ndarray] = {
    "soil": np.array([0.09, 0.10, 0.14, 0.18, 0.21, 0.23, 0.25, 0.27, 0.28, 0.28, 0.34, 0.29]),
    "vegetation": np.array([0.03, 0.03, 0.08, 0.03, 0.12, 0.33, 0.41, 0.44, 0.46, 0.45, 0.14, 0.06]),
    "water": np.array([0.08, 0.07, 0.06, 0.04, 0.03, 0.02, 0.02, 0.015, 0.012, 0.01, 0.006, 0.004]),
    "urban": np.array([0.14, 0.15, 0.16, 0.18, 0.20, 0.22, 0.23, 0.24, 0.25, 0.25, 0.36, 0.33]),
    "asphalt": np.array([0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.17, 0.18, 0.18, 0.18, 0.21, 0.19]),
}
_MATERIALS = tuple(SPECTRA)
_SPECTRA = np.stack([SPECTRA[m] for m in _MATERIALS]).astype(np.float32)  # (materials, bands)

# Land-cover codes of a scene map.
FIELD, GRASS, FOREST, ORCHARD, WATER, ROAD, URBAN = range(7)

# EuroSAT's 10 classes and the scene type each is dominated by.
EUROSAT_CLASSES: dict[str, str] = {
    "AnnualCrop": "fields",
    "Forest": "forest",
    "HerbaceousVegetation": "grassland",
    "Highway": "highway",
    "Industrial": "industrial",
    "Pasture": "pasture",
    "PermanentCrop": "orchard",
    "Residential": "residential",
    "River": "river",
    "SeaLake": "water",
}
SCENE_TYPES: tuple[str, ...] = ("mixed", *EUROSAT_CLASSES.values())


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1]: a (cells+1)^2 random grid bilinearly interpolated to size x size."""
    grid = rng.random((cells + 1, cells + 1))
    pos = np.linspace(0, cells, size)
    lo = np.minimum(pos.astype(int), cells - 1)
    frac = pos - lo
    interp = np.zeros((size, cells + 1))
    interp[np.arange(size), lo] = 1 - frac
    interp[np.arange(size), lo + 1] = frac
    return interp @ grid @ interp.T


def _parcels(rng: np.random.Generator, size: int, min_side: int) -> np.ndarray:
    """Partition the square into rectangular parcels by recursive random cuts; returns a parcel-id map."""
    ids = np.zeros((size, size), dtype=np.int32)
    boxes = [(0, size, 0, size)]
    next_id = 0
    while boxes:
        y0, y1, x0, x1 = boxes.pop()
        h, w = y1 - y0, x1 - x0
        if max(h, w) >= 2 * min_side and rng.random() < 0.85:
            if h >= w:
                cut = int(rng.integers(y0 + min_side, y1 - min_side + 1))
                boxes += [(y0, cut, x0, x1), (cut, y1, x0, x1)]
            else:
                cut = int(rng.integers(x0 + min_side, x1 - min_side + 1))
                boxes += [(y0, y1, x0, cut), (y0, y1, cut, x1)]
        else:
            ids[y0:y1, x0:x1] = next_id
            next_id += 1
    return ids


def _line_mask(rng: np.random.Generator, size: int, width: float, wiggle: float = 0.0) -> np.ndarray:
    """A straight (or, with ``wiggle``, meandering) band across the square, e.g. a road or a river."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    if wiggle:
        across = across + wiggle * size * np.sin(along / size * rng.uniform(4, 8) + rng.uniform(0, 2 * np.pi))
    return np.abs(across) < width / 2


def _blocks(rng: np.random.Generator, size: int, block: int, street: int) -> np.ndarray:
    """Street grid: True on built blocks, False on the streets between them."""
    offset = rng.integers(0, block + street, 2)
    yy, xx = np.mgrid[0:size, 0:size]
    return (((yy + offset[0]) % (block + street)) >= street) & (((xx + offset[1]) % (block + street)) >= street)


class Scene:
    """A fixed land-cover map with per-parcel crop calendars; ``render(day)`` gives its reflectance that day."""

    def __init__(self, kind: str, size: int, rng: np.random.Generator):
        if kind not in SCENE_TYPES:
            raise ValueError(f"unknown scene type {kind!r}; expected one of {', '.join(SCENE_TYPES)}")
        self.size = size
        self.rng = rng
        scale = size / SECO_SIZE_10M  # feature sizes are in metres, so they shrink with the patch side
        self.parcels = _parcels(rng, size, max(3, int(28 * scale)))
        n_parcels = int(self.parcels.max()) + 1
        # Crop calendar per parcel: day of peak greenness (winter cereals early, maize late), season width.
        self.peak_day = rng.uniform(100, 250, n_parcels)
        self.season_width = rng.uniform(35, 70, n_parcels)
        self.peak_green = rng.uniform(0.7, 1.0, n_parcels)
        self.deciduous = smooth_noise(rng, size, 4)  # 0 = conifer, 1 = broadleaf
        self.texture = smooth_noise(rng, size, max(2, int(12 * scale * 4))).astype(np.float32)
        self.grain = rng.standard_normal((size, size), dtype=np.float32)
        self.cover = self._compose(kind, scale)

    def _compose(self, kind: str, scale: float) -> np.ndarray:
        rng, size = self.rng, self.size
        cover = np.full((size, size), FIELD, dtype=np.int8)
        blob = smooth_noise(rng, size, 3)
        if kind == "mixed":
            cover[smooth_noise(rng, size, 3) > rng.uniform(0.55, 0.8)] = FOREST
            cover[(cover == FIELD) & (rng.random(int(self.parcels.max()) + 1)[self.parcels] < 0.2)] = GRASS
            if rng.random() < 0.5:
                cover[_line_mask(rng, size, rng.uniform(4, 12) * scale * 2, wiggle=0.05)] = WATER
            elif rng.random() < 0.5:
                cover[blob > 0.72] = WATER
            if rng.random() < 0.4:
                town = smooth_noise(rng, size, 2) > 0.7
                cover[town & _blocks(rng, size, max(2, int(10 * scale * 2)), max(1, int(2 * scale * 2)))] = URBAN
                cover[town & (cover != URBAN)] = ROAD
            for _ in range(rng.integers(0, 3)):
                cover[_line_mask(rng, size, max(1.5, 3 * scale * 2))] = ROAD
        elif kind == "fields":
            if rng.random() < 0.3:
                cover[_line_mask(rng, size, 1.5)] = ROAD
        elif kind == "forest":
            cover[:] = FOREST
            cover[blob > 0.8] = GRASS
        elif kind in ("grassland", "pasture"):
            cover[:] = GRASS
            if kind == "grassland":
                cover[smooth_noise(rng, size, 6) > 0.75] = FOREST
        elif kind == "orchard":
            yy, xx = np.mgrid[0:size, 0:size]
            period = int(rng.integers(3, 6))
            rows = ((xx if rng.random() < 0.5 else yy) % period) == 0
            cover[:] = np.where(rows, ORCHARD, GRASS)
        elif kind == "highway":
            cover[self.parcels % 3 == 0] = GRASS
            cover[_line_mask(rng, size, rng.uniform(4, 7))] = ROAD
        elif kind == "industrial":
            cover[:] = ROAD
            cover[_blocks(rng, size, int(rng.integers(12, 20)), int(rng.integers(3, 5)))] = URBAN
        elif kind == "residential":
            cover[:] = GRASS
            cover[_blocks(rng, size, int(rng.integers(4, 7)), 2)] = URBAN
            cover[_blocks(rng, size, 16, 2) == 0] = ROAD
        elif kind == "river":
            cover[self.parcels % 2 == 0] = GRASS
            cover[_line_mask(rng, size, rng.uniform(6, 12), wiggle=0.06)] = WATER
        elif kind == "water":
            cover[:] = WATER
            cover[blob > rng.uniform(0.75, 1.0)] = GRASS
        return cover

    def greenness(self, day: float) -> np.ndarray:
        """Vegetation fraction per pixel on ``day`` of the year (0 = bare, 1 = full canopy)."""
        summer = 0.5 - 0.5 * np.cos(2 * np.pi * (day - 15) / 365.0)  # 0 mid-January, 1 mid-July
        crop = self.peak_green * np.exp(-0.5 * ((day - self.peak_day) / self.season_width) ** 2)
        green = np.zeros((self.size, self.size))
        cover = self.cover
        green[cover == FIELD] = (0.05 + crop[self.parcels])[cover == FIELD]
        green[cover == GRASS] = (0.3 + 0.45 * summer + 0.1 * self.texture)[cover == GRASS]
        green[cover == FOREST] = (0.95 - 0.45 * self.deciduous * (1 - summer))[cover == FOREST]
        green[cover == ORCHARD] = 0.45 + 0.4 * summer
        green[cover == URBAN] = (0.15 * self.texture * (0.3 + summer))[cover == URBAN]
        return np.clip(green, 0.0, 1.0)

    def render(self, day: float) -> np.ndarray:
        """Reflectance (12, H, W) float32 of the scene on ``day``, with illumination and sensor noise."""
        green = self.greenness(day)
        cover = self.cover
        weights = np.zeros((len(_MATERIALS), self.size, self.size), dtype=np.float32)
        land = (cover != WATER) & (cover != ROAD) & (cover != URBAN)
        weights[_MATERIALS.index("vegetation")] = green
        weights[_MATERIALS.index("soil")] = np.where(land, 1 - green, 0)
        weights[_MATERIALS.index("urban")] = np.where(cover == URBAN, 1 - green, 0)
        weights[_MATERIALS.index("water")] = cover == WATER
        weights[_MATERIALS.index("asphalt")] = cover == ROAD
        reflectance = np.tensordot(_SPECTRA.T, weights, axes=1)
        # Canopy and soil texture (stronger in forest), per-acquisition illumination, sensor noise.
        amplitude = np.where(cover == FOREST, np.float32(0.25), np.float32(0.08))
        reflectance *= 1 + amplitude * (self.texture - 0.5) + 0.03 * self.grain
        reflectance *= np.float32(self.rng.uniform(0.9, 1.1))
        reflectance += 0.004 * self.rng.standard_normal(reflectance.shape, dtype=np.float32)
        return np.clip(reflectance, 0.0, 1.0).astype(np.float32)


def downsample(band: np.ndarray, factor: int) -> np.ndarray:
    """Block mean of an (H, W) band, i.e. what a coarser sensor pixel sees (10 m -> 20 m / 60 m)."""
    h, w = band.shape
    return band.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def to_uint8(reflectance: np.ndarray) -> np.ndarray:
    """SeCo's storage: clip(reflectance, 0, 1) * 255 as uint8."""
    return np.rint(np.clip(reflectance, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_rgb(reflectance: np.ndarray) -> np.ndarray:
    """(12, H, W) reflectance -> (H, W, 3) uint8 true colour with SeCo's quantile stretch (as the reader does)."""
    rgb = to_uint8(reflectance[[S2_BANDS.index(b) for b in RGB_BANDS]])
    return stretch_rgb(rgb).transpose(1, 2, 0)


def acquisition_days(rng: np.random.Generator, n: int) -> list[dt.datetime]:
    """``n`` morning acquisition times spread over one year (SeCo: one per season), randomly offset."""
    start = dt.datetime(2019, 1, 1, 10) + dt.timedelta(days=int(rng.integers(0, 365 // n)))
    return [
        start + dt.timedelta(days=k * (365 // n) + int(rng.integers(-10, 11)), seconds=int(rng.integers(0, 3600)))
        for k in range(n)
    ]


def _write_band(path: Path, band: np.ndarray, transform, crs: str) -> None:
    profile = {
        "driver": "GTiff",
        "width": band.shape[1],
        "height": band.shape[0],
        "count": 1,
        "dtype": "uint8",
        "crs": crs,
        "transform": transform,
        "compress": "JPEG",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(band, 1)


def write_seco_demo(
    root: str | Path, n_locations: int = 64, n_acquisitions: int = 5, seed: int = 0, print_freq: int = 16
) -> Path:
    """Write ``n_locations`` x ``n_acquisitions`` demo acquisitions in SeCo's band-folder layout under ``root``
    (progress with an ETA: a bar on a terminal, else a line every ``print_freq`` locations)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    size = SECO_SIZE_10M
    for loc in utils.Progress(range(n_locations), "SeCo demo locations", print_freq):
        zone = int(rng.integers(10, 60))
        tile = f"T{zone}{'CDEFGHJKLMNPQRSTUVWX'[int(rng.integers(0, 20))]}{''.join(rng.choice(list('ABCDEFGHJK'), 2))}"
        crs = f"EPSG:{32600 + zone}"
        left, top = float(rng.uniform(200_000, 800_000)), float(rng.uniform(1_000_000, 6_000_000))
        # Land cover varies from location to location, as in SeCo's sampling around cities and their surroundings:
        # mixed countryside or one dominant cover (the same kinds the EuroSAT demo's classes are drawn from).
        scene = Scene(SCENE_TYPES[int(rng.integers(len(SCENE_TYPES)))], size, rng)
        for when in acquisition_days(rng, n_acquisitions):
            product = when + dt.timedelta(seconds=int(rng.integers(5, 20)))
            acq_id = f"{when:%Y%m%dT%H%M%S}_{product:%Y%m%dT%H%M%S}_{tile}"
            folder = root / f"{loc:06d}" / acq_id
            folder.mkdir(parents=True, exist_ok=True)
            reflectance = scene.render(when.timetuple().tm_yday)
            for index, band in enumerate(S2_BANDS):
                factor = RESOLUTION_M[band] // 10
                res = RESOLUTION_M[band]
                values = to_uint8(downsample(reflectance[index], factor))
                _write_band(folder / f"{band}.tif", values, Affine(res, 0, left, 0, -res, top), crs)
            metadata = {
                "acquisition_id": acq_id,
                "sensing_time": when.isoformat(),
                "mgrs_tile": tile[1:],
                "crs": crs,
                "bands": list(S2_BANDS),
                "cloudy_pixel_percentage": 0.0,
                "synthetic": True,
            }
            utils.write_json(folder / "metadata.json", metadata)
    return root


def write_eurosat_demo(root: str | Path, n_per_class: int = 40, seed: int = 0) -> Path:
    """Write a labelled EuroSAT-RGB-layout demo (``root/2750/<Class>/<Class>_<n>.jpg``) and its split files.

    Splits are stratified 60/20/20 (the proportions of the published 16,200 / 5,400 / 5,400 lists), seeded.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for name, kind in EUROSAT_CLASSES.items():
        folder = root / "2750" / name
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for n in range(1, n_per_class + 1):
            scene = Scene(kind, EUROSAT_SIZE, rng)
            rgb = render_rgb(scene.render(float(rng.uniform(90, 280))))
            file_name = f"{name}_{n}.jpg"
            Image.fromarray(rgb).save(folder / file_name, quality=90)
            files.append(file_name)
        order = rng.permutation(len(files))
        n_train, n_val = round(0.6 * len(files)), round(0.2 * len(files))
        splits["train"] += [files[i] for i in order[:n_train]]
        splits["val"] += [files[i] for i in order[n_train : n_train + n_val]]
        splits["test"] += [files[i] for i in order[n_train + n_val :]]
    for split, files in splits.items():
        (root / f"eurosat-{split}.txt").write_text("".join(f + "\n" for f in files))
    return root


def main(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    start = time.time()
    write_seco_demo(out / "seco", args.n_locations, args.n_acquisitions, args.seed, args.print_freq)
    print(
        f"wrote {args.n_locations} locations x {args.n_acquisitions} acquisitions (12 bands) to {out / 'seco'} "
        f"({time.time() - start:.1f} s)",
        flush=True,
    )
    start = time.time()
    write_eurosat_demo(out / "eurosat", args.n_per_class, args.seed)
    print(
        f"wrote {len(EUROSAT_CLASSES)} classes x {args.n_per_class} images to {out / 'eurosat'} "
        f"({time.time() - start:.1f} s)",
        flush=True,
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Write synthetic SeCo and EuroSAT demo data", add_help=True)
    parser.add_argument("--output_dir", required=True, help="writes OUTPUT_DIR/seco and OUTPUT_DIR/eurosat")
    parser.add_argument("--n_locations", type=int, default=64, help="SeCo locations")
    parser.add_argument("--n_acquisitions", type=int, default=5, help="acquisitions (seasons) per location")
    parser.add_argument("--n_per_class", type=int, default=40, help="EuroSAT images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print_freq", type=int, default=16, help="off a terminal, a progress line every N locations")
    return parser


if __name__ == "__main__":
    parser = get_args_parser()
    parsed = parser.parse_args()
    for flag in ("n_locations", "n_acquisitions", "n_per_class"):
        if getattr(parsed, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(parsed, flag)}")
    main(parsed)
