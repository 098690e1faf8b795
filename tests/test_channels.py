"""Several channels of 4D inputs (e.g. co-registered sequences in one BraTS/MSD-style file) as network input."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, run_workflow

from monai_dnprd.checkpoint import CheckpointError, load_model
from monai_dnprd.config import input_channels
from monai_dnprd.ensemble import load_models
from monai_dnprd.io import VolumeError, read_channels, read_volume
from monai_dnprd.transforms import LoadVolume, LoadVolumed


@pytest.fixture()
def four_d(tmp_path):
    data = np.random.default_rng(0).normal(size=(5, 6, 7, 3)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, aff), str(tmp_path / "four.nii.gz"))
    nib.save(nib.Nifti1Image(data[..., 0], aff), str(tmp_path / "three.nii.gz"))
    return tmp_path, data, aff


def test_read_channels_reads_the_chosen_channels_in_order(four_d):
    folder, data, aff = four_d
    vols = read_channels(folder / "four.nii.gz", channels=[2, 0])
    assert [v.array.shape for v in vols] == [(5, 6, 7)] * 2
    assert np.array_equal(vols[0].array, data[..., 2]) and np.array_equal(vols[1].array, data[..., 0])
    np.testing.assert_allclose(vols[0].affine, aff)
    assert np.array_equal(read_channels(folder / "four.nii.gz", channels=[-1])[0].array, data[..., 2])
    assert np.array_equal(read_channels(folder / "three.nii.gz", channels=[0])[0].array, read_volume(folder / "three.nii.gz").array)


def test_read_channels_repairs_non_finite_voxels_per_channel(tmp_path):
    data = np.stack([np.full((6, 6, 6), -5.0), np.linspace(2.0, 3.0, 216).reshape(6, 6, 6)], -1).astype(np.float32)
    data[0, 0, 0, 1] = np.nan  # one voxel of 216 in channel 1: repaired with channel 1's own minimum
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    first, second = read_channels(tmp_path / "nan.nii.gz", channels=[0, 1])
    assert second.array[0, 0, 0] == pytest.approx(float(np.nanmin(data[..., 1])))
    assert np.array_equal(first.array, data[..., 0]) and second.info["nonfinite_replaced"] == 1
    assert second.array.flags.c_contiguous and second.array.dtype == np.float32


@pytest.mark.parametrize("name, channels, message", [
    ("three.nii.gz", [0, 1], "need a 4D image"),
    ("four.nii.gz", [0, 3], "index=3 is out of range"),
    ("four.nii.gz", [1, 1], "repeat a channel"),
    ("four.nii.gz", [], "empty list of channels"),
])
def test_read_channels_refuses_impossible_choices(four_d, name, channels, message):
    with pytest.raises(VolumeError, match=message):
        read_channels(four_d[0] / name, channels=channels)


def test_load_volume_stacks_chosen_channels_as_a_metatensor(four_d):
    folder, data, aff = four_d
    img = LoadVolume(index=[1, 2])(folder / "four.nii.gz")
    assert img.shape == (2, 5, 6, 7) and img.meta["original_channel_dim"] == 0
    assert torch.equal(img[0], torch.from_numpy(data[..., 1])) and torch.equal(img[1], torch.from_numpy(data[..., 2]))
    d = LoadVolumed(index=[0, 2])({"image": str(folder / "four.nii.gz")})
    assert d["image"].shape == (2, 5, 6, 7) and torch.equal(d["image"][1], torch.from_numpy(data[..., 2]))
    assert LoadVolumed(index=[0, 2])({"image": str(folder / "four.nii.gz"), "index": 1})["image"].shape == (1, 5, 6, 7)


@pytest.mark.parametrize("channels, k, expected", [(None, 1, 3), (2, 1, 3), ([0, 3], 1, 6), ([0, 1, 2], 0, 3), ([1], 2, 5)])
def test_input_channels(channels, k, expected):
    assert input_channels(channels, k) == expected


@pytest.mark.parametrize("channels", [[], [0, 0], "0,1", 1.5])
def test_input_channels_refuses_bad_settings(channels):
    with pytest.raises(ValueError, match="channels"):
        input_channels(channels, 1)


def _stack(src, dst, name):
    """A 4D copy of a 3D volume: channel 0 the volume, channel 1 its square root (a second 'sequence')."""
    img = nib.load(str(src))
    a = np.asarray(img.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(np.stack([a, np.sqrt(np.clip(a, 0, None))], -1), img.affine), str(dst / name))


@pytest.mark.slow
def test_two_channel_model_trains_infers_and_evaluates_on_4d_inputs(trained, tiny_data, tmp_path):
    dirs = {k: tmp_path / k for k in ("train", "val", "test")}
    for key, d in dirs.items():
        d.mkdir()
        for f in sorted(tiny_data[key].glob("*.nii.gz")):
            _stack(f, d, f.name)
    out = tmp_path / "run"
    run_workflow("train.json", "training", output_dir=str(out), dataset_dir=str(dirs["train"]), val_dir=str(dirs["val"]),
                 num_iterations=4, warmup_iterations=2, schedule__val_interval=2, schedule__ckpt_interval=2,
                 channels=[1, 0], **TINY_MODEL)
    mapper, ckpt = load_model(out / "models" / "model.pt")
    assert ckpt["preprocessing"]["channels"] == [1, 0]
    assert mapper.network.encoder.patch_embed.proj.in_channels == 6  # 2 channels x (2k + 1) slices
    assert ckpt["config"]["network"]["in_channels"] == 6
    # inference reads the channels from the model: 3D maps in the space of the 4D inputs
    (dirs["test"] / "three_d.nii.gz").write_bytes((tiny_data["test"] / "case_normal.nii.gz").read_bytes())
    maps = tmp_path / "maps"
    with pytest.raises(SystemExit):  # the 3D input cannot give two channels: reported, the others written
        run_workflow("inference.json", "inference", input_dir=str(dirs["test"]), output_dir=str(maps),
                     ckpt_path=str(out / "models" / "model.pt"), report="false")
    for name in ("case_lesion", "case_normal"):
        src, res = nib.load(str(dirs["test"] / f"{name}.nii.gz")), nib.load(str(maps / f"{name}.nii.gz"))
        assert res.shape == src.shape[:3]
        np.testing.assert_allclose(res.affine, src.affine, atol=1e-5)
        assert np.isfinite(np.asarray(res.dataobj)).all() and np.asarray(res.dataobj).max() > 0
    failures = list(csv.DictReader(open(maps / "failures.csv")))
    assert [f["name"] for f in failures] == ["three_d"] and "need a 4D image" in failures[0]["reason"]
    (dirs["test"] / "three_d.nii.gz").unlink()
    run_workflow("evaluate.json", "evaluating", input_dir=str(dirs["test"]), label_dir=str(tiny_data["labels"]),
                 output_dir=str(tmp_path / "eval"), ckpt_path=str(out / "models" / "model.pt"), report="false")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["voxel"]["auroc"] <= 1.0
    # members of an ensemble must read the same channels
    with pytest.raises(CheckpointError, match="channels"):
        load_models([str(trained / "models" / "model.pt"), str(out / "models" / "model.pt")], "cpu")
