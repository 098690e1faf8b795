"""DNP-ConFormer losses: soft-mining global cosine, Diversity-Aware Alignment, optional prototype orthogonality."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from .networks.dnp import DNPOutput

__all__ = ["soft_mining_weights", "soft_mining_cosine_loss", "daa_loss", "orthogonality_loss", "DNPLoss"]


@torch.no_grad()
def soft_mining_weights(target: Tensor, recon: Tensor, gamma: float = 3.0, eps: float = 1e-12) -> Tensor:
    """Detached per-location gradient weights (d / mean(d))^gamma, d = 1 - channel cosine; shape (B, 1, h, w)."""
    d = 1.0 - F.cosine_similarity(target, recon, dim=1).unsqueeze(1)
    d = d.clamp_min(0.0)
    return (d / d.mean().clamp_min(eps)) ** gamma


def _scale_grad(x: Tensor, weight: Tensor) -> Tensor:
    """Identity in the forward pass; multiplies the gradient reaching x by the (detached) weight."""
    return x.detach() + weight * (x - x.detach())


def soft_mining_cosine_loss(targets: list[Tensor], recons: list[Tensor], gamma: float = 3.0) -> Tensor:
    """Mean over groups/images of 1 - cos(flat target, flat recon); gradients soft-mined toward hard locations."""
    if len(targets) != len(recons) or not targets:
        raise ValueError(f"need the same non-zero number of targets and recons, got {len(targets)} and {len(recons)}")
    total = recons[0].new_zeros(())
    for a, b in zip(targets, recons):
        a = a.detach()
        b = _scale_grad(b, soft_mining_weights(a, b, gamma))
        total = total + (1.0 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)).mean()
    return total / len(targets)


def _cos_dist(tokens: Tensor, prototypes: Tensor) -> Tensor:
    """(B, N, C), (B, M, C) -> (B, N, M) cosine distances 1 - cos."""
    return 1.0 - F.normalize(tokens, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(-2, -1)


def daa_loss(tokens: Tensor, prototypes: Tensor) -> Tensor:
    """Diversity-Aware Alignment: mean over prototypes of the mean distance of their nearest tokens (0 if none)."""
    if tokens.dim() == 2:
        tokens, prototypes = tokens.unsqueeze(0), prototypes.unsqueeze(0)
    d = _cos_dist(tokens, prototypes)
    dmin, idx = d.min(-1)  # (B, N)
    onehot = F.one_hot(idx, prototypes.shape[1]).to(dmin.dtype)  # (B, N, M)
    sums = (onehot * dmin.unsqueeze(-1)).sum(1)  # (B, M)
    counts = onehot.sum(1)
    per_proto = sums / counts.clamp_min(1.0)
    return per_proto.mean(-1).mean()


def orthogonality_loss(prototypes: Tensor) -> Tensor:
    """Mean over i != j of cos(p_i, p_j)^2 (batched over leading dims); 0 for orthogonal prototypes."""
    p = F.normalize(prototypes, dim=-1)
    m = p.shape[-2]
    if m < 2:
        return p.new_zeros(())
    c2 = (p @ p.transpose(-2, -1)) ** 2
    off = c2.sum((-2, -1)) - c2.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (off / (m * (m - 1))).mean()


class DNPLoss(nn.Module):
    """Total loss L = L_sm + daa_weight * L_DAA (+ ortho_weight * L_ortho when enabled)."""

    def __init__(self, gamma: float = 3.0, daa_weight: float = 0.2, ortho_weight: float = 0.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.daa_weight = daa_weight
        self.ortho_weight = ortho_weight

    def forward(self, out: DNPOutput) -> dict[str, Tensor]:
        """Returns {"loss", "sm", "daa", "ortho"} (ortho is 0 when its weight is 0)."""
        sm = soft_mining_cosine_loss(out.targets, out.recons, self.gamma)
        daa = daa_loss(out.tokens, out.prototypes)
        ortho = orthogonality_loss(out.prototypes) if self.ortho_weight > 0 else sm.new_zeros(())
        loss = sm + self.daa_weight * daa + self.ortho_weight * ortho
        return {"loss": loss, "sm": sm, "daa": daa, "ortho": ortho}
