"""spxframe.measure on QR3 (pipeline R7) files: the same accuracy as on QR2 files.

The QR3 files are made by the simulated archive's R7 writer (``spxframe.sim.r7``) from the
simulated universe's QR2 frames (the same pixels; the universe's truth holds for both): RICE_1
FLAGS with MSKN bit cards, the EPSF table in each spelling the spec lists, and the QR3 flag
content — BLOOM over saturated cores, GHOST/CROSSTALK/STREAK patches that add light exactly where
they flag, SNOWBALL and GHOST_FPA discs. No HTTP.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import polars as pl
import pytest
from accuracy import accuracy
from astropy.io import fits

import spxframe
from spxframe import schema, spherex
from spxframe.errors import InputError
from spxframe.sim.r7 import epsf as sim_epsf
from spxframe.sim.r7 import mef as sim_mef
from spxframe.sim.r7 import qr3flags
from spxframe.sim.r7.bits import R7_NEW_BITS

QC = schema.QC
BOX = 400
PLANES = ("IMAGE", "FLAGS", "VARIANCE", "ZODI")
PATCHED = [R7_NEW_BITS[n] for n in ("GHOST", "CROSSTALK", "STREAK")]


@pytest.fixture(scope="module")
def universe():
    """The QR2-only sky (seed 1): its QR2 pixels are on the R7 gains, so QR3 files made from them
    share the universe's truth."""
    from spxframe.sim import Universe

    return Universe(seed=1, releases=("qr2",))


def _patches(u, key: str, obs_index: int, det: int, flags_box, x0: int, y0: int) -> qr3flags.Patches:
    """The frame's QR3 flag shapes; saturated = the QR2 FLAGS carry OVERFLOW at the source's pixel."""
    src = u.frame_sources(key)
    x, y, flux, om = (src[c].to_numpy() for c in ("x", "y", "flux", "omega"))
    peak = flux / (om * spherex.MJY_SR_TO_UJY_PER_ARCSEC2)
    ix, iy = np.rint(x).astype(int) - x0, np.rint(y).astype(int) - y0
    ny, nx = flags_box.shape
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    sat = np.zeros(x.size, bool)
    sat[inside] = (flags_box[iy[inside], ix[inside]] & (1 << spherex.FLAG_BITS["OVERFLOW"])) != 0
    return qr3flags.Patches.draw(1, obs_index, det, x, y, peak, sat, qr3flags.PatchConfig(fraction=0.3))


def to_qr3(u, o: dict, qr2: bytes, *, spelling: str = "r7", tdim: bool = True, epsf_format: str = "D",
           compress: bool = True, patch: bool = True) -> tuple[bytes, qr3flags.Patches | None]:
    """A QR3 (R7) file of the same box as the QR2 file or cutout ``qr2``, with the QR3 flag content."""
    with fits.open(io.BytesIO(qr2)) as hl:
        hdr = {n: hl[n].header.tostring().encode() for n in PLANES}
        hdr["PRIMARY"] = hl[0].header.tostring().encode()
        planes = {n: np.array(hl[n].data) for n in PLANES}
        h = hl["IMAGE"].header
        det, x0, y0 = int(h["DETECTOR"]), int(round(1 - h["CRPIX1A"])), int(round(1 - h["CRPIX2A"]))
    p = None
    if patch:
        p = _patches(u, o["cloud_key"], int(o["obs_index"]), det, planes["FLAGS"], x0, y0)
        ny, nx = planes["IMAGE"].shape
        flags, img = p.paint(y0, y0 + ny, x0, x0 + nx, planes["FLAGS"].astype(np.int32),
                             planes["IMAGE"].astype(np.float64))
        planes["FLAGS"], planes["IMAGE"] = flags, img.astype(np.float32)
    ep = sim_epsf.epsf_hdu(det, spelling=spelling, tdim=tdim, epsf_format=epsf_format)
    return sim_mef.write_r7(planes, hdr, det, epsf=ep, compress_flags=compress), p


def _field_obs(u, n: int) -> list[dict]:
    src = u.sources.filter(pl.col("field") == "wide_generic")
    ra0, dec0 = float(src["ra"].median()), float(src["dec"].median())
    obs = u.observations
    d = np.degrees(np.arccos(np.clip(
        np.sin(np.radians(dec0)) * np.sin(np.radians(obs["s_dec"].to_numpy()))
        + np.cos(np.radians(dec0)) * np.cos(np.radians(obs["s_dec"].to_numpy()))
        * np.cos(np.radians(obs["s_ra"].to_numpy() - ra0)), -1, 1)))
    obs = obs.with_columns(pl.Series("dist", d)).filter(pl.col("dist") < 1.0).sort("obs_id", "detector")
    return obs.head(n).to_dicts()


@pytest.fixture(scope="module")
def files(universe, tmp_path_factory):
    """QR2 and QR3 versions of 2 full frames and 6 cutouts of BOX px (the QR3 ones with patches;
    EPSF spellings r7 / short / both rotate over the files)."""
    u = universe
    d = tmp_path_factory.mktemp("qr3")
    qr2, qr3, patches = [], [], {}
    for i, o in enumerate(_field_obs(u, 8)):
        if i < 2:
            raw = u.read(o["cloud_key"], 0, u.file_size(o["cloud_key"]))
            name = f"{o['obs_id']}D{o['detector']}_full"
        else:
            raw = u.cutout(o["cloud_key"], f"{1020 + 300 * (i % 3 - 1)},{1020 + 200 * (i % 2)}px", f"{BOX}px")
            name = f"{o['obs_id']}D{o['detector']}_cut{i}"
        spelling = ("r7", "short", "both")[i % 3]
        r7, p = to_qr3(u, o, raw, spelling=spelling, tdim=i % 2 == 0)
        for lst, sub, data in ((qr2, "qr2", raw), (qr3, "qr3", r7)):
            path = d / sub / f"{name}.fits"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            lst.append(str(path))
        patches[qr3[-1]] = p
    return dict(qr2=qr2, qr3=qr3, patches=patches, cat=u.catalog(), dir=d)


@pytest.fixture(scope="module")
def measured(files):
    return spxframe.measure(files["qr3"], files["cat"]), spxframe.measure(files["qr2"], files["cat"])


def _truth(u, df: pl.DataFrame) -> np.ndarray:
    sid = df["source_id"].cast(pl.Int64).to_numpy()
    return np.asarray(u.truth_flux(sid, df["wavelength"].to_numpy(), df["mjd"].to_numpy()), float)


def _isolated(df: pl.DataFrame, cat: pl.DataFrame, min_px: float = 12.0) -> np.ndarray:
    ra, dec = np.radians(cat["ra"].to_numpy()), np.radians(cat["dec"].to_numpy())
    v = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], 1)
    idx = {s: i for i, s in enumerate(cat["source_id"].to_numpy())}
    lim = math.cos(math.radians(min_px * spherex.PIXEL_SCALE_ARCSEC / 3600))
    iso = {s: int((v @ v[idx[s]] > lim).sum()) == 1 for s in set(df["source_id"].to_list())}
    return np.array([iso[s] for s in df["source_id"].to_list()])


def _key(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col("file").map_elements(os.path.basename, return_dtype=pl.Utf8).alias("stem"))


def _patched_sources(files) -> dict[str, set]:
    """file -> frame-source indices that carry a GHOST/CROSSTALK/STREAK patch."""
    return {f: set(p.source[np.isin(p.bit, PATCHED)].tolist()) for f, p in files["patches"].items()}


def test_qr3_files_are_read_as_r7(files):
    from spxframe.fits import l2file
    from spxframe.fits.tiles import is_tiled

    for p in files["qr3"]:
        fd = os.open(p, os.O_RDONLY)
        try:
            info = l2file.open_info(p, fd)
        finally:
            os.close(fd)
        assert info.format == "r7" and info.version.startswith("7.") and info.psf_header is None
        assert is_tiled(info.hdus["FLAGS"].header) and info.epsf_hdu is not None
        assert info.flag_bits["BLOOM"] == 26 and info.flag_bits["SOURCE"] == 21  # from the MSKN cards
    fd = os.open(files["qr2"][0], os.O_RDONLY)
    try:
        assert l2file.open_info(files["qr2"][0], fd).format == "qr2"
    finally:
        os.close(fd)


def test_accuracy_on_qr3_files(measured, files, universe):
    """Bias within 1 %, honest pulls, as on QR2 files (tests/test_photometry.py)."""
    q3 = measured[0]
    df = q3.filter(pl.col("flux").is_not_nan())
    true = _truth(universe, df)
    a = accuracy(df, true, _isolated(df, files["cat"]))
    assert a.n_bright > 30, a.n_bright
    assert abs(a.ratio - 1) < 0.01, a.ratio
    assert a.n_clean > 300, a.n_clean
    assert abs(a.pull_median) < 0.1, a.pull_median
    assert 0.85 < a.pull_width < 1.15, a.pull_width
    assert (q3["qc"] & QC["NO_PSF"] == 0).all()  # every source found its ePSF zone


def test_every_source_gets_a_row_and_zero_fluxes_are_kept(measured, universe):
    q3, q2 = (_key(t) for t in measured)
    assert q3.height > 1000
    assert set(zip(q3["stem"], q3["source_id"])) == set(zip(q2["stem"], q2["source_id"]))  # 100 % coverage
    assert q3.select(pl.struct("source_id", "file").is_unique().all()).item()
    df = q3.filter(pl.col("flux").is_not_nan())
    true = _truth(universe, df)
    low = true <= 0
    assert low.any() and np.isfinite(df["flux"].to_numpy()[low]).all()
    nonpos = q3.filter(pl.col("flux") <= 0)
    assert nonpos.height > 0 and (nonpos["qc"] & QC["NONPOSITIVE_FLUX"] > 0).all()
    # a manifest: every listed pair gets a row on a QR3 file too
    path = q3["file"][0]
    sids = q3.filter(pl.col("file") == path)["source_id"].to_list()[:20]
    man = pl.DataFrame({"source_id": sids, "path": [path] * len(sids), "status": ["done"] * len(sids)})
    assert spxframe.measure(man, universe.catalog()).height == len(sids)


def test_qr3_agrees_with_qr2_on_the_same_pixels(measured, files):
    """Sources the QR3 flag content leaves alone: ePSF and PSF-cube fluxes agree closely."""
    q3, q2 = (_key(t) for t in measured)
    j = q3.join(q2, on=["stem", "source_id"], suffix="_2")
    ok = ((j["qc"] == 0) & (j["qc_2"] == 0) & (j["flags"] == j["flags_2"]) & (j["flux_2"] > 30 * j["flux_err_2"]))
    j = j.filter(ok)
    assert j.height > 50
    r = (j["flux"] / j["flux_2"]).to_numpy()
    assert abs(np.median(r) - 1) < 0.005, np.median(r)
    assert np.percentile(np.abs(r - 1), 90) < 0.03
    np.testing.assert_allclose(j["flux_err"].to_numpy(), j["flux_err_2"].to_numpy(), rtol=0.05)


def test_every_epsf_spelling_reads_the_same(universe, files, tmp_path):
    """The same box under each column/keyword spelling, with and without TDIM, in float32 or
    float64, with FLAGS compressed or plain (an IBE cutout may hold either): the same fluxes."""
    o = _field_obs(universe, 3)[2]
    raw = universe.cutout(o["cloud_key"], "900,1100px", "300px")
    paths = []
    for i, kw in enumerate(({"spelling": "r7"}, {"spelling": "short", "tdim": False}, {"spelling": "both"},
                            {"spelling": "r7", "epsf_format": "E"}, {"spelling": "r7", "compress": False})):
        p = tmp_path / f"{o['obs_id']}D{o['detector']}_s{i}.fits"
        p.write_bytes(to_qr3(universe, o, raw, **kw)[0])
        paths.append(str(p))
    with fits.open(paths[1]) as hl:
        assert "XCTR" in hl["EPSF"].columns.names and "OVSMPX" not in hl["EPSF"].header
    with fits.open(paths[4]) as hl:
        assert not isinstance(hl["FLAGS"], fits.CompImageHDU)
    out = [spxframe.measure([p], files["cat"]).sort("source_id") for p in paths]
    assert out[0].height > 5 and out[0]["flux"].is_not_nan().sum() > 5
    for k, t in enumerate(out[1:], 1):
        assert t["source_id"].to_list() == out[0]["source_id"].to_list()
        np.testing.assert_allclose(t["flux"].to_numpy(), out[0]["flux"].to_numpy(), rtol=1e-5 if k == 3 else 1e-12)
        assert t["flags"].to_list() == out[0]["flags"].to_list()


def test_ghost_and_streak_patches_bias_a_naive_reader_not_ours(measured, files, universe):
    """Patched sources: with the R7 bits kept (bad_bits = the QR2 numbers only) the added light
    biases the flux by several %; with the default bad bits the flux stays on the truth."""
    q3 = measured[0]
    naive = spxframe.measure(files["qr3"], files["cat"], bad_bits=sorted(spherex.HARD_BAD_BITS))
    hit = _patched_sources(files)
    out = {}
    for name, t in (("ours", q3), ("naive", naive)):
        rows = []
        for f in files["qr3"]:
            src = universe.frame_sources(_cloud_key(universe, f))
            ids = set(src["source_id"].to_numpy()[list(hit[f])].tolist())
            sel = t.filter((pl.col("file") == f) & pl.col("source_id").cast(pl.Int64).is_in(list(ids))
                           & (pl.col("qc") & (QC["SATURATED"] | QC["APERTURE_EDGE"]) == 0))
            rows.append(sel)
        sel = pl.concat(rows).filter(pl.col("flux").is_not_nan())
        true = _truth(universe, sel)
        bright = true > 30 * sel["flux_err"].to_numpy()
        out[name] = np.abs(sel["flux"].to_numpy()[bright] / true[bright] - 1)
    assert out["ours"].size > 10, out["ours"].size
    assert np.median(out["ours"]) < 0.015, np.median(out["ours"])
    assert np.median(out["naive"]) > 0.03, np.median(out["naive"])


def _cloud_key(u, path: str) -> str:
    stem = os.path.basename(path).split("_full")[0].split("_cut")[0]
    obs_id, det = stem.rsplit("D", 1)
    return u.observations.filter((pl.col("obs_id") == obs_id) & (pl.col("detector") == int(det)))["cloud_key"][0]


def _saturated_boxes(u, tmp_path, n: int = 4):
    """QR2 cutouts centred on saturated sources and their QR3 versions (BLOOM cores)."""
    from spxframe.spherex import NPIX, QR2_LAYOUT

    out2, out3, sids = [], [], []
    for o in u.observations.filter(pl.col("field") == "wide_generic").sort("obs_id", "detector").iter_rows(named=True):
        a, b = QR2_LAYOUT["FLAGS"][1], QR2_LAYOUT["FLAGS"][2]
        fl = np.frombuffer(u.read(o["cloud_key"], a, b), ">i4").reshape(NPIX, NPIX)
        src = u.frame_sources(o["cloud_key"])
        x, y = np.rint(src["x"].to_numpy()).astype(int), np.rint(src["y"].to_numpy()).astype(int)
        ok = (x > 60) & (x < NPIX - 60) & (y > 60) & (y < NPIX - 60)
        sat = np.flatnonzero(ok)[(fl[y[ok], x[ok]] & 2) != 0]
        for i in [i for i in sat if src["source_id"][int(i)] not in sids][:2]:  # distinct stars
            raw = u.cutout(o["cloud_key"], f"{x[i]},{y[i]}px", "100px")
            for lst, sub, data in ((out2, "q2", raw), (out3, "q3", to_qr3(u, o, raw)[0])):
                p = tmp_path / sub / f"{o['obs_id']}D{o['detector']}_{i}.fits"
                p.parent.mkdir(exist_ok=True)
                p.write_bytes(data)
                lst.append(str(p))
            sids.append(src["source_id"][int(i)])
        if len(sids) >= n:
            return out2, out3, sids
    return out2, out3, sids


def test_saturated_cores_are_nan_in_both_releases(universe, files, tmp_path):
    """A saturated star: QR3 flags its core BLOOM, QR2 only a few OVERFLOW pixels; both give NaN
    with SATURATED and MASKED_FRACTION, never the sum of a few wing pixels."""
    q2p, q3p, sids = _saturated_boxes(universe, tmp_path)
    assert len(sids) >= 3
    cat = files["cat"]
    for paths, bit in ((q3p, 1 << R7_NEW_BITS["BLOOM"]), (q2p, 1 << spherex.FLAG_BITS["OVERFLOW"])):
        t = spxframe.measure(paths, cat)
        rows = pl.concat([t.filter((pl.col("file") == p) & (pl.col("source_id") == s)) for p, s in zip(paths, sids)])
        assert rows.height == len(sids)
        assert rows["flux"].is_nan().all() and rows["flux_err"].is_nan().all()
        assert (rows["qc"] & QC["SATURATED"] > 0).all() and (rows["qc"] & QC["MASKED_FRACTION"] > 0).all()
        assert (rows["flags"] & bit > 0).all() and (rows["masked_fraction"] > 0.5).all()
        # the faint sources around them are still measured
        assert t.filter(pl.col("qc") & QC["SATURATED"] == 0)["flux"].is_not_nan().sum() > 0


def test_bad_bits_by_name(files):
    paths = files["qr3"][2:4]
    cat = files["cat"]
    by_num = spxframe.measure(paths, cat, bad_bits=sorted(spherex.HARD_BAD_BITS) + [22, 25])
    by_name = spxframe.measure(paths, cat, bad_bits=["TRANSIENT", "SUR_ERROR", "NONFUNC", "DICHROIC", "MISSING_DATA",
                                                     "HOT", "cold", "PHANMISS", "NONLINEAR", "PERSIST", "GHOST",
                                                     "STREAK"])
    np.testing.assert_array_equal(by_name["flux"].to_numpy(), by_num["flux"].to_numpy())
    mixed = spxframe.measure(paths, cat, bad_bits="0,2,6,7,9,10,11,14,15,17,GHOST,STREAK")
    np.testing.assert_array_equal(mixed["flux"].to_numpy(), by_num["flux"].to_numpy())
    with pytest.raises(InputError):
        spxframe.measure(paths, cat, bad_bits=["GHOSTT"])
    with pytest.raises(ValueError):
        spxframe.measure(paths, cat, bad_bits=["SOURCE"])


def test_epsf_library_read_once_per_detector(files):
    from spxframe.photometry import forced

    forced._EPSF_CACHE.clear()
    spxframe.measure(files["qr3"], files["cat"])
    dets = {fits.getheader(p, "IMAGE")["DETECTOR"] for p in files["qr3"]}
    spell = {fits.getheader(p, "EPSF").tostring() for p in files["qr3"]}
    assert len(forced._EPSF_CACHE) == len(spell) and len(dets) <= len(spell) <= 3 * len(dets)


def test_kernel_epsf_path_matches_the_reference():
    """measure_stamps with an ePSF: its PSF-in-aperture sum equals the slow reference's."""
    from spxframe.photometry import epsf as pe
    from spxframe.photometry import kernels as K

    lib = sim_epsf.library(1)
    arr = lib["epsf"][7]
    coef = pe.spline_coefficients(arr[None])
    rng = np.random.default_rng(2)
    n, s = 40, 23
    cx, cy = rng.uniform(10.5, 12.5, n), rng.uniform(10.5, 12.5, n)
    img = rng.normal(1.0, 0.1, (n, s, s))
    var = np.full((n, s, s), 0.01)
    flg = np.where(rng.random((n, s, s)) < 0.1, 1 << 10, 0).astype(np.int64)
    flg[::5, 11, 11] |= 1 << 26  # a BLOOM pixel at the centre of some stamps
    bad = int(spherex.bits_to_mask(spherex.HARD_BAD_BITS | spherex.R7_HARD_BAD_BITS))
    out, _, _ = K.measure_stamps(img, var, flg, img * 0 + 1.0, np.zeros((1, 11, 11)), np.zeros(n, int), cx, cy,
                                 r_ap=2.0, r_in=5.0, r_out=9.0, bad_mask=bad, coefs=coef,
                                 epars=np.array([[16.0, 16.0, 5.0, 5.0]]), coef_index=np.zeros(n, int))
    for k in range(n):
        corr, usable, _ = pe.aperture_correction_reference(arr, 5, 5, cx[k], cy[k], 2.0, (flg[k] & bad) != 0,
                                                           min_usable=0.0)
        assert out[k, K.O_PSFIN] == pytest.approx(1.0 / corr, rel=1e-9)
        assert 1 - out[k, K.O_MASKED] == pytest.approx(usable, rel=1e-9)


def test_r7_file_without_its_epsf_table_uses_epsffile(universe, files, tmp_path):
    """A QR3 cutout stored without the EPSF table (a range-read cutout) names the ePSF library in
    an EPSFFILE card; the library is the ``epsf`` calibration product. Same fluxes; without the
    card the rows stay (NO_PSF, flux NaN)."""
    from spxframe.sim.r7 import calib

    o = _field_obs(universe, 3)[1]
    full = tmp_path / "full.fits"
    full.write_bytes(to_qr3(universe, o, universe.cutout(o["cloud_key"], "1000,1000px", "250px"))[0])
    det = int(o["detector"])
    cache = tmp_path / "cache"
    (cache / "psf").mkdir(parents=True)
    (cache / "psf" / f"epsf_D{det}.fits").write_bytes(calib.product(1, "qr3", "epsf", det).read())
    out = {}
    for name, card in (("stub", f"psf/epsf_D{det}.fits"), ("bare", None)):
        with fits.open(full) as hl:
            hdus = [h.copy() for h in hl if h.name != "EPSF"]
        if card:
            hdus[0].header["EPSFFILE"] = card
        p = cache / "data" / f"D{det}" / f"{o['obs_id']}D{det}_{name}.fits"
        p.parent.mkdir(parents=True, exist_ok=True)
        fits.HDUList(hdus).writeto(p)
        out[name] = spxframe.measure([str(p)], files["cat"], cache_dir=cache if card else None).sort("source_id")
    ref = spxframe.measure([str(full)], files["cat"]).sort("source_id")
    assert ref.height > 3 and out["stub"]["source_id"].to_list() == ref["source_id"].to_list()
    np.testing.assert_allclose(out["stub"]["flux"].to_numpy(), ref["flux"].to_numpy(), rtol=1e-12)
    bare = out["bare"]
    assert bare.height == ref.height and bare["flux"].is_nan().all() and (bare["qc"] & QC["NO_PSF"] > 0).all()
