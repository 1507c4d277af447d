"""``Universe``: the simulated SPHEREx sky, survey and virtual L2 files (CONTRACTS.md, sim).

    u = Universe(seed=1)                # releases=("qr2", "qr3"); ("qr2",) for the QR2-only sky
    u.observations                      # polars, one row per (obs_id, detector) file (``release`` column)
    u.sources                           # polars, truth table of the point sources
    u.truth_flux(source_id, wavelength_um, mjd) -> ndarray       # µJy, broadcast
    u.truth_pixel(source_id, obs_id, detector) -> (x, y)         # zero-based parent pixel, NaN if off
    u.catalog(n=None, field=None) -> DataFrame                  # source_id, ra, dec, pmra, pmdec, ref_epoch
    u.file_size(key) -> int                                     # QR2 71,634,240; QR3 varies
    u.cal_file(path), u.cal_listing(release, family)            # calibration products (QR3 sky)
    u.read(key, start=0, stop=None) -> bytes                    # bytes [start, stop) (stop exclusive)
    u.cutout(key, center, size, gzip=False) -> bytes            # IBE grammar; raises BadRequest
    u.cutout_box(key, center, size) -> (x0, y0, nx, ny)         # the box cutout() returns (zero-based)
    u.md5(key) -> str
    u.components(key, r0, r1) -> dict                           # planes + noiseless 'sky', 'sources'
    u.frame_sources(key) -> DataFrame                           # what was rendered on a file

Files are computed on demand (deterministic from the seed): a cutout or a read of a few rows draws
just that box; large reads go by 64-row strips (LRU-cached); nothing is stored on disk. ``key`` is
the cloud key ``qr2/level2/...`` or ``qr3/level2/...`` (the IBE ``uri`` is accepted too); unknown keys
raise KeyError. QR3 rows (after every QR2 row) are R7 files drawn by the same frames plus their
flag patches (``spxframe.sim.r7.files``); with QR3 in the sky, QR2 pixels are on the pre-R7 gains.

Photometric truth: a source of truth flux F (µJy at the WCS-WAVE wavelength of its pixel position
and at mid-exposure MJD-AVG) adds F·P/(Ω·23.5044) MJy/sr, P = the zone PSF of the file's cube
integrated over each pixel, Ω = the pixel solid angle (arcsec²) of the full TAN-SIP WCS at the
source position (see ``frame``). Positions come from the file's own WCS (``all_world2pix``) with
linear proper motion from ``ref_epoch`` to mid-exposure.
"""

from __future__ import annotations

import datetime as _dt
import gzip as _gzip
import hashlib
import threading
import warnings
from collections import OrderedDict

import numpy as np
import polars as pl

from spxframe.spherex import EXPTIME_S, FULL_FILE_BYTES, NPIX, ROW_BYTES

from ..r7 import calib
from ..r7 import files as r7files
from ..r7 import mef as r7mef
from . import cutout as cut
from . import headers as hd
from . import instrument as ins
from .cutout import BadRequest
from .frame import STRIP, Frame, frame_wcs
from .sky import Sky, make_sources
from .survey import SurveyConfig, observations_table, plan_visits

RELEASES = ("qr2", "qr3")  #: the releases a universe can hold

__all__ = ["Universe", "BadRequest", "SurveyConfig"]
BOX_CACHE_PIXELS = 4 * STRIP * NPIX  #: boxes up to this size (4 strips' worth) are kept in a small LRU


class _LRU:
    """A small thread-safe LRU mapping. A value is made once even when several threads ask for it
    at the same time (the others wait for it): the four planes of a frame are asked for together."""

    def __init__(self, size: int) -> None:
        self.size, self.d, self.lock = size, OrderedDict(), threading.Lock()
        self.making: dict = {}  #: key -> Event of a value being made

    def get(self, key, make):
        while True:
            with self.lock:
                if key in self.d:
                    self.d.move_to_end(key)
                    return self.d[key]
                busy = self.making.get(key)
                if busy is None:
                    done = self.making[key] = threading.Event()
                    break
            busy.wait()  # made by another thread (or it failed: then try ourselves)
        try:
            val = make()
            with self.lock:
                self.d[key] = val
                self.d.move_to_end(key)
                while len(self.d) > self.size:
                    self.d.popitem(last=False)
        finally:
            with self.lock:
                del self.making[key]
            done.set()
        return val

    def __contains__(self, key) -> bool:
        with self.lock:
            return key in self.d


def _iso(mjd: float) -> str:
    d = _dt.datetime(1858, 11, 17) + _dt.timedelta(days=float(mjd))
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}"


def _dtype(plane: str) -> str:
    """The file dtype of a pixel plane (big-endian)."""
    return ">i4" if plane == "FLAGS" else ">f4"


def _understate(value: float | dict[int, float]) -> dict[int, float]:
    """``variance_understate`` as {detector: factor} for detectors 1-6 (factors finite and > 0)."""
    if isinstance(value, dict):
        unknown = set(value) - set(range(1, 7))
        if unknown:
            raise ValueError(f"variance_understate: detectors are 1-6, got {sorted(unknown)}")
        out = {d: float(value.get(d, 1.0)) for d in range(1, 7)}
    else:
        out = dict.fromkeys(range(1, 7), float(value))
    if not all(np.isfinite(f) and f > 0 for f in out.values()):
        raise ValueError(f"variance_understate: factors must be finite and > 0, got {value!r}")
    return out


def _rebuild(seed, kwargs):
    return Universe(seed, **kwargs)


class Universe:
    """The simulated SPHEREx archive's truth and files.

    Parameters: ``seed``; ``legacy_psf_headers`` (files of processing l2b-v20 carry VERSION
    '6.5.4' and the legacy PSF zone labelling; v21 files are VERSION '6.5.6', always correct);
    ``cloud_lag_fraction`` (fraction of files with ``cloud_available`` False); ``config`` (a
    ``SurveyConfig``) or keyword knobs ``deep_visits``, ``wide_visits_per_pass``, ``sources_per_field``;
    ``cutout_pixel_base`` (0 or 1: base of ``center=...px``); ``cache_strips`` (LRU size);
    ``variance_understate`` (a factor, or ``{detector 1-6: factor}`` with 1.0 for detectors not
    listed): the VARIANCE plane written is the true noise variance / factor², so formal errors
    understate the true scatter by ``factor``; IMAGE is unchanged, and 1.0 gives the same files.

    ``releases``: ``("qr2", "qr3")`` (default) or ``("qr2",)``. With QR3, frames from MJD 61241 on are
    added after the QR2 ones (collections ``spherex_qr3``/``spherex_qr3_deep``, R7 files: see
    ``spxframe.sim.r7``), the calibration products are served, and QR2 pixels are on the pre-R7
    gains (IMAGE / f, VARIANCE / f²); with ``("qr2",)`` every QR2 file is as it always was.
    ``truth_flux`` is the one truth (R7 gains) either way. QR3 knobs: ``epsf_spelling`` (``r7``,
    ``short``, ``both``), ``epsf_tdim``, ``qr3_cutout_flags_compressed``.
    ``cutout_wave_convention``: how cutouts of either release rewrite the spectral W system
    (``shift``: CRPIXnW = −x0, the default; ``rebase`` or ``resample``: the WCS-WAVE table;
    ``spxframe.sim.world.cutout.WAVE_CONVENTIONS``).
    """

    def __init__(self, seed: int = 1, *, legacy_psf_headers: bool = False, cloud_lag_fraction: float = 0.0,
                 config: SurveyConfig | None = None, deep_visits: int | None = None,
                 wide_visits_per_pass: int | None = None, sources_per_field: int | None = None,
                 cutout_pixel_base: int = 0, cache_strips: int = 48,
                 variance_understate: float | dict[int, float] = 1.0, releases: tuple[str, ...] = RELEASES,
                 epsf_spelling: str = "r7", epsf_tdim: bool = True, qr3_cutout_flags_compressed: bool = True,
                 cutout_wave_convention: str = "shift") -> None:
        self._init_args = (seed, dict(legacy_psf_headers=legacy_psf_headers, cloud_lag_fraction=cloud_lag_fraction,
                                      config=config, deep_visits=deep_visits, wide_visits_per_pass=wide_visits_per_pass,
                                      sources_per_field=sources_per_field, cutout_pixel_base=cutout_pixel_base,
                                      cache_strips=cache_strips, variance_understate=variance_understate,
                                      releases=releases, epsf_spelling=epsf_spelling, epsf_tdim=epsf_tdim,
                                      qr3_cutout_flags_compressed=qr3_cutout_flags_compressed,
                                      cutout_wave_convention=cutout_wave_convention))
        if cutout_wave_convention not in cut.WAVE_CONVENTIONS:
            raise ValueError(f"cutout_wave_convention: one of {cut.WAVE_CONVENTIONS}, got {cutout_wave_convention!r}")
        self.cutout_wave_convention = cutout_wave_convention
        releases = (releases,) if isinstance(releases, str) else tuple(str(r).lower() for r in releases)
        if "qr2" not in releases or not set(releases) <= set(RELEASES):
            raise ValueError(f"releases: ('qr2',) or ('qr2', 'qr3'), got {releases!r}")
        self.releases = tuple(r for r in RELEASES if r in releases)
        self.seed = int(seed)
        self.legacy_psf_headers = bool(legacy_psf_headers)
        self.cloud_lag_fraction = float(cloud_lag_fraction)
        self.cutout_pixel_base = int(cutout_pixel_base)
        self.variance_understate: dict[int, float] = _understate(variance_understate)
        cfg = config or SurveyConfig()
        if deep_visits is not None:
            cfg.deep_visits = int(deep_visits)
        if wide_visits_per_pass is not None:
            cfg.wide_visits_per_pass = int(wide_visits_per_pass)
        if sources_per_field is not None:
            cfg.sources_per_field = int(sources_per_field)
        self.config = cfg
        self.fields: list[dict] = cfg.field_windows()  #: name, ra, dec, collection, radius, t_lo, t_hi
        self._sky = Sky(make_sources(self.seed, cfg.field_windows(), cfg.sources_per_field))
        self.sources: pl.DataFrame = self._sky.sources
        self._visits = plan_visits(self.seed, cfg, self.releases)
        qr3 = "qr3" in self.releases
        sizes = {d: r7mef.estimate_size(d) for d in range(1, 7)} if qr3 else None
        self.observations: pl.DataFrame = observations_table(self.seed, self._visits, cfg, self.cloud_lag_fraction,
                                                             self.legacy_psf_headers, sizes)
        self._qr3 = (self.observations["release"] == "qr3").to_numpy()
        self._r7 = r7files.R7Files(self, epsf_spelling=epsf_spelling, epsf_tdim=epsf_tdim,
                                   cutout_flags_compressed=qr3_cutout_flags_compressed) if qr3 else None
        self._cal = r7files.cal_index(self.seed, self.releases)  #: calibration product path -> its identity
        keys = self.observations["cloud_key"].to_list()
        self._row_of = {k: i for i, k in enumerate(keys)}
        self._row_of.update({u: i for i, u in enumerate(self.observations["uri"].to_list())})
        self._by_obs = {(o, int(d)): i for i, (o, d) in enumerate(zip(self.observations["obs_id"].to_list(),
                                                                      self.observations["detector"].to_list()))}
        self._obs = self.observations.select("obs_id", "detector", "obs_index", "t_min", "t_max", "s_ra", "s_dec",
                                             "crota", "sps_epa", "version", "psf_key").rows(named=True)
        ra, dec = np.radians(self.sources["ra"].to_numpy()), np.radians(self.sources["dec"].to_numpy())
        self._src_vec = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
        self._frames = _LRU(256)  #: a frame keeps its source list and PSF stamps (~0.3 MB)
        self._strips = _LRU(cache_strips)
        self._metas = _LRU(1024)  #: headers, WCS and flag counts of a frame
        self._boxes = _LRU(32)  #: boxes drawn without their strips: the other planes' requests reuse them
        self._md5: dict[str, str] = {}
        self._cals = _LRU(16)
        self._epsf_spelling = epsf_spelling
        self._gains = "qr3" in self.releases  #: QR2 pixels on the pre-R7 gains

    def __reduce__(self):  # pickles as its constructor arguments (caches hold locks)
        return (_rebuild, self._init_args)

    # ------------------------------------------------------------------ truth
    def truth_flux(self, source_id, wavelength_um, mjd) -> np.ndarray:
        """Truth flux density (µJy) at λ (µm) and MJD; arguments broadcast."""
        return self._sky.truth_flux(source_id, wavelength_um, mjd)

    def truth_pixel(self, source_id, obs_id: str, detector: int) -> tuple[float, float]:
        """Zero-based parent pixel (x, y) of a source at mid-exposure (NaN if off the detector)."""
        r = self._by_obs[(str(obs_id), int(detector))]
        meta = self._meta(r)
        idx = self._sky.index(np.atleast_1d(source_id))
        ra, dec = self._sky.positions(idx, 0.5 * (meta["t_min"] + meta["t_max"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            x, y = frame_wcs(meta).all_world2pix(ra, dec, 0, tolerance=1e-7, maxiter=50, quiet=True)
        # the gnomonic projection also maps far-away points onto the plane: require the source
        # to lie within 5 deg of the frame centre (a detector's half-diagonal is ~2.5 deg)
        o = self._obs[r]
        a0, d0, a1, d1 = (np.radians(v) for v in (o["s_ra"], o["s_dec"], np.asarray(ra), np.asarray(dec)))
        cosd = np.sin(d0) * np.sin(d1) + np.cos(d0) * np.cos(d1) * np.cos(a1 - a0)
        off = ~((x >= -0.5) & (x < NPIX - 0.5) & (y >= -0.5) & (y < NPIX - 0.5)) | (cosd < np.cos(np.radians(5.0)))
        x, y = np.where(off, np.nan, x), np.where(off, np.nan, y)
        return (float(x[0]), float(y[0])) if np.ndim(source_id) == 0 else (x, y)

    def catalog(self, n: int | None = None, field: str | None = None) -> pl.DataFrame:
        """Input catalog for spxframe: source_id, ra, dec, pmra, pmdec, ref_epoch (first n of a field)."""
        df = self.sources if field is None else self.sources.filter(pl.col("field") == field)
        df = df.select("source_id", "ra", "dec", "pmra", "pmdec", "ref_epoch")
        return df if n is None else df.head(int(n))

    # ------------------------------------------------------------------ files
    def row(self, key: str) -> int:
        """Row of ``observations`` for a cloud key or IBE uri (KeyError if unknown)."""
        k = key.lstrip("/")
        if k not in self._row_of:
            k = k.removeprefix("nasa-irsa-spherex/")
            if "ibe/data/spherex/" in k:
                k = k[k.index("ibe/data/spherex/"):]
        if k not in self._row_of:
            raise KeyError(f"no such file: {key!r}")
        return self._row_of[k]

    def cal_key(self, key: str) -> str | None:
        """The calibration product path of ``key`` (cloud key, IBE path or uri), None if not one."""
        k = key.lstrip("/").removeprefix("nasa-irsa-spherex/")
        if "ibe/data/spherex/" in k:
            k = k[k.index("ibe/data/spherex/") + len("ibe/data/spherex/"):]
        return k if k in self._cal else None

    def cal_file(self, key: str):
        """The calibration product (``spxframe.sim.r7.calib.CalFile``) at ``key``; KeyError if none."""
        k = self.cal_key(key)
        if k is None:
            raise KeyError(f"no such calibration product: {key!r}")
        rel, fam, tok, det = self._cal[k]
        return self._cals.get(k, lambda: calib.product(self.seed, rel, fam, det, tok,
                                                       epsf_spelling=self._epsf_spelling))

    def cal_listing(self, release: str, family: str) -> str:
        """``ibe/dir/list/spherex/<release>/<family>``: JSON lines (empty if not published)."""
        if release not in self.releases:
            return ""
        return calib.listing(self.seed, release, family, self._epsf_spelling)

    def cal_products(self) -> dict[str, tuple[str, str, str, int]]:
        """Every calibration product path -> (release, family, token, detector)."""
        return dict(self._cal)

    def file_size(self, key: str) -> int:
        """Size of a file in bytes: QR2 L2 files 71,634,240; QR3 files vary (compressed FLAGS)."""
        k = self.cal_key(key)
        if k is not None:
            rel, fam, tok, det = self._cal[k]
            return calib.product_size(self.seed, rel, fam, det, tok, self._epsf_spelling)
        r = self.row(key)
        return self._r7.size(r) if self._qr3[r] else FULL_FILE_BYTES

    def size_hint(self, key: str) -> int:
        """``file_size`` where it is known without work (QR2, calibration products, QR3 files already
        sized), else the QR3 plan-time estimate of ``contentlength`` (for bucket listings)."""
        if self.cal_key(key) is None:
            r = self.row(key)
            if self._qr3[r] and not self._r7.sized(r):
                return int(self.observations["contentlength"][r])
        return self.file_size(key)

    def _frame(self, r: int) -> Frame:
        return self._frames.get(r, lambda: Frame(self._meta(r), self._sky, self._candidates(r)))

    def _candidates(self, r: int) -> np.ndarray:
        o = self._obs[r]
        a, d = np.radians(o["s_ra"]), np.radians(o["s_dec"])
        c = np.array([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])
        return np.nonzero(self._src_vec @ c > np.cos(np.radians(2.7)))[0]

    def _meta(self, r: int) -> dict:
        def make() -> dict:
            o = self._obs[r]
            det = int(o["detector"])
            crval, rot = (float(o["s_ra"]), float(o["s_dec"])), float(o["crota"])
            cards = ins.celestial_cards(self.seed, det, crval, rot)
            wcs_header = hd.card_block(cards, 4).decode("ascii")
            t0, t1 = float(o["t_min"]), float(o["t_max"])
            g = np.linspace(0, NPIX - 1, 9)
            gx, gy = np.meshgrid(g, g)
            return {"seed": self.seed, "obs_index": r, "det": det, "obs_id": o["obs_id"], "crval": crval,
                    "rot": rot, "variance_understate": self.variance_understate[det], "t_min": t0, "t_max": t1,
                    "version": o["version"], "epa": o["sps_epa"],
                    "wcs_header": wcs_header, "expidn": int(o["obs_index"]) + 100000,
                    "date": _iso(t0 + 20.0)[:19], "date_beg": _iso(t0), "date_end": _iso(t1),
                    "date_avg": _iso(0.5 * (t0 + t1)), "exptime": EXPTIME_S,
                    "psf_fwhm": round(ins.median_fwhm(det), 3),
                    "sc": hd.spacecraft_state(0.5 * (t0 + t1), 0.37 * r),
                    "_grid": (gx.ravel(), gy.ravel())}
        return self._metas.get(r, make)

    def _full_meta(self, r: int) -> dict:
        """Frame meta plus the values that need the frame (flag counts, OMEGA_MEDIAN)."""
        m = self._meta(r)
        if "counts" not in m:
            fr = self._frame(r)
            m["omega_median"] = round(float(np.median(fr.omega(*m["_grid"]))), 4)
            m["counts"] = fr.counts()
        return m

    def _finish(self, r: int, planes: dict, r0: int, r1: int, c0: int, c1: int) -> dict:
        """A box's planes as the file holds them: QR3 frames with their flag patches, QR2 frames on
        the pre-R7 gains when the universe holds QR3 (unchanged otherwise)."""
        if self._qr3[r]:
            return r7files.paint(self._r7.patches(r), planes, r0, r1, c0, c1)
        if self._gains:
            return r7files.to_pre_r7(self.seed, int(self._obs[r]["detector"]), planes, r0, r1, c0, c1)
        return planes

    def _strip(self, r: int, s: int) -> dict[str, np.ndarray]:
        def make():
            c = self._frame(r).strip(s)
            r0 = s * STRIP
            return self._finish(r, {k: c[k].astype(_dtype(k)) for k in hd.PLANES}, r0, r0 + c["IMAGE"].shape[0], 0,
                                NPIX)
        return self._strips.get((r, s), make)

    def _box(self, r: int, box: tuple[int, int, int, int]) -> dict[str, np.ndarray]:
        """The pixel planes (file dtypes, big-endian) of a box (x0, y0, nx, ny): sliced from cached
        strips when all are cached, otherwise drawn for the box alone (the same pixels)."""
        x0, y0, nx, ny = box
        strips = range(y0 // STRIP, (y0 + ny - 1) // STRIP + 1)
        if all((r, s) in self._strips for s in strips):
            return {n: self._rows(r, n, y0, y0 + ny)[:, x0:x0 + nx].astype(_dtype(n), copy=False) for n in hd.PLANES}

        def draw():
            c = self._frame(r).render(y0, y0 + ny, x0, x0 + nx)
            return self._finish(r, {k: c[k].astype(_dtype(k)) for k in hd.PLANES}, y0, y0 + ny, x0, x0 + nx)
        return self._boxes.get((r, box), draw) if nx * ny <= BOX_CACHE_PIXELS else draw()

    def _row_parts(self, r: int, name: str, r0: int, r1: int) -> list[np.ndarray]:
        parts = []
        for s in range(r0 // STRIP, -(-r1 // STRIP)):
            a, b = s * STRIP, min((s + 1) * STRIP, NPIX)
            parts.append(self._strip(r, s)[name][max(r0, a) - a:min(r1, b) - a])
        return parts

    def _rows(self, r: int, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of plane ``name`` (values; byte order not guaranteed)."""
        parts = self._row_parts(r, name, r0, r1)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _psf(self, r: int) -> tuple[bytes, bytes]:
        o = self._obs[r]
        legacy = o["version"] == "6.5.4"
        return hd.psf_header(int(o["detector"]), o["version"], legacy), hd.psf_data(int(o["detector"]))

    def _segment(self, r: int, hdu: str, kind: str, lo: int, hi: int) -> bytes:
        det = int(self._obs[r]["detector"])
        if hdu == "PRIMARY":
            return hd.primary_header(self._meta(r))[lo:hi]
        if hdu == "PSF":
            return self._psf(r)[0 if kind == "hdr" else 1][lo:hi]
        if hdu == "WCS-WAVE":
            return hd.wave_hdu(det)[0 if kind == "hdr" else 1][lo:hi]
        if kind == "hdr":
            meta = self._full_meta(r) if hdu == "IMAGE" else self._meta(r)
            return hd.plane_header(hdu, meta)[lo:hi]
        ra, rb = lo // ROW_BYTES, -(-hi // ROW_BYTES)
        if rb - ra < 2 * STRIP:  # a few rows (as a fetcher reads them): draw just those rows; longer reads
            # (a file streamed in 1 MiB pieces) go by cached strips, which all four planes share
            raw = np.ascontiguousarray(self._box(r, (0, ra, NPIX, rb - ra))[hdu]).reshape(-1).view(np.uint8)
            return raw[lo - ra * ROW_BYTES:hi - ra * ROW_BYTES].tobytes()
        out, sb = [], STRIP * ROW_BYTES
        for s in range(lo // sb, (hi - 1) // sb + 1):
            raw = self._strip(r, s)[hdu].reshape(-1).view(np.uint8)  # big-endian bytes, no copy
            out.append(raw[max(lo - s * sb, 0):min(hi - s * sb, raw.size)])
        return b"".join(out)

    def read(self, key: str, start: int = 0, stop: int | None = None) -> bytes:
        """Bytes [start, stop) of the full file (stop exclusive, clipped to the size); deterministic."""
        if self.cal_key(key) is not None:
            return self.cal_file(key).read(max(int(start), 0), stop)
        r = self.row(key)
        if self._qr3[r]:
            return self._r7.read(r, max(int(start), 0), stop)
        start = max(int(start), 0)
        stop = FULL_FILE_BYTES if stop is None else min(int(stop), FULL_FILE_BYTES)
        out = []
        for hdu, kind, a, b in hd.FULL_LAYOUT:
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                out.append(self._segment(r, hdu, kind, lo - a, hi - a))
        return b"".join(out)

    def iter_file(self, key: str, chunk: int = 8 * 1024 * 1024):
        """Yield the full file in chunks (for streaming responses)."""
        size = self.file_size(key)
        for a in range(0, size, chunk):
            yield self.read(key, a, min(a + chunk, size))

    def md5(self, key: str) -> str:
        """MD5 hex digest of the full file (computed once, cached)."""
        r = self.row(key)
        if r not in self._md5:
            h = hashlib.md5()
            for part in self.iter_file(key):
                h.update(part)
            self._md5[r] = h.hexdigest()
        return self._md5[r]

    def cutout_box(self, key: str, center: str, size: str) -> tuple[int, int, int, int]:
        """(x0, y0, nx, ny), zero-based parent pixels, of the clipped box ``cutout`` would return."""
        r = self.row(key)
        return cut.cutout_box(frame_wcs(self._meta(r)), center, size, self.cutout_pixel_base)

    def cutout(self, key: str, center: str, size: str, gzip: bool = False) -> bytes:
        """IBE cutout bytes (see ``spxframe.sim.cutout`` for grammar and box); raises BadRequest."""
        r = self.row(key)
        box = self.cutout_box(key, center, size)
        if self._qr3[r]:
            data = self._r7.cutout(r, box)
        else:
            ph, pd = self._psf(r)
            data = cut.assemble(self._full_meta(r), self._box(r, box), box, ph, pd,
                                hd.wave_hdu(int(self._obs[r]["detector"])))
        data = cut.wave_convention(data, box, self.cutout_wave_convention)  # "shift": as assembled
        return _gzip.compress(data, compresslevel=1, mtime=0) if gzip else data

    def components(self, key: str, r0: int = 0, r1: int = NPIX) -> dict[str, np.ndarray]:
        """Rows [r0, r1) of every plane plus the noiseless ``sky`` and ``sources`` models (native endian).
        The planes are the file's (QR3 patches, pre-R7 gains); ``sky`` and ``sources`` the truth."""
        r = self.row(key)
        fr = self._frame(r)
        parts = [fr.strip(s) for s in range(r0 // STRIP, -(-r1 // STRIP))]
        off = r0 - (r0 // STRIP) * STRIP
        out = {k: np.concatenate([p[k] for p in parts])[off:off + r1 - r0] for k in parts[0]}
        return {**out, **self._finish(r, {k: out[k] for k in hd.PLANES}, r0, r1, 0, NPIX)}

    def frame_sources(self, key: str) -> pl.DataFrame:
        """Sources rendered on a file: source_id, x, y (zero-based), wavelength (µm), flux (µJy), omega, zone plane."""
        fr = self._frame(self.row(key))
        return pl.DataFrame({"source_id": self.sources["source_id"].to_numpy()[fr.src_idx], "x": fr.src_x,
                             "y": fr.src_y, "wavelength": fr.src_wave, "flux": fr.src_flux,
                             "omega": fr.src_omega, "psf_plane": fr.src_plane + 1})
