"""Slice views of volumes and anomaly maps: orientation-safe display slices, windows, overlays, montages.

Display convention (for every input orientation): the volume is first reoriented to RAS with
``nibabel.orientations`` (a pure axis permutation/flip, no resampling), then slices are shown in the
RADIOLOGICAL convention that radiologists read:

- axial: anterior at the top, the subject's RIGHT on the image's LEFT (viewed from the feet);
- coronal: superior at the top, the subject's right on the image's left (viewed from the front);
- sagittal: superior at the top, anterior on the left.

Slice indices (``index`` of ``display_slice``, the result of ``top_slices``) count along the RAS-reoriented
volume (axial index 0 = most inferior slice), so they mean the same thing whatever the file's orientation.
Pass ``radiological=False`` to ``display_slice`` for the neurological convention (subject's right on the right).
Figures are built as ``matplotlib.figure.Figure`` objects (no pyplot state), so this works under Agg and in
worker threads.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap, Normalize
from matplotlib.figure import Figure, SubFigure
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

__all__ = [
    "AXES",
    "CT_WINDOWS",
    "to_ras",
    "point_to_ras",
    "display_slice",
    "edge_labels",
    "auto_window",
    "resolve_window",
    "orthogonal_views",
    "slice_scores",
    "top_slices",
    "montage",
    "prototype_assignment_map",
    "prototype_figure",
    "figure_to_png",
]

# RAS array axis that is constant within a slice of each view
AXES: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}
# CT presets as (level, width) in HU
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "soft": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
}
_MAP_CMAP = "inferno"
_LABEL_COLOR = "#00e5ff"


def _np(x: Any) -> np.ndarray:
    """A numpy array from numpy / torch / MetaTensor input (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _squeeze3d(x: Any, what: str = "volume") -> np.ndarray:
    """(X, Y, Z) from (X, Y, Z) or (1, X, Y, Z) input."""
    a = _np(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{what}: expected an (X, Y, Z) or (1, X, Y, Z) array, got shape {a.shape}")
    return a


def to_ras(array: Any, affine: Any) -> tuple[np.ndarray, np.ndarray]:
    """Reorient an (X, Y, Z) array to the closest RAS axes (flips/permutations only); returns (array, affine)."""
    a = _squeeze3d(array)
    aff = np.asarray(_np(affine), dtype=np.float64)
    ornt = io_orientation(aff)
    out = apply_orientation(a, ornt)
    new_aff = aff @ inv_ornt_aff(ornt, a.shape)
    return np.ascontiguousarray(out), new_aff


def point_to_ras(point: Sequence[int], affine: Any, shape: Sequence[int]) -> tuple[int, int, int]:
    """Voxel index of the input grid -> the same voxel's index in the RAS-reoriented array."""
    ornt = io_orientation(np.asarray(_np(affine), dtype=np.float64))
    out = [0, 0, 0]
    for i, (axis, flip) in enumerate(ornt):
        v = int(point[i])
        out[int(axis)] = (int(shape[i]) - 1 - v) if flip < 0 else v
    return tuple(out)  # type: ignore[return-value]


def _ras_spacing(affine_ras: np.ndarray) -> np.ndarray:
    """Voxel sizes along the RAS array axes."""
    return np.sqrt((affine_ras[:3, :3] ** 2).sum(axis=0))


def _orient2d(s: np.ndarray, axis_name: str, radiological: bool = True) -> np.ndarray:
    """A 2D slice of a RAS array (the two remaining axes in order) -> display rows/columns."""
    d = s.T[::-1]  # rows: last remaining axis (A for axial, S otherwise), top = high = anterior/superior
    if axis_name == "sagittal" or radiological:
        d = d[:, ::-1]  # columns: right (or anterior for sagittal) on the left
    return np.ascontiguousarray(d)


def _axis(axis_name: str) -> int:
    if axis_name not in AXES:
        raise ValueError(f"axis_name must be one of {sorted(AXES)}, got {axis_name!r}")
    return AXES[axis_name]


def _take(ras: np.ndarray, axis_name: str, index: int) -> np.ndarray:
    """Slice `index` of a RAS array along the view's axis, as display rows/columns (radiological)."""
    ax = _axis(axis_name)
    n = ras.shape[ax]
    if not -n <= int(index) < n:
        raise IndexError(f"{axis_name} index {index} out of range for {n} slices")
    return _orient2d(np.take(ras, int(index), axis=ax), axis_name)


def display_slice(array: Any, affine: Any, axis_name: str, index: int, radiological: bool = True) -> np.ndarray:
    """2D display array (row 0 = top) of slice `index` (counted in the RAS-reoriented volume) of a view.

    See the module docstring for the convention; the result is the same for any orientation of the file.
    """
    ras, _ = to_ras(array, affine)
    ax = _axis(axis_name)
    n = ras.shape[ax]
    if not -n <= int(index) < n:
        raise IndexError(f"{axis_name} index {index} out of range for {n} slices")
    return _orient2d(np.take(ras, int(index), axis=ax), axis_name, radiological)


def edge_labels(axis_name: str, radiological: bool = True) -> dict[str, str]:
    """Anatomical letters at the top/bottom/left/right edges of a display slice."""
    _axis(axis_name)
    if axis_name == "sagittal":
        return {"top": "S", "bottom": "I", "left": "A", "right": "P"}
    top, bottom = ("A", "P") if axis_name == "axial" else ("S", "I")
    left, right = ("R", "L") if radiological else ("L", "R")
    return {"top": top, "bottom": bottom, "left": left, "right": right}


def _aspect(spacing: np.ndarray, axis_name: str) -> float:
    """imshow aspect (row height / column width in mm) of a view."""
    rest = [i for i in range(3) if i != AXES[axis_name]]
    col_sp, row_sp = spacing[rest[0]], spacing[rest[1]]
    return float(row_sp / col_sp) if col_sp > 0 else 1.0


def auto_window(array: Any, mask: Any | None = None, low: float = 1.0, high: float = 99.5) -> tuple[float, float]:
    """(vmin, vmax) = the `low`/`high` percentiles inside `mask` (default: voxels above the minimum), for MRI."""
    a = _np(array).astype(np.float64, copy=False)
    finite = np.isfinite(a)
    if mask is not None:
        sel = finite & (_np(mask).reshape(a.shape) > 0)
    else:
        sel = finite & (a > np.nanmin(np.where(finite, a, np.inf)))
    vals = a[sel] if sel.any() else a[finite]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(vals, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def resolve_window(window: str | Sequence[float] | None, array: Any, mask: Any | None = None) -> tuple[float, float]:
    """(vmin, vmax) from None (auto, MRI), a CT preset name (level/width) or an explicit (vmin, vmax)."""
    if window is None:
        return auto_window(array, mask)
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ValueError(f"unknown window {window!r}; presets: {sorted(CT_WINDOWS)} or (vmin, vmax)")
        level, width = CT_WINDOWS[window]
        return level - width / 2.0, level + width / 2.0
    vmin, vmax = (float(v) for v in window)
    if vmax <= vmin:
        raise ValueError(f"window (vmin, vmax) needs vmax > vmin, got {window}")
    return vmin, vmax


def _map_vmax(ras_map: np.ndarray | None, map_vmax: float | None) -> float:
    """Top of the map colour scale: given, else the map's maximum (1 for an empty map)."""
    if map_vmax is not None:
        return float(map_vmax)
    if ras_map is None:
        return 1.0
    m = float(np.nanmax(ras_map)) if ras_map.size else 0.0
    return m if m > 0 else 1.0


def _overlay_cmap(cmap: str, alpha: float, ramp: float = 0.25) -> ListedColormap:
    """`cmap` whose opacity rises from 0 to `alpha` over the lowest `ramp` of the scale: low values keep the
    anatomy visible, high values stand out."""
    base = colormaps[cmap]
    colors = base(np.linspace(0.0, 1.0, 256))
    colors[:, 3] = alpha * np.clip(np.linspace(0.0, 1.0, 256) / max(ramp, 1e-6), 0.0, 1.0)
    return ListedColormap(colors, name=f"{cmap}_ramp")


def _map_norm(ras_map: np.ndarray | None, map_vmin: float | None, map_vmax: float | None,
              threshold: float | None) -> Normalize:
    """Map colour scale: from `map_vmin` (default: `threshold`, else the median of the map inside the
    foreground, so ordinary tissue stays uncoloured) to `map_vmax` (default: the map's maximum)."""
    top = _map_vmax(ras_map, map_vmax)
    if map_vmin is None:
        if threshold is not None:
            map_vmin = float(threshold)
        elif ras_map is not None and np.any(ras_map > 0):
            map_vmin = float(np.median(ras_map[ras_map > 0]))
        else:
            map_vmin = 0.0
    if not map_vmin < top:
        map_vmin = 0.0 if top > 0 else top - 1.0
    return Normalize(float(map_vmin), float(top))


def _masked_map(s: np.ndarray, threshold: float | None) -> np.ma.MaskedArray:
    """Map slice hidden where it is 0 (outside the foreground) or below `threshold`."""
    hide = ~np.isfinite(s) | (s <= 0)
    if threshold is not None:
        hide |= s < threshold
    return np.ma.masked_array(s, mask=hide)


def _draw_panel(ax, img2d, map2d, label2d, vmin, vmax, map_norm, cmap, alpha, aspect, letters, threshold=None):
    """One slice: grey image, map overlay (transparent outside the foreground), label contour, edge letters."""
    ax.imshow(img2d, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
    if map2d is not None:
        ax.imshow(_masked_map(map2d, threshold), cmap=_overlay_cmap(cmap, alpha), norm=map_norm, aspect=aspect,
                  interpolation="nearest")
    if label2d is not None and np.any(label2d > 0) and not np.all(label2d > 0):
        ax.contour((label2d > 0).astype(np.float32), levels=[0.5], colors=_LABEL_COLOR, linewidths=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    kw = dict(transform=ax.transAxes, color="white", fontsize=9, fontweight="bold",
              bbox=dict(facecolor="black", alpha=0.5, pad=1, edgecolor="none"))
    ax.text(0.5, 0.98, letters["top"], ha="center", va="top", **kw)
    ax.text(0.5, 0.02, letters["bottom"], ha="center", va="bottom", **kw)
    ax.text(0.02, 0.5, letters["left"], ha="left", va="center", **kw)
    ax.text(0.98, 0.5, letters["right"], ha="right", va="center", **kw)


def _prepare(image, affine, anomaly_map, label):
    """RAS versions of image / map / label (same grid required), and the RAS spacing."""
    img = _squeeze3d(image, "image")
    ras_img, ras_aff = to_ras(img, affine)
    ras_map = ras_lab = None
    if anomaly_map is not None:
        m = _squeeze3d(anomaly_map, "anomaly_map").astype(np.float32, copy=False)
        if m.shape != img.shape:
            raise ValueError(f"anomaly_map shape {m.shape} differs from the image shape {img.shape}")
        ras_map, _ = to_ras(m, affine)
    if label is not None:
        lab = _squeeze3d(label, "label")
        if lab.shape != img.shape:
            raise ValueError(f"label shape {lab.shape} differs from the image shape {img.shape}")
        ras_lab, _ = to_ras(lab > 0, affine)
    return ras_img, ras_map, ras_lab, _ras_spacing(ras_aff)


def _window_for(ras_img: np.ndarray, ras_map: np.ndarray | None, window) -> tuple[float, float]:
    """Window of the image, using the map's foreground (map > 0) as the mask when it has one."""
    mask = ras_map > 0 if (window is None and ras_map is not None and np.any(ras_map > 0)) else None
    return resolve_window(window, ras_img, mask)


def orthogonal_views(
    image: Any,
    affine: Any,
    anomaly_map: Any | None = None,
    label: Any | None = None,
    point: Sequence[int] | None = None,
    window: str | Sequence[float] | None = None,
    map_vmax: float | None = None,
    alpha: float = 0.5,
    title: str | None = None,
    threshold: float | None = None,
    cmap: str = _MAP_CMAP,
    fig: Figure | SubFigure | None = None,
    map_vmin: float | None = None,
) -> Figure:
    """Axial, coronal and sagittal slices through `point` (a voxel index of the INPUT grid), else through the
    map's maximum, else the centre: grey image, map overlay (hidden where 0 or below `threshold`), label contour.

    `window`: None (MRI auto window), a CT preset name from ``CT_WINDOWS`` or (vmin, vmax). The map's colour
    scale runs from `map_vmin` (default: `threshold`, else the map's foreground median) to `map_vmax` (default:
    its maximum), opacity rising with the value. `fig`: draw into this Figure/SubFigure (returned either way).
    """
    ras_img, ras_map, ras_lab, spacing = _prepare(image, affine, anomaly_map, label)
    shape = ras_img.shape
    if point is not None:
        p = point_to_ras(point, affine, _squeeze3d(image).shape)
        if any(not 0 <= p[i] < shape[i] for i in range(3)):
            raise IndexError(f"point {tuple(point)} is outside the volume of shape {_squeeze3d(image).shape}")
    elif ras_map is not None and np.nanmax(ras_map) > 0:
        p = tuple(int(v) for v in np.unravel_index(int(np.nanargmax(ras_map)), shape))
    else:
        p = tuple(s // 2 for s in shape)
    vmin, vmax = _window_for(ras_img, ras_map, window)
    norm = _map_norm(ras_map, map_vmin, map_vmax, threshold)
    if fig is None:
        fig = Figure(figsize=(12.5, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, name in zip(axes, ("axial", "coronal", "sagittal")):
        i = p[AXES[name]]
        _draw_panel(
            ax, _take(ras_img, name, i),
            _take(ras_map, name, i) if ras_map is not None else None,
            _take(ras_lab, name, i) if ras_lab is not None else None,
            vmin, vmax, norm, cmap, alpha, _aspect(spacing, name), edge_labels(name), threshold,
        )
        ax.set_title(f"{name} {i}", fontsize=10)
    if ras_map is not None:
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), shrink=0.8, pad=0.01)
        cb.set_label("anomaly")
    if title:
        fig.suptitle(title)
    return fig


def slice_scores(anomaly_map: Any, affine: Any, axis_name: str = "axial", q: float = 0.01) -> np.ndarray:
    """Score of every slice (RAS order) of a view: the mean of its top `q` fraction of voxels."""
    ras, _ = to_ras(_squeeze3d(anomaly_map, "anomaly_map").astype(np.float32, copy=False), affine)
    ras = np.nan_to_num(ras, nan=0.0)
    flat = np.moveaxis(ras, _axis(axis_name), 0).reshape(ras.shape[_axis(axis_name)], -1)
    n = flat.shape[1]
    kk = max(1, int(math.ceil(q * n - 1e-9)))
    top = np.partition(flat, n - kk, axis=1)[:, n - kk:]
    return top.mean(axis=1)


def top_slices(anomaly_map: Any, affine: Any, k: int = 6, axis_name: str = "axial") -> list[int]:
    """Indices (in the RAS-reoriented volume) of the `k` most anomalous slices, highest score first."""
    scores = slice_scores(anomaly_map, affine, axis_name)
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order[: max(0, min(int(k), scores.size))]]


def montage(
    image: Any,
    affine: Any,
    anomaly_map: Any,
    label: Any | None = None,
    k: int = 6,
    score: float | None = None,
    title: str | None = None,
    window: str | Sequence[float] | None = None,
    map_vmax: float | None = None,
    alpha: float = 0.5,
    axis_name: str = "axial",
    threshold: float | None = None,
    cmap: str = _MAP_CMAP,
    fig: Figure | SubFigure | None = None,
    map_vmin: float | None = None,
) -> Figure:
    """The `k` most anomalous slices of a view with map overlays and label contours, most anomalous first."""
    ras_img, ras_map, ras_lab, spacing = _prepare(image, affine, anomaly_map, label)
    idx = top_slices(anomaly_map, affine, k, axis_name)
    scores = slice_scores(anomaly_map, affine, axis_name)
    vmin, vmax = _window_for(ras_img, ras_map, window)
    norm = _map_norm(ras_map, map_vmin, map_vmax, threshold)
    n = max(1, len(idx))
    ncols = min(n, 3)
    nrows = int(math.ceil(n / ncols))
    if fig is None:
        fig = Figure(figsize=(3.6 * ncols + 0.9, 3.6 * nrows + 0.7), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    letters = edge_labels(axis_name)
    for j, ax in enumerate(axes):
        if j >= len(idx):
            ax.axis("off")
            continue
        i = idx[j]
        _draw_panel(
            ax, _take(ras_img, axis_name, i), _take(ras_map, axis_name, i),
            _take(ras_lab, axis_name, i) if ras_lab is not None else None,
            vmin, vmax, norm, cmap, alpha, _aspect(spacing, axis_name), letters, threshold,
        )
        ax.set_title(f"{axis_name} {i}  (slice score {scores[i]:.3g})", fontsize=9)
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), shrink=0.8, pad=0.01)
    cb.set_label("anomaly")
    head = title or ""
    if score is not None:
        head = f"{head}  score {score:.4g}" if head else f"score {score:.4g}"
    if head:
        fig.suptitle(head)
    return fig


def prototype_assignment_map(model: Any, image_slice_stack: Any) -> np.ndarray:
    """(B, h, w) int: nearest normal prototype of every token of each input slice, on ``model.grid_size``.

    The slices (B, C, H, W) are resized to the model's input size when needed (bilinear).
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(_np(image_slice_stack) if not torch.is_tensor(image_slice_stack) else image_slice_stack)
    x = x.float()
    if x.dim() != 4:
        raise ValueError(f"expected slices (B, C, H, W), got shape {tuple(x.shape)}")
    net = model.module if hasattr(model, "module") else model
    net = getattr(net, "network", net)  # an AnomalyMapper: its DNP-ConFormer
    size = getattr(getattr(net, "encoder", None), "img_size", None)
    if size is None:
        size = net.config().get("img_size") if hasattr(net, "config") else None
    size = (size, size) if isinstance(size, int) else tuple(size) if size else None
    if size is not None and tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(x.to(device))
    finally:
        net.train(was_training)
    h, w = net.grid_size
    a = out.assignments.detach().cpu()
    if a.shape[-1] != h * w:
        raise ValueError(f"{a.shape[-1]} token assignments do not fit the grid {h}x{w}")
    return a.reshape(a.shape[0], h, w).numpy().astype(np.int64)


def _categorical(num: int) -> ListedColormap:
    """A categorical colour map with `num` distinct colours (tab10, then tab20)."""
    base = colormaps["tab10" if num <= 10 else "tab20"]
    return ListedColormap([base(i % base.N) for i in range(max(1, num))])


def prototype_figure(
    image_slices: Any, assignments: Any, num_prototypes: int, ras_axial: bool = True, alpha: float = 0.45,
    titles: Sequence[str] | None = None,
) -> Figure:
    """Each slice with its token->prototype assignment as a categorical overlay, plus a prototype usage histogram.

    `image_slices` is (B, H, W) or (B, C, H, W) (the centre channel is shown); `assignments` is (B, h, w).
    With `ras_axial` the slices are (X, Y) axial slices of a RAS volume (the network's input) and are shown in
    the module's display convention; otherwise they are drawn as given.
    """
    imgs = _np(image_slices).astype(np.float32)
    if imgs.ndim == 4:
        imgs = imgs[:, imgs.shape[1] // 2]
    asg = _np(assignments).astype(np.int64)
    if imgs.ndim != 3 or asg.ndim != 3 or imgs.shape[0] != asg.shape[0]:
        raise ValueError(f"expected slices (B, H, W) and assignments (B, h, w), got {imgs.shape} and {asg.shape}")
    b = imgs.shape[0]
    cmap = _categorical(num_prototypes)
    norm = BoundaryNorm(np.arange(-0.5, num_prototypes + 0.5), cmap.N)
    ncols = min(b, 4) + 1
    fig = Figure(figsize=(3.0 * ncols, 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, ncols))
    shown = min(b, 4)
    for j in range(shown):
        img, a = imgs[j], asg[j]
        if ras_axial:
            img, a = _orient2d(img, "axial"), _orient2d(a, "axial")
        hh, ww = img.shape
        ax = axes[j]
        lo, hi = auto_window(img)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.imshow(a, cmap=cmap, norm=norm, alpha=alpha, interpolation="nearest",
                  extent=(-0.5, ww - 0.5, hh - 0.5, -0.5))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(titles[j] if titles is not None and j < len(titles) else f"slice {j}", fontsize=9)
        if ras_axial:
            for pos, (x, y, ha, va) in {"top": (0.5, 0.98, "center", "top"), "left": (0.02, 0.5, "left", "center")}.items():
                ax.text(x, y, edge_labels("axial")[pos], transform=ax.transAxes, ha=ha, va=va, color="white",
                        fontsize=9, fontweight="bold")
    counts = np.bincount(asg.reshape(-1), minlength=num_prototypes)[:num_prototypes]
    hist = axes[-1]
    hist.bar(np.arange(num_prototypes), counts / max(1, counts.sum()), color=[cmap(i) for i in range(num_prototypes)])
    hist.set_xticks(np.arange(num_prototypes))
    hist.set_xlabel("prototype")
    hist.set_ylabel("fraction of tokens")
    hist.set_title(f"usage ({int((counts > 0).sum())}/{num_prototypes} used)", fontsize=9)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[:shown]), shrink=0.8, pad=0.01,
                 ticks=np.arange(num_prototypes), label="prototype")
    return fig


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a Figure (for notebooks and HTML reports without pyplot)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
