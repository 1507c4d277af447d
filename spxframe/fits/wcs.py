"""Parent celestial WCS of SPHEREx L2 files: TAN-SIP without astropy, astropy as the fallback.

SPHEREx L2 images carry a TAN-SIP WCS (spec §3.4). Building an astropy ``WCS`` costs ~0.3 ms
and each of its transforms ~0.1 ms per call, which dominates per-file photometry when every file
is a different parent image (single-cutout case). :class:`TanSip` holds the parsed parameters and
transforms with two numba kernels (arrays in, arrays out) that follow astropy exactly:

- :func:`tan_sip_world2pix` = ``WCS.all_world2pix(ra, dec, 0, tolerance, maxiter, quiet=True)``:
  the gnomonic projection about CRVAL (LONPOLE 180°), the inverse linear transform, then astropy's
  fixed-point iteration on the forward SIP polynomial (A, B; AP/BP are not used, as in astropy),
  with the same stopping rule (all points at once, ``max |Δ|² < tolerance²``). If astropy would
  switch to its adaptive, divergence-guarded mode, the kernel reports it and the caller uses
  astropy itself.
- :func:`tan_sip_pixel_area` = :func:`pixel_area_arcsec2` on an astropy WCS (the same finite
  differences of ``all_pix2world`` at ±0.5 px).

The two agree with astropy to ~1e-12 px (tests/test_kernels.py). Anything but TAN / TAN-SIP with PC
or CD and LONPOLE 180 goes through astropy (:func:`parent_wcs`, :class:`AstropyWcs`).

One entry point: :func:`celestial_wcs` (a header or a file's info -> TanSip, AstropyWcs or None),
used by photometry and by range reads alike.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
from numba import njit

from spxframe import spherex
from spxframe.fits.cards import Header

_D2R = math.pi / 180.0
_R2D = 180.0 / math.pi


@njit(cache=True, nogil=True)
def _poly(c, u, v):
    """sum over p + q <= order of c[p, q] u^p v^q."""
    m = c.shape[0]
    s = 0.0
    up = 1.0
    for p in range(m):
        vq = 1.0
        for q in range(m - p):
            s += c[p, q] * up * vq
            vq *= v
        up *= u
    return s


@njit(cache=True, nogil=True)
def tan_sip_world2pix(ra, dec, crval, crpix, cdinv, a, b, tol, maxiter):
    """Zero-based pixels (x, y) of (ra, dec) in degrees; returns (x, y, ok).

    crval (2,) deg, crpix (2,) one-based, cdinv (2, 2) inverse CD matrix (pixel per degree);
    a, b: SIP matrices c[p, q] (coefficient of u^p v^q), shape (0, 0) for plain TAN. ok is False
    when astropy would have switched to its adaptive mode (a point diverging): use astropy then.
    """
    n = ra.shape[0]
    x0 = np.empty(n)
    y0 = np.empty(n)
    a0 = crval[0] * _D2R
    sd0 = math.sin(crval[1] * _D2R)
    cd0 = math.cos(crval[1] * _D2R)
    for i in range(n):
        d = dec[i] * _D2R
        da = ra[i] * _D2R - a0
        sd, cd = math.sin(d), math.cos(d)
        cda = math.cos(da)
        den = sd * sd0 + cd * cd0 * cda  # sin(native latitude)
        if not den > 0.0:
            x0[i] = np.nan
            y0[i] = np.nan
            continue
        xi = cd * math.sin(da) / den * _R2D
        eta = (sd * cd0 - cd * sd0 * cda) / den * _R2D
        x0[i] = cdinv[0, 0] * xi + cdinv[0, 1] * eta + (crpix[0] - 1.0)
        y0[i] = cdinv[1, 0] * xi + cdinv[1, 1] * eta + (crpix[1] - 1.0)
    if a.shape[0] == 0:
        return x0, y0, True
    # astropy: pix = pix0; dpix = pix2foc(pix) - pix0; pix -= dpix; repeat while max(dn) >= tol^2
    x = x0.copy()
    y = y0.copy()
    dx = np.empty(n)
    dy = np.empty(n)
    dnprev = np.empty(n)
    tol2 = tol * tol
    dmax = -1.0
    for i in range(n):
        u, v = x[i] + 1.0 - crpix[0], y[i] + 1.0 - crpix[1]
        dx[i] = x[i] + _poly(a, u, v) - x0[i]
        dy[i] = y[i] + _poly(b, u, v) - y0[i]
        x[i] -= dx[i]
        y[i] -= dy[i]
        dnprev[i] = dx[i] * dx[i] + dy[i] * dy[i]
        if dnprev[i] > dmax:  # NaN never compares greater: nanmax
            dmax = dnprev[i]
    k = 1
    while dmax >= tol2 and k < maxiter:
        dmax = -1.0
        for i in range(n):
            u, v = x[i] + 1.0 - crpix[0], y[i] + 1.0 - crpix[1]
            dx[i] = x[i] + _poly(a, u, v) - x0[i]
            dy[i] = y[i] + _poly(b, u, v) - y0[i]
            dn = dx[i] * dx[i] + dy[i] * dy[i]
            if dn >= dnprev[i] and dn >= tol2:
                return x, y, False  # astropy would go adaptive from here
            dnprev[i] = dn
            if dn > dmax:
                dmax = dn
        for i in range(n):
            x[i] -= dx[i]
            y[i] -= dy[i]
        k += 1
    return x, y, True


@njit(cache=True, nogil=True)
def _pix2world_rad(xp, yp, crval, crpix, cd, a, b):
    """(ra, dec) in radians (ra not normalised) of one zero-based pixel."""
    u, v = xp + 1.0 - crpix[0], yp + 1.0 - crpix[1]
    if a.shape[0] > 0:
        uu, vv = u + _poly(a, u, v), v + _poly(b, u, v)
    else:
        uu, vv = u, v
    xi = (cd[0, 0] * uu + cd[0, 1] * vv) * _D2R
    eta = (cd[1, 0] * uu + cd[1, 1] * vv) * _D2R
    d0 = crval[1] * _D2R
    sd0, cd0 = math.sin(d0), math.cos(d0)
    den = cd0 - eta * sd0
    return crval[0] * _D2R + math.atan2(xi, den), math.atan2(sd0 + eta * cd0, math.sqrt(xi * xi + den * den))


@njit(cache=True, nogil=True)
def tan_sip_pix2world(xp, yp, crval, crpix, cd, a, b):
    """(ra, dec) in degrees, ra in [0, 360), of zero-based pixels (xp, yp)."""
    n = xp.shape[0]
    ra = np.empty(n)
    dec = np.empty(n)
    for i in range(n):
        r, d = _pix2world_rad(xp[i], yp[i], crval, crpix, cd, a, b)
        ra[i] = (r * _R2D) % 360.0
        dec[i] = d * _R2D
    return ra, dec


@njit(cache=True, nogil=True)
def tan_sip_pixel_area(xp, yp, crval, crpix, cd, a, b):
    """Solid angle (arcsec²) of the pixel at zero-based (xp, yp): the cross product of the sky
    steps between (x ∓ 0.5, y) and (x, y ∓ 0.5), as :func:`pixel_area_arcsec2`."""
    n = xp.shape[0]
    out = np.empty(n)
    f = (180.0 / math.pi * 3600.0) ** 2
    for i in range(n):
        r0, d0 = _pix2world_rad(xp[i] - 0.5, yp[i], crval, crpix, cd, a, b)
        r1, d1 = _pix2world_rad(xp[i] + 0.5, yp[i], crval, crpix, cd, a, b)
        r2, d2 = _pix2world_rad(xp[i], yp[i] - 0.5, crval, crpix, cd, a, b)
        r3, d3 = _pix2world_rad(xp[i], yp[i] + 0.5, crval, crpix, cd, a, b)
        cosd = math.cos((d0 + d1 + d2 + d3) / 4.0)
        ax = ((r1 - r0 + math.pi) % (2 * math.pi) - math.pi) * cosd
        bx = ((r3 - r0 + math.pi) % (2 * math.pi) - math.pi - ((r2 - r0 + math.pi) % (2 * math.pi) - math.pi)) * cosd
        out[i] = abs(ax * (d3 - d2) - (d1 - d0) * bx) * f
    return out


@njit(cache=True, nogil=True)
def table_bilinear(tx, ty, values, xp1, yp1):
    """Bilinear interpolation of ``values`` (nY, nX, m) on the grid (tx (nX,), ty (nY,)) at the
    points (xp1, yp1), extrapolating linearly from the edge cells; returns (n, m)."""
    n, m = xp1.shape[0], values.shape[2]
    out = np.empty((n, m))
    for k in range(n):
        i = min(max(np.searchsorted(tx, xp1[k], side="right") - 1, 0), tx.shape[0] - 2)
        j = min(max(np.searchsorted(ty, yp1[k], side="right") - 1, 0), ty.shape[0] - 2)
        fx = (xp1[k] - tx[i]) / (tx[i + 1] - tx[i])
        fy = (yp1[k] - ty[j]) / (ty[j + 1] - ty[j])
        for c in range(m):
            out[k, c] = ((1 - fx) * (1 - fy)) * values[j, i, c] + (fx * (1 - fy)) * values[j, i + 1, c] \
                + ((1 - fx) * fy) * values[j + 1, i, c] + (fx * fy) * values[j + 1, i + 1, c]
    return out


_EMPTY = np.zeros((0, 0))


class TanSip:
    """TAN(-SIP) celestial WCS of a parent image (zero-based parent pixels in and out)."""

    __slots__ = ("crval", "crpix", "cd", "cdinv", "a", "b")

    def __init__(self, crval, crpix, cd, a=None, b=None) -> None:
        self.crval = np.asarray(crval, np.float64)
        self.crpix = np.asarray(crpix, np.float64)
        self.cd = np.ascontiguousarray(cd, np.float64)
        (c11, c12), (c21, c22) = self.cd.tolist()
        self.cdinv = np.array([[c22, -c12], [-c21, c11]]) / (c11 * c22 - c12 * c21)
        self.a = _EMPTY if a is None else np.ascontiguousarray(a, np.float64)
        self.b = _EMPTY if b is None else np.ascontiguousarray(b, np.float64)

    def world2pix(self, ra, dec, tolerance: float = 1e-8, maxiter: int = 50):
        ra, dec = np.ascontiguousarray(ra, np.float64), np.ascontiguousarray(dec, np.float64)
        x, y, ok = tan_sip_world2pix(ra, dec, self.crval, self.crpix, self.cdinv, self.a, self.b,
                                     float(tolerance), int(maxiter))
        if ok:
            return x, y
        return AstropyWcs(self.to_astropy()).world2pix(ra, dec, tolerance, maxiter)

    def pix2world(self, xp, yp):
        return tan_sip_pix2world(np.ascontiguousarray(xp, np.float64), np.ascontiguousarray(yp, np.float64),
                                 self.crval, self.crpix, self.cd, self.a, self.b)

    def pixel_area(self, xp, yp) -> np.ndarray:
        return tan_sip_pixel_area(np.ascontiguousarray(xp, np.float64), np.ascontiguousarray(yp, np.float64),
                                  self.crval, self.crpix, self.cd, self.a, self.b)

    def to_astropy(self):
        """The same WCS as an astropy object (what :func:`parent_wcs` builds)."""
        from astropy.wcs import WCS, Sip

        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crpix = list(self.crpix)
        w.wcs.crval = list(self.crval)
        w.wcs.cd = self.cd
        w.wcs.cunit = ["deg", "deg"]
        if self.a.size:
            w.sip = Sip(self.a, self.b, None, None, list(self.crpix))
        w.pixel_shape = (spherex.NPIX, spherex.NPIX)
        w.wcs.set()
        return w


class AstropyWcs:
    """An astropy WCS behind the :class:`TanSip` interface (headers TanSip does not handle)."""

    __slots__ = ("w", "crval")

    def __init__(self, w) -> None:
        self.w = w
        self.crval = np.array(w.wcs.crval, np.float64)

    def world2pix(self, ra, dec, tolerance: float = 1e-8, maxiter: int = 50):
        return self.w.all_world2pix(ra, dec, 0, tolerance=tolerance, maxiter=maxiter, quiet=True)

    def pix2world(self, xp, yp):
        return self.w.all_pix2world(xp, yp, 0)

    def pixel_area(self, xp, yp) -> np.ndarray:
        return pixel_area_arcsec2(self.w, np.asarray(xp, float), np.asarray(yp, float))


def tan_sip_from_header(h, x0: int, y0: int) -> TanSip | None:
    """TanSip of the parent from an IMAGE header (:class:`~spxframe.fits.cards.Header`), or None if astropy is needed.

    Same reading as :func:`parent_wcs` ``fast=True``: CRPIXn shifted by the A-system offsets.
    """
    ctype = (str(h.get("CTYPE1", "")), str(h.get("CTYPE2", "")))
    if not (ctype[0].startswith("RA---TAN") and ctype[1].startswith("DEC--TAN")):
        return None
    if "LONPOLE" in h and h.num("LONPOLE") != 180.0:
        return None
    f = h.num
    if "CD1_1" in h:
        cd = np.reshape(h.floats(["CD1_1", "CD1_2", "CD2_1", "CD2_2"], 0.0), (2, 2))
    elif "PC1_1" in h:
        cdelt = (f("CDELT1", 1.0), f("CDELT2", 1.0))
        pc = h.floats(["PC1_1", "PC1_2", "PC2_1", "PC2_2"], math.nan)
        pc = [1.0 if math.isnan(v) and k in (0, 3) else 0.0 if math.isnan(v) else v for k, v in enumerate(pc)]
        cd = [[cdelt[i] * pc[2 * i + j] for j in (0, 1)] for i in (0, 1)]
    else:
        return None
    crpix = (f("CRPIX1") + x0, f("CRPIX2") + y0)
    crval = (f("CRVAL1"), f("CRVAL2"))
    a = b = None
    if ctype[0].endswith("-SIP"):
        mats = []
        for name in ("A", "B"):
            order = h.get(f"{name}_ORDER")
            if order is None:
                return None
            keys, ij = _sip_keys(name, int(order))
            m = np.zeros((int(order) + 1, int(order) + 1))
            m[ij] = h.floats(keys, 0.0)
            mats.append(m)
        a, b = mats
    return TanSip(crval, crpix, cd, a, b)


_SIP_KEYS: dict[tuple[str, int], tuple[list[str], tuple[np.ndarray, np.ndarray]]] = {}


def _sip_keys(name: str, order: int) -> tuple[list[str], tuple[np.ndarray, np.ndarray]]:
    """The keywords ``<name>_p_q`` (p + q <= order) and their (p, q) indices, made once per order."""
    v = _SIP_KEYS.get((name, order))
    if v is None:
        pq = [(p, q) for p in range(order + 1) for q in range(order + 1 - p)]
        v = _SIP_KEYS[(name, order)] = ([f"{name}_{p}_{q}" for p, q in pq],
                                        (np.array([p for p, _ in pq]), np.array([q for _, q in pq])))
    return v


_WCS_KEYS = re.compile(r"^(CTYPE\d|CUNIT\d|CRVAL\d|CDELT\d|CD\d_\d|PC\d_\d|[AB]P?_(\d+_\d+|ORDER)|"
                       r"LONPOLE|LATPOLE|RADESYS|EQUINOX|MJD-OBS|DATE-OBS)$")


def _source(src, x0: int | None, y0: int | None):
    """(IMAGE header, x0, y0) of a :class:`~spxframe.fits.l2file.MefInfo` or of a header."""
    if hasattr(src, "image"):
        return src.image, (src.x0 if x0 is None else x0), (src.y0 if y0 is None else y0)
    h = src if isinstance(src, Header) else Header(bytes(src))
    return h, int(x0 or 0), int(y0 or 0)


def parent_wcs(src, x0: int | None = None, y0: int | None = None, *, fast: bool = True):
    """An astropy TAN-SIP WCS of the parent image, built from an IMAGE header.

    ``src``: a :class:`~spxframe.fits.l2file.MefInfo` (its IMAGE header and A-system offsets) or a
    header (:class:`~spxframe.fits.cards.Header` or bytes) with offsets ``x0, y0`` (default 0).
    Only the primary celestial keywords are used (no A/W alternates, no SCAMP PV cards); CRPIXn are
    shifted by the offsets, so the result is the parent's WCS for any cutout.
    ``fast``: fill a ``WCS`` object from the parsed values (≈0.3 ms) instead of astropy parsing a
    Header (≈6 ms); falls back to the Header path for anything but TAN / TAN-SIP with PC or CD.
    """
    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    h, x0, y0 = _source(src, x0, y0)
    _ = h.cards  # one full parse: ~60 look-ups follow
    crpix = [float(h["CRPIX1"]) + x0, float(h["CRPIX2"]) + y0]
    ctype = [str(h.get("CTYPE1", "")), str(h.get("CTYPE2", ""))]
    if fast and ctype[0].startswith("RA---TAN") and ctype[1].startswith("DEC--TAN") and (
            "PC1_1" in h or "CD1_1" in h):
        return _fill_wcs(h, crpix, ctype)
    keep = [c for k, c in h.cards.items() if _WCS_KEYS.match(k)]
    hdr = fits.Header.fromstring("".join(keep), sep="")
    hdr["NAXIS"] = 2
    hdr["NAXIS1"] = spherex.NPIX
    hdr["NAXIS2"] = spherex.NPIX
    hdr["CRPIX1"], hdr["CRPIX2"] = crpix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        warnings.simplefilter("ignore", UserWarning)
        return WCS(hdr)


def _fill_wcs(h, crpix: list[float], ctype: list[str]):
    """An astropy TAN(-SIP) WCS filled from parsed header values (the fast path of parent_wcs)."""
    from astropy.wcs import WCS, Sip

    w = WCS(naxis=2)
    w.wcs.ctype = [c.replace("-SIP", "") for c in ctype]
    w.wcs.crpix = crpix
    w.wcs.crval = [float(h["CRVAL1"]), float(h["CRVAL2"])]
    if "CD1_1" in h:
        w.wcs.cd = [[float(h.get(f"CD{i}_{j}", 0.0)) for j in (1, 2)] for i in (1, 2)]
    else:
        w.wcs.pc = [[float(h.get(f"PC{i}_{j}", float(i == j))) for j in (1, 2)] for i in (1, 2)]
        w.wcs.cdelt = [float(h.get("CDELT1", 1.0)), float(h.get("CDELT2", 1.0))]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = str(h.get("RADESYS", "ICRS")).strip() or "ICRS"
    for k in ("LONPOLE", "LATPOLE"):
        if k in h:
            setattr(w.wcs, k.lower(), float(h[k]))
    if ctype[0].endswith("-SIP"):
        mats = []
        for name in ("A", "B", "AP", "BP"):
            order = h.get(f"{name}_ORDER")
            if order is None:
                mats.append(None)
                continue
            m = np.zeros((int(order) + 1, int(order) + 1))
            for pq in range(int(order) + 1):
                for q in range(pq + 1):
                    m[pq - q, q] = float(h.get(f"{name}_{pq - q}_{q}", 0.0) or 0.0)
            mats.append(m)
        w.sip = Sip(mats[0], mats[1], mats[2], mats[3], crpix)
    w.pixel_shape = (spherex.NPIX, spherex.NPIX)
    w.wcs.set()
    return w


def celestial_wcs(src, x0: int | None = None, y0: int | None = None):
    """THE celestial WCS of a SPHEREx image, zero-based parent pixels in and out: :class:`TanSip`
    (numba) when the header allows, else :class:`AstropyWcs`; None if the header has no usable
    celestial WCS. ``src``, ``x0``, ``y0`` as for :func:`parent_wcs` (a whole parent file's header:
    offsets 0). Used by photometry (per parent) and by range reads (re-centring boxes)."""
    h, x0, y0 = _source(src, x0, y0)
    try:
        w = tan_sip_from_header(h, x0, y0)
    except (TypeError, ValueError, ZeroDivisionError):  # a TAN header missing values: astropy decides
        w = None
    if w is not None:
        return w
    try:
        a = parent_wcs(h, x0, y0)
    except Exception:  # noqa: BLE001 — astropy refuses the header: no usable WCS
        return None
    return AstropyWcs(a) if a.has_celestial else None


def pixel_area_arcsec2(wcs, xp: np.ndarray, yp: np.ndarray) -> np.ndarray:
    """Solid angle (arcsec²) of the pixel at zero-based parent (xp, yp) from the local Jacobian."""
    xs = np.concatenate([xp - 0.5, xp + 0.5, xp, xp])
    ys = np.concatenate([yp, yp, yp - 0.5, yp + 0.5])
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    n = len(xp)
    ra, dec = np.radians(ra).reshape(4, n), np.radians(dec).reshape(4, n)
    dra = (ra - ra[0] + np.pi) % (2 * np.pi) - np.pi
    cosd = np.cos(dec.mean(axis=0))
    a = (dra[1] - dra[0]) * cosd, dec[1] - dec[0]
    b = (dra[3] - dra[2]) * cosd, dec[3] - dec[2]
    return np.abs(a[0] * b[1] - a[1] * b[0]) * (180 / np.pi * 3600) ** 2


# ------------------------------------------------------------------------------ the W system (WCS-WAVE)
class WaveAxes:
    """The spectral ``W`` system of one file (FITS WCS Paper III ``-TAB``, spec §3.3): file pixels →
    the coordinates looked up in the WCS-WAVE table's index vectors (X for axis 1, Y for axis 2).

    For axis i: ψᵢ = CRVALiW + Σⱼ CDELTiW·PCi_jW·(pⱼ − CRPIXjW) (or CDi_jW), p = the 1-based pixel
    of the file itself. Whatever the cutout service did — CRPIXnW shifted by the box origin with
    the table unchanged, or the table's X/Y rebased with CRPIXnW unchanged — ψ is what the file's
    own table is indexed by, so the lookup gives the parent's wavelengths either way. A header
    without ``CRPIX1W`` (no W system) is read as the parent frame: ψ = 1-based parent pixel.
    ``PS1_2W = 'Y'`` (axes swapped relative to the index columns) swaps (ψ₁, ψ₂).
    """

    __slots__ = ("crpix", "crval", "m", "swap")

    def __init__(self, crpix, crval, m, swap: bool = False) -> None:
        self.crpix = np.asarray(crpix, np.float64)
        self.crval = np.asarray(crval, np.float64)
        self.m = np.asarray(m, np.float64)
        self.swap = bool(swap)

    def index(self, xp: np.ndarray, yp: np.ndarray, x0: int, y0: int) -> tuple[np.ndarray, np.ndarray]:
        """(ψ_X, ψ_Y): table index coordinates of zero-based parent pixels (xp, yp) in a file
        whose column 0 is parent column ``x0`` (row 0: ``y0``)."""
        d1 = np.asarray(xp, np.float64) - x0 + 1.0 - self.crpix[0]
        d2 = np.asarray(yp, np.float64) - y0 + 1.0 - self.crpix[1]
        u = self.crval[0] + self.m[0, 0] * d1 + self.m[0, 1] * d2
        v = self.crval[1] + self.m[1, 0] * d1 + self.m[1, 1] * d2
        return (v, u) if self.swap else (u, v)


def wave_axes(h, x0: int = 0, y0: int = 0) -> WaveAxes:
    """The :class:`WaveAxes` of an IMAGE header (:class:`~spxframe.fits.cards.Header`); ``x0, y0``
    (the file's A-system offsets) only serve a header without a W system (parent frame assumed)."""
    v = np.array(h.floats(_W_KEYS, math.nan))  # one pass over the keyword index
    if math.isnan(v[0]):
        return WaveAxes((-float(x0), -float(y0)), (0.0, 0.0), np.eye(2))
    v = np.where(np.isnan(v), _W_DEFAULTS, v)
    if not math.isnan(h.floats(["CD1_1W"], math.nan)[0]):
        m = np.reshape(h.floats(["CD1_1W", "CD1_2W", "CD2_1W", "CD2_2W"], 0.0), (2, 2))
    else:
        m = v[4:6, None] * v[6:10].reshape(2, 2)
    swap = "PS1_2W" in h and str(h.get("PS1_2W") or "X").strip().upper() == "Y"
    return WaveAxes(v[0:2], v[2:4], m, swap)


#: CRPIXnW, CRVALnW, CDELTnW, PCi_jW and their defaults (Paper I)
_W_KEYS = ["CRPIX1W", "CRPIX2W", "CRVAL1W", "CRVAL2W", "CDELT1W", "CDELT2W", "PC1_1W", "PC1_2W", "PC2_1W", "PC2_2W"]
_W_DEFAULTS = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
