"""Datasets of the workflows: normal-volume splits, safe per-volume loading, training slices, validation volumes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from monai.data import Dataset
from torch.utils.data import Dataset as TorchDataset

from monai_dnprd.cache import PreprocessedCache, resolve_cache
from monai_dnprd.config import is_unset
from monai_dnprd.io import VolumeError, find_volume_error, find_volumes, ignored_summary, scan_volumes
from monai_dnprd.progress import Progress

__all__ = [
    "SafeDataset",
    "normal_datalists",
    "labelled_datalist",
    "attach_exclusions",
    "SliceDataset",
    "iter_preprocessed",
    "preprocess_volumes",
    "slice_dataset",
    "synthetic_validation_dataset",
    "first_item",
    "inference_datalist",
    "load_label",
]

logger = logging.getLogger(__name__)


def first_item(batch: list) -> Any:
    """Collate function of the per-volume loaders: one volume per iteration, no batch dimension."""
    return batch[0]


class SafeDataset(Dataset):
    """A dataset whose items never raise: a volume that fails to load or preprocess becomes an error record.

    The record ``{"name", "image", "error"}`` travels through the engine so that the workflow can report the
    failure and go on with the other volumes.
    """

    def _transform(self, index: int) -> dict:
        item = self.data[index]
        start = time.perf_counter()
        try:
            out = super()._transform(index)
            out["load_seconds"] = time.perf_counter() - start
            return out
        except Exception as err:  # noqa: BLE001 - one bad volume must not stop the run
            volume_error = find_volume_error(err)  # MONAI wraps transform errors in RuntimeError
            if volume_error is not None:
                reason = volume_error.reason
            else:
                cause: BaseException = err
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                reason = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}".strip()
            return {"name": item.get("name"), "image": item.get("image"), "error": reason}


def normal_datalists(
    dataset_dir: str | Path, val_fraction: float = 0.2, seed: int = 0, min_val: int = 1
) -> tuple[list[dict], list[dict]]:
    """Find the normal volumes under ``dataset_dir`` and split them into training and validation lists.

    The validation volumes (at least ``min_val`` when there are two volumes or more) are never trained on:
    they carry synthetic lesions for model selection and give the normal-score calibration.
    """
    items, problems = find_volumes(dataset_dir)
    for p in problems:
        logger.warning("skipped: %s", p)
    if not items:
        raise VolumeError(dataset_dir, "no usable volumes")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = max(min_val, int(round(val_fraction * len(items)))) if len(items) > 1 else 0
    val = [items[i] for i in sorted(order[:n_val])]
    train = [items[i] for i in sorted(order[n_val:])]
    if not val:
        logger.warning("only one volume: validation and calibration reuse the training volume")
        val = list(train)
    return train, val


def labelled_datalist(input_dir: str | Path, label_dir: str | Path | None = None) -> tuple[list[dict], list[VolumeError]]:
    """Volumes under ``input_dir``, each with ``label`` = the file of the same name under ``label_dir``.

    A missing label is an error of the whole run (evaluation without a label would silently drop a case).
    """
    items, problems = find_volumes(input_dir)
    return _attach_labels(items, problems, label_dir)


def _attach_labels(items: list[dict], problems: list[VolumeError], label_dir: str | Path | None
                   ) -> tuple[list[dict], list[VolumeError]]:
    """Give each found volume its ``label`` from ``label_dir`` (see ``labelled_datalist``); problems of both folders."""
    if label_dir is None:
        return items, problems
    labels, label_problems = find_volumes(label_dir)
    by_name = {d["name"]: d for d in labels}
    missing = [d["name"] for d in items if d["name"] not in by_name]
    if missing:
        raise VolumeError(label_dir, f"no label for {len(missing)} volume(s): {', '.join(missing[:5])}")
    for d in items:
        d["label"] = by_name[d["name"]]["image"]
        d["label_series_uid"] = by_name[d["name"]].get("series_uid", "")
    return items, problems + label_problems


def attach_exclusions(items: Sequence[dict], exclude_dir: str | Path | None) -> int:
    """Give each item the mask of its known abnormal voxels: the file (or DICOM series) of the same name under
    ``exclude_dir``, as ``exclude`` (and ``exclude_series_uid``). Items without one are taken as wholly normal.

    Returns how many items got a mask; none at all is an error (a wrong folder or other file names would
    otherwise train on the lesions without a word).
    """
    if is_unset(exclude_dir):
        return 0
    masks, problems = find_volumes(exclude_dir)
    for p in problems:
        logger.warning("skipped exclusion mask: %s", p)
    by_name = {m["name"]: m for m in masks}
    n = 0
    for d in items:
        m = by_name.get(d["name"])
        if m is not None:
            d["exclude"] = m["image"]
            d["exclude_series_uid"] = m.get("series_uid", "")
            n += 1
    if items and not n:
        names = ", ".join(sorted(by_name)[:3]) or "none"
        raise VolumeError(exclude_dir, f"no exclusion mask has the name of a training or validation volume "
                                       f"(masks: {names}; volumes: {', '.join(d['name'] for d in items[:3])})")
    logger.info("exclusion masks for %d of %d volumes from %s", n, len(items), exclude_dir)
    return n


class SliceDataset(TorchDataset):
    """Random 2.5D training slices from preprocessed (cached) normal volumes.

    Item ``i`` draws one slice of volume ``i % n_volumes`` with ``slice_sampler`` (a ``RandSlice25Dd`` with
    ``num_samples=1``), then applies ``slice_transform``; an epoch visits every volume
    ``samples_per_volume`` times, and a shuffling loader mixes volumes within each batch. ``min_length``
    (the batch size) keeps an epoch at least one full batch long: with few volumes, a loader that drops the
    last incomplete batch would otherwise yield nothing, and training would end without a single step.
    """

    def __init__(self, volumes: TorchDataset, slice_sampler: Callable, slice_transform: Callable | None = None,
                 samples_per_volume: int = 8, min_length: int = 0) -> None:
        self.volumes = volumes
        self.slice_sampler = slice_sampler
        self.slice_transform = slice_transform
        self.samples_per_volume = int(samples_per_volume)
        self.min_length = int(min_length)

    def __len__(self) -> int:
        return max(len(self.volumes) * self.samples_per_volume, self.min_length)

    def __getitem__(self, index: int) -> dict:
        sample = self.slice_sampler(self.volumes[index % len(self.volumes)])
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return self.slice_transform(sample) if self.slice_transform is not None else sample


CacheSetting = Union[bool, str, Path, PreprocessedCache, None]


class _PreprocessItems(TorchDataset):
    """Volume ``i`` preprocessed, through the on-disk cache when there is one: ``(item, status)`` with status
    "cached", "preprocessed" or "failed" (then ``item`` is ``SafeDataset``'s error record). Never raises, so
    that it can run in DataLoader worker processes."""

    def __init__(self, volumes: Sequence[dict], preprocessing: Callable, cache: PreprocessedCache | None) -> None:
        self.volumes = volumes
        self.preprocessing = preprocessing
        self.cache = cache

    def __len__(self) -> int:
        return len(self.volumes)

    def _compute(self, item: Mapping) -> dict:
        return SafeDataset([dict(item)], transform=self.preprocessing)[0]

    def __getitem__(self, index: int) -> tuple[dict, str]:
        item = self.volumes[index]
        if self.cache is None:
            out, hit = self._compute(item), False
        else:
            out, hit = self.cache.get(item, self._compute)
        return out, "failed" if out.get("error") else ("cached" if hit else "preprocessed")


def iter_preprocessed(volumes: Sequence[dict], preprocessing: Callable, what: str = "training",
                      progress: bool = True, cache: CacheSetting = None, cache_settings: Mapping | None = None,
                      num_workers: int = 0, desc: str | None = None) -> Iterator[dict]:
    """Preprocess the volumes one at a time, in order, skipping (and logging, one line each) those that fail;
    raises ``VolumeError`` at the end if none was usable.

    Outputs come from the on-disk cache when it holds them (``monai_dnprd.cache``: ``cache`` None -> the default
    folder, False -> none, or a folder; ``cache_settings`` join its key), else are computed and stored. With
    ``num_workers`` > 0 they are computed in that many worker processes (not when all are cached). ``progress``
    reports the step (``monai_dnprd.progress``: a bar on a terminal, log lines elsewhere) as ``desc`` with
    cached/preprocessed counts; the consumer's work on each volume counts in its rate and ETA.
    """
    store = resolve_cache(cache, preprocessing, cache_settings)
    source = _PreprocessItems(volumes, preprocessing, store)
    use_workers = int(num_workers) > 0 and len(volumes) > 1
    if use_workers and store is not None and all(store.has(d) for d in volumes):
        use_workers = False  # only loading to do: workers would add start-up and copying, nothing else
    if use_workers:
        from torch.utils.data import DataLoader

        results: Iterable[tuple[dict, str]] = DataLoader(source, batch_size=1, shuffle=False, collate_fn=first_item,
                                                         num_workers=min(int(num_workers), len(volumes)))
    else:
        results = (source[i] for i in range(len(source)))
    n_ok = 0
    with Progress(desc or f"{what} volumes", len(volumes), "vol", enabled=progress) as bar:
        for d, status in results:
            if status == "failed":
                logger.warning("skipped %s volume %s: %s", what, d.get("image"), d["error"])
                bar.update(failed=1)
                continue
            n_ok += 1
            yield d
            bar.update(**{status: 1})
    if not n_ok:
        raise VolumeError(str(volumes[0]["image"]) if volumes else "-", f"no usable {what} volume ({len(volumes)} failed)")


def preprocess_volumes(volumes: Sequence[dict], preprocessing: Callable, what: str = "training",
                       cache: CacheSetting = None, cache_settings: Mapping | None = None, num_workers: int = 0,
                       desc: str | None = None) -> list[dict]:
    """Preprocess every volume once and keep them all (``iter_preprocessed``, with its cache and workers).

    A bad file in a folder of normal volumes must not stop training; if no volume is usable, that is an error.
    """
    return list(iter_preprocessed(volumes, preprocessing, what, cache=cache, cache_settings=cache_settings,
                                  num_workers=num_workers, desc=desc))


def slice_dataset(
    volumes: Sequence[dict],
    preprocessing: Callable,
    slice_sampler: Callable,
    slice_transform: Callable | None = None,
    samples_per_volume: int = 8,
    min_length: int = 0,
    cache: CacheSetting = None,
    cache_settings: Mapping | None = None,
    num_workers: int = 0,
) -> SliceDataset:
    """Training slices: volumes preprocessed once (from the on-disk cache when it holds them, see
    ``iter_preprocessed``; kept in memory), then random 2.5D slices drawn from them; at least ``min_length``
    per epoch (``SliceDataset``)."""
    kept = preprocess_volumes(volumes, preprocessing, "training", cache, cache_settings, num_workers,
                              desc="preprocessing training volumes")
    return SliceDataset(kept, slice_sampler, slice_transform, samples_per_volume, min_length)


def synthetic_validation_dataset(
    volumes: Sequence[dict], preprocessing: Callable, lesion_transform: Callable, seed: int = 12345,
    cache: CacheSetting = None, cache_settings: Mapping | None = None, num_workers: int = 0,
) -> list[dict]:
    """Preprocessed normal volumes (cached like the training ones, see ``iter_preprocessed``) with synthetic
    lesions inserted, fixed once by ``seed`` (same every validation)."""
    out = []
    preprocessed = iter_preprocessed(volumes, preprocessing, "validation", cache=cache, cache_settings=cache_settings,
                                     num_workers=num_workers, desc="building the validation set")
    for i, d in enumerate(preprocessed):
        if hasattr(lesion_transform, "set_random_state"):
            lesion_transform.set_random_state(seed + i)
        out.append(lesion_transform(d))
    return out


def remove_stale_temp_files(output_dir: str | Path) -> list[Path]:
    """Delete the hidden temporary files (``.name.*.tmp*``) that a killed run left in ``output_dir``.

    Every output is written to such a file and renamed into place, so any that exist at start-up were cut off
    by an interruption. Under torchrun, rank 0 cleans while the other ranks wait.
    """
    from monai_dnprd.distributed import rank, rank_zero_first

    removed: list[Path] = []
    with rank_zero_first():
        if rank() == 0 and Path(output_dir).is_dir():
            for folder in (Path(output_dir), Path(output_dir) / "report"):
                for p in folder.glob(".*.tmp*"):
                    if p.is_file():
                        p.unlink(missing_ok=True)
                        removed.append(p)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run in %s", len(removed), output_dir)
    return removed


def finished_names(output_dir: str | Path) -> set[str]:
    """Volumes an earlier run finished: a map ``<name>.nii.gz`` AND a row in ``scores.csv`` (written last)."""
    import csv

    out = Path(output_dir)
    scores = out / "scores.csv"
    if not scores.is_file():
        return set()
    with open(scores, newline="", encoding="utf-8") as f:
        rows = {r["name"] for r in csv.DictReader(f) if r.get("name")}
    return {n for n in rows if (out / f"{n}.nii.gz").is_file()}


def inference_datalist(input_dir: str | Path, output_dir: str | Path | None = None, skip_existing: bool = False,
                       label_dir: str | Path | None = None) -> list[dict]:
    """Volumes to process under ``input_dir`` (with labels from ``label_dir`` when given).

    Files that could not even be inspected become error records (reported like any failed volume); the log
    says how many volumes were found and how many other files were ignored. With ``skip_existing``, volumes
    finished by an earlier run in ``output_dir`` are left out (rerun after a kill).
    """
    scan = scan_volumes(input_dir)
    unreadable = f", {len(scan.problems)} path(s) could not be inspected" if scan.problems else ""
    logger.info("%d volume%s found in %s, %s%s", len(scan.volumes), "" if len(scan.volumes) == 1 else "s", input_dir,
                ignored_summary(scan.ignored), unreadable)
    items, problems = _attach_labels(scan.volumes, scan.problems, label_dir)
    if output_dir is not None:
        remove_stale_temp_files(output_dir)
    if skip_existing and output_dir is not None:
        done = finished_names(output_dir)
        skipped = [d for d in items if d["name"] in done]
        items = [d for d in items if d["name"] not in done]
        if skipped:
            logger.info("skipping %d volume(s) already finished in %s", len(skipped), output_dir)
    errors = [{"name": Path(p.path).name, "image": p.path, "error": p.reason} for p in problems]
    return items + errors


def load_label(d: dict) -> np.ndarray:
    """The lesion mask of an evaluation item, checked against the map's shape (original image space)."""
    from monai_dnprd.io import read_volume

    label = read_volume(d["label"], d.get("label_series_uid") or None).array > 0
    shape = tuple(d["pred"].shape[1:])
    if label.shape != shape:
        raise VolumeError(d["label"], f"label shape {label.shape} differs from the image shape {shape}")
    return label
