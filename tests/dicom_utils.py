"""Test helper: write a DICOM series from a NIfTI (or array + RAS affine) with SimpleITK, for DICOM-input tests."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

_uid_counter = itertools.count(1)
_UID_ROOT = "1.2.826.0.1.3680043.2.1125"  # a test-only UID root; the suffix keeps every call unique


def new_uid() -> str:
    """Return a fresh, valid DICOM UID (digits and dots, <= 64 chars) unique within this process."""
    return f"{_UID_ROOT}.{os.getpid()}.{next(_uid_counter)}.{np.random.default_rng().integers(1, 10**9)}"


def right_handed(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip the last axis of a left-handed (X, Y, Z) volume so its geometry matches how a DICOM reader sorts slices.

    DICOM readers stack slices along cross(row, column); a left-handed NIfTI therefore comes back with Z reversed
    (the same image in world space). This gives the (array, affine) such a reader returns.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if np.linalg.det(affine[:3, :3]) >= 0:
        return np.asarray(array), affine.copy()
    nz = array.shape[2]
    flip = np.eye(4)
    flip[2, 2] = -1.0
    flip[2, 3] = nz - 1
    return np.ascontiguousarray(np.asarray(array)[:, :, ::-1]), affine @ flip


def _ds(value: float) -> str:
    """Format a number as a DICOM decimal string (at most 16 characters)."""
    for digits in range(12, 3, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.3g}"


def write_dicom_series(
    source,
    out_dir,
    *,
    affine: np.ndarray | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    dtype=np.int16,
    series_description: str = "test",
    prefix: str = "IM",
    suffix: str = ".dcm",
    patient_name: str = "Anonymous",
    patient_id: str = "TEST0001",
) -> list[Path]:
    """Write a volume as a single-frame DICOM series (one file per Z slice); return the written paths in Z order.

    `source` is a NIfTI path, or an (X, Y, Z) array with `affine` (RAS). Voxels are rounded and cast to `dtype`
    (int16 by default), the cast a reader will see. Files are named f"{prefix}{k:04d}{suffix}" (suffix may be "").
    A left-handed volume is flipped in Z first (see right_handed),
    so reading the series back gives exactly `right_handed(cast array, affine)`.
    """
    if affine is None:
        img = nib.load(str(source))
        array = np.asarray(img.dataobj, dtype=np.float64)
        affine = img.affine
    else:
        array = np.asarray(source, dtype=np.float64)
    array, affine = right_handed(array, np.asarray(affine, dtype=np.float64))
    info = np.iinfo(dtype)
    array = np.clip(np.rint(array), info.min, info.max).astype(dtype)

    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    origin = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or new_uid()
    study_uid = study_uid or new_uid()
    frame_uid = new_uid()
    iop = "\\".join(_ds(v) for v in (*direction[:, 0], *direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")  # DICOM whatever the file name
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(array.shape[2]):
        slice_img = sitk.GetImageFromArray(np.ascontiguousarray(array[:, :, k].T))  # (Y, X) -> sitk (X, Y)
        slice_img.SetSpacing((float(spacing[0]), float(spacing[1])))
        position = origin + direction[:, 2] * spacing[2] * k
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
            "0008|0018": new_uid(),
            "0008|0060": "MR",
            "0008|103e": series_description,
            "0010|0010": patient_name,
            "0010|0020": patient_id,
            "0010|0030": "19700101",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0052": frame_uid,
            "0020|0011": "1",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(_ds(v) for v in position),
            "0020|0037": iop,
            "0018|0050": _ds(float(spacing[2])),
            "0028|0030": f"{_ds(float(spacing[1]))}\\{_ds(float(spacing[0]))}",
        }
        for key, value in tags.items():
            slice_img.SetMetaData(key, value)
        path = out_dir / f"{prefix}{k + 1:04d}{suffix}"
        writer.SetFileName(str(path))
        writer.Execute(slice_img)
        paths.append(path)
    return paths


def expected_from_nifti(path, dtype=np.int16) -> tuple[np.ndarray, np.ndarray]:
    """Return the (float32 array, RAS affine) a reader should give for the series write_dicom_series makes of `path`."""
    img = nib.load(str(path))
    info = np.iinfo(dtype)
    array = np.clip(np.rint(np.asarray(img.dataobj, dtype=np.float64)), info.min, info.max)
    array, affine = right_handed(array, img.affine)
    return array.astype(np.float32), affine
