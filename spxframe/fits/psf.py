"""PSF zones of a SPHEREx L2 PSF extension (spec §3.6), including the legacy zone-order fix."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from spxframe import spherex

_ZONE_RE = re.compile(r"\((\d+)\s*,\s*(\d+)\)")


@dataclass
class PsfZones:
    """Zone centres (zero-based parent pixels) and the cube plane of each zone (corrected order)."""

    xctr: np.ndarray
    yctr: np.ndarray
    plane: np.ndarray
    legacy: bool
    oversamp: int

    def zone_plane(self, xp: np.ndarray, yp: np.ndarray) -> np.ndarray:
        """Cube plane (0-based) of the nearest zone centre to zero-based parent pixels (xp, yp)."""
        d = (np.asarray(xp)[:, None] - self.xctr[None]) ** 2 + (np.asarray(yp)[:, None] - self.yctr[None]) ** 2
        return self.plane[np.argmin(d, axis=1)]


def is_legacy_version(version: str | None) -> bool:
    """True for pipeline VERSION 6.4 - 6.5.5 without '+psffix1' (spec §3.6)."""
    if not version or "psffix" in str(version):
        return False
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if not m:
        return False
    v = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    return (6, 4, 0) <= v <= (6, 5, 5)


def parse_psf_zones(h, version: str | None) -> PsfZones:
    """Zones from XCTR_k/YCTR_k cards; planes from the '(ix, iy)' comments: plane = iy*ncols + ix.

    Correct headers label card k with zone (ix, iy) where k = iy*ncols + ix + 1. Legacy headers
    (:func:`is_legacy_version`) wrote the centre of zone (ix, iy) on card k = ix*ncols + iy + 1 while
    plane k-1 holds zone k's PSF in the correct order, so the card number cannot be trusted; the
    '(ix, iy)' comment and the centre can. Without parseable comments, the card number is decoded with
    the ordering the VERSION implies.
    """
    fast = _parse_zone_cards(h.raw)
    if fast is not None:
        xs, ys, ixs, iys, ks = fast
    else:
        xs, ys, ixs, iys, ks = _parse_zones_slow(h)
    n = len(xs)
    legacy = is_legacy_version(version)
    ncols = int(round(math.sqrt(n))) if n else 0
    if n and min(ixs) >= 0 and min(iys) >= 0:
        ncols = max(ixs) + 1
        plane = np.array(iys) * ncols + np.array(ixs)
    else:
        kk = np.array(ks) - 1
        plane = (kk % ncols) * ncols + kk // ncols if legacy and ncols else kk
    return PsfZones(np.array(xs), np.array(ys), np.asarray(plane, np.int64), legacy,
                    int(h.get("OVERSAMP", spherex.PSF_OVERSAMP) or spherex.PSF_OVERSAMP))


_CARD_RE = re.compile(rb"([XY])CTR_(\d+) *= *([-+0-9.EeDd]+) */[^/\n]{0,60}?\((\d+)\s*,\s*(\d+)\)")


def _parse_zone_cards(raw: bytes):
    """Fast path: XCTR_k/YCTR_k values and '(ix, iy)' comments by one regex over the raw header."""
    xs: dict[int, float] = {}
    ys: dict[int, float] = {}
    lab: dict[int, tuple[int, int]] = {}
    for axis, k, v, ix, iy in _CARD_RE.findall(raw):
        k = int(k)
        (xs if axis == b"X" else ys)[k] = float(v.replace(b"D", b"E"))
        lab.setdefault(k, (int(ix), int(iy)))
    n = len(xs)
    if n == 0 or set(xs) != set(range(1, n + 1)) or set(ys) != set(xs):
        return None
    ks = list(range(1, n + 1))
    return ([xs[k] for k in ks], [ys[k] for k in ks], [lab[k][0] for k in ks], [lab[k][1] for k in ks], ks)


def _parse_zones_slow(h):
    _ = h.cards  # one full parse: many lookups follow
    xs, ys, ixs, iys, ks = [], [], [], [], []
    k = 1
    while f"XCTR_{k}" in h:
        xs.append(float(h[f"XCTR_{k}"]))
        ys.append(float(h[f"YCTR_{k}"]))
        m = _ZONE_RE.search(h.comment(f"XCTR_{k}"))
        ixs.append(int(m.group(1)) if m else -1)
        iys.append(int(m.group(2)) if m else -1)
        ks.append(k)
        k += 1
    return xs, ys, ixs, iys, ks


class PsfPlanes:
    """A (nplanes, py, px) PSF cube on disk whose planes are read once each, when first needed.

    ``path``/``offset`` locate an external cube (PSFFILE); for a cube inside the data files the
    caller passes the open file and the cube's offset in it (every file with the same ``psf_key``
    holds the same cube). ``cube[k]`` is plane k as stored (big-endian), like the whole-array view.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: np.dtype, path: str | None = None, offset: int = 0):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.path, self.offset = path, offset
        self.planes: dict[int, np.ndarray] = {}

    def load(self, wanted, fd: int | None = None, offset: int = 0) -> None:
        """Read the planes in ``wanted`` (ints; out-of-range ones are ignored) not read yet."""
        import os

        need = sorted({int(k) for k in wanted if 0 <= k < self.shape[0]} - self.planes.keys())
        if not need:
            return
        own = fd is None
        if own:
            fd, offset = os.open(self.path, os.O_RDONLY), self.offset
        try:
            nb = self.shape[1] * self.shape[2] * self.dtype.itemsize
            for k in need:
                buf = os.pread(fd, nb, offset + k * nb)
                if len(buf) != nb:
                    raise OSError(f"truncated PSF cube plane {k}")
                self.planes[k] = np.frombuffer(buf, self.dtype).reshape(self.shape[1:])
        finally:
            if own:
                os.close(fd)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.planes[int(k)]
