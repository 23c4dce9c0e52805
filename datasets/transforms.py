"""Multi-crop augmentation of DINO, DINO-MC and DINO-TP, on tensors of any number of bands.

The crops, scales and probabilities per ``--data_mode`` follow the published code exactly (docs/pretraining.md):

- ``dino``: 2 global crops (``global_size``, ``global_crops_scale``; DINO uses (0.4, 1)) + ``local_crops_number``
  local crops of 96 px (``local_crops_scale``); ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2;
  blur p 1.0 on global 1, blur p 0.1 + solarize p 0.2 on global 2, blur p 0.5 on the locals.
- ``mc``: the same 2 global crops; local crop i has size ``size_crops[i]`` (fewer crops than sizes: the smallest
  sizes), scale ``local_crops_scale``, ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8, grayscale p 0.2, blur p 0.5.
- ``tp``: input [t0, t1, t2] (three acquisitions); aug = ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8 + grayscale p 0.2
  + blur p 0.5 + flip, applied to the whole image; 3 global crops of aug(t1), t2, aug(t0); the local crops are
  the multi-size crops of the raw t0, with no colour augmentation.

All crops are RandomResizedCrop (ratio 3/4..4/3), flips have p 0.5, blur sigma is uniform in [0.1, 2.0],
solarize inverts values >= 128 (of 255). Interpolation as published: global crops bicubic, DINO's 96 px local
crops bicubic, the mc / tp multi-size local crops bilinear (the published code passes no interpolation for
them, so torchvision's default applies); every resize antialiased, as PIL's.

Why tensors and not PIL: Sentinel-2 input has up to 12 bands, which PIL cannot hold, and it is faster: each
crop cuts its region out of the uint8 tensor first and resizes only that region (antialiased), then is
converted to float once. Speed without changing the maths (each fast path is tested equal to torchvision's
kernel, and the whole pipeline to torchvision's operations run one at a time, draw for draw): the resize
runs four bands at a time on a band-interleaved copy of the source (:class:`BandGroups`), flips happen on
the uint8 crop, hue is computed in closed form, the blur is separable, and steps on a fresh crop work in
place where a new crop-sized tensor would cost more than the arithmetic.

Why some operations are RGB-only: saturation, hue, grayscale and solarize are defined on a true-colour image
(hue is an angle in RGB space, grayscale a weighted sum of R, G, B). They are applied only when the bands are
exactly B4, B3, B2. Any other band selection gets, instead of the colour jitter, an independent random
brightness and contrast factor per band (same strengths as the mode's brightness / contrast), which mimics
the band-to-band variation of illumination and atmosphere; blur and flips are band-agnostic and kept.

Normalisation at the end: RGB -> ImageNet mean/std of values / 255; other bands -> per-band
``bands.SECO_MS_MEAN_STD`` (in SeCo's 0..255 uint8 units).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F
from torchvision import transforms as tv_transforms
from torchvision.transforms import v2

from datasets.bands import IMAGENET_MEAN, IMAGENET_STD, SECO_MS_MEAN_STD, is_rgb, parse_bands

DATA_MODES: tuple[str, ...] = ("dino", "mc", "tp")
GLOBAL_CROPS_NUMBER: dict[str, int] = {"dino": 2, "mc": 2, "tp": 3}
# The crop flags a pretraining run leaves unset (None) take their mode's defaults: DINO's own multi-crop for
# dino, the published DINO-MC values for mc and tp.
CROP_DEFAULTS: dict[str, dict] = {
    "dino": {"global_crops_scale": (0.4, 1.0), "local_crops_scale": (0.05, 0.4), "local_crops_number": 8},
    "mc": {"global_crops_scale": (0.32, 1.0), "local_crops_scale": (0.05, 0.32), "local_crops_number": 6},
    "tp": {"global_crops_scale": (0.32, 1.0), "local_crops_scale": (0.05, 0.32), "local_crops_number": 6},
}
DINO_LOCAL_SIZE = 96
BICUBIC = v2.InterpolationMode.BICUBIC
BILINEAR = v2.InterpolationMode.BILINEAR  # torchvision's default, the published mc / tp local crops
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128.0 / 255.0
RESIZE_BANDS = 4  # widest input of torch's vectorised uint8 resize
SHIFTED_BLUR_BANDS = 4  # up to this many bands, blur by shifted sums; above, by depthwise convolution

# (brightness, contrast, saturation, hue) of the ColorJitter of each family of crops.
DINO_JITTER = (0.4, 0.4, 0.2, 0.1)
MC_LOCAL_JITTER = (0.8, 0.8, 0.8, 0.2)
TP_JITTER = (0.4, 0.4, 0.4, 0.1)


class Normalize:
    """Per-band normalisation of values in [0, ``max_value``]: ImageNet statistics for RGB, SeCo's for other bands.

    ``max_value=255`` for uint8 images as read; the multi-crop pipeline works in [0, 1] and uses ``max_value=1``.
    """

    def __init__(self, bands: Sequence[str], max_value: float = 255.0):
        bands = list(bands)
        if is_rgb(bands):
            mean = [m * max_value for m in IMAGENET_MEAN]
            std = [s * max_value for s in IMAGENET_STD]
        else:
            unknown = [b for b in bands if b not in SECO_MS_MEAN_STD]
            if unknown:
                raise ValueError(f"no normalisation statistics for band(s) {','.join(unknown)}")
            mean = [SECO_MS_MEAN_STD[b][0] * max_value / 255.0 for b in bands]
            std = [SECO_MS_MEAN_STD[b][1] * max_value / 255.0 for b in bands]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Float32 output in the standard (contiguous) layout, whatever the dtype and memory layout of ``image``."""
        out = torch.empty(image.shape, dtype=torch.float32)
        return torch.sub(image, self.mean, out=out).div_(self.std)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def check_scale(scale: Sequence[float], flag: str) -> tuple[float, float]:
    """Validate a (min, max) crop-scale pair: two numbers with 0 < min <= max <= 1."""
    if len(scale) != 2:
        raise ValueError(f"{flag} takes two numbers (min max), got {list(scale)}")
    lo, hi = float(scale[0]), float(scale[1])
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"{flag} {lo} {hi}: expected 0 < min <= max <= 1")
    return lo, hi


def _rand() -> float:
    return float(torch.rand(()))


def gaussian_blur(image: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` (same kernel, reflect padding) as two 1-D passes instead of one 2-D one.

    The 2-D Gaussian kernel is the outer product of the 1-D one, so a row pass then a column pass give the
    same image with 2k instead of k^2 multiply-adds per pixel (13 px kernels: 6x fewer). How the passes run
    depends on the band count, whichever measured faster on one CPU thread (see the two helpers).
    """
    half = (kernel - 1) * 0.5
    weights = torch.linspace(-half, half, kernel).div_(sigma).pow_(2).mul_(-0.5).exp_()
    weights = weights.div_(weights.sum())
    pad = kernel // 2
    padded = torch.nn.functional.pad(image.unsqueeze(0), [pad, pad, pad, pad], mode="reflect").squeeze(0)
    if image.shape[-3] <= SHIFTED_BLUR_BANDS:
        return _blur_by_shifted_sums(padded, weights.tolist())
    return _blur_by_convolution(padded, weights)


def _blur_by_shifted_sums(padded: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Each pass as k scaled adds of shifted slices of the padded image: vectorised along rows, so fast for
    a few bands whose crop stays in cache, where it beats a depthwise convolution."""
    kernel = len(weights)
    height, width = padded.shape[-2] - kernel + 1, padded.shape[-1] - kernel + 1
    rows = padded[..., :, :width] * weights[0]
    for i in range(1, kernel):
        rows.add_(padded[..., :, i : i + width], alpha=weights[i])
    out = rows[..., :height, :] * weights[0]
    for i in range(1, kernel):
        out.add_(rows[..., i : i + height, :], alpha=weights[i])
    return out


def _blur_by_convolution(padded: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each pass as a depthwise convolution on a band-interleaved copy, where oneDNN vectorises across bands
    (with many bands it beats shifted sums, whose passes over megabytes of crop miss the cache).

    The result stays band-interleaved; :class:`Normalize` writes it out in the standard layout.
    """
    channels, kernel = padded.shape[-3], len(weights)
    x = padded.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    x = torch.nn.functional.conv2d(x, weights.view(1, 1, 1, -1).expand(channels, 1, 1, kernel), groups=channels)
    x = torch.nn.functional.conv2d(x, weights.view(1, 1, -1, 1).expand(channels, 1, kernel, 1), groups=channels)
    return x.squeeze(0)


class BandGroups:
    """A uint8 C x H x W image made ready for many resized crops: bands in groups of 4, each band-interleaved.

    torch's vectorised uint8 kernel for antialiased bicubic resizing takes at most 4 channels, stored
    band-interleaved (H x W x C in memory); with more bands (12 Sentinel-2 bands) it falls back to a generic
    loop ~4x slower, and a planar image costs it two layout conversions per crop. Rearranging the source once
    per sample is cheaper than either. Bands are resized independently, so the grouping changes nothing but
    the speed (both kernels round to the nearest grey level).
    """

    def __init__(self, image: torch.Tensor):
        self.groups = [part.permute(1, 2, 0).contiguous().permute(2, 0, 1) for part in image.split(RESIZE_BANDS)]

    def resized_crop(
        self,
        top: int,
        left: int,
        height: int,
        width: int,
        size: int,
        flip: bool,
        interpolation: v2.InterpolationMode = BICUBIC,
    ) -> torch.Tensor:
        """Region (top, left, height, width) resized to ``size`` x ``size``, mirrored left-right if ``flip``:
        float32 in [0, 1], planar layout."""
        parts = [
            F.resize(group[:, top : top + height, left : left + width], [size, size], interpolation, antialias=True)
            for group in self.groups
        ]
        crop = parts[0] if len(parts) == 1 else torch.cat(parts)
        if flip:
            crop = crop.flip(-1)
        # One pass: uint8 -> float32 / 255 written straight into a planar tensor.
        return torch.div(crop, 255.0, out=torch.empty(crop.shape, dtype=torch.float32))


def adjust_hue(image: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """torchvision's ``adjust_hue`` on a float RGB image in [0, 1]: rotate the HSV hue, keep S and V.

    Same hue as torchvision's RGB->HSV, but back to RGB in closed form, c = max - min (the chroma):
    channel n in (R 5, G 3, B 1) = max - c * clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6. torchvision builds
    six masks and gathers instead. The whole function is branch-free float arithmetic: on a CPU a comparison
    or ``torch.where`` costs several adds and ``remainder`` more, so the max channel is selected by ``sign`` and
    the wrap by ``floor`` (hue is the costliest step of the colour jitter).
    """
    r, g, b = image.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    # torchvision's hue branches: R is the max (ties included), else G, else B; each selector is 0 or 1.
    is_r = torch.sign(r - maxc).add_(1.0)
    not_r = 1.0 - is_r
    is_g = torch.sign(g - maxc).add_(1.0).mul_(not_r)
    is_b = not_r.sub_(is_g)
    hue = is_r.mul_(g - b)
    hue.addcmul_(is_g, (b - r).add_(chroma, alpha=2.0))
    hue.addcmul_(is_b, (r - g).add_(chroma, alpha=4.0))
    grey = torch.sign(chroma).neg_().add_(1.0)  # 1 where chroma is 0 (hue 0 there, as in torchvision), else 0
    hue.div_(grey.add_(chroma)).add_(6.0 * hue_factor)
    # Few large temporaries, reused in place: allocating a fresh crop-sized tensor per step costs page faults.
    sextant = hue.unsqueeze(-3) + _HUE_OFFSETS
    scratch = torch.div(sextant, 6.0).floor_()
    sextant.sub_(scratch, alpha=6.0)
    ramp = torch.minimum(sextant, torch.neg(sextant, out=scratch).add_(4.0), out=scratch).clamp_(0.0, 1.0)
    return torch.addcmul(maxc.unsqueeze(-3), chroma.unsqueeze(-3), ramp, value=-1.0)


_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


def adjust_brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's ``adjust_brightness`` on a float image: its blend with a black image, ``image * factor +
    0 * (1 - factor)`` clamped to [0, 1], without allocating and adding the black image (same values)."""
    return image.mul(factor).clamp_(0.0, 1.0)


# The ColorJitter operations in torchvision's numbering (the order of its permutation's indices).
JITTER_OPS = (adjust_brightness, F.adjust_contrast, F.adjust_saturation, adjust_hue)


class ColorJitter:
    """``v2.ColorJitter(brightness, contrast, saturation, hue)`` on float RGB in [0, 1], with the fast ``adjust_hue``.

    Same random draws in the same order as torchvision (a permutation of the four operations, then one factor
    per operation), torchvision's contrast and saturation kernels, and equal brightness and hue kernels.
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float):
        self.ranges = [(max(0.0, 1.0 - f), 1.0 + f) for f in (brightness, contrast, saturation)] + [(-hue, hue)]

    def draw(self) -> tuple[list[int], list[float]]:
        """The order of the four operations and their factors, drawn as torchvision draws them."""
        order = torch.randperm(4).tolist()
        return order, [float(torch.empty(1).uniform_(lo, hi)) for lo, hi in self.ranges]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return apply_jitter(image, *self.draw())


def apply_jitter(image: torch.Tensor, order: list[int], factors: list[float]) -> torch.Tensor:
    """The four ColorJitter operations in ``order``, operation i with ``factors[i]``."""
    for i in order:
        image = JITTER_OPS[i](image, factors[i])
    return image


def draw_band_jitter(bands: int, brightness: float, contrast: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent brightness and contrast factors per band, (bands, 1, 1) each, for inputs without a colour space."""
    gain = torch.empty(bands, 1, 1).uniform_(max(0.0, 1.0 - brightness), 1.0 + brightness)
    stretch = torch.empty(bands, 1, 1).uniform_(max(0.0, 1.0 - contrast), 1.0 + contrast)
    return gain, stretch


def band_jitter(image: torch.Tensor, gain: torch.Tensor, stretch: torch.Tensor) -> torch.Tensor:
    """Scale each band by its gain, stretch it about its mean, clamp to [0, 1].

    Works in place on ``image`` (always a fresh crop here): a 12-band crop is megabytes, and allocating a new
    one per step cost more than the arithmetic.
    """
    image = image.mul_(gain)
    mean = image.mean(dim=(-2, -1), keepdim=True)
    return image.sub_(mean).mul_(stretch).add_(mean).clamp_(0.0, 1.0)


def blur_kernel_size(sigma: float) -> int:
    """Odd kernel width covering +-3 sigma, as the published GaussianBlur."""
    return 2 * math.ceil(3.0 * sigma) + 1


@dataclass(frozen=True)
class ColourAugment:
    """Photometric augmentations of one crop family (probabilities; ``jitter`` None = no colour jitter)."""

    jitter: tuple[float, float, float, float] | None = None
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    flip_p: float = 0.0


NO_AUGMENT = ColourAugment(gray_p=0.0)


@dataclass
class ColourDraw:
    """The random outcome of a :class:`ColourAugment` for one image; None / False: the step is not applied."""

    jitter: tuple[list[int], list[float]] | None = None  # RGB: order of the four operations and their factors
    band_jitter: tuple[torch.Tensor, torch.Tensor] | None = None  # other bands: gain and stretch per band
    gray: bool = False
    blur_sigma: float | None = None
    solarize: bool = False


@dataclass
class CropDraw:
    """The random outcome of one crop: its region (top, left, height, width), its flip and its colour steps."""

    box: tuple[int, int, int, int]
    flip: bool
    colour: ColourDraw


@dataclass
class SampleDraw:
    """Everything random about one sample's crops: DINO-TP's whole-image aug() of t1 and t0 (flip, colour),
    then one :class:`CropDraw` per view. Drawn in the order the published pipeline draws, so a sample's seed
    gives the same crops whichever side (loader worker or training device) applies them."""

    whole: list[tuple[bool, ColourDraw]]
    crops: list[CropDraw]


@dataclass(frozen=True)
class CropView:
    """One output crop: its size, its RandomResizedCrop scale range and interpolation, its augmentations."""

    size: int
    scale: tuple[float, float]
    augment: ColourAugment
    interpolation: v2.InterpolationMode = BICUBIC


class MultiCropAugmentation:
    """``[image]`` (dino/mc) or ``[t0, t1, t2]`` (tp) of uint8 C x H x W tensors -> list of normalised crops.

    The list holds ``n_global`` global crops then ``n_local`` local crops; ``crop_sizes`` and ``crop_scales``
    give the size and scale range of each position, in order.
    """

    def __init__(
        self,
        data_mode: str,
        bands: Sequence[str] | str | None,
        global_crops_scale: Sequence[float] = (0.32, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.32),
        local_crops_number: int = 6,
        size_crops: Sequence[int] = (184, 164, 144, 124, 104, 84),
        global_size: int = 224,
        global_crops_number: int | None = None,
    ):
        if data_mode not in DATA_MODES:
            raise ValueError(f"--data_mode {data_mode!r} is not one of {', '.join(DATA_MODES)}")
        expected_globals = GLOBAL_CROPS_NUMBER[data_mode]
        if global_crops_number is not None and global_crops_number != expected_globals:
            raise ValueError(
                f"--global_crops_number {global_crops_number} does not fit --data_mode {data_mode}, "
                f"which makes {expected_globals} global crops"
            )
        if local_crops_number < 0:
            raise ValueError(f"--local_crops_number must be >= 0, got {local_crops_number}")
        if global_size <= 0 or any(s <= 0 for s in size_crops):
            raise ValueError(
                f"crop sizes must be positive, got global {global_size} and --size_crops {list(size_crops)}"
            )
        self.data_mode = data_mode
        self.bands = parse_bands(bands)
        self.rgb = is_rgb(self.bands)
        self.global_crops_scale = check_scale(global_crops_scale, "--global_crops_scale")
        self.local_crops_scale = check_scale(local_crops_scale, "--local_crops_scale")
        self.normalize = Normalize(self.bands, max_value=1.0)

        if data_mode == "dino":
            local_sizes = [DINO_LOCAL_SIZE] * local_crops_number
        else:
            local_sizes = self._smallest_sizes(list(size_crops), local_crops_number)

        if data_mode == "tp":
            self.tp_augment = ColourAugment(jitter=TP_JITTER, blur_p=0.5, flip_p=0.5)
            global_augments = [NO_AUGMENT] * 3
            local_augment = NO_AUGMENT
        else:
            global_augments = [
                ColourAugment(jitter=DINO_JITTER, blur_p=1.0, flip_p=0.5),
                ColourAugment(jitter=DINO_JITTER, blur_p=0.1, solarize_p=0.2, flip_p=0.5),
            ]
            local_jitter = DINO_JITTER if data_mode == "dino" else MC_LOCAL_JITTER
            local_augment = ColourAugment(jitter=local_jitter, blur_p=0.5, flip_p=0.5)
        self.views = [CropView(global_size, self.global_crops_scale, a) for a in global_augments]
        local_interpolation = BICUBIC if data_mode == "dino" else BILINEAR
        self.views += [
            CropView(size, self.local_crops_scale, local_augment, local_interpolation) for size in local_sizes
        ]
        self.n_global = len(global_augments)
        self.n_local = len(local_sizes)
        self.crop_sizes = [v.size for v in self.views]
        self.crop_scales = [v.scale for v in self.views]
        self._jitters = {j: ColorJitter(*j) for j in (DINO_JITTER, MC_LOCAL_JITTER, TP_JITTER)}

    @staticmethod
    def _smallest_sizes(size_crops: list[int], number: int) -> list[int]:
        """The ``number`` smallest of ``size_crops``, kept in the order given (published: crop i has size i)."""
        if number > len(size_crops):
            raise ValueError(
                f"--local_crops_number {number} needs at least {number} sizes in --size_crops, got {size_crops}"
            )
        keep = sorted(sorted(range(len(size_crops)), key=lambda i: size_crops[i])[:number])
        return [size_crops[i] for i in keep]

    @staticmethod
    def _draw_flip(augment: ColourAugment) -> bool:
        return bool(augment.flip_p) and _rand() < augment.flip_p

    def _draw_colour(self, augment: ColourAugment) -> ColourDraw:
        """The photometric draws of ``augment``, in the published order: jitter (then its own draws), grayscale,
        blur (then its sigma), solarize. RGB-only operations are drawn only for RGB."""
        draw = ColourDraw()
        if augment.jitter is not None and _rand() < augment.jitter_p:
            if self.rgb:
                draw.jitter = self._jitters[augment.jitter].draw()
            else:
                draw.band_jitter = draw_band_jitter(len(self.bands), augment.jitter[0], augment.jitter[1])
        draw.gray = bool(self.rgb and augment.gray_p and _rand() < augment.gray_p)
        if augment.blur_p and _rand() < augment.blur_p:
            draw.blur_sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * _rand()
        draw.solarize = bool(self.rgb and augment.solarize_p and _rand() < augment.solarize_p)
        return draw

    def sources(self, images: list[torch.Tensor]) -> list[int]:
        """For each view, the index in ``images`` of the acquisition it is cut from (DINO-TP: aug(t1), t2,
        aug(t0), then the locals of the raw t0)."""
        if self.data_mode != "tp":
            return [0] * len(self.views)
        return [1, 2, 0] + [0] * self.n_local

    def draw(self, images: torch.Tensor | Sequence[torch.Tensor]) -> SampleDraw:
        """Every random choice of one sample's crops, consuming torch's generator as applying them one by one
        always did (DINO-TP's whole-image aug() of t1 then t0, then per view its region, flip and colour)."""
        images = self._check(images)
        whole = []
        if self.data_mode == "tp":
            for _ in range(2):  # aug(t1), aug(t0)
                flip = self._draw_flip(self.tp_augment)
                whole.append((flip, self._draw_colour(self.tp_augment)))
        crops = []
        for index, view in zip(self.sources(images), self.views):
            box = tv_transforms.RandomResizedCrop.get_params(images[index], list(view.scale), CROP_RATIO)
            flip = self._draw_flip(view.augment)
            crops.append(CropDraw(tuple(box), flip, self._draw_colour(view.augment)))
        return SampleDraw(whole, crops)

    def _colour(self, image: torch.Tensor, draw: ColourDraw) -> torch.Tensor:
        """The photometric steps of ``draw`` on a fresh float [0, 1] image.

        Flipping comes first in the published pipeline but is done by the caller: a crop flips while still
        uint8 (4x less memory to move), a whole DINO-TP image just before this.
        """
        if draw.jitter is not None:
            image = apply_jitter(image, *draw.jitter)
        elif draw.band_jitter is not None:
            image = band_jitter(image, *draw.band_jitter)
        if draw.gray:
            image = F.rgb_to_grayscale(image, num_output_channels=3)
        if draw.blur_sigma is not None:
            image = gaussian_blur(image, blur_kernel_size(draw.blur_sigma), draw.blur_sigma)
        if draw.solarize:
            image = F.solarize(image, SOLARIZE_THRESHOLD)
        return image

    def _crop(self, source: BandGroups | torch.Tensor, view: CropView, draw: CropDraw) -> torch.Tensor:
        """Cut the drawn region and resize only it to ``view.size``, as float in [0, 1].

        ``source``: the uint8 image as :class:`BandGroups`, or a float image in [0, 1] (DINO-TP's aug(t)).
        The result is always a new tensor (never a view of ``source``), so later steps may work in place.
        """
        top, left, height, width = draw.box
        if isinstance(source, BandGroups):
            return source.resized_crop(top, left, height, width, view.size, draw.flip, view.interpolation)
        region = source[..., top : top + height, left : left + width]
        crop = F.resize(region, [view.size, view.size], view.interpolation, antialias=True).clamp(0.0, 1.0)
        return crop.flip(-1) if draw.flip else crop

    def _check(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        images = [images] if isinstance(images, torch.Tensor) else list(images)
        expected = 3 if self.data_mode == "tp" else 1
        if len(images) != expected:
            raise ValueError(f"--data_mode {self.data_mode} augments {expected} image(s) per sample, got {len(images)}")
        for image in images:
            if image.ndim != 3 or image.shape[0] != len(self.bands):
                raise ValueError(
                    f"expected a {len(self.bands)} x H x W image for bands {','.join(self.bands)}, "
                    f"got shape {tuple(image.shape)}"
                )
        return images

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        images = self._check(images)
        return self.apply(images, self.draw(images))

    def apply(self, images: list[torch.Tensor], draw: SampleDraw) -> list[torch.Tensor]:
        """The normalised crops of ``draw``: in the loader worker, one crop at a time."""
        if self.data_mode != "tp":
            source = BandGroups(images[0])
            sources = [source] * len(self.views)
        else:
            t0, t1, t2 = images
            raw_t0 = BandGroups(t0)
            whole_t1, whole_t0 = (self._whole_image_augment(t, *d) for t, d in zip((t1, t0), draw.whole))
            sources = [whole_t1, BandGroups(t2), whole_t0] + [raw_t0] * self.n_local
        return [
            self.normalize(self._colour(self._crop(source, view, crop), crop.colour))
            for source, view, crop in zip(sources, self.views, draw.crops)
        ]

    def _whole_image_augment(self, image: torch.Tensor, flip: bool, colour: ColourDraw) -> torch.Tensor:
        """DINO-TP's aug(): colour-augment and flip a whole acquisition before it is cropped."""
        image = image.float().div_(255.0)
        if flip:
            image = image.flip(-1)
        return self._colour(image, colour)

    def __repr__(self) -> str:
        return (
            f"MultiCropAugmentation(mode={self.data_mode}, bands={','.join(self.bands)}, "
            f"crop_sizes={self.crop_sizes}, crop_scales={self.crop_scales})"
        )


def resolve_crop_args(args) -> None:
    """Fill a pretraining run's unset crop flags (:data:`CROP_DEFAULTS`, the published ``--min_scale_crops`` /
    ``--max_scale_crops`` aliases of --local_crops_scale, the mode's global crops); the augmentation checks them."""
    for name, value in CROP_DEFAULTS[args.data_mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    low, high = args.local_crops_scale
    low = low if args.min_scale_crops is None else args.min_scale_crops
    high = high if args.max_scale_crops is None else args.max_scale_crops
    args.local_crops_scale, args.global_crops_scale = (low, high), tuple(args.global_crops_scale)
    if args.global_crops_number is None:
        args.global_crops_number = GLOBAL_CROPS_NUMBER[args.data_mode]


def eval_resize(crop: int) -> int:
    """The resize before a centre crop of ``crop`` px: DINO's Resize 256 + CenterCrop 224, in proportion."""
    return round(crop * 256 / 224)


def eval_transform(
    bands: Sequence[str] | str | None, resize: int | None = None, crop: int = 224, normalize: Callable | None = None
) -> v2.Compose:
    """Evaluation preprocessing: Resize(shorter side ``resize``, bicubic; default :func:`eval_resize`) +
    CenterCrop(``crop``) + normalisation.

    Input: a uint8 C x H x W tensor, or 16-bit values as float32. ``normalize`` receives the cropped tensor
    (dtype as given) and returns a float tensor; the default, :class:`Normalize`, expects SeCo-scale 0..255
    values, so 16-bit products (BigEarthNet, EuroSAT-MS) pass their own.
    """
    return v2.Compose(
        [
            v2.Resize(resize or eval_resize(crop), interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(crop),
            normalize if normalize is not None else Normalize(parse_bands(bands)),
        ]
    )


def train_transform(
    bands: Sequence[str] | str | None,
    size: int = 224,
    scale: Sequence[float] = (0.08, 1.0),
    normalize: Callable | None = None,
) -> v2.Compose:
    """Supervised training preprocessing: RandomResizedCrop(``size``) + horizontal flip + normalisation.

    Bilinear, as DINO's ``eval_linear.py`` and the published ``main_eurosat.py``: both build
    ``RandomResizedCrop(224)`` with torchvision's default interpolation (their evaluation resize is bicubic).
    """
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=check_scale(scale, "scale"), interpolation=BILINEAR, antialias=True),
            v2.RandomHorizontalFlip(),
            normalize if normalize is not None else Normalize(parse_bands(bands)),
        ]
    )
