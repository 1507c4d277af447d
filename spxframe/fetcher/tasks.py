"""fetch()'s bookkeeping: manifest rows → transfer tasks → each row's outcome.

A :class:`Task` is one transfer (one URL); its :class:`Target` s are the local files made from it
(a range task makes one cutout per box), each serving one or more manifest rows. :class:`Outcome`
holds what fetch() reports per row (path, status, bytes, attempts, error) and turns it back into
the manifest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import numpy as np
import polars as pl

from spxframe import schema, spherex
from spxframe.errors import InputError
from spxframe.fetcher.cache import PSF_HDUS, CacheDir, local_name, psf_name, sidecar
from spxframe.fetcher.claims import Claim, Wait
from spxframe.fetcher.ranges import Box, nearest_box_start

log = logging.getLogger("spxframe.fetch")

ACCESS = ("cutout", "range", "full")


@dataclass
class Target:
    """One local file: its path (absolute and relative), the box and the manifest rows it serves."""

    rel: str
    path: str
    box: Box | None
    rows: list[int]
    request: dict[str, Any]
    center: tuple[float, float] | None = None   # (ra, dec) deg: range box re-centred on the file's WCS
    sky: tuple[float, float, float, float] | None = None  # (ra, dec) deg, predicted (x, y) px of its first row
    wait: Wait | None = None                    # while another fetch holds its claim
    claim: Claim | None = None                  # a claim taken for it before its transfer started


@dataclass
class Task:
    """One transfer: a URL (one file or cutout) and the local files made from it."""

    access: str
    url: str
    obs_id: str
    detector: int
    targets: list[Target]
    psf_key: str | None = None
    size: int | None = None
    md5: str | None = None
    need_psf: bool = False
    max_gap: int | None = None  # range: byte ranges closer than this are read as one (None: fetch's max_gap)
    # results
    bytes: int = 0
    attempts: int = 0
    errors: dict[str, str] = field(default_factory=dict)   # rel -> error text
    done: set[str] = field(default_factory=set)            # rel of targets written (or made by another fetch)
    deferred: list[Target] = field(default_factory=list)   # targets another fetch is making: wait for them
    by_others: set[str] = field(default_factory=set)       # rel of targets another fetch made meanwhile
    counted: bool = True                                   # ticks the progress bar when it ends
    used_url: str | None = None                            # the URL the bytes came from, if not ``url``
    fallback: list[Task] = field(default_factory=list)     # IBE transfers replacing a missing cloud copy

    @property
    def rows(self) -> list[int]:
        return sorted(r for t in self.targets for r in t.rows)

    @property
    def md5_check(self) -> str | None:
        """The archive MD5 a finished file must have (full files only)."""
        return self.md5 if self.access == "full" else None

    def part(self, targets: list[Target]) -> Task:
        """A new transfer of the same URL for some of its targets (no results yet)."""
        return Task(self.access, self.url, self.obs_id, self.detector, list(targets), psf_key=self.psf_key,
                    size=self.size, md5=self.md5, need_psf=self.need_psf, max_gap=self.max_gap,
                    counted=self.counted)


# --------------------------------------------------------------------------------------
# the manifest in
# --------------------------------------------------------------------------------------


def manifest_frame(manifest: Any) -> pl.DataFrame:
    """The manifest DataFrame of ``plan()``'s result or of a table; :class:`InputError` if unusable."""
    df = getattr(manifest, "manifest", manifest)
    if not isinstance(df, pl.DataFrame):
        try:
            df = pl.DataFrame(df)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"manifest must be a polars DataFrame or have .manifest, got {type(manifest)!r}") from e
    need = [c for c in ("obs_id", "detector", "access", "url") if c not in df.columns]
    if need:
        raise InputError(f"manifest lacks column(s) {need}")
    return df


def _pick(frame: pl.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in frame.columns), None)


_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")
_warned_forms: set[str] = set()


def md5_of_checksum(value: Any) -> str | None:
    """The MD5 (32 lower-case hex digits) an archive's ``contentchecksum`` states, or None.

    Bare hex or an ``md5:`` prefix, in any case, is an MD5; an empty value is no checksum; any
    other form (another algorithm, a truncated value) is treated as no checksum, with one warning
    per form: never as a mismatch that would throw away a good file (the spec does not fix it).
    """
    if value is None:
        return None
    text = str(value).strip().lower()
    if text.startswith("md5:"):
        text = text[4:].strip()
    if not text:
        return None
    if _MD5_HEX.match(text):
        return text
    form = re.sub(r"[0-9a-f]", "x", text)[:24]
    if form not in _warned_forms:
        _warned_forms.add(form)
        log.warning("archive checksum %r is not an MD5 (bare hex or 'md5:' + hex): not checked", str(value)[:48])
    return None


def with_archive_info(df: pl.DataFrame, observations: pl.DataFrame | None) -> pl.DataFrame:
    """Add ``_size``/``_md5`` (archive size and checksum) from manifest or observations columns."""
    size_c = _pick(df, ("size", "contentlength"))
    md5_c = _pick(df, ("checksum", "contentchecksum"))
    df = df.with_columns(
        (pl.col(size_c).cast(pl.Int64, strict=False) if size_c else pl.lit(None, pl.Int64)).alias("_size"),
        (pl.col(md5_c).cast(pl.Utf8, strict=False) if md5_c else pl.lit(None, pl.Utf8)).alias("_md5"))
    if observations is not None and len(observations):
        s, m = _pick(observations, ("size", "contentlength")), _pick(observations, ("checksum", "contentchecksum"))
        cols = [pl.col("obs_id").cast(pl.Utf8), pl.col("detector").cast(pl.Int64)]
        cols.append((pl.col(s).cast(pl.Int64, strict=False) if s else pl.lit(None, pl.Int64)).alias("_osize"))
        cols.append((pl.col(m).cast(pl.Utf8, strict=False) if m else pl.lit(None, pl.Utf8)).alias("_omd5"))
        o = observations.select(cols).unique(["obs_id", "detector"])
        df = (df.with_columns(pl.col("detector").cast(pl.Int64).alias("_det"))
              .join(o.rename({"detector": "_det"}), on=["obs_id", "_det"], how="left", maintain_order="left")
              .with_columns(pl.coalesce("_size", "_osize").alias("_size"), pl.coalesce("_md5", "_omd5").alias("_md5"))
              .drop("_det", "_osize", "_omd5"))
    # one pass over the column's distinct values, not a Python call per manifest row
    forms = df.get_column("_md5").unique()
    table = pl.DataFrame({"_md5": forms, "_md5n": [md5_of_checksum(v) for v in forms.to_list()]},
                         schema={"_md5": pl.Utf8, "_md5n": pl.Utf8})
    return df.join(table, on="_md5", how="left", nulls_equal=True, maintain_order="left") \
        .drop("_md5").rename({"_md5n": "_md5"})


def _as_int(v: Any) -> int | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if f != f:
        return None
    return int(round(f))


def _row_box(r: dict[str, Any]) -> Box | None:
    vals = [_as_int(r.get(k)) for k in ("box_x0", "box_y0", "box_nx", "box_ny")]
    if any(v is None for v in vals):
        return None
    return Box(*vals)  # type: ignore[arg-type]


def _recenter_sky(r: dict[str, Any], box: Box | None) -> tuple[float, float] | None:
    """(ra, dec) of a row whose planned box is the unclipped nearest-centre box around its
    predicted pixel (so the exact box can be re-derived from the file's WCS), else None."""
    try:
        ra, dec, xp, yp = (float(r[k]) for k in ("ra", "dec", "x_parent", "y_parent"))
    except (KeyError, TypeError, ValueError):
        return None
    if box is None or r.get("clipped") or not all(np.isfinite([ra, dec, xp, yp])):
        return None
    if box.x0 != nearest_box_start(xp, box.nx) or box.y0 != nearest_box_start(yp, box.ny):
        return None
    return ra, dec


def _row_sky(r: dict[str, Any]) -> tuple[float, float, float, float] | None:
    """(ra, dec) deg and predicted (x, y) px (NaN when unknown) of a row, or None without a finite
    position: what an IBE cutout replacing its range read is centred on."""
    ra, dec, x, y = (_as_float(r.get(k)) for k in ("ra", "dec", "x_parent", "y_parent"))
    return (ra, dec, x, y) if math.isfinite(ra) and math.isfinite(dec) else None


def _as_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------------------
# the cloud copy lags the archive: IBE instead (spec §1.5-1.6)
# --------------------------------------------------------------------------------------

#: px added on each side of a fallback cutout whose box is not the one centred on the source: the
#: planner's predicted pixel may be a few px off (SIP), the cutout service centres on the exact one
FALLBACK_MARGIN_PX = 4
#: how long (s) a cloud object that answered 404 is not asked for again in this process
CLOUD_MISS_TTL_S = 6 * 3600.0
#: a cloud object that is not there: 404 NoSuchKey, or 403 AccessDenied from an S3 bucket that does
#: not let anonymous users list it (S3 then hides whether a key exists)
CLOUD_MISSING_STATUS = frozenset({403, 404})
_IBE_PATH = "/" + spherex.CAL_DATA_PATH.strip("/") + "/"   # "/ibe/data/spherex/": the archive's file tree
_BUCKET_PATH = "/" + spherex.CLOUD_BUCKET + "/"


def ibe_url_of(url: str) -> str | None:
    """The IBE file URL of a cloud object URL (the public bucket, or ``<base>/<bucket>/<key>`` as the
    simulated archive and mirrors serve it); None for a URL of neither form."""
    if url.startswith(spherex.CLOUD_URL + "/"):
        return spherex.IRSA_URL + _IBE_PATH + url[len(spherex.CLOUD_URL) + 1:]
    base, sep, key = url.partition(_BUCKET_PATH)
    if sep and key and base.startswith(("http://", "https://")) and "/" not in base.split("://", 1)[1]:
        return base + _IBE_PATH + key
    return None


class CloudMisses:
    """Cloud objects that answered 404 (NoSuchKey: the copy lags the archive), remembered in this
    process for ``ttl`` s: later transfers of the same file (other tasks, cells, fetches) go
    straight to IBE. Thread-safe."""

    def __init__(self, ttl: float = CLOUD_MISS_TTL_S) -> None:
        self.ttl = float(ttl)
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, url: str) -> None:
        with self._lock:
            self._seen[url] = time.monotonic()

    def __contains__(self, url: object) -> bool:
        with self._lock:
            return time.monotonic() - self._seen.get(str(url), -math.inf) <= self.ttl


#: the process's memory of cloud objects not there (yet)
CLOUD_MISSES = CloudMisses()


def _fallback_cutout_url(ibe: str, t: Target) -> str | None:
    """An IBE cutout URL covering ``t``'s box, centred on its source: the exact box size when the box
    was the one centred on the source (the service re-centres it on the exact pixel, as range
    reads do), else a box wide enough for the planned one plus :data:`FALLBACK_MARGIN_PX`."""
    b = t.box
    if b is None or (t.center is None and t.sky is None):
        return None
    if t.center is not None:
        (ra, dec), nx, ny = t.center, b.nx, b.ny
    else:
        ra, dec, xp, yp = t.sky  # type: ignore[misc]
        sizes = []
        for p, lo, n in ((xp, b.x0, b.nx), (yp, b.y0, b.ny)):
            half = max(p - lo, lo + n - 1 - p) if math.isfinite(p) else (n - 1) / 2.0
            sizes.append(2 * math.ceil(max(half, 0.0) + FALLBACK_MARGIN_PX) + 1)
        nx, ny = sizes
    q = urlencode({"center": f"{ra:.7f},{dec:.7f}", "size": f"{int(nx)},{int(ny)}px", "gzip": "false"})
    return f"{ibe}?{q}"


def ibe_fallback(task: Task) -> tuple[list[Task], dict[str, str]]:
    """A range task whose cloud object is missing, as IBE cutout tasks (one per box, same local
    files). Returns (tasks, errors by target for boxes that cannot be cut: no sky position)."""
    ibe = ibe_url_of(task.url)
    tasks: list[Task] = []
    errors: dict[str, str] = {}
    for t in task.targets:
        url = _fallback_cutout_url(ibe, t) if ibe else None
        if url is None:
            errors[t.rel] = (f"cloud object {task.url} not found (HTTP 404) and no IBE cutout can replace it "
                             "(no IBE URL or no sky position for the box)")
            continue
        b = t.box
        assert b is not None
        req = {"access": "cutout", "url": url, "box": [b.x0, b.y0, b.nx, b.ny]}
        tg = Target(t.rel, t.path, b, t.rows, req, sky=t.sky)
        tasks.append(Task("cutout", url, task.obs_id, task.detector, [tg], counted=False))
    return tasks, errors


@dataclass
class _RowFile:
    """What one manifest row asks for: its transfer (access, url) and local file."""

    access: str
    url: str
    detector: int
    box: Box | None
    rel: str
    path: str


def _row_file(r: dict[str, Any], cache: CacheDir) -> _RowFile | None:
    """The file a row asks for; None for a row planned as failed (no URL: keeps its error).
    Raises :class:`InputError` (or TypeError/ValueError/KeyError) for a bad row."""
    access = str(r.get("access") or "").strip().lower()
    url = str(r.get("url") or "")
    if access not in ACCESS:
        raise InputError(f"access {r.get('access')!r} is not one of {ACCESS}")
    if not url.startswith(("http://", "https://")):
        if str(r.get("status") or "") == "failed" and r.get("error") and not r.get("url"):
            return None
        raise InputError(f"url {url!r} is not http(s)")
    det = _as_int(r.get("detector"))
    if det is None:
        raise InputError(f"detector {r.get('detector')!r} is not 1-6")
    box = _row_box(r)
    if access == "full":
        rel = local_name(r["obs_id"], det, full=True)
    elif access == "cutout":
        rel = local_name(r["obs_id"], det, box, request=url)
    else:
        if box is None:
            raise InputError("range row without a pixel box (box_x0/box_y0/box_nx/box_ny)")
        rel = local_name(r["obs_id"], det, box)
    return _RowFile(access, url, det, box, rel, cache.path(rel))


def make_tasks(out: Outcome, cache: CacheDir, *, recenter: bool) -> list[Task]:
    """Group the manifest rows into transfers (one per URL), each file once; rows that cannot be
    fetched get their error in ``out``."""
    tasks: dict[tuple[str, str], Task] = {}
    by_rel: dict[str, Target] = {}
    for i, r in enumerate(out.rows):
        try:
            f = _row_file(r, cache)
        except (InputError, TypeError, ValueError, KeyError) as e:
            out.error[i] = str(e) if isinstance(e, InputError) else f"bad manifest row: {type(e).__name__}: {e}"
            continue
        if f is None:
            out.error[i] = str(r["error"])  # planned as failed (e.g. box off the image): keep why
            continue
        out.path[i] = f.rel
        tgt = by_rel.get(f.rel)  # the same file (same box) may be planned by another row/method
        if tgt is None:
            t = tasks.get((f.access, f.url))
            if t is None:
                psf_key = r.get("psf_key") or (spherex.psf_key(f.url, f.detector) if f.access == "range" else None)
                t = tasks[(f.access, f.url)] = Task(f.access, f.url, str(r["obs_id"]), f.detector, [],
                                                    psf_key=psf_key, size=_as_int(r.get("_size")),
                                                    md5=(r.get("_md5") or None),
                                                    max_gap=_as_int(r.get("max_gap")) if f.access == "range" else None)
            request: dict[str, Any] = {"access": f.access, "url": f.url}
            if f.box is not None and f.access != "full":
                request["box"] = [f.box.x0, f.box.y0, f.box.nx, f.box.ny]
            center = _recenter_sky(r, f.box) if f.access == "range" and recenter else None
            tgt = by_rel[f.rel] = Target(f.rel, f.path, f.box, [], request, center=center,
                                         sky=_row_sky(r) if f.access == "range" else None)
            t.targets.append(tgt)
        tgt.rows.append(i)
    return list(tasks.values())


def still_to_fetch(tasks: list[Task], out: Outcome, cache: CacheDir) -> list[Task]:
    """Keep verified files (their rows are done), return the transfers still to make. A range
    task whose PSF cube is missing rebuilds its cutouts with it (rows are small)."""
    todo: list[Task] = []
    for t in tasks:
        if t.access == "range" and t.psf_key:
            try:
                psf_path = cache.path(psf_name(t.psf_key))
            except InputError as e:
                out.fail(t, str(e))
                continue
            t.need_psf = not cache.is_verified(psf_path, required=PSF_HDUS)
        pending = []
        for tg in t.targets:
            ibe = _ibe_made(tg) if t.access == "range" else None   # a fallback cutout holds its own PSF
            if (not t.need_psf or ibe) and cache.is_verified(tg.path, md5=t.md5_check, request=tg.request):
                out.cached(tg)
                if ibe:
                    for i in tg.rows:
                        out.access[i], out.url[i] = "cutout", ibe
            else:
                pending.append(tg)
        if pending or t.need_psf:
            t.targets = pending
            todo.append(t)
    return todo


def _ibe_made(tg: Target) -> str | None:
    """The IBE cutout URL a range target's file was made from (an earlier fallback), per its sidecar."""
    try:
        with open(sidecar(tg.path), "rb") as f:
            req = json.loads(f.read()).get("request") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return str(req["url"]) if isinstance(req, dict) and req.get("access") == "cutout" and req.get("url") else None


# --------------------------------------------------------------------------------------
# the manifest out
# --------------------------------------------------------------------------------------


class Outcome:
    """Per manifest row: local path (relative), status, bytes, attempts, error."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        n = len(rows)
        self.rows = rows
        self.path: list[str | None] = [None] * n
        self.status = ["failed"] * n
        self.bytes = [0] * n
        self.attempts = [0] * n
        self.error: list[str | None] = [None] * n
        self.access: list[str | None] = [None] * n   # the method and URL actually used, when transferred
        self.url: list[str | None] = [None] * n

    def fail(self, task: Task, error: str) -> None:
        for tg in task.targets:
            for i in tg.rows:
                self.error[i] = error

    def cached(self, tg: Target) -> None:
        """A verified file already on disk: its rows are done (keeping bytes/attempts of the
        manifest when it was fetched into this very file before)."""
        for i in tg.rows:
            self.status[i] = "done"
            prev = self.rows[i]
            if str(prev.get("status") or "") == "done" and prev.get("path") in (tg.rel, tg.path):
                self.bytes[i] = int(prev.get("bytes") or 0)
                self.attempts[i] = int(prev.get("attempts") or 0)

    def record(self, t: Task) -> None:
        """The results of a finished transfer (or of waiting for another fetch's)."""
        for tg in t.targets:
            for i in sorted(tg.rows):
                self.attempts[i] = 0 if tg.rel in t.by_others else t.attempts
                if tg.rel in t.done:
                    self.status[i], self.error[i] = "done", None
                    if tg.rel not in t.by_others:
                        self.access[i], self.url[i] = t.access, t.used_url or t.url
                else:
                    self.status[i] = "failed"
                    self.error[i] = t.errors.get(tg.rel, "not fetched")
        rows_t = sorted(i for tg in t.targets if tg.rel not in t.by_others for i in tg.rows)
        if rows_t:
            self.bytes[rows_t[0]] = t.bytes

    @property
    def n_done(self) -> int:
        return sum(1 for s in self.status if s == "done")

    def frame(self, df: pl.DataFrame, root: str) -> pl.DataFrame:
        """``df`` (with ``_row``, ``_size``, ``_md5``) back as the manifest with the results."""
        result = df.sort("_row").drop("_row", "_size", "_md5").with_columns(
            pl.Series("path", [os.path.join(root, p) if p and st == "done" else None
                               for p, st in zip(self.path, self.status)], dtype=pl.Utf8),
            pl.Series("status", self.status, dtype=pl.Utf8),
            pl.Series("bytes", self.bytes, dtype=pl.Int64),
            pl.Series("attempts", self.attempts, dtype=pl.Int32),
            pl.Series("error", self.error, dtype=pl.Utf8),
        ).with_columns(  # e.g. an IBE cutout in place of a missing cloud object, a whole file from the cloud
            pl.coalesce(pl.Series("_a", self.access, dtype=pl.Utf8), pl.col("access").cast(pl.Utf8)).alias("access"),
            pl.coalesce(pl.Series("_u", self.url, dtype=pl.Utf8), pl.col("url").cast(pl.Utf8)).alias("url"))
        moved = pl.Series([a is not None and a != str(r.get("access") or "").strip().lower()
                           for a, r in zip(self.access, self.rows)], dtype=pl.Boolean)
        if "ranges" in result.columns and moved.any():   # byte ranges only for rows read by ranges
            result = result.with_columns(pl.when(moved).then(pl.lit("")).otherwise(pl.col("ranges").cast(pl.Utf8))
                                         .alias("ranges"))
        return schema.conform(result, schema.MANIFEST)
