"""eval_knn.py: the weighted k-NN against a brute force, and the script end to end on tiny EuroSAT fixtures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval_knn
import utils
from datasets.eurosat import EuroSAT
from datasets.transforms import eval_transform
from tests.downstream_fixtures import write_eurosat_ms
from tests.tiny_runs import TINY_KNN

REPO = Path(__file__).resolve().parents[1]


def brute_force_knn(train, train_labels, test, test_labels, k, temperature, num_classes):
    """The protocol written out one test image at a time: k most similar, votes exp(sim / T), top-1 / top-5."""
    top1 = top5 = 0
    for feature, label in zip(test.tolist(), test_labels.tolist()):
        sims = [sum(a * b for a, b in zip(feature, other)) for other in train.tolist()]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[int(train_labels[i])] += math.exp(sims[i] / temperature)
        ranking = sorted(range(num_classes), key=lambda c: -votes[c])
        top1 += ranking[0] == label
        top5 += label in [c for c in ranking[:5] if votes[c] > 0]
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


@pytest.mark.parametrize("num_classes", [3, 8])
def test_knn_classifier_matches_brute_force(num_classes):
    torch.manual_seed(num_classes)
    train = F.normalize(torch.randn(60, 6), dim=1)
    test = F.normalize(torch.randn(23, 6), dim=1)
    train_labels = torch.randint(num_classes, (60,))
    test_labels = torch.randint(num_classes, (23,))
    ks = [1, 5, 20]
    # chunk_size 7 splits the 23 test images into 4 chunks, the last one partial.
    result = eval_knn.knn_classifier(train, train_labels, test, test_labels, ks, 0.07, num_classes, chunk_size=7)
    for k in ks:
        expected = brute_force_knn(train, train_labels, test, test_labels, k, 0.07, num_classes)
        assert result[k] == pytest.approx(expected), k
    # A warmer temperature changes the votes; the brute force follows it.
    result = eval_knn.knn_classifier(train, train_labels, test, test_labels, [20], 1.0, num_classes, chunk_size=100)
    assert result[20] == pytest.approx(brute_force_knn(train, train_labels, test, test_labels, 20, 1.0, num_classes))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_end_to_end_random_weights_dump_and_reload(rgb_root, tmp_path):
    out = tmp_path / "out"
    eval_knn.run(
        TINY_KNN
        + ["--pretrained_weights", "none", "--data_path", str(rgb_root), "--output_dir", str(out)]
        + ["--nb_knn", "1", "3", "--dump_features", str(tmp_path / "feats")]
    )
    results = read_json(out / "knn.json")
    assert set(results) == {"1", "3"}
    assert all(set(v) == {"top1", "top5"} for v in results.values())
    # Each class is one flat colour, so its images have identical features: even random weights find them.
    assert results["1"]["top1"] == 100.0 and results["3"]["top1"] == 100.0
    assert sorted((out / f"eurosat-{s}.txt").exists() for s in ("train", "val", "test")) == [True] * 3

    # The dumped features are the L2-normalised CLS tokens of the evaluation transform, in dataset order.
    train_features = torch.load(tmp_path / "feats" / "trainfeat.pth")
    train_set = EuroSAT(rgb_root, "train", transform=eval_transform("RGB", 32, 32))
    assert train_features.shape == (len(train_set), 192)
    assert torch.allclose(train_features.norm(dim=1), torch.ones(len(train_set)))
    torch.manual_seed(0)
    model = utils.build_backbone("vit_tiny", 16)[0].eval()
    with torch.no_grad():
        last = F.normalize(model(train_set[len(train_set) - 1][0][None]), dim=1)[0]
    assert torch.allclose(train_features[-1], last, atol=1e-5)
    assert torch.equal(torch.load(tmp_path / "feats" / "trainlabels.pth"), torch.tensor(train_set.targets))

    reloaded = tmp_path / "reloaded"
    eval_knn.run(["--load_features", str(tmp_path / "feats"), "--nb_knn", "1", "3", "--output_dir", str(reloaded)])
    assert read_json(reloaded / "knn.json") == results


def test_checkpoint_against_random_weights(rgb_root, tmp_path):
    """--compare_random writes knn_random.json next to knn.json; the teacher is loaded from a checkpoint."""
    torch.manual_seed(11)
    teacher = utils.build_backbone("vit_tiny", 16)[0]
    torch.save({"teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()}}, tmp_path / "ckpt.pth")
    out = tmp_path / "out"
    eval_knn.run(
        TINY_KNN
        + ["--pretrained_weights", str(tmp_path / "ckpt.pth"), "--compare_random", "--nb_knn", "2"]
        + ["--data_path", str(rgb_root), "--output_dir", str(out), "--dump_features", str(tmp_path / "feats")]
    )
    assert set(read_json(out / "knn.json")) == set(read_json(out / "knn_random.json")) == {"2"}
    train_set = EuroSAT(rgb_root, "train", transform=eval_transform("RGB", 32, 32))
    with torch.no_grad():
        first = F.normalize(teacher.eval()(train_set[0][0][None]), dim=1)[0]
    assert torch.allclose(torch.load(tmp_path / "feats" / "trainfeat.pth")[0], first, atol=1e-5)


def test_multispectral_bands(tmp_path):
    root = tmp_path / "ms"
    write_eurosat_ms(root, {"Forest": 5, "River": 5}, size=32)
    out = tmp_path / "out"
    eval_knn.run(
        TINY_KNN
        + ["--pretrained_weights", "none", "--bands", "B4,B3,B2,B8", "--nb_knn", "2"]
        + ["--data_path", str(root), "--output_dir", str(out), "--dump_features", str(tmp_path / "feats")]
    )
    assert set(read_json(out / "knn.json")) == {"2"}
    assert torch.load(tmp_path / "feats" / "testfeat.pth").shape == (2, 192)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pretrained_weights", "/no/such/ckpt.pth"], "error: --pretrained_weights /no/such/ckpt.pth does not exist"),
        ([], "error: --pretrained_weights is required"),
        (["--pretrained_weights", "none", "--bands", "B4,B3,B2,B8"], "error: --bands B4,B3,B2,B8 needs the EuroSAT MS"),
        (["--pretrained_weights", "none", "--compare_random"], "error: --compare_random compares"),
    ],
)
def test_bad_input_is_one_line_exit_2(rgb_root, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.run(TINY_KNN + ["--data_path", str(rgb_root), "--output_dir", str(tmp_path), "--nb_knn", "3"] + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


def test_k_larger_than_the_memory_bank_is_clamped_with_one_warning(rgb_root, tmp_path, capsys):
    """The default k values (up to 200) on a 16-image memory bank: k = 16 instead, said once, and the run ends."""
    eval_knn.run(
        TINY_KNN + ["--pretrained_weights", "none", "--data_path", str(rgb_root), "--output_dir", str(tmp_path)]
        + ["--nb_knn", "3", "50", "200"]
    )  # fmt: skip
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --nb_knn 50 200: larger than the 16 images of the memory bank; using k = 16"]
    results = read_json(tmp_path / "knn.json")
    assert list(results) == ["3", "16"]
    common = ["--pretrained_weights", "none", "--data_path", str(rgb_root), "--nb_knn", "16"]
    eval_knn.run(TINY_KNN + common + ["--output_dir", str(tmp_path / "exact")])
    assert results["16"] == read_json(tmp_path / "exact" / "knn.json")["16"]  # the same k = 16 run


def test_torchrun_two_processes_give_the_single_process_features(rgb_root, tmp_path):
    """Each of 2 CPU processes extracts every other image; the gathered features equal a plain run's."""
    common = TINY_KNN + ["--pretrained_weights", "none", "--nb_knn", "1", "--data_path", str(rgb_root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["eval_knn.py", *common, "--output_dir", str(tmp_path / "two"), "--dump_features", str(tmp_path / "f2")]
    # the plain run, in this process, while torchrun's processes start: the two write to separate folders
    done = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    eval_knn.run(common + ["--output_dir", str(tmp_path / "one"), "--dump_features", str(tmp_path / "f1")])
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-2000:]
    for name in eval_knn.FEATURE_FILES:
        single, gathered = torch.load(tmp_path / "f1" / name), torch.load(tmp_path / "f2" / name)
        assert torch.allclose(single.float(), gathered.float(), atol=1e-5), name
    assert read_json(tmp_path / "two" / "knn.json") == read_json(tmp_path / "one" / "knn.json")


def test_torchgeo_sentinel2_weights_evaluate_on_eurosat_ms_with_adapt_input_s2(tmp_path):
    """A state dict as torchgeo ships its Sentinel-2 weights (a timm ViT over 13 L1C bands, timm key names) runs
    in eval_knn.py on all 12 L2A bands: each band takes its own filters, B10 is dropped; features as timm's."""
    import timm

    torch.manual_seed(0)
    timm_model = timm.create_model("vit_tiny_patch16_224", in_chans=13, num_classes=0).eval()
    torch.save(timm_model.state_dict(), tmp_path / "sentinel2_all.pth")
    root = tmp_path / "ms"
    write_eurosat_ms(root, {"Forest": 5, "River": 5}, size=32)
    common = ["--pretrained_weights", str(tmp_path / "sentinel2_all.pth"), "--data_path", str(root), "--bands", "ALL"]
    common += ["--nb_knn", "1", "--dump_features", str(tmp_path / "features"), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit):  # without the flag: one line that says which flag loads it
        eval_knn.run(TINY_KNN + common)
    eval_knn.run(TINY_KNN + common + ["--adapt_input", "s2"])
    assert set(read_json(tmp_path / "out" / "knn.json")) == {"1"}
    assert torch.load(tmp_path / "features" / "trainfeat.pth").shape[1] == timm_model.num_features
