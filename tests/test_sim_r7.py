"""The simulated archive's R7 (QR3) pieces, read back with real astropy: the L2 file with RICE_1
FLAGS, the EPSF table, the 9x9 WCS-WAVE grid, the QR3 flag patches, the pre-R7 gain map and the
calibration products (spec §3.9, §3.10, §4)."""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings

import numpy as np
import polars as pl
import pytest
import pyvo
import requests
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS

from spxframe import sim
from spxframe.sim import Universe
from spxframe.sim.r7 import calib, epsf, gains, mef, qr3flags, rice
from spxframe.sim.r7.bits import R7_BIT, R7_FLAG_BITS, R7_NEW_BITS, bits_from_mskn
from spxframe.sim.world import instrument as ins
from spxframe.spherex import BLOCK, MJY_SR_TO_UJY_PER_ARCSEC2, NPIX, QR2_LAYOUT

warnings.filterwarnings("ignore", module="astropy.wcs")
PLANES = ("IMAGE", "FLAGS", "VARIANCE", "ZODI")


@pytest.fixture(scope="module")
def uni() -> Universe:
    return Universe(seed=1)


def _frame(uni, det: int, nth: int):
    """The nth frame of a detector with over 300 sources on it."""
    keys = (k for k in uni.observations.filter(pl.col("detector") == det)["cloud_key"]
            if uni.frame_sources(k).height > 300)
    key = next(k for i, k in enumerate(keys) if i == nth)
    hdr = {n: uni.read(key, QR2_LAYOUT[n][0], QR2_LAYOUT[n][1]) for n in ("PRIMARY", *PLANES)}
    planes = {n: np.frombuffer(uni.read(key, QR2_LAYOUT[n][1], QR2_LAYOUT[n][2]),
                               ">i4" if n == "FLAGS" else ">f4").reshape(NPIX, NPIX) for n in PLANES}
    return key, hdr, planes


@pytest.fixture(scope="module")
def d3(uni):
    """A full D3 frame: key, QR2 headers, planes, and its R7 file bytes."""
    key, hdr, planes = _frame(uni, 3, 0)
    return key, hdr, planes, mef.write_r7(planes, hdr, 3)


@pytest.fixture(scope="module")
def hdul(d3):
    with fits.open(io.BytesIO(d3[3])) as hl:
        hl.readall()
        yield hl


# ----------------------------------------------------------------------------- the L2 file

def test_astropy_reads_r7_file_back(d3, hdul):
    _, _, planes, raw = d3
    assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "FLAGS", "VARIANCE", "ZODI", "EPSF", "WCS-WAVE"]
    assert hdul[0].header["VERSION"].startswith("7.0.") and hdul["IMAGE"].header["VERSION"] == hdul[0].header["VERSION"]
    assert isinstance(hdul["FLAGS"], fits.CompImageHDU)
    for n in PLANES:
        np.testing.assert_array_equal(hdul[n].data, planes[n])  # compressed FLAGS equal the input bits
    np.testing.assert_array_equal(hdul["FLAGS"].section[700:705, 3:2000], planes["FLAGS"][700:705, 3:2000])
    c = hdul["FLAGS"]._bintable.header
    assert (c["ZCMPTYPE"], c["ZBITPIX"], c["ZNAXIS1"], c["ZNAXIS2"], c["ZTILE1"], c["ZTILE2"]) == \
        ("RICE_1", 32, NPIX, NPIX, NPIX, 1)
    assert (c["ZNAME1"], c["ZVAL1"], c["ZNAME2"], c["ZVAL2"], c["NAXIS1"]) == ("BLOCKSIZE", 32, "BYTEPIX", 4, 8)
    assert c["TFORM1"].startswith("1PB(") and c["NAXIS2"] == NPIX
    assert bits_from_mskn(hdul["FLAGS"].header) == R7_FLAG_BITS
    assert not any(k.startswith("MP_") for k in hdul["FLAGS"].header)
    assert hdul["IMAGE"].header["L2 N_BLOOM"] == 0 and hdul["IMAGE"].header["L2 N_SOURCE"] > 0
    info = hdul.fileinfo
    blocks = {h.name: (info(i)["datLoc"] - info(i)["hdrLoc"]) // BLOCK for i, h in enumerate(hdul)}
    assert (blocks["PRIMARY"], blocks["IMAGE"], blocks["FLAGS"], blocks["VARIANCE"], blocks["ZODI"]) == (1, 8, 6, 4, 4)
    assert len(raw) % BLOCK == 0


def test_offsets_follow_the_compressed_flags(uni, d3, hdul):
    _, hdr, planes, raw = d3
    f = mef.R7File(mef.r7_headers(hdr), lambda n, r0, r1: planes[n][r0:r1], (NPIX, NPIX), epsf.epsf_hdu(3),
                   mef.wave_hdu(3))
    off = f.offsets()
    for i, h in enumerate(hdul):
        assert (hdul.fileinfo(i)["hdrLoc"], hdul.fileinfo(i)["datLoc"]) == off[h.name][:2]
    assert f.size == len(raw) and off["FLAGS"][2] - off["FLAGS"][1] == f.tiles.data_size
    # another frame, and the same frame with more flags: different FLAGS lengths, so different offsets
    _, hdr2, planes2, = _frame(uni, 3, 1)
    g = mef.R7File(mef.r7_headers(hdr2), lambda n, r0, r1: planes2[n][r0:r1], (NPIX, NPIX), epsf.epsf_hdu(3),
                   mef.wave_hdu(3))
    more = planes["FLAGS"] | np.where(np.arange(NPIX)[None, :] % 7 == 0, R7_BIT["GHOST"], 0).astype(np.int32)
    h = mef.R7File(mef.r7_headers(hdr), lambda n, r0, r1: (more if n == "FLAGS" else planes[n])[r0:r1],
                   (NPIX, NPIX), epsf.epsf_hdu(3), mef.wave_hdu(3))
    starts = {x.offsets()["VARIANCE"][0] for x in (f, g, h)}
    assert len(starts) == 3 and len({x.offsets()["EPSF"][0] for x in (f, g, h)}) == 3
    assert off["IMAGE"] == g.offsets()["IMAGE"]  # everything before FLAGS stays put
    assert abs(mef.estimate_size(3) - f.size) < 0.05 * f.size  # the plan-time estimate is close


def test_image_header_counts_the_new_bits(d3):
    hdr = d3[1]
    h = fits.Header.fromstring(mef.image_header(hdr["IMAGE"], {"BLOOM": 17, "GHOST": 3}).decode())
    q = fits.Header.fromstring(hdr["IMAGE"].decode())
    assert (h["L2 N_BLOOM"], h["L2 N_GHOST"], h["L2 N_STREAK"]) == (17, 3, 0)
    assert h["L2 N_SOURCE"] == q["L2 N_SOURCE"] and h["VERSION"] == mef.R7_VERSION
    assert [k for k in h if k.startswith("CRPIX")] == [k for k in q if k.startswith("CRPIX")]


def test_byte_ranges_are_lazy_and_equal_the_file(d3):
    _, hdr, planes, raw = d3
    calls = []

    def rows(n, r0, r1):
        calls.append((n, r0, r1))
        return planes[n][r0:r1]

    f = mef.R7File(mef.r7_headers(hdr), rows, (NPIX, NPIX), epsf.epsf_hdu(3), mef.wave_hdu(3))
    img_end = 9 * BLOCK + 4 * NPIX * NPIX
    assert f.read(0, img_end) == raw[:img_end]
    assert f.tiles._lengths is None and not any(n == "FLAGS" for n, *_ in calls)  # IMAGE needs no FLAGS
    for a, b in ((100, 30_000), (img_end - 50, img_end + 9_000_000), (len(raw) - 7_000, len(raw) + 99)):
        assert f.read(a, b) == raw[a:b]
    # with the tile-length table cached, a heap range compresses only the strips it touches
    calls.clear()
    g = mef.R7File(mef.r7_headers(hdr), rows, (NPIX, NPIX), epsf.epsf_hdu(3), mef.wave_hdu(3),
                   lengths=f.tiles.lengths)
    fo = g.offsets()["FLAGS"]
    heap0 = fo[1] + 8 * NPIX + int(g.tiles.offsets[1000])
    assert g.read(heap0, heap0 + 5000) == raw[heap0:heap0 + 5000]
    assert {r0 for n, r0, _ in calls if n == "FLAGS"} <= {960, 1024}


def test_codec_is_astropys_own():
    rng = np.random.default_rng(3)
    a = (rng.integers(0, 4, (70, 333)) << 20 | rng.integers(0, 2, (70, 333))).astype(np.int32)
    assert rice.encode_rows(a) == rice.encode_rows_public(a)
    t = rice.TileTable(lambda r0, r1: a[r0:r1], a.shape, strip=16)
    hdu = fits.CompImageHDU(a, compression_type="RICE_1", tile_shape=(1, a.shape[1]), name="FLAGS")
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
    assert t.read_data(0, t.data_size) == buf.getvalue()[-t.data_size:]  # descriptors and heap as astropy writes
    np.testing.assert_array_equal(rice.decode_tile(t.tiles(5, 6)[0], a.shape[1]), a[5])


def test_cutout_tiles_are_the_cutout_width(uni, d3):
    key = d3[0]
    src = uni.frame_sources(key).row(10, named=True)
    q = uni.cutout(key, f"{src['x']:.1f},{src['y']:.1f}px", "61px")
    with fits.open(io.BytesIO(q)) as hl:
        hdr = {n: hl[n].header.tostring().encode() for n in ("IMAGE", "FLAGS", "VARIANCE", "ZODI")}
        hdr["PRIMARY"] = hl[0].header.tostring().encode()
        planes = {n: hl[n].data for n in PLANES}
    ny, nx = planes["IMAGE"].shape
    raw = mef.write_r7(planes, hdr, 3)
    with fits.open(io.BytesIO(raw)) as hl:
        np.testing.assert_array_equal(hl["FLAGS"].data, planes["FLAGS"])
        assert hl["FLAGS"]._bintable.header["ZTILE1"] == nx and hl["FLAGS"].header["CRPIX1A"] == hdr_crpix(hdr)
        assert hl["EPSF"].data["EPSF"].shape == (451, 33, 33)
    plain = mef.write_r7(planes, hdr, 3, compress_flags=False)
    with fits.open(io.BytesIO(plain)) as hl:
        assert not isinstance(hl["FLAGS"], fits.CompImageHDU)
        np.testing.assert_array_equal(hl["FLAGS"].data, planes["FLAGS"])
        assert bits_from_mskn(hl["FLAGS"].header)["BLOOM"] == 26


def hdr_crpix(hdr):
    return fits.Header.fromstring(hdr["FLAGS"].decode())["CRPIX1A"]


def test_flags_write_speed(d3):
    """One full file's FLAGS (2040 one-row tiles): compress, tile table, HDU bytes."""
    _, hdr, planes, _ = d3
    t0 = time.perf_counter()
    t = rice.TileTable(lambda r0, r1: planes["FLAGS"][r0:r1], (NPIX, NPIX), keep=64)
    head = mef.flags_header(mef.flags_cards(hdr["FLAGS"]), NPIX, NPIX, t)
    body = t.read_data(0, t.data_size)
    dt = time.perf_counter() - t0
    print(f"\nR7 FLAGS of one full file: {dt:.3f} s, heap {t.heap_size / 1e6:.2f} MB, "
          f"HDU {len(head) + len(body)} bytes")
    assert dt < 5.0 and len(head) == 6 * BLOCK


# ----------------------------------------------------------------------------- EPSF and WCS-WAVE

def test_epsf_table_layout_and_spellings():
    for det, token, shape in ((1, None, (21, 21)), (3, "cal-epsf-v1-2026-127", (21, 21)), (3, None, (11, 41))):
        h, d = epsf.epsf_hdu(det, token)
        with fits.open(io.BytesIO(b"".join(_primary()) + h + d)) as hl:
            t, hd = hl["EPSF"].data, hl["EPSF"].header
            assert len(t) == shape[0] * shape[1] and t["EPSF"].shape == (len(t), 33, 33)
            assert (hd["OVSMPX"], hd["OVSMPY"], hd["DETCOORD"], hd["DETECTOR"]) == (5, 5, "sky", det)
            assert hd["ORDERING"] == "x-fast then y"
            assert str(hd["HISTORY"][0]).startswith(f"Calibration source file: epsf_{det}_2026")
            assert t["BINX"].max() + 1 == shape[0] and t["BINY"].max() + 1 == shape[1]
            np.testing.assert_array_equal(t["BINX"][:shape[0]], np.arange(shape[0]))  # x-fast rows
            np.testing.assert_allclose(t["XCENTER"][:2], (np.arange(2) + 0.5) * NPIX / shape[0] - 0.5, atol=1e-3)
            np.testing.assert_allclose(t["EPSF"].sum(axis=(1, 2)), 1.0, rtol=1e-12)
            assert np.all(t["CWAVE"] > ins.BANDS[f"D{det}"][0] - 0.01) and np.all(t["NEFF_MEAN"] > 2)
    h, d = epsf.epsf_hdu(1, spelling="short", tdim=False)
    with fits.open(io.BytesIO(b"".join(_primary()) + h + d)) as hl:
        hd, t = hl["EPSF"].header, hl["EPSF"].data
        assert hd["OVERSAMP"] == 5 and "OVSMPX" not in hd and "TDIM11" not in hd
        assert {"XCTR", "YCTR", "NEFF"} <= set(t.columns.names) and "XCENTER" not in t.columns.names
        np.testing.assert_array_equal(t["EPSF"].reshape(-1, 33, 33), epsf.library(1)["epsf"])
    assert len(h) + len(d) == epsf.epsf_hdu_size(1, spelling="short", tdim=False)


def _primary():
    yield mef.block([mef.image("SIMPLE", True), mef.image("BITPIX", 8), mef.image("NAXIS", 0),
                     mef.image("EXTEND", True)], 1)


def test_epsf_is_the_rendered_psf_times_the_pixel_response():
    """At sample phases on native pixel centres, 25 x ePSF x (its enclosed fraction) is the
    renderer's own pixel value per unit flux; between them it is the pixel-integrated PSF."""
    from spxframe.sim.world.frame import _binned_psf

    for det in (1, 3, 6):
        lib = epsf.library(det)
        par = ins.psf_params(det)
        _, sums = ins.psf_cube(det)
        assert np.array_equal(lib["plane"], epsf.render_planes(det, lib["xcenter"], lib["ycenter"]))
        for k in (0, len(lib["plane"]) // 2, len(lib["plane"]) - 1):
            p = int(lib["plane"][k])
            for a, b in ((0, 0), (2, 1), (4, 3)):  # source offsets (a/5, b/5) px from a pixel centre
                stamp = _binned_psf(par[p:p + 1, :5].copy(), np.array([-5.0 - a / 5]), np.array([-5.0 - b / 5]))[0]
                stamp /= sums[p]  # pixel (j, i) centre lies (i - 5 - a/5, j - 5 - b/5) px from the source
                e = 25 * lib["epsf"][k] * lib["enclosed"][k]
                np.testing.assert_allclose(e[(16 - b) % 5::5, (16 - a) % 5::5], _phase_cut(stamp, a, b),
                                           rtol=1e-9, atol=1e-15)
        # an independent dense integration of the analytic PSF over the pixel agrees
        p = int(lib["plane"][0])
        fine = (np.arange(40) - 19.5) / 40
        dx, dy = np.meshgrid(0.4 + fine, -0.2 + fine)
        dense = ins.psf_eval(par[p], dx, dy).mean() / (sums[p] / 100)
        assert abs(25 * lib["epsf"][0][16 - 1, 16 + 2] * lib["enclosed"][0] - dense) < 2e-3 * dense


def _phase_cut(stamp: np.ndarray, a: int, b: int) -> np.ndarray:
    """The stamp pixels whose centres fall on ePSF samples (offsets within +-3.2 px)."""
    # sample index along x of stamp column i: 16 + 5 * (i - 5) - a, kept when within 0..32
    cols = [i for i in range(12) if 0 <= 16 + 5 * (i - 5) - a <= 32]
    rows = [j for j in range(12) if 0 <= 16 + 5 * (j - 5) - b <= 32]
    return stamp[np.ix_(rows, cols)]


def test_epsf_gives_unbiased_aperture_fluxes():
    """A client's aperture correction from the ePSF (bicubic between samples, nearest zone)
    recovers the rendered flux of point sources anywhere on the detector."""
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(5)
    for det in (1, 3, 6):
        lib, par, (_, sums) = epsf.library(det), ins.psf_params(det), ins.psf_cube(det)
        ratio = []
        for x, y in rng.uniform(0, NPIX - 1, (150, 2)):
            ix, iy = ins.zone_of(x, y)
            p = int(iy * 11 + ix)
            k = int(np.argmin((lib["xcenter"] - x) ** 2 + (lib["ycenter"] - y) ** 2))
            px, py = np.meshgrid(np.arange(np.floor(x) - 3, np.floor(x) + 5),
                                 np.arange(np.floor(y) - 3, np.floor(y) + 5))
            on = (px - x) ** 2 + (py - y) ** 2 <= 2.0**2
            true = epsf.pixel_fraction(par[p], sums[p], px[on] - x, py[on] - y).sum()
            est = 25 * map_coordinates(lib["epsf"][k], [(py[on] - y) * 5 + 16, (px[on] - x) * 5 + 16], order=3).sum()
            ratio.append(true / est)
        ratio = np.array(ratio)
        assert abs(np.median(ratio) - 1) < 0.004 and np.all(np.abs(ratio - 1) < 0.008), (det, ratio.min(), ratio.max())


def test_r7_wave_grid(hdul):
    t = hdul["WCS-WAVE"].data
    assert t["X"].shape == (1, 9) and np.all(np.diff(t["X"][0]) == 255) and t["VALUES"].shape == (1, 9, 9, 2)
    w = WCS(hdul["IMAGE"].header, fobj=hdul, key="W")
    w.sip = None
    x, y = np.array([10.0, 1000.0, 2030.0]), np.array([20.0, 1500.0, 2035.0])
    lam, band = w.wcs_pix2world(x, y, 0)
    truth = ins.lvf_wavelength(3, x, y)
    np.testing.assert_allclose(lam, truth, rtol=1e-3)
    np.testing.assert_allclose(band, truth / 41.0, rtol=2e-3)


# ----------------------------------------------------------------------------- QR3 flags

@pytest.fixture(scope="module")
def patches(uni, d3):
    src = uni.frame_sources(d3[0])
    x, y, flux, om = (src[c].to_numpy() for c in ("x", "y", "flux", "omega"))
    peak = flux / (om * MJY_SR_TO_UJY_PER_ARCSEC2)
    sat = peak > np.quantile(peak, 0.995)
    return qr3flags.Patches.draw(1, 0, 3, x, y, peak, sat, qr3flags.PatchConfig(fraction=0.2)), x, y, peak, sat


def test_qr3_patches_flag_exactly_the_light_they_add(patches):
    p, x, y, peak, sat = patches
    flags, img = p.paint(0, NPIX)
    assert img[flags == 0].max() == 0 and np.count_nonzero(img) > 0
    for name in ("BLOOM", "HALO", "GHOST", "CROSSTALK", "STREAK"):
        assert np.any(flags & R7_BIT[name]), name
    contaminated = img != 0
    assert np.all(flags[contaminated] & (R7_BIT["GHOST"] | R7_BIT["CROSSTALK"] | R7_BIT["STREAK"]
                                         | R7_BIT["SNOWBALL"] | R7_BIT["GHOST_FPA"]))
    # BLOOM covers every saturated source's whole core (the 2 px aperture)
    for i in np.flatnonzero(sat)[:20]:
        yy, xx = np.mgrid[int(y[i]) - 3:int(y[i]) + 4, int(x[i]) - 3:int(x[i]) + 4]
        ok = (yy >= 0) & (yy < NPIX) & (xx >= 0) & (xx < NPIX) & ((xx - x[i]) ** 2 + (yy - y[i]) ** 2 <= 4)
        assert np.all(flags[yy[ok], xx[ok]] & R7_BIT["BLOOM"])
    counts = p.counts()
    assert counts == {n: int(np.count_nonzero(flags & R7_BIT[n])) for n in R7_NEW_BITS}
    f2, i2 = p.paint(1000, 1100, 300, 700)
    np.testing.assert_array_equal(f2, flags[1000:1100, 300:700])
    np.testing.assert_array_equal(i2, img[1000:1100, 300:700])


def test_keeping_qr3_patches_biases_the_flux(patches):
    """The patched sources' 2 px aperture flux: +-several % if the new bits are kept."""
    p, x, y, peak, sat = patches
    flags, img = p.paint(0, NPIX)
    rel = []
    for k in np.flatnonzero(np.isin(p.bit, [R7_NEW_BITS["GHOST"], R7_NEW_BITS["CROSSTALK"]])):
        i = int(p.source[k])
        yy, xx = np.mgrid[int(y[i]) - 3:int(y[i]) + 4, int(x[i]) - 3:int(x[i]) + 4]
        ok = (yy >= 0) & (yy < NPIX) & (xx >= 0) & (xx < NPIX) & ((xx - x[i]) ** 2 + (yy - y[i]) ** 2 <= 4)
        rel.append((img[yy[ok], xx[ok]].sum() / peak[i], p.bit[k]))
    ghost = np.array([r for r, b in rel if b == R7_NEW_BITS["GHOST"]])
    xtalk = np.array([r for r, b in rel if b == R7_NEW_BITS["CROSSTALK"]])
    assert ghost.size > 5 and np.median(ghost) > 0.05
    assert xtalk.size > 5 and np.median(xtalk) < -0.03


# ----------------------------------------------------------------------------- gains and cal products

def test_pre_r7_gain_map():
    f1 = gains.gain_map(1, 1)
    good = f1[(f1 >= 0.5) & (f1 <= 2)]
    assert 0.965 < np.median(good) < 0.975 and 0.86 < good.min() < 0.89 and 0.975 < good.max() < 0.995
    rows = np.median(f1, axis=1)
    assert rows[0] < 0.885 and rows[-1] > 0.978 and np.all(np.diff(rows[::100]) > 0)  # along the dispersion axis
    assert 1.004 < np.median(gains.gain_map(1, 5, 0, 300)) < 1.010
    for det in (2, 3, 4, 6):
        assert abs(np.median(gains.gain_map(1, det, 900, 1100)) - 1) < 0.01
    bad = ins.bad_pixels(1, 1)["NONFUNC"]
    assert np.all(f1.reshape(-1)[bad] < 0.5) and (good.size + bad.size == f1.size)
    np.testing.assert_array_equal(gains.gain_map(1, 1, 700, 720, 40, 90), f1[700:720, 40:90])
    img, var = np.full((20, 50), 3.0, np.float32), np.full((20, 50), 0.01, np.float32)
    q_img, q_var = gains.to_qr2(img, var, f1[700:720, 40:90])
    d = gains.qr2_divisor(f1[700:720, 40:90])
    np.testing.assert_allclose(q_img * d, img, rtol=1e-6)
    np.testing.assert_allclose(q_var * d * d, var, rtol=1e-6)


def _open(cal: calib.CalFile):
    raw = cal.read()
    assert len(raw) == cal.size == calib.product_size(1, cal.release, cal.family, cal.det, cal.token)
    return fits.open(io.BytesIO(raw))


def test_calibration_products(uni, d3, hdul):
    with _open(calib.product(1, "qr3", "l3_flux_corrections", 1)) as hl:
        assert hl["FLUX_CORRECTION"].data.shape == (NPIX, NPIX)
        np.testing.assert_array_equal(hl["FLUX_CORRECTION"].data[::97], gains.gain_map(1, 1)[::97])
    with _open(calib.product(1, "qr3", "spectral_wcs", 5)) as hl:
        cw, cb = hl["CWAVE"].data, hl["CBAND"].data
        assert u.Unit(hl["CWAVE"].header["BUNIT"]) == u.um and cw.shape == cb.shape == (NPIX, NPIX)
        assert 3.82 <= cw.min() < cw.max() <= 4.42 and hl["WCS-WAVE"].data["X"].shape == (1, 9)
        np.testing.assert_allclose(cb, cw / 112.0, rtol=1e-6)
    with _open(calib.product(1, "qr2", "spectral_wcs", 5)) as hl:
        assert hl["WCS-WAVE"].data["X"].shape == (1, 11)
    with _open(calib.product(1, "qr2", "solid_angle_pixel_map", 4)) as hl:
        s = hl["SAPM"].data
        assert u.Unit(hl["SAPM"].header["BUNIT"]) == u.arcsec**2 and s.shape == (NPIX, NPIX)
        assert 37.0 < np.median(s) < 38.8
        key = uni.observations.filter(pl.col("detector") == 4)["cloud_key"][0]
        src = uni.frame_sources(key).filter((pl.col("x") > 0) & (pl.col("x") < NPIX - 1)
                                            & (pl.col("y") > 0) & (pl.col("y") < NPIX - 1)).head(50)
        at = s[np.round(src["y"].to_numpy()).astype(int), np.round(src["x"].to_numpy()).astype(int)]
        np.testing.assert_allclose(at, src["omega"].to_numpy(), rtol=2e-4)  # the renderer's Ω at the source
    with _open(calib.product(1, "qr3", "epsf", 3)) as hl:
        assert hl[0].header["CALTOKEN"] == "cal-epsf-v2-2026-160" and len(hl["EPSF"].data) == 451
    cal = calib.product(1, "qr3", "epsf", 3)
    file_epsf = _hdu_bytes(hdul, d3[3], "EPSF")
    assert cal.read(BLOCK, cal.size) == file_epsf  # the table the QR3 file carries, byte for byte
    with _open(calib.product(1, "qr2", "average_psf", 2, "cal-psf-v5-2026-082")) as hl:
        assert hl["PSF"].data.shape == (121, 101, 101)
    psf = calib.product(1, "qr2", "average_psf", 2, "cal-psf-v5-2026-082")
    v21 = uni.observations.filter((pl.col("detector") == 2) & (pl.col("version") == "6.5.6"))["cloud_key"][0]
    a, _, c = QR2_LAYOUT["PSF"]
    assert psf.read(BLOCK, psf.size) == uni.read(v21, a, c)  # the L2 files' PSF HDU, byte for byte
    with pytest.raises(KeyError):
        calib.product(1, "qr2", "epsf", 1)


def _hdu_bytes(hl, raw: bytes, name: str) -> bytes:
    info = hl.fileinfo([h.name for h in hl].index(name))
    return raw[info["hdrLoc"]:info["datLoc"] + info["datSpan"]]


def test_cal_paths_and_listing():
    assert calib.path("qr3", "epsf", "cal-epsf-v2-2026-160", 3) == \
        "qr3/epsf/cal-epsf-v2-2026-160/3/epsf_D3_spx_cal-epsf-v2-2026-160.fits"
    assert calib.latest("qr3", "epsf", 3).startswith("cal-epsf-v2")
    assert calib.latest("qr3", "epsf", 1).startswith("cal-epsf-v1")
    assert calib.latest("qr2", "l3_flux_corrections", 1) is None
    lines = [json.loads(s) for s in calib.listing(1, "qr3", "epsf").splitlines()]
    assert len(lines) == 7 and all(set(x) == {"name", "last_modified", "size"} for x in lines)
    names = [x["name"] for x in lines]
    assert "cal-epsf-v2-2026-160/3/epsf_D3_spx_cal-epsf-v2-2026-160.fits" in names
    assert lines[0]["last_modified"].startswith("2026-05-07")
    d1 = next(x for x in lines if x["name"].startswith("cal-epsf-v1-2026-127/1/"))
    assert d1["size"] == calib.product(1, "qr3", "epsf", 1).size
    flx = [json.loads(s) for s in calib.listing(1, "qr3", "l3_flux_corrections").splitlines()]
    assert len(flx) == 6 and flx[0]["size"] == calib.product(1, "qr3", "l3_flux_corrections", 1).size
    assert calib.listing(1, "qr2", "l3_flux_corrections") == ""


# ----------------------------------------------------------------------------- the two-release archive

QR3_FROM = 61241.0


@pytest.fixture(scope="module")
def qr2only() -> Universe:
    return Universe(seed=1, releases=("qr2",))


def test_qr3_rows_only_from_the_release_boundary(uni, qr2only):
    o, o2 = uni.observations, qr2only.observations
    q3 = o.filter(pl.col("release") == "qr3")
    q2 = o.filter(pl.col("release") == "qr2")
    assert set(q3["obs_collection"].unique()) == {"spherex_qr3", "spherex_qr3_deep"}
    assert set(q2["obs_collection"].unique()) == {"spherex_qr2", "spherex_qr2_deep"}
    assert q3["t_min"].min() >= QR3_FROM and q2["t_max"].max() < QR3_FROM
    # no new QR2 row: the QR2 rows are the QR2-only sky's, in the same order, before every QR3 row
    assert q2.height == o2.height and o.head(o2.height).drop("contentlength").equals(o2.drop("contentlength"))
    assert q3["obs_index"].min() > q2["obs_index"].max()
    # each wide field: one pass starting within MJD 61241-61250; the deep field weekly to ~61300
    for name in ("wide_generic", "wide_ra0", "wide_pole"):
        t = q3.filter(pl.col("field") == name)["t_min"]
        assert t.len() > 0 and QR3_FROM <= t.min() and t.max() < 61250.0
    deep = q3.filter(pl.col("obs_collection") == "spherex_qr3_deep")["t_min"].to_numpy()
    weeks = np.unique(np.floor((deep - QR3_FROM) / 7.0))
    assert len(weeks) >= 8 and 61290.0 < deep.max() < 61305.0
    assert q3["version"].str.starts_with("7.0.").all() and q3["obs_id"].n_unique() * 6 >= q3.height
    assert q3["uri"].str.contains(r"^ibe/data/spherex/qr3/level2/\d{4}W\d{2}_\d[A-D]/l2b-v27-2026-223/[1-6]/"
                                  r"level2_\S+D[1-6]_spx_l2b-v27-2026-223\.fits$").all()
    assert o["obs_publisher_did"].n_unique() == o.height and o["planeid"].n_unique() == o.height


def test_truth_flux_is_one_truth(uni, qr2only):
    ids = uni.sources["source_id"].to_numpy()[::50]
    t = np.array([60810.0, 60900.0, 61050.0, 61245.0, 61300.0])[:, None]
    a, b = uni.truth_flux(ids[None], 2.1, t), qr2only.truth_flux(ids[None], 2.1, t)
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a))


def test_qr2_pixels_are_on_the_pre_r7_gains(uni, qr2only):
    """With QR3 in the sky, QR2 IMAGE x f and VARIANCE x f^2 are the R7-gain (QR2-only sky) pixels;
    ZODI, FLAGS and the headers are unchanged; with releases=("qr2",) the planes are the truth's."""
    key = uni.observations.filter((pl.col("detector") == 1) & (pl.col("release") == "qr2"))["cloud_key"][3]
    lo, hi = QR2_LAYOUT["IMAGE"][0], QR2_LAYOUT["ZODI"][2]
    a, b = uni.read(key, lo, hi), qr2only.read(key, lo, hi)
    for n in ("IMAGE", "FLAGS", "VARIANCE", "ZODI"):
        h0, d0, d1 = (x - lo for x in QR2_LAYOUT[n])
        assert a[h0:d0] == b[h0:d0], n  # headers unchanged
        pa = np.frombuffer(a[d0:d1], ">i4" if n == "FLAGS" else ">f4")[:NPIX * NPIX].reshape(NPIX, NPIX)
        pb = np.frombuffer(b[d0:d1], ">i4" if n == "FLAGS" else ">f4")[:NPIX * NPIX].reshape(NPIX, NPIX)
        if n in ("FLAGS", "ZODI"):
            np.testing.assert_array_equal(pa, pb)
            continue
        f = gains.gain_map(1, 1).astype(np.float64)
        good = (f > 0.5) & np.isfinite(pb)
        expect = pb[good] / (f[good] if n == "IMAGE" else f[good] ** 2)
        np.testing.assert_allclose(pa[good], expect, rtol=2e-7, atol=1e-30)
        ratio = np.nanmedian(pb[good] / pa[good])
        assert (0.96 < ratio < 0.98) if n == "IMAGE" else (0.92 < ratio < 0.96)  # D1: f ~ 0.97


@pytest.fixture(scope="module")
def arc(uni):
    with sim.serve(universe=uni) as a:
        yield a


@pytest.fixture(scope="module")
def qr3key(uni):
    o = uni.observations.filter((pl.col("release") == "qr3") & (pl.col("detector") == 2))
    return next(k for k in o["cloud_key"] if uni.frame_sources(k).height > 200)


def test_r7_file_over_http(uni, arc, qr3key):
    url = f"{arc.url}/ibe/data/spherex/{qr3key}"
    head = requests.head(url)
    raw = requests.get(url).content
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(raw) == uni.file_size(qr3key)
    part = requests.get(url, headers={"Range": "bytes=5000000-5099999"})
    assert part.status_code == 206 and part.content == raw[5_000_000:5_100_000]
    cloud = requests.get(f"{arc.cloud_url}/{qr3key}", headers={"Range": f"bytes={len(raw) - 4000}-"})
    assert cloud.status_code == 206 and cloud.content == raw[-4000:]
    with fits.open(io.BytesIO(raw)) as hl:
        assert [h.name for h in hl] == ["PRIMARY", "IMAGE", "FLAGS", "VARIANCE", "ZODI", "EPSF", "WCS-WAVE"]
        assert hl[0].header["VERSION"].startswith("7.0.") and isinstance(hl["FLAGS"], fits.CompImageHDU)
        assert bits_from_mskn(hl["FLAGS"].header) == R7_FLAG_BITS
        assert hl["WCS-WAVE"].data["VALUES"].shape == (1, 9, 9, 2) and "NEFF_MEAN" in hl["EPSF"].columns.names
        flags = hl["FLAGS"].data
        img = hl["IMAGE"].data
        for name, b in R7_NEW_BITS.items():
            assert hl["IMAGE"].header[f"L2 N_{name}"] == int(np.count_nonzero(flags & (1 << b)))
    # the new bits are exactly the patches drawn for the frame, their light is in IMAGE
    p = uni._r7.patches(uni.row(qr3key))
    drawn, light = p.paint(0, NPIX)
    new = sum(1 << b for b in R7_NEW_BITS.values())
    np.testing.assert_array_equal(flags & new, drawn)
    assert np.count_nonzero(drawn & (R7_BIT["GHOST"] | R7_BIT["CROSSTALK"] | R7_BIT["STREAK"])) > 0
    comp = uni.components(qr3key, 600, 700)
    np.testing.assert_array_equal(comp["IMAGE"], img[600:700])
    assert comp["FLAGS"].tolist() == flags[600:700].tolist()
    assert uni.md5(qr3key) == hashlib.md5(raw).hexdigest()


def test_r7_cutout_over_http(uni, arc, qr3key):
    src = uni.frame_sources(qr3key).filter((pl.col("x") > 100) & (pl.col("x") < 1900) & (pl.col("y") > 100)
                                           & (pl.col("y") < 1900)).row(0, named=True)
    url = f"{arc.url}/ibe/data/spherex/{qr3key}"
    r = requests.get(url, params={"center": f"{src['x']:.2f},{src['y']:.2f}px", "size": "31px"})
    assert r.status_code == 200
    x0, y0, nx, ny = uni.cutout_box(qr3key, f"{src['x']:.2f},{src['y']:.2f}px", "31px")
    with fits.open(io.BytesIO(requests.get(url).content)) as full, fits.open(io.BytesIO(r.content)) as cut:
        assert isinstance(cut["FLAGS"], fits.CompImageHDU) and cut[0].header["VERSION"].startswith("7.0.")
        for n in ("IMAGE", "FLAGS", "VARIANCE", "ZODI"):
            np.testing.assert_array_equal(cut[n].data, full[n].data[y0:y0 + ny, x0:x0 + nx])
        assert cut["EPSF"].data.tobytes() == full["EPSF"].data.tobytes()  # the EPSF table whole
        w = WCS(cut["IMAGE"].header).celestial
        assert np.allclose(w.all_pix2world(0, 0, 0), WCS(full["IMAGE"].header).celestial.all_pix2world(x0, y0, 0))
    plain = Universe(seed=1, qr3_cutout_flags_compressed=False).cutout(qr3key, "1000,1000px", "20px")
    with fits.open(io.BytesIO(plain)) as hl:
        assert not isinstance(hl["FLAGS"], fits.CompImageHDU) and hl["FLAGS"].data.shape == (20, 20)


def test_qr3_in_tap_and_cal_products_served(uni, arc):
    tap = pyvo.dal.TAPService(arc.tap_url)
    t = tap.search("SELECT obs_collection, t_min FROM spherex.obscore "
                   "WHERE obs_collection IN ('spherex_qr3', 'spherex_qr3_deep')").to_table()
    o3 = uni.observations.filter(pl.col("release") == "qr3")
    assert len(t) == o3.height and float(np.min(t["t_min"])) >= QR3_FROM
    t = tap.search("SELECT obs_collection FROM spherex.obscore WHERE t_min < 61241").to_table()
    assert set(t["obs_collection"]) == {"spherex_qr2", "spherex_qr2_deep"}
    t = tap.search("SELECT a.uri, a.contentlength FROM spherex.artifact a JOIN spherex.plane p ON "
                   "a.planeid = p.planeid WHERE p.provenance_version LIKE '7.0.%'").to_table()
    assert len(t) == o3.height and all(str(u).startswith("ibe/data/spherex/qr3/") for u in t["uri"])
    t = tap.search("SELECT collection, uri, contentlength FROM caom.artifact").to_table()
    assert {"spherex_qr2_cal", "spherex_qr3_cal"} == set(t["collection"])
    cal = dict(zip((str(u) for u in t["uri"]), (int(n) for n in t["contentlength"])))
    path = calib.path("qr3", "l3_flux_corrections", calib.latest("qr3", "l3_flux_corrections", 1), 1)
    assert cal["ibe/data/spherex/" + path] == calib.product(1, "qr3", "l3_flux_corrections", 1).size
    r = requests.get(f"{arc.url}/ibe/data/spherex/{path}")
    assert r.status_code == 200 and len(r.content) == cal["ibe/data/spherex/" + path]
    with fits.open(io.BytesIO(r.content)) as hl:
        np.testing.assert_array_equal(hl["FLUX_CORRECTION"].data[::101], gains.gain_map(1, 1)[::101])
    assert requests.get(f"{arc.cloud_url}/{path}", headers={"Range": "bytes=0-2879"}).content == r.content[:2880]
    lines = [json.loads(s) for s in requests.get(f"{arc.url}/ibe/dir/list/spherex/qr3/epsf").text.splitlines()]
    assert len(lines) == 7 and {d["name"].split("/")[1] for d in lines} == {"1", "2", "3", "4", "5", "6"}
    assert requests.get(f"{arc.url}/ibe/dir/list/spherex/qr2/l3_flux_corrections").status_code == 404
    psf = calib.path("qr2", "average_psf", "cal-psf-v5-2026-082", 4)
    assert requests.head(f"{arc.url}/ibe/data/spherex/{psf}").status_code == 200


def test_sia_lags_behind_tap_for_the_newest_qr3_data(uni):
    o3 = uni.observations.filter(pl.col("release") == "qr3").sort("t_min")
    newest = o3.tail(1)
    ra, dec = float(newest["s_ra"][0]), float(newest["s_dec"][0])
    q = f"SELECT obs_publisher_did FROM spherex.obscore WHERE CONTAINS(POINT('ICRS',{ra},{dec}), s_region)=1"
    with sim.serve(universe=uni, faults=sim.Faults(sia_qr3_lag_days=3.0)) as a:
        tap_ids = set(pyvo.dal.TAPService(a.tap_url).search(q).to_table()["obs_publisher_did"])
        sia = pyvo.dal.SIA2Service(a.sia_url).search(pos=(ra, dec, 0.001)).to_table()
    sia_ids = set(sia["obs_publisher_did"])
    assert newest["obs_publisher_did"][0] in tap_ids - sia_ids and sia_ids < tap_ids
    t_max = float(newest["t_min"][0])
    hidden = {d for d, t in zip(o3["obs_publisher_did"], o3["t_min"]) if t > t_max - 3.0}
    assert not (sia_ids & hidden) and (tap_ids - sia_ids) <= hidden  # only the newest QR3 frames lag


def test_qr3_knobs_and_datalink(uni, arc, qr3key):
    short = Universe(seed=1, epsf_spelling="short", epsf_tdim=False).cutout(qr3key, "1000,1000px", "15px")
    with fits.open(io.BytesIO(short)) as hl:
        names = hl["EPSF"].columns.names
        assert "XCTR" in names and "NEFF" in names and "XCENTER" not in names and "OVERSAMP" in hl["EPSF"].header
        assert "TDIM" not in " ".join(hl["EPSF"].header.keys())
    did = uni.observations.filter(pl.col("cloud_key") == qr3key)["obs_publisher_did"][0]
    assert did.startswith("ivo://irsa.ipac/spherex_qr3")
    body = requests.get(arc.datalink_url, params={"ID": did}).text
    assert f"{arc.url}/ibe/data/spherex/{qr3key}" in body
