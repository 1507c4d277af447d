"""Aperture corrections from an effective PSF (QR3 / pipeline R7, spec §3.9): a fast numba
kernel and, beside it, a slow obvious reference the tests hold it against.

An ePSF already includes the pixel response, so the fraction of a point source's flux that lands
in a native pixel is ``OVSMPX * OVSMPY * E(pixel centre - source)``, E sampled on its oversampled
grid — never integrated over the pixel again (that would widen it by 1/12 px² in variance).
Between grid points E is interpolated with a cubic B-spline (interpolating: it passes through
every grid value; bilinear sampling of a 5x grid flattens the core and biases small apertures).
E is taken as zero beyond its array, which is first padded with :data:`PAD` zeros per side.

For a circular aperture of radius r with exact pixel-overlap weights w (as
:func:`spxframe.photometry.kernels.overlap_weights`) and a mask m (True = pixel not usable: bad
flag, NaN, off the image)::

    pall   = sum(w f)          over the whole aperture (pixels outside the stamp included)
    pin    = sum(w f (1 - m))  over its usable pixels
    usable = pin / pall        the PSF-weighted usable fraction
    corr   = 1 / pin           the aperture correction (flux = sum(w m' I) * corr)

When ``usable < min_usable`` (default 0.5: a saturated core flagged BLOOM, spec §3.9) the
correction is NaN and ``status`` carries :data:`ST_PSF_UNUSABLE`: the caller must report the
flux and its error as NaN with that quality bit, never the sum of the few usable pixels.

Conventions as in :mod:`spxframe.photometry.kernels`: stamp pixel (iy, ix) is the unit square
centred on (ix, iy); the ePSF's source position is the centre of its middle element
(``((px - 1) / 2, (py - 1) / 2)`` in array indices) unless a centre is given.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from spxframe.photometry.aperture import circle_rect_area, overlap_weights

PAD = 8  #: zero elements added on each side of an ePSF array before the spline prefilter
ST_PSF_UNUSABLE = 8  #: status bit: PSF-weighted usable fraction below min_usable (flux must be NaN)
C_CORR, C_USABLE, C_PIN, C_PALL = range(4)  #: columns of :func:`aperture_corrections` output
_Z = math.sqrt(3.0) - 2.0  #: pole of the cubic B-spline prefilter


# ------------------------------------------------------------------------------------------
# Cubic B-spline coefficients (mirror boundaries, the same recursion as scipy.ndimage)
# ------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _prefilter_rows(c: np.ndarray) -> None:
    """Interpolating cubic B-spline coefficients along the last axis of a (m, n) array, in place."""
    m, n = c.shape
    z = _Z
    gain = (1.0 - z) * (1.0 - 1.0 / z)
    zn1 = z ** (n - 1)
    for r in range(m):
        row = c[r]
        for i in range(n):
            row[i] *= gain
        c0 = row[0] + zn1 * row[n - 1]
        zk = z
        for k in range(1, n - 1):
            c0 += (row[k] + zn1 * row[n - 1 - k]) * zk
            zk *= z
        row[0] = c0 / (1.0 - zn1 * zn1)
        for i in range(1, n):
            row[i] += z * row[i - 1]
        row[n - 1] = (z * row[n - 2] + row[n - 1]) * z / (z * z - 1.0)
        for i in range(n - 2, -1, -1):
            row[i] = z * (row[i + 1] - row[i])


def spline_coefficients(arrays: np.ndarray) -> np.ndarray:
    """(m, py + 2 PAD, px + 2 PAD) B-spline coefficients of (m, py, px) ePSF arrays (or one
    (py, px) array), zero-padded by :data:`PAD`. Computed once per library."""
    a = np.asarray(arrays, np.float64)
    one = a.ndim == 2
    a = a[None] if one else a
    m, py, px = a.shape
    t = np.zeros((m, px + 2 * PAD, py + 2 * PAD))  # transposed: the y pass runs along rows first
    t[:, PAD:PAD + px, PAD:PAD + py] = a.transpose(0, 2, 1)
    _prefilter_rows(t.reshape(-1, py + 2 * PAD))
    c = np.ascontiguousarray(t.transpose(0, 2, 1))
    _prefilter_rows(c.reshape(-1, px + 2 * PAD))
    return c[0] if one else c


# ------------------------------------------------------------------------------------------
# Fast kernels
# ------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _mirror(i: int, n: int) -> int:
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


@njit(cache=True, nogil=True)
def _bspline_at(coef: np.ndarray, u: float, v: float) -> float:
    """The spline at column u, row v of the (padded) grid; zero outside [0, n - 1]."""
    ny, nx = coef.shape
    if not (0.0 <= u <= nx - 1.0 and 0.0 <= v <= ny - 1.0):
        return 0.0
    iu = min(int(math.floor(u)), nx - 2)
    iv = min(int(math.floor(v)), ny - 2)
    tu, tv = u - iu, v - iv
    wu0, wu3 = (1.0 - tu) ** 3 / 6.0, tu ** 3 / 6.0
    wu1 = (3.0 * tu ** 3 - 6.0 * tu ** 2 + 4.0) / 6.0
    wu2 = 1.0 - wu0 - wu1 - wu3
    wv0, wv3 = (1.0 - tv) ** 3 / 6.0, tv ** 3 / 6.0
    wv1 = (3.0 * tv ** 3 - 6.0 * tv ** 2 + 4.0) / 6.0
    wv2 = 1.0 - wv0 - wv1 - wv3
    s = 0.0
    for a in range(4):
        row = coef[_mirror(iv - 1 + a, ny)]
        r = (wu0 * row[_mirror(iu - 1, nx)] + wu1 * row[_mirror(iu, nx)] + wu2 * row[_mirror(iu + 1, nx)]
             + wu3 * row[_mirror(iu + 2, nx)])
        s += (wv0, wv1, wv2, wv3)[a] * r
    return s


@njit(cache=True, nogil=True)
def epsf_fractions(coef: np.ndarray, ctr_x: float, ctr_y: float, ovx: float, ovy: float, cx: float, cy: float,
                   ny: int, nx: int) -> np.ndarray:
    """(ny, nx) flux fraction in each stamp pixel for a source at (cx, cy): ovx * ovy * the ePSF
    at the pixel centre. ``coef``: one array of :func:`spline_coefficients`; ``ctr_x, ctr_y``:
    the source position in the unpadded ePSF array's indices."""
    out = np.zeros((ny, nx))
    ux, vy = ctr_x + PAD, ctr_y + PAD
    for iy in range(ny):
        for ix in range(nx):
            out[iy, ix] = ovx * ovy * _bspline_at(coef, ux + ovx * (ix - cx), vy + ovy * (iy - cy))
    return out


@njit(cache=True, nogil=True)
def _correction_one(coef, ctr_x, ctr_y, ovx, ovy, cx, cy, r, mask, min_usable, out, status, k):
    ny, nx = mask.shape
    ux, vy = ctr_x + PAD, ctr_y + PAD
    pin = 0.0
    pall = 0.0
    for iy in range(int(math.floor(cy - r + 0.5)), int(math.floor(cy + r + 0.5)) + 1):
        dy0, dy1 = iy - 0.5 - cy, iy + 0.5 - cy
        for ix in range(int(math.floor(cx - r + 0.5)), int(math.floor(cx + r + 0.5)) + 1):
            w = min(max(circle_rect_area(ix - 0.5 - cx, ix + 0.5 - cx, dy0, dy1, r), 0.0), 1.0)
            if w == 0.0:
                continue
            f = w * ovx * ovy * _bspline_at(coef, ux + ovx * (ix - cx), vy + ovy * (iy - cy))
            pall += f
            if 0 <= iy < ny and 0 <= ix < nx and not mask[iy, ix]:
                pin += f
    usable = pin / pall if pall > 0.0 else np.nan
    ok = pin > 0.0 and usable >= min_usable
    out[k, C_CORR] = 1.0 / pin if ok else np.nan
    out[k, C_USABLE] = usable
    out[k, C_PIN] = pin
    out[k, C_PALL] = pall
    status[k] = 0 if ok else ST_PSF_UNUSABLE


@njit(cache=True, nogil=True)
def _corrections(coefs, zone, ctr_x, ctr_y, ovx, ovy, cx, cy, r, masks, min_usable, out, status):
    for k in range(cx.shape[0]):
        _correction_one(coefs[zone[k]], ctr_x, ctr_y, ovx, ovy, cx[k], cy[k], r, masks[k], min_usable,
                        out, status, k)


def _centre(shape, centre) -> tuple[float, float]:
    py, px = shape[-2], shape[-1]
    return ((px - 1) / 2.0, (py - 1) / 2.0) if centre is None else (float(centre[0]), float(centre[1]))


def aperture_corrections(coefs: np.ndarray, zone: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: float,
                         masks: np.ndarray, ovx: int, ovy: int, *, min_usable: float = 0.5,
                         centre: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Aperture corrections of n stamps (see the module docstring).

    coefs: (m, ...) :func:`spline_coefficients` of the library's arrays; zone: (n,) array of each
    stamp; cx, cy: (n,) source centres in stamp pixels; masks: (n, ny, nx) bool, True = not
    usable (pixels outside the stamp count as not usable); ``centre``: the source position in
    the unpadded ePSF array (default its middle). Returns (out (n, 4) float64 with columns
    C_CORR, C_USABLE, C_PIN, C_PALL; status (n,) int32, ST_PSF_UNUSABLE where NaN).
    """
    n = len(cx)
    out = np.full((n, 4), np.nan)
    status = np.zeros(n, np.int32)
    if n:
        shape = (coefs.shape[1] - 2 * PAD, coefs.shape[2] - 2 * PAD)
        ctr_x, ctr_y = _centre(shape, centre)
        _corrections(np.ascontiguousarray(coefs, np.float64), np.ascontiguousarray(zone, np.int64), ctr_x, ctr_y,
                     float(ovx), float(ovy), np.ascontiguousarray(cx, np.float64),
                     np.ascontiguousarray(cy, np.float64), float(r), np.ascontiguousarray(masks, np.bool_),
                     float(min_usable), out, status)
    return out, status


class EpsfModel:
    """An :class:`~spxframe.fits.epsf.EpsfLibrary` ready for photometry: the spline
    coefficients of a zone are computed the first time a stamp uses it (a cutout touches one or
    two of the 441 zones); :meth:`fractions` and :meth:`corrections` by zone."""

    def __init__(self, library, *, centre: tuple[float, float] | None = None) -> None:
        self.library = library
        flat = library.flat
        self.ovx, self.ovy = int(library.ovsmpx), int(library.ovsmpy)
        self.centre = _centre(flat.shape, centre)
        self.coefs = np.zeros((flat.shape[0], flat.shape[1] + 2 * PAD, flat.shape[2] + 2 * PAD))
        self._ready = np.zeros(flat.shape[0], bool)

    def prepare(self, zones) -> np.ndarray:
        """Compute the coefficients of ``zones`` not prepared yet; returns :attr:`coefs`."""
        z = np.unique(np.asarray(zones, np.int64))
        z = z[~self._ready[z]]
        if z.size:
            self.coefs[z] = spline_coefficients(self.library.flat[z])
            self._ready[z] = True
        return self.coefs

    def zone_of(self, xp, yp) -> np.ndarray:
        """Flat zone index of 0-based parent pixel positions (nearest valid zone centre)."""
        return self.library.zone_of(xp, yp)

    def fractions(self, zone: int, cx: float, cy: float, ny: int, nx: int) -> np.ndarray:
        """(ny, nx) flux fractions of a stamp, source at (cx, cy), with zone ``zone``'s ePSF."""
        coefs = self.prepare([int(zone)])
        return epsf_fractions(coefs[int(zone)], *self.centre, float(self.ovx), float(self.ovy),
                              float(cx), float(cy), int(ny), int(nx))

    def corrections(self, zone, cx, cy, r: float, masks, *, min_usable: float = 0.5):
        """:func:`aperture_corrections` with this library (``zone``: (n,) flat zone indices)."""
        return aperture_corrections(self.prepare(zone), zone, cx, cy, r, masks, self.ovx, self.ovy,
                                    min_usable=min_usable, centre=self.centre)


# ------------------------------------------------------------------------------------------
# Slow, obvious reference (numpy + scipy.ndimage; scipy is needed only here)
# ------------------------------------------------------------------------------------------


def epsf_fractions_reference(epsf: np.ndarray, ovx: int, ovy: int, cx: float, cy: float, ny: int, nx: int,
                             centre: tuple[float, float] | None = None) -> np.ndarray:
    """:func:`epsf_fractions` by ``scipy.ndimage.map_coordinates(order=3, mode='mirror')`` on
    the zero-padded array, zero beyond the padded array."""
    from scipy import ndimage

    a = np.pad(np.asarray(epsf, np.float64), PAD)
    ctr_x, ctr_y = _centre(epsf.shape, centre)
    iy, ix = np.mgrid[0:ny, 0:nx].astype(float)
    u = ctr_x + PAD + ovx * (ix - cx)
    v = ctr_y + PAD + ovy * (iy - cy)
    vals = ndimage.map_coordinates(a, [v.ravel(), u.ravel()], order=3, mode="mirror").reshape(ny, nx)
    inside = (u >= 0) & (u <= a.shape[1] - 1) & (v >= 0) & (v <= a.shape[0] - 1)
    return ovx * ovy * np.where(inside, vals, 0.0)


def aperture_correction_reference(epsf: np.ndarray, ovx: int, ovy: int, cx: float, cy: float, r: float,
                                  mask: np.ndarray, *, min_usable: float = 0.5,
                                  centre: tuple[float, float] | None = None) -> tuple[float, float, int]:
    """(correction, usable fraction, status) of one stamp, the obvious way: the aperture's whole
    bounding box as its own grid, exact overlap weights, reference fractions, then sums."""

    x_lo, y_lo = math.floor(cx - r + 0.5), math.floor(cy - r + 0.5)
    w_box = math.floor(cx + r + 0.5) - x_lo + 1
    h_box = math.floor(cy + r + 0.5) - y_lo + 1
    w = overlap_weights(cx - x_lo, cy - y_lo, r, h_box, w_box)
    f = epsf_fractions_reference(epsf, ovx, ovy, cx - x_lo, cy - y_lo, h_box, w_box, centre)
    usable = np.zeros((h_box, w_box), bool)
    ys, xs = np.mgrid[y_lo:y_lo + h_box, x_lo:x_lo + w_box]
    on = (ys >= 0) & (ys < mask.shape[0]) & (xs >= 0) & (xs < mask.shape[1])
    usable[on] = ~mask[ys[on], xs[on]]
    pall = float((w * f).sum())
    pin = float((w * f * usable).sum())
    frac = pin / pall if pall > 0 else math.nan
    if pin > 0 and frac >= min_usable:
        return 1.0 / pin, frac, 0
    return math.nan, frac, ST_PSF_UNUSABLE
