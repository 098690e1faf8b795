"""Tests of monai_dnprd.io: discovery, readers (formats, geometry, input checks), atomic writers, output folder."""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import rotation
from dicom_utils import expected_from_nifti, right_handed, write_dicom_series
from monai_dnprd.io import (
    IMAGE_SUFFIXES,
    Volume,
    VolumeError,
    find_volumes,
    prepare_output_dir,
    read_volume,
    scan_volumes,
    volume_affine_spacing,
    write_csv,
    write_nifti,
)
from monai_dnprd.io import discovery
from monai_dnprd.io.discovery import NOT_FOUND_REASON

DEMO = Path(__file__).parents[1] / "monai_dnprd" / "demo_data"
IXI = DEMO / "IXI012-HH-1211_T1.nii.gz"
SHARED = Path(__file__).parents[1].parent / "shared" / "data"


def save_nifti(path, array, affine=None) -> Path:
    """Write a NIfTI with nibabel directly (independent of write_nifti)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


def small(shape=(6, 7, 5), seed=0) -> np.ndarray:
    """A small random float32 volume."""
    return np.random.default_rng(seed).uniform(0, 100, shape).astype(np.float32)


def sitk_image(array_xyz, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    """SimpleITK image from an (X, Y, Z) array with the given LPS geometry."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array_xyz).T))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    return img


def expect_error(path, fragment: str, **kwargs) -> VolumeError:
    """read_volume must raise a one-line VolumeError naming the file and containing `fragment`."""
    with pytest.raises(VolumeError) as info:
        read_volume(path, **kwargs)
    err = info.value
    assert os.path.basename(os.fspath(path)) in str(err)
    assert "\n" not in str(err)
    assert str(err) == f"{err.path}: {err.reason}"
    assert fragment in err.reason, err.reason
    return err


# ----------------------------------------------------------------------------------------------------- errors
def test_volume_error_format_and_pickle():
    err = VolumeError(Path("/a/b.nii"), "bad\nthing  here")
    assert isinstance(err, ValueError)
    assert str(err) == "/a/b.nii: bad thing here"
    assert err.path == "/a/b.nii" and err.reason == "bad thing here"
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.path == err.path


# -------------------------------------------------------------------------------------------------- discovery
@pytest.fixture()
def mixed_tree(tmp_path):
    """A folder tree with NIfTI, NRRD, MGZ, MHA, two DICOM folders (one with two series) and non-image files."""
    root = tmp_path / "in"
    save_nifti(root / "site_a" / "case1.nii.gz", small())
    (root / "site_a" / "deep").mkdir(parents=True)
    sitk.WriteImage(sitk_image(small(seed=1)), str(root / "site_a" / "deep" / "case2.nrrd"))
    nib.save(nib.MGHImage(small(seed=2), np.eye(4)), str(root / "case3.mgz"))
    sitk.WriteImage(sitk_image(small(seed=3)), str(root / "case4.mha"))
    write_dicom_series(small((6, 6, 4), 4) * 10, root / "dicom" / "patient7", affine=np.eye(4), suffix="")
    two = root / "dicom" / "two"
    write_dicom_series(small((6, 6, 3), 5) * 10, two, affine=np.eye(4), series_uid="1.2.3.111111", prefix="A")
    write_dicom_series(small((6, 6, 3), 6) * 10, two, affine=np.eye(4), series_uid="1.2.3.4.5.222222", prefix="B")
    for name in ("notes.txt", "meta.json", "table.csv", "thumb.png", "DICOMDIR"):
        (root / name).write_text("not an image")
    (root / "dicom" / "patient7" / "readme.txt").write_text("sidecar")
    save_nifti(root / ".hidden.nii.gz", small())
    save_nifti(root / ".cache" / "hidden_dir.nii.gz", small())
    return root


def test_find_volumes_mixed_tree(mixed_tree):
    datalist, problems = find_volumes(mixed_tree)
    assert problems == []
    names = [e["name"] for e in datalist]
    assert names == sorted(names)
    assert names == ["case1", "case2", "case3", "case4", "patient7", "two_111111", "two_222222"]
    by_name = {e["name"]: e for e in datalist}
    assert by_name["case1"]["image"].endswith(os.path.join("site_a", "case1.nii.gz"))
    assert by_name["case1"]["series_uid"] == ""
    assert by_name["patient7"]["image"] == str(mixed_tree / "dicom" / "patient7")
    assert by_name["patient7"]["series_uid"]
    assert by_name["two_111111"]["series_uid"] == "1.2.3.111111"
    assert by_name["two_222222"]["series_uid"] == "1.2.3.4.5.222222"
    assert all(set(e) == {"image", "name", "series_uid"} for e in datalist)
    # every entry is readable and DICOM series are told apart
    for entry in datalist:
        vol = read_volume(entry["image"], entry["series_uid"] or None)
        assert vol.array.ndim == 3
    assert read_volume(mixed_tree / "dicom" / "two", "1.2.3.111111").array.shape == (6, 6, 3)
    assert find_volumes(mixed_tree) == (datalist, problems)  # deterministic


def test_scan_volumes_counts_the_files_that_are_not_volumes(mixed_tree):
    scan = scan_volumes(mixed_tree)
    assert (scan.volumes, scan.problems) == find_volumes(mixed_tree)
    assert [os.path.relpath(p, mixed_tree) for p in scan.ignored] == [
        "DICOMDIR", os.path.join("dicom", "patient7", "readme.txt"), "meta.json", "notes.txt", "table.csv", "thumb.png"
    ]  # hidden files and folders are not counted


def test_inference_summary_line_counts_ignored_files(tmp_path, caplog):
    from monai_dnprd.data import inference_datalist

    for name in ("a.nii.gz", "b.nii.gz"):
        save_nifti(tmp_path / "in" / name, small())
    (tmp_path / "in" / "notes.txt").write_text("x")
    (tmp_path / "in" / "IM0001").write_bytes(b"\0" * 300)  # no extension, not DICOM after all
    with caplog.at_level(logging.INFO, logger="monai_dnprd"):
        items = inference_datalist(tmp_path / "in")
    assert [d["name"] for d in items] == ["a", "b"]
    assert f"2 volumes found in {tmp_path / 'in'}, 2 files ignored (not volumes: IM0001, notes.txt)" in caplog.messages


def test_find_volumes_index_and_dicom_root(tmp_path):
    write_dicom_series(small((5, 5, 3)) * 10, tmp_path / "series_x", affine=np.eye(4))
    datalist, _ = find_volumes(tmp_path / "series_x", index=0)
    assert datalist == [
        {"image": str(tmp_path / "series_x"), "name": "series_x", "series_uid": datalist[0]["series_uid"], "index": 0}
    ]


def test_find_volumes_name_collisions(tmp_path):
    save_nifti(tmp_path / "s1" / "t1.nii.gz", small())
    save_nifti(tmp_path / "s2" / "t1.nii.gz", small())
    save_nifti(tmp_path / "s2" / "sub" / "other case.nii", small())
    save_nifti(tmp_path / "dup" / "a.nii", small())
    save_nifti(tmp_path / "dup" / "a.nii.gz", small())
    datalist, _ = find_volumes(tmp_path)
    names = [e["name"] for e in datalist]
    assert len(set(names)) == len(names) == 5
    assert {"s1__t1", "s2__t1", "other_case"} <= set(names)
    assert {"dup__a", "dup__a_2"} <= set(names)
    assert all("/" not in n and os.sep not in n and " " not in n for n in names)


def test_find_volumes_symlinks(tmp_path):
    root = tmp_path / "root"
    save_nifti(root / "sub" / "case.nii.gz", small())
    os.symlink(root, root / "sub" / "loop")  # loop back to the root
    outside = tmp_path / "outside"
    save_nifti(outside / "ext.nii.gz", small())
    os.symlink(outside, root / "linked")
    os.symlink(root / "sub" / "case.nii.gz", root / "alias.nii.gz")  # the same file twice
    os.symlink(tmp_path / "nowhere.nii.gz", root / "broken.nii.gz")
    datalist, problems = find_volumes(root)
    assert sorted(e["name"] for e in datalist) == ["alias", "ext"]
    assert len(problems) == 1 and "broken.nii.gz" in str(problems[0]) and "broken" in problems[0].reason


def test_find_volumes_lists_broken_files_and_reports_uninspectable(tmp_path, monkeypatch):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "fake.mha").write_text("not an image")
    (tmp_path / "IM0001").write_bytes(b"\0" * 300)
    real = discovery.has_dicom_magic

    def failing(path):
        if os.path.basename(path) == "IM0001":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(discovery, "has_dicom_magic", failing)
    datalist, problems = find_volumes(tmp_path)
    assert [e["name"] for e in datalist] == ["empty", "fake"]
    assert len(problems) == 1 and "IM0001" in str(problems[0]) and "Permission denied" in str(problems[0])
    with pytest.raises(VolumeError, match="empty file"):
        read_volume(datalist[0]["image"])


def test_find_volumes_empty_and_missing(tmp_path):
    (tmp_path / ".DS_Store").write_text("x")  # hidden: neither a volume nor an ignored file
    with pytest.raises(VolumeError) as info:
        find_volumes(tmp_path)
    assert info.value.reason == f"{NOT_FOUND_REASON}; the folder is empty" and str(tmp_path) in str(info.value)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "img.png").write_bytes(b"\x89PNG" + b"\0" * 200)
    with pytest.raises(VolumeError) as info:
        find_volumes(tmp_path)
    assert info.value.reason == f"{NOT_FOUND_REASON}; 2 files ignored (not volumes: img.png, notes.txt)"
    with pytest.raises(VolumeError, match="does not exist"):
        find_volumes(tmp_path / "missing")
    with pytest.raises(VolumeError, match="not a folder"):
        find_volumes(tmp_path / "notes.txt")


def test_image_suffixes_constant():
    assert IMAGE_SUFFIXES == (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".mgz")
    assert discovery.image_suffix("A.NII.GZ") == ".NII.GZ" and discovery.image_suffix("x.gz") == ""


# ------------------------------------------------------------------------------------------- readers: formats
def test_read_nifti_demo_matches_nibabel():
    vol = read_volume(IXI)
    img = nib.load(IXI)
    assert isinstance(vol, Volume) and vol.source_format == "nifti" and vol.info == {}
    assert vol.array.dtype == np.float32 and vol.array.shape == (120, 120, 90)
    assert vol.affine.dtype == np.float64 and np.array_equal(vol.affine, img.affine)
    assert np.array_equal(vol.array, img.get_fdata(dtype=np.float32))
    assert nib.aff2axcodes(vol.affine) == ("P", "S", "R")
    assert np.allclose(volume_affine_spacing(vol.affine), [2, 2, 2])


def test_read_nifti_scaling_applied(tmp_path):
    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4))
    img.header.set_slope_inter(0.5, 10)
    nib.save(img, str(tmp_path / "s.nii"))
    vol = read_volume(tmp_path / "s.nii")
    assert np.allclose(vol.array, np.arange(60).reshape(3, 4, 5) * 0.5 + 10)


def test_oblique_and_sheared_affine_kept_exactly(tmp_path):
    aff = np.eye(4)
    aff[:3, :3] = rotation((0.3, -0.2, 0.7)) @ np.diag([0.9, 1.3, 3.1])
    aff[0, 1] += 0.25  # shear: not representable by a qform
    aff[:3, 3] = [-90.5, 12.25, 40.0]
    path = save_nifti(tmp_path / "shear.nii.gz", small())
    img = nib.Nifti1Image(small(), aff)
    nib.save(img, str(path))
    vol = read_volume(path)
    assert np.array_equal(vol.affine, nib.load(path).affine)
    assert np.allclose(vol.affine, aff, atol=1e-5)
    assert np.allclose(volume_affine_spacing(aff), np.linalg.norm(aff[:3, :3], axis=0))


def test_read_mgz_lia(tmp_path):
    lia = np.array([[-1.0, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1]])
    data = small((8, 9, 10))
    nib.save(nib.MGHImage(data, lia), str(tmp_path / "brain.mgz"))
    vol = read_volume(tmp_path / "brain.mgz")
    assert vol.source_format == "mgh"
    assert nib.aff2axcodes(vol.affine) == ("L", "I", "A")
    assert np.allclose(vol.affine, lia, atol=1e-5) and np.array_equal(vol.array, data)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd", ".nhdr"])
def test_itk_formats_agree_with_nifti(tmp_path, suffix):
    direction = np.diag([1.0, -1.0, 1.0]) @ rotation((0.1, 0.4, -0.3))
    img = sitk_image(small((7, 6, 5)), spacing=(0.8, 1.1, 3.0), origin=(10.0, -20.5, 3.25), direction=direction)
    sitk.WriteImage(img, str(tmp_path / f"v{suffix}"))
    sitk.WriteImage(img, str(tmp_path / "v.nii.gz"))  # SimpleITK's own LPS -> RAS conversion, read by nibabel
    vol = read_volume(tmp_path / f"v{suffix}")
    ref = read_volume(tmp_path / "v.nii.gz")
    assert vol.source_format == "itk" and vol.array.shape == (7, 6, 5)
    assert np.array_equal(vol.array, small((7, 6, 5)))
    assert np.allclose(vol.affine, ref.affine, atol=1e-4)
    assert np.array_equal(vol.array, ref.array)
    expected = np.eye(4)
    expected[:3, :3] = direction * np.array([0.8, 1.1, 3.0])
    expected[:3, 3] = (10.0, -20.5, 3.25)
    assert np.allclose(vol.affine, np.diag([-1, -1, 1, 1]) @ expected, atol=1e-6)


def test_dicom_series_matches_nifti_geometry(tmp_path):
    folder = tmp_path / "dcm"
    write_dicom_series(IXI, folder, patient_name="Doe^Jane", patient_id="PID12345")
    vol = read_volume(folder)
    array, affine = expected_from_nifti(IXI)
    assert vol.source_format == "dicom"
    assert np.allclose(vol.affine, affine, atol=1e-4)
    assert np.allclose(vol.array, array)
    # same world geometry as the NIfTI itself
    nifti = read_volume(IXI)
    flipped, flipped_aff = right_handed(nifti.array, nifti.affine)
    assert np.allclose(flipped_aff, vol.affine, atol=1e-4)
    assert np.allclose(np.rint(flipped), vol.array)
    assert "Doe" not in repr(vol.info) and "PID12345" not in repr(vol.info)


def test_dicom_right_handed_oblique_exact(tmp_path):
    aff = np.eye(4)
    aff[:3, :3] = rotation((0.2, 0.1, -0.4)) @ np.diag([0.7, 0.7, 2.5])
    aff[:3, 3] = [5.5, -30.0, 12.0]
    data = np.rint(small((9, 8, 6)) * 10)
    write_dicom_series(data, tmp_path / "obl", affine=aff)
    vol = read_volume(tmp_path / "obl")
    assert np.allclose(vol.affine, aff, atol=1e-4) and np.array_equal(vol.array, data)


# -------------------------------------------------------------------------------------- readers: input checks
def test_missing_empty_truncated_corrupt(tmp_path):
    expect_error(tmp_path / "missing.nii.gz", "file not found")
    for name in ("zero.nii.gz", "zero.mha", "zero.nrrd", "zero.mgz"):
        (tmp_path / name).write_bytes(b"")
        expect_error(tmp_path / name, "empty file")
    data = IXI.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(data[: len(data) // 2])
    err = expect_error(tmp_path / "trunc.nii.gz", "cannot read")
    assert "EOFError" in err.reason or "ended" in err.reason
    (tmp_path / "short.nii.gz").write_bytes(data[:60])
    expect_error(tmp_path / "short.nii.gz", "cannot read")
    raw = gzip.decompress(data)
    (tmp_path / "trunc.nii").write_bytes(raw[: len(raw) // 3])
    expect_error(tmp_path / "trunc.nii", "cannot read")
    for name in ("garbage.nii.gz", "garbage.nii", "garbage.nrrd", "garbage.mha", "garbage.mgz"):
        (tmp_path / name).write_bytes(b"this is not an image at all " * 40)
        expect_error(tmp_path / name, "cannot read")
    sitk.WriteImage(sitk_image(small()), str(tmp_path / "lonely.mhd"))
    for raw_file in tmp_path.glob("lonely.*raw"):
        raw_file.unlink()
    expect_error(tmp_path / "lonely.mhd", "cannot read")
    sitk.WriteImage(sitk_image(small((20, 20, 20))), str(tmp_path / "cut.mha"))
    blob = (tmp_path / "cut.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(blob[: len(blob) // 2])
    expect_error(tmp_path / "cut.mha", "cannot read")


def test_2d_images_refused(tmp_path):
    save_nifti(tmp_path / "flat.nii.gz", small((10, 12)))
    expect_error(tmp_path / "flat.nii.gz", "2D image of shape (10, 12); a 3D volume is needed")
    save_nifti(tmp_path / "one.nii.gz", small((10, 12, 1)))
    expect_error(tmp_path / "one.nii.gz", "2D image of shape (10, 12, 1)")
    save_nifti(tmp_path / "mid.nii.gz", small((10, 1, 8)))
    expect_error(tmp_path / "mid.nii.gz", "2D image")
    sitk.WriteImage(sitk.GetImageFromArray(small((9, 11))), str(tmp_path / "flat.mha"))
    expect_error(tmp_path / "flat.mha", "2D image of shape (11, 9)")


def test_4d_and_5d(tmp_path):
    data = small((5, 6, 7, 3))
    save_nifti(tmp_path / "four.nii.gz", data)
    expect_error(tmp_path / "four.nii.gz", "4D volume with 3 volumes/channels; choose one with index=")
    assert np.array_equal(read_volume(tmp_path / "four.nii.gz", index=1).array, data[..., 1])
    assert np.array_equal(read_volume(tmp_path / "four.nii.gz", index=-1).array, data[..., 2])
    expect_error(tmp_path / "four.nii.gz", "index=3 is out of range", index=3)
    save_nifti(tmp_path / "single.nii.gz", data[..., :1])
    assert np.array_equal(read_volume(tmp_path / "single.nii.gz").array, data[..., 0])
    save_nifti(tmp_path / "five.nii.gz", small((5, 6, 7, 2, 2)))
    expect_error(tmp_path / "five.nii.gz", "5D image", index=0)
    vec = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0, 3)), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "vec.nrrd"))
    expect_error(tmp_path / "vec.nrrd", "4D volume with 3")
    assert np.array_equal(read_volume(tmp_path / "vec.nrrd", index=2).array, data[..., 2])


def test_nonfinite_rule(tmp_path, caplog):
    data = small((10, 10, 10))
    few = data.copy()
    few[0, 0, :5] = np.nan
    few[1, 1, 0] = np.inf
    few[2, 2, 0] = -np.inf
    save_nifti(tmp_path / "few.nii.gz", few)
    with caplog.at_level(logging.WARNING):
        vol = read_volume(tmp_path / "few.nii.gz")
    assert vol.info == {"nonfinite_replaced": 7}
    assert np.isfinite(vol.array).all()
    finite_min = np.nanmin(np.where(np.isfinite(few), few, np.nan))
    assert np.all(vol.array[0, 0, :5] == finite_min) and vol.array[1, 1, 0] == finite_min
    assert "few.nii.gz" in caplog.text and "7" in caplog.text
    ten = data.copy()
    ten[0, :, :2] = np.nan  # 20 of 1000 voxels = 2 %
    save_nifti(tmp_path / "many.nii.gz", ten)
    expect_error(tmp_path / "many.nii.gz", "20 of 1000 voxels (2.00 %) are NaN/Inf")
    save_nifti(tmp_path / "all.nii.gz", np.full((4, 4, 4), np.nan, np.float32))
    expect_error(tmp_path / "all.nii.gz", "no finite voxel")
    exactly = data.copy()
    exactly[0, 0, :10] = np.nan  # exactly 1 %: still repaired
    save_nifti(tmp_path / "edge.nii.gz", exactly)
    assert read_volume(tmp_path / "edge.nii.gz").info["nonfinite_replaced"] == 10


def test_singular_affine_refused(tmp_path):
    hdr = nib.Nifti1Header()
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]
    hdr["sform_code"] = 1  # the sform has a zero column: voxels collapse onto a plane
    nib.save(nib.Nifti1Image(small(), None, header=hdr), str(tmp_path / "flat_aff.nii.gz"))
    assert nib.load(tmp_path / "flat_aff.nii.gz").affine[2, 2] == 0
    expect_error(tmp_path / "flat_aff.nii.gz", "invalid geometry")


@pytest.fixture()
def dicom_series(tmp_path):
    """A 10-slice axial series with 2 mm slices (files IM0001..IM0010)."""
    aff = np.diag([0.9, 0.9, 2.0, 1.0])
    aff[:3, 3] = [-20, -30, 40]
    files = write_dicom_series(np.rint(small((8, 8, 10)) * 10), tmp_path / "series", affine=aff)
    return tmp_path / "series", files


def test_dicom_missing_slice(dicom_series):
    folder, files = dicom_series
    files[4].unlink()
    err = expect_error(folder, "missing slice(s)")
    assert "gap of 4 mm" in err.reason and "median spacing 2 mm" in err.reason


def test_dicom_uneven_spacing(dicom_series):
    folder, files = dicom_series
    ds = pydicom.dcmread(files[4])
    pos = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + 0.4]
    ds.save_as(files[4])
    expect_error(folder, "uneven slice spacing")


def test_dicom_small_jitter_accepted(dicom_series):
    folder, files = dicom_series
    ds = pydicom.dcmread(files[4])
    pos = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [pos[0], pos[1], pos[2] + 0.005]  # below 0.01 mm and 1 %
    ds.save_as(files[4])
    assert read_volume(folder).array.shape == (8, 8, 10)


def test_dicom_orientation_and_size_mismatch(dicom_series, tmp_path):
    folder, files = dicom_series
    ds = pydicom.dcmread(files[3])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
    ds.save_as(files[3])
    expect_error(folder, "different orientations")
    shutil.rmtree(folder)
    uid = "1.2.3.99"
    write_dicom_series(small((8, 8, 4)) * 10, folder, affine=np.eye(4), series_uid=uid)
    shifted = np.eye(4)
    shifted[2, 3] = 4.0
    write_dicom_series(small((8, 9, 1)) * 10, tmp_path / "other", affine=shifted, series_uid=uid)
    shutil.copy(tmp_path / "other" / "IM0001.dcm", folder / "X0001.dcm")
    expect_error(folder, "different sizes")


def test_dicom_single_slice_two_series_and_identifiers(tmp_path, caplog):
    write_dicom_series(small((8, 8, 1)) * 10, tmp_path / "one", affine=np.eye(4), patient_name="Doe^Jane")
    err = expect_error(tmp_path / "one", "2D image")
    assert "Doe" not in str(err)
    two = tmp_path / "two"
    write_dicom_series(small((6, 6, 3)) * 10, two, affine=np.eye(4), series_uid="1.2.3.1", prefix="A")
    write_dicom_series(small((6, 6, 4)) * 10, two, affine=np.eye(4), series_uid="1.2.3.2", prefix="B")
    expect_error(two, "holds 2 DICOM series; choose one with series_uid")
    assert read_volume(two, "1.2.3.2").array.shape == (6, 6, 4)
    expect_error(two, "not found in folder", series_uid="1.2.3.777")
    (tmp_path / "nodicom").mkdir()
    (tmp_path / "nodicom" / "a.txt").write_text("x")
    expect_error(tmp_path / "nodicom", "no DICOM image series")


def test_dicom_without_extension_via_reader(tmp_path):
    write_dicom_series(small((6, 6, 3)) * 10, tmp_path / "noext", affine=np.eye(4), suffix="")
    (tmp_path / "noext" / "info.json").write_text("{}")
    assert read_volume(tmp_path / "noext").array.shape == (6, 6, 3)


@pytest.mark.skipif(not (SHARED / "pyradiomics_brain" / "brain1_image.nrrd").exists(), reason="shared data absent")
def test_shared_nrrd_thick_slices():
    vol = read_volume(SHARED / "pyradiomics_brain" / "brain1_image.nrrd")
    spacing = volume_affine_spacing(vol.affine)
    assert vol.array.ndim == 3 and spacing.max() > 5 and spacing.min() < 1


@pytest.mark.skipif(not (SHARED / "normal_brain" / "niivue_freesurfer_bert_norm.mgz").exists(), reason="absent")
def test_shared_mgz_lia():
    path = SHARED / "normal_brain" / "niivue_freesurfer_bert_norm.mgz"
    vol = read_volume(path)
    assert vol.source_format == "mgh" and vol.array.shape == (256, 256, 256)
    assert nib.aff2axcodes(vol.affine) == ("L", "I", "A")
    assert np.array_equal(vol.affine, nib.load(path).affine)


# ---------------------------------------------------------------------------------------------------- writers
def test_write_nifti_roundtrip_atomic_and_torch(tmp_path):
    aff = np.eye(4)
    aff[:3, :3] = rotation((0.1, 0.2, 0.3)) @ np.diag([1.0, 2.0, 3.0])
    aff[:3, 3] = [1.5, -2.5, 3.5]
    data = small()
    out = write_nifti(torch.from_numpy(data), torch.from_numpy(aff), tmp_path / "out" / "map.nii.gz")
    assert out == tmp_path / "out" / "map.nii.gz"
    assert os.listdir(tmp_path / "out") == ["map.nii.gz"]
    img = nib.load(out)
    assert img.header["sform_code"] == 1 and img.header["qform_code"] == 1
    assert np.allclose(img.get_qform(), aff, atol=1e-5)
    vol = read_volume(out)
    assert np.allclose(vol.affine, aff, atol=1e-5) and np.array_equal(vol.array, data)
    write_nifti(data[None], aff, tmp_path / "mask.nii", dtype=np.uint8)
    assert nib.load(tmp_path / "mask.nii").get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(nib.load(tmp_path / "mask.nii").dataobj), np.clip(np.rint(data), 0, 255))
    with pytest.raises(ValueError, match="must end with .nii"):
        write_nifti(data, aff, tmp_path / "x.mha")
    with pytest.raises(ValueError, match="expected an"):
        write_nifti(data[0], aff, tmp_path / "x.nii")


def test_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = write_nifti(small(), np.eye(4), tmp_path / "a.nii.gz")
    before = target.read_bytes()

    def broken_save(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(small(seed=9), np.eye(4), target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.nii.gz"]


def test_write_csv(tmp_path):
    rows = [{"name": "a", "score": 0.5}, {"name": "b,c", "score": 1}, {"name": "d"}]
    path = write_csv(rows, tmp_path / "scores.csv", ["name", "score"])
    assert path.read_text(encoding="utf-8").splitlines() == ["name,score", "a,0.5", '"b,c",1', "d,"]
    with pytest.raises(ValueError):
        write_csv([{"name": "x", "other": 1}], path, ["name", "score"])
    assert os.listdir(tmp_path) == ["scores.csv"]
    assert path.read_text(encoding="utf-8").startswith("name,score\na,0.5")


def test_prepare_output_dir(tmp_path):
    inp = tmp_path / "input"
    inp.mkdir()
    (inp / "case.nii.gz").write_bytes(b"x")
    out = prepare_output_dir(tmp_path / "results" / "run1", [inp])
    assert out.is_dir() and os.listdir(out) == []
    for bad in (inp, inp / "sub" / "out"):
        with pytest.raises(ValueError, match="must not be the input folder") as info:
            prepare_output_dir(bad, [inp])
        assert "\n" not in str(info.value)
    os.symlink(inp, tmp_path / "alias")
    with pytest.raises(ValueError, match="must not be the input folder"):
        prepare_output_dir(tmp_path / "alias" / "out", [inp])
    with pytest.raises(ValueError, match="must not be the input folder"):
        prepare_output_dir(inp / "out", [inp / "case.nii.gz"])  # a file input counts by its folder
    assert not (inp / "sub").exists() and not (inp / "out").exists()
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot create the output folder"):
        prepare_output_dir(blocker / "out")
    with pytest.raises(ValueError, match="cannot create the output folder"):
        prepare_output_dir(blocker)
    with pytest.raises(VolumeError, match="input folder does not exist") as info:  # refused before making the output
        prepare_output_dir(tmp_path / "results" / "run2", [tmp_path / "missing"])
    assert info.value.path == str(tmp_path / "missing") and not (tmp_path / "results" / "run2").exists()


def test_prepare_output_dir_unwritable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(ValueError, match="not writable"):
            prepare_output_dir(locked)
    finally:
        locked.chmod(0o700)


def test_prepare_output_dir_probe_failure(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    def deny(file, *args, **kwargs):
        if ".write_probe_" in os.fspath(file):
            raise PermissionError(13, "Permission denied", file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(ValueError, match="not writable: Permission denied"):
        prepare_output_dir(tmp_path / "o")


# ----------------------------------------------------------------------------------------- property tests
_axes = st.permutations([0, 1, 2])
_signs = st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(*[st.integers(2, 6)] * 3),
    spacing=st.tuples(*[st.floats(0.2, 6.0)] * 3),
    perm=_axes,
    signs=_signs,
    angles=st.tuples(*[st.floats(-0.5, 0.5)] * 3),
    origin=st.tuples(*[st.floats(-300, 300)] * 3),
)
def test_nifti_affine_roundtrip_property(tmp_path, shape, spacing, perm, signs, angles, origin):
    rot = rotation(angles) @ np.eye(3)[:, list(perm)] @ np.diag(signs)
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = origin
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    path = write_nifti(data, aff, tmp_path / "p.nii.gz")
    vol = read_volume(path)
    assert np.allclose(vol.affine, aff, rtol=1e-6, atol=1e-4)
    assert np.allclose(volume_affine_spacing(vol.affine), spacing, rtol=1e-5)
    assert np.array_equal(vol.array, data)
    assert nib.aff2axcodes(vol.affine) == nib.aff2axcodes(aff)
