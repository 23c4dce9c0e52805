"""OSCD (Onera Satellite Change Detection) reader: bi-temporal Sentinel-2 city pairs cut into tiles.

Dataset: R. Caye Daudt, B. Le Saux, A. Boulch, Y. Gousseau, "Urban Change Detection for Multispectral Earth
Observation Using Convolutional Neural Networks", IGARSS 2018 (https://rcdaudt.github.io/oscd/).

On-disk format, either the archive names or the layout the published DINO-MC code expected::

    <root>/Onera Satellite Change Detection dataset - Images/<city>/...   or  <root>/images/<city>/...
    <root>/Onera Satellite Change Detection dataset - Train Labels/<city>/cm/cm.png  or  <root>/train_labels/...
    <root>/Onera Satellite Change Detection dataset - Test Labels/<city>/cm/cm.png   or  <root>/val_labels/...

- City lists: ``train.txt`` / ``test.txt`` (one comma-separated line) in the images folder, else in ``root``.
  Copies made by other tools (torchgeo's among them) may have no lists: the cities of a split are then the city
  folders of its labels folder (``Train Labels`` / ``Test Labels``), and ``list_file`` is None so a script can
  say so.
- Images: ``<city>/imgs_1_rect/`` and ``imgs_2_rect/`` hold ``B01.tif .. B12.tif`` and ``B8A.tif`` (uint16 L1C,
  reflectance x 10000), all co-registered on the 10 m grid. Without them the raw ``imgs_1/``, ``imgs_2/``
  (``<product prefix>B01.tif`` .. at native 10/20/60 m resolution) are read and bilinearly brought to the grid
  of the 10 m band B02.
- Labels: ``cm/cm.png`` (0 no change, > 0 change), else ``cm/<city>-cm.tif`` (1 no change, 2 change).

Normalisation (float32 in [0, 1]): B4, B3, B2 use the SeCo/DINO-MC quantile stretch (:data:`OSCD_RGB_STRETCH`);
every other band is read as reflectance (value / 10000) and stretched over [mean - 2 std, mean + 2 std] of the
EuroSAT L1C statistics (the same sensor product), mirroring the BigEarthNet stretch.

Each city is cut into non-overlapping ``tile_size`` tiles covering it entirely; edge tiles are zero-padded and
carry a ``mask`` of valid pixels so metrics ignore the padding. Items are dicts::

    {"img1": float (C, T, T), "img2": float (C, T, T), "label": float (1, T, T) 1 = change,
     "mask": bool (1, T, T) True = real pixel, "city": str, "row": int, "col": int}

``row``/``col`` are the tile's top-left pixel in the city image; with :meth:`OSCD.city_shape` and
:func:`stitch_tiles` per-tile predictions become a full-size change map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets import DataError
from datasets.bands import parse_bands, two_std_range
from datasets.eurosat import EUROSAT_MS_MEAN_STD
from datasets.io import read_band, stack_bands

ARCHIVE_IMAGES = "Onera Satellite Change Detection dataset - Images"
ARCHIVE_LABELS = {
    "train": "Onera Satellite Change Detection dataset - Train Labels",
    "test": "Onera Satellite Change Detection dataset - Test Labels",
}
DINOMC_IMAGES = "images"
DINOMC_LABELS = {"train": "train_labels", "test": "val_labels"}
SPLITS = ("train", "test")

# SeCo / DINO-MC 2%-98% quantile stretch of the OSCD RGB bands (uint16 L1C values).
OSCD_RGB_STRETCH: dict[str, tuple[float, float]] = {"B4": (426.0, 3698.0), "B3": (667.0, 2969.0), "B2": (885.0, 2620.0)}


def band_stretch(band: str) -> tuple[float, float]:
    """Raw-value range (low, high) mapped to [0, 1]: SeCo's quantiles for RGB, else EuroSAT L1C mean +- 2 std."""
    if band in OSCD_RGB_STRETCH:
        return OSCD_RGB_STRETCH[band]
    return two_std_range(band, EUROSAT_MS_MEAN_STD)


def normalize(stack: np.ndarray, bands: list[str]) -> np.ndarray:
    """Stretch a raw (C, H, W) stack band by band to float32 [0, 1] (see :func:`band_stretch`)."""
    out = np.empty(stack.shape, dtype=np.float32)
    for i, band in enumerate(bands):
        low, high = band_stretch(band)
        out[i] = np.clip((stack[i].astype(np.float32) - low) / (high - low), 0.0, 1.0)
    return out


def band_file_name(band: str) -> str:
    """OSCD's zero-padded band name: ``B1`` -> ``B01``, ``B8A`` -> ``B8A``."""
    return band if band == "B8A" else f"B{int(band[1:]):02d}"


def stitch_tiles(tiles: torch.Tensor, rows: list[int], cols: list[int], shape: tuple[int, int]) -> torch.Tensor:
    """Assemble tiles (N, ..., T, T) whose top-left pixels are (rows, cols) into one (..., H, W) map.

    Padding beyond the city's edge is dropped, so the result has exactly the city's size.
    """
    height, width = shape
    size = tiles.shape[-1]
    out = tiles.new_zeros((*tiles.shape[1:-2], height, width))
    for tile, row, col in zip(tiles, rows, cols):
        h, w = min(size, height - row), min(size, width - col)
        out[..., row : row + h, col : col + w] = tile[..., :h, :w]
    return out


def _first_dir(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def _read_city_list(path: Path) -> list[str]:
    """Cities of ``train.txt`` / ``test.txt``: one comma-separated line (extra newlines tolerated)."""
    return [c.strip() for c in path.read_text().replace("\n", ",").split(",") if c.strip()]


def find_folders(root: Path, split: str) -> tuple[Path, Path]:
    """The images folder and the labels folder of ``split`` (archive names, else the DINO-MC ones)."""
    image_dir = _first_dir(root / ARCHIVE_IMAGES, root / DINOMC_IMAGES)
    if image_dir is None:
        raise DataError(f"no OSCD images in {root}: expected '{ARCHIVE_IMAGES}/' or '{DINOMC_IMAGES}/'")
    label_dir = _first_dir(root / ARCHIVE_LABELS[split], root / DINOMC_LABELS[split])
    if label_dir is None:
        raise DataError(
            f"no OSCD {split} labels in {root}: expected '{ARCHIVE_LABELS[split]}/' or '{DINOMC_LABELS[split]}/'"
        )
    return image_dir, label_dir


def split_cities(root: str | Path, split: str) -> tuple[list[str], Path | None]:
    """The cities of ``split`` and the list they come from: ``<split>.txt`` in the images folder or ``root``,
    else (None) the city folders of the split's labels folder, sorted."""
    root = Path(root)
    image_dir, label_dir = find_folders(root, split)
    list_file = next((d / f"{split}.txt" for d in (image_dir, root) if (d / f"{split}.txt").is_file()), None)
    if list_file is not None:
        cities = _read_city_list(list_file)
        if not cities:
            raise DataError(f"{list_file} is empty; expected a comma-separated list of cities")
        return cities, list_file
    cities = sorted(p.name for p in label_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not cities:
        raise DataError(
            f"no {split}.txt in {image_dir} or {root}, and {label_dir} has no city folders to take the cities from"
        )
    return cities, None


class OSCD(torch.utils.data.Dataset):
    """OSCD train or test cities as tiles of both dates plus the change label (see the module docstring).

    All cities of the split are loaded and normalised once at construction: OSCD is small (24 cities of about
    600x600 px), and tiling then costs nothing per item. ``cities`` restricts the split to some of its cities
    (e.g. train cities held out for validation). ``augment=True`` applies one random flip / 90-degree rotation
    per item identically to both dates, the label and the mask, so the pair stays aligned.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        bands: str | list[str] | None = None,
        tile_size: int = 96,
        augment: bool = False,
        cities: list[str] | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"OSCD split must be one of {', '.join(SPLITS)}, got {split!r}")
        if tile_size < 1:
            raise ValueError(f"--tile_size must be positive, got {tile_size}")
        self.root = Path(root)
        self.split = split
        self.bands = parse_bands(bands)
        self.tile_size = tile_size
        self.augment = augment

        self.image_dir, self.label_dir = find_folders(self.root, split)
        split_list, self.list_file = split_cities(self.root, split)
        source = self.list_file if self.list_file is not None else self.label_dir
        if cities is not None:
            unknown = [c for c in cities if c not in split_list]
            if unknown or not cities:
                raise DataError(
                    f"OSCD {split} cities {','.join(unknown) or '(none)'} asked, but the {split} cities of {source} "
                    f"are {','.join(split_list)}"
                )
        self.cities = list(cities) if cities is not None else split_list

        self.images: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.labels: dict[str, torch.Tensor] = {}
        self.tiles: list[tuple[str, int, int]] = []
        for city in self.cities:
            city_dir = self.image_dir / city
            if not city_dir.is_dir():
                raise DataError(f"{source} names city {city!r} but {city_dir} does not exist")
            img1, img2 = self._load_date(city_dir, 1), self._load_date(city_dir, 2)
            if img1.shape != img2.shape:
                raise DataError(f"{city_dir}: date 1 is {img1.shape[1:]} but date 2 is {img2.shape[1:]} pixels")
            label = self._load_label(city, img1.shape[1:])
            self.images[city] = (torch.from_numpy(img1), torch.from_numpy(img2))
            self.labels[city] = torch.from_numpy(label)[None]
            height, width = img1.shape[1:]
            self.tiles += [(city, r, c) for r in range(0, height, tile_size) for c in range(0, width, tile_size)]

    def _load_date(self, city_dir: Path, date: int) -> np.ndarray:
        """Normalised (C, H, W) stack of one date, from ``imgs_<date>_rect`` or else the raw ``imgs_<date>``."""
        rect = city_dir / f"imgs_{date}_rect"
        if rect.is_dir():
            arrays = []
            for band in self.bands:
                path = rect / f"{band_file_name(band)}.tif"
                if not path.is_file():
                    raise DataError(f"missing band file {path}")
                arrays.append(read_band(path))
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1:
                raise DataError(f"{rect}: bands differ in size ({sorted(shapes)}); expected one 10 m grid")
            return normalize(np.stack(arrays), self.bands)
        raw = city_dir / f"imgs_{date}"
        if not raw.is_dir():
            raise DataError(f"{city_dir} has neither imgs_{date}_rect/ nor imgs_{date}/")
        arrays = [read_band(self._raw_band_path(raw, band)) for band in self.bands]
        grid = read_band(self._raw_band_path(raw, "B2")).shape
        return normalize(stack_bands(arrays, grid), self.bands)

    @staticmethod
    def _raw_band_path(raw: Path, band: str) -> Path:
        """The one ``<product prefix><band>.tif`` of a raw folder."""
        matches = sorted(raw.glob(f"*{band_file_name(band)}.tif"))
        if len(matches) != 1:
            found = "no" if not matches else f"{len(matches)}"
            raise DataError(f"missing band file {raw}/*{band_file_name(band)}.tif ({found} match, expected 1)")
        return matches[0]

    def _load_label(self, city: str, shape: tuple[int, int]) -> np.ndarray:
        """Float32 (H, W) change mask from ``cm/cm.png`` (> 0) or ``cm/<city>-cm.tif`` (== 2), size-checked."""
        png = self.label_dir / city / "cm" / "cm.png"
        tif = self.label_dir / city / "cm" / f"{city}-cm.tif"
        if png.is_file():
            path = png
            try:
                with Image.open(png) as img:
                    change = np.asarray(img.convert("L")) > 0
            except OSError as err:
                raise DataError(f"cannot read label {png}: {err}") from None
        elif tif.is_file():
            path = tif
            change = read_band(tif) == 2
        else:
            raise DataError(f"missing change label for {city}: expected {png} or {tif}")
        if change.shape != tuple(shape):
            raise DataError(
                f"label {path} is {change.shape[0]}x{change.shape[1]} (HxW) but the images of {city} are "
                f"{shape[0]}x{shape[1]}"
            )
        return change.astype(np.float32)

    def city_shape(self, city: str) -> tuple[int, int]:
        """(H, W) of a city's images, the size of the map :func:`stitch_tiles` rebuilds."""
        return tuple(self.labels[city].shape[-2:])

    def __len__(self) -> int:
        return len(self.tiles)

    def _crop(self, array: torch.Tensor, row: int, col: int) -> torch.Tensor:
        """(C, T, T) window at (row, col), zero-padded past the city's bottom/right edge."""
        size = self.tile_size
        window = array[:, row : row + size, col : col + size]
        out = array.new_zeros((array.shape[0], size, size))
        out[:, : window.shape[1], : window.shape[2]] = window
        return out

    def __getitem__(self, index: int) -> dict:
        city, row, col = self.tiles[index]
        img1, img2 = self.images[city]
        label = self.labels[city]
        item = {name: self._crop(a, row, col) for name, a in (("img1", img1), ("img2", img2), ("label", label))}
        height, width = label.shape[-2:]
        item["mask"] = torch.zeros((1, self.tile_size, self.tile_size), dtype=torch.bool)
        item["mask"][:, : height - row, : width - col] = True
        if self.augment:
            turns = int(torch.randint(4, ()))
            flip = bool(torch.rand(()) < 0.5)
            for name, array in item.items():
                array = torch.rot90(array, turns, dims=(-2, -1))
                item[name] = array.flip(-1) if flip else array
        item.update(city=city, row=row, col=col)
        return item
