"""Probe: does a cross-scanner intensity difference cause the TCGA false positives? (inference only)

Maps the test volume's brain intensities piecewise-linearly onto the training volumes' brain percentiles
(landmarks 1-90 %, the top left out so that a tumour cannot set them; a Nyul-Udupa-style standardisation) and
scores the trained model on it next to the original volume. Works on a folder written by
``bench/tcga_protocol.py`` for one direction (``normal/``, ``test/``, ``labels/``, ``train/models/model.pt``).

    python bench/experiments/histogram_standardisation.py OUT/TCGA-DU-7294-TCGA-FG-6692 [more run folders]

``--landmarks 1 5 10 25 50 --proportional_top`` keeps only the lower landmarks and scales everything above the
last one by one factor, as the default normalisation does.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from map_variants import inference_pipeline

from monai_dnprd.metrics import average_precision

LANDMARKS = (1, 5, 10, 25, 50, 75, 90)


def landmarks(image: np.ndarray, percents: tuple[float, ...] = LANDMARKS) -> np.ndarray:
    """The ``percents`` percentiles of the foreground (> 0) of one or more volumes."""
    return np.percentile(image[image > 0], percents)


def standardise(image: np.ndarray, source: np.ndarray, reference: np.ndarray,
                proportional_top: bool = False) -> np.ndarray:
    """``image``'s foreground moved so that its landmarks ``source`` land on ``reference``: piecewise linear,
    extended linearly beyond the end landmarks (above the last one by the factor reference / source when
    ``proportional_top``); background stays 0."""
    out = np.interp(image, source, reference)
    low = (reference[1] - reference[0]) / (source[1] - source[0])
    high = (reference[-1] / source[-1] if proportional_top
            else (reference[-1] - reference[-2]) / (source[-1] - source[-2]))
    out = np.where(image < source[0], reference[0] + (image - source[0]) * low, out)
    out = np.where(image > source[-1], reference[-1] + (image - source[-1]) * high, out)
    return np.where(image > 0, np.maximum(out, 1e-3), 0.0).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="direction folders written by bench/tcga_protocol.py")
    ap.add_argument("--landmarks", nargs="+", type=float, default=list(LANDMARKS),
                    help="brain percentiles to match (must include 50)")
    ap.add_argument("--proportional_top", action="store_true",
                    help="above the last landmark, scale by one factor instead of the last segment's slope")
    args = ap.parse_args()
    percents = tuple(args.landmarks)
    if 50 not in percents:
        ap.error("--landmarks must include 50 (the median the figures are shown against)")
    mid = percents.index(50)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for run in args.runs:
        mapper, _, pre, inverse, inferer = inference_pipeline(str(run / "train" / "models" / "model.pt"))
        label = np.asarray(nib.load(str(run / "labels" / "case.nii.gz")).dataobj) > 0

        def voxel_ap(image: np.ndarray, affine: np.ndarray) -> float:
            """Voxel AP inside the brain (> 0) of the model's map of ``image``, mapped as ``run inference`` does."""
            with tempfile.TemporaryDirectory() as tmp:
                nib.save(nib.Nifti1Image(image, affine), f"{tmp}/case.nii.gz")
                d = pre({"image": f"{tmp}/case.nii.gz"})
                out = inverse({**d, "pred": inferer(d["image"], mapper, mask=d["mask"])})
            brain = image > 0
            return average_precision(np.asarray(out["pred"][0])[brain], label[brain])

        reference = landmarks(np.concatenate([np.asarray(nib.load(str(f)).dataobj, dtype=np.float32).ravel()
                                              for f in sorted((run / "normal").glob("*.nii.gz"))]), percents)
        test = nib.load(str(run / "test" / "case.nii.gz"))
        image = np.asarray(test.dataobj, dtype=np.float32)
        source = landmarks(image, percents)
        print(f"{run}: landmarks / median, training {np.round(reference / reference[mid], 2)}, "
              f"test {np.round(source / source[mid], 2)}")
        moved = standardise(image, source, reference, args.proportional_top)
        print(f"  voxel AP original {voxel_ap(image, test.affine):.3f}, "
              f"standardised {voxel_ap(moved, test.affine):.3f}", flush=True)


if __name__ == "__main__":
    main()
