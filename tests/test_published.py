"""published.py is the one table of the published checkpoints: the README's table, hubconf's entries and the
tests read it, and the README shows exactly its rows."""

from __future__ import annotations

import re

import published
import utils
from tests.conftest import REPO

README = REPO / "README.md"
ROW = re.compile(r"^\| `(dino_(?:mc|tp)_\w+)` \|.*\|$", re.MULTILINE)


def test_readme_checkpoint_table_is_the_published_table():
    """The README's checkpoint table is ``python published.py``'s output, row for row (names, method, backbone,
    flags, EuroSAT numbers): regenerate it with that command when the table changes."""
    text = README.read_text()
    assert published.markdown_table() in text, "README checkpoint table differs from `python published.py`"
    assert ROW.findall(text) == [entry.name for entry in published.PUBLISHED]  # no other, stale rows


def test_table_entries_are_consistent():
    assert len(published.PUBLISHED) == len(published.BY_NAME) == 8
    for entry in published.PUBLISHED:
        assert utils.google_drive_id(entry.drive_id) == entry.drive_id  # --pretrained_weights takes it as a bare id
        assert entry.method in ("DINO-MC", "DINO-TP")
        assert entry.name.startswith(entry.method.lower().replace("-", "_") + "_")
        assert entry.bands == ("B4", "B3", "B2") and entry.input_size == 224
        assert (entry.finetune is None) == (entry.method == "DINO-TP")  # DINO-TP has no published fine-tuning
        assert utils.check_arch(entry.arch, entry.patch_size) == entry.arch  # a valid --arch / --patch_size
    assert len({entry.drive_id for entry in published.PUBLISHED}) == 8
