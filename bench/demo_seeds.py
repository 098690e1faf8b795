"""How much does the demo result depend on the seed? Train and evaluate the demo once per seed, then summarise.

With two normal training subjects, one run says little: the same configuration lands anywhere from chance to
17x chance voxel AP depending on the seed (docs/research_log.md). This script is the measurement behind the
demo figures in the README: for each seed it runs the bundle's training workflow on the embedded demo data
(with optional extra overrides), then its evaluation workflow on the demo test set, and prints one row per seed
plus the spread.

    python bench/demo_seeds.py --seeds 0 1 2 3 4 --out runs/bench_seeds
    python bench/demo_seeds.py --seeds 0 1 2 --out runs/bench_seeds_mf --extra '{"data#min_foreground": 0.01}'

A seed whose ``OUT/seed<N>/evaluation/metrics.json`` exists is not run again (``--force`` re-runs it), so an
interrupted sweep continues where it stopped; ``--reevaluate`` keeps the trained models and runs the evaluation
again with ``--eval_extra`` overrides (e.g. another map setting), calibrated again on the demo's calibration
set as training calibrates. Besides the bundle metrics, each row gives ``top1_end``: the share
of the top 1 % of map values in the normal test volumes that lies in the axial slices at the ends of the brain
(slices holding less than 30 % of the largest slice's brain area). Failing seeds put most of their false
positives there. ``training`` is the wall time of the training workflow (validations and calibration
included). Writes OUT/seeds.json and OUT/seeds.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_dnprd.config import workflow_configs
from monai_dnprd.engines.evaluator import axial_axis

REPO = Path(__file__).resolve().parents[1]
KINDS = ("hyper", "texture", "hypo", "deform")


def _bundle(command: str, **overrides: object) -> None:
    """Run ``python -m monai.bundle run <command>`` as a subprocess (one clean process per run, as a user would)."""
    args = [sys.executable, "-m", "monai.bundle", "run", command,
            "--config_file", str(workflow_configs(REPO / "bundle", command)), "--bundle_root", str(REPO / "bundle")]
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    subprocess.run(args, check=True, cwd=REPO)


def end_slice_share(map_path: Path, end_fraction: float = 0.3, q: float = 0.01) -> float:
    """Share of the top ``q`` of a map's foreground values lying in axial slices with a small brain area."""
    img = nib.load(str(map_path))
    m = np.moveaxis(np.asarray(img.dataobj, dtype=np.float32), axial_axis(img.affine), -1)
    fg = m > 0  # the written maps are 0 outside the foreground
    area = fg.sum((0, 1))
    small = area < end_fraction * area.max()
    top = (m >= np.quantile(m[fg], 1.0 - q)) & fg
    return float(top[..., small].sum() / max(top.sum(), 1))


def summarise_seed(run_dir: Path, train_seconds: float | None) -> dict:
    """One row: pooled voxel and slice metrics, chance AP, per-kind voxel AUROC, end-slice share, training time."""
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    counts = metrics["counts"]
    per_volume = metrics["per_volume"]
    row = {
        "voxel_auroc": metrics["voxel"]["auroc"],
        "voxel_ap": metrics["voxel"]["ap"],
        "chance_ap": counts["lesion_voxels"] / counts["voxels"],
        "best_dice": metrics["voxel"]["best_dice"],
        "slice_auroc": metrics["slice"]["auroc"],
        "train_seconds": train_seconds,
    }
    for kind in KINDS:
        row[f"auroc_{kind}"] = next((v["auroc"] for k, v in per_volume.items() if k.endswith(kind)), float("nan"))
    normals = [k for k, v in per_volume.items() if v.get("is_normal")]
    shares = [end_slice_share(run_dir / "evaluation" / f"{k}.nii.gz") for k in normals]
    row["top1_end"] = float(np.mean(shares)) if shares else float("nan")
    return row


def table(rows: dict[int, dict]) -> str:
    """Markdown table of the seed rows and a spread line."""
    lines = ["| seed | voxel AUROC | voxel AP (x chance) | best Dice | slice AUROC "
             "| AUROC hyper / texture / hypo / deform | top-1 % in end slices | training |",
             "|---|---|---|---|---|---|---|---|"]
    for seed, r in sorted(rows.items()):
        kinds = " / ".join(f"{r[f'auroc_{k}']:.3f}" for k in KINDS)
        t = f"{r['train_seconds'] / 60:.1f} min" if r.get("train_seconds") else "(earlier run)"
        lines.append(f"| {seed} | {r['voxel_auroc']:.3f} | {r['voxel_ap']:.4f} ({r['voxel_ap'] / r['chance_ap']:.1f}x) "
                     f"| {r['best_dice']:.3f} | {r['slice_auroc']:.3f} | {kinds} | {r['top1_end']:.2f} | {t} |")
    aps = [r["voxel_ap"] / r["chance_ap"] for r in rows.values()]
    aurocs = [r["voxel_auroc"] for r in rows.values()]
    lines.append("")
    lines.append(f"{len(rows)} seeds: voxel AUROC median {statistics.median(aurocs):.3f} (range {min(aurocs):.3f}-"
                 f"{max(aurocs):.3f}); voxel AP median {statistics.median(aps):.1f}x chance (range {min(aps):.1f}-"
                 f"{max(aps):.1f}x); {sum(a >= 2.0 for a in aps)} of {len(aps)} at 2x chance or more.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="runs/bench_seeds", help="one sub-folder per seed is written here")
    parser.add_argument("--extra", default="{}",
                        help="JSON dict of extra training overrides, e.g. '{\"network_def#patch_size\": 8}'")
    parser.add_argument("--force", action="store_true", help="re-run seeds that already have results")
    parser.add_argument("--reevaluate", action="store_true",
                        help="keep each seed's trained model; evaluate again (with --eval_extra), recalibrated")
    parser.add_argument("--eval_extra", default="{}", help="JSON dict of evaluation overrides for --reevaluate")
    args = parser.parse_args(argv)
    extra = json.loads(args.extra)
    if not isinstance(extra, dict):
        parser.error("--extra must be a JSON object")
    out = Path(args.out).resolve()
    rows: dict[int, dict] = {}
    for seed in args.seeds:
        run_dir = out / f"seed{seed}"
        train_seconds = None
        if args.reevaluate:
            from monai_dnprd.demo import prepare_demo_data

            _bundle("evaluating", ckpt_path=str(run_dir / "models" / "model.pt"), output_dir=str(run_dir / "evaluation"),
                    calibration_dir=str(prepare_demo_data()["calibration"]), **json.loads(args.eval_extra))
        elif args.force or not (run_dir / "evaluation" / "metrics.json").is_file():
            start = time.perf_counter()
            _bundle("training", output_dir=str(run_dir), seed=seed, **extra)
            train_seconds = time.perf_counter() - start
            _bundle("evaluating", ckpt_path=str(run_dir / "models" / "model.pt"),
                    output_dir=str(run_dir / "evaluation"))
        rows[seed] = summarise_seed(run_dir, train_seconds)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[seed].items() if v is not None), flush=True)
    text = table(rows)
    (out / "seeds.json").write_text(json.dumps({"extra": extra, "seeds": rows}, indent=1))
    (out / "seeds.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
