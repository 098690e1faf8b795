"""Masked-image-modelling (SimMIM-style) warm-up for an encoder trained from scratch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .vit import ViTEncoder

__all__ = ["MIMHead", "random_patch_mask", "patchify", "mim_loss"]


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


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p*p*C) with row-major patches, matching the encoder's token order."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def random_patch_mask(batch: int, num_patches: int, mask_ratio: float, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> Tensor:
    """(B, N) bool mask with exactly round(mask_ratio * N) (at least 1) random patches set per image."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
    k = max(1, round(mask_ratio * num_patches))
    noise = torch.rand(batch, num_patches, generator=generator, device=generator.device if generator else device)
    ranks = noise.argsort(1).argsort(1)
    return (ranks < k).to(device)


def mim_loss(
    encoder: ViTEncoder,
    head: MIMHead,
    x: Tensor,
    mask_ratio: float = 0.6,
    generator: torch.Generator | None = None,
    normalize_target: bool = False,
    keep: Tensor | None = None,
    visible_weight: float = 0.0,
) -> Tensor:
    """L1 between predicted and true pixels of randomly masked patches (SimMIM: masked patches only).

    ``visible_weight`` > 0 also asks the visible patches to be rebuilt, with that weight relative to a masked
    one, so that each token keeps its own patch's content (intensity) besides its context.
    ``keep`` (B, N), 1 = a patch to learn from: patches of known lesions are left out of the loss.
    """
    if visible_weight < 0:
        raise ValueError(f"visible_weight must be >= 0, got {visible_weight}")
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
    if visible_weight > 0:
        m = m + visible_weight * (1.0 - m)
    if keep is not None:
        m = m * keep.reshape(m.shape).to(err.dtype)
    return (err * m).sum() / m.sum().clamp_min(1.0)
