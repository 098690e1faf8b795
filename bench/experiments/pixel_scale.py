"""Probe: the pixel error in units of its expected size on normal tissue, predicted from context.

The first direction's false positives lie mostly at the brain's edge, where the pixel head's error is large on
normal slices too. This probe fits, post hoc on a trained model, a linear head that reads the same context-only
student tokens as the pixel head and predicts each hidden pixel's Laplace scale b (negative log-likelihood
``|e| / b + log b`` on the detached errors of the normal training slices the map's statistics are fitted on);
the pixel part of the map becomes ``|e| / b``. It prints the same model's default map and the scaled one (one
grid phase, fp32, no symmetry step, as ``map_variants.py``), so the comparison is paired.

    python bench/experiments/pixel_scale.py --ckpt RUN/models/model.pt --train NORMAL --test TEST --labels LABELS
"""

from __future__ import annotations

import argparse
import glob

import torch
from torch import Tensor, nn

from map_variants import inference_pipeline, score_folder
from monai_dnprd.calibration import fit_map_statistics, residual_fit_slices
from monai_dnprd.networks.masks import inference_masks
from monai_dnprd.networks.masks import patchify
from monai_dnprd.transforms.array import ResizeSlices, gather_slice_stacks


class TokenRecorder(nn.Module):
    """Wraps the pixel head and keeps its input: the normed last-block tokens of every student pass."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.tokens: Tensor | None = None

    def forward(self, tokens: Tensor) -> Tensor:
        self.tokens = tokens
        return self.head(tokens)


def hidden_tokens(net: nn.Module, batch: int) -> Tensor:
    """(B, N, C): each token from the inference pass that hid it (the pass its pixels are predicted in)."""
    masks = inference_masks(net.grid_size, net.mask_block)
    t = net.pixel_head.tokens
    return sum(t[i * batch : (i + 1) * batch] * m[None, :, None] for i, m in enumerate(masks))


def fit_scale_head(mapper, normals: list[dict], k: int, img_size: int, steps: int = 400) -> nn.Linear:
    """Log-scale head fitted on the map-statistics slices of the normal volumes (Adam, 400 steps of 8192 pixels)."""
    net = mapper.network
    pairs = residual_fit_slices([d["mask"] for d in normals], 256, 0.15)
    resize = ResizeSlices(img_size)
    feats, errs = [], []
    with torch.no_grad():
        for v in sorted({v for v, _ in pairs}):
            vol = torch.as_tensor(normals[v]["image"]).float()
            for chunk in torch.tensor([z for vv, z in pairs if vv == v]).split(32):
                x = resize(gather_slice_stacks(vol, chunk, k))
                out = net(x)
                feats.append(hidden_tokens(net, x.shape[0]).flatten(0, 1))
                errs.append((out.pixels - patchify(x, net.encoder.patch_size)).abs().flatten(0, 1))
    f, e = torch.cat(feats), torch.cat(errs)
    head = nn.Linear(f.shape[1], e.shape[1])
    nn.init.zeros_(head.weight)
    nn.init.constant_(head.bias, float(e.mean().clamp_min(1e-4).log()))
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, f.shape[0], (8192,), generator=gen)
        s = head(f[idx]).clamp(-9, 3)
        loss = (e[idx] * torch.exp(-s) + s).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    constant = float((e / e.mean() + e.mean().log()).mean())
    print(f"  scale head NLL {float(loss.detach()):.3f} (one scale for all pixels: {constant:.3f})", flush=True)
    return head


def scale_pixel_errors(mapper, head: nn.Linear) -> None:
    """The network's output with its pixels moved so that |pixels - targets| = |e| / b."""
    net = mapper.network
    forward = net.forward

    def scaled(x: Tensor, mask: Tensor | None = None):
        out = forward(x, mask)
        with torch.no_grad():
            b = torch.exp(head(hidden_tokens(net, x.shape[0])).clamp(-9, 3))
        out.pixels = out.pixel_targets + (out.pixels - out.pixel_targets) / b
        return out

    net.forward = scaled


def score(ckpt: str, train: str, test: str, labels: str, scaled: bool) -> dict:
    mapper, prm, pre, inverse, inferer = inference_pipeline(ckpt)
    mapper.network.pixel_head = TokenRecorder(mapper.network.pixel_head)
    normals = [pre({"image": f}) for f in sorted(glob.glob(f"{train}/*.nii.gz"))]
    if scaled:
        scale_pixel_errors(mapper, fit_scale_head(mapper, normals, prm["k"], prm["img_size"]))
    fit_map_statistics(mapper, normals, prm["k"], prm["img_size"])
    return score_folder(mapper, pre, inverse, inferer, test, labels)["voxel"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key in ("ckpt", "train", "test", "labels"):
        ap.add_argument(f"--{key}", required=True)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for scaled in (False, True):
        r = score(args.ckpt, args.train, args.test, args.labels, scaled)
        print(f"{'scaled' if scaled else 'default'}: voxel AP {r['ap']:.4f} AUROC {r['auroc']:.3f} "
              f"best Dice {r['best_dice']:.3f}", flush=True)


if __name__ == "__main__":
    main()
