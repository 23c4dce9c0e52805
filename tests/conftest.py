"""Shared pytest fixtures: where the real sample data lies, CUDA hidden from CPU tests, and GPU tests' skip; a local
HTTP server and a tiny EuroSAT RGB archive that several modules' tests use.

``tests`` is a package imported from the repository root: test modules import the shared helpers as
``from tests.<helper module> import ...`` (never from another test module), and so do the child processes that
the tests start from the repository root.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from datasets.demo import write_seco_demo
from tests.downstream_fixtures import write_eurosat_rgb

# The helper modules' asserts report their operands, as the test modules' do.
pytest.register_assert_rewrite("tests.fixtures", "tests.processes")

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


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A folder served on 127.0.0.1 by a thread; yields (folder, base URL, list of requested paths)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    root = tmp_path / "served"
    root.mkdir()
    CountingHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", CountingHandler.requests
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def rgb_root(tmp_path_factory) -> Path:
    """A EuroSAT RGB archive of 32 px flat-colour images, 6 per class of AnnualCrop, Forest, River and SeaLake
    (the k-NN runs of tests.tiny_runs.TINY_KNN)."""
    from tests.downstream_fixtures import write_eurosat_rgb

    root = tmp_path_factory.mktemp("eurosat_rgb")
    write_eurosat_rgb(root, {"AnnualCrop": 6, "Forest": 6, "River": 6, "SeaLake": 6}, size=32)
    return root


@pytest.fixture(scope="session")
def seco_demo(tmp_path_factory) -> Callable[..., Path]:
    """``seco_demo(n_locations, n_acquisitions, seed)``: a generated SeCo tree, written once per session for each
    set of arguments and shared by the modules that ask for the same one (do not modify it)."""
    trees: dict[tuple, Path] = {}

    def tree(n_locations: int = 2, n_acquisitions: int = 2, seed: int = 0) -> Path:
        key = (n_locations, n_acquisitions, seed)
        if key not in trees:
            folder = tmp_path_factory.mktemp(f"seco_{n_locations}x{n_acquisitions}_seed{seed}") / "seco"
            trees[key] = write_seco_demo(folder, n_locations=n_locations, n_acquisitions=n_acquisitions, seed=seed)
        return trees[key]

    return tree


@pytest.fixture(scope="session")
def eurosat_demo(tmp_path_factory) -> Callable[..., Path]:
    """``eurosat_demo(per_class, classes)``: a 32 px flat-colour EuroSAT RGB archive, written once per session for
    each set of arguments."""
    roots: dict[tuple, Path] = {}

    def root(per_class: int, classes: tuple[str, ...] = ("Forest", "River", "SeaLake")) -> Path:
        key = (per_class, tuple(classes))
        if key not in roots:
            roots[key] = tmp_path_factory.mktemp("eurosat")
            write_eurosat_rgb(roots[key], dict.fromkeys(classes, per_class), size=32)
        return roots[key]

    return root
