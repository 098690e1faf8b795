"""Ensembles of trained models: every member's map put on its own normal scale, then averaged.

Models trained from scratch on little normal data differ a lot from one training run to the next, and what
one run finds is hard to predict (docs/research_log.md); the average of several runs' maps is
steadier. Raw maps of two models are on different scales, so each member's map is first divided by the 99th
percentile of its normal voxel scores, from the calibration its training made on held-out normal volumes: 1
then means "as anomalous as the 1-in-100 normal voxel" for every member. The ensemble map is the mean of these
(0 outside the foreground, like every map). A single checkpoint is used as it is: raw map, own calibration.

(Centring on the normal median as well, ``(map - q50) / (q99 - q50)``, ranks voxels the same to within 0.005
voxel AP on four TCGA ensembles (docs/research_log.md), but makes values negative inside the foreground.)

The ensemble's thresholds need a calibration of the ensemble itself; members' calibrations do not give one.
Inference makes it with ``--calibration_dir`` (normal volumes that no member trained on).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from monai_dnprd.anomaly_map import check_grid_phases
from monai_dnprd.calibration import Calibration
from monai_dnprd.checkpoint import CheckpointError, load_model
from monai_dnprd.config import optional_bool
from monai_dnprd.inferer import DNPVolumeInferer

__all__ = [
    "EnsembleInferer",
    "checkpoint_paths",
    "load_models",
    "ensemble_network",
    "volume_inferer",
    "member_calibration_path",
    "model_polarity",
    "model_grid_phases",
    "model_symmetry",
    "map_setting_changes",
    "SHARED_PREPROCESSING",
]

logger = logging.getLogger("monai_dnprd")

# preprocessing that decides the grid and intensities the maps live on: members must agree on these
SHARED_PREPROCESSING = ("modality", "channels", "spacing", "margin", "score_q")

Model = tuple[torch.nn.Module, dict]


def checkpoint_paths(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Checkpoint files named by ``--ckpt_path``: one path, a list of paths, or a glob pattern (``runs/*/models/model.pt``)."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not items:
        raise CheckpointError("--ckpt_path names no checkpoint")
    paths: list[Path] = []
    for item in items:
        text = str(item)
        if glob.has_magic(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise CheckpointError(f"{text}: no checkpoint matches this pattern")
            paths += [Path(m) for m in matches]
        else:
            paths.append(Path(text))
    duplicates = sorted({str(p) for p in paths if paths.count(p) > 1})
    if duplicates:
        raise CheckpointError(f"{duplicates[0]}: listed more than once in --ckpt_path")
    return paths


def load_models(spec: str | Path | Sequence[str | Path], device: str | torch.device = "cpu") -> list[Model]:
    """Load every checkpoint of ``spec`` (see ``checkpoint_paths``) as ``(network, checkpoint dict)``.

    With several, each must have its ``calibration.json`` beside it (its normal scale) and all must share the
    preprocessing in ``SHARED_PREPROCESSING``; the checkpoint dict then also holds ``"normal_q99"``.
    """
    paths = checkpoint_paths(spec)
    models = []
    for path in paths:
        net, ckpt = load_model(path, device)
        ckpt["path"] = str(path)
        models.append((net, ckpt))
    if len(models) == 1:
        return models
    first = models[0][1]["preprocessing"]
    for net, ckpt in models:
        params = ckpt["preprocessing"]
        differ = [k for k in SHARED_PREPROCESSING if params.get(k) != first.get(k)]
        if differ:
            raise CheckpointError(
                f"{ckpt['path']}: cannot join an ensemble with {paths[0]}: different "
                + ", ".join(f"{k} ({params.get(k)!r} vs {first.get(k)!r})" for k in differ)
            )
        cal_path = Path(ckpt["path"]).with_name("calibration.json")
        if not cal_path.is_file():
            raise CheckpointError(
                f"{ckpt['path']}: an ensemble member needs the calibration.json that training writes beside the "
                "model (its normal scale); none found"
            )
        q99 = Calibration.load(cal_path).voxel_threshold(0.01)
        if not q99 > 0:
            raise CheckpointError(f"{cal_path}: the 99th percentile of normal voxel scores is {q99}, not a usable scale")
        ckpt["normal_q99"] = q99
    logger.info("ensemble of %d models: %s", len(models), ", ".join(str(p) for p in paths))
    return models


def ensemble_network(models: Sequence[Model]) -> torch.nn.Module:
    """The network the evaluator runs: the model itself, or a ``ModuleList`` of the ensemble's members."""
    if len(models) == 1:
        return models[0][0]
    return torch.nn.ModuleList([net for net, _ in models])


def volume_inferer(
    models: Sequence[Model],
    batch_size: int = 32,
    z_sigma: float | None = None,
    precision: str = "auto",
    polarity: str | None = None,
    grid_phases: int | None = None,
    symmetry: bool | str | None = None,
) -> Inferer:
    """A ``DNPVolumeInferer`` per model, with its own input size, slice neighbours and map settings (smoothing,
    polarity, grid phases, symmetry; ``z_sigma``, ``polarity``, ``grid_phases`` and ``symmetry`` override those
    of every model when given); an ``EnsembleInferer`` over them if several. With symmetry, each model's mirror
    threshold comes from the calibration beside it (``Calibration.symmetry_threshold``); ``calibrate`` replaces it
    when inference recalibrates (``--calibration_dir``)."""
    symmetry = optional_bool(symmetry)
    inferers = []
    for _, ckpt in models:
        p = ckpt["preprocessing"]
        symmetric = model_symmetry(p) if symmetry is None else symmetry
        inferers.append(DNPVolumeInferer(
            img_size=p["img_size"], k=p["k"], batch_size=batch_size,
            z_sigma=p["z_sigma"] if z_sigma is None else z_sigma,
            precision=precision,
            polarity=model_polarity(p) if polarity is None else polarity,
            grid_phases=model_grid_phases(p) if grid_phases is None else grid_phases,
            symmetry=symmetric,
            mirror_threshold=model_mirror_threshold(ckpt) if symmetric else None,
        ))
    if len(models) == 1:
        return inferers[0]
    changed = sorted({c for _, ckpt in models
                      for c in map_setting_changes(ckpt["preprocessing"], z_sigma, polarity, grid_phases, symmetry)})
    if changed:
        logger.warning(
            "ensemble with %s: each member's normal scale comes from its training calibration, made with its own "
            "map settings, so the members are weighted only roughly alike (--calibration_dir sets the ensemble's "
            "thresholds, not these scales)", ", ".join(changed),
        )
    return EnsembleInferer(inferers, [ckpt["normal_q99"] for _, ckpt in models])


def map_setting_changes(params: dict, z_sigma: float | None = None, polarity: str | None = None,
                        grid_phases: int | None = None, symmetry: bool | None = None) -> list[str]:
    """The inference overrides that differ from the map settings a model was trained and calibrated with."""
    changed = [f"z_sigma {z_sigma}"] if z_sigma is not None and z_sigma != params.get("z_sigma") else []
    changed += [f"polarity {polarity}"] if polarity is not None and polarity != model_polarity(params) else []
    changed += ([f"grid_phases {grid_phases}"]
                if grid_phases is not None and check_grid_phases(grid_phases) != model_grid_phases(params) else [])
    changed += [f"symmetry {symmetry}"] if symmetry is not None and symmetry != model_symmetry(params) else []
    return changed


def model_polarity(params: dict) -> str:
    """The map polarity a model was trained and calibrated with (``"any"`` for models made before the setting)."""
    return params.get("polarity") or "any"


def model_symmetry(params: dict) -> bool:
    """Whether a model's map was calibrated with the left-right symmetry step (not for models made before it)."""
    return bool(params.get("symmetry", False))


def model_mirror_threshold(ckpt: dict) -> float | None:
    """The symmetry step's threshold from the calibration beside a model's checkpoint (None, warned, without one)."""
    path = Path(ckpt["path"]).with_name("calibration.json")
    if not path.is_file():
        logger.warning("%s: no calibration.json beside the model, so its map is made without the symmetry step "
                       "(pass --calibration_dir to fit it)", ckpt["path"])
        return None
    return Calibration.load(path).symmetry_threshold()


def model_grid_phases(params: dict) -> int:
    """The grid phases a model was calibrated with (1 for models made before the setting)."""
    return int(params.get("grid_phases") or 1)


def member_calibration_path(models: Sequence[Model], z_sigma: float | None = None, polarity: str | None = None,
                            grid_phases: int | None = None, symmetry: bool | str | None = None) -> str | None:
    """The calibration inference uses without ``--calibration_dir``: the single model's own, or none for an
    ensemble (with a warning: its maps are still written, its thresholds and masks are not).

    Training calibrated the model's map as it made it (its ``z_sigma``, ``polarity`` and ``grid_phases``); other
    map settings at inference change the normal score distribution, so that case is warned about too.
    """
    if len(models) == 1:
        path, params = models[0][1]["path"], models[0][1]["preprocessing"]
        symmetry = optional_bool(symmetry)
        changed = map_setting_changes(params, z_sigma, polarity, grid_phases, symmetry)
        if changed:
            logger.warning(
                "%s: its calibration was made with the training run's map settings, not with %s; thresholds and "
                "masks may not hold the chosen false-positive rate (pass --calibration_dir to recalibrate)",
                path, ", ".join(changed),
            )
        return str(Path(path).with_name("calibration.json"))
    logger.warning(
        "an ensemble has no calibration of its own: pass --calibration_dir with normal volumes that no member "
        "trained on to get thresholds, masks and normalised scores; without it only maps and raw scores are written"
    )
    return None


class EnsembleInferer(Inferer):
    """Mean of the members' volume maps, each divided by its normal scale; 0 outside the mask.

    Args:
        inferers: one volume inferer per member (called as ``inferer(volume, member, mask=mask)``).
        scales: per member, the 99th percentile of its normal voxel scores (``Calibration.voxel_threshold(0.01)``).
    """

    def __init__(self, inferers: Sequence[Inferer], scales: Sequence[float]) -> None:
        super().__init__()
        if len(inferers) != len(scales) or not inferers:
            raise ValueError(f"need one normal scale per inferer, got {len(inferers)} inferers and {len(scales)} scales")
        if not all(float(s) > 0 for s in scales):
            raise ValueError(f"normal scales must be positive, got {list(scales)}")
        self.inferers = list(inferers)
        self.scales = [float(s) for s in scales]

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: torch.nn.Module, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        members = list(network) if isinstance(network, torch.nn.ModuleList) else [network]
        if len(members) != len(self.inferers):
            raise ValueError(f"the ensemble has {len(self.inferers)} inferers but {len(members)} networks")
        total = None
        for inferer, net, scale in zip(self.inferers, members, self.scales):
            m = inferer(inputs, net, mask=mask)
            m = m.as_tensor() if isinstance(m, MetaTensor) else torch.as_tensor(m)
            total = m / scale if total is None else total.add_(m, alpha=1.0 / scale)
        total.div_(len(members))
        if mask is not None:
            total.mul_(torch.as_tensor(mask).to(total.device) > 0)
        if isinstance(inputs, MetaTensor):
            result = MetaTensor(total)
            result.copy_meta_from(inputs)  # affine and transform history, for Invertd
            return result
        return total
