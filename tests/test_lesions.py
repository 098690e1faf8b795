"""Tests of the synthetic lesion transforms: the mask equals the changed voxels exactly, lesions stay in
the foreground, seeds reproduce, sizes follow ``radius_mm``, every kind paints something."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_dnprd.transforms import ForegroundMask, NormalizeForeground, SyntheticLesion, SyntheticLesiond

DEMO = Path(__file__).resolve().parents[1] / "monai_dnprd" / "demo_data" / "IXI012-HH-1211_T1.nii.gz"
KINDS = ("hyper", "hypo", "texture", "deform")
TOL = 0.02


@pytest.fixture(scope="module")
def brain() -> tuple[MetaTensor, MetaTensor]:
    """Normalised 2 mm T1 (1, 120, 120, 90) and its foreground mask."""
    img = nib.load(str(DEMO))
    x = MetaTensor(np.asarray(img.dataobj, dtype=np.float32)[None], affine=img.affine)
    mask = ForegroundMask()(x)
    return NormalizeForeground()(x, mask), mask


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _changed(new: torch.Tensor, old: torch.Tensor, tol: float = TOL) -> torch.Tensor:
    return (_plain(new) - _plain(old)).abs().amax(dim=0) > tol


@pytest.mark.parametrize("kind", KINDS)
def test_mask_equals_changed_voxels(brain, kind: str) -> None:
    img, mask = brain
    t = SyntheticLesion(kinds=(kind,), num_lesions=(1, 3))
    for seed in range(3):
        t.set_random_state(seed)
        new_m, les_m = t(img, mask)
        assert isinstance(new_m, MetaTensor) and isinstance(les_m, MetaTensor)
        assert new_m.shape == img.shape and les_m.shape == mask.shape and les_m.dtype == torch.uint8
        assert torch.allclose(les_m.affine, img.affine) and torch.allclose(new_m.affine, img.affine)
        new, les, old, fg = _plain(new_m), _plain(les_m)[0].bool(), _plain(img), _plain(mask)[0].bool()
        assert torch.equal(_changed(new, old), les)
        assert les.sum() > 0, f"{kind} seed {seed} painted nothing"
        assert not (les & ~fg).any()  # inside the foreground
        assert float(new.min()) >= 0.0 and float(new.max()) <= max(1.0, float(old.max()))  # never above the input range
        assert torch.equal(new[:, ~fg], old[:, ~fg])


def test_mixed_kinds_multichannel_and_plain_tensor() -> None:
    g = np.random.RandomState(0)
    x = torch.as_tensor(g.uniform(0.2, 0.8, (2, 40, 40, 30)).astype(np.float32))
    m = torch.zeros(1, 40, 40, 30, dtype=torch.uint8)
    m[0, 5:35, 5:35, 4:26] = 1
    x = x * m
    t = SyntheticLesion(num_lesions=(2, 4), radius_mm=(3.0, 8.0))
    for seed in range(6):
        t.set_random_state(seed)
        new, les = t(x, m)
        assert type(new) is torch.Tensor and type(les) is torch.Tensor
        assert torch.equal(_changed(new, x), les[0].bool())
        assert les.sum() > 0 and not (les.bool() & ~m.bool()).any()


def test_deterministic_with_seed(brain) -> None:
    img, mask = brain
    a, b = SyntheticLesion(), SyntheticLesion()
    a.set_random_state(42)
    b.set_random_state(42)
    na, la = a(img, mask)
    nb, lb = b(img, mask)
    assert torch.equal(na, nb) and torch.equal(la, lb)
    nc, lc = a(img, mask)  # the next draw differs
    assert not torch.equal(la, lc)


def test_kinds_restrict() -> None:
    with pytest.raises(ValueError):
        SyntheticLesion(kinds=("glow",))
    t = SyntheticLesion(kinds=("hypo", "deform"), num_lesions=5)
    t.set_random_state(0)
    t.randomize()
    assert len(t._params) == 5 and {p["kind"] for p in t._params} <= {"hypo", "deform"}


def test_sizes_follow_radius_mm(brain) -> None:
    img, mask = brain
    spacing = 2.0
    radii = {}
    for r in (4.0, 12.0, 20.0):
        t = SyntheticLesion(kinds=("hyper",), num_lesions=1, radius_mm=r, strength=0.6)
        eq = []
        for seed in range(4):
            t.set_random_state(seed)
            _, les = t(img, mask)
            vol_mm3 = float(les.sum()) * spacing**3
            eq.append((3.0 * vol_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0))
            # spatial extent along each axis stays within the nominal diameter (plus soft edge)
            nz = np.nonzero(_plain(les)[0].numpy())
            ext = max((a.max() - a.min() + 1) * spacing for a in nz)
            assert ext <= 2 * 1.6 * r + 2 * spacing
        radii[r] = float(np.median(eq))
        assert 0.4 * r <= radii[r] <= 1.4 * r, (r, radii[r])
    assert radii[4.0] < radii[12.0] < radii[20.0]


def test_uses_affine_spacing() -> None:
    x = torch.full((1, 60, 60, 60), 0.5)
    m = torch.ones(1, 60, 60, 60, dtype=torch.uint8)
    t = SyntheticLesion(kinds=("hyper",), num_lesions=1, radius_mm=8.0, strength=0.5)
    t.set_random_state(0)
    _, l1 = t(MetaTensor(x, affine=torch.eye(4)), m)
    t.set_random_state(0)
    _, l2 = t(MetaTensor(x, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))), m)
    assert float(l1.sum()) > 4 * float(l2.sum()) > 0  # same mm size -> ~8x fewer voxels at 2 mm


def test_empty_foreground_and_no_lesions() -> None:
    x = torch.rand(1, 10, 10, 10)
    new, les = SyntheticLesion()(x, torch.zeros(1, 10, 10, 10))
    assert torch.equal(new, x) and int(les.sum()) == 0
    t = SyntheticLesion(num_lesions=0)
    new, les = t(x, torch.ones(1, 10, 10, 10))
    assert torch.equal(new, x) and int(les.sum()) == 0


def test_fast_enough(brain) -> None:
    img, mask = brain
    t = SyntheticLesion(num_lesions=3, radius_mm=25.0)
    t.set_random_state(0)
    t(img, mask)  # warm-up
    start = time.perf_counter()
    t(img, mask)
    assert time.perf_counter() - start < 1.0


def test_dict_version(brain) -> None:
    img, mask = brain
    t = SyntheticLesiond(keys="image", mask_key="mask", label_key="label", num_lesions=2)
    t.set_random_state(7)
    d = t({"image": img, "mask": mask, "name": "x"})
    assert isinstance(d["label"], MetaTensor) and d["label"].shape == mask.shape
    assert torch.allclose(d["label"].affine, img.affine)
    assert torch.equal(_changed(d["image"], img), d["label"][0].bool()) and d["label"].sum() > 0
    t2 = SyntheticLesiond(keys="image", mask_key="mask", label_key="label", num_lesions=2)
    t2.set_random_state(7)
    assert torch.equal(t2({"image": img, "mask": mask})["label"], d["label"])
