"""fetch(): bring the pixels a manifest asks for onto local disk, reliably and resumably.

    >>> fetched = spxframe.fetch(manifest, cache_dir="run/")     # manifest from spxframe.plan()

Three access methods (manifest column ``access``):

- ``cutout``: GET the planned IBE cutout URL (requests, streamed to disk);
- ``range``: byte-range reads of the cloud copy through fsspec HTTP: headers, the rows of
  IMAGE/FLAGS/VARIANCE/ZODI covering each box (coalesced per file), WCS-WAVE; a local cutout is
  written with the same HDUs and header changes as an IBE cutout, except the PSF HDU, which keeps
  its header but no data and points (``PSFFILE``) at ``psf/<psf_key>.fits``, fetched once per key;
- ``full``: the whole file, streamed to disk (MD5-checked when the archive gives one).

The cloud copy may lag the archive: a cloud object that answers 404 (NoSuchKey) is fetched from
IBE instead (whole files: the IBE file; range rows: an IBE cutout of each box, into the same local
file), remembered for the rest of the run in this process (later transfers of it go straight to
IBE), and the manifest that fetch() returns says what was used (``access``, ``url``).

The steps: the manifest's rows become transfer tasks, one per URL (:mod:`~spxframe.fetcher.tasks`);
verified files in the cache (:mod:`~spxframe.fetcher.cache`, which gives the layout) are kept;
the rest run in worker threads (:mod:`~spxframe.fetcher.worker`) under per-host adaptive limits
with retries (:mod:`~spxframe.fetcher.http`); the results go back into the manifest. A file only
reaches its final name after verification; reruns skip verified files. A transfer that fails
after its retry budget marks its rows ``status='failed'`` with the error; only input/programming
errors raise.

Concurrent fetches into one cache (processes, threads, hosts sharing a filesystem) make each file
once: a fetch claims a file (``<file>.lock``, :mod:`~spxframe.fetcher.claims`) before
transferring it; another fetch that needs the same file waits for it (:class:`claims.Wait`,
polled by the scheduler: no thread and no transfer slot held; a PSF cube a range read needs is
waited for in its worker thread, still without a slot), goes on with its other transfers, and
fetches the file itself if the claimer failed or died (``stale_claim``); it waits at most
``claim_timeout`` per file, then marks the rows failed.

Sizes are bytes, times seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import polars as pl

from spxframe.errors import InputError
from spxframe.fetcher import claims
from spxframe.fetcher.cache import CacheDir
from spxframe.fetcher.cloudfs import http_fs
from spxframe.fetcher.http import CUTOUT_START, USER_AGENT, Limiters, RetryPolicy, default_session
from spxframe.fetcher.tasks import Outcome, Task, make_tasks, manifest_frame, still_to_fetch, with_archive_info
from spxframe.fetcher.worker import Worker
from spxframe.progress import bar as progress_bar

__all__ = ["fetch", "USER_AGENT"]

log = logging.getLogger("spxframe.fetch")


def fetch(manifest: Any, *, cache_dir: str | os.PathLike | CacheDir, max_concurrency: int | None = None,
          storage_options: dict[str, Any] | None = None, session: Any = None, progress: bool = True,
          retries: int = 5, timeout: tuple[float, float] = (10.0, 120.0), backoff: float = 0.5,
          max_backoff: float = 30.0, max_retry_after: float = 60.0, max_gap: int = 128 * 1024,
          recenter: bool = True, observations: pl.DataFrame | None = None,
          claim_timeout: float = claims.DEFAULT_WAIT_S, stale_claim: float = claims.DEFAULT_STALE_S
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
        Root of the local files: a folder (``~`` and ``file://`` accepted) or the run's
        :class:`~spxframe.fetcher.cache.CacheDir` (created; must be writable, else
        :class:`InputError`).
    max_concurrency
        Cap on simultaneous requests per host and on worker threads. Default: 4 for IBE
        cutouts, 8 for files and ranges. IBE cutouts start at two at a time (IRSA's cutout
        service answered 503 at four and was fine at two) and grow additively up to the cap only
        while no 503 comes back; a 503/429 halves the limit (never below 1), keeps it below the
        level that was overloaded (tried again only after a quiet spell) and holds new requests
        until the server's ``Retry-After`` (at most ``max_retry_after``) has passed.
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
    df = manifest_frame(manifest)
    s = _settings(retries=retries, max_gap=max_gap, max_concurrency=max_concurrency, timeout=timeout,
                  claim_timeout=claim_timeout, stale_claim=stale_claim)
    cache = CacheDir.of(cache_dir).prepare()
    df = with_archive_info(df.with_row_index("_row"), observations)
    out = Outcome(df.to_dicts())
    tasks = make_tasks(out, cache, recenter=recenter)
    cache.sweep()
    todo = still_to_fetch(tasks, out, cache)
    log.info("fetch: %d rows, %d transfers to do, %d rows already on disk", len(out.rows), len(todo), out.n_done)
    if todo:
        policy = RetryPolicy(retries=int(retries), backoff=float(backoff), max_backoff=float(max_backoff),
                             max_retry_after=float(max_retry_after))
        _run(todo, out, cache, s, policy, session=session, storage_options=storage_options, progress=progress)
    n_failed = len(out.rows) - out.n_done
    if n_failed:
        log.warning("fetch: %d of %d rows failed", n_failed, len(out.rows))
    return out.frame(df, cache.root)


# --------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    max_concurrency: int | None
    max_gap: int
    timeout: tuple[float, float]   # (connect, read) s
    claim_timeout: float
    stale_claim: float


def _settings(*, retries: int, max_gap: int, max_concurrency: int | None, timeout: Any,
              claim_timeout: Any, stale_claim: Any) -> _Settings:
    """fetch()'s arguments checked; :class:`InputError` for bad ones."""
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
    return _Settings(max_concurrency, int(max_gap), (connect_s, read_s), claim_timeout, stale_claim)


# --------------------------------------------------------------------------------------
# running the transfers
# --------------------------------------------------------------------------------------


def _run(todo: list[Task], out: Outcome, cache: CacheDir, s: _Settings, policy: RetryPolicy, *,
         session: Any, storage_options: dict[str, Any] | None, progress: bool) -> None:
    """Run the transfers: worker threads under per-host limits; waits for other fetches' files in
    this thread. Fills ``out``."""
    cutout_cap = s.max_concurrency or 4   # IRSA's cutout service answers 503 beyond about 4
    data_cap = s.max_concurrency or 8
    workers = max(cutout_cap, data_cap)
    limiters = Limiters({"cutout": cutout_cap, "data": data_cap},
                        {"cutout": min(cutout_cap, CUTOUT_START), "data": data_cap})
    own_session = session is None
    sess = default_session(USER_AGENT, workers) if own_session else session
    ua = str(getattr(sess, "headers", {}).get("User-Agent", ""))
    fs = http_fs(storage_options, *s.timeout) if any(t.access == "range" for t in todo) else None
    prog = _Progress(len(todo), progress)
    worker = Worker(cache, session=sess, fs=fs, policy=policy, limiters=limiters, timeout=s.timeout,
                    on_bytes=prog.add_bytes, max_gap=s.max_gap,
                    headers={"User-Agent": USER_AGENT} if ua.startswith("python-requests") else None,
                    stale_claim=s.stale_claim, claim_timeout=s.claim_timeout)
    todo.sort(key=lambda t: (not t.need_psf, t.access != "range"))  # one PSF cube per key first: others find it
    try:
        _Scheduler(worker, out, prog, workers).run(todo)
    finally:
        prog.close()
    for lim in limiters.all():
        log.info("%s: max concurrent %d, %d decreases, final limit %.1f", lim.name, lim.max_active,
                 lim.decreases, lim.limit)
    if own_session:
        sess.close()


class _Scheduler:
    """Runs tasks in a thread pool and waits for the files other fetches are making (a task's
    ``deferred`` targets) here, polling their :class:`claims.Wait` s: no thread, no slot held."""

    def __init__(self, worker: Worker, out: Outcome, prog: _Progress, workers: int) -> None:
        self.worker, self.out, self.prog = worker, out, prog
        self.ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spxframe-fetch")
        self.running: dict[Future, Task] = {}
        self.waiting: list[Task] = []   # tasks whose targets are all held by other fetches

    def run(self, todo: list[Task]) -> None:
        try:
            for t in todo:
                self._submit(t)
            while self.running or self.waiting:
                self._collect(self._next_look())
                self._look()
        except BaseException:
            self.worker.stop.set()
            self.ex.shutdown(wait=True, cancel_futures=True)
            for f, t in self.running.items():   # never started: let go of the claims taken for it
                if f.cancelled():
                    for tg in t.targets:
                        if tg.claim is not None:
                            tg.claim.release()
            raise
        self.ex.shutdown(wait=True)

    def _submit(self, t: Task) -> None:
        self.running[self.ex.submit(self.worker.run, t)] = t

    def _next_look(self) -> float:
        dt = 0.5
        if self.waiting:
            due = min((tg.wait.due for w in self.waiting for tg in w.targets if tg.wait is not None),
                      default=time.monotonic())
            dt = max(0.0, min(dt, due - time.monotonic()))
        return dt

    def _collect(self, dt: float) -> None:
        """Record the tasks that end within ``dt`` s; their deferred targets start waiting."""
        if not self.running:
            time.sleep(dt)
            return
        finished, _ = wait(set(self.running), timeout=dt, return_when=FIRST_COMPLETED)
        for f in finished:
            del self.running[f]
            t = f.result()
            self.out.record(t)
            for fb in t.fallback:   # IBE transfers in place of a cloud object that is not there
                self._submit(fb)
            if t.deferred:
                self.waiting.append(t.part(t.deferred))
            elif t.counted:
                self.prog.file_done()

    def _look(self) -> None:
        """One look at each waited-for file that is due: made by the other fetch (done), ours
        now (its claimer failed or died: transfer it), timed out (failed) or still held."""
        now = time.monotonic()
        still: list[Task] = []
        for w in self.waiting:
            ended, free, held = [], [], []
            for tg in w.targets:
                assert tg.wait is not None
                if tg.wait.due > now:
                    held.append(tg)
                    continue
                try:
                    got = tg.wait.step()
                except claims.ClaimTimeout as e:
                    w.errors[tg.rel] = str(e)
                    got = None
                if got is False:
                    held.append(tg)
                    continue
                if isinstance(got, claims.Claim):
                    tg.claim, tg.wait = got, None
                    free.append(tg)
                    continue
                if got is True:
                    w.done.add(tg.rel)
                w.by_others.add(tg.rel)
                ended.append(tg)
            self._settle(w, ended, free, held, still)
        self.waiting = still

    def _settle(self, w: Task, ended: list, free: list, held: list, still: list[Task]) -> None:
        if ended:
            done_part = w.part(ended)
            done_part.done, done_part.errors, done_part.by_others = w.done, w.errors, w.by_others
            self.out.record(done_part)
        if free:
            p = w.part(free)
            p.counted = w.counted and not held
            self._submit(p)
        if held:
            w.targets = held
            still.append(w)
        elif not free and w.counted:
            self.prog.file_done()


class _Progress:
    """The fetch bar: made here (``progress=True``) or the caller's own (a tqdm-like object with
    ``update``, shared by several fetches of one run; it is not closed here)."""

    def __init__(self, total: int, enabled: bool | Any) -> None:
        self.bar, self.own = None, False
        if hasattr(enabled, "update"):
            self.bar = enabled
        elif enabled and total:
            self.bar, self.own = progress_bar(total=total, unit="file", desc="fetch"), True
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
        if self.bar is not None and self.own:
            self.bar.close()
