"""Which decoder stage or map distance keeps what the features know? Variants on one model's frozen features.

``bench/teacher_knn_probe.py`` showed that on the demo most of the detection is lost in the decoder stage, and
that the trained decoder acts as a linear reconstruction of the teacher features. This probe caches the
student's fused tokens and the teacher's target groups of one trained model over the normal training slices
and then scores the test set, through the bundle's evaluation workflow, with one of these variants in place of
the model's own decoder or map:

- decoder side retrained on the cache (the method's loss and schedule; the encoder moves very little in the
  DNP stage, learning rate 1e-5, so freezing it is a close stand-in for a full run): ``paper`` (the method's
  decoder), ``softmax`` (softmax over the prototypes: a reconstruction is a convex mix of prototype values),
  ``std`` (features z-scored per channel against the cache, in the loss and the map), ``fgproto``
  (prototypes and L_DAA from tissue tokens only, not background), ``globalproto`` (one learned prototype set
  for all images);
- the model's own decoder with other prototypes: ``model_fgproto`` (tissue tokens only), ``model_meanproto``
  (the mean prototypes of the training slices for every image; ``model_geo_meanproto`` the same with the
  default ``cosine_residual_z`` map);
- the model's own decoder with another token distance: ``model`` (the cosine, a check of this script's
  scoring path: it reproduces the model's own figures), ``model_resz`` (``residual_z``), ``model_geo``
  (``cosine_residual_z``), ``model_uz`` (the z-scored residual of the unit vectors t/|t| - r/|r|); their
  residual statistics come from the cache (``--shrink`` pulls each channel's variance toward the mean one);
  ``model_geo_cluster`` (``cosine_residual_z`` with residual statistics conditional on the kind of token: the
  normal teacher tokens are split into ``--clusters`` groups by k-means on their directions, each token is
  z-scored with the mean/std of its nearest group, so that tissue the decoder always rebuilds poorly, e.g. the
  structure-rich mid-brain slices, is measured against its own normal error).

    python bench/decoder_probe.py --ckpt runs/demo/models/model.pt --variants paper softmax
    python bench/decoder_probe.py --ckpt RUN/train/models/model.pt --bank RUN/normal \\
        --input_dir RUN/test --label_dir RUN/labels --variants model model_geo   # a bench/tcga_protocol.py run

Writes OUT/<variant>/ (evaluation folders) and OUT/decoder_probe.json. The ``model*`` variants use the map
their name says (the training's own residual statistics are not used: they are fitted here on the cache); the
retrained variants use this script's ``--map_metric`` (default ``cosine``), with residual statistics fitted
on the cache after their training. ``--override`` changes constructor arguments of the retrained decoder side.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_knn_probe import _workflow, probe_inputs, summary  # noqa: E402


class DecoderSide(nn.Module):
    """Prototype extractor + bottleneck + decoder blocks of a DNP-ConFormer, run on cached fused tokens."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net  # its decoder side is what trains; the cached encoder features get no gradient
        self.extractor = net.extractor
        self.decoder = net.decoder
        self.fixed: Tensor | None = None  # ``meanproto`` / ``globalproto``: the same prototypes for all images
        self.metric = "cosine"  # token distance of the map (monai_dnprd.anomaly_map.token_distance)
        self.unit = False  # ``model_uz``: residual_z of the unit vectors t/|t| - r/|r|
        self.res_stats: list[tuple[Tensor, Tensor]] | None = None  # residual mean/std per group, fitted on the cache
        self.masked = False  # prototypes from tissue tokens only (``fgproto`` variants)
        self.stats: tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]] | None = None  # set for the ``std`` variant
        self.clusters: ClusterResiduals | None = None  # ``model_geo_cluster``: cluster-conditional residual statistics

    def standardise(self, f: Tensor, targets: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Per-channel z-scores against the normal cache (identity unless ``stats`` is set)."""
        if self.stats is None:
            return f, targets
        mf, sf, mt = self.stats
        return (f - mf) / sf, [(t - m[:, None, None]) / s[:, None, None] for t, (m, s) in zip(targets, mt)]

    def forward(self, f: Tensor, grid: tuple[int, int], valid: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        if self.fixed is not None:  # one prototype set for every image
            prototypes = self.fixed.expand(f.shape[0], -1, -1)
        else:
            prototypes = self.extractor(f) if valid is None else masked_extractor(self.extractor, f, valid)
        recons = self.net.reconstruct(f, prototypes, grid)
        return recons, prototypes


def masked_extractor(ex: nn.Module, f: Tensor, valid: Tensor) -> Tensor:
    """PrototypeExtractor.forward whose queries attend only to the ``valid`` (B, N) tokens (tissue, not background)."""
    b, n, c = f.shape
    h = ex.num_heads
    p = ex.prototypes.expand(b, -1, -1)
    q = ex.q(p).reshape(b, -1, h, c // h).transpose(1, 2)
    k, v = ex.kv(ex.norm_kv(f)).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :]).transpose(1, 2).reshape(b, -1, c)
    p = p + ex.proj(a)
    return p + ex.mlp(ex.norm2(p))


def token_valid(x: Tensor, patch: int, min_fraction: float = 0.5) -> Tensor:
    """(B, N) tokens whose patch is at least ``min_fraction`` foreground (centre slice > 0; the normalised
    background is exactly 0); slices without such a token fall back to any foreground."""
    centre = (x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1] > 0).float()
    frac = F.avg_pool2d(centre, patch).flatten(1)
    valid = frac >= min_fraction
    return torch.where(valid.any(1, keepdim=True), valid, frac > 0) | (frac.amax(1, keepdim=True) == 0)


def masked_daa(tokens: Tensor, prototypes: Tensor, valid: Tensor) -> Tensor:
    """L_DAA over the valid tokens only."""
    d = 1.0 - F.normalize(tokens, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(-2, -1)
    dmin, idx = d.min(-1)
    onehot = F.one_hot(idx, prototypes.shape[1]).to(dmin.dtype) * valid.unsqueeze(-1).to(dmin.dtype)
    per_proto = (onehot * dmin.unsqueeze(-1)).sum(1) / onehot.sum(1).clamp_min(1.0)
    return per_proto.mean(-1).mean()


def softmax_forward(self, x: Tensor, prototypes: Tensor) -> Tensor:
    """PrototypeAttentionBlock.forward with softmax(s_h cos) weights over the prototypes."""
    b, n, c = x.shape
    h = self.num_heads
    q = self.q(self.norm_x(x)).reshape(b, n, h, c // h).transpose(1, 2)
    k, v = self.kv(self.norm_p(prototypes)).reshape(b, -1, 2, h, c // h).permute(2, 0, 3, 1, 4)
    cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    w = torch.softmax(self.scale * cos, dim=-1)
    x = self.proj((w @ v).transpose(1, 2).reshape(b, n, c))
    return x + self.mlp(self.norm2(x))


MAP_VARIANTS = {"model_resz": "residual_z", "model_geo": "cosine_residual_z", "model_uz": "residual_z",
                "model_geo_cluster": "cosine_residual_z", "model_geo_meanproto": "cosine_residual_z"}


def kmeans_directions(x: Tensor, k: int, iterations: int = 25, seed: int = 0) -> Tensor:
    """(k, C) unit centroids of the rows of ``x`` (N, C) by spherical k-means (k-means++ start, cosine)."""
    gen = torch.Generator().manual_seed(seed)
    u = F.normalize(x.float(), dim=1)
    centres = [u[torch.randint(0, u.shape[0], (1,), generator=gen)]]
    for _ in range(1, k):
        d = (1.0 - (u @ torch.cat(centres).T).amax(1)).clamp_min(0.0)
        centres.append(u[torch.multinomial(d / d.sum(), 1, generator=gen)])
    c = torch.cat(centres)
    for _ in range(iterations):
        idx = (u @ c.T).argmax(1)
        new = torch.zeros_like(c).index_add_(0, idx, u)
        c = torch.where(new.norm(dim=1, keepdim=True) > 0, F.normalize(new, dim=1), c)
    return c


class ClusterResiduals:
    """Residual mean/std of each feature group per k-means cluster of the normal teacher tokens."""

    def __init__(self, centres: list[Tensor], stats: list[tuple[Tensor, Tensor]]) -> None:
        self.centres, self.stats = centres, stats  # per group: (K, C); (K, C) mean and (K, C) std

    @classmethod
    @torch.inference_mode()
    def fit(cls, side: DecoderSide, f: Tensor, targets: list[Tensor], grid: tuple[int, int], k: int,
            seed: int = 0) -> ClusterResiduals:
        recons = [torch.cat(parts) for parts in zip(*(side(f[i : i + 64], grid)[0] for i in range(0, f.shape[0], 64)))]
        centres, stats = [], []
        for t, r in zip(targets, recons):
            tt, rr = (a.movedim(1, -1).reshape(-1, a.shape[1]).double() for a in (t, r))
            c = kmeans_directions(tt, k, seed=seed)
            idx = (F.normalize(tt.float(), dim=1) @ c.T).argmax(1)
            res = tt - rr
            n = torch.bincount(idx, minlength=k).double().clamp_min(2.0)[:, None]
            mean = torch.zeros(k, res.shape[1], dtype=torch.float64).index_add_(0, idx, res) / n
            var = torch.zeros_like(mean).index_add_(0, idx, (res - mean[idx]).square()) / (n - 1)
            std = var.sqrt()
            std = std.clamp_min(max(float(std.max()) * 1e-3, 1e-12))
            centres.append(c)
            stats.append((mean.float(), std.float()))
            print(f"cluster sizes {torch.bincount(idx, minlength=k).tolist()}", flush=True)
        return cls(centres, stats)

    def distance(self, targets: list[Tensor], recons: list[Tensor]) -> Tensor:
        """Mean over groups of sqrt(cosine distance * cluster-conditional residual z), (B, h, w)."""
        maps = []
        for t, r, c, (mean, std) in zip(targets, recons, self.centres, self.stats):
            idx = torch.einsum("bchw,kc->bkhw", F.normalize(t.float(), dim=1), c).argmax(1)  # (B, h, w)
            z = ((t - r).float() - mean[idx].movedim(-1, 1)) / std[idx].movedim(-1, 1)
            cos = 1.0 - F.cosine_similarity(t.float(), r.float(), dim=1)
            maps.append((cos.clamp_min(0.0) * z.square().mean(1).sqrt()).sqrt())
        return torch.stack(maps).mean(0)


@torch.inference_mode()
def fit_cache_residuals(side: DecoderSide, f: Tensor, targets: list[Tensor], grid: tuple[int, int],
                        shrink: float = 0.0) -> list[tuple[Tensor, Tensor]]:
    """Per-group residual mean/std of ``side`` over the whole cache (unit vectors for ``model_uz``); ``shrink``
    moves each channel's variance toward the mean variance of the group."""
    from monai_dnprd.anomaly_map import ResidualMoments

    moments = ResidualMoments()
    for start in range(0, f.shape[0], 64):
        recons, _ = side(f[start : start + 64], grid)
        tgt = [t[start : start + 64] for t in targets]
        if side.unit:
            tgt, recons = [F.normalize(t, dim=1) for t in tgt], [F.normalize(r, dim=1) for r in recons]
        moments.update(tgt, recons)
    stats = moments.stats()
    if shrink > 0:
        stats = [(m, ((1 - shrink) * s.square() + shrink * s.square().mean()).sqrt()) for m, s in stats]
    return stats


def make_variant(net: nn.Module, name: str, override: dict | None = None) -> DecoderSide:
    """A fresh (re-initialised) decoder side of ``net``'s shape (constructor arguments changed by ``override``,
    e.g. ``num_prototypes``, ``bottleneck_dropout``), or the model's own for ``model``."""
    from monai_dnprd.networks import DNPConFormer

    if name in ("model", "model_fgproto", "model_meanproto", *MAP_VARIANTS):
        side = DecoderSide(copy.deepcopy(net))
        side.masked = name == "model_fgproto"
        side.metric = MAP_VARIANTS.get(name, "cosine")
        side.unit = name == "model_uz"
        return side
    fresh = DNPConFormer(**{**net.config(), **(override or {})})
    side = DecoderSide(fresh)
    if name == "softmax":
        import types

        for blk in side.decoder:
            blk.forward = types.MethodType(softmax_forward, blk)
            with torch.no_grad():
                blk.scale.fill_(10.0)  # temperature 0.1 at the start: cosines of 0.9 vs 1.0 differ by e^1
    elif name == "globalproto":
        side.fixed = nn.Parameter(torch.randn(1, fresh.num_prototypes, fresh.encoder.embed_dim))
    elif name == "fgproto":
        side.masked = True
    elif name == "std":
        pass  # statistics set by main() from the cache
    elif name != "paper":
        raise SystemExit(f"unknown variant {name!r}")
    return side


@torch.inference_mode()
def cache_features(wf, volumes: list[dict], min_foreground: float, flips: bool = True) -> tuple[Tensor, list[Tensor]]:
    """Student fused tokens (S, N, C) and teacher target groups [(S, C, h, w)] of all training slices whose
    foreground fraction is at least ``min_foreground`` (and their left-right flips), as in training."""
    from monai_dnprd.transforms.array import gather_slice_stacks

    network = wf.parser.get_parsed_content("network")
    inferer = wf.parser.get_parsed_content("inferer")
    preprocessing = wf.parser.get_parsed_content("preprocessing")
    k = wf.parser.get_parsed_content("params")["k"]
    network.eval()
    fs, ts, vs = [], [], []
    patch = network.encoder.patch_size
    for entry in volumes:
        d = preprocessing(dict(entry))
        vol, mask = d["image"].as_tensor().float(), d["mask"].as_tensor().bool()
        frac = mask[0].float().mean((0, 1))
        idx = torch.nonzero(frac >= min_foreground).flatten()
        for start in range(0, idx.numel(), inferer.batch_size):
            x = inferer.resize(gather_slice_stacks(vol, idx[start : start + inferer.batch_size], k))
            for xx in (x, x.flip(-2)) if flips else (x,):
                out = network(xx)
                fs.append(out.tokens.float())
                vs.append(token_valid(xx, patch))
                ts.append([t.float() for t in out.targets])
    return torch.cat(fs), [torch.cat([t[g] for t in ts]) for g in range(len(ts[0]))], torch.cat(vs)


def train_variant(side: DecoderSide, f: Tensor, targets: list[Tensor], grid: tuple[int, int], iterations: int,
                  batch_size: int, seed: int, valid: Tensor | None = None) -> list[float]:
    """The DNP stage's decoder-side training on cached features: L_sm + 0.2 L_DAA, AdamW, warm-up + cosine lr
    1e-4 -> 1e-5, gradient clip 0.1."""
    from monai_dnprd.engines.schedule import cosine_lr
    from monai_dnprd.losses import DNPLoss
    from monai_dnprd.networks.dnp import DNPOutput

    loss_fn = DNPLoss()
    opt = torch.optim.AdamW(side.parameters(), lr=1e-4, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    side.train()
    losses = []
    for it in range(iterations):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(it, iterations, 1e-4, 1e-5, warmup=min(50, iterations // 10))
        idx = torch.randint(0, f.shape[0], (batch_size,), generator=gen)
        vb = valid[idx] if valid is not None else None
        recons, prototypes = side(f[idx], grid, vb)
        out = DNPOutput(targets=[t[idx] for t in targets], recons=recons, prototypes=prototypes, tokens=f[idx],
                        assignments=None)
        loss = loss_fn(out)
        if vb is not None:
            loss["loss"] = loss["loss"] + loss_fn.daa_weight * (masked_daa(f[idx], prototypes, vb) - loss["daa"])
        opt.zero_grad(set_to_none=True)
        loss["loss"].backward()
        torch.nn.utils.clip_grad_norm_(side.parameters(), 0.1)
        opt.step()
        losses.append(float(loss["sm"].detach()))
    side.eval()
    return losses


def variant_inferer(base, side: DecoderSide):
    """The workflow's inferer with ``side`` rebuilding the teacher targets from the model's fused tokens."""
    from monai_dnprd.anomaly_map import slice_anomaly_map, upsample_blur
    from monai_dnprd.inferer import DNPVolumeInferer

    class VariantInferer(DNPVolumeInferer):
        def slice_maps(self, network, stack, out_size):
            out = network(self.resize(stack))
            grid = tuple(out.targets[0].shape[-2:])
            f, targets = side.standardise(out.tokens.float(), [t.float() for t in out.targets])
            valid = token_valid(self.resize(stack), network.encoder.patch_size) if side.masked else None
            recons, _ = side(f, grid, valid)
            sigma = self.sigma * max(out_size) / self.img_size
            if side.unit:
                targets = [F.normalize(t, dim=1) for t in targets]
                recons = [F.normalize(r, dim=1) for r in recons]
            if side.clusters is not None:
                return upsample_blur(side.clusters.distance(targets, recons), tuple(out_size), sigma).unsqueeze(1).cpu()
            return slice_anomaly_map(targets, recons, tuple(out_size), sigma, side.metric, side.res_stats).cpu()

    return VariantInferer(base.img_size, base.k, base.axis, base.batch_size, base.sigma, base.z_sigma, base.precision)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="exported model (models/model.pt of a training run)")
    ap.add_argument("--variants", nargs="+", default=["paper", "softmax"])
    ap.add_argument("--bank", default=None, help="folder of normal training volumes (default: the demo's)")
    ap.add_argument("--input_dir", default=None, help="test volumes (default: the demo's)")
    ap.add_argument("--label_dir", default=None, help="their lesion masks (default: the demo's)")
    ap.add_argument("--iterations", type=int, default=400, help="decoder-side iterations (the default DNP stage)")
    ap.add_argument("--batch_size", type=int, default=12)
    ap.add_argument("--min_foreground", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shrink", type=float, default=0.0, help="residual maps: shrink each channel's residual variance "
                    "toward the mean variance by this fraction (1 = plain RMS residual)")
    ap.add_argument("--clusters", type=int, default=8, help="model_geo_cluster: k-means groups of normal tokens")
    ap.add_argument("--map_metric", default="cosine", choices=["cosine", "residual_z", "cosine_residual_z"],
                    help="map distance of the retrained variants (their residual statistics come from the cache)")
    ap.add_argument("--override", default="{}", help="JSON dict of DNPConFormer arguments for the retrained variants "
                    "(decoder side only: e.g. '{\"num_prototypes\": 2}')")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    out = Path(args.out or tempfile.mkdtemp(prefix="decoder_probe_"))
    _, volumes, data = probe_inputs(args.bank, args.input_dir, args.label_dir)

    wf = _workflow(args.ckpt, out / "cache", **data)
    wf.initialize()
    t0 = time.time()
    f, targets, valid = cache_features(wf, volumes, args.min_foreground)
    print(f"cached {f.shape[0]} slices in {time.time() - t0:.0f} s", flush=True)
    network = wf.parser.get_parsed_content("network")
    base = wf.parser.get_parsed_content("inferer")
    grid = tuple(targets[0].shape[-2:])
    results = {}
    for name in args.variants:
        side = make_variant(network, name, json.loads(args.override))
        ff, tt = f, targets
        if name.endswith("meanproto"):  # set before any residual statistics are fitted through ``side``
            with torch.inference_mode():
                side.fixed = torch.cat([side.extractor(part) for part in f.split(64)]).mean(0, keepdim=True).clone()
        if not name.startswith("model"):
            side.metric = args.map_metric
        if name == "model_geo_cluster":  # its own per-cluster statistics replace the global ones
            side.clusters = ClusterResiduals.fit(side, f, targets, grid, args.clusters, args.seed)
        elif side.metric != "cosine" and name.startswith("model"):
            side.res_stats = fit_cache_residuals(side, f, targets, grid, args.shrink)
        if name == "std":
            side.stats = (f.mean((0, 1)), f.std((0, 1)) + 1e-6,
                          [(t.mean((0, 2, 3)), t.std((0, 2, 3)) + 1e-6) for t in targets])
            ff, tt = side.standardise(f, targets)
        t0 = time.time()
        losses = train_variant(side, ff, tt, grid, args.iterations, args.batch_size, args.seed,
                               valid if side.masked else None) if not name.startswith("model") else []
        train_s = time.time() - t0
        if side.metric != "cosine" and not name.startswith("model"):
            side.res_stats = fit_cache_residuals(side, ff, tt, grid, args.shrink)
        wf = _workflow(args.ckpt, out / name, inferer=variant_inferer(base, side), **data)
        wf.initialize()
        wf.run()
        wf.finalize()
        r = summary(out / name / "metrics.json")
        r["final_sm"] = sum(losses[-25:]) / 25 if losses else None
        r["train_s"] = train_s
        results[name] = r
        print(f"{name}: voxel AUROC {r['voxel_auroc']:.3f}  AP {r['voxel_ap']:.4f} ({r['ap_x_chance']:.1f}x chance)  "
              f"best Dice {r['voxel_best_dice']:.3f}  slice AUROC {r['slice_auroc']:.3f}  per volume "
              f"{r['per_volume_auroc']}  final L_sm {r['final_sm']}  ({train_s:.0f} s)", flush=True)
    (out / "decoder_probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
