"""IRSA endpoints and the observations query (TAP through pyvo) → ``schema.OBSERVATIONS``.

:func:`observations` finds every SPHEREx L2 image (one row per ``obs_id``, ``detector``) whose
footprint contains a catalog source, for a whole catalog at once:

* **upload**: the catalog positions go up as ``TAP_UPLOAD.cat`` in chunks of
  ``max_sources_per_query``, joined with the frames whose centre lies within the detector
  half-diagonal (2.46°) + ``edge_margin_px`` of each source; the client then keeps the pairs
  whose footprint (``spxframe.archive.footprint``) holds the source within ``edge_margin_px``. The
  archive's polygons differ from the SIP WCS by up to ~4″, so its own test
  (``CONTAINS(POINT(u.ra, u.dec), p.poly)``, the CONTRACTS.md shape, used when
  ``edge_margin_px=0``) loses sources within a pixel of an edge.
* **regions**: sources are grouped in sky regions (``region_size_deg``); one query per region selects
  frames whose centre lies within the region radius + 2.46° + a margin, and the same client-side
  footprint test makes the matches. Each frame comes back once per region instead of once per
  source: for the 10,000-source benchmark 11 MB of VOTable instead of 639 MB.
* **auto** (default): regions holding >= ``region_threshold`` sources by region, the rest by upload;
  upload refused by the service → regions.

RA wrap and poles need no special case (circle and footprint tests are spherical). Queries run
``workers`` at a time. Positions are propagated by proper motion to :data:`QUERY_EPOCH`.

``collection="spherex_qr2"`` queries both ``spherex_qr2`` and ``spherex_qr2_deep``: deep-field
positions also have wide-survey frames (spec §5.5). Pass a list to choose exactly.

Every query: sync first, async (UWS) when the sync request times out; retries with exponential
backoff + jitter on 5xx, timeouts and connection errors; a result that hits MAXREC
(``OVERFLOW``) is split (half the sources, or half the time range for one source) and re-run.
Rows are de-duplicated. ``observations(..., return_matches=True)`` returns
``(observations, matches)`` where matches has ``source_id`` (text), ``obs_id``, ``detector``;
``spxframe.planner.manifest.plan(..., matches=matches)`` then skips its own spatial search.
"""

from __future__ import annotations

import logging
import time as _time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from spxframe import schema, spherex
from spxframe.archive.footprint import Footprints, unit
from spxframe.archive.tap import _Overflow, _parallel, _Tap
from spxframe.catalog import normalize_catalog
from spxframe.errors import ArchiveError, ArchiveUnreachable, InputError

__all__ = ["Endpoints", "resolve_archive", "observations", "check_query_options"]

log = logging.getLogger("spxframe.archive")
IBE_PREFIX = "ibe/data/spherex/"
MJD_RANGE = (60700.0, 63000.0)  #: mission MJD span used to split a one-source overflow by time


@dataclass(frozen=True)
class Endpoints:
    """Service URLs: ``url`` (IRSA-style base), ``tap_url``, ``sia_url``, ``cloud_url`` (bucket)."""

    url: str
    tap_url: str
    sia_url: str
    cloud_url: str


def resolve_archive(archive: Any = None) -> Endpoints:
    """``None``/``"irsa"`` → IRSA; a base URL string; or an object with ``.url`` (+ ``.cloud_url``)."""
    if archive is None or (isinstance(archive, str) and archive.lower() == "irsa"):
        base, cloud = spherex.IRSA_URL, spherex.CLOUD_URL
    elif isinstance(archive, Endpoints):
        return archive
    elif isinstance(archive, str):
        if not archive.startswith(("http://", "https://")):
            raise InputError(f"archive={archive!r}: expected 'irsa', a http(s):// base URL or a sim archive")
        base = archive.rstrip("/")
        cloud = spherex.CLOUD_URL if base == spherex.IRSA_URL else base + "/" + spherex.CLOUD_BUCKET
    elif hasattr(archive, "url"):
        base = str(archive.url).rstrip("/")
        cloud = str(getattr(archive, "cloud_url", None) or base + "/" + spherex.CLOUD_BUCKET).rstrip("/")
    else:
        raise InputError(f"archive must be None, 'irsa', a base URL or an object with .url, got {archive!r}")
    return Endpoints(base, base + "/TAP", base + "/SIA", cloud)


def _check_bands(bands) -> list[str] | None:
    if bands is None:
        return None
    if isinstance(bands, (str, int)):
        bands = [bands]
    out = []
    for b in bands:
        name = f"D{int(b)}" if isinstance(b, (int, np.integer)) else str(b).upper().replace("SPHEREX-", "")
        if name not in spherex.BANDS:
            raise InputError(f"bands: unknown band {b!r}; expected some of {list(spherex.BANDS)}")
        out.append(name)
    return sorted(set(out))


def _check_time(time) -> tuple[float, float] | None:
    if time is None:
        return None
    try:
        t0, t1 = time
        t0, t1 = (float(t.mjd) if hasattr(t, "mjd") else float(t) for t in (t0, t1))
    except (TypeError, ValueError):
        raise InputError(f"time={time!r}: expected (mjd_start, mjd_end)") from None
    if not (np.isfinite(t0) and np.isfinite(t1)) or t1 < t0:
        raise InputError(f"time=({t0}, {t1}): expected finite MJDs with start <= end")
    return t0, t1


def _check_collections(collection, releases) -> list[str]:
    """The collections to query: every collection of ``releases`` (None: spherex.DEFAULT_RELEASES),
    or the expert override ``collection`` (its ``_deep`` twin added)."""
    if collection is not None and releases is not None:
        raise InputError(f"releases={releases!r} and collection={collection!r}: give one of them "
                         "(collection is an expert override of the releases' collections)")
    if collection is None:
        names = spherex.DEFAULT_RELEASES if releases is None else \
            ((releases,) if isinstance(releases, str) else tuple(releases))
        for n in names:
            r = spherex.RELEASES.get(str(n).lower())
            if r is None:
                raise InputError(f"releases: unknown release {n!r}; expected some of {list(spherex.RELEASES)}")
            if r.format not in spherex.READABLE_FORMATS:
                raise InputError(f"releases: {n!r} files are in the {r.format!r} format, which this version "
                                 f"cannot read yet; readable: {list(spherex.DEFAULT_RELEASES)}")
        return [c for n in names for c in spherex.RELEASES[str(n).lower()].collections]
    cols = [collection] if isinstance(collection, str) else list(collection)
    for c in cols:
        if not isinstance(c, str) or not c.replace("_", "").isalnum():
            raise InputError(f"collection {c!r} is not a collection name (e.g. 'spherex_qr2')")
    if isinstance(collection, str) and not collection.endswith(("_deep", "_cal")):
        cols.append(collection + "_deep")  # spec §5.5: deep frames live in the _deep collection
    return cols


def check_query_options(bands=None, time=None, collection=None, releases=None):
    """Validate bands (→ ``['D1', ...]``), time (→ (mjd0, mjd1)) and releases or collection
    (→ the collections to query); raises :class:`InputError` naming the option."""
    return _check_bands(bands), _check_time(time), _check_collections(collection, releases)


_SELECT = ("o.obs_id, o.obs_publisher_did, o.obs_collection, o.energy_bandpassname, o.t_min, o.t_max, "
           "o.t_exptime, o.em_min, o.em_max, o.s_ra, o.s_dec, o.s_region, a.uri, a.contentlength, "
           "a.contentchecksum")


_EMPTY = {c: (pl.Float64 if c.startswith(("t_", "em_", "s_ra", "s_dec")) else pl.Int64 if c == "contentlength"
              else pl.Utf8) for c in _SELECT.replace("o.", "").replace("a.", "").split(", ")}


def _where(bands, time, cols) -> str:
    w = ["o.obs_collection IN (" + ", ".join(f"'{c}'" for c in cols) + ")"]
    if bands:
        w.append("p.energy_bandpassname IN (" + ", ".join(f"'SPHEREx-{b}'" for b in bands) + ")")
    if time:
        w.append(f"p.time_bounds_upper >= {time[0]!r} AND p.time_bounds_lower <= {time[1]!r}")
    return " AND ".join(w)


def upload_query(bands, time, cols, radius: float | None = None) -> str:
    """Batched ADQL (uploaded table ``cat``: source_id = row index, ra, dec).

    ``radius`` None: CONTRACTS.md's shape, ``CONTAINS(POINT(u.ra, u.dec), p.poly)`` (the archive's
    polygon decides). ``radius`` (deg): frames whose centre lies within it of the source — a
    superset that the client filters by footprint with a pixel margin, so sources within a pixel
    of the edge (where the polygon and the SIP WCS differ by up to ~4″) are not lost.
    """
    on = "1 = CONTAINS(POINT('ICRS', u.ra, u.dec), p.poly)"
    if radius is not None:
        return (f"SELECT u.source_id, {_SELECT} FROM TAP_UPLOAD.cat AS u "
                "JOIN spherex.obscore AS o ON 1 = CONTAINS(POINT('ICRS', o.s_ra, o.s_dec), "
                f"CIRCLE('ICRS', u.ra, u.dec, {radius:.6f})) "
                "JOIN spherex.plane AS p ON p.obs_publisher_did = o.obs_publisher_did "
                "JOIN spherex.artifact AS a ON a.planeid = p.planeid WHERE " + _where(bands, time, cols))
    return (f"SELECT u.source_id, {_SELECT} FROM TAP_UPLOAD.cat AS u "
            f"JOIN spherex.plane AS p ON {on} "
            "JOIN spherex.obscore AS o ON o.obs_publisher_did = p.obs_publisher_did "
            "JOIN spherex.artifact AS a ON a.planeid = p.planeid WHERE " + _where(bands, time, cols))


def region_query(ra: float, dec: float, radius: float, bands, time, cols) -> str:
    """Frames whose centre lies within ``radius`` deg of (ra, dec)."""
    return (f"SELECT {_SELECT} FROM spherex.obscore AS o "
            "JOIN spherex.plane AS p ON o.obs_publisher_did = p.obs_publisher_did "
            "JOIN spherex.artifact AS a ON a.planeid = p.planeid "
            f"WHERE 1 = CONTAINS(POINT('ICRS', o.s_ra, o.s_dec), CIRCLE('ICRS', {ra:.8f}, {dec:.8f}, {radius:.6f})) "
            "AND " + _where(bands, time, cols))


def _split_time(time):
    t0, t1 = time or MJD_RANGE
    mid = 0.5 * (t0 + t1)
    return (t0, mid), (mid, t1)


def _run_upload(tap: _Tap, cat: pl.DataFrame, idx: np.ndarray, bands, time, cols, out: list,
                radius: float | None = None) -> None:
    from astropy.table import Table

    up = Table({"source_id": idx.astype(np.int64), "ra": cat["ra"].to_numpy()[idx],
                "dec": cat["dec"].to_numpy()[idx]})
    try:
        out.append(tap.run(upload_query(bands, time, cols, radius), uploads={"cat": up}))
    except _Overflow:
        if len(idx) > 1:
            log.info("result of %d sources hit MAXREC; splitting", len(idx))
            h = len(idx) // 2
            _run_upload(tap, cat, idx[:h], bands, time, cols, out, radius)
            _run_upload(tap, cat, idx[h:], bands, time, cols, out, radius)
        elif time is None or time[1] - time[0] > 1e-4:
            for t in _split_time(time):
                _run_upload(tap, cat, idx, bands, t, cols, out, radius)
        else:
            raise ArchiveError("one source and a tiny time range still exceed MAXREC", url=tap.url) from None


def _upload_all(tap: _Tap, cat: pl.DataFrame, idx: np.ndarray, chunk: int, workers: int,
                run: Any) -> tuple[list[pl.DataFrame], dict | None]:
    """The upload queries (``run(indices, out)`` per chunk of ``chunk`` sources, ``workers`` at a time).

    Refused (4xx), failed (5xx after retries) or timed out: returns ([], what happened) and says so
    once in the log; the caller queries those sources by sky region instead, for the same
    observations. Chunks not started yet are skipped once one has failed. A connection that cannot
    be made at all raises :class:`ArchiveUnreachable`."""
    parts: list[pl.DataFrame] = []
    failed: list[ArchiveError] = []

    def job(i: np.ndarray) -> None:
        if failed:
            return
        try:
            run(i, parts)
        except ArchiveError as exc:
            if isinstance(exc, ArchiveUnreachable) and not getattr(exc, "timed_out", False):
                raise
            failed.append(exc)

    _parallel(workers, [lambda i=idx[s:s + chunk]: job(i) for s in range(0, len(idx), chunk)])
    if not failed:
        return parts, None
    exc = failed[0]
    log.warning("TAP upload query failed (%s); falling back to sky-region queries for %d source(s)", exc, len(idx))
    return [], {"status": exc.status, "timed_out": bool(getattr(exc, "timed_out", False)), "reason": str(exc)[:300],
                "sources": int(len(idx))}


def _regions(ra: np.ndarray, dec: np.ndarray, size_deg: float) -> np.ndarray:
    """Region label per source: dec strips of ``size_deg``, RA regions of about ``size_deg`` on the sky."""
    strip = np.floor((dec + 90.0) / size_deg).astype(np.int64)
    centre = np.clip(-90.0 + (strip + 0.5) * size_deg, -89.9, 89.9)
    n_ra = np.maximum(1, np.floor(360.0 * np.cos(np.radians(centre)) / size_deg)).astype(np.int64)
    return strip * 100000 + np.floor(ra / 360.0 * n_ra).astype(np.int64) % n_ra


def _run_region(tap: _Tap, ra, dec, bands, time, cols, out: list, size_deg: float) -> None:
    v = unit(ra, dec).sum(axis=0)
    v /= np.linalg.norm(v)
    c_ra, c_dec = np.degrees(np.arctan2(v[1], v[0])) % 360, np.degrees(np.arcsin(np.clip(v[2], -1, 1)))
    r = float(np.degrees(np.arccos(np.clip(unit(ra, dec) @ v, -1, 1))).max())
    try:
        out.append(tap.run(region_query(c_ra, c_dec, r + spherex.FOOTPRINT_RADIUS_DEG + 0.1, bands, time, cols)))
    except _Overflow:
        if len(ra) > 1 and size_deg > 0.05:
            lab = _regions(ra, dec, size_deg / 2)
            for region in np.unique(lab):
                m = lab == region
                _run_region(tap, ra[m], dec[m], bands, time, cols, out, size_deg / 2)
        else:
            for t in _split_time(time):
                _run_region(tap, ra, dec, bands, t, cols, out, size_deg)


def _warn_wide_footprints(obs: pl.DataFrame) -> None:
    """Warn (once per call) when a footprint's corner lies beyond spherex.FOOTPRINT_RADIUS_DEG of its
    centre: the search radius would then miss sources near that frame's corners."""
    if not obs.height:
        return
    reach = Footprints.from_s_region(obs["s_region"].to_list()).radius  # corner distance from the centre, deg
    wide = reach > spherex.FOOTPRINT_RADIUS_DEG
    if wide.any():
        i = int(np.argmax(reach))
        log.warning("%d footprint(s) reach beyond %.2f deg of their centre (largest %.3f deg, %s D%s): sources "
                    "near their corners may be missed by the search radius", int(wide.sum()),
                    spherex.FOOTPRINT_RADIUS_DEG, reach[i], obs["obs_id"][i], obs["detector"][i])


def _finish(rows: pl.DataFrame, ep: Endpoints) -> pl.DataFrame:
    det = rows["energy_bandpassname"].str.extract(r"D(\d)$").cast(pl.Int8)
    df = rows.with_columns(
        det.alias("detector"),
        pl.col("energy_bandpassname").str.extract(r"(D\d)$").alias("band"),
        pl.col("obs_collection").alias("collection"),
        pl.col("obs_collection").replace_strict(_RELEASE_OF, default=None).alias("release"),
        ((pl.col("t_min") + pl.col("t_max")) / 2).alias("mjd_mid"),
        pl.col("t_exptime").alias("exptime"),
        (pl.col("em_min") * 1e6).alias("em_min"), (pl.col("em_max") * 1e6).alias("em_max"),
        (pl.lit(ep.url + "/") + pl.col("uri")).alias("file_url"),
        pl.when(pl.col("uri").str.starts_with(IBE_PREFIX))
        .then(pl.col("uri").str.slice(len(IBE_PREFIX))).otherwise(pl.lit("")).alias("cloud_key"),
        pl.col("contentlength").cast(pl.Int64).alias("size"),
        pl.col("contentchecksum").cast(pl.Utf8).fill_null("").alias("checksum"),
    )
    return schema.conform(df, schema.OBSERVATIONS, extra=False)


#: collection → release name, for every release's collections
_RELEASE_OF = {c: r.name for r in spherex.RELEASES.values() for c in (*r.collections, r.cal_collection)}
_PRECEDENCE = {r.name: r.precedence for r in spherex.RELEASES.values()}


def _newest_release_wins(obs: pl.DataFrame) -> pl.DataFrame:
    """One row per (obs_id, detector): where a later release reprocesses a pair, it wins."""
    prec = pl.col("release").replace_strict(_PRECEDENCE, default=0, return_dtype=pl.Int64)
    return obs.sort(prec, descending=True, maintain_order=True).unique(subset=["obs_id", "detector"], keep="first")


QUERY_EPOCH = 2026.0  #: Julian year the query positions are propagated to (mid-mission)


def _query_positions(cat: pl.DataFrame) -> pl.DataFrame:
    """ra, dec propagated by proper motion to QUERY_EPOCH (unchanged without pmra/pmdec)."""
    if "pmra" not in cat.columns:
        return cat
    dt = QUERY_EPOCH - cat["ref_epoch"].to_numpy()
    dec = np.clip(cat["dec"].to_numpy() + cat["pmdec"].to_numpy() * dt / 3.6e6, -90, 90)
    ra = (cat["ra"].to_numpy() + cat["pmra"].to_numpy() * dt / 3.6e6 / np.maximum(np.cos(np.radians(dec)), 1e-6)) % 360
    return cat.with_columns(pl.Series("ra", ra), pl.Series("dec", dec))


def _filter_pairs(rows: pl.DataFrame, ra: np.ndarray, dec: np.ndarray, ep: Endpoints, margin_px: float):
    """Keep upload rows (source index, frame) whose source lies in the footprint (+ margin)."""
    key = rows.select("obs_id", "energy_bandpassname")
    frames = key.with_row_index("_r").unique(subset=["obs_id", "energy_bandpassname"], keep="first")
    fi = key.join(frames, on=["obs_id", "energy_bandpassname"], how="left")  # row -> first row of frame
    uniq, f_of_row = np.unique(fi["_r"].to_numpy(), return_inverse=True)
    fp = Footprints.from_s_region(rows["s_region"].gather(uniq).to_list())
    si = rows["source_id"].cast(pl.Int64).to_numpy()
    inside, _, _ = fp.contains(si, f_of_row, ra, dec, margin_px=margin_px)
    return rows.filter(pl.Series(inside))


def observations(
    catalog: Any,
    *,
    bands: Sequence[str] | None = None,
    time: tuple | None = None,
    releases: str | Sequence[str] | None = None,
    collection: str | Sequence[str] | None = None,
    archive: Any = None,
    strategy: str = "auto",
    max_sources_per_query: int = 500,
    maxrec: int = 1_000_000,
    region_size_deg: float = 2.0,
    region_threshold: int = 8,
    edge_margin_px: float = 2.0,
    timeout: float = 120.0,
    retries: int = 4,
    backoff: float = 0.5,
    mode: str = "auto",
    workers: int = 4,
    return_matches: bool = False,
    report: dict | None = None,
):
    """Every SPHEREx L2 (obs_id, detector) covering a catalog source (see the module docstring).

    Parameters: ``bands`` e.g. ``['D1', 'D2']``; ``time`` (mjd0, mjd1) or astropy Times
    (MJD UTC, overlap test); ``releases`` e.g. ``("qr2",)`` (None: every release this version
    reads, :data:`spxframe.spherex.DEFAULT_RELEASES`; a row's release comes from its collection and
    the newest release wins where two hold the same obs_id and detector); ``collection`` an expert
    override naming collections instead (not with ``releases``); ``archive`` (None = IRSA, URL, or sim object);
    ``strategy``: ``"upload"`` (TAP_UPLOAD chunks), ``"regions"`` (one query per sky region) or
    ``"auto"``: regions holding >= ``region_threshold`` sources are queried by region (each frame
    comes back once instead of once per source), the others are uploaded;
    ``edge_margin_px``: keep sources up to this far (px) outside a footprint polygon (0: trust the
    archive's polygon test, the CONTRACTS.md query shape); ``max_sources_per_query`` upload chunk
    size; ``maxrec`` rows per query before splitting;
    ``region_size_deg`` sky-region size (deg); ``timeout`` seconds per HTTP request; ``retries``
    per query; ``backoff`` first retry delay (s); ``mode`` ``"auto"`` (sync, switching to async
    UWS jobs after a sync timeout), ``"sync"`` or ``"async"``; ``workers`` concurrent TAP queries.
    Positions are propagated by proper motion (when given) to :data:`QUERY_EPOCH` for the query.
    ``report``: a dict to fill with what the query did (for ``run.json``): ``strategy``,
    ``sources_by_upload``, ``sources_by_region``, ``tap_queries`` and ``upload_fallback`` (None, or
    ``{"status": HTTP status or None, "timed_out": bool, "reason": text, "sources": n}`` when the
    service refused or failed the uploads and sky-region queries replaced them, said once in the log).

    Returns a Polars DataFrame in ``schema.OBSERVATIONS`` (em_* in µm, one row per obs_id,
    detector, sorted by mjd_mid), or ``(observations, matches)`` when ``return_matches``.
    Raises InputError (before any traffic), ArchiveUnreachable, ArchiveError.
    """
    cat = normalize_catalog(catalog)
    bands, time, cols = check_query_options(bands, time, collection, releases)
    if strategy not in ("auto", "upload", "regions"):
        raise InputError(f"strategy={strategy!r}: expected 'auto', 'upload' or 'regions'")
    if mode not in ("auto", "sync", "async"):
        raise InputError(f"mode={mode!r}: expected 'auto', 'sync' or 'async'")
    if max_sources_per_query < 1 or maxrec < 1 or not region_size_deg > 0:
        raise InputError("max_sources_per_query, maxrec and region_size_deg must be positive")
    ep = resolve_archive(archive)
    tap = _Tap(ep.tap_url, timeout=timeout, retries=retries, maxrec=maxrec, backoff=backoff)
    tap.use_async, tap.allow_async = mode == "async", mode != "sync"
    t0 = _time.perf_counter()
    pcat = _query_positions(cat)
    ra, dec = pcat["ra"].to_numpy(), pcat["dec"].to_numpy()
    lab = _regions(ra, dec, region_size_deg)
    _, inv, counts = np.unique(lab, return_inverse=True, return_counts=True)
    dense = {"regions": np.ones(len(ra), bool), "upload": np.zeros(len(ra), bool),
             "auto": counts[inv] >= region_threshold}[strategy]
    up_parts: list[pl.DataFrame] = []
    region_parts: list[pl.DataFrame] = []
    up_idx = np.flatnonzero(~dense)
    radius = None if edge_margin_px <= 0 else \
        spherex.FOOTPRINT_RADIUS_DEG + edge_margin_px * spherex.PIXEL_SCALE_ARCSEC / 3600.0
    up_parts, fallback = _upload_all(tap, pcat, up_idx, max_sources_per_query, workers,
                                     lambda i, out: _run_upload(tap, pcat, i, bands, time, cols, out, radius))
    if fallback is not None:
        dense = np.ones(len(ra), bool)
    _parallel(workers, [lambda m=dense & (lab == region): _run_region(tap, ra[m], dec[m], bands, time, cols,
                                                                      region_parts, region_size_deg)
                        for region in np.unique(lab[dense])])
    ids = cat["source_id"]  # the catalog's dtype, kept
    up_parts = [p for p in up_parts if p.height]
    if radius is not None and up_parts:
        up_parts = [_filter_pairs(pl.concat(up_parts, how="vertical_relaxed"), ra, dec, ep, edge_margin_px)]
    m_parts = [pl.DataFrame({"source_id": ids.gather(p["source_id"].cast(pl.Int64)), "obs_id": p["obs_id"],
                             "detector": p["energy_bandpassname"].str.extract(r"D(\d)$").cast(pl.Int8)})
               for p in up_parts if p.height]
    parts = [p.drop("source_id", strict=False) for p in up_parts if p.height]
    if any(p.height for p in region_parts):
        # sky regions return every frame near the region: keep those whose footprint holds a source
        region_rows = pl.concat([p for p in region_parts if p.height], how="vertical_relaxed")
        region_obs = _finish(region_rows, ep).with_row_index("_r").unique(subset=["obs_id", "detector"], keep="first")
        didx = np.flatnonzero(dense)
        fp = Footprints.from_s_region(region_obs["s_region"].to_list())
        si, fi = fp.candidates(ra[didx], dec[didx])
        inside, _, _ = fp.contains(si, fi, ra[didx], dec[didx], margin_px=edge_margin_px)
        si, fi = didx[si[inside]], fi[inside]
        m_parts.append(pl.DataFrame({"source_id": ids.gather(si), "obs_id": region_obs["obs_id"].gather(fi),
                                     "detector": region_obs["detector"].gather(fi)}))
        parts.append(region_rows[np.unique(region_obs["_r"].to_numpy()[fi])])
    rows = pl.concat(parts, how="vertical_relaxed") if parts else pl.DataFrame(schema=_EMPTY)
    obs = _newest_release_wins(_finish(rows, ep)).sort(["mjd_mid", "obs_id", "detector"])
    _warn_wide_footprints(obs)
    log.info("observations: %d sources (%d by upload, %d by sky region), %d TAP queries, %d rows, %d images in %.2f s",
             cat.height, len(up_idx) if up_parts else 0, int(dense.sum()), tap.queries, rows.height, obs.height,
             _time.perf_counter() - t0)
    if report is not None:
        report.update(strategy=strategy, sources_by_upload=0 if fallback else len(up_idx),
                      sources_by_region=int(dense.sum()), upload_fallback=fallback, tap_queries=tap.queries)
    if not return_matches:
        return obs
    matches = pl.concat(m_parts, how="vertical_relaxed") if m_parts else \
        pl.DataFrame(schema={"source_id": ids.dtype, "obs_id": pl.Utf8, "detector": pl.Int8})
    return obs, matches.unique(maintain_order=True)
