"""Array transforms: foreground mask, bias field correction, intensity normalisation, square padding, 2.5D slice
stacks, slice resizing and synthetic lesions.

A volume is channel-first ``(C, X, Y, Z)`` (a MONAI ``MetaTensor`` whose ``.affine`` maps voxels to RAS
world coordinates); masks are ``(1, X, Y, Z)``. Transforms return the same container type they receive
(MetaTensor keeps its meta, torch tensor, numpy array) unless stated otherwise.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import Pad, Randomizable, Transform
from monai.utils import convert_to_numpy
from scipy import ndimage as ndi

__all__ = [
    "BiasFieldCorrection",
    "ExclusionMask",
    "ForegroundMask",
    "NormalizeForeground",
    "dilate_mm",
    "resample_nearest",
    "SquarePad",
    "SliceStack25D",
    "ResizeSlices",
    "SyntheticLesion",
    "voxel_spacing",
    "world_axis",
    "slice_foreground_fraction",
    "gather_slice_stacks",
]

logger = logging.getLogger("monai_dnprd")

# ----------------------------------------------------------------------------------------------- helpers
def _to_numpy(x: Any) -> np.ndarray:
    """Plain numpy view/copy of a tensor, MetaTensor or array (left for NormalizeForeground; use convert_to_numpy)."""
    if isinstance(x, MetaTensor):
        x = x.as_tensor()
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _to_torch(x: Any) -> torch.Tensor:
    """Plain torch tensor (no meta) of a tensor, MetaTensor or array."""
    if isinstance(x, MetaTensor):
        return x.as_tensor()
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(np.asarray(x))


def _wrap(arr: np.ndarray, like: Any) -> NdarrayOrTensor:
    """Return ``arr`` in the container type of ``like``; a MetaTensor gets a copy of ``like``'s meta."""
    if isinstance(like, MetaTensor):
        out = MetaTensor(torch.as_tensor(np.ascontiguousarray(arr)))
        out.copy_meta_from(like)
        return out
    if isinstance(like, torch.Tensor):
        return torch.as_tensor(np.ascontiguousarray(arr), device=like.device)
    return arr


def _spatial_mask(mask: Any, x: np.ndarray) -> np.ndarray:
    """``mask`` ((1, X, Y, Z) or (X, Y, Z); None = everywhere) as a bool (X, Y, Z) array matching ``x`` (C, X, Y, Z)."""
    if mask is None:
        return np.ones(x.shape[1:], dtype=bool)
    mm = _to_numpy(mask)
    m = (mm[0] if mm.ndim == x.ndim else mm) != 0
    if m.shape != x.shape[1:]:
        raise ValueError(f"mask shape {mm.shape} does not match image shape {x.shape}")
    return m


def voxel_spacing(img: Any, ndim: int = 3) -> np.ndarray:
    """Voxel spacing in mm: column norms of ``affine[:3, :3]``; 1 mm per axis when there is no affine."""
    if isinstance(img, MetaTensor):
        aff = convert_to_numpy(img.affine).astype(np.float64)
        n = min(ndim, aff.shape[0] - 1)
        sp = np.linalg.norm(aff[:n, :n], axis=0)
        if np.all(sp > 0) and n == ndim:
            return sp
    return np.ones(ndim, dtype=np.float64)


def world_axis(affine: Any, direction: int) -> int:
    """The array axis that runs closest to world axis ``direction`` (RAS: 0 left-right, 1 posterior-anterior,
    2 inferior-superior), whatever the voxel order and spacing."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return int(np.argmax(np.abs(a[direction, :]) / np.maximum(np.linalg.norm(a, axis=0), 1e-12)))


def _spatial_axis(axis: int, n_spatial: int) -> int:
    """Spatial axis index (0-based among spatial axes) of a possibly negative ``axis``."""
    if not -n_spatial <= axis < n_spatial:
        raise ValueError(f"axis {axis} out of range for {n_spatial} spatial dimensions")
    return axis % n_spatial


def slice_foreground_fraction(mask: Any, axis: int = -1) -> np.ndarray:
    """Fraction of each slice along spatial ``axis`` covered by ``mask`` ((1, X, Y, Z) or (X, Y, Z))."""
    m = convert_to_numpy(mask)
    if m.ndim == 4:
        m = m.any(axis=0) if m.shape[0] > 1 else m[0]
    ax = _spatial_axis(axis, m.ndim)
    other = tuple(i for i in range(m.ndim) if i != ax)
    return (m != 0).mean(axis=other)


def gather_slice_stacks(vol: torch.Tensor, indices: torch.Tensor, k: int, axis: int = -1) -> torch.Tensor:
    """2.5D stacks of ``vol`` (C, X, Y, Z) at slice ``indices`` along spatial ``axis``.

    Returns (len(indices), C*(2k+1), H, W), channel-major (channel c holds slices z-k..z+k), edge slices
    replicated. One index gather, no per-slice loop.
    """
    if vol.ndim != 4:
        raise ValueError(f"expected a (C, X, Y, Z) volume, got shape {tuple(vol.shape)}")
    if k < 0:
        raise ValueError("k must be >= 0")
    ax = _spatial_axis(axis, 3)
    v = torch.movedim(vol, 1 + ax, 1)  # (C, Z, H, W)
    n_z = v.shape[1]
    idx = indices.to(torch.long).reshape(-1, 1) + torch.arange(-k, k + 1, dtype=torch.long).reshape(1, -1)
    idx = idx.clamp_(0, n_z - 1)  # (N, 2k+1)
    g = v[:, idx]  # (C, N, 2k+1, H, W)
    c, n = g.shape[0], g.shape[1]
    return g.permute(1, 0, 2, 3, 4).reshape(n, c * (2 * k + 1), g.shape[3], g.shape[4])


def dilate_mm(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """``mask`` (X, Y, Z) grown by ``margin_mm`` in every direction (Euclidean, in mm); a copy when the margin is 0."""
    m = np.asarray(mask, dtype=bool)
    if margin_mm <= 0 or not m.any():
        return m.copy()
    sp = np.asarray(spacing, dtype=np.float64)
    reach = np.ceil(float(margin_mm) / sp).astype(int) + 1  # voxels the margin can reach on each axis
    box = tuple(slice(max(int(idx.min()) - r, 0), int(idx.max()) + r + 1) for idx, r in zip(np.nonzero(m), reach))
    out = np.zeros_like(m)
    out[box] = ndi.distance_transform_edt(~m[box], sampling=sp) <= float(margin_mm)  # only around the mask
    return out


def resample_nearest(src: np.ndarray, src_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """``src`` (X, Y, Z) with voxel->world ``src_affine`` sampled at the voxel centres of the grid (``shape``,
    ``affine``), nearest neighbour; points outside ``src`` get 0 (False). One slice at a time (CT-sized grids)."""
    m = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(affine, dtype=np.float64)
    nx, ny, nz = (int(v) for v in shape)
    out = np.zeros((nx, ny, nz), dtype=src.dtype)
    ii, jj = np.meshgrid(np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64), indexing="ij")
    base = m[:3, 0, None, None] * ii + m[:3, 1, None, None] * jj + m[:3, 3, None, None]  # (3, X, Y)
    for z in range(nz):
        idx = np.rint(base + m[:3, 2, None, None] * z).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < np.asarray(src.shape)[:, None, None]), axis=0)
        out[:, :, z][ok] = src[idx[0][ok], idx[1][ok], idx[2][ok]]
    return out


class ExclusionMask(Transform):
    """Binarise a mask of known abnormal voxels (any channel > 0) and grow it by ``margin_mm``.

    Training must not learn a lesion as normal; a margin covers the lesion's fuzzy or unlabelled rim (automatic
    and manual labels both tend to miss it). ``spacing`` (mm per axis) is that of the image grid.
    """

    def __init__(self, margin_mm: float = 5.0) -> None:
        if margin_mm < 0:
            raise ValueError(f"margin_mm must be >= 0, got {margin_mm}")
        self.margin_mm = float(margin_mm)

    def __call__(self, img: NdarrayOrTensor, spacing: Sequence[float] | None = None) -> NdarrayOrTensor:
        """(C, X, Y, Z) -> (1, X, Y, Z) float32, 1 = excluded from training."""
        m = convert_to_numpy(img)
        if m.ndim != 4:
            raise ValueError(f"expected a (C, X, Y, Z) mask, got shape {m.shape}")
        sp = np.asarray(spacing if spacing is not None else voxel_spacing(img), dtype=np.float64)
        out = dilate_mm(m.any(axis=0), sp, self.margin_mm)[None].astype(np.float32)
        return _wrap(out, img)


# ------------------------------------------------------------------------------------- foreground mask
class ForegroundMask(Transform):
    """Binary mask (1, X, Y, Z) uint8 of the body / head from the first channel.

    Threshold (Otsu on a histogram, or a fixed ``threshold`` such as -500 HU for CT), optional binary
    closing, largest 3D connected component, then hole filling in 3D and slice-wise in 2D along every axis
    so that ventricles, sinuses and airways end up inside. A constant volume gives an empty mask.
    """

    def __init__(
        self,
        method: str = "otsu",
        threshold: float | None = None,
        closing_iterations: int = 1,
        fill_holes: bool = True,
        largest_component: bool = True,
        bins: int = 256,
    ) -> None:
        if threshold is None and method != "otsu":
            raise ValueError(f"unknown method {method!r}: use 'otsu' or give a fixed threshold")
        self.method = method
        self.threshold = threshold
        self.closing_iterations = int(closing_iterations)
        self.fill_holes = fill_holes
        self.largest_component = largest_component
        self.bins = int(bins)

    @staticmethod
    def otsu_threshold(values: np.ndarray, bins: int = 256) -> float | None:
        """Otsu threshold of ``values`` on a ``bins`` histogram (range clipped at the 99.9th percentile
        so a few hot voxels do not squash the histogram); None for constant input."""
        v = values[np.isfinite(values)]
        if v.size == 0:
            return None
        lo, hi = float(v.min()), float(np.percentile(v, 99.9))
        if hi <= lo:
            hi = float(v.max())
        if hi <= lo:
            return None
        hist, edges = np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))
        hist = hist.astype(np.float64)
        centres = 0.5 * (edges[:-1] + edges[1:])
        w0 = np.cumsum(hist)
        w1 = w0[-1] - w0
        s0 = np.cumsum(hist * centres)
        with np.errstate(divide="ignore", invalid="ignore"):
            m0 = s0 / w0
            m1 = (s0[-1] - s0) / w1
            between = w0 * w1 * (m0 - m1) ** 2
        between[~np.isfinite(between)] = -1.0
        i = int(np.argmax(between))
        return float(edges[i + 1])

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Compute the mask of ``img`` (C, X, Y, Z); returns (1, X, Y, Z) uint8 with ``img``'s meta."""
        x = convert_to_numpy(img)
        if x.ndim != 4:
            raise ValueError(f"expected a (C, X, Y, Z) volume, got shape {x.shape}")
        x0 = x[0].astype(np.float64, copy=False)
        thr = self.threshold if self.threshold is not None else self.otsu_threshold(x0.ravel(), self.bins)
        if thr is None:
            m = np.zeros(x0.shape, dtype=bool)
        else:
            m = x0 > thr
        if m.any():
            m = self._clean(m)
        return _wrap(m[None].astype(np.uint8), img)

    def _clean(self, m: np.ndarray) -> np.ndarray:
        n = self.closing_iterations
        if n > 0:
            # pad so the closing does not erode objects touching the array border
            mp = np.pad(m, n)
            mp = ndi.binary_closing(mp, structure=ndi.generate_binary_structure(3, 1), iterations=n)
            m = mp[n:-n, n:-n, n:-n]
        if self.largest_component:
            lab, num = ndi.label(m)
            if num > 1:
                counts = np.bincount(lab.ravel().astype(np.intp))  # bincount of int32 labels is ~10x slower
                counts[0] = 0
                m = lab == int(np.argmax(counts))
        if self.fill_holes and m.any():
            box = _bounding_box(m)  # work in the bounding box
            sub = _fill_holes(m[box])
            # slice-wise 2D filling along every axis in turn; filling along one axis can close a hole seen along
            # another, so go on until three fills in a row (one per axis) add nothing (at most 5 rounds)
            n, unchanged = int(sub.sum()), 0
            for i in range(15):
                sub = _fill_holes(sub, axis=i % 3)
                filled = int(sub.sum())
                unchanged, n = (unchanged + 1 if filled == n else 0), filled
                if unchanged == 3:
                    break
            m = m.copy()
            m[box] = sub
        return m


def _bounding_box(m: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel of a non-empty mask (one ``any`` per axis)."""
    box = []
    for ax in range(m.ndim):
        hit = np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != ax)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _fill_holes(m: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Fill the holes of a 3D mask (background parts not connected to the array border).

    With ``axis``, holes are found slice by slice along that axis (2D connectivity inside each slice). One
    labelling pass instead of scipy's iterative ``binary_fill_holes`` (much faster on large volumes).
    """
    if axis is None:
        structure = ndi.generate_binary_structure(3, 1)
    else:
        structure = np.zeros((3, 3, 3), dtype=bool)
        sl: list[Any] = [slice(None)] * 3
        sl[axis] = 1
        structure[tuple(sl)] = ndi.generate_binary_structure(2, 1)
    lab, num = ndi.label(~m, structure=structure)
    if num == 0:
        return m
    touching = np.zeros(num + 1, dtype=bool)
    for ax in range(3):
        if axis is not None and ax == axis:
            continue  # slice faces along the slicing axis are not a border of the 2D slices
        touching[np.take(lab, 0, axis=ax).ravel()] = True
        touching[np.take(lab, -1, axis=ax).ravel()] = True
    touching[0] = True
    return m | ~touching[lab]


# ------------------------------------------------------------------------------------- normalisation
class BiasFieldCorrection(Transform):
    """N4 bias field correction (SimpleITK) of each channel inside a mask, for MRI.

    A coil's intensity inhomogeneity is smooth and multiplicative; a map that predicts tissue from its context
    reads it as anomaly (white matter brighter than elsewhere in the slice). The field, a cubic B-spline refined
    over ``len(iterations)`` levels (3: four spans across the volume at the last), is fitted on a grid shrunk to
    about ``fit_mm`` and on the masked voxels between the ``tails`` and ``100 - tails`` percentiles: a bright
    tumour or dark CSF stays out of the fit (with every voxel and four levels, the field followed a glioma and
    divided it down; docs/research_log.md, "The bias field"). It is evaluated at full resolution and each masked
    voxel divided by it; voxels outside the mask are left as they are. Single-threaded, so the result does not
    depend on the number of cores. A channel whose fit fails (too few voxels, ITK error) is left uncorrected,
    with a warning.
    """

    def __init__(self, fit_mm: float = 4.0, iterations: Sequence[int] = (50, 50, 50), tails: float = 5.0,
                 min_voxels: int = 1000) -> None:
        if fit_mm <= 0:
            raise ValueError(f"fit_mm must be > 0, got {fit_mm}")
        if not iterations or any(int(i) < 1 for i in iterations):
            raise ValueError(f"iterations must be positive counts, one per fitting level, got {iterations}")
        if not 0.0 <= tails < 50.0:
            raise ValueError(f"need 0 <= tails < 50 (a percentile left out of the fit on each side), got {tails}")
        self.fit_mm = float(fit_mm)
        self.iterations = tuple(int(i) for i in iterations)
        self.tails = float(tails)
        self.min_voxels = int(min_voxels)

    def __call__(self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        """Correct ``img`` (C, X, Y, Z) inside ``mask`` ((1, X, Y, Z); None = the whole volume). Only voxels
        above 0 enter the fit."""
        x = _to_numpy(img).astype(np.float32, copy=False)
        m = _spatial_mask(mask, x)
        spacing = voxel_spacing(img)
        out = x.copy()
        for c in range(x.shape[0]):
            fit = m & (x[c] > 0)
            if self.tails > 0 and fit.any():
                lo, hi = np.percentile(x[c][fit], [self.tails, 100.0 - self.tails])
                fit &= (x[c] >= lo) & (x[c] <= hi)
            field = self.field(x[c], fit, spacing)
            if field is not None:
                out[c][m] = x[c][m] / field[m]
        return _wrap(out, img)

    def field(self, xc: np.ndarray, m: np.ndarray, spacing: Sequence[float]) -> np.ndarray | None:
        """The multiplicative field (X, Y, Z) of one channel fitted on the voxels of ``m``; None if it fails."""
        shrink = [max(1, int(round(self.fit_mm / s))) for s in spacing]
        if m.sum() < self.min_voxels * int(np.prod(shrink)):
            logger.warning("bias field correction skipped: %d voxels in the mask, too few to fit a field", m.sum())
            return None
        # numpy (X, Y, Z) is an ITK image indexed (z, y, x): spacing and shrink factors reversed
        image = sitk.GetImageFromArray(np.ascontiguousarray(xc))
        image.SetSpacing([float(s) for s in spacing][::-1])
        fit_mask = sitk.GetImageFromArray(np.ascontiguousarray(m.astype(np.uint8)))
        fit_mask.CopyInformation(image)
        n4 = sitk.N4BiasFieldCorrectionImageFilter()
        n4.SetMaximumNumberOfIterations(list(self.iterations))
        n4.SetNumberOfThreads(1)
        try:
            n4.Execute(sitk.Shrink(image, shrink[::-1]), sitk.Shrink(fit_mask, shrink[::-1]))
            log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image))
        except RuntimeError as err:
            logger.warning("bias field correction skipped: N4 failed (%s)", str(err).strip().splitlines()[-1])
            return None
        return np.exp(log_field).astype(np.float32)


class NormalizeForeground(Transform):
    """Per-channel intensity normalisation inside the foreground, exactly 0 outside.

    MRI: robust to lesions. The foreground's ``lower`` percentile maps to 0 and its median to 0.5, linearly;
    nothing is clipped at the top except values past ``max_value`` (4x the median's distance from the low end
    at the default 2.0). A bright lesion covers a few percent of a brain at most, so it moves the median by
    well under 1 % and keeps its own contrast, where a clip at a high percentile (which then lies inside the
    lesion) would rescale the whole volume and flatten the lesion's top. CT: fixed HU window
    ``window=(level, width)`` to [0, 1]. A constant foreground (or an empty mask) gives all zeros, never NaN.
    """

    def __init__(
        self,
        modality: str = "mri",
        lower: float = 0.5,
        max_value: float = 2.0,
        window: tuple[float, float] = (40.0, 400.0),
    ) -> None:
        modality = modality.lower()
        if modality not in ("mri", "ct"):
            raise ValueError(f"modality must be 'mri' or 'ct', got {modality!r}")
        if not 0.0 <= lower < 50.0:
            raise ValueError(f"need 0 <= lower < 50 (a percentile below the median), got {lower}")
        if max_value <= 0.5:
            raise ValueError(f"max_value must exceed 0.5 (the median's value), got {max_value}")
        if window[1] <= 0:
            raise ValueError("window width must be > 0")
        self.modality = modality
        self.lower = float(lower)
        self.max_value = float(max_value)
        self.window = (float(window[0]), float(window[1]))

    def __call__(self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        """Normalise ``img`` (C, X, Y, Z) using ``mask`` ((1, X, Y, Z); None = whole volume)."""
        x = _to_numpy(img).astype(np.float32, copy=False)
        m = _spatial_mask(mask, x)
        out = np.zeros(x.shape, dtype=np.float32)
        for c in range(x.shape[0]):
            lo, scale, top = self._linear(x[c], m)
            if lo is None or not scale > 1e-8 * max(1.0, abs(lo)):
                continue  # empty or constant foreground -> zeros
            out[c] = np.clip((x[c] - lo) / scale, 0.0, top)
        out *= m[None]
        return _wrap(out, img)

    def _linear(self, xc: np.ndarray, m: np.ndarray) -> tuple[float | None, float, float]:
        """(offset, scale, upper bound) of the map (x - offset) / scale."""
        if self.modality == "ct":
            level, width = self.window
            return level - width / 2.0, width, 1.0
        v = xc[m]
        v = v[np.isfinite(v)]
        if v.size == 0:
            return None, 0.0, 0.0
        lo, med = np.percentile(v, [self.lower, 50.0])
        return float(lo), 2.0 * float(med - lo), self.max_value


# ------------------------------------------------------------------------------------------ square pad
class SquarePad(Pad):
    """Pad the two in-plane spatial axes (all but ``axis``) symmetrically with 0 to size max(H, W).

    A MONAI ``Pad``: the padding is recorded on the MetaTensor, so ``inverse`` / ``Invertd`` crops it
    back exactly. For 2D input (C, H, W) both axes are padded.
    """

    def __init__(self, axis: int = -1, mode: str = "constant", lazy: bool = False, **kwargs: Any) -> None:
        super().__init__(to_pad=None, mode=mode, lazy=lazy, **kwargs)
        self.axis = axis

    def compute_pad_width(self, spatial_shape: Sequence[int]) -> tuple[tuple[int, int]]:
        """Pad widths (channel first) making the in-plane axes square."""
        shape = [int(s) for s in spatial_shape]
        n = len(shape)
        inplane = list(range(n)) if n < 3 else [i for i in range(n) if i != _spatial_axis(self.axis, n)]
        target = max(shape[i] for i in inplane)
        pads = [(0, 0)]
        for i, s in enumerate(shape):
            d = target - s if i in inplane else 0
            pads.append((d // 2, d - d // 2))
        return tuple(pads)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------- 2.5D stacks
class SliceStack25D(Transform):
    """Volume (C, X, Y, Z) -> 2.5D slice stacks (Z, C*(2k+1), H, W) along ``axis`` (default Z).

    For slice z and channel c the stack holds slices z-k..z+k (edge slices replicated), channel-major.
    ``unstack`` puts per-slice maps (Z, C', H, W) back as a volume (C', X, Y, Z).
    """

    def __init__(self, k: int = 1, axis: int = -1) -> None:
        if k < 0:
            raise ValueError("k must be >= 0")
        self.k = int(k)
        self.axis = axis
        self._meta_src: MetaTensor | None = None

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        """Return the plain float tensor of stacks for every slice; remembers a MetaTensor's meta."""
        if isinstance(img, MetaTensor):
            src = MetaTensor(torch.zeros(0))
            src.copy_meta_from(img)
            self._meta_src = src
        else:
            self._meta_src = None
        v = _to_torch(img)
        if v.ndim != 4:
            raise ValueError(f"expected a (C, X, Y, Z) volume, got shape {tuple(v.shape)}")
        n_z = v.shape[1 + _spatial_axis(self.axis, 3)]
        return gather_slice_stacks(v, torch.arange(n_z), self.k, self.axis)

    def unstack(self, maps: NdarrayOrTensor, like: Any | None = None) -> NdarrayOrTensor:
        """Per-slice maps (Z, C', H, W) or (Z, H, W) -> volume (C', X, Y, Z).

        Returns a MetaTensor carrying ``like``'s meta (or that of the last MetaTensor passed to
        ``__call__``); a plain tensor otherwise.
        """
        t = _to_torch(maps)
        if t.ndim == 3:
            t = t.unsqueeze(1)
        if t.ndim != 4:
            raise ValueError(f"expected maps (Z, C, H, W), got shape {tuple(t.shape)}")
        vol = torch.movedim(t.permute(1, 0, 2, 3), 1, 1 + _spatial_axis(self.axis, 3))
        ref = like if like is not None else self._meta_src
        if isinstance(ref, torch.Tensor) and ref.ndim == 4 and tuple(ref.shape[1:]) != tuple(vol.shape[1:]):
            raise ValueError(f"maps give spatial shape {tuple(vol.shape[1:])}, `like` has {tuple(ref.shape[1:])}")
        if isinstance(ref, MetaTensor):
            out = MetaTensor(vol.contiguous())
            out.copy_meta_from(ref)
            return out
        return vol.contiguous()


# ------------------------------------------------------------------------------------------- resizing
def _resize_2d(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) or (C, H, W) to ``hw``; antialias when downsampling; float32."""
    t = _to_torch(t).to(torch.float32)
    if t.ndim not in (3, 4):
        raise ValueError(f"expected (N, C, H, W) or (C, H, W), got shape {tuple(t.shape)}")
    squeeze = t.ndim == 3
    if squeeze:
        t = t.unsqueeze(0)
    hw = (int(hw[0]), int(hw[1]))
    if tuple(t.shape[-2:]) != hw:
        down = hw[0] < t.shape[-2] or hw[1] < t.shape[-1]
        t = F.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=down)
    return t[0] if squeeze else t


class ResizeSlices(Transform):
    """Resize 2D slices (N, C, H, W) or (C, H, W) to (size, size), bilinear, antialiased when downsampling.

    The one resizing used by training and inference so both see identical network inputs; ``restore``
    maps network-resolution maps back to the native in-plane size.
    """

    def __init__(self, size: int) -> None:
        if int(size) < 1:
            raise ValueError("size must be >= 1")
        self.size = int(size)

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        """Return the resized float32 tensor."""
        return _resize_2d(img, (self.size, self.size))

    @staticmethod
    def restore(maps: NdarrayOrTensor, size: Sequence[int]) -> torch.Tensor:
        """Bilinear resize of maps (N, C, h, w) or (C, h, w) back to in-plane ``size`` (H, W)."""
        return _resize_2d(maps, (int(size[0]), int(size[1])))


# ----------------------------------------------------------------------------------- synthetic lesions
def _smooth_noise(rng: np.random.RandomState, shape: tuple[int, ...], sigma_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed white noise with correlation length ``sigma_mm``."""
    n = rng.standard_normal(shape).astype(np.float32)
    sig = np.maximum(sigma_mm / spacing, 0.5)
    n = ndi.gaussian_filter(n, sig, mode="reflect", truncate=3.0)
    n -= n.mean()
    sd = float(n.std())
    return n / sd if sd > 1e-12 else np.zeros(shape, np.float32)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _random_rotation(rng: np.random.RandomState) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))[None]


def _inner_distance(fg: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) of each foreground voxel to the background / array border (computed at half
    resolution on large volumes, which is plenty for choosing lesion centres)."""
    step = 2 if fg.size > 300_000 else 1
    sub = np.pad(fg[::step, ::step, ::step], 1)
    d = ndi.distance_transform_edt(sub, sampling=spacing * step)[1:-1, 1:-1, 1:-1].astype(np.float32)
    if step > 1:
        for ax in range(3):
            d = np.repeat(d, step, axis=ax)
        d = d[: fg.shape[0], : fg.shape[1], : fg.shape[2]]
    return np.where(fg, d, 0.0).astype(np.float32)


class SyntheticLesion(Randomizable, Transform):
    """Paint realistic synthetic lesions into a normalised volume; returns (new_img, lesion mask).

    Kinds: ``hyper`` / ``hypo`` (irregular soft-edged blob with internal texture, brighter / darker and
    partly homogenised), ``texture`` (mottled local texture: smoothed noise plus blur / sharpen) and
    ``deform`` (mass effect: a radial displacement field inside an ellipsoid, resampled with
    ``map_coordinates``). Radii are in mm (voxel spacing from the affine, 1 mm for plain tensors), centres
    lie inside the eroded foreground (at least ``min_depth_mm`` deep: with a head mask, 15 mm keeps them
    inside the skull) and every change stays inside the foreground. The returned mask is,
    by construction, exactly the changed voxels: ``lesion == (|new - img|.max(channels) > tolerance)``.
    Work happens in each lesion's bounding box only.
    """

    KINDS = ("hyper", "hypo", "texture", "deform")

    def __init__(
        self,
        kinds: Sequence[str] = ("hyper", "hypo", "texture", "deform"),
        num_lesions: int | tuple[int, int] = (1, 3),
        radius_mm: float | tuple[float, float] = (3.0, 25.0),
        strength: float | tuple[float, float] = (0.25, 0.6),
        tolerance: float = 0.02,
        max_attempts: int = 8,
        min_depth_mm: float = 0.0,
    ) -> None:
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        bad = [k for k in kinds if k not in self.KINDS]
        if not kinds or bad:
            raise ValueError(f"kinds must be a non-empty subset of {self.KINDS}, got {kinds}")
        self.kinds = kinds
        self.num_lesions = self._pair(num_lesions, int)
        self.radius_mm = self._pair(radius_mm, float)
        self.strength = self._pair(strength, float)
        if self.num_lesions[0] < 0 or self.radius_mm[0] <= 0:
            raise ValueError("num_lesions must be >= 0 and radius_mm > 0")
        self.tolerance = float(tolerance)
        self.max_attempts = max(1, int(max_attempts))
        self.min_depth_mm = float(min_depth_mm)
        self._params: list[dict[str, Any]] = []

    @staticmethod
    def _pair(v: Any, typ: type) -> tuple:
        if isinstance(v, (int, float)):
            return typ(v), typ(v)
        lo, hi = v
        if hi < lo:
            raise ValueError(f"range {v} has high < low")
        return typ(lo), typ(hi)

    def randomize(self, data: Any = None) -> None:
        """Draw the number of lesions and each lesion's kind, radius (mm) and strength."""
        n = int(self.R.randint(self.num_lesions[0], self.num_lesions[1] + 1))
        self._params = [
            {
                "kind": self.kinds[int(self.R.randint(len(self.kinds)))],
                "radius": float(self.R.uniform(*self.radius_mm)),
                "strength": float(self.R.uniform(*self.strength)),
            }
            for _ in range(n)
        ]

    def __call__(  # type: ignore[override]
        self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None, randomize: bool = True
    ) -> tuple[NdarrayOrTensor, NdarrayOrTensor]:
        """Return ``(new_img, lesion)``; ``mask`` (1, X, Y, Z) is the foreground (None: ``img > 0``)."""
        x = convert_to_numpy(img).astype(np.float32)
        if x.ndim != 4:
            raise ValueError(f"expected a (C, X, Y, Z) volume, got shape {x.shape}")
        fg = (x > 0).any(0) if mask is None else (convert_to_numpy(mask).reshape((-1,) + x.shape[1:]) != 0).any(0)
        if randomize:
            self.randomize()
        spacing = voxel_spacing(img if isinstance(img, MetaTensor) else mask)
        new = x.copy()
        if fg.any() and self._params:
            dist = _inner_distance(fg, spacing)
            for p in self._params:
                self._add_lesion(new, fg, dist, spacing, p)
        diff = np.abs(new - x).max(axis=0)
        lesion = diff > self.tolerance
        new = np.where(lesion[None], new, x)  # drop sub-tolerance changes: mask == changed voxels exactly
        return _wrap(new, img), _wrap(lesion[None].astype(np.uint8), img)

    # -- one lesion ---------------------------------------------------------------------------------
    def _add_lesion(self, cur: np.ndarray, fg: np.ndarray, dist: np.ndarray, spacing: np.ndarray, p: dict) -> None:
        rng = self.R
        rad, s, kind = p["radius"], p["strength"], p["kind"]
        # centres at least half a radius inside, and at least min_depth_mm deep (e.g. inside the skull of a
        # head mask), as far as the foreground allows
        need = max(min(0.5 * rad, 0.8 * float(dist.max())), min(self.min_depth_mm, 0.9 * float(dist.max())))
        cand = np.flatnonzero(dist >= need)
        if cand.size == 0:
            cand = np.flatnonzero(dist >= dist.max())
        shape = np.array(fg.shape)
        half = np.ceil(1.6 * rad / spacing).astype(int)
        best: tuple[float, tuple, np.ndarray] | None = None
        for _ in range(self.max_attempts):
            c = np.array(np.unravel_index(cand[int(rng.randint(cand.size))], fg.shape))
            lo = np.maximum(c - half, 0)
            hi = np.minimum(c + half + 1, shape)
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            cur_box = cur[(slice(None),) + box]
            fg_box = fg[box]
            prop, core = self._propose(kind, cur_box, fg_box, c - lo, spacing, rad, s)
            prop = np.where(fg_box[None], np.clip(prop, 0.0, max(1.0, float(cur_box.max()))), cur_box)
            n_core = int(core.sum())
            changed = np.abs(prop - cur_box).max(axis=0) > self.tolerance
            # fraction of the intended core that really changed (tiny lesions without a core: any change)
            score = float((changed & core).sum()) / n_core if n_core else 1e-6 * float(changed.sum())
            if best is None or score > best[0]:
                best = (score, box, prop)
            if score >= 0.3:
                break
        if best is not None:
            cur[(slice(None),) + best[1]] = best[2]

    def _propose(
        self,
        kind: str,
        cur: np.ndarray,
        fg: np.ndarray,
        centre: np.ndarray,
        spacing: np.ndarray,
        rad: float,
        s: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Changed box values and the lesion core (where a change is expected) for one lesion."""
        rng = self.R
        grids = np.ogrid[tuple(slice(0, n) for n in fg.shape)]
        d = [(g - centre[i]) * spacing[i] for i, g in enumerate(grids)]  # mm offsets, broadcastable
        rot = _random_rotation(rng)
        axes = rad * rng.uniform(0.7, 1.0, 3)
        rho2 = sum(((rot[j, 0] * d[0] + rot[j, 1] * d[1] + rot[j, 2] * d[2]) / axes[j]) ** 2 for j in range(3))
        rho = np.sqrt(rho2).astype(np.float32)
        if kind == "deform":
            a = min(s, 0.85)
            outer = 1.5
            t = np.clip(rho / outer, 0.0, 1.0)
            h = (1.0 - t * t) ** 2  # 1 at the centre, 0 at rho >= outer; monotone warp for a < 1
            scale = 1.0 - a * h
            coords = [centre[i] + (g - centre[i]) * scale for i, g in enumerate(grids)]
            prop = np.stack([ndi.map_coordinates(ch, coords, order=1, mode="nearest") for ch in cur])
            return prop.astype(np.float32), (h >= 0.25) & fg
        shape_noise = np.clip(_smooth_noise(rng, fg.shape, 0.4 * rad, spacing), -2.0, 2.0)
        rho_p = rho * (1.0 + 0.15 * shape_noise)
        edge = rng.uniform(0.15, 0.35)
        w = _smoothstep((1.0 + edge / 2.0 - rho_p) / edge) * fg
        core = (w >= 0.5) & fg
        if kind in ("hyper", "hypo"):
            sign = 1.0 if kind == "hyper" else -1.0
            tex = np.clip(_smooth_noise(rng, fg.shape, max(float(spacing.min()), 0.15 * rad), spacing), -2.0, 2.0)
            wsum = float(w.sum())
            mu = (cur * w).reshape(cur.shape[0], -1).sum(1) / max(wsum, 1e-6)
            homog = rng.uniform(0.2, 0.6)
            delta = sign * s * (1.0 + 0.3 * tex)[None] + homog * (mu[:, None, None, None] - cur)
            return cur + w[None] * delta, core
        # texture: blur/sharpen plus mottled noise whose sign is flipped where it cannot be applied
        g = rng.uniform(-0.8, 1.5)
        sig = np.maximum(1.5 / spacing, 0.5)
        blurred = np.stack([ndi.gaussian_filter(ch, sig) for ch in cur])
        fine = _smooth_noise(rng, fg.shape, float(spacing.min()), spacing)
        mag = s * (0.5 + 0.25 * np.minimum(np.abs(fine), 2.0))
        sgn = np.where(fine >= 0, 1.0, -1.0)[None] * np.ones_like(cur)
        base = cur + w[None] * g * (cur - blurred)
        up_ok = base + w * mag <= 1.0
        down_ok = base - w * mag >= 0.0
        sgn = np.where((sgn > 0) & ~up_ok & down_ok, -1.0, sgn)
        sgn = np.where((sgn < 0) & ~down_ok & up_ok, 1.0, sgn)
        return base + w[None] * mag[None] * sgn, core

