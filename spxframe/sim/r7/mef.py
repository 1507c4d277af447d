"""The R7 (QR3) Level-2 file: headers from the QR2-style ones, the 9x9 WCS-WAVE table and the byte
layout, served by ranges without rendering more than a range needs (spec §3.9).

HDUs: PRIMARY (1 block, ``VERSION = '7.0.x'``), IMAGE (8 header blocks + float32 plane),
FLAGS (6 header blocks; a RICE_1 tile-compressed BINTABLE of one-row tiles with ``MSKNnnnn``
bit cards, or a plain int32 image if asked), VARIANCE and ZODI (4 header blocks each, as QR2),
EPSF (the detector's ePSF library table) and WCS-WAVE (1-row table, 9x9 grid every 255 px).
Because the compressed FLAGS length varies, every offset after it varies from file to file:
:class:`R7File` computes them when a read first reaches FLAGS, never before.

Inputs are plain: header bytes as the QR2 sim writes them (any box: full frame or cutout), and a
``planes(name, r0, r1)`` callable giving rows of IMAGE, FLAGS, VARIANCE, ZODI of that box.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
from astropy.io import fits

from spxframe.spherex import BANDS, BLOCK, NPIX

from ..world import instrument as ins
from ..world.headers import wave_table_hdu
from .bits import R7_COUNTED_FLAGS, mskn_cards
from .epsf import epsf_hdu, epsf_hdu_size
from .rice import TileTable, compressed_cards, padded

R7_VERSION = "7.0.5"  #: PRIMARY/IMAGE VERSION of simulated R7 files
HDR_BLOCKS: dict[str, int] = {"PRIMARY": 1, "IMAGE": 8, "FLAGS": 6, "VARIANCE": 4, "ZODI": 4}
HDUS: tuple[str, ...] = ("PRIMARY", "IMAGE", "FLAGS", "VARIANCE", "ZODI", "EPSF", "WCS-WAVE")
WAVE_GRID = 9  #: R7 WCS-WAVE control points per axis
WAVE_SPACING = 255  #: px between them (9 points span the 2040 px detector edge to edge)
_STRUCTURAL = frozenset({"XTENSION", "SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "PCOUNT", "GCOUNT", "EXTNAME",
                         "EXTEND"})
Planes = Callable[[str, int, int], np.ndarray]


# ----------------------------------------------------------------------------- cards

def card_images(header: bytes | str) -> list[str]:
    """The 80-character cards of a header up to END (blank cards dropped), as written."""
    text = header.decode("ascii") if isinstance(header, bytes) else header
    out = []
    for i in range(0, len(text), 80):
        c = text[i:i + 80]
        if c.startswith("END") and not c[3:].strip():
            break
        if c.strip():
            out.append(c.ljust(80))
    return out


def keyword(card: str) -> str:
    """The keyword of a card image (``HIERARCH`` keywords without the prefix)."""
    if card.startswith("HIERARCH "):
        return card[9:].split("=", 1)[0].strip().upper()
    return card[:8].strip().upper()


@lru_cache(maxsize=1 << 16, typed=True)
def image(key: str, value, comment: str = "") -> str:
    """One card image (astropy's formatting; memoised: headers of a frame's cutouts repeat them)."""
    return fits.Card(key, value, comment).image


def block(cards: list[str], nblocks: int) -> bytes:
    """Card images -> header bytes of exactly ``nblocks`` blocks (blank cards before END)."""
    room = nblocks * (BLOCK // 80) - 1
    if len(cards) > room:
        raise ValueError(f"header needs {len(cards) + 1} cards, only {room + 1} fit in {nblocks} blocks")
    return ("".join(cards) + " " * 80 * (room - len(cards)) + "END".ljust(80)).encode("ascii")


def _replace(cards: list[str], key: str, value, comment: str) -> list[str]:
    new = image(key, value, comment)
    return [new if keyword(c) == key else c for c in cards]


# ----------------------------------------------------------------------------- headers

def primary_header(qr2: bytes, version: str = R7_VERSION) -> bytes:
    """R7 PRIMARY header: the QR2 one with ``VERSION`` set to the R7 pipeline version."""
    return block(_replace(card_images(qr2), "VERSION", version, "pipeline version"), HDR_BLOCKS["PRIMARY"])


def image_header(qr2: bytes, counts: dict[str, int] | None = None, version: str = R7_VERSION) -> bytes:
    """R7 IMAGE header (8 blocks): ``VERSION`` set; ``L2 N_<FLAG>`` cards for every R7 counted flag,
    taken from ``counts`` where given, else from the QR2 cards (0 for a new flag not in either)."""
    cards = _replace(card_images(qr2), "VERSION", version, "pipeline version")
    old = {keyword(c)[5:]: c for c in cards if keyword(c).startswith("L2 N_")}
    at = next((i for i, c in enumerate(cards) if keyword(c).startswith("L2 N_")), len(cards))
    rest = [c for c in cards if not keyword(c).startswith("L2 N_")]
    counts = counts or {}
    new = [image(f"HIERARCH L2 N_{f}", int(counts[f]), f"pixels with {f}") if f in counts
           else old.get(f, image(f"HIERARCH L2 N_{f}", 0, f"pixels with {f}")) for f in R7_COUNTED_FLAGS]
    return block(rest[:at] + new + rest[at:], HDR_BLOCKS["IMAGE"])


def flags_cards(qr2: bytes) -> list[str]:
    """The non-structural cards of an R7 FLAGS header: the QR2 FLAGS cards (DETECTOR, OBSID, the
    celestial WCS) without the ``MP_`` cards, plus ``MSKNnnnn = '<NAME>'`` for every R7 bit."""
    keep = [c for c in card_images(qr2) if keyword(c) not in _STRUCTURAL and not keyword(c).startswith("MP_")]
    return keep + [image(k, v, c) for k, v, c in mskn_cards()]


def flags_header(cards: list[str], nx: int, ny: int, tiles: TileTable | None) -> bytes:
    """The R7 FLAGS header (6 blocks): compressed (``tiles`` given) or a plain int32 image."""
    if tiles is not None:
        struct = [image(k, v, c) for k, v, c in compressed_cards(nx, ny, tiles.heap_size, tiles.max_len)]
    else:
        struct = [image(k, v, c) for k, v, c in (("XTENSION", "IMAGE", "image extension"), ("BITPIX", 32, ""),
                                                 ("NAXIS", 2, ""), ("NAXIS1", nx, ""), ("NAXIS2", ny, ""),
                                                 ("PCOUNT", 0, ""), ("GCOUNT", 1, ""), ("EXTNAME", "FLAGS", ""))]
    return block(struct + cards, HDR_BLOCKS["FLAGS"])


def plain_header(qr2: bytes, name: str) -> bytes:
    """VARIANCE/ZODI headers: as QR2, re-blocked to R7's count (4, the same)."""
    return block(card_images(qr2), HDR_BLOCKS[name])


@lru_cache(maxsize=16)
def wave_table(det: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """R7 WCS-WAVE control points: X, Y (1-based parent pixels 0.5, 255.5, ... 2040.5, the detector
    edges) and VALUES (nY, nX, 2) = (λ, Δλ) µm of the sim's LVF there."""
    xs = 0.5 + WAVE_SPACING * np.arange(WAVE_GRID, dtype=float)
    assert xs[-1] == NPIX + 0.5
    xx, yy = np.meshgrid(xs - 1.0, xs - 1.0)
    lam = ins.lvf_wavelength(det, xx, yy)
    return xs, xs.copy(), np.stack([lam, lam / BANDS[f"D{det}"][2]], axis=-1)


@lru_cache(maxsize=16)
def wave_hdu(det: int) -> tuple[bytes, bytes]:
    """The R7 WCS-WAVE BINTABLE (1 row: X, Y, VALUES with TDIM (2, 9, 9)) as (header, data) bytes."""
    return wave_table_hdu(*wave_table(det))


# ----------------------------------------------------------------------------- the file

class R7File:
    """An R7 L2 file (or cutout) of ``shape`` = (ny, nx) pixels, read by byte ranges.

    ``headers``: R7 ``PRIMARY``, ``IMAGE``, ``VARIANCE``, ``ZODI`` header bytes and ``FLAGS``: the
    FLAGS cards (:func:`flags_cards`); ``planes(name, r0, r1)``: rows of a plane; ``epsf`` and
    ``wave``: (header, data) bytes of the EPSF and WCS-WAVE tables; ``tiles``: the FLAGS
    :class:`TileTable` (made from ``planes`` when not given: pass a cached one, or its cached
    ``lengths``, to skip compressing FLAGS for the size); ``compress_flags=False`` writes FLAGS
    plain (a cutout service might)."""

    def __init__(self, headers: dict, planes: Planes, shape: tuple[int, int], epsf: tuple[bytes, bytes],
                 wave: tuple[bytes, bytes], *, tiles: TileTable | None = None, compress_flags: bool = True,
                 lengths: np.ndarray | None = None) -> None:
        self.headers, self.planes, self.shape = headers, planes, (int(shape[0]), int(shape[1]))
        self.epsf, self.wave, self.compress = epsf, wave, compress_flags
        ny, nx = self.shape
        if compress_flags and tiles is None:
            tiles = TileTable(lambda r0, r1: planes("FLAGS", r0, r1), self.shape, lengths=lengths)
        self.tiles = tiles if compress_flags else None
        self._flags_hdr: bytes | None = None
        plane = padded(nx * ny * 4)
        flags_data = (lambda: self.tiles.data_size) if self.tiles is not None else (lambda: plane)
        #: (hdu, kind, size callable): the order of the bytes
        self._parts: list[tuple[str, str, Callable[[], int]]] = [
            ("PRIMARY", "hdr", lambda: len(headers["PRIMARY"])),
            ("IMAGE", "hdr", lambda: len(headers["IMAGE"])), ("IMAGE", "data", lambda: plane),
            ("FLAGS", "hdr", lambda: HDR_BLOCKS["FLAGS"] * BLOCK), ("FLAGS", "data", flags_data),
            ("VARIANCE", "hdr", lambda: len(headers["VARIANCE"])), ("VARIANCE", "data", lambda: plane),
            ("ZODI", "hdr", lambda: len(headers["ZODI"])), ("ZODI", "data", lambda: plane),
            ("EPSF", "hdr", lambda: len(epsf[0])), ("EPSF", "data", lambda: len(epsf[1])),
            ("WCS-WAVE", "hdr", lambda: len(wave[0])), ("WCS-WAVE", "data", lambda: len(wave[1]))]

    def segments(self, stop: int | None = None) -> list[tuple[str, str, int, int]]:
        """(hdu, kind, start, stop) of the file's parts, computed only up to byte ``stop``."""
        out, pos = [], 0
        for hdu, kind, size in self._parts:
            if stop is not None and pos >= stop:
                break
            n = size()
            out.append((hdu, kind, pos, pos + n))
            pos += n
        return out

    @property
    def size(self) -> int:
        return self.segments()[-1][3]

    def offsets(self) -> dict[str, tuple[int, int, int]]:
        """HDU -> (header start, data start, data end) in bytes."""
        out: dict[str, list[int]] = {}
        for hdu, kind, a, b in self.segments():
            out.setdefault(hdu, [a, a, a])
            if kind == "hdr":
                out[hdu][1] = out[hdu][2] = b
            else:
                out[hdu][2] = b
        return {k: tuple(v) for k, v in out.items()}

    def flags_header(self) -> bytes:
        if self._flags_hdr is None:
            ny, nx = self.shape
            self._flags_hdr = flags_header(self.headers["FLAGS"], nx, ny, self.tiles)
        return self._flags_hdr

    def _plane_bytes(self, name: str, lo: int, hi: int) -> bytes:
        ny, nx = self.shape
        rb = nx * 4
        r0, r1 = lo // rb, min(-(-hi // rb), ny)
        out = b""
        if r0 < r1:
            a = np.asarray(self.planes(name, r0, r1)).astype(">i4" if name == "FLAGS" else ">f4", copy=False)
            out = a.tobytes()[lo - r0 * rb:hi - r0 * rb]
        return out + b"\0" * max(0, hi - max(lo, ny * rb))

    def _segment(self, hdu: str, kind: str, lo: int, hi: int) -> bytes:
        if hdu == "FLAGS":
            if kind == "hdr":
                return self.flags_header()[lo:hi]
            if self.tiles is not None:
                return self.tiles.read_data(lo, hi)
        if hdu == "EPSF":
            return self.epsf[0 if kind == "hdr" else 1][lo:hi]
        if hdu == "WCS-WAVE":
            return self.wave[0 if kind == "hdr" else 1][lo:hi]
        if kind == "hdr":
            return self.headers[hdu][lo:hi]
        return self._plane_bytes(hdu, lo, hi)

    def read(self, start: int = 0, stop: int | None = None) -> bytes:
        """Bytes [start, stop) of the file (clipped to its size)."""
        start = max(int(start), 0)
        out = []
        for hdu, kind, a, b in self.segments(stop):
            lo, hi = max(a, start), b if stop is None else min(b, int(stop))
            if lo < hi:
                out.append(self._segment(hdu, kind, lo - a, hi - a))
        return b"".join(out)


def r7_headers(qr2: dict[str, bytes], counts: dict[str, int] | None = None, version: str = R7_VERSION) -> dict:
    """R7 headers from the QR2-style ``PRIMARY``, ``IMAGE``, ``FLAGS``, ``VARIANCE``, ``ZODI``
    header bytes of the same box (see :class:`R7File`)."""
    return {"PRIMARY": primary_header(qr2["PRIMARY"], version), "IMAGE": image_header(qr2["IMAGE"], counts, version),
            "FLAGS": flags_cards(qr2["FLAGS"]), "VARIANCE": plain_header(qr2["VARIANCE"], "VARIANCE"),
            "ZODI": plain_header(qr2["ZODI"], "ZODI")}


def write_r7(planes: dict[str, np.ndarray], qr2_headers: dict[str, bytes], det: int, *,
             counts: dict[str, int] | None = None, version: str = R7_VERSION, epsf: tuple[bytes, bytes] | None = None,
             compress_flags: bool = True) -> bytes:
    """A whole R7 file (or cutout) from in-memory planes (IMAGE, FLAGS, VARIANCE, ZODI of one box)
    and the QR2-style headers of that box; ``epsf`` defaults to the detector's latest library."""
    shape = np.asarray(planes["IMAGE"]).shape
    f = R7File(r7_headers(qr2_headers, counts, version), lambda n, r0, r1: planes[n][r0:r1], shape,
               epsf or epsf_hdu(det), wave_hdu(det), compress_flags=compress_flags)
    return f.read()


def estimate_size(det: int, nx: int = NPIX, ny: int = NPIX, heap_per_row: int = 1800, token: str | None = None) -> int:
    """A plan-time size of an R7 file or cutout (what an observations table can hold without
    compressing FLAGS): every part exact but the FLAGS heap, taken as ``heap_per_row`` bytes a
    row (the sim's frames: ~1.8 kB at full width; ~6 kB where SOURCE is salt and pepper)."""
    plane = padded(nx * ny * 4)
    hdrs = sum(HDR_BLOCKS.values()) * BLOCK
    flags = padded(8 * ny + heap_per_row * ny * nx // NPIX)
    return hdrs + 3 * plane + flags + epsf_hdu_size(det, token) + sum(map(len, wave_hdu(det)))
