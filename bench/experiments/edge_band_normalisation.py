"""Probe: is the false-positive rise at the brain's edge band-wide? (post-processing of saved maps only)

Subtracts from a written anomaly map, in each band of distance to the brain's boundary (0-2, 2-4, 4-6, 6-10,
10-15, 15-25 and > 25 mm; brain = voxels > 0 of the skull-stripped image), the band's median in the same volume,
and scores voxel AP / AUROC inside the brain before and after. A subject difference that raises the whole edge
band would vanish; a local hot spot would not.

    python bench/experiments/edge_band_normalisation.py --maps RUN/eval --images TEST/images --labels TEST/labels
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from monai_dnprd.metrics import average_precision, roc_auc

BANDS_MM = (0.0, 2.0, 4.0, 6.0, 10.0, 15.0, 25.0, np.inf)


def band_normalise(amap: np.ndarray, brain: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """``amap`` minus the median of its distance-to-edge band inside ``brain``, clamped at 0 (0 outside)."""
    depth = ndi.distance_transform_edt(np.pad(brain, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    out = np.zeros_like(amap)
    for lo, hi in zip(BANDS_MM[:-1], BANDS_MM[1:]):
        band = brain & (depth > lo) & (depth <= hi)
        if band.any():
            out[band] = np.maximum(amap[band] - np.median(amap[band]), 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", type=Path, required=True, help="folder of maps named like the images")
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--labels", type=Path, required=True)
    args = ap.parse_args()
    before, after, truth = [], [], []
    for image_path in sorted(args.images.glob("*.nii.gz")):
        image = nib.load(str(image_path))
        brain = np.asarray(image.dataobj) > 0
        amap = np.asarray(nib.load(str(args.maps / image_path.name)).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(str(args.labels / image_path.name)).dataobj) > 0
        before.append(amap[brain])
        after.append(band_normalise(amap, brain, image.header.get_zooms()[:3])[brain])
        truth.append(label[brain])
    s0, s1, y = np.concatenate(before), np.concatenate(after), np.concatenate(truth)
    print(f"{args.maps}: voxel AP {average_precision(s0, y):.4f} -> {average_precision(s1, y):.4f}, "
          f"AUROC {roc_auc(s0, y):.3f} -> {roc_auc(s1, y):.3f}")


if __name__ == "__main__":
    main()
