"""Tests of monai_dnprd.visualize: display orientation, slice choice, overlays, HTML index, report handler, curves."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy.ndimage import gaussian_filter

from monai_dnprd.visualize import (
    ReportWriter,
    auto_window,
    display_slice,
    montage,
    orthogonal_views,
    point_to_ras,
    prototype_assignment_map,
    prototype_figure,
    read_training_log,
    resolve_window,
    to_ras,
    top_slices,
    training_curves,
    write_index_html,
)

DEMO = Path(__file__).parents[1] / "monai_dnprd" / "demo_data"
IXI = DEMO / "IXI012-HH-1211_T1.nii.gz"  # stored PSR


def _ras_affine(shape, spacing=(2.0, 2.0, 2.0)):
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -0.5 * np.asarray(shape) * np.asarray(spacing)
    return aff


def _reoriented(arr, aff, codes):
    """The same image stored with other axis codes (nibabel reorientation, exact)."""
    img = nib.Nifti1Image(arr, aff).as_reoriented(
        nib.orientations.ornt_transform(nib.orientations.io_orientation(aff), nib.orientations.axcodes2ornt(codes))
    )
    return np.asarray(img.dataobj), img.affine


def test_display_invariant_to_input_orientation():
    img = nib.load(str(IXI))
    arr, aff = np.asarray(img.dataobj, dtype=np.float32), img.affine
    assert nib.aff2axcodes(aff) == ("P", "S", "R")
    ras = nib.as_closest_canonical(nib.Nifti1Image(arr, aff))
    arr_ras, aff_ras = np.asarray(ras.dataobj), ras.affine
    arr_lpi, aff_lpi = _reoriented(arr, aff, ("L", "P", "I"))
    shape = to_ras(arr, aff)[0].shape
    for axis_name, ax in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        for index in (shape[ax] // 3, shape[ax] // 2):
            ref = display_slice(arr, aff, axis_name, index)
            np.testing.assert_array_equal(ref, display_slice(arr_ras, aff_ras, axis_name, index))
            np.testing.assert_array_equal(ref, display_slice(arr_lpi, aff_lpi, axis_name, index))


def test_display_convention_radiological():
    """A marker at the subject's right-anterior-superior shows top-left in axial and coronal views."""
    shape = (20, 24, 16)
    arr = np.zeros(shape, np.float32)
    arr[17, 20, 12] = 1.0  # RAS: right (high x), anterior (high y), superior (high z)
    aff = _ras_affine(shape)
    for a, f in ((arr, aff), _reoriented(arr, aff, ("P", "S", "R")), _reoriented(arr, aff, ("L", "I", "A"))):
        ax2d = display_slice(a, f, "axial", 12)
        r, c = np.argwhere(ax2d)[0]
        assert r < ax2d.shape[0] / 2 and c < ax2d.shape[1] / 2  # anterior up, subject's right on the left
        co = display_slice(a, f, "coronal", 20)
        r, c = np.argwhere(co)[0]
        assert r < co.shape[0] / 2 and c < co.shape[1] / 2  # superior up, right on the left
        sa = display_slice(a, f, "sagittal", 17)
        r, c = np.argwhere(sa)[0]
        assert r < sa.shape[0] / 2 and c < sa.shape[1] / 2  # superior up, anterior on the left
    assert display_slice(arr, aff, "axial", 12, radiological=False)[3, 17] == 1.0  # neurological: right on right


def test_point_to_ras_matches_reorientation():
    arr = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    aff = np.array([[0, 0, -2, 0], [-2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]], float)  # P S L-ish
    ras, _ = to_ras(arr, aff)
    p = (1, 5, 3)
    assert ras[point_to_ras(p, aff, arr.shape)] == arr[p]


def test_windows():
    arr = np.concatenate([np.zeros(1000), np.linspace(10, 110, 1028)]).reshape(6, 13, 26).astype(np.float32)
    lo, hi = auto_window(arr)
    assert 10 <= lo < 12 and 108 < hi <= 110  # background zeros ignored
    assert resolve_window("bone", arr) == (400 - 900, 400 + 900)
    assert resolve_window((0, 5), arr) == (0.0, 5.0)
    with pytest.raises(ValueError):
        resolve_window("nope", arr)


def _lesion_case(aff=None):
    shape = (40, 40, 30)
    aff = _ras_affine(shape) if aff is None else aff
    zz = np.indices(shape)
    fg = ((zz[0] - 20) ** 2 + (zz[1] - 20) ** 2 < 15**2)
    image = (fg * 100.0 + 5 * np.random.default_rng(1).random(shape)).astype(np.float32)
    lesion = ((zz[0] - 25) ** 2 + (zz[1] - 18) ** 2 + (zz[2] - 8) ** 2 <= 9)  # z = 5..11
    amap = gaussian_filter(lesion.astype(np.float32), 1.5) * fg + 0.01 * fg  # 0 outside the foreground
    return image, aff, amap.astype(np.float32), lesion


def test_top_slices_pick_lesion_and_montage_titles():
    image, aff, amap, lesion = _lesion_case()
    idx = top_slices(amap, aff, k=3)
    assert idx[0] == 8 and len(set(idx)) == 3 and all(5 <= i <= 11 for i in idx)
    fig = montage(image, aff, amap, lesion, k=3, score=0.5, title="case")
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert [int(re.search(r"axial (\d+)", t).group(1)) for t in titles] == idx
    assert "0.5" in fig._suptitle.get_text()
    # the same volume stored upside down (z flipped): indices still count in RAS
    flip = aff @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 29], [0, 0, 0, 1]], float)
    assert top_slices(amap[:, :, ::-1], flip, k=3) == idx


def test_overlay_hidden_outside_foreground():
    image, aff, amap, lesion = _lesion_case()
    fig = orthogonal_views(image, aff, amap, lesion, map_vmin=0.0)
    ax = fig.axes[0]
    assert ax.get_title().startswith("axial 8")  # through the map maximum
    overlay = ax.images[1].get_array()
    expected_hidden = display_slice(amap, aff, "axial", 8) <= 0
    assert expected_hidden.any() and (~expected_hidden).any()
    np.testing.assert_array_equal(np.ma.getmaskarray(overlay), expected_hidden)
    assert ax.collections, "the label contour is drawn"
    fig2 = orthogonal_views(image, aff, amap, threshold=0.2)
    hidden2 = np.ma.getmaskarray(fig2.axes[0].images[1].get_array())
    assert hidden2.sum() > expected_hidden.sum()
    fig3 = orthogonal_views(image, aff, point=(20, 20, 3))
    assert [a.get_title() for a in fig3.axes[:3]] == ["axial 3", "coronal 20", "sagittal 20"]


def test_index_html_sorted_and_escaped(tmp_path):
    (tmp_path / "b.png").write_bytes(b"png")
    rows = [
        {"name": "a", "score": 0.1},
        {"name": "b", "score": "0.9", "anomalous": "yes", "normalised_score": "3.2"},
        {"name": "<script>x&y", "score": 0.5},
        {"name": "broken", "score": None, "error": "cannot read: <bad>"},
    ]
    text = write_index_html(tmp_path, rows).read_text()
    assert "<script>" not in text and "&lt;script&gt;x&amp;y" in text and "&lt;bad&gt;" in text
    order = [text.index(s) for s in ("<td>b</td>", "<td>&lt;script&gt;x&amp;y</td>", "<td>a</td>", "broken")]
    assert order == sorted(order)
    assert 'href="b.png"' in text and "normalised score" in text and "anomalous" in text


def _write_nifti(path, arr, aff):
    nib.save(nib.Nifti1Image(arr, aff), str(path))
    return str(path)


def test_report_writer_on_ignite_engine(tmp_path, caplog):
    from ignite.engine import Engine

    image, aff, amap, lesion = _lesion_case()
    # stored PSR, like the demo subjects: the handler must re-read the image in its own grid
    img_psr, aff_psr = _reoriented(image, aff, ("P", "S", "R"))
    map_psr, _ = _reoriented(amap, aff, ("P", "S", "R"))
    lab_psr, _ = _reoriented(lesion.astype(np.uint8), aff, ("P", "S", "R"))
    img_path = _write_nifti(tmp_path / "case1.nii.gz", img_psr.astype(np.float32), aff_psr)
    lab_path = _write_nifti(tmp_path / "case1_label.nii.gz", lab_psr.astype(np.uint8), aff_psr)
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("name,score,normalised_score,volume_threshold,anomalous\ncase1,0.9,4.0,0.5,yes\n")
    items = [
        {"name": "case1", "pred": MetaTensor(torch.from_numpy(map_psr[None].copy()), affine=torch.as_tensor(aff_psr)),
         "score": 0.9, "label": lab_path, "image_path": img_path},
        {"name": "lost<&>", "pred": MetaTensor(torch.zeros(1, 4, 4, 4)), "score": 0.2,
         "image_path": str(tmp_path / "missing.nii.gz")},
        {"name": "bad", "error": "cannot read"},
    ]
    engine = Engine(lambda e, batch: batch)
    ReportWriter(out, k=3).attach(engine)
    with caplog.at_level(logging.WARNING):
        engine.run(items, max_epochs=1)
    assert (out / "report" / "case1.png").stat().st_size > 1000
    assert not (out / "report" / "lost<&>.png").exists()
    assert any("lost<&>" in r.getMessage() for r in caplog.records)
    text = (out / "report" / "index.html").read_text()
    assert text.index("case1") < text.index("lost&lt;&amp;&gt;") < text.index("bad")
    assert 'class="anom"' in text and ">4<" in text and 'href="case1.png"' in text


def test_training_curves(tmp_path):
    recs = [
        {"iteration": 1, "loss": 0.3, "mim": 0.3, "stage": 0.0, "lr_encoder": 1e-3},
        {"iteration": 20, "loss": 0.05, "sm": 0.01, "daa": 0.1, "teacher_spread": 2.0, "prototypes_used": 5.0,
         "stage": 1.0, "lr_encoder": 1e-5},
        {"iteration": 20, "val_voxel_ap": 0.4, "val_slice_auroc": 0.8, "val_volume_auroc": float("nan")},
    ]
    lines = [json.dumps(r) for r in recs]
    lines.insert(2, '{"iteration": 25, "loss"')  # half-written line of a killed run
    (tmp_path / "training_log.jsonl").write_text("\n".join(lines) + "\n")
    log = read_training_log(tmp_path)
    assert log["iteration"] == [1, 20, 20] and len(log["val_voxel_ap"]) == 3
    assert np.isnan(log["loss"][2]) and log["val_voxel_ap"][2] == 0.4
    fig = training_curves(tmp_path)
    assert len(fig.axes) >= 6 and fig.axes[0].get_yscale() == "log"
    with pytest.raises(FileNotFoundError):
        read_training_log(tmp_path / "nope")


def test_prototype_assignments_and_figure():
    from monai_dnprd.networks import DNPConFormer

    torch.manual_seed(0)
    net = DNPConFormer(img_size=32, patch_size=8, in_channels=3, vit="tiny", embed_dim=24, depth=2, num_heads=2,
                       num_register_tokens=0, num_prototypes=4)
    x = torch.rand(2, 3, 40, 40)  # resized to 32 inside
    a = prototype_assignment_map(net, x)
    assert a.shape == (2, 4, 4) and a.dtype == np.int64 and a.min() >= 0 and a.max() < 4
    fig = prototype_figure(x, a, 4)
    assert len(fig.axes) >= 3
