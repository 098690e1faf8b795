"""Probe: does the warm-up or the DNP stage decide a TCGA model? Runs that share one seed's warm-up and differ only
in the DNP stage's random draws, or the reverse.

At the end of the warm-up (iteration ``warmup_iterations``) a handler reseeds every random source of training with
``--fork``: the global generators (``monai.utils.set_determinism``; the loader's shuffling draws from them), the
slice sampler and the slice augmentation. Everything before follows ``--seed``. Seed 0 with forks 101 / 102 / 103
shares one warm-up; seeds 0 / 1 / 2 with fork 101 share the DNP stage's seeds after three warm-ups; with ``--at 1``
runs share only the initialisation (and the first batch).
Needs a work folder of the TCGA protocol (its normal slabs, test volume and labels), made by e.g.
``python bench/tcga_protocol.py --only 0 --out OUT``.

    python bench/experiments/fork_seed.py --work OUT/TCGA-DU-7294-TCGA-FG-6692 --seed 0 --fork 101 --out FORK

Prints the forked model's voxel AP and best Dice on the test case (docs/research_log.md, "FORK").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from ignite.engine import Engine, Events

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from tcga_protocol import brain_mask, case_metrics, run_bundle  # noqa: E402

logger = logging.getLogger("monai_dnprd")


class ForkSeed:
    """Reseeds the global generators and ``transforms`` with ``seed`` once, after iteration ``at``."""

    def __init__(self, at: int, seed: int, transforms: Sequence[Any] = ()) -> None:
        self.at, self.seed, self.transforms = int(at), int(seed), list(transforms)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.at), self._fork)

    def _fork(self, engine: Engine) -> None:
        from monai.utils import set_determinism

        set_determinism(seed=self.seed)
        for t in self.transforms:
            t.set_random_state(seed=self.seed)
        logger.info("random state reseeded with %d after iteration %d", self.seed, self.at)


def train_forked(work: Path, out: Path, seed: int, fork: int, iterations: int, warmup: int, at: int | None = None) -> Path:
    """The bundle's training workflow on ``work/normal`` (as the protocol trains), reseeded after iteration ``at``
    (default: the warm-up's last)."""

    def attach_fork(wf: Any) -> None:  # after initialize (set_determinism(seed)): the network is built now, as in a run
        trainer = wf.parser.get_parsed_content("train#trainer")
        transforms = [wf.parser.get_parsed_content(k) for k in ("slice_sampler", "slice_transforms")]
        ForkSeed(warmup if at is None else at, fork, transforms).attach(trainer)

    run_bundle("training", setup=attach_fork, dataset_dir=str(work / "normal"),
               val_dir=str(work / "normal"), output_dir=str(out / "train"), num_iterations=iterations,
               warmup_iterations=warmup, seed=seed)
    return out / "train" / "models" / "model.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="a TCGA protocol work folder (normal/, test/, labels/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0, help="seed of everything up to the end of the warm-up")
    ap.add_argument("--fork", type=int, required=True, help="seed of the DNP stage's random draws")
    ap.add_argument("--iterations", type=int, default=700)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--at", type=int, help="reseed after this iteration instead (1: runs share only the initialisation)")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    for sub in ("normal", "test", "labels"):
        if not (work / sub).is_dir():
            raise SystemExit(f"{work / sub}: not found; make the work folder with bench/tcga_protocol.py first")
    ckpt = train_forked(work, out, args.seed, args.fork, args.iterations, args.warmup, args.at)
    run_bundle("evaluating", input_dir=str(work / "test"), label_dir=str(work / "labels"),
               output_dir=str(out / "eval"), ckpt_path=str(ckpt), report="false")
    model_map = np.asarray(nib.load(str(out / "eval" / "case.nii.gz")).dataobj, dtype=np.float32)
    label = np.asarray(nib.load(str(work / "labels" / "case.nii.gz")).dataobj) > 0
    result = {"seed": args.seed, "fork": args.fork, "at": args.at or args.warmup, **case_metrics(model_map, label, brain_mask(work / "test" / "case.nii.gz"))}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"seed {args.seed}, reseeded {args.fork} after iteration {args.at or args.warmup}: voxel AP {result['voxel_ap']:.3f}, "
          f"best Dice {result['voxel_best_dice']:.3f}")


if __name__ == "__main__":
    main()
