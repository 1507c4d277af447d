"""Fall back instead of failing, where the real IRSA is less kind than a plain archive (issue 14):
a cloud copy that lags the archive (404 NoSuchKey) → IBE; a cutout service that answers 503 beyond
two concurrent requests → start at two and grow only while no 503 comes back; a TAP service that
refuses uploads → per-region queries with the same observations.

Everything talks HTTP to the simulated archive (``spxframe.sim``) with its fault knobs.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import polars as pl
import pytest

import spxframe
from spxframe import schema, sim
from spxframe.fetcher import engine as F
from spxframe.fetcher.ranges import Box

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _catalog(u: sim.Universe, n: int, field: str = "wide_generic") -> pl.DataFrame:
    """``n`` simulated sources nearest the centre of a wide field."""
    cat = u.catalog().join(u.sources.select("source_id", "field"), on="source_id").filter(pl.col("field") == field)
    ra0, dec0 = float(cat["ra"].median()), float(cat["dec"].median())
    d2 = ((cat["ra"] - ra0) * np.cos(np.radians(dec0))) ** 2 + (cat["dec"] - dec0) ** 2
    return cat.with_columns(d2.alias("_d")).sort("_d").head(n).drop("_d", "field")


def _lagging(u: sim.Universe) -> set[str]:
    o = u.observations
    return set(o.filter(~pl.col("cloud_available"))["cloud_key"].to_list())


def _transfers(arc, endpoint: str) -> list[dict]:
    return [e for e in arc.log if e.get("endpoint") == endpoint]


@pytest.fixture(scope="module")
def lag_runs(tmp_path_factory):
    """The same small catalog measured by range reads on two archives that differ only in 30 % of
    cloud copies lagging; returns {lag: (photometry, manifest, transfer log, universe)}."""
    out = {}
    for lag in (0.0, 0.3):
        u = sim.Universe(seed=1, releases=("qr2",), cloud_lag_fraction=lag)
        cat = _catalog(u, 3)
        d = tmp_path_factory.mktemp(f"lag{int(lag * 100)}")
        with sim.serve(universe=u) as arc:
            phot = spxframe.lightcurves(cat, "64px", access="range", archive=arc, output_dir=d / "out",
                                        cache_dir=d / "cache", progress=False, plots=0)
            log = [e for e in arc.log if e.get("endpoint") in ("cloud", "ibe_cutout", "ibe_file")]
        out[lag] = (phot, pl.read_parquet(d / "out" / "manifest.parquet"), log, u)
        out["run", lag] = json.loads((d / "out" / "run.json").read_text())
    return out


# --------------------------------------------------------------------------------------
# 1. the cloud copy lags the archive: range reads → IBE cutouts of the same boxes
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lagging_cloud_copy_falls_back_to_ibe_same_fluxes(lag_runs):
    phot0, man0, _, _ = lag_runs[0.0]
    phot, man, log, u = lag_runs[0.3]
    lagging = _lagging(u)
    keys = {m.split("/nasa-irsa-spherex/", 1)[1] for m in man0["url"].to_list()}
    assert keys & lagging, "the catalog must touch lagging files"
    # no row lost: every row fetched, none FETCH_FAILED
    assert man["status"].to_list() == ["done"] * man.height, man["error"].drop_nulls().to_list()[:3]
    assert not ((phot["qc"] & schema.QC["FETCH_FAILED"]) != 0).any()
    # the manifest says how each row was fetched: IBE cutouts exactly for the lagging files
    lag_file = pl.Series([k in lagging for k in keys_of(man0)])
    m0 = man0.with_columns(lag_file.alias("lag")).select("source_id", "obs_id", "detector", "lag")
    m = man.join(m0, on=["source_id", "obs_id", "detector"])
    assert set(m.filter("lag")["access"]) == {"cutout"} and set(m.filter(~pl.col("lag"))["access"]) == {"range"}
    # and run.json counts the rows that fell back
    assert lag_runs["run", 0.3]["counts"]["cloud_fallback_rows"] == m["lag"].sum() > 0
    assert lag_runs["run", 0.0]["counts"]["cloud_fallback_rows"] == 0
    assert all("/ibe/data/spherex/" in x and "center=" in x for x in m.filter("lag")["url"])
    # each lagging file was asked of the cloud once (its 404), then only of IBE
    cloud404 = [e for e in log if e["endpoint"] == "cloud" and e["status"] == 404]
    assert len(cloud404) == len({e["path"] for e in cloud404}) == len(keys & lagging)
    assert len([e for e in log if e["endpoint"] == "ibe_cutout"]) == m.filter("lag").height
    # the same fluxes as with every cloud copy there
    k = ["source_id", "obs_id", "detector"]
    both = phot0.select(*k, "flux", "flux_err").join(phot.select(*k, "flux", "flux_err"), on=k, suffix="_lag")
    assert both.height == phot0.height == phot.height
    np.testing.assert_allclose(both["flux_lag"].to_numpy(), both["flux"].to_numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(both["flux_err_lag"].to_numpy(), both["flux_err"].to_numpy(), rtol=1e-5)


def keys_of(man: pl.DataFrame) -> list[str]:
    return [m.split("/nasa-irsa-spherex/", 1)[1] for m in man["url"].to_list()]


@pytest.fixture
def lag_arc():
    u = sim.Universe(seed=1, releases=("qr2",), cloud_lag_fraction=0.5)
    with sim.serve(universe=u) as arc:
        yield arc


def _range_rows(arc, obs: list[dict], size_px: int = 40) -> list[dict]:
    u = arc.universe
    rows = []
    for k, o in enumerate(obs):
        ra, dec = o["s_ra"], o["s_dec"]
        box = Box(*u.cutout_box(o["cloud_key"], f"{ra:.7f},{dec:.7f}", f"{size_px}px"))
        rows.append(dict(source_id=str(k), obs_id=o["obs_id"], detector=int(o["detector"]), ra=ra, dec=dec,
                         access="range", request_id=f"r{k}", url=f"{arc.cloud_url}/{o['cloud_key']}",
                         box_x0=box.x0, box_y0=box.y0, box_nx=box.nx, box_ny=box.ny, status="planned"))
    return rows


def test_range_rows_of_a_missing_cloud_object_come_from_ibe_and_are_remembered(lag_arc, tmp_path):
    """fetch() alone: range rows of a lagging file end 'done' from IBE cutouts holding the planned
    box; the run remembers the missing key; a rerun of the original plan transfers nothing."""
    u = lag_arc.universe
    o = u.observations
    gone = o.filter(~pl.col("cloud_available")).head(2).to_dicts()
    there = o.filter(pl.col("cloud_available")).head(1).to_dicts()
    man = pl.DataFrame(_range_rows(lag_arc, gone + there))
    out = F.fetch(man, cache_dir=tmp_path, progress=False)
    assert out["status"].to_list() == ["done"] * 3, out["error"].to_list()
    assert out["access"].to_list() == ["cutout", "cutout", "range"]
    from astropy.io import fits

    for r in out.head(2).iter_rows(named=True):
        with fits.open(r["path"]) as h:   # an IBE cutout (its PSF with data) holding the planned box
            img = h["IMAGE"].header
            x0, y0 = int(round(1 - img["CRPIX1A"])), int(round(1 - img["CRPIX2A"]))
            assert x0 <= r["box_x0"] and x0 + img["NAXIS1"] >= r["box_x0"] + r["box_nx"]
            assert y0 <= r["box_y0"] and y0 + img["NAXIS2"] >= r["box_y0"] + r["box_ny"]
            assert h["PSF"].data is not None
    assert len([e for e in lag_arc.log if e["endpoint"] == "cloud" and e["status"] == 404]) == 2
    # the run remembers: another fetch of the same files goes straight to IBE
    lag_arc.clear_log()
    again = F.fetch(man.head(2).with_columns(pl.lit("x").alias("request_id")), cache_dir=tmp_path / "other",
                    progress=False)
    assert again["status"].to_list() == ["done"] * 2
    assert not _transfers(lag_arc, "cloud") and len(_transfers(lag_arc, "ibe_cutout")) == 2
    # a rerun of the original plan into the first cache: the fallback cutouts are verified, kept
    lag_arc.clear_log()
    rerun = F.fetch(man, cache_dir=tmp_path, progress=False)
    assert rerun["status"].to_list() == ["done"] * 3 and rerun["access"].to_list() == ["cutout", "cutout", "range"]
    assert not _transfers(lag_arc, "ibe_cutout") and not _transfers(lag_arc, "cloud")


# --------------------------------------------------------------------------------------
# 2. whole files: from the cloud copy when it has them, else from IBE
# --------------------------------------------------------------------------------------


def test_full_files_from_the_cloud_copy_lagging_ones_from_ibe(lag_arc, tmp_path):
    u = lag_arc.universe
    o = u.observations
    rows = o.filter(~pl.col("cloud_available")).head(1).to_dicts() + o.filter(pl.col("cloud_available")).head(1)\
        .to_dicts()
    man = pl.DataFrame([dict(source_id=str(k), obs_id=r["obs_id"], detector=int(r["detector"]), access="full",
                             request_id=f"f{k}", url=f"{lag_arc.cloud_url}/{r['cloud_key']}",
                             size=u.file_size(r["cloud_key"]), checksum=u.md5(r["cloud_key"]))
                        for k, r in enumerate(rows)])
    out = F.fetch(man, cache_dir=tmp_path, progress=False)
    assert out["status"].to_list() == ["done", "done"], out["error"].to_list()
    import hashlib
    from pathlib import Path

    for r, p in zip(rows, out["path"]):
        assert hashlib.md5(Path(p).read_bytes()).hexdigest() == u.md5(r["cloud_key"])
    # the lagging file: one 404 from the cloud, then its bytes from IBE; the other: bytes from the cloud
    ok = [e for e in lag_arc.log if e.get("status") == 200]
    assert [e["endpoint"] for e in ok if rows[0]["cloud_key"] in e["path"]] == ["ibe_file"]
    assert [e["endpoint"] for e in ok if rows[1]["cloud_key"] in e["path"]] == ["cloud"]
    assert sum(e["bytes_sent"] for e in ok if e["endpoint"] == "cloud") == u.file_size(rows[1]["cloud_key"])
    assert out["url"].to_list() == [f"{lag_arc.url}/{rows[0]['uri']}", man["url"][1]]


@pytest.mark.slow
def test_planned_whole_files_come_from_the_cloud_copy(lag_arc, tmp_path):
    """plan(access='full') + fetch(): whole files from the cloud copy; lagging ones from IBE."""
    from spxframe.archive.query import observations
    from spxframe.planner.manifest import plan

    u = lag_arc.universe
    cat = _catalog(u, 1)
    obs = observations(cat, archive=lag_arc, bands=["D1"])
    lag = pl.Series([k in _lagging(u) for k in obs["cloud_key"].to_list()])
    obs = pl.concat([obs.filter(lag).head(2), obs.filter(~lag).head(2)])  # whole files are big: four
    assert obs.height == 4
    man = plan(cat, obs, access="full", archive=lag_arc).manifest
    assert man.height > 0 and man["url"].str.starts_with(lag_arc.cloud_url + "/").all()
    lag_arc.clear_log()
    out = F.fetch(man, cache_dir=tmp_path, progress=False, observations=obs)
    assert out["status"].to_list() == ["done"] * out.height, out["error"].drop_nulls().to_list()[:3]
    lagging = _lagging(u)
    keys = keys_of(man)
    ok = [e for e in lag_arc.log if e.get("status") == 200]
    for k in keys:
        assert [e["endpoint"] for e in ok if e["path"].endswith(k)] == (["ibe_file"] if k in lagging else ["cloud"])


# --------------------------------------------------------------------------------------
# 3. cutout service politeness: start at two, grow only while no 503 comes back
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_arc():
    u = sim.Universe(seed=1, releases=("qr2",))
    with sim.serve(universe=u) as arc:
        yield arc


def _cutout_rows(arc, n_obs: int, per_obs: int, size_px: int = 24) -> pl.DataFrame:
    o = arc.universe.observations.head(n_obs).to_dicts()
    rows = []
    for i, r in enumerate(o):
        for j in range(per_obs):
            ra, dec = r["s_ra"] + 0.05 * j, r["s_dec"] - 0.04 * j
            url = f"{arc.url}/{r['uri']}?center={ra:.7f},{dec:.7f}&size={size_px}px&gzip=false"
            rows.append(dict(source_id=f"{i}_{j}", obs_id=r["obs_id"], detector=int(r["detector"]), ra=ra, dec=dec,
                             access="cutout", request_id=f"c{i}_{j}", url=url, status="planned"))
    return pl.DataFrame(rows)


@pytest.mark.parametrize("server_cap", [2, 3])
def test_cutouts_start_at_two_and_grow_only_while_no_503(plain_arc, tmp_path, server_cap):
    """A cutout service that refuses more than ``server_cap`` concurrent requests (503 +
    Retry-After): every row ends done, and the server counted only a handful of 503s (the client
    starts at two and keeps below a level that was overloaded, trying it again rarely)."""
    f = plain_arc.faults
    f.max_cutout_concurrency, f.latency_s, f.retry_after_s = server_cap, 0.05, 0.2
    f.endpoints = ("ibe_cutout",)
    plain_arc.clear_log()
    try:
        man = _cutout_rows(plain_arc, 8, 6)
        out = F.fetch(man, cache_dir=tmp_path, progress=False, max_concurrency=6)
    finally:
        f.max_cutout_concurrency, f.latency_s, f.endpoints = None, 0.0, None
    assert out["status"].to_list() == ["done"] * man.height, out["error"].drop_nulls().to_list()[:3]
    cut = _transfers(plain_arc, "ibe_cutout")
    refused = [e for e in cut if e["status"] == 503]
    assert len(cut) - len(refused) == man.height
    assert len(refused) <= 3, len(refused)


# --------------------------------------------------------------------------------------
# 4. TAP upload refused (any status): sky-region queries, the same observations, said once
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 413])
def test_tap_upload_refused_same_observations(plain_arc, status, caplog):
    from spxframe.archive.query import observations

    u = plain_arc.universe
    cat = pl.concat([_catalog(u, 4), _catalog(u, 3, field=str(u.sources["field"][0]))]).unique("source_id")
    ref_report: dict = {}
    ref, ref_m = observations(cat, archive=plain_arc, strategy="upload", max_sources_per_query=3,
                              return_matches=True, report=ref_report)
    assert ref.height > 0 and ref_report["upload_fallback"] is None and ref_report["sources_by_upload"] == cat.height
    plain_arc.faults.tap_upload_status = status
    plain_arc.clear_log()
    report: dict = {}
    try:
        with caplog.at_level(logging.INFO, logger="spxframe"):
            got, m = observations(cat, archive=plain_arc, strategy="upload", max_sources_per_query=3, backoff=0.05,
                                  return_matches=True, report=report)
    finally:
        plain_arc.faults.tap_upload_status = None
    refused = [e for e in plain_arc.log if e["endpoint"] == "tap" and e.get("fault") == "tap_upload"]
    assert refused and all(e["status"] == status for e in refused)
    assert got.equals(ref)
    key = ["source_id", "obs_id", "detector"]
    assert m.sort(key).equals(ref_m.sort(key))
    said = [r for r in caplog.records if "falling back to sky-region" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    fb = report["upload_fallback"]
    assert fb["status"] == status and fb["sources"] == cat.height and report["sources_by_upload"] == 0
    assert report["sources_by_region"] == cat.height
