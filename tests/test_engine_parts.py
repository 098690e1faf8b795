"""Learning-rate schedule, datasets of the workflows and the volume inferer."""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_dnprd.data import SafeDataset, inference_datalist, normal_datalists
from monai_dnprd.engines.evaluator import axial_axis
from monai_dnprd.engines.schedule import cosine_lr, stage_lambdas
from monai_dnprd.anomaly_map import AnomalyMapper, gaussian_blur1d
from monai_dnprd.inferer import DNPVolumeInferer
from monai_dnprd.io import VolumeError
from monai_dnprd.networks import DNPConFormer


def test_cosine_lr_end_points():
    assert cosine_lr(0, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert cosine_lr(50, 100, 1.0, 0.1) == pytest.approx(0.55)
    assert cosine_lr(4, 100, 1.0, 0.1, warmup=10) == pytest.approx(0.5)


def test_stage_lambdas_freeze_the_right_groups():
    lam = stage_lambdas(1000, 200, encoder_lr=1e-5, decoder_lr=1e-4, decoder_lr_min=1e-5, mim_lr=1e-3)
    assert lam["decoder"](0) == 0.0 and lam["decoder"](199) == 0.0 and lam["decoder"](400) > 0
    assert lam["pixel_head"](100) > 1e-4 and lam["pixel_head"](400) == lam["decoder"](400)  # keeps learning
    assert lam["encoder"](500) == 1e-5 and lam["encoder"](100) > 1e-4
    assert lam["decoder"](999) == pytest.approx(1e-5, rel=0.05)


def test_safe_dataset_turns_failures_into_records(tmp_path):
    def transform(d):
        if d["name"] == "bad":
            raise VolumeError(d["image"], "cannot read: truncated")
        return {**d, "ok": True}

    ds = SafeDataset([{"name": "good", "image": "a"}, {"name": "bad", "image": "b"}], transform=transform)
    assert ds[0]["ok"] and "load_seconds" in ds[0]
    assert ds[1] == {"name": "bad", "image": "b", "error": "cannot read: truncated"}


def _write(path, shape=(8, 8, 6)):
    nib.save(nib.Nifti1Image(np.random.rand(*shape).astype(np.float32), np.eye(4)), str(path))


def test_normal_datalists_split_is_deterministic_and_disjoint(tmp_path):
    for i in range(10):
        _write(tmp_path / f"v{i}.nii.gz")
    train, val = normal_datalists(tmp_path, val_fraction=0.2, seed=1)
    assert len(val) == 2 and len(train) == 8
    assert not {d["name"] for d in train} & {d["name"] for d in val}
    assert normal_datalists(tmp_path, val_fraction=0.2, seed=1) == (train, val)


def test_inference_datalist_skip_existing(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir(), out.mkdir()
    for n in ("a", "b"):
        _write(inp / f"{n}.nii.gz")
    _write(out / "a.nii.gz")
    (out / ".b.nii.gz.0123456789ab.tmp.nii.gz").write_bytes(b"cut off by a kill")
    assert [d["name"] for d in inference_datalist(inp, out, skip_existing=True)] == ["a", "b"]  # a has no score yet
    assert not list(out.glob(".*tmp*"))  # stale temporary file removed
    (out / "scores.csv").write_text("name,score\na,0.5\n")
    assert [d["name"] for d in inference_datalist(inp, out, skip_existing=False)] == ["a", "b"]
    assert [d["name"] for d in inference_datalist(inp, out, skip_existing=True)] == ["b"]


def test_axial_axis_of_common_orientations():
    assert axial_axis(np.eye(4)) == 2  # RAS
    psr = np.array([[0, 0, 2, 0], [-2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]], float)  # P, S, R
    assert axial_axis(psr) == 1


def _mapper(in_channels: int = 3, sigma: float = 1.0) -> AnomalyMapper:
    """The inferer's network: a mapper around a tiny DNP-ConFormer (16 px input, 2 x 2 tokens, 1-token blocks)."""
    torch.manual_seed(0)
    net = DNPConFormer(img_size=16, patch_size=8, in_channels=in_channels, vit="tiny", depth=2,
                       num_register_tokens=0, mask_block=1)
    return AnomalyMapper(net, metric="cosine", sigma=sigma).eval()


@pytest.fixture(scope="module")
def tiny_mapper():
    return _mapper()


def test_inferer_map_shape_mask_and_batch_invariance(tiny_mapper):
    vol = MetaTensor(torch.rand(1, 20, 20, 7), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    mask = torch.zeros(1, 20, 20, 7, dtype=torch.uint8)
    mask[:, 4:16, 4:16, 1:6] = 1
    a = DNPVolumeInferer(img_size=16, k=1, batch_size=2)(vol, tiny_mapper, mask=mask)
    b = DNPVolumeInferer(img_size=16, k=1, batch_size=7)(vol, tiny_mapper, mask=mask)
    assert a.shape == (1, 20, 20, 7) and isinstance(a, MetaTensor)
    assert torch.equal(a.affine, vol.affine)
    assert float(a[mask == 0].abs().max()) == 0.0
    assert float(a[mask > 0].min()) >= 0.0 and float(a[mask > 0].max()) > 0.0
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _PhaseMapper(torch.nn.Module):
    """A stand-in mapper: the map is the first channel squared (it follows the image) plus, optionally, a hot
    line along every token's first row (tied to where the token grid falls, as at the brain's edge)."""

    def __init__(self, patch: int, grid_artefact: bool) -> None:
        super().__init__()
        self.network = SimpleNamespace(encoder=SimpleNamespace(patch_size=patch))
        self.patch, self.grid_artefact = patch, grid_artefact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x[:, :1] ** 2
        if self.grid_artefact:
            rows = (torch.arange(x.shape[-2]) % self.patch == 0).float()
            m = m + 5.0 * rows[:, None]
        return m


def test_phase_min_keeps_what_follows_the_image_and_drops_what_follows_the_grid():
    from monai_dnprd.anomaly_map import phase_min

    torch.manual_seed(3)
    x = torch.zeros(2, 3, 24, 24)
    x[..., 4:20, 4:20] = torch.rand(2, 3, 16, 16)  # background border, as preprocessed slices have
    image_only = _PhaseMapper(6, grid_artefact=False)
    torch.testing.assert_close(phase_min(image_only, x), image_only(x))  # shifted and shifted back in register
    with_grid = _PhaseMapper(6, grid_artefact=True)
    assert float(with_grid(x).max()) > 5.0
    torch.testing.assert_close(phase_min(with_grid, x), image_only(x))  # the grid's hot lines are gone


def test_inferer_grid_phases_two_is_at_most_one_phase_and_costs_two_passes(tiny_mapper):
    torch.manual_seed(4)
    vol = torch.rand(1, 16, 16, 5)
    mask = torch.ones(1, 16, 16, 5, dtype=torch.uint8)
    one = DNPVolumeInferer(img_size=16, k=1, grid_phases=1)(vol, tiny_mapper, mask=mask)
    calls = []
    hook = tiny_mapper.register_forward_hook(lambda *a: calls.append(1))
    try:
        two = DNPVolumeInferer(img_size=16, k=1, grid_phases=2)(vol, tiny_mapper, mask=mask)
    finally:
        hook.remove()
    assert len(calls) == 2  # one batch of five slices, two phases
    assert bool((two <= one + 1e-6).all()) and not torch.allclose(two, one)
    with pytest.raises(ValueError, match="grid_phases must be 1 or 2"):
        DNPVolumeInferer(img_size=16, k=1, grid_phases=4)


def test_map_maths_stay_fp32_under_bf16_autocast(tiny_mapper):
    torch.manual_seed(5)
    x = torch.rand(2, 3, 16, 16)
    out = tiny_mapper.network(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = tiny_mapper.map_from(out)
    assert m.dtype == torch.float32
    torch.testing.assert_close(m, tiny_mapper.map_from(out))  # the same network output gives the fp32 map


@pytest.mark.parametrize("axis", [0, 1])
def test_inferer_any_slicing_axis_matches_axial_on_the_permuted_volume(tiny_mapper, axis):
    torch.manual_seed(1)
    vol = torch.rand(1, 20, 18, 7)
    mask = torch.zeros(1, 20, 18, 7, dtype=torch.uint8)
    mask[:, 3:17, 2:15, 1:6] = 1
    ref = DNPVolumeInferer(img_size=16, k=1, z_sigma=1.0)(vol, tiny_mapper, mask=mask)
    moved = DNPVolumeInferer(img_size=16, k=1, axis=axis, z_sigma=1.0)(
        vol.movedim(3, 1 + axis), tiny_mapper, mask=mask.movedim(3, 1 + axis))
    torch.testing.assert_close(moved.movedim(1 + axis, 3), ref, rtol=1e-5, atol=1e-6)


def test_inferer_z_smoothing_is_the_gaussian_along_z_then_the_mask(tiny_mapper):
    torch.manual_seed(2)
    vol = torch.rand(1, 16, 16, 9)
    mask = torch.zeros(1, 16, 16, 9, dtype=torch.uint8)
    mask[:, 2:14, 3:13, 1:8] = 1
    full = torch.ones_like(mask)
    raw = DNPVolumeInferer(img_size=16, k=1, z_sigma=0.0)(vol, tiny_mapper, mask=full)
    smooth = DNPVolumeInferer(img_size=16, k=1, z_sigma=1.5)(vol, tiny_mapper, mask=full)
    torch.testing.assert_close(smooth, gaussian_blur1d(raw, 1.5, dim=3), rtol=1e-5, atol=1e-6)
    masked = DNPVolumeInferer(img_size=16, k=1, z_sigma=1.5)(vol, tiny_mapper, mask=mask)
    # slices without foreground are not scored (zero before smoothing), then the mask zeroes the outside
    expect = raw.clone()
    expect[..., [0, 8]] = 0.0
    torch.testing.assert_close(masked, gaussian_blur1d(expect, 1.5, dim=3) * mask, rtol=1e-5, atol=1e-6)


def test_inferer_z_smoothing_spreads_across_slices(tiny_mapper):
    vol = torch.zeros(1, 16, 16, 9)
    vol[..., 4] = torch.rand(16, 16)
    plain = DNPVolumeInferer(img_size=16, k=0, z_sigma=0.0)
    smooth = DNPVolumeInferer(img_size=16, k=0, z_sigma=1.5)
    net = _mapper(in_channels=1, sigma=0.0)
    p, s = plain(vol, net), smooth(vol, net)
    assert p.std(dim=(0, 1, 2)).std() > s.std(dim=(0, 1, 2)).std()  # less slice-to-slice variation


def _early_stop_run(metrics: list[float | None], patience: int, min_delta: float = 0.0) -> int:
    """Iteration at which a trainer validating every iteration (``voxel_ap`` from ``metrics``) ends."""
    from ignite.engine import Engine, Events

    from monai_dnprd.engines import EarlyStop

    values = iter(metrics)
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _metric(e: Engine) -> None:  # registered before EarlyStop, like the metrics handler
        v = next(values)
        e.state.metrics.pop("voxel_ap", None) if v is None else e.state.metrics.update(voxel_ap=v)

    trainer = Engine(lambda e, b: None)
    EarlyStop(evaluator, patience=patience, min_delta=min_delta).attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: evaluator.run([0], max_epochs=1))
    trainer.run(range(len(metrics)), max_epochs=1)
    return trainer.state.iteration


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_early_stop_on_the_validation_voxel_ap():
    nan = float("nan")
    assert _early_stop_run([0.1, 0.2, 0.2, 0.2, 0.3, 0.3], patience=0) == 6  # 0 = off
    assert _early_stop_run([0.1, 0.2, 0.2, 0.2, 0.3, 0.3], patience=2) == 4  # higher is better
    assert _early_stop_run([0.5, 0.4, 0.3, 0.2, 0.1, 0.1], patience=3) == 4
    assert _early_stop_run([0.1, 0.2, nan, None, 0.3, 0.3], patience=2) == 4  # NaN or missing: no improvement
    assert _early_stop_run([0.1, 0.2, nan, 0.3, nan, nan, 0.4], patience=3) == 7
    assert _early_stop_run([0.1, 0.1005, 0.1008, 0.1009, 0.2], patience=3, min_delta=0.001) == 4
    # min_delta counts from the best score so far: two gains of 0.0006 add up to an improvement
    assert _early_stop_run([0.1, 0.1006, 0.1012, 0.1018, 0.2, 0.2], patience=3, min_delta=0.001) == 6


def test_training_logger_warns_on_a_sustained_prototype_collapse(caplog):
    """One prototype holding most tokens over the whole window warns; the window's means are reported."""
    import logging

    from monai_dnprd.engines import TrainingLogger

    class _State:
        def __init__(self) -> None:
            self.iteration, self.epoch_length, self.max_epochs, self.output = 0, 300, 1, {}

    class _Engine:
        state = _State()

    log, engine = TrainingLogger(window=10, interval=1000), _Engine()
    with caplog.at_level(logging.WARNING, logger="monai_dnprd"):
        for it in range(1, 21):
            engine.state.iteration = it
            share = 0.9 if it > 10 else 0.3  # collapsed only in the second window
            engine.state.output = {"prototype_max_share": share, "prototypes_used": 2.0 if it > 10 else 6.0}
            log._iteration(engine)
            if it == 10:
                assert "prototype collapse" not in caplog.text
    assert "prototype collapse" in caplog.text
    assert log.prototype_use() == {"iterations": 10, "max_share": pytest.approx(0.9), "prototypes_used": pytest.approx(2.0)}


def test_autocast_auto_is_bf16_where_the_hardware_has_it(monkeypatch):
    from monai_dnprd.config import autocast_context, resolve_precision

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False)
    assert resolve_precision("cpu", "auto") == "fp32"
    assert not isinstance(autocast_context(torch.device("cpu"), "auto"), torch.autocast)  # fp32 without bf16 units
    assert resolve_precision("cuda", "auto") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_precision("cpu", "auto") == "bf16"
    with autocast_context(torch.device("cpu"), "auto"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert resolve_precision("cpu", "fp32") == "fp32"
    with pytest.raises(ValueError, match="'auto'"):
        autocast_context(torch.device("cpu"), "fp64")
    with pytest.raises(ValueError, match="CUDA"):
        autocast_context(torch.device("cpu"), "fp16")


def test_prototype_monitor_counts_visible_tissue_tokens_only():
    """Background tokens (alike, on prototypes of their own) must not make a collapse on tissue look diverse."""
    from monai_dnprd.anomaly_map import prototype_usage
    from monai_dnprd.engines.trainer import monitored_tokens, token_tissue

    mask = torch.zeros(1, 1, 4, 8)
    mask[..., :, :4] = 1  # the left half of the slice is tissue: tokens 0-1 of each row (patch 2)
    tissue = token_tissue(mask, 2)
    hide = torch.zeros(1, 8, dtype=torch.bool)
    hide[0, 0] = True  # one tissue token hidden
    assignments = torch.tensor([[5, 0, 1, 2, 0, 0, 3, 4]])  # tissue on prototype 0, background spread
    counted = monitored_tokens(hide, tissue=tissue)
    assert counted.tolist() == [[False, True, False, False, True, True, False, False]]
    usage = prototype_usage(assignments[counted], 6)
    assert usage.tolist() == [3, 0, 0, 0, 0, 0]  # all tokens counted: the largest share would read 3 / 7
    keep = torch.ones(1, 1, 2, 4)
    keep[0, 0, 1, 0] = 0  # an excluded (known lesion) token
    assert monitored_tokens(hide, keep, tissue).tolist() == [[False, True, False, False, False, True, False, False]]


def test_token_tissue_needs_half_the_patch():
    from monai_dnprd.engines.trainer import token_tissue

    mask = torch.zeros(1, 1, 4, 8)
    mask[..., :2, :2] = 1  # a full 2 x 2 patch
    mask[..., 0, 2:4] = 1  # half a patch
    mask[..., 0, 4] = 1  # a quarter
    assert token_tissue(mask, 2)[0, 0].tolist() == [[True, True, False, False], [False, False, False, False]]


def test_training_slices_carry_their_foreground_mask():
    """The prototype monitor needs each training slice's foreground: the slice transforms must keep it."""
    from monai.bundle import ConfigParser

    from conftest import BUNDLE

    from monai_dnprd.config import workflow_configs

    parser = ConfigParser()
    parser.read_config(workflow_configs(BUNDLE, "training"))
    transforms = parser.get_parsed_content("slice_transforms")
    sample = {"image": torch.rand(3, 40, 40), "mask": (torch.rand(1, 40, 40) > 0.5).float()}
    out = transforms(sample)
    size = parser["img_size"]
    assert out["image"].shape == (3, size, size) and out["mask"].shape == (1, size, size)
