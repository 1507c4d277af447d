"""Slow, obvious NumPy/SciPy reference versions of spxframe.photometry.kernels, for the tests only."""

from __future__ import annotations

import math

import numpy as np
from scipy import integrate


def circle_rect_area_reference(x0: float, x1: float, y0: float, y1: float, r: float) -> float:
    """Area of circle(0, r) ∩ [x0,x1]×[y0,y1] by adaptive quadrature of the clipped chord length."""
    a, b = max(x0, -r), min(x1, r)
    if b <= a:
        return 0.0

    def chord(x: float) -> float:
        h = math.sqrt(max(r * r - x * x, 0.0))
        return max(0.0, min(h, y1) - max(-h, y0))

    pts = [p for p in (-math.sqrt(max(r * r - y0 * y0, 0)), math.sqrt(max(r * r - y0 * y0, 0)),
                        -math.sqrt(max(r * r - y1 * y1, 0)), math.sqrt(max(r * r - y1 * y1, 0))) if a < p < b]
    val, _ = integrate.quad(chord, a, b, points=pts or None, epsabs=1e-14, epsrel=1e-13, limit=200)
    return val


def overlap_weights_reference(cx: float, cy: float, r: float, ny: int, nx: int) -> np.ndarray:
    w = np.zeros((ny, nx))
    for iy in range(ny):
        for ix in range(nx):
            w[iy, ix] = circle_rect_area_reference(ix - 0.5 - cx, ix + 0.5 - cx, iy - 0.5 - cy, iy + 0.5 - cy, r)
    return w


def psf_pixel_fractions_reference(plane: np.ndarray, cx: float, cy: float, ny: int, nx: int,
                                  oversamp: int) -> np.ndarray:
    """Exact integral of the piecewise-constant plane over each detector pixel via a summed-area table.

    The cumulative integral S(u, v) (PSF-pixel edge coordinates) is bilinear between the table
    nodes, so pixel integrals are four bilinear look-ups.
    """
    npy, npx = plane.shape
    sat = np.zeros((npy + 1, npx + 1))
    sat[1:, 1:] = plane.cumsum(0).cumsum(1)
    ctr_x, ctr_y = (npx - 1) / 2.0, (npy - 1) / 2.0

    def s(u: float, v: float) -> float:  # u along x, v along y; node i at edge coordinate i - 0.5
        u = min(max(u + 0.5, 0.0), npx)
        v = min(max(v + 0.5, 0.0), npy)
        i, j = min(int(u), npx - 1), min(int(v), npy - 1)
        fu, fv = u - i, v - j
        return ((1 - fu) * (1 - fv) * sat[j, i] + fu * (1 - fv) * sat[j, i + 1]
                + (1 - fu) * fv * sat[j + 1, i] + fu * fv * sat[j + 1, i + 1])

    out = np.zeros((ny, nx))
    for iy in range(ny):
        v0, v1 = ctr_y + oversamp * (iy - 0.5 - cy), ctr_y + oversamp * (iy + 0.5 - cy)
        for ix in range(nx):
            u0, u1 = ctr_x + oversamp * (ix - 0.5 - cx), ctr_x + oversamp * (ix + 0.5 - cx)
            out[iy, ix] = s(u1, v1) - s(u0, v1) - s(u1, v0) + s(u0, v0)
    return out / plane.sum()


def clipped_stats_reference(vals: np.ndarray, nsigma: float, maxiter: int):
    cur = np.asarray(vals, float)
    for _ in range(maxiter):
        if cur.size < 3:
            break
        med = np.median(cur)
        sig = 1.482602218505602 * np.median(np.abs(cur - med))
        if sig <= 0:
            break
        keep = np.abs(cur - med) <= nsigma * sig
        if keep.all():
            break
        cur = cur[keep]
    if cur.size == 0:
        return np.nan, np.nan, 0
    sd = cur.std(ddof=1) if cur.size > 1 else np.nan
    return cur.mean(), sd / math.sqrt(cur.size), cur.size


def measure_one_reference(img, var, flg, zod, plane, cx, cy, *, r_ap, r_in, r_out, bad_mask,
                          nsigma=3.0, maxiter=5, min_bkg=20, oversamp=10) -> dict:
    """The photometry of one stamp, written plainly (same definitions as kernels.measure_stamps)."""
    ny, nx = img.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    d2 = (xx - cx) ** 2 + (yy - cy) ** 2
    ann = (d2 >= r_in ** 2) & (d2 < r_out ** 2)
    good = np.isfinite(img) & np.isfinite(var) & np.isfinite(zod) & ((flg & bad_mask) == 0)
    src = (flg & (1 << 21)) != 0
    sel = ann & good & ~src
    status = 0
    if sel.sum() < min_bkg:
        sel = ann & good
        status |= 4
    if sel.sum() < min_bkg:
        status |= 1
        scale, b, berr = 1.0, 0.0, 0.0
    else:
        mz = np.median(zod[sel])
        scale = np.median(img[sel]) / mz if mz > 0 else 1.0
        b, berr, _ = clipped_stats_reference(img[sel] - scale * zod[sel], nsigma, maxiter)
        berr = berr if np.isfinite(berr) else 0.0
    w = overlap_weights_reference(cx, cy, r_ap, ny, nx)
    p = psf_pixel_fractions_reference(plane, cx, cy, ny, nx, oversamp)
    inap = w > 0
    onfile = np.isfinite(img)
    nanvar = inap & onfile & ~np.isfinite(var)
    if nanvar.any():
        status |= 2
    m = inap & onfile & np.isfinite(var) & ((flg & bad_mask) == 0) & np.isfinite(zod)
    resid = np.where(m, img - scale * zod - b, 0.0)
    sf = (w * resid).sum()
    sv = (w ** 2 * np.where(m, var, 0.0)).sum()
    swm = (w * m).sum()
    pin = (w * m * p).sum()
    pall = (w * p).sum()
    fo = int(np.bitwise_or.reduce(flg[inap & onfile].astype(np.int64))) if (inap & onfile).any() else 0
    return dict(flux=sf / pin, err=math.sqrt(sv + (berr * swm) ** 2) / pin, bkg=b, bkg_err=berr,
                scale=scale, psf_in=pin, psf_all=pall, masked=1 - pin / pall, flags_or=fo, status=status)


def table_bilinear_reference(tx, ty, values, xp1, yp1):
    """Vectorised NumPy bilinear interpolation of values (nY, nX, m) on (tx, ty), edge cells extrapolated."""
    i = np.clip(np.searchsorted(tx, xp1, side="right") - 1, 0, len(tx) - 2)
    j = np.clip(np.searchsorted(ty, yp1, side="right") - 1, 0, len(ty) - 2)
    fx = (xp1 - tx[i]) / (tx[i + 1] - tx[i])
    fy = (yp1 - ty[j]) / (ty[j + 1] - ty[j])
    v = values
    return (((1 - fx) * (1 - fy))[:, None] * v[j, i] + (fx * (1 - fy))[:, None] * v[j, i + 1]
            + ((1 - fx) * fy)[:, None] * v[j + 1, i] + (fx * fy)[:, None] * v[j + 1, i + 1])
