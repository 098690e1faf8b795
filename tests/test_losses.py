"""Tests for the soft-mining cosine loss, Diversity-Aware Alignment, the usage-balance term and DNPLoss."""

from __future__ import annotations

import math

import pytest
import torch

from monai_dnprd.losses import (
    DNPLoss,
    daa_loss,
    prototype_balance_loss,
    soft_mining_cosine_loss,
    soft_mining_weights,
)
from monai_dnprd.networks import DNPOutput


def _analytic_grad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d/db of mean_b (1 - cos(flat a_b, flat b_b)), by hand."""
    af, bf = a.flatten(1), b.flatten(1)
    na, nb = af.norm(dim=1, keepdim=True), bf.norm(dim=1, keepdim=True)
    dot = (af * bf).sum(1, keepdim=True)
    dcos = af / (na * nb) - dot * bf / (na * nb**3)
    return (-dcos / a.shape[0]).reshape(a.shape)


def _channel_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cosine over channels, (B, 1, h, w), by hand."""
    return 1 - (a * b).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True))


def test_soft_mining_zero_for_perfect_reconstruction():
    a = [torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)]
    b = [t.clone().requires_grad_() for t in a]
    loss = soft_mining_cosine_loss(a, b)
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert all(torch.isfinite(t.grad).all() for t in b)
    assert soft_mining_cosine_loss(a, [2.5 * t for t in a]).abs().item() < 1e-6  # scale invariant


@pytest.mark.parametrize("gamma", [0.0, 1.0, 3.0])
def test_soft_mining_gradient_weights(gamma):
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    b = [torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2)]
    loss = soft_mining_cosine_loss(a, b, gamma=gamma)
    loss.backward()
    plain = sum(1 - torch.cosine_similarity(x.flatten(1), y.flatten(1)).mean() for x, y in zip(a, b)) / 2
    torch.testing.assert_close(loss, plain)  # forward value is the unweighted global cosine loss
    for x, y in zip(a, b):
        d = _channel_dist(x, y.detach())
        w = (d / d.mean()) ** gamma
        torch.testing.assert_close(soft_mining_weights(x, y, gamma), w)
        expected = _analytic_grad(x, y.detach()) * w / 2  # / 2 groups
        torch.testing.assert_close(y.grad, expected)


def test_soft_mining_targets_detached():
    a = torch.randn(2, 4, 2, 2, requires_grad=True)
    b = torch.randn(2, 4, 2, 2, requires_grad=True)
    soft_mining_cosine_loss([a], [b]).backward()
    assert a.grad is None and b.grad is not None
    with pytest.raises(ValueError):
        soft_mining_cosine_loss([a], [])


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_daa_zero_when_tokens_on_prototypes():
    p = torch.tensor([[_unit(0), _unit(90), _unit(200)]])
    f = torch.tensor([[_unit(0), _unit(0), _unit(90), _unit(200)]]) * 3.0
    assert daa_loss(f, p).abs().item() < 1e-6


def test_daa_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    f, p = torch.randn(3, 50, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    perm = torch.randperm(6, generator=g)
    torch.testing.assert_close(daa_loss(f, p), daa_loss(f, p[:, perm]))
    torch.testing.assert_close(daa_loss(f, p), daa_loss(f[:, torch.randperm(50, generator=g)], p))


def test_daa_balances_unbalanced_clusters():
    p = torch.tensor([[_unit(0), _unit(90)]])
    f = torch.tensor([[_unit(0)] * 9 + [_unit(60)]])  # 9 tokens exactly on p0, one 30 degrees from p1
    d1 = 1 - math.cos(math.radians(30))
    plain = d1 / 10  # plain mean of nearest distances
    expected = (0.0 + d1) / 2  # per-prototype means, then mean over prototypes
    torch.testing.assert_close(daa_loss(f, p), torch.tensor(expected))
    assert abs(expected - plain) > 0.05


def test_daa_empty_cluster_contributes_zero_and_batch_mean():
    p = torch.tensor([[_unit(0), _unit(90), _unit(225)]])  # third prototype is nobody's nearest
    f = torch.tensor([[_unit(10), _unit(20), _unit(80)]])
    d = [1 - math.cos(math.radians(x)) for x in (10, 20, 10)]
    expected = ((d[0] + d[1]) / 2 + d[2] + 0.0) / 3
    torch.testing.assert_close(daa_loss(f, p), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    f2 = torch.tensor([[_unit(0), _unit(90), _unit(225)]])  # second image: zero loss
    torch.testing.assert_close(daa_loss(torch.cat([f, f2]), p.expand(2, -1, -1)), torch.tensor(expected / 2),
                               rtol=1e-5, atol=1e-6)


def test_daa_gradients_reach_tokens_and_prototypes():
    f = torch.randn(2, 20, 8, requires_grad=True)
    p = torch.randn(2, 4, 8, requires_grad=True)
    daa_loss(f, p).backward()
    assert f.grad.abs().sum() > 0 and p.grad.abs().sum() > 0


def test_balance_zero_for_uniform_use_and_log_m_for_one_prototype():
    p = torch.tensor([[_unit(0), _unit(120), _unit(240)]])
    f = torch.tensor([[_unit(0), _unit(120), _unit(240)] * 4])
    assert prototype_balance_loss(f, p, temperature=0.01).item() < 1e-6
    torch.testing.assert_close(prototype_balance_loss(f[:, :1].expand(1, 12, 2), p, temperature=0.01),
                               torch.tensor(math.log(3)), rtol=1e-4, atol=1e-4)


def test_emptying_a_prototype_is_not_rewarded():
    """The literal L_DAA prefers an empty prototype (it adds 0 to the mean over prototypes); the shipped loss,
    L_DAA with the usage-balance term at the default weights, must not."""
    f = torch.tensor([[_unit(0)] * 95 + [_unit(40)] * 5])  # 95 tokens in one place, 5 a little apart
    used = torch.tensor([[_unit(0), _unit(70)]])  # the second prototype takes the 5 tokens
    emptied = torch.tensor([[_unit(0), _unit(200)]])  # the second prototype is nobody's nearest
    assert daa_loss(f, emptied) < daa_loss(f, used)  # the flaw of the literal formula
    loss = DNPLoss()

    def prototype_terms(p: torch.Tensor) -> float:
        out = DNPOutput(targets=[torch.ones(1, 2, 1, 1)], recons=[torch.ones(1, 2, 1, 1)], prototypes=p, tokens=f,
                        assignments=torch.zeros(1, 100, dtype=torch.long))
        res = loss(out)
        return float(loss.daa_weight * res["daa"] + loss.balance_weight * res["balance"])

    assert prototype_terms(emptied) > prototype_terms(used)


def test_balance_keep_and_gradients():
    f = torch.randn(2, 10, 8, requires_grad=True)
    p = torch.randn(2, 3, 8, requires_grad=True)
    keep = torch.ones(2, 10)
    keep[:, 5:] = 0
    torch.testing.assert_close(prototype_balance_loss(f, p, keep), prototype_balance_loss(f[:, :5], p))
    prototype_balance_loss(f, p).backward()
    assert f.grad.abs().sum() > 0 and p.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        prototype_balance_loss(f, p, temperature=0.0)


def test_dnp_loss_combination():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 8, 3, 3, generator=g) for _ in range(2)]
    r = [torch.randn(2, 8, 3, 3, generator=g) for _ in range(2)]
    out = DNPOutput(
        targets=t,
        recons=r,
        prototypes=torch.randn(2, 6, 8, generator=g),
        tokens=torch.randn(2, 9, 8, generator=g),
        assignments=torch.zeros(2, 9, dtype=torch.long),
    )
    res = DNPLoss()(out)
    assert set(res) == {"loss", "sm", "daa", "balance", "pixel"}
    assert res["pixel"].item() == 0.0  # no pixel predictions in this output
    torch.testing.assert_close(res["loss"], res["sm"] + 0.2 * res["daa"] + 1.0 * res["balance"])
    res2 = DNPLoss(gamma=1.0, daa_weight=0.5, balance_weight=0.0)(out)
    torch.testing.assert_close(res2["loss"], res2["sm"] + 0.5 * res2["daa"])


def test_dnp_loss_hidden_tokens_split_the_terms():
    """With context-only decoding L_sm reads only the hidden tokens, L_DAA and the balance only the visible ones."""
    g = torch.Generator().manual_seed(1)
    t = [torch.randn(1, 8, 2, 2, generator=g)]
    r = [torch.randn(1, 8, 2, 2, generator=g)]
    tokens = torch.randn(1, 4, 8, generator=g)
    protos = torch.randn(1, 3, 8, generator=g)
    hidden = torch.tensor([[True, False, False, True]])
    pixels = torch.zeros(1, 4, 5)
    pixel_targets = torch.tensor([[[1.0] * 5, [7.0] * 5, [7.0] * 5, [3.0] * 5]])  # visible patches do not count
    out = DNPOutput(targets=t, recons=r, prototypes=protos, tokens=tokens,
                    assignments=torch.zeros(1, 4, dtype=torch.long), hidden=hidden, pixels=pixels,
                    pixel_targets=pixel_targets)
    res = DNPLoss()(out)
    torch.testing.assert_close(res["pixel"], torch.tensor(2.0))  # mean |error| of the hidden patches: (1 + 3) / 2
    keep = hidden.float().reshape(1, 1, 2, 2)
    torch.testing.assert_close(res["sm"], soft_mining_cosine_loss(t, r, keep=keep))
    torch.testing.assert_close(res["daa"], daa_loss(tokens[:, 1:3], protos))
    torch.testing.assert_close(res["balance"], prototype_balance_loss(tokens[:, 1:3], protos))
    # a lesion token that is hidden changes L_sm; once also excluded it changes nothing
    r2 = [r[0].clone()]
    r2[0][..., 0, 0] += 5.0
    out2 = DNPOutput(targets=t, recons=r2, prototypes=protos, tokens=tokens,
                     assignments=torch.zeros(1, 4, dtype=torch.long), hidden=hidden)
    assert not torch.isclose(DNPLoss()(out2)["sm"], res["sm"])
    excl = torch.ones(1, 1, 2, 2)
    excl[..., 0, 0] = 0
    torch.testing.assert_close(DNPLoss()(out2, keep=excl)["sm"], DNPLoss()(out, keep=excl)["sm"])
