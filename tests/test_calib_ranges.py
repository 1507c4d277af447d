"""Calibration products by byte ranges of the rows a run needs (issue 13: "fetch each product once
per detector per run, whole or by byte ranges of the boxes, whichever the cost model prefers, and
count its bytes").

- A few sources: the gain map (rows of each QR2 measurement's stamp) and the wavelength maps (rows
  around each source) come as ranges, far fewer bytes than the whole files, and photometry is
  identical to the run with whole products (fluxes, errors, gain factors, wavelengths, bit for bit).
- A dense field: the whole file is cheaper and is taken.
- A later run with new sources fetches only the rows the partial product lacks; a whole-file fetch
  replaces a partial one.
- A partial product is never trusted beyond the rows it lists: rows a fetch did not finish are not
  listed, and a measurement needing rows it lacks is not corrected (gain_factor 1.0) and takes the
  file's WCS-WAVE wavelengths, never an unfetched pixel.

All over real HTTP against the simulated archive (byte counts checked against the server's log).
"""

from __future__ import annotations

import json
import os

import numpy as np
import polars as pl
import pytest

import spxframe
from spxframe import spherex
from spxframe.fetcher import fetch
from spxframe.fetcher.calib import fetch_products
from spxframe.fetcher.calib_ranges import choose, read_rows_record, rows_file, rows_needed
from spxframe.fetcher.http import TransferError
from spxframe.fits.hdu import by_name, read_rows, scan_fits
from spxframe.photometry import gains as _gains
from spxframe.planner import plan
from spxframe.planner.cost import CostModel
from spxframe.schema import QC

KEY = ["obs_id", "detector", "source_id"]
GAIN, WAVE = spherex.GAIN_FAMILY, spherex.WAVE_FAMILY
HALF = 10  #: measure()'s stamp half-width with the default annulus (r_out 9 px)
COLS = ["flux", "flux_err", "gain_factor", "wavelength", "bandwidth", "x", "y"]


def _catalog(universe, field: str, n: int, skip: int = 0) -> pl.DataFrame:
    src = universe.sources.filter((pl.col("field") == field) & (pl.col("flux_2um") < 8000))
    return (src.sort("flux_2um", descending=True).slice(skip, n)
            .select("source_id", "ra", "dec", "pmra", "pmdec", "ref_epoch"))


def _needs(manifest: pl.DataFrame, obs: pl.DataFrame) -> dict[str, dict[int, list]]:
    """family -> detector -> row spans, as lightcurves() asks them: gains at QR2 stamps, wavelengths
    around every source."""
    qr2 = manifest.join(obs.filter(pl.col("release") == "qr2").select("obs_id", "detector").unique(),
                        on=["obs_id", "detector"], how="semi")
    return {GAIN: rows_needed(qr2, half=HALF), WAVE: rows_needed(manifest, half=0, point=True)}


def _products(arc, cache, needs=None, cost=None, families=(GAIN, WAVE), **kw):
    out = {}
    for fam in families:
        dets = sorted(needs[fam]) if needs else list(range(1, 7))
        out[fam] = fetch_products(dets, base_url=arc.url, cache=cache, family=fam, release="qr3",
                                  need=None if needs is None else needs[fam], cost=cost, **kw)
    return out


def _calibration(products) -> dict:
    return {fam: p.paths for fam, p in products.items()}


def _served(arc, family: str, since: int) -> int:
    """Bytes the archive sent for ``family`` product files after log entry ``since``."""
    return sum(e.get("bytes_sent") or 0 for e in arc.log[since:] if f"/{family}/" in e.get("path", "")
               and "/ibe/data/" in e.get("path", ""))


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    """Two pairs of isolated bright sources, their 64 px cutouts fetched, and the whole products."""
    from spxframe import sim

    universe = sim.Universe(seed=1, cache_strips=128)
    with sim.serve(universe=universe) as arc:
        a = _catalog(universe, "wide_generic", 2)
        b = _catalog(universe, "wide_generic", 2, skip=20)
        cache = tmp_path_factory.mktemp("cutouts")
        out = dict(universe=universe, arc=arc, cache=cache)
        for name, cat in (("a", a), ("b", b)):
            obs = spxframe.observations(cat, archive=arc)
            m = plan(cat, obs, cutout_size="64px", access="cutout", archive=arc).manifest
            got = fetch(m, cache_dir=cache, progress=False)
            assert (got["status"] == "done").all()
            out[name] = dict(cat=cat, obs=obs, manifest=m, got=got, needs=_needs(m, obs))
            assert "qr2" in set(obs["release"])
        whole = _products(arc, tmp_path_factory.mktemp("whole"))
        out["whole"] = whole
        out["cat"] = pl.concat([a, b])
        out["got"] = pl.concat([out["a"]["got"], out["b"]["got"]])
        out["ref"] = spxframe.measure(out["got"], out["cat"], cache_dir=cache,
                                      calibration=_calibration(whole)).sort(KEY)
        yield out


def _same(ph: pl.DataFrame, ref: pl.DataFrame) -> None:
    ref = ref.join(ph.select(KEY), on=KEY, how="semi").sort(KEY)
    ph = ph.sort(KEY)
    assert ph.select(KEY).equals(ref.select(KEY)) and ph.height > 0
    for c in COLS:
        np.testing.assert_array_equal(ph[c].to_numpy(), ref[c].to_numpy(), err_msg=c)
    assert ph["wave_source"].to_list() == ref["wave_source"].to_list()


def test_few_sources_take_ranges_and_measure_as_with_whole_products(sky, tmp_path):
    """Two isolated sources: both products come as row ranges (access 'ranges'), each moving
    under a fifth of the whole files' bytes (as counted by the archive too), and photometry with
    them is identical to photometry with the whole products."""
    arc, s = sky["arc"], sky["a"]
    since = len(arc.log)
    got = _products(arc, tmp_path, s["needs"], CostModel())
    for fam, p in got.items():
        whole = sky["whole"][fam]
        assert set(p.access.values()) == {"ranges"}, (fam, p.access)
        assert p.record()["access"] == {f"D{d}": "ranges" for d in p.paths}
        assert 0 < p.bytes < whole.bytes * len(p.paths) / 6 / 5, (fam, p.bytes, whole.bytes)
        assert p.bytes == _served(arc, fam, since)
        assert all(read_rows_record(path) for path in p.paths.values())  # partial products, rows listed
    ph = spxframe.measure(s["got"], s["cat"], cache_dir=sky["cache"], calibration=_calibration(got))
    _same(ph, sky["ref"])
    assert (ph["wave_source"] == "spectral_wcs").all()
    qr2 = ph.join(s["obs"].filter(pl.col("release") == "qr2").select("obs_id", "detector"),
                  on=["obs_id", "detector"], how="semi")
    assert qr2.height > 0 and (qr2["gain_factor"] != 1.0).all()  # corrected, from the fetched rows
    assert fetch_products(list(got[WAVE].paths), base_url=arc.url, cache=tmp_path, family=WAVE, release="qr3",
                          need=s["needs"][WAVE], cost=CostModel()).bytes == 0  # all there: nothing fetched


def test_dense_field_takes_the_whole_file(sky, tmp_path):
    """Eight sources of the deep field, seen on many images: their rows cover most of each
    detector, so the whole file is cheaper and is fetched (and kept as a whole, verified file)."""
    arc, universe = sky["arc"], sky["universe"]
    cat = _catalog(universe, "deep_nep", 8)
    obs = spxframe.observations(cat, archive=arc)
    needs = _needs(plan(cat, obs, cutout_size="64px", access="cutout").manifest, obs)
    det = max(needs[WAVE], key=lambda d: sum(b - a for a, b in needs[WAVE][d]))
    p = fetch_products([det], base_url=arc.url, cache=tmp_path, family=WAVE, release="qr3", need=needs[WAVE],
                       cost=CostModel())
    assert p.access == {det: "whole"} and p.bytes == sky["whole"][WAVE].bytes // 6
    assert read_rows_record(p.paths[det]) is None


def test_rows_not_fetched_are_never_used(sky, tmp_path):
    """A partial product holding only the detectors' first rows: no measurement of the sources
    (far from those rows) is gain-corrected (gain_factor 1.0, fluxes as without the product) nor
    takes wavelengths from the maps (WCS-WAVE, as without the product)."""
    arc, s = sky["arc"], sky["a"]
    top = {fam: {d: [(0, 4)] for d in need} for fam, need in s["needs"].items()}
    got = _products(arc, tmp_path, top, CostModel())
    assert all(set(p.access.values()) == {"ranges"} for p in got.values())
    ph = spxframe.measure(s["got"], s["cat"], cache_dir=sky["cache"], calibration=_calibration(got)).sort(KEY)
    bare = spxframe.measure(s["got"], s["cat"], cache_dir=sky["cache"]).sort(KEY)
    assert ph.select(KEY).equals(bare.select(KEY))
    assert (ph["gain_factor"] == 1.0).all() and (ph["wave_source"] == "wcs-wave").all()
    qr2 = ph.join(s["obs"].filter(pl.col("release") == "qr2").select("obs_id", "detector").unique(),
                  on=["obs_id", "detector"], how="semi")
    uncorrected = (ph["qc"] & QC["GAIN_UNCORRECTED"]) != 0
    assert uncorrected.sum() == qr2.height > 0  # said, not silent: every QR2 row carries the bit
    assert ((bare["qc"] & QC["GAIN_UNCORRECTED"]) == 0).all()  # no correction asked for: no bit
    for c in ("flux", "flux_err", "wavelength", "bandwidth"):
        np.testing.assert_array_equal(ph[c].to_numpy(), bare[c].to_numpy(), err_msg=c)
    assert np.isnan(_gains.load(got[GAIN].paths[min(got[GAIN].paths)])[100:]).all()


def test_second_run_fetches_only_the_missing_rows(sky, tmp_path):
    """A run for sources A leaves partial products; a run for A and B fetches only the rows B adds
    (no header read again: exactly rows × row bytes × HDUs), and B is then measured exactly as with
    the whole products. A whole-file fetch replaces the partial file (row list removed)."""
    arc, a, b = sky["arc"], sky["a"], sky["b"]
    _products(arc, tmp_path, a["needs"], CostModel())
    both = {fam: {d: a["needs"][fam].get(d, []) + b["needs"][fam].get(d, [])
                  for d in set(a["needs"][fam]) | set(b["needs"][fam])} for fam in (GAIN, WAVE)}
    expect = {}
    for fam, need in both.items():
        n_hdus = 1 if fam == GAIN else 2
        folder = tmp_path / "cal" / "qr3" / fam
        have = {d: read_rows_record(str(next(folder.glob(f"*_D{d}_*.fits")))) for d in a["needs"][fam]}
        expect[fam] = sum(sum(r1 - r0 for r0, r1 in choose(need[d], have.get(d) or [], n_hdus=n_hdus, cost=CostModel(),
                                                             whole_bytes=n_hdus * spherex.PLANE_BYTES) or [])
                          * spherex.ROW_BYTES * n_hdus for d in need if d in have)
    since = len(arc.log)
    got = _products(arc, tmp_path, both, CostModel())
    for fam, p in got.items():
        fresh = [d for d in both[fam] if d not in a["needs"][fam]]  # detectors only B uses: new partial files
        if not fresh:
            assert p.bytes == expect[fam] > 0, fam
        assert p.bytes == _served(arc, fam, since)
    ph = spxframe.measure(b["got"], b["cat"], cache_dir=sky["cache"], calibration=_calibration(got))
    _same(ph, sky["ref"])
    path = got[WAVE].paths[min(got[WAVE].paths)]
    whole = fetch_products([min(got[WAVE].paths)], base_url=arc.url, cache=tmp_path, family=WAVE, release="qr3")
    assert whole.access == {min(got[WAVE].paths): "whole"} and not os.path.exists(rows_file(path))
    with open(path, "rb") as f, open(sky["whole"][WAVE].paths[min(got[WAVE].paths)], "rb") as g:
        assert f.read() == g.read()


def test_interrupted_ranged_fetch_is_not_trusted(sky, tmp_path):
    """Range answers cut mid-body: the fetch fails, the rows it did not finish are not listed, every
    listed row holds the archive's bytes, and measurement uses no unlisted row; the next fetch
    completes the product and photometry equals the whole products'."""
    arc, s = sky["arc"], sky["a"]
    _products(arc, tmp_path, {WAVE: {d: [(0, 4)] for d in s["needs"][WAVE]}}, CostModel(), families=(WAVE,))
    f = arc.faults
    f.truncate_rate, f.endpoints, f.seed = 0.5, ("ibe_file",), 3
    try:
        with pytest.raises(TransferError):
            _products(arc, tmp_path, s["needs"], CostModel(), families=(WAVE,), retries=0)
    finally:
        f.truncate_rate, f.endpoints, f.seed = 0.0, None, 0
    folder = tmp_path / "cal" / "qr3" / WAVE
    partial = sorted(folder.glob("*.fits"))
    missing_any = False
    for path in partial:
        det = int(path.name.split("_D")[1][0])
        rows = read_rows_record(str(path))
        assert rows is not None
        need = rows_needed(s["manifest"], half=0, point=True)[det]
        missing_any |= any(not any(a <= r0 and r1 <= b for a, b in rows) for r0, r1 in need)
        hdus = by_name(scan_fits(path, required=("PRIMARY",)))
        ref = by_name(scan_fits(sky["whole"][WAVE].paths[det], required=("PRIMARY",)))
        with open(path, "rb") as fp, open(sky["whole"][WAVE].paths[det], "rb") as fr:
            for r0, r1 in rows:
                for name in spherex.WAVE_HDUS:
                    np.testing.assert_array_equal(read_rows(fp.fileno(), hdus[name], r0, r1),
                                                  read_rows(fr.fileno(), ref[name], r0, r1))
    assert missing_any  # the cut left rows unfetched (and unlisted)
    cal = {WAVE: {int(p.name.split("_D")[1][0]): str(p) for p in partial}}
    ph = spxframe.measure(s["got"], s["cat"], cache_dir=sky["cache"], calibration=cal)
    assert set(ph["wave_source"]) <= {"spectral_wcs", "wcs-wave"} and (ph["wave_source"] == "wcs-wave").any()
    got = _products(arc, tmp_path, s["needs"], CostModel())
    assert set(got[WAVE].access.values()) <= {"ranges", "cached"}
    _same(spxframe.measure(s["got"], s["cat"], cache_dir=sky["cache"], calibration=_calibration(got)), sky["ref"])


@pytest.mark.slow
def test_lightcurves_fetch_ranges_and_record_their_bytes(sky, tmp_path):
    """lightcurves() with two isolated sources: run.json records both products as fetched by
    ranges with the bytes the archive sent, and the light curves equal photometry with the
    whole products. The dry run before it predicted those bytes; one after it predicts none."""
    arc, s = sky["arc"], sky["a"]
    opts = dict(archive=arc, output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False,
                plots=0, access="cutout")
    before = spxframe.lightcurves(s["cat"], "64px", dry_run=True, **opts).totals["calibration"]
    since = len(arc.log)
    ph = spxframe.lightcurves(s["cat"], "64px", **opts)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    recs = {c["family"]: c for c in run["calibration"]}
    for fam in (GAIN, WAVE):
        assert set(recs[fam]["access"].values()) == {"ranges"}, recs[fam]
        assert recs[fam]["bytes"] == _served(arc, fam, since) > 0
    moved = sum(r["bytes"] for r in recs.values())
    assert before["products"] == sum(len(r["access"]) for r in recs.values())
    assert 0.8 * before["bytes"] < moved < 1.25 * before["bytes"], (moved, before)
    assert run["expected"]["calibration"] == before
    after = spxframe.lightcurves(s["cat"], "64px", dry_run=True, **opts).totals["calibration"]
    assert after["bytes"] == after["products"] == 0  # every row is cached now
    ref = sky["ref"].join(ph.select(KEY), on=KEY, how="semi")
    assert ref.height == ph.filter(pl.col("flux").is_not_null()).height
    _same(ph.join(ref.select(KEY), on=KEY, how="semi").select(ref.columns), ref)
