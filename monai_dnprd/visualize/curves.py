"""Training curves from a run's ``training_log.jsonl``: losses per stage, collapse monitors, validation metrics."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

__all__ = ["LOG_NAME", "find_training_log", "read_training_log", "training_curves"]

logger = logging.getLogger(__name__)

LOG_NAME = "training_log.jsonl"
_LOSS_KEYS = ("loss", "mim", "sm", "daa", "balance")


def find_training_log(log_path_or_dir: str | Path) -> Path:
    """The log file itself, or ``training_log.jsonl`` inside a run folder."""
    p = Path(log_path_or_dir)
    if p.is_dir():
        p = p / LOG_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no training log (expected {LOG_NAME} written by a training run)")
    return p


def read_training_log(path: str | Path) -> dict[str, list[float]]:
    """All records of a JSONL log as ``{key: values}``, aligned with ``"iteration"`` (NaN where a record lacks
    the key); malformed lines (e.g. a run killed mid-write) are skipped with a warning."""
    path = find_training_log(path)
    records: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                logger.warning("%s: line %d is not valid JSON, skipped", path, n)
                continue
            if isinstance(rec, dict) and "iteration" in rec:
                records.append(rec)
    keys: list[str] = ["iteration"]
    for rec in records:
        keys.extend(k for k in rec if k not in keys)
    out: dict[str, list[float]] = {k: [] for k in keys}
    for rec in records:
        for k in keys:
            v = rec.get(k)
            out[k].append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
    return out


def _series(log: dict[str, list[float]], key: str, positive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, values) of one key where the value is finite (and > 0 when `positive`, for log axes)."""
    x = np.asarray(log.get("iteration", []), dtype=float)
    y = np.asarray(log.get(key, [np.nan] * len(x)), dtype=float)
    ok = np.isfinite(y) & np.isfinite(x)
    if positive:
        ok &= y > 0
    return x[ok], y[ok]


def _no_data(ax, text: str = "not logged") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey")


def _plot_series(ax, log: dict[str, list[float]], keys: list[str], strip: int = 0, log_scale: bool = False,
                 marker: str | None = None, empty: str = "not logged") -> None:
    """One line per key (label = key minus its first `strip` characters); a log y axis for positive series."""
    drawn = 0
    for k in keys:
        x, y = _series(log, k, positive=log_scale)
        if x.size:
            ax.plot(x, y, marker=marker or ("." if x.size < 30 else None), label=k[strip:])
            drawn += 1
    if not drawn:
        _no_data(ax, empty)
        return
    if log_scale:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def _shade_warmup(ax, log: dict[str, list[float]]) -> None:
    """Grey band over the MIM warm-up iterations (records with stage == 0)."""
    x, st = _series(log, "stage")
    if x.size and np.any(st == 0):
        ax.axvspan(0, float(x[st == 0].max()), color="0.9", zorder=0, label="MIM warm-up")


def training_curves(log_path_or_dir: str | Path, title: str | None = None) -> Figure:
    """Losses per stage (log scale), teacher spread, prototypes used, learning rates and validation metrics."""
    log = read_training_log(log_path_or_dir)
    fig = Figure(figsize=(13, 7.5), layout="constrained")
    axes = fig.subplots(2, 3, sharex=True).ravel()
    # losses
    ax = axes[0]
    _shade_warmup(ax, log)
    _plot_series(ax, log, list(_LOSS_KEYS), log_scale=True)
    ax.set_title("losses (grey: MIM warm-up)")
    # teacher spread
    ax = axes[1]
    x, y = _series(log, "teacher_spread")
    if x.size:
        ax.plot(x, y, marker=".", color="tab:green")
        ax.axhline(1e-3, color="tab:red", ls="--", lw=0.8, label="collapse warning")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    else:
        _no_data(ax)
    ax.set_title("teacher feature spread")
    # prototypes
    ax = axes[2]
    x, y = _series(log, "prototypes_used")
    if x.size:
        ax.plot(x, y, marker=".", color="tab:purple", label="prototypes used")
        ax.set_ylim(bottom=0)
        xs, ys = _series(log, "prototype_max_share")
        if xs.size:
            tw = ax.twinx()
            tw.plot(xs, ys, ls=":", marker="x", color="tab:orange", label="largest share")
            tw.set_ylim(0, 1.05)
            tw.set_ylabel("largest prototype share")
        ax.legend(fontsize=8, loc="lower left")
    else:
        _no_data(ax)
    ax.set_title("prototype usage")
    # learning rates
    ax = axes[3]
    _plot_series(ax, log, [k for k in log if k.startswith("lr_")], strip=3, log_scale=True)
    ax.set_title("learning rates")
    # validation metrics (two panels: voxel-level, then slice/volume-level)
    val_keys = [k for k in log if k.startswith("val_") and not k.endswith("_threshold")]
    groups = ([k for k in val_keys if "voxel" in k], [k for k in val_keys if "voxel" not in k])
    for ax, keys, name in zip(axes[4:], groups, ("validation: voxel metrics", "validation: slice/volume metrics")):
        _plot_series(ax, log, keys, strip=4, marker="o", empty="no validation yet")
        ax.set_title(name)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"training log: {find_training_log(log_path_or_dir)}", fontsize=10)
    return fig
