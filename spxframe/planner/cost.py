"""The access cost model: predicted seconds and bytes of IBE cutouts, cloud byte ranges and
whole files, and the byte ranges of a box under the nominal QR2 layout (:data:`LAYOUT`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spxframe import spherex

BLOCK = spherex.BLOCK
NPIX = spherex.NPIX
ROW = spherex.ROW_BYTES  #: bytes per plane row
PSF_BYTES = spherex.PSF_BYTES
HEADER_BYTES = BLOCK * sum(spherex.QR2_HEADER_BLOCKS.values())  #: 37 header blocks of a full file
CUTOUT_HEADER_BYTES = 38 * BLOCK  #: spec §3.8 size formula (IBE cutout headers)
#: nominal QR2 layout: HDU → (header start, data start, data end) in bytes
LAYOUT: dict[str, tuple[int, int, int]] = spherex.QR2_LAYOUT


@dataclass(frozen=True)
class CostModel:
    """Predicted seconds = bytes / ``bandwidth_Bps`` + requests × ``request_s`` + cutouts ×
    ``cutout_server_s`` (IBE builds each cutout for seconds; 2 s ≈ 50 MB at 25 MB/s).
    ``gap_rows``: range reads of two boxes less than this many rows apart are merged.

    ``local`` adds the cost of the files written to the cache: bytes / ``disk_Bps`` + files ×
    ``file_s`` (write, verify, sidecar). It matters in dense fields: 500 sources on one image as
    500 range cutouts write ~330 MB in 500 files, where the whole file is 72 MB in one."""

    bandwidth_Bps: float = 25e6
    request_s: float = 0.05
    cutout_server_s: float = 2.0
    gap_rows: int = 32
    disk_Bps: float = 200e6
    file_s: float = 0.01

    def seconds(self, nbytes, requests, cutouts=0):
        return np.asarray(nbytes) / self.bandwidth_Bps + np.asarray(requests) * self.request_s \
            + np.asarray(cutouts) * self.cutout_server_s

    def local(self, nbytes, files):
        return np.asarray(nbytes) / self.disk_Bps + np.asarray(files) * self.file_s


def cutout_bytes(nx, ny, r7=False):
    """Size in bytes of an IBE cutout of nx × ny pixels: QR2 (spec §3.8) four uncompressed planes
    and the PSF cube; R7 (``r7`` True, per element) three planes, FLAGS compressed (an estimate,
    :data:`spxframe.spherex.R7_FLAGS_ROW_BYTES_EST` per full row scaled to the width) and the
    EPSF table (:data:`spxframe.spherex.R7_EPSF_BYTES_EST`)."""
    nx, ny = np.asarray(nx, np.int64), np.asarray(ny, np.int64)
    plane = (-(-4 * nx * ny // BLOCK)) * BLOCK
    qr2 = CUTOUT_HEADER_BYTES + 4 * plane + PSF_BYTES + BLOCK
    flags = (-(-(ny * (16 + spherex.R7_FLAGS_ROW_BYTES_EST * nx // NPIX)) // BLOCK)) * BLOCK
    r7b = CUTOUT_HEADER_BYTES + 3 * plane + flags + spherex.R7_EPSF_BYTES_EST + BLOCK
    return np.where(np.asarray(r7, bool), r7b, qr2)


def full_bytes(r7=False):
    """Size in bytes of a whole L2 file: QR2 exact, R7 an estimate (its FLAGS heap varies)."""
    return np.where(np.asarray(r7, bool), spherex.R7_FULL_FILE_BYTES_EST, spherex.FULL_FILE_BYTES)


def box_of(cx, n):
    """First pixel of the ``n``-pixel box whose centre is nearest the zero-based coordinate ``cx``
    (ties → higher): ``floor(cx − (n − 1)/2 + 0.5)``."""
    n = np.asarray(n, np.int64)
    return np.floor(np.asarray(cx, float) - (n - 1) / 2 + 0.5).astype(np.int64)


def _merge(intervals: list[tuple[int, int]], gap: int) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def range_requests(row_spans: list[tuple[int, int]], gap_rows: int = 32) -> list[list[int]]:
    """Byte ranges for parent row spans ``[y0, y1)``: headers, plane rows, WCS-WAVE (no PSF data)."""
    spans = _merge(row_spans, gap_rows)
    r = [(LAYOUT[h][0], LAYOUT[h][1]) for h in spherex.HDU_NAMES if h != "WCS-WAVE"]
    r.append((LAYOUT["WCS-WAVE"][0], LAYOUT["WCS-WAVE"][2]))
    for h in spherex.PLANE_HDUS:
        d = LAYOUT[h][1]
        r += [(d + a * ROW, d + b * ROW) for a, b in spans]
    return _merge(r, 0)
