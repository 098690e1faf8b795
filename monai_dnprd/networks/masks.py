"""Token masks and layout: random patch masks for the masked-image warm-up, block checkerboards for context-only
decoding, the gathering of a mask's hidden tokens, and images to patches (``patchify``) and back."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_patch_mask", "checkerboard_mask", "random_checkerboard_mask", "inference_masks", "hidden_index",
           "take_tokens", "put_tokens", "patchify", "unpatchify"]


def random_patch_mask(batch: int, num_patches: int, mask_ratio: float, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> Tensor:
    """(B, N) bool mask with exactly round(mask_ratio * N) (at least 1) random patches set per image."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
    k = max(1, round(mask_ratio * num_patches))
    noise = torch.rand(batch, num_patches, generator=generator, device=generator.device if generator else device)
    ranks = noise.argsort(1).argsort(1)
    return (ranks < k).to(device)


def checkerboard_mask(grid: tuple[int, int], block: int, offset: tuple[int, int] = (0, 0), parity: int = 0,
                      device: torch.device | str = "cpu") -> Tensor:
    """(N,) bool: token (i, j) of an h x w grid is set when ((i + oy) // b + (j + ox) // b) % 2 == parity.

    Blocks of b x b tokens alternate like the squares of a chessboard, so every hidden block has visible
    neighbours on all sides and the two parities together cover the grid exactly once.
    """
    if block < 1:
        raise ValueError(f"mask block must be >= 1 token, got {block}")
    i = torch.arange(grid[0], device=device)[:, None] + int(offset[0])
    j = torch.arange(grid[1], device=device)[None, :] + int(offset[1])
    return (((i // block) + (j // block)) % 2 == int(parity)).reshape(-1)


def random_checkerboard_mask(batch: int, grid: tuple[int, int], block: int, device: torch.device | str = "cpu",
                             generator: torch.Generator | None = None) -> Tensor:
    """(B, N) bool: a ``checkerboard_mask`` per image with a random offset in [0, b)^2 and a random parity."""
    draws = torch.randint(0, 2 * block * block, (batch,), generator=generator).tolist()
    rows = [checkerboard_mask(grid, block, (d // (2 * block), (d // 2) % block), d % 2, device) for d in draws]
    return torch.stack(rows)


def inference_masks(grid: tuple[int, int], block: int, device: torch.device | str = "cpu") -> Tensor:
    """(2, N) bool: the two parities of the unshifted checkerboard; each token is hidden in exactly one."""
    return torch.stack([checkerboard_mask(grid, block, (0, 0), p, device) for p in (0, 1)])


def hidden_index(mask: Tensor) -> Tensor:
    """(B, N) bool -> (B, K) long: each row's hidden token indices in ascending order, K the largest row count;
    a row with fewer hidden tokens is filled up with visible ones (at inference every row of a pass has the same
    checkerboard, so nothing is filled)."""
    k = int(mask.sum(1).max())
    return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :k]


def take_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """(B, N, C) tokens at (B, K) ``index`` -> (B, K, C)."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def put_tokens(tokens: Tensor, index: Tensor, n: int) -> Tensor:
    """(B, K, C) tokens put back at (B, K) ``index`` of an (B, n, C) zero tensor: the inverse of ``take_tokens``."""
    full = tokens.new_zeros(tokens.shape[0], n, tokens.shape[-1])
    return full.scatter(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), tokens)


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p*p*C) with row-major patches, matching the encoder's token order."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int]) -> Tensor:
    """(B, N, p*p*C) in ``patchify`` order -> (B, C, h*p, w*p) images; the inverse of ``patchify``."""
    b, n, d = patches.shape
    p = patch_size
    c = d // (p * p)
    x = patches.reshape(b, grid[0], grid[1], p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, grid[0] * p, grid[1] * p)
