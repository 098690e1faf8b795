"""The anomaly map (feature map, pixel error, ``AnomalyMapper``), smoothing, top-q% scores, collapse monitors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from monai_dnprd.anomaly_map import (
    AnomalyMapper,
    feature_map,
    feature_spread,
    group_feature_spread,
    gaussian_blur1d,
    gaussian_blur2d,
    intensity_rank,
    polarity_gate,
    pixel_error,
    prototype_usage,
    upsample_blur,
    upsample_blur_matrix,
    top_percent_score,
)
from monai_dnprd.networks import DNPConFormer, patchify
from monai_dnprd.networks.dnp import DNPOutput


def _net(img_size: int = 64, patch_size: int = 8) -> DNPConFormer:
    """A small network: the mapper reads its geometry (input size, patch size, token grid, groups)."""
    torch.manual_seed(0)
    return DNPConFormer(img_size=img_size, patch_size=patch_size, in_channels=1, vit="tiny", embed_dim=16,
                        depth=2, num_heads=2, num_register_tokens=0)


def _output(targets, recons, pixels=None, pixel_targets=None) -> DNPOutput:
    """A network output holding given features (what ``AnomalyMapper.map_from`` reads)."""
    b = targets[0].shape[0]
    n = targets[0].shape[-2] * targets[0].shape[-1]
    return DNPOutput(targets=list(targets), recons=list(recons), prototypes=torch.zeros(b, 2, 4),
                     tokens=torch.zeros(b, n, 4), assignments=torch.zeros(b, n, dtype=torch.long), pixels=pixels,
                     pixel_targets=pixel_targets)


def test_feature_map_and_mapper_shape_and_zero_for_identical():
    t = [torch.randn(3, 16, 8, 6), torch.randn(3, 16, 8, 6)]
    f = feature_map(t, [x.clone() for x in t])
    assert f.shape == (3, 8, 6) and f.abs().max().item() < 1e-5
    # a token grid other than the network's own (8 x 8 here) is upsampled to patch size x grid
    m = AnomalyMapper(_net(), metric="cosine", sigma=4.0).map_from(_output(t, [x.clone() for x in t]))
    assert m.shape == (3, 1, 64, 48)
    assert m.abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="same non-zero number"):
        feature_map(t, t[:1])


@pytest.mark.parametrize("out_size,sigma", [((240, 200), 5.0), ((64, 48), 4.0), ((7, 5), 1.0), ((30, 30), 0.0),
                                              ((12, 9), 40.0)])
def test_upsample_blur_equals_interpolate_then_blur(out_size, sigma):
    # the two-matrix form must give the map of the plain pipeline: bilinear upsampling, then the separable blur
    torch.manual_seed(0)
    m = torch.rand(5, 1, 12, 9)
    ref = gaussian_blur2d(F.interpolate(m, size=out_size, mode="bilinear", align_corners=False), sigma)
    torch.testing.assert_close(upsample_blur(m, out_size, sigma), ref, atol=2e-6, rtol=1e-5)
    k = upsample_blur_matrix(12, out_size[0], sigma)
    assert k.shape == (out_size[0], 12)
    torch.testing.assert_close(k.sum(1), torch.ones(out_size[0]))  # constants stay constant


@pytest.mark.parametrize("sigma", [0.0, 2.0, 4.0])
def test_mapper_localizes_difference(sigma):
    torch.manual_seed(0)
    t = [torch.randn(2, 16, 8, 8) for _ in range(2)]
    r = [x.clone() for x in t]
    r[0][1, :, 5, 2] = -r[0][1, :, 5, 2]  # token (5, 2) of image 1, group 0 only
    mapper = AnomalyMapper(_net(), metric="cosine", sigma=sigma)
    m = mapper.map_from(_output(t, r))
    assert m.shape == (2, 1, 64, 64)
    assert m[0].abs().max().item() < 1e-5
    y, x = divmod(int(m[1, 0].argmax()), 64)
    assert 40 <= y < 48 and 16 <= x < 24  # inside that token's 8x8 patch
    # the mapper's precomputed resampling matrices give the plain pipeline's map: mean over groups on the token
    # grid, bilinear upsampling, then the separable blur
    ref = gaussian_blur2d(F.interpolate(feature_map(t, r)[:, None], size=(64, 64), mode="bilinear",
                                        align_corners=False), sigma)
    torch.testing.assert_close(m, ref, atol=2e-6, rtol=1e-5)
    if sigma == 0:
        # d = 2 in one of 2 groups -> 1 at the token centre (between pixels 43/44 and 19/20 for patch 8):
        # half-pixel-aligned bilinear gives (1 - 1/16)^2 at the four central pixels of the patch
        assert math.isclose(m[1].max().item(), (15 / 16) ** 2, rel_tol=1e-4)
        assert torch.allclose(m[1, 0, 43:45, 19:21], torch.tensor((15 / 16) ** 2))
    else:
        assert m[1, 0].max() < (15 / 16) ** 2  # the blur spreads the token's distance


def test_pixel_error_is_the_mean_absolute_error_over_channels():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 8)
    pred = torch.randn(2, 3, 16, 8)
    err = pixel_error(patchify(pred, 4), patchify(x, 4), 4, (4, 2))
    assert err.shape == (2, 16, 8)
    torch.testing.assert_close(err, (pred - x).abs().mean(1))  # patchify / unpatchify keep every pixel in place


def test_feature_pixel_map_is_the_geometric_mean_of_positive_z_scores():
    torch.manual_seed(0)
    net = _net(32, 8)  # 4 x 4 token grid, 2 feature groups of 16 channels
    mapper = AnomalyMapper(net, metric="feature_pixel", sigma=0.0)
    stats = [(0.1 * torch.randn(16), torch.rand(16) + 0.5) for _ in range(2)]
    mapper.set_residual_stats(stats, 10)
    mapper.set_map_moments(torch.tensor([0.3, 0.2]), torch.tensor([0.5, 0.1]))
    t = [torch.randn(2, 16, 4, 4) for _ in range(2)]
    r = [torch.randn(2, 16, 4, 4) for _ in range(2)]
    x = torch.rand(2, 1, 32, 32)
    pixels, targets = patchify(torch.rand(2, 1, 32, 32), 8), patchify(x, 8)
    out = _output(t, r, pixels, targets)
    feature, pixel = mapper.parts(out)
    ref_f = F.interpolate(feature_map(t, r, "cosine_residual_z", stats)[:, None], size=(32, 32), mode="bilinear",
                          align_corners=False)[:, 0]
    torch.testing.assert_close(feature, ref_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pixel, pixel_error(pixels, targets, 8, (4, 4)))
    zf, zp = ((feature - 0.3) / 0.5).clamp_min(0), ((pixel - 0.2) / 0.1).clamp_min(0)
    for got, want in zip(mapper.part_zscores(feature, pixel), (zf, zp)):
        torch.testing.assert_close(got, want)
    combined = mapper.combine(feature, pixel)
    torch.testing.assert_close(combined, (zf * zp).sqrt())
    assert (combined[(feature < 0.3) | (pixel < 0.2)] == 0).all()  # below the normal mean in either part: 0
    torch.testing.assert_close(mapper.map_from(out), combined[:, None])  # sigma 0: no blur
    # the feature-only metrics have no pixel part, and their map is the feature map itself
    for metric in ("cosine", "cosine_residual_z"):
        other = AnomalyMapper(net, metric=metric, sigma=0.0)
        other.set_residual_stats(stats, 10)
        f, p = other.parts(out)
        assert p is None
        torch.testing.assert_close(other.map_from(out)[:, 0], f)


def test_mapper_runs_the_network_on_slice_stacks():
    net = _net(32, 8).eval()
    mapper = AnomalyMapper(net, metric="cosine", sigma=1.0)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        m = mapper(x)
        torch.testing.assert_close(m, mapper.map_from(net(x)))
    assert m.shape == (3, 1, 32, 32) and torch.isfinite(m).all() and m.min() >= 0
    with pytest.raises(ValueError, match="unknown map metric"):
        AnomalyMapper(net, metric="residual_z")
    with pytest.raises(ValueError, match="sigma"):
        AnomalyMapper(net, sigma=-1.0)


def test_blur_identity_constant_and_mass():
    x = torch.rand(2, 1, 20, 30)
    assert torch.equal(gaussian_blur2d(x, 0.0), x)
    c = torch.full((2, 1, 20, 30), 0.7)
    torch.testing.assert_close(gaussian_blur2d(c, 4.0), c)
    imp = torch.zeros(1, 1, 41, 41)
    imp[0, 0, 20, 20] = 1.0
    out = gaussian_blur2d(imp, 2.0)
    torch.testing.assert_close(out.sum(), torch.tensor(1.0))
    assert int(out.argmax()) == 20 * 41 + 20
    torch.testing.assert_close(out[0, 0], out[0, 0].T)  # isotropic


def test_blur_matches_scipy_mirror_and_is_batched():
    rng = np.random.default_rng(0)
    a = rng.random((3, 1, 25, 19)).astype(np.float32)
    out = gaussian_blur2d(torch.from_numpy(a), 1.5).numpy()
    for i in range(3):
        ref = ndimage.gaussian_filter(a[i, 0].astype(np.float64), 1.5, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(out[i, 0], ref, atol=1e-5)
    # a large sigma on a small map still works (radius clipped for reflect padding)
    assert gaussian_blur2d(torch.rand(1, 1, 5, 5), 4.0).shape == (1, 1, 5, 5)


def test_blur1d_along_z():
    rng = np.random.default_rng(1)
    v = rng.random((1, 6, 7, 12)).astype(np.float32)
    out = gaussian_blur1d(torch.from_numpy(v), 1.0, dim=-1).numpy()
    ref = ndimage.gaussian_filter1d(v.astype(np.float64), 1.0, axis=-1, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    c = torch.full((4, 5, 9), 3.0)
    torch.testing.assert_close(gaussian_blur1d(c, 2.0, dim=1), c)
    assert torch.equal(gaussian_blur1d(c, 0.0, dim=1), c)


def _np_top(v: np.ndarray, q: float) -> float:
    if v.size == 0:
        return 0.0
    k = max(1, math.ceil(q * v.size - 1e-6))
    return float(np.sort(v)[::-1][:k].mean())


@pytest.mark.parametrize("q", [0.01, 0.05, 0.3, 1.0])
def test_top_percent_score_against_numpy(q):
    rng = np.random.default_rng(2)
    v = rng.random((10, 11, 12)).astype(np.float32)
    mask = rng.random(v.shape) > 0.6
    assert math.isclose(top_percent_score(torch.from_numpy(v), q=q).item(), _np_top(v.ravel(), q), rel_tol=1e-5)
    got = top_percent_score(torch.from_numpy(v), torch.from_numpy(mask), q=q).item()
    assert math.isclose(got, _np_top(v[mask], q), rel_tol=1e-5)


def test_top_percent_score_edge_cases():
    v = torch.tensor([1.0, 5.0, 3.0])
    assert top_percent_score(v, q=0.01).item() == 5.0  # at least one value
    assert top_percent_score(v, q=1.0).item() == 3.0
    assert top_percent_score(v, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    assert top_percent_score(v, torch.tensor([True, False, True]), q=0.5).item() == 3.0
    with pytest.raises(ValueError):
        top_percent_score(v, q=0.0)


def test_top_percent_score_batched_equals_per_item():
    rng = np.random.default_rng(3)
    v = torch.from_numpy(rng.random((4, 6, 7, 8)).astype(np.float32))
    mask = torch.from_numpy(rng.random((4, 6, 7, 8)) > 0.5)
    mask[2] = False  # an empty mask scores 0
    batched = top_percent_score(v, mask, q=0.05, dim=(1, 2, 3))
    assert batched.shape == (4,)
    for i in range(4):
        torch.testing.assert_close(batched[i], top_percent_score(v[i], mask[i], q=0.05))
    assert batched[2].item() == 0.0
    nomask = top_percent_score(v, q=0.05, dim=(1, 2, 3))
    for i in range(4):
        torch.testing.assert_close(nomask[i], top_percent_score(v[i], q=0.05))
    # maps shaped (B, 1, H, W) and a broadcast foreground mask
    maps = torch.rand(3, 1, 10, 10)
    fg = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    fg[..., 2:8, 2:8] = True
    per = top_percent_score(maps, fg, q=0.1, dim=(1, 2, 3))
    for i in range(3):
        torch.testing.assert_close(per[i], top_percent_score(maps[i, 0, 2:8, 2:8], q=0.1))


def test_prototype_usage():
    a = torch.tensor([[0, 0, 2], [2, 2, 5]])
    assert prototype_usage(a, 6).tolist() == [2, 0, 3, 0, 0, 1]
    assert prototype_usage(torch.zeros(0, dtype=torch.long), 3).tolist() == [0, 0, 0]


def test_group_feature_spread_is_across_tokens_per_channel():
    # features constant over tokens but different per channel and group: no spread (a per-channel offset is
    # not spread; the monitor once joined the groups in token layout and counted exactly that)
    groups = [torch.arange(8.0).view(1, 8, 1, 1).expand(2, 8, 3, 3) * (g + 1) for g in range(2)]
    assert group_feature_spread(groups).item() == 0.0
    x = [torch.randn(3, 8, 4, 4), 2.0 * torch.randn(3, 8, 4, 4) + 5.0]
    torch.testing.assert_close(group_feature_spread(x), (feature_spread(x[0]) + feature_spread(x[1])) / 2)


def test_feature_spread():
    assert feature_spread(torch.ones(2, 8, 4, 4) * 3.0).item() == 0.0
    x = torch.randn(4, 16, 6, 6)
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
    torch.testing.assert_close(feature_spread(x), feature_spread(tokens))
    ref = tokens.reshape(-1, 16).std(0).mean()
    torch.testing.assert_close(feature_spread(tokens), ref)
    assert feature_spread(tokens).item() > 0.5


# ------------------------------------------------------------------------------------ polarity (intensity rank)
def test_intensity_rank_is_the_mid_rank_within_the_mask():
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    img = rng.integers(0, 20, size=(9, 8, 7)).astype(np.float32)  # many ties
    mask = rng.random((9, 8, 7)) > 0.3
    r = intensity_rank(torch.from_numpy(img), torch.from_numpy(mask)).numpy()
    expected = (rankdata(img[mask], method="average") - 0.5) / mask.sum()
    np.testing.assert_allclose(r[mask], expected, rtol=1e-6)
    assert (r[~mask] == 0).all() and r[mask].min() > 0 and r[mask].max() < 1
    # equal intensities share their rank, and any monotone normalisation leaves the ranks unchanged
    assert len(np.unique(r[mask & (img == 7)])) == 1
    r2 = intensity_rank(torch.from_numpy(np.exp(img / 5) * 3 - 1), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(r2, r, rtol=1e-6)
    # no mask: the whole volume; an empty mask: zeros; a mask of another shape: refused
    assert intensity_rank(torch.tensor([[3.0, 1.0], [2.0, 4.0]])).tolist() == [[0.625, 0.125], [0.375, 0.875]]
    assert intensity_rank(torch.ones(3, 3), torch.zeros(3, 3, dtype=torch.bool)).abs().sum() == 0
    with pytest.raises(ValueError, match="does not match"):
        intensity_rank(torch.ones(3, 3), torch.ones(3, 4))
    # continuous intensities: values within (max - min) / bins of each other count as ties, so the rank is off by
    # at most half a bin's share of the voxels
    x = rng.normal(size=200_000).astype(np.float32)
    exact = (rankdata(x) - 0.5) / x.size
    for bins in (65536, 256):
        counts = np.histogram(x, bins=bins)[0]
        err = np.abs(intensity_rank(torch.from_numpy(x), bins=bins).numpy() - exact).max()
        assert err <= counts.max() / x.size / 2 + 1e-6
    assert np.abs(intensity_rank(torch.from_numpy(x), bins=256).numpy() - exact).max() > 1e-3  # the bound bites


def test_polarity_gate():
    img = torch.arange(24.0).reshape(2, 3, 4)
    mask = img % 5 != 0
    bright, dark = polarity_gate(img, mask, "bright"), polarity_gate(img, mask, "dark")
    assert polarity_gate(img, mask, "any") is None
    torch.testing.assert_close(bright, intensity_rank(img, mask))
    torch.testing.assert_close(dark[mask], 1.0 - bright[mask])
    assert (dark[~mask] == 0).all()
    # the brightest foreground voxel gets the largest bright weight and the smallest dark one
    top = img.masked_fill(~mask, -1).argmax()
    assert bright.flatten()[top] == bright.max() and dark.flatten()[top] == dark[mask].min()
    with pytest.raises(ValueError, match="polarity must be one of any, bright, dark"):
        polarity_gate(img, mask, "positive")
