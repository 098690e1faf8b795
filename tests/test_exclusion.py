"""Exclusion masks: known lesions in training volumes are mapped onto the training grid, grown by a margin, taken
out of the foreground, and left out of every training loss and statistic."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, TINY_MODEL, _downsampled, nested, root_message, run_workflow
from monai.bundle import ConfigParser

from monai_dnprd.anomaly_map import ResidualMoments
from monai_dnprd.config import workflow_configs
from monai_dnprd.data import attach_exclusions
from monai_dnprd.io import VolumeError, find_volumes
from monai_dnprd.losses import daa_loss, soft_mining_cosine_loss, token_keep
from monai_dnprd.networks.mim import MIMHead, mim_loss
from monai_dnprd.networks.vit import ViTEncoder
from monai_dnprd.transforms import ExclusionMaskd, RandSlice25Dd, dilate_mm, resample_nearest


def test_dilate_mm_grows_by_the_margin_in_millimetres():
    m = np.zeros((21, 21, 11), bool)
    m[10, 10, 5] = True
    grown = dilate_mm(m, (1.0, 1.0, 2.0), 2.0)
    assert grown[8, 10, 5] and grown[12, 10, 5] and not grown[7, 10, 5]  # 2 mm = 2 voxels in x
    assert grown[10, 10, 4] and grown[10, 10, 6] and not grown[10, 10, 3]  # 2 mm = 1 voxel in z
    assert np.array_equal(dilate_mm(m, (1.0, 1.0, 2.0), 0.0), m)
    # computed only around the mask, it equals the transform of the whole volume (a blob at the border too)
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    blob = np.zeros((30, 25, 20), bool)
    blob[0:4, 10:14, 3:6] = True
    blob[rng.integers(0, 30, 5), rng.integers(0, 25, 5), rng.integers(0, 20, 5)] = True
    for sp, margin in (((1.0, 1.0, 1.0), 3.0), ((0.8, 1.2, 2.5), 4.0)):
        whole = ndi.distance_transform_edt(~blob, sampling=sp) <= margin
        assert np.array_equal(dilate_mm(blob, sp, margin), whole)


def test_resample_nearest_follows_world_coordinates():
    src = np.zeros((10, 12, 8), bool)
    src[2, 3, 4] = True
    src_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    src_aff[:3, 3] = [10.0, -4.0, 0.0]
    # a 1 mm grid, flipped in x, shifted: the voxel centre of src (2, 3, 4) is at world (14, 2, 8)
    aff = np.diag([-1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [30.0, 0.0, 0.0]
    out = resample_nearest(src, src_aff, (32, 30, 20), aff)
    hits = np.argwhere(out)
    assert out.sum() > 1  # a 2 mm voxel covers several 1 mm ones
    assert [30 - 14, 2, 8] in hits.tolist()
    world = np.c_[hits, np.ones(len(hits))] @ aff.T
    assert np.all(np.abs(world[:, :3] - [14.0, 2.0, 8.0]) <= 1.0 + 1e-9)


def _random_affine(rng: np.random.Generator, oblique: bool) -> np.ndarray:
    """Voxel->world affine: anisotropic spacing, random flips, a rotation or an axis permutation."""
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0] if oblique else np.eye(3)[rng.permutation(3)]
    spacing = rng.uniform(0.5, 3.0, 3) if oblique else rng.integers(1, 4, 3).astype(float)
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(rng.choice([-1.0, 1.0], 3)) * spacing
    aff[:3, 3] = rng.uniform(-20, 20, 3) if oblique else rng.integers(-10, 10, 3) + rng.choice([0.0, 0.5], 3)
    return aff


@pytest.mark.parametrize("oblique", [False, True])
def test_resample_nearest_equals_scipy_on_rounded_coordinates(oblique):
    """Reference: scipy's order-0 ``map_coordinates`` at the rounded (half to even) source coordinates, zero outside.

    The axis-aligned case puts grids half a voxel apart (ties), where ``affine_transform(order=0)`` would round up.
    """
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    for _ in range(20):
        src = rng.random(tuple(rng.integers(2, 16, 3))) > 0.5
        src_aff, aff = _random_affine(rng, oblique), _random_affine(rng, oblique)
        shape = tuple(int(v) for v in rng.integers(1, 20, 3))
        # overlap the grids: centre on centre, to the half voxel when axis-aligned
        shift = (src_aff @ np.r_[(np.array(src.shape) - 1) / 2, 1] - aff @ np.r_[(np.array(shape) - 1) / 2, 1])[:3]
        aff[:3, 3] += shift + rng.normal(0, 2, 3) if oblique else np.round(2 * shift) / 2
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
        coords = (np.linalg.inv(src_aff) @ aff @ np.c_[grid, np.ones(len(grid))].T)[:3]
        ref = ndi.map_coordinates(src.astype(np.uint8), np.rint(coords), order=0, mode="grid-constant", cval=0)
        out = resample_nearest(src, src_aff, shape, aff)
        assert out.dtype == src.dtype and out.shape == shape
        assert np.array_equal(out, ref.reshape(shape).astype(bool))


def _volume_item(tmp_path, exclusion_box=None, mask_affine=None, mask_shape=None):
    """A preprocessed-looking item: image (1, X, Y, Z) MetaTensor with its original geometry, mask all ones."""
    from monai.data import MetaTensor

    arr, aff = _downsampled("IXI012-HH-1211_T1.nii.gz")
    img = MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(aff))
    img.meta["original_affine"] = aff.copy()
    img.meta["spatial_shape"] = np.asarray(arr.shape)
    ex = np.zeros(mask_shape or arr.shape, np.uint8)
    if exclusion_box is not None:
        ex[exclusion_box] = 1
    path = tmp_path / "ex.nii.gz"
    nib.save(nib.Nifti1Image(ex, aff if mask_affine is None else mask_affine), str(path))
    return {"image": img, "mask": torch.ones_like(img, dtype=torch.uint8), "exclude": str(path)}, aff


def test_exclusion_maskd_grows_the_mask_and_removes_it_from_the_foreground(tmp_path):
    d, aff = _volume_item(tmp_path, exclusion_box=(slice(18, 20), slice(18, 20), slice(14, 16)))
    spacing = np.linalg.norm(aff[:3, :3], axis=0)  # 6 mm voxels after the 1/3 downsampling
    out = ExclusionMaskd(margin_mm=float(spacing[0]))(d)
    ex = np.asarray(out["exclude"])[0] > 0
    expected = dilate_mm(_box(ex.shape), spacing, float(spacing[0]))
    assert np.array_equal(ex, expected)
    mask = np.asarray(out["mask"])[0]
    assert mask[ex].max() == 0 and mask[~ex].min() == 1
    assert np.allclose(np.asarray(out["exclude"].affine), aff)
    # without the key nothing changes
    plain = {"image": d["image"], "mask": d["mask"]}
    assert ExclusionMaskd()(plain)["mask"] is plain["mask"]


def _box(shape):
    b = np.zeros(shape, bool)
    b[18:20, 18:20, 14:16] = True
    return b


def test_exclusion_maskd_refuses_a_mask_with_the_wrong_header_or_place(tmp_path):
    d, aff = _volume_item(tmp_path, exclusion_box=(slice(18, 20),) * 3, mask_affine=np.eye(4))
    with pytest.raises(VolumeError, match="another affine"):
        ExclusionMaskd()(d)
    far = aff.copy()
    far[:3, 3] += 5000.0
    d, _ = _volume_item(tmp_path, exclusion_box=(slice(2, 4),) * 3, mask_affine=far, mask_shape=(10, 10, 10))
    with pytest.raises(VolumeError, match="falls on the image"):
        ExclusionMaskd()(d)


def test_slice_sampler_marks_a_stack_excluded_if_any_of_its_slices_is():
    vol = torch.rand(1, 8, 8, 10)
    ex = torch.zeros(1, 8, 8, 10)
    ex[0, 2:4, 2:4, 6] = 1
    sampler = RandSlice25Dd(keys="image", mask_key=None, k=1, num_samples=10, min_foreground=0.0, exclude_key="exclude")
    sampler.set_random_state(0)
    for s in sampler({"image": vol, "exclude": ex}):
        z = s["slice_index"]
        assert s["exclude"].shape == (1, 8, 8)
        assert bool(s["exclude"].any()) == (z in (5, 6, 7))
    s = sampler({"image": vol})[0]  # a volume without a mask: all zero, so that batches collate
    assert s["exclude"].shape == (1, 8, 8) and not s["exclude"].any()


def test_token_keep_drops_every_token_that_touches_an_excluded_pixel():
    ex = torch.zeros(2, 1, 16, 16)
    ex[0, 0, 5, 9] = 0.1  # a resized mask's soft edge still counts
    keep = token_keep(ex, 4)
    assert keep.shape == (2, 1, 4, 4)
    assert keep[0, 0, 1, 2] == 0 and keep.sum() == 31


def test_losses_ignore_excluded_tokens():
    torch.manual_seed(0)
    target = [torch.randn(2, 8, 4, 4)]
    recon = torch.randn(2, 8, 4, 4, requires_grad=True)
    keep = torch.ones(2, 1, 4, 4)
    keep[0, 0, :2] = 0
    loss = soft_mining_cosine_loss(target, [recon], keep=keep)
    loss.backward()
    assert recon.grad[0, :, :2].abs().max() == 0 and recon.grad[0, :, 2:].abs().max() > 0
    wild_t, wild_r = target[0].clone(), recon.detach().clone()
    wild_t[0, :, :2] = 100 * torch.randn(8, 2, 4)
    wild_r[0, :, :2] = -50.0
    assert torch.allclose(soft_mining_cosine_loss([wild_t], [wild_r], keep=keep), loss.detach())
    assert not torch.allclose(soft_mining_cosine_loss([wild_t], [wild_r]), loss.detach())

    tokens = torch.randn(2, 16, 8)
    protos = torch.randn(2, 3, 8)
    k = keep.reshape(2, 16)
    far = tokens.clone()
    far[0, :8] = torch.randn(8, 8) * 10
    assert torch.allclose(daa_loss(tokens, protos, keep=k), daa_loss(far, protos, keep=k))
    assert not torch.allclose(daa_loss(tokens, protos), daa_loss(far, protos))


def test_mim_loss_counts_only_kept_patches():
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=16, patch_size=4, in_channels=3, embed_dim=24, depth=1, num_heads=2, num_register_tokens=0)
    head = MIMHead(24, 4, 3)
    x = torch.rand(2, 3, 16, 16)
    kw = dict(mask_ratio=0.5, generator=torch.Generator().manual_seed(1))
    full = mim_loss(enc, head, x, **kw)
    kw["generator"] = torch.Generator().manual_seed(1)
    assert torch.allclose(mim_loss(enc, head, x, keep=torch.ones(2, 16), **kw), full)
    kw["generator"] = torch.Generator().manual_seed(1)
    assert mim_loss(enc, head, x, keep=torch.zeros(2, 16), **kw) == 0


def test_residual_moments_skip_excluded_tokens():
    torch.manual_seed(0)
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    keep = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    keep[1, 0, 0] = False
    wild = a.clone()
    wild[1, :, 0] = 1e3
    m1, m2 = ResidualMoments(), ResidualMoments()
    m1.update([a], [b], keep=keep)
    m2.update([wild], [b], keep=keep)
    assert m1.n == 15
    for (mu1, s1), (mu2, s2) in zip(m1.stats(), m2.stats()):
        assert torch.allclose(mu1, mu2) and torch.allclose(s1, s2)


def test_attach_exclusions_matches_names_and_refuses_a_folder_that_matches_none(tmp_path):
    arr, aff = _downsampled("IXI012-HH-1211_T1.nii.gz")
    (tmp_path / "vols").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(arr, aff), str(tmp_path / "vols" / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(arr.shape, np.uint8), aff), str(tmp_path / "masks" / "b.nii.gz"))
    items, _ = find_volumes(tmp_path / "vols")
    assert attach_exclusions(items, tmp_path / "masks") == 1
    assert "exclude" not in items[0] and items[1]["exclude"].endswith("b.nii.gz")
    items, _ = find_volumes(tmp_path / "vols")
    (tmp_path / "masks" / "b.nii.gz").rename(tmp_path / "masks" / "other.nii.gz")
    with pytest.raises(VolumeError, match="no exclusion mask has the name"):
        attach_exclusions(items, tmp_path / "masks")


@pytest.mark.slow
def test_training_with_exclusion_masks(tiny_data, tmp_path):
    """The bundle trains with ``--exclude_dir``: the excluded voxels leave the foreground of training,
    validation and calibration volumes, and the log reports the share of tokens left out of the loss."""
    masks = tmp_path / "masks"
    masks.mkdir()
    for folder in (tiny_data["train"], tiny_data["val"]):
        for p in sorted(folder.glob("*.nii.gz")):
            img = nib.load(str(p))
            ex = np.zeros(img.shape, np.uint8)
            c = [s // 2 for s in img.shape]
            ex[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 2:c[2] + 2] = 1
            nib.save(nib.Nifti1Image(ex, img.affine), str(masks / p.name))
    out = tmp_path / "train"
    run_workflow("train.json", "training", output_dir=str(out), dataset_dir=str(tiny_data["train"]),
                 val_dir=str(tiny_data["val"]), exclude_dir=str(masks), num_iterations=4, warmup_iterations=2,
                 schedule__val_interval=2, schedule__ckpt_interval=2, **TINY_MODEL)
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    shares = [r["excluded_tokens"] for r in log if "excluded_tokens" in r]
    assert shares and max(shares) > 0 and min(shares) < 1

    parser = ConfigParser()
    parser.read_config(workflow_configs(BUNDLE, "training"))
    parser.update({"dataset_dir": str(tiny_data["train"]), "val_dir": str(tiny_data["val"]), "exclude_dir": str(masks),
                   **nested(TINY_MODEL)})
    val_item = parser.get_parsed_content("data#lists")["val"][0]
    with_ex = parser.get_parsed_content("training_preprocessing")(dict(val_item))
    without = parser.get_parsed_content("preprocessing")({k: v for k, v in val_item.items() if k != "exclude"})
    n_excluded = int(np.asarray(without["mask"]).astype(bool).sum() - np.asarray(with_ex["mask"]).astype(bool).sum())
    assert n_excluded >= 6 * 6 * 4 * 0.5  # the block, grown by 5 mm, mostly inside the brain
    cal = json.loads((out / "models" / "calibration.json").read_text())
    assert cal["n_voxels"] == int(np.asarray(with_ex["mask"]).astype(bool).sum())


def test_exclude_dir_that_matches_nothing_stops_training_with_a_clear_error(tiny_data, tmp_path):
    (tmp_path / "masks").mkdir()
    arr, aff = _downsampled("IXI012-HH-1211_T1.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(arr.shape, np.uint8), aff), str(tmp_path / "masks" / "nobody.nii.gz"))
    with pytest.raises(Exception) as err:
        run_workflow("train.json", "training", output_dir=str(tmp_path / "out"), dataset_dir=str(tiny_data["train"]),
                     val_dir=str(tiny_data["val"]), exclude_dir=str(tmp_path / "masks"), num_iterations=2,
                     warmup_iterations=1, **TINY_MODEL)
    assert "no exclusion mask has the name" in root_message(err.value)
