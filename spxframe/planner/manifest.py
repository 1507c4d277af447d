"""catalog × observations → manifest: which pixels to fetch, and how (the access cost model).

:func:`plan` makes one manifest row per (source, obs_id, detector) whose footprint contains the
source (within ``margin_px`` of the edge: measure() decides on the edge cases). The parent
pixel comes from the footprint polygon (``spxframe.archive.footprint``: exact for TAN, a few px with SIP),
so the planned boxes are predictions; fetch re-derives exact boxes and offsets from the files.

Access methods (CONTRACTS.md), chosen per image by predicted time = bytes / bandwidth +
request latency spread over the requests in flight + cutouts × IBE server time over the cutouts
IRSA serves at once (:class:`CostModel`, its defaults and their sources in
:mod:`spxframe.planner.cost`; ``CostModel.for_link`` for a known or measured link):

* ``cutout``: ``file_url?center=<ra>,<dec>&size=<nx>,<ny>px&gzip=false``; one request per source,
  or one *shared* cutout covering several sources of an image when cheaper. Bytes follow
  spec §3.8: 38 header blocks + 4 planes of the box + 4,939,200 (PSF) + 2,880 (WCS-WAVE).
* ``range``: cloud object URL + JSON ``[start, stop)`` byte ranges under the nominal QR2 layout
  (:data:`LAYOUT`): all header blocks, the WCS-WAVE HDU, and of IMAGE, FLAGS, VARIANCE and ZODI
  either the box rows at full 2040-px width, coalesced across the image's sources (``max_gap``
  = ``gap_rows`` rows: few requests, more bytes), or only the boxes' own columns, one range per
  box row per plane (``max_gap`` 0: few bytes, many concurrent requests, at most
  ``CostModel.max_range_requests`` per image) — whichever the link makes quicker. The PSF cube
  (4,939,200 bytes at :data:`LAYOUT` ``['PSF'][1]``) is *not* in ``ranges``: fetch reads it once
  per ``psf_key``; the first range request of each psf_key carries its bytes in predicted_bytes.
* ``full``: the IBE file URL, 71,634,240 bytes, box = the whole detector.

R7 (QR3) images — a row's format comes from its release (``observations.release``,
``spherex.RELEASES``) — are planned like QR2 images, with estimates for their bytes
(``spherex.R7_FLAGS_ROW_BYTES_EST`` per compressed FLAGS row: FLAGS come in full-width one-row
tiles, so even a box-column read takes whole FLAGS rows; ``R7_EPSF_BYTES_EST`` for the EPSF
table, ``R7_FULL_FILE_BYTES_EST``); fetch records in ``bytes`` what was actually moved.

``request_id`` groups rows served by one transfer; ``predicted_bytes`` is that transfer's size
on every row of it (sum over unique request_id for totals).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from spxframe import schema
from spxframe.archive.footprint import Footprints
from spxframe.archive.query import resolve_archive
from spxframe.catalog import normalize_catalog
from spxframe.errors import InputError
from spxframe.planner.cost import LAYOUT_ROUNDS, CostModel
from spxframe.planner.rows import build_rows
from spxframe.sizes import MEASUREMENT_R_OUT_PX, CutoutSize, measurement_size, parse_cutout_center, parse_cutout_size

__all__ = ["plan", "Plan", "summarize"]

log = logging.getLogger("spxframe.plan")


@dataclass
class Plan:
    """``manifest`` (schema.MANIFEST), ``summary`` (per access method: images, rows, requests,
    predicted bytes and seconds), and the options used."""

    manifest: pl.DataFrame
    summary: pl.DataFrame
    cutout_size: CutoutSize | None = None
    access: str = "auto"
    options: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        m = self.manifest
        lines = [f"Plan: {m['source_id'].n_unique() if m.height else 0} sources, {m.height} rows, "
                 f"{m.select(pl.struct('obs_id', 'detector').n_unique()).item() if m.height else 0} images, "
                 f"cutout_size={self.cutout_size}, access={self.access!r}"]
        for r in self.summary.iter_rows(named=True):
            lines.append(f"  {r['access']:<7} images={r['images']:>7} rows={r['rows']:>8} requests={r['requests']:>8} "
                         f"bytes={r['predicted_bytes'] / 1e6:>11.1f} MB  ~{r['predicted_seconds']:.0f} s")
        return "\n".join(lines)


def _observations_arg(observations: Any, matches: Any):
    if isinstance(observations, tuple) and len(observations) == 2:
        observations, matches = observations
    if not isinstance(observations, pl.DataFrame):
        try:
            observations = pl.from_pandas(observations) if hasattr(observations, "iloc") else pl.DataFrame(observations)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"observations must be a Polars DataFrame (spxframe.observations()), got "
                             f"{type(observations).__name__}") from exc
    need = [c for c in ("obs_id", "detector", "s_region", "file_url") if c not in observations.columns]
    if need:
        raise InputError(f"observations table has no column(s) {need}; use spxframe.observations()")
    return schema.conform(observations, schema.OBSERVATIONS, extra=False), matches


def _pairs(cat: pl.DataFrame, obs: pl.DataFrame, fp: Footprints, matches, margin_px: float):
    ra, dec = cat["ra"].to_numpy(), cat["dec"].to_numpy()
    if matches is not None:
        key = obs.select("obs_id", "detector").with_row_index("_fi")
        id_dtype = cat.schema["source_id"]
        m = (matches.select(pl.col("source_id").cast(id_dtype, strict=False), "obs_id",
                            pl.col("detector").cast(pl.Int8))
             .join(cat.select("source_id").with_row_index("_si"), on="source_id")
             .join(key, on=["obs_id", "detector"]).unique(["_si", "_fi"]))
        si, fi = m["_si"].to_numpy().astype(np.int64), m["_fi"].to_numpy().astype(np.int64)
    else:
        si, fi = fp.candidates(ra, dec)
    if "pmra" in cat.columns:  # propagate proper motion to mid-exposure
        dt = (obs["mjd_mid"].to_numpy()[fi] - (51544.5 + (cat["ref_epoch"].to_numpy()[si] - 2000.0) * 365.25)) / 365.25
        d = dec[si] + np.nan_to_num(cat["pmdec"].to_numpy()[si] * dt / 3.6e6)
        r = ra[si] + np.nan_to_num(cat["pmra"].to_numpy()[si] * dt / 3.6e6 / np.cos(np.radians(dec[si])))
        ra_p, dec_p = r % 360.0, np.clip(d, -90, 90)
    else:
        ra_p, dec_p = ra[si], dec[si]
    inside, x, y = fp.contains(np.arange(len(si)), fi, ra_p, dec_p, margin_px=margin_px)
    return si[inside], fi[inside], ra_p[inside], dec_p[inside], x[inside], y[inside]


def plan(
    catalog: Any,
    observations: Any,
    *,
    cutout_size: str | int | CutoutSize | None = "200px",
    cutout_center: str | None = None,
    access: str = "auto",
    archive: Any = None,
    matches: pl.DataFrame | None = None,
    margin_px: float = 2.0,
    cost: CostModel | None = None,
    image_access: pl.DataFrame | None = None,
    annulus_r_out: float = MEASUREMENT_R_OUT_PX,
) -> Plan:
    """Plan the transfers for every (source, obs_id, detector) pair; no network traffic.

    ``catalog`` as :func:`spxframe.catalog.normalize_catalog`; ``observations`` from
    :func:`spxframe.archive.observations` (or its ``(observations, matches)`` tuple);
    ``cutout_size`` IRSA grammar, or None: only what the measurement needs, the photometry stamp
    (aperture and background annulus) with a small margin (:func:`spxframe.sizes.measurement_size`,
    25 × 25 px), for photometry rather than cutouts; ``cutout_center`` ``"ra,dec"`` or
    ``"x,ypx"`` (zero-based parent pixels) instead of each source's position; ``access``
    ``auto|cutout|range|full`` (``full``: whole images, whatever the size); ``cost`` the
    link the choice assumes (:class:`CostModel`: defaults, ``CostModel.for_link(...)`` or
    :func:`spxframe.planner.cost.load_link` of a cache folder); ``archive`` only for the cloud
    URL; ``matches`` candidate (source_id, obs_id, detector) pairs; ``margin_px`` keep sources
    this far outside the edge;
    ``image_access`` (obs_id, detector, access) fixes the access of those images under ``auto``
    (e.g. to keep the choices of an earlier plan; also a method: ``shared``, ``columns``, ``rows``);
    ``annulus_r_out`` the outer background radius (px) the measurement's box must hold when
    ``cutout_size`` is None (``measure()``'s default annulus is (5, 9) px).
    """
    cat = normalize_catalog(catalog)
    if access not in ("auto", "cutout", "range", "full"):
        raise InputError(f"access={access!r}: expected one of 'auto', 'cutout', 'range', 'full'")
    try:
        size = measurement_size(r_out=annulus_r_out) if cutout_size is None else parse_cutout_size(cutout_size)
        center = None if cutout_center is None else parse_cutout_center(cutout_center)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    obs, matches = _observations_arg(observations, matches)
    ep = resolve_archive(archive)
    cost = cost or CostModel()
    fp = Footprints.from_s_region(obs["s_region"].to_list()) if obs.height else Footprints(np.zeros((0, 4, 2)))
    si, fi, ra, dec, x, y = _pairs(cat, obs, fp, matches, margin_px)
    forced = None
    if image_access is not None and access == "auto" and obs.height:
        ia = image_access.select("obs_id", pl.col("detector").cast(obs.schema["detector"]), "access") \
            .unique(["obs_id", "detector"], keep="first")
        forced = obs.select("obs_id", "detector").with_row_index("_r").join(ia, on=["obs_id", "detector"], how="left") \
            .sort("_r").get_column("access").fill_null("").to_numpy()
    manifest = build_rows(cat, obs, fp, si, fi, ra, dec, x, y, size=None if access == "full" else size,
                          center=center, access=access,
                          cloud_url=ep.cloud_url, cost=cost, forced=forced)
    manifest = schema.conform(manifest, schema.MANIFEST, extra=False).sort(["obs_id", "detector", "source_id"])
    n_clip = int(manifest["clipped"].sum()) if manifest.height else 0
    if n_clip:
        log.info("%d planned boxes are clipped at the detector edge", n_clip)
    summary = summarize(manifest, cost)
    log.info("plan: %d rows; %s", manifest.height, dict(zip(summary["access"], summary["predicted_bytes"])))
    return Plan(manifest, summary, size, access, {"cutout_center": str(center) if center else None,
                                                  "margin_px": margin_px, "cost": cost,
                                                  "measurement_box": cutout_size is None})


def summarize(manifest: pl.DataFrame, cost: CostModel | None = None) -> pl.DataFrame:
    """Per access method: images, rows, requests, predicted_bytes (unique request_id), and
    predicted_seconds on ``cost``'s link with the fetcher's concurrency (:meth:`CostModel.wall`)."""
    cost = cost or CostModel()
    req = manifest.filter(pl.col("status") == "planned").group_by("request_id").agg(
        pl.first("access"), pl.first("predicted_bytes"), pl.first("ranges"))
    n_http = req.with_columns(pl.when(pl.col("access") == "range")
                              .then(pl.col("ranges").str.count_matches(r"\[\d").cast(pl.Int64))
                              .otherwise(1).alias("http"))
    rows = manifest.group_by("access").agg(pl.len().alias("rows"),
                                          pl.struct("obs_id", "detector").n_unique().alias("images"))
    per = n_http.group_by("access").agg(pl.col("http").sum().alias("requests"),
                                        pl.col("predicted_bytes").sum().alias("predicted_bytes"),
                                        pl.len().alias("_transfers"))
    out = rows.join(per, on="access", how="left").fill_null(0)
    secs = [float(cost.wall(a, b, r, LAYOUT_ROUNDS * t if a == "range" else 0)) for a, b, r, t in
            out.select("access", "predicted_bytes", "requests", "_transfers").iter_rows()]
    return out.with_columns(pl.Series("predicted_seconds", secs, pl.Float64)).drop("_transfers") \
        .select("access", "images", "rows", "requests", "predicted_bytes", "predicted_seconds").sort("access")
