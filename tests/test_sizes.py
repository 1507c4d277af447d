"""Cutout size/center grammar (spxframe.sizes) and catalog normalisation (spxframe.catalog)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spxframe.catalog import normalize_catalog, restore_source_id, source_id_dtype
from spxframe.errors import InputError
from spxframe.sizes import CutoutCenter, CutoutSize, parse_cutout_center, parse_cutout_size


@pytest.mark.parametrize("text, pixels, irsa", [
    ("200px", (200, 200), "200,200px"),
    ("200pix", (200, 200), "200,200px"),
    ("200 pixels", (200, 200), "200,200px"),
    ("3arcmin", (29, 29), "3,3arcmin"),
    ("0.1", (59, 59), "0.1,0.1deg"),
    ("0.1d", (59, 59), "0.1,0.1deg"),
    ("0.1deg", (59, 59), "0.1,0.1deg"),
    ("200,400px", (200, 400), "200,400px"),
    ("2,5arcmin", (20, 49), "2,5arcmin"),
    ("60arcsec", (10, 10), "60,60arcsec"),
    ("0.001rad", (34, 34), "0.001,0.001rad"),
    (" 64 , 32 PX ", (64, 32), "64,32px"),
])
def test_size_examples(text, pixels, irsa):
    s = parse_cutout_size(text)
    assert s.pixels() == pixels
    assert str(s) == irsa
    assert parse_cutout_size(str(s)) == s  # IRSA's form parses back to the same size


def test_size_other_inputs():
    assert parse_cutout_size(200) == CutoutSize(200, 200, "px")
    assert parse_cutout_size((100, 50)).pixels() == (100, 50)
    s = CutoutSize(10, 10, "arcmin")
    assert parse_cutout_size(s) is s
    assert parse_cutout_size("1arcmin").pixels(scale_arcsec=6.0) == (10, 10)


@pytest.mark.parametrize("text, words", [
    ("0px", "positive"), ("-100px", "positive"), ("0,10px", "positive"), ("nan", "finite"),
    ("inf px", "finite"), ("1e999px", "finite"), ("5000px", "larger than"), ("2041,10px", "larger than"),
    ("200furlongs", "unknown unit"), ("abc", "malformed"), ("1,2,3px", "malformed"), ("", "malformed"),
    ("px", "malformed"), ("20 0px", "malformed"), ("4deg", "larger than"),
])
def test_size_errors(text, words):
    with pytest.raises(ValueError, match=words):
        parse_cutout_size(text)


def test_size_full_detector_warns():
    with pytest.warns(UserWarning, match="full"):
        assert parse_cutout_size("2040px").pixels() == (2040, 2040)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_cutout_size("2039,2040px")


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 2040), h=st.integers(1, 2040), unit=st.sampled_from(["px", "pix", "pixels"]))
def test_size_pixels_roundtrip(w, h, unit):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = parse_cutout_size(f"{w},{h}{unit}")
        assert s.pixels() == (w, h)
        assert parse_cutout_size(str(s)) == s


@settings(max_examples=200, deadline=None)
@given(v=st.floats(0.5, 200.0), unit=st.sampled_from(["arcsec", "arcmin", "deg", "d", "rad", ""]))
def test_size_angular_round_half_up(v, unit):
    per_deg = {"arcsec": 1 / 3600, "arcmin": 1 / 60, "deg": 1.0, "d": 1.0, "rad": 180 / math.pi, "": 1.0}[unit]
    npx = v * per_deg * 3600 / 6.15
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if npx > 2040.4:
            with pytest.raises(ValueError, match="larger than"):
                parse_cutout_size(f"{v!r}{unit}")
            return
        s = parse_cutout_size(f"{v!r}{unit}")
    nx, ny = s.pixels()
    assert nx == ny and nx >= 1 and abs(nx - max(npx, 1)) <= 0.5 + 1e-9
    assert parse_cutout_size(str(s)).pixels() == (nx, ny)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=12))
def test_size_garbage_is_valueerror(text):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = parse_cutout_size(text)
    except ValueError:
        return
    assert 1 <= min(s.pixels()) and max(s.pixels()) <= 2040


@pytest.mark.parametrize("text, expect", [
    ("304.7,42.5", CutoutCenter(304.7, 42.5)), ("304.7,42.5deg", CutoutCenter(304.7, 42.5)),
    ("10,10d", CutoutCenter(10, 10)), ("-10,-20", CutoutCenter(350, -20)), ("370,0", CutoutCenter(10, 0)),
    ("1020,1020px", CutoutCenter(1020, 1020, True)), ("300.5,120pix", CutoutCenter(300.5, 120, True)),
    ("60,30arcmin", CutoutCenter(1.0, 0.5)),
])
def test_center_examples(text, expect):
    c = parse_cutout_center(text)
    assert c.pixel == expect.pixel and c.a == pytest.approx(expect.a) and c.b == pytest.approx(expect.b)


def test_center_rad_and_str():
    c = parse_cutout_center("3.141,1.56rad")
    assert c.ra == pytest.approx(np.degrees(3.141)) and c.dec == pytest.approx(np.degrees(1.56))
    assert str(parse_cutout_center("10.5,-3")) == "10.5,-3"
    assert str(parse_cutout_center("1020,1020px")) == "1020,1020px"
    with pytest.raises(AttributeError):
        _ = parse_cutout_center("1,2px").ra


@pytest.mark.parametrize("text, words", [
    ("10,95", r"outside \[-90, 90\]"), ("10,-90.5", "outside"), ("2,1.6rad", "outside"), ("10", "two values"),
    ("a,b", "malformed"), ("1,2parsec", "unknown unit"), ("nan,1", "finite"),
])
def test_center_errors(text, words):
    with pytest.raises(ValueError, match=words):
        parse_cutout_center(text)


@settings(max_examples=200, deadline=None)
@given(ra=st.floats(-720, 720), dec=st.floats(-90, 90))
def test_center_ra_wraps(ra, dec):
    c = parse_cutout_center(f"{ra!r},{dec!r}")
    assert 0 <= c.ra < 360 and c.dec == dec
    assert math.isclose((c.ra - ra) % 360, 0, abs_tol=1e-9) or math.isclose((c.ra - ra) % 360, 360, abs_tol=1e-9)


# ------------------------------------------------------------------ catalog


def _cat(**kw):
    base = {"source_id": [1, 2, 3], "ra": [10.0, 20.0, 30.0], "dec": [0.0, 10.0, -10.0]}
    base.update(kw)
    return base


def test_catalog_inputs_agree(tmp_path):
    import pandas as pd
    from astropy.table import Table

    ref = normalize_catalog(pl.DataFrame(_cat(mag=[1.0, 2.0, 3.0])))
    pl.DataFrame(_cat(mag=[1.0, 2.0, 3.0])).write_parquet(tmp_path / "c.parquet")
    pl.DataFrame(_cat(mag=[1.0, 2.0, 3.0])).write_csv(tmp_path / "c.csv")
    for other in (pd.DataFrame(_cat(mag=[1.0, 2.0, 3.0])), Table(_cat(mag=[1.0, 2.0, 3.0])),
                  tmp_path / "c.parquet", str(tmp_path / "c.csv"), _cat(mag=[1.0, 2.0, 3.0])):
        got = normalize_catalog(other)
        assert got.equals(ref), type(other)
    assert ref.columns == ["source_id", "ra", "dec", "mag"]  # user columns ride along


def test_catalog_ids_exact_and_restorable():
    big = [2**62 + 1, 2**62 + 3, 5]
    cat = normalize_catalog(pl.DataFrame(_cat(source_id=big)))
    assert cat["source_id"].to_list() == big and source_id_dtype(cat) == pl.Int64
    text = cat.with_columns(pl.col("source_id").cast(pl.Utf8))
    assert restore_source_id(text, source_id_dtype(cat))["source_id"].to_list() == big
    s = normalize_catalog(pl.DataFrame(_cat(source_id=["a", "b", "Gaia DR3 1"])))
    assert source_id_dtype(s) == pl.Utf8


def test_catalog_wraps_ra_and_defaults_epoch():
    cat = normalize_catalog(pl.DataFrame(_cat(ra=[-1.0, 360.0, 725.0], pmra=[1.0, None, 2.0], pmdec=[0.0, 0.0, 1.0])))
    assert cat["ra"].to_list() == pytest.approx([359.0, 0.0, 5.0])
    assert cat["pmra"].to_list() == [1.0, 0.0, 2.0] and cat["ref_epoch"].to_list() == [2016.0] * 3


@pytest.mark.parametrize("kw, words", [
    ({"dec": [0.0, 91.0, 0.0]}, "dec.*> 90"),
    ({"ra": [0.0, float("nan"), 0.0]}, "'ra'.*NaN"),
    ({"dec": [0.0, float("inf"), 0.0]}, "'dec'.*inf"),
    ({"ra": [0.0, None, 0.0]}, "'ra'.*null"),
    ({"source_id": [1, 1, 2]}, r"duplicated ids, e.g. \[1\]"),
    ({"source_id": [1.5, 2.0, 3.0]}, "precision"),
    ({"ra": ["a", "b", "c"]}, "numeric"),
    ({"pmra": [1.0, 2.0, 3.0]}, "pmdec"),
    ({"ref_epoch": [57000.0, 57000.0, 57000.0]}, "Julian year"),
])
def test_catalog_errors(kw, words):
    with pytest.raises(InputError, match=words):
        normalize_catalog(pl.DataFrame(_cat(**kw)))


def test_catalog_missing_columns_suggest():
    with pytest.raises(InputError, match="'source_id'.*found 'ID'"):
        normalize_catalog(pl.DataFrame({"ID": [1], "ra": [1.0], "dec": [0.0]}))
    with pytest.raises(InputError, match="'ra'.*found 'RA'"):
        normalize_catalog(pl.DataFrame({"source_id": [1], "RA": [1.0], "DEC": [0.0]}))
    with pytest.raises(InputError, match="'dec'.*found 'DEJ2000'"):
        normalize_catalog(pl.DataFrame({"source_id": [1], "ra": [1.0], "DEJ2000": [0.0]}))
    with pytest.raises(InputError, match="empty"):
        normalize_catalog(pl.DataFrame({"source_id": [], "ra": [], "dec": []}))
    with pytest.raises(InputError, match="does not exist"):
        normalize_catalog("/nonexistent/cat.parquet")
    with pytest.raises(InputError, match="must be a Polars"):
        normalize_catalog(42)
