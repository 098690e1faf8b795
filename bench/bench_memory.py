"""Memory benchmark of inference: does the process RSS stay flat over many volumes?

Runs the bundle's inference workflow in this process (``ConfigWorkflow`` of bundle/configs/common.json + inference.json) over
N generated small volumes (the demo brains downsampled, with varied intensity, shape and affine) and records
the resident set size (VmRSS from /proc/self/status) after each volume. Prints first / last / max RSS and the
slope of a least-squares line over the volumes after the warm-up, and exits with status 1 when the RSS grows by
more than --max_growth_mb between the end of the warm-up and the last volume (a leak), 0 otherwise.

    python bench/bench_memory.py                      # 50 volumes, trains a tiny model first (seconds)
    python bench/bench_memory.py --n 8 --ckpt_path runs/demo/models/model.pt

Linux only (reads /proc). Set OMP_NUM_THREADS to keep it off busy cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
DEMO = REPO / "monai_dnprd" / "demo_data"
BRAINS = ("IXI012-HH-1211_T1.nii.gz", "IXI015-HH-1258_T1.nii.gz", "chris_t1_2mm.nii.gz", "mni152_2009a_t1_2mm.nii.gz")


def rss_mb() -> float:
    """Resident set size of this process in MiB (VmRSS of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status")


def downsampled(name: str, step: int) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(DEMO / name))
    arr = np.asarray(img.dataobj, dtype=np.float32)[::step, ::step, ::step]
    aff = img.affine.copy()
    aff[:3, :3] *= step
    return np.ascontiguousarray(arr), aff


def make_volumes(folder: Path, n: int, step: int, seed: int = 0) -> None:
    """n small volumes: demo brains, cropped differently, intensity-scaled, some flipped (other affines)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = [downsampled(b, step) for b in BRAINS]
    for i in range(n):
        arr, aff = base[i % len(base)]
        lo = rng.integers(0, 3, size=3)
        vol = arr[lo[0]:, lo[1]:, lo[2]:] * float(rng.uniform(0.7, 1.3))
        a = aff.copy()
        a[:3, 3] += aff[:3, :3] @ lo
        if i % 3 == 1:  # flipped first axis: another orientation to undo
            flip = np.eye(4)
            flip[0, 0], flip[0, 3] = -1, vol.shape[0] - 1
            vol, a = vol[::-1], a @ flip
        nib.save(nib.Nifti1Image(np.ascontiguousarray(vol, dtype=np.float32), a), str(folder / f"vol{i:03d}.nii.gz"))


def run_workflow(config: str, run_id: str, hook=None, **overrides):
    from monai.bundle import ConfigWorkflow

    from monai_dnprd.config import workflow_configs

    files = workflow_configs(BUNDLE, run_id)
    assert Path(files[-1]).name == config, f"{config} is not the config of workflow {run_id}"
    wf = ConfigWorkflow(config_file=files, meta_file=str(BUNDLE / "configs" / "metadata.json"),
                        logging_file=str(BUNDLE / "configs" / "logging.conf"), workflow_type=None, run_id=run_id,
                        bundle_root=str(BUNDLE), **overrides)
    wf.initialize()
    if hook is not None:
        hook(wf)
    wf.run()
    wf.finalize()
    return wf


def train_tiny(work: Path, step: int) -> Path:
    """A tiny model (a few iterations at 32 px) so the benchmark needs nothing but the repository."""
    train, val = work / "train", work / "val"
    train.mkdir(parents=True, exist_ok=True)
    val.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(BRAINS):
        arr, aff = downsampled(name, step)
        nib.save(nib.Nifti1Image(arr, aff), str((val if i == len(BRAINS) - 1 else train) / name))
    run_workflow("train.json", "training", output_dir=str(work / "model"), dataset_dir=str(train), val_dir=str(val),
                 num_iterations=4, warmup_iterations=2, img_size=32, batch_size=4, num_workers=0,
                 **{"schedule#val_interval": 4, "schedule#ckpt_interval": 4, "schedule#log_interval": 10,
                    "network_def#patch_size": 8, "network_def#depth": 2, "data#samples_per_volume": 2})
    return work / "model" / "models" / "model.pt"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50, help="number of volumes (default 50)")
    p.add_argument("--step", type=int, default=3, help="downsampling of the demo brains (3: about 40^3 voxels)")
    p.add_argument("--ckpt_path", default=None, help="exported model.pt (default: train a tiny one first)")
    p.add_argument("--warmup", type=int, default=3, help="volumes not counted in the growth (allocator warm-up)")
    p.add_argument("--max_growth_mb", type=float, default=100.0, help="allowed RSS growth after the warm-up")
    p.add_argument("--report", default="true", help="also draw the HTML report (true/false)")
    p.add_argument("--json", default=None, help="write the RSS series and summary to this JSON file")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        work = Path(tmp)
        ckpt = Path(args.ckpt_path) if args.ckpt_path else train_tiny(work, args.step)
        make_volumes(work / "inputs", args.n, args.step)
        series: list[float] = []

        def hook(wf) -> None:
            from ignite.engine import Events

            wf.parser.get_parsed_content("evaluator").add_event_handler(
                Events.ITERATION_COMPLETED, lambda engine: series.append(rss_mb()))

        start = rss_mb()
        run_workflow("inference.json", "inference", hook=hook, input_dir=str(work / "inputs"),
                     output_dir=str(work / "out"), ckpt_path=str(ckpt), num_workers=0, report=args.report)

    if len(series) != args.n:
        print(f"expected {args.n} RSS samples, got {len(series)}", file=sys.stderr)
        return 2
    y = np.asarray(series)
    tail = y[min(args.warmup, len(y) - 1):]
    slope = float(np.polyfit(np.arange(tail.size), tail, 1)[0]) if tail.size >= 2 else 0.0
    growth = float(tail[-1] - tail[0])
    summary = {"n": args.n, "rss_before_mb": round(start, 1), "first_mb": round(float(y[0]), 1),
               "last_mb": round(float(y[-1]), 1), "max_mb": round(float(y.max()), 1),
               "slope_mb_per_volume": round(slope, 3), "growth_after_warmup_mb": round(growth, 1),
               "max_growth_mb": args.max_growth_mb}
    print("RSS after each volume (MiB):", " ".join(f"{v:.0f}" for v in y))
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "rss_mb": y.round(1).tolist()}, indent=1))
    if growth > args.max_growth_mb:
        print(f"FAIL: RSS grew by {growth:.1f} MiB over {tail.size} volumes (> {args.max_growth_mb} MiB)", file=sys.stderr)
        return 1
    print(f"OK: RSS growth {growth:.1f} MiB after the warm-up, slope {slope:.3f} MiB/volume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
