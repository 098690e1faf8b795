"""Volume-by-volume engine for validation, inference and evaluation.

Each iteration takes one preprocessed volume dict (or an error record from ``SafeDataset``), runs the 2.5D
inferer, scores the volume, and optionally inverts the map to the input's original space with ``Invertd``.
Writing files and computing metrics are the job of handlers attached to this engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.engines import Evaluator

from monai_dnprd.anomaly_map import top_percent_score
from monai_dnprd.transforms.array import world_axis

__all__ = ["DNPVolumeEvaluator", "axial_axis"]


def axial_axis(affine: Any) -> int:
    """Array axis of a volume that runs along inferior-superior (the axis whose slices are axial)."""
    return world_axis(affine, 2)


class DNPVolumeEvaluator(Evaluator):
    """Runs ``inferer`` on every volume of ``val_data_loader`` (one volume per iteration, no collation).

    Args:
        inverse: a transform applied to the output dict after inference (e.g. ``Invertd`` on "pred"/"mask"),
            bringing the map back to the input's own grid. None keeps the preprocessed grid (validation).
        score_q: the volume score is the mean of the top ``score_q`` fraction of foreground voxels.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Any,
        network: torch.nn.Module,
        inferer: Callable,
        inverse: Callable | None = None,
        score_q: float = 0.01,
        val_handlers: Sequence | None = None,
        epoch_length: int | None = None,
    ) -> None:
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            val_handlers=val_handlers,
            decollate=False,
        )
        self.network = network
        self.inferer = inferer
        self.inverse = inverse
        self.score_q = float(score_q)

    def _iteration(self, engine: DNPVolumeEvaluator, batchdata: dict) -> dict:  # type: ignore[override]
        d = dict(batchdata)
        if d.get("error"):
            engine.state.output = d
            return d
        start = time.perf_counter()
        image = d["image"]
        mask = d.get("mask")
        pred = engine.inferer(image, engine.network, mask=mask)  # batches go to the network's device
        fg = (torch.as_tensor(mask) > 0) if mask is not None else torch.ones_like(torch.as_tensor(pred), dtype=torch.bool)
        d["score"] = float(top_percent_score(torch.as_tensor(pred)[fg], q=engine.score_q))
        d["pred"] = pred
        if engine.inverse is not None:
            d = engine.inverse(d)  # needs the image's transform history, so before dropping it
        d.pop("image", None)  # the preprocessed volume is not needed downstream; keep memory per volume low
        d["seconds"] = time.perf_counter() - start
        engine.state.output = d
        return d
