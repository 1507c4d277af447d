"""TAP plumbing for :mod:`spxframe.archive` (owner: client-plan): a pyvo TAP service with
timeouts, retries (exponential backoff + jitter on 5xx/429, timeouts, connection errors and
truncated bodies), sync → async (UWS) fallback, MAXREC overflow detection, VOTable → Polars."""

from __future__ import annotations

import logging
import random
import threading
import time as _time
import warnings

import numpy as np
import polars as pl
import requests

from spxframe._version import __version__
from spxframe.errors import ArchiveError, ArchiveUnreachable

log = logging.getLogger("spxframe.archive")


class _Session(requests.Session):
    """requests session with a default timeout (pyvo passes none) and our User-Agent."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout
        self.headers["User-Agent"] = f"spxframe/{__version__}"

    def request(self, *args, **kwargs):  # noqa: D102
        kwargs.setdefault("timeout", self._timeout)
        return super().request(*args, **kwargs)


class _Overflow(Exception):
    pass


def _causes(exc: BaseException):
    seen = 0
    while exc is not None and seen < 8:
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
        seen += 1


def _is_timeout(exc: Exception) -> bool:
    return any(isinstance(e, (requests.Timeout, TimeoutError)) for e in _causes(exc))


def _is_connection(exc: Exception) -> bool:
    return any(isinstance(e, (requests.ConnectionError, ConnectionError)) for e in _causes(exc))


def _retryable(exc: Exception) -> bool:
    """5xx / 429 / timeouts / connection errors / truncated bodies (format errors) are retried."""
    from pyvo.dal import DALFormatError

    code = getattr(exc, "code", None) or 0
    return code >= 500 or code == 429 or _is_timeout(exc) or _is_connection(exc) \
        or isinstance(exc, DALFormatError)


class _Tap:
    """One TAP service with retries, sync→async fallback, overflow detection and a query count."""

    def __init__(self, url: str, *, timeout: float, retries: int, maxrec: int, backoff: float) -> None:
        import pyvo

        self.url, self.retries, self.maxrec, self.backoff = url, retries, maxrec, backoff
        self.session = _Session(timeout)
        self.service = pyvo.dal.TAPService(url, session=self.session)
        self.queries = 0
        self.use_async = False
        self.allow_async = True
        self._lock = threading.Lock()

    def run(self, adql: str, uploads: dict | None = None) -> pl.DataFrame:
        from pyvo.dal import DALFormatError, DALQueryError, DALServiceError
        from pyvo.dal.exceptions import DALOverflowWarning

        for attempt in range(self.retries + 1):
            with self._lock:
                self.queries += 1
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DALOverflowWarning)
                    res = self._async(adql, uploads) if self.use_async else \
                        self.service.run_sync(adql, uploads=uploads, maxrec=self.maxrec)
                if str(res.status[0]).lower() == "overflow" or len(res) >= self.maxrec:
                    raise _Overflow()
                return _to_polars(res.to_table())
            except DALQueryError as exc:
                raise ArchiveError(f"TAP query rejected: {exc}", url=self.url,
                                   hint="the service refused the ADQL (unsupported feature or bad option)") from None
            except (DALServiceError, DALFormatError, requests.RequestException) as exc:
                if _is_timeout(exc) and not self.use_async and self.allow_async:
                    log.warning("sync TAP query timed out; switching to async (UWS) jobs")
                    self.use_async = True
                if attempt >= self.retries or not _retryable(exc):
                    if _is_connection(exc) or _is_timeout(exc):
                        err = ArchiveUnreachable(f"TAP query failed after {attempt + 1} attempt(s): {exc}",
                                                 url=self.url, hint="check the network / archive status "
                                                 "(IRSA has maintenance every other Tuesday); retry later")
                        err.timed_out = _is_timeout(exc) and not _is_connection(exc)
                        raise err from None
                    raise ArchiveError(f"TAP query failed: {exc}", url=self.url,
                                       status=getattr(exc, "code", None)) from None
                delay = self.backoff * 2 ** attempt * (0.5 + random.random())
                log.info("TAP attempt %d failed (%s); retrying in %.2f s", attempt + 1, exc, delay)
                _time.sleep(delay)
        raise AssertionError("unreachable")

    def _async(self, adql: str, uploads: dict | None):
        job = self.service.submit_job(adql, uploads=uploads, maxrec=self.maxrec)
        try:
            job.run().wait(phases=["COMPLETED", "ERROR", "ABORTED"], timeout=600.0)
            job.raise_if_error()
            return job.fetch_result()
        finally:
            try:
                job.delete()
            except Exception:  # noqa: BLE001 - cleanup only
                pass


def _to_polars(tbl) -> pl.DataFrame:
    cols = {}
    for name in tbl.colnames:
        a = np.ma.asarray(tbl[name])
        if a.dtype.kind in "SO":
            v = [x.decode() if isinstance(x, bytes) else ("" if x is np.ma.masked or x is None else str(x))
                 for x in a.tolist()]
            cols[name.lower()] = pl.Series(name.lower(), v, dtype=pl.Utf8)
        elif a.dtype.kind == "U":
            cols[name.lower()] = pl.Series(name.lower(), np.ma.filled(a, ""), dtype=pl.Utf8)
        else:
            filled = np.ma.filled(a.astype(float), np.nan) if a.dtype.kind == "f" else np.ma.filled(a, 0)
            cols[name.lower()] = pl.Series(name.lower(), filled)
    return pl.DataFrame(cols)


def _parallel(workers: int, jobs: list) -> None:
    """Run the callables with up to ``workers`` threads; the first exception propagates."""
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            j()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spxframe-tap") as ex:
        for f in [ex.submit(j) for j in jobs]:
            f.result()
