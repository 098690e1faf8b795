"""Probe: how a trained model's prototypes share the tokens of normal slices, tissue and background apart.

The training log's ``prototype_max_share`` is taken in training mode (dropout on). This probe runs the exported
model in eval mode on the slices the map's statistics are fitted on (``calibration.residual_fit_slices``: at least
15 % foreground, as training draws them, at most 256 spread over the volumes), hides a random block checkerboard
as training does, and counts each visible token's nearest prototype three ways: all tokens, tissue tokens (at
least half the patch foreground, ``engines.trainer.token_tissue``) and background tokens. Background tokens are alike, so they can fill prototypes of their own and make the share over
all tokens look diverse while the tissue sits on one prototype.

    python bench/experiments/prototype_shares.py --ckpt RUN/models/model.pt --normal DIR
"""

from __future__ import annotations

import argparse
import glob

import torch

from map_variants import inference_pipeline


@torch.no_grad()
def prototype_shares(ckpt: str, normal: str, seed: int = 0, batch_size: int = 12) -> dict[str, torch.Tensor]:
    """Token counts per prototype, {"all", "tissue", "background"} -> (M,) float, over visible tokens."""
    from monai_dnprd.calibration import residual_fit_slices
    from monai_dnprd.engines.trainer import token_tissue
    from monai_dnprd.networks.masks import random_checkerboard_mask
    from monai_dnprd.transforms.array import ResizeSlices, gather_slice_stacks

    g = torch.Generator().manual_seed(seed)
    mapper, prm, pre, _, _ = inference_pipeline(ckpt)
    net = mapper.network.eval()
    p, size = net.encoder.patch_size, prm["img_size"]
    resize = ResizeSlices(size)
    normals = [pre({"image": f}) for f in sorted(glob.glob(f"{normal}/*.nii.gz"))]
    pairs = residual_fit_slices([d["mask"] for d in normals], 256)
    counts: dict[str, torch.Tensor] = {}
    for v in sorted({v for v, _ in pairs}):
        vol, mask = torch.as_tensor(normals[v]["image"]).float(), torch.as_tensor(normals[v]["mask"]).float()
        for z in torch.tensor([zz for vv, zz in pairs if vv == v]).split(batch_size):
            x, m = resize(gather_slice_stacks(vol, z, prm["k"])), resize(gather_slice_stacks(mask, z, 0))
            hide = random_checkerboard_mask(len(x), (size // p, size // p), net.mask_block, generator=g)
            out = net(x, mask=hide)
            n_protos = out.prototypes.shape[1]
            tissue = token_tissue(m[:, :1], p).flatten(1)
            for name, sel in (("all", ~hide), ("tissue", ~hide & tissue), ("background", ~hide & ~tissue)):
                c = torch.bincount(out.assignments[sel], minlength=n_protos).float()
                counts[name] = counts.get(name, torch.zeros(n_protos)) + c
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="exported model (models/model.pt of a training run)")
    ap.add_argument("--normal", required=True, help="folder of normal volumes (the model's training volumes)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for name, c in prototype_shares(args.ckpt, args.normal, args.seed).items():
        share = c / c.sum().clamp_min(1)
        print(f"{name}: {int(c.sum())} tokens, largest share {float(share.max()):.3f}, "
              f"{int((share >= 0.01).sum())} prototypes with >= 1 %; shares " + " ".join(f"{v:.3f}" for v in share))


if __name__ == "__main__":
    main()
