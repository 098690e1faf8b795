"""The map's statistics of normal tissue: z-scored residual maths, moment fitting, ``AnomalyMapper`` buffers,
export and the handler that refits them."""

from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from monai_dnprd.anomaly_map import AnomalyMapper, ResidualMoments, feature_map, residual_zscore, token_distance
from monai_dnprd.calibration import fit_map_statistics, residual_fit_slices
from monai_dnprd.checkpoint import export_model, load_model
from monai_dnprd.networks import DNPConFormer
from monai_dnprd.transforms.array import ResizeSlices, gather_slice_stacks

TINY = dict(img_size=32, patch_size=8, vit="tiny", embed_dim=32, num_heads=2, depth=4)


def tiny_model(**kw) -> DNPConFormer:
    torch.manual_seed(0)
    return DNPConFormer(**{**TINY, **kw})


def tiny_mapper(metric: str = "feature_pixel", **kw) -> AnomalyMapper:
    return AnomalyMapper(tiny_model(**kw), metric=metric)


def test_residual_zscore_against_a_direct_formula():
    torch.manual_seed(0)
    t, r = torch.randn(2, 5, 4, 3), torch.randn(2, 5, 4, 3)
    mean, std = torch.randn(5), torch.rand(5) + 0.5
    z = residual_zscore(t, r, mean, std)
    expected = torch.zeros(2, 4, 3)
    for b in range(2):
        for i in range(4):
            for j in range(3):
                e = (t[b, :, i, j] - r[b, :, i, j] - mean) / std
                expected[b, i, j] = (e.square().sum() / 5).sqrt()
    assert torch.allclose(z, expected, atol=1e-6)


def test_residual_zscore_weighs_channels_by_their_normal_spread():
    # the same absolute error counts 10x more in a channel whose normal residual varies 10x less
    t = torch.zeros(1, 2, 1, 2)
    r = torch.zeros(1, 2, 1, 2)
    r[0, 0, 0, 0] = 1.0  # error in channel 0 at position 0
    r[0, 1, 0, 1] = 1.0  # error in channel 1 at position 1
    z = residual_zscore(t, r, torch.zeros(2), torch.tensor([1.0, 0.1]))
    assert z[0, 0, 1] / z[0, 0, 0] == pytest.approx(10.0)
    # the cosine map sees both errors alike
    cos = feature_map([t + 1.0], [r + 1.0])
    assert cos[0, 0, 0] == pytest.approx(cos[0, 0, 1].item())


def test_feature_map_with_residual_stats():
    torch.manual_seed(0)
    t = [torch.randn(3, 6, 8, 8), torch.randn(3, 6, 8, 8)]
    stats = [(torch.randn(6), torch.rand(6) + 0.5) for _ in t]
    # a reconstruction off by exactly the normal mean residual scores 0 (the square root amplifies rounding)
    r = [a - m[:, None, None] for a, (m, _) in zip(t, stats)]
    assert feature_map(t, r, "cosine_residual_z", stats).abs().max() < 1e-3
    r = [torch.randn_like(a) for a in t]
    m = feature_map(t, r, "cosine_residual_z", stats)
    d = torch.stack([token_distance(a, b, "cosine_residual_z", st) for a, b, st in zip(t, r, stats)]).mean(0)
    assert m.shape == (3, 8, 8) and torch.allclose(m, d, atol=1e-6)
    assert not torch.allclose(m, feature_map(t, r, "cosine"), atol=1e-2)
    with pytest.raises(ValueError, match="feature groups"):
        feature_map(t, r, metric="cosine_residual_z", residual_stats=stats[:1])
    with pytest.raises(ValueError, match="needs residual statistics"):
        feature_map(t, r, metric="cosine_residual_z")
    for metric in ("l1", "residual_z"):  # residual_z alone is no longer a map
        with pytest.raises(ValueError, match="unknown map metric"):
            feature_map(t, r, metric=metric, residual_stats=stats)


def test_residual_moments_match_torch_over_all_tokens():
    torch.manual_seed(0)
    batches = [([torch.randn(n, 4, 3, 3) * 2 + 1], [torch.randn(n, 4, 3, 3)]) for n in (2, 5, 1)]
    acc = ResidualMoments()
    for t, r in batches:
        acc.update(t, r)
    flat = torch.cat([(t[0] - r[0]).movedim(1, -1).reshape(-1, 4) for t, r in batches])
    (mean, std), = acc.stats()
    assert acc.n == flat.shape[0] == 72
    assert torch.allclose(mean, flat.mean(0), atol=1e-5)
    assert torch.allclose(std, flat.std(0), atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        ResidualMoments().stats()


def test_residual_moments_floor_a_dead_channel():
    torch.manual_seed(0)
    t = torch.zeros(3, 2, 2, 2)
    t[:, 0] = torch.randn(3, 2, 2)  # channel 1 never varies
    acc = ResidualMoments(eps=1e-3)
    acc.update([t], [torch.zeros_like(t)])
    (_, std), = acc.stats()
    assert std[1] > 0 and std[1].item() == pytest.approx(1e-3 * std[0].item())


def test_mapper_statistics_buffers_and_validation():
    cos = tiny_mapper("cosine")
    assert not cos.needs_statistics()
    assert tiny_mapper("cosine_residual_z").needs_statistics() and tiny_mapper("feature_pixel").needs_statistics()
    with pytest.raises(ValueError, match="unknown map metric"):
        tiny_mapper("l2")
    m = tiny_mapper("feature_pixel")
    sd = m.state_dict()
    assert {"residual_moments", "map_moments", "fitted_tokens"} <= set(sd)
    assert not any(k.startswith("_up") or k.startswith("_blur") for k in sd)  # resampling matrices: not saved
    assert not any("residual" in k for k in m.network.state_dict())  # the network holds no statistics
    stats = m.residual_stats()
    assert len(stats) == len(m.network.groups) == 2
    assert all(torch.equal(mu, torch.zeros(32)) and torch.equal(s, torch.ones(32)) for mu, s in stats)
    assert torch.equal(m.map_moments, torch.tensor([[0.0, 0.0], [1.0, 1.0]])) and int(m.fitted_tokens) == 0
    new = [(torch.full((32,), float(g)), torch.full((32,), 2.0 + g)) for g in range(len(m.network.groups))]
    m.set_residual_stats(new, 123)
    assert int(m.fitted_tokens) == 123
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(m.residual_stats(), new))
    with pytest.raises(ValueError, match="feature groups"):
        m.set_residual_stats(new[:1], 5)
    m.set_map_moments(torch.tensor([0.1, 0.2]), torch.tensor([3.0, 4.0]))
    assert torch.equal(m.map_moments, torch.tensor([[0.1, 0.2], [3.0, 4.0]]))


def test_mapper_statistics_survive_export_and_load(tmp_path):
    m = tiny_mapper("cosine_residual_z")
    m.set_residual_stats([(torch.randn(32), torch.rand(32) + 0.1) for _ in m.network.groups], 7)
    m.set_map_moments(torch.tensor([0.5, 0.25]), torch.tensor([2.0, 3.0]))
    loaded, meta = load_model(export_model(tmp_path / "model.pt", m, {"img_size": 32, "k": 1}))
    assert loaded.metric == "cosine_residual_z" and int(loaded.fitted_tokens) == 7
    assert meta["config"] == m.config() and meta["config"]["metric"] == "cosine_residual_z"
    for (a, b), (c, d) in zip(m.residual_stats(), loaded.residual_stats()):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert torch.equal(loaded.map_moments, m.map_moments)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m.eval()(x))


def _volume(seed: int, shape=(20, 24, 10)) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand((1, *shape), generator=g)
    mask = torch.zeros((1, *shape))
    mask[:, 2:18, 3:20, 1:9] = 1  # slices 0 and 9 empty
    return {"image": image * mask, "mask": mask}


def test_residual_fit_slices_choose_foreground_slices_evenly():
    vols = [_volume(0), _volume(1)]
    pairs = residual_fit_slices([v["mask"] for v in vols], max_slices=100, min_foreground=0.15)
    assert pairs == [(v, z) for v in range(2) for z in range(1, 9)]
    few = residual_fit_slices([v["mask"] for v in vols], max_slices=4, min_foreground=0.15)
    assert len(few) == 4 and few[0] == (0, 1) and few[-1] == (1, 8)
    assert residual_fit_slices([v["mask"] for v in vols], 10, min_foreground=0.99) == []


def _fit_inputs(vols, max_slices):
    pairs = residual_fit_slices([v["mask"] for v in vols], max_slices)
    x = torch.cat([ResizeSlices(32)(gather_slice_stacks(vols[v]["image"], torch.tensor([z]), 1)) for v, z in pairs])
    fg = torch.cat([ResizeSlices(32)(gather_slice_stacks(vols[v]["mask"], torch.tensor([z]), 0)) for v, z in pairs])
    return x, fg[:, 0] > 0.5


def test_fit_map_statistics_equals_the_moments_of_those_slices():
    m = tiny_mapper("cosine_residual_z").train()
    vols = [_volume(0), _volume(1)]
    n = fit_map_statistics(m, vols, k=1, img_size=32, max_slices=6, batch_size=4)
    assert m.training  # mode restored
    assert n == 6 * 16 and int(m.fitted_tokens) == n
    assert torch.equal(m.map_moments, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))  # one part: no map moments
    x, _ = _fit_inputs(vols, 6)
    m.eval()
    with torch.no_grad():
        out = m.network(x)
    for g, (mean, std) in enumerate(m.residual_stats()):
        res = (out.targets[g] - out.recons[g]).movedim(1, -1).reshape(-1, 32)
        assert torch.allclose(mean, res.mean(0), atol=1e-5)
        assert torch.allclose(std, res.std(0).clamp_min(res.std(0).max() * 1e-3), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="foreground"):
        fit_map_statistics(m, vols, k=1, img_size=32, min_foreground=0.99)


def test_fit_map_statistics_of_feature_pixel_scale_both_parts_on_normal_foreground():
    m = tiny_mapper("feature_pixel")
    vols = [_volume(0), _volume(1)]
    n = fit_map_statistics(m, vols, k=1, img_size=32, max_slices=6, batch_size=4)
    assert n == 6 * 16
    x, fg = _fit_inputs(vols, 6)
    m.eval()  # as the fit runs it (the bottleneck's dropout off)
    with torch.no_grad():
        parts = m.parts(m.network(x))  # with the residual statistics just fitted
    for i, part in enumerate(parts):
        vals = part[fg].double()
        assert m.map_moments[0, i].item() == pytest.approx(vals.mean().item(), rel=1e-4, abs=1e-6)
        assert m.map_moments[1, i].item() == pytest.approx(vals.std().item(), rel=1e-3)
    # on the slices it was fitted on, the combined map is a z-score product: mostly small, and 0 where either
    # part is below its normal mean
    with torch.no_grad():
        z = m.combine(*parts)[fg]
    assert z.min() == 0 and z.median() < 1.5
    # the paper's cosine map needs nothing and is left as it was
    cos = tiny_mapper("cosine")
    assert fit_map_statistics(cos, vols, k=1, img_size=32) == 0 and int(cos.fitted_tokens) == 0


def test_fit_map_statistics_runs_the_network_in_the_precision_of_the_maps():
    """Fitted in bf16, the statistics are the moments of the bf16 network's residuals (the maps they scale are
    made in bf16 at inference), not of the fp32 network's."""
    vols = [_volume(0), _volume(1)]
    seen = []
    fp32, bf16 = tiny_mapper("cosine_residual_z"), tiny_mapper("cosine_residual_z")
    bf16.network.register_forward_hook(lambda mod, inp, out: seen.append(torch.is_autocast_enabled("cpu")))
    fit_map_statistics(fp32, vols, k=1, img_size=32, max_slices=6, batch_size=4)
    fit_map_statistics(bf16, vols, k=1, img_size=32, max_slices=6, batch_size=4, precision="bf16")
    assert seen and all(seen)
    x, _ = _fit_inputs(vols, 6)
    bf16.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = bf16.network(x)
    res = (out.targets[0].float() - out.recons[0].float()).movedim(1, -1).reshape(-1, 32)
    mean = bf16.residual_stats()[0][0]
    assert torch.allclose(mean, res.mean(0), atol=1e-5)
    assert not torch.allclose(mean, fp32.residual_stats()[0][0], atol=1e-5)


def test_fit_map_statistics_leave_known_lesions_out_of_both_stages():
    """Tokens that touch an item's ``exclude`` region count neither in the residual moments nor, for
    ``feature_pixel``, in the map moments (their pixels leave the foreground the parts are measured on)."""
    import torch.nn.functional as F

    from monai_dnprd.losses import token_keep

    vols = [_volume(0), _volume(1)]
    vols[0]["exclude"] = torch.zeros_like(vols[0]["mask"])
    vols[0]["exclude"][:, 5:10, 6:12, 2:5] = 1  # a block inside the foreground of slices 1-5 (k = 1 stacks)
    m = tiny_mapper("feature_pixel")
    n = fit_map_statistics(m, vols, k=1, img_size=32, max_slices=6, batch_size=4)
    pairs = residual_fit_slices([v["mask"] for v in vols], 6)
    ex = torch.cat([ResizeSlices(32)(gather_slice_stacks(vols[v].get("exclude", torch.zeros_like(vols[v]["mask"])),
                                                          torch.tensor([z]), 1)).amax(1, keepdim=True)
                    for v, z in pairs])
    keep = token_keep(ex, 8)  # (B, 1, 4, 4)
    assert 0 < int((keep == 0).sum()) < keep.numel()
    assert n == int(keep.sum()) < 6 * 16
    x, fg = _fit_inputs(vols, 6)
    fg &= F.interpolate(keep, size=(32, 32), mode="nearest")[:, 0].bool()
    m.eval()
    with torch.no_grad():
        out = m.network(x)
        parts = m.parts(out)
    sel = keep.reshape(-1).bool()
    for g, (mean, _) in enumerate(m.residual_stats()):
        res = (out.targets[g] - out.recons[g]).movedim(1, -1).reshape(-1, 32)[sel]
        assert torch.allclose(mean, res.mean(0), atol=1e-5)
    for i, part in enumerate(parts):
        assert m.map_moments[0, i].item() == pytest.approx(part[fg].double().mean().item(), rel=1e-4, abs=1e-6)


def test_map_stats_handler_fits_before_validation_once_per_iteration(monkeypatch):
    from ignite.engine import Engine

    from monai_dnprd.engines import MapStatsHandler

    m = tiny_mapper("cosine_residual_z")
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    MapStatsHandler(m, [_volume(0)], k=1, img_size=32, evaluator=evaluator, max_slices=4).attach(trainer)
    trainer.state.iteration = 5
    evaluator.run([0])
    assert int(m.fitted_tokens) == 4 * 16
    m.fitted_tokens.zero_()
    evaluator.run([0])  # same trainer iteration: the statistics are current, no second fit
    assert int(m.fitted_tokens) == 0
    trainer.state.iteration = 6
    evaluator.run([0])
    assert int(m.fitted_tokens) == 4 * 16
    # the fit runs in the handler's precision (the bundle passes the inference precision, map#precision)
    import monai_dnprd.engines.handlers as handlers

    precisions = []
    monkeypatch.setattr(handlers, "fit_map_statistics", lambda *a, **k: precisions.append(a[-1]) or 0)
    bf16_trainer, bf16_eval = Engine(lambda e, b: None), Engine(lambda e, b: None)
    MapStatsHandler(m, [_volume(0)], k=1, img_size=32, evaluator=bf16_eval, precision="bf16").attach(bf16_trainer)
    bf16_eval.run([0])
    assert precisions == ["bf16"]
    # a cosine map is never fitted
    calls = []
    monkeypatch.setattr(handlers, "fit_map_statistics", lambda *a, **k: calls.append(1) or 0)
    cos_trainer, cos_eval = Engine(lambda e, b: None), Engine(lambda e, b: None)
    MapStatsHandler(tiny_mapper("cosine"), [_volume(0)], k=1, img_size=32, evaluator=cos_eval).attach(cos_trainer)
    cos_eval.run([0])
    cos_trainer.run([0])
    assert calls == []
