"""Accuracy on real lesions: the TCGA-LGG FLAIR protocol, DNP-ConFormer next to simple baselines.

Protocol (docs/benchmarks.md): train on the tumour-free axial slabs (slices at least 2 slices away from any
labelled voxel) of one case, test on the whole other case, and the reverse. Normal validation (model
selection with synthetic lesions, calibration) uses the same tumour-free slabs: no real lesion is ever seen
before the test. Baselines on the same volumes and masks: (a) FLAIR intensity z-scored in the brain,
median-filtered, also after the default's left-right symmetry step and on bias-corrected intensities (the
bundle's N4 step); (b) per-voxel z-score against the normal training intensities; (c) random. Every map is scored
inside the test volume's brain as the bundle's preprocessing finds it (``brain_mask``), a region that does not
depend on the model.

Usage: python bench/tcga_protocol.py [--data ../shared/data/tcga_lgg] [--out runs/bench_tcga] [--iterations 700]
       [--sequences fla t2]   (the model reads FLAIR and T2 as the channels of 4D inputs; baselines: FLAIR)
       python bench/tcga_protocol.py --out runs/bench_tcga --rescore   (metrics again, no training)
       python bench/tcga_protocol.py --out runs/bench_tcga --own_case  (each trained model on its own training case)
       python bench/tcga_protocol.py --out runs/bench_tcga_excl --exclusion  (a variant: train on the whole training
                                              case with its tumour label, grown by 5 mm, as an exclusion mask)
       python bench/tcga_protocol.py --out runs/bench_tcga_pooled --pooled  (one model on the slabs of both cases,
                                                                             tested on each whole case: a diagnostic)
Prints a table and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import gaussian_filter, median_filter

from monai_dnprd.symmetry import MirrorSuppression
from monai_dnprd.transforms.array import BiasFieldCorrection, ForegroundMask

REPO = Path(__file__).resolve().parents[1]


def case_volume(case: Path, sequences: list[str]) -> nib.Nifti1Image:
    """A case's FLAIR, or its sequences stacked on a 4th axis in the order given (the bundle's ``channels``)."""
    imgs = [nib.load(str(next(case.glob(f"*_{seq}_bet.nii.gz")))) for seq in sequences]
    if len(imgs) == 1:
        return imgs[0]
    data = np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in imgs], axis=-1)
    return nib.Nifti1Image(data, imgs[0].affine)


def slabs(flair: Path | nib.Nifti1Image, seg: Path, out_dir: Path, gap: int = 2, min_slices: int = 8) -> list[Path]:
    """Write the tumour-free axial slabs of a case (>= gap slices from any label) as separate volumes.

    ``flair`` is a file or an image (3D, or 4D with the sequences on the last axis: the slabs keep them).
    """
    img = flair if isinstance(flair, nib.Nifti1Image) else nib.load(str(flair))
    data = np.asarray(img.dataobj, dtype=np.float32)
    lab = np.asarray(nib.load(str(seg)).dataobj) > 0
    zs = np.flatnonzero(lab.any(axis=(0, 1)))
    z0, z1 = int(zs.min()) - gap, int(zs.max()) + gap
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    stem = seg.parent.name
    for name, (a, b) in {"below": (0, z0), "above": (z1 + 1, data.shape[2])}.items():
        if b - a < min_slices:
            continue
        aff = img.affine.copy()
        aff[:3, 3] = img.affine[:3, :3] @ np.array([0, 0, a]) + img.affine[:3, 3]
        path = out_dir / f"{stem}_{name}.nii.gz"
        nib.save(nib.Nifti1Image(data[:, :, a:b], aff), str(path))
        written.append(path)
    return written


def run_bundle(run_id: str, setup: Callable[[Any], None] | None = None, **overrides) -> None:
    """Run one bundle workflow (``run_id``: training / evaluating) in this process with ``overrides``; ``setup``, if
    given, gets the initialised workflow before it runs (a probe attaching a handler to its engine)."""
    from monai.bundle import ConfigWorkflow

    from monai_dnprd.config import workflow_configs

    wf = ConfigWorkflow(config_file=workflow_configs(REPO / "bundle", run_id), workflow_type=None, run_id=run_id,
                        meta_file=str(REPO / "bundle" / "configs" / "metadata.json"),
                        logging_file=str(REPO / "bundle" / "configs" / "logging.conf"), bundle_root=str(REPO / "bundle"),
                        **overrides)
    wf.initialize()
    if setup is not None:
        setup(wf)
    wf.run()
    wf.finalize()


def intensity_surprisal(xn: np.ndarray, normal_values: np.ndarray, bins: int = 64, sigma: float = 1.0) -> np.ndarray:
    """-log p(intensity) under the histogram of the normal training intensities (Laplace-smoothed), blurred.

    Both inputs are intensities normalised to [0, 1] the same way; the result is shifted to a minimum of 0 so
    that it can multiply another non-negative map.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    hist, _ = np.histogram(normal_values, edges)
    p = (hist + 1.0) / (hist.sum() + bins)
    s = -np.log(p[np.clip(np.digitize(xn, edges) - 1, 0, bins - 1)])
    s = gaussian_filter(s - s.min(), sigma)
    return s.astype(np.float32)


def slice_standardised(score: np.ndarray, fg: np.ndarray, axis: int = 2) -> np.ndarray:
    """One-sided robust z-score of a map per axial slice: (m - median) / (median - 25th percentile).

    Analysis only (see "Maps and distances" in docs/research_log.md): removes a slice-wide offset of the map, e.g. from anatomy
    levels that the normal training slabs never showed, keeping focal deviations.
    """
    out = np.zeros_like(score, dtype=np.float32)
    for z in range(score.shape[axis]):
        idx = (slice(None),) * axis + (z,)
        f = fg[idx]
        if f.sum() < 10:
            continue
        q25, med = np.quantile(score[idx][f], [0.25, 0.5])
        out[idx] = np.where(f, (score[idx] - med) / max(med - q25, 1e-6), 0.0)
    return out


def brain_mask(volume: Path | nib.Nifti1Image) -> np.ndarray:
    """The brain of a test volume as the bundle's preprocessing and evaluation find it (``ForegroundMask``, the
    MRI rule: Otsu on the first channel, holes filled): where every map is scored, the same for every model."""
    img = volume if isinstance(volume, nib.Nifti1Image) else nib.load(str(volume))
    x = np.asarray(img.dataobj, dtype=np.float32)
    return np.asarray(ForegroundMask()((x[..., 0] if x.ndim == 4 else x)[None]))[0] > 0


def brain_zscore(x: np.ndarray, fg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The intensities clipped to the brain's 0.5-99.5th percentiles, scaled to [0, 1]; the same z-scored there."""
    lo, hi = np.percentile(x[fg], [0.5, 99.5])
    xn = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    return xn, (xn - xn[fg].mean()) / max(xn[fg].std(), 1e-6)


def bias_corrected(x: np.ndarray, fg: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``x`` after the bundle's N4 bias field correction inside ``fg`` (``BiasFieldCorrection`` defaults)."""
    from monai.data import MetaTensor

    img = MetaTensor(torch.from_numpy(x[None]), affine=torch.as_tensor(affine, dtype=torch.float64))
    return np.asarray(BiasFieldCorrection()(img, torch.from_numpy(fg[None].astype(np.uint8))))[0]


def median3_maps(x: np.ndarray, fg: np.ndarray, affine: np.ndarray, slabs: list[tuple[np.ndarray, np.ndarray]],
                 suffix: str = "") -> dict[str, np.ndarray]:
    """``flair_zscore_median3`` and its ``_symmetric`` form (threshold: the same map's 99th percentile on the
    training ``slabs``, (intensities, brain) pairs) for the intensities ``x``; names end with ``suffix``."""
    z3 = median_filter(brain_zscore(x, fg)[1], size=3)
    slab_z3 = np.concatenate([median_filter(brain_zscore(t, m)[1], size=3)[m] for t, m in slabs])
    symmetric = MirrorSuppression()(torch.from_numpy(z3).clamp_min(0.0), torch.from_numpy(x), affine,
                                    float(np.quantile(slab_z3, 0.99))).numpy()
    return {f"flair_zscore_median3{suffix}": np.where(fg, z3, 0),
            f"flair_zscore_median3_symmetric{suffix}": np.where(fg, symmetric, 0)}


def baselines(test_flair: Path, test_seg: Path, fg: np.ndarray, train_slabs: list[Path], seed: int = 0,
              model_map: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Score maps of the baselines on the test volume (original grid), and the optional combined score.

    ``flair_zscore_median3_symmetric`` is ``flair_zscore_median3`` after the left-right symmetry step of the
    default map (``monai_dnprd.symmetry``), its threshold the 99th percentile of the same baseline on the training
    slabs: what the symmetry prior alone does for an intensity map. The ``_n4`` forms read the test volume and the
    slabs after the bundle's bias field correction, as the model does.
    ``dnp_x_intensity_surprisal`` (see "Maps and distances" in docs/research_log.md) multiplies the model's map by the intensity
    surprisal under the normal training intensities: both must be high for a high score.
    """
    img = nib.load(str(test_flair))
    x = np.asarray(img.dataobj, dtype=np.float32)
    xn, z = brain_zscore(x, fg)
    train_vals, slabs = [], []
    for p in train_slabs:
        slab = nib.load(str(p))
        t = np.asarray(slab.dataobj, dtype=np.float32)
        m = t > np.percentile(t[t > 0], 5) if (t > 0).any() else t > 0
        tlo, thi = np.percentile(t[m], [0.5, 99.5])
        train_vals.append(np.clip((t[m] - tlo) / max(thi - tlo, 1e-6), 0, 1))
        slabs.append((t, t > 0, slab.affine))
    tv = np.concatenate(train_vals)
    zt = np.abs(xn - tv.mean()) / max(tv.std(), 1e-6)
    rng = np.random.default_rng(seed)
    maps = {
        "flair_zscore": np.where(fg, z, 0),
        **median3_maps(x, fg, img.affine, [(t, m) for t, m, _ in slabs]),
        **median3_maps(bias_corrected(x, fg, img.affine), fg, img.affine,
                       [(bias_corrected(t, m, a), m) for t, m, a in slabs], suffix="_n4"),
        "normal_intensity_z": np.where(fg, zt, 0),
        "random": np.where(fg, rng.random(x.shape, dtype=np.float32), 0),
    }
    if model_map is not None:
        maps["dnp_x_intensity_surprisal"] = np.where(fg, model_map * intensity_surprisal(xn, tv), 0)
        maps["dnp_slice_standardised"] = slice_standardised(model_map, fg)
    return maps


def case_metrics(score: np.ndarray, label: np.ndarray, fg: np.ndarray) -> dict[str, float]:
    """The protocol's metrics of one map on one test volume, inside the foreground ``fg``."""
    from monai_dnprd.metrics import VolumeMetricAccumulator

    acc = VolumeMetricAccumulator(axis=2)
    acc.add("case", score, label=label, mask=fg)
    r = acc.compute()
    return {"voxel_auroc": r["voxel"]["auroc"], "voxel_ap": r["voxel"]["ap"], "voxel_best_dice": r["voxel"]["best_dice"],
            "slice_auroc": r["slice"]["auroc"], "slice_ap": r["slice"]["ap"], "aupro": r["voxel"]["aupro"]}


def score_case(work: Path, image: Path | nib.Nifti1Image, seg: Path, ckpt: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score one whole case with a trained model: the case under ``work/test``, its label under ``work/labels``,
    the bundle's evaluation into ``work/eval``. Returns the map, the label and the brain (``brain_mask``)."""
    (work / "test").mkdir(parents=True)
    (work / "labels").mkdir()
    if isinstance(image, nib.Nifti1Image):
        nib.save(image, str(work / "test" / "case.nii.gz"))
    else:
        shutil.copy(image, work / "test" / "case.nii.gz")
    shutil.copy(seg, work / "labels" / "case.nii.gz")
    run_bundle("evaluating", input_dir=str(work / "test"), label_dir=str(work / "labels"),
               output_dir=str(work / "eval"), ckpt_path=str(ckpt), report="false")
    model_map = np.asarray(nib.load(str(work / "eval" / "case.nii.gz")).dataobj, dtype=np.float32)
    label = np.asarray(nib.load(str(work / "labels" / "case.nii.gz")).dataobj) > 0
    return model_map, label, brain_mask(work / "test" / "case.nii.gz")


def own_case(work: Path, train_case: Path, gap: int = 2, sequences: tuple[str, ...] = ("fla",)) -> dict:
    """Score a direction's trained model on the whole volume of its own training case (a diagnostic).

    The tumour there lies at levels the model never trained on, so this separates "the test brain differs from
    the training brain" from "the model's map is uneven over normal anatomy". Besides the metrics it reports
    the mean map on tumour-free brain at the levels the training slabs cover and at the other levels, and the
    share of the map's top 2 % that lies in the tumour and at the training levels.
    """
    own = work / "own_case"
    shutil.rmtree(own, ignore_errors=True)
    model_map, label, fg = score_case(own, case_volume(train_case, list(sequences)),
                                      train_case / "fusion_simple_seg.nii.gz", work / "train" / "models" / "model.pt")
    shutil.copy(next(train_case.glob("*_fla_bet.nii.gz")), own / "flair.nii.gz")
    zs = np.flatnonzero(label.any(axis=(0, 1)))
    levels = np.arange(label.shape[2])
    seen = ((levels < zs.min() - gap) | (levels > zs.max() + gap))[None, None, :]
    top = fg & (model_map >= np.quantile(model_map[fg], 0.98))
    normal = fg & ~label
    res = {"mean_map_normal_seen_levels": float(model_map[normal & seen].mean()),
           "mean_map_normal_unseen_levels": float(model_map[normal & ~seen].mean()),
           "top2_share_in_tumour": float((top & label).sum() / top.sum()),
           "top2_share_at_training_levels": float((top & seen).sum() / top.sum())}
    maps = {"dnp_conformer": model_map, **baselines(own / "flair.nii.gz", own / "labels" / "case.nii.gz", fg,
                                                    flair_slabs(work))}
    for name in ("dnp_conformer", "flair_zscore_median3"):
        res[name] = case_metrics(maps[name], label, fg)
    return res


def flair_slabs(work: Path) -> list[Path]:
    """The FLAIR slabs of a direction for the baselines (``normal_flair`` when the training slabs are 4D)."""
    folder = work / "normal_flair" if (work / "normal_flair").is_dir() else work / "normal"
    return sorted(folder.glob("*.nii.gz"))


def flair_test_volume(work: Path) -> Path:
    """The FLAIR test volume of a direction for the baselines (``test_flair.nii.gz`` when the test input is 4D)."""
    return work / "test_flair.nii.gz" if (work / "test_flair.nii.gz").is_file() else work / "test" / "case.nii.gz"


def pooled(data: Path, out: Path, iterations: int, warmup: int, extra: dict) -> dict:
    """Train one model on the tumour-free slabs of both cases and score it on each case's whole volume.

    A diagnostic, not the protocol: the model has seen the normal levels of both test brains. If twice the
    normal data (two brains instead of one) makes the tumours easy to find, too little normal data is the limit.
    """
    cases = sorted(p for p in data.iterdir() if p.is_dir())
    shutil.rmtree(out, ignore_errors=True)
    for case in cases:
        slabs(next(case.glob("*_fla_bet.nii.gz")), case / "fusion_simple_seg.nii.gz", out / "normal")
    t0 = time.time()
    run_bundle("training", dataset_dir=str(out / "normal"), val_dir=str(out / "normal"),
               output_dir=str(out / "train"), num_iterations=iterations, warmup_iterations=warmup, **extra)
    results: dict = {"train_seconds": time.time() - t0}
    for case in cases:
        work = out / case.name
        model_map, label, fg = score_case(work, next(case.glob("*_fla_bet.nii.gz")), case / "fusion_simple_seg.nii.gz",
                                          out / "train" / "models" / "model.pt")
        maps = {"dnp_conformer": model_map,
                **baselines(work / "test" / "case.nii.gz", work / "labels" / "case.nii.gz", fg,
                            sorted((out / "normal").glob("*.nii.gz")))}
        results[case.name] = {name: case_metrics(m, label, fg) for name, m in maps.items()
                              if name in ("dnp_conformer", "flair_zscore_median3", "random")}
        d, b = results[case.name]["dnp_conformer"], results[case.name]["flair_zscore_median3"]
        print(f"pooled model on {case.name}: voxel AUROC {d['voxel_auroc']:.3f} AP {d['voxel_ap']:.3f} best Dice "
              f"{d['voxel_best_dice']:.3f} (FLAIR median3 AP {b['voxel_ap']:.3f} Dice {b['voxel_best_dice']:.3f})", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tcga_lgg"))
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_tcga"))
    ap.add_argument("--iterations", type=int, default=700)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--extra", default="{}", help="JSON of extra training overrides")
    ap.add_argument("--only", type=int, choices=[0, 1], help="run one direction only (0: first case -> second)")
    ap.add_argument("--rescore", action="store_true",
                    help="reuse the trained models and maps under --out: recompute the metrics and baselines only")
    ap.add_argument("--sequences", nargs="+", default=["fla"],
                    help="sequences given to the model, stacked as the channels of 4D inputs (e.g. fla t2); "
                         "the baselines always use the FLAIR")
    ap.add_argument("--reevaluate", action="store_true",
                    help="reuse the trained models under --out: run the evaluation again (new maps), then the metrics; "
                         "--extra then holds evaluation overrides (e.g. '{\"grid_phases\": 2}')")
    ap.add_argument("--recalibrate", action="store_true",
                    help="with --reevaluate: calibrate again on the training slabs (as training does), for map "
                         "settings other than those the model was trained with")
    ap.add_argument("--own_case", action="store_true",
                    help="score each trained model under --out on its own training case (no training, a diagnostic)")
    ap.add_argument("--exclusion", action="store_true",
                    help="variant: train (and validate) on the whole training case, its tumour label given as an "
                         "exclusion mask (--exclude_dir) instead of cutting out the tumour's slabs")
    ap.add_argument("--pooled", action="store_true",
                    help="train one model on the slabs of both cases and test it on each whole case (a diagnostic)")
    args = ap.parse_args()
    if args.pooled:
        pooled(Path(args.data), Path(args.out), args.iterations, args.warmup, json.loads(args.extra))
        return

    data, out = Path(args.data), Path(args.out)
    cases = sorted(p for p in data.iterdir() if p.is_dir())
    results = {}
    directions = [(cases[0], cases[1]), (cases[1], cases[0])]
    for i, (train_case, test_case) in enumerate(directions):
        tag = f"{train_case.name}->{test_case.name}"
        work = out / tag.replace(">", "")
        if args.only is not None and i != args.only:
            if (work / "result.json").is_file():
                results[tag] = json.loads((work / "result.json").read_text())
            continue
        if args.own_case:
            if not (work / "train" / "models" / "model.pt").is_file():
                print(f"{tag}: no trained model under {work}, skipped", flush=True)
                continue
            res = own_case(work, train_case, sequences=tuple(args.sequences))
            (work / "own_case.json").write_text(json.dumps(res, indent=1))
            d, b = res["dnp_conformer"], res["flair_zscore_median3"]
            print(f"{train_case.name} model on its own case: voxel AUROC {d['voxel_auroc']:.3f} AP {d['voxel_ap']:.3f} "
                  f"best Dice {d['voxel_best_dice']:.3f} (FLAIR median3 AP {b['voxel_ap']:.3f} Dice {b['voxel_best_dice']:.3f}); "
                  f"mean map on normal brain at training levels {res['mean_map_normal_seen_levels']:.3f}, elsewhere "
                  f"{res['mean_map_normal_unseen_levels']:.3f}; top 2 %: {res['top2_share_in_tumour']:.0%} in the tumour, "
                  f"{res['top2_share_at_training_levels']:.0%} at training levels", flush=True)
            continue
        test_dir, label_dir = work / "test", work / "labels"
        if args.rescore or args.reevaluate:
            if args.reevaluate:
                shutil.rmtree(work / "eval", ignore_errors=True)
                overrides = json.loads(args.extra)
                if args.recalibrate:
                    if (work / "exclude").is_dir():
                        raise SystemExit(f"{work}: --recalibrate needs tumour-free training slabs; this run's "
                                         "training folder holds the whole case (--exclusion)")
                    overrides["calibration_dir"] = str(work / "normal")
                run_bundle("evaluating", input_dir=str(test_dir), label_dir=str(label_dir),
                           output_dir=str(work / "eval"), ckpt_path=str(work / "train" / "models" / "model.pt"),
                           report="false", **overrides)
            if not (work / "eval" / "case.nii.gz").is_file():
                print(f"{tag}: no map under {work} to rescore, skipped", flush=True)
                continue
            train_slabs = flair_slabs(work)
            old = work / "result.json"
            train_s = json.loads(old.read_text())["train_seconds"] if old.is_file() else float("nan")
        else:
            shutil.rmtree(work, ignore_errors=True)
            seg = train_case / "fusion_simple_seg.nii.gz"
            flair = next(train_case.glob("*_fla_bet.nii.gz"))
            test_dir.mkdir(parents=True)
            label_dir.mkdir()
            tflair = next(test_case.glob("*_fla_bet.nii.gz"))
            extra = json.loads(args.extra)
            if args.exclusion:
                if args.sequences != ["fla"]:
                    raise SystemExit("--exclusion is implemented for FLAIR only")
                (work / "normal").mkdir(parents=True)
                (work / "exclude").mkdir()
                shutil.copy(flair, work / "normal" / "case.nii.gz")
                shutil.copy(seg, work / "exclude" / "case.nii.gz")
                extra["exclude_dir"] = str(work / "exclude")
                train_slabs = slabs(flair, seg, work / "normal_flair")  # the normal-intensity baseline's data
                shutil.copy(tflair, test_dir / "case.nii.gz")
            elif args.sequences == ["fla"]:
                train_slabs = slabs(flair, seg, work / "normal")
                shutil.copy(tflair, test_dir / "case.nii.gz")
            else:  # 4D inputs with the sequences as channels; FLAIR-only copies for the baselines
                slabs(case_volume(train_case, args.sequences), seg, work / "normal")
                train_slabs = slabs(flair, seg, work / "normal_flair")
                nib.save(case_volume(test_case, args.sequences), str(test_dir / "case.nii.gz"))
                shutil.copy(tflair, work / "test_flair.nii.gz")
                extra["channels"] = list(range(len(args.sequences)))
            shutil.copy(test_case / "fusion_simple_seg.nii.gz", label_dir / "case.nii.gz")
            t0 = time.time()
            run_bundle("training", dataset_dir=str(work / "normal"), val_dir=str(work / "normal"),
                       output_dir=str(work / "train"), num_iterations=args.iterations, warmup_iterations=args.warmup,
                       **extra)
            train_s = time.time() - t0
            run_bundle("evaluating", input_dir=str(test_dir), label_dir=str(label_dir),
                       output_dir=str(work / "eval"), ckpt_path=str(work / "train" / "models" / "model.pt"),
                       report="false")
        model_map = np.asarray(nib.load(str(work / "eval" / "case.nii.gz")).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(str(label_dir / "case.nii.gz")).dataobj) > 0
        fg = brain_mask(test_dir / "case.nii.gz")
        maps = {"dnp_conformer": model_map,
                **baselines(flair_test_volume(work), label_dir / "case.nii.gz", fg, train_slabs, model_map=model_map)}
        results[tag] = {"train_seconds": train_s, "foreground_voxels": int(fg.sum()), "lesion_voxels": int((label & fg).sum())}
        for name, m in maps.items():
            results[tag][name] = case_metrics(m, label, fg)
        (work / "result.json").write_text(json.dumps(results[tag], indent=1))
        print(tag, json.dumps(results[tag], indent=1))
    if args.own_case:
        return
    (out / "results.json").write_text(json.dumps(results, indent=1))
    rows = ["| direction | method | voxel AUROC | voxel AP | best Dice | AUPRO | slice AUROC | slice AP |", "|---|---|---|---|---|---|---|---|"]
    for tag, res in results.items():
        for name, r in res.items():
            if isinstance(r, dict):
                rows.append(f"| {tag} | {name} | {r['voxel_auroc']:.3f} | {r['voxel_ap']:.3f} | {r['voxel_best_dice']:.3f} | "
                            f"{r['aupro']:.3f} | {r['slice_auroc']:.3f} | {r['slice_ap']:.3f} |")
    print("\n".join(rows))
    (out / "results.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
