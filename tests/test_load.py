"""Tests of LoadVolume / LoadVolumed: LoadImage-compatible MetaTensors that MONAI's spatial transforms can invert."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import Dataset, MetaTensor, list_data_collate
from monai.transforms import (
    Compose,
    CropForegroundd,
    Invertd,
    LoadImage,
    Orientationd,
    Spacingd,
    SpatialPadd,
)
from monai.utils import SpaceKeys

from dicom_utils import write_dicom_series
from monai_dnprd.io import VolumeError, find_volume_error, read_volume
from monai_dnprd.transforms.load import LoadVolume, LoadVolumed

DEMO = Path(__file__).parents[1] / "monai_dnprd" / "demo_data"
IXI = DEMO / "IXI012-HH-1211_T1.nii.gz"  # orientation PSR, not RAS
IXI2 = DEMO / "IXI015-HH-1258_T1.nii.gz"


@pytest.fixture(scope="module")
def ixi_dicom(tmp_path_factory) -> Path:
    """A DICOM series made from the PSR demo volume."""
    folder = tmp_path_factory.mktemp("dcm") / "IXI012"
    write_dicom_series(IXI, folder)
    return folder


def test_load_volume_matches_load_image():
    ours = LoadVolume()(IXI)
    ref = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")(str(IXI))
    assert isinstance(ours, MetaTensor) and ours.shape == (1, 120, 120, 90) and ours.dtype == torch.float32
    assert torch.equal(ours.as_tensor(), ref.as_tensor())
    assert ours.affine.dtype == torch.float64 and torch.equal(ours.affine, ref.affine)
    assert np.array_equal(ours.meta["original_affine"], ref.meta["original_affine"])
    assert ours.meta["original_affine"] is not ours.affine
    assert np.array_equal(ours.meta["spatial_shape"], ref.meta["spatial_shape"])
    assert math.isnan(ours.meta["original_channel_dim"]) and math.isnan(ref.meta["original_channel_dim"])
    assert ours.meta["space"] == ref.meta["space"] == SpaceKeys.RAS
    assert ours.meta["filename_or_obj"] == str(IXI)
    assert ours.meta["source_format"] == "nifti" and ours.meta["nonfinite_replaced"] == 0
    assert ours.applied_operations == [] and not ours.is_batch


def _roundtrip(src, **item) -> tuple[dict, dict]:
    """Run the preprocessing chain and invert it; return (preprocessed item, inverted item)."""
    pre = Compose(
        [
            LoadVolumed("image"),
            Orientationd("image", axcodes="RAS"),
            CropForegroundd("image", source_key="image", margin=2),
            SpatialPadd("image", (128, 128, 128)),
        ]
    )
    out = pre({"image": src, **item})
    pred = out["image"].clone()
    pred[:] = out["image"] * 2 + 1  # some map computed in RAS space
    inv = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)
    return out, inv({"pred": pred, "image": out["image"]})


@pytest.mark.parametrize("kind", ["nifti", "dicom"])
def test_invertd_restores_input_geometry(kind, ixi_dicom):
    src = str(IXI) if kind == "nifti" else str(ixi_dicom)
    original = LoadVolume()(src)
    assert nib.aff2axcodes(original.affine.numpy()) != ("R", "A", "S")
    out, inverted = _roundtrip(src)
    assert nib.aff2axcodes(out["image"].affine.numpy()) == ("R", "A", "S")
    assert out["image"].shape[1:] == (128, 128, 128)  # cropped to the head, then padded
    back = inverted["pred"]
    assert back.shape == original.shape
    assert np.allclose(back.affine.numpy(), out["image"].meta["original_affine"], atol=1e-6)
    assert np.allclose(back.affine.numpy(), original.affine.numpy(), atol=1e-6)
    assert torch.allclose(back.as_tensor(), original.as_tensor() * 2 + 1)


def test_spacingd_inverts(ixi_dicom):
    pre = Compose([LoadVolumed("image"), Orientationd("image", axcodes="RAS"), Spacingd("image", pixdim=(3, 3, 3))])
    out = pre({"image": str(IXI)})
    assert np.allclose(np.abs(np.diag(out["image"].affine.numpy())[:3]), 3)
    back = Invertd("image", transform=pre, orig_keys="image")({"image": out["image"]})["image"]
    assert back.shape == (1, 120, 120, 90)
    assert np.allclose(back.affine.numpy(), nib.load(IXI).affine, atol=1e-5)


def test_loadvolumed_dict_keys_series_uid_and_index(tmp_path):
    two = tmp_path / "two"
    write_dicom_series(np.full((6, 6, 3), 5.0), two, affine=np.eye(4), series_uid="1.2.3.1", prefix="A")
    write_dicom_series(np.full((6, 6, 4), 7.0), two, affine=np.eye(4), series_uid="1.2.3.2", prefix="B")
    d = LoadVolumed()({"image": str(two), "series_uid": "1.2.3.2", "name": "x"})
    assert d["image"].shape == (1, 6, 6, 4) and float(d["image"].max()) == 7.0 and d["name"] == "x"
    assert d["image"].meta["source_format"] == "dicom" and d["image"].meta["filename_or_obj"] == str(two)
    four = np.random.default_rng(0).normal(size=(5, 6, 7, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(four, np.eye(4)), str(tmp_path / "four.nii.gz"))
    assert np.array_equal(LoadVolumed(index=2)({"image": str(tmp_path / "four.nii.gz")})["image"][0], four[..., 2])
    item = {"image": str(tmp_path / "four.nii.gz"), "index": 1}
    assert np.array_equal(LoadVolumed(index=2)(item)["image"][0], four[..., 1])
    with pytest.raises(VolumeError, match="choose one with index"):
        LoadVolumed()({"image": str(tmp_path / "four.nii.gz")})
    assert LoadVolumed(keys=["image", "label"], allow_missing_keys=True)({"image": str(IXI)})["image"].ndim == 4


def test_loadvolumed_stacks_sequences(tmp_path):
    aff = nib.load(IXI).affine.copy()
    second = np.sqrt(nib.load(IXI).get_fdata(dtype=np.float32))  # a "second sequence" on the same grid
    nib.save(nib.Nifti1Image(second, aff), str(tmp_path / "same.nii.gz"))
    paths = [str(IXI), str(tmp_path / "same.nii.gz")]
    img = LoadVolumed()({"image": paths})["image"]
    assert img.shape == (2, 120, 120, 90)
    assert torch.equal(img[1], LoadVolume()(paths[1])[0])
    assert img.meta["original_channel_dim"] == 0 and img.meta["filename_or_obj"] == str(IXI)
    ref = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")(paths)
    assert torch.equal(img.as_tensor(), ref.as_tensor()) and ref.meta["original_channel_dim"] == 0
    assert torch.allclose(img.affine, ref.affine)
    assert LoadVolumed()({"image": tuple(paths)})["image"].shape[0] == 2
    with pytest.raises(VolumeError, match="affine differs"):  # a different subject is not co-registered
        LoadVolumed()({"image": [str(IXI), str(IXI2)]})
    aff[0, 3] += 1.0
    nib.save(nib.Nifti1Image(np.zeros((120, 120, 90), np.float32), aff), str(tmp_path / "moved.nii.gz"))
    with pytest.raises(VolumeError, match="affine differs") as info:
        LoadVolumed()({"image": [str(IXI), str(tmp_path / "moved.nii.gz")]})
    assert "moved.nii.gz" in info.value.path
    nib.save(nib.Nifti1Image(np.zeros((120, 120, 91), np.float32), aff), str(tmp_path / "bigger.nii.gz"))
    with pytest.raises(VolumeError, match=r"shape \(120, 120, 91\) differs"):
        LoadVolumed()({"image": [str(IXI), str(tmp_path / "bigger.nii.gz")]})


def test_nonfinite_meta_and_collation(tmp_path):
    data = np.random.default_rng(1).uniform(1, 2, (8, 8, 8)).astype(np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.nan_to_num(data, nan=1.0), np.eye(4)), str(tmp_path / "ok.nii.gz"))
    ds = Dataset([{"image": str(tmp_path / "nan.nii.gz")}, {"image": str(tmp_path / "ok.nii.gz")}], LoadVolumed())
    batch = list_data_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 1, 8, 8, 8)
    assert batch["image"].meta["nonfinite_replaced"].tolist() == [1, 0]
    assert read_volume(tmp_path / "nan.nii.gz").info == {"nonfinite_replaced": 1}


def test_volume_error_survives_compose(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    pipeline = Compose([LoadVolumed(), Orientationd("image", axcodes="RAS")])
    with pytest.raises(RuntimeError) as info:
        pipeline({"image": str(tmp_path / "empty.nii.gz")})
    err = find_volume_error(info.value)
    assert isinstance(err, VolumeError) and err.reason == "empty file (0 bytes)"
    assert find_volume_error(RuntimeError("other")) is None
