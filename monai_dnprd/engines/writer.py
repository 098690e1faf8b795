"""Writes what inference produces: maps in the input's space, thresholded masks, scores.csv, failures.csv."""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from monai_dnprd.calibration import Calibration
from monai_dnprd.distributed import barrier, rank, world_size
from monai_dnprd.engines.evaluator import axial_axis
from monai_dnprd.io.writers import write_csv, write_nifti, write_text

__all__ = ["InferenceWriter", "SCORE_FIELDS"]

logger = logging.getLogger("monai_dnprd")

SCORE_FIELDS = ("name", "score", "normalised_score", "volume_threshold", "anomalous", "voxel_threshold", "fpr",
                "top_slice", "slice_axis", "seconds", "input")
FAILURE_FIELDS = ("name", "input", "reason")


class InferenceWriter:
    """Per volume: ``<name>.nii.gz`` (float32 map, the input's shape and affine, 0 outside the foreground).

    With a calibration file (from training), also ``<name>_mask.nii.gz`` (voxels above the threshold at
    false-positive rate ``fpr`` on normal voxels) and the volume decision at the same FPR. ``scores.csv`` is
    rewritten (atomically) after every volume, so an interrupted run keeps what it finished; failures go to
    stderr and ``failures.csv``. ``mood=True`` also writes MOOD sample-level files ``<input file name>.txt``.
    """

    def __init__(self, output_dir: str | Path, calibration_path: str | Path | None = None, fpr: float = 0.01,
                 mood: bool = False, write_masks: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.fpr = float(fpr)
        self.mood = bool(mood)
        self.write_masks = write_masks
        self.calibration = None
        if calibration_path and Path(calibration_path).is_file():
            self.calibration = Calibration.load(calibration_path)
        elif calibration_path:
            logger.warning("no calibration file at %s: no thresholds or masks will be written", calibration_path)
        self.rows: list[dict] = []
        self.failures: list[dict] = []
        self._previous = self._read_previous()

    def threshold(self) -> float | None:
        """The voxel threshold at the run's false-positive rate, or None without a calibration."""
        return None if self.calibration is None else float(self.calibration.voxel_threshold(self.fpr))

    def _read_previous(self) -> dict[str, dict]:
        """Rows of an earlier (interrupted) run in the same folder, kept for volumes not processed again."""
        path = self.output_dir / "scores.csv"
        if not path.is_file():
            return {}
        with open(path, newline="", encoding="utf-8") as f:
            return {r["name"]: r for r in csv.DictReader(f) if r.get("name")}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write)
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def _write(self, engine: Engine) -> None:
        d = engine.state.output
        if d.get("error"):
            self.failures.append({"name": d.get("name"), "input": str(d.get("image")), "reason": d["error"]})
            print(f"FAILED {d.get('image')}: {d['error']}", file=sys.stderr, flush=True)
            return
        pred = d["pred"]
        meta = getattr(pred, "meta", {})
        affine = np.asarray(meta.get("original_affine", getattr(pred, "affine", np.eye(4))), dtype=np.float64)
        array = torch.as_tensor(pred).detach().float().cpu().numpy()[0]
        shape = tuple(int(s) for s in np.asarray(meta.get("spatial_shape", array.shape)).ravel())
        if array.shape != shape:
            raise RuntimeError(f"{d['name']}: map shape {array.shape} differs from the input shape {shape}")
        name = d["name"]
        write_nifti(array, affine, self.output_dir / f"{name}.nii.gz")
        axis = axial_axis(affine)
        slice_max = array.max(axis=tuple(i for i in range(3) if i != axis))
        row = {
            "name": name,
            "score": f"{d['score']:.6g}",
            "top_slice": int(slice_max.argmax()),
            "slice_axis": axis,
            "seconds": f"{d.get('seconds', 0.0) + d.get('load_seconds', 0.0):.2f}",
            "input": str(meta.get("filename_or_obj", "")),
        }
        if self.calibration is not None:
            vox_thr = self.calibration.voxel_threshold(self.fpr)
            vol_thr = self.calibration.volume_threshold(self.fpr)
            row.update({
                "normalised_score": f"{self.calibration.normalised_score(d['score']):.4f}",
                "volume_threshold": f"{vol_thr:.6g}",
                "anomalous": "yes" if d["score"] > vol_thr else "no",
                "voxel_threshold": f"{vox_thr:.6g}",
                "fpr": self.fpr,
            })
            if self.write_masks:
                write_nifti((array > vox_thr).astype(np.uint8), affine, self.output_dir / f"{name}_mask.nii.gz",
                            dtype=np.uint8)
        if self.mood:
            source = Path(row["input"]).name or f"{name}.nii.gz"
            value = self.calibration.normalised_score(d["score"]) if self.calibration is not None else d["score"]
            write_text(f"{value:.6f}", self.output_dir / f"{source}.txt")
        self.rows.append(row)
        logger.info("[%d/%s] %s: score %s%s (%s s)", engine.state.iteration, engine.state.epoch_length, name, row["score"],
                    f", anomalous: {row['anomalous']}" if "anomalous" in row else "", row["seconds"])
        self._previous.pop(name, None)
        self._save_scores()

    def _part(self, stem: str) -> Path:
        """``scores.csv`` in a single process; ``scores.rank<r>.csv`` per rank under torchrun (merged at the end)."""
        return self.output_dir / (f"{stem}.csv" if world_size() == 1 else f"{stem}.rank{rank()}.csv")

    def _save_scores(self) -> None:
        rows = (list(self._previous.values()) if rank() == 0 else []) + self.rows
        rows.sort(key=lambda r: float(r.get("score") or 0.0), reverse=True)
        write_csv([{k: r.get(k, "") for k in SCORE_FIELDS} for r in rows], self._part("scores"), SCORE_FIELDS)

    def _finish(self, engine: Engine) -> None:
        self._save_scores()
        write_csv(self.failures, self._part("failures"), FAILURE_FIELDS)
        if world_size() > 1:
            barrier()
            if rank() == 0:
                self._merge()
            barrier()
        if rank() == 0:  # the merged file belongs to rank 0: drop it when no rank had a failure
            with open(self.output_dir / "failures.csv", newline="", encoding="utf-8") as f:
                if not list(csv.DictReader(f)):
                    (self.output_dir / "failures.csv").unlink(missing_ok=True)
        logger.info("%d volume(s) written to %s, %d failed", len(self.rows), self.output_dir, len(self.failures))

    def _merge(self) -> None:
        """Rank 0 joins every rank's scores and failures into ``scores.csv`` / ``failures.csv``."""
        for stem, fields, key in (("scores", SCORE_FIELDS, "score"), ("failures", FAILURE_FIELDS, None)):
            parts = sorted(self.output_dir.glob(f"{stem}.rank*.csv"))
            rows = [r for p in parts for r in csv.DictReader(open(p, newline="", encoding="utf-8"))]
            if key:
                rows.sort(key=lambda r: float(r.get(key) or 0.0), reverse=True)
            write_csv(rows, self.output_dir / f"{stem}.csv", fields)
            for p in parts:
                p.unlink()

    def check(self) -> bool:
        """Exit with status 1 when any input failed (after every good volume was processed)."""
        if self.failures:
            print(f"{len(self.failures)} input(s) failed, see {self.output_dir / 'failures.csv'}", file=sys.stderr, flush=True)
            raise SystemExit(1)
        return True
