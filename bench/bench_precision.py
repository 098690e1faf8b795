"""bf16 autocast vs fp32 for inference: speed and how much the anomaly map changes.

Usage: python bench/bench_precision.py --ckpt MODEL --volume VOLUME [--device cpu|cuda]
Prints the network time per precision and the map difference (max abs, mean abs relative to the fp32 map's
foreground mean, and the voxel AUROC of the bf16 map against the top 1 % of the fp32 map).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--volume", required=True)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from monai.bundle import ConfigParser

    from monai_dnprd.checkpoint import load_model
    from monai_dnprd.config import workflow_configs
    from monai_dnprd.inferer import DNPVolumeInferer
    from monai_dnprd.metrics import roc_auc

    device = torch.device(args.device)
    net, info = load_model(args.ckpt, device)
    p = info["preprocessing"]
    parser = ConfigParser()
    parser.read_config(workflow_configs(REPO / "bundle", "inference"))
    parser.update({"ckpt_path": args.ckpt, "input_dir": str(Path(args.volume).parent)})
    d = parser.get_parsed_content("preprocessing")({"image": args.volume, "name": "v"})
    maps, times = {}, {}
    for precision in ("fp32", "bf16"):
        inferer = DNPVolumeInferer(p["img_size"], p["k"], z_sigma=p["z_sigma"], precision=precision)
        inferer(d["image"], net, mask=d["mask"])  # warm-up
        t0 = time.perf_counter()
        maps[precision] = torch.as_tensor(inferer(d["image"], net, mask=d["mask"])).numpy()
        times[precision] = time.perf_counter() - t0
    fg = torch.as_tensor(d["mask"]).numpy() > 0
    a, b = maps["fp32"][fg], maps["bf16"][fg]
    top = a >= np.quantile(a, 0.99)
    print(json.dumps({
        "seconds_fp32": round(times["fp32"], 3), "seconds_bf16": round(times["bf16"], 3),
        "max_abs_diff": float(np.abs(a - b).max()), "mean_abs_diff_rel": float(np.abs(a - b).mean() / a.mean()),
        "auroc_bf16_vs_fp32_top1pct": roc_auc(b, top), "device": args.device,
    }, indent=1))


if __name__ == "__main__":
    main()
