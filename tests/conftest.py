"""Shared fixtures: repository paths and a tiny real-anatomy dataset for workflow tests."""

from __future__ import annotations

import json
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

# pytest-xdist (setup.cfg runs one worker per core): share the cores among the workers, in this process and in
# the CLI subprocesses the tests start, instead of every worker spinning two OpenMP threads per core.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))


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


def nested(overrides: dict) -> dict:
    """Keyword overrides with ``__`` for MONAI's ``#`` (``network_def__depth=4`` -> ``network_def#depth``)."""
    return {k.replace("__", "#"): v for k, v in overrides.items()}


def unknown_overrides(files, overrides: dict) -> list[str]:
    """Override ids (``section#key``) that no merged config file defines: ``ConfigWorkflow`` would add them as new,
    unused keys, and the test would silently run with the default. As on the command line
    (``config.check_cli_overrides``), a component (a dict with ``_target_``) may be given new arguments."""
    merged: dict = {}
    for f in files:  # as MONAI merges a config-file list: later files set (possibly nested, ``a#b``) ids
        for k, v in json.loads(Path(f).read_text()).items():
            *parents, last = k.split("#")
            node = merged
            for part in parents:
                node = node.setdefault(part, {}) if isinstance(node, dict) else node[int(part)]
            node[last] = v
    unknown = []
    for key in overrides:
        node = merged
        for part in key.split("#"):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                if not (isinstance(node, dict) and "_target_" in node and node is not merged):
                    unknown.append(key)  # (a component may be given any constructor argument)
                break
    return unknown


def cli_configs(run_id: str, *extra: str) -> str:
    """``--config_file`` of ``python -m monai.bundle run`` for a workflow (relative to the repository root), with
    ``extra`` config files (e.g. ``multi_gpu_train.json``) merged last: "['bundle/configs/common.json',...]"."""
    from monai_dnprd.config import WORKFLOW_CONFIGS

    names = [*WORKFLOW_CONFIGS[run_id], *extra]
    return "[" + ",".join(f"'bundle/configs/{n}'" for n in names) + "]"


def run_workflow(config: str, run_id: str, extra_configs: tuple[str, ...] | list[str] = (), **overrides):
    """Run one bundle workflow in this process (as ``python -m monai.bundle run`` would), merging the config
    files the workflow needs (``monai_dnprd.config.workflow_configs``) and then ``extra_configs`` (overrides such as
    ``paper.json``); ``config`` names the workflow's own file."""
    from monai.bundle import ConfigWorkflow

    from monai_dnprd.config import workflow_configs

    files = workflow_configs(BUNDLE, run_id)
    assert Path(files[-1]).name == config, f"{config} is not the config of workflow {run_id}"
    files += [str(BUNDLE / "configs" / name) for name in extra_configs]
    overrides = nested(overrides)
    unknown = unknown_overrides(files, overrides)
    assert not unknown, f"overrides {unknown} name no key of {[Path(f).name for f in files]} (renamed or moved?)"
    wf = ConfigWorkflow(
        config_file=files,
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
    "network_def__patch_size": 8,
    "network_def__depth": 4,
    "batch_size": 4,
    "data__samples_per_volume": 2,
    "num_workers": 0,
    "schedule__log_interval": 1,
}


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Preprocessed volumes of the tests go to a folder of this session, never the user's cache."""
    old = os.environ.get("MONAI_DNPRD_CACHE_DIR")
    os.environ["MONAI_DNPRD_CACHE_DIR"] = str(tmp_path_factory.mktemp("preprocessed-cache"))
    yield
    if old is None:
        os.environ.pop("MONAI_DNPRD_CACHE_DIR", None)
    else:
        os.environ["MONAI_DNPRD_CACHE_DIR"] = old


def torch_threads() -> int:
    """Torch threads of a test: ``OMP_NUM_THREADS`` when set (1 on a machine shared with other jobs, where two
    spinning OpenMP threads made a tiny training run 2-10x slower), else up to 2."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else min(2, os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def _quiet_threads():
    """Keep each test on the 2 cores without oversubscription."""
    torch.set_num_threads(torch_threads())
    yield


@pytest.fixture(scope="session")
def trained(tiny_data, tmp_path_factory) -> Path:
    """A tiny model trained once per session on ``tiny_data`` (both stages, validation, calibration)."""
    out = tmp_path_factory.mktemp("train")
    run_workflow(
        "train.json", "training", output_dir=str(out), dataset_dir=str(tiny_data["train"]),
        val_dir=str(tiny_data["val"]), num_iterations=6, warmup_iterations=2, schedule__val_interval=2,
        schedule__ckpt_interval=2,
        **TINY_MODEL,
    )
    return out
