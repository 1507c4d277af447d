"""QR3 (R7) flag content: the new bits, set where they belong, with the light they mark (spec §3.9, §4).

- ``BLOOM`` over the whole core of every saturated source (a disc of ``bloom_radius`` px; QR2
  marked only the ``OVERFLOW`` pixels), ringed by ``HALO``;
- ``GHOST``, ``CROSSTALK`` and ``STREAK`` patches near a random fraction of the other sources,
  each adding light (crosstalk: negative) to exactly the pixels it flags, so that a client which
  wrongly keeps these bits measures a biased flux and one that rejects them does not (a patch
  never covers the pixel holding the source, so the usable area stays well over half);
- a few ``SNOWBALL`` discs and faint ``GHOST_FPA`` discs anywhere in the frame.

Everything is a pure function of the frame's identity (seed, obs_index, detector) and its source
list, drawn once per frame as a small table of shapes (:class:`Patches`); any box of rows and
columns is then painted on demand (FLAGS bits and IMAGE light), and the whole-frame pixel count
per bit (the IMAGE ``L2 N_<FLAG>`` cards) comes from the shapes alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spxframe.spherex import NPIX

from .bits import R7_NEW_BITS

DISC, RING, LINE = 0, 1, 2


@dataclass(frozen=True)
class PatchConfig:
    """Knobs of the QR3 flag content (amplitudes are fractions of the source's ``peak``, the surface
    brightness, MJy/sr, of its whole flux in one pixel)."""

    fraction: float = 0.08  #: share of unsaturated sources given a GHOST/CROSSTALK/STREAK patch
    bloom_radius: float = 3.0  #: px, BLOOM disc on a saturated core
    halo_radius: float = 6.0  #: px, outer radius of the HALO ring around it
    #: (offset of the patch from the source px, radius px, amplitude); offset - radius > 0.71 px, so
    #: a patch never covers the pixel that holds the source (its centre lies within 0.71 px)
    ghost: tuple[float, float, float] = (1.8, 1.0, 0.08)
    crosstalk: tuple[float, float, float] = (1.6, 0.8, -0.06)
    #: a streak passes ``offset`` px from the source (perpendicular distance), ``radius`` = half-width
    streak: tuple[float, float, float] = (1.3, 0.5, 0.03)
    streak_length: float = 40.0  #: px
    snowballs: float = 6.0  #: mean number per frame
    fpa_ghosts: float = 2.0  #: mean number per frame (radius 20-40 px, 0.01-0.03 MJy/sr)


class Patches:
    """The QR3 flag shapes of one frame: per patch ``kind`` (DISC/RING/LINE), ``bit``, centre
    ``x``, ``y`` (0-based px), radii ``r_in``/``r_out`` (a LINE: half-width in ``r_out``, end point
    ``x1``, ``y1``), ``amp`` (MJy/sr added to IMAGE on its pixels) and ``source`` (index into the
    frame's source list, -1 for none)."""

    FIELDS = ("kind", "bit", "x", "y", "r_in", "r_out", "x1", "y1", "amp", "source")

    def __init__(self, rows: list[tuple]) -> None:
        cols = list(zip(*rows)) if rows else [()] * len(self.FIELDS)
        for name, col in zip(self.FIELDS, cols):
            dtype = np.int64 if name in ("kind", "bit", "source") else float
            setattr(self, name, np.asarray(col, dtype))
        ends_x = np.where(self.kind == LINE, self.x1, self.x)
        ends_y = np.where(self.kind == LINE, self.y1, self.y)
        self.x_lo = np.floor(np.minimum(self.x, ends_x) - self.r_out).astype(np.int64)
        self.x_hi = np.ceil(np.maximum(self.x, ends_x) + self.r_out).astype(np.int64) + 1
        self.y_lo = np.floor(np.minimum(self.y, ends_y) - self.r_out).astype(np.int64)
        self.y_hi = np.ceil(np.maximum(self.y, ends_y) + self.r_out).astype(np.int64) + 1

    def __len__(self) -> int:
        return int(self.kind.size)

    # ------------------------------------------------------------------ drawing
    @classmethod
    def draw(cls, seed: int, obs_index: int, det: int, x: np.ndarray, y: np.ndarray, peak: np.ndarray,
             saturated: np.ndarray, config: PatchConfig | None = None) -> Patches:
        """The patches of a frame from its sources (0-based ``x``, ``y``; ``peak`` MJy/sr as above;
        ``saturated``: sources whose core reaches the overflow level)."""
        cfg = config or PatchConfig()
        rng = np.random.default_rng([int(seed), 31, int(obs_index), int(det)])
        x, y, peak = (np.asarray(a, float) for a in (x, y, peak))
        sat = np.asarray(saturated, bool)
        rows: list[tuple] = []
        for i in np.flatnonzero(sat):
            rows.append((DISC, R7_NEW_BITS["BLOOM"], x[i], y[i], 0.0, cfg.bloom_radius, 0.0, 0.0, 0.0, i))
            rows.append((RING, R7_NEW_BITS["HALO"], x[i], y[i], cfg.bloom_radius, cfg.halo_radius, 0.0, 0.0, 0.0, i))
        u = rng.uniform(size=x.size)
        kinds = rng.integers(0, 3, x.size)
        ang = rng.uniform(0, 2 * np.pi, x.size)
        for i in np.flatnonzero((u < cfg.fraction) & ~sat):
            name = ("GHOST", "CROSSTALK", "STREAK")[kinds[i]]
            off, rad, amp = getattr(cfg, name.lower())
            cx, cy = x[i] + off * np.cos(ang[i]), y[i] + off * np.sin(ang[i])
            if name == "STREAK":
                dx, dy = -0.5 * cfg.streak_length * np.sin(ang[i]), 0.5 * cfg.streak_length * np.cos(ang[i])
                rows.append((LINE, R7_NEW_BITS[name], cx - dx, cy - dy, 0.0, rad, cx + dx, cy + dy, amp * peak[i], i))
            else:
                rows.append((DISC, R7_NEW_BITS[name], cx, cy, 0.0, rad, 0.0, 0.0, amp * peak[i], i))
        for _ in range(rng.poisson(cfg.snowballs)):
            cx, cy = rng.uniform(0, NPIX, 2)
            rows.append((DISC, R7_NEW_BITS["SNOWBALL"], cx, cy, 0.0, rng.uniform(2, 4), 0.0, 0.0,
                         rng.uniform(1, 5), -1))
        for _ in range(rng.poisson(cfg.fpa_ghosts)):
            cx, cy = rng.uniform(0, NPIX, 2)
            rows.append((DISC, R7_NEW_BITS["GHOST_FPA"], cx, cy, 0.0, rng.uniform(20, 40), 0.0, 0.0,
                         rng.uniform(0.01, 0.03), -1))
        return cls(rows)

    # ------------------------------------------------------------------ painting
    def _mask(self, k: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """Pixels (centres yy, xx) covered by patch ``k``."""
        dx, dy = xx - self.x[k], yy - self.y[k]
        if self.kind[k] == LINE:
            ex, ey = self.x1[k] - self.x[k], self.y1[k] - self.y[k]
            t = np.clip((dx * ex + dy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
            return (dx - t * ex) ** 2 + (dy - t * ey) ** 2 <= self.r_out[k] ** 2
        d2 = dx * dx + dy * dy
        inside = d2 <= self.r_out[k] ** 2
        return inside & (d2 > self.r_in[k] ** 2) if self.kind[k] == RING else inside

    def touching(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Indices of patches whose bounding box meets rows [r0, r1) x columns [c0, c1)."""
        return np.flatnonzero((self.y_hi > r0) & (self.y_lo < r1) & (self.x_hi > c0) & (self.x_lo < c1))

    def paint(self, r0: int, r1: int, c0: int = 0, c1: int = NPIX, flags: np.ndarray | None = None,
              image: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """OR the patches' bits into ``flags`` and add their light to ``image`` (both arrays of the
        box rows [r0, r1) x columns [c0, c1), modified in place; new zero arrays when None).
        Returns (flags int32, image float)."""
        shape = (r1 - r0, c1 - c0)
        flags = np.zeros(shape, np.int32) if flags is None else flags
        image = np.zeros(shape) if image is None else image
        for k in self.touching(r0, r1, c0, c1):
            ya, yb = max(int(self.y_lo[k]), r0), min(int(self.y_hi[k]), r1)
            xa, xb = max(int(self.x_lo[k]), c0), min(int(self.x_hi[k]), c1)
            if ya >= yb or xa >= xb:
                continue
            yy, xx = np.mgrid[ya:yb, xa:xb]
            m = self._mask(k, yy, xx)
            flags[ya - r0:yb - r0, xa - c0:xb - c0][m] |= np.int32(1 << int(self.bit[k]))
            if self.amp[k]:
                image[ya - r0:yb - r0, xa - c0:xb - c0][m] += self.amp[k]
        return flags, image

    def pixels(self, k: int) -> np.ndarray:
        """Flat indices (row * 2040 + column) of patch ``k``'s pixels inside the frame."""
        ya, yb = max(int(self.y_lo[k]), 0), min(int(self.y_hi[k]), NPIX)
        xa, xb = max(int(self.x_lo[k]), 0), min(int(self.x_hi[k]), NPIX)
        if ya >= yb or xa >= xb:
            return np.zeros(0, np.int64)
        yy, xx = np.mgrid[ya:yb, xa:xb]
        m = self._mask(k, yy, xx)
        return (yy[m] * NPIX + xx[m]).astype(np.int64)

    def counts(self) -> dict[str, int]:
        """Pixels carrying each new R7 bit over the whole frame (0 for bits no patch sets)."""
        out = {}
        for name, b in R7_NEW_BITS.items():
            ks = np.flatnonzero(self.bit == b)
            out[name] = int(np.unique(np.concatenate([self.pixels(k) for k in ks])).size) if ks.size else 0
        return out
