"""Checkpoints: atomic saving, safe loading (``weights_only=True``), the exported model files.

An exported model is two files: ``model.pt``, the plain state dict of the ``AnomalyMapper`` (tensors only,
what MONAI's ``ckpt_export`` and ``torch.load(weights_only=True)`` read), and ``model.json`` beside it, the
metadata that rebuilds the mapper before its weights are loaded: ``{"format": "monai-dnprd/2", "config":
AnomalyMapper.config(), "preprocessing": {...}, "metrics": {...}}``. Pickled Python objects are never
loaded: a file that needs them is refused.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_atomic", "load_checkpoint", "export_model", "load_model", "model_metadata", "metadata_path",
           "model_architecture",
           "CheckpointError", "MODEL_FORMAT"]

MODEL_FORMAT = "monai-dnprd/2"


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

    Raises ``CheckpointError`` with one line "<path>: <reason>" for a missing, empty, damaged or foreign file
    and for one that holds pickled Python objects, since loading those could run arbitrary code. Which of the
    two a refusal of torch's safe unpickler means is decided from its message and, whatever its wording, by
    reading the file's pickle stream (without running it).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 ...": noise for a file refused anyway
            warnings.filterwarnings("ignore", message=".*pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read checkpoint: {err.strerror or err}") from None
    except Exception as err:  # noqa: BLE001 - UnpicklingError, truncated zip, not a torch file, ...
        what = _refused_object(path, err)
        if what is not None:
            shown = f" ({what})" if what else ""
            raise CheckpointError(
                f"{path}: refused, the file holds a pickled Python object{shown} and loading it could run code; "
                "only tensors, numbers, strings and containers are accepted (re-save a plain state dict)"
            ) from None
        raise CheckpointError(f"{path}: cannot read checkpoint: {_unreadable_reason(path)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    return obj


# torch's refusals of a pickled object say e.g. "Unsupported global: GLOBAL __main__.Payload was not an allowed
# global" or "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL\s+([\w.]+)")
_OBJECT_WORDS = ("global", "__reduce__", "safe_globals", "allowlist")
_IMPORT_OPS = frozenset({"GLOBAL", "STACK_GLOBAL", "INST"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MAX_PICKLE_BYTES = 64 * 2**20  # the main pickle of a file is small; tensors follow it


def _refused_object(path: Path, err: BaseException) -> str | None:
    """The pickled object that made torch refuse ``path`` ("" when unnamed), or None if the file holds none.

    Only a refusal of torch's safe unpickler (``pickle.UnpicklingError``) can mean an object; its message is
    checked first, then the pickle stream itself, so a change of torch's wording cannot turn an unsafe file
    into a "damaged" one.
    """
    if not isinstance(err, pickle.UnpicklingError):
        return None
    text = str(err)
    match = _GLOBAL_IN_MESSAGE.search(text)
    if match:
        return match.group(1).strip(".")
    imported = _pickled_imports(path)
    suspicious = [name for name in imported or () if not _is_tensor_plumbing(name)]
    if suspicious:
        return suspicious[0]
    if imported is None and any(word in text.lower() for word in _OBJECT_WORDS):
        return ""
    return None


def _is_tensor_plumbing(name: str) -> bool:
    """True for the globals every ``torch.save`` file imports (tensor rebuilders, storages, OrderedDict)."""
    return (name.startswith(("torch._utils.", "torch.serialization.")) or name == "collections.OrderedDict"
            or (name.startswith("torch.") and name.endswith("Storage")))


def _pickle_stream(path: Path) -> io.BytesIO | None:
    """The bytes of the main pickle of a checkpoint: ``*/data.pkl`` of a torch zip file, else the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            entries = [i for i in archive.infolist()
                       if i.filename.endswith("data.pkl") and i.file_size <= _MAX_PICKLE_BYTES]
            return io.BytesIO(archive.read(entries[0])) if entries else None
    with open(path, "rb") as f:
        return io.BytesIO(f.read(_MAX_PICKLE_BYTES))


def _pickled_imports(path: Path, max_pickles: int = 8) -> list[str] | None:
    """Names of the classes and functions the pickles of ``path`` import, read with ``pickletools`` (nothing runs).

    A legacy (non-zip) torch file is several pickles in a row, so up to ``max_pickles`` are read. Returns None
    when the file holds no readable pickle at all.
    """
    try:
        stream = _pickle_stream(path)
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return None
    if stream is None:
        return None
    names: list[str] = []
    parsed = False
    for _ in range(max_pickles):
        strings: list[str] = []  # string values pushed so far, for STACK_GLOBAL's module and name
        memo: dict[int, object] = {}
        last: object = None  # what the previous opcode pushed, when it was a string
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name == "STACK_GLOBAL":
                    names.append(".".join(strings[-2:]))
                    last = None
                elif op.name in _IMPORT_OPS:
                    names.append(str(arg).replace(" ", "."))
                    last = None
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = last
                elif op.name in _PUT_OPS:
                    memo[int(arg)] = last
                elif op.name in _GET_OPS:
                    last = memo.get(int(arg))
                    if isinstance(last, str):
                        strings.append(last)
                elif isinstance(arg, str):
                    strings.append(arg)
                    last = arg
                else:
                    last = None
        except Exception:  # noqa: BLE001 - not (or no more) pickle data
            break
        parsed = True
    return names if parsed else None


def _unreadable_reason(path: Path) -> str:
    """Why torch cannot read ``path``, in words: empty, a damaged torch (zip) file, or not a torch file at all."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        return err.strerror or str(err)
    if size == 0:
        return "the file is empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "a zip archive, but not one written by torch.save (not a valid torch file)"
        return "damaged torch file (its zip archive cannot be read)"
    except (OSError, zipfile.BadZipFile):
        pass  # not a readable zip archive
    if head == b"PK\x03\x04":
        return "damaged or truncated torch file (its zip archive cannot be read)"
    return "not a valid torch file (not written by torch.save)"


def metadata_path(model_path: str | Path) -> Path:
    """The metadata file that goes with an exported state dict: ``model.pt`` -> ``model.json``."""
    return Path(model_path).with_suffix(".json")


def export_model(
    path: str | Path,
    mapper: torch.nn.Module,
    preprocessing: dict,
    metrics: dict | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Write ``path`` (the mapper's state dict) and its metadata beside it (``metadata_path``); returns ``path``."""
    import json

    sd = state_dict if state_dict is not None else mapper.state_dict()
    meta = {
        "format": MODEL_FORMAT,
        "config": mapper.config(),
        "preprocessing": dict(preprocessing),
        "metrics": {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))},
    }
    out = save_atomic({k: v.detach().cpu() for k, v in sd.items()}, path)
    meta_file = metadata_path(path)
    tmp = meta_file.with_name(f".{meta_file.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_file)
    return out


def model_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported model (``model.json`` beside ``model.pt``), checked for its format."""
    import json

    path = Path(path)
    meta_file = metadata_path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not meta_file.is_file():
        hint = ""
        try:
            if load_checkpoint(path).get("format") == "monai-dnprd/1":
                hint = " (it was exported by an older monai-dnprd with another network: train it again)"
        except CheckpointError:
            pass
        raise CheckpointError(f"{path}: no {meta_file.name} beside it; an exported model is model.pt with its "
                              f"model.json, as training writes them{hint}")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{meta_file}: cannot read the model metadata ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT or "config" not in meta:
        raise CheckpointError(f"{meta_file}: not the metadata of a monai-dnprd model (expected format {MODEL_FORMAT!r})")
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the ``AnomalyMapper`` of an exported model; returns ``(mapper in eval mode, metadata + "path")``."""
    from monai_dnprd.anomaly_map import AnomalyMapper

    meta = model_metadata(path)
    state = load_checkpoint(path)
    mapper = AnomalyMapper.from_config(meta["config"])
    missing, unexpected = mapper.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model of {metadata_path(path).name} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    meta["path"] = str(path)
    return mapper.to(device).eval(), meta


def model_architecture(path: str | Path | list) -> torch.nn.Module:
    """The ``AnomalyMapper`` described by an exported model's ``model.json``, with fresh weights: the bundle's
    ``network_def`` (for ``ckpt_export`` and ``verify_net_in_out``, which load ``model.pt`` into it themselves).
    With several checkpoints (an ensemble), the first one's."""
    from monai_dnprd.anomaly_map import AnomalyMapper
    from monai_dnprd.ensemble import checkpoint_paths

    first = checkpoint_paths(path)[0]
    return AnomalyMapper.from_config(model_metadata(first)["config"])
