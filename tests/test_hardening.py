"""Hardening: bad inputs, unsafe files and geometry, tested as a matrix in ONE inference run.

One tiny model is trained once (module fixture, like tests/test_workflows.py). One inference run goes over a
folder that holds good volumes plus every bad case of docs/input_handling.md; each case is then checked for
its documented outcome: a map with the input's exact shape and affine, a line in failures.csv naming the file
with a one-line reason, or (non-image files) nothing at all. Separate tests: output-folder errors, untrusted
checkpoints, privacy of DICOM identifiers, determinism, and a property-based geometry round trip through the
inference config's own preprocessing chain and ``Invertd``. Tests that train or run a workflow are marked slow.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import logging
import os
import re
import resource
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import BUNDLE, TINY_MODEL, _downsampled, rotation, run_workflow
from dicom_utils import write_dicom_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from monai_dnprd.checkpoint import CheckpointError, load_model
from monai_dnprd.config import workflow_configs
from monai_dnprd.io import VolumeError, find_volumes, read_volume

# ------------------------------------------------------------------------------------------- helpers

SECRETS = ("Zebulon", "Quixotic", "PIDSECRET4242", "19230405", "19990817")  # DICOM identifiers of one series


def good_volume() -> tuple[np.ndarray, np.ndarray]:
    """A real brain at 40x40x30 voxels (4 mm), as in tests/conftest.py."""
    return _downsampled("IXI015-HH-1258_T1.nii.gz")


def save(arr, aff, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.asarray(aff, dtype=np.float64)), str(path))
    return path


def edit_dicom(path: Path, **tags) -> None:
    ds = pydicom.dcmread(str(path))
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(str(path))


def shift_along_normal(path: Path, mm: float) -> None:
    """Move one DICOM slice by `mm` along the slice normal (cross product of its row and column directions)."""
    ds = pydicom.dcmread(str(path))
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    pos = np.asarray([float(v) for v in ds.ImagePositionPatient]) + mm * normal / np.linalg.norm(normal)
    ds.ImagePositionPatient = [f"{v:.6g}" for v in pos]
    ds.save_as(str(path))


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha1 of every file (symlinks by target) under root, without following links."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def all_text_of(folder: Path) -> str:
    """File names and contents (gzip members decompressed) of every file under folder, as latin-1 text."""
    parts = []
    for p in sorted(folder.rglob("*")):
        parts.append(str(p.relative_to(folder)))
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith(".gz"):
                data = gzip.decompress(data)
            parts.append(data.decode("latin-1"))
    return "\n".join(parts)


def root_cause_chain(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


# ---------------------------------------------------------------------------------------- the matrix

# name in scores.csv / failures.csv -> expected outcome. "map": processed; a string: failure reason (regex);
# None: ignored (neither processed nor listed). DICOM outcomes are keyed by folder name.
FAILS = {
    "zero": r"empty file \(0 bytes\)",
    "truncated": r"cannot read",
    "text_named": r"cannot read",
    "flat2d": r"2D image of shape \(40, 40\); a 3D volume is needed",
    "four_d": r"4D volume with 2 volumes/channels; choose one with index=",
    "nan_many": r"voxels \(\d+\.\d+ %\) are NaN/Inf; at most 1 % can be repaired",
    "constant": r"no foreground",
    "dicom_missing": r"missing slice\(s\): gap of",
    "dicom_uneven": r"uneven slice spacing",
    "dicom_tilt": r"slice positions drift up to 8\.7 mm off the slice normal",
    "selfloop.nii.gz": r"broken symbolic link",
}
MAPS = ["good_a", "nested_deep", "nan_few", "tiny", "huge", "oblique", "anon_series"]  # + the two DICOM series


def build_matrix(root: Path) -> dict:
    """The input folder of the matrix run; returns {"inputs": folder, "sources": {name: input path}}."""
    inp = root / "inputs"
    inp.mkdir()
    arr, aff = good_volume()
    src: dict[str, Path] = {}
    src["good_a"] = save(arr, aff, inp / "good_a.nii.gz")
    src["nested_deep"] = save(arr * 0.8, aff, inp / "nested" / "level2" / "nested_deep.nii.gz")
    # zero-byte, truncated, text with a NIfTI name, NIfTI with a foreign name, non-image files
    (src.setdefault("zero", inp / "zero.nii.gz")).write_bytes(b"")
    full = (inp / "good_a.nii.gz").read_bytes()
    (src.setdefault("truncated", inp / "truncated.nii.gz")).write_bytes(full[: len(full) // 2])
    (src.setdefault("text_named", inp / "text_named.nii.gz")).write_text("this is not an image\n")
    (inp / "nifti_named.dat").write_bytes(full)  # ignored: not a volume file name, and not DICOM
    (inp / "notes.txt").write_text("clinical notes\n")
    (inp / "meta.json").write_text('{"a": 1}')
    (inp / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    # shapes
    src["flat2d"] = save(arr[:, :, 15], aff, inp / "flat2d.nii.gz")
    src["four_d"] = save(np.stack([arr, arr], -1), aff, inp / "four_d.nii.gz")
    src["tiny"] = save(arr[:, :, 14:16], aff, inp / "tiny.nii.gz")  # 40x40x2 < 2k+1 = 3 slices
    yy, xx = np.mgrid[:1024, :1024]
    disk = ((xx - 512) ** 2 + (yy - 500) ** 2 < 400**2).astype(np.float32)
    rng = np.random.default_rng(0)
    huge = np.stack([disk * (100 + 10 * rng.standard_normal(disk.shape, dtype=np.float32)) for _ in range(3)], -1)
    src["huge"] = save(huge.astype(np.float32), np.diag([0.25, 0.25, 3.0, 1.0]), inp / "huge.nii.gz")
    # non-finite voxels
    few = arr.copy()
    few.flat[[100, 2000, 7000, 15000]] = np.nan
    few.flat[[300, 4000]] = [np.inf, -np.inf]
    src["nan_few"] = save(few, aff, inp / "nan_few.nii.gz")
    many = arr.copy()
    many.flat[:: 20] = np.nan  # 5 %
    src["nan_many"] = save(many, aff, inp / "nan_many.nii.gz")
    src["constant"] = save(np.full(arr.shape, 7.0, np.float32), aff, inp / "constant.nii.gz")
    # oblique and sheared affine
    obl = np.eye(4)
    obl[:3, :3] = rotation((0.3, -0.2, 0.5)) @ np.array([[4.0, 0.4, 0.0], [0.0, 3.5, 0.3], [0.0, 0.0, 4.2]])
    obl[:3, 3] = [-71.3, 88.1, -40.7]
    src["oblique"] = save(arr, obl, inp / "oblique.nii.gz")
    # DICOM: two series in one folder, a missing slice, uneven spacing, identifiers
    two = inp / "dicom_two"
    write_dicom_series(arr, two, affine=aff, prefix="A")
    write_dicom_series(arr[::-1].copy(), two, affine=aff, prefix="B")
    files = write_dicom_series(arr, inp / "dicom_missing", affine=aff)
    files[12].unlink()
    files = write_dicom_series(arr, inp / "dicom_uneven", affine=aff)
    for f in files[15:]:
        shift_along_normal(f, 1.5)  # one 7.5 mm step among 6 mm ones: uneven, not a missing slice
    files = write_dicom_series(arr, inp / "dicom_tilt", affine=aff)
    for k, f in enumerate(files):  # gantry tilt: each slice 0.3 mm further along its row direction
        ds = pydicom.dcmread(str(f))
        row = np.asarray([float(v) for v in ds.ImageOrientationPatient[:3]])
        pos = np.asarray([float(v) for v in ds.ImagePositionPatient]) + 0.3 * k * row
        ds.ImagePositionPatient = [f"{v:.6g}" for v in pos]
        ds.save_as(str(f))
    for key in ("dicom_missing", "dicom_uneven", "dicom_tilt"):
        src[key] = inp / key
    files = write_dicom_series(arr, inp / "anon_series", affine=aff, patient_name="Zebulon^Quixotic",
                               patient_id="PIDSECRET4242", series_description="t1")
    for f in files:
        edit_dicom(f, PatientBirthDate="19230405", StudyDate="19990817", SeriesDate="19990817",
                   AcquisitionDate="19990817", ContentDate="19990817")
    src["anon_series"] = inp / "anon_series"
    # a symlink loop (folder pointing at its ancestor) and a self-referencing link with a volume name
    (inp / "nested" / "loop").symlink_to("..", target_is_directory=True)
    (inp / "selfloop.nii.gz").symlink_to("selfloop.nii.gz")
    src["selfloop.nii.gz"] = inp / "selfloop.nii.gz"
    return {"inputs": inp, "sources": src}


@pytest.fixture(scope="module")
def matrix(trained, tmp_path_factory) -> dict:
    """Build the bad-input folder and run inference once over it; capture stdout, stderr and every log record."""
    root = tmp_path_factory.mktemp("matrix")
    m = build_matrix(root)
    before = tree_digest(m["inputs"])
    out = root / "out"
    stdout, stderr, logs = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setLevel(logging.DEBUG)
    logging.getLogger("monai_dnprd").addHandler(handler)  # the root handlers are replaced by logging.conf
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            with pytest.raises(SystemExit) as exc:
                run_workflow("inference.json", "inference", input_dir=str(m["inputs"]), output_dir=str(out),
                             ckpt_path=str(trained / "models" / "model.pt"), num_workers=0)
    finally:
        logging.getLogger("monai_dnprd").removeHandler(handler)
    m.update(
        out=out, exit_code=exc.value.code, stdout=stdout.getvalue(), stderr=stderr.getvalue(), logs=logs.getvalue(),
        peak_rss_growth_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
        inputs_unchanged=tree_digest(m["inputs"]) == before,
        scores={r["name"]: r for r in csv.DictReader(open(out / "scores.csv", encoding="utf-8"))},
        failures=list(csv.DictReader(open(out / "failures.csv", encoding="utf-8"))),
    )
    return m


def dicom_two_names(m) -> list[str]:
    return sorted(n for n in m["scores"] if n.startswith("dicom_two_"))


@pytest.mark.slow
def test_matrix_exit_code_and_inputs_untouched(matrix):
    assert matrix["exit_code"] == 1
    assert matrix["inputs_unchanged"]
    assert not list(matrix["out"].glob(".*tmp*"))


@pytest.mark.slow
@pytest.mark.parametrize("name", MAPS)
def test_matrix_processed_cases_keep_exact_geometry(matrix, name):
    src = matrix["sources"][name]
    assert name in matrix["scores"], f"{name} missing from scores.csv; failures: {matrix['failures']}"
    res = nib.load(str(matrix["out"] / f"{name}.nii.gz"))
    if src.is_dir():
        ref = read_volume(src)
        shape, affine = ref.array.shape, ref.affine
    else:
        img = nib.load(str(src))
        shape, affine = img.shape, img.affine
    assert res.shape == shape
    np.testing.assert_allclose(res.affine, affine, rtol=0, atol=1e-5)
    assert res.get_data_dtype() == np.float32
    data = np.asarray(res.dataobj)
    assert np.isfinite(data).all() and data.min() >= 0
    if name != "tiny":
        # tiny's 2-voxel axis lies in-plane after RAS orientation: every slice holds a 2-pixel strip of tissue,
        # and the feature_pixel map (0 wherever either of its parts is below its normal mean) may be 0 throughout
        assert data.max() > 0
    assert (matrix["out"] / f"{name}_mask.nii.gz").is_file()


@pytest.mark.slow
def test_matrix_oblique_affine_written_exactly(matrix):
    src = nib.load(str(matrix["sources"]["oblique"]))
    res = nib.load(str(matrix["out"] / "oblique.nii.gz"))
    assert np.array_equal(res.affine, src.affine)  # sform kept bit for bit (also the shear)


@pytest.mark.slow
def test_matrix_dicom_two_series_split(matrix):
    names = dicom_two_names(matrix)
    assert len(names) == 2
    folder = matrix["sources"]["good_a"].parent / "dicom_two"
    uids = sorted(r["series_uid"] for r in find_volumes(folder)[0])
    for name in names:
        res = nib.load(str(matrix["out"] / f"{name}.nii.gz"))
        assert res.shape == (40, 40, 30)
    for uid in uids:
        ref = read_volume(folder, uid)
        assert any(np.allclose(nib.load(str(matrix["out"] / f"{n}.nii.gz")).affine, ref.affine, atol=1e-5)
                   for n in names)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAILS))
def test_matrix_refused_cases_listed_with_one_line_reason(matrix, name):
    src = str(matrix["sources"][name])
    rows = [r for r in matrix["failures"] if r["input"] == src]
    assert len(rows) == 1, f"{src} not listed once in failures.csv: {matrix['failures']}"
    reason = rows[0]["reason"]
    assert "\n" not in reason and "\r" not in reason and len(reason) < 300
    assert re.search(FAILS[name], reason), reason
    assert f"FAILED {src}: {reason}" in matrix["stderr"].splitlines()  # the stderr line names the file
    assert not (matrix["out"] / f"{Path(src).name.split('.')[0]}.nii.gz").exists()


@pytest.mark.slow
def test_matrix_nothing_else_processed_or_listed(matrix):
    """Non-image files (txt/json/png, a NIfTI named .dat) are ignored; the symlink loop adds no duplicate."""
    expected = set(MAPS) | set(dicom_two_names(matrix))
    assert set(matrix["scores"]) == expected
    assert len(matrix["failures"]) == len(FAILS)
    listed = " ".join(r["input"] for r in matrix["failures"])
    for ignored in ("notes.txt", "meta.json", "thumb.png", "nifti_named.dat"):
        assert ignored not in listed and ignored not in matrix["stderr"]
    maps = sorted(p.name for p in matrix["out"].glob("*.nii.gz") if not p.name.endswith("_mask.nii.gz"))
    assert maps == sorted(f"{n}.nii.gz" for n in expected)


@pytest.mark.slow
def test_matrix_nan_few_replaced_and_logged(matrix):
    assert re.search(r"nan_few\.nii\.gz: replaced 6 NaN/Inf voxel\(s\)", matrix["logs"] + matrix["stdout"])


@pytest.mark.slow
def test_matrix_huge_volume_memory_bounded(matrix):
    # the whole run (1024x1024x3 included) may not grow the process's peak RSS by more than 1.5 GiB
    print(f"peak RSS growth of the matrix run: {matrix['peak_rss_growth_mb']:.0f} MiB")
    assert matrix["peak_rss_growth_mb"] < 1536, matrix["peak_rss_growth_mb"]


@pytest.mark.slow
def test_privacy_no_dicom_identifier_in_any_output_or_log(matrix):
    assert "anon_series" in matrix["scores"]  # the identifying series was processed
    text = all_text_of(matrix["out"]) + matrix["stdout"] + matrix["stderr"] + matrix["logs"]
    assert (matrix["out"] / "report" / "index.html").is_file()
    for secret in SECRETS:
        assert secret not in text, secret


# --------------------------------------------------------------------------------- output folder errors


@pytest.mark.slow
def test_unwritable_output_folder_is_a_clear_error(trained, tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(Exception) as err:
        run_workflow("inference.json", "inference", input_dir=str(tiny_data["test"]),
                     output_dir=str(blocker / "out"), ckpt_path=str(trained / "models" / "model.pt"), num_workers=0)
    messages = [str(e) for e in root_cause_chain(err.value)]
    assert any("cannot create the output folder: a file is in the way" in m and str(blocker / "out") in m
               for m in messages), messages
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.slow
def test_output_folder_equal_to_input_is_refused(trained, tmp_path):
    inp = tmp_path / "inputs"
    arr, aff = good_volume()
    save(arr, aff, inp / "case.nii.gz")
    before = tree_digest(inp)
    with pytest.raises(Exception) as err:
        run_workflow("inference.json", "inference", input_dir=str(inp), output_dir=str(inp),
                     ckpt_path=str(trained / "models" / "model.pt"), num_workers=0)
    messages = [str(e) for e in root_cause_chain(err.value)]
    assert any("must not be the input folder or lie inside it" in m for m in messages), messages
    assert tree_digest(inp) == before  # nothing written into the input


# ------------------------------------------------------------------------- one-line errors of the CLI

CLI = ["/venv/lib/python3.11/site-packages/monai/bundle/__main__.py", "run", "inference", "--config_file",
       "bundle/configs/inference.json", "--input_dir", "/data/scans", "--mood", "maybe"]


def wrapped_like_monai(err: BaseException) -> RuntimeError:
    """``err`` under MONAI's two generic wrappers (component instantiation, config expression), as a run raises it."""
    try:
        try:
            try:
                raise err
            except BaseException as inner:
                raise RuntimeError("Failed to instantiate component 'x' with keywords: a\n set '_mode_=debug'") from inner
        except RuntimeError as middle:
            raise RuntimeError("Failed to evaluate ConfigExpression: \n('$monai_dnprd.data.f(...)')") from middle
    except RuntimeError as outer:
        return outer


def test_error_hook_prints_one_line_and_keeps_the_traceback_for_debugging(monkeypatch, capsys):
    from monai_dnprd.errors import DEBUG_ENV, install_error_hook

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert not install_error_hook(["pytest"])  # other processes (tests, notebooks) keep Python's hook
    assert sys.excepthook is sys.__excepthook__
    assert not install_error_hook(CLI + ["--debug"]) and not install_error_hook(CLI + ["--debug=1"])
    from monai_dnprd.config import check_cli_overrides

    configs = ",".join(workflow_configs(BUNDLE, "inference"))
    assert check_cli_overrides(CLI[:3] + ["--config_file", configs, "--debug", "true"])
    assert install_error_hook(CLI) and install_error_hook(CLI)  # installed once
    err = wrapped_like_monai(VolumeError("/data/scans", "input folder does not exist"))
    sys.excepthook(type(err), err, err.__traceback__)
    assert capsys.readouterr().err == "error: --input_dir /data/scans: input folder does not exist\n"
    monkeypatch.setenv(DEBUG_ENV, "1")
    sys.excepthook(type(err), err, err.__traceback__)
    shown = capsys.readouterr().err
    assert "Traceback (most recent call last)" in shown and "Failed to evaluate ConfigExpression" in shown


def test_error_line_names_the_cause_the_option_and_the_type_only_when_needed():
    from monai_dnprd.config import as_bool
    from monai_dnprd.errors import DEBUG_ENV, format_error, root_cause

    try:
        as_bool("maybe")
    except ValueError as err:  # a wrong option value, named by the quoted value
        assert format_error(wrapped_like_monai(err), CLI) == "error: --mood maybe: expected true or false, got 'maybe'"
    ckpt = CheckpointError("/m/model.pt: checkpoint file not found")
    assert format_error(wrapped_like_monai(ckpt), CLI) == "error: /m/model.pt: checkpoint file not found"
    assert format_error(ckpt, CLI + ["--ckpt_path", "/m/./model.pt"]) == (
        "error: --ckpt_path /m/model.pt: checkpoint file not found")  # the same path, as the message writes it
    # an error of this package that wraps a lower-level one is the reason shown (not the bare OSError)
    try:
        try:
            open("/nonexistent/x.nii.gz")
        except OSError as os_err:
            raise VolumeError("/nonexistent/x.nii.gz", "cannot read: no such file") from os_err
    except VolumeError as err:
        assert root_cause(wrapped_like_monai(err)) is err
    # foreign errors: the type when the message alone is unclear, one line, a hint at the traceback
    hint = f" (set {DEBUG_ENV}=1 to see the traceback)"
    assert format_error(wrapped_like_monai(KeyError("image")), CLI) == f"error: KeyError: 'image'{hint}"
    assert format_error(wrapped_like_monai(MemoryError()), CLI) == f"error: MemoryError{hint}"
    worker = RuntimeError("Caught VolumeError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                          "last):\n  File \"x.py\", line 1\nmonai_dnprd.io.errors.VolumeError: /a.nii: empty file\n")
    assert format_error(worker) == f"error: monai_dnprd.io.errors.VolumeError: /a.nii: empty file{hint}"
    line = format_error(RuntimeError("first paragraph\n\n\tsecond " + "word " * 200))
    assert "\n" not in line and "\t" not in line and len(line) < 400 and line.startswith("error: first paragraph second")
    assert format_error(wrapped_like_monai(KeyboardInterrupt())) == "error: interrupted"


# ------------------------------------------------------------------------------- untrusted checkpoint


class _Exploit:
    """Pickles to ``exec(code)``: loading it with full pickle would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.slow
def test_pickled_checkpoint_is_refused(trained, tiny_data, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    # a real model's weights and model.json, with a payload added to the weights file
    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    torch.save({**state, "payload": _Exploit(marker)}, evil)
    shutil.copy(trained / "models" / "model.json", tmp_path / "model.json")
    with pytest.raises(Exception) as err:
        run_workflow("inference.json", "inference", input_dir=str(tiny_data["test"]),
                     output_dir=str(tmp_path / "out"), ckpt_path=str(evil), num_workers=0)
    found = [e for e in root_cause_chain(err.value) if isinstance(e, CheckpointError)]
    assert found, [repr(e) for e in root_cause_chain(err.value)]
    msg = str(found[0])
    assert str(evil) in msg and "refused, the file holds a pickled Python object" in msg and "exec" in msg
    assert not marker.exists()
    # without its model.json the file is refused before its weights are read; nothing runs either
    (tmp_path / "model.json").unlink()
    with pytest.raises(CheckpointError, match="no model.json beside it"):
        load_model(evil)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.slow
def test_same_seed_trainings_give_identical_models(tiny_data, tmp_path):
    # both runs here, under the same torch thread count: float reductions are only bitwise-reproducible for
    # a fixed number of threads (the module fixture `trained` is set up before conftest's thread setting)
    for run in ("first", "second"):
        run_workflow(
            "train.json", "training", output_dir=str(tmp_path / run), dataset_dir=str(tiny_data["train"]),
            val_dir=str(tiny_data["val"]), num_iterations=6, warmup_iterations=2, schedule__val_interval=2,
            schedule__ckpt_interval=2, seed=7, **TINY_MODEL,
        )
    a = torch.load(tmp_path / "first" / "models" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "second" / "models" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert {"residual_moments", "map_moments"} <= set(a)  # the fitted map statistics are compared too


@pytest.mark.slow
def test_two_inference_runs_give_identical_maps(matrix, trained, tmp_path):
    inp = tmp_path / "inputs"
    inp.mkdir()
    (inp / "good_a.nii.gz").write_bytes(matrix["sources"]["good_a"].read_bytes())
    run_workflow("inference.json", "inference", input_dir=str(inp), output_dir=str(tmp_path / "out"),
                 ckpt_path=str(trained / "models" / "model.pt"), num_workers=0, report="false")
    first = np.asarray(nib.load(str(matrix["out"] / "good_a.nii.gz")).dataobj)
    second = np.asarray(nib.load(str(tmp_path / "out" / "good_a.nii.gz")).dataobj)
    assert np.array_equal(first, second)
    s1 = matrix["scores"]["good_a"]["score"]
    s2 = next(csv.DictReader(open(tmp_path / "out" / "scores.csv")))["score"]
    assert s1 == s2


# ------------------------------------------------------------------- geometry round trip (property)

PARAMS = {"modality": "mri", "k": 1, "img_size": 32, "margin": 4, "spacing": None, "z_sigma": 1.0, "score_q": 0.01}


@pytest.fixture(scope="module")
def chain():
    """The inference config's own preprocessing Compose and Invertd (model parameters given directly)."""
    parser = ConfigParser()
    parser.read_config(workflow_configs(BUNDLE, "inference"))
    parser["params"] = dict(PARAMS)
    parser["bundle_root"] = str(BUNDLE)
    return parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inverse")


_perm = st.permutations([0, 1, 2])
_signs = st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(st.integers(10, 24), st.integers(10, 24), st.integers(6, 18)),
    spacing=st.tuples(*[st.floats(0.5, 3.0)] * 3),
    perm=_perm,
    signs=_signs,
    angles=st.tuples(*[st.floats(-0.4, 0.4)] * 3),
    centre=st.tuples(*[st.floats(0.35, 0.65)] * 3),
    radius=st.floats(0.2, 0.35),
)
def test_geometry_round_trip_property(chain, tmp_path, shape, spacing, perm, signs, angles, centre, radius):
    preprocessing, inverse = chain
    aff = np.eye(4)
    aff[:3, :3] = rotation(angles) @ np.eye(3)[:, list(perm)] @ np.diag(signs) @ np.diag(spacing)
    aff[:3, 3] = [12.5, -40.0, 7.25]
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij"), -1)
    blob = (((grid - np.asarray(centre)) / radius) ** 2).sum(-1) < 1.0
    data = (blob * (100.0 + grid[..., 0] * 20)).astype(np.float32)  # an off-centre object on a 0 background
    path = save(data, aff, tmp_path / "vol.nii.gz")
    img = nib.load(str(path))

    d = preprocessing({"image": str(path), "name": "vol"})
    image, mask = d["image"], d["mask"]
    fg = np.argwhere(np.asarray(mask[0]) > 0)
    assert len(fg)
    p = fg[len(fg) // 2]  # a foreground voxel in preprocessed space
    volume = torch.zeros((1, *image.shape[1:]))
    volume[(0, *p)] = 1.0
    d["pred"] = MetaTensor(volume)
    d["pred"].copy_meta_from(image)  # as the inferer builds it
    out = inverse(d)
    pred = out["pred"]
    assert tuple(pred.shape[1:]) == img.shape
    np.testing.assert_allclose(np.asarray(pred.affine), img.affine, rtol=0, atol=1e-5)
    assert tuple(out["mask"].shape[1:]) == img.shape
    q = np.unravel_index(int(torch.as_tensor(pred[0]).argmax()), img.shape)
    assert float(torch.as_tensor(pred[0])[q]) == pytest.approx(1.0)
    world_pre = np.asarray(image.affine, dtype=np.float64) @ np.r_[p, 1.0]
    world_in = img.affine @ np.r_[q, 1.0]
    np.testing.assert_allclose(world_in[:3], world_pre[:3], atol=1e-3)
