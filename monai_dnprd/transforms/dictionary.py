"""Dictionary twins (MONAI ``MapTransform``) of the array transforms, plus the training slice sampler."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Padd, Randomizable, Spacingd
from monai.transforms.traits import MultiSampleTrait
from monai.utils import MAX_SEED

from monai_dnprd.io.errors import VolumeError

from .array import (
    BiasFieldCorrection,
    ExclusionMask,
    ForegroundMask,
    NormalizeForeground,
    ResizeSlices,
    SliceStack25D,
    SquarePad,
    SyntheticLesion,
    _to_torch,
    gather_slice_stacks,
    resample_nearest,
    slice_foreground_fraction,
    voxel_spacing,
)

__all__ = [
    "BiasFieldCorrectiond",
    "ExclusionMaskd",
    "ForegroundMaskd",
    "OptionalSpacingd",
    "NormalizeForegroundd",
    "SquarePadd",
    "SliceStack25Dd",
    "ResizeSlicesd",
    "RandSlice25Dd",
    "SyntheticLesiond",
]


class OptionalSpacingd(MapTransform, InvertibleTransform):
    """MONAI's ``Spacingd`` to ``pixdim`` (mm), or nothing when ``pixdim`` is None (volumes keep their grid).

    Invertible like ``Spacingd`` itself, so ``Invertd`` brings maps back to the input's own grid either way.
    """

    def __init__(self, keys: KeysCollection = "image", pixdim: Sequence[float] | float | None = None,
                 mode: str = "bilinear", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spacing = Spacingd(keys, pixdim=pixdim, mode=mode, allow_missing_keys=allow_missing_keys) if pixdim else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return dict(data) if self.spacing is None else self.spacing(data)

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return dict(data) if self.spacing is None else self.spacing.inverse(data)


class ForegroundMaskd(MapTransform):
    """Compute the foreground mask of ``keys[0]`` and store it under ``mask_key`` (same meta).

    An empty mask (a constant volume, or nothing above the threshold) raises ``VolumeError`` naming the file,
    since nothing could be cropped, analysed or scored; ``allow_empty=True`` keeps the empty mask instead.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "mask",
        method: str = "otsu",
        threshold: float | None = None,
        closing_iterations: int = 1,
        fill_holes: bool = True,
        largest_component: bool = True,
        allow_missing_keys: bool = False,
        allow_empty: bool = False,
        modality: str | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        if modality is not None:  # the modality's own rule: Otsu for MRI, the body above -500 HU for CT
            if modality.lower() not in ("mri", "ct"):
                raise ValueError(f"modality must be 'mri' or 'ct', got {modality!r}")
            method, threshold = ("threshold", -500.0) if modality.lower() == "ct" else ("otsu", None)
        self.masker = ForegroundMask(method, threshold, closing_iterations, fill_holes, largest_component)
        self.allow_empty = allow_empty

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = self.masker(d[key])
            if not self.allow_empty and not bool(_to_torch(mask).any()):
                meta = getattr(d[key], "meta", {}) or {}
                path = meta.get("filename_or_obj") or d.get("image") or str(key)
                raise VolumeError(
                    str(path), "no foreground: the volume is constant or nothing lies above the foreground threshold"
                )
            d[self.mask_key] = mask
            break
        return d


class BiasFieldCorrectiond(MapTransform):
    """N4 bias field correction of each of ``keys`` inside the mask under ``mask_key`` (``BiasFieldCorrection``);
    ``enabled=False`` passes the data through (CT, and models trained without it)."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str | None = "mask",
        enabled: bool = True,
        fit_mm: float = 4.0,
        iterations: Sequence[int] = (50, 50, 50),
        tails: float = 5.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.enabled = bool(enabled)
        self.corrector = BiasFieldCorrection(fit_mm, iterations, tails)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.enabled:
            return d
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.corrector(d[key], mask)
        return d


class NormalizeForegroundd(MapTransform):
    """Normalise each of ``keys`` inside the mask under ``mask_key`` (whole volume if absent / None)."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str | None = "mask",
        modality: str = "mri",
        lower: float = 0.5,
        max_value: float = 2.0,
        window: tuple[float, float] = (40.0, 400.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.normalizer = NormalizeForeground(modality, lower, max_value, window)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key], mask)
        return d


class ExclusionMaskd(MapTransform):
    """Known abnormal regions of a training volume, on its preprocessed grid, taken out of the foreground.

    ``keys`` holds the path of a mask file (or DICOM series folder; its UID under ``<key>_series_uid``) of the
    item's original image: any voxel > 0 is abnormal. Placed after the whole preprocessing chain, it maps the
    mask onto the image's current grid by world coordinates (nearest neighbour, so reorientation, resampling,
    cropping and padding need no extra step), grows it by ``margin_mm`` (``ExclusionMask``), stores it under the
    key as a (1, X, Y, Z) float32 MetaTensor and removes it from ``mask_key``. The foreground then holds normal
    tissue only, so the slice sampler, validation lesions, calibration and residual statistics ignore known
    lesions; training reads the exclusion itself (``RandSlice25Dd(exclude_key=...)``) to leave their tokens out
    of the loss. Items without the key pass unchanged.

    Raises ``VolumeError`` when the mask has the image's shape but another affine (a header that does not
    match, e.g. a mask saved without the image's affine), or when none of its voxels falls on the image.
    """

    def __init__(self, keys: KeysCollection = "exclude", image_key: str = "image", mask_key: str = "mask",
                 margin_mm: float = 5.0, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.mask_key = mask_key
        self.exclusion = ExclusionMask(margin_mm)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai_dnprd.io import read_volume

        d = dict(data)
        img = d[self.image_key]
        for key in self.key_iterator(d):
            if not isinstance(d[key], (str, Path)):
                raise TypeError(f"{key} must be the path of a mask file or DICOM folder, got {type(d[key]).__name__}")
            path = str(d[key])
            vol = read_volume(path, d.get(f"{key}_series_uid") or None)
            meta = getattr(img, "meta", {}) or {}
            orig_shape = tuple(int(v) for v in np.asarray(meta.get("spatial_shape", ())).ravel())
            orig_affine = meta.get("original_affine")
            if (orig_affine is not None and tuple(vol.array.shape) == orig_shape
                    and not np.allclose(vol.affine, np.asarray(orig_affine, dtype=np.float64), atol=1e-3)):
                raise VolumeError(path, "the exclusion mask has the image's shape but another affine (its header "
                                        "does not match the image's: save it with the image's affine)")
            grid = resample_nearest(vol.array > 0, vol.affine, tuple(img.shape[1:]), _to_torch(img.affine).double().numpy())
            if vol.array.any() and not grid.any():
                raise VolumeError(path, "no voxel of the exclusion mask falls on the image (another subject or space?)")
            ex = self.exclusion(grid[None], voxel_spacing(img))
            out = MetaTensor(torch.as_tensor(ex))
            out.copy_meta_from(img)
            d[key] = out
            if self.mask_key in d:
                m = d[self.mask_key]
                d[self.mask_key] = m * (1 - out.to(_to_torch(m).dtype))
        return d


class SquarePadd(Padd):
    """Dictionary ``SquarePad``: pads every key (image and mask together); ``Invertd`` undoes it."""

    def __init__(
        self,
        keys: KeysCollection,
        axis: int = -1,
        mode: str | Sequence[str] = "constant",
        allow_missing_keys: bool = False,
        lazy: bool = False,
    ) -> None:
        padder = SquarePad(axis=axis, lazy=lazy)
        super().__init__(keys, padder=padder, mode=mode, allow_missing_keys=allow_missing_keys, lazy=lazy)


class SliceStack25Dd(MapTransform):
    """Replace each of ``keys`` (C, X, Y, Z) by its 2.5D stacks (Z, C*(2k+1), H, W)."""

    def __init__(self, keys: KeysCollection = "image", k: int = 1, axis: int = -1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.stacker = SliceStack25D(k=k, axis=axis)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.stacker(d[key])
        return d


class ResizeSlicesd(MapTransform):
    """Dictionary ``ResizeSlices``: resize 2D slices of each key to (size, size)."""

    def __init__(self, keys: KeysCollection = "image", size: int = 224, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resizer = ResizeSlices(size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resizer(d[key])
        return d


class RandSlice25Dd(Randomizable, MapTransform, MultiSampleTrait):
    """Training sampler: draw ``num_samples`` 2.5D slices from a volume dict; returns a list of dicts.

    Slice indices are drawn uniformly (with replacement) among slices whose mask covers at least
    ``min_foreground`` of the slice area (if none does, among the ``num_samples`` slices with the most
    foreground). Each sample holds, for every key, the stack (C*(2k+1), H, W) float32; the mask slice
    (1, H, W) under ``mask_key``; the label slice under ``label_key`` when given; under ``exclude_key``,
    when given, the exclusion of the whole stack (1, H, W) float32: 1 where any of the 2k+1 slices is
    excluded, all zero for a volume without one (so that batches collate); ``slice_index``; and a copy of
    every non-tensor field of the input (e.g. ``name``). Volume-sized tensors of other keys are dropped.
    Works with ``monai.data.PatchDataset`` or as the list-returning step of a ``Compose``.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str | None = "mask",
        label_key: str | None = None,
        k: int = 1,
        axis: int = -1,
        num_samples: int = 4,
        min_foreground: float = 0.15,
        allow_missing_keys: bool = False,
        exclude_key: str | None = None,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        self.mask_key = mask_key
        self.label_key = label_key
        self.exclude_key = exclude_key
        self.k = int(k)
        self.axis = axis
        self.num_samples = int(num_samples)
        self.min_foreground = float(min_foreground)
        self._indices = np.zeros(0, dtype=np.int64)

    def eligible_slices(self, fraction: np.ndarray) -> np.ndarray:
        """Slice indices to sample from, given per-slice foreground fractions."""
        ok = np.flatnonzero(fraction >= self.min_foreground)
        if ok.size == 0:
            order = np.argsort(-fraction, kind="stable")
            ok = np.sort(order[: min(self.num_samples, fraction.size)])
        return ok

    def randomize(self, data: np.ndarray) -> None:
        """Draw ``num_samples`` slice indices from the eligible indices ``data``."""
        self._indices = self.R.choice(data, size=self.num_samples, replace=True).astype(np.int64)

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:  # type: ignore[override]
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            raise KeyError(f"none of the keys {self.keys} found")
        first = _to_torch(d[keys[0]])
        if self.mask_key is not None and self.mask_key in d:
            mask = _to_torch(d[self.mask_key])
            fraction = slice_foreground_fraction(mask, self.axis)
        else:
            mask = None
            fraction = slice_foreground_fraction((first != 0).any(0, keepdim=True), self.axis)
        self.randomize(self.eligible_slices(fraction))
        idx = torch.as_tensor(self._indices)

        out: list[dict[Hashable, Any]] = [{} for _ in range(self.num_samples)]
        for key in keys:
            stacks = gather_slice_stacks(_to_torch(d[key]).to(torch.float32), idx, self.k, self.axis)
            for i in range(self.num_samples):
                out[i][key] = stacks[i]
        extra = [(self.mask_key, mask)] if mask is not None else []
        if self.label_key is not None and self.label_key in d:
            extra.append((self.label_key, _to_torch(d[self.label_key])))
        for key, vol in extra:
            sl = gather_slice_stacks(vol, idx, 0, self.axis)  # (N, C, H, W)
            for i in range(self.num_samples):
                out[i][key] = sl[i]
        if self.exclude_key is not None:
            if self.exclude_key in d:
                ex = gather_slice_stacks(_to_torch(d[self.exclude_key]).to(torch.float32), idx, self.k, self.axis)
                ex = ex.amax(1, keepdim=True)  # (N, 1, H, W): excluded if any slice of the stack is
            else:
                ex = first.new_zeros((self.num_samples, 1, *out[0][keys[0]].shape[-2:]), dtype=torch.float32)
            for i in range(self.num_samples):
                out[i][self.exclude_key] = ex[i]
        skip = set(keys) | {self.mask_key, self.label_key, self.exclude_key}
        for k_, v in d.items():
            if k_ in skip or isinstance(v, (torch.Tensor, np.ndarray)):
                continue
            for i in range(self.num_samples):
                out[i][k_] = deepcopy(v)
        for i in range(self.num_samples):
            out[i]["slice_index"] = int(self._indices[i])
        return out


class SyntheticLesiond(Randomizable, MapTransform):
    """Dictionary ``SyntheticLesion``: paints lesions into ``keys`` inside the mask under ``mask_key``
    (``image > 0`` if absent) and writes the lesion mask (1, X, Y, Z) uint8 under ``label_key`` with the
    image's meta. Several keys get the same lesions (same sub-seed); the label comes from the first key.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str | None = "mask",
        label_key: str = "label",
        kinds: Sequence[str] = ("hyper", "hypo", "texture", "deform"),
        num_lesions: int | tuple[int, int] = (1, 3),
        radius_mm: float | tuple[float, float] = (3.0, 25.0),
        strength: float | tuple[float, float] = (0.25, 0.6),
        tolerance: float = 0.02,
        min_depth_mm: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.mask_key = mask_key
        self.label_key = label_key
        self.lesioner = SyntheticLesion(kinds, num_lesions, radius_mm, strength, tolerance, min_depth_mm=min_depth_mm)
        self._sub_seed = 0

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> SyntheticLesiond:
        super().set_random_state(seed, state)
        self.lesioner.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        self._sub_seed = int(self.R.randint(MAX_SEED, dtype="uint32"))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = d.get(self.mask_key) if self.mask_key is not None else None
        self.randomize()
        label = None
        for key in self.key_iterator(d):
            self.lesioner.set_random_state(self._sub_seed)
            d[key], les = self.lesioner(d[key], mask)
            if label is None:
                label = les
        if label is not None:
            d[self.label_key] = label
        return d

