"""Both releases in one light curve (issue 13): QR3 (pipeline R7) rows planned, fetched, checked
and measured; the QR2 -> R7 gain correction from the l3_flux_corrections product.

All against a two-release simulated archive (``spxframe.sim.serve(seed=1)``, its default
releases), over real HTTP.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

import spxframe
from spxframe import schema, spherex
from spxframe.errors import FileFormatError
from spxframe.fetcher import CacheDir, fetch
from spxframe.fetcher.calib import fetch_products, latest_names
from spxframe.fits.hdu import required_hdus, scan_fits
from spxframe.planner import plan

BOUNDARY_MJD = 61241.0  #: 2026-07-20: QR2 ends, QR3 begins


@pytest.fixture(scope="module")
def sky():
    from spxframe import sim

    universe = sim.Universe(seed=1, cache_strips=256)
    with sim.serve(universe=universe) as arc:
        yield universe, arc


def _catalog(universe, per_field: int = 2, fields=("deep_nep", "wide_generic", "wide_ra0")) -> pl.DataFrame:
    """Bright but unsaturated sources of a few fields."""
    src = universe.sources
    parts = [src.filter((pl.col("field") == f) & (pl.col("flux_2um") < 8000))
             .sort("flux_2um", descending=True).head(per_field) for f in fields]
    return pl.concat(parts).select("source_id", "ra", "dec", "pmra", "pmdec", "ref_epoch")


@pytest.fixture(scope="module")
def deep_obs(sky):
    universe, arc = sky
    cat = _catalog(universe, 1, ("deep_nep",))
    return cat, spxframe.observations(cat, archive=arc)


def test_default_releases_read_both_each_in_its_time_span(deep_obs, sky):
    """releases=None reads QR3 too; a row's release follows its collection, and the releases are
    consecutive slices of one time line."""
    _, arc = sky
    cat, obs = deep_obs
    assert set(spherex.DEFAULT_RELEASES) == {"qr2", "qr3"}
    got = dict(obs.group_by("release").agg(pl.col("mjd_mid").min().alias("lo"), pl.col("mjd_mid").max().alias("hi"))
               .select("release", pl.struct("lo", "hi")).iter_rows())
    assert set(got) == {"qr2", "qr3"}
    assert got["qr2"]["hi"] < BOUNDARY_MJD <= got["qr3"]["lo"]
    for rel, colls in (("qr2", spherex.RELEASES["qr2"].collections), ("qr3", spherex.RELEASES["qr3"].collections)):
        assert obs.filter(pl.col("release") == rel)["collection"].is_in(colls).all()
    only3 = spxframe.observations(cat, archive=arc, releases=("qr3",))
    assert set(only3["release"]) == {"qr3"}
    assert only3.height == obs.filter(pl.col("release") == "qr3").height


def test_plan_r7_images_with_r7_estimates(deep_obs):
    """R7 images are planned with the R7 estimates (compressed FLAGS, the EPSF table), not the
    QR2 figures: as IBE cutouts (the EPSF table counted once per detector and version: later
    cutout streams are closed after ZODI), and as byte ranges of the cloud copy where asked."""
    cat, obs = deep_obs
    rel = obs.select("obs_id", "detector", "release")
    cut = plan(cat, obs, cutout_size="64px", access="cutout").manifest.join(rel, on=["obs_id", "detector"])
    per_key = (cut.filter(pl.col("release") == "qr3").group_by("psf_key")
               .agg(pl.col("predicted_bytes").sum().alias("b"), pl.len().alias("n")))
    box = (per_key["b"] - spherex.R7_EPSF_BYTES_EST) / per_key["n"]
    assert per_key.height > 1 and ((box > 16_000) & (box < 1_000_000)).all(), box.to_list()
    qr2 = cut.filter(pl.col("release") == "qr2")["predicted_bytes"]
    assert qr2.len() > 0 and (qr2 > spherex.PSF_BYTES).all()  # QR2 cutouts carry their PSF cube, every one
    m = plan(cat, obs, cutout_size="64px", access="range").manifest.join(rel, on=["obs_id", "detector"])
    assert set(m["access"]) == {"range"}
    r7 = m.filter(pl.col("release") == "qr3")
    assert r7.height > 0 and (r7["predicted_bytes"] < spherex.R7_FULL_FILE_BYTES_EST / 4).all()
    full = plan(cat, obs, cutout_size=None, access="full").manifest.join(rel, on=["obs_id", "detector"])
    assert set(full.filter(pl.col("release") == "qr3")["predicted_bytes"]) == {spherex.R7_FULL_FILE_BYTES_EST}
    assert set(full.filter(pl.col("release") == "qr2")["predicted_bytes"]) == {spherex.FULL_FILE_BYTES}


def test_r7_cutouts_fetched_checked_and_measured(deep_obs, sky, tmp_path):
    """QR3 cutouts pass the R7 integrity check (EPSF, not PSF), a truncated one fails it and is
    not trusted by the cache, and measure() reads them."""
    universe, arc = sky
    cat, obs = deep_obs
    m = plan(cat, obs.filter(pl.col("release") == "qr3").head(3), cutout_size="64px", archive=arc).manifest
    got = fetch(m, cache_dir=tmp_path, progress=False)
    assert (got["status"] == "done").all(), got["error"].to_list()
    for p in got["path"].unique().to_list():
        hdus = scan_fits(p)  # the file's own format decides what it must hold
        assert required_hdus(hdus) == spherex.R7_HDU_NAMES
        assert "PSF" not in [h.name for h in hdus]
    bad = str(tmp_path / "cut.fits")
    src = got["path"][0]
    with open(src, "rb") as f:
        data = f.read()
    epsf = next(h for h in scan_fits(src) if h.name == "EPSF")
    with open(bad, "wb") as f:  # stream closed inside the EPSF table: WCS-WAVE missing
        f.write(data[:epsf.data_offset + 2880])
    with pytest.raises(FileFormatError):
        scan_fits(bad)
    assert not CacheDir(tmp_path).is_verified(bad)
    ph = spxframe.measure(got, cat, cache_dir=tmp_path)
    assert ph.height == got.height and ph["flux"].is_finite().all()
    assert (ph["gain_factor"] == 1.0).all() and (ph["wave_source"] == "wcs-wave").all()


def test_listing_highest_token_per_detector():
    """The newest product per detector: version first, then year-day; a reissue for one detector
    only wins for that detector."""
    fam = "l3_flux_corrections"
    rows = [f"cal-flxc-v1-2026-191/{d}/{fam}_D{d}_spx_cal-flxc-v1-2026-191.fits" for d in (1, 2, 3)]
    rows += [f"cal-flxc-v2-2025-001/3/{fam}_D3_spx_cal-flxc-v2-2025-001.fits",
             f"cal-flxc-v1-2026-200/2/{fam}_D2_spx_cal-flxc-v1-2026-200.fits", "not a product"]
    got = latest_names("\n".join(json.dumps({"name": r}) if r[0] == "c" else r for r in rows))
    assert {d: n.split("/")[0] for d, n in got.items()} == {1: "cal-flxc-v1-2026-191", 2: "cal-flxc-v1-2026-200",
                                                            3: "cal-flxc-v2-2025-001"}


def test_gain_correction_on_qr2_files_only(deep_obs, sky, tmp_path):
    """measure(calibration=...) multiplies QR2 pixels by the product's factor (a folder or a
    mapping give the same rows); R7 files are never corrected; the product is fetched once."""
    universe, arc = sky
    cat, obs = deep_obs
    pick = pl.concat([obs.filter((pl.col("release") == r) & (pl.col("detector") == 1)).head(2) for r in ("qr2", "qr3")])
    got = fetch(plan(cat, pick, cutout_size="64px", access="cutout", archive=arc).manifest, cache_dir=tmp_path,
                progress=False)
    assert (got["status"] == "done").all()
    prod = fetch_products([1], base_url=arc.url, cache=tmp_path)
    assert prod.bytes > 0 and set(prod.paths) == {1}
    arc.clear_log()
    assert fetch_products([1], base_url=arc.url, cache=tmp_path).bytes == 0  # cached: once per detector
    assert arc.log == []  # not even the listing is asked again
    key = ["obs_id", "detector", "source_id"]
    raw = spxframe.measure(got, cat, cache_dir=tmp_path).sort(key)
    cor = spxframe.measure(got, cat, cache_dir=tmp_path, calibration=str(tmp_path / "cal")).sort(key)
    byfile = spxframe.measure(got, cat, cache_dir=tmp_path, calibration={1: prod.paths[1]}).sort(key)
    assert cor.select("flux", "gain_factor").equals(byfile.select("flux", "gain_factor"))
    r7 = cor["file"].str.contains("|".join(pick.filter(pl.col("release") == "qr3")["obs_id"].to_list()))
    assert (cor.filter(r7)["gain_factor"] == 1.0).all()
    assert np.array_equal(cor.filter(r7)["flux"].to_numpy(), raw.filter(r7)["flux"].to_numpy())
    g = cor.filter(~r7)["gain_factor"].to_numpy()
    assert (g < 0.99).all()  # D1 pre-R7 gains are a few % off
    ratio = cor.filter(~r7)["flux"].to_numpy() / raw.filter(~r7)["flux"].to_numpy()
    np.testing.assert_allclose(ratio, g, rtol=0.01)
    f2 = (cor.filter(~r7)["flux_err"] / raw.filter(~r7)["flux_err"]).to_numpy()
    assert (np.abs(f2 - g) < 0.02).all()


def _accuracy(universe, ph: pl.DataFrame) -> pl.DataFrame:
    good = ph.filter(schema.good_mask(ph))
    truth = universe.truth_flux(good["source_id"].to_numpy(), good["wavelength"].to_numpy(), good["mjd"].to_numpy())
    return good.with_columns(pl.Series("truth", truth)).with_columns(
        (pl.col("flux") / pl.col("truth")).alias("ratio"),
        ((pl.col("flux") - pl.col("truth")) / pl.col("flux_err")).alias("pull"))


@pytest.mark.slow
def test_lightcurves_across_both_releases(sky, tmp_path):
    """Done-when of issue 13: rows from both releases, each in its own time span; per release the
    median flux/truth of bright measurements within 1 % and the pull width 0.85-1.15; continuous
    across 2026-07-20 within 1 %; without the gain correction the QR2 D1 fluxes are visibly off."""
    universe, arc = sky
    cat = _catalog(universe)
    ph = spxframe.lightcurves(cat, "64px", archive=arc, output_dir=tmp_path / "on", progress=False, plots=0)
    acc = _accuracy(universe, ph)
    span = acc.group_by("release").agg(pl.col("mjd").min().alias("lo"), pl.col("mjd").max().alias("hi"))
    span = {r: (lo, hi) for r, lo, hi in span.iter_rows()}
    assert set(span) == {"qr2", "qr3"} and span["qr2"][1] < BOUNDARY_MJD <= span["qr3"][0]
    bright = acc.filter(pl.col("flux") / pl.col("flux_err") > 20)
    for rel in ("qr2", "qr3"):
        b = bright.filter(pl.col("release") == rel)
        assert b.height > 50, rel
        assert abs(b["ratio"].median() - 1) < 0.01, rel
        p = b["pull"].to_numpy()
        width = (np.percentile(p, 84.135) - np.percentile(p, 15.865)) / 2
        assert 0.85 < width < 1.15, (rel, width)
    per_src = bright.group_by("source_id", "release").agg(pl.col("ratio").median()) \
        .pivot(on="release", index="source_id", values="ratio").drop_nulls()
    assert per_src.height >= 3
    assert abs((per_src["qr3"] / per_src["qr2"]).median() - 1) < 0.01
    run = json.loads((tmp_path / "on" / "run.json").read_text())
    assert run["parameters"]["gain_correction"] is True
    assert run["calibration"][0]["family"] == "l3_flux_corrections" and run["calibration"][0]["bytes"] > 0
    assert set(ph["release"].drop_nulls()) == {"qr2", "qr3"}

    off = spxframe.lightcurves(cat, "64px", archive=arc, output_dir=tmp_path / "off", cache_dir=tmp_path / "on",
                               progress=False, plots=0, gain_correction=False)
    d1 = _accuracy(universe, off).filter((pl.col("release") == "qr2") & (pl.col("band") == "D1")
                                         & (pl.col("flux") / pl.col("flux_err") > 20))
    assert d1.height > 10
    assert d1["ratio"].median() > 1.02  # pre-R7 D1 gains: QR2 = truth / f with f ~0.97
    assert (off["gain_factor"].drop_nans() == 1.0).all()


def test_rerun_sees_a_newly_readable_release(sky, tmp_path, monkeypatch):
    """An output folder written when only QR2 was read by default gets the QR3 rows on a rerun
    the same day once QR3 is read (the cached observations table does not hide them)."""
    universe, arc = sky
    cat = _catalog(universe, 1, ("deep_nep",))
    kw = dict(bands=["D1"], archive=arc, output_dir=tmp_path, progress=False, plots=0,
              cutout_size="64px")
    monkeypatch.setattr(spherex, "DEFAULT_RELEASES", ("qr2",))
    first = spxframe.lightcurves(cat, **kw)
    assert set(first["release"]) == {"qr2"}
    monkeypatch.undo()
    again = spxframe.lightcurves(cat, **kw)
    assert set(again["release"]) == {"qr2", "qr3"}
    assert again.filter(pl.col("release") == "qr3")["mjd"].min() >= BOUNDARY_MJD
