"""Volumetric preprocessing, 2.5D slice stacks and synthetic lesions (MONAI transforms)."""

from .array import (
    ForegroundMask,
    NormalizeForeground,
    ResizeSlices,
    SliceStack25D,
    SquarePad,
    SyntheticLesion,
    gather_slice_stacks,
    slice_foreground_fraction,
    voxel_spacing,
)
from .dictionary import (
    ForegroundMaskd,
    NormalizeForegroundd,
    RandSlice25Dd,
    ResizeSlicesd,
    SliceStack25Dd,
    SquarePadd,
    SyntheticLesiond,
)
from .load import LoadVolume, LoadVolumed

__all__ = [
    "ForegroundMask",
    "ForegroundMaskd",
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
    "gather_slice_stacks",
    "slice_foreground_fraction",
    "voxel_spacing",
]
