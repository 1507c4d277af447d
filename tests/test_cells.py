"""Sky cells: HEALPix NESTED indices have the defining properties (equal area, nesting)."""

import numpy as np
import pytest

from spxframe.run.cells import ang2pix_nest


@pytest.fixture(scope="module")
def sphere():
    rng = np.random.default_rng(3)
    n = 300_000
    return rng.uniform(0, 360, n), np.degrees(np.arcsin(rng.uniform(-1, 1, n)))


@pytest.mark.parametrize("order", [0, 1, 2])
def test_equal_area(sphere, order):
    ra, dec = sphere
    counts = np.bincount(ang2pix_nest(order, ra, dec), minlength=12 * 4**order)
    assert counts.size == 12 * 4**order
    expected = ra.size / counts.size
    # Poisson scatter only: every cell within 5 sigma of the mean
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_nesting_and_known_faces(sphere):
    ra, dec = sphere
    assert np.array_equal(ang2pix_nest(4, ra, dec) >> 4, ang2pix_nest(2, ra, dec))
    # base faces: (0,0) is face 4, the north pole is in 0-3, the south pole in 8-11
    assert ang2pix_nest(0, 0.0, 0.0) == 4
    assert ang2pix_nest(0, 10.0, 89.9) in (0, 1, 2, 3)
    assert ang2pix_nest(0, 10.0, -89.9) in (8, 9, 10, 11)


def test_ra_wrap_is_continuous():
    # 359.999 and 0.001 deg at the same dec are ~7 arcsec apart: same cell at order 5
    assert ang2pix_nest(5, 359.9999, 10.0) == ang2pix_nest(5, 0.0001, 10.0)
    assert ang2pix_nest(5, 360.0, 10.0) == ang2pix_nest(5, 0.0, 10.0)
