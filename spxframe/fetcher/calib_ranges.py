"""Calibration products by byte ranges of the pixel rows a run needs (issue 13, spec §3.10).

A run with few sources needs a product's maps at few pixels: the gain map over each QR2
measurement's box, the wavelength maps at the 2x2 pixels around each source. :func:`rows_needed`
turns a manifest into row spans per detector; :func:`choose` prices them against the whole file
with the run's cost model (anything with ``seconds(nbytes, requests)``, ``bandwidth_Bps`` and
``request_s``: :class:`spxframe.planner.cost.CostModel`); :func:`fetch_rows` reads the headers
(parsed with :mod:`spxframe.fits.hdu`, no offset assumed) and then full-width row spans of the
product's image HDUs, one HTTP Range request per span and HDU, :data:`PARALLEL` in flight.

Why full-width rows, not rows cut to the needed columns: a row is 8160 bytes, 1.6 ms at 5 MB/s,
against ~0.1 s per request; cut rows would take one request per row (the archive answers one
range per request), so a 30-row box costs 30 requests instead of one. And the gain map's bad
factors are replaced by their row's median (:mod:`spxframe.photometry.gains`), which needs the
whole row to give the same factors as the whole file.

The local file (a "partial product") keeps the product's own byte layout: its headers and every
fetched byte at the offsets the archive's file has them, the image data not fetched filled with
NaN, and the file ends after the last HDU the measurement reads (so it is a valid FITS file that
:func:`spxframe.fits.hdu.scan` and the photometry readers open exactly like the whole one). Beside
it, ``<file>`` + :data:`ROWS_SUFFIX` (JSON) lists the row spans present in every one of those
HDUs. Protocol (safe against a kill at any point): the sidecar is written before the new file is
renamed into place; rows are written into the file first and listed in the sidecar (atomic
rewrite) only after; a file with this sidecar is never taken as whole (a whole-file fetch replaces
the file first and removes the sidecar last). Readers (:func:`spxframe.photometry.gains.present_rows`)
use only the listed rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import numpy as np
import polars as pl
import requests

from spxframe import spherex
from spxframe.errors import FileFormatError
from spxframe.fetcher.cache import CacheDir, sidecar
from spxframe.fetcher.http import RetryPolicy, TransferError
from spxframe.fetcher.owner import tmp_name
from spxframe.fits.cards import BLOCK
from spxframe.fits.hdu import HDU, hdu_from, scan

log = logging.getLogger("spxframe.fetch")

ROWS_SUFFIX = ".rows.json"  #: sidecar of a partial product (the photometry readers use the same name)
TIMEOUT = (10.0, 120.0)  #: (connect, read) seconds
HEADER_READ_BLOCKS = 4  #: blocks asked per header read (more when END is not in them)
PARALLEL = 8  #: range requests of one product in flight
MARGIN_ROWS = 3  #: rows added around each need: measure's positions may differ a little from the plan's
Spans = list[tuple[int, int]]


class RangesRefused(Exception):
    """The archive did not answer a range request with the range (or the product's layout is
    not the expected one): fetch the whole file instead. ``nbytes``: bytes transferred before."""

    nbytes: int = 0


def rows_file(path: str) -> str:
    """The sidecar listing the row spans a partial product holds."""
    return path + ROWS_SUFFIX


def merge(spans: Iterable[Sequence[int]], gap: int = 0) -> Spans:
    """Row spans [a, b) sorted and merged (also across gaps of up to ``gap`` rows)."""
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in spans if int(b) > int(a)):
        if out and a <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def subtract(need: Spans, have: Spans) -> Spans:
    """The rows of ``need`` not in ``have`` (both merged)."""
    out: Spans = []
    for a, b in need:
        for c, d in have:
            if d <= a or c >= b:
                continue
            if c > a:
                out.append((a, c))
            a = max(a, d)
            if a >= b:
                break
        if a < b:
            out.append((a, b))
    return out


def read_rows_record(path: str) -> Spans | None:
    """The row spans a partial product lists; None when ``path`` has no such sidecar."""
    try:
        with open(rows_file(path), encoding="utf-8") as f:
            return merge(json.load(f)["rows"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return []  # unreadable: nothing is trusted


def rows_needed(manifest: pl.DataFrame, *, half: int, point: bool = False) -> dict[int, Spans]:
    """detector -> merged row spans [a, b) of the parent grid a product is read at, from the
    manifest's predicted parent positions (``y_parent``): with ``point`` the two rows of each
    source's bilinear read (wavelength maps: floor(y), floor(y)+1), else the rows of each
    measurement's stamp (±``half`` around the rounded position: the gain map); both with
    :data:`MARGIN_ROWS` more on each side and clipped to the detector."""
    out: dict[int, Spans] = {}
    if not manifest.height:
        return out
    m = manifest.filter(pl.col("y_parent").is_finite())
    n, e = spherex.NPIX, MARGIN_ROWS
    for (det,), g in m.group_by(["detector"]):
        y = g["y_parent"].to_numpy()
        lo, hi = ((np.floor(y) - e, np.floor(y) + 2 + e) if point
                  else (np.rint(y) - half - e, np.rint(y) + half + 1 + e))
        out[int(det)] = merge((max(0, int(a)), min(n, int(b))) for a, b in zip(lo, hi))
    return out


def choose(need: Spans, have: Spans, *, n_hdus: int, cost: Any, whole_bytes: int,
           row_bytes: int = spherex.ROW_BYTES, parallel: int = PARALLEL) -> Spans | None:
    """The row spans to fetch, [] when the partial product has them all, or None when the whole
    file is quicker. Seconds on ``cost``'s link (``bandwidth_Bps`` bytes/s, ``request_s`` s per
    request): the whole file, bytes / bandwidth + one request; ranges, :func:`ranged_cost`.
    Spans closer than a request's worth of rows are merged."""
    missing = subtract(merge(need), merge(have))
    if not missing:
        return []
    bw, lat = float(cost.bandwidth_Bps), float(cost.request_s)
    spans = merge(missing, int(lat * bw / parallel // row_bytes))
    _, _, ranged = ranged_cost(spans, fresh=not have, n_hdus=n_hdus, cost=cost, row_bytes=row_bytes,
                               parallel=parallel)
    return spans if ranged < whole_bytes / bw + lat else None


def ranged_cost(spans: Spans, *, fresh: bool, n_hdus: int, cost: Any, row_bytes: int = spherex.ROW_BYTES,
                parallel: int = PARALLEL) -> tuple[int, int, float]:
    """(bytes, requests, seconds) of fetching ``spans`` of ``n_hdus`` image HDUs on ``cost``'s
    link: one request per span and HDU, ``parallel`` in flight, after (for a ``fresh`` partial
    product) the headers, ``n_hdus`` + 1 reads one after another."""
    heads = n_hdus + 1 if fresh else 0
    requests = len(spans) * n_hdus
    nbytes = sum(b - a for a, b in spans) * row_bytes * n_hdus + heads * HEADER_READ_BLOCKS * BLOCK
    seconds = nbytes / float(cost.bandwidth_Bps) + (heads + math.ceil(requests / parallel)) * float(cost.request_s)
    return nbytes, requests + heads, seconds


class _Remote:
    """Range GETs of one file: ``get(start, stop)`` -> bytes; ``size`` once a range answered."""

    def __init__(self, session: requests.Session, url: str, policy: RetryPolicy) -> None:
        self.session, self.url, self.policy, self.size, self.nbytes = session, url, policy, None, 0
        self._lock = threading.Lock()

    def get(self, start: int, stop: int) -> bytes:
        if self.size is not None:
            stop = min(stop, self.size)
        for attempt in range(self.policy.retries + 1):
            try:
                return self._once(start, stop)
            except TransferError as e:
                if attempt == self.policy.retries or not e.transient:
                    raise
            except requests.RequestException as e:  # timeouts, resets, bodies cut short
                if attempt == self.policy.retries:
                    raise TransferError(f"{type(e).__name__} for {self.url}", transient=True) from e
            threading.Event().wait(self.policy.delay(attempt + 1))
        raise TransferError(f"no answer from {self.url}", transient=True)

    def _once(self, start: int, stop: int) -> bytes:
        with self.session.get(self.url, headers={"Range": f"bytes={start}-{stop - 1}"}, timeout=TIMEOUT,
                              stream=True) as r:
            if r.status_code in (200, 416):  # the whole file, or a range it will not serve
                raise RangesRefused(f"{self.url}: HTTP {r.status_code} to a range request")
            if r.status_code != 206:
                transient = r.status_code >= 500 or r.status_code == 429
                raise TransferError(f"HTTP {r.status_code} for {self.url}", transient=transient, status=r.status_code)
            total = (r.headers.get("Content-Range") or "").rpartition("/")[2]
            if total.isdigit():
                self.size = int(total)
            body = r.content
        if len(body) != stop - start:
            raise TransferError(f"{self.url}: {len(body)} bytes for range {start}-{stop - 1}", transient=True)
        with self._lock:  # pieces run on several threads
            self.nbytes += len(body)
        return body


def _remote_headers(remote: _Remote, names: Sequence[str]) -> list[HDU]:
    """The HDUs of the remote file up to the last of ``names`` (headers read by ranges)."""
    hdus: list[HDU] = []
    off, want = 0, {n.upper() for n in names}
    while want - {h.name for h in hdus}:
        if remote.size is not None and off >= remote.size:
            raise RangesRefused(f"{remote.url}: no HDU(s) {sorted(want - {h.name for h in hdus})}")
        nb, h = HEADER_READ_BLOCKS, None
        while h is None:
            buf = remote.get(off, off + nb * BLOCK)
            h = hdu_from(buf, off, off, len(hdus))
            if h is None and len(buf) < nb * BLOCK:
                raise FileFormatError(f"{remote.url}: truncated header at byte {off}")
            nb *= 4
        hdus.append(h)
        off = h.next_offset
    return hdus


def _create(remote: _Remote, path: str, names: Sequence[str]) -> list[HDU]:
    """A new partial product at ``path``: headers at their offsets, the named images' data NaN,
    an empty sidecar (written before the file appears). Returns the HDUs read."""
    hdus = _remote_headers(remote, names)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.truncate(hdus[-1].next_offset)
            for h in hdus:
                f.seek(h.offset)
                f.write(h.header.raw)
                if h.name in names and h.bitpix < 0 and len(h.shape) == 2:
                    row = np.full(h.shape[1], np.nan, h.dtype).tobytes()
                    f.seek(h.data_offset)
                    for _ in range(h.shape[0]):
                        f.write(row)
        with open(tmp, "rb") as f:
            scan(f.fileno(), path=path)  # a valid FITS file, as a reader will see it
        _write_rows(path, [], remote.url, remote.size)
        if os.path.exists(sidecar(path)):
            os.unlink(sidecar(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return hdus


def _write_rows(path: str, rows: Spans, url: str, size: int | None) -> None:
    rec = {"rows": [list(s) for s in merge(rows)], "url": url, "size": size}
    CacheDir.atomic_write(rows_file(path), json.dumps(rec).encode())


def fetch_rows(session: requests.Session, url: str, path: str, names: Sequence[str], spans: Spans, *,
               policy: RetryPolicy) -> int:
    """Fetch row ``spans`` of the image HDUs ``names`` of the product at ``url`` into the partial
    product ``path`` (created when absent); bytes transferred. Each span is listed in the sidecar
    once written in every HDU. :class:`RangesRefused` when the archive ignores ranges or the
    product lacks the HDUs (nothing trusted was written: fetch the whole file); its ``nbytes``
    says what was transferred before."""
    remote = _Remote(session, url, policy)
    try:
        return _fetch_rows(remote, path, [n.upper() for n in names], spans)
    except RangesRefused as e:
        e.nbytes = remote.nbytes
        raise


def _fetch_rows(remote: _Remote, path: str, names: list[str], spans: Spans) -> int:
    """:func:`fetch_rows` with its range reader."""
    url = remote.url
    have = read_rows_record(path)
    if have is None or not os.path.isfile(path):
        hdus, have = _create(remote, path, names), []
    else:
        fd = os.open(path, os.O_RDONLY)
        try:
            hdus = scan(fd, path=path)
        finally:
            os.close(fd)
    images = [h for h in hdus if h.name in names]
    if len(images) != len(names) or any(len(h.shape) != 2 for h in images):
        raise RangesRefused(f"{path}: no 2-D image HDU(s) {names}")
    pieces = [(s, h) for s in spans for h in images]
    left = {s: len(images) for s in spans}
    fd = os.open(path, os.O_WRONLY)
    try:
        with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
            jobs = {pool.submit(_piece, remote, fd, h, a, b): (a, b) for (a, b), h in pieces}
            try:
                for job in as_completed(jobs):
                    span = jobs[job]
                    job.result()
                    left[span] -= 1
                    if not left[span]:  # written in every HDU: listed
                        os.fsync(fd)
                        have = merge([*have, span])
                        _write_rows(path, have, url, remote.size)
            except BaseException:
                for j in jobs:
                    j.cancel()
                raise
    finally:
        os.close(fd)
    return remote.nbytes


def _piece(remote: _Remote, fd: int, h: HDU, a: int, b: int) -> None:
    """Rows [a, b) of image HDU ``h``: fetched and written at their own offset."""
    rb = h.shape[1] * h.bytes_per_pixel
    a, b = max(0, a), min(b, h.shape[0])
    if b > a:
        os.pwrite(fd, remote.get(h.data_offset + a * rb, h.data_offset + b * rb), h.data_offset + a * rb)
