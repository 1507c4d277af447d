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
and WCS-WAVE table are copied whole. Pixels are the parent planes sliced exactly. The W system can
be written the other ways IRSA might (``Universe(cutout_wave_convention=...)``, :func:`wave_convention`:
the table rebased or re-sampled for the box, CRPIXnW unchanged); every way maps cutout pixels to
the parent's wavelengths.
"""

from __future__ import annotations

import gzip as _gzip
import io
import math
import re
import warnings

import numpy as np
from astropy.io import fits

from spxframe.spherex import BLOCK, NPIX, PIXEL_SCALE_ARCSEC

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


# ----------------------------------------------------------------------------- the W system of a cutout
#: How the cutout service rewrites the spectral W system (spec §3.8: IRSA says only that WCS-WAVE
#: "has also been modified"). ``shift``: CRPIXnW = −x0/−y0, the table unchanged (the spec's
#: recipe, the default); ``rebase``: CRPIXnW unchanged (0), the table's X/Y index vectors shifted
#: by −x0/−y0; ``resample``: CRPIXnW unchanged, the table re-sampled for the box (control points at
#: the box edges plus the parent's grid lines inside it, X/Y in cutout pixels; bilinear between
#: them is the parent's bilinear exactly).
WAVE_CONVENTIONS: tuple[str, ...] = ("shift", "rebase", "resample")


def _hdu_spans(data: bytes) -> list[tuple[int, int, int, dict[str, str]]]:
    """(header start, data start, next HDU start, {keyword: raw value}) of every HDU of MEF bytes."""
    out, pos = [], 0
    while pos + BLOCK <= len(data):
        cards: dict[str, str] = {}
        k = pos
        while True:
            card = data[k:k + 80].decode("ascii")
            k += 80
            if card.startswith("END") and not card[3:].strip():
                break
            if card[8:10] == "= ":
                cards.setdefault(card[:8].strip(), card[10:].split("/", 1)[0].strip().strip("'").strip())
        start = pos + hd.padded(k - pos)
        n = int(cards.get("NAXIS", 0))
        size = 0
        if n:
            size = abs(int(cards["BITPIX"])) // 8 * int(cards.get("GCOUNT", 1)) * (
                int(cards.get("PCOUNT", 0)) + math.prod(int(cards[f"NAXIS{i}"]) for i in range(1, n + 1)))
        out.append((pos, start, start + hd.padded(size), cards))
        pos = start + hd.padded(size)
    return out


def _set_card(header: bytes, key: str, value, comment: str = "") -> bytes:
    """``header`` with the card ``key`` replaced in place (same position, 80 bytes)."""
    k8 = key.ljust(8).encode("ascii")
    for i in range(0, len(header), 80):
        if header[i:i + 8] == k8:
            return header[:i] + hd.card_image(key, value, comment).encode("ascii") + header[i + 80:]
    raise KeyError(key)


def _bilinear(xs: np.ndarray, ys: np.ndarray, vals: np.ndarray, xp: np.ndarray, yp: np.ndarray) -> np.ndarray:
    """The WCS-WAVE table (xs, ys, vals (nY, nX, 2)) bilinear at the grid xp x yp: (len(yp), len(xp), 2)."""
    i = np.clip(np.searchsorted(xs, xp, side="right") - 1, 0, len(xs) - 2)
    j = np.clip(np.searchsorted(ys, yp, side="right") - 1, 0, len(ys) - 2)
    fx = ((xp - xs[i]) / (xs[i + 1] - xs[i]))[None, :, None]
    fy = ((yp - ys[j]) / (ys[j + 1] - ys[j]))[:, None, None]
    jj, ii = j[:, None], i[None, :]
    return (1 - fx) * (1 - fy) * vals[jj, ii] + fx * (1 - fy) * vals[jj, ii + 1] \
        + (1 - fx) * fy * vals[jj + 1, ii] + fx * fy * vals[jj + 1, ii + 1]


def _read_table(head: bytes, body: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with fits.open(io.BytesIO(hd.card_block([("SIMPLE", True, ""), ("BITPIX", 8, ""), ("NAXIS", 0, ""),
                                             ("EXTEND", True, "")], 1) + head + body)) as hl:
        row = hl[1].data[0]
        xs, ys = np.asarray(row["X"], float).ravel(), np.asarray(row["Y"], float).ravel()
        return xs, ys, np.asarray(row["VALUES"], float).reshape(len(ys), len(xs), 2)


def move_wave_origin(data: bytes, dx: float, dy: float, *, box: tuple[int, int, int, int] | None = None) -> bytes:
    """MEF bytes with the W system's origin moved: CRPIX1W += dx, CRPIX2W += dy in the IMAGE
    header and the WCS-WAVE index vectors X −= dx, Y −= dy — the same wavelength at every pixel.
    With ``box`` (x0, y0, nx, ny) the table is also re-sampled for the box (see
    :data:`WAVE_CONVENTIONS`). Only the IMAGE header and the WCS-WAVE HDU change."""
    spans = _hdu_spans(data)
    names = [c.get("EXTNAME", "") for *_, c in spans]
    ih, wv = spans[names.index("IMAGE")], spans[names.index("WCS-WAVE")]
    head = data[ih[0]:ih[1]]
    for i, d in ((1, dx), (2, dy)):
        v = float(ih[3].get(f"CRPIX{i}W", 0)) + d
        head = _set_card(head, f"CRPIX{i}W", int(v) if v == int(v) else v)
    xs, ys, vals = _read_table(data[wv[0]:wv[1]], data[wv[1]:wv[2]])
    if box is not None:  # the box's edges and the parent's grid lines inside it, in parent pixels
        x0, y0, nx, ny = box
        gx = np.unique(np.concatenate([[x0 + 0.5, x0 + nx + 0.5], xs[(xs > x0 + 0.5) & (xs < x0 + nx + 0.5)]]))
        gy = np.unique(np.concatenate([[y0 + 0.5, y0 + ny + 0.5], ys[(ys > y0 + 0.5) & (ys < y0 + ny + 0.5)]]))
        xs, ys, vals = gx, gy, _bilinear(xs, ys, vals, gx, gy)
    whead, wdata = hd.wave_table_hdu(xs - dx, ys - dy, vals)
    return b"".join([data[:ih[0]], head, data[ih[1]:wv[0]], whead, wdata, data[wv[2]:]])


def wave_convention(data: bytes, box: tuple[int, int, int, int], convention: str = "shift") -> bytes:
    """Cutout MEF bytes as written under the shift recipe (CRPIXnW = −x0/−y0), rewritten to
    ``convention`` (one of :data:`WAVE_CONVENTIONS`); QR2 and R7 cutouts alike."""
    if convention == "shift":
        return data
    if convention not in WAVE_CONVENTIONS:
        raise ValueError(f"cutout wave convention: one of {WAVE_CONVENTIONS}, got {convention!r}")
    x0, y0, nx, ny = box
    return move_wave_origin(data, x0, y0, box=box if convention == "resample" else None)
