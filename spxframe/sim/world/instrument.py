"""The simulated SPHEREx instrument: detectors, TAN-SIP geometry, LVF wavelengths, PSF, noise.

Everything here is a pure function of ``(seed, detector)`` (optics and calibration are fixed per
detector) or of a frame's parameters. Units: pixels are **zero-based** unless a name says
``1-based``; angles in degrees; wavelengths in µm; surface brightness in MJy/sr.

Only ``spxframe.spherex`` constants are shared with the client.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from spxframe.spherex import BANDS, NPIX, PIXEL_SCALE_ARCSEC, PSF_OVERSAMP, PSF_SHAPE, PSF_ZONES_PER_SIDE

CRPIX: float = 1020.5  #: 1-based reference pixel of the celestial WCS (detector centre)
CENTER0: float = (NPIX - 1) / 2.0  #: zero-based detector centre, 1019.5
ZONE_WIDTH: float = NPIX / PSF_ZONES_PER_SIDE  #: 185.4545 px
PSF_HALF: int = PSF_SHAPE[1] // 2  #: 50: the source sits on oversampled pixel (50, 50) of a plane
LVF_CURVATURE_PX: float = 12.0  #: iso-wavelength bow (px along the LVF axis at the x edges)
WAVE_GRID: int = 11  #: WCS-WAVE control points per axis
SATURATION_MJYSR: float = 40.0  #: IMAGE value where a pixel overflows (clipped, OVERFLOW)
NONLINEAR_MJYSR: float = 25.0  #: pixels of source cores above this get NONLINEAR
FULLSAMPLE_MJYSR: float = 2.0  #: pixels of source cores above this get FULLSAMPLE (informational)
SOURCE_POISSON: float = 2.0e-4  #: variance added per MJy/sr of source signal, (MJy/sr)

#: core PSF FWHM per detector, arcsec (varies ±~8 % over zones; PSF_FWHM header = median)
DET_FWHM: dict[int, float] = {1: 5.0, 2: 5.0, 3: 5.05, 4: 5.15, 5: 5.6, 6: 6.0}
#: per-pixel noise sigma at the reference zodi level, MJy/sr (spec §5.3)
DET_SIGMA: dict[int, float] = {1: 0.012, 2: 0.012, 3: 0.013, 4: 0.017, 5: 0.03, 6: 0.04}
#: zodi levels at the ecliptic poles and in the ecliptic plane, MJy/sr (spec §5.4)
ZODI_POLE: dict[int, float] = {1: 0.12, 2: 0.11, 3: 0.09, 4: 0.07, 5: 0.22, 6: 0.28}
ZODI_PLANE: dict[int, float] = {1: 0.45, 2: 0.40, 3: 0.32, 4: 0.22, 5: 0.90, 6: 1.20}
#: detectors whose wavelength decreases with y (D2: longest wavelengths at low y, spec §2.4)
LVF_REVERSED: frozenset[int] = frozenset({2, 5})

SIP_TERMS: tuple[tuple[int, int], ...] = tuple((p, q) for p in range(4) for q in range(4) if 2 <= p + q <= 3)
INV_TERMS: tuple[tuple[int, int], ...] = tuple((p, q) for p in range(4) for q in range(4) if p + q <= 3)


def det_rng(seed: int, det: int, code: int) -> np.random.Generator:
    """A generator for detector-fixed quantities (optics, bad pixels): ``[seed, 999, det, code]``."""
    return np.random.default_rng([int(seed), 999, int(det), int(code)])


# ----------------------------------------------------------------------------- geometry

def pixel_scale_deg(det: int) -> float:
    """Linear pixel scale of detector ``det`` at the reference pixel, deg/px."""
    return PIXEL_SCALE_ARCSEC / 3600.0 * (1.0 + 0.0008 * (det - 3.5))


def pc_matrix(det: int, theta_deg: float) -> np.ndarray:
    """PC matrix (deg/px, CDELT absent) for rotation ``theta_deg``; det < 0 (RA grows leftwards)."""
    s = pixel_scale_deg(det)
    t = math.radians(theta_deg)
    return s * np.array([[-math.cos(t), math.sin(t)], [math.sin(t), math.cos(t)]])


def _poly(coef: dict[tuple[int, int], float], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast(u, v).shape)
    for (p, q), c in coef.items():
        out = out + c * u**p * v**q
    return out


@lru_cache(maxsize=64)
def sip(seed: int, det: int) -> dict[str, dict[tuple[int, int], float]]:
    """Third-order SIP A/B (forward) and fitted AP/BP (inverse) coefficients of a detector.

    Distortion is a few pixels at the corners. AP/BP are least-squares fits (orders 0..3) to the
    exact inverse on a grid; residual ~0.01 px (astropy's ``all_world2pix`` iterates anyway).
    """
    rng = det_rng(seed, det, 1)
    a = {t: float(rng.uniform(-1.4e-6, 1.4e-6) if sum(t) == 2 else rng.uniform(-7e-10, 7e-10)) for t in SIP_TERMS}
    b = {t: float(rng.uniform(-1.4e-6, 1.4e-6) if sum(t) == 2 else rng.uniform(-7e-10, 7e-10)) for t in SIP_TERMS}
    g = np.linspace(-1045.0, 1045.0, 41)
    u, v = (m.ravel() for m in np.meshgrid(g, g))
    uu, vv = u + _poly(a, u, v), v + _poly(b, u, v)
    design = np.stack([uu**p * vv**q for p, q in INV_TERMS], axis=1)
    scale = np.array([1045.0 ** (p + q) for p, q in INV_TERMS])
    d = design / scale
    normal = (d[:, :, None] * d[:, None, :]).sum(axis=0)  # normal equations without threaded BLAS
    ap = np.linalg.solve(normal, (d * (u - uu)[:, None]).sum(axis=0)) / scale
    bp = np.linalg.solve(normal, (d * (v - vv)[:, None]).sum(axis=0)) / scale
    return {"A": a, "B": b, "AP": dict(zip(INV_TERMS, map(float, ap))), "BP": dict(zip(INV_TERMS, map(float, bp)))}


def tan_deproject(ra0: np.ndarray, dec0: np.ndarray, xi: np.ndarray, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic inverse: tangent-plane offsets ``xi, eta`` (deg) about ``(ra0, dec0)`` → (ra, dec) deg."""
    a0, d0 = np.radians(ra0), np.radians(dec0)
    x, y = np.radians(xi), np.radians(eta)
    den = np.cos(d0) - y * np.sin(d0)
    ra = np.degrees(a0 + np.arctan2(x, den)) % 360.0
    dec = np.degrees(np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, den)))
    return ra, dec


def tan_project(ra0, dec0, ra, dec) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic forward: (ra, dec) deg → tangent-plane offsets (xi, eta) deg about (ra0, dec0)."""
    a0, d0, a, d = (np.radians(np.asarray(z, dtype=float)) for z in (ra0, dec0, ra, dec))
    den = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / den
    eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a - a0)) / den
    return np.degrees(xi), np.degrees(eta)


def pix2world(seed: int, det: int, crval: tuple, theta_deg, x0: np.ndarray,
              y0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TAN-SIP pixel → sky in plain numpy (zero-based pixels), identical to astropy ``all_pix2world``.

    ``crval`` = (ra, dec) and ``theta_deg`` may be arrays broadcasting against the pixels.
    """
    c = sip(seed, det)
    u, v = np.asarray(x0, float) + 1.0 - CRPIX, np.asarray(y0, float) + 1.0 - CRPIX
    uu, vv = u + _poly(c["A"], u, v), v + _poly(c["B"], u, v)
    s, t = pixel_scale_deg(det), np.radians(theta_deg)
    ct, st = np.cos(t), np.sin(t)
    xi, eta = s * (-ct * uu + st * vv), s * (st * uu + ct * vv)
    return tan_deproject(crval[0], crval[1], xi, eta)


def celestial_cards(seed: int, det: int, crval: tuple[float, float], theta_deg: float,
                    x0: int = 0, y0: int = 0) -> list[tuple[str, object, str]]:
    """Celestial TAN-SIP WCS cards (plus the zero-based ``A`` system) for a box starting at (x0, y0)."""
    pc = pc_matrix(det, theta_deg)
    cards: list[tuple[str, object, str]] = [
        ("WCSAXES", 2, "number of WCS axes"),
        ("WCSNAME", "SPHEREx-ICRS", "astrometric WCS, 1-based FITS pixels"),
        ("RADESYS", "ICRS", ""),
        ("CTYPE1", "RA---TAN-SIP", ""), ("CTYPE2", "DEC--TAN-SIP", ""),
        ("CUNIT1", "deg", ""), ("CUNIT2", "deg", ""),
        ("CRPIX1", CRPIX - x0, "reference pixel (1-based)"), ("CRPIX2", CRPIX - y0, "reference pixel (1-based)"),
        ("CRVAL1", float(crval[0]), "[deg] RA at CRPIX"), ("CRVAL2", float(crval[1]), "[deg] Dec at CRPIX"),
        ("PC1_1", float(pc[0, 0]), ""), ("PC1_2", float(pc[0, 1]), ""),
        ("PC2_1", float(pc[1, 0]), ""), ("PC2_2", float(pc[1, 1]), ""),
    ]
    c = sip(seed, det)
    for name in ("A", "B", "AP", "BP"):
        cards.append((f"{name}_ORDER", 3, "SIP polynomial order"))
        cards += [(f"{name}_{p}_{q}", v, "") for (p, q), v in c[name].items()]
    cards += [
        ("WCSAXESA", 2, ""), ("WCSNAMEA", "PIXEL0", "zero-based parent pixel coordinates"),
        ("CTYPE1A", "LINEAR", ""), ("CTYPE2A", "LINEAR", ""),
        ("CRPIX1A", 1 - x0, ""), ("CRPIX2A", 1 - y0, ""),
        ("CRVAL1A", 0.0, ""), ("CRVAL2A", 0.0, ""), ("CDELT1A", 1.0, ""), ("CDELT2A", 1.0, ""),
    ]
    return cards


# ----------------------------------------------------------------------------- wavelengths

def lvf_wavelength(det: int, x0: np.ndarray, y0: np.ndarray) -> np.ndarray:
    """Analytic LVF central wavelength (µm) at zero-based pixel (x0, y0): λmin·(λmax/λmin)^(s/2040)."""
    lo, hi, _ = BANDS[f"D{det}"]
    xn = (np.asarray(x0, float) - CENTER0) / (CENTER0 + 0.5)
    s = np.asarray(y0, float) + 0.5 - LVF_CURVATURE_PX * (xn**2 - 1.0 / 3.0)
    if det in LVF_REVERSED:
        s = NPIX - s
    return lo * (hi / lo) ** (s / NPIX)


@lru_cache(maxsize=16)
def wave_table(det: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """WCS-WAVE control points: X, Y (1-based parent pixels) and VALUES (nY, nX, 2) = (λ, Δλ) µm."""
    xs = np.linspace(1.0, float(NPIX), WAVE_GRID)
    ys = np.linspace(1.0, float(NPIX), WAVE_GRID)
    xx, yy = np.meshgrid(xs - 1.0, ys - 1.0)
    lam = lvf_wavelength(det, xx, yy)
    r = BANDS[f"D{det}"][2]
    return xs, ys, np.stack([lam, lam / r], axis=-1)


def wave_at(det: int, x0: np.ndarray, y0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(λ, Δλ) µm at zero-based pixel(s), bilinear in the WCS-WAVE table (what the file says)."""
    xs, ys, vals = wave_table(det)
    xp, yp = np.asarray(x0, float) + 1.0, np.asarray(y0, float) + 1.0
    i = np.clip(np.searchsorted(xs, xp, side="right") - 1, 0, len(xs) - 2)
    j = np.clip(np.searchsorted(ys, yp, side="right") - 1, 0, len(ys) - 2)
    fx = (xp - xs[i]) / (xs[i + 1] - xs[i])
    fy = (yp - ys[j]) / (ys[j + 1] - ys[j])
    out = ((1 - fx) * (1 - fy))[..., None] * vals[j, i] + (fx * (1 - fy))[..., None] * vals[j, i + 1] \
        + ((1 - fx) * fy)[..., None] * vals[j + 1, i] + (fx * fy)[..., None] * vals[j + 1, i + 1]
    return out[..., 0], out[..., 1]


def band_range_m(det: int) -> tuple[float, float]:
    """Whole-detector (em_min, em_max) in metres from the LVF map."""
    _, _, vals = wave_table(det)
    return float(vals[..., 0].min()) * 1e-6, float(vals[..., 0].max()) * 1e-6


# ----------------------------------------------------------------------------- PSF

def zone_centers() -> np.ndarray:
    """Zero-based parent-pixel centres of the 11 zones along one axis."""
    return (np.arange(PSF_ZONES_PER_SIDE) + 0.5) * ZONE_WIDTH - 0.5


def zone_of(x0: np.ndarray, y0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ix, iy) of the zone whose centre is nearest to zero-based pixel (x0, y0)."""
    c = zone_centers()
    ix = np.abs(np.asarray(x0, float)[..., None] - c).argmin(-1)
    iy = np.abs(np.asarray(y0, float)[..., None] - c).argmin(-1)
    return ix, iy


@lru_cache(maxsize=16)
def psf_params(det: int) -> np.ndarray:
    """Per-plane analytic PSF parameters, shape (121, 6), plane = iy*11 + ix (x-fast).

    Columns: sigma_major, sigma_minor (px), position angle (rad), wing weight, wing sigma (px),
    fwhm_core (arcsec). The PSF is (1-w)·elliptical Gaussian + w·circular Gaussian.
    """
    c = zone_centers()
    out = np.zeros((PSF_ZONES_PER_SIDE**2, 6))
    for iy in range(PSF_ZONES_PER_SIDE):
        for ix in range(PSF_ZONES_PER_SIDE):
            rx, ry = (c[ix] - CENTER0) / CENTER0, (c[iy] - CENTER0) / CENTER0
            r2 = rx * rx + ry * ry
            fwhm = DET_FWHM[det] * (1.0 + 0.06 * r2 + 0.025 * rx - 0.015 * ry)
            sig = fwhm / 2.3548 / PIXEL_SCALE_ARCSEC
            e = 0.03 + 0.10 * math.sqrt(r2)
            out[iy * PSF_ZONES_PER_SIDE + ix] = (sig * (1 + e / 2), sig * (1 - e / 2), math.atan2(ry, rx),
                                                 0.07 + 0.02 * r2, 2.6 * sig + 0.25, fwhm)
    return out


def psf_eval(par: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Analytic PSF (per px², integrates to 1) of parameter row(s) ``par`` at offsets (px)."""
    smaj, smin, pa, w, sw = (par[..., k] for k in range(5))
    c, s = np.cos(pa), np.sin(pa)
    a = dx * c + dy * s
    b = -dx * s + dy * c
    core = np.exp(-0.5 * ((a / smaj) ** 2 + (b / smin) ** 2)) / (2 * np.pi * smaj * smin)
    wing = np.exp(-0.5 * (dx * dx + dy * dy) / (sw * sw)) / (2 * np.pi * sw * sw)
    return (1 - w) * core + w * wing


_SUB = (np.arange(PSF_SHAPE[1]) - PSF_HALF) / PSF_OVERSAMP  # oversampled offsets, px


@lru_cache(maxsize=8)
def psf_cube(det: int) -> tuple[np.ndarray, np.ndarray]:
    """(cube float32 (121, 101, 101) with unit-sum planes, raw sums (121,)).

    Plane k samples the analytic PSF at offsets ((i-50)/10, (j-50)/10) px (j along x, fastest);
    ``raw sums`` are the pre-normalisation sums used by the renderer so the rendered flux equals
    the flux in the cube exactly.
    """
    par = psf_params(det)
    dx, dy = np.meshgrid(_SUB, _SUB)
    raw = psf_eval(par[:, None, None, :], dx[None], dy[None])
    sums = raw.sum(axis=(1, 2))
    return (raw / sums[:, None, None]).astype(np.float32), sums


def median_fwhm(det: int) -> float:
    """Median core FWHM over zones, arcsec (IMAGE ``PSF_FWHM``)."""
    return float(np.median(psf_params(det)[:, 5]))


# ----------------------------------------------------------------------------- backgrounds

def ecliptic_latitude(ra: float, dec: float) -> float:
    """Ecliptic latitude (deg) of an ICRS position (obliquity 23.4393°)."""
    eps = math.radians(23.4393)
    a, d = math.radians(ra), math.radians(dec)
    return math.degrees(math.asin(math.sin(d) * math.cos(eps) - math.cos(d) * math.sin(eps) * math.sin(a)))


def zodi_level(det: int, beta_deg: float) -> float:
    """Zodi level (MJy/sr) for a detector at ecliptic latitude ``beta_deg``."""
    f = math.cos(math.radians(beta_deg)) ** 2
    return ZODI_POLE[det] + (ZODI_PLANE[det] - ZODI_POLE[det]) * f


@lru_cache(maxsize=8)
def bad_pixels(seed: int, det: int) -> dict[str, np.ndarray]:
    """Fixed bad pixels of a detector: sorted flat indices (row*2040+col) per kind."""
    rng = det_rng(seed, det, 2)
    n = NPIX * NPIX
    hot = rng.choice(n, 1300, replace=False)
    cold = rng.choice(n, 800, replace=False)
    dead = rng.choice(n, 1000, replace=False)
    col = int(rng.integers(50, NPIX - 50))
    r0 = int(rng.integers(0, NPIX - 300))
    dead = np.concatenate([dead, np.arange(r0, r0 + 300) * NPIX + col])
    out = {"HOT": np.unique(hot), "COLD": np.unique(cold), "NONFUNC": np.unique(dead)}
    out["COLD"] = np.setdiff1d(out["COLD"], out["HOT"])
    out["NONFUNC"] = np.setdiff1d(out["NONFUNC"], np.concatenate([out["HOT"], out["COLD"]]))
    return out
