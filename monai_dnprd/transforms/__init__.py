"""Volumetric preprocessing, 2.5D slice stacks and synthetic lesions (MONAI transforms)."""

from .array import (
    ExclusionMask,
    ForegroundMask,
    NormalizeForeground,
    ResizeSlices,
    SliceStack25D,
    SquarePad,
    SyntheticLesion,
    dilate_mm,
    gather_slice_stacks,
    resample_nearest,
    slice_foreground_fraction,
    voxel_spacing,
)
from .dictionary import (
    ExclusionMaskd,
    ForegroundMaskd,
    OptionalSpacingd,
    NormalizeForegroundd,
    RandSlice25Dd,
    ResizeSlicesd,
    SliceStack25Dd,
    SquarePadd,
    SyntheticLesiond,
)
from .load import LoadVolume, LoadVolumed

__all__ = [
    "ExclusionMask",
    "ExclusionMaskd",
    "ForegroundMask",
    "ForegroundMaskd",
    "OptionalSpacingd",
    "LoadVolume",
    "LoadVolumed",
    "NormalizeForeground",
    "NormalizeForegroundd",
    "RandSlice25Dd",
    "ResizeSlices",
    "ResizeSlicesd",
    "SliceStack25D",
    "SliceStack25Dd",
    "SquarePad",
    "SquarePadd",
    "SyntheticLesion",
    "SyntheticLesiond",
    "dilate_mm",
    "gather_slice_stacks",
    "resample_nearest",
    "slice_foreground_fraction",
    "voxel_spacing",
]
