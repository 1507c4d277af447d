"""The IBE cutout grammar (spec §1.5) and cutout assembly, written independently of the client.

``center=x,y[unit]``: unit ``px``/``pix``/``pixels`` → pixel coordinates (zero-based by default,
``Universe(cutout_pixel_base=1)`` for 1-based); ``d``/``deg``/none → degrees; ``rad``, ``arcmin``,
``arcsec`` → angles. RA is reduced modulo 360; |Dec| > 90 is a BadRequest.

``size=w[,h][unit]``: one value means a square; units ``px``/``pix``/``pixels`` or angular
(``arcsec``, ``arcmin``, ``deg``, ``d``, ``rad``; default deg). Sizes become pixel counts
``n = floor(v + 0.5)`` with ``v`` = the pixel value or angle/6.15″. n < 1 or negative → BadRequest.

Box (zero-based parent pixels): the centre (cx, cy) is the sky position through the file's full
TAN-SIP WCS (``all_world2pix``, origin 0) or the given pixel. For n pixels along an axis

    x0 = floor(cx − (n − 1)/2 + 0.5)        (the n-pixel box whose centre is nearest cx; ties → higher)
    box = [max(x0, 0), min(x0 + n, 2040))    (clipped; empty → BadRequest "no overlap")

Headers change as spec §3.8: NAXISn, CRPIXn −= x0, CRPIXnA = 1 − x0, CRPIXnW = −x0; the PSF cube
and WCS-WAVE table are copied whole. Pixels are the parent planes sliced exactly.
"""

from __future__ import annotations

import gzip as _gzip
import math
import re
import warnings

import numpy as np

from spxframe.spherex import NPIX, PIXEL_SCALE_ARCSEC

from . import headers as hd


class BadRequest(ValueError):
    """A malformed or impossible cutout request (the server answers HTTP 400 with the message)."""


_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_PIX = {"px", "pix", "pixel", "pixels"}
_ANG_DEG = {"": 1.0, "d": 1.0, "deg": 1.0, "degree": 1.0, "degrees": 1.0, "rad": 180.0 / math.pi,
            "radian": 180.0 / math.pi, "radians": 180.0 / math.pi, "arcmin": 1 / 60.0, "amin": 1 / 60.0,
            "arcsec": 1 / 3600.0, "asec": 1 / 3600.0}
_ARCSEC = {"": 3600.0, "d": 3600.0, "deg": 3600.0, "degree": 3600.0, "degrees": 3600.0,
           "rad": 648000.0 / math.pi, "radian": 648000.0 / math.pi, "radians": 648000.0 / math.pi,
           "arcmin": 60.0, "amin": 60.0, "arcsec": 1.0, "asec": 1.0}
_CENTER_RE = re.compile(rf"^\s*({_NUM})\s*,\s*({_NUM})\s*([a-zA-Z]*)\s*$")
_SIZE_RE = re.compile(rf"^\s*({_NUM})\s*(?:,\s*({_NUM}))?\s*([a-zA-Z]*)\s*$")


def parse_center(text: str) -> tuple[str, float, float]:
    """``('pix', x, y)`` or ``('sky', ra_deg, dec_deg)`` from an IBE ``center`` value."""
    m = _CENTER_RE.match(text or "")
    if not m:
        raise BadRequest(f"malformed center {text!r}: expected x,y[unit]")
    a, b, unit = float(m.group(1)), float(m.group(2)), m.group(3).lower()
    if not (math.isfinite(a) and math.isfinite(b)):
        raise BadRequest(f"non-finite center {text!r}")
    if unit in _PIX:
        return "pix", a, b
    if unit not in _ANG_DEG:
        raise BadRequest(f"unknown center unit {unit!r} in {text!r}")
    ra, dec = a * _ANG_DEG[unit], b * _ANG_DEG[unit]
    if abs(dec) > 90.0:
        raise BadRequest(f"illegal declination {dec!r} in center {text!r}")
    return "sky", ra % 360.0, dec


def _to_pixels(v: float, unit: str, text: str) -> int:
    if v < 0 or not math.isfinite(v):
        raise BadRequest(f"illegal (negative or non-finite) size {text!r}")
    if unit in _PIX:
        npx = v
    elif unit in _ARCSEC:
        npx = v * _ARCSEC[unit] / PIXEL_SCALE_ARCSEC
    else:
        raise BadRequest(f"unknown size unit {unit!r} in {text!r}")
    n = int(math.floor(npx + 0.5 + 1e-9))  # half-pixel ties round up despite float error
    if n < 1:
        raise BadRequest(f"size {text!r} is smaller than one pixel")
    return n


def parse_size(text: str) -> tuple[int, int]:
    """(nx, ny) pixels from an IBE ``size`` value (default unit deg)."""
    m = _SIZE_RE.match(text or "")
    if not m:
        raise BadRequest(f"malformed size {text!r}: expected w[,h][unit]")
    unit = m.group(3).lower()
    w = float(m.group(1))
    h = float(m.group(2)) if m.group(2) is not None else w
    return _to_pixels(w, unit, text), _to_pixels(h, unit, text)


def axis_box(c: float, n: int) -> tuple[int, int]:
    """Clipped [start, stop) of an n-pixel box centred nearest zero-based ``c`` (see module doc)."""
    if not math.isfinite(c):
        raise BadRequest("cutout centre does not project onto the image")
    x0 = math.floor(c - (n - 1) / 2.0 + 0.5)
    a, b = max(x0, 0), min(x0 + n, NPIX)
    if b <= a:
        raise BadRequest("cutout box does not overlap the image")
    return int(a), int(b)


def cutout_box(wcs, center: str, size: str, pixel_base: int = 0) -> tuple[int, int, int, int]:
    """(x0, y0, nx, ny) of the clipped cutout box in zero-based parent pixels."""
    kind, a, b = parse_center(center)
    nx, ny = parse_size(size)
    if kind == "pix":
        cx, cy = a - pixel_base, b - pixel_base
    else:
        with warnings.catch_warnings():  # far-away centres: astropy warns about all-NaN slices
            warnings.simplefilter("ignore", RuntimeWarning)
            px = wcs.all_world2pix(np.array([a]), np.array([b]), 0, quiet=True, tolerance=1e-7, maxiter=50)
        cx, cy = float(px[0][0]), float(px[1][0])
        if not (math.isfinite(cx) and math.isfinite(cy)):
            raise BadRequest("cutout centre does not project onto the image")
    x0, x1 = axis_box(cx, nx)
    y0, y1 = axis_box(cy, ny)
    return x0, y0, x1 - x0, y1 - y0


def assemble(meta: dict, planes: dict[str, np.ndarray], box: tuple[int, int, int, int],
             psf_hdr: bytes, psf_data: bytes, wave: tuple[bytes, bytes], gzip: bool = False) -> bytes:
    """Cutout MEF bytes from the pixel ``planes`` of the box (ny x nx each)."""
    x0, y0, nx, ny = box
    out = [hd.primary_header(meta)]
    for name in hd.PLANES:
        out.append(hd.plane_header(name, meta, x0, y0, nx, ny))
        raw = np.ascontiguousarray(planes[name]).astype(">i4" if name == "FLAGS" else ">f4").tobytes()
        out.append(raw + b"\0" * (hd.padded(len(raw)) - len(raw)))
    out += [psf_hdr, psf_data, wave[0], wave[1]]
    data = b"".join(out)
    return _gzip.compress(data, compresslevel=1, mtime=0) if gzip else data
