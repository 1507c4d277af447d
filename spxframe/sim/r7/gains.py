"""The pre-R7 gain map f: the per-pixel factor that brings QR2 (pipeline 6.x) pixels onto R7 gains
(spec §3.10, ``l3_flux_corrections``).

The R7 pixels are the truth; QR2 was calibrated on the older gains, so its IMAGE is truth / f
and its VARIANCE variance / f^2 (ZODI untouched), and a client multiplies them back by f and f^2.
f varies along the dispersion (LVF) axis, which is y: D1 has median ~0.970 and runs 0.875-0.983
from its short-wavelength edge; D5 has median ~1.007; the others stay within ~1 % of 1. On top of
that: a small tilt across x and a 0.2 % pixel-to-pixel scatter. Pixels the instrument model calls
NONFUNC carry a bad factor (0.0, outside the 0.5-2 range a client accepts); the QR2 relation uses
1 there (:func:`qr2_divisor`), so those pixels are simply unchanged.
"""

from __future__ import annotations

import numpy as np

from spxframe.spherex import NPIX

from ..world import instrument as ins

#: per detector: (value at the far end of the LVF axis, depth of the dip at the short end,
#: e-folding length of the dip as a fraction of the axis, tilt across x)
PROFILE: dict[int, tuple[float, float, float, float]] = {
    1: (0.9831, 0.1081, 0.236, 0.002),
    2: (0.9960, 0.0120, 0.300, -0.001),
    3: (1.0010, 0.0040, 0.300, 0.001),
    4: (0.9980, -0.0030, 0.250, 0.000),
    5: (1.0070, -0.0030, 0.200, 0.002),
    6: (0.9970, 0.0050, 0.300, -0.001),
}
SCATTER = 0.002  #: pixel-to-pixel rms of f
BAD_FACTOR = 0.0  #: f written at NONFUNC pixels
VALID = (0.5, 2.0)  #: factors a client accepts


def profile(det: int, y: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
    """The smooth part of f at 0-based rows ``y`` (and columns ``x``, default the centre)."""
    top, dip, length, tilt = PROFILE[int(det)]
    s = (np.asarray(y, float) + 0.5) / NPIX  # position along the LVF axis, 0..1
    if int(det) in ins.LVF_REVERSED:
        s = 1.0 - s
    xn = 0.0 if x is None else (np.asarray(x, float) - ins.CENTER0) / (ins.CENTER0 + 0.5)
    return top - dip * np.exp(-s / length) + tilt * xn


def _scatter(seed: int, det: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """1 + the pixel-to-pixel scatter of rows [r0, r1) x columns [c0, c1); each row from its own
    generator, so any box gives the same pixels without a frame-sized cache."""
    rows = [np.random.default_rng([int(seed), 999, int(det), 41, r]).standard_normal(NPIX)[c0:c1]
            for r in range(r0, r1)]
    return 1.0 + SCATTER * np.array(rows).reshape(r1 - r0, c1 - c0)


def gain_map(seed: int, det: int, r0: int = 0, r1: int = NPIX, c0: int = 0, c1: int = NPIX) -> np.ndarray:
    """f over rows [r0, r1) x columns [c0, c1) (float32), bad pixels included."""
    yy, xx = np.mgrid[r0:r1, c0:c1]
    f = (profile(det, yy, xx) * _scatter(seed, det, r0, r1, c0, c1)).astype(np.float32)
    bad = ins.bad_pixels(seed, det)["NONFUNC"]
    ry, rx = np.divmod(bad, NPIX)
    on = (ry >= r0) & (ry < r1) & (rx >= c0) & (rx < c1)
    f[ry[on] - r0, rx[on] - c0] = BAD_FACTOR
    return f


def qr2_divisor(f: np.ndarray) -> np.ndarray:
    """The factor QR2 pixels were divided by: f where it is a valid factor, 1 elsewhere."""
    f = np.asarray(f)
    return np.where((f >= VALID[0]) & (f <= VALID[1]), f, 1).astype(f.dtype)


def to_qr2(image: np.ndarray, variance: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """QR2 IMAGE and VARIANCE (float32) from R7-gain ones and the map f of the same box."""
    d = qr2_divisor(f).astype(np.float64)
    return ((np.asarray(image, np.float64) / d).astype(np.float32),
            (np.asarray(variance, np.float64) / (d * d)).astype(np.float32))
