"""Writers of tiny EuroSAT (RGB and MS) and OSCD datasets in their exact published on-disk layouts, and of
BigEarthNet split lists under every published naming.

Neither dataset can be downloaded on the build machines, so the readers are tested on fixtures that follow
the real archives file for file (docs/data.md): GeoTIFFs written with rasterio
(georeferenced, uint16 Sentinel-2 L1C values around the real band means), JPEG/PNG with PIL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from rasterio.transform import Affine

from datasets.bands import RESOLUTION_M
from datasets.eurosat import EUROSAT_MS_MEAN_STD, MS_FILE_BANDS, MS_SUBDIR, RGB_SUBDIR
from datasets.oscd import ARCHIVE_IMAGES, ARCHIVE_LABELS, DINOMC_IMAGES, DINOMC_LABELS, band_file_name
from tests.fixtures import write_tif

# Bands of the OSCD rect folders, in the order of the archive (B01..B12 incl. B10, then B8A).
OSCD_BANDS: tuple[str, ...] = MS_FILE_BANDS

# Typical L1C levels (reflectance x 10000) per band: EuroSAT's means, with B4/B3/B2 chosen so that both dates of
# the OSCD fixture (level x 0.75..1.25, x 1.3 where changed) stay strictly inside the SeCo RGB stretch: no pixel
# saturates, so every change stays visible after normalisation.
L1C_LEVEL: dict[str, float] = {band: mean for band, (mean, _) in EUROSAT_MS_MEAN_STD.items()}
L1C_LEVEL.update(B4=1500.0, B3=1300.0, B2=1300.0)

# Change factor applied to date 2 inside the OSCD change region.
CHANGE_FACTOR = 1.3
OSCD_RAW_PREFIX = "S2A_OPER_MSI_L1C_TL_SGS__20160310T101544_A003752_T31UDQ_"


def write_geotiff(path: Path, array: np.ndarray, resolution: float = 10.0) -> Path:
    """Write a (C, H, W) or (H, W) array as a georeferenced GeoTIFF in UTM 31N, in the array's dtype."""
    transform = Affine(resolution, 0.0, 400000.0, 0.0, -resolution, 5400000.0)
    return write_tif(path, array, crs="EPSG:32631", transform=transform)


def class_colour(index: int) -> tuple[int, int, int]:
    """A distinct flat RGB colour per class index, so a test can tell which class an image came from."""
    return 40 + 20 * index, 120, 220 - 15 * index


def write_eurosat_rgb(root: Path, counts: dict[str, int], subdir: str | Path = RGB_SUBDIR, size: int = 64) -> Path:
    """``<root>/<subdir>/<Class>/<Class>_<n>.jpg`` (n from 1), each a flat colour of its sorted class index."""
    folder = Path(root) / subdir
    for index, cls in enumerate(sorted(counts)):
        for n in range(1, counts[cls] + 1):
            path = folder / cls / f"{cls}_{n}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (size, size), class_colour(index)).save(path, quality=95)
    return folder


# The classes of write_textured_rgb's archive.
TEXTURED_CLASSES = ("AnnualCrop", "Forest", "SeaLake")


def write_textured_rgb(root: Path, per_class: int = 20) -> Path:
    """The RGB archive layout with a distinct colour per class plus noise (textured, unlike flat fixtures)."""
    rng = np.random.default_rng(0)
    for index, cls in enumerate(TEXTURED_CLASSES):
        for n in range(1, per_class + 1):
            path = root / RGB_SUBDIR / cls / f"{cls}_{n}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            colour = np.array(class_colour(3 * index), dtype=np.float64)
            pixels = np.clip(colour + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=95)
    return root


def write_eurosat_ms(
    root: Path,
    counts: dict[str, int],
    subdir: str | Path = MS_SUBDIR,
    size: int = 64,
    band_values: dict[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """``<root>/<subdir>/<Class>/<Class>_<n>.tif``: 13-band uint16 in EuroSAT's file order (B8A last).

    By default each band is L1C-like noise around its EuroSAT mean; ``band_values`` (canonical band -> value)
    instead fills each band with one constant, which makes any band-order mix-up visible.
    """
    folder = Path(root) / subdir
    rng = np.random.default_rng(seed)
    for cls in sorted(counts):
        for n in range(1, counts[cls] + 1):
            stack = np.empty((len(MS_FILE_BANDS), size, size), dtype=np.uint16)
            for i, band in enumerate(MS_FILE_BANDS):
                if band_values is not None:
                    stack[i] = band_values[band]
                else:
                    mean, std = EUROSAT_MS_MEAN_STD[band]
                    stack[i] = np.clip(rng.normal(mean, std / 4, (size, size)), 0, 65535).astype(np.uint16)
            write_geotiff(folder / cls / f"{cls}_{n}.tif", stack)
    return folder


def write_eurosat_split_files(root: Path, split: dict[str, list[str]]) -> None:
    """``<root>/eurosat-<name>.txt`` with one file name per line, as distributed with SeCo."""
    for name, files in split.items():
        (Path(root) / f"eurosat-{name}.txt").write_text("".join(f"{f}\n" for f in files))


def oscd_change_region(shape: tuple[int, int]) -> np.ndarray:
    """Boolean change mask of a fixture city: an off-centre rectangle, asymmetric under flips and rotations."""
    height, width = shape
    change = np.zeros(shape, dtype=bool)
    change[height // 5 : height // 2, width // 6 : (2 * width) // 3] = True
    return change


def oscd_band(band: str, shape: tuple[int, int], date: int) -> np.ndarray:
    """Full-resolution uint16 values of one band and date: a level x a spatial ramp in [0.75, 1.25) (no flip or
    rotation maps it onto itself), multiplied by :data:`CHANGE_FACTOR` on date 2 inside the change region."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    ramp = 0.75 + ((7 * rows + 3 * cols) % 1000) / 2000.0
    values = L1C_LEVEL[band] * ramp
    if date == 2:
        values = np.where(oscd_change_region(shape), values * CHANGE_FACTOR, values)
    return np.rint(values).astype(np.uint16)


def write_oscd(
    root: Path,
    cities: dict[str, tuple[int, int]],
    train: list[str],
    test: list[str],
    layout: str = "archive",
    rect: bool = True,
    raw: bool = False,
    label_format: str = "png",
) -> Path:
    """Write an OSCD copy; returns the images folder.

    ``layout`` "archive" uses the zip names (``Onera Satellite Change Detection dataset - Images`` ...),
    "dinomc" the ``images/``, ``train_labels/``, ``val_labels/`` folders of the DINO-MC code. ``rect`` writes
    ``imgs_<d>_rect/B01.tif..`` on the 10 m grid; ``raw`` writes ``imgs_<d>/<prefix>B01.tif..`` at native
    resolution (20 m / 60 m bands subsampled). ``label_format`` "png" writes ``cm/cm.png`` (0 / 255),
    "tif" only ``cm/<city>-cm.tif`` (1 / 2).
    """
    root = Path(root)
    image_dir = root / (ARCHIVE_IMAGES if layout == "archive" else DINOMC_IMAGES)
    label_dirs = ARCHIVE_LABELS if layout == "archive" else DINOMC_LABELS
    image_dir.mkdir(parents=True, exist_ok=True)
    (image_dir / "train.txt").write_text(",".join(train))
    (image_dir / "test.txt").write_text(",".join(test))
    for city, shape in cities.items():
        city_dir = image_dir / city
        (city_dir / "dates.txt").parent.mkdir(parents=True, exist_ok=True)
        (city_dir / "dates.txt").write_text("date_1: 20151024\ndate_2: 20170911\n")
        for date in (1, 2):
            for band in OSCD_BANDS:
                values = oscd_band(band, shape, date)
                if rect:
                    write_geotiff(city_dir / f"imgs_{date}_rect" / f"{band_file_name(band)}.tif", values)
                if raw:
                    step = RESOLUTION_M[band] // 10
                    name = f"{OSCD_RAW_PREFIX}{band_file_name(band)}.tif"
                    write_geotiff(city_dir / f"imgs_{date}" / name, values[::step, ::step], RESOLUTION_M[band])
        change = oscd_change_region(shape)
        split = "train" if city in train else "test"
        cm_dir = root / label_dirs[split] / city / "cm"
        cm_dir.mkdir(parents=True, exist_ok=True)
        if label_format == "png":
            Image.fromarray(change.astype(np.uint8) * 255).save(cm_dir / "cm.png")
        else:
            write_geotiff(cm_dir / f"{city}-cm.tif", change.astype(np.uint8) + 1)
    return image_dir


def s1_partner(s2_patch: str) -> str:
    """A Sentinel-1 patch name in the official pairing style (``S1A_IW_GRDH_1SDV_<date>T<time>_<tile>_<h>_<v>``)."""
    date, h, v = s2_patch.split("_")[2][:8], *s2_patch.split("_")[-2:]
    return f"S1A_IW_GRDH_1SDV_{date}T165043_33UUP_{h}_{v}"


def write_bigearthnet_lists(
    folder: Path, splits: dict[str, list[str]], pattern: str, columns: str = "s2", header: bool = False
) -> list[Path]:
    """Split lists ``folder/<pattern with {split}>`` as other tools leave them: ``pattern`` e.g. "{split}.csv"
    (official), "bigearthnet-{split}.csv" (torchgeo's downloader), "bigearthnet-{split}.txt" (SeCo);
    ``columns`` "s2" (one name per line), "s2,s1" (the official / torchgeo pairs) or "s1,s2"; ``header`` adds
    a first line of column names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for split, patches in splits.items():
        rows = []
        for patch in patches:
            pair = {"s2": patch, "s1": s1_partner(patch)}
            rows.append(",".join(pair[c] for c in columns.split(",")))
        head = [columns.replace("s2", "S2 name").replace("s1", "S1 name")] if header else []
        path = folder / pattern.format(split=split)
        path.write_text("".join(f"{row}\n" for row in head + rows))
        written.append(path)
    return written
