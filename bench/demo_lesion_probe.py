"""Probe a model on synthetic lesions in any shipped demo subject: where does detection fail?

Makes a test set like the demo's (one volume per lesion kind with its mask, plus normal variants) from one of
the subjects in ``monai_dnprd/demo_data`` (skull-stripped like the demo), with chosen lesion radii and seeds,
runs the bundle's evaluation workflow on it with the given model and prints the pooled voxel metrics next to
the chance level (the lesion fraction of the evaluated voxels), and the per-kind voxel AUROC.

    python bench/demo_lesion_probe.py --ckpt runs/demo/models/model.pt --subject IXI012-HH-1211_T1.nii.gz
    python bench/demo_lesion_probe.py --ckpt runs/demo/models/model.pt --subject IXI015-HH-1258_T1.nii.gz --radius 12 25

Use a training subject to see detection in known anatomy (new scans of it: new pose, bias field, contrast and
noise), the held-out subject for generalisation, larger radii for tumour-sized lesions. Writes OUT/probe.json
(the summary printed last) and OUT/eval/ (the evaluation's maps and metrics.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="exported model (models/model.pt of a training run)")
    ap.add_argument("--subject", default="IXI012-HH-1211_T1.nii.gz", help="file name in monai_dnprd/demo_data")
    ap.add_argument("--radius", type=float, nargs=2, default=None, metavar=("MIN_MM", "MAX_MM"),
                    help="lesion radius range in mm (default: the demo's)")
    ap.add_argument("--seed", type=int, default=500, help="first seed of the normal variants")
    ap.add_argument("--lesion_seed", type=int, default=2000)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = ap.parse_args()

    from monai.bundle import ConfigWorkflow

    from monai_dnprd import demo

    out = Path(args.out or tempfile.mkdtemp(prefix="probe_"))
    images, labels = out / "images", out / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(exist_ok=True)
    if not (demo.SOURCE_DIR / args.subject).is_file():
        raise SystemExit(f"no subject {args.subject!r} in {demo.SOURCE_DIR}")
    prefix = args.subject.split(".")[0]
    demo.write_lesion_test_set(args.subject, images, labels, prefix=prefix, first_seed=args.seed,
                               lesion_seed=args.lesion_seed, radius_mm=tuple(args.radius) if args.radius else None)
    configs = REPO / "bundle" / "configs"
    wf = ConfigWorkflow(config_file=str(configs / "evaluate.json"), workflow_type=None, run_id="evaluating",
                        meta_file=str(configs / "metadata.json"), logging_file=str(configs / "logging.conf"),
                        bundle_root=str(REPO / "bundle"), ckpt_path=args.ckpt, input_dir=str(images),
                        label_dir=str(labels), output_dir=str(out / "eval"), report="false")
    wf.initialize()
    wf.run()
    wf.finalize()
    m = json.loads((out / "eval" / "metrics.json").read_text())
    counts = m["counts"]
    chance = counts["lesion_voxels"] / max(counts["voxels"], 1)
    kinds = {k.split("_")[-1]: round(v["auroc"], 3) for k, v in m["per_volume"].items() if v["n_lesion_voxels"]}
    summary = {"subject": args.subject, "radius_mm": args.radius or list(demo.LESION_RADIUS_MM),
               "voxel_auroc": m["voxel"]["auroc"], "voxel_ap": m["voxel"]["ap"], "chance_ap": chance,
               "voxel_best_dice": m["voxel"]["best_dice"], "slice_auroc": m["slice"]["auroc"],
               "per_kind_voxel_auroc": kinds, "lesion_voxels": counts["lesion_voxels"], "voxels": counts["voxels"]}
    (out / "probe.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
