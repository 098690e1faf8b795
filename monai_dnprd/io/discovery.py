"""Find every readable volume (NIfTI, MHA/MHD, NRRD, MGZ files and DICOM series) under a folder, as a datalist."""

from __future__ import annotations

import contextlib
import os
import re
from collections import defaultdict
from typing import NamedTuple

import SimpleITK as sitk

from .errors import VolumeError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".mgz")

# Extensions that are never DICOM files (sidecars, reports, companion raw data of .mhd/.nhdr, ...).
NON_IMAGE_SUFFIXES = frozenset(
    ".txt .json .csv .tsv .md .rst .html .htm .xml .yaml .yml .ini .cfg .log .pdf .py .ipynb .sh .bat "
    ".png .jpg .jpeg .gif .bmp .tif .tiff .svg .raw .zraw .gz .tmp .zip .tar .bz2 .xz .7z .img .hdr .bval .bvec "
    ".pyc .pyo .mat .npy .npz .pkl .pt .pth .ckpt .safetensors .db .sqlite .xls .xlsx .doc .docx".split()
)
IGNORED_NAMES = frozenset({"dicomdir", "thumbs.db", "desktop.ini", "license", "readme", "version"})
NOT_FOUND_REASON = "no volumes found (looked for NIfTI, MHA/MHD, NRRD, MGZ files and DICOM series)"
_UNSAFE = re.compile(r"[^\w.\-]+")


def image_suffix(name: str) -> str:
    """Return the image suffix of a file name ("" when it has none); case-insensitive, longest match first."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return name[-len(suffix):]
    return ""


def _strip_suffix(name: str) -> str:
    """File name without its image suffix."""
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else name


def _safe_name(name: str) -> str:
    """Make a string usable as a file name: no separators, no spaces or odd characters, no leading dot."""
    safe = _UNSAFE.sub("_", name).strip("._") or "volume"
    return safe


def has_dicom_magic(path: str | os.PathLike) -> bool:
    """True if the file carries the DICOM Part 10 preamble ("DICM" at byte 128); raises OSError if unreadable."""
    with open(path, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


@contextlib.contextmanager
def quiet_itk():
    """Silence ITK/GDCM warnings printed to stderr (e.g. "No Series were found") for the duration."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def dicom_series_ids(folder: str | os.PathLike) -> tuple[str, ...]:
    """SeriesInstanceUIDs of the DICOM image series directly inside `folder` (GDCM scan, not recursive)."""
    with quiet_itk():
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(os.fspath(folder)))


def _is_dicom_candidate(name: str) -> bool:
    """True for a file that may be DICOM: not hidden, no image suffix, not a known non-image file."""
    lower = name.lower()
    if lower.startswith(".") or lower in IGNORED_NAMES or image_suffix(name):
        return False
    return os.path.splitext(lower)[1] not in NON_IMAGE_SUFFIXES


def _uid_tail(uid: str) -> str:
    """Last 6 digits of a UID (dots dropped), used to tell several series of one folder apart."""
    return re.sub(r"\D", "", uid)[-6:] or "series"


class VolumeScan(NamedTuple):
    """What a search of an input folder found: the volumes, the paths it could not inspect, the other files."""

    volumes: list[dict]
    problems: list[VolumeError]
    ignored: list[str]  # files that are not volumes (hidden files and folders aside), sorted


def ignored_summary(ignored: list[str], examples: int = 3) -> str:
    """"2 files ignored (not volumes: notes.txt, scan.png)": the count of non-volume files and a few names."""
    if not ignored:
        return "0 files ignored"
    names = [os.path.basename(p) for p in ignored[:examples]] + (["..."] if len(ignored) > examples else [])
    return f"{len(ignored)} file{'s' if len(ignored) != 1 else ''} ignored (not volumes: {', '.join(names)})"


def find_volumes(root: str | os.PathLike, *, index: int | None = None) -> tuple[list[dict], list[VolumeError]]:
    """Search root recursively. Returns (datalist, problems); ``scan_volumes`` also lists the ignored files.

    datalist entries are {"image": file or DICOM series folder, "name": unique safe name, "series_uid": UID or ""}
    (plus "index" when given), sorted by name. Files with an image suffix are listed even if they may be broken
    (read_volume reports them); a folder of DICOM files gives one entry per SeriesInstanceUID. Directory symlinks
    are followed without loops; a file or folder that cannot be inspected is reported in `problems`.
    """
    scan = scan_volumes(root, index=index)
    return scan.volumes, scan.problems


def scan_volumes(root: str | os.PathLike, *, index: int | None = None) -> VolumeScan:
    """``find_volumes`` that also returns the files it ignored (not volumes), for the run's summary line.

    A missing folder, a file, and a folder without any volume are refused with a one-line ``VolumeError``
    (an empty folder and one holding only other files are told apart).
    """
    root_str = os.fspath(root)
    if not os.path.exists(root_str):
        raise VolumeError(root_str, "input folder does not exist")
    if not os.path.isdir(root_str):
        raise VolumeError(root_str, "input path is not a folder")

    problems: list[VolumeError] = []
    found: list[dict] = []  # {"image", "series_uid", "base", "rel", "suffix"}
    ignored: list[str] = []
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()

    def on_error(err: OSError) -> None:
        problems.append(VolumeError(err.filename or root_str, f"cannot list folder: {err.strerror or err}"))

    for dirpath, dirnames, filenames in os.walk(root_str, topdown=True, onerror=on_error, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) not in seen_dirs
        )
        rel_dir = os.path.relpath(dirpath, root_str)
        dicom_candidates: list[str] = []
        dicom_magic = False
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            suffix = image_suffix(name)
            if suffix:
                if not os.path.exists(full):
                    problems.append(VolumeError(full, "broken symbolic link"))
                    continue
                real_file = os.path.realpath(full)
                if real_file in seen_files:
                    continue  # the same file reached through a symlink
                seen_files.add(real_file)
                rel = os.path.normpath(os.path.join(rel_dir, name))
                found.append({"image": full, "series_uid": "", "base": _strip_suffix(name),
                              "rel": rel[: -len(suffix)]})
            elif _is_dicom_candidate(name):
                try:
                    if not os.path.isfile(full) or os.path.getsize(full) == 0:
                        ignored.append(full)
                        continue
                    magic = has_dicom_magic(full)
                    dicom_candidates.append(full)
                    dicom_magic = dicom_magic or magic
                except OSError as err:
                    problems.append(VolumeError(full, f"cannot inspect file: {err.strerror or err}"))
            else:
                ignored.append(full)
        if not dicom_candidates:
            continue
        try:
            uids = dicom_series_ids(dirpath)
        except Exception as err:  # GDCM scan failure: report the folder, keep going
            problems.append(VolumeError(dirpath, f"cannot scan DICOM files: {str(err).splitlines()[-1][:200]}"))
            continue
        if not uids:
            if dicom_magic:
                problems.append(VolumeError(dirpath, "DICOM files found but no readable image series"))
            else:
                ignored.extend(dicom_candidates)  # no DICOM after all
            continue
        folder_name = os.path.basename(os.path.normpath(os.path.abspath(dirpath)))
        real_dir = os.path.realpath(dirpath)
        for uid in sorted(uids):
            key = f"{real_dir}\0{uid}"
            if key in seen_files:
                continue
            seen_files.add(key)
            tail = f"_{_uid_tail(uid)}" if len(uids) > 1 else ""
            rel = folder_name if rel_dir == os.curdir else os.path.normpath(rel_dir)
            found.append({"image": dirpath, "series_uid": uid, "base": folder_name + tail, "rel": rel + tail})

    ignored.sort()
    if not found:
        extra = f"; {ignored_summary(ignored)}" if ignored else ""
        extra += f"; {len(problems)} path(s) could not be inspected" if problems else ""
        raise VolumeError(root_str, NOT_FOUND_REASON + (extra or "; the folder is empty"))

    datalist = _assign_names(found)
    if index is not None:
        for entry in datalist:
            entry["index"] = index
    return VolumeScan(datalist, problems, ignored)


def _assign_names(found: list[dict]) -> list[dict]:
    """Give each volume a unique safe name: its base name, or its relative path joined by "__" on a collision."""
    by_base: dict[str, list[dict]] = defaultdict(list)
    for item in found:
        by_base[_safe_name(item["base"])].append(item)
    names: dict[int, str] = {}
    for base, items in by_base.items():
        for item in items:
            if len(items) == 1:
                names[id(item)] = base
            else:
                parts = [p for p in re.split(r"[\\/]+", item["rel"]) if p not in ("", os.curdir)]
                names[id(item)] = _safe_name("__".join(parts))
    # Last resort (e.g. "a.nii" and "a.nii.gz" side by side): number the duplicates in path order.
    by_name: dict[str, list[dict]] = defaultdict(list)
    for item in found:
        by_name[names[id(item)]].append(item)
    used = set(by_name)
    for name, items in by_name.items():
        if len(items) > 1:
            items.sort(key=lambda it: (it["image"], it["series_uid"]))
            for n, item in enumerate(items[1:], start=2):
                candidate = f"{name}_{n}"
                while candidate in used:
                    candidate += "_"
                used.add(candidate)
                names[id(item)] = candidate
    datalist = [
        {"image": item["image"], "name": names[id(item)], "series_uid": item["series_uid"]} for item in found
    ]
    datalist.sort(key=lambda e: (e["name"], e["image"], e["series_uid"]))
    return datalist
