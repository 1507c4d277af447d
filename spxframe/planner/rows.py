"""Manifest rows for :func:`spxframe.planner.manifest.plan`: boxes, per-image access choice, URLs and ranges.

Internal (owner: client-plan). All arrays are per (source, image) pair; pixels zero-based.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import urlencode

import numpy as np
import polars as pl

from spxframe import schema, spherex
from spxframe.archive.footprint import Footprints
from spxframe.planner.cost import (
    LAYOUT_BYTES,
    LAYOUT_REQUESTS,
    LAYOUT_ROUNDS,
    NPIX,
    PSF_BYTES,
    ROW,
    CostModel,
    box_of,
    column_requests,
    cutout_bytes,
    full_bytes,
    range_requests,
)
from spxframe.sizes import CutoutCenter, CutoutSize

log = logging.getLogger("spxframe.plan")
#: per-image methods: IBE cutout per source, one shared IBE cutout, cloud ranges of the boxes'
#: columns, cloud ranges of full-width rows, the whole file
METHODS = ("cutout", "shared", "columns", "rows", "full")
#: an image's access fixed by ``image_access`` → the METHODS (indices) it allows: a manifest access
#: ("cutout", "range", "full") or a method ("shared", "columns", "rows"; each falls back to a
#: per-source cutout / full-width rows where it cannot serve the image)
FORCED: dict[str, list[int]] = {"cutout": [0, 1], "range": [2, 3], "full": [4], "shared": [1], "columns": [2],
                                "rows": [3]}
EDGE_PAD = 8  #: px a shared cutout is requested beyond a detector edge it touches


def cutout_url(file_url: str, ra: float, dec: float, nx: int, ny: int) -> str:
    """IBE cutout URL: ``file_url?center=<ra>,<dec>&size=<nx>,<ny>px&gzip=false`` (query encoded)."""
    q = urlencode({"center": f"{ra:.7f},{dec:.7f}", "size": f"{int(nx)},{int(ny)}px", "gzip": "false"})
    return f"{file_url}?{q}"


def _choose(df: pl.DataFrame, access: str, cost: CostModel, forced: np.ndarray | None = None) -> pl.DataFrame:
    """Per image (``_fi``): the quickest allowed method (:data:`METHODS`) on the model's link.

    ``columns`` (range reads of the boxes' own columns: one request per box row per plane) and
    ``rows`` (full-width rows) are both ``access="range"``; ``columns`` is allowed up to
    ``cost.max_range_requests`` requests per image. R7 (QR3) FLAGS are compressed in full-width
    one-row tiles, so their rows are read whole either way. ``forced`` (per observation row, or
    None): an access already decided for the image ("full", "range" or "cutout"; "" = free),
    e.g. by a plan of the whole catalog, so that the sky cells sharing an image fetch it the
    same way."""
    g = (df.sort(["_fi", "y0"])
         .with_columns(pl.col("y1").cum_max().shift(1).over("_fi").alias("_prev"))
         .with_columns(
             (pl.col("y1") - pl.max_horizontal("y0", pl.col("_prev").fill_null(-1))).clip(0, None).alias("_cov"),
             (pl.col("_prev").is_null() | (pl.col("y0") > pl.col("_prev") + cost.gap_rows)).alias("_new"))
         .group_by("_fi").agg(
             pl.len().alias("k"), pl.col("_cb").sum().alias("each_bytes"),
             pl.col("x0").min().alias("bx0"), pl.col("x1").max().alias("bx1"),
             pl.col("y0").min().alias("by0"), pl.col("y1").max().alias("by1"),
             pl.col("_cov").sum().alias("rows"), pl.col("_new").sum().alias("spans"),
             ((pl.col("x1") - pl.col("x0")) * (pl.col("y1") - pl.col("y0"))).sum().alias("colpix"),
             (pl.col("y1") - pl.col("y0")).sum().alias("colrows"),
             pl.first("_cloud"), pl.first("_psf"), pl.first("_r7")))
    n_key = g.filter("_cloud").group_by("_psf").agg(pl.len().alias("_nk"))
    g = g.join(n_key, on="_psf", how="left").with_columns(pl.col("_nk").fill_null(1),
                                                          pl.len().over("_psf").alias("_nkc"))
    base, over_cap = _method_seconds(g, cost)
    c = base.copy()
    c[over_cap, 2] = np.inf  # box columns beyond cost.max_range_requests: only when forced
    if forced is not None and len(c):
        f = forced[g["_fi"].to_numpy()]
        for value, keep in FORCED.items():
            sel = f == value
            if sel.any():
                c[sel] = np.inf
                c[np.ix_(sel, keep)] = base[np.ix_(sel, keep)]
                if value != "columns":
                    c[sel & over_cap, 2] = np.inf
                if value in ("shared", "columns"):  # one source / no cloud copy: the next best
                    alt = sel & ~np.isfinite(base[:, keep[0]])
                    c[alt, 0 if value == "shared" else 3] = base[alt, 0 if value == "shared" else 3]
    if access == "cutout":
        c[:, 2:] = np.inf
    elif access == "full":
        c[:, :4] = np.inf
    elif access == "range":  # images without a cloud copy fall back to the best cutout
        cloud = g["_cloud"].to_numpy()
        c[cloud, 0:2] = np.inf
        c[:, 4] = np.inf
        if (~cloud).any():
            log.warning("%d image(s) have no cloud copy (empty cloud_key): planned as cutouts", int((~cloud).sum()))
    return g.with_columns(pl.Series("method", np.array(METHODS)[np.argmin(c, axis=1)]))


def _method_seconds(g: pl.DataFrame, cost: CostModel) -> tuple[np.ndarray, np.ndarray]:
    """Predicted seconds (images × :data:`METHODS`) of each image's transfers and cache writes,
    inf where a method is not possible (no cloud copy; a shared cutout of one source); and per
    image whether box columns would take more than ``cost.max_range_requests`` requests."""
    k = g["k"].to_numpy()
    r7 = g["_r7"].to_numpy()  # R7 (QR3): three float planes, FLAGS compressed rows, an EPSF table
    cloud = g["_cloud"].to_numpy()
    shared_bytes = cutout_bytes(g["bx1"].to_numpy() - g["bx0"].to_numpy(), g["by1"].to_numpy() - g["by0"].to_numpy(),
                                r7, 1.0 / g["_nkc"].to_numpy())  # R7: the EPSF table once per psf_key
    rows, colpix, colrows = g["rows"].to_numpy(), g["colpix"].to_numpy(), g["colrows"].to_numpy()
    psf = np.where(r7, spherex.R7_EPSF_BYTES_EST, PSF_BYTES) / g["_nk"].to_numpy()  # once per psf_key
    flags_rows = rows * spherex.R7_FLAGS_ROW_BYTES_EST  # R7 FLAGS: whole compressed row tiles
    rows_bytes = LAYOUT_BYTES + psf + np.where(r7, 3 * rows * ROW + flags_rows, 4 * rows * ROW)
    rows_req = 4 * g["spans"].to_numpy()
    col_bytes = LAYOUT_BYTES + psf + np.where(r7, 3 * 4 * colpix + flags_rows, 4 * 4 * colpix)
    col_req = np.where(r7, 3 * colrows + 2, 4 * colrows)  # R7: + tile descriptors and heap
    each = g["each_bytes"].to_numpy()
    box_files = cost.local(each - k * PSF_BYTES, k)  # range reads write one box file per source, no PSF data
    full = full_bytes(r7)
    return np.stack([
        cost.wall("cutout", each, k) + cost.local(each, k),
        np.where(k > 1, cost.wall("cutout", shared_bytes, 1) + cost.local(shared_bytes, 1), np.inf),
        np.where(cloud, cost.wall("range", col_bytes, col_req + LAYOUT_REQUESTS, LAYOUT_ROUNDS) + box_files, np.inf),
        np.where(cloud, cost.wall("range", rows_bytes, rows_req + LAYOUT_REQUESTS, LAYOUT_ROUNDS) + box_files, np.inf),
        cost.wall("full", full, 1) + cost.local(full, 1)], axis=1), col_req + LAYOUT_REQUESTS > cost.max_range_requests


def build_rows(cat, obs, fp: Footprints, si, fi, ra, dec, x, y, *, size: CutoutSize | None,
               center: CutoutCenter | None, access: str, cloud_url: str, cost: CostModel,
               forced: np.ndarray | None = None) -> pl.DataFrame:
    """The manifest rows (MANIFEST columns; conform/sort done by the caller)."""
    n = len(si)
    o = obs[fi.tolist()] if n else obs.clear()
    base = pl.DataFrame({
        "source_id": cat["source_id"].gather(si) if n else cat["source_id"].clear(),
        "obs_id": o["obs_id"], "detector": o["detector"], "band": o["band"],
        "ra": ra, "dec": dec, "x_parent": x, "y_parent": y, "_fi": fi,
        "_file": o["file_url"], "_ckey": o["cloud_key"].fill_null(""),
        "_r7": _is_r7(o["release"]),
    })
    base = base.with_columns((pl.lit("D") + pl.col("detector").cast(pl.Utf8) + pl.lit("_")
                              + pl.col("_file").str.extract(spherex.PROCESSING_VERSION_RE.pattern))
                             .alias("psf_key"))
    if n == 0:
        return base
    if size is None:
        return _full(base, cloud_url)
    nx, ny = size.pixels()
    if center is None:
        cx, cy, cra, cdec = x, y, ra, dec
    elif center.pixel:
        cx, cy = np.full(n, center.x), np.full(n, center.y)
        cra, cdec = fp.pixel_to_sky(fi, cx, cy)
    else:
        cra, cdec = np.full(n, center.ra), np.full(n, center.dec)
        cx, cy = fp.sky_to_pixel(fi, cra, cdec)
    bx0, by0 = box_of(np.nan_to_num(cx, nan=-1e9), nx), box_of(np.nan_to_num(cy, nan=-1e9), ny)
    x0, x1 = np.clip(bx0, 0, NPIX), np.clip(bx0 + nx, 0, NPIX)
    y0, y1 = np.clip(by0, 0, NPIX), np.clip(by0 + ny, 0, NPIX)
    ok = (x1 > x0) & (y1 > y0) & np.isfinite(cx) & np.isfinite(cy)
    base = base.with_columns(
        pl.Series("x0", x0), pl.Series("x1", x1), pl.Series("y0", y0), pl.Series("y1", y1),
        pl.Series("_cra", cra), pl.Series("_cdec", cdec), pl.Series("_ok", ok),
        pl.Series("clipped", (x1 - x0 != nx) | (y1 - y0 != ny)),
        pl.Series("_cb", cutout_bytes(x1 - x0, y1 - y0, base["_r7"].to_numpy(), _epsf_share(base, pl.len()))),
        (pl.col("_ckey") != "").alias("_cloud"), pl.col("psf_key").alias("_psf"))
    bad = base.filter(~pl.col("_ok")).with_columns(
        pl.lit("cutout").alias("access"), pl.lit("failed").alias("status"),
        pl.lit(0, pl.Int64).alias("predicted_bytes"),
        pl.lit("cutout box does not overlap the detector (cutout_center off this image)").alias("error"))
    good = base.filter(pl.col("_ok"))
    choice = _choose(good, access, cost, forced)
    good = good.join(choice.select("_fi", "method", "bx0", "bx1", "by0", "by1"), on="_fi")
    parts = [_cutouts(good.filter(pl.col("method") == "cutout"), nx, ny),
             _shared(good.filter(pl.col("method") == "shared"), fp),
             _ranges(good.filter(pl.col("method").is_in(["columns", "rows"])), cloud_url, cost),
             _full(good.filter(pl.col("method") == "full"), cloud_url), bad]
    return pl.concat([schema.conform(p, schema.MANIFEST, extra=False) for p in parts], how="vertical_relaxed")


def _epsf_share(df: pl.DataFrame, cutouts: pl.Expr) -> np.ndarray:
    """Per row, the share of its detector and version's EPSF table one R7 cutout carries: 1 over
    ``cutouts`` (their count) per ``psf_key``; the fetch moves the table once per key."""
    return 1.0 / df.select(cutouts.over("psf_key").alias("n"))["n"].to_numpy()


def _is_r7(release: pl.Series) -> pl.Series:
    """Per row, whether its release's files are in the R7 format (decided once per distinct release)."""
    names = release.cast(pl.Utf8).fill_null("")
    r7 = {r: spherex.format_of(r) == "r7" for r in names.unique().to_list()}
    return names.replace_strict(r7, return_dtype=pl.Boolean)


def _image_prefix() -> pl.Expr:
    return pl.col("obs_id") + pl.lit("D") + pl.col("detector").cast(pl.Utf8)


def _box_cols(x0, y0, nx, ny) -> list[pl.Expr]:
    return [x0.alias("box_x0"), y0.alias("box_y0"), nx.alias("box_nx"), ny.alias("box_ny")]


def _cutouts(df: pl.DataFrame, nx: int, ny: int) -> pl.DataFrame:
    urls = [cutout_url(f, r, d, nx, ny) for f, r, d in zip(df["_file"], df["_cra"], df["_cdec"])]
    return df.with_columns(
        pl.lit("cutout").alias("access"), pl.Series("url", urls, dtype=pl.Utf8),
        (_image_prefix() + pl.lit(":cutout:") + pl.col("source_id").cast(pl.Utf8)).alias("request_id"),
        *_box_cols(pl.col("x0"), pl.col("y0"), pl.col("x1") - pl.col("x0"), pl.col("y1") - pl.col("y0")),
        pl.col("_cb").alias("predicted_bytes"), pl.lit("").alias("ranges"), pl.lit("planned").alias("status"))


def _shared(df: pl.DataFrame, fp: Footprints) -> pl.DataFrame:
    """One cutout per image covering all its boxes. Sides that touch the detector edge are
    requested ``EDGE_PAD`` px beyond it, so the server's clipping (not our few-px-approximate
    centre) fixes them; such boxes are marked ``clipped``."""
    if df.height == 0:
        return df
    req, clip = [], np.zeros(df.height, bool)
    for lo, hi in (("bx0", "bx1"), ("by0", "by1")):
        a, b = df[lo].to_numpy(), df[hi].to_numpy()
        # a side at a detector edge (both edges: the whole side) is requested EDGE_PAD px beyond
        # it, so our few-px-approximate centre never cuts real pixels off; the server clips
        pa = np.where(a == 0, EDGE_PAD, 0)
        pb = np.where(b == NPIX, EDGE_PAD, 0)
        n = b - a + pa + pb
        req.append((a - pa + (n - 1) / 2, n))  # box_of(centre, n) == a - pa
        clip |= (pa > 0) | (pb > 0)
    (cx, bw), (cy, bh) = req
    cra, cdec = fp.pixel_to_sky(df["_fi"].to_numpy(), cx, cy)
    urls = [cutout_url(f, r, d, w, h) for f, r, d, w, h in zip(df["_file"], cra, cdec, bw, bh)]
    return df.with_columns(
        pl.lit("cutout").alias("access"), pl.Series("url", urls, dtype=pl.Utf8),
        (_image_prefix() + pl.lit(":cutout:shared")).alias("request_id"),
        *_box_cols(pl.col("bx0"), pl.col("by0"), pl.col("bx1") - pl.col("bx0"), pl.col("by1") - pl.col("by0")),
        pl.Series("clipped", clip),
        pl.Series("predicted_bytes",
                  cutout_bytes((df["bx1"] - df["bx0"]).to_numpy(), (df["by1"] - df["by0"]).to_numpy(),
                               df["_r7"].to_numpy(), _epsf_share(df, pl.col("_fi").n_unique()))),
        pl.lit("").alias("ranges"), pl.lit("planned").alias("status"))


def _ranges(df: pl.DataFrame, cloud_url: str, cost: CostModel) -> pl.DataFrame:
    if df.height == 0:
        return df
    per = df.group_by("_fi", maintain_order=True).agg(pl.col("x0"), pl.col("x1"), pl.col("y0"), pl.col("y1"),
                                                      pl.first("psf_key"), pl.first("method"))
    seen: set[str] = set()
    rng, nbytes, gaps = [], [], []
    for x0s, x1s, y0s, y1s, key, method in per.select("x0", "x1", "y0", "y1", "psf_key", "method").iter_rows():
        if method == "columns":  # the boxes' own columns: touching ranges only are merged
            r, gap = column_requests(list(zip(x0s, x1s, y0s, y1s))), 0
        else:  # full-width rows: box rows fewer than gap_rows apart are one range
            r, gap = range_requests(list(zip(y0s, y1s)), cost.gap_rows), cost.gap_rows * ROW
        rng.append(json.dumps(r, separators=(",", ":")))
        gaps.append(gap)
        nbytes.append(sum(b - a for a, b in r) + (0 if key in seen else PSF_BYTES))
        seen.add(key)
    per = pl.DataFrame({"_fi": per["_fi"], "ranges": rng, "predicted_bytes": pl.Series(nbytes, dtype=pl.Int64),
                        "max_gap": pl.Series(gaps, dtype=pl.Int64)})
    return df.join(per, on="_fi").with_columns(
        pl.lit("range").alias("access"), (pl.lit(cloud_url + "/") + pl.col("_ckey")).alias("url"),
        (_image_prefix() + pl.lit(":range")).alias("request_id"),
        *_box_cols(pl.col("x0"), pl.col("y0"), pl.col("x1") - pl.col("x0"), pl.col("y1") - pl.col("y0")),
        pl.lit("planned").alias("status"))


def _full(df: pl.DataFrame, cloud_url: str) -> pl.DataFrame:
    """Whole files: from the cloud copy when the image has a cloud key (IBE is the fetcher's
    fallback when the object is not there yet), else from IBE."""
    return df.with_columns(
        pl.lit("full").alias("access"),
        pl.when(pl.col("_ckey") != "").then(pl.lit(cloud_url + "/") + pl.col("_ckey")).otherwise(pl.col("_file"))
        .alias("url"),
        (_image_prefix() + pl.lit(":full")).alias("request_id"),
        *_box_cols(pl.lit(0), pl.lit(0), pl.lit(NPIX), pl.lit(NPIX)), pl.lit(False).alias("clipped"),
        pl.Series("predicted_bytes", full_bytes(df["_r7"].to_numpy()), pl.Int64), pl.lit("").alias("ranges"),
        pl.lit("planned").alias("status"))
