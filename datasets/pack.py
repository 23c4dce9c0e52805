"""A SeCo tree packed into one memory-mapped uint8 file, for fast random access (written by ``prepare_data.py``).

Reading a SeCo sample from the tree opens and decodes one JPEG-compressed GeoTIFF per band (about 1 ms each:
12 ms of a worker's time per 12-band sample) and upsamples the 20 m and 60 m bands. A pack stores every
acquisition already decoded and on the 10 m grid, so a sample is one slice of a memory map: the page cache
serves it, and the decoding is paid once, in ``prepare_data.py``, instead of at every access of every epoch.

Layout of a pack folder (``--data_path`` of the training script may point at it like at a SeCo root):

- ``pixels.u8``: every acquisition as a C x H x W uint8 block (SeCo's stored values, before the RGB stretch,
  which is applied at read time as for the tree), location after location, in sampling-index order.
- ``index.npy``: int64 (acquisitions, 4): byte offset, height, width, and 1 when the image is an RGB rendering
  (SeCo preview, PNG/JPEG) that gets no stretch.
- ``pack.json``: the format tag, the bands stored, the locations with their acquisition names, and the
  total size. It is written last, and the folder is built under a temporary name then renamed, so a pack
  that exists is complete; a damaged one (truncated pixels, missing files) is refused with one line.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from datasets import DataError

PACK_FORMAT = "dino-mc-seco-pack"
PACK_VERSION = 1
MANIFEST = "pack.json"
PIXELS = "pixels.u8"
INDEX = "index.npy"


def is_pack(root: str | Path) -> bool:
    """True when ``root`` holds any of a pack's files: a whole pack, or what is left of a damaged one, which
    :class:`SeCoPack` then refuses with a clear message (rather than the tree reader finding no locations)."""
    return any((Path(root) / name).is_file() for name in (MANIFEST, PIXELS, INDEX))


def _broken(root: Path, reason: str) -> DataError:
    return DataError(f"packed SeCo data {root} is incomplete or damaged ({reason}); run prepare_data.py again")


class SeCoPack:
    """Read side of a pack: locations, acquisition names, and one acquisition as a (C, H, W) uint8 array.

    The memory map is opened on first use in each process and left out of pickling, so DataLoader workers
    (forked or spawned) each map the file instead of receiving a copy of it.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self._manifest()
        self.bands: list[str] = list(manifest["bands"])
        self.locations: list[str] = [name for name, _ in manifest["locations"]]
        self._names: list[list[str]] = [list(names) for _, names in manifest["locations"]]
        counts = [len(names) for names in self._names]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._index = self._load_index(int(self._starts[-1]))
        self._check_size(int(manifest["nbytes"]))
        self._pixels: np.memmap | None = None

    def _manifest(self) -> dict:
        if not (self.root / MANIFEST).is_file():
            raise _broken(self.root, f"{MANIFEST} is missing")
        try:
            manifest = json.loads((self.root / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise _broken(self.root, f"unreadable {MANIFEST}: {str(err).splitlines()[0]}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
            raise _broken(self.root, f"{MANIFEST} is not a {PACK_FORMAT} manifest")
        if manifest.get("version") != PACK_VERSION:
            raise DataError(
                f"packed SeCo data {self.root} has format version {manifest.get('version')}; this code reads "
                f"version {PACK_VERSION}: run prepare_data.py again"
            )
        return manifest

    def _load_index(self, count: int) -> np.ndarray:
        try:
            index = np.load(self.root / INDEX, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise _broken(self.root, f"unreadable {INDEX}: {str(err).splitlines()[0]}") from None
        if index.shape != (count, 4) or index.dtype != np.int64:
            raise _broken(self.root, f"{INDEX} has shape {index.shape}, expected ({count}, 4)")
        return index

    def _check_size(self, nbytes: int) -> None:
        path = self.root / PIXELS
        size = path.stat().st_size if path.is_file() else None
        if size != nbytes:
            found = "missing" if size is None else f"{size} bytes"
            raise _broken(self.root, f"{PIXELS} is {found}, expected {nbytes} bytes")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}

    def __len__(self) -> int:
        return len(self.locations)

    def acquisition_names(self, index: int) -> list[str]:
        return self._names[index]

    def count(self, index: int) -> int:
        """Number of acquisitions of location ``index``."""
        return len(self._names[index])

    def read(self, index: int, acquisition: int) -> tuple[np.ndarray, bool]:
        """Acquisition ``acquisition`` of location ``index``: a read-only (C, H, W) view, and whether it is
        an RGB rendering (no stretch)."""
        if self._pixels is None:
            self._pixels = np.memmap(self.root / PIXELS, dtype=np.uint8, mode="r")
        offset, height, width, rendered = self._index[self._starts[index] + acquisition].tolist()
        size = len(self.bands) * height * width
        block = self._pixels[offset : offset + size]
        return block.reshape(len(self.bands), height, width), bool(rendered)


def write_pack(
    output: str | Path,
    bands: Sequence[str],
    locations: Sequence[tuple[str, Sequence[str]]],
    read: Callable[[int, int], tuple[np.ndarray, bool]],
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a pack of ``locations`` (name, acquisition names), reading acquisition k of location i with
    ``read(i, k)`` -> ((C, H, W) uint8 array, rendered).

    The pack is built in ``.<name>.partial`` beside ``output`` and renamed to ``output`` only when complete
    (files flushed to disk), so an interrupted or failed run leaves no pack that looks usable; a failed run
    removes its partial folder, and the next run starts over.
    ``progress(i)`` is called after each location.
    """
    output = Path(output)
    if output.exists():
        raise DataError(f"{output} already exists; remove it or choose another output folder")
    partial = output.with_name(f".{output.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        _write_files(partial, bands, locations, read, progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.rename(partial, output)
    return output


def _write_files(
    folder: Path,
    bands: Sequence[str],
    locations: Sequence[tuple[str, Sequence[str]]],
    read: Callable[[int, int], tuple[np.ndarray, bool]],
    progress: Callable[[int], None] | None,
) -> None:
    """The pixels, the index, then the manifest (last: its presence marks a complete pack), all fsync'ed."""
    rows, offset = [], 0
    with open(folder / PIXELS, "wb") as pixels:
        for i, (_, names) in enumerate(locations):
            for k in range(len(names)):
                array, rendered = read(i, k)
                if array.dtype != np.uint8 or array.ndim != 3 or array.shape[0] != len(bands):
                    raise DataError(f"acquisition {names[k]} gave {array.dtype} {array.shape}, expected uint8 bands")
                pixels.write(np.ascontiguousarray(array).tobytes())
                rows.append((offset, array.shape[1], array.shape[2], int(rendered)))
                offset += array.size
            if progress is not None:
                progress(i)
        pixels.flush()
        os.fsync(pixels.fileno())
    with open(folder / INDEX, "wb") as f:
        np.save(f, np.asarray(rows, dtype=np.int64).reshape(-1, 4))
        f.flush()
        os.fsync(f.fileno())
    manifest = {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "bands": list(bands),
        "nbytes": offset,
        "locations": [[name, list(names)] for name, names in locations],
    }
    with open(folder / MANIFEST, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
