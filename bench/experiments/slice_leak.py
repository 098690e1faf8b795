"""Probe: does a lesion raise the map of normal tissue far from it in its own slices, and through which path?

Maps the labelled test volume's slices (one grid phase, the bundle's preprocessing, map statistics refitted on the
normal training volumes) and prints the feature part's z-score (``AnomalyMapper.part_zscores``) and the map on
normal foreground more than ``--far`` pixels (preprocessed grid) from the lesion, in the lesion's slices and in
the others, and on the lesion. ``--paths`` adds counterfactuals that read the label: ``clean_prototypes``
(prototypes read only from tokens that do not touch the lesion; ``prototype_leak.py`` scores that oracle on voxel
metrics), ``blind_student`` (the student never sees those tokens; the teacher still does), ``blind_teacher`` and
``blind_both``. ``--paint R`` instead paints one hyperintense ``SyntheticLesion`` of radius R mm into a tumour-free
volume and compares the same slices with and without it (no label needed): does a synthetic lesion leak as the
real one does?

    python bench/experiments/slice_leak.py --ckpt RUN/models/model.pt --train NORMAL --test CASE.nii.gz \\
        (--label LABEL.nii.gz [--paths] | --paint 20)
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from map_variants import bundle_parser, inference_pipeline  # noqa: E402
from prototype_leak import lesion_tokens  # noqa: E402

from monai_dnprd.calibration import fit_map_statistics  # noqa: E402
from monai_dnprd.transforms.array import ResizeSlices, SyntheticLesion, gather_slice_stacks  # noqa: E402


def lesion_paths(net, lesion_tokens: dict, path: str):
    """Patch ``net`` so that the prototypes (``clean_prototypes``), the student (``blind_student``), the teacher
    (``blind_teacher``) or both encoders (``blind_both``) skip the tokens in ``lesion_tokens['now']`` ((B, N) bool,
    tiled over the inference passes); ``default`` patches nothing. Returns an undo function."""
    extractor, student, teacher = net.extractor.forward, net._student, net.teacher.forward

    def tiled(n):
        t = lesion_tokens["now"]
        return t.repeat(n // t.shape[0], 1)

    if path == "clean_prototypes":
        net.extractor.forward = lambda f, visible=None: extractor(
            f, ~tiled(f.shape[0]) if visible is None else visible.bool() & ~tiled(f.shape[0]))
    if path in ("blind_student", "blind_both"):
        net._student = lambda x, mask, grid: student(x, tiled(x.shape[0]) if mask is None else mask.bool() | tiled(x.shape[0]), grid)
    if path in ("blind_teacher", "blind_both"):
        net.teacher.forward = lambda x, taps, mask=None: teacher(x, taps, mask=tiled(x.shape[0]))

    def undo():
        net.extractor.forward, net._student, net.teacher.forward = extractor, student, teacher

    return undo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--train", required=True, help="normal training volumes (to refit the map statistics)")
    ap.add_argument("--test", required=True, help="one test volume")
    ap.add_argument("--label", help="its lesion label (or --paint)")
    ap.add_argument("--paint", type=float, help="paint a synthetic hyperintense lesion of this radius (mm) instead")
    ap.add_argument("--far", type=float, default=20.0, help="pixels of the preprocessed slice (default 20)")
    ap.add_argument("--paths", action="store_true", help="also the clean_prototypes, blind_student, blind_teacher and blind_both counterfactuals")
    args = ap.parse_args()
    if (args.label is None) == (args.paint is None):
        ap.error("give exactly one of --label and --paint")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    mapper, prm, pre, _, _ = inference_pipeline(args.ckpt)
    mapper.eval()
    fit_map_statistics(mapper, [pre({"image": f}) for f in sorted(glob.glob(f"{args.train}/*.nii.gz"))],
                       prm["k"], prm["img_size"])
    if args.paint is None:
        d = bundle_parser(args.ckpt, carry=("label",)).get_parsed_content("preprocessing")(
            {"image": args.test, "label": args.label})
        img, lab, fg = (torch.as_tensor(d[k]).float() for k in ("image", "label", "mask"))
        clean = None
    else:
        d = pre({"image": args.test})
        clean, fg = (torch.as_tensor(d[k]).float() for k in ("image", "mask"))
        lesioner = SyntheticLesion(("hyper",), 1, (args.paint, args.paint), (0.6, 0.6), min_depth_mm=15.0)
        lesioner.set_random_state(1)
        img, lab = (torch.as_tensor(t).float() for t in lesioner(d["image"], d["mask"]))
    net, resize, p = mapper.network, ResizeSlices(prm["img_size"]), mapper.network.encoder.patch_size
    slices = [z for z in range(img.shape[-1]) if fg[0, ..., z].mean() > 0.15]
    lesion_slices = [z for z in slices if lab[0, ..., z].any()]
    other = [z for z in slices if z not in lesion_slices]
    tokens: dict = {}

    def pixels(vol, idx):
        return resize(gather_slice_stacks(vol, idx, 0))[:, 0]

    def measure(zs, path="default", image=None):
        image = img if image is None else image
        undo = lesion_paths(net, tokens, path)
        zf_all, m_all, sel_far, sel_lesion = [], [], [], []
        try:
            for chunk in torch.tensor(zs).split(16):
                lesion = pixels(lab, chunk) > 0.01
                tokens["now"] = lesion_tokens(lab, chunk, prm["img_size"], p, axis=-1)
                with torch.inference_mode():
                    feature, pixel = mapper.parts(net(resize(gather_slice_stacks(image, chunk, prm["k"]))).float())
                    zf, zp = mapper.part_zscores(feature, pixel)
                dist = torch.as_tensor(np.stack([ndi.distance_transform_edt(~m.numpy()) if m.any()
                                                 else np.full(m.shape, np.inf) for m in lesion]))
                inside = pixels(fg, chunk) > 0.5
                zf_all.append(zf), m_all.append(mapper.combine(feature, pixel))
                sel_far.append(inside & ~lesion & (dist > args.far)), sel_lesion.append(inside & lesion)
        finally:
            undo()
        zf, m, far, les = (torch.cat(t) for t in (zf_all, m_all, sel_far, sel_lesion))
        return zf, m, far, les

    zf, m, far, _ = measure(other)
    print(f"other slices ({len(other)}): normal feature z {zf[far].mean():.3f}, map {m[far].mean():.3f}")
    for path in ["default", *(["clean_prototypes", "blind_student", "blind_teacher", "blind_both"] if args.paths else [])]:
        zf, m, far, les = measure(lesion_slices, path)
        print(f"lesion slices ({len(lesion_slices)}), {path}: normal > {args.far:g} px from the lesion: feature z "
              f"{zf[far].mean():.3f}, map {m[far].mean():.3f}; lesion: feature z {zf[les].mean():.3f}, map {m[les].mean():.3f}",
              flush=True)
    if clean is not None:
        zf, m, far, les = measure(lesion_slices, image=clean)
        print(f"the same slices without the painted lesion: normal > {args.far:g} px from it: feature z "
              f"{zf[far].mean():.3f}, map {m[far].mean():.3f}; its place: feature z {zf[les].mean():.3f}", flush=True)


if __name__ == "__main__":
    main()
