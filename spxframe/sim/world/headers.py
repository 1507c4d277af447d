"""FITS headers and the byte layout of the simulated QR2 L2 MEF (spec §3).

Headers are padded with blank cards to the real block counts (PRIMARY 1, IMAGE 7, FLAGS 5,
VARIANCE 4, ZODI 4, PSF 15, WCS-WAVE 1 + 1 data block), so a full file is 71,634,240 bytes and a
cutout of w×h pixels is 38·2880 + 4·ceil(4wh/2880)·2880 + 4,939,200 bytes (spec §3.8).
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from astropy.io import fits

from spxframe.spherex import (
    BLOCK,
    FLAG_BITS,
    FULL_FILE_BYTES,
    NPIX,
    PLANE_HDUS,
    PSF_OVERSAMP,
    PSF_SHAPE,
    PSF_ZONES_PER_SIDE,
)

from . import instrument as ins

HDR_BLOCKS: dict[str, int] = {"PRIMARY": 1, "IMAGE": 7, "FLAGS": 5, "VARIANCE": 4, "ZODI": 4, "PSF": 15, "WCS-WAVE": 1}
PLANES: tuple[str, ...] = PLANE_HDUS
PSF_DATA_BYTES = int(np.prod(PSF_SHAPE)) * 4
#: flags counted by the IMAGE ``L2 N_<FLAG>`` cards (14: all but PHANTOM and REFERENCE)
COUNTED_FLAGS: tuple[str, ...] = tuple(n for n in FLAG_BITS if n not in ("PHANTOM", "REFERENCE"))


def padded(n: int) -> int:
    """``n`` rounded up to whole 2880-byte blocks."""
    return -(-n // BLOCK) * BLOCK


@lru_cache(maxsize=1 << 16, typed=True)
def _card_image(key: str, value, comment: str) -> str:
    return fits.Card(key, value, comment).image


def card_image(key: str, value, comment: str) -> str:
    """The 80-character card image (astropy's formatting; repeated cards come from a cache keyed by
    type and value, except float zeros, whose sign the cache could not tell apart)."""
    if isinstance(value, float) and value == 0.0:
        return fits.Card(key, value, comment).image
    return _card_image(key, value, comment)


def card_block(cards: list[tuple[str, object, str]], nblocks: int) -> bytes:
    """Cards → header bytes of exactly ``nblocks`` blocks (blank cards before a final END)."""
    body = "".join(card_image(k, v, c) for k, v, c in cards)
    ncard = len(body) // 80
    room = nblocks * 36 - 1
    if ncard > room:
        raise ValueError(f"header needs {ncard + 1} cards, only {room + 1} fit in {nblocks} blocks")
    out = (body + " " * 80 * (room - ncard) + "END".ljust(80)).encode("ascii")
    assert len(out) == nblocks * BLOCK
    return out


def layout(nx: int = NPIX, ny: int = NPIX) -> list[tuple[str, str, int, int]]:
    """Segments (hdu, 'hdr'|'data', start, stop) of a file whose planes are nx×ny."""
    out, pos = [], 0
    for name in ("PRIMARY",) + PLANES + ("PSF", "WCS-WAVE"):
        h = HDR_BLOCKS[name] * BLOCK
        out.append((name, "hdr", pos, pos + h))
        pos += h
        n = {"PRIMARY": 0, "PSF": padded(PSF_DATA_BYTES), "WCS-WAVE": BLOCK}.get(name, padded(nx * ny * 4))
        if n:
            out.append((name, "data", pos, pos + n))
            pos += n
    return out


FULL_LAYOUT = layout()
assert FULL_LAYOUT[-1][3] == FULL_FILE_BYTES


def primary_header(meta: dict) -> bytes:
    """PRIMARY header (no data): VERSION, OBSID, DETECTOR and a few provenance cards."""
    cards = [("SIMPLE", True, "conforms to FITS standard"), ("BITPIX", 8, ""), ("NAXIS", 0, ""),
             ("EXTEND", True, ""), ("ORIGIN", "spxframe.sim", "simulated IRSA SPHEREx archive"),
             ("TELESCOP", "SPHEREx", ""), ("INSTRUME", "SPHEREx", ""),
             ("VERSION", meta["version"], "pipeline version"), ("OBSID", meta["obs_id"], ""),
             ("DETECTOR", meta["det"], ""), ("DATE", meta["date"], "file creation date (UTC)")]
    return card_block(cards, HDR_BLOCKS["PRIMARY"])


def wave_cards(x0: int, y0: int) -> list[tuple[str, object, str]]:
    """The ``W`` alternate WCS (spec §3.3 recipe) for a box starting at zero-based (x0, y0)."""
    cards: list[tuple[str, object, str]] = [("WCSAXESW", 2, ""),
                                            ("WCSNAMEW", "WAVELENGTH", "spectral lookup in WCS-WAVE")]
    for i, (ctype, cname, idx) in enumerate((("WAVE-TAB", "Wavelength", "X"), ("WAVE-TAB", "Bandwidth", "Y")), 1):
        cards += [(f"CTYPE{i}W", ctype, ""), (f"CNAME{i}W", cname, ""), (f"CUNIT{i}W", "um", ""),
                  (f"PS{i}_0W", "WCS-WAVE", "table extension"), (f"PV{i}_1W", 1, "EXTVER"),
                  (f"PV{i}_2W", 1, "EXTLEVEL"), (f"PS{i}_1W", "VALUES", "coordinate array column"),
                  (f"PS{i}_2W", idx, "index vector column"), (f"PV{i}_3W", i, "axis number in the array"),
                  (f"CRPIX{i}W", -(x0 if i == 1 else y0), ""), (f"CRVAL{i}W", 0.0, ""), (f"CDELT{i}W", 1.0, "")]
    return cards


def plane_header(name: str, meta: dict, x0: int = 0, y0: int = 0, nx: int = NPIX, ny: int = NPIX) -> bytes:
    """IMAGE/FLAGS/VARIANCE/ZODI header for a box (x0, y0, nx, ny) of the parent (full: 0, 0, 2040, 2040)."""
    bitpix = 32 if name == "FLAGS" else -32
    cards: list[tuple[str, object, str]] = [
        ("XTENSION", "IMAGE", "image extension"), ("BITPIX", bitpix, ""), ("NAXIS", 2, ""),
        ("NAXIS1", nx, ""), ("NAXIS2", ny, ""), ("PCOUNT", 0, ""), ("GCOUNT", 1, ""), ("EXTNAME", name, "")]
    if name in ("IMAGE", "ZODI"):
        cards.append(("BUNIT", "MJy/sr", "surface brightness"))
    elif name == "VARIANCE":
        cards.append(("BUNIT", "MJy2 / sr2", "variance of IMAGE, (MJy/sr)^2"))
    cards += [("DETECTOR", meta["det"], "detector 1-6"), ("OBSID", meta["obs_id"], "observation id")]
    if name == "IMAGE":
        t0, t1 = meta["t_min"], meta["t_max"]
        cards += [
            ("EXPIDN", meta["expidn"], "exposure id"), ("DATE", meta["date"], "file creation date (UTC)"),
            ("DATE-OBS", meta["date_beg"], "exposure start (UTC)"), ("DATE-BEG", meta["date_beg"], ""),
            ("DATE-END", meta["date_end"], ""), ("DATE-AVG", meta["date_avg"], "mid-exposure (UTC)"),
            ("MJD-OBS", t0, "[d] exposure start, MJD (UTC)"), ("MJD-BEG", t0, "[d]"), ("MJD-END", t1, "[d]"),
            ("MJD-AVG", (t0 + t1) / 2.0, "[d] mid-exposure"), ("TIMESYS", "UTC", ""),
            ("XPOSURE", meta["exptime"], "[s] exposure time"),
            ("PSF_FWHM", meta["psf_fwhm"], "[arcsec] median PSF FWHM"),
            ("X_SC", meta["sc"][0], "[km] spacecraft position"), ("Y_SC", meta["sc"][1], "[km]"),
            ("Z_SC", meta["sc"][2], "[km]"), ("VX_SC", meta["sc"][3], "[km/s] spacecraft velocity"),
            ("VY_SC", meta["sc"][4], "[km/s]"), ("VZ_SC", meta["sc"][5], "[km/s]"),
            ("HIERARCH XYZ_SC_SYSTEM", "GEOCENTER", ""),
            ("HIERARCH OMEGA_MEDIAN", meta["omega_median"], "[arcsec2] median pixel solid angle"),
            ("FINAST", 0, "astrometry status"), ("L2DQAFLG", "PASS", "L2 QA"), ("SPS_EPA", meta["epa"], "[deg]"),
            ("VERSION", meta["version"], "pipeline version")]
        cards += [(f"HIERARCH L2 N_{f}", int(meta["counts"][f]), f"pixels with {f}") for f in COUNTED_FLAGS]
    cards += ins.celestial_cards(meta["seed"], meta["det"], meta["crval"], meta["rot"], x0, y0)
    if name == "IMAGE":
        cards += wave_cards(x0, y0)
    if name == "FLAGS":
        cards += [(f"HIERARCH MP_{f}", b, f"bit {b}") for f, b in FLAG_BITS.items()]
    return card_block(cards, HDR_BLOCKS[name])


@lru_cache(maxsize=16)
def psf_header(det: int, version: str, legacy: bool) -> bytes:
    """PSF header: cube geometry, OVERSAMP and 4×121 zone cards (legacy labelling if ``legacy``).

    Plane k (1-based) holds zone (ix, iy) with k = iy*11 + ix + 1. Correct headers label it so;
    legacy headers (spec §3.6) label plane k as zone (ix', iy') = ((k-1)//11, (k-1)%11).
    """
    n = PSF_ZONES_PER_SIDE
    cards: list[tuple[str, object, str]] = [
        ("XTENSION", "IMAGE", ""), ("BITPIX", -32, ""), ("NAXIS", 3, ""), ("NAXIS1", PSF_SHAPE[2], ""),
        ("NAXIS2", PSF_SHAPE[1], ""), ("NAXIS3", PSF_SHAPE[0], ""), ("PCOUNT", 0, ""), ("GCOUNT", 1, ""),
        ("EXTNAME", "PSF", ""), ("DETECTOR", det, ""), ("VERSION", version, "pipeline version"),
        ("OVERSAMP", PSF_OVERSAMP, "PSF pixels per detector pixel"), ("PSFPIXSC", 0.615, "[arcsec] PSF pixel"),
        ("NZONES", n * n, "number of PSF zones"), ("NZONEX", n, ""), ("NZONEY", n, ""),
        ("PSFNORM", "SUM", "each plane sums to 1"), ("PSFCTR", 51, "1-based PSF pixel of the source position"),
        ("FWHMMED", ins.median_fwhm(det), "[arcsec] median core FWHM"),
        ("COMMENT", "zone centres: 0-based parent pixels", ""),
        ("COMMENT", "plane k = iy*11 + ix + 1 (x fastest)" if not legacy else "legacy zone labelling", "")]
    c = ins.zone_centers()
    for k in range(1, n * n + 1):
        ix, iy = ((k - 1) // n, (k - 1) % n) if legacy else ((k - 1) % n, (k - 1) // n)
        cards += [(f"XCTR_{k}", float(round(c[ix], 4)), f"Center of x zone ({ix}, {iy})"),
                  (f"YCTR_{k}", float(round(c[iy], 4)), f"Center of y zone ({ix}, {iy})"),
                  (f"XWID_{k}", float(round(ins.ZONE_WIDTH, 4)), f"Width of x zone ({ix}, {iy})"),
                  (f"YWID_{k}", float(round(ins.ZONE_WIDTH, 4)), f"Width of y zone ({ix}, {iy})")]
    return card_block(cards, HDR_BLOCKS["PSF"])


@lru_cache(maxsize=8)
def psf_data(det: int) -> bytes:
    """The PSF cube as big-endian float32 bytes, padded to whole blocks."""
    cube, _ = ins.psf_cube(det)
    raw = cube.astype(">f4").tobytes()
    return raw + b"\0" * (padded(len(raw)) - len(raw))


def wave_table_hdu(xs: np.ndarray, ys: np.ndarray, vals: np.ndarray) -> tuple[bytes, bytes]:
    """A WCS-WAVE BINTABLE (1 row: X, Y 1-based, VALUES with TDIM (2, nX, nY)) as (header, data) bytes."""
    cols = [fits.Column(name="X", format=f"{len(xs)}D", array=xs[None], unit="pix"),
            fits.Column(name="Y", format=f"{len(ys)}D", array=ys[None], unit="pix"),
            fits.Column(name="VALUES", format=f"{vals.size}D", dim=f"(2,{len(xs)},{len(ys)})",
                        array=vals[None], unit="um")]
    hdu = fits.BinTableHDU.from_columns(cols, name="WCS-WAVE")
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
    raw = buf.getvalue()[BLOCK:]
    hlen = padded(len(fits.Header(hdu.header).tostring()))
    return raw[:hlen], raw[hlen:]


@lru_cache(maxsize=8)
def wave_hdu(det: int) -> tuple[bytes, bytes]:
    """The QR2 WCS-WAVE BINTABLE (header 1 block, data 1 block, 11x11 grid)."""
    head, data = wave_table_hdu(*ins.wave_table(det))
    assert len(head) == BLOCK and len(data) == BLOCK, (len(head), len(data))
    return head, data


def spacecraft_state(mjd: float, phase0: float) -> tuple[float, ...]:
    """Geocentric position (km) and velocity (km/s) on a 700 km polar orbit (98.6 min)."""
    r, per = 7078.0, 98.6 / 1440.0
    ang = 2 * math.pi * (mjd / per) + phase0
    node = 2 * math.pi * (mjd - 60800.0) / 365.25  # sun-synchronous precession
    v = 2 * math.pi * r / (per * 86400.0)
    p = np.array([math.cos(ang) * math.cos(node), math.cos(ang) * math.sin(node), math.sin(ang)])
    d = np.array([-math.sin(ang) * math.cos(node), -math.sin(ang) * math.sin(node), math.cos(ang)])
    return tuple(round(float(z), 4) for z in np.concatenate([r * p, v * d]))
