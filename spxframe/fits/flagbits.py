"""The FLAGS bit map of a file, read from its header, and the bad-pixel mask built on it.

Two card styles define the bits (spec §3.4, §3.9):

- QR2 (pipeline 6.x): ``HIERARCH MP_<NAME> = <bit>`` (short names may be plain ``MP_HOT = 10``);
- QR3 (pipeline R7): ``MSKN<nnnn> = '<NAME>'``, the bit number in the keyword.

A header with neither falls back to the bit table of spec §4.1 (``spherex.FLAG_BITS`` plus the
R7 bits below). :func:`bad_mask` turns a user's ``bad_bits`` — bit numbers, names, or both — into
an integer mask, resolving names through the file's own map, so a renumbered bit is still
masked by name.

The default hard-bad set is the spec §4.2 consensus (``spherex.HARD_BAD_BITS``) plus, by name,
the R7 bits the IRSA Mosaic Tool masks (:data:`R7_HARD_BAD_NAMES`). Those bits are unused in
QR2, so one default serves both releases. SOURCE and FULLSAMPLE are never masked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from spxframe import spherex
from spxframe.errors import FileFormatError, InputError
from spxframe.fits.cards import Header

#: the bits pipeline R7 added: written once, in spxframe.spherex
R7_FLAG_BITS: dict[str, int] = spherex.R7_FLAG_BITS
#: R7 bits masked by default (the IRSA Mosaic Tool set, spec §4.2: every R7 bit)
R7_HARD_BAD_NAMES: frozenset[str] = frozenset(R7_FLAG_BITS)
#: the fallback bit table for a header without bit cards (spec §4.1, both releases)
DEFAULT_FLAG_BITS: dict[str, int] = {**spherex.FLAG_BITS, **R7_FLAG_BITS}
_BIT_NAME = {b: n for n, b in DEFAULT_FLAG_BITS.items()}
#: names of the default hard-bad bits (spec §4.2 consensus + the R7 Mosaic Tool bits)
HARD_BAD_NAMES: frozenset[str] = frozenset({_BIT_NAME[b] for b in spherex.HARD_BAD_BITS}) | R7_HARD_BAD_NAMES
#: bits that are informational and never masked (FULLSAMPLE, SOURCE)
NEVER_REJECT_NAMES: frozenset[str] = frozenset({_BIT_NAME[b] for b in spherex.NEVER_REJECT_BITS})

_MSKN_RE = re.compile(r"^MSKN(\d{1,4})$")
_FLAG_WIDTH = 32  #: FLAGS is int32


def _items(header) -> list[tuple[str, object]]:
    """(keyword, value) pairs of our Header, an astropy Header, raw header bytes or a mapping."""
    if isinstance(header, (bytes, bytearray, memoryview)):
        header = Header(bytes(header))
    if isinstance(header, Header):
        return header.items()
    if hasattr(header, "cards") and hasattr(header, "tostring"):  # astropy.io.fits.Header
        return [(str(c.keyword), c.value) for c in header.cards]
    if isinstance(header, Mapping):
        return list(header.items())
    raise TypeError(f"not a FITS header: {type(header).__name__}")


def _add(out: dict[str, int], name: str, bit: int, card: str) -> None:
    if not 0 <= bit < _FLAG_WIDTH:
        raise FileFormatError(f"FLAGS header: {card} defines bit {bit}, outside 0..{_FLAG_WIDTH - 1}")
    if name in out and out[name] != bit:
        raise FileFormatError(f"FLAGS header: {name} is bit {out[name]} and bit {bit} ({card})")
    other = [n for n, b in out.items() if b == bit and n != name]
    if other:
        raise FileFormatError(f"FLAGS header: bit {bit} is both {other[0]} and {name} ({card})")
    out[name] = bit


def header_flag_bits(header) -> tuple[dict[str, int], str]:
    """(name -> bit, style) from a FLAGS header's bit cards; style is ``"MP_"`` (QR2),
    ``"MSKN"`` (QR3), ``"MP_+MSKN"`` (both, consistent) or ``""`` (no bit cards: empty map).
    Raises :class:`FileFormatError` when cards contradict each other or a bit is out of range."""
    out: dict[str, int] = {}
    styles = set()
    for key, value in _items(header):
        k = str(key).strip().upper()
        if k.startswith("HIERARCH "):
            k = k[9:].strip()
        if k.startswith("MP_") and len(k) > 3:
            try:
                bit = int(value)
            except (TypeError, ValueError):
                raise FileFormatError(f"FLAGS header: {k} = {value!r} is not a bit number") from None
            _add(out, k[3:], bit, f"{k} = {value!r}")
            styles.add("MP_")
            continue
        m = _MSKN_RE.match(k)
        if m and value not in (None, ""):
            _add(out, str(value).strip().upper(), int(m.group(1)), f"{k} = {value!r}")
            styles.add("MSKN")
    return out, "+".join(sorted(styles))


_MAP_CACHE: dict[bytes, dict[str, int]] = {}


def _bit_cards(raw: bytes) -> bytes:
    """The bit cards of a header's raw bytes (MSKN..., MP_..., HIERARCH MP_...), joined."""
    cards = (raw[i:i + 80] for i in range(0, len(raw) - len(raw) % 80, 80))
    return b"".join(c for c in cards if c[:4] == b"MSKN" or c[:3] == b"MP_"
                    or (c[:8] == b"HIERARCH" and b"MP_" in c[8:20]))


def flag_bits(header) -> dict[str, int]:
    """name -> bit of a file: from its header's bit cards in either style, else the table of
    spec §4.1 (:data:`DEFAULT_FLAG_BITS`). For our :class:`Header` the map is parsed once per
    distinct set of bit cards in this process (a FLAGS header holds ~180 cards; ~20 are bit cards);
    the returned dict is shared: do not modify it."""
    key = _bit_cards(bytes(header.raw)) if isinstance(header, Header) else None
    if key is not None and key in _MAP_CACHE:
        return _MAP_CACHE[key]
    bits, _ = header_flag_bits(header)
    bits = bits or dict(DEFAULT_FLAG_BITS)
    if key is not None:
        _MAP_CACHE[key] = bits
    return bits


def _resolve(item, bit_map: Mapping[str, int]) -> int:
    """One ``bad_bits`` entry (bit number, digit string or name) as a bit number."""
    if isinstance(item, bool):
        raise InputError(f"bad_bits entry {item!r} is neither a bit number nor a flag name")
    if isinstance(item, int) or (hasattr(item, "__index__") and not isinstance(item, str)):
        bit = int(item)
    elif isinstance(item, str) and item.strip().lstrip("+-").isdigit():
        bit = int(item.strip())
    elif isinstance(item, str):
        name = item.strip().upper()
        if name in bit_map:
            bit = bit_map[name]
        elif name in DEFAULT_FLAG_BITS:
            bit = DEFAULT_FLAG_BITS[name]
        else:
            known = sorted({**DEFAULT_FLAG_BITS, **bit_map})
            raise InputError(f"bad_bits: unknown flag name {item!r} (known: {known})")
    else:
        raise InputError(f"bad_bits entry {item!r} is neither a bit number nor a flag name")
    if not 0 <= bit < _FLAG_WIDTH:
        raise InputError(f"bad_bits: flag bit {item!r} out of range 0..{_FLAG_WIDTH - 1}")
    return bit


def bad_bits(spec: Iterable[int | str] | str | None = None,
             bit_map: Mapping[str, int] | None = None) -> frozenset[int]:
    """The bit numbers a user's ``bad_bits`` names in a file whose bit map is ``bit_map``
    (default: the spec table). ``spec``: None for the default hard-bad set
    (:data:`HARD_BAD_NAMES`), or bit numbers and/or names (case-insensitive; a string may list
    several separated by commas). Raises :class:`InputError` for an unknown name, a bit out of
    range, or an informational bit (SOURCE, FULLSAMPLE)."""
    bit_map = DEFAULT_FLAG_BITS if bit_map is None else {str(k).upper(): int(v) for k, v in bit_map.items()}
    if spec is None:
        items: list = sorted(HARD_BAD_NAMES)
    elif isinstance(spec, str):
        items = [s for s in spec.replace(";", ",").split(",") if s.strip()]
    else:
        items = list(spec)
    bits = frozenset(_resolve(i, bit_map) for i in items)
    never = {bit_map.get(n, DEFAULT_FLAG_BITS[n]) for n in NEVER_REJECT_NAMES}
    bad = sorted(bits & never)
    if bad:
        names = [n for n, b in {**DEFAULT_FLAG_BITS, **bit_map}.items() if b in bad]
        raise InputError(f"bad_bits: bits {bad} ({', '.join(sorted(names))}) are informational and never masked")
    return bits


def bad_mask(spec: Iterable[int | str] | str | None = None, bit_map: Mapping[str, int] | None = None) -> int:
    """:func:`bad_bits` as an integer mask (OR of ``1 << bit``)."""
    mask = 0
    for b in bad_bits(spec, bit_map):
        mask |= 1 << b
    return mask


def mask_names(mask: int, bit_map: Mapping[str, int] | None = None) -> list[str]:
    """Names of the bits set in ``mask`` (``BIT<n>`` for a bit the map does not name), by bit."""
    names = {b: n for n, b in (DEFAULT_FLAG_BITS if bit_map is None else bit_map).items()}
    return [names.get(b, f"BIT{b}") for b in range(_FLAG_WIDTH) if int(mask) >> b & 1]
