"""Byte ranges of remote SPHEREx files: which bytes a pixel box needs, and local cutout files.

No network here: :mod:`spxframe.fetcher.engine` fetches bytes; this module decides *which* bytes
(:class:`RangeFile`: headers in two or three rounds of requests, then the box rows, coalesced) and turns
them into files (:func:`build_cutout`, :func:`psf_file_bytes`). Headers and HDU layout are the
one FITS model of :mod:`spxframe.fits` (cards, hdu, wcs). All offsets and sizes are in bytes;
pixel boxes are zero-based parent pixels.

A SPHEREx L2 MEF (spec §3.1) is PRIMARY, IMAGE, FLAGS, VARIANCE, ZODI (2040×2040 planes), PSF
(121×101×101 cube) and WCS-WAVE (1-row BINTABLE). Header lengths are parsed, never assumed
(the IMAGE header is 7 or 8 blocks). A pipeline R7 (QR3) file (spec §3.9) has a tile-compressed
FLAGS and an EPSF table instead of the PSF cube; its FLAGS rows and local cutout pieces are in
:mod:`spxframe.fetcher.ranges_r7`, read here in the same batches as the other planes.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from spxframe import spherex
from spxframe.errors import FileFormatError
from spxframe.fetcher.ranges_r7 import (
    EPSF,
    descriptor_ranges,
    epsf_stub_header,
    flags_cutout_data,
    flags_cutout_header,
    flags_image,
    flags_rows,
    heap_byte_ranges,
    image_size,
    is_r7_layout,
)
from spxframe.fits.cards import (  # noqa: F401  (format_card, header_length, parse_header re-exported)
    BLOCK,
    CARD,
    END_CARD,
    edit_header,
    format_card,
    header_length,
    padded,
    parse_header,
)
from spxframe.fits.hdu import (  # noqa: F401  (re-exported)
    HDU,
    REQUIRED_HDUS,
    hdu_from,
    quick_check,
    required_hdus,
    scan_fits,
)
from spxframe.fits.tiles import is_tiled
from spxframe.fits.wcs import celestial_wcs

PLANES: tuple[str, ...] = spherex.PLANE_HDUS
#: nominal header lengths in blocks (spec §3.1) used to guess where later headers start
NOMINAL_HEADER_BLOCKS: dict[str, int] = {h: spherex.QR2_HEADER_BLOCKS[h]
                                         for h in ("FLAGS", "VARIANCE", "ZODI", "PSF", "WCS-WAVE")}
HEAD_BYTES = 16 * BLOCK   # first read: PRIMARY + IMAGE header (7-8 blocks) with room to spare
TAIL_BYTES = 8 * BLOCK    # the file's tail: the WCS-WAVE header and table
#: reads byte ranges [start, stop) of one remote file -> (bytes per range, file size or None)
ReadFn = Callable[[list[tuple[int, int]]], tuple[list[bytes], "int | None"]]
#: ranges to read along with the next batch of header windows, from the HDUs parsed so far
ExtraFn = Callable[[list[HDU]], list[tuple[int, int]]]


def header_windows(layout: list[HDU], names: tuple[str, ...] = ("FLAGS", "VARIANCE", "ZODI", "PSF"),
                   *, slack_blocks: int = 3, guesses: dict[str, int] | None = None) -> list[tuple[int, int]]:
    """Speculative byte windows [start, stop) that should hold the headers of ``names`` that
    follow the last parsed HDU of ``layout`` (normally PRIMARY+IMAGE), assuming later planes have
    the IMAGE data size and the nominal (or ``guesses``) header lengths in blocks. Each window
    is widened by ``slack_blocks`` per uncertain header before it, so small deviations are
    still caught; the caller checks and falls back to exact reads."""
    g = dict(NOMINAL_HEADER_BLOCKS)
    g.update(guesses or {})
    last = layout[-1]
    plane_data = padded(last.data_size)
    pos = last.next_offset
    out = []
    for k, name in enumerate(names):
        hb = g.get(name, 4)
        lo = pos - slack_blocks * k * BLOCK
        hi = pos + (hb + slack_blocks * (k + 1)) * BLOCK if slack_blocks else pos + hb * BLOCK
        out.append((max(lo, last.next_offset), hi))
        pos += hb * BLOCK + (plane_data if name in PLANES else 0)
    return out


# --------------------------------------------------------------------------------------
# byte ranges for boxes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """A pixel box in zero-based parent pixels: columns [x0, x0+nx), rows [y0, y0+ny)."""

    x0: int
    y0: int
    nx: int
    ny: int

    def clip(self, width: int, height: int) -> Box:
        x0, y0 = max(self.x0, 0), max(self.y0, 0)
        x1, y1 = min(self.x0 + self.nx, width), min(self.y0 + self.ny, height)
        return Box(x0, y0, max(x1 - x0, 0), max(y1 - y0, 0))

    @property
    def empty(self) -> bool:
        return self.nx <= 0 or self.ny <= 0


def nearest_box_start(center: float, n: int) -> int:
    """First pixel of the n-pixel box centred nearest to zero-based ``center`` (IBE convention)."""
    return int(math.floor(center - (n - 1) / 2.0 + 0.5))


def box_row_ranges(hdu: HDU, box: Box) -> list[tuple[int, int]]:
    """Byte ranges [start, stop) of each row of ``box`` in a 2-D image HDU (row-major, x fastest)."""
    w = hdu.naxis[0]
    bpp = hdu.bytes_per_pixel
    base = hdu.data_offset
    return [(base + (y * w + box.x0) * bpp, base + (y * w + box.x0 + box.nx) * bpp)
            for y in range(box.y0, box.y0 + box.ny)]


def coalesce(ranges: Iterable[tuple[int, int]], *, max_gap: int) -> list[tuple[int, int]]:
    """Merge byte ranges that overlap or lie within ``max_gap`` bytes of each other (sorted)."""
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if e <= s:
            continue
        if out and s - out[-1][1] <= max_gap:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


class ByteStore:
    """Fetched byte ranges of one file; ``get(start, stop)`` slices across them."""

    def __init__(self, chunks: dict[tuple[int, int], bytes]) -> None:
        self._items = sorted(chunks.items())
        self._starts = [s for (s, _), _ in self._items]

    def _find(self, start: int, stop: int) -> tuple[int, bytes] | None:
        i = bisect.bisect_right(self._starts, start) - 1
        while i >= 0:
            (s, e), data = self._items[i]
            if s <= start and stop <= e:
                return s, data
            i -= 1
        return None

    def has(self, start: int, stop: int) -> bool:
        return self._find(start, stop) is not None

    def get(self, start: int, stop: int) -> bytes:
        f = self._find(start, stop)
        if f is None:
            raise KeyError(f"bytes [{start}, {stop}) were not fetched")
        s, data = f
        return data[start - s: stop - s]


# --------------------------------------------------------------------------------------
# reading one remote file by ranges (three rounds of requests; four for an R7 file)
# --------------------------------------------------------------------------------------


class RangeFile:
    """The parts of one remote MEF needed for local cutouts, read through ``read`` (a function
    fetching byte ranges; :class:`spxframe.fetcher.http.RangeClient` in fetch).

    Round 1 reads the first 16 blocks (PRIMARY + IMAGE headers); round 2 reads guessed windows
    for the FLAGS/VARIANCE/ZODI/PSF headers plus the file's tail (WCS-WAVE); headers are then
    parsed in sequence and any header a window missed is read with windows for the headers
    after it, in one batch. Round 3 reads the box rows of the four planes (coalesced) and any
    small HDU data not yet held.

    An R7 (QR3) file costs one more round: round 2 holds only the FLAGS header (its compressed
    length moves every later HDU); round 3 the VARIANCE, ZODI and EPSF headers and the FLAGS
    tile descriptors of the boxes (``extra``); round 4 the rows of IMAGE, VARIANCE, ZODI and
    the FLAGS heap bytes. The ePSF library is read once per key by the caller."""

    def __init__(self, read: ReadFn, name: str = "") -> None:
        self._read, self.name = read, name
        self.chunks: dict[tuple[int, int], bytes] = {}
        self.total: int | None = None

    def read(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        data, total = self._read(ranges)
        if total is not None:
            self.total = total
        for (s, _), d in zip(ranges, data):
            self.chunks[(s, s + len(d))] = d
        return data

    def hdu_at(self, pos: int, index: int) -> HDU:
        """The HDU whose header starts at byte ``pos``: from bytes held, else read exactly."""
        for (s, e), buf in sorted(self.chunks.items()):
            if s <= pos < e:
                h = hdu_from(buf, s, pos, index)
                if h is not None:
                    return h
        assert self.total is not None
        n = 16 * BLOCK
        while True:
            stop = min(pos + n, self.total)
            (buf,) = self.read([(pos, stop)])
            h = hdu_from(buf, pos, pos, index)
            if h is not None:
                return h
            if stop >= self.total:
                raise FileFormatError(f"{self.name}: HDU {index} at byte {pos} has no END card")
            n *= 4

    def read_layout(self, *, guess: dict[str, int] | None = None, extra: ExtraFn | None = None) -> list[HDU]:
        """Every HDU's header and offsets. ``guess``: header lengths in blocks by EXTNAME (from
        an earlier file of the same kind) → exact windows; else nominal lengths with slack.

        A QR2 file (VERSION < 7) gets windows for FLAGS, VARIANCE, ZODI and PSF headers at once;
        an R7 file (VERSION 7.x) only the FLAGS header's, since the compressed FLAGS length moves
        every later HDU (spec §3.9). A header no window held is read with windows for it and the
        headers that follow it at known distances, in one batch, together with ``extra(layout)``
        (e.g. the FLAGS tile descriptors of the boxes, once the FLAGS header is known)."""
        self.read([(0, HEAD_BYTES)])
        if self.total is None:
            raise FileFormatError(f"{self.name}: the server did not give the file size (Content-Range)")
        total = self.total
        layout: list[HDU] = []
        pos = 0
        while len(layout) < 2 and pos < total:
            h = self.hdu_at(pos, len(layout))
            layout.append(h)
            pos = h.next_offset
        if pos < total:
            names = ("FLAGS",) if _major_version(layout) >= 7 else ("FLAGS", "VARIANCE", "ZODI", "PSF")
            wins = header_windows(layout, names, guesses=guess, slack_blocks=0 if guess else 3)
            wins = [(s, min(e, total)) for s, e in wins if s < total]
            wins.append((max(pos, total - TAIL_BYTES), total))
            self.read(sorted(set(wins)))
        want_extra = extra is not None
        while pos < total:
            if not self._holds_header(pos):
                more = extra(layout) if want_extra and extra is not None else []
                want_extra = want_extra and not more
                self.read(coalesce(self._next_windows(layout, pos, guess) + more, max_gap=0))
            h = self.hdu_at(pos, len(layout))
            layout.append(h)
            pos = h.next_offset
        if pos != total:
            why = "truncated" if pos > total else "bytes after the last HDU"
            raise FileFormatError(f"{self.name}: HDUs end at byte {pos}, the file has {total} ({why})")
        self._check_layout(layout)
        return layout

    def _holds_header(self, pos: int) -> bool:
        """Whether the bytes held contain the whole header starting at ``pos``."""
        return any(s <= pos < e and hdu_from(buf, s, pos, 1 if pos else 0) is not None
                   for (s, e), buf in self.chunks.items())

    def _next_windows(self, layout: list[HDU], pos: int, guess: dict[str, int] | None) -> list[tuple[int, int]]:
        """Windows for the header at ``pos`` (the HDU after ``layout[-1]``) and the headers after it
        whose offsets follow from known data sizes (plane-sized VARIANCE/ZODI, plain FLAGS)."""
        r7 = is_r7_layout(layout) or _major_version(layout) >= 7
        order = spherex.R7_HDU_NAMES if r7 else spherex.HDU_NAMES
        last = layout[-1].name
        rest = order[order.index(last) + 1:] if last in order else ()
        names: list[str] = []
        for n in rest or ("?",):
            names.append(n)
            if n not in PLANES or (r7 and n == "FLAGS"):
                break  # the data size of this HDU is not known before its header
        img = next((h for h in layout if h.name == "IMAGE"), layout[-1])
        g = dict(NOMINAL_HEADER_BLOCKS)
        g.update(guess or {})
        slack = 0 if guess else 3
        out, at = [], pos
        assert self.total is not None
        for k, n in enumerate(names):
            lo = max(at - slack * k * BLOCK, pos)
            out.append((lo, min(at + (g.get(n, 4) + slack * (k + 1)) * BLOCK, self.total)))
            at += g.get(n, 4) * BLOCK + padded(img.data_size)
        return [(s, e) for s, e in out if s < e]

    def _check_layout(self, layout: list[HDU]) -> None:
        """The HDUs the file's own format requires are present and the planes share IMAGE's size."""
        names = [h.extname for h in layout]
        missing = [n for n in required_hdus(layout) if n not in names]
        if missing:
            raise FileFormatError(f"{self.name}: missing HDUs {missing} (found {names})")
        img = image_size(layout[names.index("IMAGE")])
        for h in layout:
            if h.extname in PLANES and image_size(h) != img:
                raise FileFormatError(f"{self.name}: {h.extname} size {image_size(h)} != IMAGE {img}")

    def resolve_boxes(self, layout: list[HDU], wanted: list[tuple[Box, tuple[float, float] | None]]
                      ) -> list[Box | str]:
        """Final boxes: re-centred on the exact pixel of (ra, dec) where given (IBE's nearest-
        centre rule, the file's celestial WCS), clipped to the image; an error text where the
        box misses the image."""
        img = next(h for h in layout if h.extname == "IMAGE")
        width, height = img.naxis[:2]
        wcs: Any = None
        out: list[Box | str] = []
        for box, center in wanted:
            b = box
            if center is not None:
                if wcs is None:
                    wcs = celestial_wcs(img.header) or False  # a whole file: no A-system offsets
                if wcs is not False:
                    xe, ye = (float(v[0]) for v in wcs.world2pix(
                        np.array([center[0]]), np.array([center[1]]), tolerance=1e-7, maxiter=50))
                    if np.isfinite(xe) and np.isfinite(ye):
                        b = Box(nearest_box_start(xe, b.nx), nearest_box_start(ye, b.ny), b.nx, b.ny)
            b = b.clip(width, height)
            out.append(f"box {box} lies outside the {width}x{height} image" if b.empty else b)
        return out

    def read_boxes(self, layout: list[HDU], boxes: list[Box], *, max_gap: int) -> ByteStore:
        """The last rounds: the rows of every box in the planes (ranges closer than ``max_gap``
        bytes merged) and the data of the small HDUs (WCS-WAVE) not yet held. A compressed FLAGS
        (R7) costs the tile descriptors of the boxes' rows (read with the rows unless held
        already, e.g. fetched with the last header batch), then the heap bytes they point to
        (read with the rows when the descriptors were held)."""
        tiled = flags_image(layout)
        want: list[tuple[int, int]] = []
        for b in boxes:
            for h in layout:
                if h.extname in PLANES and not (tiled is not None and h.extname == "FLAGS"):
                    want.extend(box_row_ranges(h, b))
        if boxes:
            store = ByteStore(self.chunks)
            for h in layout:
                if h.extname not in PLANES and h.extname not in ("PSF", EPSF) and h.data_size \
                        and not store.has(h.data_offset, h.next_offset):
                    want.append((h.data_offset, h.next_offset))
            if tiled is not None:
                desc = [r for r in descriptor_ranges(tiled, boxes) if not store.has(*r)]
                if desc:
                    self.read(coalesce(want + desc, max_gap=max_gap))
                    want = []
                want.extend(heap_byte_ranges(tiled, boxes, ByteStore(self.chunks).get))
        if want:
            self.read(coalesce(want, max_gap=max_gap))
        return ByteStore(self.chunks)


def _major_version(layout: list[HDU]) -> int:
    """The major pipeline version of a file from its PRIMARY (or IMAGE) ``VERSION``, 0 if none."""
    for h in layout[:2]:
        v = str(h.header.get("VERSION", "") or "").strip()
        head = v.split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return 0


# --------------------------------------------------------------------------------------
# building files
# --------------------------------------------------------------------------------------


def cutout_header(hdu: HDU, box: Box) -> bytes:
    """Header of a plane HDU cut to ``box`` as an IBE cutout does (spec §3.8): NAXISn = box
    size, CRPIXn −= x0/y0, CRPIXnA −= x0/y0 (→ 1 − x0 from 1), CRPIXnW −= x0/y0;
    CHECKSUM/DATASUM (no longer valid) dropped."""
    k = hdu.keys
    upd: dict[str, Any] = {"NAXIS1": box.nx, "NAXIS2": box.ny}
    for suffix in ("", "A", "W"):
        for i, off in ((1, box.x0), (2, box.y0)):
            key = f"CRPIX{i}{suffix}"
            if key in k and isinstance(k[key], (int, float)) and not isinstance(k[key], bool):
                upd[key] = float(k[key]) - off
    return edit_header(hdu.header, update=upd, delete=("CHECKSUM", "DATASUM"))


def cutout_data(hdu: HDU, box: Box, store: ByteStore) -> bytes:
    """Raw big-endian data of ``box`` in a plane HDU, padded with zeros to whole blocks."""
    rows = [store.get(s, e) for s, e in box_row_ranges(hdu, box)]
    raw = b"".join(rows)
    return raw + b"\0" * (padded(len(raw)) - len(raw))


def psf_stub_header(hdu: HDU, psffile: str) -> bytes:
    """The PSF HDU header with its zone cards but no data (NAXIS = 0) and ``PSFFILE``."""
    n = int(hdu.keys.get("NAXIS", 0))
    return edit_header(hdu.header, update={"NAXIS": 0},
                       delete=[f"NAXIS{i}" for i in range(1, n + 1)] + ["CHECKSUM", "DATASUM"],
                       append=[("PSFFILE", psffile, "PSF cube, relative to the cache root")])


def psf_file_bytes(psf: HDU, data: bytes, psf_key: str) -> bytes:
    """A stand-alone PSF file: a minimal PRIMARY, then the original PSF HDU (header and data
    bytes as in the archive file, so values are bit-identical)."""
    prim = b"".join([
        format_card("SIMPLE", True, "conforms to FITS standard"),
        format_card("BITPIX", 8), format_card("NAXIS", 0), format_card("EXTEND", True),
        format_card("PSF_KEY", psf_key, "detector + processing version"),
        END_CARD])
    prim += b" " * (padded(len(prim)) - len(prim))
    if len(data) != padded(psf.data_size):
        raise FileFormatError(f"PSF data: got {len(data)} bytes, expected {padded(psf.data_size)}")
    return prim + psf.header.raw + data


def build_cutout(layout: list[HDU], box: Box, store: ByteStore, *, psffile: str) -> bytes:
    """Bytes of a local cutout file for ``box`` from a parsed parent ``layout`` and the fetched
    bytes: PRIMARY copied, planes sliced (§3.8 header changes), PSF header stub with PSFFILE,
    every other HDU (WCS-WAVE) copied unchanged. R7 files (:mod:`spxframe.fetcher.ranges_r7`):
    a compressed FLAGS decoded and written plain, the EPSF header stub with ``EPSFFILE`` =
    ``psffile`` (the cached ePSF library)."""
    parts: list[bytes] = []
    for h in layout:
        name = h.extname
        if name == "FLAGS" and is_tiled(h.header):  # R7: decoded, written as a plain int32 image
            parts.append(flags_cutout_header(h, box))
            parts.append(flags_cutout_data(flags_rows(flags_image([h]), box, store.get)))
        elif name in PLANES:
            parts.append(cutout_header(h, box))
            parts.append(cutout_data(h, box, store))
        elif name == "PSF":
            parts.append(psf_stub_header(h, psffile))
        elif name == EPSF:  # R7: the table's header, no rows, EPSFFILE naming the cached library
            parts.append(epsf_stub_header(h, psffile))
        else:
            parts.append(h.header.raw)
            if h.data_size:
                parts.append(store.get(h.data_offset, h.next_offset))
    return b"".join(parts)
