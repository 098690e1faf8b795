"""Masked-image-modelling (SimMIM-style) warm-up for an encoder trained from scratch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .masks import patchify, random_patch_mask
from .vit import ViTEncoder

__all__ = ["MIMHead", "mim_loss"]


class MIMHead(nn.Module):
    """Linear pixel decoder: token (C) -> the patch's pixels (patch_size**2 * in_channels)."""

    def __init__(self, embed_dim: int, patch_size: int, in_channels: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.proj = nn.Linear(embed_dim, patch_size * patch_size * in_channels)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, C) -> (B, N, p*p*C_in) in `patchify` order."""
        return self.proj(tokens)


def mim_loss(
    encoder: ViTEncoder,
    head: MIMHead,
    x: Tensor,
    mask_ratio: float = 0.6,
    generator: torch.Generator | None = None,
    normalize_target: bool = False,
    keep: Tensor | None = None,
) -> Tensor:
    """L1 between predicted and true pixels of randomly masked patches (SimMIM: masked patches only).

    ``keep`` (B, N), 1 = a patch to learn from: patches of known lesions are left out of the loss.
    """
    b = x.shape[0]
    p = encoder.patch_size
    target = patchify(x, p)
    mask = random_patch_mask(b, target.shape[1], mask_ratio, x.device, generator)
    tokens = encoder(x, [len(encoder.blocks) - 1], mask=mask)[0]
    pred = head(encoder.norm(tokens))
    if normalize_target:
        mu = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True, unbiased=False)
        target = (target - mu) / (var + 1e-6).sqrt()
    err = (pred - target).abs().mean(-1)
    m = mask.to(err.dtype)
    if keep is not None:
        m = m * keep.reshape(m.shape).to(err.dtype)
    return (err * m).sum() / m.sum().clamp_min(1.0)
