"""Small helpers that the bundle configs call: device choice, boolean flags, override validation, data folders."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["setup_logging", "resolve_device", "native_bf16", "resolve_precision", "autocast_context", "workflow_configs", "WORKFLOW_CONFIGS", "as_bool", "optional_bool", "input_channels", "validation_lesion_kinds", "check_cli_overrides", "training_lists", "UnknownOverrideError", "MONAI_RUN_ARGS"]

logger = logging.getLogger(__name__)

# arguments that `python -m monai.bundle run` itself takes (not config keys)
MONAI_RUN_ARGS = frozenset(
    {"config_file", "meta_file", "logging_file", "bundle_root", "args_file", "run_id", "init_id", "final_id",
     "tracking", "workflow_type", "workflow_name", "properties_path"}
)


# the config files each workflow merges, in order (MONAI's config-file list): the shared part first
WORKFLOW_CONFIGS = {
    "training": ("common.json", "train.json"),
    "inference": ("common.json", "inference.json"),
    "evaluating": ("common.json", "inference.json", "evaluate.json"),
}


def workflow_configs(bundle_dir: str | Path, workflow: str) -> list[str]:
    """The config files of ``workflow`` ("training", "inference" or "evaluating") under ``bundle_dir/configs``."""
    if workflow not in WORKFLOW_CONFIGS:
        raise ValueError(f"unknown workflow {workflow!r}; choose one of {', '.join(WORKFLOW_CONFIGS)}")
    return [str(Path(bundle_dir) / "configs" / name) for name in WORKFLOW_CONFIGS[workflow]]


class UnknownOverrideError(ValueError):
    """A command-line override names a key that no config file defines (most likely a typo)."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    name = "auto" if device in (None, "", "auto") else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return dev


def native_bf16(device: torch.device | str) -> bool:
    """True where bf16 matrix work runs natively and fast: CUDA, and CPUs with AVX512-BF16 or AMX tiles."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_precision(device: torch.device | str, precision: str) -> str:
    """``precision`` with ``auto`` resolved: bf16 where ``native_bf16``, fp32 elsewhere (bf16 without hardware
    support is emulated and slower than fp32)."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be 'fp32', 'bf16', 'fp16' or 'auto', got {precision!r}")
    return precision


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``precision`` in {"fp32", "bf16", "fp16", "auto"} (see ``resolve_precision``); fp16 only on
    CUDA, bf16 on CPU or CUDA."""
    device = torch.device(device)
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def as_bool(value: Any) -> bool:
    """Command-line booleans: true/false/yes/no/1/0 (Fire passes ``true`` as a string)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "yes", "1", "on"}:
        return True
    if text in {"false", "no", "0", "off", "none", ""}:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def is_unset(value: Any) -> bool:
    """True for an option left at null; a command-line override may pass it as "", "None" or "null"."""
    return value in (None, "", "None", "null")


def optional_bool(value: Any) -> bool | None:
    """``as_bool`` of a command-line override, or None when it is unset (``is_unset``)."""
    return None if is_unset(value) else as_bool(value)


def input_channels(channels: int | Sequence[int] | None, k: int) -> int:
    """Network input channels: (number of chosen channels of the input) x (2k + 1 neighbouring slices).

    ``channels`` is the bundle setting: None (3D inputs), one int (one channel of 4D inputs) or a list of
    ints (several channels of 4D inputs, e.g. co-registered sequences, stacked in that order).
    """
    if isinstance(channels, (list, tuple)):
        if not channels:
            raise ValueError("channels is an empty list: give null, one channel index, or a list of them")
        if len({int(c) for c in channels}) != len(channels):
            raise ValueError(f"channels {list(channels)} repeat a channel")
        n = len(channels)
    elif channels is None or isinstance(channels, int):
        n = 1
    else:
        raise ValueError(f"channels must be null, an int or a list of ints, got {channels!r}")
    if int(k) < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return n * (2 * int(k) + 1)


def validation_lesion_kinds(polarity: str = "any") -> tuple[str, ...]:
    """The synthetic lesions that validation inserts: those a map of this ``polarity`` is meant to find.

    ``bright`` seeks hyperintense lesions only and ``dark`` hypointense ones, so checkpoint selection measures
    the model on what the user asked for; ``any`` uses every kind (hyper, hypo, texture, deform).
    """
    from monai_dnprd.anomaly_map import check_polarity
    from monai_dnprd.transforms.array import SyntheticLesion

    return {"bright": ("hyper",), "dark": ("hypo",)}.get(check_polarity(polarity), SyntheticLesion.KINDS)


def _cli_keys(argv: Sequence[str]) -> list[str]:
    """Keys of ``--key value`` / ``--key=value`` pairs after ``run`` on a monai.bundle command line."""
    keys = []
    for tok in argv:
        if tok.startswith("--"):
            keys.append(tok[2:].split("=", 1)[0])
    return keys


def _config_files(argv: Sequence[str]) -> list[Path]:
    files: list[str] = []
    for i, tok in enumerate(argv):
        if tok == "--config_file" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif tok.startswith("--config_file="):
            files.append(tok.split("=", 1)[1])
    out: list[Path] = []
    for f in files:
        f = f.strip()
        if f.startswith("["):
            out += [Path(x) for x in json.loads(f.replace("'", '"'))]
        else:
            out += [Path(x) for x in f.split(",")]
    return out


def check_cli_overrides(argv: Sequence[str] | None = None, extra_keys: Sequence[str] = ()) -> bool:
    """Refuse command-line overrides that match no key of the config file(s) (``section#option`` ids included).

    ``python -m monai.bundle run`` accepts any ``--key value`` and silently adds unknown keys, so a typo such
    as ``--num_iteration 10`` would train with the default. Called from the configs' ``initialize`` list, this
    checks ``sys.argv`` when the process is the monai.bundle command line and raises ``UnknownOverrideError``.
    """
    argv = list(sys.argv if argv is None else argv)
    is_bundle_cli = bool(argv) and Path(argv[0]).as_posix().endswith("monai/bundle/__main__.py")
    if not is_bundle_cli or "run" not in argv[1:2]:
        return True  # not the monai.bundle CLI (e.g. in-process ConfigWorkflow): nothing to check
    known: set[str] = set(MONAI_RUN_ARGS) | {"debug"} | set(extra_keys)  # --debug: full tracebacks (errors.py)
    merged: dict[str, Any] = {}  # the config files merged as MONAI merges them (``a#b`` keys set nested ids)
    for f in _config_files(argv):
        try:
            content = json.loads(Path(f).read_text())
        except (OSError, ValueError):
            return True  # monai.bundle reports unreadable config files itself
        known |= set(content.keys())
        for k, v in content.items():
            *parents, last = k.split("#")
            node = merged
            for part in parents:
                node = node.setdefault(part, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node[last] = v
    unknown = sorted({k for k in _cli_keys(argv) if k.split("#", 1)[0] not in known or not _known_id(merged, k)})
    if unknown:
        public = sorted(k for k in known if not k.startswith("_") and k not in MONAI_RUN_ARGS and k.islower())
        sections = sorted({k.split("#", 1)[0] for k in unknown if "#" in k})
        nested = [f"{s}#{key}" for s in sections if isinstance(merged.get(s), dict) for key, v in merged[s].items()
                  if not key.startswith("_") and not isinstance(v, (dict, list))
                  and not (isinstance(v, str) and v.startswith(("$", "@", "%")))]  # plain settings only
        raise UnknownOverrideError(
            f"unknown option(s) {', '.join('--' + k for k in unknown)}; options of this config: "
            + ", ".join("--" + k for k in public + nested)
        )
    return True


def _known_id(config: dict[str, Any], key: str) -> bool:
    """Whether the override id ``key`` (``section#option``) names an entry of ``config``: each part must exist,
    except below a component (a dict with ``_target_``), where any constructor argument may be added."""
    if "#" not in key or key.split("#", 1)[0] not in config:
        return True  # top-level keys are checked by name; run arguments are not config ids
    node: Any = config
    for part in key.split("#"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return isinstance(node, dict) and "_target_" in node
    return True


def training_lists(dataset_dir: str | None, val_dir: str | None = None, val_fraction: float = 0.2,
                   seed: int = 0, exclude_dir: str | None = None) -> dict[str, list[dict]]:
    """Training, validation and calibration datalists: the user's folders, or the embedded demo data when none is
    given.

    The calibration volumes (normal scans the thresholds are fitted on at the end of training) are the validation
    volumes, except for the demo, which has a calibration set of its own (``demo.prepare_demo_data``). With
    ``exclude_dir``, volumes get the masks of their known abnormal regions (``data.attach_exclusions``).
    """
    from monai_dnprd.data import attach_exclusions, normal_datalists
    from monai_dnprd.io import find_volumes

    calibration_dir = None
    if is_unset(dataset_dir):
        from monai_dnprd.demo import prepare_demo_data
        from monai_dnprd.distributed import rank_zero_first

        with rank_zero_first():  # under torchrun the data is made once, by rank 0
            dirs = prepare_demo_data()
        dataset_dir, val_dir, calibration_dir = str(dirs["train"]), str(dirs["val"]), str(dirs["calibration"])
        logger.info("no --dataset_dir given: training on the embedded demo data in %s", dirs["root"])
    if not is_unset(val_dir):
        train, problems = find_volumes(dataset_dir)
        val, val_problems = find_volumes(val_dir)
        for p in problems + val_problems:
            logger.warning("skipped: %s", p)
    else:
        train, val = normal_datalists(dataset_dir, val_fraction=val_fraction, seed=seed)
    if not is_unset(exclude_dir):
        train, val = [dict(d) for d in train], [dict(d) for d in val]
        attach_exclusions(train + val, exclude_dir)
    calibration = find_volumes(calibration_dir)[0] if calibration_dir else val
    logger.info("%d training, %d validation and %d calibration volumes", len(train), len(val), len(calibration))
    return {"train": train, "val": val, "calibration": calibration}


def setup_logging(level: int = logging.INFO) -> bool:
    """Show the package's progress messages on stdout unless the user configured logging already."""
    log = logging.getLogger("monai_dnprd")
    log.setLevel(level)
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    return True
