"""The anomaly map: ``AnomalyMapper`` turns 2.5D slice stacks into maps; Gaussian smoothing, scores and monitors.

``AnomalyMapper`` is the one owner of the map: it holds the trained DNP-ConFormer, the map's distance and that
distance's statistics on normal tissue (buffers, fitted after training by ``calibration.fit_map_statistics``).
Inference, validation, calibration, the notebooks and the exported TorchScript model all call it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from monai_dnprd.networks.dnp import DNPConFormer, DNPOutput

MAP_METRICS = ("cosine", "cosine_residual_z", "feature_pixel")

__all__ = [
    "AnomalyMapper",
    "MAP_METRICS",
    "GRID_PHASES",
    "check_grid_phases",
    "phase_min",
    "gaussian_kernel1d",
    "gaussian_blur1d",
    "gaussian_blur2d",
    "upsample_blur_matrix",
    "upsample_blur",
    "pixel_error",
    "feature_map",
    "POLARITIES",
    "check_polarity",
    "intensity_rank",
    "polarity_gate",
    "residual_zscore",
    "token_distance",
    "ResidualMoments",
    "top_percent_score",
    "prototype_usage",
    "feature_spread",
    "group_feature_spread",
]


def gaussian_kernel1d(sigma: float, radius: int | None = None, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> Tensor:
    """Normalised 1D Gaussian of radius round(4 sigma) (the paper's 2*int(4 sigma + 0.5) + 1 taps)."""
    if radius is None:
        radius = int(4.0 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur1d(x: Tensor, sigma: float, dim: int) -> Tensor:
    """Gaussian smoothing of any tensor along one dim (reflect padding); sigma <= 0 -> identity."""
    n = x.shape[dim]
    if sigma <= 0 or n < 2:
        return x
    radius = min(int(4.0 * sigma + 0.5), n - 1)  # reflect padding needs pad < length
    k = gaussian_kernel1d(sigma, radius, x.dtype if x.is_floating_point() else torch.float32, x.device)
    if dim % x.dim() != x.dim() - 1:
        # along a leading dim (e.g. z of a slice-major (Z, H, W) stack): a weighted sum of shifted views of the
        # reflect-padded input, which avoids moving the axis last and back (two full copies of a large volume)
        xf = x if x.is_floating_point() else x.to(k.dtype)
        left = torch.arange(radius, 0, -1, device=x.device)  # reflect padding, as F.pad(mode="reflect")
        right = torch.arange(n - 2, n - 2 - radius, -1, device=x.device)
        xp = torch.cat([xf.index_select(dim, left), xf, xf.index_select(dim, right)], dim)
        out = torch.zeros_like(xf, dtype=k.dtype)
        for j, w in enumerate(k.tolist()):
            out.add_(xp.narrow(dim, j, n), alpha=w)
        return out
    y = x.movedim(dim, -1)
    shape = y.shape
    y = y.reshape(-1, 1, n).to(k.dtype)
    y = F.conv1d(F.pad(y, (radius, radius), mode="reflect"), k.view(1, 1, -1))
    return y.reshape(shape).movedim(-1, dim)


def gaussian_blur2d(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) maps per channel with reflect padding; sigma <= 0 -> identity."""
    if sigma <= 0:
        return x
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(x.shape)}")
    return gaussian_blur1d(gaussian_blur1d(x, sigma, -1), sigma, -2)


@functools.lru_cache(maxsize=64)
def _upsample_blur_matrix64(n_in: int, n_out: int, sigma: float) -> Tensor:
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # n_in unit signals of length n_in
    up = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)  # (n_in, 1, n_out)
    return gaussian_blur1d(up, sigma, dim=-1)[:, 0, :].T.contiguous()  # (n_out, n_in)


def upsample_blur_matrix(n_in: int, n_out: int, sigma: float, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> Tensor:
    """(n_out, n_in) matrix of 1D linear upsampling (``align_corners=False``) followed by ``gaussian_blur1d``.

    Both steps are linear and act on one axis, so a whole 2D upsample-and-blur is two small matrix products.
    """
    return _upsample_blur_matrix64(int(n_in), int(n_out), float(sigma)).to(dtype=dtype, device=device)


def upsample_blur(maps: Tensor, out_size: tuple[int, int], sigma: float) -> Tensor:
    """Bilinear upsampling of (..., h, w) maps to ``out_size`` then a Gaussian blur, as ``K_h @ m @ K_w^T``.

    Equal to ``gaussian_blur2d(F.interpolate(m, out_size, mode="bilinear"), sigma)`` (same reflect padding) but
    costs O(H w h + H W w) per map instead of a (4 sigma)-tap convolution over every output pixel.
    """
    h, w = maps.shape[-2:]
    dtype = maps.dtype if maps.is_floating_point() else torch.float32
    kh = upsample_blur_matrix(h, out_size[0], sigma, dtype, maps.device)
    kw = upsample_blur_matrix(w, out_size[1], sigma, dtype, maps.device)
    return kh @ maps.to(dtype) @ kw.T


def residual_zscore(target: Tensor, recon: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Root-mean-square over channels of the reconstruction residual z-scored per channel: (B, C, h, w) -> (B, h, w).

    ``mean`` and ``std`` (C,) describe the residual ``target - recon`` on normal tokens, so every channel's error
    counts in units of its own normal variation (the cosine distance weighs channels by their magnitude instead).
    """
    z = (target.float() - recon.float() - mean.float()[:, None, None]) / std.float()[:, None, None]
    return z.square().mean(1).sqrt()


def token_distance(target: Tensor, recon: Tensor, metric: str = "cosine",
                   residual_stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Per-token distance between teacher features and their reconstruction, (B, C, h, w) -> (B, h, w).

    ``cosine``: 1 - channel cosine (the paper's map; blind to errors along the token's own direction).
    ``cosine_residual_z``: the geometric mean of that cosine and the residual's ``residual_zscore`` against the
    group's normal (mean, std): high only where the direction is off *and* the residual is large for normal tissue.
    """
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(target.float(), recon.float(), dim=1)
    if metric != "cosine_residual_z":
        raise ValueError(f"unknown map metric {metric!r}")
    if residual_stats is None:
        raise ValueError(f"map metric {metric!r} needs residual statistics")
    z = residual_zscore(target, recon, *residual_stats)
    cos = 1.0 - F.cosine_similarity(target.float(), recon.float(), dim=1)
    return (cos.clamp_min(0.0) * z).sqrt()


def feature_map(
    targets: Sequence[Tensor],
    recons: Sequence[Tensor],
    metric: str = "cosine",
    residual_stats: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """Mean over feature groups of ``token_distance`` on the token grid: (B, h, w)."""
    if len(targets) != len(recons) or not targets:
        raise ValueError("need the same non-zero number of targets and recons")
    if residual_stats is not None and len(residual_stats) != len(targets):
        raise ValueError(f"{len(residual_stats)} residual statistics for {len(targets)} feature groups")
    stats = residual_stats if residual_stats is not None else [None] * len(targets)
    return torch.stack([token_distance(a, b, metric, st) for a, b, st in zip(targets, recons, stats)]).mean(0)


def pixel_error(pixels: Tensor, pixel_targets: Tensor, patch_size: int, grid: tuple[int, int]) -> Tensor:
    """Absolute error of the predicted patches, mean over the input channels: (B, N, p*p*C) x 2 -> (B, h*p, w*p)."""
    from monai_dnprd.networks.masks import unpatchify

    return unpatchify((pixels.float() - pixel_targets.float()).abs(), patch_size, grid).mean(1)


POLARITIES = ("any", "bright", "dark")


def check_polarity(polarity: str) -> str:
    """``polarity`` itself if it is one of ``POLARITIES``; otherwise a ValueError that names them."""
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {', '.join(POLARITIES)}, not {polarity!r}")
    return polarity


def intensity_rank(image: Tensor, mask: Tensor | None = None, bins: int = 65536) -> Tensor:
    """Each voxel's intensity rank within ``mask``, in (0, 1): the share of the masked voxels darker than it, ties
    sharing their mid-rank; 0 outside the mask. Any monotone intensity normalisation leaves it unchanged.

    Values closer than ``(max - min) / bins`` count as ties: a histogram of the masked intensities replaces a
    sort (a few linear passes over the volume, where sorting the 40 million foreground voxels of a CT-sized
    volume took several seconds here), and a rank is then off by at most half the share of the voxels in one
    such bin.
    """
    img = torch.as_tensor(image).float()
    m = torch.ones_like(img, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    if m.shape != img.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} does not match image shape {tuple(img.shape)}")
    n = int(m.sum())
    if n == 0:
        return torch.zeros_like(img)
    lo, hi = img.masked_fill(~m, float("inf")).min(), img.masked_fill(~m, float("-inf")).max()
    scale = bins / (hi - lo) if hi > lo else torch.zeros(())
    which = ((img - lo) * scale).clamp_(0, bins - 1).to(torch.int64)
    which.masked_fill_(~m, bins)  # voxels outside the mask go to a bin of their own, dropped below
    counts = torch.bincount(which.flatten(), minlength=bins + 1)[:bins]
    mid = torch.cat([(2 * counts.cumsum(0) - counts).double().div_(2.0 * n).float(), torch.zeros(1)])
    return mid[which]  # (below + not_above) / 2n per bin; 0 outside the mask


def polarity_gate(image: Tensor, mask: Tensor | None = None, polarity: str = "any") -> Tensor | None:
    """The weight an anomaly map is multiplied by when only bright (or only dark) anomalies are sought.

    ``bright``: the voxel's ``intensity_rank`` in the foreground (lesions brighter than most of the brain, e.g.
    tumours and white-matter lesions on FLAIR, keep their score; CSF and dark tissue are damped); ``dark``: one
    minus it; ``any``: no gate (``None``). The counterpart of keeping only positive residuals in
    intensity-reconstruction methods, for a feature-space map that has no sign of its own.
    """
    if check_polarity(polarity) == "any":
        return None
    rank = intensity_rank(image, mask)
    if polarity == "dark":
        rank = torch.where(rank > 0, 1.0 - rank, rank)
    return rank


class ResidualMoments:
    """Accumulates per-channel mean and std of ``target - recon`` over many batches (float64 sums).

    ``update(targets, recons)`` takes the group lists of one forward pass; ``stats()`` returns one (mean, std)
    pair per group, std floored at ``eps`` times the largest channel std so that a dead channel can not divide
    by zero.
    """

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = eps
        self.n = 0
        self.sums: list[Tensor] = []
        self.squares: list[Tensor] = []

    def update(self, targets: Sequence[Tensor], recons: Sequence[Tensor], keep: Tensor | None = None) -> None:
        """Add one forward pass; ``keep`` (B, 1, h, w) or (B, N) bool leaves the tokens of known lesions out."""
        sel = None if keep is None else keep.reshape(-1).bool().to(targets[0].device)
        for g, (a, b) in enumerate(zip(targets, recons)):
            r = (a.double() - b.double()).movedim(1, -1).reshape(-1, a.shape[1])
            if sel is not None:
                r = r[sel]
            if len(self.sums) <= g:
                self.sums.append(torch.zeros(a.shape[1], dtype=torch.float64, device=r.device))
                self.squares.append(torch.zeros(a.shape[1], dtype=torch.float64, device=r.device))
            self.sums[g] += r.sum(0)
            self.squares[g] += r.square().sum(0)
        self.n += int(sel.sum()) if sel is not None else targets[0].shape[0] * targets[0].shape[2] * targets[0].shape[3]

    def stats(self) -> list[tuple[Tensor, Tensor]]:
        if self.n < 2:
            raise ValueError(f"need at least 2 tokens to estimate residual statistics, got {self.n}")
        out = []
        for s1, s2 in zip(self.sums, self.squares):
            mean = s1 / self.n
            var = ((s2 - self.n * mean.square()) / (self.n - 1)).clamp_min(0.0)
            std = var.sqrt()
            out.append((mean.float(), std.clamp_min(max(float(std.max()) * self.eps, 1e-12)).float()))
        return out


def top_percent_score(
    values: Tensor, mask: Tensor | None = None, q: float = 0.01, dim: int | Sequence[int] | None = None
) -> Tensor:
    """Mean of the top ceil(q * n) values (at least 1) within `mask`, reducing `dim` (all when None); 0 if empty."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must lie in (0, 1], got {q}")
    if mask is not None:
        mask = torch.broadcast_to(mask.bool(), values.shape)
    if dim is None:
        dims = list(range(values.dim()))
    else:
        dims = sorted(d % values.dim() for d in ([dim] if isinstance(dim, int) else dim))
    keep = [d for d in range(values.dim()) if d not in dims]
    perm = keep + dims
    out_shape = [values.shape[d] for d in keep]
    v = values.permute(perm).reshape(*out_shape, -1) if values.dim() else values.reshape(1)
    if v.shape[-1] == 0:
        return values.new_zeros(out_shape)
    v = v.float() if not v.is_floating_point() else v
    if mask is not None:
        m = mask.permute(perm).reshape(v.shape)
        v = v.masked_fill(~m, float("-inf"))
        n = m.sum(-1)
    else:
        n = torch.full(v.shape[:-1], v.shape[-1], device=v.device)
    k = torch.ceil(n.double() * q - 1e-6).clamp_min(1).long()
    k = torch.where(n > 0, torch.minimum(k, n.long()), torch.zeros_like(k))
    kmax = int(k.max()) if k.numel() else 0
    if kmax == 0:
        return v.new_zeros(out_shape)
    top = torch.topk(v, kmax, dim=-1).values
    take = torch.arange(kmax, device=v.device) < k.unsqueeze(-1)
    total = torch.where(take, top, torch.zeros_like(top)).sum(-1)
    return torch.where(k > 0, total / k.clamp_min(1).to(total.dtype), torch.zeros_like(total))


def prototype_usage(assignments: Tensor, num_prototypes: int) -> Tensor:
    """Number of tokens assigned to each prototype (long, (M,)), for the prototype-collapse monitor."""
    return torch.bincount(assignments.reshape(-1).long(), minlength=num_prototypes)[:num_prototypes]


def feature_spread(features: Tensor) -> Tensor:
    """Mean over channels of the std across all tokens and images; near 0 means collapsed features.

    Accepts token layout (B, N, C) or grid layout (B, C, h, w).
    """
    if features.dim() == 4:
        flat = features.movedim(1, -1).reshape(-1, features.shape[1])
    elif features.dim() == 3:
        flat = features.reshape(-1, features.shape[-1])
    else:
        raise ValueError(f"expected (B, N, C) or (B, C, h, w), got shape {tuple(features.shape)}")
    if flat.shape[0] < 2:
        return flat.new_zeros(())
    return flat.float().std(0).mean()


def group_feature_spread(features: Sequence[Tensor]) -> Tensor:
    """``feature_spread`` over all channels of several (B, C, h, w) group maps (the teacher-spread monitor).

    The groups are joined along channels, so the spread is taken across tokens for each channel; a constant
    offset per channel (or per group) does not count as spread.
    """
    return feature_spread(torch.cat(list(features), 1))


GRID_PHASES = (1, 2)


def check_grid_phases(grid_phases: int) -> int:
    """``grid_phases`` as an int, or a clear error when it is not 1 or 2."""
    try:
        value = int(grid_phases)
        ok = value in GRID_PHASES and float(grid_phases) == value
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"grid_phases must be 1 or 2, got {grid_phases!r}")
    return value


def phase_min(mapper: AnomalyMapper, x: Tensor) -> Tensor:
    """Each pixel's minimum over the maps of ``x`` (B, C, S, S) at two phases of the token grid: as it is, and
    shifted by half a patch along both axes (the map shifted back).

    A token is a patch of several pixels; where its borders fall on the anatomy changes what it sees. A token
    straddling the brain's edge or a CSF boundary at one phase can score high where the same tissue scores low
    at the other; a lesion scores at both. The minimum keeps what both phases agree on (docs/research_log.md:
    it removed false positives at the brain's edge in every TCGA model tried, at twice the network time).
    The shift is a roll: the preprocessed slice keeps a background margin around the foreground, so what wraps
    around is background (at most a pixel's sliver of tissue where that margin is thinner than half a patch).
    """
    h = mapper.network.encoder.patch_size // 2
    shifted = mapper(x.roll((h, h), (-2, -1))).roll((-h, -h), (-2, -1))
    return torch.minimum(mapper(x), shifted)


class AnomalyMapper(nn.Module):
    """(B, C, S, S) 2.5D slice stacks -> (B, 1, S, S) anomaly maps, blurred with ``sigma`` pixels.

    ``metric``: ``feature_pixel`` (default) is the geometric mean of the positive z-scores of two context-only
    errors, high only where both differ from what the surrounding normal tissue predicts: the feature map
    (``cosine_residual_z``: the paper's cosine distance between teacher features and their reconstruction,
    times the residual's per-channel z-score) upsampled to the pixel grid, and the pixel head's absolute error
    on the hidden patches. ``cosine`` is the paper's map; ``cosine_residual_z`` the feature part alone.
    Statistics of normal tissue live in buffers: per group and channel, the residual's mean and std
    (``residual_moments``); the mean and std of the feature map and the pixel error over normal foreground
    pixels (``map_moments``).
    """

    def __init__(self, network: DNPConFormer, metric: str = "feature_pixel", sigma: float = 2.0) -> None:
        super().__init__()
        if metric not in MAP_METRICS:
            raise ValueError(f"unknown map metric {metric!r}; choose one of {list(MAP_METRICS)}")
        if sigma < 0:
            raise ValueError(f"map sigma must be >= 0 pixels, got {sigma}")
        self.network = network
        self.metric = metric
        self.sigma = float(sigma)
        groups, dim = len(network.groups), network.encoder.embed_dim
        self.register_buffer("residual_moments", torch.stack([torch.zeros(groups, dim), torch.ones(groups, dim)]))
        self.register_buffer("map_moments", torch.stack([torch.zeros(2), torch.ones(2)]))
        self.register_buffer("fitted_tokens", torch.zeros((), dtype=torch.long))
        # the resampling matrices of the network's own input size, made once (a stable graph for TorchScript)
        (sh, sw), (gh, gw) = network.encoder.img_size, network.grid_size
        for name, (n_in, n_out, sig) in {"_up_h": (gh, sh, 0.0), "_up_w": (gw, sw, 0.0),
                                         "_blur_h": (sh, sh, self.sigma), "_blur_w": (sw, sw, self.sigma)}.items():
            self.register_buffer(name, upsample_blur_matrix(n_in, n_out, sig), persistent=False)

    # ------------------------------------------------------------------------------------------- config
    def config(self) -> dict[str, Any]:
        """Constructor arguments (the network's as a dict) to rebuild this mapper before loading its state dict."""
        return {"network": self.network.config(), "metric": self.metric, "sigma": self.sigma}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AnomalyMapper:
        """A mapper with fresh weights built from ``config()``; load the state dict afterwards."""
        from monai_dnprd.networks.dnp import DNPConFormer

        net_cfg = dict(config["network"], pretrained=None)  # the state dict holds the weights
        net_cfg.setdefault("hidden_foreground", False)  # models exported before the option existed
        return cls(DNPConFormer(**net_cfg), metric=config.get("metric", "feature_pixel"), sigma=config.get("sigma", 2.0))

    # ------------------------------------------------------------------------------------------- statistics
    def needs_statistics(self) -> bool:
        """True when the map uses statistics of normal tissue (every metric but the paper's ``cosine``)."""
        return self.metric != "cosine"

    def residual_stats(self) -> list[tuple[Tensor, Tensor]]:
        """(mean, std) of the normal residual teacher - reconstruction per feature group."""
        return [(self.residual_moments[0, g], self.residual_moments[1, g]) for g in range(self.residual_moments.shape[1])]

    @torch.no_grad()
    def set_residual_stats(self, stats: Sequence[tuple[Tensor, Tensor]], n_tokens: int) -> None:
        """Store fitted residual statistics (one (mean, std) pair per feature group)."""
        if len(stats) != self.residual_moments.shape[1]:
            raise ValueError(f"{len(stats)} residual statistics for {self.residual_moments.shape[1]} feature groups")
        for g, (mean, std) in enumerate(stats):
            self.residual_moments[0, g].copy_(mean)
            self.residual_moments[1, g].copy_(std)
        self.fitted_tokens.fill_(int(n_tokens))

    @torch.no_grad()
    def set_map_moments(self, mean: Tensor, std: Tensor) -> None:
        """Store the (feature, pixel) means and stds of the two parts of ``feature_pixel`` on normal tissue."""
        self.map_moments.copy_(torch.stack([torch.as_tensor(mean), torch.as_tensor(std)]).float())

    # ------------------------------------------------------------------------------------------- the map
    def parts(self, out: DNPOutput) -> tuple[Tensor, Tensor | None]:
        """The unblurred feature map and pixel error on the pixel grid, (B, S, S) each (pixel error None for the
        feature-only metrics): what ``feature_pixel`` combines and what its statistics are fitted on."""
        h, w = out.targets[0].shape[-2:]
        p = self.network.encoder.patch_size
        metric = "cosine_residual_z" if self.metric == "feature_pixel" else self.metric
        stats = None if metric == "cosine" else self.residual_stats()
        f = feature_map(out.targets, out.recons, metric, stats)
        if (h, w) == tuple(self.network.grid_size):
            f = self._up_h @ f @ self._up_w.T
        else:
            f = upsample_blur(f, (h * p, w * p), 0.0)
        if self.metric != "feature_pixel":
            return f, None
        return f, pixel_error(out.pixels, out.pixel_targets, p, (h, w))

    def part_zscores(self, feature: Tensor, pixel: Tensor) -> tuple[Tensor, Tensor]:
        """The positive parts of the two ``parts``' z-scores against normal tissue (``map_moments``)."""
        zf = ((feature - self.map_moments[0, 0]) / self.map_moments[1, 0]).clamp_min(0.0)
        zp = ((pixel - self.map_moments[0, 1]) / self.map_moments[1, 1]).clamp_min(0.0)
        return zf, zp

    def combine(self, feature: Tensor, pixel: Tensor | None) -> Tensor:
        """The unblurred map (B, S, S) from ``parts``: the geometric mean of ``part_zscores``."""
        if pixel is None:
            return feature
        zf, zp = self.part_zscores(feature, pixel)
        return (zf * zp).sqrt()

    def map_from(self, out: DNPOutput) -> Tensor:
        """(B, 1, S, S) blurred anomaly maps from one network output, computed in fp32 even under autocast: the
        map is made of small differences between near-equal features, which bf16 would round away."""
        with torch.autocast(out.targets[0].device.type, enabled=False):
            m = self.combine(*self.parts(out.float()))
            if tuple(m.shape[-2:]) == tuple(self.network.encoder.img_size):
                return (self._blur_h @ m @ self._blur_w.T).unsqueeze(1)
            return upsample_blur(m, tuple(m.shape[-2:]), self.sigma).unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, S, S) slice stacks, S = the network's input size -> (B, 1, S, S) anomaly maps."""
        return self.map_from(self.network(x))
