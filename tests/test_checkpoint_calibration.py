"""Checkpoint safety (weights_only, atomic writes) and the normal-score calibration maths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monai_dnprd.calibration import Calibration
from monai_dnprd.checkpoint import CheckpointError, export_model, load_checkpoint, load_model, save_atomic
from monai_dnprd.networks import DNPConFormer


class Payload:
    """A custom class: pickling it into a checkpoint must make loading fail."""


def tiny_net() -> DNPConFormer:
    return DNPConFormer(img_size=16, patch_size=8, in_channels=3, vit="tiny", depth=2, num_register_tokens=0)


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(path)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(bad)


def test_export_and_load_model_round_trip(tmp_path):
    net = tiny_net()
    path = export_model(tmp_path / "model.pt", net, {"img_size": 16, "k": 1}, metrics={"voxel_ap": 0.5})
    loaded, info = load_model(path)
    assert info["preprocessing"]["img_size"] == 16 and info["metrics"]["voxel_ap"] == 0.5
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    # the export is readable by plain torch.load(weights_only=True)
    assert "state_dict" in torch.load(path, weights_only=True)


def test_load_model_rejects_other_checkpoints(tmp_path):
    save_atomic({"network": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="not an exported"):
        load_model(tmp_path / "ckpt.pt")


def test_save_atomic_leaves_old_file_on_failure(tmp_path):
    path = save_atomic({"a": torch.zeros(2)}, tmp_path / "x.pt")

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_atomic({"a": Unsaveable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_calibration_thresholds_match_the_normal_distribution(tmp_path):
    rng = np.random.default_rng(0)
    voxels = [rng.normal(size=200_000).astype(np.float32) for _ in range(3)]
    cal = Calibration.from_scores(voxels, [1.0, 1.2, 0.8])
    allv = np.concatenate(voxels)
    for fpr in (0.1, 0.01, 0.001):
        thr = cal.voxel_threshold(fpr)
        assert abs((allv > thr).mean() - fpr) < 0.1 * fpr + 1e-4
    assert cal.volume_mean == pytest.approx(1.0)
    assert cal.volume_std == pytest.approx(0.2)
    assert cal.volume_threshold(0.01) == pytest.approx(1.0 + 2.3263 * 0.2, abs=1e-3)
    assert cal.normalised_score(1.0) == pytest.approx(0.5)
    assert 0.0 < cal.normalised_score(0.0) < cal.normalised_score(2.0) < 1.0
    cal.save(tmp_path / "cal.json")
    again = Calibration.load(tmp_path / "cal.json")
    assert again.voxel_threshold(0.01) == pytest.approx(cal.voxel_threshold(0.01))


def test_calibration_with_one_normal_volume_has_a_usable_scale():
    cal = Calibration.from_scores([np.linspace(0, 1, 1000)], [0.5])
    assert cal.volume_std > 0 and math.isfinite(cal.volume_threshold(0.05))
    with pytest.raises(ValueError):
        cal.voxel_threshold(0.0)
