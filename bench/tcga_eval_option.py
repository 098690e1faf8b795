"""Inference options on trained protocol runs, without training again: each run's metrics before and after.

For each RUN_DIR of bench/tcga_protocol.py, runs the bundle's evaluation workflow with the run's model and the
given overrides (inference options such as ``flip_tta``) on the run's test case, or with ``--own_case`` on its
training case (after ``tcga_protocol.py --own_case``). Results go to RUN_DIR[/own_case]/eval_<tag>/; the
table compares them with the run's eval/metrics.json.

Usage: python bench/tcga_eval_option.py RUN_DIR [RUN_DIR ...] --extra '{"flip_tta": true}' --tag flip [--own_case]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tcga_protocol import run_bundle  # noqa: E402


def voxel(path: Path) -> tuple[float, float]:
    v = json.loads(path.read_text())["voxel"]
    return v["ap"], v["best_dice"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="direction folders of bench/tcga_protocol.py runs")
    ap.add_argument("--extra", required=True, help="JSON dict of evaluation overrides, e.g. '{\"flip_tta\": true}'")
    ap.add_argument("--tag", required=True, help="name of the result folders (eval_<tag>)")
    ap.add_argument("--own_case", action="store_true", help="evaluate on each run's training case (own_case/)")
    args = ap.parse_args()
    extra = json.loads(args.extra)
    gains = []
    for run in args.runs:
        case = run / "own_case" if args.own_case else run
        out = case / f"eval_{args.tag}"
        if not (out / "metrics.json").is_file():
            run_bundle("evaluate.json", "evaluating", input_dir=str(case / "test"), label_dir=str(case / "labels"),
                       output_dir=str(out), report="false", ckpt_path=str(run / "train" / "models" / "model.pt"),
                       **extra)
        (ap0, d0), (ap1, d1) = voxel(case / "eval" / "metrics.json"), voxel(out / "metrics.json")
        gains.append(ap1 - ap0)
        print(f"{case}: voxel AP {ap0:.3f} -> {ap1:.3f}, best Dice {d0:.3f} -> {d1:.3f}", flush=True)
    print(f"{args.tag}: AP change median {statistics.median(gains):+.3f}, range {min(gains):+.3f} to {max(gains):+.3f}, "
          f"higher in {sum(g > 0 for g in gains)} of {len(gains)}", flush=True)


if __name__ == "__main__":
    main()
