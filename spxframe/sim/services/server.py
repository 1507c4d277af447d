"""The simulated IRSA archive over HTTP on 127.0.0.1 (TAP, SIA2, DataLink, IBE, cloud copy).

URL layout (same paths as https://irsa.ipac.caltech.edu, so clients only swap the host):

- ``/TAP/sync``, ``/TAP/async[/<job>[/phase|/results/result|/error|/parameters]]``,
  ``/TAP/capabilities``, ``/TAP/tables``, ``/TAP/availability``
- ``/SIA`` (SIA v2 query), ``/datalink/links/spherex?ID=<obs_publisher_did>``
- ``/ibe/data/spherex/<cloud_key>`` full files (GET/HEAD/Range); ``?center=&size=[&gzip=]`` cutouts
- ``/ibe/data/spherex/<release>/<family>/<token>/<det>/<file>`` calibration products;
  ``/ibe/dir/list/spherex/<release>/<family>`` their listing (JSON lines)
- ``/nasa-irsa-spherex/<cloud_key>`` the cloud copy (GET/HEAD/Range, ETag); ``/nasa-irsa-spherex?list-type=2``
"""

from __future__ import annotations

import argparse
import threading
import time
from http.server import ThreadingHTTPServer

import numpy as np

from spxframe.spherex import RELEASES

from .faults import Faults
from .handler import Handler
from .tables import build_tables, sia_columns
from .tap import TapService


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # quiet on client disconnects
        import sys
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            return
        super().handle_error(request, client_address)


class LinkCap:
    """The user's link (``Faults.link_bps``): one wire shared by every response body. Each chunk
    reserves its time on the wire in arrival order and its sender waits until then, so all
    bodies together never exceed the cap; an idle wire banks no credit (no burst)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free = 0.0  # time.monotonic() at which the wire is free again

    def wait(self, nbytes: int, bps: float) -> None:
        """Block until ``nbytes`` (bytes) have passed a wire of ``bps`` bytes/s after those queued before."""
        with self._lock:
            due = max(time.monotonic(), self._free) + nbytes / bps
            self._free = due
        lag = due - time.monotonic()
        if lag > 0:
            time.sleep(lag)


class Archive:
    """A running (or startable) simulated archive. See ``serve``."""

    def __init__(self, universe, faults: Faults | None = None, port: int = 0, host: str = "127.0.0.1"):
        self.universe = universe
        self.faults = faults if faults is not None else Faults()
        self.host, self._port = host, port
        self.log: list[dict] = []
        self._log_lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.cutouts_active = 0
        self.cutout_lock = threading.Lock()
        self.link = LinkCap()  # Faults.link_bps: all response bodies share it

    # ---- public -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else self._port

    @property
    def tap_url(self) -> str:
        return self.url + "/TAP"

    @property
    def sia_url(self) -> str:
        return self.url + "/SIA"

    @property
    def cloud_url(self) -> str:
        return self.url + "/nasa-irsa-spherex"

    @property
    def datalink_url(self) -> str:
        return self.url + "/datalink/links/spherex"

    def clear_log(self) -> None:
        with self._log_lock:
            self.log.clear()

    def record(self, entry: dict) -> None:
        with self._log_lock:
            self.log.append(entry)

    def start(self) -> Archive:
        if self._httpd is not None:
            return self
        self._httpd = _Server((self.host, self._port), Handler)
        self._httpd.archive = self
        self._prepare()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True, name=f"spxframe-sim-{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd = None

    def __enter__(self) -> Archive:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<spxframe.sim archive {self.url if self._httpd else '(stopped)'}>"

    # ---- internals ----------------------------------------------------------------------
    def _prepare(self) -> None:
        obs = self.universe.observations
        self.obs = obs
        self.tables = build_tables(obs, self.url, self._cal_rows())
        self.tap = TapService(self.tables, self.tap_url)
        self.sia_extra = sia_columns(self.tables["spherex.obscore"], obs, self.url)
        keys = obs["cloud_key"].to_list()
        self.key_index = {k: i for i, k in enumerate(keys)}
        self.did_index = {d: i for i, d in enumerate(obs["obs_publisher_did"].to_list())}
        self.cloud_avail = (obs["cloud_available"].to_numpy().astype(bool) if "cloud_available" in obs.columns
                            else np.ones(obs.height, bool))
        self.sizes = obs["contentlength"].to_numpy() if "contentlength" in obs.columns else None
        self.checksums = obs["contentchecksum"].to_list() if "contentchecksum" in obs.columns else [""] * obs.height
        self.t_min_max = float(obs["t_min"].max()) if obs.height else 0.0
        cal = getattr(self.universe, "cal_products", None)
        self.cal_keys = frozenset(cal()) if cal is not None else frozenset()

    def _cal_rows(self) -> list[tuple[str, str, int]]:
        """(collection, uri, bytes) of the universe's calibration products (none for an older universe)."""
        cal = getattr(self.universe, "cal_products", None)
        if cal is None:
            return []
        return [(RELEASES[rel].cal_collection, "ibe/data/spherex/" + path, self.file_size(path))
                for path, (rel, _, _, _) in sorted(cal().items())]

    def row(self, i: int) -> dict:
        return self.obs.row(i, named=True)

    def file_size(self, key: str) -> int:
        return int(self.universe.file_size(key))

    def sia_hidden(self) -> np.ndarray | None:
        """Rows SIA leaves out under ``faults.sia_qr3_lag_days``: QR3 frames newer than (newest QR3
        t_min - lag). None when the knob is off."""
        lag = float(self.faults.sia_qr3_lag_days)
        if lag <= 0:
            return None
        qr3 = np.isin(self.obs["obs_collection"].to_numpy(), RELEASES["qr3"].collections)
        t = self.obs["t_min"].to_numpy()
        return qr3 & (t > t[qr3].max() - lag) if qr3.any() else None

    def list_size(self, key: str) -> int:
        """The size a bucket listing shows: exact, or a QR3 file's estimate until it is first sized."""
        hint = getattr(self.universe, "size_hint", None)
        return int(hint(key)) if hint is not None else self.file_size(key)


def serve(seed: int = 1, faults: Faults | None = None, port: int = 0, universe=None,
          **universe_kwargs) -> Archive:
    """The simulated archive, as a context manager (or call ``.start()`` / ``.stop()``).

    ``universe``: an existing ``spxframe.sim.Universe``; otherwise one is built with
    ``Universe(seed=seed, **universe_kwargs)`` (e.g. ``releases=("qr2",)`` for a QR2-only sky).
    """
    if universe is not None and universe_kwargs:
        raise TypeError(f"serve(): universe given, so {sorted(universe_kwargs)} cannot be applied")
    if universe is None:
        from ..world.universe import Universe
        universe = Universe(seed=seed, **universe_kwargs)
    return Archive(universe, faults, port)


def main(argv=None) -> int:
    """``spxframe sim serve [--port P] [--seed S]``: serve forever, print the base URL."""
    ap = argparse.ArgumentParser(prog="spxframe sim serve", description="Serve the simulated IRSA archive.")
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any free port)")
    ap.add_argument("--seed", type=int, default=1, help="universe seed")
    ap.add_argument("--qr2-only", action="store_true", help="the QR2-only sky (no QR3 release)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--error-rate", type=float, default=0.0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--max-cutout-concurrency", type=int, default=None)
    args = ap.parse_args(argv)
    faults = Faults(error_rate=args.error_rate, latency_s=args.latency,
                    max_cutout_concurrency=args.max_cutout_concurrency)
    arc = serve(seed=args.seed, faults=faults, port=args.port, releases=("qr2",) if args.qr2_only else ("qr2", "qr3"))
    arc.host = args.host
    arc.start()
    print(arc.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        arc.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
