"""Time to the first training batch with an empty and with a filled preprocessing cache.

Builds the training set and the validation set of the training bundle in-process, as `run training` does before
its first iteration, twice with the same (new, temporary) cache folder: the first pass preprocesses every volume
and fills the cache, the second reads it back. Prints both timings per step and the speed-up.

Usage:
  python bench/bench_cache.py                                   # the embedded demo data
  python bench/bench_cache.py --dataset_dir /data/normals       # your own folder of normal volumes
Options: --repeat N (warm passes; the best is reported), --keep (leave the cache folder and print its path).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [str(REPO / "bundle" / "configs" / "common.json"), str(REPO / "bundle" / "configs" / "train.json")]


def one_pass(dataset_dir: str | None, output_dir: str) -> dict[str, float]:
    """Seconds to build the training set, draw its first batch, and build the validation set."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(CONFIGS)
    parser.update({"bundle_root": str(REPO / "bundle"), "output_dir": output_dir, "dataset_dir": dataset_dir})
    parser.get_parsed_content("data#lists")  # finds the files (and makes the demo data on first use): not timed
    t0 = time.perf_counter()
    loader = parser.get_parsed_content("train#dataloader")
    t1 = time.perf_counter()
    next(iter(loader))
    t2 = time.perf_counter()
    parser.get_parsed_content("validate#volumes")
    t3 = time.perf_counter()
    return {"training set": t1 - t0, "first batch": t2 - t1, "validation set": t3 - t2, "total": t3 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", default=None, help="folder of normal volumes (default: the embedded demo data)")
    ap.add_argument("--repeat", type=int, default=2, help="warm passes (best reported)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary cache folder")
    args = ap.parse_args()

    cache = Path(tempfile.mkdtemp(prefix="dnprd_cache_bench_"))
    os.environ["MONAI_DNPRD_CACHE_DIR"] = str(cache)
    with tempfile.TemporaryDirectory() as out:
        cold = one_pass(args.dataset_dir, out)
        warm = [one_pass(args.dataset_dir, out) for _ in range(max(1, args.repeat))]
    best = {k: min(w[k] for w in warm) for k in cold}
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20
    print(f"\n| step | empty cache | filled cache (best of {len(warm)}) |")
    print("|---|---|---|")
    for k in cold:
        print(f"| {k} | {cold[k]:.2f} s | {best[k]:.2f} s |")
    print(f"\ncache folder: {size:.1f} MiB; first batch reached {cold['total'] / max(best['total'], 1e-9):.1f}x sooner")
    if args.keep:
        print(f"kept: {cache}")
    else:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
