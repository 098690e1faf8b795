"""Visualisation: orientation-safe slice views, anomaly-map overlays, montages, training curves and HTML reports."""

from .curves import find_training_log, read_training_log, training_curves
from .report import ReportWriter, volume_report_figure, write_index_html, write_volume_report
from .views import (
    AXES,
    CT_WINDOWS,
    auto_window,
    display_slice,
    edge_labels,
    figure_to_png,
    montage,
    orthogonal_views,
    point_to_ras,
    prototype_assignment_map,
    prototype_figure,
    resolve_window,
    slice_scores,
    to_ras,
    top_slices,
)

__all__ = [
    "AXES",
    "CT_WINDOWS",
    "ReportWriter",
    "auto_window",
    "display_slice",
    "edge_labels",
    "figure_to_png",
    "find_training_log",
    "montage",
    "orthogonal_views",
    "point_to_ras",
    "prototype_assignment_map",
    "prototype_figure",
    "read_training_log",
    "resolve_window",
    "slice_scores",
    "to_ras",
    "top_slices",
    "training_curves",
    "volume_report_figure",
    "write_index_html",
    "write_volume_report",
]
