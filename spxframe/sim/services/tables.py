"""The simulated archive's TAP tables, derived from ``Universe.observations``."""

from __future__ import annotations

import json

import numpy as np
import polars as pl

from spxframe.spherex import FULL_FILE_BYTES

from ..adql import geom
from ..adql.values import Table

CLOUD_BUCKET = "nasa-irsa-spherex"

META = {
    "s_ra": {"unit": "deg", "ucd": "pos.eq.ra"}, "s_dec": {"unit": "deg", "ucd": "pos.eq.dec"},
    "s_region": {"ucd": "pos.outline;obs.field", "xtype": "adql:REGION"},
    "s_resolution": {"unit": "arcsec", "ucd": "pos.angResolution"},
    "s_pixel_scale": {"unit": "arcsec"},
    "t_min": {"unit": "d", "ucd": "time.start;obs.exposure"}, "t_max": {"unit": "d", "ucd": "time.end;obs.exposure"},
    "t_exptime": {"unit": "s", "ucd": "time.duration;obs.exposure"},
    "em_min": {"unit": "m", "ucd": "em.wl;stat.min"}, "em_max": {"unit": "m", "ucd": "em.wl;stat.max"},
    "em_res_power": {"ucd": "spect.resolution"},
    "obs_id": {"ucd": "meta.id"}, "obs_publisher_did": {"ucd": "meta.ref.ivoid"},
    "access_url": {"ucd": "meta.ref.url"}, "access_estsize": {"unit": "kbyte"},
    "time_bounds_lower": {"unit": "d"}, "time_bounds_upper": {"unit": "d"},
    "energy_bounds_lower": {"unit": "m"}, "energy_bounds_upper": {"unit": "m"},
    "contentlength": {"unit": "byte"}, "poly": {"unit": "deg", "xtype": "adql:REGION"},
}

OBSCORE_COLS = [
    "obs_id", "obs_publisher_did", "obs_collection", "obs_title", "obs_creator_did",
    "dataproduct_type", "dataproduct_subtype", "calib_level", "s_ra", "s_dec", "s_region",
    "s_resolution", "s_xel1", "s_xel2", "s_pixel_scale", "t_min", "t_max", "t_exptime",
    "em_min", "em_max", "em_res_power", "energy_bandpassname", "spherex_detector",
    "spherex_uuid", "access_url", "access_format", "access_estsize", "instrument_name",
    "facility_name", "target_name", "target_moving", "obs_release_date", "data_rights",
]
OTHER_COLLECTIONS = [("spherex_qr2_cal", "measurements"), ("wise_allwise_p3am_cdd", "image"),
                     ("euclid_DpdMerBksMosaic", "image"), ("spitzer_seip", "cube")]


def _np(s: pl.Series) -> np.ndarray:
    if s.dtype in (pl.Utf8, pl.String) or s.dtype == pl.Categorical:
        return np.array(s.cast(pl.Utf8).to_list(), dtype=object)
    if s.dtype == pl.Boolean:
        return s.to_numpy().astype(bool)
    a = s.to_numpy()
    if a.dtype.kind == "i" and a.dtype.itemsize < 4:
        a = a.astype(np.int32)
    return a


def _poly_verts(obs: pl.DataFrame) -> np.ndarray:
    if "poly" in obs.columns:
        v = obs["poly"].to_list()
        if v and len({len(p) for p in v}) == 1:
            return np.asarray(v, dtype=np.float64).reshape(len(v), -1, 2)
        return v
    return geom.parse_stcs_polygons(obs["s_region"].to_list())


def cloud_access_json(obs: pl.DataFrame) -> np.ndarray:
    keys = obs["cloud_key"].to_list()
    avail = obs["cloud_available"].to_list() if "cloud_available" in obs.columns else [True] * len(keys)
    return np.array([json.dumps({"aws": {"bucket_name": CLOUD_BUCKET, "key": k, "region": "us-east-1"}})
                     if a else "" for k, a in zip(keys, avail)], dtype=object)


def build_tables(obs: pl.DataFrame, base_url: str, cal: list[tuple[str, str, int]] | None = None) -> dict:
    """Tables of the simulated TAP service (names lower-case, schema-qualified). ``cal``: the
    calibration products as (collection, uri, bytes): rows of ``caom.observation``/``caom.plane``
    (dataproducttype ``measurements``) and ``caom.artifact`` (uri, contentlength; joined on planeid =
    obsid); ``spherex.artifact`` keeps one row per image plane."""
    cal = cal or []
    n = obs.height
    polys = geom.Polygons(_poly_verts(obs))
    col = {c: _np(obs[c]) for c in obs.columns if c != "poly"}

    def get(name, default):
        return col[name] if name in col else np.full(n, default, dtype=object if isinstance(default, str) else None)

    did = col["obs_publisher_did"]
    oc = {}
    for c in OBSCORE_COLS:
        if c == "access_url":
            oc[c] = np.array([f"{base_url}/datalink/links/spherex?ID={d}" for d in did], dtype=object)
        elif c == "access_format":
            oc[c] = np.full(n, "application/x-votable+xml;content=datalink", dtype=object)
        elif c == "access_estsize":
            oc[c] = (get("contentlength", FULL_FILE_BYTES).astype(np.int64) + 1023) // 1024
        elif c == "spherex_uuid":
            oc[c] = np.array([f"{int(p):012x}-{d}" for p, d in zip(get("planeid", 0), get("detector", 0))],
                             dtype=object) \
                if "planeid" in col else np.full(n, "", dtype=object)
        elif c in ("target_name",):
            oc[c] = get(c, "")
        elif c == "target_moving":
            oc[c] = get(c, 0).astype(np.int32) if c in col else np.zeros(n, np.int32)
        elif c in col:
            oc[c] = col[c]
    obscore = Table("spherex.obscore", oc, {k: META.get(k, {}) for k in oc}, {"s_region": polys},
                    "ObsCore view of SPHEREx Level-2 spectral images")
    poly_str = np.array(["POLYGON ICRS " + " ".join(f"{x:.6f} {y:.6f}" for x, y in np.asarray(v).reshape(-1, 2))
                         for v in (polys.verts)], dtype=object)
    plane = Table("spherex.plane", {
        "planeid": col["planeid"], "obsid": col["obsid"], "obs_publisher_did": did,
        "time_bounds_lower": col["t_min"], "time_bounds_upper": col["t_max"],
        "energy_bounds_lower": col["em_min"], "energy_bounds_upper": col["em_max"],
        "energy_bandpassname": col["energy_bandpassname"], "poly": poly_str,
        "provenance_version": get("version", ""), "quality_flag": np.zeros(n, np.int32),
    }, {}, {"poly": polys}, "CAOM planes of SPHEREx images (one per exposure and detector)")
    plane.meta = {k: META.get(k, {}) for k in plane.columns}
    artifact = Table("spherex.artifact", {
        "planeid": col["planeid"], "uri": col["uri"],
        "contentchecksum": get("contentchecksum", ""),
        "contentlength": get("contentlength", FULL_FILE_BYTES).astype(np.int64),
        "contenttype": np.full(n, "application/fits", dtype=object),
        "producttype": np.full(n, "science", dtype=object),
    }, {"contentlength": META["contentlength"]}, {}, "files of SPHEREx planes")
    nc = len(cal)
    cal_plane = np.arange(nc, dtype=np.int64) + 9_100_001
    caom_art = Table("caom.artifact", {
        "planeid": cal_plane, "collection": np.array([c for c, _, _ in cal], dtype=object),
        "uri": np.array([u for _, u, _ in cal], dtype=object),
        "contentlength": np.array([b for _, _, b in cal], dtype=np.int64),
        "contenttype": np.full(nc, "application/fits", dtype=object),
        "producttype": np.full(nc, "calibration", dtype=object),
    }, {"contentlength": META["contentlength"]}, {}, "files of the SPHEREx calibration collections")
    ob = obs.select("obsid", "obs_id", "obs_collection").unique(subset=["obsid"], keep="first", maintain_order=True)
    observation = Table("spherex.observation", {
        "obsid": _np(ob["obsid"]), "observationid": _np(ob["obs_id"]), "collection": _np(ob["obs_collection"]),
    }, {}, {}, "CAOM observations (exposures)")
    cal_colls = {c for c, _, _ in cal}
    other = [(c, t) for c, t in OTHER_COLLECTIONS if c not in cal_colls]
    colls = list(ob["obs_collection"].to_list()) + [c for c, _, _ in cal] + [c for c, _ in other]
    obsids = list(_np(ob["obsid"])) + list(cal_plane) + [9_000_001 + i for i in range(len(other))]
    types = ["image"] * ob.height + ["measurements"] * nc + [t for _, t in other]
    caom_obs = Table("caom.observation", {"collection": np.array(colls, dtype=object),
                                          "obsid": np.array(obsids, dtype=np.int64)}, {}, {}, "CAOM observations")
    caom_plane = Table("caom.plane", {"collection": np.array(colls, dtype=object),
                                      "obsid": np.array(obsids, dtype=np.int64),
                                      "dataproducttype": np.array(types, dtype=object)}, {}, {}, "CAOM planes")
    return {t.name: t for t in (obscore, plane, artifact, observation, caom_obs, caom_plane, caom_art)}


def sia_columns(obscore: Table, obs: pl.DataFrame, base_url: str) -> dict:
    """Extra/overridden columns for SIA2 answers: direct IBE access_url and cloud_access."""
    return {
        "access_url": np.array([f"{base_url}/{u}" for u in obs["uri"].to_list()], dtype=object),
        "access_format": np.full(obs.height, "image/fits", dtype=object),
        "cloud_access": cloud_access_json(obs),
    }
