"""The on-disk cache of preprocessed volumes (monai_dnprd.cache) and the progress helper (monai_dnprd.progress)."""

from __future__ import annotations

from array import array
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, CropForegroundd, Orientationd

from monai_dnprd.cache import PreprocessedCache, default_cache_dir, resolve_cache
from monai_dnprd.data import iter_preprocessed, preprocess_volumes, synthetic_validation_dataset
from monai_dnprd.progress import Progress, progress
from monai_dnprd.transforms import ExclusionMaskd, ForegroundMaskd, LoadVolumed, NormalizeForegroundd


def _write_volume(path: Path, seed: int = 0, shape: tuple[int, int, int] = (14, 16, 12)) -> Path:
    """A tiny volume: a bright noisy ellipsoid on a dark background, oblique-free 2 mm affine."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    noise = 100 + 10 * rng.standard_normal(shape, dtype=np.float32)
    arr = (np.sum(grid ** 2, axis=0) < 0.6).astype(np.float32) * noise
    aff = np.diag([-2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [10.0, -12.0, 4.0]
    nib.save(nib.Nifti1Image(arr, aff), str(path))
    return path


class Spy:
    """Counts the calls of a preprocessing chain (one per volume actually preprocessed).

    The count lives in an ``array`` because the cache key describes the chain's attributes: a plain int
    attribute that changes with every call would give every call another key.
    """

    def __init__(self, transform: Compose) -> None:
        self.transform = transform
        self._count = array("i", [0])

    @property
    def calls(self) -> int:
        return self._count[0]

    def __call__(self, data: dict) -> dict:
        self._count[0] += 1
        return self.transform(data)


def _preprocessing(margin: int = 1, exclude_margin_mm: float = 2.0) -> Compose:
    """A short version of the bundle's training preprocessing (load, reorient, mask, normalise, crop, exclusion)."""
    return Compose([
        LoadVolumed(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        ForegroundMaskd(keys="image", mask_key="mask", modality="mri"),
        NormalizeForegroundd(keys="image", mask_key="mask", modality="mri"),
        CropForegroundd(keys=["image", "mask"], source_key="mask", margin=margin, allow_smaller=True),
        ExclusionMaskd(keys="exclude", margin_mm=exclude_margin_mm),
    ])


@pytest.fixture()
def volumes(tmp_path: Path) -> list[dict]:
    """Two tiny volumes, the second with an exclusion mask."""
    data = tmp_path / "data"
    data.mkdir()
    items = [{"image": str(_write_volume(data / f"v{i}.nii.gz", seed=i)), "name": f"v{i}", "series_uid": ""}
             for i in range(2)]
    ex = np.zeros((14, 16, 12), np.uint8)
    ex[6:8, 7:9, 5:7] = 1
    nib.save(nib.Nifti1Image(ex, nib.load(items[1]["image"]).affine), str(data / "v1_mask.nii.gz"))
    items[1]["exclude"] = str(data / "v1_mask.nii.gz")
    return items


def _run(items: list[dict], spy: Spy, cache_dir: Path, settings: dict | None = None,
         num_workers: int = 0) -> list[dict]:
    """Preprocess ``items`` through the cache in ``cache_dir``."""
    return preprocess_volumes(items, spy, cache=cache_dir, cache_settings=settings, num_workers=num_workers)


def test_second_call_hits_the_cache(volumes, tmp_path):
    spy = Spy(_preprocessing())
    first = _run(volumes, spy, tmp_path / "cache")
    assert spy.calls == 2
    second = _run(volumes, spy, tmp_path / "cache")
    assert spy.calls == 2  # nothing preprocessed again
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert not list((tmp_path / "cache").glob(".*.tmp"))
    for a, b in zip(first, second):
        assert a["name"] == b["name"] and a["image"] is not b["image"]
        for key in ("image", "mask"):
            assert torch.equal(a[key].as_tensor(), b[key].as_tensor()) and a[key].dtype == b[key].dtype
            assert torch.equal(a[key].affine, b[key].affine)
            assert len(a[key].applied_operations) == len(b[key].applied_operations)
        assert np.array_equal(a["foreground_start_coord"], b["foreground_start_coord"])
        assert a["image"].meta["filename_or_obj"] == b["image"].meta["filename_or_obj"]
    assert "exclude" not in second[0]
    assert torch.equal(first[1]["exclude"].as_tensor(), second[1]["exclude"].as_tensor())
    assert float(second[1]["exclude"].sum()) > 0


def test_chain_key_is_the_same_before_and_after_use(volumes):
    from monai_dnprd.cache import preprocessing_fingerprint

    chain = _preprocessing()
    before = preprocessing_fingerprint(chain, {"modality": "mri"})
    chain(dict(volumes[1]))  # MONAI transforms gain run-time state (e.g. a thread-local tracing flag)
    assert preprocessing_fingerprint(chain, {"modality": "mri"}) == before
    assert preprocessing_fingerprint(_preprocessing(), {"modality": "mri"}) == before
    assert preprocessing_fingerprint(_preprocessing(exclude_margin_mm=3.0), {"modality": "mri"}) != before


def test_entries_load_without_unpickling_objects(volumes, tmp_path):
    _run(volumes[:1], Spy(_preprocessing()), tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("*.pt")
    loaded = torch.load(entry, weights_only=True)  # plain tensors and containers only: no safe_globals needed
    assert loaded["format"].startswith("monai-dnprd-preprocessed/")


def test_changed_setting_or_touched_file_misses(volumes, tmp_path):
    cache = tmp_path / "cache"
    spy = Spy(_preprocessing())
    _run(volumes, spy, cache, settings={"spacing": None})
    _run(volumes, spy, cache, settings={"spacing": [1.0, 1.0, 1.0]})  # another setting passed in
    assert spy.calls == 4
    other = Spy(_preprocessing(margin=2))  # another value inside the chain itself
    _run(volumes, other, cache, settings={"spacing": None})
    assert other.calls == 2
    st = os.stat(volumes[0]["image"])
    os.utime(volumes[0]["image"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    _run(volumes, spy, cache, settings={"spacing": None})
    assert spy.calls == 5  # only the touched volume
    _write_volume(Path(volumes[1]["exclude"]).parent / "v1_mask.nii.gz", seed=5)  # its exclusion mask replaced
    _run(volumes, spy, cache, settings={"spacing": None})
    assert spy.calls == 6


def test_dicom_series_keyed_by_its_files(volumes, tmp_path):
    from dicom_utils import write_dicom_series

    from monai_dnprd.io import find_volumes

    files = write_dicom_series(volumes[0]["image"], tmp_path / "series")
    items, problems = find_volumes(tmp_path / "series")
    assert len(items) == 1 and not problems and items[0]["series_uid"]
    spy = Spy(_preprocessing())
    _run(items, spy, tmp_path / "cache")
    _run(items, spy, tmp_path / "cache")
    assert spy.calls == 1
    st = os.stat(files[3])
    os.utime(files[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # one slice file touched
    _run(items, spy, tmp_path / "cache")
    assert spy.calls == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_entry_is_rebuilt(volumes, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    spy = Spy(_preprocessing())
    fresh = _run(volumes[:1], spy, cache)
    (entry,) = cache.glob("*.pt")
    data = entry.read_bytes()
    entry.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a torch file" * 10, "empty": b""}[damage])
    with caplog.at_level(logging.WARNING):
        rebuilt = _run(volumes[:1], spy, cache)
    assert spy.calls == 2
    assert "unreadable cache entry" in caplog.text
    assert torch.equal(fresh[0]["image"].as_tensor(), rebuilt[0]["image"].as_tensor())
    _run(volumes[:1], spy, cache)  # the rebuilt entry is good again
    assert spy.calls == 2


def test_failed_volume_is_skipped_and_not_cached(volumes, tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"no nifti")
    items = volumes + [{"image": str(bad), "name": "bad", "series_uid": ""}]
    spy = Spy(_preprocessing())
    assert len(_run(items, spy, tmp_path / "cache")) == 2
    assert len(_run(items, spy, tmp_path / "cache")) == 2
    assert spy.calls == 4  # the bad one is tried each time, the good ones once
    with pytest.raises(Exception, match="no usable training volume"):
        _run(items[2:], spy, tmp_path / "cache")


def test_workers_give_the_same_items(volumes, tmp_path):
    one = _run(volumes, Spy(_preprocessing()), tmp_path / "c1")
    two = _run(volumes, Spy(_preprocessing()), tmp_path / "c2", num_workers=2)
    assert [d["name"] for d in one] == [d["name"] for d in two]
    for a, b in zip(one, two):
        assert torch.equal(a["image"].as_tensor(), b["image"].as_tensor())
    assert len(list((tmp_path / "c2").glob("*.pt"))) == 2  # the workers stored their results


def test_disabled_cache_and_default_folder(volumes, tmp_path, monkeypatch):
    monkeypatch.setenv("MONAI_DNPRD_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    spy = Spy(_preprocessing())
    preprocess_volumes(volumes, spy)  # the default: the folder of the environment variable
    preprocess_volumes(volumes, spy)
    assert spy.calls == 2 and len(list((tmp_path / "env").glob("*.pt"))) == 2
    preprocess_volumes(volumes, spy, cache=False)
    assert spy.calls == 4
    monkeypatch.setenv("MONAI_DNPRD_CACHE_DIR", "off")
    assert default_cache_dir() is None and resolve_cache(None, spy) is None
    monkeypatch.delenv("MONAI_DNPRD_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "monai-dnprd" / "preprocessed"


def test_unwritable_cache_is_not_fatal(volumes, tmp_path, caplog):
    cache = PreprocessedCache(tmp_path / "cache", _preprocessing())
    cache.root = tmp_path / "missing" / "folder"  # every write fails
    with caplog.at_level(logging.WARNING):
        out = preprocess_volumes(volumes, Spy(_preprocessing()), cache=cache)
    assert len(out) == 2 and caplog.text.count("cannot write to the preprocessing cache") == 1


def test_validation_set_uses_the_cache(volumes, tmp_path):
    spy = Spy(_preprocessing())
    lesion = lambda d: {**d, "label": torch.zeros_like(d["mask"])}  # noqa: E731 - a stand-in lesion transform
    a = synthetic_validation_dataset(volumes, spy, lesion, cache=tmp_path / "cache")
    b = synthetic_validation_dataset(volumes, spy, lesion, cache=tmp_path / "cache")
    assert spy.calls == 2 and len(a) == len(b) == 2 and "label" in b[0]


# ---------------------------------------------------------------- progress

def test_progress_without_tty_logs_start_and_end(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="monai_dnprd"):
        assert list(progress(range(3), "counting", unit="vol")) == [0, 1, 2]
    out = capsys.readouterr()
    assert out.err == ""  # no bar (stderr is not a terminal under pytest)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "counting: started (3 vol)"
    assert lines[-1].startswith("counting: 3 vol in ") and len(lines) == 2


def test_progress_counts_periodic_lines_and_bar(caplog):
    with caplog.at_level(logging.INFO, logger="monai_dnprd"):
        with Progress("loading", total=2, unit="vol", log_every=1e-9) as p:
            p.update(cached=1)
            p.update(preprocessed=1)
    lines = [r.getMessage() for r in caplog.records]
    assert "1/2 vol" in lines[1] and "left" in lines[1]
    assert lines[-1].endswith("(cached 1, preprocessed 1)")


def test_progress_on_a_terminal_draws_a_bar(monkeypatch, caplog, capsys):
    import monai_dnprd.progress as progress_module

    monkeypatch.setattr(progress_module, "interactive", lambda stream=None: True)
    with caplog.at_level(logging.INFO, logger="monai_dnprd"):
        list(progress(range(4), "drawn", unit="vol"))
    err = capsys.readouterr().err
    assert "drawn" in err and "4/4" in err  # tqdm's bar, with its rate and times
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("drawn: 4 vol in")  # no start line, the end line stays


def test_iter_preprocessed_reports_counts(volumes, tmp_path, caplog):
    spy = Spy(_preprocessing())
    list(iter_preprocessed(volumes, spy, cache=tmp_path / "cache", desc="warming"))
    with caplog.at_level(logging.INFO, logger="monai_dnprd"):
        list(iter_preprocessed(volumes, spy, cache=tmp_path / "cache", desc="warm"))
    assert caplog.records[-1].getMessage().endswith("(cached 2)")


def test_step_progress_on_an_engine(caplog):
    from ignite.engine import Engine

    from monai_dnprd.engines.handlers import StepProgress

    engine = Engine(lambda e, b: b)
    StepProgress("validation", unit="vol").attach(engine)
    with caplog.at_level(logging.INFO, logger="monai_dnprd"):
        engine.run([1, 2, 3], max_epochs=1)
        engine.run([1, 2], max_epochs=1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation")]
    assert lines[0] == "validation: started (3 vol)" and lines[1].startswith("validation: 3 vol in")
    assert lines[2] == "validation: started (2 vol)" and lines[3].startswith("validation: 2 vol in")
