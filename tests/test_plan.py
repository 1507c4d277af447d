"""spxframe.plan against the simulated archive: rows vs truth, cost model, URLs the IBE accepts."""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
import requests

from spxframe import schema, spherex
from spxframe.archive.query import observations
from spxframe.errors import InputError
from spxframe.planner.cost import LAYOUT, ROW, CostModel, cutout_bytes
from spxframe.planner.manifest import plan


@pytest.fixture(scope="module")
def field_cat(universe):
    """Sources of every field (deep NEP, generic, RA≈0/360, pole): 40 per field."""
    src = universe.sources
    parts = [src.filter(pl.col("field") == f).head(40) for f in src["field"].unique(maintain_order=True).to_list()]
    return pl.concat(parts).select("source_id", "ra", "dec", "pmra", "pmdec", "ref_epoch")


@pytest.fixture(scope="module")
def field_obs(archive, field_cat):
    return observations(field_cat, archive=archive, return_matches=True)


@pytest.fixture(scope="module")
def truth(universe, field_cat) -> dict:
    """{(source_id, obs_id, detector): (x, y)} true pixels (NaN off the detector) of the sources
    within 3 deg of each frame centre (the detector is 3.5 deg wide; the sim's truth_pixel can give
    spurious on-detector SIP solutions for sources tens of degrees away)."""
    ids = field_cat["source_id"].to_numpy()
    ra, dec = np.radians(field_cat["ra"].to_numpy()), np.radians(field_cat["dec"].to_numpy())
    out = {}
    for oid, det, ora, odec in universe.observations.select("obs_id", "detector", "s_ra", "s_dec").iter_rows():
        cosd = (np.sin(dec) * np.sin(np.radians(odec))
                + np.cos(dec) * np.cos(np.radians(odec)) * np.cos(ra - np.radians(ora)))
        near = cosd > np.cos(np.radians(3.0))
        if near.any():
            x, y = universe.truth_pixel(ids[near], oid, det)
            for sid, a, b in zip(ids[near], x, y):
                out[(int(sid), oid, int(det))] = (a, b)  # ids keep the catalog dtype (int64)
    return out


def _truth(truth: dict, m: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """True (x, y) of each manifest row (NaN when off the detector)."""
    xy = np.array([truth.get((s, o, int(d)), (np.nan, np.nan))
                   for s, o, d in m.select("source_id", "obs_id", "detector").iter_rows()], float).reshape(-1, 2)
    return xy[:, 0], xy[:, 1]


@pytest.mark.parametrize("use_matches", [True, False])
def test_manifest_rows_match_truth(truth, field_cat, field_obs, use_matches):
    obs, matches = field_obs
    p = plan(field_cat, obs, matches=matches if use_matches else None)
    m = p.manifest
    assert m.columns == schema.MANIFEST.names
    assert m.select(pl.struct("source_id", "obs_id", "detector").is_unique().all()).item()
    got = {(s, o, int(d)) for s, o, d in m.select("source_id", "obs_id", "detector").iter_rows()}
    on_det = {k for k, (x, y) in truth.items() if np.isfinite(x) and np.isfinite(y)}
    assert on_det <= got, sorted(on_det - got)[:5]
    tx, ty = _truth(truth, m)
    on = np.isfinite(tx)
    # predicted pixels: a few px from the truth (footprint homography vs SIP WCS)
    assert np.nanmax(np.hypot(m["x_parent"].to_numpy()[on] - tx[on], m["y_parent"].to_numpy()[on] - ty[on])) < 6
    # extra rows are edge cases only: the predicted position is within a few px of the edge
    x, y = m["x_parent"].to_numpy()[~on], m["y_parent"].to_numpy()[~on]
    edge = np.minimum.reduce([x + 0.5, 2039.5 - x, y + 0.5, 2039.5 - y])
    assert (edge < 8).all()
    # every field is represented, including RA≈0/360 and the pole
    assert (m["ra"] < 1).any() and (m["ra"] > 359).any() and (m["dec"] > 87).any()


def test_sources_near_the_edge_are_kept(truth, field_cat, field_obs):
    obs, matches = field_obs
    m = plan(field_cat, obs, matches=matches, access="cutout", cost=CostModel(cutout_server_s=0.0)).manifest
    tx, ty = _truth(truth, m)
    near = np.isfinite(tx) & (np.minimum.reduce([tx, 2039 - tx, ty, 2039 - ty]) < 5)
    assert near.sum() > 3
    own = m.filter(pl.Series(near) & ~pl.col("request_id").str.ends_with(":cutout:shared"))
    assert own.height > 0 and own["clipped"].all()
    assert ((own["box_x0"] >= 0) & (own["box_x0"] + own["box_nx"] <= 2040) & (own["box_nx"] > 0)).all()


def test_cost_model_one_source_vs_hundreds(universe, archive):
    one = universe.sources.filter(pl.col("field") == "wide_generic").head(1)
    obs = observations(one, archive=archive)
    p = plan(one, obs, archive=archive)
    assert set(p.manifest["access"]) <= {"cutout", "range"}
    many = universe.sources.filter(pl.col("field") == "wide_generic").select("source_id", "ra", "dec")
    obs_m = observations(many, archive=archive)
    pm = plan(many, obs_m, archive=archive)
    per_img = pm.manifest.group_by("obs_id", "detector").agg(pl.len().alias("k"), pl.first("access"))
    crowded = per_img.filter(pl.col("k") >= 200)
    assert crowded.height > 0 and (crowded["access"] == "full").mean() > 0.9
    assert "full" in pm.summary["access"].to_list()
    assert "Plan:" in repr(pm) and "full" in repr(pm)


def test_image_access_fixes_the_method_of_listed_images(field_cat, field_obs, archive):
    """lightcurves plans the whole catalog once and hands each sky cell the per-image decision."""
    obs, matches = field_obs
    free = plan(field_cat, obs, matches=matches, archive=archive).manifest
    per_img = free.group_by("obs_id", "detector").agg(pl.first("access")).sort("obs_id", "detector")
    flip = per_img.head(3).with_columns(
        pl.when(pl.col("access") == "full").then(pl.lit("range")).otherwise(pl.lit("full")).alias("access"))
    fixed = plan(field_cat, obs, matches=matches, archive=archive, image_access=flip).manifest
    got = fixed.group_by("obs_id", "detector").agg(pl.first("access"), pl.col("access").n_unique().alias("n"))
    assert (got["n"] == 1).all()
    j = got.join(flip, on=["obs_id", "detector"], suffix="_want")
    assert j.height == 3 and (j["access"] == j["access_want"]).all()
    rest = got.join(flip, on=["obs_id", "detector"], how="anti") \
        .join(per_img, on=["obs_id", "detector"], suffix="_free")
    assert (rest["access"] == rest["access_free"]).all()
    assert fixed.sort("source_id", "obs_id", "detector").select("source_id", "obs_id", "detector").equals(
        free.sort("source_id", "obs_id", "detector").select("source_id", "obs_id", "detector"))


def test_request_grouping_and_bytes(universe, archive, field_cat, field_obs):
    obs, matches = field_obs
    p = plan(field_cat, obs, matches=matches, archive=archive)
    m = p.manifest
    g = m.group_by("request_id").agg(pl.col("url").n_unique(), pl.col("access").n_unique(),
                                     pl.col("predicted_bytes").n_unique(), pl.struct("obs_id", "detector").n_unique())
    assert (g.drop("request_id") == 1).to_numpy().all()  # one transfer = one url, method, size, image
    full = m.filter(pl.col("access") == "full")
    assert (full["predicted_bytes"] == spherex.FULL_FILE_BYTES).all() and (full["box_nx"] == 2040).all()
    tot = m.unique("request_id")["predicted_bytes"].sum()
    assert tot == p.summary["predicted_bytes"].sum()


def test_forced_methods(field_cat, field_obs, archive):
    obs, matches = field_obs
    for access in ("cutout", "range", "full"):
        m = plan(field_cat, obs, matches=matches, access=access, archive=archive).manifest
        expect = {access, "cutout"} if access == "range" else {access}
        assert set(m["access"]) <= expect
    r = plan(field_cat, obs, matches=matches, access="range", archive=archive).manifest \
        .filter(pl.col("access") == "range")
    assert r["url"].str.starts_with(archive.cloud_url + "/qr2/level2/").all()
    for row in r.head(20).iter_rows(named=True):  # ranges hold the box rows of every plane
        rng = json.loads(row["ranges"])
        for h in spherex.PLANE_HDUS:
            a = LAYOUT[h][1] + row["box_y0"] * ROW
            b = a + row["box_ny"] * ROW
            assert any(s <= a and b <= e for s, e in rng), (h, a, b)
        assert [0, LAYOUT["IMAGE"][1]] in rng or rng[0][0] == 0
    full = plan(field_cat, obs, matches=matches, cutout_size=None, access="full").manifest
    assert set(full["access"]) == {"full"} and (full["box_nx"] == 2040).all()


def test_none_plans_measurement_boxes_centred_on_the_sources(truth, field_cat, field_obs, archive):
    """cutout_size=None: only the photometry stamp (aperture + annulus + margin), not whole images
    (the meaning of None before issue 14)."""
    obs, matches = field_obs
    p = plan(field_cat, obs, matches=matches, cutout_size=None, archive=archive)
    m = p.manifest.filter(pl.col("status") == "planned")
    assert "full" not in set(m["access"]) and m.height > 1000
    whole = m.filter(~pl.col("clipped"))
    assert (whole["box_nx"] == 25).all() and (whole["box_ny"] == 25).all()
    tx, ty = _truth(truth, whole)
    on = np.isfinite(tx)
    cx = whole["box_x0"].to_numpy() + 12  # the box's centre pixel vs the true position
    cy = whole["box_y0"].to_numpy() + 12
    assert np.abs(cx[on] - tx[on]).max() < 6 and np.abs(cy[on] - ty[on]).max() < 6
    # a measurement costs ~1 MB (full-width rows of 25 rows) instead of ~6.6 MB at 200 px
    big = plan(field_cat, obs, matches=matches, archive=archive)
    per = p.summary["predicted_bytes"].sum() / m.height
    assert per < 1.5e6 and per * 4 < big.summary["predicted_bytes"].sum() / big.manifest.height


def test_cutout_urls_accepted_by_ibe(field_cat, field_obs, archive):
    from astropy.io import fits

    obs, matches = field_obs
    shared = plan(field_cat, obs, matches=matches, cutout_size="64px", access="cutout", archive=archive).manifest
    own = plan(field_cat, obs, matches=matches, cutout_size="64,48px", access="cutout", archive=archive,
               cost=CostModel(cutout_server_s=0.0)).manifest  # per-source cutouts
    assert shared["request_id"].str.ends_with(":shared").any() and (~own["request_id"].str.ends_with(":shared")).any()
    rows = pl.concat([m.unique("request_id", maintain_order=True).sort("clipped").head(3)
                      .vstack(m.filter(pl.col("clipped")).head(2))
                      for m in (shared, own)]
                     # and every shared cutout across the whole detector width
                     + [shared.filter(pl.col("box_nx") == 2040).unique("request_id", maintain_order=True)])
    assert rows.filter(pl.col("box_nx") == 2040).height  # the field has one
    for r in rows.iter_rows(named=True):
        resp = requests.get(r["url"], timeout=60)
        assert resp.status_code == 200, (r["url"], resp.text[:200])
        # size formula of spec §3.8 (38 header blocks; the sim writes 37): within two blocks
        assert abs(len(resp.content) - cutout_bytes(r["box_nx"], r["box_ny"])) <= 2 * 2880 or r["clipped"]
        with fits.open(io.BytesIO(resp.content)) as hdul:
            shape = hdul["IMAGE"].data.shape
            x0 = 1 - int(hdul["IMAGE"].header["CRPIX1A"])
        if not r["clipped"]:
            assert shape == (r["box_ny"], r["box_nx"])
            assert abs(x0 - r["box_x0"]) <= 5
        else:
            assert abs(shape[0] - r["box_ny"]) <= 6 and abs(shape[1] - r["box_nx"]) <= 6


def test_cutout_center_option(field_cat, field_obs):
    obs, matches = field_obs
    m = plan(field_cat, obs, matches=matches, cutout_center="1020,1020px", cutout_size="100px",
             access="cutout").manifest
    planned = m.filter(pl.col("status") == "planned")
    assert (planned["box_x0"] == 971).all() and (planned["box_nx"] == 100).all()


@pytest.mark.parametrize("kw, words", [
    ({"access": "ftp"}, "access"), ({"cutout_size": "0px"}, "positive"), ({"cutout_size": "3furlongs"}, "unit"),
    ({"cutout_center": "1,95"}, "Dec"), ({"cutout_size": "3000px"}, "access='full'"),
])
def test_bad_inputs_no_traffic(archive, field_cat, field_obs, kw, words):
    obs, _ = field_obs
    archive.clear_log()
    with pytest.raises(InputError, match=words):
        plan(field_cat, obs, archive=archive, **kw)
    with pytest.raises(InputError, match="source_id"):
        plan(field_cat.rename({"source_id": "ID"}), obs, archive=archive)
    with pytest.raises(InputError, match="observations"):
        plan(field_cat, obs.drop("s_region"), archive=archive)
    assert archive.log == []


def test_cost_model_units():
    c = CostModel(bandwidth_Bps=1e6, request_s=0.1, cutout_server_s=2)
    assert c.seconds(2e6, 3, 1) == pytest.approx(2 + 0.3 + 2)
    # with the fetcher's concurrency: two IBE cutouts at a time; 8 images x 8 ranges in flight
    assert c.wall("cutout", 2e6, 4) == pytest.approx(2 + 4 * 2.1 / 2)
    assert c.wall("range", 2e6, 64, 2) == pytest.approx(2 + (2 + 8) * 0.1 / 8 + 64 * c.request_cpu_s)
    home = CostModel.for_link(bandwidth_Bps=5e6, latency_s=0.1)
    assert (home.bandwidth_Bps, home.request_s, home.cutout_server_s) == (5e6, 0.1, 15.0)
    assert cutout_bytes(60, 60) == 5_109_120  # spec §3.8 (SPXQuery's 60 px cutouts)
