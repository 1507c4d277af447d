"""spxframe.archive against the simulated archive: the observations query for whole catalogs."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from spxframe import schema, spherex
from spxframe.archive.query import Endpoints, observations, resolve_archive
from spxframe.errors import ArchiveUnreachable, InputError


def test_resolve_archive():
    irsa = resolve_archive(None)
    assert irsa == resolve_archive("irsa") == Endpoints(
        spherex.IRSA_URL, spherex.IRSA_URL + "/TAP", spherex.IRSA_URL + "/SIA", spherex.CLOUD_URL)
    e = resolve_archive("http://127.0.0.1:9/")
    assert e.tap_url == "http://127.0.0.1:9/TAP" and e.cloud_url == "http://127.0.0.1:9/nasa-irsa-spherex"

    class Obj:
        url = "http://h:1"
        cloud_url = "http://c:2/bucket"

    assert resolve_archive(Obj()).cloud_url == "http://c:2/bucket"
    with pytest.raises(InputError):
        resolve_archive("ftp://x")


def _truth_frames(universe, cat: pl.DataFrame) -> set[tuple[int, str, int]]:
    """(source_id, obs_id, detector) whose true position (at mid-exposure) is on the detector."""
    ids = cat["source_id"].to_numpy()
    out = set()
    ra, dec = np.radians(cat["ra"].to_numpy()), np.radians(cat["dec"].to_numpy())
    for oid, det, ora, odec in universe.observations.select("obs_id", "detector", "s_ra", "s_dec").iter_rows():
        # only sources within 3 deg of the frame centre (the detector is 3.5 deg wide; the sim's
        # truth_pixel can return spurious on-detector SIP solutions for sources tens of degrees away)
        cosd = (np.sin(dec) * np.sin(np.radians(odec))
                + np.cos(dec) * np.cos(np.radians(odec)) * np.cos(ra - np.radians(ora)))
        near = cosd > np.cos(np.radians(3.0))
        if not near.any():
            continue
        x, y = universe.truth_pixel(ids[near], oid, det)
        for sid in ids[near][np.isfinite(x) & np.isfinite(y)]:
            out.add((int(sid), oid, int(det)))  # ids keep the catalog dtype (int64)
    return out


@pytest.fixture(scope="module")
def small_cat(universe):
    """A few sources per field (deep NEP, generic, RA≈0, pole)."""
    src = universe.sources
    parts = [src.filter(pl.col("field") == f).head(3) for f in src["field"].unique(maintain_order=True).to_list()]
    return pl.concat(parts).select("source_id", "ra", "dec", "pmra", "pmdec", "ref_epoch")


@pytest.fixture(scope="module")
def small_truth(universe, small_cat):
    return _truth_frames(universe, small_cat)


@pytest.mark.parametrize("strategy", ["upload", "regions", "auto"])
def test_observations_match_truth(archive, small_cat, small_truth, strategy):
    obs, matches = observations(small_cat, archive=archive, strategy=strategy, return_matches=True)
    assert obs.columns == schema.OBSERVATIONS.names
    assert obs.select(pl.struct("obs_id", "detector").is_unique().all()).item()
    truth = small_truth
    got = {(s, o, int(d)) for s, o, d in matches.iter_rows()}
    assert truth <= got, sorted(truth - got)[:5]
    assert len(got - truth) <= 0.02 * len(truth) + 2  # only edge cases within the margin
    assert set(obs["collection"].unique()) == {"spherex_qr2", "spherex_qr2_deep"}
    assert obs["band"].str.contains(r"^D[1-6]$").all()
    assert (obs["em_min"] > 0.5).all() and (obs["em_max"] < 5.5).all()  # µm
    assert ((obs["mjd_mid"] - (obs["t_min"] + obs["t_max"]) / 2).abs() < 1e-9).all()
    assert obs["file_url"].str.starts_with(archive.url + "/ibe/data/spherex/qr2/").all()
    assert (obs["cloud_key"].str.starts_with("qr2/level2/") | (obs["cloud_key"] == "")).all()


def test_observations_filters(archive, small_cat):
    all_obs = observations(small_cat, archive=archive)
    d = observations(small_cat, archive=archive, bands=["d1", "SPHEREx-D4"])
    assert set(d["band"]) == {"D1", "D4"} and d.height == all_obs.filter(pl.col("band").is_in(["D1", "D4"])).height
    t0, t1 = float(all_obs["t_min"].quantile(0.25)), float(all_obs["t_max"].quantile(0.75))
    t = observations(small_cat, archive=archive, time=(t0, t1))
    assert t.height == all_obs.filter((pl.col("t_max") >= t0) & (pl.col("t_min") <= t1)).height
    from astropy.time import Time

    tt = observations(small_cat, archive=archive, time=(Time(t0, format="mjd"), Time(t1, format="mjd")))
    assert tt.equals(t)
    wide = observations(small_cat, archive=archive, collection=["spherex_qr2"])
    assert set(wide["collection"]) == {"spherex_qr2"}


def test_bounded_queries_for_1000_sources(universe, archive):
    cat = universe.catalog(n=1000)
    archive.clear_log()
    obs = observations(cat, archive=archive)
    tap = [r for r in archive.log if r["endpoint"] == "tap"]
    assert obs.height > 0
    assert len(tap) <= 80, len(tap)


def test_overflow_split_gives_same_rows(archive, small_cat):
    ref = observations(small_cat, archive=archive, strategy="upload")
    small = observations(small_cat, archive=archive, strategy="upload", maxrec=150)
    assert small.sort(["obs_id", "detector"]).equals(ref.sort(["obs_id", "detector"]))


def test_retries_through_faults(archive, small_cat):
    ref = observations(small_cat, archive=archive, strategy="regions")
    archive.faults.error_rate = 0.5
    archive.clear_log()
    try:
        again = observations(small_cat, archive=archive, strategy="regions", retries=12, backoff=0.01)
    finally:
        archive.faults.error_rate = 0.0
    assert again.equals(ref)
    assert any(r["status"] >= 500 for r in archive.log if r["endpoint"] == "tap")


def test_async_mode_same_rows(archive, small_cat):
    ref = observations(small_cat, archive=archive, strategy="upload")
    archive.clear_log()
    got = observations(small_cat, archive=archive, strategy="upload", mode="async")
    assert got.equals(ref)
    assert any("/async" in r["path"] for r in archive.log)


@pytest.mark.parametrize("kw, words", [
    ({"bands": ["D7"]}, "unknown band"),
    ({"time": (61000, 60000)}, "start <= end"),
    ({"time": 5}, "mjd_start"),
    ({"collection": "x'; DROP"}, "collection"),
    ({"strategy": "magic"}, "strategy"),
    ({"releases": ["qr9"]}, "unknown release"),
    ({"releases": ["qr2"], "collection": "spherex_qr2"}, "releases"),
])
def test_bad_options_no_traffic(archive, small_cat, kw, words):
    archive.clear_log()
    with pytest.raises(InputError, match=words):
        observations(small_cat, archive=archive, **kw)
    assert archive.log == []


def test_bad_catalog_no_traffic(archive):
    archive.clear_log()
    with pytest.raises(InputError, match="dec"):
        observations(pl.DataFrame({"source_id": [1], "ra": [1.0], "dec": [95.0]}), archive=archive)
    assert archive.log == []


def test_unreachable():
    with pytest.raises(ArchiveUnreachable, match="127.0.0.1:9") as e:
        observations(pl.DataFrame({"source_id": [1], "ra": [1.0], "dec": [1.0]}), archive="http://127.0.0.1:9",
                     retries=1, backoff=0.01, timeout=2)
    assert e.value.hint


def test_contract_query_shape(archive, small_cat, small_truth):
    """edge_margin_px=0: CONTRACTS.md's p.poly join; the archive's polygon decides (edges may be lost)."""
    obs, m = observations(small_cat, archive=archive, strategy="upload", edge_margin_px=0, return_matches=True)
    got = {(s, o, int(d)) for s, o, d in m.iter_rows()}
    assert len(got & small_truth) >= 0.98 * len(small_truth)
    assert len(got - small_truth) <= 2


def test_int_ids_stay_int_through_observations_and_plan(archive, small_cat):
    """A user's int64 ids come back as int64 in the matches and the manifest, so joins work."""
    from spxframe.planner.manifest import plan

    assert small_cat.schema["source_id"] == pl.Int64
    obs, m = observations(small_cat, archive=archive, return_matches=True)
    man = plan(small_cat, obs, matches=m, archive=archive).manifest
    assert m.schema["source_id"] == man.schema["source_id"] == pl.Int64
    assert man.join(small_cat, on="source_id", how="anti").height == 0


def test_rows_carry_their_release_from_the_collection(archive, small_cat):
    obs = observations(small_cat, archive=archive, releases=["qr2"])
    assert obs.height and set(obs["release"]) == {"qr2"}
    assert obs.equals(observations(small_cat, archive=archive))  # QR2 is what this version reads
    expert = observations(small_cat, archive=archive, collection="spherex_qr2")
    assert set(expert["collection"]) == {"spherex_qr2", "spherex_qr2_deep"}


def test_a_reprocessing_release_wins_one_row_per_image():
    """When a later release (DR1) repeats an (obs_id, detector), the later release's row is kept."""
    from spxframe.archive.query import _newest_release_wins

    rows = pl.DataFrame({"obs_id": ["a", "a", "b"], "detector": [1, 1, 1], "release": ["qr2", "qr3", "qr2"],
                         "file_url": ["old", "new", "only"]})
    got = _newest_release_wins(rows).sort("obs_id")
    assert got["file_url"].to_list() == ["new", "only"]


def test_unreadable_release_refused_before_traffic(archive, small_cat, monkeypatch):
    """A release whose file format this version does not read is a clear error, not bad rows (QR3
    is read since the R7 reader landed: tests/test_releases.py; here its format is made unreadable)."""
    from spxframe import spherex

    monkeypatch.setattr(spherex, "READABLE_FORMATS", frozenset({"qr2"}))
    archive.clear_log()
    with pytest.raises(InputError, match="qr3"):
        observations(small_cat, archive=archive, releases=["qr3"])
    assert archive.log == []


def test_text_source_ids(archive, small_cat):
    from spxframe.planner.manifest import plan

    cat = small_cat.with_columns(("star-" + pl.col("source_id").cast(pl.Utf8)).alias("source_id"))
    obs, m = observations(cat, archive=archive, return_matches=True)
    assert m["source_id"].str.starts_with("star-").all()
    man = plan(cat, obs, matches=m).manifest
    assert man.height == m.height and man["source_id"].str.starts_with("star-").all()


def test_upload_refused_falls_back_to_regions(archive, small_cat, monkeypatch):
    import spxframe.archive.query as arc_mod

    ref = observations(small_cat, archive=archive, strategy="regions")
    monkeypatch.setattr(arc_mod, "upload_query", lambda *a, **k: "SELECT nonsense FROM TAP_UPLOAD.nope")
    got = observations(small_cat, archive=archive, strategy="upload")
    assert got.equals(ref)


def test_footprints_beyond_the_search_radius_are_reported(archive, small_cat, caplog):
    """The search radius (spherex.FOOTPRINT_RADIUS_DEG) covers every simulated footprint; a wider one
    is reported, since sources near its corners could be missed."""
    import logging

    from spxframe.archive.query import _warn_wide_footprints

    with caplog.at_level(logging.WARNING, logger="spxframe"):
        obs = observations(small_cat, archive=archive)
    assert not [r for r in caplog.records if "footprint" in r.getMessage()]
    wide = obs.head(1).with_columns(pl.lit("POLYGON ICRS 10 -3 13 -3 13 3 10 3").alias("s_region"))
    with caplog.at_level(logging.WARNING, logger="spxframe"):
        _warn_wide_footprints(wide)
    assert [r for r in caplog.records if "beyond 2.53 deg" in r.getMessage()]
