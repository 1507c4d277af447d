"""spxframe.measure on simulated SPHEREx files: injection-recovery against the simulated truth.

Files are written to tmp_path from ``universe.cutout`` bytes (IBE-style cutouts with the whole PSF
cube), range-read-style cutouts (PSF HDU without data + PSFFILE; cube in ``cache/psf/``) and one
full file from ``universe.read``. No HTTP.
"""

from __future__ import annotations

import math
import os

import numpy as np
import polars as pl
import pytest
from accuracy import accuracy
from astropy.io import fits

import spxframe
from spxframe import schema, spherex

QC = schema.QC
BOX = 400  #: side of the test cutouts, px


def _qr2_universe(**kw):
    """The simulated universe (seed 1) with its QR2 release only: these files and figures assume a
    QR2-only sky (with QR3 the QR2 pixels move to the pre-R7 gains)."""
    from spxframe.sim import Universe

    return Universe(seed=1, releases=("qr2",), **kw)


@pytest.fixture(scope="module")
def universe():
    """The simulated universe (seed 1); module-local so the tests do not need a running server."""
    return _qr2_universe()


def _stub(src: str, cache: str, name: str) -> str:
    """Rewrite an IBE cutout as a range-read cutout: PSF data dropped, PSFFILE to cache/psf/<key>."""
    with fits.open(src) as h:
        key = f"D{h['IMAGE'].header['DETECTOR']}_{h[0].header.get('VERSION', 'x')}"
        os.makedirs(os.path.join(cache, "psf"), exist_ok=True)
        cube = os.path.join(cache, "psf", key + ".fits")
        if not os.path.exists(cube):
            fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(h["PSF"].data, h["PSF"].header)]).writeto(cube)
        ph = h["PSF"].header.copy()
        ph["PSFFILE"] = os.path.join("psf", key + ".fits")
        hdus = [hd.copy() for hd in h]
        hdus[[x.name for x in h].index("PSF")] = fits.ImageHDU(None, ph, name="PSF")
        det = h["IMAGE"].header["DETECTOR"]
        out = os.path.join(cache, "data", f"D{det}", name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        fits.HDUList(hdus).writeto(out)
    return out


def _field_obs(u, name: str, n: int, det: int | None = None) -> list[dict]:
    src = u.sources.filter(pl.col("field") == name)
    ra0, dec0 = float(src["ra"].median()), float(src["dec"].median())
    obs = u.observations
    if det is not None:
        obs = obs.filter(pl.col("detector") == det)
    d = np.degrees(np.arccos(np.clip(
        np.sin(np.radians(dec0)) * np.sin(np.radians(obs["s_dec"].to_numpy()))
        + np.cos(np.radians(dec0)) * np.cos(np.radians(obs["s_dec"].to_numpy()))
        * np.cos(np.radians(obs["s_ra"].to_numpy() - ra0)), -1, 1)))
    obs = obs.with_columns(pl.Series("dist", d)).filter(pl.col("dist") < 1.0).sort("obs_id", "detector")
    return obs.head(n).to_dicts()


@pytest.fixture(scope="module")
def simfiles(universe, tmp_path_factory):
    """3 full files (universe.read) and 5 cutouts of BOX px (IBE-style and range-read-style)."""
    u = universe
    d = tmp_path_factory.mktemp("phot")
    cache = str(d / "cache")
    paths = []
    for i, o in enumerate(_field_obs(u, "wide_generic", 8)):
        if i < 3:
            p = os.path.join(cache, "data", f"D{o['detector']}", f"{o['obs_id']}D{o['detector']}_full.fits")
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(u.read(o["cloud_key"], 0, u.file_size(o["cloud_key"])))
            paths.append(p)
            continue
        raw = str(d / f"ibe_{i}.fits")
        with open(raw, "wb") as f:
            f.write(u.cutout(o["cloud_key"], f"{1020 + 300 * (i % 3 - 1)},1020px", f"{BOX}px"))
        paths.append(raw if i % 2 == 0 else _stub(raw, cache, f"{o['obs_id']}D{o['detector']}_x0_y0_{BOX}x{BOX}.fits"))
    return dict(paths=paths, cat=u.catalog(), cache=cache)


@pytest.fixture(scope="module")
def measured(simfiles):
    return spxframe.measure(simfiles["paths"], simfiles["cat"])


def _truth(u, df: pl.DataFrame) -> np.ndarray:
    sid = df["source_id"].cast(pl.Int64).to_numpy()
    return np.asarray(u.truth_flux(sid, df["wavelength"].to_numpy(), df["mjd"].to_numpy()), float)


def _isolated(u, df: pl.DataFrame, cat: pl.DataFrame, min_px: float = 12.0) -> np.ndarray:
    """Rows whose source has no other catalog source within min_px pixels."""
    ra, dec = np.radians(cat["ra"].to_numpy()), np.radians(cat["dec"].to_numpy())
    v = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], 1)
    ids = cat["source_id"].to_numpy()  # measure() keeps the catalog dtype
    idx = {s: i for i, s in enumerate(ids)}
    lim = math.cos(math.radians(min_px * spherex.PIXEL_SCALE_ARCSEC / 3600))
    iso = {}
    for s in set(df["source_id"].to_list()):
        i = idx[s]
        iso[s] = int((v @ v[i] > lim).sum()) == 1
    return np.array([iso[s] for s in df["source_id"].to_list()])


def test_schema_and_rows(measured, simfiles):
    df = measured
    assert df.columns == schema.PHOTOMETRY.names
    assert df.height > 1000, df.height
    assert set(df["file"].unique().to_list()) <= set(simfiles["paths"])
    assert df.select(pl.struct("source_id", "file").is_unique().all()).item()
    # every row sits on its file's pixels
    n = np.array([fits.getheader(p, "IMAGE")["NAXIS1"] for p in df["file"].to_list()])
    x, y = df["x"].to_numpy(), df["y"].to_numpy()
    assert ((x >= -0.5) & (x < n - 0.5) & (y >= -0.5) & (y < n - 0.5)).all()
    assert df["file"].n_unique() == len(simfiles["paths"])
    assert df["band"].to_list() == [f"D{d}" for d in df["detector"].to_list()]
    nonpos = df.filter(pl.col("flux") <= 0)
    assert (nonpos["qc"] & QC["NONPOSITIVE_FLUX"] > 0).all() and nonpos["mag_ab"].is_nan().all()


def test_injection_recovery(measured, simfiles, universe):
    df = measured.filter(pl.col("flux").is_not_nan())
    true = _truth(universe, df)
    a = accuracy(df, true, _isolated(universe, df, simfiles["cat"]))
    assert a.n_bright > 30, a.n_bright
    assert abs(a.ratio - 1) < 0.01, a.ratio
    assert a.n_clean > 500, a.n_clean
    assert abs(a.pull_median) < 0.1, a.pull_median
    assert 0.85 < a.pull_width < 1.2, a.pull_width


def test_zero_and_negative_truth_measured(measured, universe):
    df = measured.filter(pl.col("flux").is_not_nan())
    true = _truth(universe, df)
    low = true <= 0
    assert low.any(), "no source with zero or negative truth flux on the test files"
    assert np.isfinite(df["flux"].to_numpy()[low]).all()


def test_positions_and_wavelengths(measured, simfiles, universe):
    from spxframe.sim.world import instrument as ins

    df = measured.sample(min(300, measured.height), seed=0)
    x0 = {}
    for p in simfiles["paths"]:
        h = fits.getheader(p, "IMAGE")
        x0[p] = (1 - h["CRPIX1A"], 1 - h["CRPIX2A"])
    for r in df.iter_rows(named=True):
        tx, ty = universe.truth_pixel(int(r["source_id"]), r["obs_id"], r["detector"])
        ox, oy = x0[r["file"]]
        assert abs(r["x"] + ox - tx) < 0.02 and abs(r["y"] + oy - ty) < 0.02, (r, tx, ty)
        lam = float(ins.lvf_wavelength(r["detector"], r["x"] + ox, r["y"] + oy))
        assert abs(r["wavelength"] - lam) < 0.002
        assert r["bandwidth"] == pytest.approx(r["wavelength"] / spherex.BANDS[r["band"]][2], rel=0.05)


def test_source_pixels_used_and_times(measured):
    df = measured
    src = df.filter((pl.col("flags") & (1 << 21) > 0) & (pl.col("flags") & spherex.DEFAULT_BAD_MASK == 0)
                    & (pl.col("qc") & (QC["APERTURE_EDGE"] | QC["NAN_VARIANCE"]) == 0))
    assert src.height > 0 and (src["masked_fraction"] < 1e-12).all() and src["flux"].is_not_nan().all()
    dt = (df["bjd_tdb"] - (df["mjd"] + 2400000.5)) * 86400
    assert (dt.abs() < 600).all()  # Roemer delay + TT-UTC is at most ~570 s


def test_bjd_against_astropy(measured):
    from astropy.coordinates import EarthLocation, SkyCoord
    from astropy.time import Time

    r = measured.row(0, named=True)
    with fits.open(r["file"]) as h:
        hdr = h["IMAGE"].header
    from astropy.wcs import WCS

    ra, dec = WCS(hdr).all_pix2world(r["x"], r["y"], 0)
    t = Time(r["mjd"], format="mjd", scale="utc", location=EarthLocation.from_geocentric(0, 0, 0, unit="m"))
    ref = (t.tdb + t.light_travel_time(SkyCoord(ra, dec, unit="deg"))).jd
    assert abs(r["bjd_tdb"] - ref) * 86400 < 0.05  # spacecraft offset from the geocentre ≲ 0.03 s


def test_legacy_psf_header_same_flux(universe, tmp_path):
    ul = _qr2_universe(legacy_psf_headers=True)
    o = _field_obs(universe, "wide_generic", 1)[0]
    paths = []
    for name, uu in (("fixed", universe), ("legacy", ul)):
        p = tmp_path / f"{name}.fits"
        p.write_bytes(uu.cutout(o["cloud_key"], "1750,300px", "500px"))  # off-diagonal zones: ix != iy
        paths.append(str(p))
    assert fits.getheader(paths[0], 0)["VERSION"] != fits.getheader(paths[1], 0)["VERSION"]
    cat = universe.catalog()
    a = spxframe.measure(paths[:1], cat)
    b = spxframe.measure(paths[1:], cat)
    assert a.height > 5 and a.height == b.height
    assert (b["qc"] & QC["LEGACY_PSF_HEADER"] > 0).all() and (a["qc"] & QC["LEGACY_PSF_HEADER"] == 0).all()
    np.testing.assert_allclose(a["flux"].to_numpy(), b["flux"].to_numpy(), rtol=1e-12)
    # a reader trusting the legacy card numbers would have used other planes for these sources
    from spxframe.fits import l2file as mef

    infos = []
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            infos.append(mef.open_info(p, fd))
        finally:
            os.close(fd)
    xp, yp = a["x"].to_numpy() + infos[0].x0, a["y"].to_numpy() + infos[0].y0
    hl = infos[1].psf_header
    xc = np.array([hl.get(f"XCTR_{k}") for k in range(1, 122)])
    yc = np.array([hl.get(f"YCTR_{k}") for k in range(1, 122)])
    naive = np.argmin((xp[:, None] - xc) ** 2 + (yp[:, None] - yc) ** 2, axis=1)
    good = mef.parse_psf_zones(hl, infos[1].version).zone_plane(xp, yp)
    assert (naive != good).all()


def test_full_file_and_manifest(universe, tmp_path, simfiles):
    o = _field_obs(universe, "wide_generic", 1, det=3)[0]
    full = tmp_path / "data" / "D3" / f"{o['obs_id']}D3_full.fits"
    full.parent.mkdir(parents=True)
    full.write_bytes(universe.read(o["cloud_key"], 0, universe.file_size(o["cloud_key"])))
    cat = simfiles["cat"]
    d = np.hypot((cat["ra"].to_numpy() - o["s_ra"]) * math.cos(math.radians(o["s_dec"])),
                 cat["dec"].to_numpy() - o["s_dec"])
    sids = cat["source_id"].to_numpy()[np.argsort(d)[:30]].tolist()
    sids += cat["source_id"].to_numpy()[np.argsort(d)[-10:]].tolist()  # far away: off file
    bad = tmp_path / "broken.fits"
    bad.write_bytes(b"SIMPLE  =                    T" + b" " * 100)
    man = pl.DataFrame({
        "source_id": sids[:40] + sids[:2] + sids[:1],
        "path": [str(full)] * 40 + [str(bad)] * 2 + [str(full)],
        "status": ["done"] * 42 + ["failed"],
        "clipped": [True] + [False] * 42,
    })
    df = spxframe.measure(man, cat)
    onf = df.filter(pl.col("file") == str(full))
    assert onf.height == 40  # every listed pair gets a row, measured or OFF_FILE
    assert onf.filter(pl.col("source_id") == sids[0])["qc"].item() & QC["CUTOUT_CLIPPED"]
    assert onf.filter(pl.col("qc") & QC["CUTOUT_CLIPPED"] > 0).height == 1
    off = onf.filter(pl.col("qc") & QC["OFF_FILE"] > 0)
    assert off["flux"].is_nan().all()
    on = onf.filter(pl.col("qc") & QC["OFF_FILE"] == 0)
    assert on.height > 0 and on["flux"].is_not_nan().sum() > 0
    br = df.filter(pl.col("file") == str(bad))
    assert br.height == 2 and (br["qc"] & QC["READ_ERROR"] > 0).all()
    # the same sources measured on the full file agree with list mode on the same file
    lst = spxframe.measure([str(full)], cat).filter(pl.col("source_id").is_in(on["source_id"].to_list()))
    j = on.join(lst, on="source_id", suffix="_l")
    np.testing.assert_allclose(j["flux"].to_numpy(), j["flux_l"].to_numpy(), rtol=1e-9)


def test_cutout_equals_full_frame(universe, tmp_path):
    o = _field_obs(universe, "wide_generic", 1, det=3)[0]
    full = tmp_path / "full.fits"
    full.write_bytes(universe.read(o["cloud_key"], 0, universe.file_size(o["cloud_key"])))
    cut = tmp_path / "cut.fits"
    cut.write_bytes(universe.cutout(o["cloud_key"], "1000,900px", "200px"))
    cat = universe.catalog()
    a = spxframe.measure([str(cut)], cat)
    b = spxframe.measure([str(full)], cat).filter(pl.col("source_id").is_in(a["source_id"].to_list()))
    interior = a.filter(pl.col("qc") & QC["APERTURE_EDGE"] == 0)["source_id"].to_list()
    a, b = (t.filter(pl.col("source_id").is_in(interior)).sort("source_id") for t in (a, b))
    assert a.height > 0
    # identical pixels; only annulus pixels beyond the cutout edge can differ
    close = np.isclose(a["flux"].to_numpy(), b["flux"].to_numpy(), rtol=1e-9, equal_nan=True)
    assert close.mean() > 0.8
    np.testing.assert_allclose(a["wavelength"].to_numpy(), b["wavelength"].to_numpy(), rtol=1e-12)


def test_fast_paths_match_slow(simfiles):
    """Regex zone parsing = card-by-card parsing; WCS filled from values = astropy Header WCS."""
    from spxframe.fits import l2file as mef
    from spxframe.fits import psf

    p = [q for q in simfiles["paths"] if "ibe_" in q][0]
    fd = os.open(p, os.O_RDONLY)
    try:
        info = mef.open_info(p, fd)
    finally:
        os.close(fd)
    fast = psf._parse_zone_cards(info.psf_header.raw)
    slow = psf._parse_zones_slow(mef.Header(info.psf_header.raw))
    assert fast is not None and len(fast[0]) == 121
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)
    for legacy in (False, True):
        z = psf.parse_psf_zones(info.psf_header, "6.5.4" if legacy else "6.5.4+psffix1")
        assert z.legacy == legacy and sorted(z.plane.tolist()) == list(range(121))
    w1, w2 = mef.parent_wcs(info), mef.parent_wcs(info, fast=False)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-0.5, 2039.5, 500), rng.uniform(-0.5, 2039.5, 500)
    r1, d1 = w1.all_pix2world(x, y, 0)
    r2, d2 = w2.all_pix2world(x, y, 0)
    assert np.abs(r1 - r2).max() * 3600 < 1e-8 and np.abs(d1 - d2).max() * 3600 < 1e-8
    # what measure() uses: the numba TAN-SIP, same as astropy's all_world2pix / all_pix2world
    from spxframe.fits import wcs as _wcs

    w3 = _wcs.celestial_wcs(info)
    assert isinstance(w3, _wcs.TanSip)
    r3, d3 = w3.pix2world(x, y)
    assert np.abs((r3 - r1 + 180) % 360 - 180).max() * 3600 < 1e-9 and np.abs(d3 - d1).max() * 3600 < 1e-9
    xa, ya = w1.all_world2pix(r1, d1, 0, tolerance=1e-8, maxiter=50, quiet=True)
    xb, yb = w3.world2pix(r1, d1, tolerance=1e-8, maxiter=50)
    assert np.abs(xb - xa).max() < 1e-9 and np.abs(yb - ya).max() < 1e-9
    np.testing.assert_allclose(w3.pixel_area(x, y), mef.pixel_area_arcsec2(w1, x, y), rtol=1e-9)
    assert not psf.is_legacy_version("6.5.6") and psf.is_legacy_version("6.4.0")
    assert not psf.is_legacy_version("6.5.5+psffix1") and not psf.is_legacy_version("6.3.9")


def test_options_chunking_pandas(simfiles, measured, monkeypatch):
    from spxframe.photometry import forced as photometry

    paths = [p for p in simfiles["paths"] if "ibe_" in p or "_x0_y0_" in p][:2]
    base = measured.filter(pl.col("file").is_in(paths)).sort("file", "source_id")
    orig = photometry._Stack.__init__

    def small(self, half, kw, chunk=20000):
        orig(self, half, kw, chunk=7)

    monkeypatch.setattr(photometry._Stack, "__init__", small)
    chunked = spxframe.measure(paths, simfiles["cat"].to_pandas()).sort("file", "source_id")
    monkeypatch.undo()
    assert chunked.height == base.height > 7
    np.testing.assert_array_equal(chunked["flux"].to_numpy(), base["flux"].to_numpy())
    z = spxframe.measure(paths, simfiles["cat"], background="zodi").sort("file", "source_id")
    assert (z["zodi_scale"] == 1).all() and (z["background"] == 0).all() and z["flux"].is_not_nan().sum() > 0
    strict = spxframe.measure(paths, simfiles["cat"], bad_bits=set(spherex.HARD_BAD_BITS) | {1, 4, 5, 19})
    assert strict.height == base.height
    with pytest.raises(ValueError):
        spxframe.measure(paths, simfiles["cat"], bad_bits={21})
    with pytest.raises(ValueError):
        spxframe.measure(paths, simfiles["cat"], aperture_radius=3.0, annulus=(2.0, 5.0))
