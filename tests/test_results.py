"""A run's results in the tools astronomers use: right times, units astropy reads, errors naming
wrong ids, the good-data mask, the lightkurve bridge, per-band plots and the CSV export.

Fast tests use photometry tables made directly in the photometry schema (times made by the
pipeline's own barycentric correction); the ``slow`` ones read a small real run.
"""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pytest

from spxframe import schema, spherex
from spxframe.errors import InputError
from spxframe.photometry.forced import bjd_tdb
from spxframe.results import (
    Q_BAD_FLAGS,
    Q_NO_FLUX,
    astropy_meta,
    clean_cache,
    export_csv,
    good_mask,
    quality,
    source_view,
    to_lightcurve,
    to_qtable,
    to_timeseries,
)
from spxframe.store import Store

HARD = 1 << 10  # HOT: a hard-bad FLAGS bit
SOFT = 1 << 21  # SOURCE: informational, never bad


def make_phot(ids=(7, 8)) -> pl.DataFrame:
    """Two seasons (~180 d apart) of D1 and D4 visits per source, every kind of row included."""
    rng = np.random.default_rng(3)
    rows = []
    for sid in ids:
        for k, mjd in enumerate([60844.0, 60844.5, 60852.2, 61029.6, 61036.7]):
            for det, band in ((1, "D1"), (4, "D4")):
                lo, hi, _ = spherex.BANDS[band]
                rows.append(dict(source_id=sid, obs_id=f"2025W{k:02d}_1B_0001_1", detector=det, band=band,
                                 mjd=mjd + 0.001 * det, wavelength=lo + (hi - lo) * (k + 0.5) / 5,
                                 bandwidth=0.02, flux=float(rng.normal(100, 10)), flux_err=5.0, flags=SOFT, qc=0,
                                 ra=213.9, dec=11.4))
    df = pl.DataFrame(rows)
    df = df.with_columns(
        pl.Series("bjd_tdb", bjd_tdb(df["mjd"].to_numpy(), df["ra"].to_numpy(), df["dec"].to_numpy(),
                                     np.full((df.height, 3), np.nan))),
        (pl.col("flux") / pl.col("flux_err")).alias("snr"))
    return schema.conform(df, schema.PHOTOMETRY)


def mark(df: pl.DataFrame, i: int, **values) -> pl.DataFrame:
    """``df`` with row ``i``'s columns set to ``values``."""
    idx = pl.int_range(pl.len())
    return df.with_columns(*(pl.when(idx == i).then(pl.lit(v, dtype=df.schema[k])).otherwise(pl.col(k)).alias(k)
                             for k, v in values.items()))


@pytest.fixture
def phot() -> pl.DataFrame:
    df = make_phot()
    df = mark(df, 0, flux=-12.0)  # negative flux: data
    df = mark(df, 1, flux=0.0, qc=schema.QC["NONPOSITIVE_FLUX"])  # zero flux: data
    df = mark(df, 2, flags=SOFT | HARD)  # a hard-bad FLAGS bit in the aperture
    df = mark(df, 3, qc=schema.QC["SATURATED"])  # unusable
    df = mark(df, 4, flux=float("nan"), qc=schema.QC["OFF_FILE"])  # no flux
    df = mark(df, 5, qc=schema.QC["APERTURE_EDGE"] | schema.QC["NAN_VARIANCE"])  # soft: good
    df = mark(df, 6, flags=SOFT | (1 << 1))  # OVERFLOW alone is optional-bad, not hard-bad
    return df


# ------------------------------------------------------------------------------------------------
# times
# ------------------------------------------------------------------------------------------------


def test_timeseries_times_equal_the_mjd_within_the_barycentric_correction(phot):
    ts = to_timeseries(phot, source_id=7)
    assert ts.time.scale == "tdb"
    mjd = np.asarray(ts["mjd"].value)
    assert np.all(np.abs(ts.time.mjd - mjd) < 0.01)  # |BJD_TDB - JD_UTC| < 0.01 d
    assert np.any(np.abs(ts.time.mjd - mjd) > 1e-4)  # and it is a barycentric time, not the MJD copied
    utc = to_timeseries(phot, source_id=7, time_column="mjd")
    assert utc.time.scale == "utc"
    assert np.allclose(utc.time.mjd, mjd, rtol=0, atol=1e-9)
    assert np.all(np.abs(utc.time.tdb.jd - np.asarray(utc["bjd_tdb"].value)) < 0.01)


def test_timeseries_keeps_every_row_with_the_mask_as_columns(phot):
    ts = to_timeseries(phot, source_id=7)
    assert len(ts) == phot.filter(pl.col("source_id") == 7).height
    assert {"quality", "good", "channel"} <= set(ts.colnames)
    assert str(ts["flux"].unit) == "uJy"
    assert int(np.sum(~np.asarray(ts["good"]))) == 3  # hard-bad FLAGS, saturated, no flux


# ------------------------------------------------------------------------------------------------
# wrong ids
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda p, s: to_timeseries(p, source_id=s),
    lambda p, s: to_lightcurve(p, s),
    lambda p, s: source_view(p, s),
    lambda p, s: __import__("spxframe.plot", fromlist=["plot_source"]).plot_source(p, s),
], ids=["to_timeseries", "to_lightcurve", "source_view", "plot_source"])
def test_unknown_source_id_is_an_error_naming_it(phot, call):
    with pytest.raises(InputError, match="424242"):
        call(phot, 424242)
    with pytest.raises(InputError, match="not-an-id"):
        call(phot, "not-an-id")


def test_text_id_of_an_integer_table_finds_the_source(phot):
    assert len(to_timeseries(phot, source_id="8")) == phot.filter(pl.col("source_id") == 8).height


# ------------------------------------------------------------------------------------------------
# the good-data mask
# ------------------------------------------------------------------------------------------------


def test_good_data_mask(phot):
    good, q = good_mask(phot), quality(phot)
    assert good[0] and good[1], "zero and negative fluxes are data"
    assert not good[2] and q[2] & Q_BAD_FLAGS
    assert not good[3] and q[3] & schema.QC["SATURATED"]
    assert not good[4] and q[4] & Q_NO_FLUX and q[4] & schema.QC["OFF_FILE"]
    assert good[5], "soft qc bits (aperture edge, NaN variance) are not bad data"
    assert good[6], "OVERFLOW alone is not a hard-bad bit"
    assert good[7:].all()
    assert quality(phot, bad_flags=spherex.bits_to_mask({1}))[6] & Q_BAD_FLAGS


# ------------------------------------------------------------------------------------------------
# units astropy reads
# ------------------------------------------------------------------------------------------------


def test_astropy_reads_the_units_of_a_parquet_written_with_astropy_meta(phot, tmp_path):
    import pyarrow.parquet as pq
    from astropy.table import QTable

    tab = phot.with_columns(pl.lit("kept").alias("my_note")).to_arrow()
    meta = {**schema.parquet_metadata(schema.PHOTOMETRY), **astropy_meta(tab, schema.PHOTOMETRY)}
    pq.write_table(tab.replace_schema_metadata(meta), tmp_path / "photometry.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "table::len" guessing
        qt = QTable.read(tmp_path / "photometry.parquet")
    units = {name: str(qt[name].unit) for name in ("flux", "flux_err", "wavelength", "mjd", "bjd_tdb", "ra")}
    assert units == {"flux": "uJy", "flux_err": "uJy", "wavelength": "um", "mjd": "d", "bjd_tdb": "d", "ra": "deg"}
    assert qt["flux"].info.description.startswith("total point-source flux")
    assert list(qt["my_note"]) == ["kept"] * len(qt) and list(qt["band"][:2]) == ["D1", "D4"]


# ------------------------------------------------------------------------------------------------
# the lightkurve bridge
# ------------------------------------------------------------------------------------------------


def test_lightkurve_bridge(phot):
    lk = pytest.importorskip("lightkurve")
    lc = to_lightcurve(phot, 7)
    mine = phot.filter(pl.col("source_id") == 7)
    assert isinstance(lc, lk.LightCurve) and len(lc) == mine.height  # every row, all bands
    assert str(lc.flux.unit) == "uJy" and str(lc["wavelength"].unit) == "um"
    assert set(lc["band"]) == {"D1", "D4"}
    assert np.all(np.abs(lc.time.mjd - lc["mjd"].value) < 0.01) and lc.time.scale == "tdb"
    q = np.asarray(lc.quality)
    assert (q != 0).sum() == 3 and list(np.asarray(lc["good"])) == list(q == 0)
    d4 = to_lightcurve(phot, 7, band="D4")
    assert set(d4["band"]) == {"D4"} and len(d4) == mine.filter(pl.col("band") == "D4").height
    ch = int(spherex.channel_of("D4", d4["wavelength"].value[0]))
    one = to_lightcurve(phot, 7, band="D4", channel=ch)
    assert 0 < len(one) < len(d4) and set(np.asarray(one["channel"])) == {ch}
    with pytest.raises(InputError, match="band"):
        to_lightcurve(phot, 7, band="D9")
    with pytest.raises(InputError, match="channel"):
        to_lightcurve(phot, 7, band="D1", channel=17)


# ------------------------------------------------------------------------------------------------
# plots by wavelength
# ------------------------------------------------------------------------------------------------


def test_plot_is_per_band_with_a_broken_time_axis_and_explained_markers(phot):
    from spxframe.plot import plot_source

    fig = plot_source(phot, 7)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "D1 flux [µJy]" in labels and "D4 flux [µJy]" in labels
    lc_axes = [ax for ax in fig.axes if ax.get_ylabel() in ("D1 flux [µJy]", "D4 flux [µJy]")]
    assert len(fig.axes[0].get_shared_y_axes().get_siblings(fig.axes[0])) == 2  # two seasons: axis broken
    assert lc_axes[0].get_xlim()[1] - lc_axes[0].get_xlim()[0] < 60
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "good (7)" in legend and "hard-bad FLAGS" in legend and "(1)" in legend and "without a flux" in legend
    one = plot_source(phot, 7, bands=["D4"], channel=2, spectrum=False)
    assert [ax.get_ylabel() for ax in one.axes if "flux" in ax.get_ylabel()] == ["D4 flux [µJy]"]
    assert "good (1)" in " ".join(t.get_text() for t in one.legends[0].get_texts())  # one D4 visit in channel 2
    import matplotlib.pyplot as plt
    plt.close("all")


def test_plot_marks_where_the_release_changes(phot):
    """A light curve across QR2 and QR3 shows where the file format and calibration change."""
    from spxframe.plot import plot_source, release_starts

    two = phot.with_columns(pl.when(pl.col("mjd") > 61000).then(pl.lit("qr3")).otherwise(pl.lit("qr2"))
                            .alias("release"))
    assert release_starts(two.filter(pl.col("source_id") == 7)) == [(pytest.approx(61029.601), "QR3")]
    fig = plot_source(two, 7)
    marked = [ax for ax in fig.axes if any(ln.get_label() == "QR3 from here" for ln in ax.get_lines())]
    assert len(marked) == 2  # the D1 and D4 rows
    plain = plot_source(phot.with_columns(pl.lit("qr2").alias("release")), 7)
    assert not [ax for ax in plain.axes if any(ln.get_label() == "QR3 from here" for ln in ax.get_lines())]
    import matplotlib.pyplot as plt
    plt.close("all")


# ------------------------------------------------------------------------------------------------
# CSV export and the cache
# ------------------------------------------------------------------------------------------------


def test_csv_export_per_source_with_spxquery_columns(phot, tmp_path):
    Store(tmp_path).write_parquet("photometry.parquet", phot, schema.PHOTOMETRY)
    paths = export_csv(tmp_path)
    assert sorted(p.name for p in paths) == ["7.csv", "8.csv"]
    assert all(p.parent == tmp_path / "lightcurves" for p in paths)
    csv = pl.read_csv(tmp_path / "lightcurves" / "7.csv")
    assert csv.columns[:11] == ["obs_id", "mjd", "flux", "flux_error", "mag_ab", "mag_ab_error", "wavelength",
                                "bandwidth", "band", "flag", "snr"]
    mine = phot.filter(pl.col("source_id") == 7).sort("mjd", "detector")
    assert csv.height == mine.height  # every row, the bad ones flagged
    assert np.allclose(csv["mjd"].to_numpy(), mine["mjd"].to_numpy())
    assert np.allclose(csv["flux_error"].to_numpy(), mine["flux_err"].to_numpy())
    assert csv["good"].sum() == mine.height - 3
    other = export_csv(tmp_path, tmp_path / "elsewhere")
    assert {p.parent for p in other} == {tmp_path / "elsewhere"}


def test_clean_cache_deletes_fetched_files_only(phot, tmp_path):
    Store(tmp_path).write_parquet("photometry.parquet", phot, schema.PHOTOMETRY)
    (tmp_path / "data" / "D1").mkdir(parents=True)
    (tmp_path / "data" / "D1" / "x.fits").write_bytes(b"\0" * 5000)
    (tmp_path / "psf").mkdir()
    (tmp_path / "psf" / "D1_v.fits").write_bytes(b"\0" * 1000)
    removed, nbytes = clean_cache(tmp_path, dry_run=True)
    assert nbytes == 6000 and (tmp_path / "data").exists()
    removed, nbytes = clean_cache(tmp_path)
    assert nbytes == 6000 and not (tmp_path / "data").exists() and not (tmp_path / "psf").exists()
    assert (tmp_path / "photometry.parquet").is_file()
    assert len(to_qtable(tmp_path)) == phot.height


# ------------------------------------------------------------------------------------------------
# a real run
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(archive, universe, tmp_path_factory):
    from test_pipeline import patch_catalog

    import spxframe

    out = tmp_path_factory.mktemp("small")
    spxframe.lightcurves(patch_catalog(universe, 3), "64px", archive=archive, output_dir=out, progress=False,
                         plots=0, bands=["D1", "D4"])
    return out


@pytest.mark.slow
def test_real_run_parquet_has_units_astropy_reads(small_run):
    from astropy.table import QTable

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qt = QTable.read(small_run / "photometry.parquet")
    assert str(qt["flux"].unit) == "uJy" and str(qt["wavelength"].unit) == "um"
    assert str(qt["mjd"].unit) == "d" and str(qt["ra"].unit) == "deg"


@pytest.mark.slow
def test_real_run_times_and_lightcurve(small_run):
    pytest.importorskip("lightkurve")
    phot = pl.read_parquet(small_run / "photometry.parquet")
    sid = phot["source_id"][0]
    ts = to_timeseries(small_run, source_id=sid)
    assert np.all(np.abs(ts.time.mjd - np.asarray(ts["mjd"].value)) < 0.01)
    lc = to_lightcurve(small_run, sid)
    assert len(lc) == phot.filter(pl.col("source_id") == sid).height
