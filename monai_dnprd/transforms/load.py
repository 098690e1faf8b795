"""MONAI loading transforms on top of read_volume: channel-first MetaTensor with the metadata LoadImage would give."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import MetaKeys, SpaceKeys

from monai_dnprd.io.errors import VolumeError
from monai_dnprd.io.readers import Volume, read_channels, read_volume

AFFINE_ATOL = 1e-4  # mm; co-registered sequences must share the affine within this tolerance


def volume_to_metatensor(volumes: Sequence[Volume], paths: Sequence[str]) -> MetaTensor:
    """Stack Volumes as channels of one (C, X, Y, Z) float32 MetaTensor with LoadImage-style metadata."""
    first = volumes[0]
    for vol, path in zip(volumes[1:], paths[1:]):
        if vol.array.shape != first.array.shape:
            raise VolumeError(
                path, f"shape {tuple(vol.array.shape)} differs from {tuple(first.array.shape)} of {paths[0]}"
            )
        if not np.allclose(vol.affine, first.affine, rtol=0.0, atol=AFFINE_ATOL):
            raise VolumeError(path, f"affine differs from that of {paths[0]} (sequences must be co-registered)")
    array = np.stack([v.array for v in volumes], axis=0) if len(volumes) > 1 else first.array[None]
    affine = np.asarray(first.affine, dtype=np.float64)
    meta = {
        MetaKeys.AFFINE: torch.as_tensor(affine, dtype=torch.float64),
        MetaKeys.ORIGINAL_AFFINE: affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(first.array.shape, dtype=np.int64),
        MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if len(volumes) == 1 else 0,
        MetaKeys.SPACE: SpaceKeys.RAS,
        "filename_or_obj": str(paths[0]),
        "source_format": first.source_format,
        "nonfinite_replaced": int(sum(v.info.get("nonfinite_replaced", 0) for v in volumes)),
    }
    for vol in volumes:
        for key, value in vol.info.items():
            meta.setdefault(key, value)
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), meta=meta)


ChannelChoice = Union[int, Sequence[int], None]


def channel_choice(index: Any) -> int | tuple[int, ...] | None:
    """Normalise a 4D channel choice: None, one int, or a list of ints (several channels, stacked in that order)."""
    if index is None or (isinstance(index, float) and np.isnan(index)):
        return None
    if isinstance(index, (list, tuple)):
        return tuple(int(i) for i in index)
    return int(index)


def read_choice(path: str, series_uid: str | None, index: int | tuple[int, ...] | None) -> list[Volume]:
    """The volume(s) of one file or series for a channel choice: one Volume, or one per chosen channel."""
    if isinstance(index, tuple):
        return read_channels(path, series_uid, channels=index)
    return [read_volume(path, series_uid, index=index)]


class LoadVolume(Transform):
    """Read one volume (file or DICOM series folder) into a (C, X, Y, Z) float32 MetaTensor in RAS world space.

    C is 1, or the number of channels chosen from a 4D input with a list ``index`` (e.g. ``[0, 3]`` for FLAIR
    and T2 of a BraTS-style 4D file).
    """

    def __init__(self, index: ChannelChoice = None) -> None:
        """`index` picks one volume/channel of a 4D input, or a list of them (see read_volume, read_channels)."""
        self.index = channel_choice(index)

    def __call__(self, path: str | os.PathLike, series_uid: str | None = None) -> MetaTensor:
        """Load `path` (and `series_uid` for a DICOM folder holding several series)."""
        path = os.fspath(path)
        volumes = read_choice(path, series_uid or None, self.index)
        return volume_to_metatensor(volumes, [path] * len(volumes))


class LoadVolumed(MapTransform):
    """Dictionary LoadVolume: d[key] is a path, or a list of co-registered paths stacked as channels (C, X, Y, Z).

    With a list `index`, each path gives the chosen channels of its 4D image, stacked in order.

    Reads d["series_uid"] (a string, or one per path) and d["index"] (default: `index`) when present.
    """

    def __init__(
        self, keys: KeysCollection = "image", index: ChannelChoice = None, allow_missing_keys: bool = False
    ) -> None:
        """`index` is the default 4D volume/channel choice (one int or a list) when the item has no "index"."""
        super().__init__(keys, allow_missing_keys)
        self.index = index

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        """Replace each key's path(s) by the loaded MetaTensor."""
        d = dict(data)
        index = channel_choice(d.get("index", self.index))
        uid = d.get("series_uid")
        for key in self.key_iterator(d):
            value = d[key]
            paths = [os.fspath(p) for p in value] if isinstance(value, (list, tuple)) else [os.fspath(value)]
            if not paths:
                raise VolumeError(str(key), "empty list of paths")
            if isinstance(uid, (list, tuple)):
                if len(uid) != len(paths):
                    raise VolumeError(paths[0], f"{len(uid)} series_uid values for {len(paths)} paths")
                uids = [u or None for u in uid]
            else:
                uids = [uid or None] * len(paths)
            volumes, sources = [], []
            for p, u in zip(paths, uids):
                got = read_choice(p, u, index)
                volumes += got
                sources += [p] * len(got)
            d[key] = volume_to_metatensor(volumes, sources)
        return d
