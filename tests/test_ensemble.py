"""Ensembles of checkpoints: scale maths, checkpoint lists and globs, member checks, and the bundle workflows."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, root_message, run_workflow
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from monai_dnprd.anomaly_map import AnomalyMapper
from monai_dnprd.calibration import Calibration
from monai_dnprd.checkpoint import CheckpointError, export_model
from monai_dnprd.ensemble import EnsembleInferer, checkpoint_paths, ensemble_network, load_models, volume_inferer
from monai_dnprd.inferer import DNPVolumeInferer
from monai_dnprd.networks import DNPConFormer
from monai_dnprd.transforms import BiasFieldCorrectiond

PARAMS = {"modality": "mri", "k": 1, "img_size": 16, "margin": 4, "spacing": None, "z_sigma": 0.0, "score_q": 0.01}


def tiny_net(seed: int, sigma: float = 1.0, in_channels: int = 3) -> AnomalyMapper:
    """A tiny mapper (cosine map, no statistics needed) around a 16 px DNP-ConFormer with 2 x 2 tokens."""
    torch.manual_seed(seed)
    net = DNPConFormer(img_size=16, patch_size=8, in_channels=in_channels, vit="tiny", depth=2,
                       num_register_tokens=0, mask_block=1)
    return AnomalyMapper(net, metric="cosine", sigma=sigma).eval()


def save_member(folder: Path, seed: int, q99: float | None = 0.5, sigma: float = 1.0, **params) -> Path:
    """An exported tiny model, with a calibration whose 99th percentile of normal voxel scores is ``q99``."""
    path = export_model(folder / "model.pt", tiny_net(seed, sigma), {**PARAMS, **params})
    if q99 is not None:
        values = np.linspace(0.0, q99 / 0.99, 10001)  # uniform normal scores: q99 == q99
        Calibration.from_scores([values], [q99]).save(folder / "calibration.json")
    return path


@pytest.fixture
def volume():
    torch.manual_seed(2)
    vol = MetaTensor(torch.rand(1, 20, 20, 7), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    mask = torch.zeros(1, 20, 20, 7, dtype=torch.uint8)
    mask[:, 4:16, 4:16, 1:6] = 1
    return vol, mask


def test_ensemble_map_is_the_mean_of_member_maps_in_normal_units(volume):
    vol, mask = volume
    nets = [tiny_net(0, sigma=1.0), tiny_net(1, sigma=0.0)]
    inferers = [DNPVolumeInferer(img_size=16, k=1), DNPVolumeInferer(img_size=16, k=1, z_sigma=1.0)]
    maps = [inf(vol, net, mask=mask) for inf, net in zip(inferers, nets)]
    out = EnsembleInferer(inferers, [0.5, 2.0])(vol, torch.nn.ModuleList(nets), mask=mask)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, vol.affine) and out.shape == vol.shape
    torch.testing.assert_close(out.as_tensor(), ((maps[0] / 0.5 + maps[1] / 2.0) / 2).as_tensor())
    assert float(out[mask == 0].abs().max()) == 0.0 and float(out[mask > 0].max()) > 0.0
    # one member: its map in units of its normal 99th percentile
    single = EnsembleInferer(inferers[:1], [0.5])(vol, nets[0], mask=mask)
    torch.testing.assert_close(single.as_tensor(), (maps[0] * 2.0).as_tensor())


def test_ensemble_inferer_refuses_bad_scales_and_member_counts(volume):
    vol, mask = volume
    inf = DNPVolumeInferer(img_size=16, k=1)
    with pytest.raises(ValueError, match="positive"):
        EnsembleInferer([inf], [0.0])
    with pytest.raises(ValueError, match="one normal scale per inferer"):
        EnsembleInferer([inf, inf], [1.0])
    with pytest.raises(ValueError, match="2 inferers but 3 networks"):
        EnsembleInferer([inf, inf], [1.0, 1.0])(vol, torch.nn.ModuleList([tiny_net(0)] * 3), mask=mask)


def test_checkpoint_paths_accepts_a_path_a_list_and_a_glob(tmp_path):
    for name in ("b", "a", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.pt").write_bytes(b"")
    assert checkpoint_paths(str(tmp_path / "a" / "model.pt")) == [tmp_path / "a" / "model.pt"]
    assert checkpoint_paths(str(tmp_path / "*" / "model.pt")) == [tmp_path / n / "model.pt" for n in "abc"]
    assert checkpoint_paths([tmp_path / "c" / "model.pt", str(tmp_path / "[ab]" / "model.pt")]) == [
        tmp_path / n / "model.pt" for n in "cab"]
    with pytest.raises(CheckpointError, match="no checkpoint matches"):
        checkpoint_paths(str(tmp_path / "*" / "missing.pt"))
    with pytest.raises(CheckpointError, match="more than once"):
        checkpoint_paths([str(tmp_path / "a" / "model.pt"), str(tmp_path / "?" / "model.pt")])
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint_paths([])


def test_load_models_builds_an_ensemble_and_checks_its_members(tmp_path):
    dirs = [tmp_path / f"m{i}" for i in range(4)]
    for d in dirs:
        d.mkdir()
    a = save_member(dirs[0], 0, q99=0.5)
    b = save_member(dirs[1], 1, q99=2.0, sigma=3.0, img_size=16, z_sigma=2.0)
    models = load_models([a, b])
    assert [m[1]["normal_q99"] for m in models] == pytest.approx([0.5, 2.0], rel=1e-3)
    net = ensemble_network(models)
    assert isinstance(net, torch.nn.ModuleList) and all(isinstance(m, AnomalyMapper) for m in net)
    assert [m.sigma for m in net] == [1.0, 3.0]  # each member's in-plane blur belongs to its own map
    inferer = volume_inferer(models, batch_size=4)
    assert [i.z_sigma for i in inferer.inferers] == [0.0, 2.0]  # each member keeps its own z smoothing ...
    assert [i.z_sigma for i in volume_inferer(models, z_sigma=0.5).inferers] == [0.5, 0.5]  # ... unless overridden
    assert [i.batch_size for i in inferer.inferers] == [4, 4]
    # a single checkpoint is used as it is: its own network and inferer, no calibration needed
    single = load_models(str(save_member(dirs[2], 2, q99=None)))
    assert isinstance(ensemble_network(single), AnomalyMapper)
    assert type(volume_inferer(single)) is DNPVolumeInferer
    with pytest.raises(CheckpointError, match="calibration.json"):
        load_models([a, dirs[2] / "model.pt"])
    c = save_member(dirs[3], 3, modality="ct")
    with pytest.raises(CheckpointError, match=r"different modality \('ct' vs 'mri'\)"):
        load_models([a, c])


# ----------------------------------------------------------------------------------- bundle workflows
def copy_member(trained: Path, folder: Path, scale: float) -> Path:
    """A copy of the trained model whose calibration's scores are multiplied by ``scale``."""
    folder.mkdir(parents=True)
    shutil.copy(trained / "models" / "model.pt", folder / "model.pt")
    shutil.copy(trained / "models" / "model.json", folder / "model.json")
    cal = json.loads((trained / "models" / "calibration.json").read_text())
    cal["values"] = [v * scale for v in cal["values"]]
    (folder / "calibration.json").write_text(json.dumps(cal))
    return folder / "model.pt"


@pytest.mark.slow
def test_ensemble_inference_and_calibration_dir(trained, tiny_data, tmp_path):
    model = trained / "models" / "model.pt"
    run_workflow("inference.json", "inference", input_dir=str(tiny_data["test"]), output_dir=str(tmp_path / "single"),
                 ckpt_path=str(model), num_workers=0, report="false")
    copy_member(trained, tmp_path / "members" / "a", 1.0)
    copy_member(trained, tmp_path / "members" / "b", 2.0)
    out = tmp_path / "ensemble"
    run_workflow("inference.json", "inference", input_dir=str(tiny_data["test"]), output_dir=str(out),
                 ckpt_path=str(tmp_path / "members" / "*" / "model.pt"), num_workers=0)
    q99 = Calibration.load(trained / "models" / "calibration.json").voxel_threshold(0.01)
    for name in ("case_lesion", "case_normal"):
        single = nib.load(str(tmp_path / "single" / f"{name}.nii.gz"))
        ens = nib.load(str(out / f"{name}.nii.gz"))
        assert ens.shape == single.shape
        np.testing.assert_allclose(ens.affine, single.affine, atol=1e-6)
        # same weights, normal scales q99 and 2 * q99: the mean is 0.75 * map / q99
        np.testing.assert_allclose(ens.get_fdata(), 0.75 * single.get_fdata() / q99, rtol=1e-4, atol=1e-6)
        assert not (out / f"{name}_mask.nii.gz").exists()  # no calibration of the ensemble: maps only
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 2 and all(r["score"] and not r["anomalous"] for r in rows)
    assert (out / "report" / "index.html").is_file()  # the report works without thresholds too

    # --calibration_dir: the ensemble is calibrated on normal volumes, then thresholds and masks are written
    cal_out = tmp_path / "calibrated"
    run_workflow("inference.json", "inference", input_dir=str(tiny_data["test"]), output_dir=str(cal_out),
                 ckpt_path=[str(tmp_path / "members" / m / "model.pt") for m in "ab"], num_workers=0, report="false",
                 calibration_dir=str(tiny_data["val"]))
    cal = json.loads((cal_out / "calibration.json").read_text())
    assert cal["n_volumes"] == 1
    rows = list(csv.DictReader(open(cal_out / "scores.csv")))
    thr = Calibration.load(cal_out / "calibration.json").voxel_threshold(0.01)
    assert all(r["anomalous"] in {"yes", "no"} and float(r["voxel_threshold"]) == pytest.approx(thr, rel=1e-5)
               for r in rows)
    for name in ("case_lesion", "case_normal"):
        mask = np.asarray(nib.load(str(cal_out / f"{name}_mask.nii.gz")).dataobj)
        ens = nib.load(str(out / f"{name}.nii.gz")).get_fdata()
        np.testing.assert_array_equal(mask > 0, ens > thr)


@pytest.mark.slow
def test_calibration_dir_recalibrates_a_single_model_and_reports_bad_folders(trained, tiny_data, tmp_path):
    model = str(trained / "models" / "model.pt")
    normals = tmp_path / "normals"
    shutil.copytree(tiny_data["train"], normals)
    (normals / "broken.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "recal"
    run_workflow("evaluate.json", "evaluating", input_dir=str(tiny_data["test"]), label_dir=str(tiny_data["labels"]),
                 output_dir=str(out), ckpt_path=model, num_workers=0, report="false", calibration_dir=str(normals))
    new = Calibration.load(out / "calibration.json")
    assert new.volume_scores.size == 4  # the four training volumes; the broken file is skipped
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert all(float(r["voxel_threshold"]) == pytest.approx(new.voxel_threshold(0.01), rel=1e-5) for r in rows)
    assert (out / "metrics.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception) as err:
        run_workflow("inference.json", "inference", input_dir=str(tiny_data["test"]), output_dir=str(tmp_path / "x"),
                     ckpt_path=model, num_workers=0, calibration_dir=str(empty))
    assert f"{empty}: --calibration_dir: no volumes found" in root_message(err.value)
    only_broken = tmp_path / "only_broken"
    only_broken.mkdir()
    (only_broken / "broken.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(Exception) as err:
        run_workflow("inference.json", "inference", input_dir=str(tiny_data["test"]), output_dir=str(tmp_path / "y"),
                     ckpt_path=model, num_workers=0, calibration_dir=str(only_broken))
    assert "no usable calibration volume (1 failed)" in root_message(err.value)


def test_changed_map_settings_warn_that_the_training_calibration_may_not_fit(tmp_path, caplog):
    from monai_dnprd.ensemble import member_calibration_path

    models = load_models(str(save_member(tmp_path, 0)))
    with caplog.at_level("WARNING", logger="monai_dnprd"):
        assert member_calibration_path(models, z_sigma=PARAMS["z_sigma"], polarity="any") == str(
            tmp_path / "calibration.json")
    assert not caplog.records  # the training run's own settings: nothing to warn about
    with caplog.at_level("WARNING", logger="monai_dnprd"):
        member_calibration_path(models, z_sigma=3.0, polarity="dark")
    assert "not with z_sigma 3.0, polarity dark" in caplog.text


# ----------------------------------------------------------------------------------------------------- polarity
def test_polarity_weights_the_map_by_the_intensity_rank_of_the_first_channel(volume):
    from monai_dnprd.anomaly_map import intensity_rank

    vol, mask = volume
    vol2 = MetaTensor(torch.cat([vol.as_tensor(), torch.rand(1, 20, 20, 7)]), affine=vol.affine)  # two channels
    net = tiny_net(0, in_channels=6)
    kw = dict(img_size=16, k=1, batch_size=4, z_sigma=1.0)
    plain = DNPVolumeInferer(**kw)(vol2, net, mask=mask).as_tensor()
    rank = intensity_rank(vol[0], mask[0] > 0)
    bright = DNPVolumeInferer(**kw, polarity="bright")(vol2, net, mask=mask)
    dark = DNPVolumeInferer(**kw, polarity="dark")(vol2, net, mask=mask)
    assert isinstance(bright, MetaTensor) and torch.equal(bright.affine, vol.affine)
    torch.testing.assert_close(bright.as_tensor(), plain * rank[None])
    torch.testing.assert_close(dark.as_tensor(), plain * torch.where(mask > 0, 1.0 - rank[None], 0.0))
    torch.testing.assert_close(DNPVolumeInferer(**kw, polarity="any")(vol2, net, mask=mask).as_tensor(), plain)
    with pytest.raises(ValueError, match="polarity must be one of"):
        DNPVolumeInferer(**kw, polarity="hyper")


def test_volume_inferer_takes_the_models_polarity_unless_overridden(tmp_path, caplog):
    from monai_dnprd.ensemble import member_calibration_path

    paths = [save_member(tmp_path / "old", 0), save_member(tmp_path / "bright", 1, polarity="bright")]
    old, bright = load_models(str(paths[0])), load_models(str(paths[1]))  # old: no "polarity" key (made before it)
    assert volume_inferer(old).polarity == "any" and volume_inferer(bright).polarity == "bright"
    assert volume_inferer(bright, polarity="any").polarity == "any"
    assert [i.polarity for i in volume_inferer(load_models([str(p) for p in paths])).inferers] == ["any", "bright"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="monai_dnprd"):
        member_calibration_path(bright, polarity="bright")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with caplog.at_level("WARNING", logger="monai_dnprd"):
        member_calibration_path(old, polarity="bright")
    assert "not with polarity bright" in caplog.text


def test_ensemble_warns_when_overrides_change_the_maps_its_member_scales_came_from(tmp_path, caplog):
    paths = [save_member(tmp_path / "a", 0), save_member(tmp_path / "b", 1, polarity="bright")]
    models = load_models([str(p) for p in paths])
    with caplog.at_level("WARNING", logger="monai_dnprd"):
        volume_inferer(models)  # each member as trained: its scale fits its map
        volume_inferer(models, z_sigma=PARAMS["z_sigma"])  # an override equal to every member's setting
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with caplog.at_level("WARNING", logger="monai_dnprd"):
        volume_inferer(models, polarity="bright")  # member a was calibrated without the gate
    assert "ensemble with polarity bright: each member's normal scale" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="monai_dnprd"):
        volume_inferer(models, z_sigma=3.0)
    assert "ensemble with z_sigma 3.0:" in caplog.text


@pytest.mark.parametrize("override, expected", [(None, "bright"), ("any", "any")])
def test_bundle_inference_and_training_configs_pass_the_polarity_on(tmp_path, override, expected):
    from monai_dnprd.config import workflow_configs

    model = save_member(tmp_path, 0, polarity="bright")
    for workflow in ("inference", "evaluating"):
        parser = ConfigParser()
        parser.read_config(workflow_configs(BUNDLE, workflow))
        parser.update({"ckpt_path": str(model), "polarity": override, "device": "cpu"})
        assert parser.get_parsed_content("inferer").polarity == expected, workflow
    parser = ConfigParser()
    parser.read_config(workflow_configs(BUNDLE, "training"))
    parser.update({"polarity": "dark", "device": "cpu"})
    assert parser.get_parsed_content("inferer").polarity == "dark"
    assert parser.get_parsed_content("params")["polarity"] == "dark"  # exported with the model
    assert parser.get_parsed_content("lesions").lesioner.kinds == ("hypo",)  # validation seeks dark lesions


def test_validation_lesion_kinds_follow_the_polarity():
    from monai_dnprd.config import validation_lesion_kinds

    assert validation_lesion_kinds("any") == ("hyper", "hypo", "texture", "deform")
    assert validation_lesion_kinds("bright") == ("hyper",) and validation_lesion_kinds("dark") == ("hypo",)
    with pytest.raises(ValueError, match="polarity must be one of"):
        validation_lesion_kinds("up")


def test_volume_inferer_takes_the_models_grid_phases_unless_overridden(tmp_path, caplog):
    from monai_dnprd.ensemble import member_calibration_path

    old = load_models(str(save_member(tmp_path / "old", 0)))  # made before the setting: calibrated at one phase
    two = load_models(str(save_member(tmp_path / "two", 1, grid_phases=2)))
    assert volume_inferer(old).grid_phases == 1 and volume_inferer(two).grid_phases == 2
    assert volume_inferer(two, grid_phases=1).grid_phases == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="monai_dnprd"):
        member_calibration_path(two, grid_phases=2)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with caplog.at_level("WARNING", logger="monai_dnprd"):
        member_calibration_path(old, grid_phases=2)
    assert "not with grid_phases 2" in caplog.text
    with pytest.raises(ValueError, match="grid_phases must be 1 or 2"):
        volume_inferer(two, grid_phases=3)


def test_bundle_configs_train_in_auto_precision_calibrate_and_infer_at_two_grid_phases_validate_at_one(tmp_path):
    from monai_dnprd.config import workflow_configs

    parser = ConfigParser()
    parser.read_config(workflow_configs(BUNDLE, "training"))
    parser.update({"device": "cpu"})
    assert parser.get_parsed_content("params")["grid_phases"] == 2  # exported with the model
    calibration = parser.get_parsed_content("inferer")  # the CalibrationHandler's inferer: the inference map
    assert calibration.grid_phases == 2 and calibration.precision == "auto"
    validation = parser.get_parsed_content("validate#inferer")  # model selection: one phase, half the cost
    assert validation.grid_phases == 1 and validation.precision == "auto"
    assert parser.get_parsed_content("train#trainer#precision") == "auto"  # bf16 training where native
    # the measured default: a 500-iteration DNP stage after the 200-iteration warm-up (docs/benchmarks.md)
    assert (parser["num_iterations"], parser["warmup_iterations"]) == (700, 200)
    model = save_member(tmp_path, 0, grid_phases=2)
    for workflow in ("inference", "evaluating"):
        parser = ConfigParser()
        parser.read_config(workflow_configs(BUNDLE, workflow))
        parser.update({"ckpt_path": str(model), "device": "cpu"})
        inferer = parser.get_parsed_content("inferer")
        assert inferer.grid_phases == 2 and inferer.precision == "auto", workflow


def test_volume_inferer_takes_the_models_symmetry_and_its_threshold_from_the_calibration(tmp_path, caplog):
    from monai_dnprd.ensemble import member_calibration_path

    old = load_models(str(save_member(tmp_path / "old", 0)))  # made before the setting: no symmetry step
    sym_path = save_member(tmp_path / "sym", 1, q99=0.8, symmetry=True)
    sym = load_models(str(sym_path))
    assert not volume_inferer(old).symmetry and volume_inferer(old).mirror_threshold is None
    inferer = volume_inferer(sym)
    assert inferer.symmetry and inferer.mirror_threshold == pytest.approx(0.8)  # no fitted level: the map's q99
    cal = Calibration.load(sym_path.with_name("calibration.json"))
    cal.mirror_threshold = 1.7
    cal.save(sym_path.with_name("calibration.json"))
    assert volume_inferer(sym).mirror_threshold == pytest.approx(1.7)  # the level calibration fitted
    assert not volume_inferer(sym, symmetry="false").symmetry
    assert volume_inferer(old, symmetry="true").mirror_threshold == pytest.approx(0.5)
    with caplog.at_level("WARNING", logger="monai_dnprd"):
        member_calibration_path(old, symmetry="true")
    assert "not with symmetry True" in caplog.text
    sym_path.with_name("calibration.json").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="monai_dnprd"):
        assert volume_inferer(sym).mirror_threshold is None
    assert "without the symmetry step" in caplog.text


def test_symmetry_step_leaves_the_geometry_and_is_skipped_without_a_threshold(volume):
    vol, mask = volume
    net = tiny_net(0)
    kw = dict(img_size=16, k=1, batch_size=4)
    plain = DNPVolumeInferer(**kw)(vol, net, mask=mask)
    torch.testing.assert_close(DNPVolumeInferer(**kw, symmetry=True)(vol, net, mask=mask).as_tensor(), plain.as_tensor())
    low = DNPVolumeInferer(**kw, symmetry=True, mirror_threshold=0.0)(vol, net, mask=mask)
    assert isinstance(low, MetaTensor) and torch.equal(low.affine, vol.affine) and low.shape == plain.shape
    assert torch.all(low.as_tensor() <= plain.as_tensor() + 1e-6) and low.sum() < plain.sum()


def test_bundle_configs_calibrate_and_infer_with_symmetry_and_validate_without(tmp_path):
    from monai_dnprd.config import workflow_configs

    parser = ConfigParser()
    parser.read_config(workflow_configs(BUNDLE, "training"))
    parser.update({"device": "cpu"})
    assert parser.get_parsed_content("params")["symmetry"] is True  # exported with the model
    assert parser.get_parsed_content("inferer").symmetry  # the calibration fits its threshold
    assert not parser.get_parsed_content("validate#inferer").symmetry  # model selection as before the step
    parser.update({"map#symmetry": "false"})
    assert parser.get_parsed_content("params")["symmetry"] is False
    parser = ConfigParser()  # measured on brain MRI only: CT (often not left-right symmetric) trains without it
    parser.read_config(workflow_configs(BUNDLE, "training"))
    parser.update({"device": "cpu", "modality": "ct"})
    assert parser.get_parsed_content("params")["symmetry"] is False
    model = save_member(tmp_path, 0, symmetry=True)
    for workflow in ("inference", "evaluating"):
        parser = ConfigParser()
        parser.read_config(workflow_configs(BUNDLE, workflow))
        parser.update({"ckpt_path": str(model), "device": "cpu"})
        assert parser.get_parsed_content("inferer").symmetry, workflow
        parser.update({"symmetry": "false"})
        assert not parser.get_parsed_content("inferer").symmetry, workflow


def _bias_corrector(parser: ConfigParser):
    """The one ``BiasFieldCorrectiond`` of a workflow's preprocessing."""
    steps = [t for t in parser.get_parsed_content("preprocessing").transforms if isinstance(t, BiasFieldCorrectiond)]
    assert len(steps) == 1
    return steps[0]


def test_bias_field_correction_is_trained_for_mri_and_follows_each_model():
    from monai_dnprd.config import workflow_configs

    for modality, expected in (("mri", True), ("ct", False)):
        parser = ConfigParser()
        parser.read_config(workflow_configs(BUNDLE, "training"))
        parser.update({"device": "cpu", "modality": modality})
        assert parser.get_parsed_content("params")["bias_correction"] is expected  # exported with the model
        assert _bias_corrector(parser).enabled is expected
    parser.update({"data#bias_correction": True})  # a user's choice wins
    assert parser.get_parsed_content("params")["bias_correction"] is True


@pytest.mark.parametrize("params, expected", [({"bias_correction": True}, True), ({}, False)])
def test_inference_preprocesses_as_the_model_was_trained(tmp_path, params, expected):
    from monai_dnprd.config import workflow_configs

    model = save_member(tmp_path, 0, **params)  # {}: a model exported before the option, trained without it
    parser = ConfigParser()
    parser.read_config(workflow_configs(BUNDLE, "inference"))
    parser.update({"ckpt_path": str(model), "device": "cpu"})
    assert _bias_corrector(parser).enabled is expected
