"""Training throughput (slices/s, one full DNP step: EMA update, forward, losses, backward, optimizer step).

Presets: "default" (the bundle's CPU defaults) and "paper" (ViT-S/14, 224 px; meant for a GPU). The MIM
warm-up step is measured too. Random inputs: the data pipeline is measured by the training run itself.

Usage: python bench/bench_training.py [--preset default|paper|both] [--device cpu|cuda] [--precision fp32|bf16]
       [--batch-size N] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

_TRAIN_CONFIG = Path(__file__).resolve().parents[1] / "bundle" / "configs" / "train.json"
def _default_preset() -> dict:
    """The model keys of the bundle's training config, so the benchmark follows the shipped defaults."""
    cfg = json.loads(_TRAIN_CONFIG.read_text())
    net = cfg["network_def"]
    return {"img_size": cfg["img_size"], "batch_size": cfg["batch_size"], "patch_size": net["patch_size"],
            "vit": net["vit"], "depth": net["depth"]}


PRESETS = {
    "default": _default_preset(),
    "paper": dict(img_size=224, patch_size=14, vit="small", depth=12, batch_size=32),
}


def bench(preset: str, device: torch.device, precision: str, batch_size: int | None, steps: int) -> dict:
    from monai_dnprd.engines.schedule import build_optimizer
    from monai_dnprd.config import autocast_context
    from monai_dnprd.losses import DNPLoss
    from monai_dnprd.networks import DNPConFormer, mim_loss, random_checkerboard_mask

    p = dict(PRESETS[preset])
    bs = batch_size or p.pop("batch_size")
    p.pop("batch_size", None)
    net = DNPConFormer(in_channels=3, **p).to(device)
    opt, _ = build_optimizer(net, num_iterations=100, warmup_iterations=0)
    loss_fn = DNPLoss()
    x = torch.rand(bs, 3, p["img_size"], p["img_size"], device=device)

    def dnp_step() -> None:
        opt.zero_grad(set_to_none=True)
        net.update_teacher()
        hide = random_checkerboard_mask(bs, net.grid_size, net.mask_block, device)  # context-only, as in training
        with autocast_context(device, precision):
            loss = loss_fn(net(x, mask=hide))["loss"]
        loss.backward()
        opt.step()

    def mim_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            loss = mim_loss(net.encoder, net.pixel_head, x)
        loss.backward()
        opt.step()

    out = {"preset": preset, "batch_size": bs, "device": str(device), "precision": precision,
           "threads": torch.get_num_threads(), **{k: v for k, v in p.items()}}
    for name, step in (("dnp", dnp_step), ("mim", mim_step)):
        step()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        out[f"{name}_seconds_per_step"] = round(dt, 3)
        out[f"{name}_slices_per_s"] = round(bs / dt, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="both", choices=["default", "paper", "both"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    presets = ["default", "paper"] if args.preset == "both" else [args.preset]
    for p in presets:
        steps = args.steps if p == "default" or args.device != "cpu" else max(1, args.steps // 5)
        bs = args.batch_size or (8 if p == "paper" and args.device == "cpu" else None)
        print(json.dumps(bench(p, torch.device(args.device), args.precision, bs, steps)))


if __name__ == "__main__":
    main()
