"""The GPU check: the paper preset trained briefly on the embedded demo data, then inference on a 240x240x155 brain.

Prints one JSON summary: training slices/s (DNP stage, batch x iterations over the training loop's wall time),
inference slices/s and seconds per volume (bench/bench_inference.py on a 1 mm 240x240x155 brain made from a
demo subject), and peak GPU memory of each step. Official DINOv2 weights are used when they are in torch's hub
cache or can be downloaded; otherwise (an offline machine) the preset trains from scratch and says so.

    bash bench/gpu_check.sh            # the entry point: checks CUDA, then runs this with a time limit
    python bench/gpu_check.py --iterations 300 --out runs/gpu_check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def brain_240(out: Path) -> Path:
    """A 1 mm 240x240x155 brain (the BraTS grid) resampled from a shipped demo subject (trilinear)."""
    import nibabel as nib
    import numpy as np
    import torch
    import torch.nn.functional as F

    from monai_dnprd import demo

    arr, aff = demo._load("IXI015-HH-1258_T1.nii.gz")
    big = F.interpolate(torch.from_numpy(arr)[None, None], size=(240, 240, 155), mode="trilinear", align_corners=False)
    new_aff = aff.copy()
    new_aff[:3, :3] = aff[:3, :3] @ np.diag(np.array(arr.shape) / np.array([240, 240, 155]))
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(big[0, 0].numpy().astype(np.float32), new_aff), str(out))
    return out


def pretrained_or_none(name: str) -> str | None:
    """``name`` when its official checkpoint is cached or downloads; None (train from scratch) otherwise."""
    from monai_dnprd.networks import DNPConFormer
    from monai_dnprd.networks.vit import resolve_pretrained

    probe = DNPConFormer(img_size=224, patch_size=14, vit="small", depth=12)
    try:
        resolve_pretrained(probe.encoder, name)
        return name
    except Exception as err:  # noqa: BLE001 - offline, blocked, checksum: the check still runs, from scratch
        print(f"pretrained {name} not available ({str(err).splitlines()[0][:200]}): training from scratch", flush=True)
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--out", default=str(REPO / "runs" / "gpu_check"))
    args = ap.parse_args()

    import torch
    from monai.bundle import ConfigWorkflow

    from monai_dnprd.config import workflow_configs

    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: this check needs one", file=sys.stderr)
        return 1
    out = Path(args.out)
    pretrained = pretrained_or_none("dinov2_vits14_reg")
    files = workflow_configs(REPO / "bundle", "training") + [str(REPO / "bundle" / "configs" / "paper.json")]
    wf = ConfigWorkflow(config_file=files, workflow_type=None, run_id="training", bundle_root=str(REPO / "bundle"),
                        meta_file=str(REPO / "bundle" / "configs" / "metadata.json"),
                        logging_file=str(REPO / "bundle" / "configs" / "logging.conf"),
                        output_dir=str(out / "train"), num_iterations=args.iterations, pretrained=pretrained,
                        device="cuda", num_workers=4, **{"schedule#val_interval": args.iterations})
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    torch.cuda.reset_peak_memory_stats()
    marks: dict[str, float] = {}

    @trainer.on(__import__("ignite").engine.Events.ITERATION_COMPLETED(once=1))
    def _first(_engine) -> None:  # the loop's time, without building the datasets
        torch.cuda.synchronize()
        marks["first"] = time.perf_counter()

    @trainer.on(__import__("ignite").engine.Events.ITERATION_COMPLETED(once=args.iterations))
    def _last(_engine) -> None:
        torch.cuda.synchronize()
        marks["last"] = time.perf_counter()

    t0 = time.perf_counter()
    wf.run()
    wf.finalize()
    total = time.perf_counter() - t0
    train_peak = torch.cuda.max_memory_allocated() / 1024**3
    batch = int(wf.parser.get_parsed_content("batch_size"))
    steps = max(args.iterations - 1, 1)
    loop = marks.get("last", 0.0) - marks.get("first", 0.0)
    volume = brain_240(out / "volume" / "brain_240x240x155.nii.gz")
    bench = subprocess.run([sys.executable, str(REPO / "bench" / "bench_inference.py"), "--ckpt",
                            str(out / "train" / "models" / "model.pt"), "--volume", str(volume), "--device", "cuda",
                            "--precision", "bf16", "--repeat", "3"], capture_output=True, text=True, check=True)
    inference = json.loads(bench.stdout[bench.stdout.index("{"):])
    summary = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "pretrained": pretrained,
        "train_iterations": args.iterations, "batch_size": batch,
        "train_slices_per_s": round(batch * steps / loop, 1) if loop > 0 else None,
        "train_workflow_seconds": round(total, 1), "train_peak_gpu_gb": round(train_peak, 2),
        "inference_seconds_per_volume": inference["seconds"]["total"],
        "inference_slices_per_s": inference["slices_per_s_network"],
        "inference_peak_gpu_gb": inference.get("peak_gpu_gb"), "inference_stages_s": inference["seconds"],
    }
    print(json.dumps(summary, indent=1))
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
