"""The cloud copy's file system for byte-range reads: one fsspec HTTP file system per process
and set of options (:func:`http_fs`)."""

from __future__ import annotations

import json
import threading
from typing import Any

from spxframe.fetcher.http import USER_AGENT

_FS_CACHE: dict[str, Any] = {}
_FS_LOCK = threading.Lock()


def http_fs(storage_options: dict[str, Any] | None, connect_s: float, read_s: float) -> Any:
    """``fsspec.filesystem('http')`` with our User-Agent and timeouts as overridable defaults;
    one instance per process and set of options, kept for the process's life. (An instance that
    is garbage-collected closes its aiohttp session from whichever thread collects it — a Dask
    worker's event loop, say — through fsspec's loop; mid-run that was seen to hang a worker's
    range reads. Kept alive, its session closes only at exit.)"""
    key = json.dumps([storage_options or {}, connect_s, read_s], sort_keys=True, default=repr)
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            fs = _FS_CACHE[key] = _new_http_fs(storage_options, connect_s, read_s)
        return fs


def _new_http_fs(storage_options: dict[str, Any] | None, connect_s: float, read_s: float) -> Any:
    import aiohttp
    import fsspec

    so = dict(storage_options or {})
    headers = {"User-Agent": USER_AGENT}
    headers.update(so.pop("headers", None) or {})
    ck = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=connect_s, sock_read=read_s)}
    ck.update(so.pop("client_kwargs", None) or {})
    so.setdefault("skip_instance_cache", True)
    return fsspec.filesystem("http", headers=headers, client_kwargs=ck, **so)
