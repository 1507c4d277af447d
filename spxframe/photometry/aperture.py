"""Exact circle/pixel overlap geometry for aperture photometry (numba; pure arrays, no I/O).

Pixel ``(iy, ix)`` of a grid is the unit square centred on integer coordinates ``(ix, iy)``
(zero-based, like photutils): it covers ``[ix - 0.5, ix + 0.5] x [iy - 0.5, iy + 0.5]``.
Both PSF models of :mod:`spxframe.photometry.kernels` (the QR2 cube) and
:mod:`spxframe.photometry.epsf` (the R7 ePSF) weight their pixels with these; slow references
live in ``tests/reference.py``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _quadrant_area(x: float, y: float, r: float) -> float:
    """Signed area of {X^2+Y^2<=r^2} within the rectangle between (0, 0) and (x, y)."""
    sx = 1.0 if x >= 0 else -1.0
    sy = 1.0 if y >= 0 else -1.0
    ax = min(abs(x), r)
    ay = min(abs(y), r)
    if ax * ax + ay * ay <= r * r:
        return sx * sy * ax * ay
    xc = math.sqrt(max(r * r - ay * ay, 0.0))  # where the circle's height equals ay

    def g(t):
        return 0.5 * (t * math.sqrt(max(r * r - t * t, 0.0)) + r * r * math.asin(min(t / r, 1.0)))

    return sx * sy * (ay * xc + g(ax) - g(xc))


@njit(cache=True, nogil=True)
def circle_rect_area(x0: float, x1: float, y0: float, y1: float, r: float) -> float:
    """Exact area of the intersection of the circle of radius r at the origin with [x0,x1]x[y0,y1]."""
    if r <= 0.0:
        return 0.0
    return (_quadrant_area(x1, y1, r) - _quadrant_area(x0, y1, r)
            - _quadrant_area(x1, y0, r) + _quadrant_area(x0, y0, r))


@njit(cache=True, nogil=True)
def overlap_weights(cx: float, cy: float, r: float, ny: int, nx: int) -> np.ndarray:
    """Exact fraction of each unit pixel of an (ny, nx) grid inside the circle (cx, cy, r)."""
    w = np.zeros((ny, nx))
    if r <= 0.0:
        return w
    iy0 = max(int(math.floor(cy - r + 0.5)), 0)
    iy1 = min(int(math.floor(cy + r + 0.5)), ny - 1)
    ix0 = max(int(math.floor(cx - r + 0.5)), 0)
    ix1 = min(int(math.floor(cx + r + 0.5)), nx - 1)
    r2 = r * r
    for iy in range(iy0, iy1 + 1):
        dy0, dy1 = iy - 0.5 - cy, iy + 0.5 - cy
        ny2 = 0.0 if dy0 <= 0.0 <= dy1 else min(dy0 * dy0, dy1 * dy1)  # nearest |dy|^2
        fy2 = max(dy0 * dy0, dy1 * dy1)
        for ix in range(ix0, ix1 + 1):
            dx0, dx1 = ix - 0.5 - cx, ix + 0.5 - cx
            fx2 = max(dx0 * dx0, dx1 * dx1)
            if fx2 + fy2 <= r2:  # whole pixel inside
                w[iy, ix] = 1.0
                continue
            nx2 = 0.0 if dx0 <= 0.0 <= dx1 else min(dx0 * dx0, dx1 * dx1)
            if nx2 + ny2 >= r2:  # whole pixel outside
                continue
            a = circle_rect_area(dx0, dx1, dy0, dy1, r)
            w[iy, ix] = min(max(a, 0.0), 1.0)  # rounding can leave +-1e-15 at tangent pixels
    return w


@njit(cache=True, nogil=True)
def aperture_sums(images: np.ndarray, variances: np.ndarray, masks: np.ndarray, cx: np.ndarray,
                  cy: np.ndarray, r_in: float, r_out: float) -> np.ndarray:
    """Exact-overlap sums over a stack of stamps; annulus when r_in > 0, circle when r_in == 0.

    images, variances: (n, ny, nx) float; masks: (n, ny, nx) bool, True = excluded; cx, cy: (n,).
    Returns (n, 3): sum(w I), sum(w^2 V), sum(w) over unmasked pixels (as photutils 'exact' with
    a mask, except that the variance uses w^2).
    """
    n, ny, nx = images.shape
    out = np.zeros((n, 3))
    for k in range(n):
        wo = overlap_weights(cx[k], cy[k], r_out, ny, nx)
        if r_in > 0:
            wo -= overlap_weights(cx[k], cy[k], r_in, ny, nx)
        s = 0.0
        v = 0.0
        a = 0.0
        for iy in range(ny):
            for ix in range(nx):
                w = wo[iy, ix]
                if w != 0.0 and not masks[k, iy, ix]:
                    s += w * images[k, iy, ix]
                    v += w * w * variances[k, iy, ix]
                    a += w
        out[k, 0], out[k, 1], out[k, 2] = s, v, a
    return out
