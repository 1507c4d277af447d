"""The access cost model: predicted seconds and bytes of IBE cutouts, cloud byte ranges (box
columns or full-width rows) and whole files, and the byte ranges of a box under the nominal QR2
layout (:data:`LAYOUT`).

The model's defaults are documented here, once, with their sources (spec = docs/irsa-spherex-spec.md);
a run that has measured its link replaces the link figures (:meth:`CostModel.for_link`,
:func:`load_link` / :func:`record_link`: ``link.json`` in the cache folder).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from spxframe import spherex

log = logging.getLogger("spxframe.plan")

BLOCK = spherex.BLOCK
NPIX = spherex.NPIX
ROW = spherex.ROW_BYTES  #: bytes per plane row
PSF_BYTES = spherex.PSF_BYTES
HEADER_BYTES = BLOCK * sum(spherex.QR2_HEADER_BLOCKS.values())  #: 37 header blocks of a full file
CUTOUT_HEADER_BYTES = 38 * BLOCK  #: spec §3.8 size formula (IBE cutout headers)
#: nominal QR2 layout: HDU → (header start, data start, data end) in bytes
LAYOUT: dict[str, tuple[int, int, int]] = spherex.QR2_LAYOUT

# ---- documented defaults (one place) ---------------------------------------------------
#: bytes/s assumed before a run has measured its link: a fast institutional line to the cloud
#: copy (an assumption, not a published figure; one public note measured ~1 MB/s from a home
#: line to the bucket, issue 14). A measured ``link.json`` replaces it.
DEFAULT_BANDWIDTH_BPS = 25e6
#: seconds to the first byte of one request: S3 range requests take ~0.05-0.6 s each (issue 14,
#: spec §1.6: the cloud copy serves ranges, many may be in flight); 0.1 s is the typical end.
DEFAULT_REQUEST_S = 0.1
#: IBE server time per cutout: "about 15 s and 4-5 MB per cutout", a 0.2 deg cutout took 14.7 s (spec §1.5 [RECON]).
IBE_CUTOUT_S = 15.0
#: concurrent IBE cutouts: four drew HTTP 503, two were fine (spec §3.9 [R7B]); fetch starts at two.
IBE_CUTOUT_STREAMS = 2
#: images read at once and range requests of one image in flight: the fetcher's defaults
#: (``fetch`` data cap 8, ``RangeClient.parallel`` 8).
DATA_STREAMS = 8
RANGE_PARALLEL = 8
#: client + server CPU per range request (s): never hidden by concurrency. Measured on the
#: simulated archive (benchmarks/bench_access.py: ~2-3 ms per request through fsspec/aiohttp).
REQUEST_CPU_S = 0.003
#: box-column reads are planned only up to this many requests per image (a 200-row box costs ~800)
MAX_RANGE_REQUESTS = 256
#: requests and latency rounds of a range read before any pixel row: the first 16 blocks, then
#: the header windows and the file's tail (fetcher/ranges.py ``RangeFile.read_layout``)
LAYOUT_REQUESTS = 6
LAYOUT_ROUNDS = 2
LAYOUT_BYTES = HEADER_BYTES + 3 * 4 * BLOCK + 8 * BLOCK  #: headers, their read slack, the tail (bytes)
#: the file in the cache folder where a run records the link it measured
LINK_FILE = "link.json"


@dataclass(frozen=True)
class CostModel:
    """Predicted seconds of a transfer from the link and the fetcher's concurrency.

    :meth:`seconds` is the serial sum: bytes / ``bandwidth_Bps`` (bytes/s) + requests ×
    ``request_s`` (s) + cutouts × ``cutout_server_s`` (s). :meth:`wall` and the per-image choice
    spread request latency over the requests in flight (``data_streams`` images, ``range_parallel``
    ranges each, ``cutout_streams`` IBE cutouts) while the bytes share one link, and charge
    ``request_cpu_s`` per range request. Box-column range reads (one range per box row per plane)
    are planned only up to ``max_range_requests`` per image.
    ``gap_rows``: range reads of two boxes less than this many rows apart are merged.

    ``local`` adds the cost of the files written to the cache: bytes / ``disk_Bps`` + files ×
    ``file_s`` (write, verify, sidecar). It matters in dense fields: 500 sources on one image as
    500 range cutouts write ~330 MB in 500 files, where the whole file is 72 MB in one.

    Defaults and their sources: the module constants above. ``source`` says where the link
    figures came from ("default", "given" or the ``link.json`` path)."""

    bandwidth_Bps: float = DEFAULT_BANDWIDTH_BPS
    request_s: float = DEFAULT_REQUEST_S
    cutout_server_s: float = IBE_CUTOUT_S
    gap_rows: int = 32
    disk_Bps: float = 200e6
    file_s: float = 0.01
    cutout_streams: int = IBE_CUTOUT_STREAMS
    data_streams: int = DATA_STREAMS
    range_parallel: int = RANGE_PARALLEL
    request_cpu_s: float = REQUEST_CPU_S
    max_range_requests: int = MAX_RANGE_REQUESTS
    source: str = "default"

    @classmethod
    def for_link(cls, *, bandwidth_Bps: float, latency_s: float, **options: Any) -> CostModel:
        """The model for a link of ``bandwidth_Bps`` bytes/s and ``latency_s`` seconds per request
        (e.g. a home line: ``for_link(bandwidth_Bps=5e6, latency_s=0.1)``); ``options`` set other fields."""
        if not (bandwidth_Bps > 0 and latency_s >= 0):
            raise ValueError(f"need bandwidth_Bps > 0 and latency_s >= 0, got {bandwidth_Bps}, {latency_s}")
        return cls(bandwidth_Bps=float(bandwidth_Bps), request_s=float(latency_s),
                   **{"source": "given", **options})

    def seconds(self, nbytes, requests, cutouts=0):
        return np.asarray(nbytes) / self.bandwidth_Bps + np.asarray(requests) * self.request_s \
            + np.asarray(cutouts) * self.cutout_server_s

    def wall(self, access: str, nbytes, requests, rounds=0):
        """Seconds a run spends on transfers of one ``access`` kind ("cutout", "range", "full")
        moving ``nbytes`` bytes in ``requests`` requests with the fetcher's concurrency; ``rounds``
        (range reads) are latency rounds that cannot overlap within one image."""
        nbytes, requests = np.asarray(nbytes, float), np.asarray(requests, float)
        t = nbytes / self.bandwidth_Bps
        if access == "cutout":
            return t + requests * (self.cutout_server_s + self.request_s) / self.cutout_streams
        if access == "range":
            waves = np.asarray(rounds, float) + requests / self.range_parallel
            return t + waves * self.request_s / self.data_streams + requests * self.request_cpu_s
        return t + requests * self.request_s / self.data_streams

    def local(self, nbytes, files):
        return np.asarray(nbytes) / self.disk_Bps + np.asarray(files) * self.file_s


def load_link(cache_dir: str | os.PathLike | None, base: CostModel | None = None) -> CostModel:
    """The cost model of the link a run measured (``cache_dir/link.json``), else ``base`` (or the
    defaults). The file holds ``bandwidth_Bps`` (bytes/s achieved) and ``request_s`` (s)."""
    base = base or CostModel()
    if cache_dir is None:
        return base
    path = Path(os.path.expanduser(str(cache_dir))) / LINK_FILE
    try:
        rec = json.loads(path.read_text())
        bw, lat = float(rec["bandwidth_Bps"]), float(rec.get("request_s", base.request_s))
    except (OSError, ValueError, KeyError, TypeError):
        return base
    if not (math.isfinite(bw) and bw > 0 and math.isfinite(lat) and lat >= 0):
        return base
    return replace(base, bandwidth_Bps=bw, request_s=lat, source=str(path))


def record_link(cache_dir: str | os.PathLike, *, nbytes: int, seconds: float, requests: int | None = None,
                request_s: float | None = None, min_bytes: int = 20_000_000) -> dict | None:
    """Record the link a fetch achieved in ``cache_dir/link.json`` for the next plan: bytes/s =
    ``nbytes`` / ``seconds`` (a lower bound of the line's rate: latency and disk time are inside),
    and ``request_s`` (s per request) when the caller measured it, else the previous or default
    value. Fetches under ``min_bytes`` bytes or a second say too little and are not recorded.
    Returns the record written (None when nothing was)."""
    if nbytes < min_bytes or not seconds >= 1.0:
        return None
    lat = request_s if request_s is not None else load_link(cache_dir).request_s
    rec = {"bandwidth_Bps": nbytes / seconds, "request_s": float(lat),
           "bytes": int(nbytes), "seconds": float(seconds), "requests": requests,
           "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = Path(os.path.expanduser(str(cache_dir))) / LINK_FILE
    tmp = path.with_suffix(f".{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache: the next plan uses the defaults
        log.debug("link not recorded in %s: %s", path, e)
        return None
    return rec


def cutout_bytes(nx, ny, r7=False, epsf_share=1.0):
    """Size in bytes of an IBE cutout of nx × ny pixels: QR2 (spec §3.8) four uncompressed planes
    and the PSF cube; R7 (``r7`` True, per element) three planes, FLAGS compressed (an estimate,
    :data:`spxframe.spherex.R7_FLAGS_ROW_BYTES_EST` per full row scaled to the width) and
    ``epsf_share`` of the EPSF table (:data:`spxframe.spherex.R7_EPSF_BYTES_EST`): the fetch
    closes an R7 cutout stream after ZODI once the detector's ePSF library is cached, so among
    n cutouts of one detector and version each carries about 1/n of it."""
    nx, ny = np.asarray(nx, np.int64), np.asarray(ny, np.int64)
    plane = (-(-4 * nx * ny // BLOCK)) * BLOCK
    qr2 = CUTOUT_HEADER_BYTES + 4 * plane + PSF_BYTES + BLOCK
    flags = (-(-(ny * (16 + spherex.R7_FLAGS_ROW_BYTES_EST * nx // NPIX)) // BLOCK)) * BLOCK
    epsf = np.rint(spherex.R7_EPSF_BYTES_EST * np.asarray(epsf_share, float)).astype(np.int64)
    r7b = CUTOUT_HEADER_BYTES + 3 * plane + flags + epsf + BLOCK
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
    r = _header_ranges()
    for h in spherex.PLANE_HDUS:
        d = LAYOUT[h][1]
        r += [(d + a * ROW, d + b * ROW) for a, b in spans]
    return _merge(r, 0)


def _header_ranges() -> list[tuple[int, int]]:
    r = [(LAYOUT[h][0], LAYOUT[h][1]) for h in spherex.HDU_NAMES if h != "WCS-WAVE"]
    r.append((LAYOUT["WCS-WAVE"][0], LAYOUT["WCS-WAVE"][2]))
    return r


def column_requests(boxes: list[tuple[int, int, int, int]]) -> list[list[int]]:
    """Byte ranges of the boxes' own columns, ``(x0, x1, y0, y1)`` parent pixels each: headers and
    WCS-WAVE as :func:`range_requests`, then one range per box row per plane (touching ranges merged)."""
    r = _header_ranges()
    for h in spherex.PLANE_HDUS:
        d = LAYOUT[h][1]
        for x0, x1, y0, y1 in boxes:
            row0 = d + np.arange(int(y0), int(y1), dtype=np.int64) * ROW
            r += zip((row0 + 4 * int(x0)).tolist(), (row0 + 4 * int(x1)).tolist())
    return _merge(r, 0)
