"""Byte ranges of pipeline R7 (QR3) files: the compressed FLAGS rows of a box, and local R7 cutouts.

No network here (like :mod:`spxframe.fetcher.ranges`): this module says which bytes a box needs
in an R7 file and turns them into a local cutout file. An R7 file (spec §3.9) stores FLAGS as a
RICE_1 tile-compressed BINTABLE of one-row tiles and an EPSF table instead of the PSF cube; HDU
offsets after FLAGS vary from file to file (every header is parsed, none assumed).

Reading the FLAGS rows of boxes costs two rounds of coalesced requests, batched with the other
reads of the file (:class:`~spxframe.fetcher.ranges.RangeFile`): the tile descriptors of the
boxes' rows (8 bytes per row), then the heap bytes they point to (~2-6 kB per full-width row).

A local R7 cutout holds PRIMARY, IMAGE, FLAGS, VARIANCE, ZODI cut to the box (IBE header rules,
§3.8), an EPSF header stub with no rows and an ``EPSFFILE`` card naming the ePSF library in the
cache, and WCS-WAVE copied. FLAGS is written as a plain int32 image (bit-identical values; the
original header's cards, ``MSKNnnnn`` bit cards and WCS included): a box of 64x64 px costs 16 kB
that way, the readers take either form, and no codec is needed to write it. Offsets and sizes are
bytes; boxes are zero-based parent pixels.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from spxframe import spherex
from spxframe.errors import FileFormatError
from spxframe.fits.cards import END_CARD, card_list, edit_header, format_card, padded
from spxframe.fits.hdu import HDU, hdu_from
from spxframe.fits.tiles import TiledImage, heap_ranges, is_tiled, read_descriptors, read_tiled_rows, tiled_image

EPSF = "EPSF"
#: the HDUs of a cached ePSF library file (PRIMARY + the file's EPSF table as stored)
EPSF_HDUS: tuple[str, ...] = ("PRIMARY", EPSF)
#: keywords of a compressed-image BINTABLE that describe the table or the compression, not the image
_TABLE_KEYS = re.compile(r"^(XTENSION|BITPIX|NAXIS\d*|PCOUNT|GCOUNT|TFIELDS|THEAP|T(TYPE|FORM|DIM|UNIT|NULL|SCAL|ZERO"
                         r"|DISP)\d+|Z(IMAGE|TENSION|SIMPLE|EXTEND|BLOCKED|BITPIX|NAXIS\d*|PCOUNT|GCOUNT|TILE\d+"
                         r"|CMPTYPE|NAME\d+|VAL\d+|QUANTIZ|DITHER0|HECKSUM|DATASUM|MASKCMP)|CHECKSUM|DATASUM)$")


class Box(Protocol):
    """A pixel box (:class:`spxframe.fetcher.ranges.Box`, which imports this module)."""

    x0: int
    y0: int
    nx: int
    ny: int


def is_r7_layout(layout: list[HDU]) -> bool:
    """True when a parsed layout holds a tile-compressed FLAGS or an EPSF table (an R7 file)."""
    return any(h.name == EPSF or (h.name == "FLAGS" and is_tiled(h.header)) for h in layout)


def image_size(hdu: HDU) -> tuple[int, int]:
    """(NAXIS1, NAXIS2) of an image HDU, or (ZNAXIS1, ZNAXIS2) of a tile-compressed one."""
    if is_tiled(hdu.header):
        return int(hdu.header["ZNAXIS1"]), int(hdu.header["ZNAXIS2"])
    return hdu.naxis[0], hdu.naxis[1]


def flags_image(layout: list[HDU]) -> TiledImage | None:
    """The :class:`~spxframe.fits.tiles.TiledImage` of a compressed FLAGS, None for a plain one."""
    h = next((h for h in layout if h.name == "FLAGS"), None)
    return tiled_image(h) if h is not None and is_tiled(h.header) else None


def descriptor_ranges(img: TiledImage, boxes: Iterable[Box]) -> list[tuple[int, int]]:
    """Byte ranges [start, stop) of the tile descriptors of every box's rows (one per box)."""
    out = []
    for b in boxes:
        ty0, ty1 = img.tile_rows(b.y0, b.y0 + b.ny)
        if ty1 > ty0:
            out.append(img.descriptor_range(ty0 * img.tiles_x, ty1 * img.tiles_x))
    return out


def heap_byte_ranges(img: TiledImage, boxes: Iterable[Box], get) -> list[tuple[int, int]]:
    """Byte ranges of the heap bytes of every box's rows, the descriptors read through ``get``
    (the bytes fetched so far)."""
    out: list[tuple[int, int]] = []
    for b in boxes:
        ty0, ty1 = img.tile_rows(b.y0, b.y0 + b.ny)
        if ty1 > ty0:
            out.extend(heap_ranges(img, read_descriptors(get, img, ty0 * img.tiles_x, ty1 * img.tiles_x)))
    return out


def flags_rows(img: TiledImage, box: Box, get) -> np.ndarray:
    """The decoded FLAGS of ``box`` (ny, nx), native int32, from fetched descriptors and heap."""
    rows = read_tiled_rows(get, img, box.y0, box.y0 + box.ny)
    return rows[:, box.x0:box.x0 + box.nx]


def flags_cutout_header(hdu: HDU, box: Box) -> bytes:
    """A plain image header for the FLAGS of ``box`` from a tile-compressed FLAGS header: the
    image's structure from ZBITPIX and the box, every image card kept (EXTNAME, ``MSKNnnnn``,
    WCS with CRPIXn, CRPIXnA, CRPIXnW shifted by the box origin as IBE does, §3.8), the table and
    compression cards and the no longer valid checksums dropped."""
    h = hdu.header
    cards = [format_card("XTENSION", "IMAGE", "Image extension"),
             format_card("BITPIX", int(h["ZBITPIX"]), "array data type"),
             format_card("NAXIS", 2, "number of array dimensions"),
             format_card("NAXIS1", box.nx), format_card("NAXIS2", box.ny),
             format_card("PCOUNT", 0, "number of parameters"), format_card("GCOUNT", 1, "number of groups")]
    shift = {f"CRPIX{i}{s}": off for s in ("", "A", "W") for i, off in ((1, box.x0), (2, box.y0))}
    for c in card_list(h):
        key = c[:8].decode("ascii", "replace").strip()
        if key == "END":
            break
        if _TABLE_KEYS.match(key):
            continue
        if key in shift and c[8:10] == b"= ":
            v = h.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                c = format_card(key, float(v) - shift[key], h.comment(key))
        if key == "ZBLANK":
            c = format_card("BLANK", h.get(key), h.comment(key))
        cards.append(bytes(c))
    cards.append(END_CARD)
    raw = b"".join(cards)
    return raw + b" " * (padded(len(raw)) - len(raw))


def flags_cutout_data(rows: np.ndarray) -> bytes:
    """Big-endian int32 bytes of decoded FLAGS rows, padded with zeros to whole blocks."""
    raw = np.ascontiguousarray(rows, dtype=">i4").tobytes()
    return raw + b"\0" * (padded(len(raw)) - len(raw))


def epsf_stub_header(hdu: HDU, epsffile: str) -> bytes:
    """The EPSF table's header with no rows (NAXIS2 = 0, no heap) and ``EPSFFILE``: the zone
    columns and keywords stay readable, the arrays live in the cached library."""
    return edit_header(hdu.header, update={"NAXIS2": 0, "PCOUNT": 0}, delete=("THEAP", "CHECKSUM", "DATASUM"),
                       append=[("EPSFFILE", epsffile, "ePSF library, relative to the cache root")])


def epsf_file_bytes(hdu: HDU, data: bytes, key: str, *, wave: bytes = b"") -> bytes:
    """A stand-alone ePSF library file: a minimal PRIMARY, then the file's EPSF HDU (header and
    data bytes as in the archive file, so values are bit-identical), then ``wave`` (the file's
    WCS-WAVE HDU, header and data, kept for :func:`salvage_cutout`)."""
    prim = b"".join([format_card("SIMPLE", True, "conforms to FITS standard"), format_card("BITPIX", 8),
                     format_card("NAXIS", 0), format_card("EXTEND", True),
                     format_card("PSF_KEY", key, "detector + processing version"), END_CARD])
    prim += b" " * (padded(len(prim)) - len(prim))
    if len(data) != padded(hdu.data_size):
        raise FileFormatError(f"EPSF data: got {len(data)} bytes, expected {padded(hdu.data_size)}")
    return prim + hdu.header.raw + data + wave


def complete_hdus(data: bytes) -> list[HDU]:
    """The HDUs of FITS bytes that are whole (header and padded data), in order, up to the first
    one cut short (a stream closed early); never raises for a cut."""
    out: list[HDU] = []
    pos = 0
    while pos < len(data):
        try:
            h = hdu_from(data, 0, pos, len(out))
        except FileFormatError:
            break
        if h is None or h.next_offset > len(data):
            break
        out.append(h)
        pos = h.next_offset
    return out


#: the HDUs of an R7 cutout that carry its pixels, in file order; the rest (EPSF, WCS-WAVE) is per
#: detector and version and comes from the cached library (:func:`salvage_cutout`)
PIXEL_HDUS = ("PRIMARY", "IMAGE", "FLAGS", "VARIANCE", "ZODI")


def w_in_parent_frame(header) -> bool:
    """Whether an IMAGE header's spectral W system points into the parent file's WCS-WAVE table
    unchanged: CRPIXnW = CRPIXnA − 1 on both axes (the parent has CRPIXnW = 0 and CRPIXnA = 1;
    spec §3.6, §3.8). True for whole files and for cutouts cut by the CRPIXnW-shift recipe; False
    for cutouts whose table IRSA rebased or re-sampled instead (spec §8: UNCONFIRMED which), whose
    WCS-WAVE only serves their own box."""
    w1, w2, a1, a2 = header.floats(["CRPIX1W", "CRPIX2W", "CRPIX1A", "CRPIX2A"], float("nan"))
    return abs(w1 - (a1 - 1.0)) < 1e-6 and abs(w2 - (a2 - 1.0)) < 1e-6


def through_zodi(data: bytes | bytearray) -> bool | None:
    """Whether the start of an R7 cutout stream holds a whole PRIMARY..ZODI that the cached ePSF
    library can complete (:func:`salvage_cutout`): True; False while not yet; None once it shows
    it cannot be (FLAGS not tile-compressed, other HDUs, or a W system that does not point into
    the parent's WCS-WAVE table, :func:`w_in_parent_frame`)."""
    got = complete_hdus(data)[:len(PIXEL_HDUS)]
    if tuple(h.name for h in got) != PIXEL_HDUS[:len(got)]:
        return None
    if len(got) >= 2 and not w_in_parent_frame(got[1].header):
        return None
    if len(got) >= 3 and not got[2].header.get("ZIMAGE", False):
        return None
    return len(got) == len(PIXEL_HDUS)


def salvage_cutout(data: bytes, library: bytes, *, epsffile: str) -> bytes | None:
    """A complete local R7 cutout from an IBE cutout stream closed after ZODI (inside or before
    the EPSF table, spec §3.9: the service ignores Range, so closing is the only way to stop it):
    PRIMARY..ZODI as received, the EPSF header stub with ``EPSFFILE`` and the WCS-WAVE table of
    the cached ePSF library file ``library`` of the same detector and processing version (which
    :func:`epsf_file_bytes` writes with the WCS-WAVE of the file it came from). None when the
    stream lacks a whole PRIMARY..ZODI or the library has no EPSF and WCS-WAVE HDUs.

    Wavelengths: WCS-WAVE is taken from another file of the same detector and version (the
    L2 spectral WCS is a per-detector calibration of the processing version; UNCONFIRMED, spec
    §8); with the ``spectral_wcs`` product in use the maps decide anyway."""
    got = complete_hdus(data)
    if tuple(h.name for h in got[:len(PIXEL_HDUS)]) != PIXEL_HDUS or not w_in_parent_frame(got[1].header):
        return None
    lib = {h.name: h for h in complete_hdus(library)}
    ep, wave = lib.get(EPSF), lib.get("WCS-WAVE")
    if ep is None or wave is None:
        return None
    return (data[:got[4].next_offset] + epsf_stub_header(ep, epsffile) + wave.header.raw
            + library[wave.data_offset:wave.next_offset])


def _parent_table(header) -> bool:
    """Whether a file with this IMAGE header carries the parent's WCS-WAVE table: a whole file, or
    a cutout by the shift recipe whose offsets on both axes are nonzero (at a zero offset a
    rebased table is unchanged but a re-sampled one is not, and the header cannot tell them
    apart)."""
    x0, y0 = (1.0 - v for v in header.floats(["CRPIX1A", "CRPIX2A"], 1.0))
    whole = x0 == 0 and y0 == 0 and header.get("NAXIS1") == header.get("NAXIS2") == spherex.NPIX
    return w_in_parent_frame(header) and (whole or (x0 != 0 and y0 != 0))


def library_from_file(data: bytes, key: str) -> bytes | None:
    """The ePSF library file (:func:`epsf_file_bytes`: EPSF table then WCS-WAVE) from the bytes of
    a whole R7 file or IBE cutout, so later cutouts of the same detector and version may stop
    after ZODI (:func:`salvage_cutout`); None without a whole EPSF table and WCS-WAVE, or when
    the file's WCS-WAVE may not be the parent's table (:func:`_parent_table`)."""
    named = {h.name: h for h in complete_hdus(data)}
    ep, wave, img = named.get(EPSF), named.get("WCS-WAVE"), named.get("IMAGE")
    if ep is None or wave is None or img is None or ep.data_size == 0 or not _parent_table(img.header):
        return None
    return epsf_file_bytes(ep, data[ep.data_offset:ep.next_offset], key,
                           wave=wave.header.raw + data[wave.data_offset:wave.next_offset])
