"""Numba kernels of the per-source variability statistics (excess variance, time scale, visits)."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from spxframe.science.kernels import VISIT_GAP_D

#: time-lag bin edges (days) of the residual structure function
LAG_EDGES: tuple[float, ...] = (0.0, 0.05, 0.5, 2.0, 7.0, 30.0, 100.0, 1000.0)


@njit(cache=True, nogil=True)
def _excess_one(r2, s2):
    """ML excess variance v >= 0 solving Σ r²/(σ²+v)² = Σ 1/(σ²+v) by bisection, and its error."""
    n = r2.size
    lo, hi = 0.0, 0.0
    g0 = 0.0
    for i in range(n):
        g0 += r2[i] / s2[i] ** 2 - 1.0 / s2[i]
        hi = max(hi, r2[i])
    v = 0.0
    if g0 > 0.0 and hi > 0.0:
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            g = 0.0
            for i in range(n):
                t = s2[i] + mid
                g += r2[i] / t**2 - 1.0 / t
            if g > 0.0:
                lo = mid
            else:
                hi = mid
        v = 0.5 * (lo + hi)
    info = 0.0
    for i in range(n):
        info += 0.5 / (s2[i] + v) ** 2
    return v, (1.0 / math.sqrt(info) if info > 0.0 else np.nan)


@njit(cache=True, nogil=True)
def _timescale_one(t, d, s2, v):
    """Shortest lag-bin centre where mean[(d_i - d_j)² - σ_i² - σ_j²] ≥ v (NaN if none)."""
    nb = len(LAG_EDGES) - 1
    acc = np.zeros(nb)
    cnt = np.zeros(nb)
    n = t.size
    for i in range(n):
        for j in range(i + 1, n):
            lag = abs(t[j] - t[i])
            for b in range(nb):
                if lag < LAG_EDGES[b + 1]:
                    acc[b] += (d[i] - d[j]) ** 2 - s2[i] - s2[j]
                    cnt[b] += 1.0
                    break
    for b in range(nb):
        if cnt[b] >= 3 and acc[b] / cnt[b] >= v:
            lo = max(LAG_EDGES[b], 0.01)
            return math.sqrt(lo * LAG_EDGES[b + 1])
    return np.nan


@njit(cache=True, nogil=True, parallel=True)
def source_stats(starts, t, resid, sigma, lev, want_time):
    """Per source: (excess variance, its error, time scale, visits) from residuals about the model.

    Residuals are leverage-corrected (r / sqrt(1 - h)); rows with h > 0.99 are left out."""
    ns = starts.size - 1
    ev = np.zeros(ns)
    eerr = np.full(ns, np.nan)
    tau = np.full(ns, np.nan)
    nvis = np.zeros(ns, np.int64)
    for k in prange(ns):
        a, b = starts[k], starts[k + 1]
        m = 0
        for i in range(a, b):
            if lev[i] < 0.99:
                m += 1
        r2 = np.empty(m)
        s2 = np.empty(m)
        tt = np.empty(m)
        dd = np.empty(m)
        q = 0
        for i in range(a, b):
            if lev[i] < 0.99:
                c = 1.0 / math.sqrt(1.0 - lev[i])
                dd[q] = resid[i] * c
                r2[q] = dd[q] ** 2
                s2[q] = sigma[i] ** 2
                tt[q] = t[i]
                q += 1
        nv = 1 if b > a else 0
        for i in range(a + 1, b):
            if t[i] - t[i - 1] >= VISIT_GAP_D:
                nv += 1
        nvis[k] = nv
        if m == 0:
            continue
        ev[k], eerr[k] = _excess_one(r2, s2)
        if want_time[k] and ev[k] > 0.0:
            tau[k] = _timescale_one(tt, dd, s2, ev[k])
    return ev, eerr, tau, nvis
