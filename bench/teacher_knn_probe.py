"""Is the representation or the decoder the limit? Score the test set by nearest normal teacher features.

The DNP map is the decoder's reconstruction error on the teacher's features. This probe scores the same
teacher features without the decoder: each token's distance to its nearest neighbour in a bank of teacher
tokens from normal volumes (1 - the largest cosine, per feature group, averaged over the groups; PatchCore's
score with k = 1). The map is then upsampled, blurred, inverted and evaluated exactly like the model's own map
(the bundle's evaluation workflow, only the slice maps differ), and both are printed side by side.

    python bench/teacher_knn_probe.py --ckpt runs/demo/models/model.pt       # the demo: bank = its training data
    python bench/teacher_knn_probe.py --ckpt RUN/train/models/model.pt --bank RUN/normal \\
        --input_dir RUN/test --label_dir RUN/labels                          # a bench/tcga_protocol.py run
    python bench/teacher_knn_probe.py --ckpt WARM/models/model.pt --student  # a warm-up-only run (see --student)

The last form measures the masked-image warm-up on its own, in a quarter of the time of a full run: train with
``--num_iterations N --warmup_iterations N --val_interval 100000`` (the first N iterations are then those of a
full run with warm-up N) and score the student's features.

Where the nearest-neighbour score beats the model's map, the teacher features separate the lesions and the
decoder is what loses them; where it does not, the features themselves are the limit (or the normal data do
not cover the test anatomy, which hurts a nearest-neighbour score most). ``--gauss`` adds a third score, the
Mahalanobis distance of each teacher token to one Gaussian fitted on all normal tokens (a global density
model; it ignores where in the image a token lies). Writes OUT/knn/, OUT/dnp/ and with ``--gauss`` OUT/gauss/
(each an evaluation folder with metrics.json) and OUT/probe.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


def _workflow(ckpt: str, out: Path, **overrides):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(config_file=str(CONFIGS / "evaluate.json"), workflow_type=None, run_id="evaluating",
                          meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
                          bundle_root=str(REPO / "bundle"), ckpt_path=ckpt, output_dir=str(out), report="false",
                          **overrides)


def teacher_tokens(wf, volumes: list[dict]) -> list[torch.Tensor]:
    """Teacher tokens ``(n, C)`` per feature group over all foreground slices of ``volumes`` (datalist entries of
    ``monai_dnprd.io.find_volumes``)."""
    from monai_dnprd.transforms.array import gather_slice_stacks

    network = wf.parser.get_parsed_content("network")
    inferer = wf.parser.get_parsed_content("inferer")
    preprocessing = wf.parser.get_parsed_content("preprocessing")
    k = wf.parser.get_parsed_content("params")["k"]
    banks: list[list[torch.Tensor]] = []
    network.eval()
    with torch.inference_mode():
        for entry in volumes:
            d = preprocessing(dict(entry))
            vol, mask = d["image"].as_tensor().float(), d["mask"].as_tensor().bool()
            idx = torch.nonzero(mask[0].reshape(-1, mask.shape[-1]).any(0)).flatten()
            for start in range(0, idx.numel(), inferer.batch_size):
                out = network(inferer.resize(gather_slice_stacks(vol, idx[start : start + inferer.batch_size], k)))
                for g, t in enumerate(out.targets):
                    if len(banks) <= g:
                        banks.append([])
                    banks[g].append(t.float().flatten(2).transpose(1, 2).reshape(-1, t.shape[1]))
    return [torch.cat(b) for b in banks]


def knn_bank(tokens: list[torch.Tensor], size: int, seed: int = 0) -> list[torch.Tensor]:
    """A random subset of ``size`` tokens per group, L2-normalised (the nearest-neighbour bank)."""
    keep = torch.randperm(tokens[0].shape[0], generator=torch.Generator().manual_seed(seed))[:size]
    return [F.normalize(t[keep], dim=-1) for t in tokens]


def gaussian_fit(tokens: list[torch.Tensor], shrinkage: float = 1e-3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per group: mean and a whitening matrix ``L`` (``L L^T`` = inverse covariance, shrunk toward a scaled
    identity), so that ``||(x - mean) @ L||`` is the Mahalanobis distance to the normal tokens."""
    fits = []
    for t in tokens:
        x = t.double()
        mean = x.mean(0)
        cov = torch.cov(x.T)
        c = cov.shape[0]
        cov = cov + shrinkage * cov.trace() / c * torch.eye(c, dtype=cov.dtype)
        fits.append((mean.float(), torch.linalg.cholesky(torch.linalg.inv(cov)).float()))
    return fits


def token_score_inferer(base, score):
    """A copy of the workflow's inferer whose slice maps come from ``score(group, tokens (n, C)) -> (n,)`` on the
    teacher tokens, averaged over the groups and upsampled and blurred like the model's own map."""
    from monai_dnprd.anomaly_map import upsample_blur
    from monai_dnprd.inferer import DNPVolumeInferer

    class TokenScoreInferer(DNPVolumeInferer):
        def slice_maps(self, network, stack, out_size):
            out = network(self.resize(stack))
            maps = []
            for g, t in enumerate(out.targets):
                n, c, h, w = t.shape
                maps.append(score(g, t.float().flatten(2).transpose(1, 2).reshape(-1, c)).reshape(n, h, w))
            sigma = self.sigma * max(out_size) / self.img_size
            return upsample_blur(torch.stack(maps).mean(0), tuple(out_size), sigma).unsqueeze(1).cpu()

    return TokenScoreInferer(base.img_size, base.k, base.axis, base.batch_size, base.sigma, base.z_sigma, base.precision)


def knn_score(bank: list[torch.Tensor], chunk: int = 4096):
    """1 - the largest cosine of each token to the group's bank (nearest-neighbour distance)."""
    def score(g: int, tokens: torch.Tensor) -> torch.Tensor:
        tok = F.normalize(tokens, dim=-1)
        return 1.0 - torch.cat([(part @ bank[g].T).amax(1) for part in tok.split(chunk)])

    return score


def gauss_score(fits: list[tuple[torch.Tensor, torch.Tensor]]):
    """Mahalanobis distance of each token to the group's normal Gaussian."""
    def score(g: int, tokens: torch.Tensor) -> torch.Tensor:
        mean, whiten = fits[g]
        return ((tokens - mean) @ whiten).norm(dim=1)

    return score


def probe_inputs(bank: str | None, input_dir: str | None, label_dir: str | None) -> tuple[Path, list[dict], dict]:
    """The normal bank folder, its volumes (datalist) and the test folders, the demo's where not given."""
    from monai_dnprd import demo
    from monai_dnprd.io import find_volumes

    dirs = demo.prepare_demo_data() if bank is None or input_dir is None else {}
    bank_dir = Path(bank) if bank else dirs["train"]
    data = {"input_dir": input_dir or str(dirs["test_images"]), "label_dir": label_dir or str(dirs["test_labels"])}
    volumes, problems = find_volumes(bank_dir)
    if problems or not volumes:
        raise SystemExit(f"bank folder {bank_dir}: " + ("; ".join(map(str, problems)) or "no volumes found"))
    return bank_dir, volumes, data


def summary(metrics_path: Path) -> dict:
    m = json.loads(metrics_path.read_text())
    chance = m["voxel"]["chance_ap"]
    kinds = {k: round(v["auroc"], 3) for k, v in m["per_volume"].items() if v["n_lesion_voxels"]}
    return {"voxel_auroc": m["voxel"]["auroc"], "voxel_ap": m["voxel"]["ap"], "chance_ap": chance,
            "ap_x_chance": m["voxel"]["ap"] / chance if chance else float("nan"),
            "voxel_best_dice": m["voxel"]["best_dice"], "slice_auroc": m["slice"]["auroc"], "per_volume_auroc": kinds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="exported model (models/model.pt of a training run)")
    ap.add_argument("--bank", default=None, help="folder of normal volumes for the bank (default: the demo's training data)")
    ap.add_argument("--input_dir", default=None, help="test volumes (default: the demo's)")
    ap.add_argument("--label_dir", default=None, help="their lesion masks (default: the demo's)")
    ap.add_argument("--bank_size", type=int, default=40000, help="tokens kept in the bank (random subset)")
    ap.add_argument("--student", action="store_true",
                    help="score the student encoder's features instead of the teacher's (for a run stopped at the end "
                         "of the warm-up, e.g. --num_iterations N --warmup_iterations N: its teacher is still random)")
    ap.add_argument("--gauss", action="store_true",
                    help="also score each teacher token by its Mahalanobis distance to a Gaussian fitted on all bank "
                         "tokens (mean and covariance per feature group; a density score instead of a neighbour one)")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = ap.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="knn_probe_"))
    bank_dir, volumes, data = probe_inputs(args.bank, args.input_dir, args.label_dir)

    results = {}
    if args.student:  # the teacher becomes a copy of the student; the decoder's map means nothing then
        from monai_dnprd.checkpoint import load_model
        from monai_dnprd.networks.ema import ema_update

        network = load_model(args.ckpt)[0]
        ema_update(network.teacher, network.encoder, beta=0.0)
        data["network"] = network
    else:
        wf = _workflow(args.ckpt, out / "dnp", **data)
        wf.initialize()
        wf.run()
        wf.finalize()
        results["dnp"] = summary(out / "dnp" / "metrics.json")

    wf = _workflow(args.ckpt, out / "knn", **data)
    wf.initialize()
    tokens = teacher_tokens(wf, volumes)
    wf.finalize()
    base = wf.parser.get_parsed_content("inferer")
    bank = knn_bank(tokens, args.bank_size)
    scorers = {"knn": token_score_inferer(base, knn_score(bank))}
    if args.gauss:
        scorers["gauss"] = token_score_inferer(base, gauss_score(gaussian_fit(tokens)))
    del tokens
    for name, inferer in scorers.items():
        wf = _workflow(args.ckpt, out / name, inferer=inferer, **data)
        wf.initialize()
        wf.run()
        wf.finalize()
        results[name] = summary(out / name / "metrics.json")
    results["bank"] = {"folder": str(bank_dir), "volumes": len(volumes), "tokens": int(bank[0].shape[0])}
    (out / "probe.json").write_text(json.dumps(results, indent=1))
    for name in ("dnp", "knn", "gauss"):
        if name not in results:
            continue
        r = results[name]
        print(f"{name}: voxel AUROC {r['voxel_auroc']:.3f}  AP {r['voxel_ap']:.4f} ({r['ap_x_chance']:.1f}x chance "
              f"{r['chance_ap']:.4f})  best Dice {r['voxel_best_dice']:.3f}  slice AUROC {r['slice_auroc']:.3f}  "
              f"per volume {r['per_volume_auroc']}")


if __name__ == "__main__":
    main()
