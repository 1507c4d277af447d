"""The simulated survey: fields, pointings, timing, observation ids and the observations table.

A *visit* is one exposure (one ``obs_id``) seen by up to six detectors. Large slews hold 1-4 small
slews 129 s apart; each small slew moves the pointing so a source steps ~120 px along the LVF (y)
axis. Detector pairs (1,4), (2,5), (3,6) share a pointing; the three pairs sit side by side along
the detector x axis (2100 px apart, i.e. a 60 px gap) in the target's tangent plane.

Per-detector orientation is transported from the target's frame, so geometry stays right near the
celestial pole. Times are MJD (UTC); 113.5826 s exposures, t_max - t_min = 115.1 s.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from spxframe.spherex import BANDS, EXPTIME_S, FULL_FILE_BYTES, NPIX, PIXEL_SCALE_ARCSEC

from . import instrument as ins

SMALL_SLEW_S: float = 129.0  #: seconds between small slews
ELAPSED_S: float = 115.1  #: t_max - t_min, s
LVF_STEP_PX: float = 120.0  #: pointing step along y per small slew
PAIR_PITCH_PX: float = 2100.0  #: centre-to-centre distance of the three detector pairs
PASS_DAYS: float = 14.0  #: length of a wide-survey pass
PASS_SEPARATION_D: float = 182.6  #: six months
PROC_V20, PROC_V21 = "l2b-v20-2025-247", "l2b-v21-2026-090"
V21_FROM_MJD: float = 60960.0  #: files observed from this MJD on carry the v21 processing (VERSION 6.5.6)
QR3_FROM_MJD: float = 61241.0  #: 2026-07-20: every frame from here on is in the QR3 collections (pipeline R7)
PROC_R7 = "l2b-v27-2026-223"  #: processing tag of the simulated QR3 files
R7_VERSION = "7.0.5"  #: VERSION of the simulated QR3 files (the same value ``r7.mef`` writes)


@dataclass
class SurveyConfig:
    """Knobs of the simulated survey (counts are visits = obs_ids)."""

    deep_visits: int = 240
    deep_start_mjd: float = 60805.0
    deep_span_days: float = 90.0
    wide_visits_per_pass: int = 16
    wide_passes: int = 2
    sources_per_field: int | None = None  #: None: per-field default (deep 3500, wide 2000)
    field_radius_deg: float = 4.0
    missing_detector_fraction: float = 0.03
    qr3_wide_span_days: float = 9.0  #: each wide field's one QR3 pass starts within MJD 61241 + this
    qr3_deep_weeks: int = 9  #: weekly deep-field epochs from MJD 61241 (to ~61300)
    qr3_deep_visits_per_week: int = 8
    fields: list[dict] = field(default_factory=lambda: [
        {"name": "deep_nep", "ra": 270.0, "dec": 66.56, "collection": "spherex_qr2_deep", "start": 60805.0,
         "radius": 5.5, "n_sources": 3500},
        {"name": "wide_generic", "ra": 213.94, "dec": 11.50, "collection": "spherex_qr2", "start": 60842.0},
        {"name": "wide_ra0", "ra": 0.5, "dec": -5.0, "collection": "spherex_qr2", "start": 60870.0},
        {"name": "wide_pole", "ra": 30.0, "dec": 88.0, "collection": "spherex_qr2", "start": 60822.0},
    ])

    def field_windows(self) -> list[dict]:
        """Fields with their observing window (t_lo, t_hi) and source radius, for the sky model."""
        out = []
        for f in self.fields:
            if f["collection"].endswith("_deep"):
                lo, hi = self.deep_start_mjd, self.deep_start_mjd + self.deep_span_days
            else:
                lo, hi = f["start"], f["start"] + PASS_SEPARATION_D * (self.wide_passes - 1) + PASS_DAYS
            out.append({**f, "t_lo": lo, "t_hi": hi, "radius": f.get("radius", self.field_radius_deg)})
        return out


def _nominal_pc(theta: float) -> np.ndarray:
    t = math.radians(theta)
    s = PIXEL_SCALE_ARCSEC / 3600.0
    return s * np.array([[-math.cos(t), math.sin(t)], [math.sin(t), math.cos(t)]])


def pointing(target: tuple[float, float], pair: int, x_t: float, y_t: float,
             theta: float) -> tuple[np.ndarray, np.ndarray]:
    """CRVALs (6, 2) and rotations (6,) that put ``target`` near zero-based (x_t, y_t) of ``pair`` (0-2)."""
    pc = _nominal_pc(theta)
    crval = np.zeros((6, 2))
    rot = np.zeros(6)
    for k in range(3):
        off = np.array([(k - pair) * PAIR_PITCH_PX - (x_t - ins.CENTER0), -(y_t - ins.CENTER0)])
        xi, eta = pc @ off
        ra, dec = ins.tan_deproject(target[0], target[1], xi, eta)
        ra2, dec2 = ins.tan_deproject(target[0], target[1], xi, eta + 1e-3)
        dxi, deta = ins.tan_project(ra, dec, ra2, dec2)  # target-frame north seen at the detector
        phi = math.degrees(math.atan2(float(dxi), float(deta)))
        for det in (k + 1, k + 4):
            crval[det - 1] = (float(ra), float(dec))
            rot[det - 1] = (theta + phi) % 360.0
    return crval, rot


def _pp_code(mjd: float) -> str:
    """Planning period ``YYYYWww_NX`` of an MJD (3.5-day halves of ISO weeks)."""
    d = _dt.datetime(1858, 11, 17) + _dt.timedelta(days=float(mjd))
    y, w, wd = d.isocalendar()
    half = 1 if (wd - 1) + d.hour / 24.0 < 3.5 else 2
    return f"{y}W{w:02d}_{half}{'ABCD'[w % 4]}"


def _iso(mjd: float) -> str:
    d = _dt.datetime(1858, 11, 17) + _dt.timedelta(days=float(mjd))
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}"


def _pass_rows(rng: np.random.Generator, fi: int, f: dict, p: int, t0: float, span: float, nvis: int,
               deep: bool, theta0: float) -> list[tuple]:
    """The visits of one pass of field ``fi``: (field, pass, t_min, large slew, small slew, crval, rot, epa)."""
    rows: list[tuple] = []
    sizes: list[int] = []
    while sum(sizes) < nvis:
        sizes.append(int(min(rng.choice([2, 3, 4, 4, 4, 4]), nvis - sum(sizes))))
    nls = len(sizes)
    for j, ns in enumerate(sizes):
        tls = t0 + (j + rng.uniform(0.1, 0.9)) * span / nls
        if deep:
            target = ins.tan_deproject(f["ra"], f["dec"], *rng.uniform(-1.0, 1.0, 2))
            pair, theta, epa = int(rng.integers(3)), float(rng.uniform(0, 360)), float(rng.choice([0.0, 180.0]))
        else:
            target, pair = (f["ra"], f["dec"]), (j + p) % 3
            epa = 180.0 * (p % 2)
            theta = (theta0 + epa + rng.normal(0, 2.0)) % 360.0
        x_t = float(rng.uniform(250, NPIX - 250))
        y_t = float(rng.uniform(120, NPIX - 120 - LVF_STEP_PX * ns))
        for s in range(ns):
            crval, rot = pointing((float(target[0]), float(target[1])), pair, x_t, y_t + LVF_STEP_PX * s, theta)
            rows.append((fi, p, tls + s * SMALL_SLEW_S / 86400.0, j, s, crval, rot, epa))
    return rows


def _visit_arrays(rows: list[tuple], has: np.ndarray) -> dict[str, np.ndarray]:
    """Visit rows (time-sorted) -> the arrays of ``plan_visits``; obs ids numbered per planning period."""
    out = {
        "field": np.array([r[0] for r in rows], dtype=int), "pass": np.array([r[1] for r in rows], dtype=int),
        "t_min": np.array([r[2] for r in rows], dtype=float), "small": np.array([r[4] for r in rows], dtype=int),
        "crval": np.array([r[5] for r in rows]).reshape(len(rows), 6, 2),
        "rot": np.array([r[6] for r in rows]).reshape(len(rows), 6),
        "epa": np.array([r[7] for r in rows], dtype=float),
    }
    # obs ids: large slews numbered in time order within each planning period
    ids, counters, ls_num = [], {}, {}
    for r in rows:
        key = (r[0], r[1], r[3])
        pp = _pp_code(r[2] - r[4] * SMALL_SLEW_S / 86400.0)
        if key not in ls_num:
            counters[pp] = counters.get(pp, 0) + 1
            ls_num[key] = (pp, counters[pp])
        pp, num = ls_num[key]
        ids.append(f"{pp}_{num:04d}_{r[4] + 1}")
    out["obs_id"] = np.array(ids)
    has[~has.any(axis=1), 2] = True
    out["has_det"] = has
    return out


def _qr3_rows(seed: int, cfg: SurveyConfig) -> list[tuple]:
    """QR3 visits (own random streams): one pass per wide field starting within MJD 61241 +
    ``qr3_wide_span_days``, the deep field weekly from MJD 61241. Pass numbers continue QR2's."""
    rows: list[tuple] = []
    for fi, f in enumerate(cfg.fields):
        rng = np.random.default_rng([int(seed), 41, fi, 3])
        theta0 = float(np.random.default_rng([int(seed), 41, fi]).uniform(0, 360))  # the field's QR2 roll
        if f["collection"].endswith("_deep"):
            for w in range(cfg.qr3_deep_weeks):
                rows += _pass_rows(rng, fi, f, 1 + w, QR3_FROM_MJD + 7.0 * w, 1.0, cfg.qr3_deep_visits_per_week,
                                   True, theta0)
        else:
            rows += _pass_rows(rng, fi, f, cfg.wide_passes, QR3_FROM_MJD, cfg.qr3_wide_span_days,
                               cfg.wide_visits_per_pass, False, theta0)
    return rows


def plan_visits(seed: int, cfg: SurveyConfig, releases: tuple[str, ...] = ("qr2",)) -> dict[str, np.ndarray]:
    """All visits: arrays field, pass, t_min, theta, crval (n, 6, 2), rot (n, 6), epa, obs_id, has_det,
    release. QR3 visits (``"qr3" in releases``) come after every QR2 one, so QR2 visits keep their
    indices, random streams and pixels whatever ``releases`` holds."""
    rows: list[tuple] = []
    for fi, f in enumerate(cfg.fields):
        rng = np.random.default_rng([int(seed), 41, fi])
        deep = f["collection"].endswith("_deep")
        passes = [(0, cfg.deep_start_mjd, cfg.deep_span_days, cfg.deep_visits)] if deep else [
            (p, f["start"] + p * PASS_SEPARATION_D, PASS_DAYS, cfg.wide_visits_per_pass)
            for p in range(cfg.wide_passes)]
        theta0 = float(rng.uniform(0, 360))
        for p, t0, span, nvis in passes:
            rows += _pass_rows(rng, fi, f, p, t0, span, nvis, deep, theta0)
    rows.sort(key=lambda r: r[2])
    has = np.random.default_rng([int(seed), 43]).uniform(0, 1, (len(rows), 6)) >= cfg.missing_detector_fraction
    out = _visit_arrays(rows, has)
    out["release"] = np.full(len(rows), "qr2")
    if "qr3" in releases:
        r3 = sorted(_qr3_rows(seed, cfg), key=lambda r: r[2])
        has3 = np.random.default_rng([int(seed), 43, 3]).uniform(0, 1, (len(r3), 6)) >= cfg.missing_detector_fraction
        q3 = _visit_arrays(r3, has3)
        q3["release"] = np.full(len(r3), "qr3")
        out = {k: np.concatenate([out[k], q3[k]]) for k in out}
    return out


def observations_table(seed: int, visits: dict[str, np.ndarray], cfg: SurveyConfig,
                       cloud_lag_fraction: float, legacy_psf_headers: bool,
                       qr3_sizes: dict[int, int] | None = None) -> pl.DataFrame:
    """The ObsCore-like table of CONTRACTS.md: one row per (obs_id, detector) file. QR3 rows (visits
    of ``release`` "qr3") are in the QR3 collections with the R7 processing tag and VERSION;
    their ``contentlength`` is ``qr3_sizes[detector]``, a plan-time estimate (the exact size needs
    the compressed FLAGS, which are made lazily when a file is first read)."""
    qr3_sizes = qr3_sizes or {}
    rng = np.random.default_rng([int(seed), 47])
    corners = np.array([[-0.5, -0.5], [NPIX - 0.5, -0.5], [NPIX - 0.5, NPIX - 0.5], [-0.5, NPIX - 0.5]])
    vi, vd = np.nonzero(visits["has_det"])  # visit index, detector - 1 (row order: visit, then detector)
    det = vd + 1
    crval, rot = visits["crval"][vi, vd], visits["rot"][vi, vd]
    verts = np.zeros((len(vi), 4, 2))
    for d in range(1, 7):
        m = det == d
        ra, dec = ins.pix2world(seed, d, (crval[m, 0:1], crval[m, 1:2]), rot[m, None], corners[None, :, 0],
                                corners[None, :, 1])
        verts[m] = np.stack([ra, dec], axis=-1)
    t0 = visits["t_min"][vi]
    qr3 = visits["release"][vi] == "qr3" if "release" in visits else np.zeros(len(vi), bool)
    proc = np.where(qr3, PROC_R7, np.where(t0 < V21_FROM_MJD, PROC_V20, PROC_V21))
    fld = visits["field"][vi]
    v20 = "6.5.4" if legacy_psf_headers else "6.5.4+psffix1"
    coll = np.array([f["collection"] for f in cfg.fields])[fld]
    rec = {
        "obs_id": visits["obs_id"][vi], "detector": det, "obs_index": vi,
        "field": np.array([f["name"] for f in cfg.fields])[fld],
        "obs_collection": np.where(qr3, np.char.replace(coll.astype(str), "_qr2", "_qr3"), coll),
        "t_min": t0, "t_max": t0 + ELAPSED_S / 86400.0, "t_mid": t0 + ELAPSED_S / 172800.0,
        "s_ra": crval[:, 0], "s_dec": crval[:, 1],
        "s_region": ["POLYGON ICRS " + " ".join(f"{a:.6f} {d:.6f}" for a, d in np.concatenate([v, v[:1]]))
                     for v in verts],
        "crota": rot, "sps_epa": visits["epa"][vi],
        "version": np.where(qr3, R7_VERSION, np.where(proc == PROC_V20, v20, "6.5.6")), "proc": proc,
        "release": np.where(qr3, "qr3", "qr2"),
    }
    rec = {k: (v.tolist() if isinstance(v, np.ndarray) and v.dtype.kind in "US" else v) for k, v in rec.items()}
    n = len(rec["obs_id"])
    df = pl.DataFrame(rec).with_columns(pl.Series("poly", verts).cast(pl.List(pl.List(pl.Float64))))
    pp = [o[:10] for o in rec["obs_id"]]
    uri = [f"ibe/data/spherex/{rl}/level2/{p}/{pr}/{d}/level2_{o}D{d}_spx_{pr}.fits"
           for rl, p, pr, d, o in zip(rec["release"], pp, rec["proc"], det, rec["obs_id"])]
    cloud = rng.uniform(0, 1, int(np.count_nonzero(~qr3))) >= cloud_lag_fraction  # QR2: the stream as always
    cloud = np.concatenate([cloud, np.random.default_rng([int(seed), 47, 3]).uniform(0, 1, int(qr3.sum()))
                            >= cloud_lag_fraction])  # QR3 rows come after the QR2 ones
    em = {d: ins.band_range_m(d) for d in range(1, 7)}
    fwhm = {d: ins.median_fwhm(d) for d in range(1, 7)}
    return df.with_columns(
        pl.col("detector").cast(pl.Int8),
        pl.Series("energy_bandpassname", [f"SPHEREx-D{d}" for d in det]),
        pl.Series("spherex_detector", [f"D{d}" for d in det]),
        pl.Series("obs_publisher_did", [f"ivo://irsa.ipac/{c}?{o}/D{d}"
                                        for c, o, d in zip(rec["obs_collection"], rec["obs_id"], det)]),
        pl.Series("obs_creator_did", [f"{o}D{d}" for o, d in zip(rec["obs_id"], det)]),
        pl.Series("obs_title", [f"{o}D{d} ({_iso(t)[:16]})" for o, d, t in zip(rec["obs_id"], det, rec["t_min"])]),
        pl.Series("planeid", np.arange(n, dtype=np.int64) + 100001),
        pl.Series("obsid", np.array(rec["obs_index"], dtype=np.int64) + 500001),
        pl.lit(EXPTIME_S).alias("t_exptime"),
        pl.Series("em_min", [em[d][0] for d in det]), pl.Series("em_max", [em[d][1] for d in det]),
        pl.Series("em_res_power", [BANDS[f"D{d}"][2] for d in det], dtype=pl.Float64),
        pl.lit(NPIX).alias("s_xel1"), pl.lit(NPIX).alias("s_xel2"),
        pl.lit(PIXEL_SCALE_ARCSEC).alias("s_pixel_scale"),
        pl.Series("s_resolution", [fwhm[d] for d in det]),
        pl.lit("image").alias("dataproduct_type"), pl.lit("spherex.level2").alias("dataproduct_subtype"),
        pl.lit(2).alias("calib_level"), pl.lit("SPHEREx").alias("instrument_name"),
        pl.lit("SPHEREx").alias("facility_name"), pl.lit("public").alias("data_rights"),
        pl.Series("obs_release_date", [_iso(t + 30.0)[:10] for t in rec["t_min"]]),
        pl.Series("uri", uri),
        pl.Series("cloud_key", [u.removeprefix("ibe/data/spherex/") for u in uri]),
        pl.Series("cloud_available", cloud),
        pl.Series("contentlength", np.where(qr3, [qr3_sizes.get(int(d), FULL_FILE_BYTES) for d in det],
                                            FULL_FILE_BYTES), dtype=pl.Int64),
        pl.lit("").alias("contentchecksum"),
        pl.Series("psf_key", [f"D{d}_{pr}" for d, pr in zip(det, rec["proc"])]),
    )
