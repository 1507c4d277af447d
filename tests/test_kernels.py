"""spxframe.photometry.kernels against slow references (tests/reference.py) and photutils 'exact'."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    circle_rect_area_reference,
    clipped_stats_reference,
    measure_one_reference,
    overlap_weights_reference,
    psf_pixel_fractions_reference,
    table_bilinear_reference,
)

from spxframe.photometry import kernels as K

photutils = pytest.importorskip("photutils.aperture")


def _gauss_plane(n: int = 101, sigma: float = 4.0, dx: float = 0.0) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n] - (n - 1) / 2
    return (np.exp(-((x - dx) ** 2 + y ** 2) / (2 * sigma ** 2))
            + 0.02 * np.exp(-(x ** 2 + y ** 2) / (2 * (3 * sigma) ** 2)))


def test_circle_rect_area_vs_quadrature():
    rng = np.random.default_rng(0)
    for _ in range(300):
        x0, y0 = rng.uniform(-4, 4, 2)
        x1, y1 = x0 + rng.uniform(0, 3), y0 + rng.uniform(0, 3)
        r = rng.uniform(0.1, 4)
        a = K.circle_rect_area(x0, x1, y0, y1, r)
        assert a == pytest.approx(circle_rect_area_reference(x0, x1, y0, y1, r), abs=1e-11)


def test_overlap_weights_vs_reference_and_photutils():
    rng = np.random.default_rng(1)
    for _ in range(20):
        ny, nx = 15, 17
        cx, cy, r = rng.uniform(-1, nx), rng.uniform(-1, ny), rng.uniform(0.3, 5)
        w = K.overlap_weights(cx, cy, r, ny, nx)
        np.testing.assert_allclose(w, overlap_weights_reference(cx, cy, r, ny, nx), atol=1e-11)
        ap = photutils.CircularAperture((cx, cy), r=r)
        wp = ap.to_mask(method="exact").to_image((ny, nx))
        if wp is None:
            wp = np.zeros((ny, nx))
        np.testing.assert_allclose(w, wp, atol=1e-12)


def test_aperture_sums_vs_photutils_with_masks_and_edges():
    rng = np.random.default_rng(2)
    n, ny, nx = 60, 21, 21
    img = rng.normal(1.0, 0.5, (n, ny, nx))
    var = rng.uniform(0.1, 1.0, (n, ny, nx))
    mask = rng.random((n, ny, nx)) < 0.1
    cx = rng.uniform(-2, nx + 1, n)  # some apertures cross the stamp edges
    cy = rng.uniform(-2, ny + 1, n)
    for r_in, r_out in ((0.0, 2.0), (0.0, 3.7), (5.0, 9.0)):
        got = K.aperture_sums(img, var, mask, cx, cy, r_in, r_out)
        for k in range(n):
            if r_in == 0:
                ap = photutils.CircularAperture((cx[k], cy[k]), r=r_out)
            else:
                ap = photutils.CircularAnnulus((cx[k], cy[k]), r_in=r_in, r_out=r_out)
            t = photutils.aperture_photometry(img[k], ap, method="exact", mask=mask[k])
            ref = float(t["aperture_sum"][0])
            assert got[k, 0] == pytest.approx(ref, rel=1e-10, abs=1e-10)
            wm = ap.to_mask(method="exact").to_image((ny, nx))
            wm = np.zeros((ny, nx)) if wm is None else wm * ~mask[k]
            assert got[k, 2] == pytest.approx(wm.sum(), rel=1e-10, abs=1e-12)
            assert got[k, 1] == pytest.approx((wm ** 2 * var[k]).sum(), rel=1e-10, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(cx=st.floats(0, 1), cy=st.floats(0, 1), r=st.floats(0.05, 6.0))
def test_interior_weights_sum_to_pi_r2(cx, cy, r):
    n = 2 * int(math.ceil(r)) + 5
    c = n // 2
    w = K.overlap_weights(c + cx, c + cy, r, n, n)
    assert w.sum() == pytest.approx(math.pi * r * r, rel=1e-12)
    assert (w >= -1e-15).all() and (w <= 1 + 1e-15).all()


def test_psf_fractions_vs_reference():
    plane = _gauss_plane(dx=3.0)
    for cx, cy in ((10.0, 10.0), (10.37, 9.81), (3.2, 16.9), (0.0, 0.0)):
        p = K.psf_pixel_fractions(plane, cx, cy, 21, 21, 10)
        np.testing.assert_allclose(p, psf_pixel_fractions_reference(plane, cx, cy, 21, 21, 10), atol=1e-13)
    p = K.psf_pixel_fractions(plane, 10.3, 10.6, 21, 21, 10)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)


def test_clipped_stats_vs_reference():
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.normal(0, 1, 200), rng.normal(30, 1, 10)])
    a = K._clipped_stats(v, 3.0, 5)
    b = clipped_stats_reference(v, 3.0, 5)
    assert a[2] == b[2] and a[0] == pytest.approx(b[0], rel=1e-12) and a[1] == pytest.approx(b[1], rel=1e-12)


def _random_stack(rng, n=40, s=23):
    yy, xx = np.mgrid[0:s, 0:s]
    cx = rng.uniform(9, 13, n)
    cy = rng.uniform(9, 13, n)
    zod = 0.3 + 0.001 * xx[None] + np.zeros((n, 1, 1))
    img = 1.15 * zod + rng.normal(0, 0.01, (n, s, s))
    img += 0.5 * np.exp(-((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2) / 1.5)
    var = np.full((n, s, s), 1e-4)
    flg = np.where(rng.random((n, s, s)) < 0.5, 1 << 21, 0).astype(np.int64)
    flg[rng.random((n, s, s)) < 0.05] |= 1 << 10  # HOT: bad
    flg[rng.random((n, s, s)) < 0.05] |= 1 << 1  # OVERFLOW: informational by default
    var[rng.random((n, s, s)) < 0.02] = np.nan
    img[:5, :, :4] = np.nan  # off-file columns (cutout edge)
    var[:5, :, :4] = np.nan
    zod[:5, :, :4] = np.nan
    return img, var, flg, zod, cx, cy


def test_measure_stamps_vs_reference():
    rng = np.random.default_rng(4)
    img, var, flg, zod, cx, cy = _random_stack(rng)
    psfs = np.stack([_gauss_plane(sigma=6.0), _gauss_plane(sigma=8.0, dx=2.0)])
    idx = np.arange(len(cx)) % 2
    bad = sum(1 << b for b in (0, 2, 6, 7, 9, 10, 11, 14, 15, 17))
    kw = dict(r_ap=2.0, r_in=5.0, r_out=9.0, bad_mask=bad)
    out, fo, stt = K.measure_stamps(img, var, flg, zod, psfs, idx, cx, cy, **kw)
    outp, fop, stp = K.measure_stamps(img, var, flg, zod, psfs, idx, cx, cy, **kw, parallel_threshold=1)
    np.testing.assert_array_equal(out, outp)
    for k in range(len(cx)):
        ref = measure_one_reference(img[k], var[k], flg[k], zod[k], psfs[idx[k]], cx[k], cy[k], **kw)
        for key, col in (("flux", K.O_FLUX), ("err", K.O_ERR), ("bkg", K.O_BKG), ("bkg_err", K.O_BKGERR),
                         ("scale", K.O_SCALE), ("psf_in", K.O_PSFIN), ("psf_all", K.O_PSFALL),
                         ("masked", K.O_MASKED)):
            assert out[k, col] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
        assert fo[k] == ref["flags_or"] and stt[k] == ref["status"]


def test_few_background_and_source_fallback():
    rng = np.random.default_rng(5)
    img, var, flg, zod, cx, cy = _random_stack(rng, n=2)
    flg[0] |= 1 << 21  # everything SOURCE: background must fall back to SOURCE pixels
    var[1] = np.nan  # nothing usable
    psfs = _gauss_plane(sigma=6.0)[None]
    out, fo, stt = K.measure_stamps(img, var, flg, zod, psfs, np.zeros(2, int), cx, cy,
                                    r_ap=2.0, r_in=5.0, r_out=9.0, bad_mask=1 << 10)
    assert stt[0] & K.ST_SOURCE_BKG and not stt[0] & K.ST_FEW_BKG and np.isfinite(out[0, K.O_FLUX])
    assert stt[1] & K.ST_FEW_BKG and stt[1] & K.ST_NAN_VAR and np.isnan(out[1, K.O_FLUX])


@settings(max_examples=15, deadline=None)
@given(dx=st.integers(-3, 3), dy=st.integers(-3, 3), seed=st.integers(0, 1000))
def test_integer_shift_invariance(dx, dy, seed):
    rng = np.random.default_rng(seed)
    img, var, flg, zod, cx, cy = _random_stack(rng, n=3, s=23)
    psfs = _gauss_plane(sigma=6.0)[None]
    kw = dict(r_ap=2.0, r_in=5.0, r_out=8.0, bad_mask=1 << 10)
    a = K.measure_stamps(img, var, flg, zod, psfs, np.zeros(3, int), cx, cy, **kw)[0]
    pad = 4

    def shift(x, fill):
        big = np.full((x.shape[0], 23 + 2 * pad, 23 + 2 * pad), fill, dtype=x.dtype)
        big[:, pad + dy:pad + dy + 23, pad + dx:pad + dx + 23] = x
        return big

    b = K.measure_stamps(shift(img, np.nan), shift(var, np.nan), shift(flg, 0), shift(zod, np.nan), psfs,
                         np.zeros(3, int), cx + pad + dx, cy + pad + dy, **kw)[0]
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def _sip_wcs(rng, *, cd: bool, sip: bool):
    """A random SPHEREx-like TAN(-SIP) WCS as TanSip and as astropy (the reference)."""
    from spxframe.fits.wcs import TanSip

    crval = (rng.uniform(0, 360), rng.uniform(-85, 85))
    crpix = (rng.uniform(-500, 2500), rng.uniform(-500, 2500))
    th, s = rng.uniform(0, 2 * np.pi), 6.15 / 3600
    m = s * np.array([[-math.cos(th), math.sin(th)], [math.sin(th), math.cos(th)]])
    a = b = None
    if sip:
        a, b = np.zeros((4, 4)), np.zeros((4, 4))
        for p in range(4):
            for q in range(4 - p):
                if 2 <= p + q:
                    a[p, q], b[p, q] = rng.normal(0, 1e-6 if p + q == 2 else 1e-9, 2)
    w = TanSip(crval, crpix, m, a, b)
    ref = w.to_astropy()
    if not cd:  # the same matrix as PC + CDELT
        ref.wcs.cd = np.zeros((2, 2))
        del ref.wcs.cd
        ref.wcs.pc, ref.wcs.cdelt = m / s, [s, s]
        ref.wcs.set()
    return w, ref


@pytest.mark.parametrize("seed,cd,sip", [(0, True, True), (1, False, True), (2, True, False), (3, False, True)])
def test_tan_sip_vs_astropy(seed, cd, sip):
    rng = np.random.default_rng(seed)
    w, ref = _sip_wcs(rng, cd=cd, sip=sip)
    x, y = rng.uniform(-300, 2340, 400), rng.uniform(-300, 2340, 400)
    ra, dec = ref.all_pix2world(x, y, 0)
    r2, d2 = w.pix2world(x, y)
    dra = (r2 - ra + 180) % 360 - 180
    assert np.abs(dra * np.cos(np.radians(dec))).max() * 3600 < 1e-9 and np.abs(d2 - dec).max() * 3600 < 1e-9
    xa, ya = ref.all_world2pix(ra, dec, 0, tolerance=1e-8, maxiter=50, quiet=True)
    xb, yb = w.world2pix(ra, dec, tolerance=1e-8, maxiter=50)
    assert np.abs(xb - xa).max() < 1e-9 and np.abs(yb - ya).max() < 1e-9
    assert np.abs(xb - x).max() < 1e-6 and np.abs(yb - y).max() < 1e-6
    from spxframe.fits.wcs import pixel_area_arcsec2

    np.testing.assert_allclose(w.pixel_area(x, y), pixel_area_arcsec2(ref, x, y), rtol=1e-9)


def test_tan_sip_far_points_and_divergence_fallback():
    """Points behind the projection give NaN; a diverging SIP inverse falls back to astropy."""
    rng = np.random.default_rng(5)
    w, ref = _sip_wcs(rng, cd=True, sip=True)
    x, y = w.world2pix(np.array([w.crval[0] + 180.0]), np.array([-w.crval[1]]))
    assert np.isnan(x).all() and np.isnan(y).all()
    w.a[2, 0] = w.b[0, 2] = 5e-4  # strongly non-linear: the fixed-point iteration diverges far out
    ref = w.to_astropy()
    ra, dec = ref.all_pix2world(np.array([100.0, 3000.0, 6000.0]), np.array([100.0, 2500.0, 5000.0]), 0)
    xa, ya = ref.all_world2pix(ra, dec, 0, tolerance=1e-8, maxiter=50, quiet=True)
    xb, yb = w.world2pix(ra, dec)
    np.testing.assert_allclose(xb, xa, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(yb, ya, rtol=1e-12, atol=1e-9)


def test_table_bilinear_vs_reference():
    from spxframe.fits.wcs import table_bilinear

    rng = np.random.default_rng(0)
    tx, ty = np.sort(rng.uniform(0, 2040, 9)), np.sort(rng.uniform(0, 2040, 7))
    v = rng.normal(size=(7, 9, 2))
    xp, yp = rng.uniform(-100, 2140, 500), rng.uniform(-100, 2140, 500)
    np.testing.assert_array_equal(table_bilinear(tx, ty, v, xp, yp), table_bilinear_reference(tx, ty, v, xp, yp))
