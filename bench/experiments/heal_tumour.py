"""Probe: is a slice-wide rise of a map caused by the tumour's intensities or by the anatomy around it?

Writes the test case twice, as it is and with its tumour (label grown by ``--grow`` voxels) replaced by the
mirrored other hemisphere, runs the bundle's inference with a trained model on both, and prints the median map
on tumour-free tissue per axial level for each: if the rise stays after healing, the tumour's own intensities
are not its cause.

    python bench/experiments/heal_tumour.py --ckpt RUN/train/models/model.pt --case ../shared/data/tcga_lgg/TCGA-FG-6692
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--case", required=True)
    ap.add_argument("--grow", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from monai.bundle import ConfigWorkflow

    from monai_dnprd.config import workflow_configs

    case = Path(args.case)
    img = nib.load(str(next(case.glob("*_fla_bet.nii.gz"))))
    x = np.asarray(img.dataobj, dtype=np.float32)
    label = np.asarray(nib.load(str(case / "fusion_simple_seg.nii.gz")).dataobj) > 0
    grown = ndi.binary_dilation(label, iterations=args.grow)
    mirrored = x[::-1]  # left-right: the first axis of these BraTS-space volumes
    healed = np.where(grown & (mirrored > 0), mirrored, x)
    out = Path(args.out or tempfile.mkdtemp())
    (out / "in").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(x, img.affine), str(out / "in" / "original.nii.gz"))
    nib.save(nib.Nifti1Image(healed, img.affine), str(out / "in" / "healed.nii.gz"))
    wf = ConfigWorkflow(config_file=workflow_configs(REPO / "bundle", "inference"), workflow_type=None,
                        run_id="inference", bundle_root=str(REPO / "bundle"),
                        meta_file=str(REPO / "bundle" / "configs" / "metadata.json"),
                        logging_file=str(REPO / "bundle" / "configs" / "logging.conf"),
                        input_dir=str(out / "in"), output_dir=str(out / "maps"), ckpt_path=args.ckpt, report="false")
    wf.initialize()
    wf.run()
    wf.finalize()
    far = ~ndi.binary_dilation(label, iterations=args.grow + 2)
    for name in ("original", "healed"):
        m = np.asarray(nib.load(str(out / "maps" / f"{name}.nii.gz")).dataobj, dtype=np.float32)
        tissue = (m > 0) & far
        levels = range(0, m.shape[2], 5)
        print(name, " ".join(f"{z}:{np.median(m[:, :, z][tissue[:, :, z]]):.2f}" for z in levels if tissue[:, :, z].sum() > 500))


if __name__ == "__main__":
    main()
