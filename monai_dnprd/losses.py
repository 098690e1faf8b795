"""DNP-ConFormer losses: soft-mining global cosine, Diversity-Aware Alignment, optional prototype orthogonality."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from .networks.dnp import DNPOutput

__all__ = ["token_keep", "soft_mining_weights", "soft_mining_cosine_loss", "daa_loss", "orthogonality_loss", "DNPLoss"]


def token_keep(exclude: Tensor, patch_size: int) -> Tensor:
    """(B, 1, H, W) exclusion of the input slices (> 0 = known lesion) -> (B, 1, H/p, W/p) float, 1 = a token
    with no excluded pixel, the only tokens that training learns from."""
    return (F.max_pool2d(exclude.float(), patch_size) <= 0).float()


@torch.no_grad()
def soft_mining_weights(target: Tensor, recon: Tensor, gamma: float = 3.0, eps: float = 1e-12,
                        keep: Tensor | None = None) -> Tensor:
    """Detached per-location gradient weights (d / mean(d))^gamma, d = 1 - channel cosine; shape (B, 1, h, w).

    With ``keep`` (B, 1, h, w; 1 = a location to learn from), the mean runs over the kept locations only and
    the others get weight 0.
    """
    d = 1.0 - F.cosine_similarity(target, recon, dim=1).unsqueeze(1)
    d = d.clamp_min(0.0)
    if keep is None:
        return (d / d.mean().clamp_min(eps)) ** gamma
    d = d * keep
    return (d / (d.sum() / keep.sum().clamp_min(1.0)).clamp_min(eps)) ** gamma


def _scale_grad(x: Tensor, weight: Tensor) -> Tensor:
    """Identity in the forward pass; multiplies the gradient reaching x by the (detached) weight."""
    return x.detach() + weight * (x - x.detach())


def soft_mining_cosine_loss(targets: list[Tensor], recons: list[Tensor], gamma: float = 3.0,
                            keep: Tensor | None = None) -> Tensor:
    """Mean over groups/images of 1 - cos(flat target, flat recon); gradients soft-mined toward hard locations.

    ``keep`` (B, 1, h, w) on the maps' token grid (``token_keep``), 1 = learn from this token: excluded tokens
    (known lesions) are zeroed in both maps, so they enter neither the cosine nor its gradient.
    """
    if len(targets) != len(recons) or not targets:
        raise ValueError(f"need the same non-zero number of targets and recons, got {len(targets)} and {len(recons)}")
    total = recons[0].new_zeros(())
    for a, b in zip(targets, recons):
        a = a.detach()
        k = None if keep is None else keep.to(a.dtype)
        b = _scale_grad(b, soft_mining_weights(a, b, gamma, keep=k))
        if k is not None:
            a, b = a * k, b * k
        total = total + (1.0 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)).mean()
    return total / len(targets)


def _cos_dist(tokens: Tensor, prototypes: Tensor) -> Tensor:
    """(B, N, C), (B, M, C) -> (B, N, M) cosine distances 1 - cos."""
    return 1.0 - F.normalize(tokens, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(-2, -1)


def daa_loss(tokens: Tensor, prototypes: Tensor, keep: Tensor | None = None) -> Tensor:
    """Diversity-Aware Alignment: mean over prototypes of the mean distance of their nearest tokens (0 if none).

    ``keep`` (B, N), 1 = a token that may pull prototypes: excluded tokens (known lesions) are nobody's nearest.
    """
    if tokens.dim() == 2:
        tokens, prototypes = tokens.unsqueeze(0), prototypes.unsqueeze(0)
    d = _cos_dist(tokens, prototypes)
    dmin, idx = d.min(-1)  # (B, N)
    onehot = F.one_hot(idx, prototypes.shape[1]).to(dmin.dtype)  # (B, N, M)
    if keep is not None:
        onehot = onehot * keep.reshape(onehot.shape[0], -1, 1).to(dmin.dtype)
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

    def forward(self, out: DNPOutput, keep: Tensor | None = None) -> dict[str, Tensor]:
        """Returns {"loss", "sm", "daa", "ortho"} (ortho is 0 when its weight is 0).

        ``keep`` (B, 1, h, w) leaves the tokens of known lesions (0) out of L_sm and L_DAA.
        """
        sm = soft_mining_cosine_loss(out.targets, out.recons, self.gamma, keep=keep)
        daa = daa_loss(out.tokens, out.prototypes, keep=None if keep is None else keep.flatten(1))
        ortho = orthogonality_loss(out.prototypes) if self.ortho_weight > 0 else sm.new_zeros(())
        loss = sm + self.daa_weight * daa + self.ortho_weight * ortho
        return {"loss": loss, "sm": sm, "daa": daa, "ortho": ortho}
