"""Shared fixtures: repository paths and a tiny real-anatomy dataset for workflow tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
DEMO = REPO / "monai_dnprd" / "demo_data"
SHARED_DATA = REPO.parent / "shared" / "data"

sys.path.insert(0, str(Path(__file__).parent))  # tests/dicom_utils.py


def _downsampled(name: str, step: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A demo brain at 1/step resolution (a 120x120x90 volume becomes 40x40x30): real anatomy, tiny cost."""
    img = nib.load(str(DEMO / name))
    arr = np.asarray(img.dataobj, dtype=np.float32)[::step, ::step, ::step]
    aff = img.affine.copy()
    aff[:3, :3] = aff[:3, :3] * step
    return np.ascontiguousarray(arr), aff


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Normal training/validation folders and a test folder with a synthetic lesion, all ~40^3 voxels."""
    from monai.data import MetaTensor

    from monai_dnprd.transforms import ForegroundMask, SyntheticLesion

    root = tmp_path_factory.mktemp("tiny")
    dirs = {k: root / k for k in ("train", "val", "test", "labels")}
    for d in dirs.values():
        d.mkdir()
    for name in ("IXI012-HH-1211_T1.nii.gz", "chris_t1_2mm.nii.gz"):
        arr, aff = _downsampled(name)
        stem = name.split("_")[0].split("-")[0]
        nib.save(nib.Nifti1Image(arr, aff), str(dirs["train"] / f"{stem}_a.nii.gz"))
        nib.save(nib.Nifti1Image(arr[::-1].copy() * 0.9, aff), str(dirs["train"] / f"{stem}_b.nii.gz"))
    arr, aff = _downsampled("mni152_2009a_t1_2mm.nii.gz")
    nib.save(nib.Nifti1Image(arr, aff), str(dirs["val"] / "mni.nii.gz"))
    arr, aff = _downsampled("IXI015-HH-1258_T1.nii.gz")
    img = MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(aff))
    mask = ForegroundMask()(img)
    norm = img / float(np.percentile(arr, 99.5))
    gen = SyntheticLesion(kinds=("hyper",), num_lesions=(1, 1), radius_mm=(10.0, 14.0))
    gen.set_random_state(3)
    lesioned, lesion = gen(norm.clamp(0, 1), mask)
    out = np.asarray(torch.as_tensor(lesioned)[0]) * float(np.percentile(arr, 99.5))
    nib.save(nib.Nifti1Image(out.astype(np.float32), aff), str(dirs["test"] / "case_lesion.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(torch.as_tensor(lesion)[0]).astype(np.uint8), aff), str(dirs["labels"] / "case_lesion.nii.gz"))
    nib.save(nib.Nifti1Image(arr, aff), str(dirs["test"] / "case_normal.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(arr.shape, np.uint8), aff), str(dirs["labels"] / "case_normal.nii.gz"))
    return dirs


def rotation(angles) -> np.ndarray:
    """Rotation matrix from three Euler angles (radians), for oblique test geometries."""
    a, b, g = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(g), -np.sin(g), 0], [np.sin(g), np.cos(g), 0], [0, 0, 1]])
    return rz @ ry @ rx


def run_workflow(config: str, run_id: str, **overrides):
    """Run one bundle workflow in this process (as ``python -m monai.bundle run`` would)."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / config),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        workflow_type=None,
        run_id=run_id,
        bundle_root=str(BUNDLE),
        **overrides,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def root_message(err: BaseException) -> str:
    """The message of the innermost cause (MONAI wraps errors raised inside config expressions)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err)


TINY_MODEL = {
    "img_size": 32,
    "patch_size": 8,
    "depth": 4,
    "batch_size": 4,
    "samples_per_volume": 2,
    "num_workers": 0,
    "log_interval": 1,
}


@pytest.fixture(autouse=True)
def _quiet_threads():
    """Keep each test on the 2 cores without oversubscription."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="session")
def trained(tiny_data, tmp_path_factory) -> Path:
    """A tiny model trained once per session on ``tiny_data`` (both stages, validation, calibration)."""
    out = tmp_path_factory.mktemp("train")
    run_workflow(
        "train.json", "training", output_dir=str(out), dataset_dir=str(tiny_data["train"]),
        val_dir=str(tiny_data["val"]), num_iterations=6, warmup_iterations=2, val_interval=2, ckpt_interval=2,
        **TINY_MODEL,
    )
    return out
