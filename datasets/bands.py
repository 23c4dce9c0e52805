"""Sentinel-2 band names, native resolutions and normalisation constants.

One place for the facts every reader needs, so that SeCo, EuroSAT, BigEarthNet and OSCD agree on what
"B8A" or "RGB" means. Band names are canonical without zero padding (``B1`` .. ``B12``, ``B8A``), as in
the SeCo layout; ``B01``-style names (BigEarthNet, OSCD, EuroSAT) are accepted everywhere and mapped here.
"""

from __future__ import annotations

# The 12 bands of Sentinel-2 L2A products as SeCo and BigEarthNet store them (B10, the cirrus band, is
# absent from L2A). This is also the order of ``--bands ALL``.
S2_BANDS: tuple[str, ...] = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")

# L1C products (EuroSAT MS, OSCD) also carry B10.
S2_L1C_BANDS: tuple[str, ...] = S2_BANDS[:9] + ("B10",) + S2_BANDS[9:]

RGB_BANDS: tuple[str, ...] = ("B4", "B3", "B2")

# Ground sampling distance in metres.
RESOLUTION_M: dict[str, int] = {
    "B1": 60,
    "B2": 10,
    "B3": 10,
    "B4": 10,
    "B5": 20,
    "B6": 20,
    "B7": 20,
    "B8": 10,
    "B8A": 20,
    "B9": 60,
    "B10": 60,
    "B11": 20,
    "B12": 20,
}

# BigEarthNet-S2 v1.0 statistics of L2A reflectance x 10000 (mean, std), as published with SeCo.
BIGEARTHNET_MEAN_STD: dict[str, tuple[float, float]] = {
    "B1": (340.76769, 554.81259),
    "B2": (429.94302, 572.41639),
    "B3": (614.21682, 582.87946),
    "B4": (590.23570, 675.88747),
    "B5": (950.68368, 729.89828),
    "B6": (1792.46290, 1096.01481),
    "B7": (2075.46795, 1273.45393),
    "B8": (2218.94553, 1365.45590),
    "B8A": (2266.46037, 1356.13789),
    "B9": (2246.06055, 1302.32929),
    "B11": (1594.42695, 1079.19066),
    "B12": (1009.32729, 818.86747),
}

# SeCo stores uint8 = clip(reflectance, 0, 1) * 255 of the same L2A products, so the statistics above,
# rescaled by 255 / 10000, are the natural per-band normalisation of SeCo multispectral input.
SECO_MS_MEAN_STD: dict[str, tuple[float, float]] = {
    band: (mean * 255.0 / 10000.0, std * 255.0 / 10000.0) for band, (mean, std) in BIGEARTHNET_MEAN_STD.items()
}

# SeCo / DINO-MC quantile stretch of the uint8 RGB band files to a visually normal uint8 image.
SECO_RGB_STRETCH: dict[str, tuple[float, float]] = {"B4": (0.0, 129.0), "B3": (2.0, 103.0), "B2": (3.0, 88.0)}

# ImageNet statistics, used for every 3-band RGB input (the backbones were designed around them).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def two_std_range(band: str, mean_std: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """The SeCo / DINO-MC stretch range of a band, [mean - 2 std, mean + 2 std], in the units of ``mean_std``
    (raw L1C or L2A values, reflectance x 10000, for the EuroSAT and BigEarthNet statistics)."""
    mean, std = mean_std[band]
    return mean - 2 * std, mean + 2 * std


def canonical_band(name: str) -> str:
    """Map ``B02`` / ``b2`` / ``B8a`` to the canonical ``B2`` / ``B8A``; raise ValueError for unknown names."""
    key = name.strip().upper()
    if key.startswith("B") and key[1:].isdigit():
        key = f"B{int(key[1:])}"
    elif key in ("B08A", "B8A"):
        key = "B8A"
    if key not in RESOLUTION_M:
        raise ValueError(f"unknown Sentinel-2 band {name!r}; expected one of {', '.join(S2_L1C_BANDS)}")
    return key


def parse_bands(spec: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Turn a ``--bands`` value into an ordered list of canonical band names.

    ``None`` / ``"RGB"`` -> B4, B3, B2; ``"ALL"`` -> the 12 L2A bands; ``"B4,B3,B2,B8"`` -> that order.
    Duplicates are an error, since they almost always mean a typo in a long list.
    """
    if spec is None:
        return list(RGB_BANDS)
    if isinstance(spec, str):
        upper = spec.strip().upper()
        if upper == "RGB":
            return list(RGB_BANDS)
        if upper == "ALL":
            return list(S2_BANDS)
        items = [s for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    if not items:
        raise ValueError("--bands is empty; expected RGB, ALL or a comma-separated list such as B4,B3,B2,B8")
    bands = [canonical_band(b) for b in items]
    duplicates = sorted({b for b in bands if bands.count(b) > 1})
    if duplicates:
        raise ValueError(f"--bands lists {', '.join(duplicates)} more than once")
    return bands


def is_rgb(bands: list[str] | tuple[str, ...]) -> bool:
    """True when the selection is exactly true colour (B4, B3, B2), the case that gets RGB-only augmentations."""
    return tuple(bands) == RGB_BANDS
