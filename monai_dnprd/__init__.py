"""monai-dnprd: 3D anomaly detection with DNP-ConFormer applied slice-wise (2.5D) on MONAI."""

__version__ = "0.1.0"

from monai_dnprd import errors  # noqa: E402,F401 - light; the configs call monai_dnprd.errors.install_error_hook()
