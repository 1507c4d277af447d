"""Wavelengths that stay right on IBE cutouts and across releases (issues 13 and 14).

- IBE cutouts: IRSA says only that WCS-WAVE "has also been modified" in a cutout. The simulated
  cutout service writes the W system each way it might (``Universe(cutout_wave_convention=...)``:
  CRPIXnW shifted with the table unchanged, the table's X/Y rebased, or the table re-sampled for
  the box); in every case the wavelength and bandwidth photometry reports on a cutout equal those
  on the whole parent file, in both releases.
- The ``spectral_wcs`` product (CWAVE/CBAND per pixel): when given, photometry takes wavelengths
  from it (``wave_source = 'spectral_wcs'``). In the simulated archive the maps hold the LVF at
  pixel centres, while the WCS-WAVE tables interpolate the same LVF bilinearly between control
  points 204 px (QR2, 11x11) or 255 px (QR3, 9x9) apart; the two therefore agree to the tables'
  interpolation error, at most 0.0010 µm (QR2) and 0.0016 µm (QR3) in wavelength and 5e-5 µm in
  bandwidth, and the maps give the LVF at the source itself to ~1e-6 µm.

All over real HTTP against the simulated archive.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

import spxframe
from spxframe.fetcher import fetch
from spxframe.fetcher.calib import fetch_products
from spxframe.fits import l2file as mef
from spxframe.fits.hdu import by_name, scan_fits
from spxframe.planner import plan
from spxframe.sim.world import cutout as simcut
from spxframe.sim.world import instrument as ins

KEY = ["obs_id", "detector", "source_id"]
CONVENTIONS = ("shift", "rebase", "resample")
TABLE_ERR_UM = 0.0016  #: WCS-WAVE bilinear vs the simulated LVF, worst detector (R7 9x9 grid; QR2 0.0010)
BAND_ERR_UM = 5e-5


def _catalog(universe, field: str = "wide_generic") -> pl.DataFrame:
    src = universe.sources.filter((pl.col("field") == field) & (pl.col("flux_2um") < 8000))
    return src.sort("flux_2um", descending=True).head(1).select("source_id", "ra", "dec", "pmra", "pmdec", "ref_epoch")


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A bright source, two QR2 and two QR3 images of it on different detectors, and photometry
    on their whole parent files (fetched with access='full'); the archive stays up."""
    from spxframe import sim

    universe = sim.Universe(seed=1, cache_strips=64)
    with sim.serve(universe=universe) as arc:
        cat = _catalog(universe)
        obs = spxframe.observations(cat, archive=arc)
        pick = pl.concat([obs.filter(pl.col("release") == r).unique("detector", keep="first").sort("detector").head(2)
                          for r in ("qr2", "qr3")])
        assert pick.height == 4
        cache = tmp_path_factory.mktemp("full")
        got = fetch(plan(cat, pick, access="full", archive=arc).manifest, cache_dir=cache, progress=False)
        assert (got["status"] == "done").all()
        full = spxframe.measure(got, cat, cache_dir=cache).sort(KEY)
        assert full.height == 4 and full["wavelength"].is_finite().all()
        yield dict(universe=universe, arc=arc, cat=cat, pick=pick, cache=cache, got=got, full=full)


def _release(ph: pl.DataFrame, pick: pl.DataFrame) -> pl.DataFrame:
    """Photometry rows with their image's release (measure() on files leaves it null)."""
    return ph.drop("release", strict=False).join(pick.select("obs_id", "detector", "release"),
                                                 on=["obs_id", "detector"], how="left")


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_cutout_wavelengths_equal_the_parent_file(parent, convention, tmp_path):
    """Issue 14: whichever way the cutout service rewrote the W system (and the files show it did),
    wavelength and bandwidth on QR2 and QR3 IBE cutouts equal those on the whole parent files."""
    universe, arc = parent["universe"], parent["arc"]
    universe.cutout_wave_convention = convention  # the knob (Universe(cutout_wave_convention=...))
    try:
        got = fetch(plan(parent["cat"], parent["pick"], cutout_size="64px", access="cutout", archive=arc).manifest,
                    cache_dir=tmp_path, progress=False)
    finally:
        universe.cutout_wave_convention = "shift"
    assert (got["status"] == "done").all() and got.height == 4
    for path in got["path"].to_list():  # the convention is really in the files
        named = by_name(scan_fits(path))
        im = named["IMAGE"].header
        x0 = int(round(1 - float(im["CRPIX1A"])))
        assert x0 > 0
        with open(path, "rb") as f:
            tab = mef.parse_wave_table(f.fileno(), named["WCS-WAVE"])
        crpix, nx = float(im["CRPIX1W"]), int(im["NAXIS1"])
        if convention == "shift":  # the table as the parent's: X from 0.5 (QR3) or 1 (QR2)
            assert crpix == -x0 and tab.x[0] in (0.5, 1.0)
        elif convention == "rebase":
            assert crpix == 0 and tab.x[0] in (0.5 - x0, 1.0 - x0)
        else:
            assert crpix == 0 and tab.x[0] == 0.5 and tab.x[-1] == nx + 0.5
    cut = _release(spxframe.measure(got, parent["cat"], cache_dir=tmp_path).sort(KEY), parent["pick"])
    full = parent["full"]
    assert cut.select(KEY).equals(full.select(KEY))
    assert set(cut["release"]) == {"qr2", "qr3"}
    assert (cut["x"] != full["x"]).all()  # cutout pixels, not the parent's
    np.testing.assert_allclose(cut["wavelength"].to_numpy(), full["wavelength"].to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(cut["bandwidth"].to_numpy(), full["bandwidth"].to_numpy(), rtol=0, atol=1e-9)
    assert (cut["wave_source"] == "wcs-wave").all()


def test_wavelength_follows_crpixw(parent, tmp_path):
    """A file whose W origin is moved (CRPIXnW += d, the table's X/Y -= d: the same wavelengths by
    FITS WCS Paper III) reports the same wavelengths; a reader that ignored CRPIXnW would be off by
    d pixels along the dispersion (checked to be far more than the tolerance)."""
    paths = []
    for k, src in enumerate(parent["got"]["path"].to_list()):
        with open(src, "rb") as f:
            data = simcut.move_wave_origin(f.read(), 37, -53)
        paths.append(str(tmp_path / f"moved{k}.fits"))
        with open(paths[-1], "wb") as f:
            f.write(data)
    moved = spxframe.measure(paths, parent["cat"]).sort(KEY)
    full = parent["full"]
    assert moved.select(KEY).equals(full.select(KEY))
    np.testing.assert_allclose(moved["wavelength"].to_numpy(), full["wavelength"].to_numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(moved["bandwidth"].to_numpy(), full["bandwidth"].to_numpy(), rtol=0, atol=1e-9)
    for p, (xp, yp) in zip(paths, moved.select(pl.col("x"), pl.col("y")).iter_rows()):
        named = by_name(scan_fits(p))
        with open(p, "rb") as f:
            tab = mef.parse_wave_table(f.fileno(), named["WCS-WAVE"])
        naive = tab(np.array([xp + 1.0]), np.array([yp + 1.0]))[0][0]  # the table at the pixel, CRPIXnW ignored
        assert abs(naive - moved.filter(pl.col("x") == xp)["wavelength"][0]) > 1e-3


def test_wavelengths_from_the_spectral_wcs_product(parent, tmp_path):
    """Issue 13: with the spectral_wcs product (a folder or a mapping), wavelengths come from its
    CWAVE/CBAND maps (wave_source says so) and agree with the WCS-WAVE ones to the tables'
    interpolation error, and with the simulated LVF at the source to ~1e-6 µm; without it, the
    WCS-WAVE lookup (measure still works). The product is fetched once per detector."""
    arc, cache, full = parent["arc"], parent["cache"], parent["full"]
    dets = sorted(set(full["detector"].to_list()))
    prod = fetch_products(dets, base_url=arc.url, cache=cache, family="spectral_wcs", release="qr3")
    assert set(prod.paths) == set(dets) and prod.bytes > 2 * 4 * 2040 * 2040 * len(dets)
    assert fetch_products(dets, base_url=arc.url, cache=cache, family="spectral_wcs", release="qr3").bytes == 0
    ph = _release(spxframe.measure(parent["got"], parent["cat"], cache_dir=cache, calibration=str(cache / "cal")),
                  parent["pick"]).sort(KEY)
    by_map = spxframe.measure(parent["got"], parent["cat"], cache_dir=cache,
                              calibration={"spectral_wcs": prod.paths}).sort(KEY)
    assert ph.select(KEY).equals(full.select(KEY)) and set(ph["release"]) == {"qr2", "qr3"}
    assert (ph["wave_source"] == "spectral_wcs").all() and (full["wave_source"] == "wcs-wave").all()
    assert ph.select("wavelength", "bandwidth").equals(by_map.select("wavelength", "bandwidth"))
    dw = np.abs(ph["wavelength"].to_numpy() - full["wavelength"].to_numpy())
    assert (dw < TABLE_ERR_UM).all() and (dw > 0).all()
    assert (np.abs(ph["bandwidth"].to_numpy() - full["bandwidth"].to_numpy()) < BAND_ERR_UM).all()
    np.testing.assert_array_equal(ph["flux"].to_numpy(), full["flux"].to_numpy())  # wavelengths only
    u = parent["universe"]
    for row in ph.iter_rows(named=True):
        x, y = u.truth_pixel(row["source_id"], row["obs_id"], row["detector"])
        assert abs(row["wavelength"] - float(ins.lvf_wavelength(row["detector"], x, y))) < 2e-6


def test_lightcurves_record_the_wavelength_product(parent, tmp_path):
    """lightcurves() fetches spectral_wcs once per detector measured, records it in run.json beside
    the gain product, and its rows say where their wavelengths came from."""
    arc, cat = parent["arc"], parent["cat"]
    ph = spxframe.lightcurves(cat, "64px", archive=arc, output_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                              progress=False, plots=0, access="cutout")
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    fams = {c["family"]: c for c in run["calibration"]}
    assert run["calibration"][0]["family"] == "l3_flux_corrections"
    dets = {f"D{d}" for d in ph["detector"].unique().to_list()}
    assert set(fams["spectral_wcs"]["tokens"]) == dets and fams["spectral_wcs"]["bytes"] > 0
    assert all(t.startswith("cal-swcs-") for t in fams["spectral_wcs"]["tokens"].values())
    measured = ph.filter(pl.col("wavelength").is_finite())
    assert measured.height > 0 and (measured["wave_source"] == "spectral_wcs").all()
