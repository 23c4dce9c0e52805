"""utils.Progress and where it is used: a bar with an ETA on a terminal, a few lines with an ETA in a log.

pytest's captured streams are not terminals, so "in a log" is the plain case; the terminal case patches
``sys.stderr.isatty``.
"""

from __future__ import annotations

import re
import sys

import eval_knn
import logs
import prepare_data
import utils
from datasets.demo import write_seco_demo
from tests.tiny_runs import TINY_KNN

LINE = re.compile(r"^(?P<desc>.+) \[(?P<done>\d+)/(?P<total>\d+)\] eta: \d+:\d\d:\d\d elapsed: \d+:\d\d:\d\d(, .+)?$")


def progress_lines(text: str) -> list[tuple[str, int, int]]:
    return [(m["desc"], int(m["done"]), int(m["total"])) for m in map(LINE.match, text.splitlines()) if m]


def test_a_line_every_print_freq_items_and_at_the_end(capsys):
    assert list(utils.Progress(range(5), "work", print_freq=2)) == [0, 1, 2, 3, 4]
    out, err = capsys.readouterr()
    assert progress_lines(out) == [("work", 2, 5), ("work", 4, 5), ("work", 5, 5)]
    assert err == ""  # no bar redrawn into a log


def test_update_counts_batches_of_items(capsys):
    progress = utils.Progress(None, "written", print_freq=10, total=25)
    for _ in range(5):
        progress.update(5)
    progress.close()
    assert progress_lines(capsys.readouterr().out) == [("written", 10, 25), ("written", 20, 25), ("written", 25, 25)]


def test_a_bar_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    list(utils.Progress(range(3), "work", print_freq=1))
    out, err = capsys.readouterr()
    assert out == "" and "work: 100%" in err and "3/3" in err


def test_silent_on_other_ranks(capsys, monkeypatch):
    monkeypatch.setattr(logs, "is_main_process", lambda: False)
    list(utils.Progress(range(3), "work", print_freq=1))
    assert capsys.readouterr() == ("", "")


def test_store_writing_and_demo_data_report_progress(tmp_path, capsys):
    tree = write_seco_demo(tmp_path / "seco", n_locations=3, n_acquisitions=1, print_freq=2)
    assert progress_lines(capsys.readouterr().out) == [("SeCo demo locations", 2, 3), ("SeCo demo locations", 3, 3)]
    store = ["--output_path", str(tmp_path / "s.zarr"), "--shard_size", "1", "--print_every", "1"]
    prepare_data.run(["--data_path", str(tree), *store])
    assert [done for _, done, _ in progress_lines(capsys.readouterr().out)] == [1, 2, 3]


def test_url_download_a_bar_on_a_terminal_and_lines_in_a_log(tmp_path, capsys, monkeypatch, http_root):
    served, base, _ = http_root
    (served / "a.pth").write_bytes(b"x" * 1000)
    (served / "b.pth").write_bytes(b"y" * 1000)
    utils.resolve_weights_path(f"{base}/a.pth", tmp_path / "cache")
    out, err = capsys.readouterr()
    assert "%|" not in err and progress_lines(out) == [("download a.pth (MiB)", 1, 1)]  # a line in a log
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    utils.resolve_weights_path(f"{base}/b.pth", tmp_path / "cache")
    assert "100%|" in capsys.readouterr().err


def test_knn_feature_extraction_reports_progress(rgb_root, tmp_path, capsys):
    args = ["--pretrained_weights", "none", "--data_path", str(rgb_root), "--output_dir", str(tmp_path)]
    eval_knn.run(TINY_KNN + args + ["--nb_knn", "1", "--batch_size_per_gpu", "4", "--print_freq", "2"])
    lines = progress_lines(capsys.readouterr().out)
    train = [(done, total) for desc, done, total in lines if desc == "pretrained train:"]
    assert train[-1][0] == train[-1][1] > 2  # every batch of the split counted, the last one reported
    assert all(done % 2 == 0 for done, _ in train[:-1])
