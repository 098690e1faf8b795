"""Probe: do the prototypes carry the lesion into its own reconstruction?

At inference each slice's prototypes are read from its visible tokens, half of a large lesion among them. Three
ways of taking the prototypes, on the same trained model (maps in the preprocessed space, voxel metrics in the
foreground, pooled over the test folder):

- ``default``: the model's own (prototypes from the visible tokens);
- ``oracle``: the visible tokens that touch the lesion label left out of the prototypes (a diagnostic: it reads
  the label);
- ``bank``: each prototype replaced by its nearest (cosine) prototype from a bank collected on the normal
  training volumes (label-free): the decoder can only read prototypes of normal tissue.

    python bench/experiments/prototype_leak.py --ckpt RUN/models/model.pt --train NORMAL --test TEST \\
        --labels LABELS [--variants default oracle bank]
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import torch
import torch.nn.functional as F
from map_variants import bundle_parser

import monai_dnprd.inferer as inferer_module
from monai_dnprd.checkpoint import load_model
from monai_dnprd.inferer import DNPVolumeInferer
from monai_dnprd.metrics import VolumeMetricAccumulator
from monai_dnprd.transforms.array import ResizeSlices, gather_slice_stacks


class ChunkRecorder:
    """Records the slice indices of the batch the inferer is about to map (wraps ``gather_slice_stacks``)."""

    def __init__(self) -> None:
        self.chunk: torch.Tensor | None = None
        self._original = inferer_module.gather_slice_stacks

    def __enter__(self) -> ChunkRecorder:
        def gather(vol, chunk, k, axis=0):
            self.chunk = chunk
            return self._original(vol, chunk, k, axis=axis)

        inferer_module.gather_slice_stacks = gather
        return self

    def __exit__(self, *exc) -> None:
        inferer_module.gather_slice_stacks = self._original


def lesion_tokens(label: torch.Tensor, chunk: torch.Tensor, size: int, patch: int, axis: int = 0) -> torch.Tensor:
    """(B, N) bool: tokens of the resized slices ``chunk`` (along spatial ``axis``) of a (1, D0, D1, D2) label that
    touch the lesion."""
    lab = ResizeSlices(size)(gather_slice_stacks(label.float(), chunk, 0, axis=axis))  # (B, 1, S, S)
    return (F.max_pool2d(lab, patch) > 0).flatten(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--train", required=True, help="normal training volumes (the prototype bank)")
    ap.add_argument("--test", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--variants", nargs="+", default=["default", "oracle", "bank"], choices=["default", "oracle", "bank"])
    ap.add_argument("--bank_slices", type=int, default=400, help="training slices whose prototypes form the bank")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    mapper, meta = load_model(args.ckpt)
    mapper.eval()
    net = mapper.network
    prm = meta["preprocessing"]
    size, patch = prm["img_size"], net.encoder.patch_size
    inferer = DNPVolumeInferer(size, prm["k"], z_sigma=prm["z_sigma"], grid_phases=1, precision="fp32")
    extract = net.extractor.forward
    state: dict = {}

    def extractor(f, visible=None):
        if state.get("mode") == "oracle" and visible is not None:
            les = state["lesion"]
            normal = visible & ~les.repeat(visible.shape[0] // les.shape[0], 1)
            # a slice whose visible tokens are all lesion keeps its own (nothing else to read)
            visible = torch.where(normal.any(1, keepdim=True), normal, visible)
        p = extract(f, visible)
        if state.get("mode") == "collect":
            state["bank"].append(p.reshape(-1, p.shape[-1]).detach())
        if state.get("mode") == "bank":
            bank = state["bank_n"]
            idx = (F.normalize(p, dim=-1) @ bank.T).argmax(-1)  # (B, M)
            p = state["bank_raw"][idx]
        return p

    net.extractor.forward = extractor

    # the bank: prototypes of evenly spread training slices with enough foreground
    if "bank" in args.variants:
        state.update(mode="collect", bank=[])
        train_pre = bundle_parser(args.ckpt).get_parsed_content("preprocessing")
        vols = [train_pre({"image": f}) for f in sorted(glob.glob(f"{args.train}/*.nii.gz"))]
        per = max(1, args.bank_slices // max(1, len(vols)))
        with torch.inference_mode():
            for d in vols:
                fg = torch.as_tensor(d["mask"])[0].movedim(-1, 0).reshape(d["mask"].shape[-1], -1).float().mean(1)
                zs = torch.nonzero(fg >= 0.15).flatten()
                zs = zs[torch.linspace(0, len(zs) - 1, min(per, len(zs))).round().long()]
                vol_s = torch.as_tensor(d["image"]).float().movedim(-1, 1)  # (C, Z, H, W), as the inferer's
                for start in range(0, len(zs), 32):
                    net(ResizeSlices(size)(gather_slice_stacks(vol_s, zs[start:start + 32], prm["k"], axis=0)))
        raw = torch.cat(state["bank"])
        state.update(bank_raw=raw, bank_n=F.normalize(raw, dim=-1), mode=None)
        print(f"bank: {raw.shape[0]} prototypes from {len(vols)} volumes", flush=True)

    test_pre = bundle_parser(args.ckpt, carry=("label",)).get_parsed_content("preprocessing")
    files = sorted(glob.glob(f"{args.test}/*.nii.gz"))
    items = [test_pre({"image": f, "label": f"{args.labels}/{Path(f).name}"}) for f in files]
    original_forward = net.forward

    def forward(x, mask=None):
        if state.get("mode") == "oracle" and mask is None:
            les = lesion_tokens(state["label_s"], state["rec"].chunk, size, patch).to(x.device)
            state["lesion"] = les
        return original_forward(x, mask)

    net.forward = forward
    for variant in args.variants:
        state["mode"] = variant
        acc = VolumeMetricAccumulator(axis=2)
        with ChunkRecorder() as rec, torch.inference_mode():
            state["rec"] = rec
            for f, d in zip(files, items):
                state["label_s"] = torch.as_tensor(d["label"]).movedim(-1, 1) > 0
                pred = inferer(d["image"], mapper, mask=d["mask"])
                acc.add(Path(f).name, torch.as_tensor(pred)[0].numpy(), label=torch.as_tensor(d["label"])[0].numpy() > 0,
                        mask=torch.as_tensor(d["mask"])[0].numpy() > 0)
        r = acc.compute()
        print(f"{variant}: voxel AP {r['voxel']['ap']:.4f} AUROC {r['voxel']['auroc']:.3f} best Dice "
              f"{r['voxel']['best_dice']:.3f} slice AUROC {r['slice']['auroc']:.3f}", flush=True)


if __name__ == "__main__":
    main()
