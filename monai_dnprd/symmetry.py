"""Left-right symmetry: a map that is as high at the mirror point is not evidence of a lesion.

A brain is close to mirror-symmetric and most lesions (tumours, infarcts, bleeds) lie on one side, while the
learned map's false positives come from anatomy or from how a scan differs from the training scans (the brain's
edge, CSF, a contrast the normal data lacked), and those show on both sides. ``MirrorSuppression`` finds each
voxel's mirror point by registering the image rigidly onto its own left-right flip (SimpleITK, at 6 mm) and
lowers the map by the mirror side's excess over a level that normal tissue rarely reaches:

    map' = max(0, map - max(0, M - t)),  M = the largest map value within 2.5 mm of the mirror point

``t`` is the 99th percentile of the map on normal volumes (``calibration.calibrate`` fits it), so a mirror value
below it changes nothing: weak maps stay as they are, only hot spots that have a hot twin are lowered. Lesions
at the same place on both sides are lowered too; turn ``symmetry`` off for those and for anatomy that is not
left-right symmetric. Measured gains and losses: docs/research_log.md, "Left-right symmetry".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import maximum_filter

from monai_dnprd.transforms.array import world_axis

__all__ = ["mirror_transform", "mirror_volume", "MirrorSuppression", "suppress"]

logger = logging.getLogger("monai_dnprd")


def _to_sitk(volume: np.ndarray, spacing: Sequence[float]) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(volume, (2, 1, 0)), dtype=np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing))
    return img


def _reflection(img: sitk.Image, axis: int) -> sitk.AffineTransform:
    """The reflection along ``axis`` about the plane through the centre of ``img``'s grid (physical space)."""
    centre = img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in img.GetSize()])
    matrix = np.eye(3)
    matrix[axis, axis] = -1.0
    reflection = sitk.AffineTransform(3)
    reflection.SetMatrix(matrix.ravel().tolist())
    reflection.SetCenter(centre)
    return reflection


def mirror_transform(image: np.ndarray, spacing: Sequence[float], axis: int, resolution_mm: float = 6.0,
                     iterations: int = 100) -> sitk.Transform:
    """The transform that carries each point of ``image`` (X, Y, Z) to its mirror point.

    A fixed reflection about the grid's centre, after a rigid transform that registers the reflected image onto
    the image (normalised correlation on block means of about ``resolution_mm``, moments-initialised, L-BFGS-B,
    single-threaded so that the result does not depend on the thread count): a head off the centre or turned is
    handled. A volume too thin to register (fewer than 4 coarse voxels along an axis), or one whose registration
    fails, gets the plain reflection, with a warning for the failure.
    """
    fixed = _to_sitk(image, spacing)
    reflection = _reflection(fixed, axis)
    size = fixed.GetSize()
    shrink = [max(1, min(int(round(resolution_mm / float(s))), n // 8)) for s, n in zip(spacing, size)]
    fixed_lo = sitk.BinShrink(fixed, shrink)  # block means: smoothed and subsampled at once
    if min(fixed_lo.GetSize()) < 4:
        return _as_affine(reflection)
    moving_lo = sitk.Resample(fixed_lo, fixed_lo, reflection, sitk.sitkLinear, 0.0)
    initial = sitk.CenteredTransformInitializer(fixed_lo, moving_lo, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-6, numberOfIterations=iterations)
    reg.SetInitialTransform(initial, inPlace=False)
    reg.SetNumberOfThreads(1)
    try:
        rigid = reg.Execute(fixed_lo, moving_lo)  # reflected(rigid(p)) ~ image(p): image(reflection(rigid(p)))
    except RuntimeError as err:
        logger.warning("symmetry: the left-right registration failed (%s); the mirror plane is the grid's centre",
                       str(err).strip().splitlines()[-1])
        return _as_affine(reflection)
    return _as_affine(sitk.CompositeTransform([reflection, rigid]))  # applied last to first: reflection(rigid(p))


def _as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """An affine ``transform`` as one ``AffineTransform`` (resampling through a composite is several times slower)."""
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    columns = [np.asarray(transform.TransformPoint(tuple(float(v) for v in e))) - origin for e in np.eye(3)]
    return sitk.AffineTransform(np.stack(columns, axis=1).ravel().tolist(), origin.tolist())


def mirror_volume(volume: np.ndarray, spacing: Sequence[float], transform: sitk.Transform) -> np.ndarray:
    """``volume`` (X, Y, Z) read at every voxel's mirror point (linear interpolation, 0 outside the grid)."""
    img = _to_sitk(volume, spacing)
    out = sitk.Resample(img, img, transform, sitk.sitkLinear, 0.0)
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))


def suppress(values: np.ndarray | torch.Tensor, mirror_max: np.ndarray | torch.Tensor, threshold: float):
    """``max(0, values - max(0, mirror_max - threshold))`` (the map after ``MirrorSuppression``), elementwise."""
    if isinstance(values, torch.Tensor):
        mirror_max = torch.as_tensor(mirror_max, dtype=values.dtype)
        return (values - (mirror_max - threshold).clamp_min(0.0)).clamp_min(0.0)
    return np.maximum(values - np.maximum(np.asarray(mirror_max) - threshold, 0.0), 0.0)


class MirrorSuppression:
    """Lower a volume's map where the map at the mirror point is hot too (see the module docstring).

    Args:
        tolerance_mm: the mirror point's neighbourhood (a box of about twice this side) whose largest map value
            counts: registration and anatomy are not exactly symmetric.
        resolution_mm: the registration's grid spacing.
    """

    def __init__(self, tolerance_mm: float = 2.5, resolution_mm: float = 6.0) -> None:
        self.tolerance_mm = float(tolerance_mm)
        self.resolution_mm = float(resolution_mm)

    def mirror_max(self, volume_map: np.ndarray, image: np.ndarray, affine: np.ndarray | torch.Tensor) -> np.ndarray:
        """Per voxel, the largest map value near its mirror point (``volume_map`` and ``image`` (X, Y, Z))."""
        a = np.asarray(affine, dtype=np.float64)
        spacing = np.linalg.norm(a[:3, :3], axis=0)
        axis = world_axis(a, 0)  # left-right
        transform = mirror_transform(image, spacing, axis, self.resolution_mm)
        mirrored = mirror_volume(volume_map, spacing, transform)
        size = tuple(2 * int(round(self.tolerance_mm / s)) + 1 for s in spacing)
        return maximum_filter(mirrored, size=size, mode="constant", cval=0.0)

    def __call__(self, volume_map: torch.Tensor, image: torch.Tensor, affine: np.ndarray | torch.Tensor,
                 threshold: float) -> torch.Tensor:
        """``volume_map`` (X, Y, Z) lowered by its mirror's excess over ``threshold``; ``image`` (X, Y, Z)."""
        mx = self.mirror_max(volume_map.numpy(), image.numpy(), affine)
        return suppress(volume_map, torch.from_numpy(mx), threshold)
