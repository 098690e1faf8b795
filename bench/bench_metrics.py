"""Benchmark: monai_dnprd.metrics vs scikit-learn (and a per-threshold AUPRO loop) on ~10^7 voxels (not a test).

Run: ``python bench/bench_metrics.py [--n 10000000] [--repeat 1]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from monai_dnprd import metrics  # noqa: E402


def make_volume(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A cubic float32 anomaly map of ~n voxels with a few blob lesions (about 1% of voxels)."""
    side = max(int(round(n ** (1 / 3))), 8)
    rng = np.random.default_rng(seed)
    shape = (side, side, side)
    lab = np.zeros(shape, dtype=bool)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for _ in range(12):
        c = rng.integers(side // 8, side - side // 8, 3)
        r = rng.uniform(0.03, 0.08) * side
        lab |= (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
    amap = rng.random(shape, dtype=np.float32)
    amap += (0.5 * lab).astype(np.float32)
    amap = np.round(amap, 3).astype(np.float32)  # realistic ties (quantised maps)
    return amap, lab


def naive_aupro(amap: np.ndarray, lab: np.ndarray, fpr_limit: float = 0.3, num_thresholds: int = 200) -> float:
    """Straightforward AUPRO: one pass over all voxels per threshold (same threshold grid as the package)."""
    comp, n_reg = ndimage.label(lab, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(comp[lab], minlength=n_reg + 1)[1:]
    les, ids, normal = amap[lab], comp[lab] - 1, np.sort(amap[~lab])
    n = normal.size
    lo = min(int(math.floor(n * (1 - fpr_limit))), n - 1)
    thr = np.unique(normal[np.unique(np.linspace(lo, n - 1, num_thresholds).round().astype(int))])
    thr = np.append(thr, np.nextafter(normal[-1], np.float32(np.inf)))[::-1]
    fpr = np.array([np.count_nonzero(amap[~lab] >= t) / n for t in thr])
    pro = np.array([np.mean(np.bincount(ids[les >= t], minlength=n_reg) / sizes) for t in thr])
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = list(fpr[:k]), list(pro[:k])
    if x[-1] < fpr_limit:
        y.append(pro[k - 1] + (pro[k] - pro[k - 1]) * (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1]))
        x.append(fpr_limit)
    return float(np.trapezoid(y, x) / fpr_limit)


def timed(fn: Callable[[], float], repeat: int) -> tuple[float, float]:
    """Best wall time over ``repeat`` runs and the value returned."""
    best, val = math.inf, math.nan
    for _ in range(repeat):
        t0 = time.perf_counter()
        val = fn()
        best = min(best, time.perf_counter() - t0)
    return best, val


def main() -> None:
    """Time the metrics and print a table (seconds, values, speed-up)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10_000_000, help="number of voxels (a cube of about this size)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-naive", action="store_true", help="skip the slow per-threshold AUPRO loop")
    args = ap.parse_args()

    amap, lab = make_volume(args.n)
    s, y = amap.ravel(), lab.ravel()
    print(f"voxels: {s.size:,}  lesion voxels: {int(y.sum()):,}  dtype: {s.dtype}")
    try:
        from sklearn.metrics import average_precision_score, roc_auc_score
    except ImportError:  # scikit-learn is only a test dependency
        roc_auc_score = average_precision_score = None

    rows = []
    t, v = timed(lambda: metrics.roc_auc(s, y), args.repeat)
    ref = timed(lambda: roc_auc_score(y, s), args.repeat) if roc_auc_score else (math.nan, math.nan)
    rows.append(("roc_auc", t, v, "sklearn roc_auc_score", *ref))
    t, v = timed(lambda: metrics.average_precision(s, y), args.repeat)
    ref = timed(lambda: average_precision_score(y, s), args.repeat) if average_precision_score else (math.nan, math.nan)
    rows.append(("average_precision", t, v, "sklearn average_precision_score", *ref))
    t, v = timed(lambda: metrics.f1_max(s, y)[0], args.repeat)
    rows.append(("f1_max", t, v, "-", math.nan, math.nan))
    t, v = timed(lambda: metrics.aupro(amap, lab), args.repeat)
    ref = (math.nan, math.nan) if args.skip_naive else timed(lambda: naive_aupro(amap, lab), 1)
    rows.append(("aupro (200 thr)", t, v, "per-threshold loop (200 thr)", *ref))
    t, v = timed(lambda: metrics.aupro(amap, lab, num_thresholds=None), args.repeat)
    rows.append(("aupro (exact curve)", t, v, "-", math.nan, math.nan))

    def accumulate() -> float:
        """Add the volume to an accumulator and compute everything."""
        acc = metrics.VolumeMetricAccumulator()
        acc.add("vol", amap, lab)
        return acc.compute()["voxel"]["ap"]

    t, v = timed(accumulate, args.repeat)
    rows.append(("accumulator add+compute", t, v, "-", math.nan, math.nan))

    head = f"{'metric':<24} {'ours [s]':>9} {'value':>10}   {'reference':<32} {'ref [s]':>9} {'ref value':>10} {'speed-up':>9}"
    print(head)
    print("-" * len(head))
    for name, t, v, rname, rt, rv in rows:
        sp = f"{rt / t:8.1f}x" if not math.isnan(rt) else "-"
        rts = f"{rt:9.3f}" if not math.isnan(rt) else f"{'-':>9}"
        rvs = f"{rv:10.6f}" if not math.isnan(rv) else f"{'-':>10}"
        print(f"{name:<24} {t:9.3f} {v:10.6f}   {rname:<32} {rts} {rvs} {sp:>9}")


if __name__ == "__main__":
    main()
