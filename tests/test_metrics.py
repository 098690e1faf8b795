"""Tests of monai_dnprd.metrics against scikit-learn and slow reference implementations."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

sklearn_metrics = pytest.importorskip("sklearn.metrics")

from monai_dnprd.metrics import (  # noqa: E402
    VolumeMetricAccumulator,
    aupro,
    average_precision,
    best_dice,
    dice_at,
    f1_max,
    format_metrics_table,
    roc_auc,
    slice_labels,
    slice_scores,
)

TOL = 1e-6


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _random_case(seed: int, n: int, ties: str) -> tuple[np.ndarray, np.ndarray]:
    """Random scores (with the requested kind of ties) and labels holding both classes."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < rng.uniform(0.05, 0.5)
    y[0], y[-1] = True, False
    s = rng.random(n) + 0.3 * y
    if ties == "round1":
        s = np.round(s, 1)
    elif ties == "round2":
        s = np.round(s, 2)
    elif ties == "int":
        s = rng.integers(0, 4, n) + y * rng.integers(0, 2, n)
    elif ties == "float32":
        s = s.astype(np.float32)
    return s, y


def _sk_f1max(s: np.ndarray, y: np.ndarray) -> float:
    """Max of 2PR/(P+R) over sklearn's precision-recall curve."""
    p, r, _ = sklearn_metrics.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return float(f.max())


def _reference_aupro(maps, labels, masks, thresholds, fpr_limit):
    """Slow AUPRO: loop over thresholds and regions, then clip/interpolate the curve at fpr_limit."""
    regions, normals = [], []
    for m, lab, msk in zip(maps, labels, masks):
        lesion = (lab != 0) & msk
        comp, n = ndimage.label(lesion, structure=np.ones((3,) * lesion.ndim))
        for r in range(1, n + 1):
            regions.append(m[comp == r])
        normals.append(m[msk & ~lesion])
    normal = np.concatenate(normals)
    pts = []
    for t in sorted(thresholds, reverse=True):
        pro = np.mean([np.mean(reg >= t) for reg in regions])
        fpr = np.mean(normal >= t)
        pts.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def _quantile_thresholds(maps, labels, masks, num, fpr_limit):
    """The documented threshold grid: quantiles of the normal scores for FPR in [0, limit] + one above the max."""
    normal = np.sort(np.concatenate([m[msk & (lab == 0)] for m, lab, msk in zip(maps, labels, masks)]))
    n = normal.size
    lo = min(int(math.floor(n * (1 - fpr_limit))), n - 1)
    idx = np.unique(np.linspace(lo, n - 1, num).round().astype(int))
    return list(normal[idx]) + [np.nextafter(normal[-1], np.inf)]


def _random_volumes(seed: int, n_vol: int = 2, shape=(8, 9, 7)):
    """Small random 3D maps with 2-3 blob lesions and a box mask per volume."""
    rng = np.random.default_rng(seed)
    maps, labels, masks = [], [], []
    for _ in range(n_vol):
        lab = np.zeros(shape, dtype=np.uint8)
        for _ in range(rng.integers(2, 4)):
            c = [rng.integers(1, s - 2) for s in shape]
            lab[c[0] : c[0] + rng.integers(1, 3), c[1] : c[1] + rng.integers(1, 4), c[2] : c[2] + 2] = 1
        m = np.round(rng.random(shape) + 0.5 * lab, 2)
        msk = np.zeros(shape, dtype=bool)
        msk[:, 1:, :] = True
        maps.append(m)
        labels.append(lab)
        masks.append(msk)
    return maps, labels, masks


# ----------------------------------------------------------------------------------------------
# voxel curves vs scikit-learn
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", ["none", "round1", "round2", "int", "float32"])
@pytest.mark.parametrize("n", [10, 137, 5_000, 100_000])
def test_curves_match_sklearn(ties, n):
    """roc_auc / average_precision / f1_max / best_dice equal scikit-learn, ties included."""
    for seed in range(3):
        s, y = _random_case(seed * 1000 + n, n, ties)
        assert abs(roc_auc(s, y) - sklearn_metrics.roc_auc_score(y, s)) < TOL
        assert abs(average_precision(s, y) - sklearn_metrics.average_precision_score(y, s)) < TOL
        f1, thr = f1_max(s, y)
        assert abs(f1 - _sk_f1max(s, y)) < TOL
        assert abs(dice_at(s, y, thr) - f1) < TOL  # the returned threshold attains the maximum
        assert best_dice(s, y) == (f1, thr)


def test_any_shape_int_labels_and_torch():
    """3D inputs, integer labels (nonzero = lesion) and torch tensors give the flat results."""
    torch = pytest.importorskip("torch")
    s, y = _random_case(7, 4 * 5 * 6, "round2")
    s3, y3 = s.reshape(4, 5, 6), (y.astype(np.int64) * 2).reshape(4, 5, 6)
    ref = sklearn_metrics.roc_auc_score(y, s)
    assert abs(roc_auc(s3, y3) - ref) < TOL
    assert abs(roc_auc(torch.from_numpy(s3), torch.from_numpy(y3)) - ref) < TOL
    assert abs(average_precision(torch.from_numpy(s3).float(), torch.from_numpy(y3 > 0)) -
               sklearn_metrics.average_precision_score(y, s.astype(np.float32))) < TOL
    assert abs(roc_auc(s3[None], y3) - ref) < TOL  # singleton channel dim tolerated


def test_shape_mismatch_and_nan_raise():
    """Mismatched shapes and NaN scores raise ValueError."""
    with pytest.raises(ValueError, match="shape"):
        roc_auc(np.zeros((3, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="shape"):
        dice_at(np.zeros(5), np.zeros(6), 0.5)
    with pytest.raises(ValueError, match="shape"):
        aupro([np.zeros((3, 3, 3))], [np.zeros((3, 3, 2))])
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([0.1, np.nan]), np.array([0, 1]))


def test_single_class_nan_without_warnings():
    """One-class inputs give nan (AUROC; AP/F1 without positives) and emit no warning."""
    s = np.random.default_rng(0).random(50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(roc_auc(s, np.zeros(50)))
        assert math.isnan(roc_auc(s, np.ones(50)))
        assert math.isnan(average_precision(s, np.zeros(50)))
        assert all(math.isnan(v) for v in f1_max(s, np.zeros(50)))
        assert average_precision(s, np.ones(50)) == 1.0
        assert f1_max(s, np.ones(50)) == (1.0, float(s.min()))
        assert math.isnan(aupro([s.reshape(5, 10)], [np.zeros((5, 10))]))


def test_dice_at_direct():
    """dice_at equals 2|A&B|/(|A|+|B|) and is 1 when both sets are empty."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        s = np.round(rng.random((6, 7, 8)), 1)
        y = rng.random((6, 7, 8)) < 0.2
        t = float(rng.choice(s.ravel()))
        p = s >= t
        assert abs(dice_at(s, y, t) - 2 * np.sum(p & y) / (p.sum() + y.sum())) < 1e-12
    assert dice_at(np.zeros(10), np.zeros(10), 1.0) == 1.0
    assert dice_at(np.zeros(10), np.zeros(10), 0.0) == 0.0


# ----------------------------------------------------------------------------------------------
# AUPRO
# ----------------------------------------------------------------------------------------------
def test_aupro_perfect_and_constant():
    """A perfect map gives 1; a constant map gives the diagonal: fpr_limit / 2."""
    maps, labels, masks = _random_volumes(0)
    perfect = [lab.astype(np.float32) for lab in labels]
    assert aupro(perfect, labels) == pytest.approx(1.0, abs=1e-12)
    assert aupro(perfect, labels, masks) == pytest.approx(1.0, abs=1e-12)
    const = [np.full(lab.shape, 0.7) for lab in labels]
    for limit in (0.3, 0.05, 1.0):
        assert aupro(const, labels, fpr_limit=limit) == pytest.approx(limit / 2, abs=1e-12)
        assert aupro(const, labels, fpr_limit=limit, num_thresholds=None) == pytest.approx(limit / 2, abs=1e-12)
    inverted = [1.0 - lab for lab in labels]
    assert aupro(inverted, labels) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_aupro_matches_slow_reference(seed):
    """Vectorised AUPRO equals a loop-over-thresholds reference (exact curve and quantile grid)."""
    maps, labels, masks = _random_volumes(seed, n_vol=2)
    all_scores = np.unique(np.concatenate([m.ravel() for m in maps]))
    thr_all = list(all_scores) + [np.nextafter(all_scores[-1], np.inf)]
    for limit in (0.3, 0.1):
        ref = _reference_aupro(maps, labels, masks, thr_all, limit)
        got = aupro(maps, labels, masks, fpr_limit=limit, num_thresholds=None)
        assert 0.0 <= got <= 1.0
        assert abs(got - ref) < 1e-9
        thr_q = _quantile_thresholds(maps, labels, masks, 30, limit)
        ref_q = _reference_aupro(maps, labels, masks, thr_q, limit)
        assert abs(aupro(maps, labels, masks, fpr_limit=limit, num_thresholds=30) - ref_q) < 1e-9
        assert abs(aupro(maps, labels, masks, fpr_limit=limit) - ref) < 0.02  # 200 quantiles ~ exact curve
    # without masks, and a stacked 4D array instead of lists
    full = [np.ones(m.shape, dtype=bool) for m in maps]
    ref = _reference_aupro(maps, labels, full, thr_all, 0.3)
    assert abs(aupro(np.stack(maps), np.stack(labels), num_thresholds=None) - ref) < 1e-9


def test_aupro_regions_use_full_connectivity():
    """Diagonally touching voxels form one region (26-connectivity)."""
    lab = np.zeros((4, 4, 4), dtype=bool)
    lab[0, 0, 0] = lab[1, 1, 1] = True  # one region of 2 voxels with full connectivity
    lab[3, 3, 3] = True  # second region
    m = np.zeros(lab.shape)
    m[0, 0, 0] = 1.0  # detects half of region 1 only
    # PRO at FPR 0 = mean(0.5, 0) = 0.25; then jumps to 1 at FPR 1 -> curve (0,.25)->(1,1)
    expected = (0.25 + (0.25 + 0.75 * 0.3)) / 2 * 0.3 / 0.3
    assert aupro(m, lab) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# slice level
# ----------------------------------------------------------------------------------------------
def test_slice_labels_and_scores_hand_made():
    """Slice labels/scores on a small hand-made volume, along the last and the first axis."""
    lab = np.zeros((4, 4, 3), dtype=np.uint8)
    lab[0, 0, 0] = lab[1, 0, 0] = 1  # slice 0 (axis -1): 2 voxels
    lab[2, 2, 2] = 1  # slice 2: 1 voxel
    assert slice_labels(lab).tolist() == [True, False, True]
    assert slice_labels(lab, min_voxels=2).tolist() == [True, False, False]
    assert slice_labels(lab, axis=0).tolist() == [True, True, True, False]

    m = np.zeros((4, 4, 3))
    m[..., 0] = np.arange(16).reshape(4, 4)  # slice 0 values 0..15
    m[..., 1] = 5.0
    m[..., 2] = -np.arange(16).reshape(4, 4)
    # no mask: 16 voxels per slice; q=0.25 -> top 4
    np.testing.assert_allclose(slice_scores(m, q=0.25), [(15 + 14 + 13 + 12) / 4, 5.0, -(0 + 1 + 2 + 3) / 4])
    # q tiny -> at least one voxel (the max)
    np.testing.assert_allclose(slice_scores(m, q=1e-6), [15.0, 5.0, 0.0])
    mask = np.zeros((4, 4, 3), dtype=bool)
    mask[:2, :, 0] = True  # slice 0 foreground: values 0..7
    mask[0, 0, 2] = True  # slice 2 foreground: value 0
    # slice 1 has no foreground -> 0; q=0.25 of 8 -> top 2
    np.testing.assert_allclose(slice_scores(m, mask, q=0.25), [(7 + 6) / 2, 0.0, 0.0])
    np.testing.assert_allclose(slice_scores(m, mask, q=1.0), [3.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        slice_scores(m, mask[..., :2])


# ----------------------------------------------------------------------------------------------
# accumulator
# ----------------------------------------------------------------------------------------------
def _fill_accumulator(acc, seed=0):
    """Add 3 abnormal and 2 normal random volumes; return what sklearn needs."""
    maps, labels, masks = _random_volumes(seed, n_vol=3, shape=(10, 9, 8))
    rng = np.random.default_rng(seed + 100)
    normals = [np.round(rng.random((10, 9, 8)), 2) for _ in range(2)]
    per = {}
    for i, (m, lab, msk) in enumerate(zip(maps, labels, masks)):
        per[f"abn{i}"] = acc.add(f"abn{i}", m, lab, msk, volume_score=1.0 + i, threshold=0.9)
    for i, m in enumerate(normals):
        per[f"nrm{i}"] = acc.add(f"nrm{i}", m, None, masks[0], volume_score=0.5 + 0.8 * i, threshold=0.9)
    return maps + normals, labels + [np.zeros((10, 9, 8), np.uint8)] * 2, masks + [masks[0]] * 2, per


def test_accumulator_pooled_and_per_volume_vs_sklearn():
    """Pooled voxel metrics, per-volume metrics, slice and volume metrics equal sklearn / direct values."""
    acc = VolumeMetricAccumulator(axis=-1, q=0.05)
    maps, labels, masks, per = _fill_accumulator(acc)
    res = acc.compute()
    s = np.concatenate([m[k].astype(np.float32) for m, k in zip(maps, masks)])
    y = np.concatenate([(lab[k] != 0) for lab, k in zip(labels, masks)])
    v = res["voxel"]
    assert abs(v["ap"] - sklearn_metrics.average_precision_score(y, s)) < TOL
    assert abs(v["auroc"] - sklearn_metrics.roc_auc_score(y, s)) < TOL
    assert abs(v["best_dice"] - _sk_f1max(s, y)) < TOL
    assert v["chance_ap"] == y.mean()  # the AP of a map without information: the lesion fraction
    assert abs(v["dice_at_threshold"] - dice_at(s, y, 0.9)) < 1e-12
    assert abs(v["aupro"] - aupro([m.astype(np.float32) for m in maps], labels, masks)) < 1e-12
    for i in range(3):
        si = maps[i][masks[i]].astype(np.float32)
        yi = labels[i][masks[i]] != 0
        d = res["per_volume"][f"abn{i}"]
        assert d == per[f"abn{i}"]
        assert abs(d["ap"] - sklearn_metrics.average_precision_score(yi, si)) < TOL
        assert abs(d["auroc"] - sklearn_metrics.roc_auc_score(yi, si)) < TOL
        assert abs(d["best_dice"] - _sk_f1max(si, yi)) < TOL
    assert math.isnan(res["per_volume"]["nrm0"]["ap"]) and res["per_volume"]["nrm0"]["is_normal"]
    assert abs(v["mean_per_volume_ap"] - np.mean([per[f"abn{i}"]["ap"] for i in range(3)])) < 1e-12
    # slice level
    fg = [k.reshape(-1, k.shape[-1]).any(0) for k in masks]  # only slices holding foreground are scored
    sl_s = np.concatenate([slice_scores(m, k, q=0.05)[f] for m, k, f in zip(maps, masks, fg)])
    sl_y = np.concatenate([slice_labels((lab != 0) & k)[f] for lab, k, f in zip(labels, masks, fg)])
    assert abs(res["slice"]["auroc"] - sklearn_metrics.roc_auc_score(sl_y, sl_s)) < TOL
    assert abs(res["slice"]["ap"] - sklearn_metrics.average_precision_score(sl_y, sl_s)) < TOL
    assert abs(res["slice"]["f1max"] - _sk_f1max(sl_s, sl_y)) < TOL
    assert res["slice"]["chance_ap"] == sl_y.mean()
    # volume level: scores 1,2,3 (abnormal) vs 0.5, 1.3 (normal)
    vs, vy = np.array([1.0, 2.0, 3.0, 0.5, 1.3]), np.array([1, 1, 1, 0, 0])
    assert abs(res["volume"]["auroc"] - sklearn_metrics.roc_auc_score(vy, vs)) < TOL
    assert abs(res["volume"]["ap"] - sklearn_metrics.average_precision_score(vy, vs)) < TOL
    assert abs(res["volume"]["f1max"] - _sk_f1max(vs, vy)) < TOL
    assert res["volume"]["chance_ap"] == 0.6
    c = res["counts"]
    assert (c["volumes"], c["normal_volumes"], c["abnormal_volumes"]) == (5, 2, 3)
    assert c["voxels"] == c["voxels_used"] == s.size and not c["subsampled"]
    assert c["lesion_voxels"] == int(y.sum())
    table = format_metrics_table(res)
    assert "aupro" in table and "voxel" in table and f"{v['ap']:.4f}" in table


def test_slice_metrics_leave_out_slices_without_foreground():
    """A map with no information (constant in the mask) has slice AUROC 0.5: empty slices are not easy normals."""
    shape = (6, 6, 10)
    msk = np.zeros(shape, dtype=bool)
    msk[1:5, 1:5, 2:8] = True  # slices 0-1 and 8-9 hold no foreground
    lab = np.zeros(shape, dtype=np.uint8)
    lab[2:4, 2:4, 3:5] = 1
    acc = VolumeMetricAccumulator(axis=-1)
    acc.add("abn", np.where(msk, 1.0, 0.0), lab, msk)
    acc.add("nrm", np.where(msk, 1.0, 0.0), None, msk)
    res = acc.compute()
    assert res["counts"]["slices"] == 12 and res["counts"]["abnormal_slices"] == 2
    assert abs(res["slice"]["auroc"] - 0.5) < 1e-12
    # without a mask every slice counts
    acc = VolumeMetricAccumulator(axis=-1)
    acc.add("abn", np.where(msk, 1.0, 0.0), lab)
    assert acc.compute()["counts"]["slices"] == 10


def test_accumulator_volume_metrics_need_both_classes():
    """Volume-level metrics are nan with only abnormal volumes; defaults derive is_normal and volume_score."""
    acc = VolumeMetricAccumulator()
    maps, labels, masks = _random_volumes(5, n_vol=2)
    for i, (m, lab, k) in enumerate(zip(maps, labels, masks)):
        d = acc.add(f"v{i}", m, lab, k)
        assert not d["is_normal"] and d["volume_score"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = acc.compute()
    assert all(math.isnan(res["volume"][k]) for k in ("auroc", "ap", "f1max"))
    assert "dice_at_threshold" not in res["voxel"]
    with pytest.raises(ValueError, match="already"):
        acc.add("v0", maps[0])
    with pytest.raises(ValueError, match="shape"):
        acc.add("bad", maps[0], labels[0][:-1])


def test_accumulator_subsampling_deterministic():
    """Subsampled pooling is reported, uses exactly max_pooled_voxels voxels and is reproducible per seed."""
    results = []
    for seed in (0, 0, 1):
        acc = VolumeMetricAccumulator(max_pooled_voxels=1000, seed=seed)
        _fill_accumulator(acc, seed=3)
        results.append(acc.compute())
    a, b, c = results
    assert a["counts"]["subsampled"] and a["counts"]["voxels_used"] == 1000
    assert a["counts"]["voxels"] > 1000
    assert a["voxel"] == b["voxel"]
    assert a["voxel"]["ap"] != c["voxel"]["ap"]
    exact = VolumeMetricAccumulator()
    _fill_accumulator(exact, seed=3)
    e = exact.compute()
    assert abs(a["voxel"]["auroc"] - e["voxel"]["auroc"]) < 0.1  # an unbiased estimate of the exact value
    assert 0.0 <= a["voxel"]["aupro"] <= 1.0


def test_accumulator_accepts_torch_and_inf_scores():
    """Torch tensors go through add(); infinite scores keep every metric finite and in range."""
    torch = pytest.importorskip("torch")
    maps, labels, masks = _random_volumes(9, n_vol=1)
    acc = VolumeMetricAccumulator()
    d = acc.add("t", torch.from_numpy(maps[0]), torch.from_numpy(labels[0]), torch.from_numpy(masks[0]))
    si, yi = maps[0][masks[0]].astype(np.float32), labels[0][masks[0]] != 0
    assert abs(d["ap"] - sklearn_metrics.average_precision_score(yi, si)) < TOL
    m = maps[0].copy()
    m[0, 1, 0] = np.inf
    assert 0.0 <= aupro(m, labels[0], masks[0]) <= 1.0
    assert 0.0 <= aupro(m, labels[0], masks[0], num_thresholds=None) <= 1.0
