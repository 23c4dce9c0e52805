"""The published DINO-MC and DINO-TP checkpoints: the one table of their names, Drive ids, inputs and numbers.

``hubconf.py`` builds its torch.hub entries from it, ``export_weights.py`` takes its names in place of a
checkpoint, the README's checkpoint table is checked against it (``tests/test_published.py``; ``python
published.py`` prints that table, ``python published.py NAME`` the Drive id) and the tests read their ids from it.

All eight were pretrained on SeCo-100K (Sentinel-2, five seasons per location) in RGB: bands B4, B3, B2 as
SeCo's uint8 previews. Their input: RGB scaled to [0, 1], then ImageNet's mean and std, at 224 px (Resize 256 +
CenterCrop 224, as in the evaluations). The EuroSAT numbers are the published ones (top-1 %, k-NN / linear probe
/ full fine-tuning); DINO-TP has no published fine-tuning number.

This module imports only ``datasets.bands`` (plain constants), so anything may read it without loading torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from datasets.bands import IMAGENET_MEAN, IMAGENET_STD
from datasets.bands import RGB_BANDS as RGB


@dataclass(frozen=True)
class Published:
    """One published checkpoint. ``arch`` and ``patch_size`` are the values of ``--arch`` / ``--patch_size``
    that build its backbone; ``knn`` / ``linear`` / ``finetune`` its published EuroSAT top-1 (%)."""

    name: str  # the torch.hub entry, and the name export_weights.py takes
    method: str  # "DINO-MC" or "DINO-TP"
    arch: str
    patch_size: int
    backbone: str  # how the paper names the backbone
    feature: str  # what the backbone returns
    feature_dim: int
    drive_id: str  # the Google Drive file id (``--pretrained_weights`` takes it as it is)
    knn: float
    linear: float
    finetune: float | None = None
    bands: tuple[str, ...] = RGB
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: int = 224
    pretraining_data: str = "SeCo-100K"

    @property
    def url(self) -> str:
        """The Google Drive share link."""
        return f"https://drive.google.com/file/d/{self.drive_id}/view"

    @property
    def flags(self) -> str:
        """The flags that build this backbone in the project's scripts."""
        patch = f" --patch_size {self.patch_size}" if self.arch.startswith("vit") else ""
        return f"--arch {self.arch}{patch}"

    def eurosat(self) -> str:
        """The published EuroSAT numbers, in words."""
        numbers = f"k-NN {self.knn:.2f}, linear {self.linear:.2f}"
        if self.finetune is None:
            return f"{numbers} (no published fine-tuning number)"
        return f"{numbers}, fine-tuning {self.finetune:.2f}"

    def docstring(self) -> str:
        """The torch.hub entry's docstring."""
        mean, std = (", ".join(f"{v:g}" for v in values) for values in (self.mean, self.std))
        return (
            f"{self.method} {self.backbone} ({self.feature_dim}-d {self.feature}): the teacher backbone, without "
            f"its projection head.\n\n"
            f"Pretrained on {self.pretraining_data}, bands {', '.join(self.bands)}. Input: [0, 1] RGB normalised "
            f"with mean ({mean}) and std ({std}), {self.input_size} px.\n"
            f"EuroSAT: {self.eurosat()}.\n"
            f"Weights: Google Drive {self.drive_id} ({self.flags}); ``pretrained=False`` gives random weights, "
            f'``checkpoint_key="student"`` the student.'
        )


def _vit(method: str, drive_id: str, knn: float, linear: float, finetune: float | None = None) -> Published:
    name = f"{method.lower().replace('-', '_')}_vits8"
    return Published(name, method, "vit_small", 8, "ViT-S/8", "CLS feature", 384, drive_id, knn, linear, finetune)


def _cnn(method: str, short: str, arch: str, backbone: str, drive_id: str, *numbers: float) -> Published:
    name = f"{method.lower().replace('-', '_')}_{short}"
    return Published(name, method, arch, 16, backbone, "pooled feature", 2048, drive_id, *numbers)


def _swin(method: str, drive_id: str, *numbers: float) -> Published:
    name = f"{method.lower().replace('-', '_')}_swin_t"
    return Published(name, method, "swin_t", 16, "Swin-T", "pooled feature", 768, drive_id, *numbers)


PUBLISHED: tuple[Published, ...] = (
    _vit("DINO-MC", "18RqKqZYzigOjwbyNzLsys8bmwqxrNhyt", 93.41, 94.09, 98.15),
    _cnn("DINO-MC", "resnet50", "resnet50", "ResNet-50", "1Tku4QoQDc3BU1BOr8PzQWFPyVStUDsVE", 93.94, 95.59, 98.69),
    _cnn("DINO-MC", "wrn50_2", "wide_resnet50_2", "WRN-50-2", "1WlNDoks3Uo_Al5pUHWrhQpljDrt4Ip__", 95.65, 95.70, 98.78),
    _swin("DINO-MC", "1rod3PxdZ2OGqNJxLp5CAtXm7vIsLO7us", 93.22, 90.54, 98.43),
    _vit("DINO-TP", "1BIRR56wCwTDlB4_eQTA0DpYYPHACHfxN", 93.15, 93.89),
    _cnn("DINO-TP", "resnet50", "resnet50", "ResNet-50", "1mHR9uv5G7-9FpEzGBvdEOcJcWbnHOGEV", 79.05, 86.70),
    _cnn("DINO-TP", "wrn50_2", "wide_resnet50_2", "WRN-50-2", "1MoclNnRlSGOKhudm5lreDYSxYJqciQar", 86.27, 88.15),
    _swin("DINO-TP", "1E00rYPB2wFvnq7exmQwVRe1koQ98BECL", 92.83, 91.94),
)
BY_NAME: dict[str, Published] = {entry.name: entry for entry in PUBLISHED}

TABLE_HEADER = (
    "| name | method | backbone | flags | Google Drive id | EuroSAT k-NN | linear | fine-tuning |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def markdown_table() -> str:
    """The README's checkpoint table (tests/test_published.py checks that the README holds exactly this)."""
    rows = [TABLE_HEADER]
    for e in PUBLISHED:
        finetune = "-" if e.finetune is None else f"{e.finetune:.2f}"
        rows.append(
            f"| `{e.name}` | {e.method} | {e.backbone} | `{e.flags}` | `{e.drive_id}` | {e.knn:.2f} | {e.linear:.2f} "
            f"| {finetune} |"
        )
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    """``python published.py``: the README's table; ``python published.py NAME``: NAME's Drive id, for
    ``--pretrained_weights $(python published.py dino_mc_vits8)``."""
    if not argv:
        print(markdown_table())
        return 0
    unknown = [name for name in argv if name not in BY_NAME]
    if unknown:
        print(f"error: no published checkpoint {unknown[0]}; one of {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    print("\n".join(BY_NAME[name].drive_id for name in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
