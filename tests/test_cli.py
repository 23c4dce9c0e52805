"""Command-line basics (cli): one-line errors and the ValueError-to-config-error context."""

from __future__ import annotations

import argparse

import pytest

import utils
from datasets import DataError
from datasets.bands import parse_bands


def test_one_line_strips_worker_traceback():
    err = ValueError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        "last):\n  File x\ndatasets.DataError: cannot read raster /a/B2.tif: truncated\n"
    )
    assert utils.one_line(err) == "cannot read raster /a/B2.tif: truncated"


def test_config_errors_turns_a_value_error_into_one_config_line_and_lets_data_errors_pass():
    with pytest.raises(utils.ConfigError, match=r"^--bands: unknown Sentinel-2 band 'B13'"):
        with utils.config_errors("--bands"):
            parse_bands("B4,B13")
    with pytest.raises(DataError) as caught:
        with utils.config_errors("--data_path"):
            raise DataError("/data/x.tif: truncated")
    assert type(caught.value) is DataError and str(caught.value) == "/data/x.tif: truncated"
    with pytest.raises(KeyError):  # not a configuration problem: a bug, left as it is
        with utils.config_errors():
            raise KeyError("x")


def test_check_numbers_names_the_flag_and_refuses_nan():
    args = argparse.Namespace(lr=float("nan"), epochs=3, nb_knn=[10, 0], workers=None)
    utils.check_numbers(args, positive=("epochs", "workers"))  # None: not given, nothing to check
    with pytest.raises(utils.ConfigError, match=r"^--lr nan: expected a number >= 0$"):
        utils.check_numbers(args, non_negative=("lr",))
    with pytest.raises(utils.ConfigError, match=r"^--nb_knn 10 0: expected a positive number$"):
        utils.check_numbers(args, positive=("nb_knn",))
