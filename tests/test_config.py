"""Command-line override validation, flags and device choice."""

from __future__ import annotations

import pytest
import torch
from conftest import BUNDLE

from monai_dnprd.config import UnknownOverrideError, as_bool, check_cli_overrides, resolve_device

CLI = "/somewhere/site-packages/monai/bundle/__main__.py"
TRAIN = str(BUNDLE / "configs" / "train.json")


def test_known_overrides_pass():
    argv = [CLI, "run", "training", "--config_file", TRAIN, "--bundle_root", "bundle", "--num_iterations", "5",
            "--dataset_dir=/data", "--network_def#depth", "4"]
    assert check_cli_overrides(argv)


def test_misspelled_override_is_an_error_listing_the_options():
    argv = [CLI, "run", "training", "--config_file", TRAIN, "--num_iteration", "5"]
    with pytest.raises(UnknownOverrideError, match="--num_iteration") as err:
        check_cli_overrides(argv)
    assert "--num_iterations" in str(err.value)


def test_not_the_cli_is_not_checked():
    assert check_cli_overrides(["pytest", "run", "--anything", "1"])


@pytest.mark.parametrize("text,value", [("true", True), ("False", False), ("1", True), ("no", False), (True, True)])
def test_as_bool(text, value):
    assert as_bool(text) is value


def test_as_bool_rejects_garbage():
    with pytest.raises(ValueError):
        as_bool("maybe")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
