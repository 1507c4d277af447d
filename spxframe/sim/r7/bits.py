"""FLAGS bits of pipeline R7 (QR3) and their ``MSKNnnnn`` header cards (spec §3.9, §4.1).

QR2 names its bits with ``HIERARCH MP_<NAME> = <bit>`` cards; R7 writes ``MSKN<nnnn> = '<NAME>'``
(the bit number in the keyword). R7 adds bits 20 and 22-29.
The bit numbers are instrument facts, written once in :mod:`spxframe.spherex`.
"""

from __future__ import annotations

from spxframe import spherex
from spxframe.spherex import FLAG_BITS, HARD_BAD_BITS

#: bits that pipeline R7 added (spec §4.1: QR3 only)
R7_NEW_BITS: dict[str, int] = spherex.R7_FLAG_BITS
#: every named bit of an R7 file, in bit order
R7_FLAG_BITS: dict[str, int] = dict(sorted({**FLAG_BITS, **R7_NEW_BITS}.items(), key=lambda kv: kv[1]))
#: the Mosaic Tool's hard-bad set for R7 files (spec §4.2)
R7_HARD_BAD_BITS: frozenset[int] = HARD_BAD_BITS | spherex.R7_HARD_BAD_BITS
#: bit values as int32 masks
R7_BIT: dict[str, int] = {k: 1 << v for k, v in R7_FLAG_BITS.items()}
#: flags counted by the IMAGE ``L2 N_<FLAG>`` cards of an R7 file (all but PHANTOM and REFERENCE)
R7_COUNTED_FLAGS: tuple[str, ...] = tuple(n for n in R7_FLAG_BITS if n not in ("PHANTOM", "REFERENCE"))


def mskn_cards(bits: dict[str, int] | None = None) -> list[tuple[str, object, str]]:
    """``MSKN<nnnn> = '<NAME>'`` cards, one per named bit, in bit order (unnamed bits have no card)."""
    bits = R7_FLAG_BITS if bits is None else bits
    return [(f"MSKN{b:04d}", name, f"mask bit {b} (value {1 << b})") for name, b in sorted(bits.items(),
                                                                                       key=lambda kv: kv[1])]


def bits_from_mskn(header) -> dict[str, int]:
    """Name -> bit map read back from ``MSKNnnnn`` cards of a header (``astropy`` Header or dict)."""
    out = {}
    for key in header:
        k = str(key).upper()
        if k.startswith("MSKN") and k[4:].isdigit():
            out[str(header[key]).strip()] = int(k[4:])
    return out
