"""Rendering one simulated L2 frame (obs_id × detector) in row strips.

Pixel model (MJy/sr, zero-based pixels):

- ZODI  = Z0 · (1 + gx·X + gy·Y + q·(X² + Y²)),  X, Y = (x, y − 1019.5)/1020 (gradients of a few %);
- sky   = k · ZODI + 0.01·Z0·structure,  k ∈ [1.0, 1.3] per frame (the noiseless background);
- sources: a source of truth flux F (µJy, at the WCS-WAVE λ of its position and mid-exposure) adds
  F · P_pix / (Ω · 23.5044), with P_pix the zone PSF integrated over the pixel (10×10 sub-samples
  on the same 0.1 px lattice and normalisation as the PSF cube) and Ω the pixel solid angle
  (arcsec²) from the full TAN-SIP WCS *at the source position* (one Ω per source);
- VARIANCE = σ² (0.4 + 0.6 sky/Z0) + 2e-4 · max(source, 0);  IMAGE = sky + source + N(0, VARIANCE);
- bad pixels: HOT (+5..50, var ×100, 1 in 5 NaN), COLD (×0.1, var ×10, 1 in 3 NaN), NONFUNC (NaN var),
  cosmic rays TRANSIENT (+2..200, 1 in 4 NaN var), OUTLIER, OVERFLOW (clipped at 40 MJy/sr),
  NONLINEAR / FULLSAMPLE in bright cores, DICHROIC corners on D3/D4, SOURCE on ~50 % of pixels.

Strips are 64 rows; each strip's noise comes from ``default_rng([seed, obs_index, det, strip])``.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numba
import numpy as np

from spxframe.spherex import FLAG_BITS, MJY_SR_TO_UJY_PER_ARCSEC2, NPIX, PSF_OVERSAMP

from . import instrument as ins

STRIP = 64
NSTRIP = -(-NPIX // STRIP)
STAMP = 12  #: stamp side in detector pixels (covers the PSF cube's ±5.05 px footprint)
BIT = {k: np.int32(1 << v) for k, v in FLAG_BITS.items()}


@numba.njit(cache=True, nogil=True)
def _binned_psf(par: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """(m, 12, 12) stamps: ``ins.psf_eval`` on the 0.1 px lattice (10×10 sub-samples per pixel,
    offsets (k - 4.5)/10 from the stamp origin, which sits at (fx, fy) px from the source), summed
    per pixel. ``par``: (m, 5) PSF parameter rows."""
    m = par.shape[0]
    n = STAMP * PSF_OVERSAMP
    out = np.zeros((m, STAMP, STAMP))
    for q in range(m):
        smaj, smin, pa, w, sw = par[q, 0], par[q, 1], par[q, 2], par[q, 3], par[q, 4]
        c, s = np.cos(pa), np.sin(pa)
        kc = (1 - w) / (2 * np.pi * smaj * smin)
        kw = w / (2 * np.pi * sw * sw)
        for j in range(n):
            dy = fy[q] + (j - 4.5) / PSF_OVERSAMP
            for i in range(n):
                dx = fx[q] + (i - 4.5) / PSF_OVERSAMP
                a = dx * c + dy * s
                b = -dx * s + dy * c
                v = kc * np.exp(-0.5 * ((a / smaj) ** 2 + (b / smin) ** 2)) \
                    + kw * np.exp(-0.5 * (dx * dx + dy * dy) / (sw * sw))
                out[q, j // PSF_OVERSAMP, i // PSF_OVERSAMP] += v
    return out


@lru_cache(maxsize=4)
def _interp_index(ncoarse: int) -> tuple[np.ndarray, np.ndarray]:
    """(i0, f) so that pixel p interpolates coarse nodes i0, i0+1 (nodes span 0..2039) with weight f."""
    pos = np.arange(NPIX) * (ncoarse - 1) / (NPIX - 1)
    i0 = np.minimum(np.floor(pos).astype(int), ncoarse - 2)
    return i0, pos - i0


def upsample(grid: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of the bilinear interpolation of a square coarse grid onto 2040×2040 (no BLAS)."""
    i0, f = _interp_index(grid.shape[0])
    j, fy = i0[r0:r1], f[r0:r1, None]
    rows = grid[j] * (1 - fy) + grid[j + 1] * fy  # (ny, ncoarse)
    return rows[:, i0] * (1 - f) + rows[:, i0 + 1] * f


def frame_wcs(meta: dict):
    """The frame's celestial astropy WCS (TAN-SIP, from its own header cards), cached in ``meta``."""
    if "_wcs" not in meta:
        from astropy.io import fits
        from astropy.wcs import WCS

        meta["_wcs"] = WCS(fits.Header.fromstring(meta["wcs_header"]))
    return meta["_wcs"]


class Frame:
    """One detector image. ``meta``: seed, obs_index, det, crval, rot, t_min, t_max, field sources."""

    def __init__(self, meta: dict, sky, cand_idx: np.ndarray) -> None:
        self.meta = meta
        self.seed, self.oi, self.det = int(meta["seed"]), int(meta["obs_index"]), int(meta["det"])
        self.t_mid = 0.5 * (meta["t_min"] + meta["t_max"])
        self.sky = sky
        rng = np.random.default_rng([self.seed, 5, self.oi, self.det])
        self.z0 = ins.zodi_level(self.det, ins.ecliptic_latitude(*meta["crval"])) * rng.uniform(0.9, 1.1)
        self.grad = rng.uniform(-0.03, 0.03, 2)
        self.quad = rng.uniform(-0.015, 0.015)
        self.k_sky = rng.uniform(1.0, 1.3)
        self.structure = rng.standard_normal((17, 17))
        self.clumps = rng.standard_normal((48, 48))
        ncr = int(rng.poisson(700))
        start = rng.integers(0, NPIX, (ncr, 2))
        length = rng.integers(1, 5, ncr)
        step = rng.choice([-1, 0, 1], (ncr, 2))
        cr_x = np.concatenate([np.clip(start[:, 0] + step[:, 0] * k, 0, NPIX - 1)[k < length] for k in range(4)])
        cr_y = np.concatenate([np.clip(start[:, 1] + step[:, 1] * k, 0, NPIX - 1)[k < length] for k in range(4)])
        flat, first = np.unique(cr_y * NPIX + cr_x, return_index=True)
        self.cr_flat = flat
        self.cr_amp = 2.0 * 100.0 ** rng.uniform(0, 1, flat.size)
        self.outlier = np.unique(rng.integers(0, NPIX * NPIX, 900))
        self.sigma = ins.DET_SIGMA[self.det]
        self._sources(cand_idx)
        self._stamps: dict[int, np.ndarray] = {}
        self._counts: dict[str, int] | None = None

    # ------------------------------------------------------------------ sources
    def _sources(self, cand: np.ndarray) -> None:
        """Pixel positions (astropy TAN-SIP, pm to mid-exposure), λ, Ω, flux and PSF plane of sources."""
        self.wcs = frame_wcs(self.meta)
        ra, dec = self.sky.positions(cand, self.t_mid)
        if cand.size:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                x, y = self.wcs.all_world2pix(ra, dec, 0, tolerance=1e-7, maxiter=50, quiet=True)
        else:
            x = y = np.zeros(0)
        on = np.isfinite(x) & np.isfinite(y) & (x > -7) & (x < NPIX + 6) & (y > -7) & (y < NPIX + 6)
        self.src_idx, self.src_x, self.src_y = cand[on], x[on], y[on]
        self.src_wave, _ = ins.wave_at(self.det, np.clip(self.src_x, -0.5, NPIX - 0.5), np.clip(self.src_y, -0.5, NPIX - 0.5))
        self.src_flux = self.sky.flux_by_index(self.src_idx, self.src_wave, self.t_mid)
        self.src_omega = self.omega(self.src_x, self.src_y)
        ix, iy = ins.zone_of(self.src_x, self.src_y)
        self.src_plane = iy * 11 + ix
        self.src_peak = self.src_flux / (self.src_omega * MJY_SR_TO_UJY_PER_ARCSEC2)  # upper bound, MJy/sr
        order = np.argsort(np.floor(self.src_y))
        for name in ("src_idx", "src_x", "src_y", "src_wave", "src_flux", "src_omega", "src_plane", "src_peak"):
            setattr(self, name, getattr(self, name)[order])

    def omega(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Pixel solid angle (arcsec²) at zero-based (x, y): |Jacobian| of the full TAN-SIP WCS."""
        m, n = self.meta, len(x)
        xs = np.concatenate([x, x + 0.5, x - 0.5, x, x])
        ys = np.concatenate([y, y, y, y + 0.5, y - 0.5])
        ra, dec = ins.pix2world(self.seed, self.det, m["crval"], m["rot"], xs, ys)
        xi, eta = ins.tan_project(np.tile(ra[:n], 5), np.tile(dec[:n], 5), ra, dec)
        xi, eta = xi.reshape(5, n), eta.reshape(5, n)
        a, b = xi[1] - xi[2], eta[1] - eta[2]
        c, d = xi[3] - xi[4], eta[3] - eta[4]
        return np.abs(a * d - b * c) * 3600.0**2

    def stamps(self, which: np.ndarray) -> list[np.ndarray]:
        """12×12 pixel stamps (MJy/sr) of sources ``which`` (indices into the frame's source list)."""
        need = [int(i) for i in which if int(i) not in self._stamps]
        if need:
            nd = np.array(need)
            par = ins.psf_params(self.det)[self.src_plane[nd]]
            _, sums = ins.psf_cube(self.det)
            ox, oy = np.floor(self.src_x[nd]) - 5, np.floor(self.src_y[nd]) - 5
            val = _binned_psf(np.ascontiguousarray(par[:, :5]), ox - self.src_x[nd], oy - self.src_y[nd])
            scale = self.src_flux[nd] / (sums[self.src_plane[nd]] * self.src_omega[nd] * MJY_SR_TO_UJY_PER_ARCSEC2)
            for k, i in enumerate(nd):
                self._stamps[int(i)] = val[k] * scale[k]
        return [self._stamps[int(i)] for i in which]

    def source_model(self, r0: int, r1: int, bright_only: bool = False) -> np.ndarray:
        """Noiseless source image (MJy/sr, float64) of rows [r0, r1)."""
        out = np.zeros((r1 - r0, NPIX))
        oy = np.floor(self.src_y).astype(int) - 5
        lo, hi = np.searchsorted(oy, r0 - STAMP + 1), np.searchsorted(oy, r1)
        sel = np.arange(lo, hi)
        if bright_only:
            sel = sel[np.abs(self.src_peak[sel]) > ins.FULLSAMPLE_MJYSR]
        for i, st in zip(sel, self.stamps(sel)):
            y0, x0 = int(oy[i]), int(np.floor(self.src_x[i])) - 5
            ya, yb = max(y0, r0), min(y0 + STAMP, r1)
            xa, xb = max(x0, 0), min(x0 + STAMP, NPIX)
            if ya < yb and xa < xb:
                out[ya - r0:yb - r0, xa:xb] += st[ya - y0:yb - y0, xa - x0:xb - x0]
        return out

    # ------------------------------------------------------------------ background and flags
    def zodi(self, r0: int, r1: int) -> np.ndarray:
        """ZODI model rows [r0, r1), MJy/sr float64."""
        X = (np.arange(NPIX) - ins.CENTER0) / 1020.0
        Y = (np.arange(r0, r1) - ins.CENTER0) / 1020.0
        return self.z0 * (1 + self.grad[0] * X[None] + self.grad[1] * Y[:, None] + self.quad * (X[None] ** 2 + Y[:, None] ** 2))

    def background(self, r0: int, r1: int, zodi: np.ndarray | None = None) -> np.ndarray:
        """Noiseless sky (MJy/sr) rows [r0, r1): k·ZODI + small-scale structure."""
        z = self.zodi(r0, r1) if zodi is None else zodi
        return self.k_sky * z + 0.01 * self.z0 * upsample(self.structure, r0, r1)

    @staticmethod
    def _in_rows(flat: np.ndarray, r0: int, r1: int) -> np.ndarray:
        return np.arange(np.searchsorted(flat, r0 * NPIX), np.searchsorted(flat, r1 * NPIX))

    def flags(self, r0: int, r1: int, bright: np.ndarray, sky: np.ndarray) -> np.ndarray:
        """FLAGS rows [r0, r1) (int32). ``bright``: bright-only source model; ``sky``: background."""
        f = np.zeros((r1 - r0, NPIX), np.int32)
        f[upsample(self.clumps, r0, r1) > -0.1] |= BIT["SOURCE"]
        oy = np.floor(self.src_y).astype(int) - 5
        lo, hi = np.searchsorted(oy, r0 - STAMP + 1 - 4), np.searchsorted(oy, r1 + 4)
        for i in range(lo, hi):
            rad = float(np.clip(1.5 + 1.3 * np.log10(max(abs(self.src_flux[i]), 30.0) / 30.0), 1.5, 8.0))
            cx, cy = self.src_x[i], self.src_y[i]
            ya, yb = max(int(np.floor(cy - rad)), r0), min(int(np.ceil(cy + rad)) + 1, r1)
            xa, xb = max(int(np.floor(cx - rad)), 0), min(int(np.ceil(cx + rad)) + 1, NPIX)
            if ya < yb and xa < xb:
                yy, xx = np.mgrid[ya:yb, xa:xb]
                f[ya - r0:yb - r0, xa:xb] |= np.where((xx - cx) ** 2 + (yy - cy) ** 2 <= rad * rad, BIT["SOURCE"], 0).astype(np.int32)
        tot = sky + bright
        f[bright > ins.FULLSAMPLE_MJYSR] |= BIT["FULLSAMPLE"]
        f[bright > ins.NONLINEAR_MJYSR] |= BIT["NONLINEAR"]
        f[tot > ins.SATURATION_MJYSR] |= BIT["OVERFLOW"]
        bad = ins.bad_pixels(self.seed, self.det)
        flat = f.reshape(-1)
        for name in ("HOT", "COLD", "NONFUNC"):
            arr = bad[name]
            flat[arr[self._in_rows(arr, r0, r1)] - r0 * NPIX] |= BIT[name]
        flat[self.cr_flat[self._in_rows(self.cr_flat, r0, r1)] - r0 * NPIX] |= BIT["TRANSIENT"]
        flat[self.outlier[self._in_rows(self.outlier, r0, r1)] - r0 * NPIX] |= BIT["OUTLIER"]
        if self.det in (3, 4) and r0 < 160:
            yy, xx = np.mgrid[r0:min(r1, 160), 0:NPIX]
            corner = (xx**2 + yy**2 < 150**2) | ((NPIX - 1 - xx) ** 2 + yy**2 < 150**2)
            f[: yy.shape[0]][corner] |= BIT["DICHROIC"]
        return f

    def counts(self) -> dict[str, int]:
        """Pixels per flag over the whole frame (IMAGE ``L2 N_<FLAG>``); flags-only pass, cached."""
        if self._counts is None:
            tot = {k: 0 for k in FLAG_BITS}
            for s in range(NSTRIP):
                r0, r1 = s * STRIP, min((s + 1) * STRIP, NPIX)
                f = self.flags(r0, r1, self.source_model(r0, r1, bright_only=True), self.background(r0, r1))
                for k, b in BIT.items():
                    tot[k] += int(np.count_nonzero(f & b))
            self._counts = tot
        return self._counts

    # ------------------------------------------------------------------ planes
    def strip(self, s: int) -> dict[str, np.ndarray]:
        """All planes of strip ``s`` (rows 64·s ...): IMAGE, FLAGS, VARIANCE, ZODI (file dtypes, native
        endian) plus the noiseless ``sky`` and ``sources`` (float64)."""
        r0, r1 = s * STRIP, min((s + 1) * STRIP, NPIX)
        z = self.zodi(r0, r1)
        sky = self.background(r0, r1, z)
        src = self.source_model(r0, r1)
        bright = self.source_model(r0, r1, bright_only=True)
        fl = self.flags(r0, r1, bright, sky)
        var = self.sigma**2 * (0.4 + 0.6 * sky / self.z0) + ins.SOURCE_POISSON * np.clip(src, 0, None)
        noise = np.random.default_rng([self.seed, self.oi, self.det, s]).standard_normal((r1 - r0, NPIX))
        img = sky + src + np.sqrt(var) * noise
        img = np.where(fl & BIT["OVERFLOW"], ins.SATURATION_MJYSR, img)
        var_f, img_f = var.reshape(-1), img.reshape(-1)
        bad = ins.bad_pixels(self.seed, self.det)
        for name in ("HOT", "COLD", "NONFUNC"):
            arr = bad[name]
            p = arr[self._in_rows(arr, r0, r1)]
            loc = p - r0 * NPIX
            if name == "HOT":
                img_f[loc] += 5.0 + (p % 45)
                var_f[loc] = np.where(p % 5 == 0, np.nan, var_f[loc] * 100.0)
            elif name == "COLD":
                img_f[loc] *= 0.1
                var_f[loc] = np.where(p % 3 == 0, np.nan, var_f[loc] * 10.0)
            else:
                var_f[loc] = np.nan
        k = self._in_rows(self.cr_flat, r0, r1)
        p, loc = self.cr_flat[k], self.cr_flat[k] - r0 * NPIX
        img_f[loc] += self.cr_amp[k]
        var_f[loc] = np.where(p % 4 == 0, np.nan, var_f[loc] + (0.05 * self.cr_amp[k]) ** 2)
        k = self._in_rows(self.outlier, r0, r1)
        img_f[self.outlier[k] - r0 * NPIX] += 8.0 * self.sigma
        return {"IMAGE": img.astype(np.float32), "FLAGS": fl, "VARIANCE": var.astype(np.float32),
                "ZODI": z.astype(np.float32), "sky": sky, "sources": src}
