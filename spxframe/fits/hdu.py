"""FITS HDU layout: where each HDU's header and data lie, from a local file or from fetched bytes.

One :class:`HDU` type serves whole local files (:func:`scan` over an open file descriptor or a
buffer) and byte-range reads (:func:`hdu_from` on bytes read at an offset, as
:class:`spxframe.fetcher.ranges.RangeFile` does); :func:`read_rows` reads pixel rows from either
(a file descriptor, or anything with ``get(start, stop) -> bytes`` such as
:class:`~spxframe.fetcher.ranges.ByteStore`). :func:`scan_fits` and :func:`quick_check` verify
files on disk. Every error is a :class:`~spxframe.errors.FileFormatError` naming the file and byte.

Speed: a local file's headers are read with ``os.pread``, each sized from the same HDU of the
previous file scanned (files come in few layouts; copying header bytes dominates the cost).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from functools import partial

import numpy as np

from spxframe import spherex
from spxframe.errors import FileFormatError
from spxframe.fits.cards import BLOCK, Header, find_end

BITPIX_DTYPE: dict[int, str] = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
REQUIRED_HDUS: tuple[str, ...] = spherex.HDU_NAMES  #: a QR2 file's HDUs (``required_hdus`` for any format)


class HDU:
    """One HDU located in a file: its parsed header and where its data lie (bytes).

    ``offset``: header start; ``header``: :class:`~spxframe.fits.cards.Header` over the header's
    whole blocks as stored; ``naxis``: NAXISn in FITS order; ``shape``: numpy order;
    ``data_size``: unpadded data bytes (|BITPIX|/8 × GCOUNT × (PCOUNT + ΠNAXISn));
    ``next_offset``: where the next HDU's header starts.
    """

    __slots__ = ("index", "offset", "header", "bitpix", "naxis", "pcount", "gcount", "shape",
                 "data_offset", "data_size", "next_offset", "name")

    def __init__(self, index: int, offset: int, header: Header, bitpix: int, naxis: tuple[int, ...],
                 pcount: int = 0, gcount: int = 1) -> None:
        self.index, self.offset, self.header = index, offset, header
        self.bitpix, self.naxis, self.pcount, self.gcount, self.shape = bitpix, naxis, pcount, gcount, naxis[::-1]
        self.data_offset = d = offset + len(header.raw)
        self.data_size = n = abs(bitpix) // 8 * gcount * (pcount + math.prod(naxis)) if naxis else 0
        self.next_offset = d - (-n // BLOCK) * BLOCK
        #: EXTNAME upper-cased; ``PRIMARY`` for the first HDU
        self.name = "PRIMARY" if index == 0 else str(header.get("EXTNAME") or "").strip().upper()

    @property
    def extname(self) -> str:
        return self.name

    @property
    def keys(self) -> Header:
        """The header (the name byte-range code used for the parsed keywords)."""
        return self.header

    @property
    def header_size(self) -> int:
        return len(self.header.raw)

    @property
    def bytes_per_pixel(self) -> int:
        return abs(self.bitpix) // 8

    @property
    def dtype(self) -> np.dtype:
        """The stored (big-endian) pixel type."""
        return np.dtype(BITPIX_DTYPE[self.bitpix])

    def __repr__(self) -> str:
        return (f"HDU({self.index}, {self.name!r}, offset={self.offset}, data_offset={self.data_offset}, "
                f"data_size={self.data_size}, shape={self.shape}, bitpix={self.bitpix})")


def make_hdu(raw: bytes, offset: int, index: int, *, end: int | None = None, where: str = "") -> HDU:
    """The HDU whose header bytes (whole blocks) ``raw`` start at file byte ``offset``: checks the
    first card (SIMPLE for the first HDU, XTENSION after) and the mandatory structure cards."""
    first = raw[:10]
    if index == 0 and first != b"SIMPLE  = ":
        raise FileFormatError(f"{where}not a FITS file: first card {raw[:30]!r}")
    if index > 0 and first != b"XTENSION= ":
        raise FileFormatError(f"{where}HDU {index} at byte {offset}: no XTENSION card ({raw[:30]!r})")
    h = Header(raw, end)
    try:
        bitpix, ax, pcount, gcount = h.structure()
    except (ValueError, KeyError):
        raise FileFormatError(f"{where}malformed mandatory cards in HDU {index} at byte {offset}") from None
    if bitpix not in BITPIX_DTYPE or (ax and min(ax) < 0):
        raise FileFormatError(f"{where}HDU {index} at byte {offset}: BITPIX {bitpix}, NAXISn {ax}")
    return HDU(index, offset, h, bitpix, ax, pcount, gcount)


def hdu_from(buf: bytes | memoryview, buf_offset: int, hdu_offset: int, index: int) -> HDU | None:
    """The HDU whose header starts at file offset ``hdu_offset``, parsed from ``buf`` (which holds
    file bytes from ``buf_offset``); None if the header is not wholly inside ``buf``."""
    rel = hdu_offset - buf_offset
    if rel < 0 or rel + BLOCK > len(buf):
        return None
    whole = (len(buf) - rel) // BLOCK * BLOCK
    end = find_end(memoryview(buf)[rel:rel + whole])
    if end < 0:
        return None
    raw = bytes(buf[rel:rel + (end // BLOCK + 1) * BLOCK])
    return make_hdu(raw, hdu_offset, index, end=end)


_HDR_BLOCKS: dict[int, int] = {}  #: header length (blocks) of the i-th HDU of the last file scanned


def scan(src: int | bytes | memoryview, size: int | None = None, *, path: str = "") -> list[HDU]:
    """All HDUs of a FITS file, headers parsed and data located (not read). ``src``: an open file
    descriptor (``size`` = its size) or the file's bytes. Checks that every header has END and
    that the data of the last HDU end within the file (:class:`FileFormatError` otherwise).

    Each header is read with as many blocks as the same HDU had in the previous file, then more
    if END was not found."""
    if isinstance(src, int):
        read: Callable[[int, int], bytes] = partial(os.pread, src)
        size = os.fstat(src).st_size if size is None else size
    else:
        mv = memoryview(src)
        read = lambda n, off: bytes(mv[off:off + n])  # noqa: E731
        size = len(mv) if size is None else size
    where = f"{path}: " if path else ""
    hdus: list[HDU] = []
    off = 0
    while off < size:
        chunk = b""
        nb = _HDR_BLOCKS.get(len(hdus), 2)
        while True:
            more = read(nb * BLOCK, off + len(chunk))
            if not more:
                raise FileFormatError(f"{where}HDU {len(hdus)}: truncated FITS header at byte {off} (no END)")
            start = len(chunk)  # a multiple of 80: search only the new blocks
            chunk += more
            end = find_end(chunk, start)
            if end >= 0:
                break
            nb = max(2 * nb, 8)
        hlen = (end // BLOCK + 1) * BLOCK
        _HDR_BLOCKS[len(hdus)] = hlen // BLOCK
        if hlen > len(chunk):
            raise FileFormatError(f"{where}HDU {len(hdus)}: truncated FITS header at byte {off}")
        h = make_hdu(chunk[:hlen], off, len(hdus), end=end, where=where)
        hdus.append(h)
        off = h.next_offset
    if off > size:
        h = hdus[-1]
        raise FileFormatError(f"{where}HDU {h.index} ({h.name}) data run past the end ({off} > {size} bytes): "
                              "truncated")
    return hdus


def by_name(hdus: Iterable[HDU]) -> dict[str, HDU]:
    """name -> HDU (the first of each name)."""
    out: dict[str, HDU] = {}
    for h in hdus:
        out.setdefault(h.name, h)
    return out


def required_hdus(hdus: list[HDU]) -> tuple[str, ...]:
    """The HDUs a complete L2 file of this file's format holds (``spherex.HDUS_BY_FORMAT``): R7
    (QR3) when an EPSF HDU is present, FLAGS is tile-compressed (``ZIMAGE``) or an ``EPSFFILE``
    card names an external ePSF library; QR2 otherwise. An R7 file with ``EPSFFILE`` needs no
    EPSF HDU of its own."""
    named = by_name(hdus)
    flags = named.get("FLAGS")
    ext = any(h.header.get("EPSFFILE") for h in hdus[:2])
    if "EPSF" in named or ext or (flags is not None and flags.header.get("ZIMAGE", False)):
        need = spherex.HDUS_BY_FORMAT["r7"]
        return tuple(n for n in need if n != "EPSF") if ext and "EPSF" not in named else need
    return spherex.HDUS_BY_FORMAT["qr2"]


def scan_fits(path: str | os.PathLike, *, required: Iterable[str] | None = None) -> list[HDU]:
    """Walk a FITS file's HDUs by their headers (no data read) and check its block structure:
    size a multiple of 2880, every header has END, the last HDU ends exactly at the file end,
    and every ``required`` EXTNAME is present (None: those of the file's own format,
    :func:`required_hdus`). Raises :class:`FileFormatError`."""
    size = os.path.getsize(path)
    if size == 0 or size % BLOCK:
        raise FileFormatError(f"{path}: size {size} is not a positive multiple of {BLOCK}")
    fd = os.open(path, os.O_RDONLY)
    try:
        hdus = scan(fd, size, path=str(path))
    finally:
        os.close(fd)
    names = [h.name for h in hdus]
    missing = [r for r in (required_hdus(hdus) if required is None else required) if r not in names]
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


def _read(src, n: int, off: int) -> bytes:
    """``n`` bytes at file offset ``off`` from a file descriptor or a fetched-bytes store."""
    if isinstance(src, int):
        return os.pread(src, n, off)
    return src.get(off, off + n)


def read_rows(src, hdu: HDU, y0: int, y1: int, *, convert: bool = True) -> np.ndarray:
    """Rows [y0, y1) of a 2-D image HDU, native-endian float64 (int64 for integer data); with
    ``convert=False`` a read-only view in the stored (big-endian) type: convert what you use.
    ``src``: an open file descriptor or an object with ``get(start, stop) -> bytes``."""
    ny, nx = hdu.shape
    y0, y1 = max(y0, 0), min(y1, ny)
    dt = np.dtype(BITPIX_DTYPE[hdu.bitpix])
    out = np.float64 if dt.kind == "f" else np.int64
    if y1 <= y0:
        return np.zeros((0, nx), out if convert else dt)
    buf = _read(src, (y1 - y0) * nx * dt.itemsize, hdu.data_offset + y0 * nx * dt.itemsize)
    a = np.frombuffer(buf, dt).reshape(y1 - y0, nx)
    return a.astype(out) if convert else a


def read_array(src, hdu: HDU) -> np.ndarray:
    """The whole data array of an HDU as a zero-copy big-endian view (convert what you use)."""
    buf = _read(src, hdu.data_size, hdu.data_offset)
    return np.frombuffer(buf, hdu.dtype).reshape(hdu.shape)
