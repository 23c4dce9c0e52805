"""prepare_data.py: parallel, resumable writing (kills, job-array ranges, damaged shards), and bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prepare_data
from datasets import DataError
from datasets.seco import SeCoDataset
from datasets.seco_store import shard_key
from datasets.seco_store_writer import PROGRESS
from tests.fixtures import SHARD, acquisition_id, assert_same_images, varied, write_band_layout, write_store, write_tif
from tests.processes import killed_at_rename

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

REPO = Path(__file__).resolve().parents[1]
N_SHARDS = 5  # 3 locations x 3 acquisitions, 2 per shard


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = write_band_layout(tmp_path_factory.mktemp("tree") / "tree", n_locations=3, n_acquisitions=3)
    return varied(root, "*/*/B[2348].tif")


def shard_files(store: Path) -> dict[str, int]:
    """Every shard file and its modification time in ns (a rewritten file gets a new one)."""
    return {p.relative_to(store).as_posix(): p.stat().st_mtime_ns for p in store.glob("*/c/**/*") if p.is_file()}


def run(tree: Path, output: Path, *extra: str) -> None:
    prepare_data.run(["--data_path", str(tree), "--output_path", str(output), "--shard_size", str(SHARD), *extra])


def test_two_workers_write_the_same_store_as_one(tree, tmp_path, capsys):
    one, two = (
        write_store(tree, tmp_path / "one.zarr"),
        write_store(tree, tmp_path / "two.zarr", "RGB", "--workers", "2"),
    )
    for key in shard_files(one):
        assert (one / key).read_bytes() == (two / key).read_bytes()
    assert_same_images(tree, two, "RGB")
    assert "two.zarr is complete (5 shards); train with --data_path" in capsys.readouterr().out


def test_progress_shows_rates_ratio_and_eta(tree, tmp_path, capsys):
    run(tree, tmp_path / "s.zarr", "--print_every", "1")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("store locations")]
    assert len(lines) >= 3 and lines[-1].startswith("store locations [3/3] eta: 0:00:00")
    assert re.search(r"[\d.]+ locations/s, [\d.]+ MB/s, compression [\d.]+x$", lines[-1])


def test_a_complete_store_is_never_rewritten(tree, tmp_path, capsys):
    store = write_store(tree, tmp_path / "s.zarr")
    before = shard_files(store)
    run(tree, store, "--bands", "RGB")
    assert "s.zarr is complete (5 shards)" in capsys.readouterr().out
    assert shard_files(store) == before


def test_killed_writer_reruns_only_the_shards_not_recorded(tree, tmp_path):
    store = tmp_path / "s.zarr"
    args = ["--data_path", str(tree), "--output_path", str(store), "--shard_size", str(SHARD)]
    killed_at_rename("2.json", "prepare_data.py", *args)  # shard 2 written, its record never renamed into place
    assert sorted(p.name for p in (store / PROGRESS).glob("*.json")) == ["0.json", "1.json"]
    with pytest.raises(DataError, match=rf"{store} is an incomplete store.*finish it with python prepare_data.py"):
        SeCoDataset(store)
    before = shard_files(store)
    run(tree, store)
    after = shard_files(store)
    for key in (shard_key("10m", 0), shard_key("10m", 1)):
        assert after[key] == before[key]  # recorded and intact: not rewritten
    assert after[shard_key("10m", 2)] != before[shard_key("10m", 2)]
    assert_same_images(tree, store, "RGB")


def test_job_array_ranges_with_overlap_and_gaps(tree, tmp_path, capsys):
    overlapping = tmp_path / "overlap.zarr"
    run(tree, overlapping, "--shard_range", "0:3")
    run(tree, overlapping, "--shard_range", "2:99")  # overlaps shard 2; the range is clipped to the store
    assert_same_images(tree, overlapping, "RGB")

    gaps = tmp_path / "gaps.zarr"
    run(tree, gaps, "--shard_range", "0:2")
    run(tree, gaps, "--shard_range", "3:5")
    out = capsys.readouterr().out
    assert "shards 3:5 written; 1 of 5 shards still missing (first: 2); finish with python prepare_data.py" in out
    with pytest.raises(DataError, match="is an incomplete store"):
        SeCoDataset(gaps)
    before = shard_files(gaps)
    run(tree, gaps, "--shard_range", "2:3")
    assert "gaps.zarr is complete" in capsys.readouterr().out
    assert {k: v for k, v in shard_files(gaps).items() if "/c/2/" not in k} == {
        k: v for k, v in before.items() if "/c/2/" not in k
    }
    assert_same_images(tree, gaps, "RGB")


def test_job_array_tasks_running_at_once_with_overlapping_ranges(tree, tmp_path):
    """Two tasks start together on one new store and both write shard 2: the store is whole and the tree's."""
    store = tmp_path / "s.zarr"
    flags = ["--data_path", str(tree), "--output_path", str(store), "--shard_size", str(SHARD)]
    tasks = [
        subprocess.Popen(
            [sys.executable, "prepare_data.py", *flags, "--shard_range", r], cwd=REPO, stderr=subprocess.PIPE
        )
        for r in ("0:3", "2:5")
    ]
    for task in tasks:
        assert task.wait(timeout=120) == 0, task.stderr.read().decode()[-2000:]
    assert_same_images(tree, store, "RGB")


def test_a_truncated_shard_is_rewritten_by_a_rerun(tree, tmp_path):
    store = write_store(tree, tmp_path / "s.zarr")
    shard = store / shard_key("10m", 3)
    shard.write_bytes(shard.read_bytes()[:-5])
    run(tree, store)
    assert_same_images(tree, store, "RGB")


def test_a_corrupted_shard_is_rewritten_by_verify(tree, tmp_path, capsys):
    store = write_store(tree, tmp_path / "s.zarr")
    shard = store / shard_key("10m", 3)
    data = bytearray(shard.read_bytes())
    data[5] ^= 0x01
    shard.write_bytes(bytes(data))
    before = shard_files(store)
    run(tree, store)  # same size: the cheap check of a complete store does not see it
    assert "is complete" in capsys.readouterr().out and shard_files(store) == before
    run(tree, store, "--verify")
    rewritten = [key for key, mtime in shard_files(store).items() if mtime != before[key]]
    assert rewritten == [shard_key("10m", 3)]
    assert_same_images(tree, store, "RGB")


def one_line_exit_2(capsys, tree: Path, output: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as exc:
        run(tree, output, *extra)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_an_output_path_holding_something_else_is_refused(tree, tmp_path, capsys):
    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "is not a store written by prepare_data.py" in one_line_exit_2(capsys, tree, other)
    assert (other / "notes.txt").read_text() == "mine" and sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    store = write_store(tree, tmp_path / "rgb.zarr")
    before = shard_files(store)
    err = one_line_exit_2(capsys, tree, store, "--bands", "ALL")
    assert "holds a store of another tree, other bands or another shard size" in err
    assert shard_files(store) == before


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--shard_range", "3", "--shard_range must be I:J"),
        ("--shard_range", "3:2", "expected 0 <= I < J"),
        ("--shard_range", "7:9", "the store has 5 shards (0 to 4)"),
        ("--workers", "0", "--workers 0: expected a positive number"),
        ("--shard_size", "0", "--shard_size 0: expected a positive number"),
        ("--bands", "B4,B13", "--bands"),
    ],
)
def test_bad_arguments_exit_2(tree, tmp_path, capsys, flag, value, message):
    assert message in one_line_exit_2(capsys, tree, tmp_path / "x.zarr", flag, value)
    assert not (tmp_path / "x.zarr").exists()


def test_bad_trees_are_one_line(tree, tmp_path, capsys):
    assert "does not exist" in one_line_exit_2(capsys, tmp_path / "nowhere", tmp_path / "x.zarr")
    broken = write_band_layout(tmp_path / "broken", n_locations=2, n_acquisitions=2)
    band = broken / "000001" / acquisition_id(1) / "B3.tif"
    band.write_bytes(band.read_bytes()[:300])
    assert str(band) in one_line_exit_2(capsys, broken, tmp_path / "b.zarr")
    # What was written before the bad file stays recorded; the store is not usable until finished.
    assert json.loads((tmp_path / "b.zarr" / "zarr.json").read_text())["attributes"]["dino_mc"]["complete"] is False


def test_an_acquisition_of_another_size_is_named(tmp_path, capsys):
    tree = write_band_layout(tmp_path / "tree", n_locations=2, n_acquisitions=2)
    odd = tree / "000001" / acquisition_id(0) / "B4.tif"
    write_tif(odd, torch.zeros(30, 30, dtype=torch.uint8).numpy())
    err = one_line_exit_2(capsys, tree, tmp_path / "s.zarr")
    assert f"{odd.parent}: band B4 is 30x30 uint8" in err and "train on the tree itself" in err
