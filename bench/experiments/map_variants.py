"""Probe: the same trained model scored with other map settings, the map's statistics refitted first.

Changes only inference (the map's metric, or the pixel error's form), refits the map's normal statistics on
the given normal training volumes, and scores a labelled test folder (pooled voxel and slice metrics), so a
map idea can be tried without training again. Every variant maps the slice at one grid phase in fp32 (the map
before ``grid_phases`` and bf16 inference); ``--bf16`` runs the network in bf16, also while the statistics are
fitted. Variants: ``default`` (the model's own map at one phase), ``cosine_residual_z`` and ``cosine`` (feature
maps), ``tissue`` (pixel error on tissue pixels only), ``patch_mean`` (error of each patch's mean), ``blurred``
(error of the blurred signed difference), ``texture`` (error over the patch's intensity std); other ways to
join the two z-scored parts of ``feature_pixel``: ``feature_part``, ``pixel_part`` (one part alone),
``mean_parts`` (their mean) and ``soft_and`` (sqrt((zf + 1)(zp + 1)) - 1); ``slice_median_feature`` and
``slice_median_both``: each slice's foreground median of the (unclamped) feature z-score, or of both z-scores,
subtracted before the geometric mean, so that only a local excess over the slice's own level counts; ``shift2``
and ``shift4``: the mean of the maps of the slice shifted by half a patch (two diagonal or all four shifts;
overlapping tiles, a token grid of half the step); ``shift2min``: the minimum of the two diagonal ones (the
inference default since: ``anomaly_map.phase_min``), ``shift3min`` (three diagonal phases a third of a patch
apart) and ``shift4min`` (all four half-patch shifts); ``flipshift2min``: the minimum over the slice and the
slice flipped and shifted by half a patch; ``feature_group0`` / ``feature_group1``: the feature part from the
shallower or the deeper feature group alone; ``group_gm``: the feature part as the geometric mean of the groups'
positive z-scores; ``residual_z_part``: the feature part's token distance is the residual's z-score alone (no
cosine factor). Names joined by ``+`` combine (``feature_group0+shift2min``).

    python bench/experiments/map_variants.py --ckpt RUN/models/model.pt --train DIR --test DIR --labels DIR \\
        --variants default tissue patch_mean
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

import monai_dnprd.anomaly_map as am
from monai_dnprd.networks.masks import unpatchify

REPO = Path(__file__).resolve().parents[2]


def tissue_error(pixels, targets, p, grid):
    """Mean absolute error over the input channels that hold tissue at each pixel (0 on background)."""
    x, e = unpatchify(targets.float(), p, grid), unpatchify((pixels.float() - targets.float()).abs(), p, grid)
    fg = (x > 0).float()
    return (e * fg).sum(1) / fg.sum(1).clamp_min(1.0)


def patch_mean_error(pixels, targets, p, grid):
    """|mean predicted - mean true| of each patch, upsampled bilinearly to the pixel grid."""
    d = (pixels.float() - targets.float()).mean(-1).abs().reshape(-1, 1, *grid)
    return F.interpolate(d, scale_factor=p, mode="bilinear", align_corners=False)[:, 0]


def blurred_error(pixels, targets, p, grid):
    """|blur(true - predicted)| with a Gaussian of half a patch, mean over channels."""
    d = unpatchify(targets.float() - pixels.float(), p, grid).mean(1, keepdim=True)
    return am.gaussian_blur2d(d, p / 2).abs()[:, 0]


def texture_error(pixels, targets, p, grid, eps: float = 0.05):
    """Absolute error divided by the intensity std of the true patch (+ ``eps``): the error relative to the
    patch's own texture, so that cortex and the brain's edge (textured, hard to predict) no longer outrank a
    flat but wrong patch. Mean over the input channels."""
    t = targets.float()
    return unpatchify((pixels.float() - t).abs() / (t.std(-1, keepdim=True) + eps), p, grid).mean(1)


PIXEL_ERRORS = {"tissue": tissue_error, "patch_mean": patch_mean_error, "blurred": blurred_error,
                "texture": texture_error}

# joins of the positive z-scores (zf, zp) of the feature map and the pixel error; the default is sqrt(zf * zp)
COMBINATIONS = {
    "feature_part": lambda zf, zp: zf,
    "pixel_part": lambda zf, zp: zp,
    "mean_parts": lambda zf, zp: 0.5 * (zf + zp),
    "soft_and": lambda zf, zp: ((zf + 1) * (zp + 1)).sqrt() - 1,
}


def combine_with(mapper, join):
    """Replace ``mapper.combine`` by ``join`` of the same positive z-scores (``mapper.part_zscores``)."""
    mapper.combine = lambda feature, pixel: join(*mapper.part_zscores(feature, pixel))


def _masked_median(z, fg):
    """(B,) median of each slice's values in its foreground (0 where a slice has none)."""
    return torch.stack([zb[m].median() if m.any() else zb.new_zeros(()) for zb, m in zip(z, fg)])


def slice_median_forward(mapper, parts: tuple[str, ...]):
    """Replace ``mapper.forward`` by the default map with each named part's per-slice foreground median of its
    unclamped z-score subtracted first (foreground: the centre slice's nonzero pixels, as preprocessed)."""

    def forward(x):
        fg = x[:, x.shape[1] // 2] > 0  # one sequence, 2k + 1 slices: the centre slice is the middle channel
        feature, pixel = mapper.parts(mapper.network(x))
        mm = mapper.map_moments
        z = {"feature": (feature - mm[0, 0]) / mm[1, 0], "pixel": (pixel - mm[0, 1]) / mm[1, 1]}
        for name in parts:
            z[name] = z[name] - _masked_median(z[name], fg)[:, None, None]
        m = (z["feature"].clamp_min(0.0) * z["pixel"].clamp_min(0.0)).sqrt()
        return (mapper._blur_h @ m @ mapper._blur_w.T).unsqueeze(1)

    mapper.forward = forward


def shifted_forward(mapper, shifts: tuple[tuple[int, int], ...], reduce: str = "mean"):
    """Replace ``mapper.forward`` by the mean (or minimum) of its maps of the input rolled by each (dy, dx) and
    rolled back (the slices' borders are background, so what wraps around is empty)."""
    forward = mapper.forward

    def reduced_forward(x):
        maps = torch.stack([forward(x.roll((dy, dx), (-2, -1))).roll((-dy, -dx), (-2, -1)) for dy, dx in shifts])
        return maps.mean(0) if reduce == "mean" else maps.amin(0)

    mapper.forward = reduced_forward


def bf16_network(mapper):
    """Run ``mapper.network`` under bf16 autocast, its outputs cast to fp32 (``DNPOutput.float``) for the map."""
    forward = mapper.network.forward

    def bf16_forward(x, mask=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(x, mask).float()

    mapper.network.forward = bf16_forward


def flip_shift_min_forward(mapper):
    """Replace ``mapper.forward`` by the minimum of the map of the slice and the map of the slice flipped along
    its first axis (the axis of the training flip) and shifted by half a patch, brought back: the second pass
    differs from the first both in where the token grid falls and in which side each token's context lies."""
    forward = mapper.forward
    h = mapper.network.encoder.patch_size // 2

    def fs_forward(x):
        other = forward(x.flip(-2).roll((h, h), (-2, -1))).roll((-h, -h), (-2, -1)).flip(-2)
        return torch.minimum(forward(x), other)

    mapper.forward = fs_forward


def half_patch_shifts(mapper, variant: str) -> tuple[tuple[int, int], ...]:
    p = mapper.network.encoder.patch_size
    h = p // 2
    if variant == "shift3min":  # three diagonal phases, a third of a patch apart
        return tuple((i * p // 3, i * p // 3) for i in range(3))
    return ((0, 0), (0, h), (h, 0), (h, h)) if variant in ("shift4", "shift4min") else ((0, 0), (h, h))


SHIFTS = ("shift2", "shift4", "shift2min", "shift3min", "shift4min")
FLIPS = ("flipshift2min",)

SLICE_MEDIANS = {"slice_median_feature": ("feature",), "slice_median_both": ("feature", "pixel")}

# the feature part's token distance: the residual's per-channel z-score alone, without the cosine factor (which is
# blind to a residual along the token's own direction, as a change of the tissue's intensity gives)
TOKEN_DISTANCES = {"residual_z_part": lambda target, recon, metric, stats: am.residual_zscore(target, recon, *stats)}

# the feature part from one feature group only (group 0: the shallower taps, group 1: the deeper ones)
FEATURE_GROUPS = {"feature_group0": 0, "feature_group1": 1}


def one_group_feature_map(group: int, feature_map):
    """``am.feature_map`` restricted to one feature group (its residual statistics are still fitted per group)."""

    def one_group(targets, recons, metric="cosine", residual_stats=None):
        stats = None if residual_stats is None else [residual_stats[group]]
        return feature_map([targets[group]], [recons[group]], metric, stats)

    return one_group


def group_gm_feature_map(mapper, normals, prm, feature_map):
    """``am.feature_map`` as the geometric mean over the feature groups of each group's positive z-score against
    normal tissue (moments fitted per group first): a hot spot in one group only vanishes, as with ``shift2min``."""
    from monai_dnprd.calibration import fit_map_statistics

    moments = []
    for g in range(len(mapper.network.groups)):
        am.feature_map = one_group_feature_map(g, feature_map)
        fit_map_statistics(mapper, normals, prm["k"], prm["img_size"])
        moments.append(mapper.map_moments[:, 0].clone())

    def group_gm(targets, recons, metric="cosine", residual_stats=None):
        stats = residual_stats if residual_stats is not None else [None] * len(targets)
        z = [((feature_map([t], [r], metric, None if st is None else [st]) - m[0]) / m[1]).clamp_min(0.0)
             for t, r, st, m in zip(targets, recons, stats, moments)]
        return torch.stack(z).prod(0).pow(1.0 / len(z))

    return group_gm


VARIANT_NAMES = ("default", "cosine_residual_z", "cosine", *PIXEL_ERRORS, *COMBINATIONS, *SLICE_MEDIANS, *SHIFTS, *FLIPS,
                 *FEATURE_GROUPS, "group_gm", *TOKEN_DISTANCES)

GEOMETRY_TRANSFORMS = ("LoadVolumed", "Orientationd", "OptionalSpacingd", "CropForegroundd", "SquarePadd")


def bundle_parser(ckpt: str, carry: tuple[str, ...] = ()):
    """The bundle's inference config for ``ckpt``; keys in ``carry`` (e.g. a lesion label) are added to every
    geometric transform of its preprocessing, so they come out on the image's preprocessed grid."""
    from monai.bundle import ConfigParser

    from monai_dnprd.config import workflow_configs

    parser = ConfigParser()
    parser.read_config(workflow_configs(REPO / "bundle", "inference"))
    parser.update({"ckpt_path": ckpt})
    for i, t in enumerate(parser["preprocessing"]["transforms"]):
        if carry and t["_target_"].rsplit(".", 1)[-1] in GEOMETRY_TRANSFORMS:
            keys = [t["keys"]] if isinstance(t["keys"], str) else list(t["keys"])
            parser[f"preprocessing#transforms#{i}#keys"] = keys + list(carry)
    return parser


def inference_pipeline(ckpt: str):
    """A trained model with the bundle's inference preprocessing: (mapper, preprocessing parameters,
    preprocessing, inverse, volume inferer), so that a probe maps volumes as ``run inference`` does."""
    from monai_dnprd.checkpoint import load_model
    from monai_dnprd.inferer import DNPVolumeInferer

    mapper, meta = load_model(ckpt)
    prm = meta["preprocessing"]
    parser = bundle_parser(ckpt)
    pre, inverse = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inverse")
    return mapper, prm, pre, inverse, DNPVolumeInferer(prm["img_size"], prm["k"], z_sigma=prm["z_sigma"], grid_phases=1, precision="fp32")


@torch.no_grad()
def score_folder(mapper, pre, inverse, inferer, test: str, labels: str) -> dict:
    """Pooled metrics (``VolumeMetricAccumulator.compute``) of ``mapper``'s maps of a labelled test folder, each map on
    its input's own grid, as ``run evaluating`` scores them."""
    from monai_dnprd.metrics import VolumeMetricAccumulator

    acc = VolumeMetricAccumulator(axis=2)
    for f in sorted(glob.glob(f"{test}/*.nii.gz")):
        d = pre({"image": f})
        out = inverse({**d, "pred": inferer(d["image"], mapper, mask=d["mask"])})
        label = np.asarray(nib.load(f"{labels}/{Path(f).name}").dataobj) > 0
        acc.add(Path(f).name, np.asarray(out["pred"][0]), label=label, mask=np.asarray(out["mask"][0]) > 0)
    return acc.compute()


def score(ckpt: str, variant: str, train: str, test: str, labels: str, bf16: bool = False) -> dict:
    """Pooled voxel / slice metrics of one variant on the test folder (maps on each input's own grid)."""
    from monai_dnprd.calibration import fit_map_statistics

    names = variant.split("+")  # e.g. "feature_group0+shift2min": one name per kind of change

    def pick(table) -> str | None:
        return next((n for n in names if n in table), None)

    original_pixel, original_feature, original_distance = am.pixel_error, am.feature_map, am.token_distance
    am.pixel_error = PIXEL_ERRORS.get(pick(PIXEL_ERRORS), original_pixel)
    am.token_distance = TOKEN_DISTANCES.get(pick(TOKEN_DISTANCES), original_distance)
    if group := pick(FEATURE_GROUPS):
        am.feature_map = one_group_feature_map(FEATURE_GROUPS[group], original_feature)
    try:
        mapper, prm, pre, inverse, inferer = inference_pipeline(ckpt)
        if metric := pick(("cosine_residual_z", "cosine")):
            mapper.metric = metric
        if bf16:
            bf16_network(mapper)
        normals = [pre({"image": f}) for f in sorted(glob.glob(f"{train}/*.nii.gz"))]
        if "group_gm" in names:
            am.feature_map = group_gm_feature_map(mapper, normals, prm, original_feature)
        fit_map_statistics(mapper, normals, prm["k"], prm["img_size"])
        if join := pick(COMBINATIONS):
            combine_with(mapper, COMBINATIONS[join])
        if median := pick(SLICE_MEDIANS):
            slice_median_forward(mapper, SLICE_MEDIANS[median])
        if pick(FLIPS):
            flip_shift_min_forward(mapper)
        if shift := pick(SHIFTS):
            shifted_forward(mapper, half_patch_shifts(mapper, shift), "min" if shift.endswith("min") else "mean")
        r = score_folder(mapper, pre, inverse, inferer, test, labels)
    finally:
        am.pixel_error, am.feature_map, am.token_distance = original_pixel, original_feature, original_distance
    return {"voxel_ap": r["voxel"]["ap"], "voxel_auroc": r["voxel"]["auroc"], "best_dice": r["voxel"]["best_dice"],
            "slice_auroc": r["slice"]["auroc"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--train", required=True, help="normal training volumes (to refit the map statistics)")
    ap.add_argument("--test", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--variants", nargs="+", default=["default"],
                    help="names joined by '+' combine, e.g. feature_group0+shift2min; names: " + ", ".join(VARIANT_NAMES))
    ap.add_argument("--bf16", action="store_true", help="the network under bf16 autocast, the map in fp32 (see bf16_network)")
    args = ap.parse_args()
    for v in args.variants:
        if unknown := set(v.split("+")) - set(VARIANT_NAMES):
            ap.error(f"unknown variant name(s) {sorted(unknown)} in {v!r}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for v in args.variants:
        r = score(args.ckpt, v, args.train, args.test, args.labels, args.bf16)
        print(f"{v}: voxel AP {r['voxel_ap']:.4f} AUROC {r['voxel_auroc']:.3f} best Dice {r['best_dice']:.3f} "
              f"slice AUROC {r['slice_auroc']:.3f}", flush=True)


if __name__ == "__main__":
    main()
