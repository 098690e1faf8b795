"""MONAI loading transforms on top of read_volume: channel-first MetaTensor with the metadata LoadImage would give."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import MetaKeys, SpaceKeys

from monai_dnprd.io.errors import VolumeError
from monai_dnprd.io.readers import Volume, read_volume

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


class LoadVolume(Transform):
    """Read one volume (file or DICOM series folder) into a (1, X, Y, Z) float32 MetaTensor in RAS world space."""

    def __init__(self, index: int | None = None) -> None:
        """`index` picks one volume/channel of a 4D input (see read_volume)."""
        self.index = index

    def __call__(self, path: str | os.PathLike, series_uid: str | None = None) -> MetaTensor:
        """Load `path` (and `series_uid` for a DICOM folder holding several series)."""
        path = os.fspath(path)
        return volume_to_metatensor([read_volume(path, series_uid or None, index=self.index)], [path])


class LoadVolumed(MapTransform):
    """Dictionary LoadVolume: d[key] is a path, or a list of co-registered paths stacked as channels (C, X, Y, Z).

    Reads d["series_uid"] (a string, or one per path) and d["index"] (default: `index`) when present.
    """

    def __init__(
        self, keys: KeysCollection = "image", index: int | None = None, allow_missing_keys: bool = False
    ) -> None:
        """`index` is the default 4D volume/channel choice when the item has no "index"."""
        super().__init__(keys, allow_missing_keys)
        self.index = index

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        """Replace each key's path(s) by the loaded MetaTensor."""
        d = dict(data)
        index = d.get("index", self.index)
        index = None if index is None or (isinstance(index, float) and np.isnan(index)) else int(index)
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
            volumes = [read_volume(p, u, index=index) for p, u in zip(paths, uids)]
            d[key] = volume_to_metatensor(volumes, paths)
        return d
