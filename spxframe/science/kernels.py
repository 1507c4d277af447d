"""Numba kernels of the per-source spectral model (see :mod:`spxframe.science.model`).

Every source is fitted on its own slice ``[starts[k], starts[k + 1])`` of row arrays sorted by
(source, time). The model, in flux (µJy), with x = ln(λ / 2 µm) and u = 2 µm / λ - 1:

    M(λ) = C(λ) + A · exp(-½ ((λ - μ) / s)²)        (the line term only when accepted)

The continuum C is ``exp(θ · [1, x, u, x²])`` (the first 2, 3 or 4 terms, as many as the ≥ 3 σ
points and their spread in wavelength allow: power laws exactly, blackbodies of 2,000-10,000 K
to ~0.3 %), fitted by weighted least squares in flux (Levenberg-Marquardt from a fit of ln f), or
the straight line ``θ0 + θ1 x`` when that has the lower Akaike criterion (faint sources); faint
and negative fluxes are data. A line is tried at the most discrepant points (centre ±1.2 %,
σ 0.6/1.2/2.4 % of λ, linearised about the continuum), fitted in full when it lowers χ² by at
least ``line_dchi2``, and kept unless a visit that sees it is also bright away from it (a whole
visit brighter is variability, not a line: the two detectors of a visit see distant bands).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

MODE_CONSTANT, MODE_CONTINUUM, MODE_LINES = 0, 1, 2
MAXP = 8  #: most coefficients of one fit
_LINE_SHIFTS = (-0.012, 0.0, 0.012)  #: line centre offsets (fraction of λ) tried around a point
_LINE_WIDTHS = (0.006, 0.012, 0.024)  #: Gaussian σ of a line (fraction of λ) tried
_N_CAND = 3  #: most discrepant points tried as line centres
VISIT_GAP_D = 0.05  #: rows closer in time than this (days) belong to one visit
VETO_Z = 3.0  #: a visit this significantly bright away from a line candidate vetoes the line


@njit(cache=True, nogil=True)
def _invert(m, p, out):
    """Gauss-Jordan inverse of the symmetric positive matrix ``m[:p, :p]`` into ``out``; False if singular."""
    a = np.zeros((MAXP, 2 * MAXP))
    for i in range(p):
        for j in range(p):
            a[i, j] = m[i, j]
        a[i, p + i] = 1.0
    for c in range(p):
        piv, best = c, abs(a[c, c])
        for r in range(c + 1, p):
            if abs(a[r, c]) > best:
                piv, best = r, abs(a[r, c])
        if best <= 1e-300:
            return False
        if piv != c:
            for j in range(2 * p):
                a[c, j], a[piv, j] = a[piv, j], a[c, j]
        d = a[c, c]
        for j in range(2 * p):
            a[c, j] /= d
        for r in range(p):
            if r != c and a[r, c] != 0.0:
                fct = a[r, c]
                for j in range(2 * p):
                    a[r, j] -= fct * a[c, j]
    for i in range(p):
        for j in range(p):
            out[i, j] = a[i, p + j]
    return True


@njit(cache=True, nogil=True)
def _wls(basis, f, w, n, p, coef, cinv, damp=1e-10):
    """Weighted least squares of ``f`` on ``basis[:n, :p]`` (normal-matrix diagonal × (1 + damp));
    returns χ² (inf when singular)."""
    ata = np.zeros((MAXP, MAXP))
    atb = np.zeros(MAXP)
    for i in range(n):
        for j in range(p):
            bj = basis[i, j] * w[i]
            atb[j] += bj * f[i]
            for k in range(j, p):
                ata[j, k] += bj * basis[i, k]
    for j in range(p):
        ata[j, j] = ata[j, j] * (1.0 + damp) + 1e-300
        for k in range(j):
            ata[j, k] = ata[k, j]
    if not _invert(ata, p, cinv):
        return np.inf
    for j in range(p):
        s = 0.0
        for k in range(p):
            s += cinv[j, k] * atb[k]
        coef[j] = s
    chi2 = 0.0
    for i in range(n):
        m = 0.0
        for j in range(p):
            m += basis[i, j] * coef[j]
        chi2 += w[i] * (f[i] - m) ** 2
    return chi2


@njit(cache=True, nogil=True)
def _features(lam, n, phi):
    """Continuum features {1, x, u, x²} with x = ln(λ / 2 µm), u = 2 µm / λ - 1 into ``phi``."""
    for i in range(n):
        x = math.log(lam[i] / 2.0)
        phi[i, 0], phi[i, 1], phi[i, 2], phi[i, 3] = 1.0, x, 2.0 / lam[i] - 1.0, x * x


@njit(cache=True, nogil=True)
def _log_start(phi, f, w, n, theta, spread):
    """Starting θ of ln M = θ·φ from a weighted fit of ln f over the ≥ 3 σ points; returns the
    number of features used: 4 when the detected points spread over ≥ 3 of the 0.3-wide bins of
    ln λ, 3 over 2 bins, 2 within one, 0 when fewer than 4 points are detected."""
    basis = np.zeros((n, MAXP))
    y = np.zeros(n)
    wl = np.zeros(n)
    m = 0
    for i in range(n):
        snr = f[i] * math.sqrt(w[i])
        if snr > 3.0:
            for j in range(4):
                basis[m, j] = phi[i, j]
            y[m] = math.log(f[i])
            wl[m] = min(snr, 200.0) ** 2
            m += 1
    cinv = np.zeros((MAXP, MAXP))
    for k, need in ((4, 3), (3, 2), (2, 1)):
        if m >= 2 * k and spread >= need and np.isfinite(_wls(basis, y, wl, m, k, theta, cinv)):
            return k
    return 0


@njit(cache=True, nogil=True)
def _evaluate(kind, phi, lam, theta, k, line, n, model, jac):
    """Model and Jacobian of the continuum (``kind`` 1: exp(θ·φ), 0: θ·φ) plus, when ``line``, a
    Gaussian with amplitude, centre and σ in ``theta[k:k + 3]``."""
    amp, mu, s = theta[k], theta[k + 1], theta[k + 2]
    for i in range(n):
        t = 0.0
        for j in range(k):
            t += theta[j] * phi[i, j]
        c = math.exp(min(t, 700.0)) if kind == 1 else t
        for j in range(k):
            jac[i, j] = c * phi[i, j] if kind == 1 else phi[i, j]
        model[i] = c
        if line:
            d = (lam[i] - mu) / s
            g = math.exp(-0.5 * d * d)
            jac[i, k], jac[i, k + 1], jac[i, k + 2] = g, amp * g * d / s, amp * g * d * d / s
            model[i] += amp * g


@njit(cache=True, nogil=True)
def _chi2(f, model, w, n):
    s = 0.0
    for i in range(n):
        s += w[i] * (f[i] - model[i]) ** 2
    return s


@njit(cache=True, nogil=True)
def _gauss_newton(kind, phi, lam, f, w, n, theta, k, line, model, jac, cinv, iters):
    """Weighted least-squares fit of ``theta`` (Levenberg-Marquardt); returns χ²."""
    p = k + (3 if line else 0)
    resid = np.zeros(n)
    step = np.zeros(MAXP)
    trial = np.zeros(MAXP)
    _evaluate(kind, phi, lam, theta, k, line, n, model, jac)
    chi2 = _chi2(f, model, w, n)
    damp = 1e-10 if (kind == 0 and not line) else (1e-3 if line else 1e-6)
    for _ in range(iters):
        for i in range(n):
            resid[i] = f[i] - model[i]
        if not np.isfinite(_wls(jac, resid, w, n, p, step, cinv, damp)):
            break
        for j in range(p):
            trial[j] = theta[j] + step[j]
        c2 = np.inf
        if not line or (trial[k] > 0.0 and trial[k + 2] > 0.0):
            _evaluate(kind, phi, lam, trial, k, line, n, model, jac)
            c2 = _chi2(f, model, w, n)
        if c2 <= chi2:
            for j in range(p):
                theta[j] = trial[j]
            done = chi2 - c2 < 1e-4 + 1e-7 * c2
            chi2 = c2
            if done or (kind == 0 and not line):
                break
            damp = max(damp * 0.1, 1e-10)
        else:
            _evaluate(kind, phi, lam, theta, k, line, n, model, jac)
            damp *= 10.0
            if damp > 1e8:
                break
    for i in range(n):  # covariance at the solution (for the leverage)
        resid[i] = f[i] - model[i]
    _wls(jac, resid, w, n, p, step, cinv, 1e-8)
    return chi2


@njit(cache=True, nogil=True)
def _line_search(lam, f, w, n, jac, k, model, cinv, line_dchi2):
    """Best positive Gaussian line around the most discrepant points, linearised about the
    continuum fit (``jac[:, :k]`` its Jacobian, ``cinv`` its covariance): returns (Δχ²,
    amplitude, μ, s). With the continuum at its optimum, a profile g gains
    (gᵀWr)² / (gᵀWg - bᵀ C b), b = JᵀWg."""
    resid = np.zeros(n)
    z = np.zeros(n)
    for i in range(n):
        resid[i] = f[i] - model[i]
        z[i] = resid[i] * math.sqrt(w[i])
    order = np.argsort(-z)
    best, bamp, bmu, bs = 0.0, 0.0, 0.0, 0.0
    g = np.zeros(n)
    bvec = np.zeros(MAXP)
    for ci in range(min(_N_CAND, n)):
        i0 = order[ci]
        if z[i0] < 2.5:
            break
        room = 0.0  # no line can gain more than the χ² of the points it covers
        for i in range(n):
            if abs(lam[i] / lam[i0] - 1.0) < 0.1:
                room += z[i] * z[i]
        if room < line_dchi2:
            continue
        for dlt in _LINE_SHIFTS:
            mu = lam[i0] * (1.0 + dlt)
            for sw in _LINE_WIDTHS:
                s = sw * mu
                gwr, gwg = 0.0, 0.0
                for j in range(k):
                    bvec[j] = 0.0
                for i in range(n):
                    d = (lam[i] - mu) / s
                    g[i] = math.exp(-0.5 * d * d) if abs(d) < 6.0 else 0.0
                    if g[i] != 0.0:
                        wg = w[i] * g[i]
                        gwr += wg * resid[i]
                        gwg += wg * g[i]
                        for j in range(k):
                            bvec[j] += wg * jac[i, j]
                den = gwg
                for j in range(k):
                    for q in range(k):
                        den -= bvec[j] * cinv[j, q] * bvec[q]
                if gwr > 0.0 and den > 1e-12 * gwg:
                    gain = gwr * gwr / den
                    if gain > best:
                        best, bamp, bmu, bs = gain, gwr / den, mu, s
    return best, bamp, bmu, bs


@njit(cache=True, nogil=True)
def _spread(phi, f, w, n):
    """Number of occupied 0.3-wide bins of x = ln(λ/2 µm) among the ≥ 3 σ points."""
    occ = np.zeros(8, np.bool_)
    for i in range(n):
        if f[i] * math.sqrt(w[i]) > 3.0:
            occ[min(max(int((phi[i, 1] + 1.0) / 0.3), 0), 7)] = True
    return occ.sum()


@njit(cache=True, nogil=True)
def _visit_veto(lam, t, f, w, n, model, mu, s):
    """True when a visit that sees the line candidate (μ, s) is also bright away from it: the
    excess is then variability of the whole visit, not a spectral line. A visit is a run of rows
    less than ``VISIT_GAP_D`` apart; its rows more than 3 s from μ must not lie above the
    continuum by more than ``VETO_Z`` standard errors combined."""
    i = 0
    while i < n:
        j = i + 1
        while j < n and t[j] - t[j - 1] < VISIT_GAP_D:
            j += 1
        on, sw, sr = False, 0.0, 0.0
        for q in range(i, j):
            d = abs(lam[q] - mu) / s
            if d < 1.5:
                on = True
            elif d > 3.0:
                sw += w[q]
                sr += w[q] * (f[q] - model[q])
        if on and sw > 0.0 and sr / math.sqrt(sw) > VETO_Z:
            return True
        i = j
    return False


@njit(cache=True, nogil=True)
def fit_one(lam, t, f, w, mode, line_dchi2, model, lev, line_out):
    """Fit one source; fills ``model`` and ``lev`` (leverage) per row and ``line_out`` (μ, s, A)
    when a line is accepted; returns (χ², number of fitted parameters)."""
    n = lam.size
    phi = np.zeros((n, 5))
    jac = np.zeros((n, MAXP))
    cinv = np.zeros((MAXP, MAXP))
    theta = np.zeros(MAXP)
    _features(lam, n, phi)
    kind, k = 0, (2 if (mode != MODE_CONSTANT and n >= 6) else 1)
    chi2 = _gauss_newton(0, phi, lam, f, w, n, theta, k, False, model, jac, cinv, 1)
    if mode != MODE_CONSTANT and n >= 4:
        th = np.zeros(MAXP)
        ke = _log_start(phi, f, w, n, th, _spread(phi, f, w, n))
        if ke > 0:
            mod2 = np.zeros(n)
            c2 = _gauss_newton(1, phi, lam, f, w, n, th, ke, False, mod2, jac, cinv, 50)
            if c2 + 2.0 * ke < chi2 + 2.0 * k:  # Akaike: the curved shape must earn its parameters
                kind, k, chi2 = 1, ke, c2
                theta[:] = th
    chi2 = _gauss_newton(kind, phi, lam, f, w, n, theta, k, False, model, jac, cinv, 50 if kind == 1 else 1)
    p = k
    if mode == MODE_LINES and n - k >= 6:
        gain, amp, mu, s = _line_search(lam, f, w, n, jac, k, model, cinv, line_dchi2)
        if gain >= line_dchi2:
            keep = theta.copy()
            theta[k], theta[k + 1], theta[k + 2] = amp, mu, s
            c2 = _gauss_newton(kind, phi, lam, f, w, n, theta, k, True, model, jac, cinv, 12)
            ok = theta[k] > 0.0 and 0.002 * mu < theta[k + 2] < 0.04 * mu and abs(theta[k + 1] / mu - 1.0) < 0.04
            ok = ok and not _visit_veto(lam, t, f, w, n, model, theta[k + 1], theta[k + 2])
            if ok and c2 < chi2:
                chi2, p = c2, k + 3  # amplitude, centre and width
                line_out[0], line_out[1], line_out[2] = theta[k + 1], theta[k + 2], theta[k]
            else:
                theta[:] = keep
                chi2 = _gauss_newton(kind, phi, lam, f, w, n, theta, k, False, model, jac, cinv, 1)
    for i in range(n):
        h = 0.0
        for j in range(p):
            for q in range(p):
                h += jac[i, j] * cinv[j, q] * jac[i, q]
        lev[i] = h * w[i]
    return chi2, float(p)


@njit(cache=True, nogil=True, parallel=True)
def fit_all(starts, lam, t, f, w, mode, line_dchi2):
    """Fit every source slice. Returns per source (χ², n_par, line (k, 3): μ, s µm, A µJy, NaN
    without a line) and per row (model, leverage)."""
    ns = starts.size - 1
    chi2 = np.zeros(ns)
    npar = np.zeros(ns)
    lines = np.full((ns, 3), np.nan)
    model = np.zeros(lam.size)
    lev = np.zeros(lam.size)
    for k in prange(ns):
        a, b = starts[k], starts[k + 1]
        if b - a == 0:
            continue
        chi2[k], npar[k] = fit_one(lam[a:b], t[a:b], f[a:b], w[a:b], mode, line_dchi2, model[a:b], lev[a:b], lines[k])
    return chi2, npar, lines, model, lev


@njit(cache=True, nogil=True)
def chi2_sf(x, dof):
    """P(χ²_dof ≥ x): the regularised upper incomplete gamma Q(dof/2, x/2)."""
    if dof <= 0 or not np.isfinite(x):
        return np.nan
    a, z = 0.5 * dof, 0.5 * x
    if z <= 0.0:
        return 1.0
    gln = math.lgamma(a)
    if z < a + 1.0:  # series for P
        ap, s, d = a, 1.0 / a, 1.0 / a
        for _ in range(500):
            ap += 1.0
            d *= z / ap
            s += d
            if abs(d) < abs(s) * 1e-15:
                break
        return max(0.0, 1.0 - s * math.exp(-z + a * math.log(z) - gln))
    b = z + 1.0 - a  # continued fraction for Q (Lentz)
    c, d = 1.0 / 1e-300, 1.0 / b
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        dl = d * c
        h *= dl
        if abs(dl - 1.0) < 1e-15:
            break
    return math.exp(-z + a * math.log(z) - gln) * h


@njit(cache=True, nogil=True)
def chi2_sf_many(x, dof):
    """:func:`chi2_sf` element by element."""
    out = np.empty(x.size)
    for i in range(x.size):
        out[i] = chi2_sf(x[i], dof[i])
    return out
