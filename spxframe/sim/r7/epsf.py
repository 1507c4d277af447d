"""The R7 effective PSF library and its ``EPSF`` binary table (spec §3.9, §3.10).

An effective PSF (the optical PSF convolved with the pixel response) sampled 5x: value
``e[j, i]`` at offset ``((i - 16)/5, (j - 16)/5)`` px between a native pixel's centre and the
source, so that the fraction of a source's flux in that pixel is ``25 * e``. It is built from the
simulated instrument's own PSF exactly as the frames render it: the zone PSF of the 11x11 lattice
the renderer uses at the ePSF zone's centre, integrated over the pixel on the renderer's 10x10
sub-sample lattice with the renderer's normalisation. Each 33x33 array then sums to 1 (the
footprint, +-3.2 px, misses the far wing: ``enclosed`` records the fraction inside, 0.994-0.999).

Zones: a 21x21 lattice (441 rows), 11x41 (11 along x, 41 along the dispersion axis y, 451 rows)
for D3 from its second library version on. Rows run x-fast from the lower-left zone. Column and
keyword spellings can be switched among those the spec lists (:data:`SPELLINGS`).
"""

from __future__ import annotations

import datetime as dt
import io
import re
from functools import lru_cache

import numpy as np
from astropy.io import fits

from spxframe.spherex import BANDS, BLOCK, NPIX, PSF_ZONES_PER_SIDE

from ..world import instrument as ins

OVERSAMPLE = 5  #: ePSF samples per native pixel
SIDE = 33  #: ePSF array side (samples)
HALF = SIDE // 2  #: the source sits on sample (16, 16)
SUB = 10  #: renderer sub-samples per pixel and axis (the sim's 0.1 px lattice)
#: ePSF library tokens per detector (oldest first); D3 was reissued alone (spec §3.10)
EPSF_TOKENS: dict[int, tuple[str, ...]] = {d: ("cal-epsf-v1-2026-127",) for d in range(1, 7)}
EPSF_TOKENS[3] = ("cal-epsf-v1-2026-127", "cal-epsf-v2-2026-160")
#: column and keyword spellings (spec §3.9: find by role with aliases)
SPELLINGS: dict[str, dict[str, str]] = {
    "r7": {"XCENTER": "XCENTER", "YCENTER": "YCENTER", "NEFF_MEAN": "NEFF_MEAN", "OVSMP": "OVSMPX/OVSMPY"},
    "short": {"XCENTER": "XCTR", "YCENTER": "YCTR", "NEFF_MEAN": "NEFF", "OVSMP": "OVERSAMP"},
    "both": {"XCENTER": "XCENTER", "YCENTER": "YCENTER", "NEFF_MEAN": "NEFF_MEAN", "OVSMP": "OVSMPX/OVSMPY+OVERSAMP"},
}
_TOKEN_RE = re.compile(r"^cal-[a-z0-9]+-v(\d+)-(\d{4})-(\d{3})$")


def token_parts(token: str) -> tuple[int, int, int]:
    """(version, year, day of year) of a calibration token such as ``cal-epsf-v1-2026-127``."""
    m = _TOKEN_RE.match(token)
    if not m:
        raise ValueError(f"not a calibration token: {token!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def source_file(det: int, token: str) -> str:
    """The library's source-file label, ``epsf_<det>_<yyyymmdd>.fits``, from the token's date."""
    _, y, d = token_parts(token)
    day = dt.date(y, 1, 1) + dt.timedelta(days=d - 1)
    return f"epsf_{int(det)}_{day:%Y%m%d}.fits"


def latest_token(det: int) -> str:
    return EPSF_TOKENS[int(det)][-1]


def lattice(det: int, token: str | None = None) -> tuple[int, int]:
    """(zones along x, zones along y) of a detector's library."""
    token = token or latest_token(det)
    return (11, 41) if int(det) == 3 and token_parts(token)[0] >= 2 else (21, 21)


def zone_centres(nx: int, ny: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Zone centres (0-based L2 pixels, x-fast rows) and zone widths of an nx x ny lattice."""
    wx, wy = NPIX / nx, NPIX / ny
    cx, cy = (np.arange(nx) + 0.5) * wx - 0.5, (np.arange(ny) + 0.5) * wy - 0.5
    xx, yy = np.meshgrid(cx, cy)
    return xx.ravel(), yy.ravel(), wx, wy


def render_planes(det: int, xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
    """The renderer's PSF plane (11x11 zone, ``iy*11 + ix``) used at pixel positions (xc, yc)."""
    ix, iy = ins.zone_of(xc, yc)
    return iy * PSF_ZONES_PER_SIDE + ix


def pixel_fraction(par: np.ndarray, norm: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Fraction of a source's flux the renderer puts in a pixel whose centre lies (dx, dy) px from
    the source: the PSF summed over the pixel's 10x10 sub-samples at ((k - 4.5)/10) px, divided
    by the plane's raw cube sum ``norm`` (so this is the rendered value per unit flux)."""
    sub = (np.arange(SUB) - 4.5) / SUB
    dx = np.asarray(dx, float)[..., None, None] + sub[None, :]
    dy = np.asarray(dy, float)[..., None, None] + sub[:, None]
    return ins.psf_eval(par, dx, dy).sum(axis=(-2, -1)) / norm


@lru_cache(maxsize=1024)
def _plane_epsf(det: int, plane: int) -> tuple[np.ndarray, float]:
    par = ins.psf_params(det)[plane]
    _, sums = ins.psf_cube(det)
    g = (np.arange(SIDE) - HALF) / OVERSAMPLE
    raw = pixel_fraction(par, float(sums[plane]), g[None, :], g[:, None]) / OVERSAMPLE**2
    enclosed = float(raw.sum())
    return raw / enclosed, enclosed


@lru_cache(maxsize=16)
def library(det: int, token: str | None = None) -> dict[str, np.ndarray]:
    """The library of a detector: per zone (x-fast rows) ``binx``, ``biny``, ``xcenter``,
    ``ycenter``, ``xwidth``, ``ywidth``, ``plane`` (renderer PSF plane), ``epsf`` (n, 33, 33)
    float64 summing to 1, ``enclosed`` (the unnormalised sum), ``neff`` (mean over the 25 sample
    phases of 1/sum(pixel fraction^2), native pixels), ``nstar``, ``cwave``, ``cband`` (µm)."""
    det = int(det)
    nx, ny = lattice(det, token)
    xc, yc, wx, wy = zone_centres(nx, ny)
    planes = render_planes(det, xc, yc)
    arrs, enc = zip(*(_plane_epsf(det, int(p)) for p in planes))
    epsf = np.stack(arrs)
    neff = np.mean([1.0 / ((OVERSAMPLE**2 * epsf[:, b::OVERSAMPLE, a::OVERSAMPLE]) ** 2).sum(axis=(1, 2))
                    for a in range(OVERSAMPLE) for b in range(OVERSAMPLE)], axis=0)
    lam = ins.lvf_wavelength(det, xc, yc)
    rng = np.random.default_rng([det, nx, ny, 77])
    return {"binx": np.tile(np.arange(nx), ny), "biny": np.repeat(np.arange(ny), nx), "xcenter": xc, "ycenter": yc,
            "xwidth": np.full(xc.size, wx), "ywidth": np.full(xc.size, wy), "plane": planes, "epsf": epsf,
            "enclosed": np.array(enc), "neff": neff, "nstar": rng.integers(40, 400, xc.size),
            "cwave": lam, "cband": lam / BANDS[f"D{det}"][2]}


def _columns(lib: dict, names: dict[str, str], tdim: bool, epsf_format: str) -> list[fits.Column]:
    n = SIDE * SIDE
    return [
        fits.Column(name="BINX", format="J", array=lib["binx"]),
        fits.Column(name="BINY", format="J", array=lib["biny"]),
        fits.Column(name=names["XCENTER"], format="E", array=lib["xcenter"], unit="pix"),
        fits.Column(name=names["YCENTER"], format="E", array=lib["ycenter"], unit="pix"),
        fits.Column(name="XWIDTH", format="E", array=lib["xwidth"], unit="pix"),
        fits.Column(name="YWIDTH", format="E", array=lib["ywidth"], unit="pix"),
        fits.Column(name="NSTAR", format="J", array=lib["nstar"]),
        fits.Column(name=names["NEFF_MEAN"], format="E", array=lib["neff"], unit="pix"),
        fits.Column(name="CWAVE", format="E", array=lib["cwave"], unit="um"),
        fits.Column(name="CBAND", format="E", array=lib["cband"], unit="um"),
        fits.Column(name="EPSF", format=f"{n}{epsf_format}", array=lib["epsf"].reshape(-1, n),
                    dim=f"({SIDE},{SIDE})" if tdim else None),
    ]


@lru_cache(maxsize=32)
def epsf_hdu(det: int, token: str | None = None, spelling: str = "r7", tdim: bool = True,
             epsf_format: str = "D") -> tuple[bytes, bytes]:
    """The ``EPSF`` BINTABLE of a detector's library as (header bytes, padded data bytes).

    ``spelling``: a key of :data:`SPELLINGS` (``r7``: XCENTER/NEFF_MEAN/OVSMPX+OVSMPY; ``short``:
    XCTR/NEFF/OVERSAMP; ``both``: the r7 names plus an OVERSAMP card); ``tdim``: write
    ``TDIM = '(33,33)'`` on the EPSF column; ``epsf_format``: ``D`` (float64, as R7) or ``E``."""
    det, token = int(det), token or latest_token(det)
    names = SPELLINGS[spelling]
    hdu = fits.BinTableHDU.from_columns(_columns(library(det, token), names, tdim, epsf_format), name="EPSF")
    h = hdu.header
    if "OVSMPX" in names["OVSMP"]:
        h["OVSMPX"] = (OVERSAMPLE, "ePSF samples per native pixel along x")
        h["OVSMPY"] = (OVERSAMPLE, "ePSF samples per native pixel along y")
    if "OVERSAMP" in names["OVSMP"]:
        h["OVERSAMP"] = (OVERSAMPLE, "ePSF samples per native pixel")
    h["DETCOORD"] = ("sky", "zones and arrays in L2 image orientation")
    h["ORDERING"] = ("x-fast then y", "zone rows and array samples")
    h["DETECTOR"] = (det, "detector 1-6")
    h["EPSFNORM"] = ("SUM", "each array sums to 1 on its own grid")
    h.add_history(f"Calibration source file: {source_file(det, token)}")
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
    raw = buf.getvalue()[BLOCK:]
    hlen = -(-len(hdu.header.tostring()) // BLOCK) * BLOCK
    return raw[:hlen], raw[hlen:]


@lru_cache(maxsize=64)
def epsf_hdu_size(det: int, token: str | None = None, spelling: str = "r7", tdim: bool = True,
                  epsf_format: str = "D") -> int:
    """Bytes of :func:`epsf_hdu` (header + padded data) without computing the library: the same
    table built from zeros of the library's lattice."""
    nx, ny = lattice(int(det), token or latest_token(det))
    n = nx * ny
    zeros = {k: np.zeros(n) for k in ("xcenter", "ycenter", "xwidth", "ywidth", "neff", "cwave", "cband")}
    zeros.update(binx=np.zeros(n, int), biny=np.zeros(n, int), nstar=np.zeros(n, int), epsf=np.zeros((n, SIDE, SIDE)))
    hdu = fits.BinTableHDU.from_columns(_columns(zeros, SPELLINGS[spelling], tdim, epsf_format), name="EPSF")
    ovs = SPELLINGS[spelling]["OVSMP"]
    extra = 2 * ("OVSMPX" in ovs) + ("OVERSAMP" in ovs) + 5  # the cards epsf_hdu adds (HISTORY included)
    cards = len(hdu.header) + extra + 1
    return -(-cards * 80 // BLOCK) * BLOCK + -(-hdu.header["NAXIS1"] * n // BLOCK) * BLOCK
