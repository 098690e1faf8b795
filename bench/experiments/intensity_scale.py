"""Probe: how much a bright lesion moves the intensity scale of a volume's normal tissue (TCGA-LGG FLAIR cases).

For each case: the share of the voxels above the foreground's 99.5th percentile that lie in the tumour, the
scale of normal tissue under a clip at that percentile and under the shipped rule (0.5th percentile -> 0,
median -> 0.5) relative to the same rule computed without the tumour, and the share of tumour voxels a
99.5th-percentile clip would saturate.

    python bench/experiments/intensity_scale.py [--data ../shared/data/tcga_lgg]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "tcga_lgg"))
    args = ap.parse_args()
    for case in sorted(p for p in Path(args.data).iterdir() if p.is_dir()):
        flair = np.asarray(nib.load(str(next(case.glob("*_fla_bet.nii.gz")))).dataobj, dtype=np.float32)
        tumour = np.asarray(nib.load(str(case / "fusion_simple_seg.nii.gz")).dataobj) > 0
        fg = flair > 0
        lo_all, med_all, hi_all = np.percentile(flair[fg], [0.5, 50, 99.5])
        lo_n, med_n, hi_n = np.percentile(flair[fg & ~tumour], [0.5, 50, 99.5])
        above = flair > hi_all
        print(f"{case.name}: tumour {tumour.sum() / fg.sum():.1%} of the brain; {(above & tumour).sum() / above.sum():.0%} "
              f"of the voxels above the 99.5th percentile are tumour; normal-tissue scale vs tumour-free: "
              f"99.5th-percentile clip {(hi_n - lo_n) / (hi_all - lo_all):.3f}, median rule {(med_n - lo_n) / (med_all - lo_all):.3f}; "
              f"tumour voxels clipped by the percentile rule {(flair[tumour] >= hi_all).mean():.0%}")


if __name__ == "__main__":
    main()
