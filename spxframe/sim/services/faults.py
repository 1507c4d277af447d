"""Fault injection for the simulated archive (mutable while serving, deterministic per seed)."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

ENDPOINTS = ("tap", "sia", "datalink", "ibe_file", "ibe_cutout", "cloud", "other")


@dataclass
class Faults:
    """What goes wrong, and how often.

    - ``error_rate``: fraction of requests answered with one of ``error_codes`` (502/503);
      ``error_rates`` overrides it per endpoint group, e.g. ``{'ibe_cutout': 0.3}``.
    - ``latency_s``: added before every response (first byte).
    - ``bandwidth_bps``: cap on the body rate of each response (bytes/s), None = unlimited.
    - ``link_bps``: cap on the body rate of all responses together (bytes/s; one link shared by
      every connection, like a home line), None = unlimited. With ``latency_s`` it emulates a
      user's connection, e.g. ``Faults(link_bps=5e6, latency_s=0.1)``.
    - ``truncate_rate``: fraction of bodies cut mid-way after a full Content-Length header.
    - ``max_cutout_concurrency``: more concurrent cutout requests than this get 503 +
      Retry-After (IRSA ≈ 4); None = unlimited.
    - ``retry_after_s``: the Retry-After value sent with 503s.
    - ``sia_lag_days``: SIA omits frames newer than (newest t_min − lag) (TAP shows them).
    - ``sia_qr3_lag_days``: SIA omits QR3 frames newer than (newest QR3 t_min − lag): the newest
      weekly QR3 data reach TAP before SIA.
    - ``tap_upload_status``: the HTTP status answered to any TAP request carrying an UPLOAD
      (sync or async; e.g. 413 or 500), None = uploads accepted. No public example shows
      ``TAP_UPLOAD`` joined against SPHEREx tables on IRSA.
    - ``endpoints``: endpoint groups that error/latency/bandwidth/truncation apply to
      (None = all; 'other' is never faulted unless named).
    - ``seed``: the random draws are a deterministic sequence per seed.
    """

    error_rate: float = 0.0
    error_rates: dict = field(default_factory=dict)
    error_codes: tuple = (502, 503)
    latency_s: float = 0.0
    bandwidth_bps: float | None = None
    link_bps: float | None = None
    truncate_rate: float = 0.0
    max_cutout_concurrency: int | None = None
    retry_after_s: float = 1.0
    sia_lag_days: float = 0.0
    sia_qr3_lag_days: float = 0.0
    tap_upload_status: int | None = None
    endpoints: tuple | set | frozenset | list | None = None
    seed: int = 0

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._seed_used = self.seed

    def _random(self) -> float:
        with self._lock:
            if self._seed_used != self.seed:  # seed changed while serving: restart the sequence
                self._rng, self._seed_used = random.Random(self.seed), self.seed
            return self._rng.random()

    def applies(self, endpoint: str) -> bool:
        if self.endpoints is None:
            return endpoint != "other"
        return endpoint in self.endpoints

    def draw_error(self, endpoint: str) -> int | None:
        rate = self.error_rates.get(endpoint, self.error_rate)
        if rate <= 0 or not (self.applies(endpoint) or endpoint in self.error_rates):
            return None
        u = self._random()
        if u < rate:
            codes = tuple(self.error_codes) or (502,)
            return codes[int(u / rate * len(codes)) % len(codes)]
        return None

    def draw_truncate(self, endpoint: str) -> bool:
        if self.truncate_rate <= 0 or not self.applies(endpoint):
            return False
        return self._random() < self.truncate_rate

    def latency(self, endpoint: str) -> float:
        return self.latency_s if self.latency_s > 0 and self.applies(endpoint) else 0.0

    def bandwidth(self, endpoint: str) -> float | None:
        return self.bandwidth_bps if self.bandwidth_bps and self.applies(endpoint) else None

    def link(self, endpoint: str) -> float | None:
        """The shared link's cap (bytes/s) for a response of ``endpoint``, None = unlimited."""
        return self.link_bps if self.link_bps and self.applies(endpoint) else None
