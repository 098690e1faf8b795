"""The bundle configs: same preprocessing chain everywhere, valid metadata, optional resampling inverted exactly."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import BUNDLE, DEMO
from monai.bundle import ConfigParser
from monai.transforms import Randomizable

CONFIGS = BUNDLE / "configs"


def chain(config: str) -> list[str]:
    """The preprocessing transforms of a config, with parameter references normalised."""
    items = json.loads((CONFIGS / config).read_text())["preprocessing"]["transforms"]
    out = []
    for t in items:
        text = t if isinstance(t, str) else t["_target_"] + json.dumps({k: v for k, v in t.items() if k != "_target_"}, sort_keys=True)
        text = re.sub(r"@params\['(\w+)'\]|@params\.get\('(\w+)'\)|@preprocessing_params#(\w+)|@(modality)",
                      lambda m: "P." + next(g for g in m.groups() if g), text)
        text = text.replace("$P.", "P.").replace('"$P.margin"', '"P.margin"')
        out.append(text)
    return out


def test_preprocessing_is_the_same_in_every_workflow():
    train = chain("train.json")
    assert chain("inference.json") == train
    assert chain("evaluate.json") == train


def test_configs_are_valid_json_and_name_their_run_ids():
    for name, run_id in (("train.json", "training"), ("inference.json", "inference"), ("evaluate.json", "evaluating")):
        cfg = json.loads((CONFIGS / name).read_text())
        assert run_id in cfg and cfg["run"] == f"%{run_id}"
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 3


@pytest.mark.parametrize("spacing", [None, [3.0, 3.0, 3.0]])
def test_preprocessing_round_trip_with_optional_resampling(spacing):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["spacing"] = spacing
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


def test_every_training_option_is_documented_in_the_bundle_readme():
    """Each user-facing key of train.json (a plain value, not an expression or a section) has a row in the docs."""
    config = json.loads((CONFIGS / "train.json").read_text())
    docs = (BUNDLE / "docs" / "README.md").read_text()
    workflow_keys = {"imports", "bundle_root", "run"}
    expression = ("$", "@", "%")
    options = [k for k, v in config.items() if k not in workflow_keys and not isinstance(v, (dict, list))
               and not (isinstance(v, str) and v.startswith(expression))]
    assert len(options) > 30
    undocumented = [k for k in options if f"`{k}`" not in docs]
    assert not undocumented, f"options of train.json missing from bundle/docs/README.md: {undocumented}"


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_spatial_augmentation_of_training_slices(prob):
    """`spatial_aug_prob` drives a random rotation/scaling of the training slice stacks, zero-padded.

    With probability 1 an off-centre blob moves (all channels alike, background stays 0). With 0 the transform
    is left out of the chain entirely: the geometry is untouched and, because MONAI seeds each random
    transform of a Compose in turn, the other transforms draw exactly what they drew before the option existed.
    """
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    assert isinstance(parser["spatial_aug_prob"], float) and 0.0 <= parser["spatial_aug_prob"] <= 1.0
    parser["spatial_aug_prob"] = prob
    parser["img_size"] = 32
    compose = parser.get_parsed_content("slice_transforms")
    randomizable = [type(t).__name__ for t in compose.transforms if isinstance(t, Randomizable)]
    if prob == 0.0:
        assert randomizable == ["RandFlipd", "RandScaleIntensityd"]
    else:
        assert randomizable[0] == "RandAffined" and compose.transforms[0].prob == prob
    img = torch.zeros(3, 32, 32)
    img[:, 4:12, 6:10] = 0.7  # off-centre, not symmetric under a left-right flip of the slice
    moved = 0
    for seed in range(8):
        compose.set_random_state(seed)
        out = compose({"image": img.clone()})["image"]
        fg = out[0] > 0.05
        assert torch.equal(fg, out[2] > 0.05)  # one transform for the whole 2.5D stack
        assert out[:, 26:, 26:].abs().max() == 0  # zero padding: no tissue appears far from the blob
        flips = (img[0] > 0, torch.flip(img[0] > 0, dims=(0,)))
        moved += int(not any(torch.equal(fg, f) for f in flips))
    assert (moved == 8) if prob == 1.0 else (moved == 0)
