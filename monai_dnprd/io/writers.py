"""Atomic writers (NIfTI, CSV) and output-folder preparation, so a crash never leaves half-written results."""

from __future__ import annotations

import csv
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import VolumeError


def _to_numpy(x) -> np.ndarray:
    """Convert a torch tensor (MetaTensor included) or array-like to a numpy array without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach()
        if hasattr(x, "as_tensor"):  # MetaTensor -> plain tensor
            x = x.as_tensor()
        x = x.cpu().numpy()
    return np.asarray(x)


def _temp_path(path: Path, suffix: str) -> Path:
    """Hidden unique temporary path next to `path` (same folder, so os.replace is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")


def _atomic(path: Path, write, suffix: str = "") -> Path:
    """Run write(temp_path), then move the temp file onto `path`; the temp file is removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_nifti(array, affine, path: str | os.PathLike, *, dtype=np.float32) -> Path:
    """Write an (X, Y, Z) volume (a (1, X, Y, Z) channel-first one is squeezed) as NIfTI atomically.

    The RAS affine goes into both sform and qform (code 1); the sform keeps it exactly (also sheared), the
    qform holds its closest rigid+zoom version. Integer dtypes are rounded and clipped to their range.
    """
    path = Path(path)
    lower = path.name.lower()
    if lower.endswith(".nii.gz"):
        suffix = ".nii.gz"
    elif lower.endswith(".nii"):
        suffix = ".nii"
    else:
        raise ValueError(f"{path}: a NIfTI file name must end with .nii or .nii.gz")
    data = _to_numpy(array)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected an (X, Y, Z) array, got shape {tuple(data.shape)}")
    aff = _to_numpy(affine).astype(np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"{path}: expected a 4x4 affine, got shape {tuple(aff.shape)}")
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    data = np.asarray(data, dtype=dtype)
    img = nib.Nifti1Image(data, aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    img.header.set_xyzt_units(xyz="mm")
    return _atomic(path, lambda tmp: nib.save(img, str(tmp)), suffix)


def write_csv(rows: list[dict], path: str | os.PathLike, fieldnames: Sequence[str]) -> Path:
    """Write rows as CSV (header = fieldnames, missing values empty, unknown keys an error) atomically."""
    path = Path(path)
    rows = list(rows)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(fieldnames), restval="", extrasaction="raise")
            writer.writeheader()
            writer.writerows(rows)

    return _atomic(path, write, ".csv")


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file (JSON, HTML, ...) atomically."""
    path = Path(path)
    return _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), path.suffix)


def _inside(child: Path, parent: Path) -> bool:
    """True if child equals parent or lies below it (both already resolved)."""
    return child == parent or parent in child.parents


def prepare_output_dir(output_dir: str | os.PathLike, input_dirs: Sequence = ()) -> Path:
    """Create the output folder and return it; refuse one that is (inside) an input folder or is not writable.

    Input paths that are files count by their folder; a missing input is refused here, before the output folder
    is made. Errors are ValueError with one line "<path>: <reason>".
    """
    out = Path(output_dir).expanduser()
    out_resolved = Path(os.path.realpath(out))
    for inp in input_dirs:
        if inp is None or str(inp) == "":
            continue
        inp_path = Path(os.path.realpath(Path(inp).expanduser()))
        if not inp_path.exists():
            raise VolumeError(str(inp), "input folder does not exist")
        if inp_path.is_file():
            inp_path = inp_path.parent
        if _inside(out_resolved, inp_path):
            raise ValueError(
                f"{out}: the output folder must not be the input folder or lie inside it ({inp}); "
                "choose a folder outside the input data"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise ValueError(f"{out}: cannot create the output folder: a file is in the way ({err.strerror})") from err
    except OSError as err:
        raise ValueError(f"{out}: cannot create the output folder: {err.strerror or err}") from err
    probe = out / f".write_probe_{uuid.uuid4().hex[:12]}"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{out}: the output folder is not writable: {err.strerror or err}") from err
    return out
