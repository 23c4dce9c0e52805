"""Multi-crop augmentation per mode (counts, sizes, scales, RGB-only operations) and the evaluation transforms."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from torchvision import transforms as tv_transforms
from torchvision.transforms import v2

from datasets import transforms
from datasets.bands import IMAGENET_MEAN, IMAGENET_STD, RGB_BANDS, S2_BANDS, SECO_MS_MEAN_STD
from datasets.demo import Scene, render_rgb, to_uint8
from datasets.transforms import (
    BICUBIC,
    BILINEAR,
    BandGroups,
    ColourDraw,
    CropDraw,
    MultiCropAugmentation,
    Normalize,
    adjust_hue,
    eval_transform,
    gaussian_blur,
    train_transform,
)

MC_SIZES = [184, 164, 144, 124, 104, 84]


@pytest.fixture(scope="module")
def scene_images() -> dict[str, torch.Tensor]:
    """A realistic 12-band uint8 acquisition (and its stretched RGB) from the demo generator."""
    reflectance = Scene("mixed", 132, np.random.default_rng(1)).render(200)
    return {
        "ms": torch.from_numpy(to_uint8(reflectance)),
        "rgb": torch.from_numpy(np.ascontiguousarray(render_rgb(reflectance).transpose(2, 0, 1))),
    }


def _constant(value: int, bands: int = 3, size: int = 40) -> torch.Tensor:
    return torch.full((bands, size, size), value, dtype=torch.uint8)


def test_dino_mode_crops():
    aug = MultiCropAugmentation(
        "dino", None, global_crops_scale=(0.4, 1), local_crops_scale=(0.05, 0.4), local_crops_number=8
    )
    assert (aug.n_global, aug.n_local) == (2, 8)
    assert aug.crop_sizes == [224, 224] + [96] * 8
    assert aug.crop_scales == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 8
    crops = aug([_constant(100, size=120)])
    assert [c.shape[-1] for c in crops] == aug.crop_sizes and all(c.dtype == torch.float32 for c in crops)


def test_mc_mode_crops_one_per_size():
    aug = MultiCropAugmentation("mc", "RGB")
    assert (aug.n_global, aug.n_local) == (2, 6)
    assert aug.crop_sizes == [224, 224] + MC_SIZES
    assert aug.crop_scales == [(0.32, 1.0)] * 2 + [(0.05, 0.32)] * 6
    crops = aug(_constant(100, size=120))
    assert [tuple(c.shape) for c in crops] == [(3, s, s) for s in aug.crop_sizes]


def test_mc_fewer_locals_use_the_smallest_sizes_and_more_is_an_error():
    assert MultiCropAugmentation("mc", None, local_crops_number=4).crop_sizes == [224, 224, 144, 124, 104, 84]
    assert MultiCropAugmentation("mc", None, local_crops_number=2, size_crops=[84, 200, 96]).crop_sizes[2:] == [84, 96]
    with pytest.raises(ValueError, match="--local_crops_number 7 needs at least 7 sizes in --size_crops"):
        MultiCropAugmentation("mc", None, local_crops_number=7)


def test_tp_mode_three_globals_and_wiring():
    aug = MultiCropAugmentation("tp", None)
    assert (aug.n_global, aug.n_local) == (3, 6)
    assert aug.crop_sizes == [224] * 3 + MC_SIZES
    t0, t1, t2 = _constant(30), _constant(120), _constant(220)
    normalize = Normalize(RGB_BANDS)
    for _ in range(5):
        crops = aug([t0, t1, t2])
        assert len(crops) == 9
        # Global 2 is the raw t2; the locals are raw t0 with no colour augmentation.
        torch.testing.assert_close(crops[1], normalize(_constant(220, size=224)))
        for crop, size in zip(crops[3:], MC_SIZES):
            torch.testing.assert_close(crop, normalize(_constant(30, size=size)))
    with pytest.raises(ValueError, match="3 image"):
        aug([t0])


@pytest.mark.parametrize(
    "mode, n_global, local",
    [("dino", 2, BICUBIC), ("mc", 2, BILINEAR), ("tp", 3, BILINEAR)],
)
def test_interpolation_of_each_crop_is_the_published_one(mode, n_global, local):
    """Global crops bicubic; DINO's 96 px locals bicubic; DINO-MC / DINO-TP's multi-size locals bilinear (the
    published code's RandomResizedCrop(size, scale) without an interpolation argument)."""
    aug = MultiCropAugmentation(mode, "RGB")
    assert [v.interpolation for v in aug.views] == [BICUBIC] * n_global + [local] * aug.n_local


def test_mc_local_crop_is_the_published_bilinear_pil_crop():
    """A DINO-MC local crop equals torchvision's RandomResizedCrop(84, scale) on the PIL image, as the published
    pipeline makes it (same draws; PIL's antialiased bilinear against torch's, within a grey level), and not the
    bicubic crop of the same region."""
    image = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 160, 150) * 255, 5, 1, 2)[0].round().to(torch.uint8)
    aug = MultiCropAugmentation("mc", "RGB")
    view = aug.views[-1]
    torch.manual_seed(3)
    box = tv_transforms.RandomResizedCrop.get_params(image, list(view.scale), (3 / 4, 4 / 3))
    draw = CropDraw(tuple(box), False, ColourDraw())
    ours = aug._crop(BandGroups(image), view, draw)
    torch.manual_seed(3)
    published = tv_transforms.RandomResizedCrop(84, scale=(0.05, 0.32))(F.to_pil_image(image))
    expected = F.pil_to_tensor(published).float() / 255.0
    assert (ours - expected).abs().max() <= 1.0 / 255.0 + 1e-6
    bicubic = aug._crop(BandGroups(image), dataclasses.replace(view, interpolation=BICUBIC), draw)
    assert (bicubic - expected).abs().max() > 2.0 / 255.0


def test_train_transform_is_dinos_eval_linear_crop():
    """The linear-probe / fine-tuning train crop: DINO's RandomResizedCrop(224) (bilinear, torchvision's
    default) + flip on the PIL image, same draws, within a grey level."""
    image = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 64, 64) * 255, 3, 1, 1)[0].round().to(torch.uint8)
    identity = lambda x: x.float() / 255.0  # noqa: E731
    for seed in range(3):
        torch.manual_seed(seed)
        ours = train_transform("RGB", size=224, normalize=identity)(image)
        torch.manual_seed(seed)
        published = tv_transforms.Compose(
            [tv_transforms.RandomResizedCrop(224), tv_transforms.RandomHorizontalFlip(), tv_transforms.ToTensor()]
        )(F.to_pil_image(image))
        assert (ours - published).abs().max() <= 1.0 / 255.0 + 1e-6


def test_crops_are_drawn_with_each_views_scale(monkeypatch):
    drawn = []
    original = tv_transforms.RandomResizedCrop.get_params

    def spy(image, scale, ratio):
        drawn.append(tuple(scale))
        return original(image, scale, ratio)

    monkeypatch.setattr(tv_transforms.RandomResizedCrop, "get_params", staticmethod(spy))
    aug = MultiCropAugmentation("mc", None, global_crops_scale=(0.5, 0.9), local_crops_scale=(0.1, 0.2))
    aug(_constant(50, size=100))
    assert drawn == [(0.5, 0.9)] * 2 + [(0.1, 0.2)] * 6


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"local_crops_scale": (0.5, 0.2)}, "--local_crops_scale"),
        ({"local_crops_scale": (0.0, 0.2)}, "--local_crops_scale"),
        ({"global_crops_scale": (0.4, 1.5)}, "--global_crops_scale"),
        ({"global_crops_scale": (0.4,)}, "--global_crops_scale"),
        ({"global_crops_number": 2}, "--global_crops_number"),
        ({"local_crops_number": -1}, "--local_crops_number"),
    ],
)
def test_bad_arguments_name_the_flag(kwargs, flag):
    mode = "tp" if "global_crops_number" in kwargs else "mc"
    with pytest.raises(ValueError, match=flag):
        MultiCropAugmentation(mode, None, **kwargs)


def test_wrong_band_count_is_rejected():
    with pytest.raises(ValueError, match="expected a 12 x H x W image"):
        MultiCropAugmentation("mc", "ALL")(_constant(10, bands=3))


@pytest.mark.parametrize("mode", ["dino", "mc", "tp"])
@pytest.mark.parametrize("kind", ["rgb", "ms"])
def test_outputs_are_finite_and_roughly_normalised(scene_images, mode, kind):
    bands = "RGB" if kind == "rgb" else "ALL"
    aug = MultiCropAugmentation(mode, bands, local_crops_number=6)
    image = scene_images[kind]
    torch.manual_seed(0)
    crops = aug([image] * 3 if mode == "tp" else [image])
    channels = 3 if kind == "rgb" else 12
    assert [tuple(c.shape) for c in crops] == [(channels, s, s) for s in aug.crop_sizes]
    stacked = torch.cat([c.flatten(1) for c in crops], dim=1)
    assert torch.isfinite(stacked).all()
    assert stacked.mean().abs() < 1.5 and 0.1 < stacked.std() < 3.0


def test_normalize_constants():
    rgb = Normalize(RGB_BANDS)(torch.full((3, 2, 2), 255, dtype=torch.uint8))
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(rgb[:, 0, 0], torch.tensor(expected))
    mean, std = SECO_MS_MEAN_STD["B8"]
    ms = Normalize(["B8"], max_value=1.0)(torch.full((1, 2, 2), (mean + std) / 255.0))
    torch.testing.assert_close(ms, torch.ones(1, 2, 2))


def test_rgb_only_operations_are_not_applied_to_multispectral(scene_images, monkeypatch):
    calls = {"gray": 0, "solarize": 0, "jitter": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(F, "rgb_to_grayscale", counting("gray", F.rgb_to_grayscale))
    monkeypatch.setattr(F, "solarize", counting("solarize", F.solarize))
    monkeypatch.setattr(transforms, "apply_jitter", counting("jitter", transforms.apply_jitter))
    ms = MultiCropAugmentation("mc", "ALL")
    torch.manual_seed(0)
    for _ in range(10):
        ms(scene_images["ms"])
    assert calls == {"gray": 0, "solarize": 0, "jitter": 0}

    rgb = MultiCropAugmentation("mc", "RGB")
    torch.manual_seed(0)
    for _ in range(20):
        rgb(scene_images["rgb"])
    assert calls["gray"] > 0 and calls["solarize"] > 0 and calls["jitter"] > 0


def test_multispectral_jitter_changes_bands_independently():
    """Constant bands stay constant (no mixing across bands), but each band gets its own gain."""
    aug = MultiCropAugmentation("mc", S2_BANDS[:4])
    image = torch.stack([torch.full((60, 60), 100, dtype=torch.uint8)] * 4)
    torch.manual_seed(0)
    ratios = []
    for _ in range(10):
        crop = aug(image)[2] * aug.normalize.std + aug.normalize.mean  # back to [0, 1] units
        assert torch.allclose(crop, crop[:, :1, :1].expand_as(crop), atol=1e-4)
        ratios.append(crop[:, 0, 0] / crop[0, 0, 0])
    assert any((r - 1).abs().max() > 0.05 for r in ratios)


def test_eval_and_train_transforms():
    image = torch.randint(0, 256, (12, 300, 200), dtype=torch.uint8)
    out = eval_transform("ALL")(image)
    assert out.shape == (12, 224, 224) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # The centre crop of a resized image: the middle pixel row of a constant image stays the constant.
    rgb = eval_transform(None)(torch.full((3, 64, 64), 255, dtype=torch.uint8))
    torch.testing.assert_close(rgb[:, 112, 112], Normalize(RGB_BANDS)(torch.full((3, 1, 1), 255.0))[:, 0, 0])
    assert train_transform("RGB", size=96)(image[:3]).shape == (3, 96, 96)

    seen = []
    custom = eval_transform("ALL", resize=64, crop=48, normalize=lambda x: seen.append(x.dtype) or x / 10000.0)
    uint16_as_float = torch.full((12, 120, 120), 5000.0)
    torch.testing.assert_close(custom(uint16_as_float), torch.full((12, 48, 48), 0.5))
    assert seen == [torch.float32]


# ----------------------------------------------------------------------------- fast paths equal the plain ones


def _reference_colour(image: torch.Tensor, augment, rgb: bool) -> torch.Tensor:
    """The photometric steps with torchvision's own kernels, drawing the random numbers in the same order."""
    if augment.jitter is not None and torch.rand(()) < augment.jitter_p:
        if rgb:
            image = v2.ColorJitter(*augment.jitter)(image)
        else:
            bands = image.shape[0]
            b, c = augment.jitter[0], augment.jitter[1]
            gain = torch.empty(bands, 1, 1).uniform_(max(0.0, 1.0 - b), 1.0 + b)
            stretch = torch.empty(bands, 1, 1).uniform_(max(0.0, 1.0 - c), 1.0 + c)
            image = image * gain
            mean = image.mean(dim=(1, 2), keepdim=True)
            image = ((image - mean) * stretch + mean).clamp(0.0, 1.0)
    if rgb and augment.gray_p and torch.rand(()) < augment.gray_p:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    if augment.blur_p and torch.rand(()) < augment.blur_p:
        sigma = 0.1 + 1.9 * float(torch.rand(()))
        kernel = 2 * math.ceil(3.0 * sigma) + 1
        image = F.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    if rgb and augment.solarize_p and torch.rand(()) < augment.solarize_p:
        image = F.solarize(image, 128.0 / 255.0)
    return image


def _reference_view(source: torch.Tensor, view, rgb: bool, normalize: Normalize) -> torch.Tensor:
    """One crop the plain way: torchvision's resized_crop of the planar image, then flip, colour, normalise."""
    top, left, height, width = tv_transforms.RandomResizedCrop.get_params(source, list(view.scale), (3 / 4, 4 / 3))
    crop = F.resized_crop(source, top, left, height, width, [view.size] * 2, view.interpolation, antialias=True)
    crop = crop.float() / 255.0 if crop.dtype == torch.uint8 else crop.clamp(0.0, 1.0)
    if view.augment.flip_p and torch.rand(()) < view.augment.flip_p:
        crop = crop.flip(-1)
    return (_reference_colour(crop, view.augment, rgb) - normalize.mean) / normalize.std


def _reference_multicrop(aug: MultiCropAugmentation, images: list[torch.Tensor]) -> list[torch.Tensor]:
    sources = [images[0]] * len(aug.views)
    if aug.data_mode == "tp":

        def whole(image: torch.Tensor) -> torch.Tensor:
            image = image.float() / 255.0
            if torch.rand(()) < aug.tp_augment.flip_p:
                image = image.flip(-1)
            return _reference_colour(image, aug.tp_augment, aug.rgb)

        t0, t1, t2 = images
        sources = [whole(t1), t2, whole(t0)] + [t0] * aug.n_local
    return [_reference_view(s, v, aug.rgb, aug.normalize) for s, v in zip(sources, aug.views)]


@pytest.mark.parametrize("mode, kind", [("mc", "rgb"), ("mc", "ms"), ("dino", "rgb"), ("tp", "rgb"), ("tp", "ms")])
def test_multicrop_equals_the_plain_torchvision_pipeline(scene_images, mode, kind):
    """Same random draws, same maths: the fast pipeline (band groups, interleaved layouts, in-place steps, uint8
    flips, closed-form hue, shifted-sum or convolution blur) gives the crops of torchvision's kernels, run one
    operation at a time on planar float images."""
    aug = MultiCropAugmentation(mode, "RGB" if kind == "rgb" else "ALL")
    image = scene_images[kind]
    images = [image, image.flip(-2), image.flip(-1)] if mode == "tp" else [image]
    std = aug.normalize.std
    for seed in range(4):
        torch.manual_seed(seed)
        ours = aug(images)
        torch.manual_seed(seed)
        expected = _reference_multicrop(aug, images)
        for a, b in zip(ours, expected):
            assert a.is_contiguous() and a.dtype == torch.float32
            torch.testing.assert_close(a * std, b * std, atol=2e-5, rtol=0)  # in [0, 1] units


def test_fast_hue_equals_torchvision_on_quantised_images_with_ties():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 64, 64)).float() / 255.0  # many ties between channels
    image[:, :8, :8] = 0.5  # grey: zero chroma
    for factor in torch.linspace(-0.5, 0.5, 41).tolist():
        torch.testing.assert_close(adjust_hue(image, factor), F.adjust_hue(image, factor), atol=4e-6, rtol=0)


@pytest.mark.parametrize("bands", [3, 12])
@pytest.mark.parametrize("kernel, sigma", [(3, 0.1), (7, 1.1), (13, 2.0)])
def test_both_blur_paths_equal_torchvision(bands, kernel, sigma):
    image = torch.rand(bands, 30, 41)
    expected = F.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    torch.testing.assert_close(gaussian_blur(image, kernel, sigma), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bands", [3, 4, 5, 12])
@pytest.mark.parametrize("flip", [False, True])
def test_band_groups_resized_crop_equals_one_planar_resize(bands, flip):
    """Resizing 4 interleaved bands at a time agrees with torchvision's resize of the planar image (whose
    uint8 kernel for more than 4 bands is a different one) to the grey level."""
    torch.manual_seed(bands)
    image = torch.nn.functional.avg_pool2d(torch.rand(1, bands, 90, 80) * 255, 5, 1, 2)[0].round().to(torch.uint8)
    crop = BandGroups(image).resized_crop(7, 3, 60, 50, 96, flip)
    expected = F.resized_crop(image, 7, 3, 60, 50, [96, 96], BICUBIC, antialias=True).float() / 255.0
    expected = expected.flip(-1) if flip else expected
    assert crop.shape == (bands, 96, 96) and crop.dtype == torch.float32 and crop.is_contiguous()
    assert (crop - expected).abs().max() <= 1.0 / 255.0 + 1e-6


def test_normalize_writes_the_standard_layout():
    interleaved = torch.rand(1, 3, 10, 12).contiguous(memory_format=torch.channels_last)[0]
    normalize = Normalize(RGB_BANDS, max_value=1.0)
    out = normalize(interleaved)
    assert out.is_contiguous()
    torch.testing.assert_close(out, (interleaved - normalize.mean) / normalize.std)
