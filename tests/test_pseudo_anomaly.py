"""Pseudo-anomalies for a denoising DNP stage: the student sees a corrupted slice stack, the teacher the clean one."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_MODEL, run_workflow

from monai_dnprd.networks import DNPConFormer
from monai_dnprd.transforms import RandPseudoAnomaly, RandPseudoAnomalyd


def _stack() -> torch.Tensor:
    x = torch.zeros(3, 64, 64)
    x[:, 10:54, 8:56] = torch.rand(3, 44, 48) * 0.8 + 0.1  # foreground > 0, background exactly 0
    return x


def test_pseudo_anomaly_changes_only_the_blob_inside_the_foreground():
    x = _stack()
    t = RandPseudoAnomaly(prob=1.0).set_random_state(0)
    for _ in range(5):
        y, blob = t(x)
        assert y.shape == x.shape and blob.shape == (1, 64, 64)
        assert blob.max() == 1.0 and blob.min() == 0.0
        assert torch.all(blob[0][x[1] == 0] == 0)  # never outside the foreground
        changed = (y - x).abs().amax(0) > 1e-6
        assert changed.any() and not changed[blob[0] == 0].any()  # nothing changes outside the blob


def test_pseudo_anomaly_pastes_rescaled_tissue_of_the_same_stack():
    x = torch.zeros(3, 64, 64)
    x[:, 10:54, 8:56] = 0.5  # one tissue value: a pasted copy at scale 2 reads 1.0 (or 0 where it is background)
    t = RandPseudoAnomaly(prob=1.0, scale=(2.0, 2.0)).set_random_state(1)
    for _ in range(5):
        y, blob = t(x)
        core = y[:, blob[0] == 1]
        assert core.numel() and ((core == 1.0) | (core == 0.0)).all() and (core == 1.0).any()


def test_pseudo_anomaly_prob_zero_and_seeding():
    x = _stack()
    y, blob = RandPseudoAnomaly(prob=0.0)(x)
    assert torch.equal(y, x) and blob.sum() == 0
    a = RandPseudoAnomaly(prob=1.0).set_random_state(7)(x)[0]
    b = RandPseudoAnomaly(prob=1.0).set_random_state(7)(x)[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="prob"):
        RandPseudoAnomaly(prob=1.5)


def test_pseudo_anomalyd_keeps_the_clean_stack_for_the_teacher():
    x = _stack()
    d = RandPseudoAnomalyd(prob=1.0).set_random_state(3)({"image": x, "exclude": torch.zeros(1, 64, 64)})
    assert torch.equal(d["clean"], x) and not torch.equal(d["image"], x)
    d = RandPseudoAnomalyd(prob=0.0)({"image": x})
    assert torch.equal(d["clean"], x) and torch.equal(d["image"], x)  # both keys always there: batches collate


def test_pseudo_anomalyd_takes_one_key_and_passes_its_settings_on():
    with pytest.raises(ValueError, match="one key"):
        RandPseudoAnomalyd(keys=["image", "t2"])  # both clean copies would land under the one clean_key
    with pytest.raises(ValueError, match="edge"):
        RandPseudoAnomalyd(keys="image", edge=0.0)
    assert RandPseudoAnomalyd(keys="image", edge=0.1).corrupter.edge == 0.1


def test_teacher_reads_its_own_input():
    torch.manual_seed(0)
    net = DNPConFormer(img_size=32, patch_size=8, vit="tiny", depth=4, num_prototypes=3).eval()
    x, clean = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        both = net(x, clean)
        same = net(x)
        teacher_clean = net(clean)
    for t, tc in zip(both.targets, teacher_clean.targets):
        torch.testing.assert_close(t, tc)  # the targets come from the clean images
    for r, rs in zip(both.recons, same.recons):
        torch.testing.assert_close(r, rs)  # the student side from the corrupted ones


@pytest.mark.slow
def test_training_with_pseudo_anomalies_feeds_the_teacher_clean_images(tiny_data, tmp_path, monkeypatch):
    seen = []
    forward = DNPConFormer.forward

    def spy(self, x, teacher_x=None):
        seen.append(teacher_x is not None and not torch.equal(x, teacher_x))
        return forward(self, x, teacher_x)

    monkeypatch.setattr(DNPConFormer, "forward", spy)
    out = tmp_path / "pa"
    run_workflow(
        "train.json", "training", output_dir=str(out), dataset_dir=str(tiny_data["train"]),
        val_dir=str(tiny_data["val"]), num_iterations=4, warmup_iterations=2, val_interval=100, ckpt_interval=100,
        pseudo_anomaly_prob=1.0, **TINY_MODEL,
    )
    assert any(seen), "no DNP step gave the teacher a clean input different from the student's"
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert any("daa" in r for r in log)
