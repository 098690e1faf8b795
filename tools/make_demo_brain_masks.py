"""Make the brain masks shipped with the demo heads (``monai_dnprd/demo_data/*_brainmask.nii.gz``).

The demo T1 volumes come with skull, scalp, face and neck. Brain anomaly detection works on the brain
(skull-stripped volumes, as in BraTS, the IXI-based benchmarks and the TCGA data), so the demo strips them with
these masks. Classical morphological skull stripping for T1, enough at 2 mm:

1. head = Otsu threshold of the volume; tissue = voxels brighter than ``factor`` x the Otsu threshold inside
   the head (keeps grey and white matter, drops CSF, skull and most dark tissue);
2. erode by 6 mm to cut the thin bridges between brain and scalp, keep the largest component (the brain);
3. dilate back by 8 mm within the tissue, close, fill holes (the ventricles join the mask).

``factor`` is set per subject (contrast differs) and every mask was checked on orthogonal views; the MNI
template of the demo is already brain-only and needs none. Run once by a developer (not at run time):
    python tools/make_demo_brain_masks.py
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from monai_dnprd.transforms.array import ForegroundMask

DEMO = Path(__file__).resolve().parents[1] / "monai_dnprd" / "demo_data"
FACTORS = {"IXI012-HH-1211_T1": 0.55, "IXI015-HH-1258_T1": 0.55, "chris_t1_2mm": 0.42}


def brain_mask(volume: np.ndarray, spacing_mm: float, factor: float, erode_mm: float = 6.0) -> np.ndarray:
    """Boolean brain mask of a skull-on T1 volume (see the module docstring for the steps)."""
    x = volume.astype(np.float32)
    head = x > ForegroundMask.otsu_threshold(x.ravel())
    tissue = x > factor * ForegroundMask.otsu_threshold(x[head])
    st = ndi.generate_binary_structure(3, 1)
    n = max(1, int(round(erode_mm / spacing_mm)))
    core = ndi.binary_erosion(tissue, st, iterations=n)
    lab, k = ndi.label(core)
    if k == 0:
        raise ValueError("erosion removed everything: lower the factor or the erosion")
    core = lab == 1 + int(np.argmax(ndi.sum(core, lab, range(1, k + 1))))
    m = ndi.binary_dilation(core, st, iterations=n + 1) & tissue
    m = ndi.binary_closing(m, st, iterations=2)
    return ndi.binary_fill_holes(m)


def main() -> None:
    for stem, factor in FACTORS.items():
        img = nib.load(str(DEMO / f"{stem}.nii.gz"))
        spacing = float(np.mean(img.header.get_zooms()[:3]))
        m = brain_mask(np.asarray(img.dataobj), spacing, factor)
        out = nib.Nifti1Image(m.astype(np.uint8), img.affine)
        out.set_data_dtype(np.uint8)
        nib.save(out, str(DEMO / f"{stem}_brainmask.nii.gz"))
        print(f"{stem}_brainmask.nii.gz: {m.sum() * spacing ** 3 / 1000:.0f} ml")


if __name__ == "__main__":
    main()
