"""On-disk cache of preprocessed volumes, reused across runs and seeds.

Preprocessing (reading, reorienting, resampling, masking, normalising, cropping) is deterministic, so its output
for one file and one set of settings never changes. Each output is stored once under a key made of

- the input files: absolute path, size and modification time of every file an item names (for a DICOM series
  folder, of every file in it), its series UID and channel choice;
- the preprocessing: a description of the transform chain (classes and their settings), the ``settings`` dict
  the caller passes, the versions of the packages that compute it, a hash of this package's transform and
  reader code, and the cache format version.

A touched file or a changed setting is a new key (a miss); old entries stay until the folder is cleared.

Entries hold plain tensors, numbers, strings, lists and dicts only (MetaTensors are taken apart into array,
metadata and applied operations), so they load with ``torch.load(weights_only=True)``: a file planted in the
cache folder cannot run code. MONAI's ``PersistentDataset`` was not used: it keys an entry by pickling the item
dict (paths only, so an edited file would be served stale), caches nothing when the chain starts with a nested
``Compose`` (a Randomizable, where it stops), and a truncated entry makes it raise instead of rebuilding.

Writes go to a temporary file in the cache folder, then ``os.replace``: concurrent runs never see a partial
entry, and the last writer of identical content wins. An entry that cannot be read (truncated, corrupt, of
another format) is logged, deleted and rebuilt. Default folder: ``$MONAI_DNPRD_CACHE_DIR``, else
``~/.cache/monai-dnprd/preprocessed``; ``MONAI_DNPRD_CACHE_DIR=off`` (or ``cache=False``) disables it.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

__all__ = ["CACHE_FORMAT", "PreprocessedCache", "default_cache_dir", "resolve_cache", "describe_transform",
           "preprocessing_fingerprint", "item_fingerprint"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "monai-dnprd-preprocessed/1"
_OFF = {"off", "none", "null", "false", "no", "0", "disabled"}
_VERSIONED_PACKAGES = ("monai", "torch", "numpy", "scipy", "nibabel", "SimpleITK", "scikit-image")
_CODE_DIRS = ("transforms", "io")  # the package code that computes the cached output
_STALE_TEMP_SECONDS = 24 * 3600.0


def _is_off(value: Any) -> bool:
    """A cache setting that means 'no cache': False, or a string such as ``off`` / ``none``."""
    return value is False or (isinstance(value, str) and value.strip().lower() in _OFF)


def default_cache_dir() -> Path | None:
    """``$MONAI_DNPRD_CACHE_DIR`` (None when it says ``off``), else ``~/.cache/monai-dnprd/preprocessed``."""
    env = os.environ.get("MONAI_DNPRD_CACHE_DIR", "").strip()
    if env:
        return None if _is_off(env) else Path(env).expanduser()
    return Path.home() / ".cache" / "monai-dnprd" / "preprocessed"


# ---------------------------------------------------------------- keys

def _name(obj: Any) -> str:
    """Module-qualified name of a class or function."""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def describe_transform(obj: Any, depth: int = 0) -> Any:
    """A JSON-able, process-independent description of a transform chain: classes and setting values.

    Transforms and other objects are described by class and attributes (recursively, to a depth limit); numbers,
    strings, arrays and functions by value or name. Nothing depends on memory addresses, so two processes
    building the same chain from the same config describe it the same way.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return repr(obj)  # nan and inf stay JSON-able
    if isinstance(obj, enum.Enum):
        return f"{_name(type(obj))}.{obj.name}"
    if isinstance(obj, (np.generic,)):
        return describe_transform(obj.item(), depth)
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        arr = obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else obj
        if arr.size <= 64 and arr.dtype != object:
            return {"array": describe_transform(arr.tolist(), depth), "dtype": str(arr.dtype)}
        return {"array_sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest(), "shape": arr.shape}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [describe_transform(x, depth + 1) for x in items]
    if isinstance(obj, Mapping):
        return {str(k): describe_transform(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, functools.partial):
        return {"partial": _name(obj.func), "args": describe_transform(obj.args, depth + 1),
                "kwargs": describe_transform(obj.keywords, depth + 1)}
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        return _name(obj)
    if isinstance(obj, (np.random.RandomState, np.random.Generator, torch.Generator)):
        return _name(type(obj))  # random state: not a setting (and deterministic chains never draw from it)
    attrs = getattr(obj, "__dict__", None)
    if attrs is None or depth > 8:
        return _name(type(obj))
    return {"class": _name(type(obj)),
            **{k: describe_transform(v, depth + 1) for k, v in sorted(attrs.items()) if _is_setting(k, v)}}


def _is_setting(name: str, value: Any) -> bool:
    """Whether an attribute is part of a transform's settings rather than state it gains at run time: thread-local
    and private non-plain attributes are left out (MONAI adds ``_tracing`` on first use, for instance), so
    a chain is described the same before and after it ran."""
    if isinstance(value, threading.local):
        return False
    return not name.startswith("_") or value is None or isinstance(value, (bool, int, float, str, enum.Enum))


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    """sha256 of this package's transform and reader sources: editing them invalidates the cache."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for sub in _CODE_DIRS:
        for path in sorted((root / sub).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _package_versions() -> dict[str, str | None]:
    """Versions of the packages whose numerics shape the preprocessed output (None when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    from monai_dnprd import __version__

    out: dict[str, str | None] = {"monai_dnprd": __version__}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _digest(obj: Any) -> str:
    """sha256 of a JSON-able object in canonical form."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def preprocessing_fingerprint(preprocessing: Callable, settings: Mapping | None = None) -> str:
    """Hash of everything besides the input files that decides the preprocessed output (see the module doc)."""
    return _digest({"format": CACHE_FORMAT, "versions": _package_versions(), "code": _code_hash(),
                    "transforms": describe_transform(preprocessing), "settings": describe_transform(settings or {})})


def _file_state(path: str) -> Any:
    """Identity of an input on disk: absolute path, size and mtime; a folder (DICOM series) lists its files."""
    p = os.path.abspath(path)
    st = os.stat(p)
    if not os.path.isdir(p):
        return [p, st.st_size, st.st_mtime_ns]
    files = []
    with os.scandir(p) as it:
        for entry in it:
            if entry.is_file():
                est = entry.stat()
                files.append([entry.name, est.st_size, est.st_mtime_ns])
    return [p, sorted(files)]


def _value_state(value: Any) -> Any:
    """An item's value for the key: existing paths by their file state, other values as they are."""
    if isinstance(value, (str, os.PathLike)) and str(value) and os.path.exists(value):
        return {"file": _file_state(os.fspath(value))}
    if isinstance(value, (list, tuple)):
        return [_value_state(v) for v in value]
    return describe_transform(value)


def item_fingerprint(item: Mapping) -> str:
    """Hash of an input item: every entry except its display ``name``, with each existing path replaced by its
    file state (a touched or replaced file gives another key)."""
    return _digest({str(k): _value_state(v) for k, v in item.items() if k != "name"})


# ---------------------------------------------------------------- safe encoding

class NotCacheable(TypeError):
    """An output holds a value the safe format cannot store; such an item is computed every time."""


def _enum_classes() -> dict[str, type]:
    """The enum types that entries may name (MONAI's metadata keys); any other enum is not cacheable."""
    from monai.utils import MetaKeys, SpaceKeys, TraceKeys

    return {_name(c): c for c in (MetaKeys, SpaceKeys, TraceKeys)}


def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns exactly its data (a view would save its whole base storage)."""
    t = t.detach().cpu()
    if isinstance(t, MetaTensor):
        t = t.as_tensor()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _encode(v: Any, ops: bool = False) -> Any:
    """``v`` as tensors, numbers, strings, lists, tuples and dicts only (tagged where the type must come back)."""
    from monai.utils import TraceKeys

    if v is None or isinstance(v, (bool, int, float)) and not isinstance(v, enum.Enum):
        return v
    if isinstance(v, enum.Enum):
        if _name(type(v)) not in _enum_classes():
            raise NotCacheable(f"enum {_name(type(v))}")
        return {"__kind__": "enum", "cls": _name(type(v)), "name": v.name}
    if isinstance(v, str):
        return str(v)
    if isinstance(v, MetaTensor):
        return {"__kind__": "metatensor", "data": _plain_tensor(v), "meta": _encode(dict(v.meta)),
                "ops": _encode(list(v.applied_operations), ops=True)}
    if isinstance(v, torch.Tensor):
        return _plain_tensor(v)
    if isinstance(v, np.ndarray):
        if v.dtype == object or v.dtype.kind in "USV":
            raise NotCacheable(f"array of dtype {v.dtype}")
        return {"__kind__": "ndarray", "data": torch.from_numpy(np.ascontiguousarray(v).copy())}
    if isinstance(v, np.generic):
        return {"__kind__": "npscalar", "dtype": str(v.dtype), "value": v.item()}
    if isinstance(v, Mapping):
        keys = list(v.keys())
        values = [v[k] for k in keys]
        if ops:  # an applied operation: forget the transform instance's id, as PersistentDataset does
            values = [TraceKeys.NONE if str(k) == TraceKeys.ID else x for k, x in zip(keys, values)]
        return {"__kind__": "dict", "keys": [_encode(k) for k in keys], "values": [_encode(x, ops) for x in values]}
    if isinstance(v, tuple):
        return {"__kind__": "tuple", "items": [_encode(x, ops) for x in v]}
    if isinstance(v, list):
        return [_encode(x, ops) for x in v]
    raise NotCacheable(f"value of type {type(v).__name__}")


def _decode(v: Any) -> Any:
    """The inverse of ``_encode``."""
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if not isinstance(v, dict):
        return v
    kind = v.get("__kind__")
    if kind == "dict":
        return {_decode(k): _decode(x) for k, x in zip(v["keys"], v["values"], strict=True)}
    if kind == "tuple":
        return tuple(_decode(x) for x in v["items"])
    if kind == "ndarray":
        return v["data"].numpy()
    if kind == "npscalar":
        return np.dtype(v["dtype"]).type(v["value"])
    if kind == "enum":
        return getattr(_enum_classes()[v["cls"]], v["name"])
    if kind == "metatensor":
        return MetaTensor(v["data"], meta=_decode(v["meta"]), applied_operations=_decode(v["ops"]))
    raise ValueError(f"unknown entry kind {kind!r}")


# ---------------------------------------------------------------- the cache

def _same(a: Any, b: Any) -> bool:
    """Whether preprocessing left an input value as it was (the same object, or an equal plain value)."""
    if a is b:
        return True
    plain = (str, int, float, bool, type(None))
    return type(a) is type(b) and isinstance(a, plain) and a == b


class PreprocessedCache:
    """Preprocessed items of one preprocessing chain, stored in ``root`` (see the module doc).

    ``lookup(item)`` gives the cached output or None; ``store(item, output)`` saves one; ``get(item, compute)``
    does both. The output of a hit is the input item updated with the stored entries (the values the
    preprocessing changed or added), so the item's own ``name`` and other fields always come from the input.
    Failing to write (read-only folder, full disk) is logged once and otherwise ignored.
    """

    def __init__(self, root: str | Path, preprocessing: Callable, settings: Mapping | None = None) -> None:
        self.root = Path(root).expanduser()
        self.fingerprint = preprocessing_fingerprint(preprocessing, settings)
        self._write_failed = False
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_files()

    def __repr__(self) -> str:
        return f"PreprocessedCache({str(self.root)!r}, {self.fingerprint[:12]})"

    def _remove_stale_temp_files(self) -> None:
        """Temporary files of writers killed long ago (recent ones may belong to a concurrent run)."""
        now = time.time()
        for p in self.root.glob(".*.tmp"):
            try:
                if now - p.stat().st_mtime > _STALE_TEMP_SECONDS:
                    p.unlink()
            except OSError:
                pass

    def key(self, item: Mapping) -> str | None:
        """The entry name of ``item``; None when an input cannot be inspected (the item is then computed)."""
        try:
            return _digest([self.fingerprint, item_fingerprint(item)])
        except (OSError, NotCacheable, ValueError):
            return None

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def has(self, item: Mapping) -> bool:
        """Whether an entry for ``item`` exists (it may still prove unreadable when loaded)."""
        key = self.key(item)
        return key is not None and self.path(key).is_file()

    def lookup(self, item: Mapping, key: str | None = None) -> dict | None:
        """The cached output of ``item``, or None on a miss; an unreadable entry is deleted (then a miss)."""
        key = key or self.key(item)
        if key is None:
            return None
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT or entry.get("key") != key:
                raise ValueError("not an entry of this cache format")
            changed = _decode(entry["item"])
            removed = set(entry.get("removed", []))
            if not isinstance(changed, dict):
                raise ValueError("entry holds no item")
        except Exception as err:  # noqa: BLE001 - any unreadable entry is rebuilt, never fatal
            logger.warning("ignoring unreadable cache entry %s (%s: %s); preprocessing again", path,
                           type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
            try:
                path.unlink()
            except OSError:
                pass
            return None
        return {**{k: v for k, v in item.items() if k not in removed}, **changed}

    def store(self, item: Mapping, output: Mapping, key: str | None = None) -> bool:
        """Save the entries of ``output`` that differ from ``item``; False if not stored (not cacheable, or
        the write failed)."""
        key = key or self.key(item)
        if key is None:
            return False
        changed = {k: v for k, v in output.items() if k != "load_seconds" and not (k in item and _same(item[k], v))}
        removed = [str(k) for k in item if k not in output]
        try:
            entry = {"format": CACHE_FORMAT, "key": key, "item": _encode(changed), "removed": removed}
        except NotCacheable as err:
            logger.debug("not caching %s: %s", item.get("image"), err)
            return False
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key[:16]}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:  # no fsync: an entry cut short by a crash is rebuilt when read
                torch.save(entry, f)
            os.replace(tmp, self.path(key))
            return True
        except Exception as err:  # noqa: BLE001 - a cache that cannot be written only costs time
            if not self._write_failed:
                logger.warning("cannot write to the preprocessing cache %s (%s); going on without storing",
                               self.root, err)
                self._write_failed = True
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return False

    def get(self, item: Mapping, compute: Callable[[Mapping], dict]) -> tuple[dict, bool]:
        """``(output, hit)``: the cached output of ``item``, else ``compute(item)``, stored unless it is an
        error record (a failed volume is tried again next time)."""
        key = self.key(item)
        start = time.perf_counter()
        hit = self.lookup(item, key)
        if hit is not None:
            hit["load_seconds"] = time.perf_counter() - start
            return hit, True
        out = compute(item)
        if not out.get("error"):
            self.store(item, out, key)
        return out, False


def resolve_cache(cache: bool | str | Path | PreprocessedCache | None, preprocessing: Callable,
                  settings: Mapping | None = None) -> PreprocessedCache | None:
    """The cache a data function uses: None/True/"auto" -> the default folder; False/"off" -> none; a path
    -> that folder; a ``PreprocessedCache`` as is. A folder that cannot be created disables it with a warning."""
    if isinstance(cache, PreprocessedCache):
        return cache
    if _is_off(cache):
        return None
    root = default_cache_dir() if cache in (None, True) or (isinstance(cache, str) and cache.strip() in ("", "auto")) \
        else Path(cache)
    if root is None:
        return None
    try:
        return PreprocessedCache(root, preprocessing, settings)
    except OSError as err:
        logger.warning("preprocessing cache disabled: cannot use %s (%s)", root, err)
        return None

