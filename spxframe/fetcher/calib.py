"""Calibration products (spec §3.10): found through the archive's directory listing, fetched once
per detector per run into the cache, bytes counted.

Layout in the cache: ``cal/<release>/<family>/<file name as published>`` (the file name holds the
detector and the product token). :func:`fetch_products` takes, per detector, the highest token
(version, then year-day) that holds the detector, as the listing
``<base>/ibe/dir/list/spherex/<release>/<family>`` shows it; the file comes from
``<base>/ibe/data/spherex/<release>/<family>/<name>``. A file already in the cache (verified
sidecar) is not fetched again.

With ``need`` (detector -> row spans of the parent grid the run reads the product at) and a cost
model, the gain and wavelength products may instead be fetched by byte ranges of those rows into
a partial product (:mod:`spxframe.fetcher.calib_ranges`), whichever the model prefers; a later run
fetches only the rows it lacks, or the whole file (which then replaces the partial one).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import requests

from spxframe import spherex
from spxframe.errors import FileFormatError
from spxframe.fetcher import calib_ranges as _ranges
from spxframe.fetcher.cache import CacheDir
from spxframe.fetcher.calib_ranges import PARALLEL, RangesRefused, Spans, choose, fetch_rows, read_rows_record
from spxframe.fetcher.claims import Watcher, claim_or_wait
from spxframe.fetcher.http import RetryPolicy, TransferError, default_session, stream_to_file
from spxframe.fetcher.owner import tmp_name
from spxframe.fits.hdu import scan_fits

log = logging.getLogger("spxframe.fetch")

#: the detector and token in a product file name, ``<family>_D<d>_spx_<token>.fits``
_NAME_RE = re.compile(r"_D(\d)_spx_(cal-[A-Za-z0-9]+-v\d+-\d{4}-\d{3})\.fits$")
TIMEOUT = (10.0, 120.0)  #: (connect, read) seconds
LISTING_FILE = "listing.json"  #: the listing's answer, kept beside the product files
LISTING_MAX_AGE_S = 86400.0  #: a kept listing younger than this is reused (products are reissued rarely)
CLAIM_WAIT_S = 900.0  #: longest wait (s) for another process writing the same product file
#: family -> the image HDUs measurement reads: the products that may be fetched by row ranges
RANGE_HDUS: dict[str, tuple[str, ...]] = {spherex.GAIN_FAMILY: (spherex.GAIN_HDU,),
                                          spherex.WAVE_FAMILY: tuple(spherex.WAVE_HDUS)}


@dataclass
class Products:
    """What :func:`fetch_products` found: ``paths`` detector -> local file, ``tokens`` detector ->
    token, ``bytes`` transferred this run (whole files and ranges), ``missing`` detectors the
    release publishes none for, ``access`` detector -> how this run got it: "whole" (fetched),
    "ranges" (rows fetched into a partial product), "cached" (nothing fetched)."""

    release: str
    family: str
    paths: dict[int, str] = field(default_factory=dict)
    tokens: dict[int, str] = field(default_factory=dict)
    bytes: int = 0
    missing: list[int] = field(default_factory=list)
    access: dict[int, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """run.json's entry: release, family, token and access per detector, bytes fetched this run."""
        return {"release": self.release, "family": self.family, "bytes": self.bytes, "missing": self.missing,
                "tokens": {f"D{d}": t for d, t in sorted(self.tokens.items())},
                "access": {f"D{d}": a for d, a in sorted(self.access.items())}}


def whole_bytes(family: str) -> int:
    """Bytes of a whole product of ``family`` as the cost model counts them: one detector plane per
    image HDU measurement reads (:data:`RANGE_HDUS`; one for other families)."""
    return len(RANGE_HDUS.get(family, ("",))) * spherex.PLANE_BYTES


def token_key(token: str) -> tuple[int, int, int]:
    """Order of product tokens: version, then year, then day of year."""
    m = spherex.CAL_TOKEN_RE.search(token)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (-1, -1, -1)


def latest_names(listing: str) -> dict[int, str]:
    """detector -> the listed name with the highest token that holds it (JSON lines, ``name``)."""
    best: dict[int, tuple[tuple[int, int, int], str]] = {}
    for line in listing.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            name = str(json.loads(line)["name"])
        except (ValueError, KeyError, TypeError):
            continue
        m = _NAME_RE.search(name)
        if not m:
            continue
        det, key = int(m.group(1)), token_key(m.group(2))
        if det not in best or key > best[det][0]:
            best[det] = (key, name)
    return {d: n for d, (_, n) in best.items()}


def _names(session: requests.Session, base_url: str, release: str, family: str, folder: str,
           policy: RetryPolicy, max_age_s: float) -> dict[int, str]:
    """detector -> newest listed name, from the kept listing when younger than ``max_age_s``, else
    from the archive's listing (kept for the next run; like the fetched files, the cache is assumed
    to serve one archive)."""
    kept = os.path.join(folder, LISTING_FILE)
    try:
        with open(kept, encoding="utf-8") as f:
            state = json.load(f)
        if time.time() - float(state["time"]) < max_age_s:
            return {int(d): str(n) for d, n in state["names"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    listing = _get_text(session, f"{base_url}/{spherex.CAL_LIST_PATH}/{release}/{family}", policy)
    names = latest_names(listing or "")
    CacheDir.atomic_write(kept, json.dumps({"base_url": base_url, "time": time.time(),
                                            "names": {str(d): n for d, n in names.items()}}).encode())
    return names


def _get_text(session: requests.Session, url: str, policy: RetryPolicy) -> str | None:
    """The body of ``url`` (None on 404), retried on transient failures."""
    for attempt in range(policy.retries + 1):
        try:
            r = session.get(url, timeout=TIMEOUT)
            if r.status_code == 404:
                return None
            if r.status_code < 400:
                return r.text
            if r.status_code < 500 and r.status_code != 429:
                raise TransferError(f"HTTP {r.status_code} for {url}", transient=False, status=r.status_code)
        except (requests.Timeout, requests.ConnectionError) as e:
            if attempt == policy.retries:
                raise TransferError(f"{type(e).__name__} for {url}", transient=True) from e
        threading.Event().wait(policy.delay(attempt + 1))
    raise TransferError(f"no answer from {url} after {policy.retries + 1} attempts", transient=True)


def _fetch_one(session: requests.Session, url: str, path: str, cache: CacheDir, policy: RetryPolicy) -> int:
    """Download ``url`` to ``path`` (verified FITS, sidecar); bytes transferred."""
    tmp = tmp_name(path)
    try:
        for attempt in range(policy.retries + 1):
            try:
                d = stream_to_file(session, url, tmp, timeout=TIMEOUT, stop=threading.Event())
                scan_fits(tmp, required=("PRIMARY",))
                cache.place(tmp, path, {"url": url}, d.md5)
                return d.nbytes
            except (TransferError, FileFormatError) as e:
                transient = isinstance(e, FileFormatError) or e.transient
                if attempt == policy.retries or not transient:
                    raise
                threading.Event().wait(policy.delay(attempt + 1))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return 0


def _get_product(session: requests.Session, url: str, path: str, cache: CacheDir, policy: RetryPolicy, *,
                 family: str, rows: Spans | None, cost: Any) -> tuple[int, str]:
    """(bytes transferred, access) of one product file: kept when whole and verified, else the
    rows ``rows`` (those a partial product lacks) when ``cost`` prices them below the whole file,
    else the whole file (which replaces a partial one; its row list is removed last). One process
    at a time writes a product file (a claim on it, :mod:`spxframe.fetcher.claims`)."""
    if read_rows_record(path) is None and cache.is_verified(path, required=("PRIMARY",)):
        return 0, "cached"
    claim = claim_or_wait(path, done=lambda: False, watcher=Watcher(), timeout=CLAIM_WAIT_S, what="calibration")
    try:
        return _get_claimed(session, url, path, cache, policy, family=family, rows=rows, cost=cost)
    finally:
        if claim is not None:
            claim.release()


def _get_claimed(session: requests.Session, url: str, path: str, cache: CacheDir, policy: RetryPolicy, *,
                 family: str, rows: Spans | None, cost: Any) -> tuple[int, str]:
    """:func:`_get_product` once the claim on ``path`` is held."""
    have = read_rows_record(path)  # a partial product is never taken for a whole one
    if have is None and cache.is_verified(path, required=("PRIMARY",)):
        return 0, "cached"
    spans, spent = None, 0
    if rows and (have is not None or not os.path.exists(path)):
        names = RANGE_HDUS[family]
        spans = choose(rows, have or [], n_hdus=len(names), cost=cost, whole_bytes=whole_bytes(family))
    if spans is not None:
        if not spans:
            return 0, "cached"
        try:
            return fetch_rows(session, url, path, RANGE_HDUS[family], spans, policy=policy), "ranges"
        except (RangesRefused, FileFormatError) as e:  # ranges refused, or headers not as expected
            log.info("%s: whole file instead of ranges", e)
            spent = getattr(e, "nbytes", 0)
    nbytes = spent + _fetch_one(session, url, path, cache, policy)
    if os.path.exists(_ranges.rows_file(path)):
        os.unlink(_ranges.rows_file(path))
    return nbytes, "whole"


def fetch_products(detectors, *, base_url: str, cache: CacheDir | str, family: str = spherex.GAIN_FAMILY,
                   release: str = spherex.GAIN_RELEASE, session: requests.Session | None = None,
                   retries: int = 4, max_age_s: float = LISTING_MAX_AGE_S,
                   need: Mapping[int, Spans] | None = None, cost: Any = None) -> Products:
    """The newest ``family`` product of ``release`` for each detector in ``detectors``, in the
    cache (fetched when missing). ``base_url``: the archive's base (IRSA or a simulated archive).
    The listing's answer (products found, or none) is kept beside the files for ``max_age_s``:
    a rerun within it makes no request when the files are cached.

    ``need`` (detector -> row spans [a, b) of the parent grid, e.g.
    :func:`spxframe.fetcher.calib_ranges.rows_needed`) with ``cost`` (a
    :class:`spxframe.planner.cost.CostModel`): for the families of :data:`RANGE_HDUS`, fetch only
    those rows (the ones a partial product lacks) when the model prices them below the whole file.
    Without them every product is fetched whole."""
    cache = CacheDir.of(cache).prepare()
    out = Products(release, family)
    dets = sorted({int(d) for d in detectors})
    if not dets:
        return out
    policy = RetryPolicy(retries=retries)
    session = session or default_session("spxframe-calibration", PARALLEL)
    folder = cache.path(f"cal/{release}/{family}")
    os.makedirs(folder, exist_ok=True)
    names = _names(session, base_url, release, family, folder, policy, max_age_s)
    for det in dets:
        name = names.get(det)
        if name is None:
            out.missing.append(det)
            continue
        path = os.path.join(folder, os.path.basename(name))
        url = f"{base_url}/{spherex.CAL_DATA_PATH}/{release}/{family}/{name}"
        rows = (need or {}).get(det) if family in RANGE_HDUS and cost is not None else None
        nbytes, out.access[det] = _get_product(session, url, path, cache, policy, family=family, rows=rows,
                                               cost=cost)
        out.bytes += nbytes
        out.paths[det] = path
        out.tokens[det] = _NAME_RE.search(name).group(2)
    what = "gain-corrected" if family == spherex.GAIN_FAMILY else f"given {family} values"
    if out.missing and not names:  # e.g. an archive that holds QR2 only
        log.info("the archive lists no %s/%s product: images are not %s", release, family, what)
    elif out.missing:
        log.warning("no %s/%s product for detector(s) %s: those images are not %s", release, family,
                    out.missing, what)
    return out


def estimate_products(detectors, *, cache: CacheDir | str, family: str, release: str,
                      need: Mapping[int, Spans] | None, cost: Any) -> dict[str, float]:
    """What :func:`fetch_products` would move for ``detectors``, predicted without a request:
    ``bytes``, ``requests``, ``seconds`` on ``cost``'s link and ``disk_bytes`` new in the cache,
    whole or by row ranges as it would choose. Uses the listing kept in the cache by an earlier run
    (whatever its age) to see which products exist and which are cached whole or in part; without
    one (a first run into this cache), every detector's product is assumed published and not
    cached: an upper bound. Whole products count ``n`` image planes (:data:`RANGE_HDUS`), one
    request."""
    cache = CacheDir.of(cache)
    out = {"bytes": 0, "requests": 0, "seconds": 0.0, "disk_bytes": 0, "products": 0}
    names: dict[int, str] | None = None  # None: no listing kept, every product assumed published
    try:
        with open(cache.path(f"cal/{release}/{family}/{LISTING_FILE}"), encoding="utf-8") as f:
            names = {int(d): str(n) for d, n in json.load(f)["names"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    n_hdus, whole = len(RANGE_HDUS.get(family, ("",))), whole_bytes(family)
    bw, lat = float(cost.bandwidth_Bps), float(cost.request_s)
    for det in sorted({int(d) for d in detectors}):
        if names is not None and det not in names:
            continue  # the kept listing has no product for it: nothing to fetch
        path = cache.path(f"cal/{release}/{family}/{os.path.basename(names[det])}") if names else None
        have = read_rows_record(path) if path else None
        if path and have is None and cache.is_verified(path, required=("PRIMARY",), cheap=True):
            continue  # cached whole
        rows = (need or {}).get(det) if family in RANGE_HDUS else None
        spans = choose(rows, have or [], n_hdus=n_hdus, cost=cost, whole_bytes=whole) if rows else None
        if spans == []:
            continue  # the partial product holds every row needed
        if spans is None:
            nbytes, requests, seconds = whole, 1, whole / bw + lat
        else:
            nbytes, requests, seconds = _ranges.ranged_cost(spans, fresh=have is None, n_hdus=n_hdus, cost=cost)
        out["bytes"] += nbytes
        out["requests"] += requests
        out["seconds"] += seconds
        out["disk_bytes"] += whole if have is None else 0  # a partial product takes full size (NaN fill)
        out["products"] += 1
    return out
