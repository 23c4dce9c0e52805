"""The Zarr store of prepare_data.py: plain Zarr, the tree's images bit for bit, and clear errors when damaged."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from datasets import DataError, pretraining
from datasets.bands import S2_BANDS
from datasets.seco import SeCoDataset
from datasets.seco_store import SeCoStore, shard_key
from tests.fixtures import (
    assert_same_images,
    varied,
    write_band_layout,
    write_image_folder_layout,
    write_preview_layout,
    write_store,
)

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


@pytest.fixture(scope="module")
def band_tree(tmp_path_factory) -> Path:
    root = write_band_layout(tmp_path_factory.mktemp("tree") / "tree", n_locations=3, n_acquisitions=3)
    return varied(root, "*/*/B*.tif")


@pytest.fixture(scope="module")
def all_bands(band_tree, tmp_path_factory) -> Path:
    return write_store(band_tree, tmp_path_factory.mktemp("store") / "all.zarr", "ALL")


@pytest.mark.parametrize("bands", ["RGB", "B8,B2", "ALL", "B5,B6", "B12,B4,B9", *S2_BANDS])
def test_store_of_all_bands_gives_the_trees_images_for_any_subset(band_tree, all_bands, bands):
    assert_same_images(band_tree, all_bands, bands)


def test_store_of_a_subset_without_10m_band_keeps_the_10m_grid(band_tree, tmp_path):
    store = write_store(band_tree, tmp_path / "b5b6.zarr", "B5,B6")
    assert_same_images(band_tree, store, "B5,B6")
    assert_same_images(band_tree, store, "B6")
    assert SeCoDataset(store, bands="B6").load(0, 0).shape == (1, 24, 24)


def test_plain_zarr_reads_the_store_at_native_resolution(all_bands):
    group = zarr.open_group(all_bands, mode="r")
    meta = group.attrs["dino_mc"]
    assert meta["complete"] and meta["layout"] == "bands" and meta["grid"] == [24, 24]
    assert meta["arrays"] == {
        "10m": ["B2", "B3", "B4", "B8"],
        "20m": ["B5", "B6", "B7", "B8A", "B11", "B12"],
        "60m": ["B1", "B9"],
    }
    assert [len(names) for names in meta["acquisitions"]] == [3, 3, 3] and len(meta["locations"]) == 3
    shapes = {name: group[name].shape for name in meta["arrays"]}
    assert shapes == {"10m": (9, 4, 24, 24), "20m": (9, 6, 12, 12), "60m": (9, 2, 4, 4)}
    assert all(group[name].dtype == np.uint8 for name in meta["arrays"])
    # Our direct shard reader returns what Zarr itself decodes, chunk by chunk.
    store = SeCoStore(all_bands, ["B1", "B2", "B5"])
    for name, array in store.arrays.items():
        expected = group[name][:]
        assert np.array_equal(np.stack([store._read_chunk(array, i) for i in range(9)]), expected)
    # One file per shard and array; each file's recorded sha256 is that of its bytes.
    files = sorted(p.relative_to(all_bands).as_posix() for p in all_bands.glob("*/c/**/*") if p.is_file())
    assert files == sorted(shard_key(name, s) for name in meta["arrays"] for s in range(5))
    for key, record in meta["shards"].items():
        assert hashlib.sha256((all_bands / key).read_bytes()).hexdigest() == record["sha256"]


def test_16_bit_values_are_kept_and_converted_as_the_tree_does(tmp_path):
    tree = write_band_layout(tmp_path / "tree", n_locations=2, n_acquisitions=2)
    varied(tree, "*/*/B*.tif", dtype=np.uint16, high=12000)
    store = write_store(tree, tmp_path / "u16.zarr", "ALL")
    assert zarr.open_group(store, mode="r")["20m"].dtype == np.uint16
    codecs = json.loads((store / "20m" / "zarr.json").read_text())["codecs"][0]["configuration"]["codecs"]
    assert codecs[1]["name"] == "blosc" and codecs[1]["configuration"]["shuffle"] == "shuffle"
    assert_same_images(tree, store, "ALL")
    assert_same_images(tree, store, "RGB")


@pytest.mark.parametrize("layout", ["previews", "png"])
def test_rgb_renderings_stay_unstretched(tmp_path, layout):
    if layout == "previews":
        tree = write_preview_layout(tmp_path / "tree", n_locations=2, n_acquisitions=3)
    else:
        tree = write_image_folder_layout(tmp_path / "tree", "png", n_locations=2, n_acquisitions=3)
    store = write_store(tree, tmp_path / "rgb.zarr")
    assert zarr.open_group(store, mode="r").attrs["dino_mc"]["rendered"] is True
    assert list(zarr.open_group(store, mode="r").attrs["dino_mc"]["arrays"]) == ["image"]
    assert_same_images(tree, store, "RGB")


def test_sampling_is_the_trees(band_tree, all_bands):
    for mode in ("mc", "tp"):
        a = SeCoDataset(band_tree, data_mode=mode, fixed_acquisition=mode == "mc", seed=3)
        b = SeCoDataset(all_bands, data_mode=mode, fixed_acquisition=mode == "mc", seed=3)
        torch.manual_seed(0)
        first = [torch.stack(a[i]) for i in range(3)]
        torch.manual_seed(0)
        assert all(torch.equal(x, torch.stack(b[i])) for i, x in enumerate(first))


def test_file_url_through_fsspec(band_tree, all_bands):
    assert_same_images(band_tree, all_bands.as_uri(), "B8,B5,B1")


class SecondAcquisitions(torch.utils.data.Dataset):
    """Acquisition 1 of every location (module-level, so that spawned workers can unpickle it)."""

    def __init__(self, dataset: SeCoDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset.load(index, 1)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_loader_workers_open_the_store_themselves(band_tree, all_bands, context):
    """Workers, forked or spawned, read the store with their own files and caches: the main process's images."""
    dataset = SeCoDataset(all_bands, bands="ALL")
    dataset.load(0, 0)  # the parent has open files and a cached shard index before the workers start
    assert dataset.source._indexes and dataset.source.files._fds
    clone = pickle.loads(pickle.dumps(dataset))
    assert not clone.source._indexes and not clone.source.files._fds
    images = [dataset.load(i, 1) for i in range(3)]
    loader = torch.utils.data.DataLoader(
        SecondAcquisitions(dataset), batch_size=None, num_workers=2, multiprocessing_context=context
    )
    assert all(torch.equal(a, b) for a, b in zip(images, loader, strict=True))


def test_missing_bands_are_named(all_bands, tmp_path, band_tree):
    store = write_store(band_tree, tmp_path / "rgb.zarr")
    with pytest.raises(DataError, match=r"holds bands B4,B3,B2, not B8: write a store with them"):
        SeCoDataset(store, bands="B4,B8")


def test_truncated_shard_is_named_before_training(band_tree, tmp_path):
    store = write_store(band_tree, tmp_path / "rgb.zarr")
    shard = store / shard_key("10m", 1)
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(
        DataError, match=rf"shard {shard} is \d+ bytes, expected \d+ \(truncated or replaced\).*--verify"
    ):
        SeCoDataset(store)


def test_corrupted_chunk_is_named_when_read(band_tree, tmp_path):
    store = write_store(band_tree, tmp_path / "rgb.zarr")
    shard = store / shard_key("10m", 1)
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # inside the first chunk: same size, different bytes
    shard.write_bytes(bytes(data))
    dataset = SeCoDataset(store)
    dataset.load(0, 1)  # acquisition 1 lies in shard 0: unaffected
    with pytest.raises(DataError, match=rf"shard {shard} is corrupted \(checksum mismatch\): rewrite it with python "):
        dataset.load(0, 2)  # acquisition 2 is the first chunk of shard 1


def test_old_pack_is_one_line(tmp_path):
    (tmp_path / "old.pack").mkdir()
    (tmp_path / "old.pack" / "pack.json").write_text("{}")
    with pytest.raises(DataError, match=r"is a pack written by an earlier version of prepare_data.py.*--output_path"):
        SeCoDataset(tmp_path / "old.pack")


def test_shard_blocks_split_the_store_per_rank_and_resume_exactly(band_tree, all_bands):
    """--shard_shuffle: each rank's samples come from its own block of shards, blocks change per epoch, the
    order is a pure function of (seed, epoch, rank) and a resumed epoch continues it."""
    dataset = SeCoDataset(all_bands)
    shards = [dataset.source.shard_of_location(i) for i in range(len(dataset))]
    assert shards == [0, 1, 3]  # locations start at acquisitions 0, 3, 6 with 2 per shard

    def order(rank: int, epoch: int, start: int = 0) -> list[tuple[int, int]]:
        sampler = pretraining.ShardBlockSampler(dataset, shards, 1, num_replicas=2, rank=rank, seed=5)
        sampler.set_epoch(epoch, start)
        return list(sampler)

    for epoch in range(4):
        ranks = [order(0, epoch), order(1, epoch)]
        assert all(len(r) == 2 for r in ranks)  # 3 locations, padded to 2 per rank
        assert order(0, epoch, start=1) == ranks[0][1:]
        seeds = [seed for r in ranks for _, seed in r]
        assert len(set(seeds)) == 4  # every position has its own sample seed
        assert {i for r in ranks for i, _ in r} == {0, 1, 2}  # the whole store is read each epoch
    blocks = {tuple(sorted(i for i, _ in order(0, epoch))) for epoch in range(8)}
    assert len(blocks) > 1  # the blocks move from epoch to epoch
