"""fetch(): bring the pixels a manifest asks for onto local disk, reliably and resumably.

    >>> fetched = spxframe.fetch(manifest, cache_dir="run/")     # manifest from spxframe.plan()

Three access methods (manifest column ``access``):

- ``cutout``: GET the planned IBE cutout URL (requests, streamed to disk);
- ``range``: byte-range reads of the cloud copy through fsspec HTTP: headers, the rows of
  IMAGE/FLAGS/VARIANCE/ZODI covering each box (coalesced per file), WCS-WAVE; a local cutout is
  written with the same HDUs and header changes as an IBE cutout, except the PSF HDU, which keeps
  its header but no data and points (``PSFFILE``) at ``psf/<psf_key>.fits``, fetched once per key;
- ``full``: the whole file, streamed to disk (MD5-checked when the archive gives one).

Local layout (relative to ``cache_dir``)::

    data/D<n>/<obs_id>D<n>_x<x0>_y<y0>_<nx>x<ny>.fits   cutout / range (planned box, parent pixels)
    data/D<n>/<obs_id>D<n>_full.fits                      full file
    psf/<psf_key>.fits                                    PSF cube (range reads)
    <file>.ok                                             JSON sidecar written after verification
    <file>.<pid>@<host>.<token>.part                      transfer in progress (never trusted)
    <file>.lock                                           claim: another fetch is making <file>

A file only reaches its final name after verification (size, FITS blocks, END cards, the seven
HDUs, MD5 for full files); the ``.ok`` sidecar follows. Reruns skip verified files and clean
stale ``.part`` files. A transfer that fails after its retry budget marks its rows
``status='failed'`` with the error; only input/programming errors raise.

Concurrent fetches into one ``cache_dir`` (processes, threads, hosts sharing a filesystem) make
each file once: a fetch claims a file (``<file>.lock``, see :mod:`spxframe.fetcher.claims`) before
transferring it; another fetch that needs the same file waits for its ``.ok`` sidecar, holding
no transfer slot and going on with its other transfers, and fetches the file itself if the
claimer failed or died (``stale_claim``); it waits at most ``claim_timeout`` per file, then marks
the rows failed.

Sizes are bytes, times seconds.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from spxframe import schema, spherex
from spxframe._version import __version__
from spxframe.errors import FileFormatError, InputError
from spxframe.fetcher import claims as _claims
from spxframe.fetcher.http import (
    Cancelled,
    Limiters,
    RangeClient,
    RetryPolicy,
    TransferError,
    call_with_retries,
    clean_stale_parts,
    default_session,
    file_md5,
    is_verified,
    mark_ok,
    sidecar,
    stream_to_file,
    tmp_name,
    write_verified,
)
from spxframe.fetcher.ranges import (
    BLOCK,
    HDU,
    Box,
    RangeFile,
    build_cutout,
    nearest_box_start,
    psf_file_bytes,
    scan_fits,
)

log = logging.getLogger("spxframe.fetch")

USER_AGENT = f"spxframe/{__version__}"
OBS_ID_RE = re.compile(r"^\d{4}W\d{2}_\d[A-Z]_\d{4}_\d{1,2}$")
ACCESS = ("cutout", "range", "full")
_POLL = (0.05, 2.0)   # s: first and longest interval between looks at another fetch's transfer


# --------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------


def local_name(obs_id: str, detector: int, box: Box | None = None, *, full: bool = False,
               request: str | None = None) -> str:
    """Path of a fetched file relative to ``cache_dir`` (POSIX separators).

    ``obs_id`` must match the SPHEREx format (``2025W18_2B_0001_1``) and ``detector`` be 1-6, so
    nothing the archive sends can escape ``cache_dir``. Without a box (and not full) the name
    carries a hash of ``request``. Raises :class:`InputError`."""
    obs_id = str(obs_id)
    if not OBS_ID_RE.match(obs_id):
        raise InputError(f"obs_id {obs_id!r} does not look like a SPHEREx observation id (YYYYWww_NX_LLLL_S)")
    try:
        det = int(detector)
    except (TypeError, ValueError):
        raise InputError(f"detector {detector!r} is not 1-6") from None
    if not 1 <= det <= 6:
        raise InputError(f"detector {detector!r} is not 1-6")
    stem = f"{obs_id}D{det}"
    if full:
        name = f"{stem}_full.fits"
    elif box is not None:
        vals = (box.x0, box.y0, box.nx, box.ny)
        if any(int(v) != v for v in vals) or box.x0 < 0 or box.y0 < 0 or box.nx <= 0 or box.ny <= 0 \
                or max(vals) > 10**6:
            raise InputError(f"bad pixel box {vals} for {stem}")
        name = f"{stem}_x{box.x0}_y{box.y0}_{box.nx}x{box.ny}.fits"
    else:
        h = hashlib.sha1((request or "").encode()).hexdigest()[:16]
        name = f"{stem}_req{h}.fits"
    return f"data/D{det}/{name}"


def psf_name(psf_key: str) -> str:
    """Path of a cached PSF cube relative to ``cache_dir``; ``psf_key`` is validated."""
    if not spherex.PSF_KEY_RE.match(psf_key or "") or ".." in psf_key:
        raise InputError(f"psf_key {psf_key!r} is not a safe cache key")
    return f"psf/{psf_key}.fits"


def _inside(root: str, rel: str) -> str:
    path = os.path.realpath(os.path.join(root, rel))
    if not path.startswith(os.path.realpath(root) + os.sep):
        raise InputError(f"{rel!r} would escape cache_dir {root!r}")
    return path


# --------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------


@dataclass
class Target:
    """One local file: its path (absolute and relative), the box and the manifest rows it serves."""

    rel: str
    path: str
    box: Box | None
    rows: list[int]
    request: dict[str, Any]
    center: tuple[float, float] | None = None   # (ra, dec) deg: range box re-centred on the file's WCS
    wait_since: float | None = None             # monotonic s: first found claimed by another fetch


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
    # results
    bytes: int = 0
    attempts: int = 0
    errors: dict[str, str] = field(default_factory=dict)   # rel -> error text
    done: set[str] = field(default_factory=set)            # rel of targets written (or made by another fetch)
    deferred: list[Target] = field(default_factory=list)   # targets another fetch is making: wait for them
    by_others: set[str] = field(default_factory=set)       # rel of targets another fetch made meanwhile
    counted: bool = True                                   # ticks the progress bar when it ends

    @property
    def rows(self) -> list[int]:
        return sorted(r for t in self.targets for r in t.rows)

    def part(self, targets: list[Target]) -> Task:
        """A new transfer of the same URL for some of its targets (no results yet)."""
        return Task(self.access, self.url, self.obs_id, self.detector, list(targets), psf_key=self.psf_key,
                    size=self.size, md5=self.md5, need_psf=self.need_psf)


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


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="file", desc="fetch", leave=True)
        self.nbytes = 0
        self._lock = threading.Lock()
        self._last = 0.0

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.nbytes += n
            if self.bar is not None and time.monotonic() - self._last > 0.5:
                self._last = time.monotonic()
                self.bar.set_postfix_str(f"{self.nbytes / 1e6:.1f} MB", refresh=False)

    def file_done(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.nbytes / 1e6:.1f} MB", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Fetcher:
    def __init__(self, cache_dir: str, *, session: Any, fs: Any, policy: RetryPolicy,
                 limiters: Limiters, timeout: tuple[float, float], progress: _Progress,
                 max_gap: int, headers: dict[str, str] | None = None,
                 stale_claim: float = _claims.DEFAULT_STALE_S,
                 claim_timeout: float = _claims.DEFAULT_WAIT_S) -> None:
        self.headers = headers
        self.watcher = _claims.Watcher(stale_claim)
        self.claim_timeout = float(claim_timeout)
        self.cache_dir, self.session, self.fs, self.policy = cache_dir, session, fs, policy
        self.limiters, self.timeout, self.progress, self.max_gap = limiters, timeout, progress, max_gap
        self.stop = threading.Event()
        self._psf_locks: dict[str, threading.Lock] = {}
        self._psf_guard = threading.Lock()
        self._layout_guess: dict[str, dict[str, int]] = {}

    # ---- per task -----------------------------------------------------------------

    def run(self, task: Task) -> Task:
        counter = [0]

        def on_bytes(n: int) -> None:
            counter[0] += n
            self.progress.add_bytes(n)

        claims: list[_claims.Claim] = []
        by_others: list[Target] = []
        try:
            self._claim(task, claims, by_others)
            task.by_others.update(t.rel for t in by_others)
            if task.targets:
                if task.access == "range":
                    self._range(task, on_bytes)
                else:
                    self._get(task, on_bytes)
        except Cancelled:
            for t in task.targets:
                task.errors.setdefault(t.rel, "cancelled")
        except TransferError as e:
            task.attempts = max(task.attempts, getattr(e, "attempts", 1))
            for t in task.targets:
                if t.rel not in task.done:
                    task.errors[t.rel] = str(e)
        except (FileFormatError, InputError, OSError, KeyError, ValueError, _claims.ClaimTimeout) as e:
            for t in task.targets:
                if t.rel not in task.done:
                    task.errors[t.rel] = f"{type(e).__name__}: {e}"
            log.warning("%s: %s", task.url, e)
        except Exception as e:  # noqa: BLE001 — one bad transfer must not stop the others
            log.exception("unexpected error fetching %s", task.url)
            for t in task.targets:
                if t.rel not in task.done:
                    task.errors[t.rel] = f"{type(e).__name__}: {e}"
        finally:
            for c in claims:
                c.release()
        task.targets.extend(by_others)
        task.bytes = counter[0]
        for rel, err in task.errors.items():
            log.warning("failed %s (%s): %s", rel, task.url, err)
        return task

    # ---- claims: one transfer per file across fetches ----------------------------------

    def ready(self, task: Task, t: Target, *, cheap: bool = False) -> bool:
        """Whether ``t`` is a verified file (range cutouts: and their PSF cube). ``cheap``: only
        trust files with a sidecar (no full scan while polling another fetch's transfer)."""
        if cheap and not os.path.exists(sidecar(t.path)):
            return False
        if not is_verified(t.path, md5=task.md5 if task.access == "full" else None, request=t.request):
            return False
        if task.access == "range" and task.psf_key:
            p = _inside(self.cache_dir, psf_name(task.psf_key))
            if cheap and not os.path.exists(sidecar(p)):
                return False
            return is_verified(p, required=("PRIMARY", "PSF"))
        return True

    def _claim(self, task: Task, claims: list[_claims.Claim], by_others: list[Target]) -> None:
        """Claim the task's targets. Those another fetch holds go to ``task.deferred`` (the caller
        waits for them), those verified meanwhile to ``by_others``; ``task.targets`` keeps the
        claimed ones still to make."""
        mine: list[Target] = []
        for t in task.targets:
            if self.stop.is_set():
                raise Cancelled()
            c = _claims.try_claim(t.path, stale_s=self.watcher.stale_s, what=task.url)
            if c is None and self.watcher.state(t.path) == "free":  # released or stale: try again
                c = _claims.try_claim(t.path, stale_s=self.watcher.stale_s, what=task.url)
            if c is None:
                if self.ready(task, t, cheap=True):
                    task.done.add(t.rel)
                    by_others.append(t)
                else:
                    if t.wait_since is None:
                        t.wait_since = time.monotonic()
                    log.debug("%s: %s is being fetched by %s; waiting", task.url, t.rel,
                              _claims.describe_owner(t.path))
                    task.deferred.append(t)
                continue
            claims.append(c)
            if self.ready(task, t):  # made by another fetch between our cache check and the claim
                task.done.add(t.rel)
                by_others.append(t)
            else:
                mine.append(t)
        task.targets = mine

    def _get(self, task: Task, on_bytes) -> None:
        """cutout / full: one streamed GET, verified, then renamed into place."""
        target = task.targets[0]
        kind = "cutout" if task.access == "cutout" else "data"
        limiter = self.limiters.get(task.url, kind)
        tmp = tmp_name(target.path)
        md5 = [None]

        def attempt(n: int):
            dl = stream_to_file(self.session, task.url, tmp, timeout=self.timeout, stop=self.stop,
                                on_bytes=on_bytes, headers=self.headers)
            with open(tmp, "rb") as f:
                magic = f.read(2)
            if magic == b"\x1f\x8b":  # gzip body despite gzip=false
                dec = tmp_name(target.path)
                try:
                    with gzip.open(tmp, "rb") as fi, open(dec, "wb") as fo:
                        shutil.copyfileobj(fi, fo, 1 << 20)
                    os.replace(dec, tmp)
                except (OSError, EOFError) as e:
                    raise TransferError(f"bad gzip body from {task.url}: {e}", transient=True) from e
                finally:
                    if os.path.exists(dec):
                        os.unlink(dec)
            digest = dl.md5 if magic != b"\x1f\x8b" else file_md5(tmp)
            if task.access == "full":
                if task.size and os.path.getsize(tmp) != task.size:
                    raise TransferError(f"size {os.path.getsize(tmp)} != archive size {task.size} for {task.url}",
                                        transient=True)
                if task.md5 and digest != task.md5.lower():
                    raise TransferError(f"MD5 {digest} != archive MD5 {task.md5} for {task.url}", transient=True)
            try:
                hdus = scan_fits(tmp)
            except FileFormatError as e:
                raise TransferError(f"bad FITS from {task.url}: {e}", transient=True) from e
            md5[0] = digest
            if task.access == "cutout":  # the box the server cut (its WCS may differ from the plan's)
                k = next(h.keys for h in hdus if h.extname == "IMAGE")
                try:
                    served = [int(round(1 - float(k["CRPIX1A"]))), int(round(1 - float(k["CRPIX2A"]))),
                              int(k["NAXIS1"]), int(k["NAXIS2"])]
                    target.request["served_box"] = served
                    if target.box is not None and served != [target.box.x0, target.box.y0, target.box.nx,
                                                             target.box.ny]:
                        log.debug("%s: server cut box %s, planned %s", task.url, served, target.box)
                except (KeyError, TypeError, ValueError):
                    pass
            return dl

        try:
            _, task.attempts = call_with_retries(attempt, policy=self.policy, limiter=limiter,
                                                 stop=self.stop, what=task.url)
            os.replace(tmp, target.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        mark_ok(target.path, target.request, md5[0])
        task.done.add(target.rel)

    # ---- range reads ----------------------------------------------------------------

    def _psf_lock(self, key: str) -> threading.Lock:
        with self._psf_guard:
            return self._psf_locks.setdefault(key, threading.Lock())

    def _range(self, task: Task, on_bytes) -> None:
        """range: headers, box rows and WCS-WAVE from the cloud copy, PSF cube once per key,
        local cutouts written like IBE cutouts (PSF header only, PSFFILE)."""
        rc = RangeClient(self.fs, policy=self.policy, limiters=self.limiters, stop=self.stop, on_bytes=on_bytes)

        def read(ranges: list[tuple[int, int]]) -> tuple[list[bytes], int | None]:
            data, total, att = rc.read(task.url, ranges)
            task.attempts = max(task.attempts, att)
            return data, total

        rf = RangeFile(read, task.url)
        # header lengths of earlier files with this psf_key: read exactly those (a miss costs a read)
        layout = rf.read_layout(guess=self._layout_guess.get(task.psf_key or ""))
        if task.psf_key:
            self._layout_guess[task.psf_key] = {h.extname: len(h.header) // BLOCK for h in layout[2:]}
        resolved = rf.resolve_boxes(layout, [(t.box, t.center) for t in task.targets])  # type: ignore[misc]
        boxes: dict[str, Box] = {}
        for t, b in zip(task.targets, resolved):
            if isinstance(b, str):
                task.errors[t.rel] = b
            else:
                if b != t.box:
                    log.debug("%s: box %s re-centred/clipped to %s", t.rel, t.box, b)
                boxes[t.rel] = b
        store = rf.read_boxes(layout, list(boxes.values()), max_gap=self.max_gap)
        psf = next(h for h in layout if h.extname == "PSF")
        psf_rel = psf_name(task.psf_key) if task.psf_key else None
        if psf_rel is not None:
            self._ensure_psf(task, psf, psf_rel, rf.read)
        for t in task.targets:
            b = boxes.get(t.rel)
            if b is None:
                continue
            data = build_cutout(layout, b, store, psffile=psf_rel or "")
            write_verified(t.path, data, t.request)
            task.done.add(t.rel)

    def _ensure_psf(self, task: Task, psf: HDU, rel: str, read) -> None:
        """The PSF cube of ``psf`` at ``cache_dir/rel``, fetched once (other threads wait)."""
        path = _inside(self.cache_dir, rel)
        req = {"psf_key": task.psf_key, "url": task.url, "offset": psf.data_offset}

        def verified(cheap: bool = False) -> bool:
            if cheap and not os.path.exists(sidecar(path)):
                return False
            return is_verified(path, required=("PRIMARY", "PSF"), request=req)

        with self._psf_lock(rel):
            if verified():
                return
            # another process may be writing this cube: wait for it (no transfer slot held)
            claim = _claims.claim_or_wait(path, done=lambda: verified(cheap=True), watcher=self.watcher,
                                          timeout=self.claim_timeout, stop=self.stop, what=task.url)
            if claim is None:
                return
            try:
                if verified():
                    return
                (data,) = read([(psf.data_offset, psf.next_offset)])
                write_verified(path, psf_file_bytes(psf, data, task.psf_key or ""), req,
                               required=("PRIMARY", "PSF"))
                log.info("cached PSF cube %s", rel)
            finally:
                claim.release()


# --------------------------------------------------------------------------------------
# public
# --------------------------------------------------------------------------------------


def _manifest_frame(manifest: Any) -> pl.DataFrame:
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


def _extra_info(df: pl.DataFrame, observations: pl.DataFrame | None) -> pl.DataFrame:
    """Add ``_size``/``_md5`` (archive size and checksum) from manifest or observations columns."""
    def pick(frame: pl.DataFrame, names: tuple[str, ...]) -> str | None:
        return next((n for n in names if n in frame.columns), None)

    size_c = pick(df, ("size", "contentlength"))
    md5_c = pick(df, ("checksum", "contentchecksum"))
    df = df.with_columns(
        (pl.col(size_c).cast(pl.Int64, strict=False) if size_c else pl.lit(None, pl.Int64)).alias("_size"),
        (pl.col(md5_c).cast(pl.Utf8, strict=False) if md5_c else pl.lit(None, pl.Utf8)).alias("_md5"))
    if observations is not None and len(observations):
        s, m = pick(observations, ("size", "contentlength")), pick(observations, ("checksum", "contentchecksum"))
        cols = [pl.col("obs_id").cast(pl.Utf8), pl.col("detector").cast(pl.Int64)]
        cols.append((pl.col(s).cast(pl.Int64, strict=False) if s else pl.lit(None, pl.Int64)).alias("_osize"))
        cols.append((pl.col(m).cast(pl.Utf8, strict=False) if m else pl.lit(None, pl.Utf8)).alias("_omd5"))
        o = observations.select(cols).unique(["obs_id", "detector"])
        df = (df.with_columns(pl.col("detector").cast(pl.Int64).alias("_det"))
              .join(o.rename({"detector": "_det"}), on=["obs_id", "_det"], how="left", maintain_order="left")
              .with_columns(pl.coalesce("_size", "_osize").alias("_size"), pl.coalesce("_md5", "_omd5").alias("_md5"))
              .drop("_det", "_osize", "_omd5"))
    return df


def fetch(manifest: Any, *, cache_dir: str | os.PathLike, max_concurrency: int | None = None,
          storage_options: dict[str, Any] | None = None, session: Any = None, progress: bool = True,
          retries: int = 5, timeout: tuple[float, float] = (10.0, 120.0), backoff: float = 0.5,
          max_backoff: float = 30.0, max_retry_after: float = 60.0, max_gap: int = 128 * 1024,
          recenter: bool = True, observations: pl.DataFrame | None = None,
          claim_timeout: float = _claims.DEFAULT_WAIT_S, stale_claim: float = _claims.DEFAULT_STALE_S
          ) -> pl.DataFrame:
    """Fetch every row of a manifest into ``cache_dir``; returns the manifest with ``path``,
    ``status`` ('done' | 'failed'), ``bytes``, ``attempts`` and ``error`` filled.

    Parameters
    ----------
    manifest
        ``spxframe.plan()``'s result (an object with ``.manifest``) or the manifest DataFrame
        (schema.MANIFEST columns; ``obs_id``, ``detector``, ``access``, ``url`` required; the
        box columns for cutout/range; ``psf_key`` for range).
    cache_dir
        Root of the local files (created; must be writable, else :class:`InputError`).
    max_concurrency
        Cap on simultaneous requests per host and on worker threads. Default: 4 for IBE
        cutouts (IRSA answers 503 beyond about 4), 8 for files and ranges. The limit adapts
        (AIMD): halved on 503/429, grown back on success up to the cap.
    storage_options
        Passed to ``fsspec.filesystem('http', ...)`` for range reads (``headers``,
        ``client_kwargs`` e.g. proxies/trace configs, auth). Our User-Agent and timeouts are
        defaults that these override.
    session
        A ``requests.Session`` for cutout and full-file GETs (proxies, tokens, headers).
    progress
        Show a tqdm bar (files, MB).
    retries
        Retries per transfer after the first attempt (5xx, 408/429, timeouts, dropped
        connections, short bodies, corrupt FITS). 4xx other than 408/429 fail at once.
    timeout
        (connect, read) timeouts in seconds.
    backoff, max_backoff
        Exponential backoff with jitter: about ``backoff × 2^(attempt-1)`` s, at most
        ``max_backoff`` s.
    max_retry_after
        Upper bound (s) on a server's ``Retry-After``.
    max_gap
        Range reads: byte ranges closer than this (bytes) are merged into one request. The
        rows of one box (gaps of 4 × (2040 − nx) bytes) always merge; 128 KiB (16 rows) keeps
        separate boxes separate unless nearly adjacent (fewer bytes; requests run in parallel).
    recenter
        Range reads: when a row's planned box is the unclipped box centred on its predicted
        pixel (``x_parent``/``y_parent``), re-centre it on the exact pixel of (``ra``, ``dec``)
        from the file's own WCS, as the IBE cutout service does for ``center=ra,dec`` (the
        planner's pixels are predictions, off by a few pixels with SIP). The file keeps the
        planned box's name; its CRPIXnA give the box it holds.
    observations
        Optional observations table (``size``/``checksum``) to check full files' size and MD5;
        manifest columns ``size``/``checksum`` (or ``contentlength``/``contentchecksum``) also work.
    claim_timeout
        Longest wait (s) for a file another fetch (process, thread or host sharing
        ``cache_dir``) is transferring; then its rows fail ("timed out ... waiting"). The
        wait holds no transfer slot; other transfers go on meanwhile.
    stale_claim
        A claim whose lock file nobody has touched for this long (s, measured on this machine's
        clock) is taken over; claimers touch theirs every ``stale_claim / 4`` s (at most 30 s).
        Claims of dead processes on this host are taken over at once.

    ``bytes`` is the number of bytes received for a transfer (retries included), counted
    once per transfer (on its first row; 0 on the other rows it serves and for cache hits);
    ``attempts`` is the number of attempts of the transfer (0 for cache hits).
    """
    df = _manifest_frame(manifest)
    if retries < 0 or max_gap < 0 or (max_concurrency is not None and max_concurrency < 1):
        raise InputError("retries and max_gap must be >= 0 and max_concurrency >= 1")
    try:
        claim_timeout, stale_claim = float(claim_timeout), float(stale_claim)
    except (TypeError, ValueError):
        raise InputError("claim_timeout and stale_claim must be seconds") from None
    if not (claim_timeout >= 0 and stale_claim > 0):
        raise InputError("claim_timeout must be >= 0 and stale_claim > 0 (seconds)")
    try:
        connect_s, read_s = (float(timeout[0]), float(timeout[1])) if isinstance(timeout, (tuple, list)) \
            else (float(timeout), float(timeout))
    except (TypeError, ValueError, IndexError):
        raise InputError(f"timeout must be (connect, read) seconds, got {timeout!r}") from None
    root = os.path.realpath(os.fspath(cache_dir))
    try:
        for d in ("data", "psf", *(f"data/D{i}" for i in range(1, 7))):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        probe = os.path.join(root, f".write-test.{os.getpid()}.{secrets.token_hex(4)}.part")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cache_dir {os.fspath(cache_dir)!r} is not writable: {e}") from e

    df = _extra_info(df.with_row_index("_row"), observations)
    rows = df.to_dicts()
    n = len(rows)
    out_path: list[str | None] = [None] * n
    out_status = ["failed"] * n
    out_bytes = [0] * n
    out_att = [0] * n
    out_err: list[str | None] = [None] * n

    # ---- group rows into tasks ----
    tasks: dict[tuple, Task] = {}
    by_rel: dict[str, Target] = {}
    for i, r in enumerate(rows):
        try:
            access = str(r.get("access") or "").strip().lower()
            url = str(r.get("url") or "")
            if access not in ACCESS:
                raise InputError(f"access {r.get('access')!r} is not one of {ACCESS}")
            if not url.startswith(("http://", "https://")):
                if str(r.get("status") or "") == "failed" and r.get("error") and not r.get("url"):
                    out_err[i] = str(r["error"])  # planned as failed (e.g. box off the image): keep why
                    continue
                raise InputError(f"url {url!r} is not http(s)")
            det = _as_int(r.get("detector"))
            if det is None:
                raise InputError(f"detector {r.get('detector')!r} is not 1-6")
            box = _row_box(r)
            if access == "full":
                rel = local_name(r["obs_id"], det, full=True)
                key = ("full", url)
            elif access == "cutout":
                rel = local_name(r["obs_id"], det, box, request=url)
                key = ("cutout", url)
            else:
                if box is None:
                    raise InputError("range row without a pixel box (box_x0/box_y0/box_nx/box_ny)")
                rel = local_name(r["obs_id"], det, box)
                key = ("range", url)
            path = _inside(root, rel)
        except (InputError, TypeError, ValueError, KeyError) as e:
            out_err[i] = str(e) if isinstance(e, InputError) else f"bad manifest row: {type(e).__name__}: {e}"
            continue
        if rel in by_rel:  # the same file (same box) is already planned by another row/method
            by_rel[rel].rows.append(i)
            out_path[i] = rel
            continue
        t = tasks.get(key)
        if t is None:
            psf_key = r.get("psf_key") or (spherex.psf_key(url, det) if access == "range" else None)
            t = Task(access, url, str(r["obs_id"]), det, [], psf_key=psf_key,
                     size=_as_int(r.get("_size")), md5=(r.get("_md5") or None))
            tasks[key] = t
        tgt = next((x for x in t.targets if x.rel == rel), None)
        if tgt is None:
            request = {"access": access, "url": url}
            if box is not None and access != "full":
                request["box"] = [box.x0, box.y0, box.nx, box.ny]
            tgt = Target(rel, path, box, [], request,
                         center=_recenter_sky(r, box) if access == "range" and recenter else None)
            t.targets.append(tgt)
            by_rel[rel] = tgt
        tgt.rows.append(i)
        out_path[i] = rel

    for d in ("psf", *(f"data/D{i}" for i in range(1, 7))):
        _claims.clean_stale_locks(os.path.join(root, d))
        clean_stale_parts(os.path.join(root, d))

    # ---- cache: keep verified files, queue the rest ----
    todo: list[Task] = []
    for t in tasks.values():
        if t.access == "range" and t.psf_key:
            try:
                psf_path = _inside(root, psf_name(t.psf_key))
            except InputError as e:
                for tg in t.targets:
                    for i in tg.rows:
                        out_err[i] = str(e)
                continue
            t.need_psf = not is_verified(psf_path, required=("PRIMARY", "PSF"))
        pending = []
        for tg in t.targets:
            if t.need_psf:  # its cube is missing: rebuild the cutouts with it (rows are small)
                pending.append(tg)
                continue
            if is_verified(tg.path, md5=t.md5 if t.access == "full" else None, request=tg.request):
                for i in tg.rows:
                    out_status[i] = "done"
                    if str(rows[i].get("status") or "") == "done" and rows[i].get("path") in (tg.rel, tg.path):
                        out_bytes[i] = int(rows[i].get("bytes") or 0)
                        out_att[i] = int(rows[i].get("attempts") or 0)
            else:
                pending.append(tg)
        if pending or t.need_psf:
            t.targets = pending
            todo.append(t)
    n_cached = sum(1 for s in out_status if s == "done")
    log.info("fetch: %d rows, %d transfers to do, %d rows already on disk", n, len(todo), n_cached)

    # ---- run ----
    if todo:
        cutout_cap = max_concurrency or 4
        data_cap = max_concurrency or 8
        workers = max(cutout_cap, data_cap)
        limiters = Limiters({"cutout": cutout_cap, "data": data_cap},
                            {"cutout": min(cutout_cap, 4), "data": data_cap})
        policy = RetryPolicy(retries=int(retries), backoff=float(backoff), max_backoff=float(max_backoff),
                             max_retry_after=float(max_retry_after))
        own_session = session is None
        sess = session if session is not None else default_session(USER_AGENT, workers)
        ua = str(getattr(sess, "headers", {}).get("User-Agent", ""))
        extra_headers = {"User-Agent": USER_AGENT} if ua.startswith("python-requests") else None
        fs = None
        if any(t.access == "range" for t in todo):
            fs = _http_fs(storage_options, connect_s, read_s)
        prog = _Progress(len(todo), progress)
        fetcher = _Fetcher(root, session=sess, fs=fs, policy=policy, limiters=limiters,
                           timeout=(connect_s, read_s), progress=prog, max_gap=int(max_gap),
                           headers=extra_headers, stale_claim=stale_claim, claim_timeout=claim_timeout)
        # range tasks that need a PSF cube first, one per key, so others find it cached
        todo.sort(key=lambda t: (not t.need_psf, t.access != "range"))
        ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spxframe-fetch")

        def record(t: Task) -> None:
            for tg in t.targets:
                for i in sorted(tg.rows):
                    out_att[i] = 0 if tg.rel in t.by_others else t.attempts
                    if tg.rel in t.done:
                        out_status[i], out_err[i] = "done", None
                    else:
                        out_status[i] = "failed"
                        out_err[i] = t.errors.get(tg.rel, "not fetched")
            rows_t = sorted(i for tg in t.targets if tg.rel not in t.by_others for i in tg.rows)
            if rows_t:
                out_bytes[rows_t[0]] = t.bytes

        # targets another fetch is transferring wait here (no thread, no slot), polled with backoff
        waiting: list[tuple[float, float, Task]] = []   # (next poll, delay, task of those targets)
        try:
            futs = {ex.submit(fetcher.run, t) for t in todo}
            while futs or waiting:
                dt = 0.5
                if waiting:
                    dt = max(0.0, min(dt, min(w[0] for w in waiting) - time.monotonic()))
                if futs:
                    finished, futs = wait(futs, timeout=dt, return_when=FIRST_COMPLETED)
                else:
                    finished = set()
                    time.sleep(dt)
                for f in finished:
                    t = f.result()
                    record(t)
                    if t.deferred:
                        w = t.part(t.deferred)
                        w.counted = t.counted
                        waiting.append((time.monotonic() + _POLL[0], _POLL[0], w))
                    elif t.counted:
                        prog.file_done()
                now = time.monotonic()
                still = []
                for due, delay, w in waiting:
                    if due > now:
                        still.append((due, delay, w))
                        continue
                    ended, free, held = [], [], []
                    for tg in w.targets:
                        if fetcher.ready(w, tg, cheap=True):  # made by the other fetch
                            w.done.add(tg.rel)
                            w.by_others.add(tg.rel)
                            ended.append(tg)
                        elif fetcher.watcher.state(tg.path) == "free":  # its claimer failed or died
                            free.append(tg)
                        elif now - (tg.wait_since or now) > claim_timeout:
                            w.errors[tg.rel] = (f"timed out after {claim_timeout:g} s waiting for "
                                                f"{_claims.describe_owner(tg.path)} to fetch {tg.rel}")
                            ended.append(tg)
                        else:
                            held.append(tg)
                    if ended:
                        done_part = w.part(ended)
                        done_part.done, done_part.errors, done_part.by_others = w.done, w.errors, w.by_others
                        record(done_part)
                    if free:
                        p = w.part(free)
                        p.counted = w.counted and not held
                        futs.add(ex.submit(fetcher.run, p))
                    if held:
                        w.targets = held
                        still.append((now + delay, min(_POLL[1], delay * 1.5), w))
                    elif not free and w.counted:
                        prog.file_done()
                waiting = still
        except BaseException:
            fetcher.stop.set()
            ex.shutdown(wait=True, cancel_futures=True)
            prog.close()
            raise
        ex.shutdown(wait=True)
        prog.close()
        for lim in limiters.all():
            log.info("%s: max concurrent %d, %d decreases, final limit %.1f", lim.name, lim.max_active,
                     lim.decreases, lim.limit)
        if own_session:
            sess.close()

    result = df.sort("_row").drop("_row", "_size", "_md5").with_columns(
        pl.Series("path", [os.path.join(root, p) if p and st == "done" else None
                           for p, st in zip(out_path, out_status)], dtype=pl.Utf8),
        pl.Series("status", out_status, dtype=pl.Utf8),
        pl.Series("bytes", out_bytes, dtype=pl.Int64),
        pl.Series("attempts", out_att, dtype=pl.Int32),
        pl.Series("error", out_err, dtype=pl.Utf8),
    )
    n_failed = sum(1 for s in out_status if s != "done")
    if n_failed:
        log.warning("fetch: %d of %d rows failed", n_failed, n)
    return schema.conform(result, schema.MANIFEST)


def _http_fs(storage_options: dict[str, Any] | None, connect_s: float, read_s: float) -> Any:
    """``fsspec.filesystem('http')`` with our User-Agent and timeouts as overridable defaults."""
    import aiohttp
    import fsspec

    so = dict(storage_options or {})
    headers = {"User-Agent": USER_AGENT}
    headers.update(so.pop("headers", None) or {})
    ck = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=connect_s, sock_read=read_s)}
    ck.update(so.pop("client_kwargs", None) or {})
    so.setdefault("skip_instance_cache", True)
    return fsspec.filesystem("http", headers=headers, client_kwargs=ck, **so)
