"""Pack a SeCo-layout tree into one memory-mapped uint8 file, for fast random access during pretraining.

    python prepare_data.py --data_path /data/seasonal_contrast_100k --output_path /data/seco100k_rgb.pack
    python prepare_data.py --data_path /data/seasonal_contrast_100k --output_path /data/seco100k_all.pack --bands ALL
    python main_dino_mc.py ... --data_path /data/seco100k_rgb.pack

Each acquisition is decoded once here (every band file, brought to the acquisition's 10 m grid whatever the
bands, exactly as the training reader does) instead of at every access of every epoch; the training script then
reads a sample as one slice of the memory map. The pack holds the bands asked; training may ask for any subset
of them. Size: C x 264 x 264 bytes per acquisition (SeCo-100K: 21 GB for RGB, 84 GB for the 12 bands), for any
band selection. Layout and guarantees: ``datasets/pack.py``. The pack is written under a temporary name and
renamed when complete, so an interrupted run leaves nothing that training would accept.
"""

from __future__ import annotations

import argparse

import utils
from datasets.bands import parse_bands
from datasets.seco import SeCoDataset


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Pack a SeCo tree", add_help=False)
    parser.add_argument("--data_path", required=True, type=str, help="Root of the SeCo-layout tree to pack.")
    parser.add_argument("--output_path", required=True, type=str, help="Pack folder to create (must not exist).")
    parser.add_argument("--bands", default="RGB", type=str, help="RGB (default), ALL, or a list such as B4,B3,B2,B8.")
    parser.add_argument("--print_every", default=1000, type=int, help="Progress line every this many locations.")
    return parser


def main(args: argparse.Namespace) -> None:
    try:
        bands = parse_bands(args.bands)
    except ValueError as err:
        raise utils.ConfigError(f"--bands: {err}") from None
    if args.print_every < 1:
        raise utils.ConfigError(f"--print_every must be >= 1, got {args.print_every}")
    tree = SeCoDataset(args.data_path, bands=bands)
    progress = utils.Progress(None, "packed locations", args.print_every, total=len(tree))
    output = tree.write_pack(args.output_path, progress=lambda i: progress.update())
    progress.close()
    print(f"wrote {output} (bands {','.join(bands)}); train with --data_path {output}", flush=True)


def run(argv: list[str] | None = None) -> None:
    utils.run_cli("Pack a SeCo tree into a memory-mapped file", get_args_parser, main, argv)


if __name__ == "__main__":
    run()
