"""Does averaging several trained models help? Metrics of an ensemble of bench/tcga_protocol.py runs.

Each run's map of the same test volume is put on its model's own normal scale before the average: (m - q50) /
(q99 - q50), with q50 and q99 the median and 99th percentile of the normal voxel scores in the model's
calibration (held-out normal slabs, no test data). The ensemble and each member are scored on the test volume's
foreground with the evaluation metrics.

Usage: python bench/tcga_ensemble.py RUN_DIR [RUN_DIR ...]
       (RUN_DIR: one direction of a protocol run, e.g. runs/bench_tcga/TCGA-DU-7294-TCGA-FG-6692)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tcga_protocol import case_metrics  # noqa: E402


def calibrated_map(run: Path) -> np.ndarray:
    """The run's test map in units of its normal score spread (0 at the normal median, 1 at the normal q99)."""
    from monai_dnprd.calibration import Calibration

    m = np.asarray(nib.load(str(run / "eval" / "case.nii.gz")).dataobj, dtype=np.float32)
    cal = Calibration.load(run / "train" / "models" / "calibration.json")
    q50, q99 = cal.voxel_threshold(0.5), cal.voxel_threshold(0.01)
    return (m - q50) / max(q99 - q50, 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="direction folders of bench/tcga_protocol.py runs, same test case")
    args = ap.parse_args()
    label = np.asarray(nib.load(str(args.runs[0] / "labels" / "case.nii.gz")).dataobj) > 0
    fg = np.asarray(nib.load(str(args.runs[0] / "eval" / "case.nii.gz")).dataobj) > 0
    maps = []
    for run in args.runs:
        if not np.array_equal(np.asarray(nib.load(str(run / "labels" / "case.nii.gz")).dataobj) > 0, label):
            raise SystemExit(f"{run} has another test case than {args.runs[0]}")
        maps.append(calibrated_map(run))
        r = case_metrics(np.where(fg, maps[-1], 0), label, fg)
        print(f"{run}: voxel AUROC {r['voxel_auroc']:.3f} AP {r['voxel_ap']:.3f} best Dice {r['voxel_best_dice']:.3f}")
    mean = np.mean(maps, axis=0)
    r = case_metrics(np.where(fg, mean - mean[fg].min(), 0), label, fg)
    print(f"ensemble of {len(maps)}: voxel AUROC {r['voxel_auroc']:.3f} AP {r['voxel_ap']:.3f} best Dice {r['voxel_best_dice']:.3f}")


if __name__ == "__main__":
    main()
