"""QR3 (pipeline R7) readers: compressed FLAGS rows by file and by byte ranges, the flag-bit map in
both card styles, the EPSF table under each spelling, and the ePSF aperture correction (fast numba
kernel vs its slow reference vs brute-force integration of an analytic PSF).

The HDUs are built with astropy directly, as the archive would write them (spec §3.9)."""

from __future__ import annotations

import io
import math
import os
import types

import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage
from scipy.special import erf

from spxframe import spherex
from spxframe.errors import FileFormatError, InputError
from spxframe.fits import epsf as fe
from spxframe.fits import flagbits, tiles
from spxframe.fits.cards import Header
from spxframe.fits.hdu import scan
from spxframe.photometry import epsf as pe
from spxframe.photometry.kernels import overlap_weights, psf_pixel_fractions

SOURCE = 1 << 21


def _flags(ny: int, nx: int, seed: int = 1) -> np.ndarray:
    """Flags like a real frame: SOURCE on about half the pixels, a few other bits, a bloom patch."""
    rng = np.random.default_rng(seed)
    a = np.where(rng.random((ny, nx)) < 0.5, SOURCE, 0).astype(np.int32)
    a |= np.where(rng.random((ny, nx)) < 0.02, 1 << 10, 0).astype(np.int32)
    a[ny // 3:ny // 3 + 4, nx // 2:nx // 2 + 5] |= 1 << 26
    return a


def _r7_file(flags: np.ndarray, tile_shape=None, epsf_hdu=None) -> bytes:
    ny, nx = flags.shape
    img = np.zeros((ny, nx), np.float32)
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(img, name="IMAGE"),
            fits.CompImageHDU(flags, compression_type="RICE_1", tile_shape=tile_shape or (1, nx), name="FLAGS"),
            fits.ImageHDU(img, name="VARIANCE"), fits.ImageHDU(img, name="ZODI")]
    if epsf_hdu is not None:
        hdus.append(epsf_hdu)
    b = io.BytesIO()
    fits.HDUList(hdus).writeto(b)
    return b.getvalue()


def _reader(raw: bytes):
    return lambda s, e: raw[s:e]


def _flags_hdu(raw: bytes):
    return next(h for h in scan(raw) if h.name == "FLAGS")


# ------------------------------------------------------------------------------------------
# compressed FLAGS
# ------------------------------------------------------------------------------------------


def test_flag_rows_from_a_local_file_match_what_was_written(tmp_path):
    flags = _flags(90, 160)
    path = tmp_path / "r7.fits"
    path.write_bytes(_r7_file(flags))
    for y0, y1 in [(0, 90), (10, 30), (85, 120), (-5, 3), (40, 41)]:
        got = tiles.read_file_rows(path, y0, y1)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, flags[max(y0, 0):y1])
    with fits.open(path) as hl:  # the same rows astropy's public section gives
        np.testing.assert_array_equal(tiles.read_file_rows(path, 10, 30), hl["FLAGS"].section[10:30])
    fd = os.open(path, os.O_RDONLY)  # the sources fits.hdu.read_rows takes: a descriptor, a get() store
    try:
        hdu = next(h for h in scan(fd) if h.name == "FLAGS")
        np.testing.assert_array_equal(tiles.read_image_rows(fd, hdu, 10, 30), flags[10:30])
        store = types.SimpleNamespace(get=tiles.file_reader(fd))
        np.testing.assert_array_equal(tiles.read_image_rows(store, hdu, 10, 30), flags[10:30])
    finally:
        os.close(fd)


def test_a_box_reads_only_its_descriptors_then_its_heap_bytes():
    flags = _flags(120, 200)
    raw = _r7_file(flags)
    img = tiles.tiled_image(_flags_hdu(raw))
    assert (img.shape, img.tile, img.cmptype, img.desc_code) == ((120, 200), (1, 200), "RICE_1", "P")
    log: list = []
    rows = tiles.read_tiled_rows(lambda s, e: raw[s:e], img, 40, 60, log=log)
    np.testing.assert_array_equal(rows, flags[40:60])
    assert len(log) == 2  # one read of descriptors, one of heap bytes
    (d0, d1), (h0, h1) = log
    assert (d0, d1) == (img.data_offset + 40 * 8, img.data_offset + 60 * 8)
    desc = tiles.read_descriptors(lambda s, e: raw[s:e], img, 0, 120)
    assert h1 - h0 == desc[40:60, 0].sum()  # exactly the 20 tiles' compressed bytes
    assert h0 == img.heap_offset + desc[40, 1]
    assert h1 - h0 < img.heap_size / 4
    assert tiles.box_byte_ranges(lambda s, e: raw[s:e], img, 40, 60) == log


def test_byte_ranges_of_a_200_row_box_on_a_full_detector_width():
    """Full width (2040 px) and half the pixels SOURCE: the figures the planner can use."""
    flags = _flags(240, spherex.NPIX, seed=3)
    raw = _r7_file(flags)
    img = tiles.tiled_image(_flags_hdu(raw))
    ranges = tiles.box_byte_ranges(lambda s, e: raw[s:e], img, 20, 220)
    desc_bytes = ranges[0][1] - ranges[0][0]
    heap_bytes = sum(e - s for s, e in ranges[1:])
    assert desc_bytes == 200 * 8 and len(ranges) == 2
    assert 0.5e6 < heap_bytes < 2.0e6  # ~1.2 MB by spec §3.9; the plain plane would be 200 x 8160 bytes
    assert heap_bytes < 200 * spherex.ROW_BYTES
    assert 0.8 < img.estimated_bytes(20, 220) / (desc_bytes + heap_bytes) < 1.25  # from the header alone


def test_public_decoder_agrees_with_the_fast_codec_on_every_tiling():
    flags = _flags(37, 150, seed=5)
    for tile_shape in [(1, 150), (4, 150), (5, 64)]:
        raw = _r7_file(flags, tile_shape)
        img = tiles.tiled_image(_flags_hdu(raw))
        read = _reader(raw)
        for y0, y1 in [(0, 37), (3, 11), (33, 40)]:
            fast = tiles.read_tiled_rows(read, img, y0, y1)
            slow = tiles.read_tiled_rows(read, img, y0, y1, public=True)
            np.testing.assert_array_equal(fast, flags[y0:y1])
            np.testing.assert_array_equal(slow, fast)


def test_64_bit_descriptors_1QB_are_read():
    flags = _flags(30, 100, seed=7)
    with fits.open(io.BytesIO(_r7_file(flags)), disable_image_compression=True) as hl:
        tab = hl["FLAGS"]
        cells = [np.asarray(c) for c in tab.data["COMPRESSED_DATA"]]
        hdr = tab.header.copy()
    col = fits.Column(name="COMPRESSED_DATA", format=f"1QB({max(len(c) for c in cells)})", array=cells)
    q = fits.BinTableHDU.from_columns([col], name="FLAGS")
    for k in hdr:
        if k.startswith("Z"):
            q.header[k] = hdr[k]
    b = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), q]).writeto(b)
    raw = b.getvalue()
    img = tiles.tiled_image(_flags_hdu(raw))
    assert img.desc_code == "Q" and img.row_bytes == 16
    np.testing.assert_array_equal(tiles.read_tiled_rows(lambda s, e: raw[s:e], img, 5, 25), flags[5:25])


def test_plain_and_compressed_flags_read_the_same():
    flags = _flags(40, 60)
    b = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(flags, name="FLAGS")]).writeto(b)
    plain = b.getvalue()
    comp = _r7_file(flags)
    a = tiles.read_image_rows(lambda s, e: plain[s:e], _flags_hdu(plain), 7, 19)
    c = tiles.read_image_rows(lambda s, e: comp[s:e], _flags_hdu(comp), 7, 19)
    assert a.dtype == c.dtype == np.int64
    np.testing.assert_array_equal(a, c)


def test_a_descriptor_outside_the_heap_is_a_format_error():
    raw = bytearray(_r7_file(_flags(20, 50)))
    img = tiles.tiled_image(_flags_hdu(bytes(raw)))
    p = img.data_offset + 3 * 8 + 4
    raw[p:p + 4] = (img.heap_size + 10).to_bytes(4, "big")
    with pytest.raises(FileFormatError, match="outside the heap"):
        tiles.read_tiled_rows(lambda s, e: bytes(raw[s:e]), img, 0, 10)
    raw[p:p + 4] = (0).to_bytes(4, "big")  # the descriptor back in range, its compressed bytes garbage
    start = img.heap_offset
    raw[start:start + 64] = b"\xff" * 64
    with pytest.raises(FileFormatError, match="do not decode"):
        tiles.read_tiled_rows(lambda s, e: bytes(raw[s:e]), img, 0, 10)


# ------------------------------------------------------------------------------------------
# flag-bit cards
# ------------------------------------------------------------------------------------------


def _header(cards: dict) -> Header:
    h = fits.Header()
    for k, v in cards.items():
        h[k] = v
    return Header(h.tostring().encode())


def test_both_card_styles_give_the_bit_map():
    qr2 = _header({f"HIERARCH MP_{n}": b for n, b in spherex.FLAG_BITS.items()})
    assert flagbits.header_flag_bits(qr2) == (spherex.FLAG_BITS, "MP_")
    qr3_bits = {**spherex.FLAG_BITS, **flagbits.R7_FLAG_BITS}
    qr3 = _header({f"MSKN{b:04d}": n for n, b in qr3_bits.items()})
    assert flagbits.header_flag_bits(qr3) == (qr3_bits, "MSKN")
    # short QR2 names may be plain cards; unused MSKN slots may be blank; other HIERARCH cards are not bits
    mixed = _header({"MP_HOT": 10, "HIERARCH MP_TRANSIENT": 0, "HIERARCH L2 N_HOT": 52, "MSKN0003": ""})
    assert flagbits.header_flag_bits(mixed) == ({"HOT": 10, "TRANSIENT": 0}, "MP_")
    # an astropy Header works too, and a header with no bit cards falls back to the spec table
    assert flagbits.flag_bits(fits.Header({"MSKN0026": "BLOOM"})) == {"BLOOM": 26}
    assert flagbits.flag_bits(_header({"EXTNAME": "FLAGS"})) == flagbits.DEFAULT_FLAG_BITS
    assert flagbits.DEFAULT_FLAG_BITS["BLOOM"] == 26 and flagbits.DEFAULT_FLAG_BITS["SOURCE"] == 21


def test_contradicting_bit_cards_are_a_format_error():
    with pytest.raises(FileFormatError, match="BLOOM"):
        flagbits.flag_bits(_header({"HIERARCH MP_BLOOM": 26, "MSKN0027": "BLOOM"}))
    with pytest.raises(FileFormatError, match="bit 3"):
        flagbits.flag_bits(_header({"MSKN0003": "GHOST", "HIERARCH MP_STREAK": 3}))


def test_default_bad_bits_are_the_consensus_plus_the_mosaic_tool_r7_bits():
    default = flagbits.bad_bits()
    assert default == spherex.HARD_BAD_BITS | {20, 22, 23, 24, 25, 26, 27, 28, 29}
    assert not default & {1, 4, 5, 19, 12, 21}
    assert flagbits.bad_mask() == sum(1 << b for b in default)


def test_bad_bits_take_names_and_numbers_through_the_files_own_map():
    assert flagbits.bad_bits(["bloom", 1, "19"]) == {26, 1, 19}
    assert flagbits.bad_bits("OVERFLOW, GHOST") == {1, 22}
    renumbered = {**flagbits.DEFAULT_FLAG_BITS, "BLOOM": 3}
    assert flagbits.bad_bits(["BLOOM"], renumbered) == {3}
    assert 3 in flagbits.bad_bits(None, renumbered) and 26 not in flagbits.bad_bits(None, renumbered)
    for wrong in (["SOURCE"], [21], ["FULLSAMPLE"], ["NOT_A_FLAG"], [40], [True]):
        with pytest.raises(InputError):
            flagbits.bad_bits(wrong)
    assert flagbits.mask_names((1 << 26) | (1 << 3)) == ["BIT3", "BLOOM"]


# ------------------------------------------------------------------------------------------
# EPSF table
# ------------------------------------------------------------------------------------------


def _zone_array(k: int, n: int = 33) -> np.ndarray:
    """A zone's array: a Gaussian whose width encodes the zone, plus a marker at (y=2, x=5)."""
    y, x = np.mgrid[0:n, 0:n] - (n - 1) / 2
    a = np.exp(-(x ** 2 + y ** 2) / (2 * (2.0 + 0.01 * k) ** 2))
    a /= a.sum()
    a[2, 5] += 1e-4 * (k + 1)
    return a / a.sum()


SPELLINGS = {
    "r7b": dict(cols=("BINX", "BINY", "XCENTER", "YCENTER", "NEFF_MEAN", "EPSF"), keys={"OVSMPX": 5, "OVSMPY": 5},
                tdim=False, lattice=(21, 21), dtype=np.float64),
    "short": dict(cols=(None, None, "XCTR", "YCTR", "NEFF", "EPSF"), keys={"OVERSAMP": 5}, tdim=True,
                  lattice=(21, 21), dtype=np.float64),
    "d3": dict(cols=("BINX", "BINY", "XCENTER", "YCENTER", "NEFF_MEAN", "EPSF"), keys={"OVSMPX": 5, "OVSMPY": 5},
               tdim=True, lattice=(41, 11), dtype=np.float32),
}


def _epsf_hdu(spelling: str, *, scale_zone: int | None = None, shuffle: bool = False, history: bool = True):
    s = SPELLINGS[spelling]
    nzy, nzx = s["lattice"]
    by, bx = np.divmod(np.arange(nzy * nzx), nzx)  # x-fast from the lower-left zone
    xc, yc = (bx + 0.5) * spherex.NPIX / nzx - 0.5, (by + 0.5) * spherex.NPIX / nzy - 0.5
    arr = np.stack([_zone_array(k).ravel() for k in range(nzy * nzx)]).astype(s["dtype"])
    if scale_zone is not None:
        arr[scale_zone] *= 3.0
    order = np.random.default_rng(0).permutation(len(bx)) if shuffle else np.arange(len(bx))
    bxn, byn, xn, yn, nn, en = s["cols"]
    cols = []
    if bxn:
        cols += [fits.Column(name=bxn, format="J", array=bx[order]), fits.Column(name=byn, format="J", array=by[order])]
    fmt = f"1089{'D' if s['dtype'] == np.float64 else 'E'}"
    cols += [fits.Column(name=xn, format="E", array=xc[order]), fits.Column(name=yn, format="E", array=yc[order]),
             fits.Column(name=nn, format="E", array=np.full(len(bx), 7.5)),
             fits.Column(name="CWAVE", format="E", array=1.0 + 0.001 * bx[order]),
             fits.Column(name=en, format=fmt, array=arr[order], dim="(33,33)" if s["tdim"] else None)]
    hdu = fits.BinTableHDU.from_columns(cols, name="EPSF")
    for k, v in s["keys"].items():
        hdu.header[k] = v
    hdu.header["DETECTOR"] = 3 if spelling == "d3" else 1
    hdu.header["ORDERING"] = "x-fast then y"
    if history:
        hdu.header.add_history("Calibration source file: epsf_1_20260507.fits")
    return hdu


def _read_epsf(hdu) -> fe.EpsfLibrary:
    b = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(b)
    raw = b.getvalue()
    return fe.read_epsf(lambda s, e: raw[s:e], scan(raw)[1])


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_epsf_table_under_each_spelling(spelling):
    lib = _read_epsf(_epsf_hdu(spelling, scale_zone=4, shuffle=spelling == "r7b"))
    nzy, nzx = SPELLINGS[spelling]["lattice"]
    assert lib.lattice == (nzy, nzx) and lib.arrays.shape == (nzy, nzx, 33, 33)
    assert (lib.ovsmpx, lib.ovsmpy) == (5, 5)
    np.testing.assert_allclose(lib.arrays.sum(axis=(2, 3)), 1.0, atol=1e-6)
    assert lib.renormalised == 1  # zone 4 summed to 3
    k = 2 * nzx + 7  # zone (ix 7, iy 2): x-fast rows and x-fast arrays land where they belong
    np.testing.assert_allclose(lib.flat[k], _zone_array(k), rtol=1e-5, atol=1e-9)
    assert lib.flat[k][2, 5] > lib.flat[k][5, 2]
    assert lib.zone_of([lib.xcenter[2, 7] + 3.0], [lib.ycenter[2, 7] - 3.0])[0] == k
    np.testing.assert_allclose(lib.extras["cwave"][:, 7], 1.007, rtol=1e-6)
    assert lib.source == "epsf_1_20260507.fits"
    assert lib.columns["xcenter"] == SPELLINGS[spelling]["cols"][2]


def test_epsf_missing_roles_name_what_is_there():
    hdu = _epsf_hdu("r7b")
    hdu.columns.change_name("XCENTER", "XPOS")
    with pytest.raises(FileFormatError, match=r"no xcenter column.*XPOS"):
        _read_epsf(fits.BinTableHDU.from_columns(hdu.columns, header=hdu.header, name="EPSF"))
    hdu = _epsf_hdu("r7b")
    del hdu.header["OVSMPX"]
    with pytest.raises(FileFormatError, match="no oversampling keyword.*OVSMPY"):
        _read_epsf(hdu)


def test_epsf_inside_an_r7_file_after_compressed_flags(tmp_path):
    path = tmp_path / "r7.fits"
    path.write_bytes(_r7_file(_flags(30, 40), epsf_hdu=_epsf_hdu("r7b")))
    lib = fe.read_epsf_file(path)
    assert lib.lattice == (21, 21) and lib.detector == 1


def _full_r7(nx: int, ny: int, *, version: str | None) -> tuple[bytes, np.ndarray]:
    """An astropy-written R7 file: WCS on the planes, MSKN cards on FLAGS, the EPSF table, WCS-WAVE."""
    flags = _flags(ny, nx, seed=4)
    img = np.arange(nx * ny, dtype=np.float32).reshape(ny, nx)
    prim = fits.PrimaryHDU()
    if version:
        prim.header["VERSION"] = version
    planes = [fits.ImageHDU(img, name="IMAGE"),
              fits.CompImageHDU(flags, compression_type="RICE_1", tile_shape=(1, nx), name="FLAGS"),
              fits.ImageHDU(img * 2, name="VARIANCE"), fits.ImageHDU(img * 3, name="ZODI")]
    for h in planes:
        h.header.update({"CRPIX1": 20.5, "CRPIX2": 30.5, "CRPIX1A": 1.0, "CRPIX2A": 1.0, "CRPIX1W": 5.0,
                         "CRPIX2W": -3.0, "DETECTOR": 1})
    planes[1].header["MSKN0021"] = "SOURCE"
    planes[1].header["MSKN0026"] = "BLOOM"
    wave = fits.BinTableHDU.from_columns([fits.Column("X", "9E", array=np.arange(9, dtype=float)[None]),
                                          fits.Column("VALUES", "162E", array=np.ones((1, 162)))], name="WCS-WAVE")
    b = io.BytesIO()
    fits.HDUList([prim, *planes, _epsf_hdu("r7b"), wave]).writeto(b)
    return b.getvalue(), flags


@pytest.mark.parametrize("version", ["7.0.5", None])
def test_range_read_cutouts_of_an_r7_file_hold_its_pixels(version, tmp_path):
    """RangeFile on an astropy-written R7 file (with or without VERSION 7.x): every HDU found,
    the boxes' FLAGS from descriptors then heap bytes, the local cutouts hold the file's own
    pixels bit for bit, FLAGS as a plain int32 image with the bit cards and shifted WCS, the
    EPSF table a header stub naming the library; few batches of requests, none per row."""
    from spxframe.fetcher import ranges as R
    from spxframe.fetcher import ranges_r7 as R7
    from spxframe.fits.hdu import required_hdus, scan_fits

    raw, flags = _full_r7(300, 260, version=version)
    batches = []

    def read(ranges):
        batches.append(list(ranges))
        return [raw[s:e] for s, e in ranges], len(raw)

    rf = R.RangeFile(read, "r7.fits")
    boxes = [R.Box(10, 20, 40, 30), R.Box(250, 200, 50, 60), R.Box(0, 0, 300, 1)]
    layout = rf.read_layout()
    assert [h.name for h in layout] == list(spherex.R7_HDU_NAMES)
    store = rf.read_boxes(layout, boxes, max_gap=300 * 4)  # a row's gap: one range per box and plane
    assert len(batches) <= 6 and sum(len(b) for b in batches) <= 24, batches  # never a request per row
    epsf = next(h for h in layout if h.name == "EPSF")
    lib = tmp_path / "psf" / "D1_x.fits"
    lib.parent.mkdir()
    lib.write_bytes(R7.epsf_file_bytes(epsf, raw[epsf.data_offset:epsf.next_offset], "D1_x"))
    assert fe.read_epsf_file(lib).lattice == (21, 21)
    with fits.open(io.BytesIO(raw)) as src:
        for k, b in enumerate(boxes):
            path = tmp_path / f"cut{k}.fits"
            path.write_bytes(R.build_cutout(layout, b, store, psffile="psf/D1_x.fits"))
            assert required_hdus(scan_fits(path)) == spherex.R7_HDU_NAMES
            ys, xs = slice(b.y0, b.y0 + b.ny), slice(b.x0, b.x0 + b.nx)
            with fits.open(path) as cut:
                for n in ("IMAGE", "VARIANCE", "ZODI"):
                    assert cut[n].data.tobytes() == src[n].data[ys, xs].tobytes()
                f = cut["FLAGS"]
                assert not isinstance(f, fits.CompImageHDU) and f.data.dtype == np.dtype(">i4")
                np.testing.assert_array_equal(f.data, flags[ys, xs])
                assert f.header["MSKN0026"] == "BLOOM" and "ZIMAGE" not in f.header and "TFORM1" not in f.header
                assert (f.header["CRPIX1"], f.header["CRPIX2A"], f.header["CRPIX1W"]) == (20.5 - b.x0, 1.0 - b.y0,
                                                                                         5.0 - b.x0)
                assert cut["EPSF"].header["NAXIS2"] == 0 and cut["EPSF"].header["EPSFFILE"] == "psf/D1_x.fits"
                assert cut["WCS-WAVE"].data.tobytes() == src["WCS-WAVE"].data.tobytes()


# ------------------------------------------------------------------------------------------
# ePSF aperture correction
# ------------------------------------------------------------------------------------------


def _pixel_gauss(d, sigma):
    """1-D Gaussian integrated over a unit pixel centred at offset d: the analytic ePSF factor."""
    return 0.5 * (erf((d + 0.5) / (math.sqrt(2) * sigma)) - erf((d - 0.5) / (math.sqrt(2) * sigma)))


def _analytic_epsf(sigma: float, n: int = 33, ov: int = 5) -> np.ndarray:
    """The ePSF of a Gaussian PSF: pixel-convolved Gaussian sampled every 1/ov pixel, sum ~1."""
    d = (np.arange(n) - (n - 1) / 2) / ov
    g = _pixel_gauss(d, sigma)
    return np.outer(g, g) / ov ** 2


def _brute_force_fractions(sigma, cx, cy, ny, nx, sub=40):
    """Fraction of a Gaussian point source in each pixel by midpoint integration, sub x sub per pixel."""
    t = (np.arange(sub) + 0.5) / sub - 0.5
    out = np.zeros((ny, nx))
    for iy in range(ny):
        gy = np.exp(-((iy + t - cy) ** 2) / (2 * sigma ** 2))
        for ix in range(nx):
            gx = np.exp(-((ix + t - cx) ** 2) / (2 * sigma ** 2))
            out[iy, ix] = gy.sum() * gx.sum() / sub ** 2 / (2 * math.pi * sigma ** 2)
    return out


def test_spline_coefficients_match_scipy():
    a = np.random.default_rng(2).random((33, 33))
    np.testing.assert_allclose(pe.spline_coefficients(a),
                               ndimage.spline_filter(np.pad(a, pe.PAD), order=3, mode="mirror"), atol=1e-13)


def test_fast_fractions_and_corrections_match_the_reference():
    rng = np.random.default_rng(4)
    arrays = np.stack([_analytic_epsf(s) for s in (0.4, 0.7, 1.1)])
    arrays[1] += 2e-4 * rng.standard_normal((33, 33))  # a noisy, asymmetric zone
    coefs = pe.spline_coefficients(arrays)
    n, ny, nx = 40, 13, 13
    zone = rng.integers(0, 3, n)
    cx, cy = rng.uniform(-1.0, 13.0, n), rng.uniform(-1.0, 13.0, n)  # some apertures off the stamp
    masks = rng.random((n, ny, nx)) < 0.15
    r = 2.3
    out, status = pe.aperture_corrections(coefs, zone, cx, cy, r, masks, 5, 5)
    lib = fe.EpsfLibrary(arrays=arrays[None], xcenter=np.array([[0.0, 1.0, 2.0]]), ycenter=np.zeros((1, 3)),
                         ovsmpx=5, ovsmpy=5, valid=np.ones((1, 3), bool))
    model = pe.EpsfModel(lib)  # zones prepared on first use give the same numbers
    np.testing.assert_array_equal(model.corrections(zone[:5], cx[:5], cy[:5], r, masks[:5])[0], out[:5])
    np.testing.assert_array_equal(model.corrections(zone, cx, cy, r, masks)[0], out)
    for k in range(n):
        f = pe.epsf_fractions(coefs[zone[k]], 16.0, 16.0, 5.0, 5.0, cx[k], cy[k], ny, nx)
        np.testing.assert_allclose(f, pe.epsf_fractions_reference(arrays[zone[k]], 5, 5, cx[k], cy[k], ny, nx),
                                   atol=1e-12)
        corr, usable, st = pe.aperture_correction_reference(arrays[zone[k]], 5, 5, cx[k], cy[k], r, masks[k])
        assert out[k, pe.C_USABLE] == pytest.approx(usable, rel=1e-10)
        assert status[k] == st
        if st == 0:
            assert out[k, pe.C_CORR] == pytest.approx(corr, rel=1e-10)
        else:
            assert math.isnan(out[k, pe.C_CORR]) and math.isnan(corr)
    assert (status == pe.ST_PSF_UNUSABLE).any() and (status == 0).any()


@pytest.mark.parametrize("sigma", [0.45, 0.8])
def test_correction_matches_brute_force_integration_of_an_analytic_psf(sigma):
    model = pe.EpsfModel(fe.EpsfLibrary(arrays=_analytic_epsf(sigma)[None, None], xcenter=np.zeros((1, 1)),
                                        ycenter=np.zeros((1, 1)), ovsmpx=5, ovsmpy=5, valid=np.ones((1, 1), bool)))
    ny = nx = 15
    for cx, cy in [(7.0, 7.0), (7.31, 6.77), (6.5, 7.5)]:
        truth_f = _brute_force_fractions(sigma, cx, cy, ny, nx)
        for r in (1.5, 2.0, 3.0):
            w = overlap_weights(cx, cy, r, ny, nx)
            truth = 1.0 / (w * truth_f).sum()
            out, status = model.corrections(np.zeros(1, int), [cx], [cy], r, np.zeros((1, ny, nx), bool))
            assert status[0] == 0 and out[0, pe.C_USABLE] == pytest.approx(1.0)
            assert out[0, pe.C_CORR] == pytest.approx(truth, rel=2e-4), (cx, cy, r)
    # the tolerance tells the right sampling from the wrong ones at r = 1.5: integrating the ePSF
    # over pixels again (the QR2 cube path) and bilinear sampling of the 5x grid
    cx = cy = 6.5
    w = overlap_weights(cx, cy, 1.5, ny, nx)
    right = 1.0 / (w * _brute_force_fractions(sigma, cx, cy, ny, nx)).sum()
    twice = 1.0 / (w * psf_pixel_fractions(_analytic_epsf(sigma), cx, cy, ny, nx, 5)).sum()
    iy, ix = np.mgrid[0:ny, 0:nx].astype(float)
    bilinear = 25 * ndimage.map_coordinates(_analytic_epsf(sigma), [16 + 5 * (iy - cy), 16 + 5 * (ix - cx)], order=1)
    assert abs(twice / right - 1) > 0.01
    assert abs(1.0 / (w * bilinear).sum() / right - 1) > 1e-3


def test_masked_pixels_do_not_bias_the_flux_and_a_masked_core_is_nan():
    sigma, ny, nx, cx, cy, r, flux = 0.6, 15, 15, 7.2, 6.9, 2.5, 1000.0
    arrays = _analytic_epsf(sigma)[None]
    coefs = pe.spline_coefficients(arrays)
    image = flux * _brute_force_fractions(sigma, cx, cy, ny, nx)
    w = overlap_weights(cx, cy, r, ny, nx)
    masks = np.zeros((3, ny, nx), bool)
    masks[1, 8, 6] = masks[1, 5, 9] = True  # a few bad pixels (one near the core)
    masks[2, 5:10, 5:10] = True  # a BLOOM-flagged saturated core
    out, status = pe.aperture_corrections(coefs, np.zeros(3, int), np.full(3, cx), np.full(3, cy), r, masks, 5, 5)
    for k in (0, 1):
        measured = (w * image * ~masks[k]).sum() * out[k, pe.C_CORR]
        assert measured == pytest.approx(flux, rel=3e-4)
    assert 0.5 < out[1, pe.C_USABLE] < 1.0
    assert out[2, pe.C_USABLE] < 0.5 and math.isnan(out[2, pe.C_CORR]) and status[2] == pe.ST_PSF_UNUSABLE
