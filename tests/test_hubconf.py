"""hubconf.py through torch.hub itself: every entry builds, and pretrained=True downloads, caches and loads.

No network here: the published checkpoints' Google Drive downloader (gdown, as torchvision calls it) is pointed
at a checkpoint served by a local http.server under the published file id; everything else (the cache,
the .partial download, the strict loading of the teacher) is the real code path of ``--pretrained_weights``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gdown
import pytest
import torch

import hubconf
import published
import utils
import vision_transformer as vits

REPO = Path(__file__).resolve().parents[1]
# entry -> feature size of the backbone
ENTRIES = {entry.name: entry.feature_dim for entry in published.PUBLISHED}
TP_VITS8_ID = published.BY_NAME["dino_tp_vits8"].drive_id


def test_every_published_model_has_an_entry():
    """What torch.hub.list shows (its rule: the public callables of hubconf), each with its EuroSAT numbers."""
    entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert sorted(entries) == sorted(ENTRIES) and len(ENTRIES) == 8
    for name in entries:
        entry = published.BY_NAME[name]
        assert getattr(hubconf, name).__name__ == name
        assert f"EuroSAT: k-NN {entry.knn:.2f}, linear {entry.linear:.2f}" in getattr(hubconf, name).__doc__
        assert entry.drive_id in getattr(hubconf, name).__doc__


@pytest.mark.parametrize("name", ENTRIES)
@torch.no_grad()
def test_entry_builds_the_backbone_without_classifier(name):
    model = torch.hub.load(str(REPO), name, source="local", pretrained=False)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, ENTRIES[name])


@pytest.fixture
def drive_served(http_root, monkeypatch):
    """gdown.download(id=...) fetches ``served/<id>`` from conftest's local server; yields (folder,
    requested paths)."""
    served, base, requests = http_root
    real_download = gdown.download

    def from_local_server(url=None, output=None, quiet=False, id=None, **kwargs):
        return real_download(url=f"{base}/{id}", output=output, quiet=True)

    monkeypatch.setattr(gdown, "download", from_local_server)
    return served, requests


@pytest.fixture(scope="module")
def published_vits8(tmp_path_factory) -> tuple:
    """A checkpoint in the published layout (``args`` Namespace, DDP student, teacher with a DINO head):
    (path, teacher, student); written once for the module (ViT-S/8 is 88 MB)."""
    path = tmp_path_factory.mktemp("published") / "checkpoint.pth"
    teacher, student = (vits.vit_small(patch_size=8) for _ in range(2))
    for p in teacher.parameters():
        p.data.normal_(std=0.02)
    heads = [vits.DINOHead(384, 16, hidden_dim=16, bottleneck_dim=8) for _ in range(2)]
    torch.save(
        {
            "teacher": utils.MultiCropWrapper(teacher, heads[0]).state_dict(),
            "student": {f"module.{k}": v for k, v in utils.MultiCropWrapper(student, heads[1]).state_dict().items()},
            "args": argparse.Namespace(arch="vit_small", patch_size=8),
            "epoch": 100,
        },
        path,
    )
    return path, teacher, student


def test_pretrained_downloads_once_and_loads_the_teacher(tmp_path, monkeypatch, drive_served, published_vits8):
    served, requests = drive_served
    path, teacher, student = published_vits8
    (served / TP_VITS8_ID).symlink_to(path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("DINO_MC_CACHE", str(cache))

    model = torch.hub.load(str(REPO), "dino_tp_vits8", source="local")  # pretrained=True is the default
    assert model.state_dict().keys() == teacher.state_dict().keys()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in model.state_dict().items())
    assert requests == [f"/{TP_VITS8_ID}"]
    assert [p.name for p in cache.iterdir()] == [f"gdrive-{TP_VITS8_ID}.pth"]

    again = torch.hub.load(str(REPO), "dino_tp_vits8", source="local", checkpoint_key="student")
    assert torch.equal(again.pos_embed, student.pos_embed)
    assert requests == [f"/{TP_VITS8_ID}"]  # the second load reads the cache


def test_pretrained_with_other_bands_is_one_clear_error(tmp_path, monkeypatch, drive_served, published_vits8):
    served, _ = drive_served
    (served / TP_VITS8_ID).symlink_to(published_vits8[0])
    monkeypatch.setenv("DINO_MC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(utils.ConfigError, match="does not fit this backbone: .*wrong shape"):
        hubconf.dino_tp_vits8(in_chans=12)


def test_offline_download_error_names_the_checkpoint_not_a_command_line_flag(tmp_path, monkeypatch, drive_served):
    """Nothing served under the id (as offline): the error is the Python API's own words, one line."""
    monkeypatch.setenv("DINO_MC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(utils.ConfigError) as caught:
        hubconf.dino_tp_vits8()
    message = str(caught.value)
    assert message.startswith(f"published checkpoint dino_tp_vits8 {TP_VITS8_ID}: download failed")
    assert "--" not in message.split(": download failed")[0] and "\n" not in message
