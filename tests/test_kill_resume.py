"""Hard kills (SIGKILL) of CLI training and inference, then resuming: nothing half-written, runs continue.

Training: killed once a checkpoint exists; the checkpoint must load, and ``--resume true`` must continue at the
saved iteration (log, checkpoint iteration and Adam's step count) up to the end. Inference: killed while writing
many small maps; every NIfTI left must load, and ``--skip_existing true`` must finish the job with each volume
once in scores.csv and no temporary file left behind.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, cli_configs

from monai_dnprd.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

TOTAL = 100  # iterations: the kill comes after 33-36 at the earliest, the resumed run does the rest
CKPT = 10
SMALL = ["--img_size", "32", "--network_def#patch_size", "8", "--network_def#depth", "2", "--batch_size", "4",
         "--data#samples_per_volume", "2", "--schedule#log_interval", "1", "--num_workers", "0"]
TEMP_GLOB = ".*.tmp*"  # hidden temporary files of the atomic writers (.name.<random>.tmp[.suffix])


def bundle_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", *args, "--bundle_root", "bundle"]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    """SIGKILL `proc` (by its own pid) as soon as ready() is true; fail if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"process ended (rc {proc.returncode}) before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting for the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def log_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by the kill
            rows.append({"_broken": line})
    return rows


def train_args(tiny_data, out: Path) -> list[str]:
    return ["training", "--config_file", cli_configs("training"), "--dataset_dir", str(tiny_data["train"]),
            "--val_dir", str(tiny_data["val"]), "--output_dir", str(out), "--num_iterations", str(TOTAL),
            "--warmup_iterations", "2", "--schedule#val_interval", str(TOTAL), "--schedule#ckpt_interval", str(CKPT),
            *SMALL]


@pytest.fixture(scope="module")
def killed_training(tiny_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("killed_train")
    ckpt = out / "models" / "checkpoint.pt"
    proc = start(bundle_cmd(*train_args(tiny_data, out)), out.parent / f"{out.name}_1.log")
    # kill 3-6 iterations after a checkpoint: its write is over (one process), the next one not started
    kill_when(proc, lambda: ckpt.is_file() and _last_iter(out) >= 3 * CKPT and 3 <= _last_iter(out) % CKPT <= 6)
    info = {"out": out, "temps_after_kill": sorted(p.name for p in (out / "models").glob(TEMP_GLOB))}
    saved = load_checkpoint(ckpt)
    info["saved"] = saved
    info["log_lines_at_kill"] = len(log_rows(out / "training_log.jsonl"))
    log = out.parent / f"{out.name}_2.log"
    r = subprocess.run(bundle_cmd(*train_args(tiny_data, out), "--resume", "true"), cwd=REPO, text=True,
                       stdout=open(log, "w"), stderr=subprocess.STDOUT, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, log.read_text()[-3000:]
    info["final"] = load_checkpoint(ckpt)
    return info


def _last_iter(out: Path) -> int:
    path = out / "training_log.jsonl"
    if not path.is_file():
        return 0
    iters = [r.get("iteration", 0) for r in log_rows(path) if "loss" in r]
    return max(iters, default=0)


def test_killed_training_leaves_a_loadable_checkpoint_and_no_temp_files(killed_training):
    saved = killed_training["saved"]
    it = saved["trainer"]["iteration"]
    assert it >= CKPT and it % CKPT == 0 and it < TOTAL
    assert {"network", "optimizer", "lr_scheduler"} <= set(saved)
    # a SIGKILL cannot be caught: a checkpoint write in progress leaves its temp file, which the resumed run
    # must clean up; the kill point here is between checkpoint writes, so none may be there
    assert killed_training["temps_after_kill"] == []
    assert not list((killed_training["out"] / "models").glob(TEMP_GLOB))
    assert not list(killed_training["out"].glob(TEMP_GLOB))


def test_resume_continues_from_the_saved_iteration_to_the_end(killed_training):
    saved, final = killed_training["saved"], killed_training["final"]
    it = saved["trainer"]["iteration"]
    assert final["trainer"]["iteration"] == TOTAL
    rows = log_rows(killed_training["out"] / "training_log.jsonl")
    resumed = [r["iteration"] for r in rows[killed_training["log_lines_at_kill"]:] if "loss" in r]
    assert resumed[0] == it + 1, resumed[:5]  # continued right after the checkpoint, not at 1
    assert resumed == list(range(it + 1, TOTAL + 1))
    step = float(saved["optimizer"]["state"][0]["step"])
    assert float(final["optimizer"]["state"][0]["step"]) == step + (TOTAL - it)
    assert (killed_training["out"] / "models" / "model.pt").is_file()


# ------------------------------------------------------------------------------------------------ inference

N_VOLUMES = 16


@pytest.fixture(scope="module")
def many_inputs(tiny_data, tmp_path_factory) -> Path:
    inp = tmp_path_factory.mktemp("many")
    src = nib.load(str(tiny_data["test"] / "case_normal.nii.gz"))
    arr = np.asarray(src.dataobj, dtype=np.float32)
    for i in range(N_VOLUMES):
        nib.save(nib.Nifti1Image(arr * (1 + 0.01 * i), src.affine), str(inp / f"vol{i:02d}.nii.gz"))
    return inp


def infer_args(model: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["inference", "--config_file", cli_configs("inference"), "--input_dir", str(inp),
            "--output_dir", str(out), "--ckpt_path", str(model), "--num_workers", "0", *extra]


def test_killed_inference_then_skip_existing_completes(killed_training, many_inputs, tmp_path):
    model = killed_training["out"] / "models" / "model.pt"
    out = tmp_path / "maps"

    def maps() -> list[Path]:
        return sorted(p for p in out.glob("vol*.nii.gz") if not p.name.endswith("_mask.nii.gz"))

    proc = start(bundle_cmd(*infer_args(model, many_inputs, out)), tmp_path / "infer_1.log")
    kill_when(proc, lambda: len(maps()) >= 5)
    done = maps()
    temps_at_kill = {p.relative_to(out) for p in out.rglob(TEMP_GLOB)}  # a write cut by SIGKILL (timing-dependent)
    assert 5 <= len(done) < N_VOLUMES
    for p in out.glob("*.nii.gz"):  # every finished output is whole (pathlib's glob also lists the hidden temp files)
        if not p.name.startswith("."):
            assert np.isfinite(np.asarray(nib.load(str(p)).dataobj)).all(), p
    r = subprocess.run(bundle_cmd(*infer_args(model, many_inputs, out, "--skip_existing", "true")), cwd=REPO,
                       capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(maps()) == N_VOLUMES
    for p in maps():
        assert nib.load(str(p)).shape == (40, 40, 30)
        assert (out / p.name.replace(".nii.gz", "_mask.nii.gz")).is_file()
    rows = list(csv.DictReader(open(out / "scores.csv", encoding="utf-8")))
    names = [row["name"] for row in rows]
    assert sorted(names) == [f"vol{i:02d}" for i in range(N_VOLUMES)]  # each volume exactly once
    assert not (out / "failures.csv").exists()
    leftovers = {p.relative_to(out) for p in out.rglob(TEMP_GLOB)}
    assert not leftovers - temps_at_kill, f"temporary files left behind: {leftovers}"
    # temp files cut off by the kill itself are removed by the rerun: test_rerun_removes_stale_temp_files


def test_rerun_removes_stale_temp_files(killed_training, many_inputs, tmp_path):
    """What a kill in the middle of write_nifti / the report PNG leaves, reproduced deterministically."""
    model = killed_training["out"] / "models" / "model.pt"
    inp = tmp_path / "inputs"
    inp.mkdir()
    shutil.copy(many_inputs / "vol00.nii.gz", inp / "vol00.nii.gz")
    out = tmp_path / "maps"
    (out / "report").mkdir(parents=True)
    stale = [out / ".vol00.nii.gz.0123456789ab.tmp.nii.gz", out / ".scores.csv.0123456789ab.tmp.csv",
             out / "report" / ".vol00.png.tmp.png"]
    for p in stale:
        p.write_bytes(b"half-written")
    r = subprocess.run(bundle_cmd(*infer_args(model, inp, out)), cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "vol00.nii.gz").is_file()
    assert [p.name for p in stale if p.exists()] == []


def test_skip_existing_rescores_a_volume_whose_scores_row_was_lost(killed_training, many_inputs, tmp_path):
    """The crash window between writing <name>.nii.gz and rewriting scores.csv, reproduced deterministically."""
    model = killed_training["out"] / "models" / "model.pt"
    inp = tmp_path / "inputs"
    inp.mkdir()
    for name in ("vol00.nii.gz", "vol01.nii.gz"):
        shutil.copy(many_inputs / name, inp / name)
    out = tmp_path / "maps"
    r = subprocess.run(bundle_cmd(*infer_args(model, inp, out, "--report", "false")), cwd=REPO, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "scores.csv", encoding="utf-8")))
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as f:  # as if killed before the rewrite
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(row for row in rows if row["name"] != "vol01")
    (out / "vol01_mask.nii.gz").unlink()
    r = subprocess.run(bundle_cmd(*infer_args(model, inp, out, "--report", "false", "--skip_existing", "true")),
                       cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = sorted(row["name"] for row in csv.DictReader(open(out / "scores.csv", encoding="utf-8")))
    assert names == ["vol00", "vol01"]
    assert (out / "vol01_mask.nii.gz").is_file()
