"""In-process bundle workflows on tiny real-anatomy data: training, resume, inference, evaluation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, root_message, run_workflow

from monai_dnprd.checkpoint import load_checkpoint, load_model

pytestmark = pytest.mark.slow


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_writes_finite_losses_checkpoints_and_calibration(trained):
    log = read_log(trained / "training_log.jsonl")
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and all(np.isfinite(losses))
    assert any("mim" in r for r in log) and any("daa" in r for r in log)  # both stages ran
    assert any("val_voxel_ap" in r for r in log)
    ckpt = load_checkpoint(trained / "models" / "checkpoint.pt")
    assert ckpt["trainer"]["iteration"] == 6
    assert {"network", "optimizer", "lr_scheduler"} <= set(ckpt)
    assert any(k.startswith("pixel_head.") for k in ckpt["network"])  # the warm-up's head is part of the network
    mapper, info = load_model(trained / "models" / "model.pt")
    assert info["preprocessing"]["img_size"] == TINY_MODEL["img_size"] and "sigma" not in info["preprocessing"]
    assert info["config"]["network"]["depth"] == TINY_MODEL["network_def__depth"]
    assert info["config"]["network"]["patch_size"] == TINY_MODEL["network_def__patch_size"]
    assert info["config"]["sigma"] == 2.0  # the map's blur travels with the mapper
    with torch.no_grad():
        out = mapper.network(torch.rand(2, 3, 32, 32))
        maps = mapper(torch.rand(2, 3, 32, 32))
    assert torch.isfinite(out.recons[0]).all()
    assert maps.shape == (2, 1, 32, 32) and torch.isfinite(maps).all()
    cal = json.loads((trained / "models" / "calibration.json").read_text())
    assert cal["n_volumes"] == 1 and cal["n_voxels"] > 0
    # the default map's statistics were fitted on normal slices before the validation that saved the best model,
    # and travel with the exported weights
    assert mapper.metric == "feature_pixel" and int(mapper.fitted_tokens) > 0
    best, _ = load_model(trained / "models" / "model_best.pt")
    assert int(best.fitted_tokens) > 0
    assert all(not torch.equal(s, torch.ones_like(s)) for _, s in mapper.residual_stats())
    assert not torch.equal(mapper.map_moments, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))


def test_resume_continues_the_iteration_count(trained, tiny_data, tmp_path):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(trained, out)
    before = load_checkpoint(out / "models" / "checkpoint.pt")
    run_workflow(
        "train.json", "training", output_dir=str(out), dataset_dir=str(tiny_data["train"]),
        val_dir=str(tiny_data["val"]), num_iterations=9, warmup_iterations=2, schedule__val_interval=2,
        schedule__ckpt_interval=2, resume="true", **TINY_MODEL,
    )
    after = load_checkpoint(out / "models" / "checkpoint.pt")
    assert after["trainer"]["iteration"] == 9
    iters = [r["iteration"] for r in read_log(out / "training_log.jsonl") if "loss" in r]
    resumed = iters[iters.index(6) + 1:]
    assert resumed and resumed[0] == 7  # continued at 7, did not restart at 1
    # the optimizer state continued too: Adam's step counter grew by exactly 3
    step_before = before["optimizer"]["state"][0]["step"]
    step_after = after["optimizer"]["state"][0]["step"]
    assert float(step_after) == float(step_before) + 3


def test_inference_writes_maps_in_input_space_and_reports_failures(trained, tiny_data, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for f in tiny_data["test"].glob("*.nii.gz"):
        (inputs / f.name).write_bytes(f.read_bytes())
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        run_workflow("inference.json", "inference", input_dir=str(inputs), output_dir=str(out),
                     ckpt_path=str(trained / "models" / "model.pt"), num_workers=0)
    assert exc.value.code == 1  # a failed input makes the run fail, after the good volumes were written
    for name in ("case_lesion", "case_normal"):
        src, res = nib.load(str(inputs / f"{name}.nii.gz")), nib.load(str(out / f"{name}.nii.gz"))
        assert res.shape == src.shape
        np.testing.assert_allclose(res.affine, src.affine, atol=1e-5)
        assert res.get_data_dtype() == np.float32
        assert (out / f"{name}_mask.nii.gz").is_file()
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert sorted(r["name"] for r in rows) == ["case_lesion", "case_normal"]
    assert all(r["anomalous"] in {"yes", "no"} for r in rows)
    failures = list(csv.DictReader(open(out / "failures.csv")))
    assert [f["name"] for f in failures] == ["broken"] and failures[0]["reason"]
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def test_evaluation_writes_metrics(trained, tiny_data, tmp_path):
    out = tmp_path / "eval"
    run_workflow("evaluate.json", "evaluating", input_dir=str(tiny_data["test"]), label_dir=str(tiny_data["labels"]),
                 output_dir=str(out), ckpt_path=str(trained / "models" / "model.pt"), num_workers=0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["voxel"]["auroc"] <= 1.0
    assert 0.0 <= metrics["voxel"]["ap"] <= 1.0
    assert metrics["counts"]["normal_volumes"] == 1 and metrics["counts"]["abnormal_volumes"] == 1


def test_evaluation_requires_every_label(trained, tiny_data, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "case_lesion.nii.gz").write_bytes((tiny_data["labels"] / "case_lesion.nii.gz").read_bytes())
    with pytest.raises(Exception) as err:
        run_workflow("evaluate.json", "evaluating", input_dir=str(tiny_data["test"]), label_dir=str(labels),
                     output_dir=str(tmp_path / "eval"), ckpt_path=str(trained / "models" / "model.pt"))
    assert "no label for 1 volume(s): case_normal" in root_message(err.value)


def test_output_folder_inside_input_is_refused(trained, tiny_data, tmp_path):
    with pytest.raises(Exception) as err:
        run_workflow("inference.json", "inference", input_dir=str(tiny_data["test"]),
                     output_dir=str(tiny_data["test"] / "maps"), ckpt_path=str(trained / "models" / "model.pt"))
    assert "inside" in root_message(err.value) and not (tiny_data["test"] / "maps").exists()


def test_training_skips_bad_normal_volumes(tiny_data, tmp_path, capfd):
    """A broken file and a constant volume among the normals are logged and skipped; training still completes."""
    import shutil

    train = tmp_path / "normals"
    shutil.copytree(tiny_data["train"], train)
    (train / "broken.nii.gz").write_bytes(b"not a volume")
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 10), np.float32), np.eye(4)), str(train / "constant.nii.gz"))
    out = tmp_path / "run"
    run_workflow("train.json", "training", output_dir=str(out), dataset_dir=str(train), val_dir=str(tiny_data["val"]),
                 num_iterations=3, warmup_iterations=1, schedule__val_interval=2, **TINY_MODEL)
    assert (out / "models" / "model.pt").is_file()
    captured = capfd.readouterr()
    skipped = [line for line in (captured.out + captured.err).splitlines() if "skipped training volume" in line]
    assert len(skipped) == 2 and any("broken.nii.gz" in m for m in skipped) and any("constant" in m for m in skipped)


def test_training_on_one_volume_takes_every_step(tiny_data, tmp_path):
    """One normal volume gives fewer slices per pass (samples_per_volume) than a batch holds; training must still
    take each of its steps (a loader that drops incomplete batches used to yield nothing, and the run ended at
    iteration 0 with an untrained model)."""
    import shutil

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(sorted(tiny_data["train"].glob("*.nii.gz"))[0], one)
    out = tmp_path / "run"
    assert TINY_MODEL["data__samples_per_volume"] < TINY_MODEL["batch_size"]
    run_workflow("train.json", "training", output_dir=str(out), dataset_dir=str(one), val_dir=str(tiny_data["val"]),
                 num_iterations=3, warmup_iterations=1, schedule__val_interval=2, **TINY_MODEL)
    log = read_log(out / "training_log.jsonl")
    assert [r["iteration"] for r in log if "loss" in r] == [1, 2, 3]
    assert load_checkpoint(out / "models" / "checkpoint.pt")["trainer"]["iteration"] == 3


def test_zero_iterations_is_a_clear_error(tiny_data, tmp_path):
    """``--num_iterations 0`` used to end at once without a word and without any output."""
    with pytest.raises(Exception) as err:
        run_workflow("train.json", "training", output_dir=str(tmp_path / "run"), dataset_dir=str(tiny_data["train"]),
                     val_dir=str(tiny_data["val"]), num_iterations=0, warmup_iterations=0, **TINY_MODEL)
    assert "num_iterations must be at least 1" in root_message(err.value)
