"""Shared pytest fixtures: where the real sample data lies, and a small pretraining argument set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Keep intra-op threads at the machine's size so that parallel helpers do not oversubscribe the CPU.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real satellite samples beside the repository; skip (only) when a user's clone lacks them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    return SHARED_DATA
