"""Probe: does a cross-scanner intensity difference cause the TCGA false positives? (inference only)

Maps the test volume's brain intensities piecewise-linearly onto the training volumes' brain percentiles
(landmarks 1-90 %, the top left out so that a tumour cannot set them; a Nyul-Udupa-style standardisation) and
scores the trained model on it next to the original volume. Works on a folder written by
``bench/tcga_protocol.py`` for one direction (``normal/``, ``test/``, ``labels/``, ``train/models/model.pt``).

    python bench/experiments/histogram_standardisation.py OUT/TCGA-DU-7294-TCGA-FG-6692 [more run folders]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

LANDMARKS = (1, 5, 10, 25, 50, 75, 90)
REPO = Path(__file__).resolve().parents[2]


def standardise(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``image``'s foreground (> 0) mapped so that its ``LANDMARKS`` percentiles land on ``reference`` (same
    percentiles of the training foreground); linear beyond the end landmarks; background stays 0."""
    fg = image > 0
    src = np.percentile(image[fg], LANDMARKS)
    out = np.interp(image, src, reference)
    low = (reference[1] - reference[0]) / (src[1] - src[0])
    high = (reference[-1] - reference[-2]) / (src[-1] - src[-2])
    out = np.where(image < src[0], reference[0] + (image - src[0]) * low, out)
    out = np.where(image > src[-1], reference[-1] + (image - src[-1]) * high, out)
    return np.where(fg, np.maximum(out, 1e-3), 0.0).astype(np.float32)


def voxel_ap(run: Path, image: np.ndarray, affine: np.ndarray) -> float:
    """Voxel AP inside the brain of the run's model on ``image`` (the bundle's inference preprocessing)."""
    import tempfile

    from monai.bundle import ConfigParser

    from monai_dnprd.checkpoint import load_model
    from monai_dnprd.config import workflow_configs
    from monai_dnprd.inferer import DNPVolumeInferer
    from monai_dnprd.metrics import average_precision

    ckpt = str(run / "train" / "models" / "model.pt")
    mapper, meta = load_model(ckpt)
    prm = meta["preprocessing"]
    parser = ConfigParser()
    parser.read_config(workflow_configs(REPO / "bundle", "inference"))
    parser.update({"ckpt_path": ckpt})
    pre, inverse = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inverse")
    inferer = DNPVolumeInferer(prm["img_size"], prm["k"], z_sigma=prm["z_sigma"])
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/case.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), path)
        d = pre({"image": path})
        out = inverse({**d, "pred": inferer(d["image"], mapper, mask=d["mask"])})
    label = np.asarray(nib.load(str(run / "labels" / "case.nii.gz")).dataobj) > 0
    brain = image > 0
    return average_precision(np.asarray(out["pred"][0])[brain], label[brain])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="direction folders written by bench/tcga_protocol.py")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for run in args.runs:
        train = np.concatenate([(lambda a: a[a > 0])(np.asarray(nib.load(str(f)).dataobj, dtype=np.float32))
                                for f in sorted((run / "normal").glob("*.nii.gz"))])
        reference = np.percentile(train, LANDMARKS)
        test = nib.load(str(run / "test" / "case.nii.gz"))
        image = np.asarray(test.dataobj, dtype=np.float32)
        src = np.percentile(image[image > 0], LANDMARKS)
        print(f"{run}: landmarks / median, training {np.round(reference / reference[4], 2)}, "
              f"test {np.round(src / src[4], 2)}")
        print(f"  voxel AP original {voxel_ap(run, image, test.affine):.3f}, "
              f"standardised {voxel_ap(run, standardise(image, reference), test.affine):.3f}", flush=True)


if __name__ == "__main__":
    main()
