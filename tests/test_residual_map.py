"""The ``residual_z`` anomaly map: z-scored residual maths, moment fitting, model buffers and export."""

from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from monai_dnprd.anomaly_map import ResidualMoments, residual_zscore, slice_anomaly_map, token_distance, upsample_blur
from monai_dnprd.calibration import fit_residual_stats, residual_fit_slices
from monai_dnprd.checkpoint import export_model, load_model
from monai_dnprd.networks import DNPConFormer
from monai_dnprd.transforms.array import ResizeSlices, gather_slice_stacks

TINY = dict(img_size=32, patch_size=8, vit="tiny", embed_dim=32, num_heads=2, depth=4)


def tiny_model(**kw) -> DNPConFormer:
    torch.manual_seed(0)
    return DNPConFormer(**{**TINY, **kw})


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
    cos = slice_anomaly_map([t + 1.0], [r + 1.0], (1, 2), sigma=0.0)
    assert cos[0, 0, 0, 0] == pytest.approx(cos[0, 0, 0, 1].item())


def test_slice_map_with_residual_stats():
    torch.manual_seed(0)
    t = [torch.randn(3, 6, 8, 8), torch.randn(3, 6, 8, 8)]
    stats = [(torch.randn(6), torch.rand(6) + 0.5) for _ in t]
    # a reconstruction off by exactly the normal mean residual scores 0
    r = [a - m[:, None, None] for a, (m, _) in zip(t, stats)]
    for metric, tol in (("residual_z", 1e-5), ("cosine_residual_z", 1e-3)):  # the square root amplifies rounding
        assert slice_anomaly_map(t, r, (16, 16), 1.0, metric, stats).abs().max() < tol
    r = [torch.randn_like(a) for a in t]
    m = slice_anomaly_map(t, r, (16, 12), 1.5, "residual_z", stats)
    d = torch.stack([residual_zscore(a, b, mm, s) for a, b, (mm, s) in zip(t, r, stats)]).mean(0)
    assert torch.allclose(m, upsample_blur(d, (16, 12), 1.5).unsqueeze(1), atol=1e-5)
    with pytest.raises(ValueError, match="feature groups"):
        slice_anomaly_map(t, r, (16, 16), metric="residual_z", residual_stats=stats[:1])
    with pytest.raises(ValueError, match="needs residual statistics"):
        slice_anomaly_map(t, r, (16, 16), metric="residual_z")
    with pytest.raises(ValueError, match="unknown map metric"):
        slice_anomaly_map(t, r, (16, 16), metric="l1", residual_stats=stats)


def test_cosine_residual_z_is_the_geometric_mean_of_both_distances():
    torch.manual_seed(0)
    t, r = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    st = (torch.randn(6), torch.rand(6) + 0.5)
    cos = 1.0 - F.cosine_similarity(t, r, dim=1)
    z = residual_zscore(t, r, *st)
    assert torch.allclose(token_distance(t, r, "cosine"), cos)
    assert torch.allclose(token_distance(t, r, "residual_z", st), z)
    assert torch.allclose(token_distance(t, r, "cosine_residual_z", st), (cos * z).sqrt(), atol=1e-6)
    # a reconstruction scaled along the token's own direction: the cosine sees nothing, the combination neither,
    # the residual z does
    assert token_distance(t, 1.5 * t, "cosine").abs().max() < 1e-5
    assert token_distance(t, 1.5 * t, "cosine_residual_z", st).abs().max() < 1e-2
    assert token_distance(t, 1.5 * t, "residual_z", st).min() > 0


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


def test_model_map_metric_buffers_and_validation():
    cos = tiny_model()
    assert cos.residual_stats() is None and "residual_moments" not in cos.state_dict()
    with pytest.raises(ValueError, match="only used"):
        cos.set_residual_stats([], 0)
    with pytest.raises(ValueError, match="unknown map_metric"):
        tiny_model(map_metric="l2")
    assert tiny_model(map_metric="cosine_residual_z").residual_stats() is not None
    m = tiny_model(map_metric="residual_z")
    stats = m.residual_stats()
    assert len(stats) == len(m.groups)
    assert all(torch.equal(mu, torch.zeros(32)) and torch.equal(s, torch.ones(32)) for mu, s in stats)
    new = [(torch.full((32,), float(g)), torch.full((32,), 2.0 + g)) for g in range(len(m.groups))]
    m.set_residual_stats(new, 123)
    assert int(m.residual_tokens) == 123
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(m.residual_stats(), new))


def test_residual_stats_survive_export_and_load(tmp_path):
    m = tiny_model(map_metric="residual_z")
    m.set_residual_stats([(torch.randn(32), torch.rand(32) + 0.1) for _ in m.groups], 7)
    loaded, _ = load_model(export_model(tmp_path / "model.pt", m, {"img_size": 32, "k": 1}))
    assert loaded.map_metric == "residual_z" and int(loaded.residual_tokens) == 7
    for (a, b), (c, d) in zip(m.residual_stats(), loaded.residual_stats()):
        assert torch.equal(a, c) and torch.equal(b, d)
    # a model exported before the option existed (no map_metric in its config) loads with the cosine map
    old = tiny_model()
    ckpt_path = export_model(tmp_path / "old.pt", old, {"img_size": 32, "k": 1})
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["config"].pop("map_metric")
    torch.save(ckpt, ckpt_path)
    assert load_model(ckpt_path)[0].residual_stats() is None


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


def test_fit_residual_stats_equals_the_moments_of_those_slices():
    m = tiny_model(map_metric="residual_z").train()
    vols = [_volume(0), _volume(1)]
    n = fit_residual_stats(m, vols, k=1, img_size=32, max_slices=6, batch_size=4)
    assert m.training  # mode restored
    assert n == 6 * 16 and int(m.residual_tokens) == n
    pairs = residual_fit_slices([v["mask"] for v in vols], 6)
    x = torch.cat([ResizeSlices(32)(gather_slice_stacks(vols[v]["image"], torch.tensor([z]), 1)) for v, z in pairs])
    m.eval()
    with torch.no_grad():
        out = m(x)
    for g, (mean, std) in enumerate(m.residual_stats()):
        res = (out.targets[g] - out.recons[g]).movedim(1, -1).reshape(-1, 32)
        assert torch.allclose(mean, res.mean(0), atol=1e-5)
        assert torch.allclose(std, res.std(0).clamp_min(res.std(0).max() * 1e-3), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="foreground"):
        fit_residual_stats(m, vols, k=1, img_size=32, min_foreground=0.99)


def test_residual_stats_handler_fits_before_validation_once_per_iteration(monkeypatch):
    from ignite.engine import Engine

    from monai_dnprd.engines import ResidualStatsHandler

    m = tiny_model(map_metric="cosine_residual_z")
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    ResidualStatsHandler(m, [_volume(0)], k=1, img_size=32, evaluator=evaluator, max_slices=4).attach(trainer)
    trainer.state.iteration = 5
    evaluator.run([0])
    assert int(m.residual_tokens) == 4 * 16
    m.residual_tokens.zero_()
    evaluator.run([0])  # same trainer iteration: the statistics are current, no second fit
    assert int(m.residual_tokens) == 0
    trainer.state.iteration = 6
    evaluator.run([0])
    assert int(m.residual_tokens) == 4 * 16
    # a cosine model is never fitted
    import monai_dnprd.engines.handlers as handlers

    calls = []
    monkeypatch.setattr(handlers, "fit_residual_stats", lambda *a, **k: calls.append(1) or 0)
    cos_trainer, cos_eval = Engine(lambda e, b: None), Engine(lambda e, b: None)
    ResidualStatsHandler(tiny_model(), [_volume(0)], k=1, img_size=32, evaluator=cos_eval).attach(cos_trainer)
    cos_eval.run([0])
    cos_trainer.run([0])
    assert calls == []
