"""FITS header cards: one lazily parsed :class:`Header`, one value parser, card formatting/editing.

A :class:`Header` wraps the raw bytes of a header (whole 2880-byte blocks, END included) as they
lie in a file or in a byte range read from one; nothing is parsed until a keyword is asked for.

Speed (DESIGN "Speed rules"; astropy ``fits.open`` costs milliseconds per file): a few keywords
are found by comparing card starts, many through a keyword index built once; values are parsed
only when asked for, numbers straight from the bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from spxframe import spherex

BLOCK = spherex.BLOCK
CARD = spherex.CARD
END_CARD = b"END" + b" " * 77

_PAD8: dict[str, bytes] = {}
_KEYDT = np.dtype([("k", "S8"), ("r", "V72")])
_NAXISN = tuple(f"NAXIS{i}".ljust(8).encode() for i in range(1, 1000))
_STR_RE = re.compile(r"'((?:[^']|'')*)'\s*(?:/(.*))?$")


def padded(n: int) -> int:
    """``n`` bytes rounded up to whole 2880-byte FITS blocks."""
    return -(-int(n) // BLOCK) * BLOCK


def _key8(key: str) -> int:
    return int.from_bytes(key.ljust(8)[:8].encode("ascii"), "little")


_END8 = _key8("END")


def find_end(chunk: bytes | memoryview, start: int = 0) -> int:
    """Offset of the END card (at a multiple of 80 bytes) at or after ``start``; -1 if none."""
    n = len(chunk) // CARD - start // CARD
    if n <= 0:
        return -1
    k8 = np.frombuffer(chunk, "<u8", count=n * 10, offset=start - start % CARD).reshape(n, 10)[:, 0]
    hit = np.flatnonzero(k8 == _END8)
    return int(start - start % CARD + CARD * hit[0]) if hit.size else -1


def header_length(buf: bytes | memoryview, start: int = 0) -> int | None:
    """Length in bytes (whole blocks) of the header that begins at ``buf[start]``; None if the
    END card is not within the whole blocks of ``buf`` from ``start``."""
    whole = (len(buf) - start) // BLOCK * BLOCK
    if whole <= 0:
        return None
    end = find_end(memoryview(buf)[start:start + whole])
    return None if end < 0 else (end // BLOCK + 1) * BLOCK


def parse_value(s: str) -> tuple[Any, str]:
    """(value, comment) of the value field of a card (columns 11-80): string, logical, int,
    float or None (no value)."""
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


class Header:
    """Lazily parsed FITS header over its raw bytes (``raw``: whole blocks as stored, END included).

    Mapping-like: ``h[key]`` (KeyError if absent), ``h.get``, ``key in h``, ``h.comment``,
    ``h.num`` (float straight from the bytes), ``h.floats`` (many numbers at once). The first
    occurrence of a repeated keyword wins; COMMENT/HISTORY are not keywords. ``len(h)`` and
    ``bytes(h)`` are the size and bytes of the header as stored, so a header can be copied as is.
    """

    __slots__ = ("raw", "_end", "_cards", "_cache", "_k8", "_idx", "_nlook")

    def __init__(self, raw: bytes, end: int | None = None) -> None:
        self.raw = raw
        self._end = end  #: offset of the END card, when known
        self._cards: dict[str, str] | None = None
        self._cache: dict[str, object] = {}
        self._k8: np.ndarray | None = None  # first 8 bytes of every card as one uint64
        self._idx: dict[bytes, int] | None = None  # 8-byte keyword -> first card index
        self._nlook = 0

    def __len__(self) -> int:
        return len(self.raw)

    def __bytes__(self) -> bytes:
        return bytes(self.raw)

    @property
    def end(self) -> int:
        """Offset of the END card in ``raw`` (-1 if there is none)."""
        if self._end is None:
            raw = self.raw
            self._end = len(raw) - CARD if raw[-CARD:-72] == b"END     " else find_end(raw)
        return self._end

    @property
    def cards(self) -> dict[str, str]:
        """keyword -> 80-character card (parsed once, on first use)."""
        if self._cards is None:
            end = self.end
            text = self.raw[:end if end >= 0 else len(self.raw)].decode("ascii", "replace")
            cards: dict[str, str] = {}
            for c in reversed([text[i:i + 80] for i in range(0, len(text), 80)]):  # first occurrence wins
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

    def keys(self) -> list[str]:
        return list(self.cards)

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self.get(k)) for k in self.cards]

    def structure(self) -> tuple[int, tuple[int, ...], int, int]:
        """(BITPIX, NAXISn in FITS order, PCOUNT, GCOUNT) from the mandatory leading cards
        (keyword look-ups if they are not in the standard order). Raises ValueError."""
        raw = self.raw
        if raw[80:88] == b"BITPIX  " and raw[160:168] == b"NAXIS   ":  # the standard order: fixed format
            naxis = int(raw[170:190].split(b"/")[0])
            p = 240 + 80 * naxis  # the card after NAXISn
            if 0 <= naxis < 1000 and (naxis == 0 or raw[p - 80:p - 72] == _NAXISN[naxis - 1]):
                ax = tuple([int(raw[c:c + 20].split(b"/")[0]) for c in range(250, p, 80)])
                if raw[p:p + 8] == b"PCOUNT  ":
                    pc, gc = int(raw[p + 10:p + 30].split(b"/")[0]), 1
                    if raw[p + 80:p + 88] == b"GCOUNT  ":
                        gc = int(raw[p + 90:p + 110].split(b"/")[0])
                    return int(raw[90:110].split(b"/")[0]), ax, pc, gc
                if raw[:8] == b"SIMPLE  ":
                    return int(raw[90:110].split(b"/")[0]), ax, 0, 1
        bitpix, naxis = int(self["BITPIX"]), int(self["NAXIS"])
        ax = tuple(int(self[f"NAXIS{i}"]) for i in range(1, naxis + 1))
        return bitpix, ax, int(self.get("PCOUNT", 0) or 0), int(self.get("GCOUNT", 1) or 1)

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
            n = (self.end if self.end >= 0 else len(self.raw)) // 80
            keys = np.frombuffer(self.raw, _KEYDT, count=n)["k"].tolist()
            self._idx = dict(zip(keys[::-1], range(n - 1, -1, -1)))  # first occurrence wins
        return self._idx

    def _scan_card(self, k8: bytes) -> bytes | None:
        if self._k8 is None:  # bytes.find is slow on space-filled headers; compare card starts instead
            n = (self.end if self.end >= 0 else len(self.raw)) // 80
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
            k8 = _PAD8.get(key)
            if k8 is None:
                k8 = _PAD8[key] = key.ljust(8)[:8].encode("ascii")
            i = idx.get(k8)
            if i is None:  # absent (a long key may be a HIERARCH card)
                out.append(default if len(key) <= 8 else self.num(key, default))
                continue
            c = raw[80 * i + 8:80 * i + 80]
            if c[:2] == b"= " and b"'" not in c:
                try:
                    out.append(float(c[2:].split(b"/", 1)[0]))
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
        v = default if c is None else parse_value(c[10:])[0]
        self._cache[key] = v
        return v

    def __getitem__(self, key: str):
        if self._card(key) is None:
            raise KeyError(key)
        return self.get(key)

    def comment(self, key: str) -> str:
        c = self._card(key)
        return "" if c is None else parse_value(c[10:])[1]


def card_list(header: bytes | Header) -> list[bytes]:
    """The 80-byte cards of a header up to and including END."""
    raw = bytes(header)
    out = []
    for i in range(0, len(raw), CARD):
        c = raw[i:i + CARD]
        out.append(c)
        if c[:8] == b"END     ":
            break
    return out


def parse_header(header: bytes | Header) -> dict[str, Any]:
    """Keyword -> value of the ``KEY = value`` cards (COMMENT/HISTORY skipped; first occurrence)."""
    h = header if isinstance(header, Header) else Header(bytes(header))
    return {k: h.get(k) for k in h.cards}


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


def edit_header(header: bytes | Header, *, update: dict[str, Any] | None = None, delete: Iterable[str] = (),
                append: Iterable[tuple[str, Any, str]] = ()) -> bytes:
    """A new header: ``update`` replaces values of existing keywords (comments kept; absent
    keywords are not added), ``delete`` drops keywords, ``append`` adds cards before END.
    The result is padded with blanks to whole blocks."""
    update = dict(update or {})
    delete = set(delete)
    out: list[bytes] = []
    for c in card_list(header):
        key = c[:8].decode("ascii", "replace").strip()
        if key == "END":
            break
        if key in delete:
            continue
        if key in update and c[8:10] == b"= ":
            comment = parse_value(c[10:].decode("ascii", "replace"))[1]
            c = format_card(key, update[key], comment)
        out.append(bytes(c))
    for key, value, comment in append:
        out.append(format_card(key, value, comment))
    out.append(END_CARD)
    raw = b"".join(out)
    return raw + b" " * (padded(len(raw)) - len(raw))
