"""The embedded demo data: shipped brain masks and the cohort made from them."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from monai_dnprd import demo

HEADS = ("IXI012-HH-1211_T1", "IXI015-HH-1258_T1", "chris_t1_2mm")


@pytest.mark.parametrize("stem", HEADS)
def test_brain_masks_are_brain_sized_and_on_the_volume_grid(stem):
    img = nib.load(str(demo.SOURCE_DIR / f"{stem}.nii.gz"))
    m = nib.load(str(demo.SOURCE_DIR / f"{stem}_brainmask.nii.gz"))
    assert m.shape == img.shape and np.allclose(m.affine, img.affine)
    mask = np.asarray(m.dataobj) > 0
    ml = mask.sum() * float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    assert 1000.0 < ml < 1800.0  # an adult brain with ventricles, not a head (2.5-4 l here)
    from scipy import ndimage as ndi

    from monai_dnprd.transforms.array import ForegroundMask

    arr = np.asarray(img.dataobj, dtype=np.float32)
    head = np.asarray(ForegroundMask()(arr[None]))[0] > 0  # Otsu, largest component, holes filled
    # skull stripped: the head's outer 4 mm (scalp) lies outside the brain mask
    scalp = head & ~ndi.binary_erosion(head, iterations=2, border_value=1)  # the field of view is no scalp
    assert (mask & scalp).sum() < 0.02 * scalp.sum()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return demo.prepare_demo_data(tmp_path_factory.mktemp("demo"))


def test_demo_cohort_is_skull_stripped_with_lesions_inside_the_brain(cohort):
    train = sorted(cohort["train"].glob("*.nii.gz"))
    assert len(train) == 12 and len(list(cohort["val"].glob("*.nii.gz"))) == 2
    assert len(list(cohort["calibration"].glob("*.nii.gz"))) == 6
    # a training variant keeps the brain's size: nothing of the scalp or neck came back
    v = nib.load(str(train[0]))
    ml = (np.asarray(v.dataobj) > 0).sum() * float(np.prod(v.header.get_zooms()[:3])) / 1000.0
    assert 900.0 < ml < 2000.0
    names = sorted(p.name for p in cohort["test_images"].glob("*.nii.gz"))
    assert names == sorted(p.name for p in cohort["test_labels"].glob("*.nii.gz"))
    for name in names:
        img = np.asarray(nib.load(str(cohort["test_images"] / name)).dataobj)
        lab = np.asarray(nib.load(str(cohort["test_labels"] / name)).dataobj) > 0
        if "normal" in name:
            assert not lab.any()
        else:
            assert lab.sum() > 50 and (img[lab] > 0).mean() > 0.99  # lesions lie in the brain


def test_demo_data_is_made_once(cohort):
    stamp = cohort["root"] / "demo.json"
    before = stamp.stat().st_mtime_ns
    again = demo.prepare_demo_data(cohort["root"])
    assert again == cohort and stamp.stat().st_mtime_ns == before
    assert json.loads(stamp.read_text())["version"] == demo.DEMO_VERSION


def test_demo_calibrates_on_held_out_scans_of_its_subjects_beside_the_template(cohort, monkeypatch):
    from monai_dnprd.config import training_lists

    def arrays(folder, pattern):
        return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob(pattern))}

    for stem in ("IXI012-HH-1211", "chris"):
        held_out = arrays(cohort["calibration"], f"{stem}_cal*.nii.gz")
        trained = arrays(cohort["train"], f"{stem}_v*.nii.gz")
        assert len(held_out) == 2 and len(trained) == 6
        # other augmentations of the same subject: same grid, never one of the training volumes
        for a in held_out.values():
            assert all(a.shape == b.shape and not np.array_equal(a, b) for b in trained.values())
    template, val = arrays(cohort["calibration"], "mni152_*"), arrays(cohort["val"], "*")
    assert template.keys() == val.keys() and all(np.array_equal(a, val[n]) for n, a in template.items())

    monkeypatch.setenv("MONAI_DNPRD_DEMO_DIR", str(cohort["root"]))
    lists = training_lists(None)  # the demo, as `run training` without --dataset_dir
    assert sorted(d["name"] for d in lists["calibration"]) == sorted(
        p.name.split(".")[0] for p in cohort["calibration"].glob("*.nii.gz"))
    assert len(lists["val"]) == 2 and len(lists["train"]) == 12
