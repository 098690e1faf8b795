"""The bundle configs: one preprocessing chain, workflows that parse, valid metadata, documented options, optional
resampling inverted exactly."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import BUNDLE, DEMO
from monai.bundle import ConfigParser

CONFIGS = BUNDLE / "configs"

# the run id of each workflow with the override files that may be merged after its own config files
WORKFLOWS = {
    "training": [[], ["multi_gpu_train.json"], ["paper.json"]],
    "inference": [[], ["multi_gpu_inference.json"]],
    "evaluating": [[], ["multi_gpu_inference.json"]],
}
# sections of train.json whose plain values are user options, overridden as ``section#key``
OPTION_SECTIONS = ("data", "map", "optimizer", "schedule", "loss", "network_def")


def load(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def strings(value) -> list[str]:
    """Every string value (and dict key) inside a config value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in (k, *strings(v))]
    if isinstance(value, list):
        return [t for v in value for t in strings(v)]
    return []


def test_preprocessing_chain_is_defined_once_in_common_json():
    assert "preprocessing" in load("common.json")
    others = [p.name for p in CONFIGS.glob("*.json") if p.name != "common.json"]
    assert {"train.json", "inference.json", "evaluate.json", "multi_gpu_train.json"} <= set(others)
    for name in others:
        assert not [k for k in load(name) if k.split("#")[0] == "preprocessing"], f"{name} redefines preprocessing"
        assert "LoadVolumed" not in (CONFIGS / name).read_text(), f"{name} holds a copy of the chain"
    # the workflows build on the shared chain by reference
    assert "@preprocessing" in load("train.json")["training_preprocessing"]["transforms"]
    assert load("inference.json")["inverse"]["transform"] == "@preprocessing"


def test_evaluate_json_is_a_short_override_of_inference_json():
    assert len((CONFIGS / "evaluate.json").read_text()) < len((CONFIGS / "inference.json").read_text()) / 2
    assert set(load("evaluate.json")) - set(load("inference.json")) <= {"label_dir", "metrics", "evaluating"}


def test_train_json_has_few_top_level_settings():
    scalars = [k for k, v in load("train.json").items() if not isinstance(v, (dict, list))]
    assert len(scalars) <= 20, scalars


def test_no_python_ternary_in_any_config():
    for path in sorted(CONFIGS.glob("*.json")):
        found = [t for t in strings(json.loads(path.read_text())) if " if " in t or " else " in t]
        assert not found, f"{path.name}: {found}"


@pytest.mark.parametrize("run_id", sorted(WORKFLOWS))
def test_every_workflow_parses(run_id):
    """Each workflow's merged config files (with each override file) name their run id and resolve every
    reference (nothing is instantiated or evaluated)."""
    from monai_dnprd.config import workflow_configs

    for extra in WORKFLOWS[run_id]:
        files = workflow_configs(BUNDLE, run_id) + [str(CONFIGS / name) for name in extra]
        parser = ConfigParser()
        parser.read_config(files)
        assert parser["run"] == f"%{run_id}", files
        assert isinstance(parser[run_id], list) and parser["initialize"], files
        parser.parse(reset=True)
        for key in parser.get():
            parser.get_parsed_content(key, instantiate=False, eval_expr=False)  # unresolvable @refs raise here
        for name in ("preprocessing", "inferer", "network_def"):
            assert name in parser.get(), (files, name)


def test_configs_are_valid_json_and_name_their_run_ids():
    for name, run_id in (("train.json", "training"), ("inference.json", "inference"), ("evaluate.json", "evaluating")):
        cfg = load(name)
        assert run_id in cfg and cfg["run"] == f"%{run_id}"
    meta = load("metadata.json")
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 3


@pytest.mark.parametrize("spacing", [None, [3.0, 3.0, 3.0]])
def test_preprocessing_round_trip_with_optional_resampling(spacing):
    from monai_dnprd.config import workflow_configs

    parser = ConfigParser()
    parser.read_config(workflow_configs(BUNDLE, "training"))
    parser["data#spacing"] = spacing
    pre = parser.get_parsed_content("preprocessing")
    d = pre({"image": str(DEMO / "IXI012-HH-1211_T1.nii.gz"), "name": "ixi"})
    if spacing:
        np.testing.assert_allclose(np.linalg.norm(np.asarray(d["image"].affine)[:3, :3], axis=0), spacing, rtol=1e-5)
    from monai.transforms import Invertd

    d["pred"] = d["image"].clone() * 0 + 1.0
    out = Invertd(keys="pred", transform=pre, orig_keys="image")(d)
    assert tuple(out["pred"].shape[1:]) == (120, 120, 90)
    np.testing.assert_allclose(np.asarray(out["pred"].affine), np.asarray(d["image"].meta["original_affine"]), atol=1e-4)
    assert torch.isfinite(torch.as_tensor(out["pred"])).all()


def documented_keys(docs: str) -> set[str]:
    """The option ids in the key column of the docs' tables; a row may shorten further options of the section
    of its first id: "`network_def#vit`, `#depth`" documents ``network_def#vit`` and ``network_def#depth``."""
    keys = set()
    for line in docs.splitlines():
        if not line.startswith("|"):
            continue
        section = None
        for token in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if token.startswith("#") and section:
                keys.add(section + token)
            else:
                keys.add(token)
                section = token.split("#")[0] if "#" in token else None
    return keys


def test_every_training_option_is_documented_in_the_bundle_readme():
    """Each user-facing key of train.json (a plain value, not an expression), at the top level or in one of the
    option sections (``section#key``), has a row in the docs' tables."""
    config = load("train.json")
    docs = (BUNDLE / "docs" / "README.md").read_text()
    workflow_keys = {"imports", "bundle_root", "run"}
    expression = ("$", "@", "%")

    def plain(v) -> bool:
        return not isinstance(v, (dict, list)) and not (isinstance(v, str) and v.startswith(expression))

    options = [k for k, v in config.items() if k not in workflow_keys and plain(v)]
    for section in OPTION_SECTIONS:
        options += [f"{section}#{k}" for k, v in config[section].items() if k != "_target_" and plain(v)]
    assert len(options) > 30 and "network_def#patch_size" in options and "map#metric" in options
    undocumented = [k for k in options if k not in documented_keys(docs)]
    assert not undocumented, f"options of train.json missing from bundle/docs/README.md: {undocumented}"
