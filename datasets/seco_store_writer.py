"""Write a SeCo-style tree, or tiles of large scenes, into a Zarr v3 store (format: ``datasets/seco_store.py``),
in parallel and resumably.

Work is split by shard: a shard holds ``shard_size`` consecutive acquisitions (locations in order) of every
band-group array, and each worker process owns whole shards, so workers never write the same file. After a
shard's files are written (Zarr writes each file to a temporary name and renames it) and fsync'ed, their
sizes and sha256 go to a record ``.progress/<shard>.json``, itself written atomically. A rerun, or another
task of a job array (``shard_range``), re-hashes the recorded shards of its range and writes only the shards
without a matching record. The group attributes that make the store usable (``"complete": true``, the names,
the shard sizes and checksums) are written last, by whichever run finds every shard recorded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import multiprocessing.pool
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec
from zarr.errors import ContainsArrayError

import utils
from datasets import DataError
from datasets.acquisition import STORED_DTYPES
from datasets.bands import RESOLUTION_M
from datasets.scenes import SceneTiles
from datasets.seco_store import (
    ATTRIBUTES,
    STORE_FORMAT,
    STORE_VERSION,
    finish_command,
    read_attributes,
    shard_key,
)
from datasets.seco_store import StoreFiles as _StoreFiles
from datasets.seco_tree import SeCoTree

Source = SeCoTree | SceneTiles

PROGRESS = ".progress"  # per-shard records of a store being written
ZSTD_LEVEL = 3  # lossless; higher levels gain a few % of size for 2-6x the writing time (benchmarks/README.md)
VALUES = (
    "as stored in the source files: SeCo uint8 = clip(reflectance, 0, 1) * 255, 16-bit = L2A reflectance x 10000; "
    "no stretch applied (the RGB quantile stretch of SeCo's band files is applied when training reads them)"
)


@dataclass
class StorePlan:
    """Everything that defines a store's content; its fingerprint tells a rerun whether a store is this one."""

    bands: list[str]
    layout: str
    arrays: dict[str, list[str]]  # array name -> the bands it holds, in the order asked
    shapes: dict[str, list[int]]  # array name -> (H, W) of its bands
    dtypes: dict[str, str]
    grid: list[int]
    rendered: bool
    locations: list[str]
    acquisitions: list[list[str]]
    shard_size: int
    georeference: list[dict] | None = None  # per location (tiles of scenes): CRS and affine transform
    fingerprint: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        content = {k: v for k, v in asdict(self).items() if k != "fingerprint"}
        self.fingerprint = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(names) for names in self.acquisitions])]).astype(np.int64)

    @property
    def n_acquisitions(self) -> int:
        return int(self.starts[-1])

    @property
    def n_shards(self) -> int:
        return -(-self.n_acquisitions // self.shard_size)


def band_groups(bands: list[str], layout: str) -> dict[str, list[str]]:
    """Array name -> bands: per native resolution (``10m``, ``20m``, ``60m``) for per-band folders, one ``image``
    array for one file per acquisition (its bands share the file's grid)."""
    if layout == "images":
        return {"image": list(bands)}
    groups: dict[str, list[str]] = {}
    for metres in sorted(set(RESOLUTION_M[b] for b in bands)):
        groups[f"{metres}m"] = [b for b in bands if RESOLUTION_M[b] == metres]
    return groups


def plan_store(tree: Source, shard_size: int) -> StorePlan:
    """The store's arrays, shapes and dtypes from the source's first acquisition (every other one must match)."""
    first = tree.read(0, 0)
    arrays = band_groups(tree.bands, tree.layout)
    shapes, dtypes = {}, {}
    for name, members in arrays.items():
        found = {
            (tuple(first.bands[tree.bands.index(b)].shape), str(first.bands[tree.bands.index(b)].dtype))
            for b in members
        }
        if len(found) > 1:
            raise DataError(f"{first.name}: the bands {','.join(members)} differ in size or dtype ({sorted(found)})")
        ((shape, dtype),) = found
        if np.dtype(dtype) not in STORED_DTYPES:
            raise DataError(f"{first.name} stores {dtype} values; expected uint8 (SeCo) or 16-bit L2A reflectance")
        shapes[name], dtypes[name] = list(shape), dtype
    grid = first.grid or max((b.shape for b in first.bands), key=lambda s: s[0] * s[1])
    return StorePlan(
        bands=list(tree.bands),
        layout=tree.layout,
        arrays=arrays,
        shapes=shapes,
        dtypes=dtypes,
        grid=list(grid),
        rendered=first.rendered,
        locations=list(tree.locations),
        acquisitions=[tree.acquisition_names(i) for i in range(len(tree))],
        shard_size=shard_size,
        georeference=getattr(tree, "georeference", None),
    )


def compressor(dtype: str) -> ZstdCodec | BloscCodec:
    """zstd for uint8; blosc-zstd with byte shuffle for 16-bit values, whose high bytes then compress apart."""
    if np.dtype(dtype).itemsize == 1:
        return ZstdCodec(level=ZSTD_LEVEL)
    return BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle="shuffle", typesize=np.dtype(dtype).itemsize)


@dataclass
class ShardResult:
    shard: int
    locations: int
    raw_bytes: int
    stored_bytes: int


class StoreWriter:
    """Writes the shards of a plan into ``output``; one instance per process (see the module docstring)."""

    def __init__(self, tree: Source, plan: StorePlan, output: str | Path):
        self.tree, self.plan, self.output = tree, plan, Path(output)
        self._arrays: dict[str, zarr.Array] | None = None
        starts = plan.starts
        self._location_of = np.repeat(np.arange(len(plan.locations)), np.diff(starts))
        self._first = starts[:-1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        return shard * self.plan.shard_size, min((shard + 1) * self.plan.shard_size, self.plan.n_acquisitions)

    def locations_in(self, shard: int) -> int:
        """Locations whose first acquisition lies in ``shard`` (progress counts locations)."""
        lo, hi = self.shard_bounds(shard)
        return int(np.count_nonzero((self._first >= lo) & (self._first < hi)))

    def record_path(self, shard: int) -> Path:
        return self.output / PROGRESS / f"{shard}.json"

    def shard_files(self, shard: int) -> dict[str, Path]:
        return {shard_key(name, shard): self.output / shard_key(name, shard) for name in self.plan.arrays}

    def is_recorded(self, shard: int) -> bool:
        """The shard has a record and its files still have the recorded sha256 (re-hashed here)."""
        try:
            record = json.loads(self.record_path(shard).read_text())
        except (OSError, ValueError):
            return False
        files = self.shard_files(shard)
        if set(record) != set(files):
            return False
        return all(path.is_file() and _sha256(path) == record[key]["sha256"] for key, path in files.items())

    def write(self, shard: int) -> ShardResult:
        """Read the shard's acquisitions from the tree, write one file per array, record it."""
        if self._arrays is None:
            self._arrays = {name: zarr.open_array(self.output / name, mode="r+") for name in self.plan.arrays}
        lo, hi = self.shard_bounds(shard)
        buffers = {
            name: np.empty((hi - lo, len(members), *self.plan.shapes[name]), dtype=self.plan.dtypes[name])
            for name, members in self.plan.arrays.items()
        }
        slots = {band: (name, c) for name, members in self.plan.arrays.items() for c, band in enumerate(members)}
        for position in range(lo, hi):
            location = int(self._location_of[position])
            acquisition = self.tree.read(location, position - int(self._first[location]))
            self._check(acquisition)
            for band, values in zip(self.plan.bands, acquisition.bands):
                name, channel = slots[band]
                buffers[name][position - lo, channel] = values
        files = self.shard_files(shard)
        for path in files.values():  # a damaged file is replaced, never read and merged into
            path.unlink(missing_ok=True)
        for name, array in self._arrays.items():
            array[lo:hi] = buffers[name]
        record = {}
        for key, path in files.items():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            record[key] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        self.record_path(shard).parent.mkdir(exist_ok=True)
        utils.write_atomically(self.record_path(shard), lambda f: f.write(json.dumps(record).encode()))
        raw = sum(b.nbytes for b in buffers.values())
        return ShardResult(shard, self.locations_in(shard), raw, sum(r["size"] for r in record.values()))

    def _check(self, acquisition) -> None:
        """Every acquisition must have the first one's sizes and dtypes: a Zarr array has one shape."""
        plan = self.plan
        grid = acquisition.grid or max((b.shape for b in acquisition.bands), key=lambda s: s[0] * s[1])
        for band, values in zip(plan.bands, acquisition.bands):
            name = next(n for n, members in plan.arrays.items() if band in members)
            expected = (tuple(plan.shapes[name]), plan.dtypes[name])
            if (values.shape, str(values.dtype)) != expected or list(grid) != plan.grid:
                raise DataError(
                    f"{acquisition.name}: band {band} is {values.shape[0]}x{values.shape[1]} {values.dtype} on a "
                    f"{grid[0]}x{grid[1]} grid, the store's first acquisition {expected[0][0]}x{expected[0][1]} "
                    f"{expected[1]} on {plan.grid[0]}x{plan.grid[1]}: a store holds acquisitions of one size; "
                    f"train on the tree itself (--data_path TREE)"
                )
        if acquisition.rendered != plan.rendered:
            raise DataError(
                f"{acquisition.name}: RGB renderings and band files mixed in one tree; a store holds one kind"
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# The writer of a worker process, set once per process by the pool's initializer.
_WORKER: StoreWriter | None = None


def _init_worker(writer: StoreWriter) -> None:
    global _WORKER
    _WORKER = writer


def _in_worker(method: str, shard: int):
    assert _WORKER is not None
    return getattr(_WORKER, method)(shard)


@contextlib.contextmanager
def worker_pool(writer: StoreWriter, workers: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """``workers`` processes for the shards (None: this process alone).

    They start from a forkserver that imported this module once, so they begin in a fraction of a second
    without copying this process's threads (Zarr's I/O thread, torch's): a plain fork of a process with
    threads may copy a lock held by one of them and hang. Each receives the writer (the plan and the tree's
    index) once, pickled.
    """
    if workers == 1:
        yield None
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with context.Pool(workers, _init_worker, (writer,)) as pool:
        yield pool


def run_shards(writer: StoreWriter, pool, method: str, shards: list[int], ordered: bool = True) -> Iterator:
    """``writer.<method>(shard)`` for every shard, in ``pool`` when there is one; in the order of ``shards``,
    or as they complete."""
    if pool is None:
        return (getattr(writer, method)(shard) for shard in shards)
    imap = pool.imap if ordered else pool.imap_unordered
    return imap(functools.partial(_in_worker, method), shards)


def _create_skeleton(plan: StorePlan, output: Path, source: str) -> None:
    """The group (attributes saying the store is incomplete and which tree it is) and the empty arrays."""
    group = zarr.open_group(output, mode="a")
    if group.attrs.get(ATTRIBUTES, {}).get("fingerprint") != plan.fingerprint:
        group.attrs.put({ATTRIBUTES: _attributes(plan, source, complete=False)})
    for name, members in plan.arrays.items():
        if name in group:
            continue
        height, width = plan.shapes[name]
        shape = (plan.n_acquisitions, len(members), height, width)
        with contextlib.suppress(ContainsArrayError):  # another task of a job array created it meanwhile
            _create_array(group, name, shape, plan.dtypes[name], plan.shard_size)


def _create_array(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: str, shard_size: int) -> None:
    """One band group's array: a chunk per acquisition, shards of ``shard_size`` acquisitions."""
    group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=(1, *shape[1:]),
        shards=(shard_size, *shape[1:]),
        serializer=BytesCodec(),
        compressors=[compressor(dtype), Crc32cCodec()],
        fill_value=0,
        dimension_names=("acquisition", "band", "y", "x"),
    )


def _attributes(plan: StorePlan, source: str, complete: bool, shards: dict | None = None) -> dict:
    base = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "complete": complete,
        "fingerprint": plan.fingerprint,
        "source": source,
        "n_shards": plan.n_shards,
    }
    if not complete:
        return base
    return {
        **base,
        "layout": plan.layout,
        "bands": plan.bands,
        "arrays": plan.arrays,
        "grid": plan.grid,
        "rendered": plan.rendered,
        "values": VALUES,
        "shard_size": plan.shard_size,
        "locations": plan.locations,
        "acquisitions": plan.acquisitions,
        "shards": shards,
        **({"georeference": plan.georeference} if plan.georeference is not None else {}),
    }


def existing_store(output: Path, plan: StorePlan) -> dict | None:
    """The attributes of the store already at ``output`` when it is this tree's, None when there is nothing.

    Anything else there (other files, a store of another tree or other bands) is refused in one line, so that
    nothing a user wrote is overwritten."""
    if not output.exists():
        return None
    if output.is_dir() and not any(output.iterdir()):
        return None
    try:
        attributes = read_attributes(_StoreFiles(output))
    except DataError:
        raise DataError(
            f"--output_path {output} exists and is not a store written by prepare_data.py: choose a new path"
        ) from None
    if attributes.get("fingerprint") != plan.fingerprint:
        raise DataError(
            f"--output_path {output} holds a store of another tree, other bands or another shard size: "
            f"choose a new path, or remove it to write this one"
        )
    return attributes


def parse_shard_range(spec: str | None, n_shards: int) -> range:
    """``I:J`` -> shards I..J-1 (clipped to the store); None -> every shard."""
    if spec is None:
        return range(n_shards)
    try:
        start, stop = (int(part) for part in spec.split(":"))
    except ValueError:
        raise utils.ConfigError(f"--shard_range must be I:J (two integers, e.g. 0:100), got {spec!r}") from None
    if not 0 <= start < stop:
        raise utils.ConfigError(f"--shard_range {spec}: expected 0 <= I < J")
    if start >= n_shards:
        raise utils.ConfigError(f"--shard_range {spec}: the store has {n_shards} shards (0 to {n_shards - 1})")
    return range(start, min(stop, n_shards))


def write_store(
    tree: Source,
    output: str | Path,
    shard_size: int,
    workers: int = 1,
    shard_range: str | None = None,
    verify: bool = False,
    print_every: int = 1000,
) -> str:
    """Write (or finish, or check) the store of ``tree`` at ``output``; returns a line saying what it holds.

    Zarr compresses on a pool of threads; here one per process, so that a writer process is one core's work
    and ``workers`` processes scale with the cores they get (the worker processes inherit the setting)."""
    with zarr.config.set({"threading.max_workers": 1}):
        return _write_store(tree, output, shard_size, workers, shard_range, verify, print_every)


def _write_store(
    tree: Source,
    output: str | Path,
    shard_size: int,
    workers: int,
    shard_range: str | None,
    verify: bool,
    print_every: int,
) -> str:
    output, source = Path(output), os.path.abspath(tree.root)
    plan = plan_store(tree, shard_size)
    shards = parse_shard_range(shard_range, plan.n_shards)
    attributes = existing_store(output, plan)
    writer = StoreWriter(tree, plan, output)
    if attributes is not None and attributes.get("complete") and not verify:
        damaged = [s for s in shards if not _files_match(writer, s, attributes["shards"])]
        if not damaged:
            return f"{output} is complete ({plan.n_shards} shards); train with --data_path {output}"
    with worker_pool(writer, workers) as pool:
        _create_skeleton(plan, output, source)
        if shard_range is None:  # the only writer: temporary files of killed writers can go
            for leftover in output.glob("*/c/**/*.partial"):
                leftover.unlink(missing_ok=True)
        recorded = run_shards(writer, pool, "is_recorded", list(shards))
        todo = [shard for shard, done in zip(shards, recorded) if not done]
        if todo and attributes is not None and attributes.get("complete"):
            zarr.open_group(output, mode="r+").attrs.put({ATTRIBUTES: _attributes(plan, source, complete=False)})
        _write_with_progress(writer, pool, todo, print_every)
    missing = [s for s in range(plan.n_shards) if not writer.record_path(s).is_file()]
    if missing:
        return (
            f"{output}: shards {shards.start}:{shards.stop} written; {len(missing)} of {plan.n_shards} shards still "
            f"missing (first: {missing[0]}); finish with {finish_command({'source': source}, str(output))}"
        )
    records = {}
    for s in range(plan.n_shards):
        records.update(json.loads(writer.record_path(s).read_text()))
    zarr.open_group(output, mode="r+").attrs.put({ATTRIBUTES: _attributes(plan, source, True, records)})
    return f"{output} is complete ({plan.n_shards} shards); train with --data_path {output}"


def _files_match(writer: StoreWriter, shard: int, records: dict) -> bool:
    """Cheap check of a complete store: the shard files exist with their recorded sizes."""
    for key, path in writer.shard_files(shard).items():
        if not path.is_file() or path.stat().st_size != records[key]["size"]:
            return False
    return True


def _write_with_progress(writer: StoreWriter, pool, todo: list[int], print_every: int) -> None:
    """Run the shards, with progress in locations and locations/s, MB/s read, compression ratio and ETA."""
    if not todo:
        return
    total = sum(writer.locations_in(s) for s in todo)
    progress = utils.Progress(None, "store locations", print_every, total=total)
    start, raw, stored = time.time(), 0, 0
    for result in run_shards(writer, pool, "write", todo, ordered=False):
        raw, stored = raw + result.raw_bytes, stored + result.stored_bytes
        elapsed = max(time.time() - start, 1e-9)
        rate = f"{(progress.count + result.locations) / elapsed:.1f} locations/s, {raw / elapsed / 1e6:.1f} MB/s"
        progress.update(result.locations, f"{rate}, compression {raw / max(stored, 1):.2f}x")
    progress.close()
