"""Read one volume (NIfTI, MGZ, MHA/MHD/NRRD, DICOM series) as float32 (X, Y, Z) + RAS affine, with input checks."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .discovery import dicom_series_ids, image_suffix, quiet_itk
from .errors import VolumeError

logger = logging.getLogger(__name__)

NONFINITE_MAX_FRACTION = 0.01  # at most 1 % NaN/Inf voxels are repaired; more means a broken volume
SLICE_GAP_FACTOR = 1.5  # a gap above 1.5x the median slice spacing means missing slice(s)
SPACING_REL_TOL = 0.01  # slice spacings may deviate from the median by 1 % ...
SPACING_ABS_TOL = 0.01  # ... or 0.01 mm, whichever is larger
_NIBABEL_SUFFIXES = {".nii": "nifti", ".nii.gz": "nifti", ".mgz": "mgh", ".mgh": "mgh"}
_ITK_SUFFIXES = {".mha", ".mhd", ".nrrd", ".nhdr"}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A volume ready for MONAI: float32 (X, Y, Z) voxels, RAS voxel->world affine, format and non-identifying info."""

    array: np.ndarray
    affine: np.ndarray
    source_format: str
    info: dict = field(default_factory=dict)


def volume_affine_spacing(affine) -> np.ndarray:
    """Voxel sizes of an affine (column norms of its 3x3 part), in the affine's units (mm)."""
    a = np.asarray(affine, dtype=np.float64)
    return np.sqrt((a[:3, :3] ** 2).sum(axis=0))


def _short_cause(err: BaseException, path: str | None = None) -> str:
    """One short line explaining a library exception (drops ITK source locations and the repeated path)."""
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    line = re.sub(r"^.*?(sitk::ERROR|itk::ERROR|ERROR):\s*", "", line)
    if path:
        line = line.replace(f'"{path}"', "file").replace(path, "file")
    line = line.strip() or type(err).__name__
    if type(err).__name__ not in ("RuntimeError", "ImageFileError", "OSError") and type(err).__name__ not in line:
        line = f"{type(err).__name__}: {line}"
    return line[:200]


def itk_affine(image: sitk.Image) -> np.ndarray:
    """RAS voxel->world affine of a SimpleITK image (spatial part of origin/spacing/direction, LPS -> RAS)."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing[None, :]
    affine[:3, 3] = origin
    return _LPS_TO_RAS @ affine


def _itk_array(image: sitk.Image) -> np.ndarray:
    """Voxels of a SimpleITK image in (X, Y, Z[, T or components]) order."""
    arr = sitk.GetArrayViewFromImage(image)
    n_spatial = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() > 1:  # (..., Z, Y, X, C) -> (X, Y, Z, C)
        order = tuple(range(n_spatial - 1, -1, -1)) + (n_spatial,)
        return np.array(arr.transpose(order))
    return np.array(arr.T)


def _shape_text(shape) -> str:
    """Shape as "(a, b, c)"."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _select_3d(shape: tuple[int, ...], index: int | tuple[int, ...] | None, path: str) -> tuple | None:
    """Check an (X, Y, Z, ...) shape and return the indexer choosing one 3D volume (None: use as is).

    A tuple ``index`` chooses several volumes/channels of a 4D image at once: the indexer then gives an
    (X, Y, Z, C) array, which ``_finish`` makes channel-first (``read_channels``). On a 3D image only
    ``(0,)`` is accepted.
    """
    shape = tuple(int(s) for s in shape)
    spatial_msg = "; a 3D volume is needed"
    if len(shape) < 3:
        raise VolumeError(path, f"2D image of shape {_shape_text(shape)}{spatial_msg}")
    extra = shape[3:]
    while extra and extra[-1] == 1:  # trailing singleton dims (e.g. (X, Y, Z, 1)) are squeezed
        extra = extra[:-1]
    if any(s == 1 for s in shape[:3]):
        raise VolumeError(path, f"2D image of shape {_shape_text(shape)}{spatial_msg}")
    if len(extra) > 1:
        raise VolumeError(path, f"{len(shape)}D image of shape {_shape_text(shape)} is not supported{spatial_msg}")
    tail = (0,) * (len(shape) - 3 - len(extra))
    if not extra:
        if isinstance(index, tuple):
            if tuple(index) != (0,):
                raise VolumeError(path, f"channels {list(index)} need a 4D image; this one is 3D of shape "
                                        f"{_shape_text(shape)} (one channel)")
            return (slice(None),) * 3 + tail + (None,)  # (X, Y, Z, 1)
        return (slice(None),) * 3 + tail if tail else None
    n = extra[0]
    if index is None:
        raise VolumeError(path, f"4D volume with {n} volumes/channels; choose one with index=... "
                                "(the bundle's `channels` setting)")
    chosen = index if isinstance(index, tuple) else (index,)
    bad = [int(i) for i in chosen if not -n <= int(i) < n]
    if bad:
        raise VolumeError(path, f"index={bad[0]} is out of range for a 4D volume with {n} volumes/channels")
    if isinstance(index, tuple):
        return (slice(None),) * 3 + (np.array([int(i) for i in index]),) + tail
    return (slice(None),) * 3 + (int(index),) + tail


def _check_affine(affine: np.ndarray, path: str) -> np.ndarray:
    """Refuse affines that MONAI cannot resample with (non-finite or singular 3x3 part)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise VolumeError(path, "invalid geometry: the voxel-to-world affine is not finite")
    spacing = volume_affine_spacing(affine)
    if np.any(spacing <= 0) or abs(np.linalg.det(affine[:3, :3])) <= 1e-12 * float(np.prod(spacing)):
        sizes = spacing.round(6).tolist()
        raise VolumeError(path, f"invalid geometry: singular voxel-to-world affine (voxel sizes {sizes})")
    return affine


def _repair_nonfinite(array: np.ndarray, path: str, info: dict) -> np.ndarray:
    """Apply the non-finite rule: at most 1 % NaN/Inf voxels are set to the minimum finite value, else an error."""
    finite = np.isfinite(array)
    n_bad = int(array.size - np.count_nonzero(finite))
    if n_bad == 0:
        return array
    if n_bad == array.size:
        raise VolumeError(path, "no finite voxel (all values are NaN/Inf)")
    fraction = n_bad / array.size
    if fraction > NONFINITE_MAX_FRACTION:
        raise VolumeError(
            path,
            f"{n_bad} of {array.size} voxels ({100 * fraction:.2f} %) are NaN/Inf; at most "
            f"{100 * NONFINITE_MAX_FRACTION:g} % can be repaired",
        )
    fill = array[finite].min()
    array = array.copy() if not array.flags.writeable else array
    array[~finite] = fill
    info["nonfinite_replaced"] = n_bad
    logger.warning("%s: replaced %d NaN/Inf voxel(s) by the minimum finite value %g", path, n_bad, float(fill))
    return array


def _finish(array: np.ndarray, affine: np.ndarray, fmt: str, path: str, index: int | tuple[int, ...] | None,
            info: dict, selected: bool = False) -> Volume:
    """Shape checks, index choice (unless already ``selected``), float32 cast, non-finite rule, geometry check.

    Several chosen channels (a tuple ``index``) give a channel-first (C, X, Y, Z) array, each channel
    contiguous and held to the non-finite rule on its own (their intensities need not share a scale).
    """
    indexer = None if selected else _select_3d(array.shape, index, path)
    if indexer is not None:
        array = array[indexer]
    if isinstance(index, tuple):
        array = np.ascontiguousarray(np.moveaxis(array, -1, 0), dtype=np.float32)
        replaced = 0
        for c in range(array.shape[0]):
            one: dict = {}
            array[c] = _repair_nonfinite(array[c], path, one)
            replaced += one.get("nonfinite_replaced", 0)
        if replaced:
            info["nonfinite_replaced"] = replaced
    else:
        array = _repair_nonfinite(np.ascontiguousarray(array, dtype=np.float32), path, info)
    return Volume(array=array, affine=_check_affine(affine, path), source_format=fmt, info=info)


def _read_nibabel(path: str, fmt: str, index: int | tuple[int, ...] | None) -> Volume:
    """Read NIfTI / MGH(MGZ) with nibabel: best affine exactly as stored, scaled voxels as float32."""
    try:
        img = nib.load(path)
        shape = tuple(img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:
        raise VolumeError(path, f"cannot read: {_short_cause(err, path)}") from err
    indexer = _select_3d(shape, index, path)
    try:
        proxy = img.dataobj
        if isinstance(index, tuple):  # several channels: one full read, then numpy indexing
            data = np.asarray(proxy[...])[indexer]
        else:
            data = np.asarray(proxy[indexer] if indexer is not None else proxy[...])
    except Exception as err:  # truncated/corrupt data (EOFError, zlib.error, gzip errors, short reads)
        raise VolumeError(path, f"cannot read: {_short_cause(err, path)}") from err
    return _finish(data, affine, fmt, path, index, {}, selected=True)  # the indexer has been applied


def _read_itk(path: str, index: int | tuple[int, ...] | None, fmt: str = "itk") -> Volume:
    """Read MHA/MHD/NRRD/NHDR (or another ITK-readable file) with SimpleITK; LPS -> RAS affine."""
    try:
        with quiet_itk():
            image = sitk.ReadImage(path)
    except Exception as err:
        raise VolumeError(path, f"cannot read: {_short_cause(err, path)}") from err
    if image.GetDimension() < 3:
        raise VolumeError(path, f"2D image of shape {_shape_text(image.GetSize())}; a 3D volume is needed")
    return _finish(_itk_array(image), itk_affine(image), fmt, path, index, {})


def _dicom_tag_vector(reader: sitk.ImageFileReader, tag: str) -> np.ndarray | None:
    """Parse a backslash-separated numeric DICOM tag (e.g. ImagePositionPatient); None when absent or malformed."""
    if not reader.HasMetaDataKey(tag):
        return None
    try:
        return np.asarray([float(v) for v in reader.GetMetaData(tag).strip().split("\\")], dtype=np.float64)
    except ValueError:
        return None


def check_dicom_slices(files: list[str], folder: str) -> None:
    """Check a single-frame DICOM series: same size and orientation, no missing slice, even slice spacing."""
    reader = sitk.ImageFileReader()
    reader.LoadPrivateTagsOff()
    sizes, orientations, positions = [], [], []
    for f in files:
        reader.SetFileName(f)
        try:
            with quiet_itk():
                reader.ReadImageInformation()
        except Exception as err:
            raise VolumeError(folder, f"cannot read DICOM file {os.path.basename(f)}: {_short_cause(err, f)}") from err
        sizes.append(tuple(reader.GetSize()[:2]))
        orientations.append(_dicom_tag_vector(reader, "0020|0037"))
        positions.append(_dicom_tag_vector(reader, "0020|0032"))
    if len(set(sizes)) > 1:
        raise VolumeError(folder, f"DICOM slices have different sizes: {sorted(set(sizes))}")
    if any(o is None or o.size != 6 for o in orientations) or any(p is None or p.size != 3 for p in positions):
        raise VolumeError(
            folder, "DICOM slices lack ImagePositionPatient/ImageOrientationPatient; cannot place them in 3D"
        )
    iop = np.stack(orientations)
    if np.abs(iop - iop[0]).max() > 1e-4:
        raise VolumeError(folder, "DICOM slices have different orientations (ImageOrientationPatient)")
    normal = np.cross(iop[0, :3], iop[0, 3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise VolumeError(folder, "invalid ImageOrientationPatient (row and column directions are parallel)")
    along = np.sort(np.stack(positions) @ (normal / norm))
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        n_dup = int(np.count_nonzero(steps < 1e-3))
        raise VolumeError(folder, f"{n_dup} DICOM slice(s) share a position (several volumes in one series?)")
    median = float(np.median(steps))
    worst = int(np.argmax(steps))
    if steps[worst] > SLICE_GAP_FACTOR * median:
        n_missing = max(1, int(round(steps[worst] / median)) - 1)
        raise VolumeError(
            folder,
            f"missing slice(s): gap of {steps[worst]:.3g} mm between slices {worst + 1} and {worst + 2} "
            f"(median spacing {median:.3g} mm, about {n_missing} slice(s) missing)",
        )
    deviation = np.abs(steps - median)
    tol = max(SPACING_REL_TOL * median, SPACING_ABS_TOL)
    if deviation.max() > tol:
        raise VolumeError(
            folder,
            f"uneven slice spacing: from {steps.min():.4g} to {steps.max():.4g} mm (median {median:.4g} mm, "
            f"tolerance {tol:.3g} mm)",
        )
    # the slices must lie on one line along the normal: an in-plane drift (gantry tilt, sheared stack) would be
    # read as an orthogonal volume and every map would land in the wrong place
    unit = normal / norm
    offsets = np.stack(positions) - positions[0]
    drift = float(np.linalg.norm(offsets - np.outer(offsets @ unit, unit), axis=1).max())
    if drift > tol:
        raise VolumeError(
            folder,
            f"slice positions drift up to {drift:.3g} mm off the slice normal (gantry tilt or sheared stack, "
            f"tolerance {tol:.3g} mm); resample the series to an orthogonal grid first",
        )


def _read_dicom(folder: str, series_uid: str | None, index: int | tuple[int, ...] | None) -> Volume:
    """Read one DICOM series of a folder with SimpleITK (GDCM-sorted files) after checking its slices."""
    try:
        uids = dicom_series_ids(folder)
    except Exception as err:
        raise VolumeError(folder, f"cannot read DICOM folder: {_short_cause(err, folder)}") from err
    if not uids:
        raise VolumeError(folder, "no DICOM image series found in folder")
    if not series_uid:
        if len(uids) > 1:
            raise VolumeError(folder, f"folder holds {len(uids)} DICOM series; choose one with series_uid=...")
        series_uid = uids[0]
    elif series_uid not in uids:
        tail = re.sub(r"\D", "", series_uid)[-6:]
        raise VolumeError(folder, f"DICOM series ...{tail} not found in folder")
    with quiet_itk():
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid))
    if not files:
        raise VolumeError(folder, "DICOM series has no readable file")
    if len(files) == 1:  # a multi-frame (enhanced) file can hold a whole volume
        return _read_itk_dicom_single(files[0], folder, index)
    check_dicom_slices(files, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOff()
    reader.LoadPrivateTagsOff()
    try:
        with quiet_itk():
            image = reader.Execute()
    except Exception as err:
        raise VolumeError(folder, f"cannot read DICOM series: {_short_cause(err)}") from err
    return _finish(_itk_array(image), itk_affine(image), "dicom", folder, index, {})


def _read_itk_dicom_single(file: str, folder: str, index: int | tuple[int, ...] | None) -> Volume:
    """A DICOM series of one file: a 3D multi-frame image is accepted, one 2D slice is refused."""
    try:
        with quiet_itk():
            image = sitk.ReadImage(file)
    except Exception as err:
        cause = _short_cause(err, file)
        raise VolumeError(folder, f"cannot read DICOM file {os.path.basename(file)}: {cause}") from err
    size = image.GetSize()
    if image.GetDimension() < 3 or size[2] < 2:
        shape = _shape_text(size[:2])
        raise VolumeError(folder, f"2D image of shape {shape} (a single DICOM slice); a 3D volume is needed")
    return _finish(_itk_array(image), itk_affine(image), "dicom", folder, index, {})


def read_volume(path: str | os.PathLike, series_uid: str | None = None, *,
                index: int | tuple[int, ...] | None = None) -> Volume:
    """Read one volume as float32 (X, Y, Z) + RAS affine; raise VolumeError with a short reason if it is unusable.

    Formats: NIfTI/MGZ via nibabel (the image's own best affine, also oblique or sheared, kept exactly; scaling
    applied); MHA/MHD/NRRD/NHDR via SimpleITK; a folder is read as a DICOM series (`series_uid` picks one when
    the folder holds several) after checking slice sizes, orientations, missing slices and even spacing.
    Shapes: 2D (or a spatial size of 1) is refused; a trailing dim of size 1 is dropped; a 4D image needs
    `index` to choose one volume/channel (a tuple of them gives a (C, X, Y, Z) array; use read_channels);
    more dims are refused.
    Non-finite voxels: if at most 1 % of the voxels are NaN/Inf they are replaced by the minimum finite value
    (info["nonfinite_replaced"] = count, and a warning is logged); more than that, or no finite voxel, is an error.
    No patient identifier from DICOM headers is ever returned or logged.
    """
    path_str = os.fspath(path)
    if os.path.isdir(path_str):
        return _read_dicom(path_str, series_uid or None, index)
    if not os.path.exists(path_str):
        raise VolumeError(path_str, "file not found" if not os.path.islink(path_str) else "broken symbolic link")
    try:
        size = os.path.getsize(path_str)
    except OSError as err:
        raise VolumeError(path_str, f"cannot read: {err.strerror or err}") from err
    if size == 0:
        raise VolumeError(path_str, "empty file (0 bytes)")
    suffix = image_suffix(os.path.basename(path_str)).lower()
    if not suffix and os.path.basename(path_str).lower().endswith(".mgh"):
        suffix = ".mgh"
    if suffix in _NIBABEL_SUFFIXES:
        return _read_nibabel(path_str, _NIBABEL_SUFFIXES[suffix], index)
    if suffix in _ITK_SUFFIXES:
        return _read_itk(path_str, index)
    return _read_itk(path_str, index, "dicom" if _has_magic(path_str) else "itk")


def read_channels(path: str | os.PathLike, series_uid: str | None = None, *, channels: Sequence[int]) -> list[Volume]:
    """Read the given volumes/channels of one 4D image (e.g. the sequences of a BraTS/MSD-style file) in one pass.

    Returns one Volume per channel, in the order asked, sharing the affine. A 3D image has one channel,
    so on it only ``channels=[0]`` is accepted. The checks and the non-finite rule are those of read_volume.
    """
    chosen = tuple(int(c) for c in channels)
    if not chosen:
        raise VolumeError(os.fspath(path), "empty list of channels")
    if len(set(chosen)) != len(chosen):
        raise VolumeError(os.fspath(path), f"channels {list(chosen)} repeat a channel")
    vol = read_volume(path, series_uid, index=chosen)  # (C, X, Y, Z), one read
    return [Volume(array=channel, affine=vol.affine, source_format=vol.source_format, info=dict(vol.info))
            for channel in vol.array]


def _has_magic(path: str) -> bool:
    """DICOM preamble check that never raises."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


__all__ = ["Volume", "read_volume", "volume_affine_spacing", "itk_affine", "check_dicom_slices"]
