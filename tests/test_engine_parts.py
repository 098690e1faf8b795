"""Learning-rate schedule, datasets of the workflows and the volume inferer."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_dnprd.data import SafeDataset, inference_datalist, normal_datalists
from monai_dnprd.engines.evaluator import axial_axis
from monai_dnprd.engines.schedule import cosine_lr, stage_lambdas
from monai_dnprd.anomaly_map import gaussian_blur1d
from monai_dnprd.inferer import DNPVolumeInferer
from monai_dnprd.io import VolumeError
from monai_dnprd.networks import DNPConFormer


def test_cosine_lr_end_points():
    assert cosine_lr(0, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert cosine_lr(50, 100, 1.0, 0.1) == pytest.approx(0.55)
    assert cosine_lr(4, 100, 1.0, 0.1, warmup=10) == pytest.approx(0.5)


def test_stage_lambdas_freeze_the_right_groups():
    lam = stage_lambdas(1000, 200, encoder_lr=1e-5, decoder_lr=1e-4, decoder_lr_min=1e-5, mim_lr=1e-3)
    assert lam["decoder"](0) == 0.0 and lam["decoder"](199) == 0.0 and lam["decoder"](400) > 0
    assert lam["mim_head"](100) > 0 and lam["mim_head"](200) == 0.0
    assert lam["encoder"](500) == 1e-5 and lam["encoder"](100) > 1e-4
    assert lam["decoder"](999) == pytest.approx(1e-5, rel=0.05)


def test_safe_dataset_turns_failures_into_records(tmp_path):
    def transform(d):
        if d["name"] == "bad":
            raise VolumeError(d["image"], "cannot read: truncated")
        return {**d, "ok": True}

    ds = SafeDataset([{"name": "good", "image": "a"}, {"name": "bad", "image": "b"}], transform=transform)
    assert ds[0]["ok"] and "load_seconds" in ds[0]
    assert ds[1] == {"name": "bad", "image": "b", "error": "cannot read: truncated"}


def _write(path, shape=(8, 8, 6)):
    nib.save(nib.Nifti1Image(np.random.rand(*shape).astype(np.float32), np.eye(4)), str(path))


def test_normal_datalists_split_is_deterministic_and_disjoint(tmp_path):
    for i in range(10):
        _write(tmp_path / f"v{i}.nii.gz")
    train, val = normal_datalists(tmp_path, val_fraction=0.2, seed=1)
    assert len(val) == 2 and len(train) == 8
    assert not {d["name"] for d in train} & {d["name"] for d in val}
    assert normal_datalists(tmp_path, val_fraction=0.2, seed=1) == (train, val)


def test_inference_datalist_skip_existing(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir(), out.mkdir()
    for n in ("a", "b"):
        _write(inp / f"{n}.nii.gz")
    _write(out / "a.nii.gz")
    (out / ".b.nii.gz.0123456789ab.tmp.nii.gz").write_bytes(b"cut off by a kill")
    assert [d["name"] for d in inference_datalist(inp, out, skip_existing=True)] == ["a", "b"]  # a has no score yet
    assert not list(out.glob(".*tmp*"))  # stale temporary file removed
    (out / "scores.csv").write_text("name,score\na,0.5\n")
    assert [d["name"] for d in inference_datalist(inp, out, skip_existing=False)] == ["a", "b"]
    assert [d["name"] for d in inference_datalist(inp, out, skip_existing=True)] == ["b"]


def test_axial_axis_of_common_orientations():
    assert axial_axis(np.eye(4)) == 2  # RAS
    psr = np.array([[0, 0, 2, 0], [-2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]], float)  # P, S, R
    assert axial_axis(psr) == 1


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return DNPConFormer(img_size=16, patch_size=8, in_channels=3, vit="tiny", depth=2, num_register_tokens=0).eval()


def test_inferer_map_shape_mask_and_batch_invariance(tiny_net):
    vol = MetaTensor(torch.rand(1, 20, 20, 7), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    mask = torch.zeros(1, 20, 20, 7, dtype=torch.uint8)
    mask[:, 4:16, 4:16, 1:6] = 1
    a = DNPVolumeInferer(img_size=16, k=1, batch_size=2, sigma=1.0)(vol, tiny_net, mask=mask)
    b = DNPVolumeInferer(img_size=16, k=1, batch_size=7, sigma=1.0)(vol, tiny_net, mask=mask)
    assert a.shape == (1, 20, 20, 7) and isinstance(a, MetaTensor)
    assert torch.equal(a.affine, vol.affine)
    assert float(a[mask == 0].abs().max()) == 0.0
    assert float(a[mask > 0].min()) >= 0.0 and float(a[mask > 0].max()) > 0.0
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1])
def test_inferer_any_slicing_axis_matches_axial_on_the_permuted_volume(tiny_net, axis):
    torch.manual_seed(1)
    vol = torch.rand(1, 20, 18, 7)
    mask = torch.zeros(1, 20, 18, 7, dtype=torch.uint8)
    mask[:, 3:17, 2:15, 1:6] = 1
    ref = DNPVolumeInferer(img_size=16, k=1, sigma=1.0, z_sigma=1.0)(vol, tiny_net, mask=mask)
    moved = DNPVolumeInferer(img_size=16, k=1, axis=axis, sigma=1.0, z_sigma=1.0)(
        vol.movedim(3, 1 + axis), tiny_net, mask=mask.movedim(3, 1 + axis))
    torch.testing.assert_close(moved.movedim(1 + axis, 3), ref, rtol=1e-5, atol=1e-6)


def test_inferer_z_smoothing_is_the_gaussian_along_z_then_the_mask(tiny_net):
    torch.manual_seed(2)
    vol = torch.rand(1, 16, 16, 9)
    mask = torch.zeros(1, 16, 16, 9, dtype=torch.uint8)
    mask[:, 2:14, 3:13, 1:8] = 1
    full = torch.ones_like(mask)
    raw = DNPVolumeInferer(img_size=16, k=1, sigma=1.0, z_sigma=0.0)(vol, tiny_net, mask=full)
    smooth = DNPVolumeInferer(img_size=16, k=1, sigma=1.0, z_sigma=1.5)(vol, tiny_net, mask=full)
    torch.testing.assert_close(smooth, gaussian_blur1d(raw, 1.5, dim=3), rtol=1e-5, atol=1e-6)
    masked = DNPVolumeInferer(img_size=16, k=1, sigma=1.0, z_sigma=1.5)(vol, tiny_net, mask=mask)
    # slices without foreground are not scored (zero before smoothing), then the mask zeroes the outside
    expect = raw.clone()
    expect[..., [0, 8]] = 0.0
    torch.testing.assert_close(masked, gaussian_blur1d(expect, 1.5, dim=3) * mask, rtol=1e-5, atol=1e-6)


def test_inferer_z_smoothing_spreads_across_slices(tiny_net):
    vol = torch.zeros(1, 16, 16, 9)
    vol[..., 4] = torch.rand(16, 16)
    plain = DNPVolumeInferer(img_size=16, k=0, sigma=0.0, z_sigma=0.0)
    smooth = DNPVolumeInferer(img_size=16, k=0, sigma=0.0, z_sigma=1.5)
    net = DNPConFormer(img_size=16, patch_size=8, in_channels=1, vit="tiny", depth=2, num_register_tokens=0).eval()
    p, s = plain(vol, net), smooth(vol, net)
    assert p.std(dim=(0, 1, 2)).std() > s.std(dim=(0, 1, 2)).std()  # less slice-to-slice variation
