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
import torch
from conftest import REPO, cli_configs

pytestmark = pytest.mark.slow

SMALL = ["--img_size", "32", "--network_def#patch_size", "8", "--network_def#depth", "2", "--batch_size", "4",
         "--data#samples_per_volume", "2", "--schedule#log_interval", "1"]


def bundle_run(*args: str, env: dict | None = None, launcher: list[str] | None = None, timeout: int = 600):
    cmd = (launcher or [sys.executable, "-m"]) + ["monai.bundle", "run", *args, "--bundle_root", "bundle"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_readme_commands_on_the_demo_data(tmp_path):
    """Training on the embedded data, then inference and evaluation writing maps (tiny sizes, few iterations)."""
    env = {"MONAI_DNPRD_DEMO_DIR": str(tmp_path / "demo")}
    run = tmp_path / "run"
    r = bundle_run("training", "--config_file", cli_configs("training"), "--output_dir", str(run),
                   "--num_iterations", "4", "--warmup_iterations", "2", "--schedule#val_interval", "2", *SMALL, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    model = run / "models" / "model.pt"
    assert model.is_file() and (run / "models" / "calibration.json").is_file()
    assert json.loads((run / "models" / "model.json").read_text())["config"]["network"]["depth"] == 2  # nested option
    r = bundle_run("inference", "--config_file", cli_configs("inference"), "--ckpt_path", str(model),
                   "--output_dir", str(tmp_path / "maps"), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "maps" / "scores.csv").read_text().splitlines()))
    assert len(rows) == 6
    src = nib.load(str(tmp_path / "demo" / "test" / "images" / f"{rows[0]['name']}.nii.gz"))
    out = nib.load(str(tmp_path / "maps" / f"{rows[0]['name']}.nii.gz"))
    assert out.shape == src.shape and np.allclose(out.affine, src.affine)
    r = bundle_run("evaluating", "--config_file", cli_configs("evaluating"), "--ckpt_path", str(model),
                   "--output_dir", str(tmp_path / "eval"), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "auroc" in r.stdout and json.loads((tmp_path / "eval" / "metrics.json").read_text())["voxel"]


def test_misspelled_option_is_refused():
    r = bundle_run("training", "--config_file", cli_configs("training"), "--num_iteration", "3", "--patch_size", "8",
                   timeout=120)
    assert r.returncode != 0
    # a misspelt option, and one that moved into a section (now --network_def#patch_size)
    assert "unknown option(s) --num_iteration, --patch_size" in r.stdout + r.stderr


def test_refusals_are_one_line_without_traceback(tmp_path):
    """A missing --input_dir, then a missing --ckpt_path: exit 1, at most 3 lines on stderr (MONAI's 2-line warning
    about configs running code, then ours), no traceback, the option, the path and the reason named."""
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "case.nii.gz").write_bytes(b"x")  # found by its name; never read, the checkpoint is refused first
    (inp / "notes.txt").write_text("x")
    folder, ckpt = tmp_path / "no_such_folder", tmp_path / "no_such_model.pt"
    cases = {  # the input folder is resolved before the checkpoint
        f"error: --input_dir {folder}: input folder does not exist": folder,
        f"error: --ckpt_path {ckpt}: checkpoint file not found": inp,
    }
    for expected, input_dir in cases.items():
        r = bundle_run("inference", "--config_file", cli_configs("inference"), "--input_dir", str(input_dir),
                       "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "out"), env={"MONAI_DNPRD_DEBUG": ""},
                       timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) <= 3 and "Traceback" not in r.stderr, r.stderr
        assert lines[-1] == expected, r.stderr
    assert f"1 volume found in {inp}, 1 file ignored (not volumes: notes.txt)" in r.stdout


def test_torchrun_two_processes_train_and_infer(tiny_data, tmp_path):
    """Data-parallel training (gloo, 2 CPU processes) and sharded inference with one merged scores.csv."""
    def torchrun(port: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m"]

    run = tmp_path / "ddp"
    r = bundle_run("training", "--config_file", cli_configs("training", "multi_gpu_train.json"),
                   "--dataset_dir", str(tiny_data["train"]), "--val_dir", str(tiny_data["val"]), "--output_dir", str(run),
                   "--num_iterations", "4", "--warmup_iterations", "2", "--schedule#val_interval", "2", *SMALL,
                   launcher=torchrun(29517))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (run / "models" / "model.pt").is_file()
    r = bundle_run("inference", "--config_file", cli_configs("inference", "multi_gpu_inference.json"),
                   "--input_dir", str(tiny_data["test"]), "--output_dir", str(tmp_path / "maps"),
                   "--ckpt_path", str(run / "models" / "model.pt"), "--num_workers", "0", launcher=torchrun(29527))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "maps" / "scores.csv").read_text().splitlines()))
    assert sorted(r["name"] for r in rows) == ["case_lesion", "case_normal"]
    assert not list((tmp_path / "maps").glob("scores.rank*.csv"))


def test_ckpt_export_writes_a_torchscript_model_with_the_eager_maps(trained, tmp_path):
    """MONAI's ``ckpt_export`` builds ``network_def`` (the mapper described by model.json), loads model.pt into it
    and traces it: the TorchScript file gives the maps of the mapper that ``load_model`` rebuilds."""
    from monai_dnprd.checkpoint import load_model

    model = trained / "models" / "model.pt"
    ts = tmp_path / "model.ts"
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
         "--ckpt_file", str(model), "--ckpt_path", str(model), "--config_file", cli_configs("inference"),
         "--bundle_root", "bundle", "--use_trace", "True", "--input_shape", "[1, 3, 32, 32]",
         "--converter_kwargs", "{'check_trace': False}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    traced = torch.jit.load(str(ts))
    mapper, _ = load_model(model)
    torch.manual_seed(0)
    for batch in (1, 3):
        x = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            eager = mapper(x)
            assert eager.shape == (batch, 1, 32, 32) and eager.max() > 0
            torch.testing.assert_close(traced(x), eager, rtol=1e-5, atol=1e-6)
