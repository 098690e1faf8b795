"""Checkpoints: atomic saving, safe loading (``weights_only=True``), the exported model file.

The exported ``model.pt`` is a plain dict that ``torch.load(weights_only=True)`` reads:
``{"format": "monai-dnprd/1", "config": DNPConFormer kwargs, "preprocessing": {...}, "state_dict": ...,
"metrics": {...}}``. Pickled Python objects are never loaded: a file that needs them is refused.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_atomic", "load_checkpoint", "export_model", "load_model", "CheckpointError", "MODEL_FORMAT"]

MODEL_FORMAT = "monai-dnprd/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason on one line."""


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (tensors, numbers, strings, containers only).

    Raises ``CheckpointError`` for a missing/corrupt file or one that holds pickled objects, since loading
    those could run arbitrary code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        marker = "Unsupported global:"
        if marker not in text:
            raise CheckpointError(f"{path}: cannot read checkpoint (not a valid torch file)") from None
        what = text.split(marker, 1)[1].strip().split(" was not")[0].replace("GLOBAL ", "")
        raise CheckpointError(
            f"{path}: refused, the file holds a pickled Python object ({what}) and loading it could run code; "
            "only tensors, numbers, strings and containers are accepted (re-save a plain state dict)"
        ) from None
    except Exception as err:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(err).__name__}: {str(err)[:160]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    return obj


def export_model(
    path: str | Path,
    network: torch.nn.Module,
    preprocessing: dict,
    metrics: dict | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Write the self-describing model file used by inference (config + preprocessing + weights)."""
    net = network.module if hasattr(network, "module") else network
    sd = state_dict if state_dict is not None else net.state_dict()
    payload = {
        "format": MODEL_FORMAT,
        "config": dict(net.config()),
        "preprocessing": dict(preprocessing),
        "state_dict": {k: v.detach().cpu() for k, v in sd.items()},
        "metrics": {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))},
    }
    return save_atomic(payload, path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the DNP-ConFormer of an exported model file; returns ``(network in eval mode, checkpoint dict)``."""
    from monai_dnprd.networks import DNPConFormer

    ckpt = load_checkpoint(path)
    if ckpt.get("format") != MODEL_FORMAT or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path}: not an exported monai-dnprd model (expected format {MODEL_FORMAT!r}; "
            "use models/model.pt of a training run)"
        )
    config = dict(ckpt["config"])
    config["pretrained"] = None  # the weights below replace any pretrained initialisation
    net = DNPConFormer(**config)
    missing, unexpected = net.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net.to(device).eval(), ckpt
