"""Checkpoint safety (weights_only, atomic writes) and the normal-score calibration maths."""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from monai_dnprd.anomaly_map import AnomalyMapper
from monai_dnprd.calibration import Calibration
from monai_dnprd.checkpoint import (
    MODEL_FORMAT,
    CheckpointError,
    export_model,
    load_checkpoint,
    load_model,
    metadata_path,
    model_architecture,
    model_metadata,
    save_atomic,
)
from monai_dnprd.errors import format_error
from monai_dnprd.networks import DNPConFormer


class Payload:
    """A custom class: pickling it into a checkpoint must make loading fail."""


def fitted_mapper(seed: int = 0, img_size: int = 16, metric: str = "feature_pixel") -> AnomalyMapper:
    """A tiny mapper whose statistics look fitted (not the all-0/1 defaults), so that they change the map."""
    torch.manual_seed(seed)
    net = DNPConFormer(img_size=img_size, patch_size=8, in_channels=3, vit="tiny", embed_dim=32, num_heads=2,
                       depth=4, num_register_tokens=0, mask_block=1)
    mapper = AnomalyMapper(net, metric=metric, sigma=1.5)
    mapper.set_residual_stats([(0.1 * torch.randn(32), torch.rand(32) + 0.5) for _ in net.groups], 96)
    mapper.set_map_moments(torch.tensor([0.4, 0.1]), torch.tensor([0.3, 0.05]))
    return mapper.eval()


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


class SystemCall:
    """Pickles to ``os.system(...)``: a ``__reduce__`` payload that full unpickling would run."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def refusal(path) -> str:
    """The one-line CheckpointError message of ``load_checkpoint(path)``."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


OBJECT_REFUSAL = "refused, the file holds a pickled Python object"


def test_unsafe_and_unreadable_checkpoints_are_told_apart(tmp_path):
    """Python objects (custom class, __reduce__ payload, zip or legacy format, bare pickle) vs files torch can't read."""
    marker = tmp_path / "pwned"
    good = save_atomic({"w": torch.zeros(3)}, tmp_path / "good.pt").read_bytes()
    cases = {"custom.pt": {"extra": Payload()}, "reduce.pt": {"extra": SystemCall(marker)}}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
    torch.save({"extra": SystemCall(marker)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "bare.pkl").write_bytes(pickle.dumps({"extra": SystemCall(marker)}, protocol=4))
    assert f"{OBJECT_REFUSAL} (test_checkpoint_calibration.Payload)" in refusal(tmp_path / "custom.pt")
    for name in ("reduce.pt", "legacy.pt", "bare.pkl"):
        assert f"{OBJECT_REFUSAL} ({os.system.__module__}.system)" in refusal(tmp_path / name), name
    assert not marker.exists()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.pt").write_text("hello world\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("notes.txt", "hi")
    expected = {
        "truncated.pt": "damaged or truncated torch file",
        "text.pt": "not a valid torch file",
        "empty.pt": "the file is empty (0 bytes)",
        "plain.pkl": "not a valid torch file",
        "other.zip": "not one written by torch.save",
    }
    for name, reason in expected.items():
        message = refusal(tmp_path / name)
        assert "cannot read checkpoint: " in message and reason in message and OBJECT_REFUSAL not in message, message
    assert "is a folder" in refusal(tmp_path)


def test_object_refusal_does_not_depend_on_torch_wording(tmp_path, monkeypatch):
    """Whatever torch's safe unpickler says, the pickle stream itself tells an object from a damaged file."""
    torch.save({"extra": SystemCall(tmp_path / "pwned")}, tmp_path / "reduce.pt")
    torch.save({"extra": Payload()}, tmp_path / "custom.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "zeros.pt").write_bytes(b"\x00" * 10)
    save_atomic({"w": torch.zeros(3)}, tmp_path / "tensors.pt")

    def reworded(*args, **kwargs):
        raise pickle.UnpicklingError("Weights only load failed: something new happened")

    monkeypatch.setattr(torch, "load", reworded)
    assert f"{OBJECT_REFUSAL} ({os.system.__module__}.system)" in refusal(tmp_path / "reduce.pt")
    assert f"{OBJECT_REFUSAL} (test_checkpoint_calibration.Payload)" in refusal(tmp_path / "custom.pt")
    for name in ("zeros.pt", "tensors.pt"):  # nothing but tensors (or no pickle at all): not an object refusal
        assert OBJECT_REFUSAL not in refusal(tmp_path / name)


def test_pickled_checkpoint_error_line_on_the_command_line(tmp_path):
    """What the CLI prints for the refusal wrapped the way MONAI wraps errors of config expressions."""
    evil = tmp_path / "model.pt"
    torch.save({"format": "monai-dnprd/1", "payload": SystemCall(tmp_path / "pwned")}, evil)
    try:
        try:
            load_checkpoint(evil)
        except CheckpointError as err:
            raise RuntimeError("Failed to evaluate ConfigExpression: \n('$monai_dnprd.ensemble.load_models(...)')") from err
    except RuntimeError as wrapped:
        line = format_error(wrapped, ["monai/bundle/__main__.py", "run", "inference", "--ckpt_path", str(evil)])
    assert line == (f"error: --ckpt_path {evil}: {OBJECT_REFUSAL} ({os.system.__module__}.system) and loading it "
                    "could run code; only tensors, numbers, strings and containers are accepted (re-save a plain "
                    "state dict)")
    assert not (tmp_path / "pwned").exists()


def test_export_and_load_model_round_trip(tmp_path):
    mapper = fitted_mapper()
    path = export_model(tmp_path / "model.pt", mapper, {"img_size": 16, "k": 1}, metrics={"voxel_ap": 0.5, "name": "x"})
    assert path == tmp_path / "model.pt" and metadata_path(path) == tmp_path / "model.json"
    loaded, info = load_model(path)
    assert isinstance(loaded, AnomalyMapper) and not loaded.training
    assert info["preprocessing"] == {"img_size": 16, "k": 1} and info["metrics"] == {"voxel_ap": 0.5}
    assert info["format"] == MODEL_FORMAT and info["config"] == mapper.config() and info["path"] == str(path)
    assert loaded.metric == "feature_pixel" and loaded.sigma == 1.5
    assert loaded.network.config() == mapper.network.config()
    assert list(loaded.state_dict()) == list(mapper.state_dict())
    for (k, a), b in zip(mapper.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), mapper(x), rtol=0, atol=0)
    # model.pt is the mapper's plain state dict, readable by torch.load(weights_only=True) (MONAI's ckpt_export);
    # model.json holds what rebuilds the mapper
    sd = torch.load(path, weights_only=True)
    assert set(sd) == set(mapper.state_dict()) and all(isinstance(v, torch.Tensor) for v in sd.values())
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta == {k: v for k, v in info.items() if k != "path"} and model_metadata(path) == meta
    # the bundle's network_def: the same architecture with fresh weights
    arch = model_architecture(str(path))
    assert isinstance(arch, AnomalyMapper) and arch.config() == mapper.config()
    assert not torch.equal(arch.network.encoder.patch_embed.proj.weight, mapper.network.encoder.patch_embed.proj.weight)
    arch.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(arch.eval()(x), mapper(x), rtol=0, atol=0)


def test_load_model_rejects_other_checkpoints(tmp_path):
    save_atomic({"network": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="no ckpt.json beside it"):
        load_model(tmp_path / "ckpt.pt")
    # a model exported by the first format (one file, another network) is told to be retrained
    save_atomic({"format": "monai-dnprd/1", "state_dict": {}}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="older monai-dnprd"):
        load_model(tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")
    path = export_model(tmp_path / "model.pt", fitted_mapper(), {"img_size": 16, "k": 1})
    meta = json.loads(metadata_path(path).read_text())
    metadata_path(path).write_text(json.dumps({**meta, "format": "monai-dnprd/1"}))
    with pytest.raises(CheckpointError, match="not the metadata of a monai-dnprd model"):
        load_model(path)
    metadata_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read the model metadata"):
        load_model(path)
    # weights of another architecture than model.json describes
    meta["config"]["network"]["num_register_tokens"] = 2  # a parameter the weights lack
    metadata_path(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_model(path)


def test_torchscript_trace_of_a_mapper_gives_the_eager_maps(tmp_path):
    """What ``ckpt_export --use_trace True`` makes: a traced mapper, statistics and resampling matrices included."""
    import warnings

    mapper = fitted_mapper(img_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values in the graph
        traced = torch.jit.trace(mapper, torch.rand(1, 3, 32, 32), check_trace=False)
    torch.jit.save(traced, str(tmp_path / "model.ts"))
    again = torch.jit.load(str(tmp_path / "model.ts"))
    torch.manual_seed(1)
    for batch in (1, 3):  # the inferer's last batch of a volume is smaller than the others
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            eager = mapper(x)
            assert eager.shape == (batch, 1, 32, 32) and eager.max() > 0
            torch.testing.assert_close(traced(x), eager, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(again(x), eager, rtol=1e-5, atol=1e-6)
    # the statistics are part of the traced model: other statistics, other maps
    mapper.set_map_moments(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))
    with torch.no_grad():
        assert not torch.allclose(again(x), mapper(x), atol=1e-3)


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


def test_volume_threshold_uses_the_normal_quantile():
    cal = Calibration.from_scores([np.linspace(0, 1, 1000)], [1.0, 1.2, 0.8])  # mean 1.0, std 0.2
    # reference z(1 - fpr) values (standard normal table)
    for fpr, z in ((0.5, 0.0), (0.1, 1.2815515655446004), (0.05, 1.6448536269514722), (0.01, 2.3263478740408408),
                   (1e-3, 3.090232306167813), (0.9, -1.2815515655446004)):
        assert cal.volume_threshold(fpr) == pytest.approx(1.0 + z * 0.2, abs=1e-9)
    tiny = [cal.volume_threshold(f) for f in (1e-10, 1e-14, 1e-20)]  # 1 - fpr rounds to 1 for the last
    assert all(math.isfinite(t) for t in tiny) and tiny[0] < tiny[1] < tiny[2]


def test_calibration_with_one_normal_volume_has_a_usable_scale():
    cal = Calibration.from_scores([np.linspace(0, 1, 1000)], [0.5])
    assert cal.volume_std > 0 and math.isfinite(cal.volume_threshold(0.05))
    with pytest.raises(ValueError):
        cal.voxel_threshold(0.0)
