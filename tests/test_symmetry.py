"""Left-right symmetry step: the mirror plane from registration, the suppression maths, calibration of its threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_dnprd.calibration import Calibration, calibrate
from monai_dnprd.symmetry import MirrorSuppression, mirror_transform, mirror_volume, suppress
from monai_dnprd.transforms.array import world_axis


def phantom(centre_x: float = 37.0, angle_deg: float = 0.0, shape=(72, 64, 36)) -> np.ndarray:
    """A "head" symmetric about the plane through ``centre_x`` turned by ``angle_deg`` about z: an ellipsoid with
    two bright lobes and a dark core, each the mirror image of the other across that plane."""
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    a = np.deg2rad(angle_deg)
    u = (x - centre_x) * np.cos(a) + (y - 32) * np.sin(a)  # signed distance from the mid-plane
    v = -(x - centre_x) * np.sin(a) + (y - 32) * np.cos(a)
    img = ((u / 26) ** 2 + (v / 28) ** 2 + ((z - 18) / 14) ** 2 < 1).astype(np.float32)
    for side in (-1, 1):
        img += 0.6 * (((u - side * 11) / 6) ** 2 + ((v + 6) / 7) ** 2 + ((z - 18) / 6) ** 2 < 1)
    img -= 0.4 * ((u / 4) ** 2 + ((v - 10) / 9) ** 2 + ((z - 18) / 8) ** 2 < 1)
    return img


def test_the_left_right_axis_follows_the_affine():
    assert world_axis(np.diag([2.0, 2.0, 3.0, 1.0]), 0) == 0
    psr = np.array([[0, 0, -2.0, 0], [-2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])  # voxel axes P, S, R/L
    assert world_axis(psr, 0) == 2 and world_axis(psr, 2) == 1
    assert world_axis(torch.eye(4), 0) == 0


@pytest.mark.parametrize("centre_x, angle", [(37.0, 0.0), (33.5, 7.0), (35.0, 25.0)])
def test_mirror_transform_finds_the_mid_plane_of_a_shifted_turned_head(centre_x, angle):
    img = phantom(centre_x, angle)
    transform = mirror_transform(img, (1.0, 1.0, 1.0), axis=0, resolution_mm=2.0)
    a = np.deg2rad(angle)
    normal = np.array([np.cos(a), np.sin(a), 0.0])
    for p in ([50.0, 30.0, 18.0], [30.0, 40.0, 12.0], [40.0, 20.0, 24.0]):
        p = np.asarray(p)
        expected = p - 2 * np.dot(p - [centre_x, 32.0, 18.0], normal) * normal  # reflection across the plane
        assert np.linalg.norm(np.asarray(transform.TransformPoint(tuple(p))) - expected) < 1.0
    # the image read at its mirror points is the image again
    twin = mirror_volume(img, (1.0, 1.0, 1.0), transform)
    assert np.abs(twin - img).mean() < 0.25 * np.abs(img - img[::-1]).mean()  # the rest: interpolation at edges


def test_suppress_lowers_by_the_mirror_excess_over_the_threshold_only():
    values = np.array([0.5, 2.0, 3.0, 3.0, 0.2])
    mirror = np.array([3.0, 0.5, 3.0, 1.0, 5.0])
    expected = np.array([0.0, 2.0, 1.0, 3.0, 0.0])  # 0.5 - 2 -> 0; mirror below t: as is; 3 - (3 - 1); 0.2 - 4 -> 0
    np.testing.assert_allclose(suppress(values, mirror, 1.0), expected)
    torch.testing.assert_close(suppress(torch.tensor(values), torch.tensor(mirror), 1.0), torch.tensor(expected))


def test_suppression_lowers_a_hot_spot_with_a_hot_twin_and_keeps_a_lone_one():
    img = phantom(35.0)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    m = np.full(img.shape, 0.4, dtype=np.float32) * (img > 0)
    m[45:50, 38:43, 16:21] = 3.0  # a hot spot and its twin across x = 35
    m[20:25, 38:43, 16:21] = 3.0
    m[42:47, 18:23, 22:27] = 3.0  # a hot spot alone
    out = MirrorSuppression(tolerance_mm=2.0, resolution_mm=2.0)(torch.from_numpy(m), torch.from_numpy(img), affine, 1.0)
    assert out[45:50, 38:43, 16:21].max() <= 1.0 + 1e-4 and out[20:25, 38:43, 16:21].max() <= 1.0 + 1e-4
    assert torch.equal(out[43:46, 19:22, 23:26], torch.full((3, 3, 3), 3.0))  # the lone spot's core: unchanged
    weak = (torch.from_numpy(m) == 0.4) & (out > 0)
    assert weak.sum() > 0.8 * (torch.from_numpy(m) == 0.4).sum() and torch.all(out[weak] == 0.4)


class ConstantInferer:
    """A stand-in volume inferer: returns a fixed map, with the attributes ``calibrate`` uses for symmetry."""

    def __init__(self, maps):
        self.maps, self.symmetry, self.mirror_threshold = list(maps), True, 5.0
        self.suppression = MirrorSuppression(tolerance_mm=1.0, resolution_mm=2.0)
        self.thresholds_seen = []

    def __call__(self, image, network, mask=None):
        self.thresholds_seen.append(self.mirror_threshold)
        return self.maps.pop(0)


def test_calibrate_fits_the_mirror_threshold_on_maps_made_without_the_step(tmp_path):
    img = phantom(35.0)
    rng = np.random.default_rng(0)
    maps, volumes = [], []
    for _ in range(2):
        m = (rng.random(img.shape).astype(np.float32) * (img > 0))
        m[45:50, 38:43, 16:21] = m[20:25, 38:43, 16:21] = 4.0  # symmetric hot spots: lowered after calibration
        maps.append(torch.from_numpy(m)[None])
        volumes.append({"image": MetaTensor(torch.from_numpy(img)[None], affine=torch.eye(4)),
                        "mask": torch.from_numpy(img > 0)[None]})
    inferer = ConstantInferer(maps)
    raw = Calibration.from_scores([m[0][img > 0].numpy() for m in maps], [0.0]).voxel_threshold(0.01)
    cal = calibrate(volumes, torch.nn.Identity(), inferer)
    assert inferer.thresholds_seen == [None, None]  # the maps were made without the step
    assert cal.mirror_threshold == pytest.approx(raw) and inferer.mirror_threshold == pytest.approx(raw)
    assert cal.voxel_threshold(0.001) < 4.0 - 1e-3  # the twins' 4.0 was lowered before the summary
    loaded = Calibration.load(cal.save(tmp_path / "calibration.json"))
    assert loaded.mirror_threshold == pytest.approx(raw) and loaded.symmetry_threshold() == pytest.approx(raw)
    # a calibration made without the step offers its own 99th percentile
    plain = Calibration.from_scores([np.linspace(0.0, 1.0, 1001)], [0.5])
    assert plain.mirror_threshold is None and plain.symmetry_threshold() == pytest.approx(0.99)
    assert "mirror_threshold" not in plain.to_dict()


def test_a_volume_too_thin_to_register_gets_the_plain_reflection():
    img = phantom(37.0)[:, :, 16:19]  # three slices
    transform = mirror_transform(img, (1.0, 1.0, 1.0), axis=0)
    centre = (img.shape[0] - 1) / 2.0  # the grid's centre plane
    np.testing.assert_allclose(transform.TransformPoint((50.0, 30.0, 1.0)), (2 * centre - 50.0, 30.0, 1.0), atol=1e-6)
