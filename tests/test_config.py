"""Command-line override validation, flags, device choice and the training datalists."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BUNDLE

from monai_dnprd.config import (
    UnknownOverrideError,
    as_bool,
    check_cli_overrides,
    resolve_device,
    workflow_configs,
)

CLI = "/somewhere/site-packages/monai/bundle/__main__.py"
TRAIN = "[" + ",".join(f"'{f}'" for f in workflow_configs(BUNDLE, "training")) + "]"  # as on the command line
INFERENCE = ",".join(workflow_configs(BUNDLE, "inference"))  # the comma-separated form


def test_workflow_configs_merge_the_shared_part_first():
    names = {w: [f.rsplit("/", 1)[-1] for f in workflow_configs(BUNDLE, w)]
             for w in ("training", "inference", "evaluating")}
    assert names == {"training": ["common.json", "train.json"], "inference": ["common.json", "inference.json"],
                     "evaluating": ["common.json", "inference.json", "evaluate.json"]}
    with pytest.raises(ValueError, match="unknown workflow"):
        workflow_configs(BUNDLE, "train")


def test_known_overrides_pass():
    argv = [CLI, "run", "training", "--config_file", TRAIN, "--bundle_root", "bundle", "--num_iterations", "5",
            "--dataset_dir=/data", "--network_def#depth", "4", "--map#metric", "cosine", "--schedule#val_interval=3",
            "--device", "cpu"]  # device: from common.json
    assert check_cli_overrides(argv)
    # a constructor argument the config leaves at its default may be added to a component
    assert check_cli_overrides(argv + ["--network_def#embed_dim", "64"])
    assert check_cli_overrides([CLI, "run", "inference", "--config_file", INFERENCE, "--fpr", "0.05", "--z_sigma", "0"])


def test_misspelled_override_is_an_error_listing_the_options():
    argv = [CLI, "run", "training", "--config_file", TRAIN, "--num_iteration", "5"]
    with pytest.raises(UnknownOverrideError, match="--num_iteration") as err:
        check_cli_overrides(argv)
    assert "--num_iterations" in str(err.value)


def test_misspelled_or_moved_section_option_is_an_error():
    for bad in ("--schedule#val_intervall", "--map#sigma#x", "--patch_size"):  # --patch_size: now network_def#
        argv = [CLI, "run", "training", "--config_file", TRAIN, bad, "5"]
        with pytest.raises(UnknownOverrideError, match=f"unknown option\\(s\\) {bad};"):
            check_cli_overrides(argv)
    with pytest.raises(UnknownOverrideError) as err:
        check_cli_overrides([CLI, "run", "training", "--config_file", TRAIN, "--schedule#val_intervall", "5"])
    assert "--schedule#val_interval," in str(err.value)  # the section's own options are listed
    with pytest.raises(UnknownOverrideError, match="--sigma"):  # the blur is no inference option any more
        check_cli_overrides([CLI, "run", "inference", "--config_file", INFERENCE, "--sigma", "1"])


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



def test_training_calibrates_on_the_validation_volumes(tiny_data):
    """Outside the demo (tests/test_demo.py) the thresholds come from the validation volumes."""
    from monai_dnprd.config import training_lists

    lists = training_lists(str(tiny_data["train"]), str(tiny_data["val"]))
    assert lists["calibration"] is lists["val"] and [d["name"] for d in lists["val"]] == ["mni"]
    handlers = json.loads((BUNDLE / "configs" / "train.json").read_text())["train"]["handlers"]
    handler = next(h for h in handlers if h["_target_"].endswith("CalibrationHandler"))
    assert handler["datalist"] == "$@data#lists['calibration']"


def test_training_fits_the_map_statistics_in_the_inference_precision():
    """The statistics scale the maps inference makes, so they are fitted in the same numerics (bf16 on this CPU)."""
    handlers = json.loads((BUNDLE / "configs" / "train.json").read_text())["train"]["handlers"]
    stats = next(h for h in handlers if h["_target_"].endswith("MapStatsHandler"))
    assert stats["precision"] == "@map#precision"
