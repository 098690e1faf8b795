"""Probe a model on synthetic lesions in any shipped demo subject: where does detection fail?

Makes a test set like the demo's (one volume per lesion kind with its mask, plus normal variants) from one of
the subjects in ``monai_dnprd/demo_data`` (skull-stripped like the demo), with chosen lesion radii and seeds,
runs the bundle's evaluation workflow on it with the given model and prints the pooled voxel metrics next to
the chance level (the lesion fraction of the evaluated voxels), the per-kind voxel AUROC, and simple intensity
baselines on the same volumes and voxels (on the raw and on the bias-corrected intensities).

    python bench/demo_lesion_probe.py --ckpt runs/demo/models/model.pt --subject demo   # the demo test set
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

import nibabel as nib
import numpy as np
from scipy.ndimage import median_filter

REPO = Path(__file__).resolve().parents[1]


def _normalised(x: np.ndarray, fg: np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
    """The pipeline's MRI normalisation (foreground 0.5th percentile to 0, median to 0.5; 0 outside); with an
    ``affine``, after the pipeline's N4 bias field correction first (``tcga_protocol.bias_corrected``)."""
    from tcga_protocol import bias_corrected

    from monai_dnprd.transforms import NormalizeForeground

    if affine is not None:
        x = bias_corrected(x, fg, affine)
    return np.asarray(NormalizeForeground()(x[None], fg[None]))[0]


def baseline_metrics(images: Path, labels: Path, maps: Path, train_dir: Path, seed: int = 0) -> dict[str, dict]:
    """Pooled metrics of simple baselines on the probe's volumes, inside the model's foreground (map > 0).

    ``intensity_abs_z_median3``: |z| of the intensity within the brain after a 3x3x3 median (two-sided, since
    lesions are brighter or darker); ``normal_intensity_z``: |z| against the normalised intensities of the
    normal training volumes; ``random``: uniform noise (chance). The ``_n4`` forms read every volume after the
    pipeline's bias field correction, as the model does.
    """
    from monai_dnprd.metrics import VolumeMetricAccumulator

    train: dict[str, list[np.ndarray]] = {"": [], "_n4": []}
    for p in sorted(train_dir.glob("*.nii.gz")):
        img = nib.load(str(p))
        t = np.asarray(img.dataobj, dtype=np.float32)
        train[""].append(_normalised(t, t > 0)[t > 0])
        train["_n4"].append(_normalised(t, t > 0, img.affine)[t > 0])
    tv = {k: np.concatenate(v) for k, v in train.items()}
    names = [f"{k}{s}" for s in ("", "_n4") for k in ("intensity_abs_z_median3", "normal_intensity_z")] + ["random"]
    accs = {k: VolumeMetricAccumulator() for k in names}
    rng = np.random.default_rng(seed)
    for path in sorted(images.glob("*.nii.gz")):
        img = nib.load(str(path))
        x = np.asarray(img.dataobj, dtype=np.float32)
        fg = np.asarray(nib.load(str(maps / path.name)).dataobj) > 0
        lab = np.asarray(nib.load(str(labels / path.name)).dataobj) > 0
        axis = [c in "SI" for c in nib.aff2axcodes(img.affine)].index(True)
        candidates = {"random": rng.random(x.shape, dtype=np.float32)}
        for suffix, affine in (("", None), ("_n4", img.affine)):
            xn = _normalised(x, fg, affine)
            z = (xn - xn[fg].mean()) / max(float(xn[fg].std()), 1e-6)
            candidates[f"intensity_abs_z_median3{suffix}"] = np.abs(median_filter(z, size=3))
            candidates[f"normal_intensity_z{suffix}"] = np.abs(xn - tv[suffix].mean()) / max(float(tv[suffix].std()), 1e-6)
        for k, m in candidates.items():
            accs[k].add(path.name, np.where(fg, m, 0).astype(np.float32), label=lab, mask=fg, axis=axis)
    out = {}
    for k, acc in accs.items():
        r = acc.compute()
        out[k] = {"voxel_auroc": r["voxel"]["auroc"], "voxel_ap": r["voxel"]["ap"],
                  "voxel_best_dice": r["voxel"]["best_dice"], "slice_auroc": r["slice"]["auroc"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="exported model (models/model.pt of a training run)")
    ap.add_argument("--subject", default="IXI012-HH-1211_T1.nii.gz",
                    help="file name in monai_dnprd/demo_data, or 'demo' for the demo's own test volumes")
    ap.add_argument("--radius", type=float, nargs=2, default=None, metavar=("MIN_MM", "MAX_MM"),
                    help="lesion radius range in mm (default: the demo's)")
    ap.add_argument("--seed", type=int, default=500, help="first seed of the normal variants")
    ap.add_argument("--lesion_seed", type=int, default=2000)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = ap.parse_args()

    from monai.bundle import ConfigWorkflow

    from monai_dnprd import demo

    out = Path(args.out or tempfile.mkdtemp(prefix="probe_"))
    if args.subject == "demo":
        dirs = demo.prepare_demo_data()
        images, labels = dirs["test_images"], dirs["test_labels"]
    else:
        if not (demo.SOURCE_DIR / args.subject).is_file():
            raise SystemExit(f"no subject {args.subject!r} in {demo.SOURCE_DIR}")
        images, labels = out / "images", out / "labels"
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(exist_ok=True)
        demo.write_lesion_test_set(args.subject, images, labels, prefix=args.subject.split(".")[0],
                                   first_seed=args.seed, lesion_seed=args.lesion_seed,
                                   radius_mm=tuple(args.radius) if args.radius else demo.LESION_RADIUS_MM)
    configs = REPO / "bundle" / "configs"
    from monai_dnprd.config import workflow_configs

    wf = ConfigWorkflow(config_file=workflow_configs(REPO / "bundle", "evaluating"), workflow_type=None, run_id="evaluating",
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
               "per_kind_voxel_auroc": kinds, "lesion_voxels": counts["lesion_voxels"], "voxels": counts["voxels"],
               "baselines": baseline_metrics(images, labels, out / "eval", demo.prepare_demo_data()["train"])}
    (out / "probe.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
