"""FITS block arithmetic for range reads: headers, HDU layout, byte ranges, local cutout files.

No network here: :mod:`spxframe.fetch` fetches bytes; this module decides *which* bytes and turns
them into files. All offsets and sizes are in bytes; pixel boxes are zero-based parent pixels.

A SPHEREx L2 MEF (spec §3.1) is PRIMARY, IMAGE, FLAGS, VARIANCE, ZODI (2040×2040 planes), PSF
(121×101×101 cube) and WCS-WAVE (1-row BINTABLE). Header lengths are parsed, never assumed
(the IMAGE header is 7 or 8 blocks).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from spxframe import spherex
from spxframe.errors import FileFormatError

BLOCK = spherex.BLOCK
CARD = spherex.CARD
PLANES: tuple[str, ...] = spherex.PLANE_HDUS
REQUIRED_HDUS: tuple[str, ...] = spherex.HDU_NAMES
#: nominal header lengths in blocks (spec §3.1) used to guess where later headers start
NOMINAL_HEADER_BLOCKS: dict[str, int] = {h: spherex.QR2_HEADER_BLOCKS[h] for h in ("FLAGS", "VARIANCE", "ZODI", "PSF", "WCS-WAVE")}
_END_CARD = b"END" + b" " * 77
HEAD_BYTES = 16 * BLOCK   # first read: PRIMARY + IMAGE header (7-8 blocks) with room to spare
TAIL_BYTES = 8 * BLOCK    # the file's tail: the WCS-WAVE header and table
#: reads byte ranges [start, stop) of one remote file -> (bytes per range, file size or None)
ReadFn = Callable[[list[tuple[int, int]]], tuple[list[bytes], "int | None"]]


def padded(n: int) -> int:
    """``n`` bytes rounded up to whole 2880-byte FITS blocks."""
    return -(-int(n) // BLOCK) * BLOCK


# --------------------------------------------------------------------------------------
# header cards
# --------------------------------------------------------------------------------------


def header_length(buf: bytes | memoryview, start: int = 0) -> int | None:
    """Length in bytes (whole blocks) of the header that begins at ``buf[start]``; None if the
    END card is not within ``buf``."""
    mv = memoryview(buf)
    pos = start
    while pos + BLOCK <= len(mv):
        blk = bytes(mv[pos:pos + BLOCK])
        for i in range(0, BLOCK, CARD):
            if blk[i:i + 8] == b"END     ":
                return pos + BLOCK - start
        pos += BLOCK
    return None


def _split_value(s: str) -> tuple[str, str]:
    """Split the value field (columns 11-80) into (value text, comment)."""
    s = s.rstrip()
    if s.lstrip().startswith("'"):
        i = s.index("'")
        j = i + 1
        while j < len(s):
            if s[j] == "'":
                if j + 1 < len(s) and s[j + 1] == "'":
                    j += 2
                    continue
                break
            j += 1
        val = s[: j + 1]
        rest = s[j + 1:]
        k = rest.find("/")
        return val.strip(), (rest[k + 1:].strip() if k >= 0 else "")
    k = s.find("/")
    if k >= 0:
        return s[:k].strip(), s[k + 1:].strip()
    return s.strip(), ""


def _parse_value(v: str) -> Any:
    if v.startswith("'"):
        return v[1:-1].replace("''", "'").rstrip()
    if v == "T":
        return True
    if v == "F":
        return False
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v.replace("D", "E"))
    except ValueError:
        return v


def cards(header: bytes) -> list[bytes]:
    """The 80-byte cards of a header up to and including END."""
    out = []
    for i in range(0, len(header), CARD):
        c = header[i:i + CARD]
        out.append(c)
        if c[:8] == b"END     ":
            break
    return out


def parse_header(header: bytes) -> dict[str, Any]:
    """Keyword → value for the ordinary ``KEY = value`` cards (HIERARCH/COMMENT/HISTORY skipped)."""
    out: dict[str, Any] = {}
    for c in cards(header):
        key = c[:8].decode("ascii", "replace").strip()
        if not key or key in ("END", "COMMENT", "HISTORY", "HIERARCH") or c[8:10] != b"= ":
            continue
        val, _ = _split_value(c[10:].decode("ascii", "replace"))
        out[key] = _parse_value(val)
    return out


def format_card(key: str, value: Any, comment: str = "") -> bytes:
    """One 80-byte FITS card in fixed format (strings left, numbers right-justified to col 30)."""
    if isinstance(value, bool):
        v = f"{'T' if value else 'F':>20}"
    elif isinstance(value, int):
        v = f"{value:>20d}"
    elif isinstance(value, float):
        s = repr(float(value)).upper()
        if "E" not in s and "." not in s and "N" not in s:
            s += ".0"
        if "E" in s and "." not in s.split("E")[0]:
            m, e = s.split("E")
            s = f"{m}.0E{e}"
        v = f"{s:>20}"
    else:
        v = "'" + f"{str(value).replace(chr(39), chr(39) * 2):<8}" + "'"
        v = f"{v:<20}"
    body = f"{key:<8}= {v}"
    if comment:
        body += f" / {comment}"
    body = body[:CARD]
    return f"{body:<{CARD}}".encode("ascii", "replace")


def edit_header(header: bytes, *, update: dict[str, Any] | None = None, delete: Iterable[str] = (),
                append: Iterable[tuple[str, Any, str]] = ()) -> bytes:
    """A new header: ``update`` replaces values of existing keywords (comments kept; absent
    keywords are not added), ``delete`` drops keywords, ``append`` adds cards before END.
    The result is padded with blanks to whole blocks."""
    update = dict(update or {})
    delete = set(delete)
    out: list[bytes] = []
    for c in cards(header):
        key = c[:8].decode("ascii", "replace").strip()
        if key == "END":
            break
        if key in delete:
            continue
        if key in update and c[8:10] == b"= ":
            _, comment = _split_value(c[10:].decode("ascii", "replace"))
            c = format_card(key, update[key], comment)
        out.append(bytes(c))
    for key, value, comment in append:
        out.append(format_card(key, value, comment))
    out.append(_END_CARD)
    raw = b"".join(out)
    return raw + b" " * (padded(len(raw)) - len(raw))


# --------------------------------------------------------------------------------------
# HDU layout
# --------------------------------------------------------------------------------------


@dataclass
class HDU:
    """One HDU located in a file: raw header bytes and where its data lie (bytes)."""

    index: int
    offset: int          # header start
    header: bytes        # raw header, whole blocks
    keys: dict[str, Any] = field(default_factory=dict)

    @property
    def extname(self) -> str:
        return "PRIMARY" if self.index == 0 else str(self.keys.get("EXTNAME", "")).strip().upper()

    @property
    def data_offset(self) -> int:
        return self.offset + len(self.header)

    @property
    def data_size(self) -> int:
        """Unpadded data size in bytes (FITS: |BITPIX|/8 × GCOUNT × (PCOUNT + ΠNAXISn))."""
        return data_size(self.keys)

    @property
    def next_offset(self) -> int:
        return self.data_offset + padded(self.data_size)

    @property
    def shape(self) -> tuple[int, ...]:
        n = int(self.keys.get("NAXIS", 0))
        return tuple(int(self.keys.get(f"NAXIS{i}", 0)) for i in range(1, n + 1))

    @property
    def bytes_per_pixel(self) -> int:
        return abs(int(self.keys.get("BITPIX", 8))) // 8


def data_size(keys: dict[str, Any]) -> int:
    """Unpadded data bytes of an HDU from its BITPIX/NAXISn/PCOUNT/GCOUNT."""
    n = int(keys.get("NAXIS", 0))
    if n == 0:
        return 0
    prod = 1
    for i in range(1, n + 1):
        prod *= int(keys.get(f"NAXIS{i}", 0))
    bpp = abs(int(keys.get("BITPIX", 8))) // 8
    return bpp * int(keys.get("GCOUNT", 1)) * (int(keys.get("PCOUNT", 0)) + prod)


def hdu_from(buf: bytes, buf_offset: int, hdu_offset: int, index: int) -> HDU | None:
    """The HDU whose header starts at file offset ``hdu_offset``, parsed from ``buf`` (which holds
    file bytes from ``buf_offset``); None if the header is not wholly inside ``buf``."""
    rel = hdu_offset - buf_offset
    if rel < 0 or rel + BLOCK > len(buf):
        return None
    n = header_length(buf, rel)
    if n is None:
        return None
    raw = bytes(buf[rel:rel + n])
    first = raw[:10]
    if index == 0 and first != b"SIMPLE  = ":
        raise FileFormatError(f"not a FITS file: first card {raw[:30]!r}")
    if index > 0 and first != b"XTENSION= ":
        raise FileFormatError(f"HDU {index} at byte {hdu_offset}: no XTENSION card ({raw[:30]!r})")
    return HDU(index, hdu_offset, raw, parse_header(raw))


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
    import math

    return int(math.floor(center - (n - 1) / 2.0 + 0.5))


def celestial_wcs(header: bytes):
    """astropy WCS of the primary (celestial, SIP) system of an image header; None if unusable."""
    import warnings

    from astropy.io import fits
    from astropy.wcs import WCS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdr = fits.Header.fromstring(header.decode("ascii", "replace"))
            w = WCS(hdr, key=" ", relax=True)
        return w if w.has_celestial else None
    except Exception:  # noqa: BLE001 — the planned box is kept
        return None


def box_row_ranges(hdu: HDU, box: Box) -> list[tuple[int, int]]:
    """Byte ranges [start, stop) of each row of ``box`` in a 2-D image HDU (row-major, x fastest)."""
    w = hdu.shape[0]
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
# reading one remote file by ranges (three rounds of requests)
# --------------------------------------------------------------------------------------


class RangeFile:
    """The parts of one remote MEF needed for local cutouts, read through ``read`` (a function
    fetching byte ranges; :class:`spxframe.fetcher.http.RangeClient` in fetch).

    Round 1 reads the first 16 blocks (PRIMARY + IMAGE headers); round 2 reads guessed windows
    for the FLAGS/VARIANCE/ZODI/PSF headers plus the file's tail (WCS-WAVE); headers are then
    parsed in sequence and any header a window missed is read exactly. Round 3 reads the box
    rows of the four planes (coalesced) and any small HDU data not yet held."""

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

    def read_layout(self, *, guess: dict[str, int] | None = None) -> list[HDU]:
        """Every HDU's header and offsets. ``guess``: header lengths in blocks by EXTNAME (from
        an earlier file of the same kind) → exact windows; else nominal lengths with slack."""
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
            wins = header_windows(layout, guesses=guess, slack_blocks=0 if guess else 3)
            wins = [(s, min(e, total)) for s, e in wins if s < total]
            wins.append((max(pos, total - TAIL_BYTES), total))
            self.read(sorted(set(wins)))
        while pos < total:
            h = self.hdu_at(pos, len(layout))
            layout.append(h)
            pos = h.next_offset
        if pos != total:
            raise FileFormatError(f"{self.name}: HDUs end at byte {pos}, the file has {total}")
        names = [h.extname for h in layout]
        missing = [n for n in REQUIRED_HDUS if n not in names]
        if missing:
            raise FileFormatError(f"{self.name}: missing HDUs {missing} (found {names})")
        img = layout[names.index("IMAGE")]
        for h in layout:
            if h.extname in PLANES and h.shape[:2] != img.shape[:2]:
                raise FileFormatError(f"{self.name}: {h.extname} shape {h.shape} != IMAGE {img.shape}")
        return layout

    def resolve_boxes(self, layout: list[HDU], wanted: list[tuple[Box, tuple[float, float] | None]]
                      ) -> list[Box | str]:
        """Final boxes: re-centred on the exact pixel of (ra, dec) where given (IBE's nearest-
        centre rule, the file's celestial WCS), clipped to the image; an error text where the
        box misses the image."""
        img = next(h for h in layout if h.extname == "IMAGE")
        width, height = img.shape[:2]
        wcs: Any = None
        out: list[Box | str] = []
        for box, center in wanted:
            b = box
            if center is not None:
                if wcs is None:
                    wcs = celestial_wcs(img.header) or False
                if wcs is not False:
                    import numpy as np

                    xe, ye = (float(v[0]) for v in wcs.all_world2pix(
                        np.array([center[0]]), np.array([center[1]]), 0, tolerance=1e-7, maxiter=50, quiet=True))
                    if np.isfinite(xe) and np.isfinite(ye):
                        b = Box(nearest_box_start(xe, b.nx), nearest_box_start(ye, b.ny), b.nx, b.ny)
            b = b.clip(width, height)
            out.append(f"box {box} lies outside the {width}x{height} image" if b.empty else b)
        return out

    def read_boxes(self, layout: list[HDU], boxes: list[Box], *, max_gap: int) -> ByteStore:
        """Round 3: the rows of every box in the four planes (ranges closer than ``max_gap``
        bytes merged) and the data of the small HDUs (WCS-WAVE) not yet held."""
        want: list[tuple[int, int]] = []
        for b in boxes:
            for h in layout:
                if h.extname in PLANES:
                    want.extend(box_row_ranges(h, b))
        if boxes:
            store = ByteStore(self.chunks)
            for h in layout:
                if h.extname not in PLANES and h.extname != "PSF" and h.data_size \
                        and not store.has(h.data_offset, h.next_offset):
                    want.append((h.data_offset, h.next_offset))
        if want:
            self.read(coalesce(want, max_gap=max_gap))
        return ByteStore(self.chunks)


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
        _END_CARD])
    prim += b" " * (padded(len(prim)) - len(prim))
    if len(data) != padded(psf.data_size):
        raise FileFormatError(f"PSF data: got {len(data)} bytes, expected {padded(psf.data_size)}")
    return prim + psf.header + data


def build_cutout(layout: list[HDU], box: Box, store: ByteStore, *, psffile: str) -> bytes:
    """Bytes of a local cutout file for ``box`` from a parsed parent ``layout`` and the fetched
    bytes: PRIMARY copied, planes sliced (§3.8 header changes), PSF header stub with PSFFILE,
    every other HDU (WCS-WAVE) copied unchanged."""
    parts: list[bytes] = []
    for h in layout:
        name = h.extname
        if name in PLANES:
            parts.append(cutout_header(h, box))
            parts.append(cutout_data(h, box, store))
        elif name == "PSF":
            parts.append(psf_stub_header(h, psffile))
        else:
            parts.append(h.header)
            if h.data_size:
                parts.append(store.get(h.data_offset, h.next_offset))
    return b"".join(parts)


# --------------------------------------------------------------------------------------
# verification of files on disk
# --------------------------------------------------------------------------------------


def scan_fits(path: str | os.PathLike, *, required: Iterable[str] = REQUIRED_HDUS) -> list[HDU]:
    """Walk a FITS file's HDUs by their headers (no data read) and check its block structure:
    size a multiple of 2880, every header has END, the last HDU ends exactly at the file end,
    and every ``required`` EXTNAME is present. Raises :class:`FileFormatError`."""
    size = os.path.getsize(path)
    if size == 0 or size % BLOCK:
        raise FileFormatError(f"{path}: size {size} is not a positive multiple of {BLOCK}")
    hdus: list[HDU] = []
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            f.seek(pos)
            buf = b""
            n = None
            while n is None:
                more = f.read(BLOCK * 16)
                if not more:
                    raise FileFormatError(f"{path}: HDU {len(hdus)} header at byte {pos} has no END")
                buf += more
                n = header_length(buf)
            h = hdu_from(buf, pos, pos, len(hdus))
            assert h is not None
            hdus.append(h)
            pos = h.next_offset
            if pos > size:
                raise FileFormatError(f"{path}: HDU {h.index} ({h.extname}) data run past the end "
                                      f"({pos} > {size} bytes): truncated")
    names = [h.extname for h in hdus]
    missing = [r for r in required if r not in names]
    if missing:
        raise FileFormatError(f"{path}: missing HDUs {missing} (found {names})")
    return hdus


def quick_check(path: str | os.PathLike, size: int | None = None) -> bool:
    """Cheap re-verification of a file already verified once: size (if given) and the first
    card and the file ends on a block boundary."""
    try:
        st = os.stat(path)
        if st.st_size == 0 or st.st_size % BLOCK or (size is not None and st.st_size != size):
            return False
        with open(path, "rb") as f:
            return f.read(10) == b"SIMPLE  = "
    except OSError:
        return False
