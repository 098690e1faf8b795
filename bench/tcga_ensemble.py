"""Does averaging several trained models help? The bundle's ensemble evaluation on bench/tcga_protocol.py runs.

Runs the evaluation workflow once with every run's model as an ensemble member (``--ckpt_path`` given a list;
monai_dnprd.ensemble: each member's map divided by the 99th percentile of its normal calibration scores, then
averaged) on the runs' common test case, and prints the members' own results (their eval/metrics.json from the
protocol) next to the ensemble's. ``--own_case`` does the same on the runs' common training case (the whole
volume, tumour included), after ``bench/tcga_protocol.py --own_case`` scored the members there.

Usage: python bench/tcga_ensemble.py RUN_DIR [RUN_DIR ...] [--own_case] [--out OUT] [--extra '{"z_sigma": 2.0}']
       (RUN_DIR: one direction of a protocol run, e.g. runs/bench_tcga/TCGA-DU-7294-TCGA-FG-6692)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tcga_protocol import run_bundle  # noqa: E402


def row(name: str, metrics: dict) -> str:
    v = metrics["voxel"]
    return f"{name}: voxel AUROC {v['auroc']:.3f} AP {v['ap']:.3f} best Dice {v['best_dice']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="direction folders of bench/tcga_protocol.py runs, same test case")
    ap.add_argument("--own_case", action="store_true", help="evaluate on the runs' training case (own_case/ folders)")
    ap.add_argument("--out", type=Path, default=None, help="output folder of the ensemble evaluation (default: temporary)")
    ap.add_argument("--extra", default="{}", help="JSON dict of evaluation overrides for the ensemble")
    args = ap.parse_args()
    cases = [run / "own_case" if args.own_case else run for run in args.runs]
    label = np.asarray(nib.load(str(cases[0] / "labels" / "case.nii.gz")).dataobj) > 0
    for case in cases[1:]:
        if not np.array_equal(np.asarray(nib.load(str(case / "labels" / "case.nii.gz")).dataobj) > 0, label):
            raise SystemExit(f"{case} has another test case than {cases[0]}")
    for run, case in zip(args.runs, cases):
        print(row(str(run), json.loads((case / "eval" / "metrics.json").read_text())), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "ensemble"
        run_bundle("evaluating", input_dir=str(cases[0] / "test"),
                   label_dir=str(cases[0] / "labels"), output_dir=str(out), report="false",
                   ckpt_path=[str(run / "train" / "models" / "model.pt") for run in args.runs], **json.loads(args.extra))
        print(row(f"ensemble of {len(args.runs)}", json.loads((out / "metrics.json").read_text())), flush=True)


if __name__ == "__main__":
    main()
