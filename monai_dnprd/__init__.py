"""monai-dnprd: 3D anomaly detection with DNP-ConFormer applied slice-wise (2.5D) on MONAI."""

__version__ = "0.1.0"
