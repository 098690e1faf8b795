"""Probe: what did the teacher's attention learn? Per block, on the tissue tokens of normal volumes.

Prints, for each teacher block, the mean over heads and tissue-token queries of: the attention share given to the
prefix tokens (class and register tokens), the entropy of the attention over the patch keys (nats; uniform over a
16 x 16 grid is ln 256 = 5.55), the expected distance to the attended patch keys (in tokens; about 7 when uniform on
that grid), and the norms of the attention and MLP branches relative to the residual stream they are added to.
Every third eligible slice (foreground above ``min_foreground``) of each volume is used
(docs/research_log.md, "ATT").

    python bench/experiments/attention_stats.py --ckpt RUN/models/model.pt --normal NORMAL_DIR
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from map_variants import inference_pipeline  # noqa: E402

from monai_dnprd.transforms.array import ResizeSlices, gather_slice_stacks  # noqa: E402


@torch.no_grad()
def block_stats(enc: torch.nn.Module, x: torch.Tensor, tissue: torch.Tensor) -> list[dict[str, float]]:
    """The statistics above for the (B, C, H, W) slices ``x`` through ``enc`` (a ``ViTEncoder``), averaged over
    the (B, N) ``tissue`` tokens. The encoder runs as it does in a map; each block's input is caught on the way."""
    gh, gw = enc.grid_size
    nprefix = enc.num_prefix_tokens
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    dist = torch.cdist(*(2 * [torch.stack([yy.flatten(), xx.flatten()], -1).float()]))
    inputs: list[torch.Tensor] = []
    hooks = [blk.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for blk in enc.blocks]
    try:
        enc(x, [len(enc.blocks) - 1])
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for blk, t in zip(enc.blocks, inputs):
        h = blk.norm1(t)
        (b, n, c), heads = t.shape, blk.attn.num_heads
        q, k, _ = blk.attn.qkv(h).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-1, -2) * (c // heads) ** -0.5).softmax(-1)[:, :, nprefix:]  # patch queries
        patch = w[..., nprefix:] / w[..., nprefix:].sum(-1, keepdim=True)
        attn_branch = blk.ls1(blk.attn(h))
        mlp_branch = blk.ls2(blk.mlp(blk.norm2(t + attn_branch)))
        resid = t[:, nprefix:].norm(dim=-1)
        per_token = {
            "prefix share": w[..., :nprefix].sum(-1).mean(1),
            "entropy": -(patch * patch.clamp_min(1e-12).log()).sum(-1).mean(1),
            "distance": (patch * dist).sum(-1).mean(1),
            "attn / residual": attn_branch[:, nprefix:].norm(dim=-1) / resid,
            "mlp / residual": mlp_branch[:, nprefix:].norm(dim=-1) / resid,
        }
        rows.append({key: float(v[tissue].mean()) for key, v in per_token.items()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, nargs="+", help="exported models (model.pt)")
    ap.add_argument("--normal", required=True, help="folder of normal volumes")
    ap.add_argument("--min_foreground", type=float, default=0.15)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for ckpt in args.ckpt:
        mapper, prm, pre, _, _ = inference_pipeline(ckpt)
        enc = mapper.network.teacher.eval()
        resize, p = ResizeSlices(prm["img_size"]), enc.patch_size
        xs, tissue = [], []
        for f in sorted(glob.glob(f"{args.normal}/*.nii.gz")):
            d = pre({"image": f})
            img, fg = torch.as_tensor(d["image"]).float(), torch.as_tensor(d["mask"]).float()
            zs = torch.tensor([z for z in range(img.shape[-1]) if fg[0, ..., z].mean() > args.min_foreground])[::3]
            xs.append(resize(gather_slice_stacks(img, zs, prm["k"])))
            tissue.append(F.avg_pool2d(resize(gather_slice_stacks(fg, zs, 0)), p).flatten(1) >= 0.5)
        print(ckpt)
        for i, row in enumerate(block_stats(enc, torch.cat(xs), torch.cat(tissue))):
            print(f"  block {i}: " + ", ".join(f"{key} {v:.3f}" for key, v in row.items()))


if __name__ == "__main__":
    main()
