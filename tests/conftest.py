"""Shared pytest fixtures: where the real sample data lies, CUDA hidden from CPU tests, and GPU tests' skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """Every test checks CPU behaviour unless it is marked ``gpu``: CUDA is hidden from it and from the processes
    it starts, so that a machine with a GPU takes the paths CI takes (gloo, the CPU's precision defaults) and
    its tests mean the same there. A ``gpu`` test is skipped where torch sees no GPU."""
    if request.node.get_closest_marker("gpu") is not None:
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        return
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
