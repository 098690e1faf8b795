"""DNP-ConFormer losses: soft-mining global cosine, Diversity-Aware Alignment and its usage-balance term."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from .networks.dnp import DNPOutput

__all__ = ["token_keep", "soft_mining_weights", "soft_mining_cosine_loss", "daa_loss", "prototype_balance_loss", "DNPLoss"]


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


def prototype_balance_loss(tokens: Tensor, prototypes: Tensor, keep: Tensor | None = None,
                           temperature: float = 0.05) -> Tensor:
    """KL divergence of each image's mean soft prototype assignment from uniform use, averaged over images.

    A token's soft assignment is softmax(-(1 - cos(f_n, p_k)) / temperature) over the M prototypes; the term is
    0 when every prototype takes 1/M of the tokens and log M when one takes them all. It supplies what the
    literal L_DAA lacks: an empty prototype adds 0 to L_DAA's mean, so emptying prototypes lowers L_DAA, while
    it raises this term. ``keep`` (B, N), 1 = a token that counts.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tokens.dim() == 2:
        tokens, prototypes = tokens.unsqueeze(0), prototypes.unsqueeze(0)
    a = torch.softmax(-_cos_dist(tokens, prototypes) / temperature, dim=-1)  # (B, N, M)
    if keep is None:
        usage = a.mean(1)
    else:
        w = keep.reshape(a.shape[0], -1, 1).to(a.dtype)
        usage = (a * w).sum(1) / w.sum(1).clamp_min(1.0)
    m = prototypes.shape[1]
    usage = usage.clamp_min(1e-12)
    return (usage * (usage * m).log()).sum(-1).mean()


class DNPLoss(nn.Module):
    """Total loss L = L_sm + daa_weight * L_DAA + balance_weight * L_balance + pixel_weight * L_pixel.

    With context-only decoding (``out.hidden`` set) L_sm and L_pixel score the hidden tokens, the ones rebuilt
    from context, and L_DAA / L_balance the visible tokens, the ones the prototypes were read from. L_pixel is
    the mean absolute error of the pixel head's prediction of each hidden patch (the warm-up's loss, kept on).
    """

    def __init__(self, gamma: float = 3.0, daa_weight: float = 0.2, balance_weight: float = 1.0,
                 balance_temperature: float = 0.05, pixel_weight: float = 1.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.daa_weight = daa_weight
        self.pixel_weight = pixel_weight
        self.balance_weight = balance_weight
        self.balance_temperature = balance_temperature

    def forward(self, out: DNPOutput, keep: Tensor | None = None) -> dict[str, Tensor]:
        """Returns {"loss", "sm", "daa", "balance", "pixel"} (a term whose weight is 0, or that has no input, reads 0).

        ``keep`` (B, 1, h, w) leaves the tokens of known lesions (0) out of every term.
        """
        sm_keep, proto_keep = keep, None if keep is None else keep.flatten(1)
        if out.hidden is not None:
            hidden = out.hidden.to(out.recons[0].dtype)
            sm_keep = hidden.reshape(keep.shape if keep is not None else (hidden.shape[0], 1, *out.recons[0].shape[-2:]))
            proto_keep = 1.0 - hidden
            if keep is not None:
                sm_keep = sm_keep * keep
                proto_keep = proto_keep * keep.flatten(1)
        sm = soft_mining_cosine_loss(out.targets, out.recons, self.gamma, keep=sm_keep)
        daa = daa_loss(out.tokens, out.prototypes, keep=proto_keep)
        balance = (prototype_balance_loss(out.tokens, out.prototypes, proto_keep, self.balance_temperature)
                   if self.balance_weight > 0 else sm.new_zeros(()))
        pixel = sm.new_zeros(())
        if self.pixel_weight > 0 and out.pixels is not None and out.hidden is not None:
            err = (out.pixels - out.pixel_targets.detach()).abs().mean(-1)  # (B, N)
            w = sm_keep.flatten(1).to(err.dtype)
            pixel = (err * w).sum() / w.sum().clamp_min(1.0)
        loss = sm + self.daa_weight * daa + self.balance_weight * balance + self.pixel_weight * pixel
        return {"loss": loss, "sm": sm, "daa": daa, "balance": balance, "pixel": pixel}
