"""spxframe.fits: one FITS model for whole local files and byte-range reads, checked against
astropy.io.fits on simulated SPHEREx files (no HTTP: the universe's bytes are read directly).

- the same HDUs (names, offsets, sizes, shapes), headers (every keyword and comment) and pixel
  rows whether a file is scanned whole (file descriptor or bytes) or read by byte ranges;
- damaged files raise FileFormatError naming what is wrong;
- cards written by spxframe read back identically in astropy and in spxframe;
- one celestial WCS: a cutout's header gives the parent's WCS;
- the PSF cube of a range-read cutout (PSFFILE) is found from ``cache_dir``, beside the file, or in
  the cache layout fetch writes, and a cube that is nowhere is reported, not guessed.
"""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import polars as pl
import pytest
from astropy.io import fits

import spxframe
from spxframe import schema, spherex
from spxframe.errors import FileFormatError
from spxframe.fetcher.ranges import Box, RangeFile
from spxframe.fits import l2file
from spxframe.fits.cards import Header, edit_header, format_card, parse_header
from spxframe.fits.hdu import quick_check, read_array, read_rows, scan, scan_fits
from spxframe.fits.wcs import TanSip, celestial_wcs

PLANES = spherex.PLANE_HDUS


@pytest.fixture(scope="module")
def universe():
    from spxframe.sim import Universe

    return Universe(seed=1, releases=("qr2",))


@pytest.fixture(scope="module")
def obs(universe):
    return universe.observations.filter(pl.col("detector") == 3).row(0, named=True)


@pytest.fixture(scope="module")
def cutfile(universe, obs, tmp_path_factory):
    """An IBE-style cutout (all seven HDUs, PSF cube included) of 150 x 110 px, off the centre."""
    p = tmp_path_factory.mktemp("fits") / "cut.fits"
    p.write_bytes(universe.cutout(obs["cloud_key"], "700,1300px", "150,110px"))
    return str(p)


def _reader(data: bytes, log: list | None = None):
    """A RangeFile read function over bytes in memory (what fetch gets from HTTP range requests)."""
    def read(ranges):
        if log is not None:
            log.extend(ranges)
        return [data[s:e] for s, e in ranges], len(data)
    return read


def _layouts(path: str):
    """The file's HDUs three ways: scan of a file descriptor, scan of its bytes, byte-range reads."""
    data = open(path, "rb").read()
    fd = os.open(path, os.O_RDONLY)
    try:
        whole = scan(fd, path=path)
    finally:
        os.close(fd)
    return data, whole, scan(data), RangeFile(_reader(data), path).read_layout()


def test_hdus_and_headers_same_three_ways_and_as_astropy(cutfile):
    data, whole, mem, rng = _layouts(cutfile)
    with fits.open(cutfile) as af:
        assert [h.name for h in whole] == [h.name for h in mem] == [h.name for h in rng] \
            == [h.name for h in af] == list(spherex.HDU_NAMES)
        for k, (a, b, c) in enumerate(zip(whole, mem, rng)):
            info = af.fileinfo(k)
            for h in (a, b, c):
                assert (h.index, h.offset, h.data_offset) == (k, info["hdrLoc"], info["datLoc"])
                assert h.data_offset + math.ceil(h.data_size / 2880) * 2880 == info["datLoc"] + info["datSpan"]
                assert h.bitpix == af[k].header["BITPIX"] and h.header.raw == data[h.offset:h.data_offset]
            if af[k].is_image and af[k].header["NAXIS"]:
                assert a.shape == b.shape == c.shape == af[k].data.shape
            ah = af[k].header
            keys = [key for key in ah.keys() if key not in ("", "COMMENT", "HISTORY")]
            assert len(keys) > 5
            for h in (a.header, b.header, c.header):
                for key in keys:
                    v = h[key]
                    assert v == ah[key] and type(v) is type(ah[key]), (k, key, v, ah[key])
                    assert h.comment(key) == ah.comments[key], (k, key)
                assert "NOT_A_KEYWORD" not in h and h.get("NOT_A_KEYWORD", 7) == 7
                with pytest.raises(KeyError):
                    h["NOT_A_KEYWORD"]
            assert parse_header(c.header) == {key: ah[key] for key in keys}


def test_pixel_rows_same_from_file_and_from_byte_ranges(cutfile):
    data, whole, _, _ = _layouts(cutfile)
    log: list = []
    rf = RangeFile(_reader(data, log), cutfile)
    layout = rf.read_layout()
    head_bytes = sum(e - s for s, e in log)
    ny, nx = whole[1].shape
    y0, y1 = 17, 64
    store = rf.read_boxes(layout, [Box(0, y0, nx, y1 - y0)], max_gap=0)
    # the box rows of four planes and the small WCS-WAVE table, nothing else
    assert sum(e - s for s, e in log) - head_bytes <= 4 * (y1 - y0) * nx * 4 + 2 * 2880
    fd = os.open(cutfile, os.O_RDONLY)
    try:
        with fits.open(cutfile) as af:
            for k, name in enumerate(spherex.HDU_NAMES):
                if name not in PLANES:
                    continue
                ref = af[name].data[y0:y1]
                a = read_rows(fd, whole[k], y0, y1)
                b = read_rows(store, layout[k], y0, y1)
                np.testing.assert_array_equal(a, ref)
                np.testing.assert_array_equal(b, ref)
                assert a.dtype == b.dtype == (np.float64 if ref.dtype.kind == "f" else np.int64)
                raw = read_rows(fd, whole[k], y0, y1, convert=False)
                assert raw.dtype == whole[k].dtype and raw.tobytes() == ref.astype(raw.dtype).tobytes()
            assert read_rows(fd, whole[1], ny + 5, ny + 9).shape == (0, nx)  # rows past the end: none
            psf = read_array(fd, whole[5])
            np.testing.assert_array_equal(psf, af["PSF"].data)
            assert psf.shape == spherex.PSF_SHAPE
    finally:
        os.close(fd)


def test_parent_layout_by_ranges_is_the_qr2_layout(universe, obs):
    """A whole archive file read by byte ranges (headers only): the nominal QR2 layout."""
    key = obs["cloud_key"]
    log: list = []

    def read(ranges):
        log.extend(ranges)
        return [universe.read(key, s, e) for s, e in ranges], universe.file_size(key)

    layout = RangeFile(read, key).read_layout()
    assert sum(e - s for s, e in log) < 128 * 2880  # headers, guessed header windows, the tail: no pixels
    for h in layout:
        start, dstart, dend = spherex.QR2_LAYOUT[h.name]
        assert (h.offset, h.data_offset, h.next_offset) == (start, dstart, dend), h
    assert layout[-1].next_offset == spherex.FULL_FILE_BYTES
    assert layout[5].shape == spherex.PSF_SHAPE and layout[1].shape == (spherex.NPIX, spherex.NPIX)


def test_damaged_files_raise_file_format_error(cutfile, tmp_path):
    data = open(cutfile, "rb").read()
    cases = {
        "truncated.fits": (data[:-2880], "truncated"),
        "notfits.fits": (b"NOTFITS = T".ljust(2880) + data[2880:], "not a FITS file"),
        "noend.fits": (data[:2880].replace(b"END     ", b"NOEND   "), "no END"),
        "noxtension.fits": (data[:2880] + (b"BOGUS   = 1".ljust(80) + b"END").ljust(2880), "XTENSION"),  # after PRIMARY
    }
    for name, (raw, what) in cases.items():
        p = tmp_path / name
        p.write_bytes(raw)
        with pytest.raises(FileFormatError, match=what):
            scan_fits(p, required=())
        with pytest.raises(FileFormatError, match=what):
            RangeFile(_reader(raw), name).read_layout()
        fd = os.open(p, os.O_RDONLY)
        try:
            with pytest.raises(FileFormatError, match=str(p)):
                l2file.open_info(str(p), fd)
        finally:
            os.close(fd)
    assert quick_check(cutfile, len(data)) and not quick_check(tmp_path / "notfits.fits")
    assert not quick_check(cutfile, len(data) + 2880)
    ok = tmp_path / "nopsf.fits"  # a valid FITS file that lacks SPHEREx HDUs
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((3, 4), ">f4"), name="IMAGE")]).writeto(ok)
    assert [h.name for h in scan_fits(ok, required=("PRIMARY", "IMAGE"))] == ["PRIMARY", "IMAGE"]
    with pytest.raises(FileFormatError, match="missing HDUs"):
        scan_fits(ok)


def test_cards_written_read_back_the_same_in_astropy_and_spxframe():
    values = [("CRPIX1", 1020.5 - 37, "reference pixel"), ("NAXIS1", 60, ""), ("NEG", -1899.0, ""),
              ("TINY", 1e-30, "small"), ("BIG", 6.02e23, ""), ("FLAG", True, "a logical"), ("OFF", False, ""),
              ("NAME", "O'Brien / x", "quote and slash"), ("EMPTY", "", ""), ("LONGINT", -123456789012, "")]
    raw = b"".join(format_card(k, v, c) for k, v, c in values) + b"END".ljust(80)
    raw += b" " * (-len(raw) % 2880)
    ours, theirs = Header(raw), fits.Header.fromstring(raw.decode())
    for k, v, c in values:
        assert ours[k] == theirs[k] == v and type(ours[k]) is type(theirs[k]) is type(v), k
        assert ours.comment(k) == theirs.comments[k] == c, k
    new = Header(edit_header(raw, update={"CRPIX1": 1.5, "NAME": "b"}, delete=["TINY"],
                             append=[("PSFFILE", "psf/D3_x.fits", "cube")]))
    assert new["CRPIX1"] == 1.5 and new.comment("CRPIX1") == "reference pixel" and new["NAME"] == "b"
    assert "TINY" not in new and new["PSFFILE"] == "psf/D3_x.fits" and len(new) % 2880 == 0


def test_one_celestial_wcs_cutout_header_gives_the_parent(universe, obs, cutfile):
    key = obs["cloud_key"]
    layout = RangeFile(lambda r: ([universe.read(key, s, e) for s, e in r], universe.file_size(key)),
                       key).read_layout()
    parent = celestial_wcs(layout[1].header)  # a whole file: no offsets
    fd = os.open(cutfile, os.O_RDONLY)
    try:
        info = l2file.open_info(cutfile, fd)
    finally:
        os.close(fd)
    cut = celestial_wcs(info)  # the cutout's header shifted by its A-system offsets
    assert isinstance(parent, TanSip) and isinstance(cut, TanSip) and (info.x0, info.y0) != (0, 0)
    x, y = np.array([0.0, 700.0, 2039.0]), np.array([0.0, 1300.0, 5.0])
    np.testing.assert_allclose(np.array(cut.pix2world(x, y)), np.array(parent.pix2world(x, y)), rtol=0, atol=1e-9)
    assert celestial_wcs(edit_header(layout[1].header, delete=["CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2"])) is None


def _range_cutout(src: str, root: str) -> tuple[str, str]:
    """Rewrite an IBE cutout as fetch stores a range read: PSF data dropped, PSFFILE =
    'psf/<key>.fits' relative to ``root``, file at root/data/D<d>/, cube at root/psf/."""
    with fits.open(src) as h:
        key = f"D{h['IMAGE'].header['DETECTOR']}_test"
        os.makedirs(os.path.join(root, "psf"), exist_ok=True)
        cube = os.path.join(root, "psf", key + ".fits")
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(h["PSF"].data, h["PSF"].header)]).writeto(cube)
        ph = h["PSF"].header.copy()
        ph["PSFFILE"] = f"psf/{key}.fits"
        hdus = [hd.copy() for hd in h]
        hdus[5] = fits.ImageHDU(None, ph, name="PSF")
        out = os.path.join(root, "data", f"D{h['IMAGE'].header['DETECTOR']}", "cut_x0_y0.fits")
        os.makedirs(os.path.dirname(out))
        fits.HDUList(hdus).writeto(out)
    return out, cube


def test_psffile_found_from_cache_dir_beside_the_file_or_in_the_fetch_layout(universe, cutfile, tmp_path):
    cache = str(tmp_path / "cache")
    path, cube = _range_cutout(cutfile, cache)
    cat = universe.catalog()
    ref = spxframe.measure([cutfile], cat).sort("source_id")  # the IBE cutout: PSF cube inside
    assert ref.height > 0 and ref["flux"].is_not_nan().sum() > 0

    def same(df):
        df = df.sort("source_id")
        assert df["source_id"].to_list() == ref["source_id"].to_list()
        assert (df["qc"] & schema.QC["NO_PSF"] == 0).all()
        np.testing.assert_allclose(df["flux"].to_numpy(), ref["flux"].to_numpy(), rtol=1e-12)

    same(spxframe.measure([path], cat))  # a cache written by fetch, no cache_dir: the layout rule
    same(spxframe.measure([path], cat, cache_dir=cache))
    moved = tmp_path / "elsewhere" / "cut.fits"  # the file alone, away from the cache
    moved.parent.mkdir()
    shutil.copy(path, moved)
    same(spxframe.measure([str(moved)], cat, cache_dir=cache))
    same(spxframe.measure([str(moved)], cat, cache_dir=tmp_path / "cache"))  # any os.PathLike
    fd = os.open(moved, os.O_RDONLY)
    try:
        with pytest.raises(FileFormatError, match=r"PSFFILE = 'psf/D3_test.fits'.*elsewhere/psf/D3_test.fits"):
            l2file.open_info(str(moved), fd)
    finally:
        os.close(fd)
    sid = ref["source_id"][0]
    man = pl.DataFrame({"source_id": [sid], "path": [str(moved)], "status": ["done"]})
    lost = spxframe.measure(man, cat)  # listed pair whose cube is nowhere: a READ_ERROR row
    assert lost.height == 1 and lost["qc"][0] & schema.QC["READ_ERROR"] and math.isnan(lost["flux"][0])
    os.makedirs(moved.parent / "psf")
    shutil.copy(cube, moved.parent / "psf")  # the cube beside the file, as PSFFILE says
    same(spxframe.measure([str(moved)], cat))
