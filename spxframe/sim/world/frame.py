"""Drawing one simulated L2 frame (obs_id × detector): any box of rows and columns, pixel for pixel.

Pixel model (MJy/sr, zero-based pixels):

- ZODI  = Z0 · (1 + gx·X + gy·Y + q·(X² + Y²)),  X, Y = (x, y − 1019.5)/1020 (gradients of a few %);
- sky   = k · ZODI + 0.01·Z0·structure,  k ∈ [1.0, 1.3] per frame (the noiseless background);
- sources: a source of truth flux F (µJy, at the WCS-WAVE λ of its position and mid-exposure) adds
  F · P_pix / (Ω · 23.5044), with P_pix the zone PSF integrated over the pixel (10×10 sub-samples
  on the same 0.1 px lattice and normalisation as the PSF cube) and Ω the pixel solid angle
  (arcsec²) from the full TAN-SIP WCS *at the source position* (one Ω per source);
- VARIANCE = σ² (0.4 + 0.6 sky/Z0) + 2e-4 · max(source, 0);  IMAGE = sky + source + N(0, VARIANCE);
  the VARIANCE plane written is that divided by ``variance_understate``² (default 1);
- bad pixels: HOT (+5..50, var ×100, 1 in 5 NaN), COLD (×0.1, var ×10, 1 in 3 NaN), NONFUNC (NaN var),
  cosmic rays TRANSIENT (+2..200, 1 in 4 NaN var), OUTLIER, OVERFLOW (clipped at 40 MJy/sr),
  NONLINEAR / FULLSAMPLE in bright cores, DICHROIC corners on D3/D4, SOURCE on ~50 % of pixels.

Strips are 64 rows; each strip's noise comes from ``default_rng([seed, obs_index, det, strip])``.
``render`` draws any box (only the sources whose stamps meet it) with the same arithmetic per
pixel as a whole strip, so a box is bit for bit the slice of the strips; ``counts`` gives the
IMAGE header's flag counts without drawing the frame.
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


@numba.njit(cache=True, nogil=True)
def _binned_pixels(par: np.ndarray, fx: np.ndarray, fy: np.ndarray, k: np.ndarray, jj: np.ndarray,
                   ii: np.ndarray) -> np.ndarray:
    """Pixel (jj[m], ii[m]) of source k[m]'s stamp, summed exactly as ``_binned_psf`` sums it."""
    out = np.zeros(k.size)
    for m in range(k.size):
        q = k[m]
        smaj, smin, pa, w, sw = par[q, 0], par[q, 1], par[q, 2], par[q, 3], par[q, 4]
        c, s = np.cos(pa), np.sin(pa)
        kc = (1 - w) / (2 * np.pi * smaj * smin)
        kw = w / (2 * np.pi * sw * sw)
        acc = 0.0
        for j in range(jj[m] * PSF_OVERSAMP, (jj[m] + 1) * PSF_OVERSAMP):
            dy = fy[q] + (j - 4.5) / PSF_OVERSAMP
            for i in range(ii[m] * PSF_OVERSAMP, (ii[m] + 1) * PSF_OVERSAMP):
                dx = fx[q] + (i - 4.5) / PSF_OVERSAMP
                a = dx * c + dy * s
                b = -dx * s + dy * c
                v = kc * np.exp(-0.5 * ((a / smaj) ** 2 + (b / smin) ** 2)) \
                    + kw * np.exp(-0.5 * (dx * dx + dy * dy) / (sw * sw))
                acc += v
        out[m] = acc
    return out


@numba.njit(cache=True, nogil=True)
def _source_pixels(grid: np.ndarray, i0: np.ndarray, f: np.ndarray, discs: np.ndarray) -> int:
    """Pixels of the frame with ``upsample(grid, 0, 2040) > -0.1`` or ``discs`` (uint8) set: the
    SOURCE count. A run of pixels between two coarse nodes whose values both clear -0.1 by a margin
    is decided at once (a convex combination); the others are computed as ``upsample`` does."""
    n, nc = i0.size, grid.shape[1]
    start = np.zeros(nc, np.int64)  # pixels [start[a], start[a + 1]) interpolate nodes a, a + 1
    for x in range(n - 1, -1, -1):
        start[i0[x]] = x
    start[nc - 1] = n
    rows = np.empty(nc)
    total = 0
    for y in range(n):
        j, fy = i0[y], f[y]
        for i in range(nc):
            rows[i] = grid[j, i] * (1 - fy) + grid[j + 1, i] * fy
        for a in range(nc - 1):
            x, e = start[a], start[a + 1]
            lo, hi = min(rows[a], rows[a + 1]), max(rows[a], rows[a + 1])
            if lo > -0.1 + 1e-9:
                total += e - x
            elif hi < -0.1 - 1e-9:
                for xx in range(x, e):
                    total += discs[y, xx]
            else:
                for xx in range(x, e):
                    if rows[a] * (1 - f[xx]) + rows[a + 1] * f[xx] > -0.1 or discs[y, xx]:
                        total += 1
    return total


@numba.njit(cache=True, nogil=True)
def _paint_discs(out: np.ndarray, cx: np.ndarray, cy: np.ndarray, rad: np.ndarray) -> None:
    """Set ``out`` (uint8, 2040x2040) to 1 within each disc (pixel centres at distance <= rad)."""
    ny, nx = out.shape
    for k in range(cx.size):
        r = rad[k]
        ya, yb = max(int(np.floor(cy[k] - r)), 0), min(int(np.ceil(cy[k] + r)) + 1, ny)
        xa, xb = max(int(np.floor(cx[k] - r)), 0), min(int(np.ceil(cx[k] + r)) + 1, nx)
        for yy in range(ya, yb):
            dy = yy - cy[k]
            for xx in range(xa, xb):
                dx = xx - cx[k]
                if dx * dx + dy * dy <= r * r:
                    out[yy, xx] = 1


@lru_cache(maxsize=4)
def _interp_index(ncoarse: int) -> tuple[np.ndarray, np.ndarray]:
    """(i0, f) so that pixel p interpolates coarse nodes i0, i0+1 (nodes span 0..2039) with weight f."""
    pos = np.arange(NPIX) * (ncoarse - 1) / (NPIX - 1)
    i0 = np.minimum(np.floor(pos).astype(int), ncoarse - 2)
    return i0, pos - i0


def upsample(grid: np.ndarray, r0: int, r1: int, c0: int = 0, c1: int = NPIX) -> np.ndarray:
    """Box rows [r0, r1) x columns [c0, c1) of the bilinear interpolation of a square coarse grid
    onto 2040x2040 (no BLAS; every pixel is computed by the same operations whatever the box)."""
    i0, f = _interp_index(grid.shape[0])
    j, fy = i0[r0:r1], f[r0:r1, None]
    rows = grid[j] * (1 - fy) + grid[j + 1] * fy  # (ny, ncoarse)
    ic, fc = i0[c0:c1], f[c0:c1]
    return rows[:, ic] * (1 - fc) + rows[:, ic + 1] * fc


def in_box(flat: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
    """(k, loc): positions k in sorted flat pixel indices ``flat`` (row*2040+col) that fall in the box
    rows [r0, r1) x columns [c0, c1), and their flat offsets inside the box."""
    k = np.arange(np.searchsorted(flat, r0 * NPIX), np.searchsorted(flat, r1 * NPIX))
    row, col = np.divmod(flat[k], NPIX)
    if c0 > 0 or c1 < NPIX:
        keep = (col >= c0) & (col < c1)
        k, row, col = k[keep], row[keep], col[keep]
    return k, (row - r0) * (c1 - c0) + (col - c0)


@lru_cache(maxsize=1)
def _dichroic_pixels() -> int:
    """Pixels inside the two 150 px DICHROIC corners of D3/D4 (rows < 160)."""
    yy, xx = np.mgrid[0:160, 0:NPIX]
    return int(np.count_nonzero((xx**2 + yy**2 < 150**2) | ((NPIX - 1 - xx) ** 2 + yy**2 < 150**2)))


def frame_wcs(meta: dict):
    """The frame's celestial astropy WCS (TAN-SIP, from its own header cards), cached in ``meta``.

    Built from a per-detector template (same SIP, CRPIX) given the frame's CRVAL and PC values as
    written in its cards; the same WCS as parsing the cards, in a fraction of the time."""
    if "_wcs" not in meta:
        text = meta["wcs_header"]
        val = {text[i:i + 8].strip(): text[i + 10:i + 80].split("/")[0].strip() for i in range(0, len(text), 80)}
        w = _wcs_template(int(meta["seed"]), int(meta["det"]), val["CRPIX1"], val["CRPIX2"]).deepcopy()
        w.wcs.crval = [float(val["CRVAL1"]), float(val["CRVAL2"])]
        w.wcs.pc = [[float(val["PC1_1"]), float(val["PC1_2"])], [float(val["PC2_1"]), float(val["PC2_2"])]]
        w.wcs.set()
        meta["_wcs"] = w
    return meta["_wcs"]


@lru_cache(maxsize=16)
def _wcs_template(seed: int, det: int, crpix1: str, crpix2: str):
    """The detector's TAN-SIP WCS parsed from its cards (CRVAL and rotation zero), for ``frame_wcs``."""
    from astropy.io import fits
    from astropy.wcs import WCS

    from .headers import card_block

    cards = ins.celestial_cards(seed, det, (0.0, 0.0), 0.0)
    text = card_block(cards, 4).decode("ascii")
    assert f"{float(crpix1)!r}" == f"{ins.CRPIX!r}" and f"{float(crpix2)!r}" == f"{ins.CRPIX!r}"
    return WCS(fits.Header.fromstring(text))


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
        self.var_scale = float(meta.get("variance_understate", 1.0)) ** 2  #: VARIANCE written = true / this
        self._sources(cand_idx)
        self._stamps: dict[int, np.ndarray] = {}
        self._counts: dict[str, int] | None = None
        self._rad: np.ndarray | None = None

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
        self.src_wave, _ = ins.wave_at(self.det, np.clip(self.src_x, -0.5, NPIX - 0.5),
                                       np.clip(self.src_y, -0.5, NPIX - 0.5))
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

    def _touching(self, r0: int, r1: int, c0: int, c1: int, margin: int = 0) -> np.ndarray:
        """Ascending indices of sources whose 12x12 stamp (grown by ``margin``) meets the box."""
        oy = np.floor(self.src_y).astype(int) - 5
        lo, hi = np.searchsorted(oy, r0 - STAMP + 1 - margin), np.searchsorted(oy, r1 + margin)
        sel = np.arange(lo, hi)
        if c0 > 0 or c1 < NPIX:
            ox = np.floor(self.src_x[sel]).astype(int) - 5
            sel = sel[(ox + STAMP + margin > c0) & (ox - margin < c1)]
        return sel

    def source_model(self, r0: int, r1: int, bright_only: bool = False, c0: int = 0, c1: int = NPIX) -> np.ndarray:
        """Noiseless source image (MJy/sr, float64) of rows [r0, r1) x columns [c0, c1)."""
        out = np.zeros((r1 - r0, c1 - c0))
        sel = self._touching(r0, r1, c0, c1)
        if bright_only:
            sel = sel[np.abs(self.src_peak[sel]) > ins.FULLSAMPLE_MJYSR]
        for i, st in zip(sel, self.stamps(sel)):
            y0, x0 = int(np.floor(self.src_y[i])) - 5, int(np.floor(self.src_x[i])) - 5
            ya, yb = max(y0, r0), min(y0 + STAMP, r1)
            xa, xb = max(x0, c0), min(x0 + STAMP, c1)
            if ya < yb and xa < xb:
                out[ya - r0:yb - r0, xa - c0:xb - c0] += st[ya - y0:yb - y0, xa - x0:xb - x0]
        return out

    # ------------------------------------------------------------------ background and flags
    def zodi(self, r0: int, r1: int, c0: int = 0, c1: int = NPIX) -> np.ndarray:
        """ZODI model of rows [r0, r1) x columns [c0, c1), MJy/sr float64."""
        X = (np.arange(c0, c1) - ins.CENTER0) / 1020.0
        Y = (np.arange(r0, r1) - ins.CENTER0) / 1020.0
        return self.z0 * (1 + self.grad[0] * X[None] + self.grad[1] * Y[:, None]
                          + self.quad * (X[None] ** 2 + Y[:, None] ** 2))

    def background(self, r0: int, r1: int, zodi: np.ndarray | None = None, c0: int = 0, c1: int = NPIX) -> np.ndarray:
        """Noiseless sky (MJy/sr) of rows [r0, r1) x columns [c0, c1): k·ZODI + small-scale structure."""
        z = self.zodi(r0, r1, c0, c1) if zodi is None else zodi
        return self.k_sky * z + 0.01 * self.z0 * upsample(self.structure, r0, r1, c0, c1)

    def disc_radius(self, sel: np.ndarray) -> np.ndarray:
        """SOURCE disc radius (px, 1.5-8, growing with flux) of sources ``sel`` (one scalar log10 per
        source, as the discs were always drawn; made once per frame)."""
        if self._rad is None:
            self._rad = np.array([min(max(float(1.5 + 1.3 * np.log10(max(abs(f), 30.0) / 30.0)), 1.5), 8.0)
                                  for f in self.src_flux], dtype=float)
        return self._rad[sel]

    def _source_discs(self, f: np.ndarray, sel: np.ndarray, r0: int, r1: int, c0: int, c1: int,
                      bit: int = BIT["SOURCE"]) -> None:
        """OR ``bit`` (default SOURCE) into ``f`` (box rows [r0, r1) x columns [c0, c1)) within the
        disc of each source ``sel`` (radius 1.5-8 px growing with flux)."""
        for i, rad in zip(sel, self.disc_radius(sel)):
            cx, cy = self.src_x[i], self.src_y[i]
            ya, yb = max(int(np.floor(cy - rad)), r0), min(int(np.ceil(cy + rad)) + 1, r1)
            xa, xb = max(int(np.floor(cx - rad)), c0), min(int(np.ceil(cx + rad)) + 1, c1)
            if ya < yb and xa < xb:
                yy, xx = np.mgrid[ya:yb, xa:xb]
                f[ya - r0:yb - r0, xa - c0:xb - c0] |= np.where((xx - cx) ** 2 + (yy - cy) ** 2 <= rad * rad,
                                                                bit, 0).astype(f.dtype)

    def flags(self, r0: int, r1: int, bright: np.ndarray, sky: np.ndarray, c0: int = 0, c1: int = NPIX) -> np.ndarray:
        """FLAGS of rows [r0, r1) x columns [c0, c1) (int32). ``bright``: bright-only source model;
        ``sky``: background (both of the same box)."""
        f = np.zeros((r1 - r0, c1 - c0), np.int32)
        f[upsample(self.clumps, r0, r1, c0, c1) > -0.1] |= BIT["SOURCE"]
        self._source_discs(f, self._touching(r0, r1, c0, c1, margin=4), r0, r1, c0, c1)
        tot = sky + bright
        f[bright > ins.FULLSAMPLE_MJYSR] |= BIT["FULLSAMPLE"]
        f[bright > ins.NONLINEAR_MJYSR] |= BIT["NONLINEAR"]
        f[tot > ins.SATURATION_MJYSR] |= BIT["OVERFLOW"]
        bad = ins.bad_pixels(self.seed, self.det)
        flat = f.reshape(-1)
        for name in ("HOT", "COLD", "NONFUNC"):
            flat[in_box(bad[name], r0, r1, c0, c1)[1]] |= BIT[name]
        flat[in_box(self.cr_flat, r0, r1, c0, c1)[1]] |= BIT["TRANSIENT"]
        flat[in_box(self.outlier, r0, r1, c0, c1)[1]] |= BIT["OUTLIER"]
        if self.det in (3, 4) and r0 < 160:
            yy, xx = np.mgrid[r0:min(r1, 160), c0:c1]
            corner = (xx**2 + yy**2 < 150**2) | ((NPIX - 1 - xx) ** 2 + yy**2 < 150**2)
            f[: yy.shape[0]][corner] |= BIT["DICHROIC"]
        return f

    def counts(self) -> dict[str, int]:
        """Pixels per flag over the whole frame (IMAGE ``L2 N_<FLAG>``), cached.

        The same pixels as rendering every strip's FLAGS and counting, computed without the
        strips: the listed defects are counted by their lists, SOURCE on one frame-wide mask, and
        the brightness flags only where bright sources' stamps fall (the sky alone stays far below
        the overflow level, which is checked)."""
        if self._counts is None:
            tot = {k: 0 for k in FLAG_BITS}
            bad = ins.bad_pixels(self.seed, self.det)
            for name in ("HOT", "COLD", "NONFUNC"):
                tot[name] = int(bad[name].size)
            tot["TRANSIENT"], tot["OUTLIER"] = int(self.cr_flat.size), int(self.outlier.size)
            if self.det in (3, 4):
                tot["DICHROIC"] = _dichroic_pixels()
            discs = np.zeros((NPIX, NPIX), np.uint8)
            _paint_discs(discs, self.src_x, self.src_y, self.disc_radius(np.arange(self.src_x.size)))
            tot["SOURCE"] = int(_source_pixels(self.clumps, *_interp_index(self.clumps.shape[0]), discs))
            tot.update(self._bright_counts())
            self._counts = tot
        return self._counts

    def _bright_counts(self) -> dict[str, int]:
        """FULLSAMPLE, NONLINEAR and OVERFLOW pixel counts over the frame (see ``counts``)."""
        sky_max = self.k_sky * self.z0 * (1 + abs(self.grad[0]) + abs(self.grad[1]) + 2 * abs(self.quad)) \
            + 0.01 * self.z0 * float(np.abs(self.structure).max())
        if 2.0 * sky_max >= ins.SATURATION_MJYSR:  # never for SPHEREx levels; keep exactness anyway
            out = {"FULLSAMPLE": 0, "NONLINEAR": 0, "OVERFLOW": 0}
            for s in range(NSTRIP):
                r0, r1 = s * STRIP, min((s + 1) * STRIP, NPIX)
                f = self.flags(r0, r1, self.source_model(r0, r1, bright_only=True), self.background(r0, r1))
                for k in out:
                    out[k] += int(np.count_nonzero(f & BIT[k]))
            return out
        return self._bright_counts_sparse()

    def _bright_counts_sparse(self) -> dict[str, int]:
        """The brightness flags without drawing the bright sources' stamps: an upper bound of the
        bright-source image at every stamp pixel (each PSF sub-sample bounded at its pixel's nearest
        point to the source) leaves a few candidate pixels, whose values are then summed exactly
        as ``_binned_psf`` and ``source_model`` sum them (same operations, same order)."""
        zero = {"FULLSAMPLE": 0, "NONLINEAR": 0, "OVERFLOW": 0}
        sel = np.flatnonzero(np.abs(self.src_peak) > ins.FULLSAMPLE_MJYSR)
        if not sel.size:
            return zero
        par = np.ascontiguousarray(ins.psf_params(self.det)[self.src_plane[sel]][:, :5])
        _, sums = ins.psf_cube(self.det)
        ox, oy = np.floor(self.src_x[sel]) - 5, np.floor(self.src_y[sel]) - 5
        fx, fy = ox - self.src_x[sel], oy - self.src_y[sel]
        scale = self.src_flux[sel] / (sums[self.src_plane[sel]] * self.src_omega[sel] * MJY_SR_TO_UJY_PER_ARCSEC2)
        k, jj, ii = (g.ravel() for g in np.meshgrid(np.arange(sel.size), np.arange(STAMP), np.arange(STAMP),
                                                    indexing="ij"))  # k-major: ascending source order
        py, px = oy.astype(int)[k] + jj, ox.astype(int)[k] + ii
        on = (py >= 0) & (py < NPIX) & (px >= 0) & (px < NPIX)
        k, jj, ii, pix = k[on], jj[on], ii[on], (py * NPIX + px)[on]
        rx = np.maximum(np.abs(fx[k] + ii) - 0.45 - 1e-9, 0.0)
        ry = np.maximum(np.abs(fy[k] + jj) - 0.45 - 1e-9, 0.0)
        smaj, w, sw = par[k, 0], par[k, 3], par[k, 4]
        r2 = rx * rx + ry * ry
        peak = (1 - w) / (2 * np.pi * smaj * par[k, 1]) * np.exp(-0.5 * r2 / smaj**2) \
            + w / (2 * np.pi * sw * sw) * np.exp(-0.5 * r2 / (sw * sw))
        upix, inv = np.unique(pix, return_inverse=True)
        bound = np.bincount(inv, np.maximum(scale[k], 0.0) * PSF_OVERSAMP**2 * peak, upix.size) * (1 + 1e-6)
        cand = bound > ins.FULLSAMPLE_MJYSR  # OVERFLOW needs more (the sky is below half the level)
        if not cand.any():
            return zero
        use = cand[inv]
        k, jj, ii, inv_c = k[use], jj[use], ii[use], np.cumsum(cand)[inv[use]] - 1
        st = _binned_pixels(par, fx, fy, k, jj, ii) * scale[k]
        bright = np.zeros(int(cand.sum()))
        np.add.at(bright, inv_c, st)  # sequential, in ascending source order: as the strips add stamps
        sky = self.sky_at(*np.divmod(upix[cand], NPIX))
        return {"FULLSAMPLE": int(np.count_nonzero(bright > ins.FULLSAMPLE_MJYSR)),
                "NONLINEAR": int(np.count_nonzero(bright > ins.NONLINEAR_MJYSR)),
                "OVERFLOW": int(np.count_nonzero(sky + bright > ins.SATURATION_MJYSR))}

    def sky_at(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``background`` at pixels (y, x), element by element with the same arithmetic."""
        X, Y = (x - ins.CENTER0) / 1020.0, (y - ins.CENTER0) / 1020.0
        z = self.z0 * (1 + self.grad[0] * X + self.grad[1] * Y + self.quad * (X**2 + Y**2))
        g = self.structure
        i0, f = _interp_index(g.shape[0])
        j, fy, i, fx = i0[y], f[y], i0[x], f[x]
        up = (g[j, i] * (1 - fy) + g[j + 1, i] * fy) * (1 - fx) + (g[j, i + 1] * (1 - fy) + g[j + 1, i + 1] * fy) * fx
        return self.k_sky * z + 0.01 * self.z0 * up

    # ------------------------------------------------------------------ planes
    def noise(self, r0: int, r1: int, c0: int = 0, c1: int = NPIX) -> np.ndarray:
        """Unit normal noise of the box, drawn strip by strip (each strip from its own generator,
        row after row: the rows past the box are not drawn, which leaves the others unchanged)."""
        parts = []
        for s in range(r0 // STRIP, (r1 - 1) // STRIP + 1):
            a, b = s * STRIP, min((s + 1) * STRIP, NPIX, r1)
            n = np.random.default_rng([self.seed, self.oi, self.det, s]).standard_normal((b - a, NPIX))
            parts.append(n[max(r0, a) - a:min(r1, b) - a, c0:c1])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def strip(self, s: int) -> dict[str, np.ndarray]:
        """All planes of strip ``s`` (rows 64·s ...): IMAGE, FLAGS, VARIANCE, ZODI (file dtypes, native
        endian) plus the noiseless ``sky`` and ``sources`` (float64)."""
        return self.render(s * STRIP, min((s + 1) * STRIP, NPIX))

    def render(self, r0: int, r1: int, c0: int = 0, c1: int = NPIX) -> dict[str, np.ndarray]:
        """All planes of the box rows [r0, r1) x columns [c0, c1), pixel for pixel the same as the
        strips' (see ``strip``). Only the sources whose stamps meet the box are drawn."""
        z = self.zodi(r0, r1, c0, c1)
        sky = self.background(r0, r1, z, c0, c1)
        src = self.source_model(r0, r1, c0=c0, c1=c1)
        bright = self.source_model(r0, r1, bright_only=True, c0=c0, c1=c1)
        fl = self.flags(r0, r1, bright, sky, c0, c1)
        var = self.sigma**2 * (0.4 + 0.6 * sky / self.z0) + ins.SOURCE_POISSON * np.clip(src, 0, None)
        img = sky + src + np.sqrt(var) * self.noise(r0, r1, c0, c1)
        img = np.where(fl & BIT["OVERFLOW"], ins.SATURATION_MJYSR, img)
        self._defects(img.reshape(-1), var.reshape(-1), r0, r1, c0, c1)
        if self.var_scale != 1.0:
            var = var / self.var_scale
        return {"IMAGE": img.astype(np.float32), "FLAGS": fl, "VARIANCE": var.astype(np.float32),
                "ZODI": z.astype(np.float32), "sky": sky, "sources": src}

    def _defects(self, img_f: np.ndarray, var_f: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> None:
        """Apply bad pixels, cosmic rays and outliers to flat IMAGE/VARIANCE views of a box, in place."""
        bad = ins.bad_pixels(self.seed, self.det)
        for name in ("HOT", "COLD", "NONFUNC"):
            k, loc = in_box(bad[name], r0, r1, c0, c1)
            p = bad[name][k]
            if name == "HOT":
                img_f[loc] += 5.0 + (p % 45)
                var_f[loc] = np.where(p % 5 == 0, np.nan, var_f[loc] * 100.0)
            elif name == "COLD":
                img_f[loc] *= 0.1
                var_f[loc] = np.where(p % 3 == 0, np.nan, var_f[loc] * 10.0)
            else:
                var_f[loc] = np.nan
        k, loc = in_box(self.cr_flat, r0, r1, c0, c1)
        img_f[loc] += self.cr_amp[k]
        var_f[loc] = np.where(self.cr_flat[k] % 4 == 0, np.nan, var_f[loc] + (0.05 * self.cr_amp[k]) ** 2)
        img_f[in_box(self.outlier, r0, r1, c0, c1)[1]] += 8.0 * self.sigma
