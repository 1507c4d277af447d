"""Numba kernels for forced aperture photometry: pure arrays in, arrays out; no I/O.

Conventions (all kernels): pixel ``(iy, ix)`` of a stamp is the unit square centred on
integer coordinates ``(ix, iy)`` (zero-based, like photutils), so it covers
``[ix - 0.5, ix + 0.5] x [iy - 0.5, iy + 0.5]``. Centres ``cx, cy`` and radii are in pixels.
Images are surface brightness (any unit, e.g. MJy/sr); sums are in image-unit x pixel.

Slow, obvious reference versions live in ``tests/reference.py``; the tests hold the two
against each other and against photutils ``method='exact'``.

The PSF fraction P of each pixel comes from the QR2 cube plane integrated over the pixel
(:func:`psf_pixel_fractions`) or, for R7 files, from the ePSF sampled at the pixel centre
(:func:`spxframe.photometry.epsf.epsf_fractions`); the overlap geometry lives in
:mod:`spxframe.photometry.aperture`.

Per-stamp outputs of :func:`measure_stamps` (columns of ``out``, index constants ``O_*``)::

    O_FLUX   total flux = sum(w m (I - s Z - b)) / sum(w m P)   (image unit x pixel)
    O_ERR    its 1-sigma error: sqrt(sum(w^2 m V) + (sigma_b sum(w m))^2) / sum(w m P)
    O_BKG    b, the clipped-mean residual of I - s Z in the annulus (image unit)
    O_BKGERR sigma_b, the error of b (std of the clipped residuals / sqrt(n))
    O_SCALE  s, the ZODI scale: median(I) / median(Z) over the background pixels
    O_PSFIN  sum(w m P): PSF fraction inside the unmasked aperture (1 / aperture correction)
    O_PSFALL sum(w P): PSF fraction inside the full aperture
    O_MASKED 1 - O_PSFIN / O_PSFALL: PSF-weighted masked fraction of the aperture
    O_NBKG   number of background pixels kept after clipping
    O_SUMW   sum(w m)
    O_RAW    sum(w m (I - s Z - b)) (aperture sum before correction)

``status`` bits: ``ST_FEW_BKG`` (background from the ZODI plane only: s = 1, b = 0),
``ST_NAN_VAR`` (an aperture pixel with finite image had NaN variance and was masked),
``ST_SOURCE_BKG`` (SOURCE pixels had to be included in the background).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from spxframe.photometry.aperture import (  # noqa: F401  (re-exported)
    _quadrant_area,
    aperture_sums,
    circle_rect_area,
    overlap_weights,
)
from spxframe.photometry.epsf import epsf_fractions

O_FLUX, O_ERR, O_BKG, O_BKGERR, O_SCALE, O_PSFIN, O_PSFALL, O_MASKED, O_NBKG, O_SUMW, O_RAW = range(11)
N_OUT = 11
ST_FEW_BKG, ST_NAN_VAR, ST_SOURCE_BKG = 1, 2, 4
SOURCE_MASK = 1 << 21  #: FLAGS bit 21 (SOURCE): never rejected, avoided in the background


@njit(cache=True, nogil=True)
def _axis_weights(c: float, npix: int, nps: int, oversamp: int):
    """Overlap of detector pixel i (source at c) with oversampled PSF pixels k0[i]..k0[i]+w-1.

    Returns (k0 (npix,), wt (npix, oversamp + 2)): a detector pixel spans oversamp PSF pixels,
    so at most oversamp + 1 of them overlap it.
    """
    width = oversamp + 2
    wt = np.zeros((npix, width))
    k0s = np.zeros(npix, np.int64)
    ctr = (nps - 1) / 2.0
    for i in range(npix):
        u0 = ctr + oversamp * (i - 0.5 - c)
        u1 = ctr + oversamp * (i + 0.5 - c)
        k0 = max(int(math.floor(u0 + 0.5)), 0)
        k1 = min(int(math.floor(u1 + 0.5)), nps - 1, k0 + width - 1)
        k0s[i] = k0
        for k in range(k0, k1 + 1):
            lo = max(u0, k - 0.5)
            hi = min(u1, k + 0.5)
            if hi > lo:
                wt[i, k - k0] = hi - lo
    return k0s, wt


@njit(cache=True, nogil=True)
def psf_pixel_fractions(plane: np.ndarray, cx: float, cy: float, ny: int, nx: int,
                        oversamp: int) -> np.ndarray:
    """Fraction of the PSF falling in each detector pixel of an (ny, nx) stamp, source at (cx, cy).

    ``plane`` is an oversampled (by ``oversamp``) PSF image centred on its middle pixel; it is
    treated as piecewise constant and integrated exactly over each detector pixel, then divided
    by the plane's total (so the fractions of the whole PSF sum to 1).
    """
    tot = 0.0
    for a in range(plane.shape[0]):
        for b in range(plane.shape[1]):
            tot += plane[a, b]
    return _psf_fracs(plane, tot, cx, cy, ny, nx, oversamp)


@njit(cache=True, nogil=True)
def _psf_fracs(plane, tot, cx, cy, ny, nx, oversamp):
    npy, npx = plane.shape
    kx, wx = _axis_weights(cx, nx, npx, oversamp)
    ky, wy = _axis_weights(cy, ny, npy, oversamp)
    width = wx.shape[1]
    tmp = np.zeros((npy, nx))  # plane integrated along x onto detector columns
    for a in range(npy):
        for i in range(nx):
            s = 0.0
            for m in range(width):
                b = kx[i] + m
                if b < npx:
                    s += wx[i, m] * plane[a, b]
            tmp[a, i] = s
    out = np.zeros((ny, nx))
    for j in range(ny):
        for m in range(width):
            a = ky[j] + m
            w = wy[j, m]
            if w != 0.0 and a < npy:
                for i in range(nx):
                    out[j, i] += w * tmp[a, i]
    if tot != 0.0:
        out /= tot
    return out


@njit(cache=True, nogil=True)
def _clipped_stats(vals: np.ndarray, nsigma: float, maxiter: int):
    """Iterative median/MAD sigma clipping; returns (mean, std/sqrt(n), n) of the kept values."""
    cur = vals.copy()
    for _ in range(maxiter):
        if cur.size < 3:
            break
        med = np.median(cur)
        sig = 1.482602218505602 * np.median(np.abs(cur - med))
        if sig <= 0.0:
            break
        keep = np.abs(cur - med) <= nsigma * sig
        nk = keep.sum()
        if nk == cur.size:
            break
        cur = cur[keep]
    n = cur.size
    if n == 0:
        return np.nan, np.nan, 0
    m = cur.mean()
    if n > 1:
        sd = math.sqrt(((cur - m) ** 2).sum() / (n - 1))
    else:
        sd = np.nan
    return m, sd / math.sqrt(n), n


@njit(cache=True, nogil=True)
def _good_bkg(img, var, flg, zod, iy, ix, bad_mask):
    return (math.isfinite(img[iy, ix]) and math.isfinite(var[iy, ix]) and math.isfinite(zod[iy, ix])
            and (flg[iy, ix] & bad_mask) == 0)


@njit(cache=True, nogil=True)
def _background(img, var, flg, zod, cx, cy, r_in, r_out, bad_mask, nsigma, maxiter, min_bkg):
    """(scale s, b, sigma_b, n kept, status bits) from the annulus: pixel centres in
    r_in <= d < r_out; good = finite, not bad; SOURCE pixels avoided unless fewer than min_bkg remain."""
    ny, nx = img.shape
    nb = 0
    nb_nosrc = 0
    for iy in range(ny):
        for ix in range(nx):
            d2 = (ix - cx) ** 2 + (iy - cy) ** 2
            if r_in * r_in <= d2 < r_out * r_out and _good_bkg(img, var, flg, zod, iy, ix, bad_mask):
                nb += 1
                if (flg[iy, ix] & SOURCE_MASK) == 0:
                    nb_nosrc += 1
    use_src = nb_nosrc < min_bkg
    nsel = nb if use_src else nb_nosrc
    st = ST_SOURCE_BKG if use_src else 0
    if nsel < min_bkg:
        return 1.0, 0.0, 0.0, 0, st | ST_FEW_BKG
    iv = np.empty(nsel)
    zv = np.empty(nsel)
    m = 0
    for iy in range(ny):
        for ix in range(nx):
            d2 = (ix - cx) ** 2 + (iy - cy) ** 2
            if (r_in * r_in <= d2 < r_out * r_out and _good_bkg(img, var, flg, zod, iy, ix, bad_mask)
                    and (use_src or (flg[iy, ix] & SOURCE_MASK) == 0)):
                iv[m] = img[iy, ix]
                zv[m] = zod[iy, ix]
                m += 1
    mz = np.median(zv)
    scale = np.median(iv) / mz if mz > 0 else 1.0
    b, berr, nkept = _clipped_stats(iv - scale * zv, nsigma, maxiter)
    if not math.isfinite(berr):
        berr = 0.0
    return scale, b, berr, nkept, st


@njit(cache=True, nogil=True)
def _fractions(psf, psf_tot, oversamp, coef, epar, cx, cy, ny, nx):
    """PSF fraction per pixel of an (ny, nx) box, source at (cx, cy): the QR2 cube plane integrated
    over the pixels (``coef`` empty), or the R7 ePSF sampled at the pixel centres (``coef``: its
    B-spline coefficients, ``epar`` = (centre x, centre y, OVSMPX, OVSMPY))."""
    if coef.shape[0] > 1:
        return epsf_fractions(coef, epar[0], epar[1], epar[2], epar[3], cx, cy, ny, nx)
    return _psf_fracs(psf, psf_tot, cx, cy, ny, nx, oversamp)


@njit(cache=True, nogil=True)
def _near_core(flg, core_mask, cx, cy, r_ap, radius):
    """(ny, nx) True within ``radius`` px (pixel centres) of a ``core_mask`` pixel that lies near the
    aperture — a saturated core grown to its full extent; a (0, 0) array when there is none."""
    ny, nx = flg.shape
    if core_mask == 0:
        return np.zeros((0, 0), np.bool_)
    reach = r_ap + radius + 1.0
    y0, y1 = max(int(math.floor(cy - reach)), 0), min(int(math.ceil(cy + reach)) + 1, ny)
    x0, x1 = max(int(math.floor(cx - reach)), 0), min(int(math.ceil(cx + reach)) + 1, nx)
    out = np.zeros((0, 0), np.bool_)
    r = int(math.floor(radius))
    for iy in range(y0, y1):
        for ix in range(x0, x1):
            if (flg[iy, ix] & core_mask) == 0:
                continue
            if out.shape[0] == 0:
                out = np.zeros((ny, nx), np.bool_)
            for jy in range(max(iy - r, 0), min(iy + r + 1, ny)):
                for jx in range(max(ix - r, 0), min(ix + r + 1, nx)):
                    if (jy - iy) ** 2 + (jx - ix) ** 2 <= radius * radius:
                        out[jy, jx] = True
    return out


@njit(cache=True, nogil=True)
def _measure_one(img, var, flg, zod, psf, psf_tot, coef, epar, cx, cy, r_ap, r_in, r_out, bad_mask, core_mask,
                 core_r, nsigma, maxiter, min_bkg, oversamp, out, flags_or, status, k):
    ny, nx = img.shape
    scale, b, berr, nkept, st = _background(img, var, flg, zod, cx, cy, r_in, r_out, bad_mask, nsigma, maxiter,
                                            min_bkg)
    # ---- aperture; pixels within core_r of a core_mask pixel (a saturated core) are unusable here
    w = overlap_weights(cx, cy, r_ap, ny, nx)
    near = _near_core(flg, core_mask, cx, cy, r_ap, core_r)
    # PSF fractions only on the aperture's bounding box (x_lo..x_lo+sx-1, y_lo..y_lo+sy-1)
    x_lo = max(int(math.floor(cx - r_ap + 0.5)), 0)
    y_lo = max(int(math.floor(cy - r_ap + 0.5)), 0)
    sx = min(int(math.floor(cx + r_ap + 0.5)), nx - 1) - x_lo + 1
    sy = min(int(math.floor(cy + r_ap + 0.5)), ny - 1) - y_lo + 1
    p = _fractions(psf, psf_tot, oversamp, coef, epar, cx - x_lo, cy - y_lo, max(sy, 0), max(sx, 0))
    sf = 0.0
    sv = 0.0
    swm = 0.0
    pin = 0.0
    pall = 0.0
    fo = 0
    for iy in range(ny):
        for ix in range(nx):
            wi = w[iy, ix]
            if wi == 0.0:
                continue
            pi = p[iy - y_lo, ix - x_lo]
            pall += wi * pi
            fi = img[iy, ix]
            if not math.isfinite(fi):
                continue  # off the file (or NaN data): masked
            fo |= flg[iy, ix]
            if not math.isfinite(var[iy, ix]):
                st |= ST_NAN_VAR
                continue
            if (flg[iy, ix] & bad_mask) != 0 or not math.isfinite(zod[iy, ix]):
                continue
            if near.shape[0] and near[iy, ix]:
                continue
            sf += wi * (fi - scale * zod[iy, ix] - b)
            sv += wi * wi * var[iy, ix]
            swm += wi
            pin += wi * pi
    out[k, O_RAW] = sf
    out[k, O_FLUX] = sf / pin if pin > 0 else np.nan
    out[k, O_ERR] = math.sqrt(sv + (berr * swm) ** 2) / pin if pin > 0 else np.nan
    out[k, O_BKG] = b
    out[k, O_BKGERR] = berr
    out[k, O_SCALE] = scale
    out[k, O_PSFIN] = pin
    out[k, O_PSFALL] = pall
    out[k, O_MASKED] = 1.0 - pin / pall if pall > 0 else np.nan
    out[k, O_NBKG] = nkept
    out[k, O_SUMW] = swm
    flags_or[k] = fo
    status[k] = st


@njit(cache=True, nogil=True)
def _stamp(k, images, variances, flags, zodis, psfs, psf_tots, psf_index, coefs, epars, coef_index, cx, cy,
           r_ap, r_in, r_out, bad_masks, core_masks, core_r, nsigma, maxiter, min_bkg, oversamp, out, flags_or,
           status):
    c = coef_index[k]
    coef = coefs[c] if c >= 0 else coefs[0, :1, :1]  # a 1x1 array means: the cube plane
    _measure_one(images[k], variances[k], flags[k], zodis[k], psfs[psf_index[k]], psf_tots[psf_index[k]],
                 coef, epars[max(c, 0)], cx[k], cy[k], r_ap, r_in, r_out, bad_masks[k], core_masks[k],
                 core_r, nsigma, maxiter, min_bkg, oversamp, out, flags_or, status, k)


@njit(cache=True, nogil=True)
def _measure_serial(images, variances, flags, zodis, psfs, psf_tots, psf_index, coefs, epars, coef_index, cx, cy,
                    r_ap, r_in, r_out, bad_masks, core_masks, core_r, nsigma, maxiter, min_bkg, oversamp, out, flags_or,
                    status):
    for k in range(images.shape[0]):
        _stamp(k, images, variances, flags, zodis, psfs, psf_tots, psf_index, coefs, epars, coef_index, cx, cy,
               r_ap, r_in, r_out, bad_masks, core_masks, core_r, nsigma, maxiter, min_bkg, oversamp, out, flags_or,
           status)


@njit(cache=True, nogil=True, parallel=True)
def _measure_parallel(images, variances, flags, zodis, psfs, psf_tots, psf_index, coefs, epars, coef_index, cx, cy,
                      r_ap, r_in, r_out, bad_masks, core_masks, core_r, nsigma, maxiter, min_bkg, oversamp, out,
                      flags_or, status):
    for k in prange(images.shape[0]):
        _stamp(k, images, variances, flags, zodis, psfs, psf_tots, psf_index, coefs, epars, coef_index, cx, cy,
               r_ap, r_in, r_out, bad_masks, core_masks, core_r, nsigma, maxiter, min_bkg, oversamp, out, flags_or,
           status)


def _per_stamp(v, n: int) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(np.asarray(v, dtype=np.int64), (n,)))


def measure_stamps(images: np.ndarray, variances: np.ndarray, flags: np.ndarray, zodis: np.ndarray,
                   psfs: np.ndarray, psf_index: np.ndarray, cx: np.ndarray, cy: np.ndarray, *,
                   r_ap: float, r_in: float, r_out: float, bad_mask, core_mask=0, core_radius: float = 0.0,
                   nsigma: float = 3.0,
                   maxiter: int = 5, min_bkg: int = 20, oversamp: int = 10,
                   coefs: np.ndarray | None = None, epars: np.ndarray | None = None,
                   coef_index: np.ndarray | None = None,
                   parallel_threshold: int = 20000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Forced photometry of a stack of n stamps (see the module docstring for the outputs).

    images, variances, zodis: (n, ny, nx) float (NaN = no data); flags: (n, ny, nx) int64;
    psfs: (m, py, px) oversampled PSF planes; psf_index: (n,) plane of each stamp; cx, cy: (n,)
    source centres in stamp pixels; radii in pixels. ``bad_mask``: FLAGS bits that mask a pixel
    everywhere (an int, or one per stamp); ``core_mask``: bits that mark a saturated core (int or
    per stamp): aperture pixels within ``core_radius`` px of such a pixel are unusable (the
    background is left alone).
    R7 stamps use an ePSF instead of a cube plane: ``coefs`` (q, H, W) B-spline coefficients of
    ePSF arrays (:func:`spxframe.photometry.epsf.spline_coefficients`), ``epars`` (q, 4) their
    (centre x, centre y, OVSMPX, OVSMPY), ``coef_index`` (n,) the array of each stamp, -1 for the
    cube plane. Returns (out (n, N_OUT) float64, flags_or (n,) int64 = FLAGS OR-ed over the
    aperture's on-file pixels, status (n,) int32).
    Threads are used only when n >= parallel_threshold (waking them costs ~5 ms).
    """
    n = images.shape[0]
    out = np.full((n, N_OUT), np.nan)
    flags_or = np.zeros(n, np.int64)
    status = np.zeros(n, np.int32)
    if n == 0:
        return out, flags_or, status
    if coefs is None or coef_index is None:
        coefs, epars, coef_index = np.zeros((1, 1, 1)), np.zeros((1, 4)), np.full(n, -1)
    args = (np.ascontiguousarray(images), np.ascontiguousarray(variances),
            np.ascontiguousarray(flags, dtype=np.int64), np.ascontiguousarray(zodis),
            np.ascontiguousarray(psfs, dtype=np.float64), psfs.sum(axis=(1, 2), dtype=np.float64),
            np.ascontiguousarray(psf_index, dtype=np.int64), np.ascontiguousarray(coefs, dtype=np.float64),
            np.ascontiguousarray(epars, dtype=np.float64), np.ascontiguousarray(coef_index, dtype=np.int64),
            np.ascontiguousarray(cx, dtype=np.float64), np.ascontiguousarray(cy, dtype=np.float64),
            float(r_ap), float(r_in), float(r_out), _per_stamp(bad_mask, n), _per_stamp(core_mask, n),
            float(core_radius), float(nsigma), int(maxiter), int(min_bkg), int(oversamp), out, flags_or, status)
    (_measure_parallel if n >= parallel_threshold else _measure_serial)(*args)
    return out, flags_or, status
