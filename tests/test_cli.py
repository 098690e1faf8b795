"""Command-line smoke tests: the README's main commands (small), a typo in an option, and torchrun with 2 processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

SMALL = ["--img_size", "32", "--patch_size", "8", "--depth", "2", "--batch_size", "4", "--samples_per_volume", "2",
         "--log_interval", "1"]


def bundle_run(*args: str, env: dict | None = None, launcher: list[str] | None = None, timeout: int = 600):
    cmd = (launcher or [sys.executable, "-m"]) + ["monai.bundle", "run", *args, "--bundle_root", "bundle"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_readme_commands_on_the_demo_data(tmp_path):
    """Training on the embedded data, then inference and evaluation writing maps (tiny sizes, few iterations)."""
    env = {"MONAI_DNPRD_DEMO_DIR": str(tmp_path / "demo")}
    run = tmp_path / "run"
    r = bundle_run("training", "--config_file", "bundle/configs/train.json", "--output_dir", str(run),
                   "--num_iterations", "4", "--warmup_iterations", "2", "--val_interval", "2", *SMALL, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    model = run / "models" / "model.pt"
    assert model.is_file() and (run / "models" / "calibration.json").is_file()
    r = bundle_run("inference", "--config_file", "bundle/configs/inference.json", "--ckpt_path", str(model),
                   "--output_dir", str(tmp_path / "maps"), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "maps" / "scores.csv")))
    assert len(rows) == 6
    src = nib.load(str(tmp_path / "demo" / "test" / "images" / f"{rows[0]['name']}.nii.gz"))
    out = nib.load(str(tmp_path / "maps" / f"{rows[0]['name']}.nii.gz"))
    assert out.shape == src.shape and np.allclose(out.affine, src.affine)
    r = bundle_run("evaluating", "--config_file", "bundle/configs/evaluate.json", "--ckpt_path", str(model),
                   "--output_dir", str(tmp_path / "eval"), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "auroc" in r.stdout and json.loads((tmp_path / "eval" / "metrics.json").read_text())["voxel"]


def test_misspelled_option_is_refused():
    r = bundle_run("training", "--config_file", "bundle/configs/train.json", "--num_iteration", "3", timeout=120)
    assert r.returncode != 0
    assert "unknown option(s) --num_iteration" in r.stdout + r.stderr


def test_torchrun_two_processes_train_and_infer(tiny_data, tmp_path):
    """Data-parallel training (gloo, 2 CPU processes) and sharded inference with one merged scores.csv."""
    def torchrun(port: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m"]

    run = tmp_path / "ddp"
    r = bundle_run("training", "--config_file",
                   "['bundle/configs/train.json','bundle/configs/multi_gpu_train.json']",
                   "--dataset_dir", str(tiny_data["train"]), "--val_dir", str(tiny_data["val"]), "--output_dir", str(run),
                   "--num_iterations", "4", "--warmup_iterations", "2", "--val_interval", "2", *SMALL,
                   launcher=torchrun(29517))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (run / "models" / "model.pt").is_file()
    r = bundle_run("inference", "--config_file",
                   "['bundle/configs/inference.json','bundle/configs/multi_gpu_inference.json']",
                   "--input_dir", str(tiny_data["test"]), "--output_dir", str(tmp_path / "maps"),
                   "--ckpt_path", str(run / "models" / "model.pt"), "--num_workers", "0", launcher=torchrun(29527))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "maps" / "scores.csv")))
    assert sorted(r["name"] for r in rows) == ["case_lesion", "case_normal"]
    assert not list((tmp_path / "maps").glob("scores.rank*.csv"))
