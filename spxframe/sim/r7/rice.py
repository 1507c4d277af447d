"""FLAGS as a RICE_1 tile-compressed image with one-row tiles, made lazily (spec §3.9).

A tile-compressed image is a BINTABLE (``ZIMAGE = T``): one table row per tile holding a
``1PB(max)`` descriptor (byte count, heap offset; two big-endian int32), then the heap of
compressed tiles in order. R7 FLAGS tiles are one image row each (``ZTILE1 = ZNAXIS1``,
``ZTILE2 = 1``), compressed with astropy's own RICE_1 codec (BLOCKSIZE 32, BYTEPIX 4) so that
astropy reads the file back; :func:`encode_rows_public` makes the same bytes through astropy's
public ``CompImageHDU`` writer, the fallback if the private codec module moves.

:class:`TileTable` holds one image's tiles: the per-row compressed lengths are computed once, on
first need (the HDU's size, its header's ``PCOUNT`` and ``TFORM1``, and every offset after it
depend on them), strip by strip from a ``rows(r0, r1)`` callable, and kept (8 bytes a row); the
compressed bytes themselves are recompressed on demand, with the last few strips kept.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from astropy.io import fits

from spxframe.spherex import BLOCK

try:  # astropy's own RICE_1 codec (private module; checked with astropy 8.0)
    from astropy.io.fits.hdu.compressed._codecs import Rice1 as _Rice1
except ImportError:  # pragma: no cover - depends on the installed astropy
    _Rice1 = None

BLOCKSIZE = 32  #: RICE_1 pixels per block (ZVAL1)
BYTEPIX = 4  #: bytes per int32 pixel (ZVAL2)
DESC_BYTES = 8  #: one ``1PB`` descriptor: two int32
Rows = Callable[[int, int], np.ndarray]


def padded(n: int) -> int:
    """``n`` rounded up to whole FITS blocks."""
    return -(-n // BLOCK) * BLOCK


def encode_rows(rows: np.ndarray) -> list[bytes]:
    """Each row of a 2-D integer array as one RICE_1 tile (int32), astropy's bytes."""
    a = np.ascontiguousarray(np.asarray(rows).astype(np.int32, copy=False))
    if a.dtype.byteorder not in ("=", "|"):
        a = a.astype(a.dtype.newbyteorder("="))
    if _Rice1 is None:  # pragma: no cover
        return encode_rows_public(a)
    codec = _Rice1(blocksize=BLOCKSIZE, bytepix=BYTEPIX, tilesize=a.shape[1])
    return [codec.encode(r) for r in a]


def encode_rows_public(rows: np.ndarray) -> list[bytes]:
    """The same tiles through astropy's public writer: a ``CompImageHDU`` (RICE_1, one-row tiles)
    written to memory, its descriptors and heap read back."""
    a = np.asarray(rows, np.int32)
    hdu = fits.CompImageHDU(a, compression_type="RICE_1", tile_shape=(1, a.shape[1]))
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
    raw = buf.getvalue()
    hdr = fits.Header.fromstring(raw[BLOCK:].decode("ascii", "replace"), sep="")
    start = BLOCK + padded(len(hdr.tostring()))
    nrow, width = int(hdr["NAXIS2"]), int(hdr["NAXIS1"])
    desc = np.frombuffer(raw[start:start + nrow * width], ">i4").reshape(nrow, -1)[:, :2]
    heap = start + int(hdr.get("THEAP", nrow * width))
    return [raw[heap + off:heap + off + n] for n, off in desc.tolist()]


def decode_tile(buf: bytes, width: int) -> np.ndarray:
    """One RICE_1 tile back to an int32 row (astropy's codec)."""
    return _Rice1(blocksize=BLOCKSIZE, bytepix=BYTEPIX, tilesize=width).decode(np.frombuffer(buf, np.uint8))


def compressed_cards(nx: int, ny: int, heap_size: int, max_len: int, extname: str = "FLAGS"
                     ) -> list[tuple[str, object, str]]:
    """The structural cards of an int32 RICE_1 one-row-tile image, as astropy writes them."""
    return [
        ("XTENSION", "BINTABLE", "binary table extension"), ("BITPIX", 8, "array data type"),
        ("NAXIS", 2, "number of array dimensions"), ("NAXIS1", DESC_BYTES, "width of table in bytes"),
        ("NAXIS2", ny, "number of rows in table"), ("PCOUNT", heap_size, "number of group parameters"),
        ("GCOUNT", 1, "number of groups"), ("TFIELDS", 1, "number of fields in each row"),
        ("TTYPE1", "COMPRESSED_DATA", ""), ("TFORM1", f"1PB({max_len})", ""),
        ("ZIMAGE", True, "extension contains compressed image"), ("ZTENSION", "IMAGE", "Image extension"),
        ("ZBITPIX", 32, "array data type"), ("ZNAXIS", 2, "number of array dimensions"),
        ("ZNAXIS1", nx, ""), ("ZNAXIS2", ny, ""), ("ZPCOUNT", 0, "number of parameters"),
        ("ZGCOUNT", 1, "number of groups"), ("ZTILE1", nx, "size of tiles to be compressed"),
        ("ZTILE2", 1, "size of tiles to be compressed"), ("ZCMPTYPE", "RICE_1", "compression algorithm"),
        ("ZNAME1", "BLOCKSIZE", "compression block size"), ("ZVAL1", BLOCKSIZE, "pixels per block"),
        ("ZNAME2", "BYTEPIX", "bytes per pixel (1, 2, 4, or 8)"), ("ZVAL2", BYTEPIX, "bytes per pixel (1, 2, 4, or 8)"),
        ("EXTNAME", extname, "name of this binary table extension"),
    ]


class TileTable:
    """The compressed tiles of one int32 image (``shape`` = (ny, nx)), one tile per row.

    ``rows(r0, r1)`` returns image rows [r0, r1) (any integer dtype, any byte order). ``lengths``
    (computed once, on first use, unless given) is what a caller caches per file: with it, the
    HDU's size and header need no pixels. ``keep`` strips of compressed bytes stay in memory.
    Thread-safe (the simulated archive serves requests from several threads).
    """

    def __init__(self, rows: Rows, shape: tuple[int, int], *, strip: int = 64,
                 lengths: np.ndarray | None = None, keep: int = 8) -> None:
        self._rows, self.shape, self.strip, self.keep = rows, (int(shape[0]), int(shape[1])), int(strip), keep
        self._lengths = None if lengths is None else np.asarray(lengths, np.int64)
        if self._lengths is not None and self._lengths.shape != (self.shape[0],):
            raise ValueError(f"lengths has shape {self._lengths.shape}, want ({self.shape[0]},)")
        self._strips: OrderedDict[int, list[bytes]] = OrderedDict()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ tiles
    def _strip_tiles(self, s: int) -> list[bytes]:
        with self._lock:
            if s in self._strips:
                self._strips.move_to_end(s)
                return self._strips[s]
        r0, r1 = s * self.strip, min((s + 1) * self.strip, self.shape[0])
        a = np.asarray(self._rows(r0, r1))
        if a.shape != (r1 - r0, self.shape[1]):
            raise ValueError(f"rows({r0}, {r1}) gave shape {a.shape}, want {(r1 - r0, self.shape[1])}")
        tiles = encode_rows(a)
        with self._lock:
            self._strips[s] = tiles
            while len(self._strips) > self.keep:
                self._strips.popitem(last=False)
        return tiles

    def tiles(self, t0: int, t1: int) -> list[bytes]:
        """Compressed bytes of tiles (rows) [t0, t1)."""
        out: list[bytes] = []
        for s in range(t0 // self.strip, -(-t1 // self.strip)):
            a = s * self.strip
            out += self._strip_tiles(s)[max(t0 - a, 0):t1 - a]
        return out

    @property
    def lengths(self) -> np.ndarray:
        """Compressed bytes per tile (int64, one per row); computed once."""
        with self._lock:
            if self._lengths is None:
                n = np.empty(self.shape[0], np.int64)
                for s in range(-(-self.shape[0] // self.strip)):
                    a = s * self.strip
                    n[a:a + self.strip] = [len(t) for t in self._strip_tiles(s)]
                self._lengths = n
            return self._lengths

    @property
    def offsets(self) -> np.ndarray:
        """Heap offset of each tile."""
        n = self.lengths
        return np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)

    @property
    def heap_size(self) -> int:
        return int(self.lengths.sum())

    @property
    def max_len(self) -> int:
        return int(self.lengths.max()) if self.shape[0] else 0

    # ------------------------------------------------------------------ the HDU's data bytes
    @property
    def data_size(self) -> int:
        """Bytes of the HDU's data (descriptor table + heap), padded to whole blocks."""
        return padded(self.shape[0] * DESC_BYTES + self.heap_size)

    def descriptors(self) -> bytes:
        """The table body: (length, heap offset) per tile, big-endian int32."""
        return np.stack([self.lengths, self.offsets], axis=1).astype(">i4").tobytes()

    def read_data(self, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of the HDU's data (body, heap, zero padding); only the tiles overlapping
        the range are compressed."""
        body_n = self.shape[0] * DESC_BYTES
        hi = min(hi, self.data_size)
        out = []
        if lo < body_n:
            out.append(self.descriptors()[lo:min(hi, body_n)])
        h0, h1 = max(lo - body_n, 0), min(hi - body_n, self.heap_size)
        if h0 < h1:
            offs, ends = self.offsets, self.offsets + self.lengths
            t0 = int(np.searchsorted(ends, h0, side="right"))
            t1 = int(np.searchsorted(offs, h1, side="left"))
            blob = b"".join(self.tiles(t0, t1))
            base = int(offs[t0])
            out.append(blob[h0 - base:h1 - base])
        p0 = max(lo, body_n + self.heap_size)
        if p0 < hi:
            out.append(b"\0" * (hi - p0))
        return b"".join(out)
