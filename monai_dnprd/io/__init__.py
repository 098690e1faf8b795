"""Input/output: find volumes in a folder, read them checked into (X, Y, Z) + RAS affine, write results atomically."""

from .discovery import IMAGE_SUFFIXES, VolumeScan, find_volumes, ignored_summary, scan_volumes
from .errors import VolumeError, find_volume_error
from .readers import Volume, read_channels, read_volume, volume_affine_spacing
from .writers import prepare_output_dir, write_csv, write_nifti, write_text

__all__ = [
    "IMAGE_SUFFIXES",
    "Volume",
    "VolumeError",
    "VolumeScan",
    "find_volume_error",
    "find_volumes",
    "ignored_summary",
    "prepare_output_dir",
    "read_channels",
    "read_volume",
    "scan_volumes",
    "volume_affine_spacing",
    "write_csv",
    "write_nifti",
    "write_text",
]
