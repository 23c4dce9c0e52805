"""Multi-crop augmentation on the training device (``--augment_on device``): loader workers only read and cut.

A loader worker draws every random choice of its sample from the sample's seed exactly as the worker-side
pipeline does (:meth:`MultiCropAugmentation.draw`), cuts each crop's region out of the uint8 image, and
returns the regions with the draws as numbers (:class:`RegionCutter`). :func:`collate` pads the regions of a
crop position to one size; :class:`DeviceAugment` then makes the whole batch's crops on the training device,
per crop position in a handful of batched operations whatever the batch size:

- resize: antialiased bilinear / bicubic as two matrix products per batch, with each sample's own filter
  weights (those torch's antialiased resize computes, scaled to the region's size), rounded to grey levels
  after each pass as torch's uint8 kernel does;
- flips, and the colour steps with per-sample factors: ColorJitter in each sample's own order of its four
  operations (each operation on the whole batch at each step, kept by mask where a sample's order puts it),
  grayscale, Gaussian blur (a depthwise convolution with each sample's kernel, zero-padded to the widest),
  solarize, the per-band jitter of multispectral input, and normalisation. Samples are selected by mask, never
  by index, so nothing waits for the device;
- DINO-TP's whole-image aug() of t1 and t0 on the whole images, before their global crops are cut.

The result equals the worker-side pipeline per sample within float rounding for the colour steps and within
two grey levels (2/255) for the uint8 resize, whose fixed-point weights and rounding torch's kernel chooses
(``tests/test_device_augment.py`` measures both per operation and per crop, every mode and band set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as tnf
import torchvision.transforms.v2.functional as F

from datasets.transforms import (
    BICUBIC,
    BLUR_SIGMA,
    SOLARIZE_THRESHOLD,
    ColourDraw,
    MultiCropAugmentation,
    adjust_hue,
    blur_kernel_size,
)

MAX_BLUR_KERNEL = blur_kernel_size(BLUR_SIGMA[1])
BICUBIC_A = -0.5  # the antialiased bicubic filter of torch and PIL (not the -0.75 of plain bicubic)


def colour_fields(draw: ColourDraw, bands: int) -> dict[str, torch.Tensor]:
    """A :class:`ColourDraw` as fixed-shape tensors, so that the draws of a batch stack into one tensor each."""
    order, factors = draw.jitter if draw.jitter is not None else ([0, 1, 2, 3], [1.0, 1.0, 1.0, 0.0])
    gain, stretch = draw.band_jitter if draw.band_jitter is not None else (torch.ones(bands, 1, 1),) * 2
    return {
        "jitter": torch.tensor(draw.jitter is not None),
        "order": torch.tensor(order),
        "factors": torch.tensor(factors, dtype=torch.float32),
        "band_jitter": torch.tensor(draw.band_jitter is not None),
        "gain": gain,
        "stretch": stretch,
        "gray": torch.tensor(draw.gray),
        "sigma": torch.tensor(math.nan if draw.blur_sigma is None else draw.blur_sigma, dtype=torch.float32),
        "solarize": torch.tensor(draw.solarize),
    }


class RegionCutter:
    """The loader worker's part: one sample -> per crop position, the uint8 pixels and the draws as tensors.

    ``pixels`` is the crop's region, except for DINO-TP's crops of aug(t1) and aug(t0), whose colour steps
    see the whole acquisition: those carry the whole image, the region's ``box`` and the ``whole_*`` draws.
    """

    def __init__(self, aug: MultiCropAugmentation):
        self.aug = aug

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        images = self.aug._check(images)
        draw = self.aug.draw(images)
        bands = len(self.aug.bands)
        wholes = {0: draw.whole[0], 2: draw.whole[1]} if self.aug.data_mode == "tp" else {}
        out = []
        for position, (index, crop) in enumerate(zip(self.aug.sources(images), draw.crops)):
            top, left, height, width = crop.box
            item = {"flip": torch.tensor(crop.flip), **colour_fields(crop.colour, bands)}
            if position in wholes:
                flip, colour = wholes[position]
                item["pixels"] = images[index]
                item["box"] = torch.tensor(crop.box)
                item["whole_flip"] = torch.tensor(flip)
                item.update({f"whole_{k}": v for k, v in colour_fields(colour, bands).items()})
            else:
                item["pixels"] = images[index][:, top : top + height, left : left + width].clone()
                item["box"] = torch.tensor([0, 0, height, width])
            out.append(item)
        return out


def collate(samples: list[list[dict[str, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
    """Per crop position, every field stacked over the batch; pixels zero-padded to the largest region."""
    batch = []
    for position in range(len(samples[0])):
        items = [sample[position] for sample in samples]
        height = max(item["pixels"].shape[-2] for item in items)
        width = max(item["pixels"].shape[-1] for item in items)
        channels = items[0]["pixels"].shape[0]
        pixels = torch.zeros(len(items), channels, height, width, dtype=items[0]["pixels"].dtype)
        for i, item in enumerate(items):
            pixels[i, :, : item["pixels"].shape[-2], : item["pixels"].shape[-1]] = item["pixels"]
        fields = {key: torch.stack([item[key] for item in items]) for key in items[0] if key != "pixels"}
        batch.append({"pixels": pixels, **fields})
    return batch


def _filter(x: torch.Tensor, interpolation) -> torch.Tensor:
    """The antialiasing filters of torch's resize (and PIL's): triangle for bilinear, Keys cubic a = -0.5."""
    x = x.abs()
    if interpolation != BICUBIC:
        return (1.0 - x).clamp_(min=0.0)
    a = BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resize_weights(starts: torch.Tensor, lengths: torch.Tensor, size: int, out: int, interpolation) -> torch.Tensor:
    """(B, out, size) float64 matrices that resize the span [start, start + length) of a dimension of ``size``
    pixels to ``out`` pixels with antialiasing: for each output pixel, the filter weights torch's antialiased
    resize gives the input pixels it covers (support widened by the downscaling factor), normalised to sum 1."""
    starts, lengths = starts.double(), lengths.double()
    scale = lengths / out
    stretch = scale.clamp(min=1.0)
    support = (2.0 if interpolation == BICUBIC else 1.0) * stretch  # the filter's half-width, widened
    centre = scale[:, None] * (torch.arange(out, dtype=torch.float64, device=scale.device) + 0.5)  # (B, out)
    first = (centre - support[:, None] + 0.5).floor().clamp(min=0.0)
    last = torch.minimum((centre + support[:, None] + 0.5).floor(), lengths[:, None])
    half_width = 2.0 if interpolation == BICUBIC else 1.0
    taps = math.ceil(2.0 * half_width * max(size / out, 1.0)) + 2  # a bound from the shapes: no device sync
    position = first[..., None] + torch.arange(taps, dtype=torch.float64, device=scale.device)  # (B, out, taps)
    weights = _filter((position - centre[..., None] + 0.5) / stretch[:, None, None], interpolation)
    weights = weights * (position < last[..., None])
    weights = weights / weights.sum(-1, keepdim=True)
    matrix = torch.zeros(len(starts), out, size + taps, dtype=torch.float64, device=scale.device)
    columns = (position + starts[:, None, None]).long().clamp_(max=size + taps - 1)  # beyond the span: weight 0
    matrix.scatter_add_(2, columns, weights)
    return matrix[..., :size]


def fixed_point(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's uint8 resize weights: each sample's matrix scaled by 2^p, the largest p (at most 22) that keeps
    its largest weight within int16, and rounded half away from zero. Returns the integer weights (as
    float64) and 2^p per sample."""
    largest = weights.abs().amax(dim=(1, 2))
    precision = torch.zeros_like(largest)
    for bits in range(22):  # torch's search: stop before 0.5 + w_max * 2^(bits + 1) reaches 2^15
        fits = (0.5 + largest * 2.0 ** (bits + 1)).floor() < 2**15
        precision = torch.where(fits & (precision == bits), precision + 1, precision)
    unit = 2.0**precision
    scaled = weights * unit[:, None, None]
    return torch.where(scaled < 0, scaled - 0.5, scaled + 0.5).trunc(), unit


def _pass(values: torch.Tensor, weights: torch.Tensor, grey_levels: bool) -> torch.Tensor:
    """``weights`` (B, out, in) applied along the last dimension of ``values`` (B, C, rows, in).

    With ``grey_levels`` the integer weights are split into a high and a low byte, two float32 products whose
    terms and sums are small integers (below 2^24, also under TF32's rounding of the inputs), so the integer
    sum is exact without float64 arithmetic, which many GPUs run at a small fraction of their speed."""
    if not grey_levels:
        return torch.matmul(values, weights.transpose(1, 2).unsqueeze(1).float())
    integers, unit = fixed_point(weights)
    high = torch.div(integers, 256.0, rounding_mode="floor")
    low = integers - 256.0 * high  # 0..255
    by_high = torch.matmul(values, high.transpose(1, 2).unsqueeze(1).float())
    by_low = torch.matmul(values, low.transpose(1, 2).unsqueeze(1).float())
    summed = by_high.double().mul_(256.0).add_(by_low.double())
    unit = unit.view(-1, 1, 1, 1)
    return summed.add_(unit / 2).div_(unit).floor_().clamp_(0.0, 255.0).float()


def resize_regions(
    pixels: torch.Tensor, boxes: torch.Tensor, size: int, interpolation, grey_levels: bool
) -> torch.Tensor:
    """Each sample's box (top, left, height, width) of ``pixels`` resized to ``size`` x ``size``: width then
    height, as torch's separable kernel. ``grey_levels``: torch's uint8 arithmetic, fixed-point weights and a
    rounding to 0..255 after each pass, computed exactly; else float, as for float images."""
    rows = resize_weights(boxes[:, 0], boxes[:, 2], pixels.shape[-2], size, interpolation)
    cols = resize_weights(boxes[:, 1], boxes[:, 3], pixels.shape[-1], size, interpolation)
    x = _pass(pixels, cols, grey_levels)
    return _pass(x.transpose(-1, -2), rows, grey_levels).transpose(-1, -2)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _blend(image: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` on float images with one factor per sample."""
    factor = _per_sample(factor)
    return (factor * image + (1.0 - factor) * other).clamp_(0.0, 1.0)


def _contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = F.rgb_to_grayscale(image).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(image, mean, factor)


BATCHED_JITTER_OPS = (
    lambda image, factor: (image * _per_sample(factor)).clamp_(0.0, 1.0),
    _contrast,
    lambda image, factor: _blend(image, F.rgb_to_grayscale(image), factor),
    lambda image, factor: adjust_hue(image, factor.view(-1, 1, 1)),
)


def colour_jitter(image: torch.Tensor, fields: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """ColorJitter with each sample's own order of the four operations and its own factors: at each of the four
    steps, every operation runs on the batch and each sample keeps the one its order puts there (selections
    by mask, never by index: no device-to-host synchronisation)."""
    applied, order, factors = fields[prefix + "jitter"], fields[prefix + "order"], fields[prefix + "factors"]
    for step in range(4):
        for op, batched in enumerate(BATCHED_JITTER_OPS):
            chosen = _per_sample(applied & (order[:, step] == op))
            image = torch.where(chosen, batched(image, factors[:, op]), image)
    return image


def gaussian_blur(image: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` with each sample's sigma and its kernel of ``blur_kernel_size(sigma)``
    taps, zero-padded to the widest kernel: the extra taps weigh nothing, so the reflect padding they reach
    changes no value. A NaN sigma (no blur drawn) gets the one-tap kernel [1], which leaves the image as it is."""
    half = MAX_BLUR_KERNEL // 2
    samples, channels = image.shape[:2]
    offsets = torch.arange(-half, half + 1, dtype=torch.float32, device=image.device)
    unblurred = sigma.isnan()[:, None]
    sigma = torch.where(unblurred[:, 0], torch.ones_like(sigma), sigma)
    reach = torch.where(unblurred, torch.zeros_like(sigma[:, None]), (sigma * 3.0).ceil()[:, None])
    weights = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2) * (offsets.abs() <= reach)
    weights = (weights / weights.sum(-1, keepdim=True)).repeat_interleave(channels, dim=0)  # (samples x C, taps)
    x = tnf.pad(image.reshape(1, samples * channels, *image.shape[-2:]), [half] * 4, mode="reflect")
    x = tnf.conv2d(x, weights.view(-1, 1, 1, MAX_BLUR_KERNEL), groups=samples * channels)
    x = tnf.conv2d(x, weights.view(-1, 1, MAX_BLUR_KERNEL, 1), groups=samples * channels)
    return x.view(image.shape)


def colour(image: torch.Tensor, fields: dict[str, torch.Tensor], rgb: bool, prefix: str = "") -> torch.Tensor:
    """The colour steps of each sample's draws, in the worker pipeline's order, on a batch in [0, 1]."""
    if rgb:
        image = colour_jitter(image, fields, prefix)
    else:
        scaled = image * fields[prefix + "gain"]
        mean = scaled.mean(dim=(-2, -1), keepdim=True)
        jittered = ((scaled - mean) * fields[prefix + "stretch"] + mean).clamp_(0.0, 1.0)
        image = torch.where(_per_sample(fields[prefix + "band_jitter"]), jittered, image)
    if rgb:
        grey = F.rgb_to_grayscale(image, num_output_channels=3)
        image = torch.where(_per_sample(fields[prefix + "gray"]), grey, image)
    image = gaussian_blur(image, fields[prefix + "sigma"])
    if rgb:
        solarize = _per_sample(fields[prefix + "solarize"]) & (image >= SOLARIZE_THRESHOLD)
        image = torch.where(solarize, 1.0 - image, image)
    return image


def flip(image: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_sample(flags), image.flip(-1), image)


class DeviceAugment:
    """The training device's part: a collated batch of regions and draws -> the list of normalised crops."""

    def __init__(self, aug: MultiCropAugmentation):
        self.aug = aug
        self.mean, self.std = aug.normalize.mean, aug.normalize.std

    def __call__(self, batch: list[dict[str, torch.Tensor]], device: str | torch.device) -> list[torch.Tensor]:
        mean, std = self.mean.to(device), self.std.to(device)
        crops = []
        for view, item in zip(self.aug.views, batch):
            fields = {key: value.to(device, non_blocking=True) for key, value in item.items()}
            pixels = fields["pixels"].float()
            if "whole_flip" in fields:  # DINO-TP's aug(t): the whole acquisition's colour steps, then the crop
                whole = colour(flip(pixels.div_(255.0), fields["whole_flip"]), fields, self.aug.rgb, "whole_")
                crop = resize_regions(whole, fields["box"], view.size, view.interpolation, False).clamp_(0.0, 1.0)
            else:
                crop = resize_regions(pixels, fields["box"], view.size, view.interpolation, True).div_(255.0)
            crop = colour(flip(crop, fields["flip"]), fields, self.aug.rgb)
            crops.append((crop - mean) / std)
        return crops
