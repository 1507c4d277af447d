"""HTTP transfers for :func:`spxframe.fetch`: retry policy, per-host adaptive concurrency (AIMD),
streamed downloads to a given temporary file (requests) and byte-range reads (fsspec HTTP /
aiohttp), with errors classified as transient (retry) or permanent. File bookkeeping (names,
sidecars, verification) is :mod:`spxframe.fetcher.cache`'s.

Times are in seconds, sizes in bytes.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from spxframe._version import __version__

log = logging.getLogger("spxframe.fetch")

USER_AGENT = f"spxframe/{__version__}"

#: longest wait for one batch of range requests (s) before they count as failed and are retried
BATCH_TIMEOUT_S = 120.0
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
OVERLOAD_STATUS = frozenset({429, 503})
#: IBE cutouts start this many at a time: IRSA's cutout service answered 503 at four concurrent
#: requests and was fine at two (issue 14); the limit grows from there only while no 503 comes back
CUTOUT_START = 2
#: successes at a limiter's ceiling before the level that was overloaded is tried again (doubles per failure)
PROBE_AFTER = 16
PROBE_MAX = 1024


class Cancelled(Exception):
    """The run was interrupted (Ctrl-C); transfers stop at the next chunk."""


class TransferError(Exception):
    """One attempt failed. ``transient`` says whether a retry may help."""

    def __init__(self, message: str, *, transient: bool, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient, self.status, self.retry_after = transient, status, retry_after


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` (delta-seconds or HTTP-date) in seconds from now; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        t = email.utils.parsedate_to_datetime(value)
        return max(0.0, t.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def status_error(status: int, url: str, retry_after: str | None = None, body: str = "") -> TransferError:
    """A :class:`TransferError` for an HTTP error status (5xx/408/429 transient, others not)."""
    ra = parse_retry_after(retry_after)
    msg = f"HTTP {status} for {url}"
    if body:
        msg += f": {body.strip()[:200]}"
    return TransferError(msg, transient=status in RETRY_STATUS, status=status, retry_after=ra)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with exponential backoff and full jitter.

    ``retries``: retries after the first attempt; ``backoff``: base delay (s), doubled per
    attempt up to ``max_backoff`` (s); ``Retry-After`` is honoured but capped at
    ``max_retry_after`` (s)."""

    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        d = random.uniform(0.5, 1.0) * min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_retry_after) + random.uniform(0, 0.1))
        return d


class HostLimiter:
    """Adaptive concurrency for one host (and request kind): additive increase, multiplicative
    decrease, with a remembered ceiling.

    At most ``floor(limit)`` requests run at once, starting at ``initial``. The limit grows by
    ``1/limit`` per success (about +1 per round of successes) up to ``cap``, but only up to the
    ``ceiling`` (``cap`` until a 503/429 comes back). On a 503/429 (once per congestion event:
    only answers to requests started after the last decrease count) the limit halves (never below
    1), the ceiling becomes one less than the limit that was overloaded, and no request starts
    before the server's ``Retry-After`` has passed. A level that was overloaded is tried again
    only after ``probe_after`` successes at the ceiling, an interval that doubles (up to
    :data:`PROBE_MAX`) each time the retry meets another 503. Times are seconds."""

    def __init__(self, cap: int, initial: float | None = None, name: str = "", *, probe_after: int = PROBE_AFTER,
                 max_pause: float = 60.0) -> None:
        self.cap = max(1, int(cap))
        self.limit = float(min(self.cap, initial if initial is not None else self.cap))
        self.ceiling = self.cap
        self.probe_after = max(1, int(probe_after))
        self.max_pause = float(max_pause)
        self.active = 0
        self.name = name
        self._cond = threading.Condition()
        self._last_decrease = 0.0
        self._resume_at = 0.0       # monotonic time before which no request starts (Retry-After)
        self._ok_at_ceiling = 0
        self.decreases = 0
        self.max_active = 0

    @contextmanager
    def slot(self, stop: threading.Event | None = None) -> Iterator[float]:
        """Hold one request slot; yields the start time (s, monotonic)."""
        with self._cond:
            while self.active >= max(1, int(self.limit)) or time.monotonic() < self._resume_at:
                if stop is not None and stop.is_set():
                    raise Cancelled()
                self._cond.wait(min(0.2, max(0.01, self._resume_at - time.monotonic())))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        t0 = time.monotonic()
        try:
            yield t0
        finally:
            with self._cond:
                self.active -= 1
                self._cond.notify_all()

    def success(self) -> None:
        with self._cond:
            top = float(min(self.cap, self.ceiling))
            if self.limit >= top and self.ceiling < self.cap:
                self._ok_at_ceiling += 1
                if self._ok_at_ceiling >= self.probe_after:   # quiet long enough: try one more
                    self.ceiling, self._ok_at_ceiling = self.ceiling + 1, 0
                    top += 1.0
            self.limit = min(top, self.limit + 1.0 / max(self.limit, 1.0))
            self._cond.notify_all()

    def overload(self, started: float, retry_after: float | None = None) -> None:
        """A 503/429 to a request started at ``started`` (monotonic s); ``retry_after`` (s) the server's
        Retry-After, honoured up to ``max_pause``."""
        with self._cond:
            now = time.monotonic()
            if retry_after:
                self._resume_at = max(self._resume_at, now + min(float(retry_after), self.max_pause))
            if started >= self._last_decrease:
                level = max(1, int(self.limit))
                if level > self.ceiling - 1 and self.ceiling < self.cap:   # a retried level failed again
                    self.probe_after = min(PROBE_MAX, 2 * self.probe_after)
                self.ceiling = max(1, level - 1)
                self._ok_at_ceiling = 0
                self.limit = max(1.0, min(self.limit / 2.0, float(self.ceiling)))
                self._last_decrease = now
                self.decreases += 1
                log.info("%s: server overloaded at %d concurrent, limit now %d (at most %d)", self.name, level,
                         int(self.limit), self.ceiling)
            self._cond.notify_all()


class Limiters:
    """One :class:`HostLimiter` per (host, kind); ``kind`` is 'cutout' or 'data'."""

    def __init__(self, caps: dict[str, int], initial: dict[str, float] | None = None) -> None:
        self.caps, self.initial = caps, initial or {}
        self._by: dict[tuple[str, str], HostLimiter] = {}
        self._lock = threading.Lock()

    def get(self, url: str, kind: str) -> HostLimiter:
        host = urlsplit(url).netloc
        with self._lock:
            lim = self._by.get((host, kind))
            if lim is None:
                lim = HostLimiter(self.caps.get(kind, 4), self.initial.get(kind), f"{host} [{kind}]")
                self._by[(host, kind)] = lim
            return lim

    def all(self) -> list[HostLimiter]:
        return list(self._by.values())


def call_with_retries(fn: Callable[[int], Any], *, policy: RetryPolicy, limiter: HostLimiter,
                      stop: threading.Event, what: str) -> tuple[Any, int]:
    """Run ``fn(attempt)`` under a limiter slot until it succeeds or the budget is spent.

    Returns (result, attempts). Raises the last :class:`TransferError` (with
    ``.attempts`` set) when attempts are exhausted or the error is permanent."""
    attempt = 0
    while True:
        attempt += 1
        if stop.is_set():
            raise Cancelled()
        started = time.monotonic()
        try:
            with limiter.slot(stop) as started:
                result = fn(attempt)
            limiter.success()
            return result, attempt
        except TransferError as e:
            e.attempts = attempt  # type: ignore[attr-defined]
            if e.status in OVERLOAD_STATUS:
                limiter.overload(started, min(e.retry_after, policy.max_retry_after) if e.retry_after else None)
            if not e.transient or attempt > policy.retries:
                raise
            d = policy.delay(attempt, e.retry_after)
            log.debug("%s: attempt %d failed (%s); retry in %.2f s", what, attempt, e, d)
            if stop.wait(d):
                raise Cancelled() from e


# --------------------------------------------------------------------------------------
# streamed GET to a temporary file (requests)
# --------------------------------------------------------------------------------------


#: seconds of recent latency probes (single small range reads, time to a whole file's headers):
#: the link's time per request
REQUEST_SECONDS: collections.deque = collections.deque(maxlen=2000)
LATENCY_PROBE_BYTES = 64 * 1024


def request_seconds(min_samples: int = 5) -> float | None:
    """Median seconds of the recent single small range reads in this process (header reads: their
    time is the request's round trip, not the bytes), None with fewer than ``min_samples``."""
    s = sorted(REQUEST_SECONDS)
    return float(s[len(s) // 2]) if len(s) >= min_samples else None


@dataclass
class Download:
    nbytes: int
    md5: str
    content_length: int | None
    headers: dict[str, str]
    complete: bool = True  #: False when ``enough`` stopped the stream before its end


def stream_to_file(session: requests.Session, url: str, tmp: str, *, timeout: tuple[float, float],
                   stop: threading.Event, on_bytes: Callable[[int], None] | None = None,
                   chunk: int = 1 << 20, headers: dict[str, str] | None = None,
                   latency_probe: bool = False,
                   enough: Callable[[bytearray], bool | None] | None = None) -> Download:
    """One streamed GET of ``url`` into ``tmp`` (truncated first). Checks the status and that
    the body length equals Content-Length; raises :class:`TransferError`. ``latency_probe``: the
    time to the response headers is the link's round trip (a file, not a cutout the server
    builds first) and joins :data:`REQUEST_SECONDS`. ``enough``: called with the body so far
    after each 64 KiB; once it answers True the connection is closed and the rest never
    travels (the :class:`Download` is then not ``complete``; the caller completes the file);
    None means never (it is not asked again)."""
    h = hashlib.md5()
    n = 0
    head = bytearray() if enough is not None else None
    if enough is not None:
        chunk = min(chunk, 1 << 16)
    t0 = time.perf_counter()
    try:
        with session.get(url, stream=True, timeout=timeout, headers=headers) as r:
            if latency_probe and r.status_code == 200:
                REQUEST_SECONDS.append(time.perf_counter() - t0)
            if r.status_code >= 400:
                body = ""
                try:
                    if int(r.headers.get("Content-Length") or 0) < 4096:
                        body = r.text
                except Exception:  # noqa: BLE001 — the body is only for the message
                    pass
                raise status_error(r.status_code, url, r.headers.get("Retry-After"), body)
            if r.status_code != 200:
                raise TransferError(f"unexpected HTTP {r.status_code} for {url}", transient=True,
                                    status=r.status_code)
            encoded = r.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
            cl = r.headers.get("Content-Length")
            clen = int(cl) if cl and cl.isdigit() and not encoded else None
            with open(tmp, "wb") as f:
                for block in r.iter_content(chunk):
                    if stop.is_set():
                        raise Cancelled()
                    f.write(block)
                    h.update(block)
                    n += len(block)
                    if on_bytes is not None:
                        on_bytes(len(block))
                    if head is not None:
                        head += block
                        stop_here = enough(head)  # type: ignore[misc]
                        if stop_here:
                            return Download(n, h.hexdigest(), clen, dict(r.headers), complete=False)
                        if stop_here is None:
                            head = None
            if clen is not None and n != clen:
                raise TransferError(f"short body from {url}: {n} of {clen} bytes", transient=True)
            return Download(n, h.hexdigest(), clen, dict(r.headers))
    except TransferError:
        raise
    except Cancelled:
        raise
    except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError) as e:
        raise TransferError(f"{type(e).__name__} after {n} bytes from {url}: {e}", transient=True) from e
    except requests.RequestException as e:
        raise TransferError(f"{type(e).__name__} for {url}: {e}", transient=False) from e
    except OSError as e:  # local disk: not something a retry fixes
        raise TransferError(f"writing {tmp}: {e}", transient=False) from e


# --------------------------------------------------------------------------------------
# byte ranges (fsspec HTTP file system; its aiohttp session and storage_options)
# --------------------------------------------------------------------------------------


def _content_range_total(v: str | None) -> int | None:
    if not v or "/" not in v:
        return None
    tot = v.rsplit("/", 1)[1].strip()
    return int(tot) if tot.isdigit() else None


async def _get_range(fs: Any, url: str, start: int, stop: int) -> tuple[bytes, int | None]:
    """GET bytes [start, stop) through the fsspec HTTP file system's session and request
    options. Returns (data, total file size from Content-Range or None)."""
    import aiohttp

    session = await fs.set_session()
    kw = dict(fs.kwargs)
    headers = dict(kw.pop("headers", None) or {})
    headers["Range"] = f"bytes={start}-{stop - 1}"
    try:
        async with session.get(fs.encode_url(url), headers=headers, **kw) as r:
            if r.status >= 400:
                body = ""
                if r.status < 500:
                    try:
                        body = (await r.read())[:300].decode("utf-8", "replace")
                    except Exception:  # noqa: BLE001
                        pass
                raise status_error(r.status, url, r.headers.get("Retry-After"), body)
            if r.status == 200:  # Range ignored: do not pull a whole file per range
                cl = r.headers.get("Content-Length")
                if not (start == 0 and cl and cl.isdigit() and int(cl) <= stop):
                    raise TransferError(f"{url} ignores Range requests (HTTP 200); use access='full'",
                                        transient=False, status=200)
            data = await r.read()
            total = _content_range_total(r.headers.get("Content-Range"))
            if r.status == 200:  # the whole (small) object came back
                total = len(data)
                data = data[start:stop]
            cl = r.headers.get("Content-Length")
            if cl and cl.isdigit() and r.status == 206 and int(cl) != len(data):
                raise TransferError(f"short range body from {url}: {len(data)} of {cl} bytes", transient=True)
    except TransferError:
        raise
    except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
            aiohttp.ClientConnectionError, aiohttp.ClientOSError, ConnectionError) as e:
        raise TransferError(f"{type(e).__name__} reading bytes {start}-{stop} of {url}: {e}",
                            transient=True) from e
    except aiohttp.ClientError as e:
        raise TransferError(f"{type(e).__name__} reading {url}: {e}", transient=True) from e
    if len(data) != stop - start:
        if total is not None and stop > total:
            if len(data) == total - start:  # asked past the end: the server sent what exists
                return data, total
            raise TransferError(f"range {start}-{stop} beyond the end of {url} ({total} bytes)",
                                transient=False)
        raise TransferError(f"short range from {url}: {len(data)} of {stop - start} bytes", transient=True)
    return data, total


class RangeClient:
    """Byte-range reads of cloud objects through ``fsspec.filesystem('http', **storage_options)``.

    ``read(url, ranges)`` fetches many ranges concurrently (at most ``parallel`` at once),
    retries only the failed ones with backoff, and returns their bytes in order."""

    def __init__(self, fs: Any, *, policy: RetryPolicy, limiters: Limiters, stop: threading.Event,
                 on_bytes: Callable[[int], None] | None = None, parallel: int = 8) -> None:
        self.fs, self.policy, self.limiters, self.stop = fs, policy, limiters, stop
        self.on_bytes, self.parallel = on_bytes, parallel
        self.requests = 0

    def read(self, url: str, ranges: list[tuple[int, int]]) -> tuple[list[bytes], int | None, int]:
        """Returns (bytes per range, file size if the server told it, attempts used)."""
        out: list[bytes | None] = [None] * len(ranges)
        total: list[int | None] = [None]
        pending = list(range(len(ranges)))
        limiter = self.limiters.get(url, "data")
        attempt = 0
        while pending:
            attempt += 1
            if self.stop.is_set():
                raise Cancelled()
            with limiter.slot(self.stop) as started:
                self.requests += len(pending)
                res = self._batch(url, [ranges[i] for i in pending])
            failed, worst = self._sort_out(url, pending, res, out, total, attempt)
            if worst is not None and worst.status in OVERLOAD_STATUS:
                limiter.overload(started, min(worst.retry_after or 0.0, self.policy.max_retry_after))
            elif not failed:
                limiter.success()
            pending = failed
            if pending:
                assert worst is not None
                if attempt > self.policy.retries:
                    worst.attempts = attempt  # type: ignore[attr-defined]
                    raise worst
                d = self.policy.delay(attempt, worst.retry_after)
                log.debug("%s: %d range(s) failed (%s); retry in %.2f s", url, len(pending), worst, d)
                if self.stop.wait(d):
                    raise Cancelled()
        return [b for b in out if b is not None], total[0], attempt  # type: ignore[misc]

    def _batch(self, url: str, ranges: list[tuple[int, int]]) -> list[Any]:
        """GET the ranges concurrently (at most ``parallel`` at once); a result or an exception each."""
        from fsspec.asyn import FSTimeoutError, sync

        async def batch() -> list[Any]:
            sem = asyncio.Semaphore(self.parallel)

            async def one(r: tuple[int, int]) -> Any:
                async with sem:
                    return await _get_range(self.fs, url, *r)
            return await asyncio.gather(*(one(r) for r in ranges), return_exceptions=True)

        try:  # a batch must never hang a fetch: past the bound its ranges count as a transient failure
            t0 = time.perf_counter()
            res = sync(self.fs.loop, batch, timeout=BATCH_TIMEOUT_S)
            if len(ranges) == 1 and ranges[0][1] - ranges[0][0] <= LATENCY_PROBE_BYTES \
                    and not isinstance(res[0], BaseException):
                REQUEST_SECONDS.append(time.perf_counter() - t0)
            return res
        except FSTimeoutError:
            log.warning("%s: %d range request(s) still unanswered after %.0f s; retrying", url, len(ranges),
                        BATCH_TIMEOUT_S)
            err = TransferError(f"{url}: range requests unanswered after {BATCH_TIMEOUT_S:.0f} s", transient=True)
            return [err] * len(ranges)

    def _sort_out(self, url: str, pending: list[int], res: list[Any], out: list[bytes | None],
                  total: list[int | None], attempt: int) -> tuple[list[int], TransferError | None]:
        """Store the ranges that came back in ``out`` (and the file size in ``total[0]``); returns
        the indices to retry and the error that decides the wait (a permanent one raises)."""
        failed: list[int] = []
        worst: TransferError | None = None
        for i, r in zip(pending, res):
            if isinstance(r, BaseException):
                e = r if isinstance(r, TransferError) else TransferError(
                    f"{type(r).__name__} reading {url}: {r}", transient=True)
                if not e.transient:
                    e.attempts = attempt  # type: ignore[attr-defined]
                    raise e
                failed.append(i)
                if worst is None or (e.retry_after or 0) > (worst.retry_after or 0) or e.status in OVERLOAD_STATUS:
                    worst = e
            else:
                data, tot = r
                out[i] = data
                total[0] = tot if tot is not None else total[0]
                if self.on_bytes is not None:
                    self.on_bytes(len(data))
        return failed, worst


def default_session(user_agent: str, pool: int) -> requests.Session:
    """A requests Session with a connection pool of ``pool`` per host and our User-Agent."""
    s = requests.Session()
    ad = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=max(pool, 4), max_retries=0)
    s.mount("http://", ad)
    s.mount("https://", ad)
    s.headers["User-Agent"] = user_agent
    return s
