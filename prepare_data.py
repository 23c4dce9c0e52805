"""Write a SeCo-layout tree into a sharded, compressed Zarr v3 store, the fast path of pretraining at scale.

    python prepare_data.py --data_path /data/seasonal_contrast_100k --output_path /data/seco100k_rgb.zarr
    python prepare_data.py --data_path /data/seasonal_contrast_100k --output_path /data/seco100k.zarr --bands ALL \
        --workers 8
    python main_dino_mc.py ... --data_path /data/seco100k.zarr
    python prepare_data.py --data_path /data/scenes --output_path /data/scenes.zarr --tile_size 264 --bands ALL

Each acquisition is decoded once here instead of at every access of every epoch, and kept at its native
resolution and dtype, losslessly compressed; training brings it to the 10 m grid exactly as it does with the
tree, so both train the same teacher. A store holds the bands asked (default RGB) and serves any subset of them.

Parallel and resumable: ``--workers N`` processes each write whole shards; a rerun after a crash or a kill
writes only the shards that are missing or fail their recorded sha256; ``--shard_range I:J`` lets the tasks
of a SLURM job array share the work (docs/data.md); the run that finds every shard written makes the store
complete. On a complete store the command says so and exits 0 (``--verify`` re-hashes every shard and
rewrites the damaged ones). Format and guarantees: ``datasets/seco_store.py`` and ``datasets/seco_store_writer.py``.
"""

from __future__ import annotations

import argparse

import utils
from datasets.bands import parse_bands
from datasets.scenes import SceneTiles
from datasets.seco_store import refuse_old_pack
from datasets.seco_store_writer import write_store
from datasets.seco_tree import SeCoTree

# Acquisitions per shard: 256 SeCo acquisitions (about 50 locations) make shard files of tens of MB for the
# 12 bands, few enough files for SeCo-1M (about 12,000) and enough shards to spread over many writers.
DEFAULT_SHARD_SIZE = 256


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Write a SeCo tree into a Zarr store", add_help=False)
    parser.add_argument("--data_path", required=True, type=str, help="Root of the SeCo-layout tree.")
    parser.add_argument("--output_path", required=True, type=str, help="Store to write or finish, e.g. seco.zarr.")
    parser.add_argument("--bands", default="RGB", type=str, help="RGB (default), ALL, or a list such as B4,B3,B2,B8.")
    parser.add_argument("--workers", default=1, type=int, help="Writer processes, each writing whole shards.")
    parser.add_argument(
        "--shard_range",
        default=None,
        type=str,
        help="I:J writes shards I to J-1 only (one task of a job array); default: every shard.",
    )
    parser.add_argument(
        "--shard_size", default=DEFAULT_SHARD_SIZE, type=int, help="Acquisitions per shard file (default 256)."
    )
    parser.add_argument(
        "--verify", action="store_true", help="Re-hash every shard of a complete store and rewrite damaged ones."
    )
    parser.add_argument("--print_every", default=1000, type=int, help="Progress line every this many locations.")
    parser.add_argument(
        "--tile_size",
        default=None,
        type=int,
        help="Cut large scenes into tiles of this many pixels: --data_path is then a GeoTIFF scene or a folder of "
        "them, and each tile becomes a location with one acquisition.",
    )
    parser.add_argument("--tile_overlap", default=0, type=int, help="Pixels shared by neighbouring tiles.")
    parser.add_argument(
        "--max_nodata",
        default=0.0,
        type=float,
        help="Skip tiles with more than this fraction of nodata pixels (default 0: any nodata).",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    with utils.config_errors("--bands"):
        bands = parse_bands(args.bands)
    utils.check_numbers(args, positive=("workers", "shard_size", "print_every"))
    refuse_old_pack(args.data_path)
    if args.tile_size is None:
        tree = SeCoTree(args.data_path, bands)
    else:
        tree = SceneTiles(args.data_path, bands, args.tile_size, args.tile_overlap, args.max_nodata)
    status = write_store(
        tree, args.output_path, args.shard_size, args.workers, args.shard_range, args.verify, args.print_every
    )
    print(status, flush=True)


def run(argv: list[str] | None = None) -> None:
    utils.run_cli("Write a SeCo tree into a Zarr store", get_args_parser, main, argv)


if __name__ == "__main__":
    run()
