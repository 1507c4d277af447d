"""Forced photometry of a catalog on local SPHEREx L2 files: ``measure()`` → schema.PHOTOMETRY.

Method (DESIGN "Photometry"): per file, sky → parent pixel with the parent's cached TAN-SIP WCS
(proper motion applied to mid-exposure), stamps cut from only the rows needed, then one numba
call (:func:`spxframe.photometry.kernels.measure_stamps`) for all stamps of all files:

- background: inside the annulus (pixel centres, r_in <= d < r_out) the ZODI plane is scaled to
  the sky by s = median(I) / median(ZODI) over good non-SOURCE pixels (SOURCE pixels are used only
  when fewer than 20 remain), then b = 3-sigma-clipped (median/MAD, 5 iterations) mean of
  I - s·ZODI, error std/sqrt(n). Each aperture pixel's sky is s·ZODI_i + b.
- flux: exact circle overlap weights w, usable indicator m (not bad by the file's own FLAGS bit
  map, finite, not within SATURATED_CORE_RADIUS of OVERFLOW), PSF fraction P per pixel at the
  source's sub-pixel position — QR2: the nearest zone's plane of the PSF cube integrated onto
  the pixels; QR3 (R7): OVSMPX x OVSMPY x the nearest zone's ePSF sampled at the pixel centre
  (cubic B-spline, never integrated again):
  F = Σ w m (I - sky) / Σ w m P;  σ² = (Σ w² m V + (σ_b Σ w m)²) / (Σ w m P)²;
  NaN (MASKED_FRACTION) when Σ w m P / Σ w P < 1 - max_masked_fraction.
- units: µJy = MJy/sr · pixel (×) Ω[arcsec²] · 23.5044, Ω from the local WCS Jacobian.

Each file is read by its own format (``spxframe.fits.l2file.file_format``): FLAGS plain or RICE_1
tile-compressed, bit cards MP_ or MSKN, PSF cube or EPSF table.
``source_id`` keeps the catalog's dtype.
``bjd_tdb`` is a full Julian date (TDB) at the solar-system barycentre.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import polars as pl

from spxframe import schema, spherex
from spxframe.errors import FileFormatError, InputError
from spxframe.fits import flagbits
from spxframe.fits import l2file as mef
from spxframe.fits import wcs as _wcs
from spxframe.fits.hdu import read_rows
from spxframe.fits.tiles import is_tiled, read_tiled_rows, tiled_image
from spxframe.photometry import gains as _gains
from spxframe.photometry import kernels as K
from spxframe.photometry import wave as _wave
from spxframe.photometry.epsf import EpsfModel

log = logging.getLogger("spxframe")
C_KM_S = 299792.458
_WCS_CACHE: dict[tuple, Any] = {}
_PSF_CACHE: dict[str, mef.PsfPlanes | None] = {}
_ZONE_CACHE: dict[tuple, mef.PsfZones] = {}
_EPSF_CACHE: dict[str, EpsfModel] = {}  #: ePSF libraries by detector + library (one read per process)
_MASK_CACHE: dict[tuple, tuple[int, int, int]] = {}
#: FLAGS bits that set the SATURATED quality bit when an aperture pixel carries one
SATURATION_FLAGS: tuple[str, ...] = ("OVERFLOW", "BLOOM")
#: Saturated cores. QR3 (R7) flags a saturated core BLOOM over its whole extent (hard-bad by
#: default); QR2 marks only the few OVERFLOW pixels at its peak. So that a bright star is treated
#: alike on both sides of the release boundary, aperture pixels within this many px (pixel centres)
#: of an OVERFLOW pixel are unusable in either release (the background is left alone); the
#: usable-area rule (``max_masked_fraction``) then makes such a measurement NaN. The R7 BLOOM
#: extent is not documented (spec §8): 3 px covers the default 2 px aperture.
SATURATED_CORE_RADIUS: float = 3.0


def _catalog(catalog) -> tuple[pl.DataFrame, pl.DataType]:
    """(catalog with text ids and float columns, the catalog's own source_id dtype)."""
    if not isinstance(catalog, pl.DataFrame):
        is_pandas = hasattr(catalog, "to_numpy") and hasattr(catalog, "iloc")
        catalog = pl.from_pandas(catalog) if is_pandas else pl.DataFrame(catalog)
    for c in ("source_id", "ra", "dec"):
        if c not in catalog.columns:
            raise InputError(f"catalog has no column {c!r}")
    cols = [pl.col("source_id").cast(pl.Utf8), pl.col("ra").cast(pl.Float64), pl.col("dec").cast(pl.Float64)]
    for c, default in (("pmra", 0.0), ("pmdec", 0.0), ("ref_epoch", 2016.0)):
        cols.append(pl.col(c).cast(pl.Float64).fill_null(default).fill_nan(default) if c in catalog.columns
                    else pl.lit(default).alias(c))
    return catalog.select(cols), catalog.schema["source_id"]


def _files(files) -> tuple[list[str], dict[str, list[str]] | None, set[tuple[str, str]]]:
    """Distinct paths; for a manifest the source_ids each path serves and the clipped (path, id) pairs."""
    if isinstance(files, pl.DataFrame) or (hasattr(files, "columns") and hasattr(files, "iloc")):
        m = files if isinstance(files, pl.DataFrame) else pl.from_pandas(files)
        if "path" not in m.columns:
            raise InputError("manifest has no column 'path'")
        if "status" in m.columns:
            m = m.filter(pl.col("status") == "done")
        m = m.filter(pl.col("path").is_not_null() & (pl.col("path") != ""))
        if "source_id" not in m.columns:
            return list(dict.fromkeys(m["path"].to_list())), None, set()
        m = m.with_columns(pl.col("source_id").cast(pl.Utf8))
        clipped = set()
        if "clipped" in m.columns:
            c = m.filter(pl.col("clipped").fill_null(False))
            clipped = set(zip(c["path"].to_list(), c["source_id"].to_list()))
        g = m.group_by("path", maintain_order=True).agg(pl.col("source_id").unique(maintain_order=True))
        return g["path"].to_list(), dict(zip(g["path"].to_list(), g["source_id"].to_list())), clipped
    paths = [str(p) for p in ([files] if isinstance(files, (str, os.PathLike)) else files)]
    return list(dict.fromkeys(paths)), None, set()


def _apply_pm(cat: dict[str, np.ndarray], idx: np.ndarray, mjd: float) -> tuple[np.ndarray, np.ndarray]:
    """RA, Dec (deg) of catalog rows idx at epoch mjd (linear proper motion, pmra = µ_α cos δ)."""
    ra, dec = cat["ra"][idx], cat["dec"][idx]
    pmra, pmdec, ep = cat["pmra"][idx], cat["pmdec"][idx], cat["ref_epoch"][idx]
    dt = 2000.0 + (mjd - 51544.5) / 365.25 - ep  # Julian years
    if not np.any(pmra) and not np.any(pmdec):
        return ra, dec
    d = dec + pmdec * dt / 3.6e6
    r = ra + pmra * dt / 3.6e6 / np.cos(np.radians(dec))
    return r % 360.0, d


def bjd_tdb(mjd_utc: np.ndarray, ra: np.ndarray, dec: np.ndarray, sc_km: np.ndarray) -> np.ndarray:
    """Barycentric Julian date (TDB) of arrival: JD_TDB + r·n̂/c, r = Earth (+ spacecraft) position.

    mjd_utc, ra, dec (deg): (n,); sc_km: (n, 3) geocentric spacecraft position (NaN → Earth centre).
    One ephemeris call for all unique times.
    """
    from astropy.coordinates import get_body_barycentric
    from astropy.time import Time

    out = np.full(len(mjd_utc), np.nan)
    ok = np.isfinite(mjd_utc)
    if not ok.any():
        return out
    u, inv = np.unique(mjd_utc[ok], return_inverse=True)
    t = Time(u, format="mjd", scale="utc")
    earth = get_body_barycentric("earth", t).xyz.to_value("km").T  # (nu, 3)
    pos = earth[inv] + np.nan_to_num(sc_km[ok])
    r, d = np.radians(ra[ok]), np.radians(dec[ok])
    nhat = np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)], axis=1)
    delay_d = (pos * nhat).sum(axis=1) / C_KM_S / 86400.0
    out[ok] = t.tdb.jd1[inv] + t.tdb.jd2[inv] + delay_d
    return out


class _Stack:
    """Accumulates stamps over files; runs the kernel every ``chunk`` stamps (bounded memory)."""

    def __init__(self, half: int, kernel_kw: dict, chunk: int = 20000) -> None:
        self.half, self.kw, self.chunk = half, kernel_kw, chunk
        self.img, self.var, self.flg, self.zod, self.cx, self.cy, self.pidx = ([] for _ in range(7))
        self.cidx, self.bad, self.core = [], [], []
        self.rows: list[dict] = []
        self.planes: list[np.ndarray] = []
        self.plane_ids: dict[tuple[str, int], int] = {}
        self.coefs: list[np.ndarray] = []
        self.epars: list[tuple[float, float, float, float]] = []
        self.coef_ids: dict[tuple[str, int], int] = {}
        self.n_done = 0
        self.results: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def plane_index(self, key: str, cube, plane: int) -> int:
        k = (key, int(plane))
        if k not in self.plane_ids:
            self.plane_ids[k] = len(self.planes)
            self.planes.append(np.ascontiguousarray(cube[int(plane)], dtype=np.float64))
        return self.plane_ids[k]

    def coef_index(self, key: str, model: EpsfModel, zone: int) -> int:
        """Index of ePSF zone ``zone`` of library ``key`` among the stack's spline coefficients."""
        k = (key, int(zone))
        if k not in self.coef_ids:
            self.coef_ids[k] = len(self.coefs)
            self.coefs.append(model.coefs[int(zone)])  # prepared by the caller
            self.epars.append((*model.centre, float(model.ovx), float(model.ovy)))
        return self.coef_ids[k]

    def add(self, stamps, k: int, cx: float, cy: float, pi: int, ci: int, masks: tuple[int, ...]) -> int:
        """Queue stamp k of a file's stamps (cube plane ``pi`` or ePSF ``ci``, -1 for none;
        ``masks`` = (bad, core) FLAGS masks of its file); returns its global index."""
        g = self.n_done + len(self.cx)
        self.img.append(stamps[0][k]), self.var.append(stamps[1][k]), self.flg.append(stamps[2][k])
        self.zod.append(stamps[3][k]), self.cx.append(cx), self.cy.append(cy), self.pidx.append(pi)
        self.cidx.append(ci), self.bad.append(masks[0]), self.core.append(masks[1])
        if len(self.cx) >= self.chunk:
            self.flush()
        return g

    def flush(self) -> None:
        if not self.cx:
            return
        pidx, cidx = np.array(self.pidx, np.int64), np.array(self.cidx, np.int64)
        if self.planes:
            planes = np.stack(self.planes)
        else:
            planes = np.zeros((1, 11, 11))
            planes[0, 5, 5] = 1.0
        nopsf = (pidx < 0) & (cidx < 0)
        pidx[pidx < 0] = 0
        coefs, epars = np.zeros((1, 1, 1)), np.zeros((1, 4))
        if self.coefs:  # libraries of different array sizes: zero-pad at the far edges
            h, w = max(c.shape[0] for c in self.coefs), max(c.shape[1] for c in self.coefs)
            coefs = np.stack([np.pad(c, ((0, h - c.shape[0]), (0, w - c.shape[1]))) for c in self.coefs])
            epars = np.array(self.epars, np.float64)
        out, fo, status = K.measure_stamps(np.stack(self.img), np.stack(self.var), np.stack(self.flg),
                                           np.stack(self.zod), planes, pidx, np.array(self.cx),
                                           np.array(self.cy), bad_mask=np.array(self.bad, np.int64),
                                           core_mask=np.array(self.core, np.int64), coefs=coefs, epars=epars,
                                           coef_index=cidx, **self.kw)
        out[nopsf, :] = np.nan
        self.results.append((out, fo, status))
        self.n_done += len(self.cx)
        for lst in (self.img, self.var, self.flg, self.zod, self.cx, self.cy, self.pidx, self.cidx, self.bad,
                    self.core):
            lst.clear()


def _cut(fd: int, info: mef.MefInfo, x: np.ndarray, y: np.ndarray, half: int):
    """(n, S, S) stamps of IMAGE, VARIANCE, FLAGS, ZODI around rounded (x, y); NaN/0 off the file."""
    ny, nx = info.shape
    s = 2 * half + 1
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    r0, r1 = int(iy.min()) - half, int(iy.max()) + half + 1
    rows = (iy - half - r0)[:, None] + np.arange(s)[None]  # index into the row block
    inside = r0 >= 0 and r1 <= ny and int(ix.min()) >= half and int(ix.max()) + half < nx
    cols = ix[:, None] + np.arange(-half if inside else 0, s - half if inside else s)[None]
    out = []
    for name, fill in (("IMAGE", np.nan), ("VARIANCE", np.nan), ("FLAGS", 0), ("ZODI", np.nan)):
        hdu = info.hdus[name]
        if b"BINTABLE" in hdu.header.raw[:80] and is_tiled(hdu.header):  # R7 FLAGS: RICE_1 tiles (or plain)
            blk = read_tiled_rows(fd, tiled_image(hdu), r0, r1)
        else:
            blk = read_rows(fd, hdu, r0, r1, convert=False)  # stored type: convert the stamps only
        if not inside:  # pad by `half` columns and the missing rows (cols index the padded block)
            pad = np.full((r1 - r0, nx + 2 * half), fill, dtype=blk.dtype)
            a, b = max(r0, 0) - r0, max(r0, 0) - r0 + blk.shape[0]
            pad[a:b, half:half + nx] = blk
            blk = pad
        out.append(blk[rows[:, :, None], cols[:, None, :]].astype(np.float64 if blk.dtype.kind == "f" else np.int64))
    return out, x - (ix - half), y - (iy - half)


def measure(files: Iterable[str] | pl.DataFrame, catalog, *, cache_dir: str | os.PathLike | None = None,
            aperture_radius: float = 2.0,
            annulus: tuple[float, float] = (5.0, 9.0), background: str = "annulus",
            bad_bits: Iterable[int | str] | str | None = None, max_masked_fraction: float = 0.5,
            calibration=None, progress: bool = False) -> pl.DataFrame:
    """Forced photometry of every catalog source on every given SPHEREx L2 file it falls on.

    files: paths, or a manifest with ``path`` (+ ``status``: only 'done' rows; + ``source_id``:
    only the listed sources per path). catalog: source_id, ra, dec (deg), optional pmra, pmdec
    (mas/yr), ref_epoch (Julian yr). aperture_radius, annulus (r_in, r_out): pixels.
    background: 'annulus' (ZODI scaled to the annulus sky + clipped residual) or 'zodi' (the
    ZODI plane as is). bad_bits: FLAGS bits that mask a pixel, as bit numbers and/or names
    (``"GHOST"``; names resolve through each file's own bit cards, either card style); default the
    spec §4.2 consensus plus every R7 bit (CROSSTALK, GHOST*, STREAK, BLOOM, SNOWBALL, HALO*:
    ``spxframe.fits.flagbits.HARD_BAD_NAMES``; QR2 files never set the R7 bits); SOURCE and
    FULLSAMPLE are refused. Saturated cores are unusable inside the aperture in both releases
    (BLOOM in QR3; within :data:`SATURATED_CORE_RADIUS` of OVERFLOW in either). A measurement whose usable PSF-weighted
    aperture area is below ``1 - max_masked_fraction`` (default: half) has NaN flux and the
    MASKED_FRACTION quality bit (with SATURATED when a saturated core caused it), never a sum of
    the few usable pixels. Returns one schema.PHOTOMETRY row per (source, file) with the
    source on the file's pixels (manifest pairs always get a row; qc says why flux may be NaN).

    Both file formats are read, each by its own format (never by its time): QR2 (pipeline 6.x,
    the PSF cube integrated over pixels) and QR3 (pipeline R7: RICE_1-compressed FLAGS, MSKN bit
    cards, the EPSF table — the flux fraction in a pixel is OVSMPX x OVSMPY x the ePSF sampled at
    the pixel's centre, :mod:`spxframe.photometry.epsf`).

    cache_dir: the fetch cache the files came from (a path or a CacheDir); range-read cutouts
    hold their PSF cube's name in the PSFFILE card and the cube is read from
    ``cache_dir/psf/<psf_key>.fits``. Without it, PSFFILE is resolved relative to the file's
    folder, then relative to the cache root of fetch's layout (two folders above ``data/D<d>/``);
    a file whose cube is not found gets a READ_ERROR row (the rule:
    :func:`spxframe.fits.l2file.psf_path`). An R7 (QR3) file stored without its EPSF table names
    its ePSF library the same way in an ``EPSFFILE`` card (PRIMARY or IMAGE header): the
    ``epsf`` calibration product, or any file that holds the table.

    calibration: the QR2 → R7 gain correction (``l3_flux_corrections``, spec §3.10) for QR2-format
    files: None (none), a folder of product files (highest token per detector) or a mapping
    detector → file; IMAGE × f, VARIANCE × f² at the pixels measured, never on R7 files. Rows
    carry ``gain_factor`` (f at the source's pixel; 1.0 uncorrected) and ``wave_source``: wavelength
    and bandwidth come from the ``spectral_wcs`` product's CWAVE/CBAND maps found the same way
    (any release; a mapping ``{family: {detector: file}}`` gives both products), else from the
    file's WCS-WAVE lookup (:mod:`spxframe.photometry.wave`).
    """
    r_in, r_out = (float(a) for a in annulus)
    if not 0 < aperture_radius <= r_in < r_out:
        raise InputError(f"need 0 < aperture_radius <= r_in < r_out, got {aperture_radius}, {annulus}")
    if background not in ("annulus", "zodi"):
        raise InputError(f"background must be 'annulus' or 'zodi', got {background!r}")
    if bad_bits is not None and not isinstance(bad_bits, str):
        bad_bits = list(bad_bits)
    flagbits.bad_bits(bad_bits)  # unknown names, bits out of range, SOURCE/FULLSAMPLE: refused up front
    cat, id_dtype = _catalog(catalog)
    gain_files, wave_files = _gains.resolve(calibration), _wave.resolve(calibration)
    ids = cat["source_id"].to_numpy()
    cat = {c: cat[c].to_numpy() for c in ("ra", "dec", "pmra", "pmdec", "ref_epoch")}
    pos_of = {s: i for i, s in enumerate(ids)}
    paths, wanted, clipped = _files(files)
    half = int(math.ceil(max(r_out, 5.5))) + 1
    zodi_only = background == "zodi"
    st = _Stack(half, dict(r_ap=aperture_radius, r_in=(r_out + 1e9 if zodi_only else r_in),
                           r_out=(r_out + 2e9 if zodi_only else r_out), core_radius=SATURATED_CORE_RADIUS))
    cra, cdec = np.radians(cat["ra"]), np.radians(cat["dec"])
    cvec = np.stack([np.cos(cdec) * np.cos(cra), np.cos(cdec) * np.sin(cra), np.sin(cdec)], axis=1)
    for n_done, path in enumerate(paths):
        if progress and n_done % 100 == 0:
            log.info("measure: %d/%d files", n_done, len(paths))
        want = None if wanted is None else np.array([pos_of[s] for s in wanted[path] if s in pos_of], np.int64)
        try:
            _one_file(path, cat, ids, cvec, want, st, r_ap=aperture_radius, r_in=r_in, r_out=r_out,
                      cache_dir=cache_dir, bad_bits=bad_bits, gain_files=gain_files, wave_files=wave_files)
        except (OSError, ValueError, KeyError, FileFormatError) as exc:
            log.warning("measure: cannot read %s: %s", path, exc)
            m = re.match(r"^(.+?)D(\d)(?:_|\.)", os.path.basename(path))
            base = dict(obs_id=m.group(1), detector=int(m.group(2))) if m else {}
            for i in ([] if want is None else want):
                st.rows.append(dict(base, source_id=ids[i], file=path, qc=schema.QC["READ_ERROR"]))
    if clipped:
        for row in st.rows:
            if (row.get("file"), row.get("source_id")) in clipped:
                row["qc"] = int(row.get("qc", 0)) | schema.QC["CUTOUT_CLIPPED"]
    out = _finish(st, r_ap=aperture_radius, max_masked=max_masked_fraction, zodi_only=zodi_only)
    return out.with_columns(pl.col("source_id").cast(id_dtype))  # the catalog's dtype


def _masks(info: mef.MefInfo, bad_bits) -> tuple[int, int, int]:
    """(bad mask, saturated-core mask, SATURATED mask) of a file, through its own FLAGS bit map."""
    key = (tuple(sorted(info.flag_bits.items())), None if bad_bits is None else str(bad_bits))
    got = _MASK_CACHE.get(key)
    if got is None:
        bits = {**flagbits.DEFAULT_FLAG_BITS, **info.flag_bits}
        sat = 0
        for name in SATURATION_FLAGS:
            sat |= 1 << bits[name]
        got = _MASK_CACHE[key] = (flagbits.bad_mask(bad_bits, info.flag_bits), 1 << bits["OVERFLOW"], sat)
    return got


def _psf_models(info: mef.MefInfo, fd: int, xp: np.ndarray, yp: np.ndarray, st: _Stack):
    """Per source (parent pixels xp, yp): (cube plane index in ``st``, ePSF index in ``st``; -1 for
    none) and the qc bits they imply. R7 files use their EPSF table (one library read per process
    per detector and library), QR2 files the nearest zone's plane of the PSF cube."""
    n = len(xp)
    pidx, cidx = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    qc = np.zeros(n, np.int64)
    if info.epsf_key:  # R7: the EPSF table (or the EPSFFILE library)
        model = _EPSF_CACHE.get(info.epsf_key)
        if model is None:
            model = _EPSF_CACHE[info.epsf_key] = EpsfModel(mef.epsf_library(info, fd))
        zones = model.zone_of(xp, yp)
        model.prepare(zones)
        cidx[:] = [st.coef_index(info.epsf_key, model, z) for z in zones]
        return pidx, cidx, qc
    if info.psf_header is not None:
        zk = (info.psf_key, info.version)
        zones = _ZONE_CACHE.get(zk)
        if zones is None:
            zones = _ZONE_CACHE[zk] = mef.parse_psf_zones(info.psf_header, info.version)
        if info.psf_key not in _PSF_CACHE:
            _PSF_CACHE[info.psf_key] = mef.psf_cube(info, fd)
        cube = _PSF_CACHE[info.psf_key]
        if zones.legacy:
            qc |= schema.QC["LEGACY_PSF_HEADER"]
        if cube is not None and len(zones.xctr):
            planes = zones.zone_plane(xp, yp)
            mef.load_psf_planes(cube, info, fd, planes)
            for k in range(n):
                if 0 <= planes[k] < cube.shape[0]:
                    pidx[k] = st.plane_index(info.psf_key, cube, planes[k])
    qc[pidx < 0] |= schema.QC["NO_PSF"]
    return pidx, cidx, qc


def _one_file(path: str, cat: dict[str, np.ndarray], ids: np.ndarray, cvec: np.ndarray, want: np.ndarray | None,
              st: _Stack, *, r_ap: float, r_in: float, r_out: float, cache_dir=None, bad_bits=None,
              gain_files: dict[int, str] | None = None, wave_files: dict[int, str] | None = None) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        info = mef.open_info(path, fd, cache_dir=cache_dir)
        im = info.image  # parent identity; CRVAL/PC guard against equal ids from different archives
        wkey = (info.obs_id, info.detector, info.version, im.get("CRVAL1"), im.get("CRVAL2"), im.get("PC1_1"),
                im.get("CD1_1"))
        wcs = _WCS_CACHE.get(wkey)
        if wcs is None:
            wcs = _WCS_CACHE[wkey] = _wcs.celestial_wcs(info)
            if wcs is None:
                raise FileFormatError(f"{path}: the IMAGE header has no usable celestial WCS")
        ny, nx = info.shape
        listed = want is not None  # manifest pairs: every pair gets a row, OFF_FILE if needed
        if want is None:  # candidates: catalog sources within 3.2 deg of the file's reference point
            c = np.radians(wcs.crval)
            v = np.array([math.cos(c[1]) * math.cos(c[0]), math.cos(c[1]) * math.sin(c[0]), math.sin(c[1])])
            want = np.nonzero(cvec @ v > math.cos(math.radians(3.2)))[0]
        if len(want) == 0:
            return
        ra, dec = _apply_pm(cat, want, info.mjd)
        xp, yp = wcs.world2pix(ra, dec, tolerance=1e-8, maxiter=50)
        x, y = xp - info.x0, yp - info.y0
        on = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5) & np.isfinite(x) & np.isfinite(y)
        base = dict(obs_id=info.obs_id, detector=info.detector, file=path, mjd=info.mjd)
        sc = info.sc_pos_km or (np.nan, np.nan, np.nan)
        keep = on
        for i in (np.nonzero(~on)[0] if listed else []):
            st.rows.append(dict(base, source_id=ids[want[i]], x=x[i], y=y[i], ra=ra[i], dec=dec[i], sc=sc,
                                qc=schema.QC["OFF_FILE"], _off=True))
        if not keep.any():
            return
        want, ra, dec, xp, yp, x, y = (a[keep] for a in (want, ra, dec, xp, yp, x, y))
        wave, bw, wsrc = _wave.wavelengths(info, fd, xp, yp, wave_files)
        area = wcs.pixel_area(xp, yp)
        masks = _masks(info, bad_bits)
        pidx, cidx, qcs = _psf_models(info, fd, xp, yp, st)
        stamps, cx, cy = _cut(fd, info, x, y, st.half)
        gf = np.ones(len(x))
        if info.format == "qr2" and gain_files:  # never on R7 files; NaN: asked for, not applied
            gf = (_gains.apply(_gains.load(gain_files[info.detector]), stamps, x, y, info.x0, info.y0, st.half)
                  if info.detector in gain_files else np.full(len(x), np.nan))
    finally:
        os.close(fd)
    for k in range(len(x)):
        q = int(qcs[k]) | (schema.QC["GAIN_UNCORRECTED"] if np.isnan(gf[k]) else 0)
        if (x[k] - r_ap < -0.5) or (x[k] + r_ap > nx - 0.5) or (y[k] - r_ap < -0.5) or (y[k] + r_ap > ny - 0.5):
            q |= schema.QC["APERTURE_EDGE"]
        st.rows.append(dict(base, source_id=ids[want[k]], x=x[k], y=y[k], ra=ra[k], dec=dec[k], sc=sc,
                            wavelength=wave[k], bandwidth=bw[k], pixel_area=area[k], qc=q, _sat=masks[2],
                            gain_factor=1.0 if np.isnan(gf[k]) else gf[k], wave_source=wsrc,
                            _k=st.add(stamps, k, cx[k], cy[k], int(pidx[k]), int(cidx[k]), masks)))


def _finish(st: _Stack, *, r_ap, max_masked, zodi_only) -> pl.DataFrame:
    st.flush()
    if st.results:
        out = np.concatenate([r[0] for r in st.results])
        fo = np.concatenate([r[1] for r in st.results])
        status = np.concatenate([r[2] for r in st.results])
    recs = []
    for row in st.rows:
        k = row.pop("_k", None)
        off = row.pop("_off", False)
        sat = row.pop("_sat", 0)
        qc = int(row.get("qc", 0))
        rec = dict(row, aperture_radius=r_ap)
        if k is not None:
            o = out[k]
            fac = row["pixel_area"] * spherex.MJY_SR_TO_UJY_PER_ARCSEC2
            flux, err = o[K.O_FLUX] * fac, o[K.O_ERR] * fac
            if status[k] & K.ST_FEW_BKG and not zodi_only:
                qc |= schema.QC["FEW_BACKGROUND"]
            if status[k] & K.ST_NAN_VAR:
                qc |= schema.QC["NAN_VARIANCE"]
            if fo[k] & sat:  # OVERFLOW or BLOOM in the aperture
                qc |= schema.QC["SATURATED"]
            if np.isfinite(o[K.O_MASKED]) and o[K.O_MASKED] > max_masked:
                qc |= schema.QC["MASKED_FRACTION"]
                flux = err = np.nan
            if not np.isfinite(o[K.O_PSFIN]) or o[K.O_PSFIN] <= 0:
                flux = err = np.nan
            rec.update(flux=flux, flux_err=err, background=o[K.O_BKG], background_err=o[K.O_BKGERR],
                       zodi_scale=o[K.O_SCALE], aperture_correction=1.0 / o[K.O_PSFIN] if o[K.O_PSFIN] > 0 else np.nan,
                       masked_fraction=o[K.O_MASKED], flags=int(fo[k]))
            if np.isfinite(flux) and flux <= 0:
                qc |= schema.QC["NONPOSITIVE_FLUX"]
        elif not off:
            rec.update(flux=np.nan, flux_err=np.nan)
        rec["qc"] = qc
        recs.append(rec)
    return _to_table(recs)


def _to_table(recs: list[dict]) -> pl.DataFrame:
    if not recs:
        return schema.empty(schema.PHOTOMETRY)
    names = schema.PHOTOMETRY.names
    cols: dict[str, list] = {c: [r.get(c) for r in recs] for c in names}
    f = lambda c: np.array([np.nan if v is None else v for v in cols[c]], float)  # noqa: E731
    mjd = f("mjd")
    ra = np.array([r.get("ra", np.nan) for r in recs], float)
    dec = np.array([r.get("dec", np.nan) for r in recs], float)
    sc = np.array([r.get("sc", (np.nan,) * 3) for r in recs], float).reshape(-1, 3)
    cols["bjd_tdb"] = list(bjd_tdb(mjd, ra, dec, sc))
    flux, err = f("flux"), f("flux_err")
    with np.errstate(divide="ignore", invalid="ignore"):
        cols["snr"] = list(flux / err)
        pos = flux > 0
        cols["mag_ab"] = list(np.where(pos, -2.5 * np.log10(np.where(pos, flux, 1.0)) + 23.9, np.nan))
        cols["mag_ab_err"] = list(np.where(pos, 1.0857362047581294 * err / np.where(pos, flux, 1.0), np.nan))
    det = cols["detector"]
    cols["band"] = [None if d is None else f"D{int(d)}" for d in det]
    for c in names:
        dt = schema.PHOTOMETRY.schema[c]
        if dt in (pl.Float64, pl.Float32):
            cols[c] = list(f(c))
    df = pl.DataFrame({c: pl.Series(c, cols[c], dtype=schema.PHOTOMETRY.schema[c], strict=False) for c in names})
    return schema.conform(df, schema.PHOTOMETRY, extra=False)
