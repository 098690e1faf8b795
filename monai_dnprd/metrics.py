"""Voxel-, slice- and volume-level anomaly-detection metrics (AUROC, AP, F1max / best Dice, AUPRO).

All curve metrics are exact and tie-aware (they equal scikit-learn's ``roc_auc_score``,
``average_precision_score`` and the maximum F1 of ``precision_recall_curve``) but avoid a full
``argsort``: the negative scores are sorted once with ``np.sort`` (SIMD, no int64 index array),
the positive scores are reduced to their distinct values with counts, and every threshold count
comes from ``np.searchsorted``.  Only distinct positive scores can change recall, so AP, F1 and the
Mann-Whitney form of the AUROC (ties count one half) need nothing else.  This is 3-10x faster and
lighter than an argsort on 10^7-10^8 voxels.  ``numpy`` arrays and ``torch`` tensors are accepted,
any shape (flattened); float32 scores stay float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "roc_auc",
    "average_precision",
    "f1_max",
    "dice_at",
    "best_dice",
    "aupro",
    "slice_labels",
    "slice_scores",
    "VolumeMetricAccumulator",
    "format_metrics_table",
]


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array (torch tensors are detached and moved to the CPU, no copy for numpy)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        x = x.numpy() if hasattr(x, "numpy") else x
    return np.asarray(x)


def _as_scores(x: Any, name: str = "scores") -> np.ndarray:
    """Return scores as a float array (float32/float64 kept without copy, others promoted) and reject NaN."""
    a = _to_numpy(x)
    if a.dtype == np.float32 or a.dtype == np.float64:
        pass
    elif a.dtype == np.float16:
        a = a.astype(np.float32)
    elif a.dtype.kind in "biu":
        a = a.astype(np.float64)
    elif a.dtype.kind == "f":
        a = a.astype(np.float64)
    else:
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if a.size and np.isnan(a).any():
        raise ValueError(f"{name} contain NaN")
    return a


def _as_labels(x: Any, name: str = "labels") -> np.ndarray:
    """Return labels as a bool array (nonzero = anomalous/lesion)."""
    a = _to_numpy(x)
    if a.dtype == np.bool_:
        return a
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be bool or numeric, got dtype {a.dtype}")
    return a != 0


def _squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape without singleton dimensions (so (1, D, H, W) matches (D, H, W))."""
    return tuple(s for s in shape if s != 1)


def _check_shapes(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise ValueError unless ``a`` and ``b`` have the same shape (up to singleton dimensions)."""
    if a.shape != b.shape and _squeezed_shape(a.shape) != _squeezed_shape(b.shape):
        raise ValueError(f"shape mismatch: {name_a} has shape {a.shape} but {name_b} has shape {b.shape}")


def _prepare(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten a (scores, labels) pair."""
    s = _as_scores(scores)
    y = _as_labels(labels)
    _check_shapes(s, y, "scores", "labels")
    return s.reshape(-1), y.reshape(-1)


# ----------------------------------------------------------------------------------------------
# shared binary curve
# ----------------------------------------------------------------------------------------------
@dataclass
class _CurveStats:
    """Counts at every distinct positive score, enough for exact AUROC, AP and F1max."""

    n_pos: int
    n_neg: int
    pos_values: np.ndarray  # distinct positive scores, ascending
    pos_counts: np.ndarray  # int64, positives equal to each value
    tp: np.ndarray  # int64, positives >= value
    fp: np.ndarray  # int64, negatives >= value
    neg_eq: np.ndarray  # int64, negatives == value
    neg_sorted: np.ndarray | None  # ascending negative scores (kept for AUPRO reuse)


def _curve_stats(s: np.ndarray, y: np.ndarray, keep_neg: bool = False) -> _CurveStats:
    """Sort negatives once and count, for every distinct positive score v, TP(>=v), FP(>=v) and ties."""
    pos = s[y]
    neg = s[~y]
    neg.sort()
    if pos.size:
        pos_values, pos_counts = np.unique(pos, return_counts=True)
    else:
        pos_values, pos_counts = pos, np.zeros(0, dtype=np.int64)
    pos_counts = pos_counts.astype(np.int64, copy=False)
    n_pos, n_neg = int(pos.size), int(neg.size)
    lt = np.searchsorted(neg, pos_values, side="left").astype(np.int64, copy=False)
    le = np.searchsorted(neg, pos_values, side="right").astype(np.int64, copy=False)
    tp = n_pos - (np.cumsum(pos_counts) - pos_counts)
    return _CurveStats(n_pos, n_neg, pos_values, pos_counts, tp, n_neg - lt, le - lt, neg if keep_neg else None)


def _auroc_from(st: _CurveStats) -> float:
    """Exact trapezoidal ROC AUC = Mann-Whitney U / (n_pos n_neg), ties counted one half."""
    if st.n_pos == 0 or st.n_neg == 0:
        return math.nan
    below = st.n_neg - st.fp  # negatives strictly below each positive value
    num = int(np.dot(st.pos_counts, 2 * below + st.neg_eq))
    return num / (2 * st.n_pos * st.n_neg)


def _ap_from(st: _CurveStats) -> float:
    """Step-wise average precision: sum over distinct positive scores of delta-recall x precision."""
    if st.n_pos == 0:
        return math.nan
    precision = st.tp / (st.tp + st.fp)
    return float(np.dot(st.pos_counts, precision) / st.n_pos)


def _f1_from(st: _CurveStats) -> tuple[float, float]:
    """Best F1 = 2TP/(TP+FP+P) over thresholds; the optimum is always at a distinct positive score."""
    if st.n_pos == 0:
        return math.nan, math.nan
    f1 = 2.0 * st.tp / (st.tp + st.fp + st.n_pos)
    i = int(np.argmax(f1))  # ascending thresholds: ties resolved to the lowest threshold, like argmax on sklearn's curve
    return float(f1[i]), float(st.pos_values[i])


# ----------------------------------------------------------------------------------------------
# public voxel metrics
# ----------------------------------------------------------------------------------------------
def roc_auc(scores: Any, labels: Any) -> float:
    """Exact ROC AUC (== sklearn.metrics.roc_auc_score, ties as trapezoids); nan when only one class is present."""
    return _auroc_from(_curve_stats(*_prepare(scores, labels)))


def average_precision(scores: Any, labels: Any) -> float:
    """Exact average precision (== sklearn.metrics.average_precision_score); nan when there is no positive."""
    return _ap_from(_curve_stats(*_prepare(scores, labels)))


def f1_max(scores: Any, labels: Any) -> tuple[float, float]:
    """Best F1 over all thresholds (prediction = scores >= t) and that threshold; (nan, nan) without positives."""
    return _f1_from(_curve_stats(*_prepare(scores, labels)))


def best_dice(scores: Any, labels: Any) -> tuple[float, float]:
    """Best voxel Dice over thresholds and its threshold (Dice == F1 for binary voxels; alias of f1_max)."""
    return f1_max(scores, labels)


def dice_at(scores: Any, labels: Any, threshold: float) -> float:
    """Dice of (scores >= threshold) against labels; 1.0 when both are empty."""
    s, y = _prepare(scores, labels)
    pred = s >= threshold
    n_pred, n_true = int(np.count_nonzero(pred)), int(np.count_nonzero(y))
    if n_pred + n_true == 0:
        return 1.0
    inter = int(np.count_nonzero(pred & y))
    return 2.0 * inter / (n_pred + n_true)


# ----------------------------------------------------------------------------------------------
# AUPRO
# ----------------------------------------------------------------------------------------------
def _as_volume_list(x: Any, name: str) -> list[Any]:
    """Split volumes: list/tuple -> as is; array with ndim >= 4 -> stack along axis 0; else one volume."""
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    a = _to_numpy(x)
    if a.ndim >= 4:
        return list(a)
    return [a]


def _full_structure(ndim: int) -> np.ndarray:
    """Full-connectivity structuring element (26-neighbourhood in 3D)."""
    return ndimage.generate_binary_structure(max(ndim, 1), max(ndim, 1))


def _region_ids(lesion: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (full connectivity) of a bool volume: ids (0-based) of lesion voxels in C order, count."""
    if lesion.ndim == 0:
        lesion = lesion.reshape(1)
    comp, n = ndimage.label(lesion, structure=_full_structure(lesion.ndim))
    return (comp[lesion] - 1).astype(np.int64, copy=False), int(n)


def _aupro_core(
    neg_sorted: np.ndarray,
    lesion_scores: np.ndarray,
    region_ids: np.ndarray,
    fpr_limit: float,
    num_thresholds: int | None,
) -> float:
    """AUPRO from ascending normal scores and lesion scores with region ids (regions = distinct ids)."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if lesion_scores.size == 0 or neg_sorted.size == 0:
        return math.nan
    # region sizes -> each lesion voxel weighs 1 / (size_r * R), so PRO(t) = weight of lesion voxels >= t
    _, inv, sizes = np.unique(region_ids, return_inverse=True, return_counts=True)
    weights = 1.0 / (sizes[inv].astype(np.float64) * sizes.size)
    order = np.argsort(lesion_scores, kind="stable")
    les_sorted = lesion_scores[order]
    tail = np.concatenate([np.cumsum(weights[order][::-1])[::-1], [0.0]])  # tail[i] = weight of les_sorted[i:]

    n = neg_sorted.size
    dtype = np.result_type(neg_sorted.dtype, lesion_scores.dtype)
    neg_sorted = neg_sorted.astype(dtype, copy=False)
    les_sorted = les_sorted.astype(dtype, copy=False)
    lo = min(int(math.floor(n * (1.0 - fpr_limit))), n - 1)
    while lo > 0 and (n - lo) / n < fpr_limit:  # guard rounding: FPR(neg[lo]) >= fpr_limit is required
        lo -= 1
    if num_thresholds is None:
        thr = np.unique(np.concatenate([neg_sorted[lo:], les_sorted[les_sorted >= neg_sorted[lo]]]))
    else:
        if num_thresholds < 2:
            raise ValueError(f"num_thresholds must be >= 2 or None, got {num_thresholds}")
        idx = np.unique(np.linspace(lo, n - 1, num_thresholds).round().astype(np.int64))
        thr = np.unique(neg_sorted[idx])  # quantiles of the normal scores spanning FPR in [0, fpr_limit]
    top = np.nextafter(neg_sorted[-1], np.array(np.inf, dtype=dtype))  # FPR = 0 with the largest PRO
    thr = np.concatenate([thr, [top]]).astype(dtype, copy=False)[::-1]  # descending -> FPR, PRO ascending

    fpr = (n - np.searchsorted(neg_sorted, thr, side="left")) / n
    pro = tail[np.searchsorted(les_sorted, thr, side="left")]
    if fpr[0] > 0.0:  # only with infinite normal scores: start the curve at the origin
        fpr, pro = np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit (k >= 1 since fpr[0] == 0)
    x, yv = fpr[:k], pro[:k]
    if x[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        y_end = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, yv = np.append(x, fpr_limit), np.append(yv, y_end)
    area = float(np.sum(np.diff(x) * (yv[1:] + yv[:-1]) * 0.5))
    return min(max(area / fpr_limit, 0.0), 1.0)


def aupro(
    maps: Any,
    labels: Any,
    masks: Any = None,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = 200,
) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD AUPRO, 3D regions).

    ``maps``/``labels``/``masks`` are lists with one array per volume, or one array (ndim >= 4: a stack
    along axis 0; ndim <= 3: a single volume).  Labels are restricted to the mask; regions are the
    full-connectivity connected components of each volume's label, pooled over volumes; FPR counts
    normal voxels inside the mask.  Thresholds are ``num_thresholds`` quantiles of the normal scores
    spanning FPR in [0, fpr_limit] (plus one just above the largest normal score, FPR = 0);
    ``num_thresholds=None`` uses every distinct score in that range (exact curve).  The curve end point is
    interpolated at ``fpr_limit``; the area is divided by ``fpr_limit``.  nan without any region.
    """
    map_list, lab_list = _as_volume_list(maps, "maps"), _as_volume_list(labels, "labels")
    mask_list = _as_volume_list(masks, "masks") if masks is not None else [None] * len(map_list)
    if len(map_list) != len(lab_list) or len(map_list) != len(mask_list):
        raise ValueError(
            f"number of volumes differs: {len(map_list)} maps, {len(lab_list)} labels, {len(mask_list)} masks"
        )
    neg_parts, les_parts, id_parts, offset = [], [], [], 0
    for i, (m, lab, msk) in enumerate(zip(map_list, lab_list, mask_list)):
        m = _as_scores(m, "maps")
        lab = _as_labels(lab, "labels")
        _check_shapes(m, lab, f"maps[{i}]", f"labels[{i}]")
        lab = lab.reshape(m.shape)
        if msk is not None:
            msk = _as_labels(msk, "masks")
            _check_shapes(m, msk, f"maps[{i}]", f"masks[{i}]")
            msk = msk.reshape(m.shape)
            lesion, normal = lab & msk, msk & ~lab
        else:
            lesion, normal = lab, ~lab
        ids, n_reg = _region_ids(lesion)
        neg_parts.append(m[normal])
        les_parts.append(m[lesion].reshape(-1))
        id_parts.append(ids + offset)
        offset += n_reg
    if offset == 0:
        return math.nan
    neg = np.concatenate(neg_parts)
    neg.sort()
    return _aupro_core(neg, np.concatenate(les_parts), np.concatenate(id_parts), fpr_limit, num_thresholds)


# ----------------------------------------------------------------------------------------------
# slice level
# ----------------------------------------------------------------------------------------------
def _slices_2d(a: np.ndarray, axis: int) -> np.ndarray:
    """View a volume as (n_slices, voxels_per_slice) with slices taken along ``axis``."""
    if a.ndim == 0:
        raise ValueError("need at least a 1-D volume")
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def slice_labels(label_volume: Any, axis: int = -1, min_voxels: int = 1) -> np.ndarray:
    """Per-slice bool along ``axis``: a slice is anomalous when it holds >= ``min_voxels`` lesion voxels."""
    lab = _as_labels(label_volume, "label_volume")
    return np.count_nonzero(_slices_2d(lab, axis), axis=1) >= max(int(min_voxels), 1)


def slice_scores(map_volume: Any, mask_volume: Any = None, axis: int = -1, q: float = 0.01) -> np.ndarray:
    """Per-slice score: mean of the top ``q`` fraction (at least one voxel) of map values inside the mask; 0 without foreground."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    m = _as_scores(map_volume, "map_volume")
    rows = _slices_2d(m, axis)
    if mask_volume is None:
        n_fg = np.full(rows.shape[0], rows.shape[1], dtype=np.int64)
        srt = np.sort(rows, axis=1)
    else:
        msk = _as_labels(mask_volume, "mask_volume")
        _check_shapes(m, msk, "map_volume", "mask_volume")
        mrows = _slices_2d(msk.reshape(m.shape), axis)
        n_fg = np.count_nonzero(mrows, axis=1).astype(np.int64)
        srt = np.sort(np.where(mrows, rows, -np.inf), axis=1)
    k = np.where(n_fg > 0, np.maximum(np.ceil(q * n_fg).astype(np.int64), 1), 0)
    out = np.zeros(rows.shape[0], dtype=np.float64)
    kmax = int(k.max()) if k.size else 0
    if kmax == 0:
        return out
    top = srt[:, ::-1][:, :kmax].astype(np.float64)  # descending, finite within the first n_fg columns
    top[np.arange(kmax)[None, :] >= n_fg[:, None]] = 0.0  # drop the -inf fill of background voxels
    csum = np.cumsum(top, axis=1)
    has = k > 0
    out[has] = csum[has, k[has] - 1] / k[has]
    return out


def _top_q_mean(values: np.ndarray, q: float) -> float:
    """Mean of the top ``q`` fraction (at least one) of ``values``; 0 when empty."""
    n = values.size
    if n == 0:
        return 0.0
    k = max(int(math.ceil(q * n)), 1)
    return float(np.partition(values, n - k)[n - k :].astype(np.float64).mean())


# ----------------------------------------------------------------------------------------------
# accumulator
# ----------------------------------------------------------------------------------------------
def _nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values; nan (without a warning) when there is none."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def _binary_summary(scores: np.ndarray, labels: np.ndarray) -> dict:
    """AUROC, AP, F1max and its threshold of a small score/label set (slice or volume level)."""
    st = _curve_stats(scores, labels)
    f1, thr = _f1_from(st)
    chance = float(np.mean(labels)) if labels.size else math.nan
    return {"auroc": _auroc_from(st), "ap": _ap_from(st), "chance_ap": chance, "f1max": f1, "f1max_threshold": thr}


@dataclass
class _VolumeRecord:
    """What the accumulator keeps per volume (masked voxels only)."""

    scores: np.ndarray  # float32, voxels inside the mask (C order)
    label_bits: np.ndarray  # np.packbits of the masked labels
    n: int
    region_ids: np.ndarray  # int32 region id (0-based, local) of each masked lesion voxel, in order
    n_regions: int
    slice_scores: np.ndarray
    slice_labels: np.ndarray
    volume_score: float
    is_normal: bool
    threshold: float | None


class VolumeMetricAccumulator:
    """Collects per-volume maps and labels and computes pooled and per-volume metrics (MOOD pools voxels over volumes).

    Only the voxels inside each mask are kept (float32 scores + packed label bits + region ids of the
    lesion voxels), plus the slice scores/labels of the slices that hold foreground (slices outside the
    mask would count as easy normals and inflate the slice metrics of any map) and the volume score.
    ``compute`` pools voxels over volumes; when ``max_pooled_voxels`` is set and exceeded, a uniform random
    subset of that size (``numpy.random.default_rng(seed)``, without replacement) is used for the pooled voxel
    metrics and AUPRO (regions are then sized by their sampled voxels) and ``counts["subsampled"]`` is True.
    ``threshold`` (optional) is the fixed threshold for the pooled ``dice_at_threshold``; when it is
    None and every ``add`` call that passed a threshold passed the same one, that one is used.
    """

    def __init__(
        self,
        axis: int = -1,
        min_slice_voxels: int = 1,
        q: float = 0.01,
        fpr_limit: float = 0.3,
        max_pooled_voxels: int | None = None,
        seed: int = 0,
        threshold: float | None = None,
        num_thresholds: int | None = 200,
    ) -> None:
        """Store the settings: slice axis, slice-label size, top-q fraction, AUPRO limit, pooling cap and seed."""
        if not 0.0 < q <= 1.0:
            raise ValueError(f"q must be in (0, 1], got {q}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        if max_pooled_voxels is not None and max_pooled_voxels < 1:
            raise ValueError(f"max_pooled_voxels must be positive or None, got {max_pooled_voxels}")
        self.axis = axis
        self.min_slice_voxels = min_slice_voxels
        self.q = q
        self.fpr_limit = fpr_limit
        self.max_pooled_voxels = max_pooled_voxels
        self.seed = seed
        self.threshold = threshold
        self.num_thresholds = num_thresholds
        self._records: dict[str, _VolumeRecord] = {}
        self._per_volume: dict[str, dict] = {}

    def __len__(self) -> int:
        """Number of volumes added."""
        return len(self._records)

    def reset(self) -> None:
        """Forget all added volumes."""
        self._records.clear()
        self._per_volume.clear()

    def add(
        self,
        name: str,
        anomaly_map: Any,
        label: Any = None,
        mask: Any = None,
        volume_score: float | None = None,
        is_normal: bool | None = None,
        threshold: float | None = None,
        axis: int | None = None,
    ) -> dict:
        """Add one volume (label None = normal volume) and return its own metrics (nan where undefined).

        ``axis`` overrides the slicing axis for this volume (volumes of different orientations in one run).

        ``volume_score`` defaults to the mean of the top ``q`` fraction of masked map values;
        ``is_normal`` defaults to "no lesion voxel inside the mask".
        """
        if name in self._records:
            raise ValueError(f"volume {name!r} was already added")
        m = _as_scores(anomaly_map, "anomaly_map")
        if label is None:
            lab = np.zeros(m.shape, dtype=bool)
        else:
            lab = _as_labels(label, "label")
            _check_shapes(m, lab, "anomaly_map", "label")
            lab = lab.reshape(m.shape)
        if mask is None:
            msk = None
            s = m.reshape(-1).astype(np.float32, copy=True)
            y = lab.reshape(-1)
            lesion = lab
        else:
            msk = _as_labels(mask, "mask")
            _check_shapes(m, msk, "anomaly_map", "mask")
            msk = msk.reshape(m.shape)
            s = m[msk].astype(np.float32, copy=False)
            lesion = lab & msk
            y = lesion[msk]
        ids, n_reg = _region_ids(lesion)
        axis = self.axis if axis is None else axis
        sl_scores = slice_scores(m, msk, axis=axis, q=self.q)
        sl_labels = slice_labels(lesion, axis=axis, min_voxels=self.min_slice_voxels)
        if msk is not None:  # a slice without foreground holds no prediction: leave it out of the slice metrics
            has_fg = np.count_nonzero(_slices_2d(msk, axis), axis=1) > 0
            sl_scores, sl_labels = sl_scores[has_fg], sl_labels[has_fg]
        n_les = int(np.count_nonzero(y))
        vs = float(volume_score) if volume_score is not None else _top_q_mean(s, self.q)
        normal = bool(n_les == 0) if is_normal is None else bool(is_normal)
        rec = _VolumeRecord(
            scores=s,
            label_bits=np.packbits(y),
            n=int(s.size),
            region_ids=ids.astype(np.int32),
            n_regions=n_reg,
            slice_scores=sl_scores,
            slice_labels=sl_labels,
            volume_score=vs,
            is_normal=normal,
            threshold=None if threshold is None else float(threshold),
        )
        st = _curve_stats(s, y)
        bd, bd_thr = _f1_from(st)
        out = {
            "auroc": _auroc_from(st),
            "ap": _ap_from(st),
            "best_dice": bd,
            "best_dice_threshold": bd_thr,
        }
        thr = threshold if threshold is not None else self.threshold
        if thr is not None:
            out["dice_at_threshold"] = dice_at(s, y, float(thr))
        out.update(
            {
                "volume_score": vs,
                "is_normal": normal,
                "n_voxels": rec.n,
                "n_lesion_voxels": n_les,
                "n_regions": n_reg,
            }
        )
        self._records[name] = rec
        self._per_volume[name] = out
        return dict(out)

    def _pooled_threshold(self, threshold: float | None) -> float | None:
        """Threshold for the pooled Dice: argument, constructor value, or the one common add() threshold."""
        if threshold is not None:
            return float(threshold)
        if self.threshold is not None:
            return float(self.threshold)
        given = {r.threshold for r in self._records.values() if r.threshold is not None}
        return given.pop() if len(given) == 1 else None

    def _pooled(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """Concatenate masked voxels, labels and global region ids (optionally subsampled)."""
        recs = list(self._records.values())
        s = np.concatenate([r.scores for r in recs])
        y = np.concatenate([np.unpackbits(r.label_bits, count=r.n).astype(bool) for r in recs])
        offsets = np.cumsum([0] + [r.n_regions for r in recs])[:-1]
        ids = np.concatenate([r.region_ids.astype(np.int64) + o for r, o in zip(recs, offsets)])
        cap = self.max_pooled_voxels
        if cap is None or s.size <= cap:
            return s, y, ids, False
        rng = np.random.default_rng(self.seed)
        idx = np.sort(rng.choice(s.size, size=cap, replace=False))
        lesion_pos = np.flatnonzero(y)
        y_sub = y[idx]
        ids_sub = ids[np.searchsorted(lesion_pos, idx[y_sub])]
        return s[idx], y_sub, ids_sub, True

    def compute(self, threshold: float | None = None) -> dict:
        """Pooled voxel metrics + AUPRO, slice- and volume-level metrics, per-volume metrics and counts."""
        if not self._records:
            raise ValueError("no volume was added")
        recs = list(self._records.values())
        s, y, ids, subsampled = self._pooled()
        st = _curve_stats(s, y, keep_neg=True)
        bd, bd_thr = _f1_from(st)
        # chance_ap: the AP of a map with no information, i.e. the lesion fraction, to read "ap" against
        chance = float(np.count_nonzero(y)) / y.size if y.size else math.nan
        voxel = {"auroc": _auroc_from(st), "ap": _ap_from(st), "chance_ap": chance, "best_dice": bd,
                 "best_dice_threshold": bd_thr}
        thr = self._pooled_threshold(threshold)
        if thr is not None:
            voxel["dice_at_threshold"] = dice_at(s, y, thr)
        voxel["aupro"] = (
            _aupro_core(st.neg_sorted, s[y], ids, self.fpr_limit, self.num_thresholds) if ids.size else math.nan
        )
        pv = list(self._per_volume.values())
        voxel["mean_per_volume_ap"] = _nanmean([d["ap"] for d in pv])
        voxel["mean_per_volume_auroc"] = _nanmean([d["auroc"] for d in pv])
        voxel["mean_per_volume_best_dice"] = _nanmean([d["best_dice"] for d in pv])

        sl_s = np.concatenate([r.slice_scores for r in recs])
        sl_y = np.concatenate([r.slice_labels for r in recs])
        slc = _binary_summary(sl_s, sl_y)

        v_s = np.array([r.volume_score for r in recs], dtype=np.float64)
        v_y = np.array([not r.is_normal for r in recs], dtype=bool)
        if v_y.all() or not v_y.any():
            vol = {"auroc": math.nan, "ap": math.nan, "chance_ap": math.nan, "f1max": math.nan, "f1max_threshold": math.nan}
        else:
            vol = _binary_summary(v_s, v_y)

        n_total = sum(r.n for r in recs)
        counts = {
            "volumes": len(recs),
            "normal_volumes": int(np.count_nonzero(~v_y)),
            "abnormal_volumes": int(np.count_nonzero(v_y)),
            "voxels": int(n_total),
            "lesion_voxels": int(sum(d["n_lesion_voxels"] for d in pv)),
            "regions": int(sum(r.n_regions for r in recs)),
            "voxels_used": int(s.size),
            "subsampled": bool(subsampled),
            "slices": int(sl_y.size),
            "abnormal_slices": int(np.count_nonzero(sl_y)),
        }
        return {
            "voxel": voxel,
            "slice": slc,
            "volume": vol,
            "per_volume": {k: dict(v) for k, v in self._per_volume.items()},
            "counts": counts,
        }


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
def _fmt_value(v: Any) -> str:
    """Format one table value: ints as ints, floats with 4 decimals, nan as 'nan'."""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else f"{float(v):.4f}"
    return str(v)


def format_metrics_table(metrics: dict) -> str:
    """Fixed-width table (level, metric, value with 4 decimals) of a compute()/add() metrics dict; per-volume rows are summarised."""
    rows: list[tuple[str, str, str]] = []
    for level, val in metrics.items():
        if level == "per_volume" and isinstance(val, dict):
            rows.append(("per_volume", "volumes", str(len(val))))
        elif isinstance(val, dict):
            for k, v in val.items():
                if not isinstance(v, dict):
                    rows.append((str(level), str(k), _fmt_value(v)))
        else:
            rows.append(("-", str(level), _fmt_value(val)))
    header = ("level", "metric", "value")
    w = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    line = lambda r: f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}"  # noqa: E731
    out = [line(header), "-" * (w[0] + w[1] + w[2] + 4)]
    out += [line(r) for r in rows]
    return "\n".join(out)
