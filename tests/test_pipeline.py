"""lightcurves() end to end against the simulated archive: outputs, truth, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import spxframe
from spxframe import schema, spherex
from spxframe.errors import ArchiveUnreachable, InputError

TRANSFER_ENDPOINTS = {"ibe_file", "ibe_cutout", "cloud"}


def patch_catalog(universe, n: int, *, field: str | None = None) -> pl.DataFrame:
    """``n`` simulated sources nearest the centre of a wide field (they share images)."""
    src = universe.sources
    field = field or "wide_generic"  # ~32 visits: a deep-field patch would mean ~480 images per source
    cat = universe.catalog().join(src.select("source_id", "field", "var_class"), on="source_id")
    cat = cat.filter(pl.col("field") == field)
    ra0, dec0 = float(cat["ra"].median()), float(cat["dec"].median())
    d2 = ((cat["ra"] - ra0) * np.cos(np.radians(dec0))) ** 2 + (cat["dec"] - dec0) ** 2
    return cat.with_columns(d2.alias("_d")).sort("_d").head(n).drop("_d", "field")


def transfers(archive) -> list[dict]:
    return [r for r in archive.log if r.get("endpoint") in TRANSFER_ENDPOINTS]


@pytest.fixture(scope="module")
def cat(universe):
    return patch_catalog(universe, 60).with_columns(pl.lit("kept").alias("my_note"))


@pytest.fixture(scope="module")
def run(archive, cat, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    archive.clear_log()
    phot = spxframe.lightcurves(cat, "200px", archive=archive, output_dir=out, progress=False, plots=3)
    return {"out": out, "cat": cat, "phot": phot, "log": list(archive.log)}


@pytest.mark.slow
def test_outputs_written_with_units(run):
    out = run["out"]
    for name in ("observations.parquet", "manifest.parquet", "photometry.parquet", "run.json",
                 "results/query_summary.json", "plots/summary.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "plots").glob("source_*.png"))) == 3
    from spxframe.results import to_qtable, units_from_parquet

    units = units_from_parquet(out / "photometry.parquet")
    assert units["flux"] == "uJy" and units["wavelength"] == "um" and units["mjd"] == "d"
    qt = to_qtable(out)
    assert str(qt["flux"].unit) == "uJy"
    summary = json.loads((out / "results/query_summary.json").read_text())
    assert summary["total_size_gb"] > 0 and set(summary["band_sizes"]) == set(spherex.BANDS)
    assert summary["n_sources"] == run["cat"].height
    runinfo = json.loads((out / "run.json").read_text())
    assert runinfo["versions"]["spxframe"] == spxframe.__version__
    assert runinfo["parameters"]["cutout_size"] == "200,200px"
    assert runinfo["bytes_transferred_this_run"] > 0


@pytest.mark.slow
def test_one_row_per_planned_measurement(run):
    phot, out = run["phot"], run["out"]
    man = pl.read_parquet(out / "manifest.parquet")
    assert phot.height == man.height  # nothing lost: every planned (source, obs, det) has a row
    assert phot.select("source_id", "obs_id", "detector").is_unique().all()
    assert phot["source_id"].dtype == run["cat"]["source_id"].dtype  # the user's dtype is restored
    assert (phot["my_note"] == "kept").all()  # user columns ride along
    on_disk = pl.read_parquet(out / "photometry.parquet")
    assert on_disk.height == phot.height
    keys = on_disk.select("source_id", "mjd").rows()
    assert keys == sorted(keys)  # sorted by source, then time


@pytest.mark.slow
def test_fluxes_match_truth(run, universe):
    ok = run["phot"].filter(pl.col("flux").is_not_nan() & (pl.col("qc") & schema.QC["MASKED_FRACTION"] == 0))
    assert ok.height > 0.8 * run["phot"].height
    truth = universe.truth_flux(ok["source_id"].to_numpy(), ok["wavelength"].to_numpy(), ok["mjd"].to_numpy())
    flux, err = ok["flux"].to_numpy(), ok["flux_err"].to_numpy()
    clean = (ok["flags"].to_numpy() & spherex.DEFAULT_BAD_MASK) == 0
    pull = ((flux - truth) / err)[clean]
    med = np.median(pull)
    width = 1.4826 * np.median(np.abs(pull - med))
    assert abs(med) < 0.2 and 0.8 < width < 1.3, (med, width)
    bright = clean & (truth > 50 * err)
    if bright.sum() > 10:
        assert abs(np.median(flux[bright] / truth[bright]) - 1) < 0.02


@pytest.mark.slow
def test_rerun_makes_no_transfers(run, archive):
    archive.clear_log()
    again = spxframe.lightcurves(run["cat"], "200px", archive=archive, output_dir=run["out"], progress=False, plots=0)
    assert archive.log == [] or transfers(archive) == []
    assert not any(r.get("endpoint") == "tap" for r in archive.log)
    assert again.sort("source_id", "obs_id", "detector").equals(run["phot"].sort("source_id", "obs_id", "detector"))


@pytest.mark.slow
def test_new_photometry_options_remeasure_without_refetch(run, archive):
    archive.clear_log()
    wide = spxframe.lightcurves(run["cat"], "200px", archive=archive, output_dir=run["out"],
                                progress=False, plots=0, aperture_radius=3.0)
    assert transfers(archive) == []
    assert (wide["aperture_radius"].drop_nulls() == 3.0).all()
    # put the original back for the other tests of this module
    spxframe.lightcurves(run["cat"], "200px", archive=archive, output_dir=run["out"], progress=False, plots=0)


@pytest.mark.parametrize("bad, word", [
    (lambda c: c.drop("ra"), "ra"),
    (lambda c: c.rename({"source_id": "ID"}), "source_id"),
    (lambda c: c.with_columns(pl.when(pl.col("source_id") == pl.col("source_id").first())
                              .then(float("nan")).otherwise(pl.col("dec")).alias("dec")), "dec"),
    (lambda c: pl.concat([c, c.head(1)]), "duplicate"),
    (lambda c: c.head(0), "empty"),
])
def test_bad_input_fails_fast_without_traffic(cat, archive, tmp_path, bad, word):
    archive.clear_log()
    with pytest.raises(InputError) as exc:
        spxframe.lightcurves(bad(cat), "200px", archive=archive, output_dir=tmp_path, progress=False)
    assert word in str(exc.value).lower()
    assert archive.log == []


def test_bad_cutout_size_fails_fast(cat, archive, tmp_path):
    archive.clear_log()
    with pytest.raises(ValueError, match="size"):
        spxframe.lightcurves(cat, "-3px", archive=archive, output_dir=tmp_path, progress=False)
    assert archive.log == []


def test_unreachable_archive_is_a_clear_error(cat, tmp_path):
    with pytest.raises(ArchiveUnreachable) as exc:
        spxframe.lightcurves(cat.head(3), "200px", archive="http://127.0.0.1:9", output_dir=tmp_path,
                             progress=False)
    assert "127.0.0.1:9" in str(exc.value)


@pytest.mark.slow
def test_interrupted_run_completes_with_identical_results(archive, universe, tmp_path):
    cat = patch_catalog(universe, 10)
    cat_path = tmp_path / "cat.parquet"
    cat.write_parquet(cat_path)
    ref = spxframe.lightcurves(cat, "200px", archive=archive, output_dir=tmp_path / "ref",
                               progress=False, plots=0, cell_order=10)
    out = tmp_path / "killed"
    code = (f"import spxframe, polars as pl; spxframe.lightcurves(pl.read_parquet({str(cat_path)!r}), '200px', "
            f"archive={archive.url!r}, output_dir={str(out)!r}, progress=False, plots=0, cell_order=10)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "parts" / "cells").glob("*.json"))) >= 1:
            break  # killed after its first cell, in the middle of the next one
        time.sleep(0.02)
    killed_mid_run = proc.poll() is None
    proc.kill()
    proc.wait()
    assert killed_mid_run, "the run finished before it could be interrupted"
    again = spxframe.lightcurves(cat, "200px", archive=archive, output_dir=out, progress=False, plots=0,
                                 cell_order=10)
    cols = [c for c in ref.columns if c != "file"]
    a = ref.select(cols).sort("source_id", "obs_id", "detector")
    b = again.select(cols).sort("source_id", "obs_id", "detector")
    assert a.equals(b)
    assert not list(out.rglob("*.part"))  # no partial file survived into a finished run


@pytest.mark.slow
def test_output_to_fsspec_url_with_separate_cache(run, archive):
    """output_dir as an fsspec URL, files cached in another (local) folder: same rows and values,
    nothing refetched that the cache holds, and a rerun resumes from the URL's parts."""
    url = f"memory://spx-{os.getpid()}/run"
    archive.clear_log()
    phot = spxframe.lightcurves(run["cat"], "200px", archive=archive, output_dir=url, cache_dir=run["out"],
                                progress=False, plots=2)
    assert transfers(archive) == []  # every file was already in cache_dir
    cols = [c for c in phot.columns if c != "file"]
    assert phot.select(cols).sort("source_id", "obs_id", "detector").equals(
        run["phot"].select(cols).sort("source_id", "obs_id", "detector"))
    back = spxframe.read(url)
    assert back.equals(phot)
    one = phot["source_id"][0]
    lazy = spxframe.read(url, lazy=True).filter(pl.col("source_id") == one).collect()
    assert lazy.equals(phot.filter(pl.col("source_id") == one))
    from spxframe.results import to_qtable
    assert len(to_qtable(f"{url}/photometry.parquet")) == phot.height
    assert spxframe.read(url, table="manifest").height == phot.height
    import fsspec
    fs = fsspec.filesystem("memory")
    names = {p.rsplit("/", 1)[-1] for p in fs.find(url)}
    assert {"photometry.parquet", "manifest.parquet", "observations.parquet", "run.json", "summary.png"} <= names
    assert not any(n.endswith(".part") for n in names)
    assert json.loads(fs.cat_file(f"{url}/run.json"))["counts"]["measurements"] == phot.height
    assert not (Path(run["out"]) / "summary.png").exists()
    archive.clear_log()
    spxframe.lightcurves(run["cat"], "200px", archive=archive, output_dir=url, cache_dir=run["out"],
                         progress=False, plots=0)
    assert archive.log == []  # observations and every cell reused from the URL


def test_cache_dir_must_be_local(cat, archive):
    archive.clear_log()
    with pytest.raises(InputError, match="cache_dir"):
        spxframe.lightcurves(cat, "200px", archive=archive, output_dir="memory://x/y",
                             cache_dir="memory://x/cache", progress=False)
    assert archive.log == []


@pytest.mark.slow
def test_photometry_file_keeps_each_source_contiguous_and_in_time_order(run):
    """The streaming merge writes cell by cell: each source's rows are one block, in time order."""
    import pyarrow.parquet as pq

    path = Path(run["out"]) / "photometry.parquet"
    df = pl.read_parquet(path)
    ids = df["source_id"].to_list()
    starts = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    assert len(starts) == df["source_id"].n_unique()  # no source appears in two blocks
    per = df.group_by("source_id", maintain_order=True).agg(pl.col("mjd"))
    assert all(np.all(np.diff(np.array(m)) >= 0) for m in per["mjd"].to_list())
    meta = pq.read_schema(path).metadata
    assert json.loads(meta[b"spxframe"])["columns"]["flux"]["unit"] == "uJy"


@pytest.mark.slow
def test_rerun_with_more_sources_in_a_done_cell_measures_them(archive, universe, tmp_path):
    """A cell marked done for 3 sources is not 'done' for 5: the 2 new sources get their rows."""
    few, more = patch_catalog(universe, 3), patch_catalog(universe, 5)
    kw = dict(archive=archive, output_dir=tmp_path, progress=False, plots=0, bands=["D1"])
    a = spxframe.lightcurves(few, "64px", **kw)
    b = spxframe.lightcurves(more, "64px", **kw)
    assert set(b["source_id"]) == set(more["source_id"])
    assert b.filter(pl.col("source_id").is_in(few["source_id"].implode())).sort("source_id", "obs_id").equals(
        a.sort("source_id", "obs_id"))
    c = spxframe.lightcurves(more, "64px", **{**kw, "bands": ["D1", "D2"]})  # a changed query re-runs too
    assert set(c["band"]) == {"D1", "D2"} and c.height > b.height


def test_read_reports_missing_run_without_creating_it(tmp_path):
    with pytest.raises(InputError, match="output_dir"):
        spxframe.read(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


def test_observations_are_queried_again_when_a_day_old_or_on_refresh(archive, cat, tmp_path):
    """The archive adds data weekly: a rerun reuses the observations table for a day, not forever."""
    kw = dict(archive=archive, output_dir=tmp_path, progress=False, plots=0, time=(60000.0, 60001.0))
    first = spxframe.lightcurves(cat.head(2), "64px", **kw)  # before the mission: no images, no pixels
    assert first.height == 0

    def tap_queries():
        return [r for r in archive.log if r.get("endpoint") == "tap"]

    archive.clear_log()
    spxframe.lightcurves(cat.head(2), "64px", **kw)
    assert tap_queries() == []  # fresh: reused
    spxframe.lightcurves(cat.head(2), "64px", refresh=True, **kw)
    assert tap_queries()  # refresh=True asks the archive again
    state_path = tmp_path / "parts" / "observations.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "queried_at": state["queried_at"] - 2 * 86400}))
    archive.clear_log()
    spxframe.lightcurves(cat.head(2), "64px", **kw)
    assert tap_queries()  # two days old: asked again
    assert json.loads((tmp_path / "run.json").read_text())["parameters"]["releases"] is None


@pytest.mark.parametrize("kw, option", [
    ({"aperture_radius": -1}, "aperture_radius"),
    ({"aperture_radius": 7.0}, "aperture_radius"),
    ({"max_concurrency": 0}, "max_concurrency"),
    ({"cell_order": 40}, "cell_order"),
    ({"cutout_center": "nonsense"}, "cutout_center"),
    ({"bad_bits": [21]}, "bad_bits"),
    ({"releases": ["qr2"], "collection": "spherex_qr2"}, "releases"),
])
def test_every_option_is_checked_before_any_traffic(cat, archive, tmp_path, kw, option):
    archive.clear_log()
    with pytest.raises(InputError, match=option):
        spxframe.lightcurves(cat, "200px", archive=archive, output_dir=tmp_path, progress=False, **kw)
    assert archive.log == []


def test_output_dir_that_is_a_file_is_refused(cat, archive, tmp_path):
    f = tmp_path / "not_a_folder"
    f.write_text("x")
    archive.clear_log()
    with pytest.raises(InputError, match="output_dir"):
        spxframe.lightcurves(cat, "200px", archive=archive, output_dir=f, progress=False)
    assert archive.log == []


@pytest.mark.slow
def test_the_run_measures_its_link_and_the_next_plan_uses_it(run, cat, archive):
    """The fetch's bytes/s and per-request time go to cache/link.json; the next plan of this cache
    assumes that link (run.json says which), not the documented defaults."""
    from spxframe.planner.cost import CostModel

    out = run["out"]
    measured = json.loads((out / "link.json").read_text())  # (a rerun that moved nothing keeps it)
    assert measured["bytes"] > 20e6 and measured["bandwidth_Bps"] > 0 and measured["request_s"] > 0
    assert (measured["bandwidth_Bps"], measured["request_s"]) != (CostModel().bandwidth_Bps, CostModel().request_s)
    dry = out / "dry"
    spxframe.lightcurves(cat.head(5), "200px", archive=archive, output_dir=dry, cache_dir=out, progress=False,
                         dry_run=True)
    assumed = json.loads((dry / "run.json").read_text())["parameters"]["link_assumed"]
    assert assumed == {"bandwidth_Bps": measured["bandwidth_Bps"], "request_s": measured["request_s"]}
