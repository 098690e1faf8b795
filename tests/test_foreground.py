"""The fast hole filling of the foreground mask equals SciPy's binary_fill_holes (3D and slice-wise)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from monai_dnprd.transforms.array import _fill_holes


def _slice_structure(axis: int) -> np.ndarray:
    st = np.zeros((3, 3, 3), dtype=bool)
    sl = [slice(None)] * 3
    sl[axis] = 1
    st[tuple(sl)] = ndi.generate_binary_structure(2, 1)
    return st


@pytest.mark.parametrize("seed", range(6))
def test_fill_holes_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    m = ndi.binary_opening(rng.random((24, 27, 21)) > 0.35)
    np.testing.assert_array_equal(_fill_holes(m), ndi.binary_fill_holes(m))
    for axis in range(3):
        np.testing.assert_array_equal(_fill_holes(m, axis), ndi.binary_fill_holes(m, structure=_slice_structure(axis)))


def test_fill_holes_fills_an_enclosed_cavity_only():
    m = np.zeros((9, 9, 9), dtype=bool)
    m[1:8, 1:8, 1:8] = True
    m[3:6, 3:6, 3:6] = False  # closed cavity
    m[4, 4, 0:4] = False  # a channel from the cavity to the z=0 face of the array
    assert not _fill_holes(m)[4, 4, 4]  # connected to the border through the channel: not a hole in 3D
    assert _fill_holes(m, axis=2)[4, 4, 4]  # but a hole in its axial slice z=4, which the channel does not reach
    assert not _fill_holes(m, axis=0)[4, 4, 4]  # in the sagittal slice x=4 the channel reaches the border


def test_bounding_box_matches_nonzero_extent():
    from monai_dnprd.transforms.array import _bounding_box

    rng = np.random.default_rng(0)
    for shape in [(9, 7, 5), (1, 4, 3), (12, 12)]:
        m = np.zeros(shape, dtype=bool)
        pts = tuple(rng.integers(0, s, size=3) for s in shape)
        m[pts] = True
        expect = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(m))
        assert _bounding_box(m) == expect
