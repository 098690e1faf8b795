"""DNP-ConFormer: ViT student, EMA teacher, normal-prototype extractor and prototype-attention decoder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ema import ema_update, make_teacher
from .masks import hidden_index, inference_masks, patchify, put_tokens, take_tokens
from .mim import MIMHead
from .vit import VIT_PRESETS, Mlp, ViTEncoder, default_groups, default_taps, init_linear_and_norm, load_dinov2_weights

__all__ = ["DNPOutput", "PrototypeExtractor", "PrototypeAttentionBlock", "DNPConFormer"]

logger = logging.getLogger(__name__)

DNP_LN_EPS = 1e-8  # method.md: LayerNorm eps 1e-8 in the DNP parts


@dataclass
class DNPOutput:
    """Everything the losses, anomaly maps and monitors need from one forward pass."""

    targets: list[Tensor]  # G x (B, C, h, w): teacher group features (detached)
    recons: list[Tensor]  # G x (B, C, h, w): decoder reconstructions (outside training: of hidden tokens, 0 elsewhere)
    prototypes: Tensor  # (B, M, C)
    tokens: Tensor  # (B, N, C): student fused tokens f (mean of taps), input of L_DAA
    assignments: Tensor  # (B, N) long: nearest prototype (cosine) per token
    hidden: Tensor | None = None  # (B, N) bool: tokens the student did not see (context-only decoding)
    pixels: Tensor | None = None  # (B, N, p*p*C_in): the pixel head's prediction of each patch (as recons)
    pixel_targets: Tensor | None = None  # (B, N, p*p*C_in): the input patches themselves

    def float(self) -> DNPOutput:
        """A copy with every floating-point tensor in fp32 (outputs of a bf16 autocast pass, for the map's maths)."""

        def cast(v):
            if isinstance(v, list):
                return [cast(t) for t in v]
            return v.float() if isinstance(v, Tensor) and v.is_floating_point() else v

        return DNPOutput(**{f.name: cast(getattr(self, f.name)) for f in fields(self)})


def _init_dnp(module: nn.Module) -> None:
    """method.md init for the DNP parts: Linear trunc_normal(std=0.01) with zero bias, LayerNorm 1/0."""
    init_linear_and_norm(module, std=0.01)


class PrototypeExtractor(nn.Module):
    """M learnable queries cross-attend (softmax) to LayerNorm(f) to extract per-image normal prototypes."""

    def __init__(self, dim: int, num_prototypes: int = 6, num_heads: int = 6, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.prototypes = nn.Parameter(torch.empty(1, num_prototypes, dim))
        self.norm_kv = nn.LayerNorm(dim, eps=DNP_LN_EPS)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=DNP_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        _init_dnp(self)
        nn.init.normal_(self.prototypes)

    def forward(self, f: Tensor, visible: Tensor | None = None) -> Tensor:
        """(B, N, C) fused tokens -> (B, M, C) prototypes, read from the ``visible`` (B, N) tokens only when given."""
        b, n, c = f.shape
        h = self.num_heads
        p = self.prototypes.expand(b, -1, -1)
        q = self.q(p).reshape(b, -1, h, c // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(f)).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        attn_mask = None if visible is None else visible.bool()[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(b, -1, c)
        p = p + self.proj(a)
        return p + self.mlp(self.norm2(p))


class PrototypeAttentionBlock(nn.Module):
    """Decoder block reading only from prototypes: x = proj(ReLU(s_h cos(q, k)) v), then x + MLP(LN(x)); no softmax."""

    def __init__(self, dim: int, num_heads: int = 6, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm_x = nn.LayerNorm(dim, eps=DNP_LN_EPS)
        self.norm_p = nn.LayerNorm(dim, eps=DNP_LN_EPS)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.scale = nn.Parameter(torch.ones(num_heads, 1, 1))  # learnable per-head s_h, init 1
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=DNP_LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        _init_dnp(self)

    def attention_weights(self, x: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
        """Un-normalised weights ReLU(s_h cos(q, k)) of shape (B, H, N, M) and values (B, H, M, D)."""
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(self.norm_x(x)).reshape(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(self.norm_p(prototypes)).reshape(b, -1, 2, h, c // h).permute(2, 0, 3, 1, 4)
        cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        return F.relu(self.scale * cos), v

    def forward(self, x: Tensor, prototypes: Tensor) -> Tensor:
        """(B, N, C) tokens, (B, M, C) prototypes -> (B, N, C)."""
        b, n, c = x.shape
        w, v = self.attention_weights(x, prototypes)
        x = self.proj((w @ v).transpose(1, 2).reshape(b, n, c))  # no residual around the attention
        return x + self.mlp(self.norm2(x))


class DNPConFormer(nn.Module):
    """Reverse-distillation transformer: decoder rebuilds EMA-teacher features from per-image normal prototypes."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_channels: int = 3,
        vit: str = "small",
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        num_register_tokens: int = 4,
        num_prototypes: int = 6,
        taps: Sequence[int] | None = None,
        groups: Sequence[Sequence[int]] | None = None,
        ema_beta: float = 0.999,
        pretrained: str | None = None,
        mlp_ratio: float = 4.0,
        bottleneck_dropout: float = 0.2,
        mask_block: int = 2,
        hidden_foreground: bool = True,
    ) -> None:
        super().__init__()
        if vit not in VIT_PRESETS:
            raise ValueError(f"unknown vit preset {vit!r}; choose one of {sorted(VIT_PRESETS)}")
        if img_size % patch_size:
            raise ValueError(
                f"img_size {img_size} must be a multiple of patch_size {patch_size} (change --img_size or --patch_size)"
            )
        preset = VIT_PRESETS[vit]
        embed_dim = embed_dim or preset["embed_dim"]
        depth = depth or preset["depth"]
        num_heads = num_heads or preset["num_heads"]
        taps = list(taps) if taps is not None else default_taps(depth)
        groups = [list(g) for g in groups] if groups is not None else default_groups(len(taps))
        if min(taps) < 0 or max(taps) >= depth:
            raise ValueError(f"taps {taps} out of range for depth {depth}")
        if sorted(i for g in groups for i in g) != list(range(len(taps))) or any(not g for g in groups):
            raise ValueError(f"groups {groups} must partition the tap indices 0..{len(taps) - 1}")
        self._config = dict(
            img_size=img_size, patch_size=patch_size, in_channels=in_channels, vit=vit, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, num_register_tokens=num_register_tokens, num_prototypes=num_prototypes,
            taps=list(taps), groups=[list(g) for g in groups], ema_beta=ema_beta, pretrained=pretrained,
            mlp_ratio=mlp_ratio, bottleneck_dropout=bottleneck_dropout, mask_block=mask_block,
            hidden_foreground=hidden_foreground,
        )
        if mask_block < 1:
            raise ValueError(f"mask_block must be >= 1 token (context-only decoding), got {mask_block}")
        grid = (img_size // patch_size, img_size // patch_size)
        if min(grid) < 2 * mask_block:
            raise ValueError(f"a {grid[0]}x{grid[1]} token grid is too small for mask_block {mask_block}: a checkerboard "
                             f"of {mask_block}x{mask_block} blocks needs at least {2 * mask_block} tokens a side")
        self.mask_block = int(mask_block)
        self.pretrained = pretrained
        self.taps = taps
        self.groups = groups
        self.ema_beta = ema_beta
        self.num_prototypes = num_prototypes
        # LayerScale at 1.0 keeps the DINOv2 key layout (ls*.gamma) whether or not weights are loaded, and trains
        # from scratch (the DINOv2 1e-8 init would make every block an identity).
        self.encoder = ViTEncoder(
            img_size, patch_size, in_channels, embed_dim, depth, num_heads, mlp_ratio, num_register_tokens,
            layerscale_init=1.0, hidden_foreground=hidden_foreground,
        )
        if pretrained:
            issues = load_dinov2_weights(self.encoder, pretrained)
            if issues:
                logger.warning("loading %s: %d keys not mapped: %s", pretrained, len(issues), ", ".join(issues))
        self.extractor = PrototypeExtractor(embed_dim, num_prototypes, num_heads, mlp_ratio)
        # noisy bottleneck (dropout, as in the parent methods Dinomaly / INP-Former): the decoder cannot learn an
        # identity shortcut that would also rebuild anomalous features
        self.bottleneck = Mlp(embed_dim, 4 * embed_dim, drop=bottleneck_dropout)
        _init_dnp(self.bottleneck)
        self.decoder = nn.ModuleList(PrototypeAttentionBlock(embed_dim, num_heads, mlp_ratio) for _ in taps)
        # predicts a patch's pixels from the student's last block; trained by the masked-image warm-up and, on the
        # hidden tokens, during the DNP stage: the context-only intensity expectation of every patch
        self.pixel_head = MIMHead(embed_dim, patch_size, in_channels)
        self.teacher: ViTEncoder = make_teacher(self.encoder)  # type: ignore[assignment]

    @property
    def grid_size(self) -> tuple[int, int]:
        """Token grid (h, w)."""
        return self.encoder.grid_size

    def train(self, mode: bool = True) -> DNPConFormer:
        """Set training mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def update_teacher(self) -> None:
        """One EMA step of the teacher toward the student with beta = self.ema_beta."""
        ema_update(self.teacher, self.encoder, self.ema_beta)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split for the optimiser: student encoder vs. decoder side (never the teacher)."""
        decoder = [*self.extractor.parameters(), *self.bottleneck.parameters(), *self.decoder.parameters()]
        return {"encoder": list(self.encoder.parameters()), "decoder": decoder,
                "pixel_head": list(self.pixel_head.parameters())}

    def config(self) -> dict:
        """Constructor kwargs to rebuild the model (`pretrained` is None: the state dict holds the weights)."""
        cfg = dict(self._config, pretrained=None)
        cfg["taps"] = list(cfg["taps"])
        cfg["groups"] = [list(g) for g in cfg["groups"]]
        return cfg

    @staticmethod
    def _grouped(ts: Sequence[Tensor], g: Sequence[int], grid: tuple[int, int], index: Tensor | None = None) -> Tensor:
        """Mean of the (B, N, C) maps ``ts[i]`` for i in ``g``, as a (B, C, h, w) grid; with ``index`` the maps hold
        only those (B, K) tokens, and the mean is put back at them (0 elsewhere)."""
        m = torch.stack([ts[i] for i in g]).mean(0)
        if index is not None:
            m = put_tokens(m, index, grid[0] * grid[1])
        return m.transpose(1, 2).reshape(m.shape[0], m.shape[2], *grid)

    def reconstruct(self, f: Tensor, prototypes: Tensor, grid: tuple[int, int],
                    index: Tensor | None = None) -> list[Tensor]:
        """Decoder side: fused tokens (B, N, C) through the bottleneck and the prototype-attention blocks ->
        one (B, C, h, w) reconstruction per feature group (decoder outputs in reverse order, as the taps).

        With ``index`` (B, K) (``masks.hidden_index``: the hidden tokens) only those tokens are decoded, the
        only ones a map reads, and the other locations read 0. The decoder treats tokens one by one (they attend
        to the prototypes, never to each other), so no value changes and the decoder's work halves.
        """
        z = self.bottleneck(f if index is None else take_tokens(f, index))
        outs = []
        for blk in self.decoder:
            z = blk(z, prototypes)
            outs.append(z)
        return [self._grouped(outs[::-1], g, grid, index) for g in self.groups]

    def forward(self, x: Tensor, mask: Tensor | None = None) -> DNPOutput:
        """Student taps -> fused f -> prototypes and decoder reconstructions; teacher taps -> targets.

        Context-only decoding: the student never sees the tokens it rebuilds. ``mask``
        (B, N) bool hides tokens from the student (their patches are replaced by the mask token); prototypes
        come from the visible tokens only. Without ``mask`` the two complementary checkerboards of
        ``inference_masks`` run as two student passes and every token's reconstruction is taken from the pass
        that hid it, so an anomaly is rebuilt from the normal tissue around it, never from itself. With
        ``hidden_foreground`` a hidden token carries its patch's foreground shape (``vit.foreground_patches``),
        so the student knows where the brain's edge runs through it, but none of its intensities.
        """
        hh, ww = x.shape[-2:]
        p = self.encoder.patch_size
        if hh % p or ww % p:
            raise ValueError(f"input size {(hh, ww)} is not a multiple of patch_size {p}")
        grid = (hh // p, ww // p)
        with torch.no_grad():
            tfeats = self.teacher(x, self.taps)
        targets = [self._grouped(tfeats, g, grid).detach() for g in self.groups]
        b = x.shape[0]
        if mask is None:
            masks = inference_masks(grid, self.mask_block, x.device)  # (P, N), each token hidden once
            npass = masks.shape[0]
            hidden = masks.repeat_interleave(b, 0)  # pass-major (P*B, N)
            out = self._student(x.repeat(npass, 1, 1, 1), hidden, grid)
            sel = [hidden[i * b : (i + 1) * b] for i in range(npass)]
            recons = [sum(r[i * b : (i + 1) * b] * s.reshape(b, 1, *grid) for i, s in enumerate(sel))
                      for r in out.recons]
            pick = torch.stack(sel)  # (P, B, N): the pass whose prototypes describe each visible token
            vis = ~pick
            tokens = sum(out.tokens[i * b : (i + 1) * b] * vis[i, ..., None] for i in range(npass)) / vis.sum(0)[..., None]
            assignments = sum(out.assignments[i * b : (i + 1) * b] * vis[i] for i in range(npass)) // vis.sum(0).clamp_min(1)
            pixels = sum(out.pixels[i * b : (i + 1) * b] * s[..., None] for i, s in enumerate(sel))
            return DNPOutput(targets=targets, recons=recons, prototypes=out.prototypes[:b], tokens=tokens,
                             assignments=assignments, hidden=None, pixels=pixels, pixel_targets=out.pixel_targets[:b])
        out = self._student(x, mask, grid)
        out.targets = targets
        return out

    def _student(self, x: Tensor, mask: Tensor | None, grid: tuple[int, int]) -> DNPOutput:
        """One student pass (``mask`` hides tokens) -> reconstructions, prototypes, tokens; no targets yet."""
        last = len(self.encoder.blocks) - 1
        feats = self.encoder(x, [*self.taps, last], mask=mask)
        f = torch.stack(feats[:-1]).mean(0)
        prototypes = self.extractor(f, None if mask is None else ~mask)
        # outside training only the hidden tokens are decoded (the map reads no other); training decodes them all,
        # so that its dropout draws and its gradients' sums, and with them the trained weights, stay as they were
        index = None if mask is None or self.training else hidden_index(mask)
        recons = self.reconstruct(f, prototypes, grid, index)
        if index is None:
            pixels = self.pixel_head(self.encoder.norm(feats[-1]))
        else:
            pixels = put_tokens(self.pixel_head(self.encoder.norm(take_tokens(feats[-1], index))), index, f.shape[1])
        with torch.no_grad():
            assignments = (F.normalize(f, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)).argmax(-1)
        return DNPOutput(targets=[], recons=recons, prototypes=prototypes, tokens=f, assignments=assignments,
                         hidden=mask, pixels=pixels, pixel_targets=patchify(x, self.encoder.patch_size))
