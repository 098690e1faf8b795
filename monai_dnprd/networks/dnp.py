"""DNP-ConFormer: ViT student, EMA teacher, normal-prototype extractor and prototype-attention decoder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ema import ema_update, make_teacher
from .vit import VIT_PRESETS, Mlp, ViTEncoder, default_groups, default_taps, init_linear_and_norm, load_dinov2_weights

__all__ = ["DNPOutput", "PrototypeExtractor", "PrototypeAttentionBlock", "DNPConFormer"]

logger = logging.getLogger(__name__)

MAP_METRICS = ("cosine", "residual_z", "cosine_residual_z")  # anomaly-map distances, see monai_dnprd.anomaly_map.slice_anomaly_map
DNP_LN_EPS = 1e-8  # method.md: LayerNorm eps 1e-8 in the DNP parts


@dataclass
class DNPOutput:
    """Everything the losses, anomaly maps and monitors need from one forward pass."""

    targets: list[Tensor]  # G x (B, C, h, w): teacher group features (detached)
    recons: list[Tensor]  # G x (B, C, h, w): decoder reconstructions
    prototypes: Tensor  # (B, M, C)
    tokens: Tensor  # (B, N, C): student fused tokens f (mean of taps), input of L_DAA
    assignments: Tensor  # (B, N) long: nearest prototype (cosine) per token


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

    def forward(self, f: Tensor) -> Tensor:
        """(B, N, C) fused tokens -> (B, M, C) prototypes."""
        b, n, c = f.shape
        h = self.num_heads
        p = self.prototypes.expand(b, -1, -1)
        q = self.q(p).reshape(b, -1, h, c // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(f)).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
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
        map_metric: str = "cosine",
    ) -> None:
        super().__init__()
        if map_metric not in MAP_METRICS:
            raise ValueError(f"unknown map_metric {map_metric!r}; choose one of {list(MAP_METRICS)}")
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
            mlp_ratio=mlp_ratio, bottleneck_dropout=bottleneck_dropout, map_metric=map_metric,
        )
        self.map_metric = map_metric
        self.pretrained = pretrained
        self.taps = taps
        self.groups = groups
        self.ema_beta = ema_beta
        self.num_prototypes = num_prototypes
        # LayerScale at 1.0 keeps the DINOv2 key layout (ls*.gamma) whether or not weights are loaded, and trains
        # from scratch (the DINOv2 1e-8 init would make every block an identity).
        self.encoder = ViTEncoder(
            img_size, patch_size, in_channels, embed_dim, depth, num_heads, mlp_ratio, num_register_tokens,
            layerscale_init=1.0,
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
        self.teacher: ViTEncoder = make_teacher(self.encoder)  # type: ignore[assignment]
        if map_metric != "cosine":
            # per group and channel: mean and std of the residual teacher - reconstruction on normal training
            # slices, fitted after training (``fit_residual_stats``) and saved with the weights
            stats = torch.stack([torch.zeros(len(groups), embed_dim), torch.ones(len(groups), embed_dim)])
            self.register_buffer("residual_moments", stats)
            self.register_buffer("residual_tokens", torch.zeros((), dtype=torch.long))

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
        return {"encoder": list(self.encoder.parameters()), "decoder": decoder}

    def config(self) -> dict:
        """Constructor kwargs to rebuild the model (`pretrained` is None: the state dict holds the weights)."""
        cfg = dict(self._config, pretrained=None)
        cfg["taps"] = list(cfg["taps"])
        cfg["groups"] = [list(g) for g in cfg["groups"]]
        return cfg

    def residual_stats(self) -> list[tuple[Tensor, Tensor]] | None:
        """(mean, std) of the normal residual per feature group for the residual maps; None for ``cosine``."""
        if self.map_metric == "cosine":
            return None
        return [(self.residual_moments[0, g], self.residual_moments[1, g]) for g in range(len(self.groups))]

    @torch.no_grad()
    def set_residual_stats(self, stats: Sequence[tuple[Tensor, Tensor]], n_tokens: int) -> None:
        """Store fitted residual statistics (one (mean, std) pair per group) in the model's buffers."""
        if self.map_metric == "cosine":
            raise ValueError("residual statistics are only used by the residual maps, not map_metric='cosine'")
        if len(stats) != len(self.groups):
            raise ValueError(f"{len(stats)} residual statistics for {len(self.groups)} feature groups")
        for g, (mean, std) in enumerate(stats):
            self.residual_moments[0, g].copy_(mean)
            self.residual_moments[1, g].copy_(std)
        self.residual_tokens.fill_(int(n_tokens))

    @staticmethod
    def _grouped(ts: Sequence[Tensor], g: Sequence[int], grid: tuple[int, int]) -> Tensor:
        """Mean of the (B, N, C) maps ``ts[i]`` for i in ``g``, as a (B, C, h, w) grid."""
        m = torch.stack([ts[i] for i in g]).mean(0)
        return m.transpose(1, 2).reshape(m.shape[0], m.shape[2], *grid)

    def reconstruct(self, f: Tensor, prototypes: Tensor, grid: tuple[int, int]) -> list[Tensor]:
        """Decoder side: fused tokens (B, N, C) through the bottleneck and the prototype-attention blocks ->
        one (B, C, h, w) reconstruction per feature group (decoder outputs in reverse order, as the taps)."""
        z = self.bottleneck(f)
        outs = []
        for blk in self.decoder:
            z = blk(z, prototypes)
            outs.append(z)
        outs = outs[::-1]
        return [self._grouped(outs, g, grid) for g in self.groups]

    def forward(self, x: Tensor, teacher_x: Tensor | None = None) -> DNPOutput:
        """Student taps -> fused f -> prototypes and decoder reconstructions; teacher taps -> targets.

        ``teacher_x``: the teacher's input when it differs from the student's (the clean images of a denoising
        DNP stage, where ``x`` carries pseudo-anomalies); ``x`` itself by default.
        """
        hh, ww = x.shape[-2:]
        p = self.encoder.patch_size
        if hh % p or ww % p:
            raise ValueError(f"input size {(hh, ww)} is not a multiple of patch_size {p}")
        grid = (hh // p, ww // p)
        feats = self.encoder(x, self.taps)
        f = torch.stack(feats).mean(0)
        prototypes = self.extractor(f)
        recons = self.reconstruct(f, prototypes, grid)
        with torch.no_grad():
            tfeats = self.teacher(x if teacher_x is None else teacher_x, self.taps)
            assignments = (F.normalize(f, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)).argmax(-1)
        targets = [self._grouped(tfeats, g, grid).detach() for g in self.groups]
        return DNPOutput(targets=targets, recons=recons, prototypes=prototypes, tokens=f, assignments=assignments)
