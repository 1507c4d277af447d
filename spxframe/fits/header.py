"""Minimal FITS reading for photometry: headers parsed by hand, data located, rows read by offset.

Speed (DESIGN "Speed rules"): headers are read with ``os.pread`` (astropy ``fits.open`` costs
milliseconds per file), sized from the previous file's layout, and parsed lazily: a few keywords
by comparing card starts, many through a keyword index; values are parsed only when asked for.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from spxframe import spherex

BLOCK = spherex.BLOCK
_BITPIX = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


class MefError(ValueError):
    """The file is not a readable SPHEREx L2 MEF (names the path and what is wrong)."""


# ------------------------------------------------------------------------------ headers
class Header:
    """Lazily parsed FITS header: ``cards`` maps keyword -> raw 80-char card (parsed on first use).

    Look-ups of short keywords compare the first 8 bytes of every card (numpy) for the first few
    keys, then build a keyword -> card index once (cheaper when many keys are read, as for the WCS).
    """

    __slots__ = ("raw", "_cards", "_cache", "_k8", "_idx", "_nlook")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._cards: dict[str, str] | None = None
        self._cache: dict[str, object] = {}
        self._k8: np.ndarray | None = None  # first 8 bytes of every card as one uint64
        self._idx: dict[bytes, int] | None = None  # 8-byte keyword -> first card index
        self._nlook = 0

    @property
    def cards(self) -> dict[str, str]:
        if self._cards is None:
            text = self.raw.decode("ascii", "replace")
            raw = self.raw
            end = len(raw) - 80 if raw[-80:-72] == b"END     " else _find_end(raw)
            cards: dict[str, str] = {}
            for c in reversed([text[i:i + 80] for i in range(0, end if end >= 0 else len(text), 80)]):  # reversed + plain assignment = first occurrence wins
                if c[8:10] == "= ":
                    k = c[:8].rstrip()
                    if k and k not in ("COMMENT", "HISTORY"):
                        cards[k] = c
                elif c.startswith("HIERARCH "):
                    eq = c.find("=")
                    if eq > 0:
                        cards[c[9:eq].strip()] = c[eq - 8:]  # so that the value starts at column 10
            self._cards = cards
        return self._cards

    def structure(self) -> tuple[int, tuple[int, ...], int]:
        """(BITPIX, NAXISn in FITS order, PCOUNT) from the mandatory leading cards only."""
        raw = self.raw
        bitpix = int(raw[90:110].split(b"/")[0])
        naxis = int(raw[170:190].split(b"/")[0])
        ax = tuple(int(raw[250 + 80 * i:270 + 80 * i].split(b"/")[0]) for i in range(naxis))
        pc = 0
        c = raw[240 + 80 * naxis:320 + 80 * naxis]
        if c[:8] == b"PCOUNT  ":
            pc = int(c[10:30].split(b"/")[0])
        return bitpix, ax, pc

    def _card(self, key: str) -> str | None:
        """The card of ``key`` (first occurrence); short keys are found without a full parse."""
        if self._cards is not None or len(key) > 8:
            return self.cards.get(key)
        c = self._raw_card(key)
        return None if c is None else c.decode("ascii", "replace")

    def _raw_card(self, key: str) -> bytes | None:
        """The 80 bytes of the first ``key = value`` card of a keyword of <= 8 characters."""
        k8 = _PAD8.get(key)
        if k8 is None:
            k8 = _PAD8[key] = key.ljust(8)[:8].encode("ascii")
        raw = self.raw
        if self._idx is None:
            self._nlook += 1
            if self._nlook <= 3:  # a few keys: the first block (where EXTNAME, OBSID... live), else numpy
                i = raw.find(k8 + b"= ", 0, BLOCK)
                if i >= 0 and i % 80 == 0:
                    return raw[i:i + 80]
                return self._scan_card(k8)
            self.index()
        i = self._idx.get(k8)
        if i is None:
            return None
        c = raw[80 * i:80 * i + 80]
        return c if c[8:10] == b"= " else self._scan_card(k8)

    def index(self) -> dict[bytes, int]:
        """8-byte keyword -> index of its first card (built once; worth it for many look-ups)."""
        if self._idx is None:
            n = len(self.raw) // 80
            keys = np.frombuffer(self.raw, _KEYDT, count=n)["k"].tolist()
            self._idx = dict(zip(keys[::-1], range(n - 1, -1, -1)))  # first occurrence wins
        return self._idx

    def _scan_card(self, k8: bytes) -> bytes | None:
        if self._k8 is None:  # bytes.find is slow on space-filled headers; compare card starts instead
            n = len(self.raw) // 80
            self._k8 = np.frombuffer(self.raw, "<u8", count=n * 10).reshape(n, 10)[:, 0]
        for i in np.flatnonzero(self._k8 == int.from_bytes(k8, "little")):
            c = self.raw[80 * i:80 * i + 80]
            if c[8:10] == b"= ":
                return c
        return None

    def num(self, key: str, default: float | None = None) -> float | None:
        """``float(get(key, default))`` for a numeric card, parsed straight from the bytes."""
        c = None if self._cards is not None or len(key) > 8 else self._raw_card(key)
        if c is not None and b"'" not in c:
            try:
                return float(c[10:].split(b"/", 1)[0])
            except ValueError:
                pass
        v = self.get(key, default)
        return None if v is None else float(v)

    def floats(self, keys: list[str], default: float = 0.0) -> list[float]:
        """``[num(k, default) for k in keys]`` in one pass over the keyword index (WCS matrices)."""
        idx, raw, out = self.index(), self.raw, []
        for key in keys:
            k8 = _PAD8.get(key) or key.ljust(8)[:8].encode("ascii")
            i = idx.get(k8)
            if i is None and self._cards is None and len(key) <= 8:
                out.append(default)
                continue
            c = raw[80 * i:80 * i + 80] if i is not None else b""
            if c[8:10] == b"= " and b"'" not in c:
                try:
                    out.append(float(c[10:].split(b"/", 1)[0]))
                    continue
                except ValueError:
                    pass
            out.append(self.num(key, default))
        return out

    def __contains__(self, key: str) -> bool:
        return self._card(key) is not None

    def get(self, key: str, default=None):
        if key in self._cache:
            return self._cache[key]
        c = self._card(key)
        v = default if c is None else _parse_value(c[10:])[0]
        self._cache[key] = v
        return v

    def __getitem__(self, key: str):
        if self._card(key) is None:
            raise KeyError(key)
        return self.get(key)

    def comment(self, key: str) -> str:
        c = self._card(key)
        return "" if c is None else _parse_value(c[10:])[1]


_PAD8: dict[str, bytes] = {}
_KEYDT = np.dtype([("k", "S8"), ("r", "V72")])


_STR_RE = re.compile(r"'((?:[^']|'')*)'\s*(?:/(.*))?$")


def _parse_value(s: str) -> tuple[object, str]:
    """(value, comment) of the value field of a card (string, logical, int, float or None)."""
    t = s.strip()
    if t[:1] == "'":
        m = _STR_RE.match(t)
        if m:
            return m.group(1).replace("''", "'").rstrip(), (m.group(2) or "").strip()
    k = t.find("/")
    v, com = (t[:k].strip(), t[k + 1:].strip()) if k >= 0 else (t, "")
    if v == "T" or v == "F":
        return v == "T", com
    if not v:
        return None, com
    if v.isdigit() or (v[0] in "+-" and v[1:].isdigit()):
        return int(v), com
    try:
        return float(v.replace("D", "E")), com
    except ValueError:
        pass
    try:
        return int(v), com
    except ValueError:
        return v, com


@dataclass
class Hdu:
    header: Header
    data_offset: int
    data_size: int  #: bytes, unpadded
    bitpix: int = 0
    shape: tuple[int, ...] = ()  #: numpy order


_HDR_BLOCKS: dict[int, int] = {}  #: header length (blocks) of the i-th HDU of the last file scanned


def scan(fd: int, file_size: int, *, path: str = "") -> list[Hdu]:
    """All HDUs of an open FITS file: headers parsed, data located (not read).

    Each header is read with as many blocks as the same HDU had in the previous file (files come
    in few layouts), then more if END was not found: copying header bytes dominates the cost.
    """
    hdus, off = [], 0
    while off < file_size:
        chunk = b""
        nb = _HDR_BLOCKS.get(len(hdus), 2)
        while True:
            more = os.pread(fd, nb * BLOCK, off + len(chunk))
            if not more:
                raise MefError(f"{path}: truncated FITS header at byte {off}")
            start = len(chunk)  # a multiple of 80: search only the new blocks
            chunk += more
            end = _find_end(chunk, start)
            if end >= 0:
                break
            nb = max(2 * nb, 8)
        hlen = (end // BLOCK + 1) * BLOCK
        _HDR_BLOCKS[len(hdus)] = hlen // BLOCK
        h = Header(chunk[:end + 80])
        try:
            bitpix, ax, pcount = h.structure()
        except ValueError:
            raise MefError(f"{path}: malformed mandatory cards in the header at byte {off}") from None
        n = abs(bitpix) // 8 * math.prod(ax) + pcount if ax and math.prod(ax) else 0
        hdus.append(Hdu(h, off + hlen, n, bitpix, ax[::-1]))
        off += hlen + math.ceil(n / BLOCK) * BLOCK
    if off > file_size:
        raise MefError(f"{path}: truncated FITS data ({file_size} bytes, need {off})")
    return hdus


def _key8(key: str) -> int:
    return int.from_bytes(key.ljust(8)[:8].encode("ascii"), "little")


_END8 = _key8("END")


def _find_end(chunk: bytes, start: int = 0) -> int:
    """Offset of the END card (at a multiple of 80 bytes) at or after ``start``; -1 if none."""
    n = len(chunk) // 80 - start // 80
    if n <= 0:
        return -1
    k8 = np.frombuffer(chunk, "<u8", count=n * 10, offset=start - start % 80).reshape(n, 10)[:, 0]
    hit = np.flatnonzero(k8 == _END8)
    return int(start - start % 80 + 80 * hit[0]) if hit.size else -1


def read_rows(fd: int, hdu: Hdu, y0: int, y1: int, *, convert: bool = True) -> np.ndarray:
    """Rows [y0, y1) of a 2-D image HDU, native-endian float64 (int64 for integer data); with
    ``convert=False`` a read-only view in the stored (big-endian) type: convert what you use."""
    ny, nx = hdu.shape
    y0, y1 = max(y0, 0), min(y1, ny)
    dt = np.dtype(_BITPIX[hdu.bitpix])
    out = np.float64 if dt.kind == "f" else np.int64
    if y1 <= y0:
        return np.zeros((0, nx), out if convert else dt)
    buf = os.pread(fd, (y1 - y0) * nx * dt.itemsize, hdu.data_offset + y0 * nx * dt.itemsize)
    a = np.frombuffer(buf, dt).reshape(y1 - y0, nx)
    return a.astype(out) if convert else a


def read_array(fd: int, hdu: Hdu) -> np.ndarray:
    """The whole data array of an HDU as a zero-copy big-endian view (convert what you use)."""
    dt = np.dtype(_BITPIX[hdu.bitpix])
    buf = os.pread(fd, hdu.data_size, hdu.data_offset)
    return np.frombuffer(buf, dt).reshape(hdu.shape)
