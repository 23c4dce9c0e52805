"""EuroSAT reader (RGB JPEGs and 13-band multispectral GeoTIFFs) for k-NN, linear and fine-tuning evaluation.

Dataset: P. Helber, B. Bischke, A. Dengel, D. Borth, "EuroSAT: A Novel Dataset and Deep Learning Benchmark for
Land Use and Land Cover Classification", IEEE JSTARS 12(7), 2019 (https://github.com/phelber/EuroSAT).

On-disk formats, as unpacked from the published archives (detected automatically, ``root`` may point at the
folder holding the archive folder or directly at the folder of class folders):

- RGB, ``EuroSAT.zip``: ``<root>/2750/<Class>/<Class>_<n>.jpg``, 64x64 8-bit JPEG (bands B4, B3, B2).
- MS, ``EuroSATallBands.zip``: ``<root>/ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/<Class>_<n>.tif``,
  64x64, 13 bands uint16 Sentinel-2 L1C (reflectance x 10000) in the file order
  B01 B02 B03 B04 B05 B06 B07 B08 B09 B10 B11 B12 B8A -- B8A is the LAST band, not the ninth.
- 10 classes; the class index is the position of the folder name in sorted order.

Splits, in order of precedence:

1. DINO-style ImageFolder: ``<root>/train/<Class>/*`` and ``<root>/val/<Class>/*`` (and ``<root>/test`` if present).
2. SeCo/DINO-MC split files ``<root>/eurosat-{train,val,test}.txt``, one file name per line (``Forest_1.jpg``);
   names are matched by stem, so the RGB lists also select the ``.tif`` files of the MS archive.
3. Neither: a stratified 60/20/20 split drawn from ``seed`` (:func:`make_stratified_split`); it is kept in
   ``EuroSAT.generated_split`` so a script can write it next to its results with :func:`save_split`.

A split with no image (an empty ``val/`` folder, a generated split of a folder too small to share out) is a
DataError naming the split and the folder: every script then stops with that one line, instead of dividing by
zero (k-NN) or reporting the NaN loss of an empty evaluation.

Items are ``(image, label)``: RGB images are uint8 tensors (3, H, W); MS images are the raw uint16 values as
float32 tensors (C, H, W) in the order of ``bands``, to be scaled with :func:`normalize`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets import DataError
from datasets.bands import RGB_BANDS, canonical_band, parse_bands
from datasets.io import GEOTIFF_EXTENSIONS, read_raster

RGB_SUBDIR = Path("2750")
MS_SUBDIR = Path("ds/images/remote_sensing/otherDatasets/sentinel_2/tif")
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)

RGB_EXTENSIONS = (".jpg", ".jpeg", ".png")


# Band order inside the EuroSAT MS GeoTIFFs (canonical names). B8A comes last, after B12.
MS_FILE_BANDS: tuple[str, ...] = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11", "B12", "B8A")

# Per-band mean and std of the EuroSAT MS archive (uint16 L1C values), as published with the TorchGeo
# EuroSAT datamodule (computed in the file order above). L1C includes the atmosphere, so L2A statistics
# such as BigEarthNet's would put every band off-centre; these are the matching ones.
EUROSAT_MS_MEAN_STD: dict[str, tuple[float, float]] = {
    "B1": (1354.40546513, 245.71762908),
    "B2": (1118.24399958, 333.00778264),
    "B3": (1042.92983953, 395.09249139),
    "B4": (947.62620298, 593.75055589),
    "B5": (1199.47283961, 566.41700170),
    "B6": (1999.79090914, 861.18399006),
    "B7": (2369.22292565, 1086.63139075),
    "B8": (2296.82608323, 1117.98170791),
    "B9": (732.08340178, 404.91978886),
    "B10": (12.11327804, 4.77584468),
    "B11": (1819.01027855, 1002.58768311),
    "B12": (1118.92391149, 761.30323499),
    "B8A": (2594.14080798, 1231.58581042),
}


def normalize(image: torch.Tensor, bands: list[str] | tuple[str, ...]) -> torch.Tensor:
    """Standardise an MS image (..., C, H, W) of raw L1C values band by band with :data:`EUROSAT_MS_MEAN_STD`.

    Per-band z-scores keep every band on a comparable scale (B10 is ~12, B8A ~2600), which a network
    trained from ImageNet-normalised inputs expects; ``bands`` is the order the image was read in.
    """
    names = [canonical_band(b) for b in bands]
    if image.shape[-3] != len(names):
        raise ValueError(f"image has {image.shape[-3]} bands but {len(names)} band names were given")
    mean = torch.tensor([EUROSAT_MS_MEAN_STD[b][0] for b in names], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor([EUROSAT_MS_MEAN_STD[b][1] for b in names], dtype=torch.float32).view(-1, 1, 1)
    return (image.float() - mean) / std


def make_stratified_split(files_by_class: dict[str, list[str]], seed: int) -> dict[str, list[str]]:
    """Split each class 60/20/20 into train/val/test file names, reproducibly from ``seed``.

    Stratifying keeps the class balance of the official lists (16,200 / 5,400 / 5,400 of 27,000); classes and
    files are visited in sorted order, so the result depends only on the file names and the seed.
    """
    rng = np.random.default_rng(seed)
    split: dict[str, list[str]] = {name: [] for name in SPLITS}
    for cls in sorted(files_by_class):
        files = sorted(files_by_class[cls])
        order = rng.permutation(len(files))
        n_train = round(SPLIT_FRACTIONS[0] * len(files))
        n_val = round(SPLIT_FRACTIONS[1] * len(files))
        split["train"] += [files[i] for i in order[:n_train]]
        split["val"] += [files[i] for i in order[n_train : n_train + n_val]]
        split["test"] += [files[i] for i in order[n_train + n_val :]]
    return {name: sorted(files) for name, files in split.items()}


def save_split(split: dict[str, list[str]], output_dir: str | Path) -> list[Path]:
    """Write ``eurosat-{train,val,test}.txt`` (the format the reader accepts) so a generated split can be reused."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, files in split.items():
        path = output_dir / f"eurosat-{name}.txt"
        path.write_text("".join(f"{f}\n" for f in files))
        written.append(path)
    return written


def _scan_class_folders(folder: Path) -> dict[str, list[str]]:
    """Map each sub-folder name to the image file names it holds (RGB or MS extensions); {} if none."""
    if not folder.is_dir():
        return {}
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(f.name for f in sub.iterdir() if f.suffix.lower() in RGB_EXTENSIONS + GEOTIFF_EXTENSIONS)
        if files:
            found[sub.name] = files
    return found


def _find_image_folder(root: Path) -> tuple[Path, dict[str, list[str]]]:
    """Locate the folder of class folders: the RGB archive folder, the MS archive folder, or ``root`` itself."""
    for candidate in (root / RGB_SUBDIR, root / MS_SUBDIR, root):
        found = _scan_class_folders(candidate)
        if found:
            return candidate, found
    raise DataError(
        f"no EuroSAT class folders under {root}: expected {root / RGB_SUBDIR}/<Class>/*.jpg, "
        f"{root / MS_SUBDIR}/<Class>/*.tif, {root}/<Class>/* or {root}/train/<Class>/*"
    )


def _read_split_file(path: Path, files_by_class: dict[str, list[str]], image_folder: Path) -> list[tuple[str, str]]:
    """Resolve the names in a split file to (class, file name), matching by stem so .jpg lists fit .tif files."""
    by_stem = {cls: {Path(f).stem: f for f in files} for cls, files in files_by_class.items()}
    selected = []
    for line in path.read_text().splitlines():
        name = line.strip()
        if not name:
            continue
        stem = Path(name).stem
        cls = stem.rsplit("_", 1)[0]
        if stem not in by_stem.get(cls, {}):
            raise DataError(f"{path} lists {name} but there is no {image_folder}/{cls}/{stem}.* image")
        selected.append((cls, by_stem[cls][stem]))
    if not selected:
        raise DataError(f"split file {path} is empty; expected one image file name per line")
    return selected


class EuroSAT(torch.utils.data.Dataset):
    """EuroSAT RGB or MS, one split; items are (image tensor, class index).

    ``bands`` (``--bands`` syntax, default RGB) selects MS bands in the order asked, mapped to the file's
    B8A-last order; the RGB JPEGs only hold B4, B3, B2. ``seed`` drives the stratified split that is made
    only when the dataset ships without splits.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        bands: str | list[str] | None = None,
        transform: Callable | None = None,
        seed: int = 0,
    ):
        if split not in SPLITS:
            raise ValueError(f"EuroSAT split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.bands = parse_bands(bands)
        self.generated_split: dict[str, list[str]] | None = None

        if (self.root / "train").is_dir() and (self.root / "val").is_dir():
            self._init_from_split_folders()
        else:
            self._init_from_archive_folder(seed)

        extensions = {Path(path).suffix.lower() for path, _ in self.samples}
        if extensions <= set(GEOTIFF_EXTENSIONS):
            self.multispectral = True
        elif extensions <= set(RGB_EXTENSIONS):
            self.multispectral = False
        else:
            raise DataError(f"{self.root} mixes JPEG and GeoTIFF images; expected the RGB or the MS archive")
        if not self.multispectral and tuple(self.bands) != RGB_BANDS:
            raise ValueError(
                f"--bands {','.join(self.bands)} needs the EuroSAT MS GeoTIFFs; {self.root} holds RGB images (B4,B3,B2)"
            )
        self.band_indexes = [MS_FILE_BANDS.index(b) for b in self.bands] if self.multispectral else None
        self.targets = [label for _, label in self.samples]

    def _init_from_split_folders(self) -> None:
        """DINO-style ``root/<split>/<Class>/*``: classes are the union of the split folders' class names."""
        folder = self.root / self.split
        if not folder.is_dir():
            raise DataError(f"{folder} does not exist; this EuroSAT copy only has {self.root}/train and /val")
        class_names = set()
        for name in SPLITS:
            class_names |= set(_scan_class_folders(self.root / name))
        self.classes = sorted(class_names)
        files_by_class = _scan_class_folders(folder)
        if not files_by_class:
            raise DataError(f"the EuroSAT {self.split} split of {self.root} is empty: {folder} has no images")
        self.samples = [
            (str(folder / cls / f), self.classes.index(cls))
            for cls in sorted(files_by_class)
            for f in files_by_class[cls]
        ]

    def _init_from_archive_folder(self, seed: int) -> None:
        """One folder of class folders, split by ``eurosat-<split>.txt`` or by a seeded stratified split."""
        image_folder, files_by_class = _find_image_folder(self.root)
        self.classes = sorted(files_by_class)
        split_file = self.root / f"eurosat-{self.split}.txt"
        if split_file.is_file():
            selected = _read_split_file(split_file, files_by_class, image_folder)
        elif any((self.root / f"eurosat-{name}.txt").is_file() for name in SPLITS):
            # A seeded split next to official lists could overlap them: refuse rather than leak test images.
            raise DataError(f"{split_file} is missing while other eurosat-*.txt split files exist in {self.root}")
        else:
            self.generated_split = make_stratified_split(files_by_class, seed)
            selected = [(f.rsplit("_", 1)[0], f) for f in self.generated_split[self.split]]
            if not selected:
                raise DataError(
                    f"the EuroSAT {self.split} split of {image_folder} is empty: without split files the seeded "
                    f"60/20/20 split of {sum(map(len, files_by_class.values()))} images gives it none (every split "
                    f"gets one from 4 per class); give eurosat-{{train,val,test}}.txt lists or train/ and val/ folders"
                )
        self.samples = [(str(image_folder / cls / f), self.classes.index(cls)) for cls, f in selected]

    def __len__(self) -> int:
        return len(self.samples)

    def input_normalization(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """How this copy's images are normalised for a network, the one choice every script makes: RGB JPEGs
        are uint8 and take the transforms' ImageNet statistics (None), MS GeoTIFFs are raw L1C values and take
        EuroSAT's own per-band statistics (:func:`normalize`), also when only B4, B3, B2 are read from them."""
        return functools.partial(normalize, bands=list(self.bands)) if self.multispectral else None

    def load_image(self, path: str) -> torch.Tensor:
        """Read one image: uint8 (3, H, W) from a JPEG, or float32 (C, H, W) raw L1C values from an MS GeoTIFF."""
        if not self.multispectral:
            try:
                with Image.open(path) as img:
                    array = np.asarray(img.convert("RGB"))
            except OSError as err:
                raise DataError(f"cannot read image {path}: {err}") from None
            return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
        stack = read_raster(path)
        if stack.shape[0] != len(MS_FILE_BANDS):
            raise DataError(f"{path} has {stack.shape[0]} bands; expected the 13 bands of EuroSAT MS")
        return torch.from_numpy(stack[self.band_indexes].astype(np.float32))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = self.load_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label
