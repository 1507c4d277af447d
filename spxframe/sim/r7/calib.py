"""Calibration products a photometry client uses, as FITS files with their directory tree and the
IRSA directory listing (spec §2.1, §2.2, §3.10).

Path: ``<release>/<family>/<token>/<det>/<family>_D<det>_spx_<token>.fits`` under
``ibe/data/spherex/`` (and the same key in the cloud bucket); ``<token>`` =
``cal-<name>-v<k>-<yyyy>-<ddd>``. Listing: ``ibe/dir/list/spherex/<release>/<family>`` answers
one JSON object per line (``name`` relative to the family folder, ``last_modified``, ``size``).

| family | release(s) | HDUs after an empty PRIMARY |
|---|---|---|
| ``l3_flux_corrections`` | qr3 | ``FLUX_CORRECTION``: f, float32 2040x2040 (QR2 x f = R7) |
| ``spectral_wcs`` | qr2 (v4), qr3 (v5) | ``CWAVE``, ``CBAND`` (µm, float32) and the release's ``WCS-WAVE`` |
| ``solid_angle_pixel_map`` | qr2, qr3 | ``SAPM``: pixel solid angle, arcsec², float32 |
| ``epsf`` | qr3 (D3 reissued as v2) | ``EPSF``: the table the QR3 files carry, byte for byte |
| ``average_psf`` | qr2 | ``PSF``: the QR2 cube, byte for byte the L2 files' HDU |

HDU names of the cal products are not confirmed (spec §8): :data:`HDU_NAMES` is the knob. Files
are built lazily: sizes come from headers and shapes; pixels only for the byte range asked.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from spxframe.spherex import BANDS, BLOCK, NPIX

from ..world import headers as qr2h
from ..world import instrument as ins
from . import epsf as ep
from . import gains, mef
from .rice import padded

#: release -> family -> tokens (oldest first); a detector-specific reissue in DET_TOKENS
CAL_TOKENS: dict[str, dict[str, tuple[str, ...]]] = {
    "qr3": {"l3_flux_corrections": ("cal-flxc-v1-2026-191",), "spectral_wcs": ("cal-swcs-v5-2026-191",),
            "solid_angle_pixel_map": ("cal-sapm-v3-2026-191",), "epsf": ("cal-epsf-v1-2026-127",)},
    "qr2": {"spectral_wcs": ("cal-wcs-v4-2025-254",), "solid_angle_pixel_map": ("cal-sapm-v2-2025-164",),
            "average_psf": ("cal-psf-v5-2025-206", "cal-psf-v5-2026-082")},
}
#: (release, family) -> {detector: extra tokens}: versions reissued for one detector only
DET_TOKENS: dict[tuple[str, str], dict[int, tuple[str, ...]]] = {
    ("qr3", "epsf"): {d: t[1:] for d, t in ep.EPSF_TOKENS.items() if len(t) > 1}}
HDU_NAMES: dict[str, tuple[str, ...]] = {
    "l3_flux_corrections": ("FLUX_CORRECTION",), "spectral_wcs": ("CWAVE", "CBAND", "WCS-WAVE"),
    "solid_angle_pixel_map": ("SAPM",), "epsf": ("EPSF",), "average_psf": ("PSF",)}
#: average_psf token -> (PSF header VERSION, legacy zone cards): the early cube keeps the erratum
AVERAGE_PSF_HEADERS: dict[str, tuple[str, bool]] = {"cal-psf-v5-2025-206": ("6.5.4", True),
                                                    "cal-psf-v5-2026-082": ("6.5.6", False)}
D5_SHIFT_UM: dict[str, float] = {"qr2": 0.0, "qr3": 0.0}  #: CWAVE offset of D5 per release (R7 v5: +0.0064)
Rows = Callable[[int, int], np.ndarray]


def tokens(release: str, family: str, det: int) -> tuple[str, ...]:
    """Every token of a family that holds detector ``det``, oldest first."""
    base = CAL_TOKENS.get(release, {}).get(family, ())
    return base + DET_TOKENS.get((release, family), {}).get(int(det), ())


def latest(release: str, family: str, det: int) -> str | None:
    """The token a client should take: highest version, then latest date, holding ``det``."""
    ts = tokens(release, family, det)
    return max(ts, key=ep.token_parts) if ts else None


def path(release: str, family: str, token: str, det: int) -> str:
    """``<release>/<family>/<token>/<det>/<family>_D<det>_spx_<token>.fits``."""
    return f"{release}/{family}/{token}/{int(det)}/{family}_D{int(det)}_spx_{token}.fits"


# ----------------------------------------------------------------------------- pixel maps

@lru_cache(maxsize=8)
def _omega_nodes(seed: int, det: int, step: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Pixel solid angle (arcsec²) on a coarse node grid: |Jacobian| of the TAN-SIP geometry by
    +-0.5 px differences, tangent-projected at the pixel itself (as the renderer's ``omega``).
    Independent of pointing and roll (TAN is symmetric about its tangent point)."""
    g = np.unique(np.append(np.arange(0, NPIX, step), NPIX - 1)).astype(float)
    x, y = (a.ravel() for a in np.meshgrid(g, g))
    n = x.size
    xs = np.concatenate([x, x + 0.5, x - 0.5, x, x])
    ys = np.concatenate([y, y, y, y + 0.5, y - 0.5])
    ra, dec = ins.pix2world(seed, det, (150.0, 20.0), 0.0, xs, ys)
    xi, eta = ins.tan_project(np.tile(ra[:n], 5), np.tile(dec[:n], 5), ra, dec)
    xi, eta = xi.reshape(5, n), eta.reshape(5, n)
    om = np.abs((xi[1] - xi[2]) * (eta[3] - eta[4]) - (eta[1] - eta[2]) * (xi[3] - xi[4])) * 3600.0**2
    return g, om.reshape(g.size, g.size)


def solid_angle(seed: int, det: int, r0: int = 0, r1: int = NPIX, c0: int = 0, c1: int = NPIX) -> np.ndarray:
    """Pixel solid angle (arcsec², float32) over a box, bilinear between 24-px nodes (error < 1e-6)."""
    g, om = _omega_nodes(int(seed), int(det))
    y, x = np.arange(r0, r1, dtype=float), np.arange(c0, c1, dtype=float)
    j = np.clip(np.searchsorted(g, y, side="right") - 1, 0, g.size - 2)
    i = np.clip(np.searchsorted(g, x, side="right") - 1, 0, g.size - 2)
    fy, fx = ((y - g[j]) / (g[j + 1] - g[j]))[:, None], (x - g[i]) / (g[i + 1] - g[i])
    rows = om[j] * (1 - fy) + om[j + 1] * fy
    return (rows[:, i] * (1 - fx) + rows[:, i + 1] * fx).astype(np.float32)


def wavelength(release: str, det: int, r0: int = 0, r1: int = NPIX, c0: int = 0, c1: int = NPIX
               ) -> tuple[np.ndarray, np.ndarray]:
    """(CWAVE, CBAND) µm (float32) over a box: the sim's LVF at pixel centres, bandwidth λ/R."""
    yy, xx = np.mgrid[r0:r1, c0:c1]
    lam = ins.lvf_wavelength(det, xx, yy) + (D5_SHIFT_UM[release] if int(det) == 5 else 0.0)
    return lam.astype(np.float32), (lam / BANDS[f"D{det}"][2]).astype(np.float32)


# ----------------------------------------------------------------------------- lazy FITS files

@dataclass
class Part:
    """One HDU of a lazy file: header bytes, padded data size, and ``read(lo, hi)`` of its data."""

    header: bytes
    data_size: int
    read: Callable[[int, int], bytes]


def _image_part(name: str, rows: Rows, cards: list[tuple[str, object, str]], bitpix: int = -32) -> Part:
    hdr = [mef.image(k, v, c) for k, v, c in (("XTENSION", "IMAGE", "image extension"), ("BITPIX", bitpix, ""),
                                              ("NAXIS", 2, ""), ("NAXIS1", NPIX, ""), ("NAXIS2", NPIX, ""),
                                              ("PCOUNT", 0, ""), ("GCOUNT", 1, ""), ("EXTNAME", name, ""))]
    hdr += [mef.image(k, v, c) for k, v, c in cards]
    rb = NPIX * 4

    def read(lo: int, hi: int) -> bytes:
        r0, r1 = lo // rb, min(-(-hi // rb), NPIX)
        out = rows(r0, r1).astype(">f4").tobytes()[lo - r0 * rb:hi - r0 * rb] if r0 < r1 else b""
        return out + b"\0" * max(0, hi - max(lo, NPIX * rb))

    return Part(mef.block(hdr, -(-(len(hdr) + 1) * 80 // BLOCK)), padded(NPIX * rb), read)


def _bytes_part(header: bytes, data: bytes) -> Part:
    return Part(header, len(data), lambda lo, hi: data[lo:hi])


class CalFile:
    """A calibration product file: ``size``, ``read(start, stop)``, ``path``."""

    def __init__(self, release: str, family: str, token: str, det: int, parts: list[Part]) -> None:
        self.release, self.family, self.token, self.det = release, family, token, int(det)
        self.path = path(release, family, token, det)
        prim = [("SIMPLE", True, "conforms to FITS standard"), ("BITPIX", 8, ""), ("NAXIS", 0, ""),
                ("EXTEND", True, ""), ("ORIGIN", "spxframe.sim", "simulated IRSA SPHEREx archive"),
                ("TELESCOP", "SPHEREx", ""), ("DETECTOR", self.det, "detector 1-6"),
                ("FAMILY", family, "calibration product family"), ("CALTOKEN", token, "product version token"),
                ("RELEASE", release, "")]
        self.parts = [Part(mef.block([mef.image(*c) for c in prim], 1), 0, lambda lo, hi: b""), *parts]
        self._starts, pos = [], 0
        for p in self.parts:
            self._starts.append(pos)
            pos += len(p.header) + p.data_size
        self.size = pos

    def read(self, start: int = 0, stop: int | None = None) -> bytes:
        stop = self.size if stop is None else min(int(stop), self.size)
        out = []
        for p, a in zip(self.parts, self._starts):
            h = len(p.header)
            s, e = max(a, start), min(a + h, stop)
            if s < e:
                out.append(p.header[s - a:e - a])
            s, e = max(a + h, start), min(a + h + p.data_size, stop)
            if s < e:
                out.append(p.read(s - a - h, e - a - h))
        return b"".join(out)


def product(seed: int, release: str, family: str, det: int, token: str | None = None, *,
            epsf_spelling: str = "r7") -> CalFile:
    """The file of a product (``token`` default: the latest holding ``det``); KeyError if the
    release publishes no such product for the detector."""
    det = int(det)
    token = token or latest(release, family, det)
    if token is None or token not in tokens(release, family, det):
        raise KeyError(f"no {family} {token or ''} for D{det} in {release}")
    names = HDU_NAMES[family]
    if family == "l3_flux_corrections":
        parts = [_image_part(names[0], lambda r0, r1: gains.gain_map(seed, det, r0, r1), [
            ("BUNIT", "", "dimensionless factor"), ("DETECTOR", det, ""),
            ("COMMENT", "multiply pre-R7 IMAGE by f and VARIANCE by f**2; never R7 images", ""),
            ("COMMENT", f"factors outside {gains.VALID[0]}-{gains.VALID[1]} mark bad pixels", "")])]
    elif family == "spectral_wcs":
        wave = mef.wave_hdu(det) if release != "qr2" else qr2h.wave_hdu(det)
        parts = [_image_part(names[0], lambda r0, r1: wavelength(release, det, r0, r1)[0],
                             [("BUNIT", "um", "central wavelength"), ("DETECTOR", det, "")]),
                 _image_part(names[1], lambda r0, r1: wavelength(release, det, r0, r1)[1],
                             [("BUNIT", "um", "bandwidth"), ("DETECTOR", det, "")]),
                 _bytes_part(*wave)]
    elif family == "solid_angle_pixel_map":
        parts = [_image_part(names[0], lambda r0, r1: solid_angle(seed, det, r0, r1),
                             [("BUNIT", "arcsec2", "pixel solid angle"), ("DETECTOR", det, "")])]
    elif family == "epsf":
        parts = [_bytes_part(*ep.epsf_hdu(det, token, epsf_spelling))]
    else:
        version, legacy = AVERAGE_PSF_HEADERS[token]
        parts = [_bytes_part(qr2h.psf_header(det, version, legacy), qr2h.psf_data(det))]
    return CalFile(release, family, token, det, parts)


def product_size(seed: int, release: str, family: str, det: int, token: str, epsf_spelling: str = "r7") -> int:
    """Bytes of a product file, without computing its pixels or its ePSF library."""
    if family == "epsf":
        return BLOCK + ep.epsf_hdu_size(det, token, epsf_spelling)
    if family == "average_psf":  # the cube's bytes are a known size: do not compute it
        version, legacy = AVERAGE_PSF_HEADERS[token]
        return BLOCK + len(qr2h.psf_header(det, version, legacy)) + padded(qr2h.PSF_DATA_BYTES)
    return product(seed, release, family, det, token).size


def listing(seed: int, release: str, family: str, epsf_spelling: str = "r7") -> str:
    """The directory listing of ``ibe/dir/list/spherex/<release>/<family>``: one JSON object per
    line (``name`` relative to the family folder, ``last_modified`` from the token's date,
    ``size``), every token and detector; empty for a family the release does not publish."""
    lines = []
    for det in range(1, 7):
        for token in tokens(release, family, det):
            _, y, d = ep.token_parts(token)
            when = dt.datetime(y, 1, 1, 12, tzinfo=dt.UTC) + dt.timedelta(days=d - 1)
            lines.append((token, det, json.dumps({
                "name": path(release, family, token, det).split("/", 2)[2],
                "last_modified": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "size": product_size(seed, release, family, det, token, epsf_spelling)})))
    return "".join(line + "\n" for _, _, line in sorted(lines))
