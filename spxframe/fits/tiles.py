"""Rows of a tile-compressed FITS image (QR3 FLAGS, spec §3.9) from a file or by byte ranges.

A tile-compressed image is a BINTABLE (``ZIMAGE = T``) with one row per tile; its
``COMPRESSED_DATA`` column holds a descriptor (byte count, heap offset) per tile (``TFORM1 =
'1PB(max)'``: two int32; ``'1QB(max)'``: two int64) and the heap holds the compressed bytes. QR3
stores FLAGS as RICE_1 with one-row tiles (``ZTILE1 = ZNAXIS1``, ``ZTILE2 = 1``). Reading rows
``y0..y1`` costs two steps, each one contiguous read per merged range:

1. the descriptors of the tiles the rows cover (8 or 16 bytes per tile, in the table body);
2. the heap bytes those descriptors point to.

Every reader takes ``read(start, stop) -> bytes`` (file offsets) — or, like
:func:`spxframe.fits.hdu.read_rows`, an open file descriptor or an object with
``get(start, stop)`` — so one code path serves a local file and HTTP byte ranges. Tiles are
decoded with astropy: its RICE_1 codec directly when the tile layout is the plain one above
(``astropy.io.fits.hdu.compressed._codecs``, a private module: :data:`CODEC_ASTROPY` records
the astropy version it was checked with), and otherwise — or if that module changes — through
astropy's public reader on a small in-memory FITS file holding only the selected tiles
(:func:`decode_public`). Both give identical pixels.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from spxframe.errors import FileFormatError
from spxframe.fits.cards import Header, padded
from spxframe.fits.hdu import BITPIX_DTYPE, HDU, read_rows, scan

try:  # the codec astropy uses itself; private, so guarded (checked with astropy 8.0)
    from astropy.io.fits.hdu.compressed._codecs import Rice1 as _Rice1
except ImportError:  # pragma: no cover - depends on the installed astropy
    _Rice1 = None

Read = Callable[[int, int], bytes]
CODEC_ASTROPY = "8.0"  #: astropy version whose private RICE_1 codec the fast path was checked with
_TFORM_RE = re.compile(r"^\s*(\d*)([LXBIJKAEDCMPQ])(\w?)")
_TFORM_BYTES = {"L": 1, "X": 1, "B": 1, "I": 2, "J": 4, "K": 8, "A": 1, "E": 4, "D": 8, "C": 8, "M": 16,
                "P": 8, "Q": 16}
_SCALING_KEYS = ("ZSCALE", "ZZERO", "ZBLANK", "ZQUANTIZ", "BSCALE", "BZERO", "ZDITHER0")


@dataclass(frozen=True)
class TiledImage:
    """Where the parts of a tile-compressed image HDU lie, from its header alone.

    ``shape``/``tile``: image and tile shape in numpy order (rows, columns); ``desc_code``:
    ``'P'`` (int32 descriptors) or ``'Q'`` (int64); ``row_bytes``: NAXIS1; ``col_offset``: byte
    of the COMPRESSED_DATA descriptor within a table row; ``data_offset``/``heap_offset``: file
    offsets of the table body and of the heap; ``plain``: integer RICE_1 in one column without
    scaling (the fast codec path applies).
    """

    name: str
    shape: tuple[int, int]
    tile: tuple[int, int]
    cmptype: str
    zbitpix: int
    params: dict
    desc_code: str
    row_bytes: int
    col_offset: int
    nrows: int
    data_offset: int
    heap_offset: int
    heap_size: int
    header: Header
    plain: bool

    @property
    def tiles_x(self) -> int:
        return -(-self.shape[1] // self.tile[1])

    @property
    def tiles_y(self) -> int:
        return -(-self.shape[0] // self.tile[0])

    @property
    def desc_bytes(self) -> int:
        return 8 if self.desc_code == "P" else 16

    def tile_rows(self, y0: int, y1: int) -> tuple[int, int]:
        """Tile rows [ty0, ty1) that cover image rows [y0, y1) (clipped to the image)."""
        y0, y1 = max(int(y0), 0), min(int(y1), self.shape[0])
        if y1 <= y0:
            return 0, 0
        return y0 // self.tile[0], -(-y1 // self.tile[0])

    def estimated_bytes(self, y0: int, y1: int) -> int:
        """Bytes rows [y0, y1) will cost before any descriptor is read: their descriptors plus the
        heap's mean bytes per tile row (PCOUNT / tile rows) for each tile row they cover."""
        ty0, ty1 = self.tile_rows(y0, y1)
        return (ty1 - ty0) * (self.tiles_x * self.desc_bytes + -(-self.heap_size // self.tiles_y))

    def descriptor_range(self, t_lo: int, t_hi: int) -> tuple[int, int]:
        """File bytes [start, stop) holding the descriptors of tiles t_lo..t_hi-1 (whole rows)."""
        return (self.data_offset + t_lo * self.row_bytes + self.col_offset,
                self.data_offset + (t_hi - 1) * self.row_bytes + self.col_offset + self.desc_bytes)


def is_tiled(header) -> bool:
    """True for a tile-compressed image HDU header (``ZIMAGE = T``)."""
    return bool(header.get("ZIMAGE", False))


def _column_offset(h: Header, name: str, where: str) -> tuple[int, str]:
    """(byte offset within a row, descriptor code P/Q) of the variable-length column ``name``."""
    off = 0
    for i in range(1, int(h.get("TFIELDS", 0) or 0) + 1):
        tform = str(h.get(f"TFORM{i}", ""))
        m = _TFORM_RE.match(tform)
        if not m:
            raise FileFormatError(f"{where}unreadable TFORM{i} = {tform!r}")
        rep = int(m.group(1) or 1)
        if str(h.get(f"TTYPE{i}", "")).strip().upper() == name:
            if m.group(2) not in "PQ" or rep != 1:
                raise FileFormatError(f"{where}{name} is TFORM{i} = {tform!r}, not a 1P/1Q descriptor")
            return off, m.group(2)
        off += -(-rep // 8) if m.group(2) == "X" else rep * _TFORM_BYTES[m.group(2)]
    raise FileFormatError(f"{where}no {name} column (TTYPEs: "
                          f"{[h.get(f'TTYPE{i}') for i in range(1, int(h.get('TFIELDS', 0) or 0) + 1)]})")


def tiled_image(hdu: HDU, *, where: str = "") -> TiledImage:
    """The :class:`TiledImage` of a located compressed-image HDU (see :mod:`spxframe.fits.hdu`).
    Raises :class:`FileFormatError` naming the keyword when the header is not a 2-D tiled image."""
    h = hdu.header
    where = where or f"HDU {hdu.index} ({hdu.name}): "
    if not is_tiled(h):
        raise FileFormatError(f"{where}not a tile-compressed image (no ZIMAGE = T)")
    try:
        nx, ny = int(h["ZNAXIS1"]), int(h["ZNAXIS2"])
        zbitpix, cmp = int(h["ZBITPIX"]), str(h["ZCMPTYPE"]).strip().upper()
    except KeyError as e:
        raise FileFormatError(f"{where}missing {e.args[0]}") from None
    if int(h.get("ZNAXIS", 2)) != 2:
        raise FileFormatError(f"{where}ZNAXIS = {h.get('ZNAXIS')}: only 2-D images are read")
    tx, ty = int(h.get("ZTILE1", nx) or nx), int(h.get("ZTILE2", 1) or 1)
    params, i = {}, 1
    while f"ZNAME{i}" in h:
        params[str(h[f"ZNAME{i}"]).strip().upper()] = h.get(f"ZVAL{i}")
        i += 1
    col_off, code = _column_offset(h, "COMPRESSED_DATA", where)
    row_bytes, nrows = (hdu.naxis + (0, 0))[:2]
    img = TiledImage(
        name=hdu.name, shape=(ny, nx), tile=(ty, tx), cmptype=cmp, zbitpix=zbitpix, params=params,
        desc_code=code, row_bytes=row_bytes, col_offset=col_off, nrows=nrows, data_offset=hdu.data_offset,
        heap_offset=hdu.data_offset + int(h.get("THEAP", row_bytes * nrows) or row_bytes * nrows),
        heap_size=hdu.pcount, header=h,
        plain=(cmp == "RICE_1" and zbitpix > 0 and int(h.get("TFIELDS", 1)) == 1
               and not any(k in h for k in _SCALING_KEYS)))
    if img.tiles_x * img.tiles_y != nrows:
        raise FileFormatError(f"{where}{nrows} table rows for {img.tiles_y}x{img.tiles_x} tiles "
                              f"(ZNAXIS {nx}x{ny}, ZTILE {tx}x{ty})")
    return img


def as_read(src) -> Read:
    """``read(start, stop) -> bytes`` from a callable, an open file descriptor, or an object with
    ``get(start, stop)`` (such as the fetcher's byte store)."""
    if isinstance(src, int):
        return file_reader(src)
    if hasattr(src, "get") and not callable(src):
        return src.get
    return src


def read_descriptors(read: Read, img: TiledImage, t_lo: int, t_hi: int) -> np.ndarray:
    """(t_hi - t_lo, 2) int64 descriptors (compressed bytes, heap offset) of tiles t_lo..t_hi-1."""
    read = as_read(read)
    if t_hi <= t_lo:
        return np.zeros((0, 2), np.int64)
    start, stop = img.descriptor_range(t_lo, t_hi)
    buf = read(start, stop)
    if len(buf) != stop - start:
        raise FileFormatError(f"{img.name}: short read of tile descriptors ({len(buf)} of {stop - start} bytes)")
    n, dt = t_hi - t_lo, np.dtype(">i4" if img.desc_code == "P" else ">i8")
    rows = np.frombuffer(buf + b"\0" * (n * img.row_bytes - len(buf)), np.uint8).reshape(n, img.row_bytes)
    desc = rows[:, :img.desc_bytes].copy().view(dt).reshape(n, 2).astype(np.int64)
    bad = (desc < 0).any(axis=1) | (desc[:, 0] + desc[:, 1] > img.heap_size)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise FileFormatError(f"{img.name}: tile {t_lo + k} descriptor {desc[k].tolist()} outside the heap "
                              f"({img.heap_size} bytes)")
    return desc


def heap_ranges(img: TiledImage, desc: np.ndarray, *, gap: int = 0) -> list[tuple[int, int]]:
    """File byte ranges [start, stop) holding the heap bytes of the tiles in ``desc``, merged
    where they touch or lie less than ``gap`` bytes apart (one read each)."""
    out: list[list[int]] = []
    for n, off in sorted(desc.tolist(), key=lambda d: d[1]):
        s, e = img.heap_offset + off, img.heap_offset + off + n
        if out and s <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def read_heap(read: Read, img: TiledImage, desc: np.ndarray, *, gap: int = 0) -> list[bytes]:
    """The compressed bytes of each tile of ``desc``, read as :func:`heap_ranges` merges them."""
    read, ranges = as_read(read), heap_ranges(img, desc, gap=gap)
    chunks = []
    for s, e in ranges:
        b = read(s, e)
        if len(b) != e - s:
            raise FileFormatError(f"{img.name}: short read of the heap at byte {s} ({len(b)} of {e - s} bytes)")
        chunks.append((s, b))
    out = []
    for n, off in desc.tolist():
        s = img.heap_offset + off
        for cs, b in chunks:
            if cs <= s and s + n <= cs + len(b):
                out.append(b[s - cs:s - cs + n])
                break
    return out


def _tile_dims(img: TiledImage, t: int) -> tuple[int, int]:
    """(rows, columns) of tile t (edge tiles are smaller)."""
    iy, ix = divmod(t, img.tiles_x)
    return (min(img.tile[0], img.shape[0] - iy * img.tile[0]), min(img.tile[1], img.shape[1] - ix * img.tile[1]))


def decode_fast(img: TiledImage, tiles: range, bufs: list[bytes]) -> np.ndarray:
    """Decode whole tile rows (``tiles`` = every tile of tile rows ty0..ty1-1) with astropy's
    RICE_1 codec; the image rows they cover, native-endian ZBITPIX type."""
    dt = np.dtype(BITPIX_DTYPE[img.zbitpix]).newbyteorder("=")
    ty0 = tiles.start // img.tiles_x
    rows = min((tiles.stop // img.tiles_x) * img.tile[0], img.shape[0]) - ty0 * img.tile[0]
    out = np.empty((rows, img.shape[1]), dt)
    blocksize = int(img.params.get("BLOCKSIZE", 32))
    bytepix = int(img.params.get("BYTEPIX", dt.itemsize))
    codecs: dict[int, object] = {}  # one codec per tile size (edge tiles are smaller)
    for t, b in zip(tiles, bufs):
        th, tw = _tile_dims(img, t)
        iy, ix = divmod(t, img.tiles_x)
        codec = codecs.get(th * tw)
        if codec is None:
            codec = codecs[th * tw] = _Rice1(blocksize=blocksize, bytepix=bytepix, tilesize=th * tw)
        a = codec.decode(np.frombuffer(b, np.uint8))
        y, x = iy * img.tile[0] - ty0 * img.tile[0], ix * img.tile[1]
        out[y:y + th, x:x + tw] = a.reshape(th, tw)
    return out


def decode_public(img: TiledImage, tiles: range, bufs: list[bytes]) -> np.ndarray:
    """Decode whole tile rows through astropy's public reader: an in-memory FITS file holding a
    copy of the header (rows, heap size and ZNAXIS2 cut down to the selected tiles) and only
    their compressed bytes. Any compression type and scaling astropy reads is handled."""
    from astropy.io import fits

    ty0 = tiles.start // img.tiles_x
    rows = min((tiles.stop // img.tiles_x) * img.tile[0], img.shape[0]) - ty0 * img.tile[0]
    heap = b"".join(bufs)
    lens = np.array([len(b) for b in bufs], np.int64)
    desc = np.stack([lens, np.concatenate([[0], np.cumsum(lens)[:-1]])], axis=1)
    body = np.zeros((len(bufs), img.row_bytes), np.uint8)
    body[:, img.col_offset:img.col_offset + img.desc_bytes] = (
        desc.astype(">i4" if img.desc_code == "P" else ">i8").view(np.uint8).reshape(len(bufs), -1))
    h = fits.Header.fromstring(bytes(img.header.raw[:img.header.end + 80]).decode("ascii", "replace"))
    h["NAXIS2"], h["PCOUNT"], h["ZNAXIS2"] = len(bufs), len(heap), rows
    for k in ("THEAP", "CHECKSUM", "DATASUM", "ZHECKSUM", "ZDATASUM"):
        h.remove(k, ignore_missing=True)
    data = body.tobytes() + heap
    prim = fits.PrimaryHDU().header.tostring().encode()
    raw = prim + h.tostring().encode() + data + b"\0" * (padded(len(data)) - len(data))
    with fits.open(io.BytesIO(raw), memmap=False) as hl:
        a = np.asarray(hl[1].data)
    return a.astype(a.dtype.newbyteorder("="), copy=False)


def read_tiled_rows(read: Read, img: TiledImage, y0: int, y1: int, *, gap: int = 0, public: bool = False,
                    log: list | None = None) -> np.ndarray:
    """Rows [y0, y1) (clipped to the image) of a tile-compressed image, native-endian ZBITPIX
    type: descriptors, then heap bytes, then decode (``public=True`` forces the public astropy
    path). ``log``, if given, receives each (start, stop) byte range read."""
    rd = as_read(read) if log is None else _logged(as_read(read), log)
    ty0, ty1 = img.tile_rows(y0, y1)
    dt = np.dtype(BITPIX_DTYPE[img.zbitpix]).newbyteorder("=")
    if ty1 <= ty0:
        return np.zeros((0, img.shape[1]), dt)
    tiles = range(ty0 * img.tiles_x, ty1 * img.tiles_x)
    desc = read_descriptors(rd, img, tiles.start, tiles.stop)
    bufs = read_heap(rd, img, desc, gap=gap)
    a = None
    if img.plain and _Rice1 is not None and not public and bool(desc[:, 0].all()):
        try:
            a = decode_fast(img, tiles, bufs)
        except Exception:  # noqa: BLE001 - a changed private codec or bad bytes: the public path decides
            a = None
    if a is None:
        try:
            a = decode_public(img, tiles, bufs)
        except Exception as e:  # noqa: BLE001 - astropy's codec raises a bare CfitsioException
            raise FileFormatError(f"{img.name}: tiles {tiles.start}..{tiles.stop - 1} do not decode ({e})") from e
    y_base = ty0 * img.tile[0]
    return a[max(y0, 0) - y_base:min(y1, img.shape[0]) - y_base]


def _logged(read: Read, log: list) -> Read:
    def rd(start: int, stop: int) -> bytes:
        log.append((start, stop))
        return read(start, stop)
    return rd


def box_byte_ranges(read: Read, img: TiledImage, y0: int, y1: int, *, gap: int = 0) -> list[tuple[int, int]]:
    """Every byte range rows [y0, y1) cost: the descriptor range (read here) then the heap ranges."""
    ty0, ty1 = img.tile_rows(y0, y1)
    if ty1 <= ty0:
        return []
    read = as_read(read)
    t_lo, t_hi = ty0 * img.tiles_x, ty1 * img.tiles_x
    return [img.descriptor_range(t_lo, t_hi), *heap_ranges(img, read_descriptors(read, img, t_lo, t_hi), gap=gap)]


def read_image_rows(read: Read, hdu: HDU, y0: int, y1: int) -> np.ndarray:
    """Rows [y0, y1) of an image HDU stored either plainly or tile-compressed (an IBE cutout of
    a QR3 file may hold either): int64 for integer data, float64 otherwise, like
    :func:`spxframe.fits.hdu.read_rows`."""
    read = as_read(read)
    if is_tiled(hdu.header):
        a = read_tiled_rows(read, tiled_image(hdu), y0, y1)
        return a.astype(np.int64 if a.dtype.kind in "iu" else np.float64)
    return read_rows(_GetAdapter(read), hdu, y0, y1)


class _GetAdapter:
    """``get(start, stop)`` over a ``read(start, stop)`` callable (what fits.hdu.read_rows takes)."""

    def __init__(self, read: Read) -> None:
        self.get = read


def file_reader(fd: int) -> Read:
    """``read(start, stop) -> bytes`` over an open file descriptor."""
    pread = partial(os.pread, fd)
    return lambda start, stop: pread(stop - start, start)


def read_file_rows(path: str | os.PathLike, y0: int, y1: int, *, extname: str = "FLAGS") -> np.ndarray:
    """Rows [y0, y1) of the image HDU ``extname`` of a local FITS file, compressed or not."""
    fd = os.open(path, os.O_RDONLY)
    try:
        hdus = [h for h in scan(fd, path=str(path)) if h.name == extname.upper()]
        if not hdus:
            raise FileFormatError(f"{path}: no {extname} HDU")
        return read_image_rows(file_reader(fd), hdus[0], y0, y1)
    finally:
        os.close(fd)
