"""ViT encoder with the DINOv2 layout and parameter names, plus DINOv2 weight loading (local file or official name)."""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import patchify

__all__ = ["VIT_PRESETS", "ViTEncoder", "default_taps", "default_groups", "load_dinov2_weights", "resolve_pretrained"]

VIT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


def default_taps(depth: int) -> list[int]:
    """Blocks whose outputs are tapped: the paper's 2..9 of 12 (drop ~1/6 of blocks at each end), scaled to depth."""
    if depth < 2:
        raise ValueError(f"ViT depth must be >= 2 to tap at least 2 blocks, got {depth}")
    k = depth // 6
    return list(range(k, depth - k))


def default_groups(num_taps: int) -> list[list[int]]:
    """Two groups of tap indices (first half, second half), as the paper's [[0..3], [4..7]]."""
    if num_taps < 2:
        raise ValueError(f"need at least 2 taps to form 2 groups, got {num_taps}")
    h = num_taps // 2
    return [list(range(h)), list(range(h, num_taps))]


def foreground_patches(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p*p): which pixels of each patch are nonzero in the middle channel (the centre
    slice of a one-sequence 2.5D stack; with several sequences a slice next to it, whose foreground is nearly the
    same). ``NormalizeForeground`` leaves exactly 0 outside the foreground, so this is the patch's brain /
    background split (and the few darkest tissue voxels, clipped to 0; for CT, air below the window), never its
    intensities."""
    mid = x.shape[1] // 2
    return patchify(x[:, mid : mid + 1] != 0, patch_size)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (B, C_in, H, W) -> (B, N, C)."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention using the fused scaled_dot_product_attention kernel."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def init_linear_and_norm(module: nn.Module, std: float) -> None:
    """Linear weights trunc_normal(std) with zero bias, LayerNorm weight 1 / bias 0, for every submodule."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Mlp(nn.Module):
    """Two-layer GELU MLP (names fc1/fc2 as in DINOv2), with optional dropout after each layer."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel residual-branch scale (DINOv2 `ls1`/`ls2`, parameter `gamma`)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, layerscale_init: float | None
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViTEncoder(nn.Module):
    """DINOv2-layout ViT returning the patch tokens of selected blocks (the multi-level features)."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 14,
        in_channels: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        layerscale_init: float | None = None,
        qkv_bias: bool = True,
        hidden_foreground: bool = False,
    ) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        if any(s % patch_size for s in size):
            raise ValueError(f"img_size {size} must be a multiple of patch_size {patch_size}")
        self.img_size = size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.depth = depth
        self.grid_size: tuple[int, int] = (size[0] // patch_size, size[1] // patch_size)
        self.num_register_tokens = num_register_tokens
        self.num_prefix_tokens: int = 1 + num_register_tokens
        n = self.grid_size[0] * self.grid_size[1]

        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        # hidden tokens also carry their patch's foreground shape (``foreground_patches``), zero at init
        self.foreground_embed = (
            nn.Parameter(torch.zeros(patch_size * patch_size, embed_dim)) if hidden_foreground else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, layerscale_init) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """From-scratch init that trains: trunc_normal(0.02) Linear/pos_embed, zero biases, LayerNorm 1/0."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        init_linear_and_norm(self, std=0.02)

    def _pos_embed(self, gh: int, gw: int) -> Tensor:
        """Positional embedding for a gh x gw grid (bicubic interpolation when it differs from the native grid)."""
        if (gh, gw) == self.grid_size:
            return self.pos_embed
        return torch.cat([self.pos_embed[:, :1], _resize_grid(self.pos_embed[:, 1:], self.grid_size, (gh, gw))], 1)

    def forward(self, x: Tensor, taps: Sequence[int], mask: Tensor | None = None) -> list[Tensor]:
        """Patch tokens (B, N, C) after each block in `taps` (in the given order); runs blocks up to max(taps)."""
        taps = [int(t) for t in taps]
        if not taps or min(taps) < 0 or max(taps) >= len(self.blocks):
            raise ValueError(f"taps {taps} out of range for depth {len(self.blocks)}")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {(h, w)} is not a multiple of patch_size {self.patch_size}")
        b = x.shape[0]
        t = self.patch_embed(x)
        if mask is not None:
            hidden = self.mask_token.to(t.dtype).unsqueeze(0)
            if self.foreground_embed is not None:
                hidden = hidden + foreground_patches(x, self.patch_size).to(t.dtype) @ self.foreground_embed.to(t.dtype)
            t = torch.where(mask.unsqueeze(-1), hidden, t)
        pos = self._pos_embed(h // self.patch_size, w // self.patch_size)
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], 1) + pos
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(b, -1, -1), t[:, 1:]], 1)
        wanted = set(taps)
        feats: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks[: max(taps) + 1]):
            t = blk(t)
            if i in wanted:
                feats[i] = t[:, self.num_prefix_tokens :]
        return [feats[i] for i in taps]


def _resize_grid(tokens: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """Bicubic resize of (1, src_h*src_w, C) grid tokens to (1, dst_h*dst_w, C)."""
    c = tokens.shape[-1]
    g = tokens.reshape(1, src[0], src[1], c).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=dst, mode="bicubic", align_corners=False)
    return g.permute(0, 2, 3, 1).reshape(1, dst[0] * dst[1], c).to(tokens.dtype)


_WRAPPERS = ("teacher", "model", "state_dict", "student")
_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a tensor-only checkpoint (.safetensors, or .pth/.pt with weights_only=True) and unwrap it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: object = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{path}: refused to load: the file holds pickled Python objects, only plain tensor checkpoints "
                "are accepted (torch.load weights_only=True); re-save it as a state dict or .safetensors"
            ) from err
    while isinstance(sd, dict) and not any(isinstance(v, Tensor) for v in sd.values()):
        key = next((k for k in _WRAPPERS if isinstance(sd.get(k), dict)), None)
        if key is None:
            break
        sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}")
    if any(k.startswith("teacher.") for k in sd):  # DINOv2 training checkpoint: keep the teacher
        sd = {k[len("teacher.") :]: v for k, v in sd.items() if k.startswith("teacher.")}
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)] = v  # FSDP block chunks (ViT-g) -> flat blocks
    return out


def resolve_pretrained(encoder: ViTEncoder, name_or_path: str | Path) -> Path:
    """Checkpoint file for a local path (wins when the file exists) or an official DINOv2 name (cache/download)."""
    from .pretrained import DINOV2_CHECKPOINTS, check_encoder_fits, fetch_dinov2

    path = Path(name_or_path)
    key = str(name_or_path)
    if path.is_file() or key not in DINOV2_CHECKPOINTS:
        if not path.exists() and not isinstance(name_or_path, Path) and path.suffix == "" and len(path.parts) == 1:
            raise FileNotFoundError(
                f"pretrained {key!r}: no such file and not a known DINOv2 name; give a checkpoint path or one of "
                f"{', '.join(DINOV2_CHECKPOINTS)}"
            )
        return path
    check_encoder_fits(encoder, key)  # before any download
    return fetch_dinov2(key)


def load_dinov2_weights(encoder: ViTEncoder, path: str | Path) -> list[str]:
    """Load a DINOv2 ViT checkpoint (local file, or official name such as "dinov2_vits14") into `encoder`.

    Returns "missing: key" / "unused: key" strings for keys that could not be mapped.
    """
    path = resolve_pretrained(encoder, path)
    sd = _read_state_dict(path)
    own = encoder.state_dict()
    new: dict[str, Tensor] = {}
    used: set[str] = set()

    for k, v in sd.items():
        if k.endswith((".ls1.gamma", ".ls2.gamma")) and k not in own:
            # encoder without LayerScale: fold gamma into the branch's output projection
            blk = k.split(".")[1]
            tgt = f"blocks.{blk}.attn.proj" if ".ls1." in k else f"blocks.{blk}.mlp.fc2"
            if f"{tgt}.weight" in sd and f"{tgt}.weight" in own:
                new[f"{tgt}.weight"] = sd[f"{tgt}.weight"] * v[:, None]
                new[f"{tgt}.bias"] = sd[f"{tgt}.bias"] * v
                used.update({k, f"{tgt}.weight", f"{tgt}.bias"})
    for k, v in sd.items():
        if k not in own or k in used:
            continue
        if k == "pos_embed":
            n_src = v.shape[1] - 1
            g = math.isqrt(n_src)
            if g * g != n_src or v.shape[-1] != own[k].shape[-1]:
                raise ValueError(f"{path}: pos_embed shape {tuple(v.shape)} cannot be mapped to {tuple(own[k].shape)}")
            v = torch.cat([v[:, :1], _resize_grid(v[:, 1:], (g, g), encoder.grid_size)], 1)
        elif k == "patch_embed.proj.weight" and v.shape[1] != encoder.in_channels and v.shape[0] == own[k].shape[0]:
            v = v.mean(1, keepdim=True).repeat(1, encoder.in_channels, 1, 1) * (v.shape[1] / encoder.in_channels)
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"{path}: {k}: checkpoint shape {tuple(v.shape)} does not match encoder {tuple(own[k].shape)}"
            )
        new[k] = v.to(own[k].dtype)
        used.add(k)
    encoder.load_state_dict(new, strict=False)
    missing = [f"missing: {k}" for k in own if k not in new]
    unused = [f"unused: {k}" for k in sd if k not in used]
    return missing + unused
