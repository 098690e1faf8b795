"""End-to-end inference speed and peak memory on one volume, with the time split by stage.

Stages: read (file -> array), preprocess (orientation, foreground, normalisation, crop, pad), network (all
slices, batched), map (slice maps, upsampling, blur, stacking, z-smoothing), invert (back to the input grid),
write (NIfTI). Peak RSS is the process maximum (ru_maxrss), which includes Python, torch and MONAI.

Usage:
  python bench/bench_inference.py --ckpt runs/demo/models/model.pt --volume ../shared/data/tcga_lgg/TCGA-DU-7294/TCGA-DU-7294_fla_bet.nii.gz
  python bench/bench_inference.py --ckpt ... --synthetic-ct 512,512,300    # a CT-sized volume made from the real CT
  python bench/bench_inference.py --ckpt A/model.pt B/model.pt C/model.pt --volume ...   # an ensemble of three
Options: --device cpu|cuda, --precision auto|fp32|bf16 (default auto, as inference), --grid-phases 1|2 (default: the
model's), --batch-size N, --repeat N (best of N reported),
--polarity any|bright|dark (the map weighted by the intensity rank; the gate's time counts in
"stack, z-smoothing, masking"), --symmetry true|false (default: the model's; the step is timed as "symmetry").
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from monai_dnprd.anomaly_map import POLARITIES

REPO = Path(__file__).resolve().parents[1]


def ct_volume(shape: tuple[int, int, int], out: Path) -> Path:
    """A CT-sized volume: the real abdominal CT of the shared data resampled to ``shape`` (trilinear)."""
    import nibabel as nib
    import torch.nn.functional as F

    src = nib.load(str(REPO.parent / "shared" / "data" / "totalsegmentator_ct" / "example_ct.nii.gz"))
    arr = torch.from_numpy(np.asarray(src.dataobj, dtype=np.float32))[None, None]
    big = F.interpolate(arr, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    aff = src.affine.copy()
    aff[:3, :3] = aff[:3, :3] @ np.diag(np.array(src.shape) / np.array(shape))
    nib.save(nib.Nifti1Image(big.astype(np.int16), aff), str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, nargs="+", help="one exported model, or several (an ensemble)")
    ap.add_argument("--volume")
    ap.add_argument("--synthetic-ct", help="X,Y,Z: benchmark a CT-sized volume made from the shared CT")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--grid-phases", type=int, choices=[1, 2], default=None, help="override the model's grid phases")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--polarity", default=None, choices=POLARITIES, help="override the model's polarity")
    ap.add_argument("--symmetry", default=None, choices=["true", "false"], help="override the model's symmetry step")
    args = ap.parse_args()

    from monai.bundle import ConfigParser

    from monai_dnprd.config import resolve_precision, workflow_configs
    from monai_dnprd.io import write_nifti

    tmp = Path(tempfile.mkdtemp())
    volume = Path(args.volume) if args.volume else ct_volume(tuple(int(v) for v in args.synthetic_ct.split(",")), tmp / "ct.nii.gz")
    device = torch.device(args.device)
    parser = ConfigParser()
    parser.read_config(workflow_configs(REPO / "bundle", "inference"))
    parser.update({"ckpt_path": args.ckpt[0] if len(args.ckpt) == 1 else args.ckpt, "input_dir": str(volume.parent),
                   "output_dir": str(tmp / "out"), "batch_size": args.batch_size, "precision": args.precision,
                   "device": args.device, "polarity": args.polarity, "grid_phases": args.grid_phases,
                   "symmetry": args.symmetry})
    params = parser.get_parsed_content("params")
    if "ct" in volume.name:
        parser["params"] = {**params, "modality": "ct"}
    net = parser.get_parsed_content("network")
    preprocessing = parser.get_parsed_content("preprocessing")
    inverse = parser.get_parsed_content("inverse")
    inferer = parser.get_parsed_content("inferer")
    members = getattr(inferer, "inferers", [inferer])  # an ensemble's per-model inferers
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        d = preprocessing.transforms[0]({"image": str(volume), "name": "bench"})
        t["read"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for tr in preprocessing.transforms[1:]:
            d = tr(d)
        t["preprocess"] = time.perf_counter() - t0
        # network, map and symmetry step, timed apart by wrapping their calls (of every member of an ensemble)
        net_time, sym_time = [0.0], [0.0]

        def timed(orig, clock):
            def timed_call(*a):
                t1 = time.perf_counter()
                r = orig(*a)
                clock[0] += time.perf_counter() - t1
                return r
            return timed_call

        suppressions = [m.suppression for m in members]
        for m in members:  # instance attributes over the class's, put back below
            m.slice_maps = timed(m.slice_maps, net_time)
            m.suppression = timed(m.suppression, sym_time)
        t0 = time.perf_counter()
        d["pred"] = inferer(d["image"].to(device), net, mask=d["mask"])
        total = time.perf_counter() - t0
        for m, sup in zip(members, suppressions):
            del m.slice_maps
            m.suppression = sup
        t["network+slice maps"] = net_time[0]
        t["symmetry"] = sym_time[0]
        t["stack, z-smoothing, masking"] = total - net_time[0] - sym_time[0]
        n_slices = int((torch.as_tensor(d["mask"])[0] > 0).flatten(0, 1).any(0).sum())
        t0 = time.perf_counter()
        d = inverse(d)
        t["invert"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_nifti(d["pred"][0], d["pred"].meta["original_affine"], tmp / "out.nii.gz")
        t["write"] = time.perf_counter() - t0
        t["total"] = sum(t.values())
        if not best or t["total"] < best["total"]:
            best = t
    shape = tuple(int(s) for s in d["pred"].shape[1:])
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    if device.type == "cuda":
        peak_gpu_gb = torch.cuda.max_memory_allocated(device) / 1024**3
    result = {"volume": volume.name, "shape": shape, "device": args.device,
              "precision": resolve_precision(device, args.precision), "grid_phases": members[0].grid_phases,
              "polarity": members[0].polarity, "symmetry": members[0].symmetry, "threads": torch.get_num_threads(), "seconds": {k: round(v, 3) for k, v in best.items()},
              "peak_rss_gb": round(peak_gb, 2), "img_size": params["img_size"], "k": params["k"],
              "models": len(members), "slices": n_slices,
              "slices_per_s_network": round(len(members) * n_slices / max(best["network+slice maps"], 1e-9), 1)}
    if device.type == "cuda":
        result["peak_gpu_gb"] = round(peak_gpu_gb, 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
