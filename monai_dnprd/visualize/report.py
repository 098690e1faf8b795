"""Visual reports of an inference run: one PNG per volume and a self-contained ``report/index.html``.

``ReportWriter`` is an Ignite handler for the inference engine: after each volume it draws
``OUT/report/<name>.png`` (orthogonal views through the map's maximum + the most anomalous axial slices), and at
the end writes ``OUT/report/index.html`` listing every volume by decreasing score. Drawing problems are logged
as warnings and never stop the run: the maps and ``scores.csv`` matter more than the pictures.
"""

from __future__ import annotations

import csv
import html
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from matplotlib.figure import Figure

from monai_dnprd.io import read_volume, write_text

from .views import montage, orthogonal_views

__all__ = ["REPORT_DIR", "volume_report_figure", "write_volume_report", "write_index_html", "ReportWriter"]

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
_EXTRA_COLUMNS = (  # (key in a row / scores.csv, column title)
    ("normalised_score", "normalised score"),
    ("threshold", "threshold"),
    ("volume_threshold", "threshold"),
    ("anomalous", "anomalous"),
)


def _safe_file_name(name: str) -> str:
    """A file name for a volume name: path separators and control characters replaced by "_"."""
    cleaned = re.sub(r"[\\/\x00-\x1f]", "_", str(name)).strip() or "volume"
    return "_" + cleaned if cleaned.startswith(".") else cleaned


def volume_report_figure(
    image: Any, affine: Any, anomaly_map: Any, score: float | None, name: str, label: Any | None = None,
    k: int = 6, threshold: float | None = None, window: Any = None,
) -> Figure:
    """One figure per volume: orthogonal views through the map's maximum above the `k` most anomalous axial slices."""
    n = max(1, int(k))
    rows = int(math.ceil(n / min(n, 3)))
    fig = Figure(figsize=(13, 4.8 + 3.7 * rows + 0.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[4.8, 3.7 * rows + 0.6])
    orthogonal_views(image, affine, anomaly_map, label, window=window, threshold=threshold, fig=top,
                     title="through the map maximum")
    montage(image, affine, anomaly_map, label, k=n, window=window, threshold=threshold, fig=bottom,
            title=f"{n} most anomalous axial slices")
    head = str(name) if score is None else f"{name}   score {float(score):.4g}"
    if label is not None:
        head += "   (cyan: reference lesion mask)"
    fig.suptitle(head, fontsize=13)
    return fig


def write_volume_report(
    out_png: str | Path, image: Any, affine: Any, anomaly_map: Any, score: float | None, name: str,
    label: Any | None = None, k: int = 6, threshold: float | None = None, dpi: int = 72,
) -> Path:
    """Draw ``volume_report_figure`` and save it as a PNG (written to a temporary name, then renamed)."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig = volume_report_figure(image, affine, anomaly_map, score, name, label, k, threshold)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, out_png)
    finally:
        tmp.unlink(missing_ok=True)
    return out_png


def _float(v: Any) -> float | None:
    """A finite float, or None (blank cells, text, NaN)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(v: Any) -> str:
    f = _float(v)
    if f is None:
        return "" if v is None else str(v)
    return f"{f:.4g}"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}p.note{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.92em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle}
th{background:#f0f0f0;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.anom td{background:#fff1f0}tr.fail td{background:#f6f6f6;color:#a00}
img.thumb{height:110px;border:1px solid #999}
"""


def write_index_html(report_dir: str | Path, rows: Sequence[Mapping[str, Any]], title: str = "Anomaly report") -> Path:
    """Write ``report_dir/index.html``: every volume sorted by score (highest first) with its extra columns
    (normalised score, threshold, anomalous when present) and linked PNG thumbnail; failures at the end.

    Each row needs "name" and "score"; optional keys: the extra columns above, "png" (a file name inside
    `report_dir`, default ``<name>.png`` when that file exists) and "error". Names and values are HTML-escaped.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = [dict(r) for r in rows]
    good = [r for r in rows if not r.get("error") and _float(r.get("score")) is not None]
    failed = [r for r in rows if r not in good]
    good.sort(key=lambda r: -float(_float(r.get("score"))))  # type: ignore[arg-type]
    extras: list[tuple[str, str]] = []
    for key, head in _EXTRA_COLUMNS:
        if any(r.get(key) not in (None, "") for r in rows) and head not in [h for _, h in extras]:
            extras.append((key, head))
    e = html.escape
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="note">{len(good)} volume(s) sorted by anomaly score (highest first)'
        + (f", {len(failed)} failed" if failed else "")
        + ". Click a thumbnail for the full picture. Research use only, not a diagnosis.</p>",
        "<table><thead><tr><th>#</th><th>name</th><th>score</th>"
        + "".join(f"<th>{e(h)}</th>" for _, h in extras)
        + "<th>views</th></tr></thead><tbody>",
    ]
    for i, r in enumerate(good, 1):
        name = str(r.get("name", ""))
        png = r.get("png") or f"{_safe_file_name(name)}.png"
        anomalous = str(r.get("anomalous", "")).strip().lower() in ("yes", "true", "1")
        cells = [f'<td class="num">{i}</td>', f"<td>{e(name)}</td>", f'<td class="num">{e(_fmt(r.get("score")))}</td>']
        for key, _ in extras:
            v = r.get(key, "")
            cells.append(f'<td class="num">{e(_fmt(v))}</td>' if _float(v) is not None else f"<td>{e(str(v or ''))}</td>")
        if (report_dir / str(png)).is_file():
            href = e(quote(str(png)))
            cells.append(f'<td><a href="{href}"><img class="thumb" src="{href}" alt="{e(name)}"></a></td>')
        else:
            cells.append("<td>(no picture)</td>")
        tr = '<tr class="anom">' if anomalous else "<tr>"
        out.append(tr + "".join(cells) + "</tr>")
    for r in failed:
        reason = r.get("error") or "no score"
        out.append(
            f'<tr class="fail"><td></td><td>{e(str(r.get("name", "")))}</td><td colspan="{len(extras) + 2}">'
            f"failed: {e(str(reason))}</td></tr>"
        )
    out.append("</tbody></table></body></html>")
    return write_text("\n".join(out) + "\n", report_dir / "index.html")


def _read_scores_csv(path: Path) -> dict[str, dict]:
    """Rows of an inference ``scores.csv`` by name ({} when absent or unreadable)."""
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {r["name"]: dict(r) for r in csv.DictReader(f) if r.get("name")}
    except (OSError, csv.Error, KeyError) as err:
        logger.warning("report: cannot read %s (%s); the index lists scores only", path, err)
        return {}


class ReportWriter:
    """Ignite handler: ``OUT/report/<name>.png`` per volume and ``OUT/report/index.html`` when the run completes.

    The engine's output per iteration is a dict with "name", "pred" (MetaTensor (1, X, Y, Z) in the input's
    space), "score", optionally "label" (a file path) and "error". The image is re-read from "image_path", or
    "image" when it is a path, or the map's ``filename_or_obj`` meta. Only the first `max_volumes` volumes get a
    picture (all when None). With `calibration_path` (``models/calibration.json`` of the training run), only voxels
    above the voxel threshold at false-positive rate `fpr` are coloured. Any drawing failure is a warning.
    """

    def __init__(self, output_dir: str | Path, k: int = 6, max_volumes: int | None = None, dpi: int = 72,
                 calibration_path: str | Path | None = None, fpr: float = 0.01, enabled: bool = True) -> None:
        self.enabled = bool(enabled)  # ``--report false``: attach() then does nothing
        self.threshold: float | None = None
        if calibration_path and Path(calibration_path).is_file():
            try:
                from monai_dnprd.calibration import Calibration

                self.threshold = float(Calibration.load(calibration_path).voxel_threshold(fpr))
            except Exception as err:  # noqa: BLE001
                logger.warning("report: calibration %s not used (%s)", calibration_path, err)
        self.output_dir = Path(output_dir)
        self.report_dir = self.output_dir / REPORT_DIR
        self.k = int(k)
        self.max_volumes = max_volumes
        self.dpi = int(dpi)
        self.rows: list[dict] = []
        self._drawn = 0

    def attach(self, engine: Any) -> None:
        """Register on ITERATION_COMPLETED (one picture) and COMPLETED (the index), unless disabled."""
        from ignite.engine import Events

        if not self.enabled:
            return
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._on_volume)
        engine.add_event_handler(Events.COMPLETED, self._on_completed)

    @staticmethod
    def _image_path(d: Mapping[str, Any]) -> str | None:
        for key in ("image_path", "image"):
            v = d.get(key)
            if isinstance(v, (str, os.PathLike)) and str(v):
                return os.fspath(v)
        meta = getattr(d.get("pred"), "meta", None) or {}
        v = meta.get("filename_or_obj")
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        return os.fspath(v) if isinstance(v, (str, os.PathLike)) and str(v) else None

    def _on_volume(self, engine: Any) -> None:
        d = engine.state.output
        if not isinstance(d, Mapping):
            return
        name = str(d.get("name") or f"volume_{len(self.rows)}")
        if d.get("error"):
            self.rows.append({"name": name, "score": None, "error": str(d["error"])})
            return
        row: dict[str, Any] = {"name": name, "score": _float(d.get("score"))}
        self.rows.append(row)
        if self.max_volumes is not None and self._drawn >= int(self.max_volumes):
            return
        try:
            png = self.draw(d, name)
            row["png"] = png.name
            self._drawn += 1
        except Exception as err:  # noqa: BLE001 - a picture must never stop the run
            logger.warning("report: no picture for %s (%s: %s)", name, type(err).__name__, str(err)[:200])

    def draw(self, d: Mapping[str, Any], name: str) -> Path:
        """Read the input image (and label) of one output dict and write its PNG."""
        pred = d["pred"]
        arr = np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred, dtype=np.float32)
        arr = arr[0] if arr.ndim == 4 else arr
        meta = getattr(pred, "meta", None) or {}
        affine = meta.get("original_affine", getattr(pred, "affine", None))
        path = self._image_path(d)
        if path is None:
            raise ValueError("the output has no image path (image_path / image / filename_or_obj)")
        vol = read_volume(path, d.get("series_uid") or None)
        if affine is None:
            affine = vol.affine
        affine = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine, dtype=np.float64)
        if vol.array.shape != arr.shape:
            raise ValueError(f"map shape {arr.shape} differs from the image shape {vol.array.shape}")
        label = None
        if isinstance(d.get("label"), (str, os.PathLike)) and str(d["label"]):
            lab = read_volume(d["label"], d.get("label_series_uid") or None).array
            label = lab if lab.shape == arr.shape else None
            if label is None:
                logger.warning("report: label of %s has shape %s, not %s; drawn without it", name, lab.shape, arr.shape)
        out = self.report_dir / f"{_safe_file_name(name)}.png"
        return write_volume_report(out, vol.array, affine, arr, _float(d.get("score")), name, label, self.k,
                                   threshold=self.threshold, dpi=self.dpi)

    def _on_completed(self, engine: Any) -> None:
        try:
            self.write_index()
        except Exception as err:  # noqa: BLE001
            logger.warning("report: index.html not written (%s: %s)", type(err).__name__, str(err)[:200])

    def write_index(self) -> Path:
        """index.html from this run's volumes, completed by the rows (and extra columns) of ``OUT/scores.csv``."""
        by_name = {name: dict(r) for name, r in _read_scores_csv(self.output_dir / "scores.csv").items()}
        for r in self.rows:
            merged = by_name.get(r["name"], {})
            merged.update({k: v for k, v in r.items() if v is not None or k not in merged})
            by_name[r["name"]] = merged
        path = write_index_html(self.report_dir, list(by_name.values()))
        logger.info("report written to %s", path)
        return path
