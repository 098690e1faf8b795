"""Statistics of normal data that the maps and thresholds rely on: residual moments and normal-score calibration.

``fit_map_statistics`` measures, on normal training slices, what the anomaly map is scaled by: the mean and
std of each feature channel's reconstruction residual, and of the map's two parts (``AnomalyMapper``).

After training, the model's voxel scores (inside the foreground) and volume scores on held-out NORMAL volumes
are summarised. A voxel threshold for a false-positive rate ``fpr`` is the (1 - fpr) quantile of the normal
voxel scores. Volume scores are few (one per normal volume), so they are modelled as a Gaussian: the volume
threshold is ``mean + z(1 - fpr) * std`` and the [0, 1] score is the Gaussian CDF of a new volume's score.
With ``symmetry`` on, calibration also fits the level that the mirror side must exceed (``mirror_threshold``, the
99th percentile of the map before that step) and summarises the map after it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F

from monai_dnprd.config import is_unset

__all__ = ["Calibration", "QUANTILE_LEVELS", "calibrate", "calibrate_folder", "calibration_for", "fit_map_statistics", "residual_fit_slices"]

logger = logging.getLogger("monai_dnprd")

# dense in the upper tail, where thresholds for small false-positive rates live
QUANTILE_LEVELS = np.unique(np.concatenate([np.linspace(0.0, 1.0, 1001), 1.0 - np.logspace(-7, -1, 301)]))


class Calibration:
    """Distribution of normal voxel and volume scores, saved as JSON next to the model."""

    def __init__(self, levels: Sequence[float], values: Sequence[float], volume_scores: Sequence[float], n_voxels: int,
                 mirror_threshold: float | None = None):
        self.levels = np.asarray(levels, dtype=np.float64)
        self.values = np.asarray(values, dtype=np.float64)
        self.volume_scores = np.asarray(volume_scores, dtype=np.float64)
        self.n_voxels = int(n_voxels)
        self.mirror_threshold = None if mirror_threshold is None else float(mirror_threshold)

    @classmethod
    def from_scores(cls, voxel_values: Sequence[np.ndarray], volume_scores: Sequence[float],
                    mirror_threshold: float | None = None) -> Calibration:
        """Summarise the foreground voxel scores of normal volumes (list of 1D arrays) and their volume scores."""
        if len(voxel_values) == 0:
            raise ValueError("calibration needs at least one normal volume")
        allv = np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in voxel_values])
        if allv.size == 0:
            raise ValueError("calibration volumes have no foreground voxels")
        values = np.quantile(allv, QUANTILE_LEVELS)
        return cls(QUANTILE_LEVELS, values, list(volume_scores), allv.size, mirror_threshold)

    def symmetry_threshold(self) -> float:
        """The level the mirror side must exceed (``symmetry``): fitted with it, else this map's 99th percentile."""
        return self.voxel_threshold(0.01) if self.mirror_threshold is None else self.mirror_threshold

    @property
    def volume_mean(self) -> float:
        return float(self.volume_scores.mean())

    @property
    def volume_std(self) -> float:
        """Std of normal volume scores, floored at 5 % of the mean so one or two normals still give a usable scale."""
        std = float(self.volume_scores.std(ddof=1)) if self.volume_scores.size > 1 else 0.0
        return max(std, 0.05 * abs(self.volume_mean), 1e-8)

    def voxel_threshold(self, fpr: float) -> float:
        """Voxel score above which a fraction ``fpr`` of normal foreground voxels lies."""
        if not 0.0 < fpr < 1.0:
            raise ValueError(f"fpr must lie in (0, 1), got {fpr}")
        return float(np.interp(1.0 - fpr, self.levels, self.values))

    def volume_threshold(self, fpr: float) -> float:
        """Volume score threshold for a false-positive rate ``fpr`` on normal volumes (Gaussian model)."""
        if not 0.0 < fpr < 1.0:
            raise ValueError(f"fpr must lie in (0, 1), got {fpr}")
        # z(1 - fpr) = -z(fpr): the lower tail keeps full precision for tiny fpr, where 1 - fpr rounds to 1
        return self.volume_mean - NormalDist().inv_cdf(fpr) * self.volume_std

    def normalised_score(self, score: float) -> float:
        """Volume score mapped to [0, 1]: Gaussian CDF under the normal-volume score distribution."""
        z = (float(score) - self.volume_mean) / self.volume_std
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    def to_dict(self) -> dict:
        return {
            "format": "monai-dnprd-calibration/1",
            "levels": self.levels.tolist(),
            "values": self.values.tolist(),
            "volume_scores": self.volume_scores.tolist(),
            "volume_mean": self.volume_mean,
            "volume_std": self.volume_std,
            "n_voxels": self.n_voxels,
            "n_volumes": int(self.volume_scores.size),
            **({} if self.mirror_threshold is None else {"mirror_threshold": self.mirror_threshold}),
        }

    def save(self, path: str | Path) -> Path:
        """Write as JSON atomically."""
        from monai_dnprd.io.writers import write_text

        return write_text(json.dumps(self.to_dict(), indent=1), path)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration JSON written by ``save``."""
        d = json.loads(Path(path).read_text())
        if d.get("format") != "monai-dnprd-calibration/1":
            raise ValueError(f"{path}: not a monai-dnprd calibration file")
        return cls(d["levels"], d["values"], d["volume_scores"], d["n_voxels"], d.get("mirror_threshold"))


@torch.no_grad()
def calibrate(volumes: Iterable[dict], network: torch.nn.Module, inferer: Callable, score_q: float = 0.01) -> Calibration:
    """Score preprocessed NORMAL volumes (dicts with ``image`` and ``mask``) and summarise their scores.

    ``volumes`` may be a generator, so that only one volume is held in memory at a time. With an inferer whose
    ``symmetry`` is on, the maps are made without that step first; its ``mirror_threshold`` is fitted on them (their
    99th percentile), set on the inferer, and the scores summarised are those of the maps after the step.
    """
    from monai_dnprd.anomaly_map import top_percent_score
    from monai_dnprd.inferer import image_affine
    from monai_dnprd.symmetry import suppress

    symmetric = bool(getattr(inferer, "symmetry", False))
    if symmetric:
        inferer.mirror_threshold = None  # raw maps: the threshold is fitted on them
    voxel_values, mirror_values = [], []
    for d in volumes:
        pred = torch.as_tensor(inferer(d["image"], network, mask=d["mask"])).float().cpu()
        inside = torch.as_tensor(d["mask"])[0].cpu() > 0
        voxel_values.append(pred[0][inside].numpy())
        if symmetric:  # the mirror side of each foreground voxel, kept instead of the whole map
            image = torch.as_tensor(d["image"]).float().cpu()[0]
            mirror_max = inferer.suppression.mirror_max(pred[0].numpy(), image.numpy(), image_affine(d["image"]))
            mirror_values.append(mirror_max[inside.numpy()])
    threshold = None
    if symmetric:
        threshold = float(np.quantile(np.concatenate(voxel_values), 0.99))
        voxel_values = [suppress(v, m, threshold) for v, m in zip(voxel_values, mirror_values)]
        inferer.mirror_threshold = threshold
    volume_scores = [float(top_percent_score(torch.from_numpy(v), q=score_q)) for v in voxel_values]
    return Calibration.from_scores(voxel_values, volume_scores, threshold)


def calibrate_folder(
    folder: str | Path,
    preprocessing: Callable,
    network: torch.nn.Module,
    inferer: Callable,
    score_q: float,
    path: str | Path,
) -> Path:
    """Calibrate on every volume found in ``folder`` (NORMAL volumes that the model never trained on), save the
    result to ``path`` and return it. Volumes that fail to load are skipped with a warning; none usable is an error.

    Inference uses this for a model or an ensemble whose own calibration is missing or does not fit the data
    (another site or scanner): the thresholds then come from normal volumes of the data at hand.
    """
    from monai_dnprd.data import iter_preprocessed
    from monai_dnprd.io import VolumeError, find_volumes

    try:
        found, problems = find_volumes(folder)
    except VolumeError as err:  # missing or empty folder
        raise VolumeError(str(folder), f"--calibration_dir: {err.reason}") from None
    for problem in problems:
        logger.warning("calibration: skipped %s", problem)
    cal = calibrate(iter_preprocessed(found, preprocessing, "calibration", progress=True, desc="calibration"),
                    network, inferer, score_q)
    out = cal.save(path)
    logger.info("calibration on %d normal volume(s) of %s: voxel threshold at FPR 1%%: %.4f -> %s",
                cal.volume_scores.size, folder, cal.voxel_threshold(0.01), out)
    return out


def calibration_for(models: Sequence, folder: str | Path | None, preprocessing: Callable, network: torch.nn.Module,
                    inferer: Callable, out_path: str | Path, z_sigma: float | None = None,
                    polarity: str | None = None, grid_phases: int | None = None,
                    symmetry: bool | str | None = None) -> str | None:
    """The calibration file inference uses: made now on the normal volumes of ``folder`` (``--calibration_dir``),
    else the single model's own from training (``ensemble.member_calibration_path``; None for an ensemble)."""
    if not is_unset(folder):
        score_q = models[0][1]["preprocessing"]["score_q"]
        return str(calibrate_folder(folder, preprocessing, network, inferer, score_q, Path(out_path) / "calibration.json"))
    from monai_dnprd.ensemble import member_calibration_path

    return member_calibration_path(models, z_sigma, polarity, grid_phases, symmetry)


def residual_fit_slices(masks: Sequence[torch.Tensor], max_slices: int, min_foreground: float = 0.15) -> list[tuple[int, int]]:
    """(volume, slice) pairs for fitting: slices along the last axis whose foreground fraction is at least
    ``min_foreground`` (the training slices), at most ``max_slices`` of them spread evenly over all volumes."""
    candidates = []
    for v, mask in enumerate(masks):
        m = torch.as_tensor(mask).reshape(-1, *mask.shape[-3:])[0] > 0
        frac = m.float().mean((0, 1))
        candidates += [(v, int(z)) for z in torch.nonzero(frac >= min_foreground).flatten()]
    if len(candidates) > max_slices:
        keep = np.linspace(0, len(candidates) - 1, max_slices).round().astype(int)
        candidates = [candidates[i] for i in keep]
    return candidates


@torch.no_grad()
def fit_map_statistics(
    mapper: torch.nn.Module,
    volumes: Sequence[dict],
    k: int,
    img_size: int,
    max_slices: int = 256,
    min_foreground: float = 0.15,
    batch_size: int = 32,
    precision: str = "fp32",
) -> int:
    """Fit and store the map's statistics of normal tissue (``AnomalyMapper`` buffers) on normal training slices.

    First the per-channel residual mean/std of every feature group (all tokens of the chosen slices, except
    those that touch an item's ``exclude`` region: known lesions); then, for ``feature_pixel``, the mean/std of
    the feature map and of the pixel error over the foreground pixels of the same slices. ``volumes`` are
    preprocessed items (``image`` (C, X, Y, Z), ``mask``). The mapper runs in eval mode and its mode is
    restored. ``precision`` is the network's autocast (``config.autocast_context``): give the precision the maps
    will be made in, so that the statistics scale maps of the same numerics (bf16 also halves the fit's time).
    Returns the token count (0 for the ``cosine`` map, which needs no statistics).
    """
    from monai_dnprd.anomaly_map import ResidualMoments
    from monai_dnprd.config import autocast_context
    from monai_dnprd.losses import token_keep
    from monai_dnprd.progress import progress
    from monai_dnprd.transforms.array import ResizeSlices, gather_slice_stacks

    if not mapper.needs_statistics():
        return 0
    pairs = residual_fit_slices([d["mask"] for d in volumes], max_slices, min_foreground)
    if not pairs:
        raise ValueError(f"no slice with at least {min_foreground:.0%} foreground to fit the map's statistics on")
    net = mapper.network
    device = next(mapper.parameters()).device
    resize = ResizeSlices(img_size)
    moments = ResidualMoments()
    two_parts = mapper.metric == "feature_pixel"
    cached: list[tuple[object, torch.Tensor]] = []  # network outputs and their foreground, for the second stage
    was_training = mapper.training
    mapper.eval()
    try:
        fit_volumes = sorted({v for v, _ in pairs})
        for v in progress(fit_volumes, "fitting the map's normal statistics", unit="vol"):
            vol = torch.as_tensor(volumes[v]["image"]).float()
            ex = volumes[v].get("exclude")
            idx = torch.tensor([z for vv, z in pairs if vv == v])
            for chunk in idx.split(batch_size):  # native-size stacks one batch at a time (CT slices are large)
                with autocast_context(device, precision):
                    out = net(resize(gather_slice_stacks(vol, chunk, k)).to(device))
                keep = None
                if ex is not None:
                    stack = gather_slice_stacks(torch.as_tensor(ex).float(), chunk, k).amax(1, keepdim=True)
                    keep = token_keep(resize(stack), net.encoder.patch_size).to(device)
                moments.update([t.float() for t in out.targets], [r.float() for r in out.recons], keep=keep)
                if two_parts:
                    fg = resize(gather_slice_stacks(torch.as_tensor(volumes[v]["mask"]).float(), chunk, 0))[:, 0] > 0.5
                    fg = fg.to(device)
                    if keep is not None:
                        fg &= F.interpolate(keep, size=fg.shape[-2:], mode="nearest")[:, 0].bool()
                    slim = type(out)(targets=out.targets, recons=out.recons, prototypes=out.prototypes[:0],
                                     tokens=out.tokens[:0], assignments=out.assignments[:0], pixels=out.pixels,
                                     pixel_targets=out.pixel_targets)  # what ``parts`` reads, nothing more
                    cached.append((slim, fg))
        mapper.set_residual_stats(moments.stats(), moments.n)
        if two_parts:
            sums = torch.zeros(2, 3, dtype=torch.float64)  # per part: count, sum, sum of squares
            for out, fg in cached:
                for i, part in enumerate(mapper.parts(out)):
                    vals = part[fg].double().cpu()
                    sums[i] += torch.stack([torch.tensor(float(vals.numel()), dtype=torch.float64), vals.sum(),
                                            vals.square().sum()])
            n = sums[:, 0].clamp_min(2.0)
            mean = sums[:, 1] / n
            std = ((sums[:, 2] - n * mean.square()) / (n - 1)).clamp_min(1e-12).sqrt()
            mapper.set_map_moments(mean, std)
    finally:
        mapper.train(was_training)
    return moments.n
