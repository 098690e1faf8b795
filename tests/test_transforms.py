"""Tests of the volumetric / 2.5D transforms (foreground mask, normalisation, padding, slice stacks,
resizing, training slice sampler)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from scipy import ndimage as ndi

from monai_dnprd.transforms import (
    BiasFieldCorrection,
    BiasFieldCorrectiond,
    ForegroundMask,
    ForegroundMaskd,
    NormalizeForeground,
    NormalizeForegroundd,
    RandSlice25Dd,
    ResizeSlices,
    ResizeSlicesd,
    SliceStack25D,
    SliceStack25Dd,
    SquarePad,
    SquarePadd,
)

DEMO = Path(__file__).resolve().parents[1] / "monai_dnprd" / "demo_data" / "IXI012-HH-1211_T1.nii.gz"


@pytest.fixture(scope="module")
def t1() -> MetaTensor:
    img = nib.load(str(DEMO))
    return MetaTensor(np.asarray(img.dataobj, dtype=np.float32)[None], affine=img.affine)


@pytest.fixture(scope="module")
def t1_mask(t1: MetaTensor) -> MetaTensor:
    return ForegroundMask()(t1)


# ----------------------------------------------------------------------------------- foreground mask
def test_mask_real_head_one_component_no_holes(t1: MetaTensor, t1_mask: MetaTensor) -> None:
    m = t1_mask
    assert isinstance(m, MetaTensor) and m.shape == (1, 120, 120, 90) and m.dtype == torch.uint8
    assert torch.allclose(m.affine, t1.affine)
    mb = m[0].numpy().astype(bool)
    frac = mb.mean()
    assert 0.2 < frac < 0.7  # a head in its field of view
    # covers the head: nearly all bright voxels are inside
    bright = t1[0].numpy() > np.percentile(t1[0].numpy(), 75)
    assert mb[bright].mean() > 0.98
    # the image corners (air) are outside
    assert not mb[:5, :5, :].any() and not mb[-5:, -5:, :].any()
    _, n = ndi.label(mb, structure=np.ones((3, 3, 3)))
    assert n == 1
    assert np.array_equal(ndi.binary_fill_holes(mb), mb)
    # slice-wise: no 2D holes along any axis
    for ax in range(3):
        st = np.zeros((3, 3, 3), bool)
        sl = [slice(None)] * 3
        sl[ax] = 1
        st[tuple(sl)] = ndi.generate_binary_structure(2, 1)
        assert np.array_equal(ndi.binary_fill_holes(mb, structure=st), mb)


def test_mask_fills_interior_cavity_and_drops_islands() -> None:
    x = np.zeros((1, 40, 40, 30), np.float32)
    x[0, 5:35, 5:35, 5:25] = 100.0
    x[0, 15:25, 15:25, 10:20] = 0.0  # dark "ventricle" inside
    x[0, 38, 38, 2] = 100.0  # isolated bright voxel
    m = ForegroundMask(closing_iterations=0)(x)
    assert isinstance(m, np.ndarray) and m.dtype == np.uint8
    assert m[0, 20, 20, 15] == 1
    assert m[0, 38, 38, 2] == 0
    assert m.sum() == 30 * 30 * 20


def test_mask_constant_and_fixed_threshold() -> None:
    const = MetaTensor(torch.full((1, 16, 16, 8), 7.0))
    m = ForegroundMask()(const)
    assert m.shape == (1, 16, 16, 8) and int(m.sum()) == 0
    ct = torch.full((1, 20, 20, 10), -1000.0)
    ct[0, 4:16, 4:16, 2:8] = 40.0
    m = ForegroundMask(threshold=-500)(ct)
    assert isinstance(m, torch.Tensor) and int(m.sum()) == 12 * 12 * 6


def test_mask_dict(t1: MetaTensor, t1_mask: MetaTensor) -> None:
    d = ForegroundMaskd(keys="image", mask_key="mask")({"image": t1, "name": "a"})
    assert torch.equal(d["mask"], t1_mask) and d["name"] == "a"


# ------------------------------------------------------------------------------------- normalisation
def test_normalize_mri_low_percentile_and_median(t1: MetaTensor, t1_mask: MetaTensor) -> None:
    out = NormalizeForeground(lower=1.0)(t1, t1_mask)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and torch.allclose(out.affine, t1.affine)
    o, m = out[0].numpy(), t1_mask[0].numpy().astype(bool)
    assert o.min() >= 0.0 and np.all(o[~m] == 0.0)
    v = t1[0].numpy()[m]
    lo, med = np.percentile(v, [1.0, 50.0])
    inside = o[m]
    assert np.isclose(np.median(inside), 0.5, atol=1e-3)  # the median maps to 0.5
    assert np.isclose((inside <= 0.0).mean(), (v <= lo).mean(), atol=1e-3)
    keep = v > lo
    np.testing.assert_allclose(inside[keep], np.minimum((v[keep] - lo) / (2 * (med - lo)), 2.0), rtol=1e-4, atol=1e-5)


def test_normalize_mri_is_robust_to_a_bright_lesion() -> None:
    """A lesion of 3 % of the foreground at 3x the tissue intensity barely moves the scale of normal tissue and
    keeps its own contrast (a clip at the 99.5th percentile would rescale everything and flatten the lesion)."""
    g = np.random.default_rng(0)
    tissue = g.normal(300.0, 40.0, (1, 40, 40, 40)).clip(1.0).astype(np.float32)
    lesion = np.zeros((1, 40, 40, 40), bool)
    lesion[0, :12, :4, :] = True  # 1920 voxels, 3 %
    sick = np.where(lesion, 900.0, tissue).astype(np.float32)
    m = np.ones((1, 40, 40, 40), np.uint8)
    a, b = NormalizeForeground()(tissue, m), NormalizeForeground()(sick, m)
    normal = ~lesion
    ratio = np.median(b[normal]) / np.median(a[normal])
    assert abs(ratio - 1.0) < 0.03
    assert float(b[lesion].min()) > 1.5 * float(np.quantile(b[normal], 0.995))  # the lesion stays far above tissue


def test_normalize_constant_empty_and_ct() -> None:
    x = torch.full((2, 8, 8, 4), 5.0)
    m = torch.zeros((1, 8, 8, 4), dtype=torch.uint8)
    m[0, 2:6, 2:6] = 1
    out = NormalizeForeground()(x, m)
    assert torch.isfinite(out).all() and float(out.abs().max()) == 0.0
    assert float(NormalizeForeground()(x, torch.zeros_like(m)).abs().max()) == 0.0
    hu = torch.tensor([-1000.0, -160.0, 40.0, 240.0, 1000.0]).reshape(1, 5, 1, 1)
    out = NormalizeForeground(modality="ct", window=(40.0, 400.0))(hu, torch.ones((1, 5, 1, 1)))
    np.testing.assert_allclose(out.flatten().numpy(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    with pytest.raises(ValueError):
        NormalizeForeground(modality="pet")


def test_normalize_dict_per_channel() -> None:
    x = torch.stack([torch.linspace(0, 1, 512), torch.linspace(100, 300, 512)]).reshape(2, 8, 8, 8)
    d = NormalizeForegroundd(keys="image", mask_key="mask", lower=0)({"image": x, "mask": torch.ones(1, 8, 8, 8)})
    assert torch.allclose(d["image"][0], d["image"][1], atol=1e-5)
    assert float(d["image"].min()) == 0.0 and abs(float(d["image"].max()) - 1.0) < 1e-5


# ---------------------------------------------------------------------------------------- square pad
def test_square_pad_shapes() -> None:
    x = torch.rand(2, 10, 7, 5)
    p = SquarePad()(x)
    assert p.shape == (2, 10, 10, 5)
    assert torch.equal(p[:, :, 1:8], x) and float(p[:, :, :1].abs().sum()) == 0 and float(p[:, :, 8:].abs().sum()) == 0
    assert SquarePad(axis=0)(torch.rand(1, 3, 4, 9)).shape == (1, 3, 9, 9)
    assert SquarePad()(torch.rand(1, 6, 6, 3)).shape == (1, 6, 6, 3)


def test_square_padd_invertd_round_trip() -> None:
    aff = np.diag([0.9, 1.2, 3.0, 1.0])
    aff[:3, 3] = [-10.0, 5.0, 2.0]
    img = MetaTensor(torch.rand(1, 13, 20, 6), affine=torch.as_tensor(aff))
    mask = MetaTensor((torch.rand(1, 13, 20, 6) > 0.5).to(torch.uint8), affine=torch.as_tensor(aff))
    pad = Compose([SquarePadd(keys=("image", "mask"))])
    d = pad({"image": img, "mask": mask})
    assert d["image"].shape == (1, 20, 20, 6) and d["mask"].shape == (1, 20, 20, 6)
    assert torch.equal(d["mask"][:, 3:16], mask)
    # world position of voxel (0,0,0) of the original is unchanged
    shifted = d["image"].affine.numpy() @ np.array([3, 0, 0, 1.0])
    np.testing.assert_allclose(shifted, aff @ np.array([0, 0, 0, 1.0]), atol=1e-6)
    pred = d["image"].clone() * 2.0
    inv = Invertd(keys=("pred", "mask"), transform=pad, orig_keys=("image", "mask"), nearest_interp=False)
    out = inv({**d, "pred": pred})
    assert out["pred"].shape == img.shape
    assert torch.equal(out["pred"].as_tensor(), img.as_tensor() * 2.0)
    np.testing.assert_allclose(out["pred"].affine.numpy(), aff, atol=1e-8)
    assert torch.equal(out["mask"].as_tensor(), mask.as_tensor())


# -------------------------------------------------------------------------------------- slice stacks
def test_slice_stack_values_and_edges() -> None:
    vol = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    s = SliceStack25D(k=1)(vol)
    assert s.shape == (5, 6, 3, 4)
    for z in range(5):
        for c in range(2):
            for j, dz in enumerate((-1, 0, 1)):
                zz = min(max(z + dz, 0), 4)
                assert torch.equal(s[z, c * 3 + j], vol[c, :, :, zz])
    # centre channel (k) of slice z is volume slice z; edges are replicated
    assert torch.equal(s[0, 0], s[0, 1]) and torch.equal(s[4, 2], s[4, 1])


def test_slice_stack_other_axis_and_short_volume() -> None:
    vol = torch.rand(1, 4, 3, 6)
    s = SliceStack25D(k=2, axis=0)(vol)
    assert s.shape == (4, 5, 3, 6)
    assert torch.equal(s[1, 2], vol[0, 1]) and torch.equal(s[0, 0], vol[0, 0]) and torch.equal(s[3, 4], vol[0, 3])
    one = torch.rand(2, 5, 5, 1)
    s = SliceStack25D(k=2)(one)
    assert s.shape == (1, 10, 5, 5)
    assert all(torch.equal(s[0, i], one[0, :, :, 0]) for i in range(5))


def test_slice_unstack_inverse(t1: MetaTensor) -> None:
    st = SliceStack25D(k=1)
    s = st(t1)
    assert not isinstance(s, MetaTensor)
    centre = s[:, 1:2]  # (Z, 1, H, W): the slice itself
    vol = st.unstack(centre)
    assert isinstance(vol, MetaTensor) and vol.shape == t1.shape
    assert torch.equal(vol.as_tensor(), t1.as_tensor()) and torch.allclose(vol.affine, t1.affine)
    plain = SliceStack25D(k=1, axis=1)
    x = torch.rand(1, 5, 6, 7)
    back = plain.unstack(plain(x)[:, 1:2])
    assert not isinstance(back, MetaTensor) and torch.equal(back, x)
    like = plain.unstack(plain(x)[:, 1], like=t1[:, :5, :6, :7])
    assert isinstance(like, MetaTensor)
    with pytest.raises(ValueError):
        plain.unstack(plain(x)[:, 1:2], like=t1)


def test_slice_stack_dict() -> None:
    d = SliceStack25Dd(keys="image", k=1)({"image": torch.rand(1, 4, 4, 3)})
    assert d["image"].shape == (3, 3, 4, 4)


# ------------------------------------------------------------------------------------------- resizing
def test_resize_slices_shapes_and_restore() -> None:
    x = torch.rand(3, 2, 60, 60, dtype=torch.float64)
    r = ResizeSlices(32)(x)
    assert r.shape == (3, 2, 32, 32) and r.dtype == torch.float32
    single = ResizeSlices(32)(x[0])
    assert single.shape == (2, 32, 32) and torch.allclose(single, r[0])
    up = ResizeSlices(90)(np.ones((1, 45, 45), np.float32))
    assert up.shape == (1, 90, 90) and torch.allclose(up, torch.ones_like(up))
    back = ResizeSlices.restore(r[:, :1], (60, 60))
    assert back.shape == (3, 1, 60, 60)
    smooth = torch.linspace(0, 1, 60).reshape(1, 1, 1, 60).expand(1, 1, 60, 60)
    rt = ResizeSlices.restore(ResizeSlices(40)(smooth), (60, 60))
    assert float((rt - smooth).abs()[..., 3:-3].max()) < 0.02
    assert torch.equal(ResizeSlices(60)(smooth), smooth.float())
    d = ResizeSlicesd(keys="image", size=16)({"image": torch.rand(3, 20, 20)})
    assert d["image"].shape == (3, 16, 16)


# ----------------------------------------------------------------------------------- slice sampler
def _sampler_volume() -> dict:
    img = MetaTensor(torch.rand(2, 16, 16, 10))
    mask = torch.zeros(1, 16, 16, 10, dtype=torch.uint8)
    mask[0, :8, :8, 3:7] = 1  # 25 % of the slice area on slices 3..6
    mask[0, :2, :2, 0] = 1  # 1.6 % on slice 0
    label = torch.zeros(1, 16, 16, 10, dtype=torch.uint8)
    label[0, 2, 2, :] = torch.arange(10, dtype=torch.uint8)
    return {"image": img, "mask": mask, "label": label, "name": "vol1", "extra": torch.zeros(3)}


def test_rand_slice_skips_low_foreground_and_contents() -> None:
    data = _sampler_volume()
    t = RandSlice25Dd(keys="image", mask_key="mask", label_key="label", k=1, num_samples=40, min_foreground=0.15)
    t.set_random_state(0)
    out = t(data)
    assert isinstance(out, list) and len(out) == 40
    idx = [o["slice_index"] for o in out]
    assert set(idx) <= {3, 4, 5, 6} and len(set(idx)) > 1
    ref = SliceStack25D(k=1)(data["image"])
    for o in out:
        z = o["slice_index"]
        assert o["image"].shape == (6, 16, 16) and o["image"].dtype == torch.float32
        assert torch.equal(o["image"], ref[z])
        assert o["mask"].shape == (1, 16, 16) and torch.equal(o["mask"][0], data["mask"][0, :, :, z])
        assert o["label"].shape == (1, 16, 16) and int(o["label"][0, 2, 2]) == z
        assert o["name"] == "vol1" and "extra" not in o


def test_rand_slice_deterministic_and_fallback() -> None:
    data = _sampler_volume()
    a = RandSlice25Dd(num_samples=8)
    b = RandSlice25Dd(num_samples=8)
    a.set_random_state(123)
    b.set_random_state(123)
    ia = [o["slice_index"] for o in a(data)]
    assert ia == [o["slice_index"] for o in b(data)]
    # nothing reaches 90 %: fall back to the slices with the most foreground
    f = RandSlice25Dd(num_samples=4, min_foreground=0.9)
    f.set_random_state(0)
    assert {o["slice_index"] for o in f(data)} <= {3, 4, 5, 6}


def test_rand_slice_with_patch_dataset(t1: MetaTensor, t1_mask: MetaTensor) -> None:
    from monai.data import DataLoader, PatchDataset

    sampler = RandSlice25Dd(keys="image", mask_key="mask", num_samples=3)
    sampler.set_random_state(5)
    ds = PatchDataset([{"image": t1, "mask": t1_mask, "name": "ixi"}], patch_func=sampler, samples_per_image=3)
    batch = next(iter(DataLoader(ds, batch_size=3, num_workers=0)))
    assert batch["image"].shape == (3, 3, 120, 120)
    fr = t1_mask[0].float().mean(dim=(0, 1))
    assert all(float(fr[int(z)]) >= 0.15 for z in batch["slice_index"])


def _biased_head(n: int = 48, spacing: float = 2.0):
    """A ball of two tissues (shell 100, core 60) and a bright 8 mm lesion (160), times a smooth field
    (exp of a linear ramp, 0.67-1.5 across the head), 1 outside; its mask and the tissue labels."""
    g = (np.arange(n) - (n - 1) / 2.0) * spacing
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    ball, core, lesion = r < 40.0, r < 20.0, np.sqrt((x - 28.0) ** 2 + y**2 + z**2) < 8.0
    clean = np.where(ball, 100.0, 1.0)
    clean[core], clean[lesion] = 60.0, 160.0
    field = np.exp(0.4 * (x + 0.5 * y) / 40.0)
    img = MetaTensor(torch.as_tensor((clean * field)[None], dtype=torch.float32),
                     affine=torch.diag(torch.tensor([spacing, spacing, spacing, 1.0])))
    return img, torch.as_tensor(ball[None].astype(np.uint8)), ball & ~core & ~lesion, core, lesion


def test_bias_field_correction_flattens_a_smooth_field_and_keeps_a_lesions_contrast():
    img, mask, shell, core, lesion = _biased_head()
    out = BiasFieldCorrection()(img, mask)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, img.affine) and out.shape == img.shape
    before, after = img[0].numpy(), out[0].numpy()
    cv = lambda v, region: float(v[region].std() / v[region].mean())  # noqa: E731
    assert cv(before, shell) > 0.15 and cv(after, shell) < 0.3 * cv(before, shell)  # the field is gone
    assert cv(after, core) < 0.3 * cv(before, core)
    contrast = lambda v: float(np.median(v[lesion]) / np.median(v[shell]))  # noqa: E731
    assert abs(contrast(after) - 1.6) < 0.1  # the lesion's own contrast kept (160 against 100)
    outside = mask[0].numpy() == 0
    np.testing.assert_array_equal(after[outside], before[outside])  # outside the mask: untouched
    again = BiasFieldCorrection()(img, mask)
    assert torch.equal(out.as_tensor(), again.as_tensor())  # single-threaded, reproducible


def test_bias_field_correction_leaves_too_small_volumes_and_disabled_data_alone(caplog):
    img, mask, *_ = _biased_head(n=12)
    with caplog.at_level("WARNING", logger="monai_dnprd"):
        out = BiasFieldCorrection()(img, mask)
    assert torch.equal(out.as_tensor(), img.as_tensor()) and "too few to fit" in caplog.text
    img, mask, *_ = _biased_head()
    data = {"image": img, "mask": mask}
    assert BiasFieldCorrectiond(keys="image", enabled=False)(data)["image"] is img
    corrected = BiasFieldCorrectiond(keys="image")(data)["image"]
    assert torch.equal(corrected.as_tensor(), BiasFieldCorrection()(img, mask).as_tensor())
    with pytest.raises(ValueError, match="fit_mm"):
        BiasFieldCorrection(fit_mm=0)
    with pytest.raises(ValueError, match="iterations"):
        BiasFieldCorrection(iterations=(50, 0))
    with pytest.raises(ValueError, match="tails"):
        BiasFieldCorrection(tails=50)


def test_bias_field_fit_leaves_the_darkest_and_brightest_voxels_out(monkeypatch):
    img, mask, shell, core, lesion = _biased_head()
    fitted = []
    monkeypatch.setattr(BiasFieldCorrection, "field", lambda self, xc, m, spacing: fitted.append(m) or None)
    BiasFieldCorrection()(img, mask)
    x, inside = img[0].numpy(), mask[0].numpy() > 0
    lo, hi = np.percentile(x[inside], [5, 95])
    assert fitted[0].sum() < 0.92 * inside.sum() and not (fitted[0] & ~inside).any()
    assert x[fitted[0]].min() >= lo and x[fitted[0]].max() <= hi
    assert not (fitted[0] & lesion).any()  # the bright lesion is in the top 5 %: not fitted
    BiasFieldCorrection(tails=0)(img, mask)
    assert np.array_equal(fitted[1], inside)
    out = BiasFieldCorrection()(img, mask)  # no field: the data come back unchanged
    assert torch.equal(out.as_tensor(), img.as_tensor())
