"""SeCo-style data in a Zarr v3 store (written by ``prepare_data.py``) as a source of acquisitions.

The store is a plain Zarr v3 group, readable with ``zarr.open_group(path)`` and no code of this project:

- one array per band group, at the bands' NATIVE resolution and in the source dtype: ``10m``, ``20m``,
  ``60m`` for per-band SeCo folders (SeCo: B2 B3 B4 B8 at 264x264, B5 B6 B7 B8A B11 B12 at 132x132, B1 B9 at
  44x44), or ``image`` for trees of one image file per acquisition. Shape (acquisitions, bands of the group,
  H, W), acquisitions location after location;
- a chunk is one acquisition of one band group; shards of ``shard_size`` acquisitions (many locations) make a
  few large files; chunks are compressed losslessly (zstd for uint8, blosc-zstd with byte shuffle for 16-bit
  values) and carry a crc32c checksum, as does each shard's index;
- the group's attributes, under ``"dino_mc"``: format and version, ``layout`` ("bands" or "images"), the
  ``bands`` stored and the ``arrays`` holding them, the 10 m ``grid``, ``rendered`` (RGB renderings, which get
  no RGB stretch), ``values`` (how to read the numbers), the ``locations`` with their ``acquisitions`` (names,
  in sampling order), ``shard_size`` and, per shard file, its size and sha256 (``shards``), ``source`` (the
  tree it was written from) and ``complete``. They are written last: a store being written says
  ``"complete": false``, and training refuses it with the command that finishes it.

Reading an acquisition reads its chunk of each band group needed (a byte range of a shard file, located
through the shard's index, which is cached per process) and decodes it with the codec the array declares.
This is Zarr's sharding format read directly rather than through ``zarr.Array.__getitem__``, whose
per-call overhead is several times the decoding itself (``benchmarks/README.md``); tests check both give
the same arrays. A local path is read with ``os.pread``; a URL (``s3://``, ``gs://``, ``file://``, ...)
through fsspec (``pip install s3fs`` / ``gcsfs`` for object storage). Files are opened lazily in each
process, so DataLoader workers (forked or spawned) each open their own.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np

from datasets import DataError
from datasets.acquisition import TEN_M_BANDS, Acquisition

STORE_FORMAT = "dino-mc-seco-store"
STORE_VERSION = 1
ATTRIBUTES = "dino_mc"  # the key of the group attributes that hold this format's metadata
METADATA = "zarr.json"
INDEX_ENTRY_BYTES = 16  # a shard index holds (offset, nbytes) as two little-endian uint64 per chunk
CHECKSUM_BYTES = 4  # crc32c, little-endian, after the index and after each chunk
EMPTY = 2**64 - 1  # index entry of a chunk that was not written (all fill value)
_INDEX_CACHE = 4096  # shard indexes kept per process (a few KB each)
_OPEN_FILES = 64  # shard files kept open per process

# Files a pack written by earlier versions of prepare_data.py left in its folder.
_OLD_PACK_FILES = ("pack.json", "pixels.u8", "index.npy")


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def is_store(path: str | Path) -> bool:
    """True for a URL, a ``.zarr`` path, or a folder holding Zarr metadata: the paths read as a store."""
    return is_url(path) or str(path).rstrip("/").endswith(".zarr") or (Path(path) / METADATA).is_file()


def refuse_old_pack(path: str | Path) -> None:
    """A folder written by earlier versions of ``prepare_data.py`` gets one line naming what replaces it."""
    if any((Path(path) / name).is_file() for name in _OLD_PACK_FILES):
        raise DataError(
            f"{path} is a pack written by an earlier version of prepare_data.py, a format no longer read: "
            f"write a Zarr store from the tree with python prepare_data.py --data_path TREE --output_path STORE.zarr"
        )


def shard_key(array: str, shard: int) -> str:
    """Key of a shard file of a 4-D array (Zarr's default chunk key encoding, "/" separator)."""
    return f"{array}/c/{shard}/0/0/0"


def finish_command(attributes: dict, store: str) -> str:
    return f"python prepare_data.py --data_path {attributes.get('source', 'TREE')} --output_path {store}"


class StoreFiles:
    """Whole-file and byte-range reads under a store's root: ``os.pread`` on a local path, fsspec for a URL.

    Open files and the fsspec file system are per process (dropped when pickled for a spawned worker).
    """

    def __init__(self, root: str | Path):
        self.root = str(root).rstrip("/")
        self._fs: Any = None
        self._path = self.root
        self._fds: OrderedDict[str, int] = OrderedDict()

    def __getstate__(self) -> dict:
        return {"root": self.root, "_fs": None, "_path": self.root, "_fds": OrderedDict()}

    def _filesystem(self) -> Any:
        if self._fs is None:
            import fsspec

            try:
                self._fs, self._path = fsspec.core.url_to_fs(self.root)
            except (ImportError, ValueError) as err:
                raise DataError(f"cannot open {self.root}: {str(err).splitlines()[0]}") from None
        return self._fs

    def exists(self, key: str) -> bool:
        if is_url(self.root):
            return self._filesystem().exists(f"{self._path}/{key}")
        return os.path.isfile(os.path.join(self.root, key))

    def read(self, key: str) -> bytes:
        try:
            if is_url(self.root):
                return self._filesystem().cat_file(f"{self._path}/{key}")
            with open(os.path.join(self.root, key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise DataError(f"{self.root}/{key} is missing") from None

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Bytes ``start`` to ``start + length`` of a file; fewer when the file is shorter (the caller says why)."""
        if is_url(self.root):
            return self._filesystem().cat_file(f"{self._path}/{key}", start=start, end=start + length)
        return os.pread(self._fd(key), length, start)

    def _fd(self, key: str) -> int:
        fd = self._fds.pop(key, None)
        if fd is None:
            fd = os.open(os.path.join(self.root, key), os.O_RDONLY)
            if len(self._fds) >= _OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[key] = fd
        return fd


def read_attributes(files: StoreFiles) -> dict:
    """The store's ``dino_mc`` attributes, or one line saying what the path holds instead."""
    if not files.exists(METADATA):
        raise DataError(f"{files.root} is not a Zarr store ({METADATA} is missing): write one with prepare_data.py")
    try:
        metadata = json.loads(files.read(METADATA))
        attributes = metadata["attributes"][ATTRIBUTES]
    except (ValueError, KeyError, TypeError):
        raise DataError(
            f"{files.root} is a Zarr store but not one written by prepare_data.py (no '{ATTRIBUTES}' attributes)"
        ) from None
    if attributes.get("format") != STORE_FORMAT:
        raise DataError(f"{files.root} holds '{attributes.get('format')}' data, not a {STORE_FORMAT}")
    if attributes.get("version") != STORE_VERSION:
        raise DataError(
            f"{files.root} has store format version {attributes.get('version')}; this code reads version "
            f"{STORE_VERSION}: write the store again with prepare_data.py"
        )
    return attributes


def _decompressor(codecs: list[dict], where: str) -> numcodecs.abc.Codec:
    """The numcodecs codec for the inner chunk codecs prepare_data.py writes: bytes, zstd or blosc, crc32c."""
    names = [codec["name"] for codec in codecs]
    if len(names) != 3 or names[0] != "bytes" or names[2] != "crc32c" or names[1] not in ("zstd", "blosc"):
        raise DataError(f"{where} uses codecs {names}; this reader knows bytes + zstd|blosc + crc32c")
    return numcodecs.Zstd() if names[1] == "zstd" else numcodecs.Blosc()


@dataclass
class StoreArray:
    """What reading one band group's chunks needs, from the array's ``zarr.json``."""

    name: str
    dtype: np.dtype
    chunk: tuple[int, int, int]  # (bands, H, W) of one acquisition
    shard_size: int
    fill_value: int
    codec: numcodecs.abc.Codec

    @classmethod
    def from_metadata(cls, name: str, metadata: dict, where: str) -> StoreArray:
        try:
            (sharding,) = metadata["codecs"]
            config = sharding["configuration"]
            shard_size = metadata["chunk_grid"]["configuration"]["chunk_shape"][0]
            index_codecs = [codec["name"] for codec in config["index_codecs"]]
            ok = sharding["name"] == "sharding_indexed" and config["index_location"] == "end"
            ok = ok and index_codecs == ["bytes", "crc32c"] and config["chunk_shape"][0] == 1
            if not ok:
                raise ValueError
            codec = _decompressor(config["codecs"], where)
            return cls(
                name,
                np.dtype(metadata["data_type"]).newbyteorder("<"),
                tuple(config["chunk_shape"][1:]),
                int(shard_size),
                int(metadata["fill_value"]),
                codec,
            )
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where} is not sharded the way prepare_data.py writes arrays") from None


class SeCoStore:
    """The locations of a store written by ``prepare_data.py`` and their acquisitions, read as stored."""

    def __init__(self, root: str | Path, bands: list[str]):
        self.root = str(root)
        self.bands = list(bands)
        self.files = StoreFiles(root)
        attributes = read_attributes(self.files)
        if not attributes.get("complete"):
            done = attributes.get("shards_done", "some")
            raise DataError(
                f"{self.root} is an incomplete store ({done} of {attributes.get('n_shards')} shards written): "
                f"finish it with {finish_command(attributes, self.root)}"
            )
        missing = [b for b in self.bands if b not in attributes["bands"]]
        if missing:
            raise DataError(
                f"store {self.root} holds bands {','.join(attributes['bands'])}, not {','.join(missing)}: write a "
                f"store with them (python prepare_data.py --bands {','.join(self.bands)} ...)"
            )
        self.layout: str = attributes["layout"]
        self.rendered: bool = attributes["rendered"]
        self.grid = tuple(attributes["grid"])
        self.shard_size: int = attributes["shard_size"]
        self.shards: dict[str, dict] = attributes["shards"]
        self.repair = f"{finish_command(attributes, self.root)} --verify"
        self.locations: list[str] = list(attributes["locations"])
        self._names: list[list[str]] = attributes["acquisitions"]
        self._starts = np.concatenate([[0], np.cumsum([len(n) for n in self._names])]).astype(np.int64)
        # Each band asked as (array, channel); only the arrays holding a band asked are read.
        group_of = {
            band: (array, c) for array, members in attributes["arrays"].items() for c, band in enumerate(members)
        }
        self._slots = [group_of[band] for band in self.bands]
        self.arrays = {name: self._array(name) for name in dict.fromkeys(array for array, _ in self._slots)}
        # The grid the bands are brought to, as the tree reader decides it: the largest band's when a 10 m band
        # is asked (or the bands share one image's grid), else the acquisition's 10 m grid.
        ten_m = self.layout == "images" or any(b in TEN_M_BANDS for b in self.bands)
        self._read_grid = None if ten_m else self.grid
        if not is_url(self.root):
            self._check_sizes()
        self._indexes: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_indexes": OrderedDict()}

    def _array(self, name: str) -> StoreArray:
        where = f"{self.root}/{name}/{METADATA}"
        try:
            metadata = json.loads(self.files.read(f"{name}/{METADATA}"))
        except ValueError:
            raise DataError(f"{where} is not valid JSON: write the store again with prepare_data.py") from None
        return StoreArray.from_metadata(name, metadata, where)

    def _check_sizes(self) -> None:
        """Every shard file of the arrays read has the size recorded when it was written (a stat per file), so
        a truncated or missing shard stops the run before training, naming the file."""
        for key, record in self.shards.items():
            if key.split("/")[0] not in self.arrays:
                continue
            path = os.path.join(self.root, key)
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size != record["size"]:
                found = "missing" if size is None else f"{size} bytes, expected {record['size']}"
                raise DataError(f"shard {path} is {found} (truncated or replaced): rewrite it with {self.repair}")

    def __len__(self) -> int:
        return len(self.locations)

    def count(self, index: int) -> int:
        return len(self._names[index])

    def acquisition_names(self, index: int) -> list[str]:
        return list(self._names[index])

    def shard_of_location(self, index: int) -> int:
        """The shard holding the first acquisition of location ``index`` (the unit of ``--shard_shuffle``)."""
        return int(self._starts[index]) // self.shard_size

    @property
    def n_shards(self) -> int:
        return -(-int(self._starts[-1]) // self.shard_size)

    def read(self, index: int, acquisition: int) -> Acquisition:
        position = int(self._starts[index]) + acquisition
        chunks = {name: self._read_chunk(array, position) for name, array in self.arrays.items()}
        bands = [chunks[array][channel] for array, channel in self._slots]
        name = f"{self.root} (location {self.locations[index]}, acquisition {self._names[index][acquisition]})"
        return Acquisition(bands, self._read_grid, self.rendered, name)

    def _read_chunk(self, array: StoreArray, position: int) -> np.ndarray:
        shard, inner = divmod(position, array.shard_size)
        key = shard_key(array.name, shard)
        offset, nbytes = self._index(array, shard, key)[inner].tolist()
        if offset == EMPTY:  # every value was the fill value: Zarr wrote no chunk
            return np.full(array.chunk, array.fill_value, dtype=array.dtype)
        values = np.frombuffer(array.codec.decode(self._read_checked(key, offset, nbytes)), dtype=array.dtype)
        return values.reshape(array.chunk)

    def _index(self, array: StoreArray, shard: int, key: str) -> np.ndarray:
        index = self._indexes.pop((array.name, shard), None)
        if index is None:
            length = array.shard_size * INDEX_ENTRY_BYTES + CHECKSUM_BYTES
            data = self._read_checked(key, self.shards[key]["size"] - length, length)
            index = np.frombuffer(data, dtype="<u8").reshape(-1, 2)
            if len(self._indexes) >= _INDEX_CACHE:
                self._indexes.popitem(last=False)
        self._indexes[(array.name, shard)] = index
        return index

    def _read_checked(self, key: str, start: int, length: int) -> bytes:
        """Bytes of a shard without their trailing crc32c, which must match: a missing, truncated or corrupted
        shard is one line naming the file and the command that rewrites it."""
        path = f"{self.root}/{key}"
        try:
            data = self.files.read_range(key, start, length)
        except FileNotFoundError:
            raise DataError(f"shard {path} is missing: rewrite it with {self.repair}") from None
        if len(data) != length:
            raise DataError(f"shard {path} is truncated: rewrite it with {self.repair}")
        payload, checksum = data[:-CHECKSUM_BYTES], int.from_bytes(data[-CHECKSUM_BYTES:], "little")
        if google_crc32c.value(payload) != checksum:
            raise DataError(f"shard {path} is corrupted (checksum mismatch): rewrite it with {self.repair}")
        return payload
