"""Probe: how a trained model's prototypes share the tokens of normal slices, tissue and background apart.

The training log's ``prototype_max_share`` is taken in training mode (dropout on). This probe runs the exported
model in eval mode on brain slices of normal volumes (as training draws them: at least 15 % of the largest
slice's foreground), hides a random block checkerboard as training does, and counts each visible token's nearest
prototype three ways: all tokens, tissue tokens (at least half the patch foreground, ``losses.token_tissue``) and
background tokens. Background tokens are alike, so they can fill prototypes of their own and make the share over
all tokens look diverse while the tissue sits on one prototype.

    python bench/experiments/prototype_shares.py --ckpt RUN/models/model.pt --normal DIR [--slices 40]
"""

from __future__ import annotations

import argparse
import glob

import torch

from map_variants import inference_pipeline


@torch.no_grad()
def prototype_shares(ckpt: str, normal: str, slices_per_volume: int = 40, seed: int = 0,
                     batch_size: int = 12) -> dict[str, torch.Tensor]:
    """Token counts per prototype, {"all", "tissue", "background"} -> (M,) float, over visible tokens."""
    from monai_dnprd.losses import token_tissue
    from monai_dnprd.networks.masks import random_checkerboard_mask
    from monai_dnprd.transforms.array import ResizeSlices, gather_slice_stacks

    g = torch.Generator().manual_seed(seed)
    mapper, prm, pre, _, _ = inference_pipeline(ckpt)
    net = mapper.network.eval()
    p, size = net.encoder.patch_size, prm["img_size"]
    resize = ResizeSlices(size)
    images, masks = [], []
    for f in sorted(glob.glob(f"{normal}/*.nii.gz")):
        d = pre({"image": f})
        vol, mask = torch.as_tensor(d["image"]).float(), torch.as_tensor(d["mask"]).float()
        area = mask[0].flatten(0, 1).sum(0)
        z = torch.nonzero(area >= 0.15 * area.max()).flatten()
        z = z[torch.randperm(len(z), generator=g)[:slices_per_volume]]
        images.append(resize(gather_slice_stacks(vol, z, prm["k"])))
        masks.append(resize(gather_slice_stacks(mask, z, 0)))
    x, m = torch.cat(images), torch.cat(masks)
    counts: dict[str, torch.Tensor] = {}
    for i in range(0, len(x), batch_size):
        xb, mb = x[i:i + batch_size], m[i:i + batch_size]
        hide = random_checkerboard_mask(len(xb), (size // p, size // p), net.mask_block, generator=g)
        out = net(xb, mask=hide)
        n_protos = out.prototypes.shape[1]
        tissue = token_tissue(mb[:, :1], p).flatten(1) > 0
        for name, sel in (("all", ~hide), ("tissue", ~hide & tissue), ("background", ~hide & ~tissue)):
            c = torch.bincount(out.assignments[sel], minlength=n_protos).float()
            counts[name] = counts.get(name, torch.zeros(n_protos)) + c
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="exported model (models/model.pt of a training run)")
    ap.add_argument("--normal", required=True, help="folder of normal volumes (the model's training volumes)")
    ap.add_argument("--slices", type=int, default=40, help="slices drawn per volume")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for name, c in prototype_shares(args.ckpt, args.normal, args.slices, args.seed).items():
        share = c / c.sum().clamp_min(1)
        print(f"{name}: {int(c.sum())} tokens, largest share {float(share.max()):.3f}, "
              f"{int((share >= 0.01).sum())} prototypes with >= 1 %; shares " + " ".join(f"{v:.3f}" for v in share))


if __name__ == "__main__":
    main()
