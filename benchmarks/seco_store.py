"""The Zarr store of prepare_data.py measured: size, files, writing, cold reads, resuming, start-up, locality.

    python benchmarks/seco_store.py                       # generated demo data (64 locations x 5), all measures
    python benchmarks/seco_store.py --measures size write --n_locations 128

One JSON line per measure (``"measure"`` names it):

- ``codecs``: lossless codecs on the tree's band files as stored (uint8 for SeCo): compression ratio and
  encode / decode MB/s of one process, per codec and level (the store uses zstd 3 for uint8).
- ``shard_sizes``: for several acquisitions per shard, write time, shard files and their mean size, and the
  CPU time to read an acquisition in random order (the store's default is 256).
- ``size``: stored bytes per acquisition for RGB and the 12 bands against the pack of earlier versions
  (C x 264 x 264 bytes, every band upsampled to the 10 m grid) and SeCo's published zips, projected to
  SeCo-100K (100,000 acquisitions) and SeCo-1M (1,000,000); files per 1,000 locations for tree and store.
- ``write``: seconds to write the 12-band store with 1 and 2 worker processes, and the ratio.
- ``resume``: a writer killed (SIGKILL) halfway, then rerun: seconds of the rerun against a full write.
- ``cold_read``: decode time per acquisition with the page cache dropped before (as root; otherwise says so).
- ``startup``: a store with ``--startup_acquisitions`` names (default 1,000,000 = SeCo-1M): seconds and memory
  to open it in the main process, bytes pickled to a spawned loader worker, seconds to its first read.
- ``locality``: per rank of a 4-process run, bytes read and shard files opened in one epoch, with and without
  ``--shard_shuffle``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402
from datasets import pretraining
from datasets.bands import parse_bands  # noqa: E402
from datasets.demo import write_seco_demo  # noqa: E402
from datasets.seco import SeCoDataset  # noqa: E402
from datasets.seco_store import ATTRIBUTES, SeCoStore, StoreFiles, shard_key  # noqa: E402
from datasets.seco_store_writer import write_store  # noqa: E402
from datasets.seco_tree import SeCoTree  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MEASURES = ("codecs", "shard_sizes", "size", "write", "resume", "cold_read", "startup", "locality")
SECO_10M_PIXELS = 264 * 264
PUBLISHED_ZIP_BYTES = {"seco_100k": 7.3e9, "seco_1m": 36.3e9}  # Zenodo record 4728033
SECO_ACQUISITIONS = {"seco_100k": 100_000, "seco_1m": 1_000_000}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Zarr store benchmark", add_help=False)
    parser.add_argument("--data_path", default=None, help="SeCo-layout tree; default: generate demo data.")
    parser.add_argument("--n_locations", default=64, type=int, help="Locations of the generated data (x 5).")
    parser.add_argument("--measures", nargs="+", default=list(MEASURES), choices=MEASURES)
    parser.add_argument(
        "--shard_size", default=32, type=int, help="Acquisitions per shard (small: the demo data has few)."
    )
    parser.add_argument("--startup_acquisitions", default=1_000_000, type=int, help="Names in the startup store.")
    parser.add_argument("--seed", default=0, type=int)
    return parser


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def file_count(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def write(tree: Path, output: Path, bands: str, shard_size: int, workers: int = 1) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        write_store(SeCoTree(tree, parse_bands(bands)), output, shard_size, workers)
    return time.perf_counter() - start


def measure_codecs(tree: Path, tmp: Path, shard_size: int) -> dict:
    import numcodecs

    from datasets.io import read_band

    bands = [read_band(path) for path in sorted(tree.glob("*/*/B*.tif"))[:600]]
    raw = sum(band.nbytes for band in bands)
    codecs = {
        "zstd1": numcodecs.Zstd(1),
        "zstd3": numcodecs.Zstd(3),
        "zstd9": numcodecs.Zstd(9),
        "blosc_zstd3_shuffle": numcodecs.Blosc("zstd", 3, numcodecs.Blosc.SHUFFLE),
        "blosc_zstd3_bitshuffle": numcodecs.Blosc("zstd", 3, numcodecs.Blosc.BITSHUFFLE),
        "blosc_lz4_5_shuffle": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE),
    }
    result = {"measure": "codecs", "dtype": str(bands[0].dtype), "band_files": len(bands)}
    for name, codec in codecs.items():
        start = time.process_time()
        encoded = [codec.encode(np.ascontiguousarray(band)) for band in bands]
        encode_s, start = time.process_time() - start, time.process_time()
        for data in encoded:
            codec.decode(data)
        decode_s = time.process_time() - start
        result[name] = {
            "ratio": round(raw / sum(len(e) for e in encoded), 2),
            "encode_mb_s": round(raw / encode_s / 1e6),
            "decode_mb_s": round(raw / decode_s / 1e6),
        }
    return result


def measure_shard_sizes(tree: Path, tmp: Path, shard_size: int) -> dict:
    result = {"measure": "shard_sizes", "bands": "ALL"}
    for size in (16, 64, 256):
        store = tmp / f"shards_{size}.zarr"
        seconds = write(tree, store, "ALL", size)
        source = SeCoDataset(store, bands="ALL").source
        positions = [(i, k) for i in range(len(source.locations)) for k in range(source.count(i))]
        order = np.random.default_rng(0).permutation(len(positions))
        start = time.process_time()
        for p in order:
            source.read(*positions[p])
        shard_files = [p for p in store.glob("*/c/**/*") if p.is_file()]
        result[str(size)] = {
            "write_s": round(seconds, 2),
            "shard_files": len(shard_files),
            "mean_shard_file_kb": round(sum(p.stat().st_size for p in shard_files) / len(shard_files) / 1e3, 1),
            "read_ms_per_acquisition": round((time.process_time() - start) / len(order) * 1000, 3),
        }
    return result


def measure_size(tree: Path, tmp: Path, shard_size: int) -> dict:
    n_acq = sum(len(list(p.iterdir())) for p in tree.iterdir())
    n_loc = len(list(tree.iterdir()))
    result = {"measure": "size", "acquisitions": n_acq}
    for bands, channels in (("RGB", 3), ("ALL", 12)):
        store = tmp / f"size_{bands}.zarr"
        write(tree, store, bands, shard_size)
        records = json.loads((store / "zarr.json").read_text())["attributes"][ATTRIBUTES]["shards"]
        stored = sum(record["size"] for record in records.values())
        per_acq = stored / n_acq
        pack = channels * SECO_10M_PIXELS
        result[bands] = {
            "store_bytes_per_acquisition": round(per_acq),
            "pack_bytes_per_acquisition": pack,
            "store_over_pack": round(per_acq / pack, 3),
            "store_files_per_1000_locations": round(file_count(store) / n_loc * 1000, 1),
            **{f"{name}_store_gb": round(per_acq * n / 1e9, 2) for name, n in SECO_ACQUISITIONS.items()},
            **{f"{name}_pack_gb": round(pack * n / 1e9, 2) for name, n in SECO_ACQUISITIONS.items()},
        }
    result["tree_files_per_1000_locations"] = round(file_count(tree) / n_loc * 1000, 1)
    result["published_zip_bytes_per_acquisition"] = {
        name: round(PUBLISHED_ZIP_BYTES[name] / n) for name, n in SECO_ACQUISITIONS.items()
    }
    return result


def measure_write(tree: Path, tmp: Path, shard_size: int) -> dict:
    one = write(tree, tmp / "w1.zarr", "ALL", shard_size, workers=1)
    two = write(tree, tmp / "w2.zarr", "ALL", shard_size, workers=2)
    return {
        "measure": "write",
        "bands": "ALL",
        "one_worker_s": round(one, 2),
        "two_workers_s": round(two, 2),
        "speedup": round(one / two, 2),
        "cpus": len(os.sched_getaffinity(0)),
    }


KILL_AFTER_RECORDS = """
import os, signal, sys, threading, time
from pathlib import Path
progress, stop_at = Path(sys.argv[1]) / ".progress", int(sys.argv[2])
def watch():
    while len(list(progress.glob("*.json"))) < stop_at:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)
threading.Thread(target=watch, daemon=True).start()
import prepare_data
prepare_data.run(sys.argv[3:])
"""


def measure_resume(tree: Path, tmp: Path, shard_size: int) -> dict:
    full = write(tree, tmp / "full.zarr", "ALL", shard_size)
    store = tmp / "killed.zarr"
    n_shards = -(-sum(len(list(p.iterdir())) for p in tree.iterdir()) // shard_size)
    flags = ["--data_path", str(tree), "--output_path", str(store), "--bands", "ALL", "--shard_size", str(shard_size)]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_RECORDS, str(store), str(n_shards // 2), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    recorded = len(list((store / ".progress").glob("*.json")))
    rerun = write(tree, store, "ALL", shard_size)
    return {
        "measure": "resume",
        "shards": n_shards,
        "recorded_before_kill": recorded,
        "killed": killed.returncode == -signal.SIGKILL,
        "full_write_s": round(full, 2),
        "rerun_after_kill_s": round(rerun, 2),
    }


def measure_cold_read(tree: Path, tmp: Path, shard_size: int) -> dict:
    store = tmp / "cold.zarr"
    write(tree, store, "ALL", shard_size)
    result = {"measure": "cold_read", "bands": "ALL"}
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        return {**result, "dropped_page_cache": False, "why": str(err)}
    for name, root in (("store", store), ("tree", tree)):
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        source = SeCoDataset(root, bands="ALL").source
        count = sum(source.count(i) for i in range(len(source.locations)))
        start = time.perf_counter()
        for i in range(len(source.locations)):
            for k in range(source.count(i)):
                source.read(i, k)
        result[f"{name}_cold_ms_per_acquisition"] = round((time.perf_counter() - start) / count * 1000, 3)
    return {**result, "dropped_page_cache": True}


def synthetic_store(path: Path, n_acquisitions: int, shard_size: int) -> None:
    """A valid store of ``n_acquisitions`` 1x1 px acquisitions named like SeCo's, 5 per location: one shard
    written by Zarr, copied as every other shard (its content does not matter to opening)."""
    import hashlib

    import zarr
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

    n_shards = -(-n_acquisitions // shard_size)
    group = zarr.open_group(path, mode="w")
    array = group.create_array(
        "10m",
        shape=(n_acquisitions, 1, 1, 1),
        dtype="uint8",
        chunks=(1, 1, 1, 1),
        shards=(shard_size, 1, 1, 1),
        serializer=BytesCodec(),
        compressors=[ZstdCodec(level=3), Crc32cCodec()],
        fill_value=0,
    )
    array[:shard_size] = np.ones((shard_size, 1, 1, 1), np.uint8)
    first = path / shard_key("10m", 0)
    record = {"size": first.stat().st_size, "sha256": hashlib.sha256(first.read_bytes()).hexdigest()}
    for shard in range(1, n_shards):
        target = path / shard_key("10m", shard)
        target.parent.mkdir(parents=True)
        shutil.copyfile(first, target)
    names = [f"2019{m:02d}03T154559_2019{m:02d}03T154611_T18QVG" for m in (1, 4, 7, 10, 12)]
    n_locations = n_acquisitions // 5
    group.attrs.put(
        {
            ATTRIBUTES: {
                "format": "dino-mc-seco-store",
                "version": 1,
                "complete": True,
                "fingerprint": "synthetic",
                "source": "none",
                "n_shards": n_shards,
                "layout": "bands",
                "bands": ["B4"],
                "arrays": {"10m": ["B4"]},
                "grid": [1, 1],
                "rendered": False,
                "values": "synthetic",
                "shard_size": shard_size,
                "locations": [f"{i:07d}" for i in range(n_locations)],
                "acquisitions": [names] * n_locations,
                "shards": {shard_key("10m", s): record for s in range(n_shards)},
            }
        }
    )


FIRST_READ = """
import pickle, sys, time
import datasets.seco  # the imports a worker pays anyway are not counted
start = time.perf_counter()
dataset = pickle.loads(sys.stdin.buffer.read())
dataset.load(len(dataset) - 1, 4)
print(time.perf_counter() - start)
"""


def rss_mb() -> float:
    """Resident memory of this process now (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_startup(tmp: Path, n_acquisitions: int, shard_size: int) -> dict:
    store = tmp / "names.zarr"
    synthetic_store(store, n_acquisitions, shard_size)
    before = rss_mb()
    start = time.perf_counter()
    dataset = SeCoDataset(store, bands="B4")
    open_s = time.perf_counter() - start
    grown = rss_mb() - before
    payload = pickle.dumps(dataset)
    worker = subprocess.run(
        [sys.executable, "-c", FIRST_READ],
        input=payload,
        cwd=REPO,
        capture_output=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return {
        "measure": "startup",
        "acquisitions": n_acquisitions,
        "locations": len(dataset),
        "open_s": round(open_s, 3),
        "main_process_rss_growth_mb": round(grown, 1),
        "spawned_worker_pickle_mb": round(len(payload) / 1e6, 1),
        "spawned_worker_unpickle_and_first_read_s": round(float(worker.stdout), 2),
    }


class CountingFiles(StoreFiles):
    """Store files that count the bytes read and the shard files opened."""

    def __init__(self, root):
        super().__init__(root)
        self.bytes_read, self.opened = 0, set()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        self.bytes_read += length
        self.opened.add(key)
        return super().read_range(key, start, length)


def measure_locality(tree: Path, tmp: Path, shard_size: int, world: int = 4) -> dict:
    store = tmp / "locality.zarr"
    write(tree, store, "RGB", shard_size)
    dataset = SeCoDataset(store)
    shards = [dataset.source.shard_of_location(i) for i in range(len(dataset))]
    result = {
        "measure": "locality",
        "world_size": world,
        "shards": dataset.source.n_shards,
        "store_bytes": folder_bytes(store),
    }
    for shard_shuffle in (False, True):
        per_rank = []
        for rank in range(world):
            source = SeCoStore(store, dataset.bands)
            source.files = CountingFiles(store)
            ranks = {"num_replicas": world, "rank": rank, "shuffle": True, "seed": 0}
            if shard_shuffle:
                sampler = pretraining.ShardBlockSampler(dataset, shards, 1, **ranks)
            else:
                sampler = pretraining.ResumableSampler(dataset, 1, **ranks)
            sampler.set_epoch(1)
            for index, _ in sampler:
                source.read(index, 0)
            per_rank.append({"bytes_read": source.files.bytes_read, "shard_files_opened": len(source.files.opened)})
        result["shard_shuffle" if shard_shuffle else "global_shuffle"] = per_rank
    return result


def main(args: argparse.Namespace) -> None:
    if args.n_locations < 1 or args.startup_acquisitions < 5:
        raise utils.ConfigError("--n_locations must be >= 1 and --startup_acquisitions >= 5")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.data_path is None:
            with contextlib.redirect_stdout(sys.stderr):
                tree = write_seco_demo(tmp / "seco", args.n_locations, n_acquisitions=5, seed=args.seed)
        else:
            tree = Path(args.data_path)
        for name in args.measures:
            work = tmp / name
            work.mkdir()
            if name == "startup":
                result = measure_startup(work, args.startup_acquisitions, args.shard_size)
            else:
                result = globals()[f"measure_{name}"](tree, work, args.shard_size)
            print(json.dumps(result), flush=True)
            shutil.rmtree(work)


def run(argv: list[str] | None = None) -> None:
    utils.run_cli("Zarr store benchmark", get_args_parser, main, argv)


if __name__ == "__main__":
    run()
