"""The embedded default data: a small normal cohort and test volumes with synthetic lesions, made on first use.

Sources (shipped in ``monai_dnprd/demo_data``, see its README for licences): three healthy adult T1 heads
(IXI012, IXI015, "chris") with their brain masks, and the MNI ICBM152 2009a template (brain only), all at 2 mm.
The heads are skull-stripped with their masks first (brain anomaly detection works on the brain; the masks are
made by ``tools/make_demo_brain_masks.py``). From them, deterministically:

- ``normal_train/``: 12 normal volumes, 6 realistic random variants each of IXI012 and chris (rotation,
  scaling, translation, bias field, contrast, noise), on their own grids;
- ``normal_val/``: 2 variants of the MNI template (a subject never trained on), for validation with
  synthetic lesions;
- ``normal_cal/``: the calibration set (thresholds at a false-positive rate): those 2 MNI variants and 2 held-out
  variants each of IXI012 and chris (augmentations never trained on). The template alone is a smooth population
  average that scores unlike real scans: calibrated on it, the threshold flagged a normal test scan;
- ``test/images`` + ``test/labels``: the held-out subject IXI015, 4 volumes with synthetic lesions (each kind)
  and 2 normal variants, with lesion masks (all zero for the normal ones).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandBiasField, RandGaussianNoise

from monai_dnprd.io.writers import write_nifti
from monai_dnprd.transforms.array import ForegroundMask, SyntheticLesion

__all__ = ["demo_root", "prepare_demo_data", "demo_dirs", "write_lesion_test_set", "SOURCE_DIR"]

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "demo_data"
DEMO_VERSION = 5
_TRAIN_SUBJECTS = ("IXI012-HH-1211_T1.nii.gz", "chris_t1_2mm.nii.gz")
_VAL_SUBJECT = "mni152_2009a_t1_2mm.nii.gz"
_TEST_SUBJECT = "IXI015-HH-1258_T1.nii.gz"
_VARIANTS_PER_TRAIN_SUBJECT = 6
_VAL_VARIANTS = 2
_CAL_VARIANTS_PER_TRAIN_SUBJECT = 2
_CAL_FIRST_SEED = 200  # apart from the training, validation and test seeds
_TEST_LESION_KINDS = ("hyper", "hypo", "texture", "deform")
_TEST_NORMALS = 2
LESION_MIN_DEPTH_MM = 8.0  # lesion centres at least this deep inside the brain
LESION_RADIUS_MM = (6.0, 18.0)
LESION_COUNT = (1, 2)


def demo_root() -> Path:
    """Where the demo data is made: ``$MONAI_DNPRD_DEMO_DIR`` or ``~/.cache/monai-dnprd/demo-v<N>``."""
    env = os.environ.get("MONAI_DNPRD_DEMO_DIR")
    return Path(env) if env else Path.home() / ".cache" / "monai-dnprd" / f"demo-v{DEMO_VERSION}"


def _load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A source volume and its affine, skull-stripped with its shipped brain mask when it has one."""
    img = nib.load(str(SOURCE_DIR / name))
    data = np.asarray(img.dataobj, dtype=np.float32)
    mask_path = SOURCE_DIR / name.replace(".nii.gz", "_brainmask.nii.gz")
    if mask_path.is_file():
        data = data * (np.asarray(nib.load(str(mask_path)).dataobj) > 0)
    return data, img.affine


def _augmenter(seed: int) -> Compose:
    """Realistic variation of a normal head: pose and size, coil bias field, contrast and noise."""
    aug = Compose(
        [
            RandAffine(prob=1.0, rotate_range=(0.12, 0.12, 0.12), scale_range=(0.07, 0.07, 0.07),
                       translate_range=(3, 3, 3), padding_mode="zeros", mode="bilinear"),
            RandBiasField(prob=1.0, coeff_range=(0.1, 0.25), degree=3),
            RandAdjustContrast(prob=1.0, gamma=(0.8, 1.25)),
            RandGaussianNoise(prob=1.0, mean=0.0, std=0.01),
        ]
    )
    aug.set_random_state(seed)
    return aug


def _variant(array: np.ndarray, affine: np.ndarray, seed: int) -> np.ndarray:
    """One augmented variant on the source grid, intensities rescaled to the source's range (uint8-like)."""
    hi = float(np.percentile(array, 99.9)) or 1.0
    x = MetaTensor(torch.from_numpy(array / hi)[None], affine=torch.as_tensor(affine))
    aug = _augmenter(seed)
    for t in aug.transforms[:-1]:  # pose, bias field and contrast keep the background at 0
        x = t(x)
    support = torch.as_tensor(x) > 0
    y = aug.transforms[-1](x)  # noise only inside the (skull-stripped) head or brain
    y = (torch.as_tensor(y) * support)[0].clamp_min(0).numpy() * hi
    return y.astype(np.float32)


def _insert_lesions(
    array: np.ndarray, affine: np.ndarray, kind: str, seed: int, radius_mm: tuple[float, float] = LESION_RADIUS_MM
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic lesion of ``kind`` inserted in raw intensities; returns (volume, lesion mask)."""
    img = MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(affine))
    mask = ForegroundMask()(img).as_tensor() > 0
    inside = array[mask[0].numpy()]
    lo, hi = np.percentile(inside, [0.5, 99.5])
    scale = max(float(hi - lo), 1e-6)
    norm = ((img.as_tensor() - lo) / scale).clamp(0, 1) * mask
    norm = MetaTensor(norm, affine=torch.as_tensor(affine))
    gen = SyntheticLesion(kinds=(kind,), num_lesions=LESION_COUNT, radius_mm=radius_mm, min_depth_mm=LESION_MIN_DEPTH_MM)
    gen.set_random_state(seed)
    new, lesion = gen(norm, mask.to(torch.uint8))
    change = (torch.as_tensor(new) - torch.as_tensor(norm))[0].numpy() * scale
    out = np.clip(array + change, 0, None).astype(np.float32)
    return out, (torch.as_tensor(lesion)[0].numpy() > 0).astype(np.uint8)


def write_lesion_test_set(
    subject: str,
    image_dir: Path,
    label_dir: Path,
    prefix: str,
    first_seed: int,
    lesion_seed: int = 1000,
    radius_mm: tuple[float, float] = LESION_RADIUS_MM,
) -> None:
    """Test volumes of one shipped subject: one variant per lesion kind (with its mask), then normal variants.

    Used for the demo's test set and, with other subjects, seeds and radii, by ``bench/demo_lesion_probe.py``.
    """
    arr, aff = _load(subject)
    seed = first_seed
    for i, kind in enumerate(_TEST_LESION_KINDS):
        vol, lesion = _insert_lesions(_variant(arr, aff, seed), aff, kind, seed=lesion_seed + i, radius_mm=radius_mm)
        seed += 1
        write_nifti(vol, aff, image_dir / f"{prefix}_{kind}.nii.gz")
        write_nifti(lesion, aff, label_dir / f"{prefix}_{kind}.nii.gz", dtype=np.uint8)
    for v in range(_TEST_NORMALS):
        vol = _variant(arr, aff, seed)
        seed += 1
        write_nifti(vol, aff, image_dir / f"{prefix}_normal{v}.nii.gz")
        write_nifti(np.zeros(vol.shape, np.uint8), aff, label_dir / f"{prefix}_normal{v}.nii.gz", dtype=np.uint8)


def _fingerprint() -> str:
    h = hashlib.sha256(str(DEMO_VERSION).encode())
    for f in sorted(SOURCE_DIR.glob("*.nii.gz")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def demo_dirs(root: str | Path | None = None) -> dict[str, Path]:
    """The demo folders under ``root`` (not created)."""
    root = Path(root) if root else demo_root()
    return {
        "root": root,
        "train": root / "normal_train",
        "val": root / "normal_val",
        "calibration": root / "normal_cal",
        "test_images": root / "test" / "images",
        "test_labels": root / "test" / "labels",
    }


def prepare_demo_data(root: str | Path | None = None, force: bool = False) -> dict[str, Path]:
    """Create the demo data under ``root`` unless it is already there (deterministic, about 20 s, ~30 MB)."""
    dirs = demo_dirs(root)
    stamp = dirs["root"] / "demo.json"
    fp = _fingerprint()
    if not force and stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("fingerprint") == fp:
                return dirs
        except (ValueError, OSError):
            pass
    logger.info("creating the demo data in %s (first use)", dirs["root"])
    for key in ("train", "val", "calibration", "test_images", "test_labels"):
        dirs[key].mkdir(parents=True, exist_ok=True)
    seed, cal_seed = 0, _CAL_FIRST_SEED
    for subject in _TRAIN_SUBJECTS:
        arr, aff = _load(subject)
        stem = subject.split(".")[0].split("_T1")[0].replace("_t1_2mm", "")
        for v in range(_VARIANTS_PER_TRAIN_SUBJECT):
            seed += 1
            write_nifti(_variant(arr, aff, seed), aff, dirs["train"] / f"{stem}_v{v}.nii.gz")
        for v in range(_CAL_VARIANTS_PER_TRAIN_SUBJECT):
            write_nifti(_variant(arr, aff, cal_seed), aff, dirs["calibration"] / f"{stem}_cal{v}.nii.gz")
            cal_seed += 1
    arr, aff = _load(_VAL_SUBJECT)
    for v in range(_VAL_VARIANTS):
        seed += 1
        vol = _variant(arr, aff, seed)
        for key in ("val", "calibration"):
            write_nifti(vol, aff, dirs[key] / f"mni152_v{v}.nii.gz")
    write_lesion_test_set(_TEST_SUBJECT, dirs["test_images"], dirs["test_labels"], prefix="IXI015", first_seed=seed + 1)
    stamp.write_text(json.dumps({"fingerprint": fp, "version": DEMO_VERSION}))
    return dirs
