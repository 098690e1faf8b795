"""Ignite handlers of the workflows: progress, logging, checkpoints and resume, export, calibration, metrics.

Each handler has ``attach(engine)`` so that MONAI workflows (and bundle configs) can list them in
``train_handlers`` / ``val_handlers``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import EarlyStopHandler

from monai_dnprd.calibration import calibrate, fit_map_statistics
from monai_dnprd.checkpoint import export_model, load_checkpoint, metadata_path, save_atomic
from monai_dnprd.data import CacheSetting, iter_preprocessed
from monai_dnprd.distributed import rank
from monai_dnprd.engines.evaluator import axial_axis
from monai_dnprd.io.writers import write_text
from monai_dnprd.metrics import VolumeMetricAccumulator, format_metrics_table
from monai_dnprd.progress import Progress

__all__ = [
    "ProgressBar",
    "StepProgress",
    "TrainingLogger",
    "CheckpointHandler",
    "BestModelSaver",
    "ExportHandler",
    "CalibrationHandler",
    "EarlyStop",
    "PeriodicValidation",
    "AnomalyMetricsHandler",
    "MapStatsHandler",
]

logger = logging.getLogger("monai_dnprd")


def _scalars(d: Any) -> dict[str, float]:
    """The finite-or-not float entries of a dict (engine outputs, metrics)."""
    if not isinstance(d, dict):
        return {}
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class ProgressBar:
    """A tqdm progress bar over iterations showing the given output keys (e.g. the loss).

    Shown on interactive terminals only: in log files a redrawn bar is noise, and the periodic log lines of
    ``TrainingLogger`` and the workflows already report progress there. ``force=True`` shows it anyway.
    """

    def __init__(self, output_keys: Sequence[str] = (), desc: str | None = None, force: bool = False) -> None:
        self.output_keys = tuple(output_keys)
        self.desc = desc
        self.force = force

    def attach(self, engine: Engine) -> None:
        from ignite.handlers import ProgressBar as _Bar

        if rank() != 0 or not (self.force or sys.stderr.isatty()):
            return
        keys = self.output_keys
        bar = _Bar(persist=True, desc=self.desc, bar_format="{desc}[{n_fmt}/{total_fmt}] {percentage:3.0f}%|{bar}|{postfix} [{elapsed}<{remaining}]")

        def transform(output: Any) -> dict:
            return {k: output[k] for k in keys if isinstance(output, dict) and k in output}

        bar.attach(engine, output_transform=transform if keys else None)


class StepProgress:
    """Progress of each run of an engine over a few long iterations (``monai_dnprd.progress``): a bar with ETA
    on a terminal, a start and an end line with the duration in logs.

    Starts at EPOCH_STARTED (after STARTED handlers such as ``MapStatsHandler``, which report their own
    progress) and ends at COMPLETED. A run stopped by an exception is closed as such when the next one starts
    (no EXCEPTION_RAISED handler: registering one would change how Ignite propagates the error).
    ``PeriodicValidation`` attaches one to its validator.
    """

    def __init__(self, desc: str, unit: str = "it") -> None:
        self.desc = desc
        self.unit = unit
        self._progress: Progress | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def _start(self, engine: Engine) -> None:
        if self._progress is not None and engine.state.epoch > 1:
            return  # a later epoch of the same run
        self._close(engine, failed=True)  # left open by a run that raised
        self._progress = Progress(self.desc, engine.state.epoch_length, self.unit)

    def _update(self, engine: Engine) -> None:
        if self._progress is not None:
            self._progress.update()

    def _close(self, engine: Engine, failed: bool = False) -> None:
        if self._progress is not None:
            self._progress.close(failed=failed)
            self._progress = None


class TrainingLogger:
    """Logs the trainer's scalar outputs (losses, learning rates, collapse monitors) to stdout and TensorBoard.

    Attach to the trainer; pass ``evaluator`` to also log its metrics after each validation. Prototype use is
    watched over the last ``window`` DNP iterations: a warning when one prototype held more than half of the
    tokens on average (a sustained collapse, not one odd batch), and the window's means at the end of training
    (``prototype_use`` in ``training_log.jsonl``).
    """

    def __init__(self, log_dir: str | Path | None = None, interval: int = 20, evaluator: Engine | None = None,
                 window: int = 100) -> None:
        self.log_dir = Path(log_dir) if log_dir else None
        self.interval = max(1, int(interval))
        self.evaluator = evaluator
        self.writer = None
        self.history: list[dict] = []
        self.window = max(1, int(window))
        self._shares: deque[float] = deque(maxlen=self.window)
        self._used: deque[float] = deque(maxlen=self.window)

    def attach(self, engine: Engine) -> None:
        if rank() != 0:
            return
        if self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.log_dir / "tensorboard"))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._close)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._validation, engine)

    def _iteration(self, engine: Engine) -> None:
        it = engine.state.iteration
        stats = _scalars(engine.state.output)
        if self.writer is not None:
            for k, v in stats.items():
                self.writer.add_scalar(f"train/{k}", v, it)
        if it % self.interval == 0 or it == 1:
            record = {"iteration": it, **stats}
            self.history.append(record)
            self._append_jsonl(record)
            text = " ".join(f"{k}={v:.4g}" for k, v in stats.items() if not k.startswith("lr_") and k != "stage")
            lrs = " ".join(f"{k}={v:.2g}" for k, v in stats.items() if k.startswith("lr_"))
            stage = "mim-warmup" if stats.get("stage", 1.0) == 0.0 else "dnp"
            logger.info("iter %d/%d [%s] %s %s", it, engine.state.epoch_length * engine.state.max_epochs, stage, text, lrs)
            if stats.get("teacher_spread", 1.0) < 1e-3:
                logger.warning("teacher features have almost no spread (%.2e): possible collapse", stats["teacher_spread"])
        if "prototype_max_share" in stats:
            self._shares.append(stats["prototype_max_share"])
            self._used.append(stats.get("prototypes_used", float("nan")))
            full = len(self._shares) == self.window
            if full and it % self.window == 0 and sum(self._shares) / self.window > 0.5:
                logger.warning("prototype collapse: over the last %d iterations one prototype held %.0f%% of the "
                               "tissue tokens on average (%.1f prototypes in use)", self.window,
                               100 * sum(self._shares) / self.window, sum(self._used) / self.window)

    def prototype_use(self) -> dict[str, float] | None:
        """Means of the prototype monitors over the last ``window`` DNP iterations (None before any)."""
        if not self._shares:
            return None
        n = len(self._shares)
        return {"iterations": n, "max_share": sum(self._shares) / n, "prototypes_used": sum(self._used) / n}

    def _validation(self, evaluator: Engine, trainer: Engine) -> None:
        metrics = _scalars(evaluator.state.metrics)
        it = trainer.state.iteration
        if self.writer is not None:
            for k, v in metrics.items():
                if math.isfinite(v):
                    self.writer.add_scalar(f"val/{k}", v, it)
        self._append_jsonl({"iteration": it, **{f"val_{k}": v for k, v in metrics.items()}})
        logger.info("validation at iter %d: %s", it, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def _append_jsonl(self, record: dict) -> None:
        if self.log_dir is None:
            return
        with open(self.log_dir / "training_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _close(self, engine: Engine) -> None:
        use = self.prototype_use()
        if use is not None:
            self._append_jsonl({"iteration": engine.state.iteration, "prototype_use": use})
            logger.info("prototype use over the last %d DNP iterations: largest share %.2f, %.1f prototypes used",
                        use["iterations"], use["max_share"], use["prototypes_used"])
        if self.writer is not None:
            self.writer.flush()


class CheckpointHandler:
    """Saves the full training state atomically every ``interval`` iterations and at the end; resumes from it.

    The checkpoint (``<ckpt_dir>/checkpoint.pt``) holds every object in ``objects`` (network with its EMA
    teacher, optimizer, LR scheduler, MIM head, trainer state with the iteration count) and the RNG states, and
    loads with ``weights_only=True``. With ``resume=True`` a run continues from the iteration it last saved.
    """

    def __init__(self, ckpt_dir: str | Path, objects: dict[str, Any], interval: int = 50, resume: bool = False) -> None:
        self.path = Path(ckpt_dir) / "checkpoint.pt"
        self.objects = objects
        self.interval = max(1, int(interval))
        self.resume = bool(resume)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._load)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self._save)
        engine.add_event_handler(Events.COMPLETED, self._save)

    def _state(self, engine: Engine) -> dict:
        state = {}
        for name, obj in self.objects.items():
            if obj is None:
                continue
            target = obj.module if hasattr(obj, "module") and isinstance(obj, torch.nn.Module) else obj
            state[name] = target.state_dict()
        state["trainer"] = {"iteration": engine.state.iteration, "epoch": engine.state.epoch}
        state["rng"] = {"torch": torch.get_rng_state()}
        return state

    def _save(self, engine: Engine) -> None:
        if rank() != 0:
            return
        save_atomic(self._state(engine), self.path)

    def _load(self, engine: Engine) -> None:
        if not self.resume:
            return
        if not self.path.is_file():
            logger.info("resume requested but %s does not exist: starting from iteration 0", self.path)
            return
        ckpt = load_checkpoint(self.path)
        for name, obj in self.objects.items():
            if obj is None or name not in ckpt:
                continue
            target = obj.module if hasattr(obj, "module") and isinstance(obj, torch.nn.Module) else obj
            target.load_state_dict(ckpt[name])
        if "rng" in ckpt:
            torch.set_rng_state(ckpt["rng"]["torch"])
        it = int(ckpt["trainer"]["iteration"])
        engine.state.iteration = it
        engine.state.epoch = it // engine.state.epoch_length  # Ignite continues mid-epoch from state.iteration
        logger.info("resumed from %s at iteration %d", self.path, it)
        if it >= engine.state.epoch_length * engine.state.max_epochs:
            logger.info("the resumed run had already finished")


class BestModelSaver:
    """Keeps the mapper with the best validation metric (``key``, higher is better) as an exported model."""

    def __init__(self, path: str | Path, mapper: torch.nn.Module, preprocessing: dict, key: str = "voxel_ap") -> None:
        self.path = Path(path)
        self.mapper = mapper
        self.preprocessing = preprocessing
        self.key = key
        self.best = -math.inf

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check)
        meta = metadata_path(self.path)
        if self.path.is_file() and meta.is_file():  # a resumed run keeps its earlier best
            try:
                self.best = float(json.loads(meta.read_text()).get("metrics", {}).get(self.key, -math.inf))
            except (OSError, ValueError):
                self.best = -math.inf

    def _check(self, engine: Engine) -> None:
        value = float(engine.state.metrics.get(self.key, float("nan")))
        if math.isfinite(value) and value > self.best:
            self.best = value
            export_model(self.path, self.mapper, self.preprocessing, metrics=_scalars(engine.state.metrics))
            logger.info("new best %s=%.4f -> %s", self.key, value, self.path)


class ExportHandler:
    """At the end of training writes ``model.pt`` + ``model.json``: the best validated mapper if any, else the final one."""

    def __init__(self, path: str | Path, mapper: torch.nn.Module, preprocessing: dict,
                 best_path: str | Path | None = None) -> None:
        self.path = Path(path)
        self.mapper = mapper
        self.preprocessing = preprocessing
        self.best_path = Path(best_path) if best_path else None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self._export)

    def _export(self, engine: Engine) -> None:
        if rank() != 0:
            return
        if self.best_path is not None and self.best_path.is_file() and metadata_path(self.best_path).is_file():
            best = load_checkpoint(self.best_path)
            metrics = json.loads(metadata_path(self.best_path).read_text()).get("metrics")
            self.mapper.load_state_dict(best)  # calibration and anything after use the exported weights
            export_model(self.path, self.mapper, self.preprocessing, metrics=metrics)
            logger.info("exported the best validated model (%s) to %s", metrics, self.path)
        else:
            export_model(self.path, self.mapper, self.preprocessing)
            logger.info("exported the final model to %s", self.path)


class CalibrationHandler:
    """After training, scores the normal validation volumes and stores the normal-score distribution.

    ``datalist`` holds normal volumes (never trained on), preprocessed here with ``preprocessing`` (from the
    on-disk cache when it holds them: ``cache``, ``cache_settings`` and ``num_workers`` as in
    ``data.iter_preprocessed``); the result goes to ``path`` (JSON, see ``monai_dnprd.calibration``) and
    inference uses it to set thresholds. Its progress is reported as "calibration".
    """

    def __init__(self, path: str | Path, datalist: Sequence[dict], preprocessing: Callable, mapper: torch.nn.Module,
                 inferer: Callable, score_q: float = 0.01, cache: CacheSetting = None,
                 cache_settings: dict | None = None, num_workers: int = 0) -> None:
        self.path = Path(path)
        self.datalist = datalist
        self.preprocessing = preprocessing
        self.mapper = mapper
        self.inferer = inferer
        self.score_q = score_q
        self.cache = cache
        self.cache_settings = cache_settings
        self.num_workers = int(num_workers)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self._calibrate)

    def _calibrate(self, engine: Engine) -> None:
        if rank() != 0:
            return
        volumes = iter_preprocessed(self.datalist, self.preprocessing, what="calibration", cache=self.cache,
                                    cache_settings=self.cache_settings, num_workers=self.num_workers,
                                    desc="calibration")  # one at a time
        cal = calibrate(volumes, self.mapper, self.inferer, self.score_q)
        cal.save(self.path)
        logger.info("calibration on %d normal volumes: volume score %.4f +- %.4f, voxel threshold at FPR 1%%: %.4f -> %s",
                    cal.volume_scores.size, cal.volume_mean, cal.volume_std, cal.voxel_threshold(0.01), self.path)


class MapStatsHandler:
    """Refits the map's statistics of normal tissue (``fit_map_statistics``) whenever the map is about to be used.

    Before every validation run (``evaluator`` STARTED) and at the end of training (before export and
    calibration: list it before those handlers), unless already fitted at this iteration. ``volumes`` are the
    preprocessed normal training volumes; ``precision``, the network's autocast while fitting, is the inference
    precision (``fit_map_statistics``). Does nothing for the paper's ``cosine`` map.
    """

    def __init__(self, mapper: torch.nn.Module, volumes: Sequence[dict], k: int, img_size: int,
                 evaluator: Engine | None = None, max_slices: int = 256, min_foreground: float = 0.15,
                 batch_size: int = 32, precision: str = "fp32") -> None:
        self.mapper = mapper
        self.volumes = volumes
        self.k = int(k)
        self.img_size = int(img_size)
        self.evaluator = evaluator
        self.max_slices = int(max_slices)
        self.min_foreground = float(min_foreground)
        self.batch_size = int(batch_size)
        self.precision = precision
        self._fitted_at: int | None = None

    def attach(self, engine: Engine) -> None:
        if not self.mapper.needs_statistics():
            return
        engine.add_event_handler(Events.COMPLETED, self._fit)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.STARTED, lambda _: self._fit(engine))

    def _fit(self, trainer: Engine) -> None:
        if rank() != 0 or self._fitted_at == trainer.state.iteration:
            return
        n = fit_map_statistics(self.mapper, self.volumes, self.k, self.img_size, self.max_slices,
                               self.min_foreground, self.batch_size, self.precision)
        self._fitted_at = trainer.state.iteration
        logger.debug("map statistics fitted on %d tokens at iteration %d", n, trainer.state.iteration)


class PeriodicValidation:
    """Runs ``validator`` every ``interval`` iterations after ``start`` (the warm-up) and at the last iteration.

    Validating during the masked-image warm-up would measure an untrained decoder, so it starts after it.
    """

    def __init__(self, validator: Engine, interval: int, start: int = 0) -> None:
        self.validator = validator
        self.interval = max(1, int(interval))
        self.start = int(start)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._maybe_run)
        StepProgress("validation", unit="vol").attach(self.validator)

    def _maybe_run(self, engine: Engine) -> None:
        if rank() != 0:  # validation has no collective calls: the other ranks go on training meanwhile
            return
        it = engine.state.iteration
        last = engine.state.epoch_length * engine.state.max_epochs
        if it <= self.start:
            return
        if (it - self.start) % self.interval == 0 or it == last:
            self.validator.run()


class AnomalyMetricsHandler:
    """Accumulates maps and lesion labels over an evaluator epoch and puts the metrics in ``state.metrics``.

    Each output dict needs "pred" and "mask"; its "label" (tensor or file path) marks lesion voxels (absent or
    all zero: a normal volume). Scalar metrics go to ``engine.state.metrics`` with keys like ``voxel_ap``;
    with ``output_dir`` the full result is written to ``metrics.json`` and a table is printed.
    """

    def __init__(self, output_dir: str | Path | None = None, axis: int | None = -1, q: float = 0.01,
                 threshold: float | None = None, max_pooled_voxels: int | None = None, print_table: bool = False,
                 label_loader: Callable | None = None) -> None:
        self.output_dir = Path(output_dir) if output_dir else None
        self.axis = axis
        self.q = q
        self.threshold = threshold
        self.max_pooled_voxels = max_pooled_voxels
        self.print_table = print_table
        self.label_loader = label_loader
        self.acc: VolumeMetricAccumulator | None = None
        self.result: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._compute)

    def _reset(self, engine: Engine) -> None:
        self.acc = None

    def _update(self, engine: Engine) -> None:
        d = engine.state.output
        if not isinstance(d, dict) or d.get("error") or "pred" not in d:
            return
        pred = torch.as_tensor(d["pred"]).detach().cpu().numpy()[0]
        mask = torch.as_tensor(d["mask"]).cpu().numpy()[0] > 0 if d.get("mask") is not None else None
        label = d.get("label")
        if isinstance(label, (str, Path)) and self.label_loader is not None:
            label = self.label_loader(d)
        label = None if label is None else (torch.as_tensor(label).cpu().numpy().reshape(pred.shape) > 0)
        axis = self.axis
        if axis is None:  # original image space: slice along the array axis closest to inferior-superior
            axis = axial_axis(torch.as_tensor(d["pred"].affine) if hasattr(d["pred"], "affine") else np.eye(4))
        if self.acc is None:
            self.acc = VolumeMetricAccumulator(axis=axis, q=self.q, max_pooled_voxels=self.max_pooled_voxels)
        is_normal = None if label is None else (not bool(label.any()))
        self.acc.add(str(d.get("name")), pred, label=label, mask=mask, volume_score=d.get("score"),
                     is_normal=is_normal, threshold=self.threshold, axis=axis)

    def _compute(self, engine: Engine) -> None:
        if self.acc is None:
            return
        self.result = self.acc.compute()
        flat = {}
        for level in ("voxel", "slice", "volume"):
            for k, v in self.result.get(level, {}).items():
                if isinstance(v, (int, float)):
                    flat[f"{level}_{k}"] = float(v)
        engine.state.metrics.update(flat)
        if self.output_dir is not None:
            write_text(json.dumps(self.result, indent=1, default=float), self.output_dir / "metrics.json")
        if self.print_table:
            print(format_metrics_table(self.result), flush=True)


class EarlyStop:
    """Stops training when the validation metric ``key`` has not improved for ``patience`` validations.

    Attach to the trainer; it puts MONAI's ``EarlyStopHandler`` (ignite ``EarlyStopping``) on ``evaluator``,
    scoring each validation by ``key`` (higher is better, a non-finite value counts as no improvement).
    ``patience <= 0`` disables it. The end-of-training handlers (export of the best model, calibration) still
    run after an early stop.
    """

    def __init__(self, evaluator: Engine, patience: int = 0, key: str = "voxel_ap", min_delta: float = 0.0) -> None:
        self.evaluator = evaluator
        self.patience = int(patience)
        self.key = key
        self.min_delta = float(min_delta)
        self.handler: EarlyStopHandler | None = None

    def attach(self, engine: Engine) -> None:
        """Watch the evaluator's validations and stop ``engine`` (the trainer); nothing when disabled."""
        if self.patience > 0:
            # cumulative: a gain counts from the best score so far, not from the previous validation
            self.handler = EarlyStopHandler(self.patience, self.score, trainer=engine, min_delta=self.min_delta,
                                            cumulative_delta=True)
            self.handler.attach(self.evaluator)

    def score(self, evaluator: Engine) -> float:
        """The validation's ``key`` metric; -inf when missing or not finite."""
        value = float(evaluator.state.metrics.get(self.key, float("nan")))
        return value if math.isfinite(value) else -math.inf
