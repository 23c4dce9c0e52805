"""--augment_on device: each batched operation equals torchvision's per sample, and the batch's crops equal the
loader workers' crops of the same seeds, in every mode and band set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F

from datasets import device_augment as D
from datasets.demo import Scene, render_rgb, to_uint8
from datasets.transforms import BICUBIC, BILINEAR, MultiCropAugmentation, blur_kernel_size

BOXES = [(0, 0, 50, 60), (10, 20, 150, 120), (5, 7, 84, 84), (0, 3, 30, 187), (2, 1, 190, 180)]


def smooth_image(channels: int = 3, size: tuple[int, int] = (200, 190), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, channels, *size, generator=generator) * 255
    return torch.nn.functional.avg_pool2d(noise, 5, 1, 2)[0].round().to(torch.uint8)


@pytest.mark.parametrize("interpolation", [BILINEAR, BICUBIC])
@pytest.mark.parametrize("size", [84, 224])
def test_uint8_resize_is_torchs_bit_for_bit(interpolation, size):
    """Down- and upsampling, square and elongated regions, one batch with each sample's own region size."""
    image = smooth_image()
    regions = [image[:, top : top + h, left : left + w] for top, left, h, w in BOXES]
    pixels = D.collate([[{"pixels": r, "box": torch.tensor([0, 0, *r.shape[-2:]])}] for r in regions])[0]
    ours = D.resize_regions(pixels["pixels"].float(), pixels["box"], size, interpolation, grey_levels=True)
    for i, region in enumerate(regions):
        expected = F.resize(region, [size, size], interpolation, antialias=True).float()
        assert torch.equal(ours[i], expected), BOXES[i]


@pytest.mark.parametrize("interpolation", [BILINEAR, BICUBIC])
def test_float_resize_of_boxes_in_whole_images(interpolation):
    """DINO-TP's crops of aug(t): a box of each float image, resized as torchvision resizes the cut region."""
    images = torch.stack([smooth_image(seed=s) for s in range(len(BOXES))]).float() / 255.0
    boxes = torch.tensor(BOXES)
    ours = D.resize_regions(images, boxes, 96, interpolation, grey_levels=False)
    for i, (top, left, h, w) in enumerate(BOXES):
        expected = F.resize(images[i, :, top : top + h, left : left + w], [96, 96], interpolation, antialias=True)
        torch.testing.assert_close(ours[i], expected, atol=1e-5, rtol=0)


JITTER_FACTORS = {
    0: ([0.2, 1.0, 1.7], F.adjust_brightness),
    1: ([0.3, 1.2, 1.8], F.adjust_contrast),
    2: ([0.0, 0.6, 1.8], F.adjust_saturation),
    3: ([-0.2, 0.03, 0.15], F.adjust_hue),
}


@pytest.mark.parametrize("op", range(4))
def test_each_jitter_operation_with_per_sample_factors_equals_torchvision(op):
    images = torch.stack([smooth_image(size=(40, 44), seed=s) for s in range(3)]).float() / 255.0
    factors, reference = JITTER_FACTORS[op]
    ours = D.BATCHED_JITTER_OPS[op](images.clone(), torch.tensor(factors))
    for i, factor in enumerate(factors):
        torch.testing.assert_close(ours[i], reference(images[i], factor), atol=2e-6, rtol=0)


def test_jitter_in_each_samples_own_order():
    images = torch.stack([smooth_image(size=(32, 32), seed=s) for s in range(4)]).float() / 255.0
    orders = [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]]
    factors = [[1.4, 0.7, 1.5, 0.1], [0.8, 1.3, 0.4, -0.15], [1.1, 1.6, 0.9, 0.05], [0.6, 0.9, 1.2, -0.05]]
    applied = [True, True, False, True]
    fields = {"jitter": torch.tensor(applied), "order": torch.tensor(orders), "factors": torch.tensor(factors)}
    ours = D.colour_jitter(images.clone(), fields)
    for i in range(4):
        expected = images[i]
        if applied[i]:
            for op in orders[i]:
                expected = JITTER_FACTORS[op][1](expected, factors[i][op])
        torch.testing.assert_close(ours[i], expected, atol=2e-6, rtol=0)


def test_blur_with_each_samples_sigma_equals_torchvision():
    images = torch.stack([smooth_image(channels=12, size=(36, 30), seed=s) for s in range(4)]).float() / 255.0
    sigmas = torch.tensor([0.1, 0.6, 1.37, 2.0])
    ours = D.gaussian_blur(images.clone(), sigmas)
    for i, sigma in enumerate(sigmas.tolist()):
        kernel = blur_kernel_size(sigma)
        torch.testing.assert_close(
            ours[i], F.gaussian_blur(images[i], [kernel, kernel], [sigma, sigma]), atol=1e-6, rtol=0
        )


def test_grayscale_solarize_and_band_jitter_only_where_drawn():
    rgb = torch.stack([smooth_image(size=(20, 20), seed=s) for s in range(3)]).float() / 255.0
    nothing = {"jitter": torch.tensor([False] * 3), "order": torch.zeros(3, 4, dtype=torch.long)}
    fields = {**nothing, "factors": torch.ones(3, 4), "sigma": torch.full((3,), float("nan"))}
    fields.update(gray=torch.tensor([True, False, True]), solarize=torch.tensor([False, True, True]))
    ours = D.colour(rgb.clone(), fields, rgb=True)
    expected = [rgb[0], rgb[1], rgb[2]]
    expected = [F.rgb_to_grayscale(x, 3) if g else x for x, g in zip(expected, fields["gray"].tolist())]
    expected = [F.solarize(x, 128 / 255) if s else x for x, s in zip(expected, fields["solarize"].tolist())]
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)

    ms = torch.stack([smooth_image(channels=12, size=(20, 20), seed=s) for s in range(2)]).float() / 255.0
    gain, stretch = torch.rand(2, 12, 1, 1) + 0.5, torch.rand(2, 12, 1, 1) + 0.5
    fields = {"band_jitter": torch.tensor([True, False]), "gain": gain, "stretch": stretch}
    fields.update(gray=torch.tensor([False, False]), solarize=torch.tensor([False, False]))
    ours = D.colour(ms.clone(), {**fields, "sigma": torch.full((2,), float("nan"))}, rgb=False)
    scaled = ms[0] * gain[0]
    mean = scaled.mean(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(ours[0], ((scaled - mean) * stretch[0] + mean).clamp(0, 1), atol=1e-6, rtol=0)
    assert torch.equal(ours[1], ms[1])


def scene(bands: str, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    reflectance = Scene("mixed", 96, rng).render(150)
    if bands == "RGB":
        return torch.from_numpy(np.ascontiguousarray(render_rgb(reflectance).transpose(2, 0, 1)))
    return torch.from_numpy(to_uint8(reflectance))


@pytest.mark.parametrize("mode", ["dino", "mc", "tp"])
@pytest.mark.parametrize("bands", ["RGB", "ALL"])
def test_device_crops_equal_the_workers_crops_of_the_same_seeds(mode, bands):
    """Whole pipeline, a batch of 6 samples: per sample and crop, the device's crop is the worker's (within
    float rounding), and cutting draws from torch's generator exactly what augmenting in the worker draws."""
    aug = MultiCropAugmentation(mode, bands, size_crops=(80, 72, 64, 56, 48, 40), global_size=96)
    cutter, device = D.RegionCutter(aug), D.DeviceAugment(aug)
    per_sample = 3 if mode == "tp" else 1
    samples = [[scene(bands, 10 * s + k) for k in range(per_sample)] for s in range(6)]
    expected, cuts = [], []
    for seed, images in enumerate(samples):
        torch.manual_seed(seed)
        expected.append(aug(images))
        after_worker = torch.rand(())
        torch.manual_seed(seed)
        cuts.append(cutter(images))
        assert torch.rand(()) == after_worker
    crops = device(D.collate(cuts), "cpu")
    assert [tuple(c.shape[-2:]) for c in crops] == [(s, s) for s in aug.crop_sizes]
    for view, batch in enumerate(crops):
        for i in range(len(samples)):
            torch.testing.assert_close(
                batch[i] * aug.normalize.std, expected[i][view] * aug.normalize.std, atol=1e-5, rtol=0
            )
