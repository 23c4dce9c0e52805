"""Self-attention maps of a ViT checkpoint on one image: the last block's CLS attention, one PNG per head.

    python visualize_attention.py --arch vit_small --patch_size 8 --pretrained_weights CKPT \
        --image_path tile.tif --image_size 480 --output_dir attention

The image (JPEG / PNG, or a GeoTIFF with ``--bands``) is resized to ``--image_size``, cut to a multiple of the
patch size, and normalised as in pretraining. Written to ``output_dir``: ``img.png`` (what the network saw, as
a picture), ``attn-head<i>.png`` (how much the CLS token of the last block attends to each patch, upsampled
to the image by repeating each patch's value), and ``attn-overlay.png`` (the mean over heads on the image).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import matplotlib.image
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

import utils
from datasets import DataError
from datasets.bands import RGB_BANDS, parse_bands
from datasets.eurosat import MS_FILE_BANDS
from datasets.eurosat import normalize as normalize_l1c
from datasets.io import GEOTIFF_EXTENSIONS, read_raster
from datasets.transforms import Normalize

PICTURE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DINO-MC attention maps", add_help=False)
    utils.add_backbone_args(parser)
    utils.add_pretrained_args(parser)
    parser.add_argument("--image_path", required=True, type=str, help="GeoTIFF, JPEG or PNG image.")
    parser.add_argument(
        "--file_bands",
        default=None,
        type=str,
        help="Band order stored in a GeoTIFF (a list like B1,B2,...,B12,B8A, or 'eurosat' for the EuroSAT MS "
        "order), to pick --bands from it. Default: the file holds exactly --bands, in that order.",
    )
    parser.add_argument(
        "--image_size", default=[480, 480], nargs="+", type=int, help="Size the image is resized to (H [W])."
    )
    parser.add_argument("--output_dir", default=".", type=str, help="Where the PNGs are written.")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if len(args.image_size) > 2 or min(args.image_size) < args.patch_size:
        raise utils.ConfigError(
            f"--image_size {' '.join(map(str, args.image_size))}: expected one or two sizes of at least "
            f"--patch_size {args.patch_size}"
        )
    with utils.config_errors():
        args.band_list = parse_bands(args.bands)
        if args.file_bands is not None:
            args.file_band_list = (
                list(MS_FILE_BANDS) if args.file_bands.lower() == "eurosat" else parse_bands(args.file_bands)
            )


def select_bands(stack: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """The ``--bands`` of a (C, H, W) GeoTIFF stack, in the order asked."""
    path = args.image_path
    if args.file_bands is None:
        if stack.shape[0] != len(args.band_list):
            raise utils.ConfigError(
                f"{path} has {stack.shape[0]} bands but --bands {args.bands} asks for {len(args.band_list)}; "
                "pass --file_bands (the band order stored in the file) to pick them"
            )
        return stack
    if stack.shape[0] != len(args.file_band_list):
        raise utils.ConfigError(f"{path} has {stack.shape[0]} bands but --file_bands names {len(args.file_band_list)}")
    absent = [b for b in args.band_list if b not in args.file_band_list]
    if absent:
        raise utils.ConfigError(f"--bands {','.join(absent)} not in --file_bands {args.file_bands}")
    return stack[[args.file_band_list.index(b) for b in args.band_list]]


def load_image(args: argparse.Namespace) -> torch.Tensor:
    """The image as a (C, H, W) tensor in its stored dtype (uint8, or 16-bit values as float32)."""
    path = Path(args.image_path)
    if not path.is_file():
        raise utils.ConfigError(f"--image_path {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in PICTURE_EXTENSIONS:
        if tuple(args.band_list) != RGB_BANDS:
            raise utils.ConfigError(f"--bands {args.bands}: {path} is an RGB picture; use --bands RGB")
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB")).transpose(2, 0, 1).copy()
        except OSError as err:
            raise DataError(f"cannot read image {path}: {err}") from None
    elif suffix in GEOTIFF_EXTENSIONS:
        array = select_bands(read_raster(path), args)
    else:
        raise utils.ConfigError(f"--image_path {path}: expected a {'/'.join(GEOTIFF_EXTENSIONS + PICTURE_EXTENSIONS)}")
    if array.dtype == np.uint8:
        return torch.from_numpy(array)
    if array.dtype in (np.uint16, np.int16):
        return torch.from_numpy(array.astype(np.float32))
    raise DataError(f"{path} holds {array.dtype} values; expected 8-bit (SeCo, RGB) or 16-bit L1C (EuroSAT MS)")


def prepare(image: torch.Tensor, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(resized raw image, normalised network input), both cut to whole patches.

    8-bit images get the pretraining normalisation (ImageNet statistics for RGB, SeCo's for other bands);
    16-bit ones are L1C reflectance x 10000 and get EuroSAT MS's per-band statistics.
    """
    size = args.image_size if len(args.image_size) == 2 else args.image_size * 2
    resized = TF.resize(image.float(), size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    if image.dtype == torch.uint8:
        resized = resized.clamp(0, 255)
    h, w = (s - s % args.patch_size for s in resized.shape[-2:])
    resized = resized[:, :h, :w]
    if image.dtype == torch.uint8:
        return resized, Normalize(args.band_list)(resized)
    return resized, normalize_l1c(resized, args.band_list)


def display_rgb(image: torch.Tensor, bands: list[str], eight_bit: bool) -> np.ndarray:
    """An (H, W, 3) float picture in [0, 1]: true colour when B4, B3, B2 are there, else the first band in grey.
    16-bit values are stretched between their 2nd and 98th percentiles, as satellite viewers do."""
    if all(b in bands for b in RGB_BANDS):
        picture = image[[bands.index(b) for b in RGB_BANDS]]
    else:
        picture = image[:1].expand(3, -1, -1)
    picture = picture.permute(1, 2, 0).numpy()
    if eight_bit:
        return picture / 255.0
    low, high = np.percentile(picture, 2), np.percentile(picture, 98)
    return np.clip((picture - low) / max(high - low, 1e-6), 0.0, 1.0)


def cls_attention(model: torch.nn.Module, x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(heads, H, W): the last block's attention of the CLS token to each patch, one value per pixel."""
    h, w = x.shape[-2] // patch_size, x.shape[-1] // patch_size
    with torch.no_grad():
        attentions = model.get_last_selfattention(x[None])
    maps = attentions[0, :, 0, 1:].reshape(-1, h, w)
    return F.interpolate(maps[None], scale_factor=patch_size, mode="nearest")[0]


def save_pictures(maps: torch.Tensor, picture: np.ndarray, output_dir: Path) -> list[Path]:
    """The input picture, one colour-mapped PNG per head, and the mean map blended over the picture."""
    written = [output_dir / "img.png"]
    Image.fromarray((picture * 255).round().astype(np.uint8)).save(written[0])
    for i, head in enumerate(maps.numpy()):
        path = output_dir / f"attn-head{i}.png"
        matplotlib.image.imsave(path, head, format="png")
        written.append(path)
    mean = maps.mean(0).numpy()
    mean = (mean - mean.min()) / max(float(mean.max() - mean.min()), 1e-12)
    heat = matplotlib.colormaps["inferno"](mean)[..., :3]
    overlay = 0.5 * picture + 0.5 * heat
    written.append(output_dir / "attn-overlay.png")
    Image.fromarray((overlay * 255).round().astype(np.uint8)).save(written[-1])
    return written


def main(args: argparse.Namespace) -> None:
    check_args(args)
    if not utils.is_vit_arch(args.arch):
        raise utils.ConfigError(f"--arch {args.arch}: attention maps need a ViT (vit_tiny, vit_small, vit_base)")
    model, _ = utils.load_backbone(
        args.arch, args.patch_size, args.band_list, args.pretrained_weights, args.checkpoint_key, args.adapt_input
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()

    image = load_image(args)
    resized, x = prepare(image, args)
    maps = cls_attention(model, x.to(device), args.patch_size).float().cpu()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    picture = display_rgb(resized, args.band_list, image.dtype == torch.uint8)
    written = save_pictures(maps, picture, output_dir)
    print(f"{len(maps)} attention maps of {resized.shape[-2]}x{resized.shape[-1]} px written to {output_dir}/")
    print("\n".join(str(p) for p in written))


def run(argv: list[str] | None = None) -> None:
    utils.run_cli("DINO-MC attention maps", get_args_parser, main, argv)


if __name__ == "__main__":
    run()
