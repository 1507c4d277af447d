"""The simulated archive's virtual files, parsed with real astropy (owner: sim-data)."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import polars as pl
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from spxframe.sim import BadRequest, Universe
from spxframe.spherex import FLAG_BITS, FULL_FILE_BYTES, MJY_SR_TO_UJY_PER_ARCSEC2

warnings.filterwarnings("ignore", module="astropy.wcs")
BLOCK = 2880


@pytest.fixture(scope="module")
def uni() -> Universe:
    return Universe(seed=1, releases=("qr2",))


@pytest.fixture(scope="module")
def key(uni) -> str:
    # a D3 deep-field file (dichroic corners) with many sources
    keys = uni.observations.filter(pl.col("detector") == 3)["cloud_key"]
    return next(k for k in keys if uni.frame_sources(k).height > 300)


@pytest.fixture(scope="module")
def full(uni, key) -> bytes:
    return uni.read(key, 0, FULL_FILE_BYTES)


@pytest.fixture(scope="module")
def hdul(full):
    return fits.open(io.BytesIO(full))


def _wcs_w(hdr, hl) -> WCS:
    w = WCS(hdr, fobj=hl, key="W")
    w.sip = None
    return w


def test_observations_table(uni):
    o = uni.observations
    assert o.height > 1000 and o["obs_id"].str.contains(r"^\d{4}W\d{2}_\d[A-Z]_\d{4}_[1-4]$").all()
    assert set(o["obs_collection"].unique()) == {"spherex_qr2", "spherex_qr2_deep"}
    assert (o["contentlength"] == FULL_FILE_BYTES).all()
    assert o["uri"].str.starts_with("ibe/data/spherex/qr2/level2/").all()
    assert (("ibe/data/spherex/" + o["cloud_key"]) == o["uri"]).all()
    r = o.row(0, named=True)
    v = [float(t) for t in r["s_region"].split()[2:]]
    assert r["s_region"].startswith("POLYGON ICRS ") and len(v) == 10 and v[:2] == v[-2:]
    assert len(r["poly"]) == 4 and abs(r["em_max"] - r["em_min"]) < 1e-5
    # D1 and D4 share the pointing, some exposures lack a detector
    per = o.group_by("obs_id").agg(pl.col("detector").n_unique().alias("n"))
    assert per["n"].max() == 6 and per["n"].min() < 6
    pair = o.filter(pl.col("detector").is_in([1, 4])).group_by("obs_id").agg(pl.col("s_ra").n_unique())
    assert (pair["s_ra"] == 1).all()
    deep = o.filter(pl.col("obs_collection") == "spherex_qr2_deep")["obs_id"].n_unique()
    assert 150 <= deep <= 400


def test_s_region_from_file_wcs(uni):
    o = uni.observations
    for r in (o.filter(pl.col("field") == "wide_pole").row(3, named=True),
              o.filter(pl.col("field") == "wide_ra0").row(0, named=True)):
        hdr = fits.Header.fromstring(uni.read(r["cloud_key"], 2880, 23040).decode("ascii"))
        ra, dec = WCS(hdr).all_pix2world([-0.5, 2039.5, 2039.5, -0.5], [-0.5, -0.5, 2039.5, 2039.5], 0)
        v = np.array([float(t) for t in r["s_region"].split()[2:]]).reshape(-1, 2)[:4]
        dra = (v[:, 0] - ra + 180) % 360 - 180
        assert np.abs(dra * np.cos(np.radians(dec))).max() < 1e-5 and np.abs(v[:, 1] - dec).max() < 1e-5
        assert hdr["OBSID"] == r["obs_id"] and hdr["DETECTOR"] == r["detector"]
        assert hdr["MJD-BEG"] == pytest.approx(r["t_min"]) and hdr["MJD-END"] == pytest.approx(r["t_max"])


def test_full_file_layout(full, hdul):
    assert len(full) == FULL_FILE_BYTES
    assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "FLAGS", "VARIANCE", "ZODI", "PSF", "WCS-WAVE"]
    hdul.verify("exception")
    locs = [h.fileinfo()["hdrLoc"] for h in hdul]
    blocks = np.diff(locs + [FULL_FILE_BYTES]) // BLOCK
    data_blocks = [0, 5780, 5780, 5780, 5780, 1715, 1]
    assert list(blocks - np.array(data_blocks)) == [1, 7, 5, 4, 4, 15, 1]
    im = hdul["IMAGE"].header
    for k in ("BUNIT", "DETECTOR", "OBSID", "EXPIDN", "DATE", "PSF_FWHM", "MJD-OBS", "MJD-BEG", "MJD-END",
              "MJD-AVG", "DATE-AVG", "XPOSURE", "X_SC", "VZ_SC", "XYZ_SC_SYSTEM", "OMEGA_MEDIAN", "FINAST",
              "L2DQAFLG", "SPS_EPA", "CRPIX1A", "CRPIX2W", "A_ORDER", "AP_ORDER", "PC1_2", "L2 N_SOURCE"):
        assert k in im, k
    assert im["BUNIT"] == "MJy/sr" and im["CRPIX1"] == 1020.5 and "CDELT1" not in im
    assert im["CTYPE1"] == "RA---TAN-SIP" and im["XPOSURE"] == pytest.approx(113.5826)
    assert hdul[0].header["VERSION"] == im["VERSION"]
    fl = hdul["FLAGS"].header
    assert {k[3:]: fl[k] for k in fl if k.startswith("MP_")} == FLAG_BITS
    assert hdul["FLAGS"].data.dtype.kind == "i" and hdul["IMAGE"].data.dtype.byteorder in (">", "!")
    for n in ("FLAGS", "VARIANCE", "ZODI"):
        assert WCS(hdul[n].header).wcs.ctype[0] == "RA---TAN-SIP" and hdul[n].header["CRPIX2A"] == 1
    ps = hdul["PSF"]
    assert ps.data.shape == (121, 101, 101) and ps.header["OVERSAMP"] == 10
    assert np.allclose(ps.data.sum(axis=(1, 2)), 1.0, atol=1e-5)
    counts = hdul["FLAGS"].data
    assert im["L2 N_SOURCE"] == np.count_nonzero(counts & (1 << 21))
    assert im["L2 N_TRANSIENT"] == np.count_nonzero(counts & 1)


def test_range_reads_equal_slices(uni, key, full):
    rng = np.random.default_rng(0)
    edges = [0, 2880, 23040, 16669440, 33341760, 66646080, 66689280, 71628480, FULL_FILE_BYTES]
    ranges = [(e - 7, e + 9) for e in edges[1:-1]] + [(71_600_000, FULL_FILE_BYTES + 100)]
    ranges += [(int(a), int(a) + int(n)) for a, n in zip(rng.integers(0, FULL_FILE_BYTES - 10**6, 6),
                                                         rng.integers(1, 10**6, 6))]
    for a, b in ranges:
        assert uni.read(key, a, b) == full[a:min(b, FULL_FILE_BYTES)], (a, b)
    assert uni.file_size(key) == FULL_FILE_BYTES


def test_cutout_matches_parent(uni, key, hdul):
    wp = WCS(hdul["IMAGE"].header)
    ra, dec = wp.all_pix2world([[812.7, 301.2]], 0)[0]
    for center, size in ((f"{ra},{dec}d", "200px"), (f"{ra},{dec}", "0.1"), ("5.2,2030.9px", "60,40pix")):
        x0, y0, nx, ny = uni.cutout_box(key, center, size)
        data = uni.cutout(key, center, size)
        assert len(data) == 38 * BLOCK + 4 * -(-4 * nx * ny // BLOCK) * BLOCK + 4_939_200
        hc = fits.open(io.BytesIO(data))
        for n in ("IMAGE", "FLAGS", "VARIANCE", "ZODI"):
            assert np.array_equal(hc[n].data, hdul[n].data[y0:y0 + ny, x0:x0 + nx], equal_nan=True)
            assert hc[n].header["CRPIX1A"] == 1 - x0 and hc[n].header["CRPIX2"] == 1020.5 - y0
        assert np.array_equal(hc["PSF"].data, hdul["PSF"].data)
        assert hc["PSF"].header == hdul["PSF"].header
        assert np.array_equal(hc["WCS-WAVE"].data["VALUES"], hdul["WCS-WAVE"].data["VALUES"])
        h = hc["IMAGE"].header
        xc, yc = np.array([0.0, nx - 1.0, nx / 3]), np.array([0.0, ny - 1.0, ny / 2])
        assert np.allclose(1 + xc - h["CRPIX1A"], xc + x0) and np.allclose(1 + yc - h["CRPIX2A"], yc + y0)
        sky_c = np.array(WCS(h).all_pix2world(xc, yc, 0))
        sky_p = np.array(wp.all_pix2world(xc + x0, yc + y0, 0))
        assert np.abs(sky_c - sky_p).max() < 1e-9
        wave_c = np.array(_wcs_w(h, hc).pixel_to_world_values(xc, yc))
        wave_p = np.array(_wcs_w(hdul["IMAGE"].header, hdul).pixel_to_world_values(xc + x0, yc + y0))
        assert np.abs(wave_c - wave_p).max() < 1e-9
    assert (x0, nx, y0, ny) == (0, 36, 2011, 29)  # clipped: x0 = floor(5.2 - 29.5 + 0.5) = -24 -> 0
    assert uni.cutout(key, f"{ra},{dec}d", "30px", gzip=True)[:2] == b"\x1f\x8b"


def test_cutout_box_convention(uni, key):
    x0, y0, nx, ny = uni.cutout_box(key, "100.5,200.49px", "10,7px")
    assert (x0, nx, y0, ny) == (96, 10, 197, 7)  # x0 = floor(c - (n-1)/2 + 0.5)
    assert uni.cutout_box(key, "100,200px", "12.3arcsec")[2] == 2  # round(12.3/6.15)


@pytest.mark.parametrize("center,size", [("1,2,3", "10px"), ("abc", "1"), ("10,95d", "0.1"), ("10,10", "-1"),
                                         ("10,10px", "5furlong"), ("-500,-500px", "10px"), ("10,10px", "0px")])
def test_cutout_bad_requests(uni, key, center, size):
    with pytest.raises(BadRequest):
        uni.cutout(key, center, size)


def test_wave_wcs_matches_bilinear_table(hdul):
    t = hdul["WCS-WAVE"].data
    X, Y, V = t["X"][0], t["Y"][0], t["VALUES"][0]
    assert V.shape == (11, 11, 2) and hdul["WCS-WAVE"].header["TDIM3"] == "(2,11,11)"
    rng = np.random.default_rng(1)
    xp, yp = rng.uniform(1, 2040, 200), rng.uniform(1, 2040, 200)  # 1-based parent pixels
    i = np.clip(np.searchsorted(X, xp) - 1, 0, 9)
    j = np.clip(np.searchsorted(Y, yp) - 1, 0, 9)
    fx, fy = (xp - X[i]) / (X[i + 1] - X[i]), (yp - Y[j]) / (Y[j + 1] - Y[j])
    man = ((1 - fx) * (1 - fy))[:, None] * V[j, i] + (fx * (1 - fy))[:, None] * V[j, i + 1] \
        + ((1 - fx) * fy)[:, None] * V[j + 1, i] + (fx * fy)[:, None] * V[j + 1, i + 1]
    lam, bw = _wcs_w(hdul["IMAGE"].header, hdul).pixel_to_world_values(xp - 1, yp - 1)
    assert np.abs(lam - man[:, 0]).max() < 1e-6 and np.abs(bw - man[:, 1]).max() < 1e-6
    assert 1.6 < V[..., 0].min() < V[..., 0].max() < 2.45  # D3


def test_flags_source_fraction_and_nan_variance(hdul):
    fl, var, img = hdul["FLAGS"].data, hdul["VARIANCE"].data, hdul["IMAGE"].data
    frac = np.mean((fl & (1 << 21)) != 0)
    assert 0.4 <= frac <= 0.7
    nan = np.isnan(var)
    assert nan.sum() > 100 and not np.any(nan & (fl == 0)) and np.isfinite(img).all()
    for b in ("TRANSIENT", "HOT", "COLD", "NONFUNC", "DICHROIC"):
        assert np.any(fl & (1 << FLAG_BITS[b])), b
    good = fl & ~np.int32(1 << 21) == 0
    sig = np.sqrt(np.median(var[good]))
    assert 0.008 < sig < 0.06
    z = hdul["ZODI"].data
    ratio = np.median(img[good]) / np.median(z)
    assert 1.0 <= ratio <= 1.35 and 0.02 < np.median(z) < 2.0


def test_noise_consistent_with_variance(uni, key):
    c = uni.components(key, 700, 900)
    good = c["FLAGS"] == 0
    pull = (c["IMAGE"] - c["sky"] - c["sources"])[good] / np.sqrt(c["VARIANCE"][good])
    assert abs(pull.mean()) < 0.02 and abs(pull.std() - 1) < 0.02
    assert np.array_equal(c["IMAGE"], uni.components(key, 600, 1000)["IMAGE"][100:300])


def _omega(w: WCS, x: float, y: float) -> float:
    """Pixel solid angle (arcsec²) from the four corner directions (independent of the sim)."""
    cx, cy = np.array([x - 0.5, x + 0.5, x + 0.5, x - 0.5]), np.array([y - 0.5, y - 0.5, y + 0.5, y + 0.5])
    ra, dec = (np.radians(v) for v in w.all_pix2world(cx, cy, 0))
    v = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], 1)
    area = 0.0
    for a, b, c in ((v[0], v[1], v[2]), (v[0], v[2], v[3])):
        area += 2 * np.arctan2(abs(np.dot(a, np.cross(b, c))), 1 + a @ b + b @ c + c @ a)
    return area * (180 / np.pi * 3600) ** 2


def test_isolated_source_flux_equals_truth(uni, key, hdul):
    fs = uni.frame_sources(key)
    xy = fs.select("x", "y").to_numpy()
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1)) + np.eye(len(xy)) * 1e9
    fs = fs.with_columns(pl.Series("dmin", d.min(1)))
    iso = fs.filter((pl.col("dmin") > 14) & pl.col("x").is_between(20, 2019) & pl.col("y").is_between(20, 2019))
    h = hdul["IMAGE"].header
    w, ww, mjd = WCS(h), _wcs_w(h, hdul), h["MJD-AVG"]
    bright = iso.filter(pl.col("flux") < 20000).sort("flux", descending=True).row(0, named=True)  # unsaturated
    for s in (iso.row(0, named=True), bright):
        x, y = uni.truth_pixel(s["source_id"], h["OBSID"], h["DETECTOR"])
        assert np.allclose(w.all_world2pix([[*w.all_pix2world([[x, y]], 0)[0]]], 0)[0], [x, y])
        lam = float(ww.pixel_to_world_values(x, y)[0])
        truth = float(uni.truth_flux(s["source_id"], lam, mjd))
        ix, iy = int(round(x)), int(round(y))
        c = uni.components(key, iy - 8, iy + 9)
        sl = np.s_[:, ix - 8:ix + 9]
        conv = _omega(w, x, y) * MJY_SR_TO_UJY_PER_ARCSEC2
        assert c["sources"][sl].sum() * conv == pytest.approx(truth, rel=0.01)
        resid = (c["IMAGE"][sl] - c["sky"][sl])
        err = np.sqrt(np.nansum(c["VARIANCE"][sl])) * conv
        assert abs(resid.sum() * conv - truth) < 5 * err + 0.01 * abs(truth)
    assert uni.truth_pixel(s["source_id"], h["OBSID"], 1 + h["DETECTOR"] % 6) is not None


def test_truth_api(uni):
    src = uni.sources
    assert set(src["var_class"].unique()) == {"constant", "periodic", "outburst", "trend", "fading_negative"}
    fad = src.filter(pl.col("var_class") == "fading_negative")["source_id"][0]
    t = np.linspace(60800, 61100, 400)
    f = uni.truth_flux(fad, 2.0, t)
    assert f.shape == (400,) and f.max() > 0 and f.min() < 0
    ids = src["source_id"].to_numpy()[:3]
    out = uni.truth_flux(ids[:, None], np.array([1.0, 3.0, 4.5])[None, :], 60850.0)
    assert out.shape == (3, 3) and np.isfinite(out).all()
    fl = uni.truth_flux(src["source_id"].to_numpy(), 2.0, 60850.0)
    cons = (src["var_class"] == "constant").to_numpy()
    assert 25 < np.percentile(fl[cons], 1) and np.percentile(fl[cons], 99) < 2.5e5 and fl.max() > 5e4
    cat = uni.catalog(n=10, field="wide_pole")
    assert cat.columns[:3] == ["source_id", "ra", "dec"] and cat.height == 10 and (cat["dec"] > 83).all()


def test_legacy_psf_headers(uni, key, hdul):
    leg = Universe(seed=1, releases=("qr2",), legacy_psf_headers=True)
    raw = leg.read(key, 0, FULL_FILE_BYTES)
    hl = fits.open(io.BytesIO(raw))
    assert hl[0].header["VERSION"] == "6.5.4" and hdul[0].header["VERSION"] == "6.5.4+psffix1"
    assert np.array_equal(hl["PSF"].data, hdul["PSF"].data)
    for hdr, legacy in ((hdul["PSF"].header, False), (hl["PSF"].header, True)):
        for k in (1, 2, 13, 121):
            ix, iy = ((k - 1) // 11, (k - 1) % 11) if legacy else ((k - 1) % 11, (k - 1) // 11)
            m = re.search(r"\((\d+)\s*,\s*(\d+)\)", hdr.comments[f"XCTR_{k}"])
            assert (int(m.group(1)), int(m.group(2))) == (ix, iy)
            assert hdr[f"XCTR_{k}"] == pytest.approx((ix + 0.5) * 2040 / 11 - 0.5, abs=1e-3)
            assert hdr[f"YCTR_{k}"] == pytest.approx((iy + 0.5) * 2040 / 11 - 0.5, abs=1e-3)
    late = uni.observations.filter(pl.col("version") == "6.5.6")
    assert late.height > 0 and leg.observations.filter(pl.col("version") == "6.5.6").height == late.height


def test_deterministic_and_seeded(uni, key):
    again, other = Universe(seed=1, releases=("qr2",)), Universe(seed=2, releases=("qr2",))
    a, b = 23040 + 8160 * 600, 23040 + 8160 * 603
    assert again.read(key, a, b) == uni.read(key, a, b)
    assert again.cutout(key, "1000,1000px", "20px") == uni.cutout(key, "1000,1000px", "20px")
    k2 = other.observations["cloud_key"][0]
    assert other.read(k2, a, b) != uni.read(uni.observations["cloud_key"][0], a, b)
    assert not other.sources["ra"].equals(uni.sources["ra"])
    with pytest.raises(KeyError):
        uni.read("qr2/level2/nope.fits", 0, 10)


def test_knobs_and_pickle(uni):
    import pickle

    small = Universe(seed=1, releases=("qr2",), deep_visits=40, wide_visits_per_pass=8, cloud_lag_fraction=0.3)
    o = small.observations
    assert 35 <= o.filter(pl.col("obs_collection") == "spherex_qr2_deep")["obs_id"].n_unique() <= 40
    assert 0.2 < 1 - o["cloud_available"].mean() < 0.4 and uni.observations["cloud_available"].all()
    back = pickle.loads(pickle.dumps(small))
    assert back.observations.equals(o)


def test_variance_understate_knob(uni):
    """``variance_understate``: VARIANCE understates the true scatter by the factor of its detector,
    IMAGE is unchanged, and the default writes the same files."""
    under = Universe(seed=1, releases=("qr2",), variance_understate={2: 2.0})
    o = uni.observations
    keys = {d: o.filter(pl.col("detector") == d)["cloud_key"][3] for d in (1, 2)}
    bad = sum(1 << FLAG_BITS[b] for b in ("TRANSIENT", "OVERFLOW", "NONFUNC", "HOT", "COLD", "OUTLIER"))
    for det, want in ((2, 2.0), (1, 1.0)):
        c, ref = under.components(keys[det], 960, 1090), uni.components(keys[det], 960, 1090)
        good = ((c["FLAGS"] & bad) == 0) & np.isfinite(c["VARIANCE"])
        pull = (c["IMAGE"] - c["sky"] - c["sources"])[good] / np.sqrt(c["VARIANCE"][good])
        assert abs(pull.std() / want - 1) < 0.03, (det, pull.std())
        assert np.array_equal(c["IMAGE"], ref["IMAGE"]) and np.array_equal(c["FLAGS"], ref["FLAGS"])
    a, b = 23040 + 8160 * 600, 23040 + 8160 * 603
    assert Universe(seed=1, releases=("qr2",), variance_understate=1.0).read(keys[2], 0, b) == uni.read(keys[2], 0, b)
    assert under.read(keys[1], a, b) == uni.read(keys[1], a, b)
    with pytest.raises(ValueError):
        Universe(seed=1, releases=("qr2",), variance_understate={7: 2.0})
    from spxframe import sim

    assert sim.serve(seed=1, variance_understate=3.0).universe.variance_understate == dict.fromkeys(range(1, 7), 3.0)


def test_flag_counts_in_header_match_flags_plane(hdul):
    """Every IMAGE ``L2 N_<FLAG>`` card counts the FLAGS plane's pixels with that bit."""
    im, fl = hdul["IMAGE"].header, hdul["FLAGS"].data
    counted = [f for f in FLAG_BITS if f"L2 N_{f}" in im]
    assert len(counted) == 14 and im["L2 N_FULLSAMPLE"] > 0 and im["L2 N_DICHROIC"] > 0
    for f in counted:
        assert im[f"L2 N_{f}"] == np.count_nonzero(fl & (1 << FLAG_BITS[f])), f


@pytest.mark.parametrize("convention", ["shift", "rebase", "resample"])
def test_cutout_wave_conventions(convention):
    """``Universe(cutout_wave_convention=...)``: however a cutout's W system is written (CRPIXnW
    shifted, the table rebased, or re-sampled for the box), astropy's W(cutout, p) equals
    W(parent, p + offset), in QR2 and QR3 cutouts; the pixels and every other HDU are unchanged."""
    u = Universe(seed=1, cutout_wave_convention=convention)
    ref = Universe(seed=1)
    for rel in ("qr2", "qr3"):
        key = u.observations.filter(pl.col("release") == rel)["cloud_key"][5]
        hp = fits.open(io.BytesIO(u.read(key)))
        for center, size in (("700.2,1300.7px", "90,70px"), ("1000,1000px", "600px"), ("3,2030px", "40px")):
            x0, y0, nx, ny = u.cutout_box(key, center, size)
            data, base = u.cutout(key, center, size), ref.cutout(key, center, size)
            hc, hb = fits.open(io.BytesIO(data)), fits.open(io.BytesIO(base))
            h = hc["IMAGE"].header
            assert h["CRPIX1W"] == (-x0 if convention == "shift" else 0)
            grid = hc["WCS-WAVE"].data["X"][0]
            assert (grid[0], grid[-1]) == ((0.5, nx + 0.5) if convention == "resample" else
                                           (hb["WCS-WAVE"].data["X"][0][0] - (x0 if convention == "rebase" else 0),
                                            hb["WCS-WAVE"].data["X"][0][-1] - (x0 if convention == "rebase" else 0)))
            for i in range(len(hb)):
                if hb[i].name != "WCS-WAVE":
                    assert hb[i].data is None or np.asarray(hc[i].data).tobytes() == np.asarray(hb[i].data).tobytes()
                    keep = [k for k in hb[i].header if not k.startswith("CRPIX") or not k.endswith("W")]
                    assert all(hc[i].header[k] == hb[i].header[k] for k in keep if k not in ("COMMENT", "HISTORY", ""))
            xc, yc = np.array([0.0, nx - 1.0, nx / 3, -0.5]), np.array([0.0, ny - 1.0, ny / 2, ny - 0.5])
            wave_c = np.array(_wcs_w(h, hc).pixel_to_world_values(xc, yc))
            wave_p = np.array(_wcs_w(hp["IMAGE"].header, hp).pixel_to_world_values(xc + x0, yc + y0))
            assert np.abs(wave_c - wave_p).max() < 1e-9, (rel, center)
    with pytest.raises(ValueError):
        Universe(seed=1, cutout_wave_convention="sideways")
