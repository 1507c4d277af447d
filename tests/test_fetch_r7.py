"""fetch() of QR3 (pipeline R7) files by byte ranges of the cloud copy, and R7 IBE cutouts (issue 13).

R7 files have a RICE_1 tile-compressed FLAGS, an EPSF table instead of the PSF cube and HDU
offsets that vary per file (spec §3.9). Range-read cutouts must hold the same pixels as the IBE
cutout of the same box, fetch the ePSF library once per detector and version, and measure the
same fluxes. All against the two-release simulated archive over real HTTP.
"""

from __future__ import annotations

import importlib
import io
import os

import numpy as np
import polars as pl
import pytest
from accuracy import accuracy
from test_fetch_dedup import _rows  # manifest rows: one box per observation and offset

import spxframe
from spxframe import schema, spherex
from spxframe.fetcher import CacheDir
from spxframe.fits.hdu import required_hdus, scan_fits
from spxframe.planner import plan

F = importlib.import_module("spxframe.fetcher.engine")
PLANES = ("IMAGE", "VARIANCE", "ZODI")
EPSF_MIN_BYTES = 3_000_000  #: an ePSF library table moves more than this


@pytest.fixture(scope="module")
def sky():
    from spxframe import sim

    universe = sim.Universe(seed=1, releases=("qr2", "qr3"), cache_strips=256)
    with sim.serve(universe=universe) as arc:
        yield universe, arc


@pytest.fixture
def arc(sky):
    _, a = sky
    f = a.faults
    saved = {k: getattr(f, k) for k in ("truncate_rate", "endpoints", "seed")}
    a.clear_log()
    yield a
    for k, v in saved.items():
        setattr(f, k, v)


def _qr3(universe, n: int, dets=(1, 2)) -> list[dict]:
    o = universe.observations.filter((pl.col("release") == "qr3") & pl.col("cloud_available"))
    return pl.concat([o.filter(pl.col("detector") == d).head(n) for d in dets]).to_dicts()


def _fetch(rows: list[dict], cache) -> pl.DataFrame:
    out = F.fetch(pl.DataFrame(rows), cache_dir=cache, progress=False)
    assert (out["status"] == "done").all(), out["error"].to_list()
    return out


def _fits(path_or_bytes):
    from astropy.io import fits

    return fits.open(io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes)


def test_r7_range_cutouts_equal_the_ibe_cutouts(arc, tmp_path):
    """Same boxes, read by ranges and cut by IBE: IMAGE/VARIANCE/ZODI byte-identical, FLAGS values
    bit-exact (compressed there, plain here) with the same header cards, WCS-WAVE copied, the
    EPSF table a stub naming the cached library, which holds the archive's table bytes."""
    u = arc.universe
    obs = _qr3(u, 1)
    offs = ((0.0, 0.0), (0.3, -0.2))
    cut = _rows(arc, obs, "cutout", size_px=40, offsets=offs)
    rng = _rows(arc, obs, "range", size_px=40, offsets=offs, source0=100)
    a, b = _fetch(cut, tmp_path / "ibe"), _fetch(rng, tmp_path / "rng")
    cloud = [e for e in arc.log if e["endpoint"] == "cloud"]
    assert len(cloud) <= 14 * len(obs)  # a few batches per file, never a request per row
    for pa, pb, r in zip(a["path"], b["path"], rng):
        hdus = scan_fits(pb)
        assert required_hdus(hdus) == spherex.R7_HDU_NAMES
        with _fits(pa) as A, _fits(pb) as B:
            assert [h.name for h in A] == [h.name for h in B]
            for n in PLANES:
                assert A[n].data.tobytes() == B[n].data.tobytes(), n
                assert dict(A[n].header) == dict(B[n].header), n
            fa, fb = A["FLAGS"], B["FLAGS"]
            assert B["FLAGS"].header["XTENSION"] == "IMAGE" and B["FLAGS"].header["BITPIX"] == 32
            assert np.array_equal(fa.data.astype(np.int64), fb.data.astype(np.int64))
            assert fa.data.shape == (r["box_ny"], r["box_nx"]) and (fb.data & (1 << 21)).any()  # SOURCE set
            skip = {"CHECKSUM", "DATASUM", "ZHECKSUM", "ZDATASUM"}
            assert {k: v for k, v in fa.header.items() if k not in skip} == \
                {k: v for k, v in fb.header.items() if k not in skip}
            assert any(k.startswith("MSKN") for k in fb.header)
            assert A["WCS-WAVE"].data.tobytes() == B["WCS-WAVE"].data.tobytes()
            assert A[0].header == B[0].header
            stub = B["EPSF"].header
            assert stub["NAXIS2"] == 0 and stub["EPSFFILE"] == f"psf/{r['psf_key']}.fits"
            # the IBE side holds the table itself, or (a later cutout of the detector, its stream
            # closed after ZODI) the same stub and a library kept from a whole IBE cutout
            with _fits(str(tmp_path / "rng" / stub["EPSFFILE"])) as lib, \
                    _fits(str(tmp_path / "ibe" / stub["EPSFFILE"])) as ibe_lib:
                ibe_epsf = A["EPSF"] if A["EPSF"].header["NAXIS2"] else ibe_lib["EPSF"]
                assert A["EPSF"].header["NAXIS2"] or A["EPSF"].header["EPSFFILE"] == stub["EPSFFILE"]
                assert lib["EPSF"].data.tobytes() == ibe_epsf.data.tobytes()
                assert lib["EPSF"].header == ibe_epsf.header


def test_epsf_library_fetched_once_per_detector(arc, tmp_path):
    """Many R7 images on two detectors, in two fetches: one library read per detector (and
    version) in all; the second fetch, with new boxes, reads none; bytes moved are counted."""
    u = arc.universe
    obs = _qr3(u, 4)
    keys = {o["psf_key"] for o in obs}
    assert len(keys) == 2 and len(obs) == 8
    first = _fetch(_rows(arc, obs, "range", size_px=32), tmp_path)
    second = _fetch(_rows(arc, obs, "range", size_px=32, offsets=((0.2, 0.2),), source0=50), tmp_path)
    cloud = [e for e in arc.log if e["endpoint"] == "cloud"]
    big = [e for e in cloud if e["bytes_sent"] >= EPSF_MIN_BYTES]
    assert len(big) == len(keys)
    assert sorted(os.listdir(tmp_path / "psf")) == sorted(f"{k}.fits{s}" for k in keys for s in ("", ".ok"))
    moved = sum(e["bytes_sent"] for e in cloud)
    assert first["bytes"].sum() + second["bytes"].sum() == moved


@pytest.mark.slow
def test_measure_range_r7_cutouts_as_ibe_cutouts_and_truth(arc, tmp_path):
    """plan(access='range') of QR3 rows, fetch, measure: the same fluxes as on IBE cutouts of
    the same boxes, and bright fluxes on the simulated truth within 1 %."""
    u = arc.universe
    src = u.sources.filter((pl.col("field") == "deep_nep") & (pl.col("flux_2um") < 8000))
    cat = src.sort("flux_2um", descending=True).head(3).select("source_id", "ra", "dec", "pmra", "pmdec",
                                                               "ref_epoch")
    obs = spxframe.observations(cat, archive=arc, releases=("qr3",))
    obs = pl.concat([obs.filter(pl.col("detector") == d).head(3) for d in range(1, 7)])
    out = {}
    for access in ("range", "cutout"):
        m = plan(cat, obs, cutout_size="64px", access=access, archive=arc).manifest
        assert set(m["access"]) == {access}
        got = _fetch(m.to_dicts(), tmp_path / access)
        out[access] = spxframe.measure(got, cat, cache_dir=tmp_path / access).sort("obs_id", "detector", "source_id")
    r, c = out["range"], out["cutout"]
    assert r.height == c.height > 20
    assert r.select("obs_id", "detector", "source_id").equals(c.select("obs_id", "detector", "source_id"))
    np.testing.assert_allclose(r["flux"].to_numpy(), c["flux"].to_numpy(), rtol=1e-9)  # summation order
    np.testing.assert_allclose(r["flux_err"].to_numpy(), c["flux_err"].to_numpy(), rtol=1e-9)
    keep = ~schema.QC["CUTOUT_CLIPPED"]  # a planner flag (range rows do not carry it today), not a pixel fact
    assert (r["qc"] & keep).to_list() == (c["qc"] & keep).to_list() and r["flags"].to_list() == c["flags"].to_list()
    ok = r.filter(pl.col("flux").is_not_nan())
    true = np.asarray(u.truth_flux(ok["source_id"].cast(pl.Int64).to_numpy(), ok["wavelength"].to_numpy(),
                                   ok["mjd"].to_numpy()), float)
    a = accuracy(ok, true, np.ones(ok.height, bool))
    assert a.n_bright >= 10, a.n_bright
    assert abs(a.ratio - 1) < 0.01, a.ratio


def test_truncated_r7_files_are_never_trusted(arc, tmp_path):
    """A range-read R7 cutout cut short, or an IBE cutout whose stream ends inside the EPSF
    table, is rejected by the cache and fetched again; a library without its sidecar is still
    trusted after a full check (no refetch of the cutouts that use it)."""
    u = arc.universe
    obs = _qr3(u, 1, dets=(3,))
    rows = _rows(arc, obs, "range", size_px=48)
    got = _fetch(rows, tmp_path)
    path = got["path"][0]
    cache = CacheDir(tmp_path)
    data = open(path, "rb").read()
    lib = str(tmp_path / "psf" / f"{rows[0]['psf_key']}.fits")
    os.unlink(lib + ".ok")  # killed before its sidecar: a full check of the library, nothing fetched
    arc.clear_log()
    _fetch(rows, tmp_path)
    assert [e for e in arc.log if e["endpoint"] == "cloud"] == [] and os.path.exists(lib + ".ok")
    for cut in (len(data) - 2880, scan_fits(path)[2].data_offset + 2880):
        open(path, "wb").write(data[:cut])
        os.unlink(path + ".ok") if os.path.exists(path + ".ok") else None
        assert not cache.is_verified(path)
    os.unlink(lib + ".ok")
    arc.clear_log()
    again = _fetch(rows, tmp_path)
    assert open(again["path"][0], "rb").read() == data  # rebuilt, the same bytes
    assert all(e["bytes_sent"] < EPSF_MIN_BYTES for e in arc.log)  # the library was not fetched again
    # IBE: the first response ends half-way (inside the EPSF table): not kept, fetched again
    f = arc.faults
    f.truncate_rate, f.endpoints, f.seed = 0.5, ("ibe_cutout",), 3
    arc.clear_log()
    cut = _fetch(_rows(arc, _qr3(u, 2, dets=(4,)), "cutout", size_px=48), tmp_path / "ibe")
    assert any(e.get("fault") == "truncated" for e in arc.log)
    for p in cut["path"]:
        assert required_hdus(scan_fits(p)) == spherex.R7_HDU_NAMES


def test_cutout_closed_inside_the_epsf_table_is_salvaged_with_the_cached_library(arc, tmp_path):
    """An IBE cutout stream closed after ZODI (inside the EPSF table): with the detector's ePSF
    library cached by a range read (it keeps that file's WCS-WAVE), the received HDUs become a
    complete local cutout that passes the integrity check and measures exactly as the whole
    cutout, wavelengths included; a library made from a whole IBE cutout serves the same. Without
    the library nothing is made."""
    from spxframe.fetcher.ranges_r7 import library_from_file, salvage_cutout

    u = arc.universe
    one, other = _qr3(u, 2, dets=(5,))[:2]
    assert one["psf_key"] == other["psf_key"]
    _fetch(_rows(arc, [one], "range", size_px=32), tmp_path)  # caches psf/<key>.fits
    whole = _fetch(_rows(arc, [other], "cutout", size_px=200), tmp_path / "ibe")["path"][0]
    data = open(whole, "rb").read()
    epsf = next(h for h in scan_fits(whole) if h.name == "EPSF")
    closed = data[:epsf.data_offset + 5 * 2880]
    rel = f"psf/{other['psf_key']}.fits"
    lib = (tmp_path / rel).read_bytes()
    assert salvage_cutout(closed, lib[:2880 * 3], epsffile=rel) is None
    assert salvage_cutout(data[:epsf.offset - 2880], lib, epsffile=rel) is None  # ZODI itself cut
    made = salvage_cutout(closed, lib, epsffile=rel)
    assert made == salvage_cutout(closed, library_from_file(data, other["psf_key"]), epsffile=rel)
    assert library_from_file(closed, other["psf_key"]) is None
    path = tmp_path / "data" / "D5" / "salvaged.fits"
    path.write_bytes(made)
    assert required_hdus(scan_fits(path)) == spherex.R7_HDU_NAMES
    assert CacheDir(tmp_path).is_verified(str(path))
    cat = u.catalog()
    a = spxframe.measure([whole], cat).sort("source_id")
    b = spxframe.measure([str(path)], cat, cache_dir=tmp_path).sort("source_id")
    assert a.height > 0 and a["source_id"].to_list() == b["source_id"].to_list()
    np.testing.assert_array_equal(a["flux"].to_numpy(), b["flux"].to_numpy())
    np.testing.assert_array_equal(a["wavelength"].to_numpy(), b["wavelength"].to_numpy())
    # the fetcher's hooks: a whole cutout leaves its library; a body closed after ZODI is completed
    from spxframe.fetcher.tasks import Task
    from spxframe.fetcher.worker import keep_r7_library, salvage_r7_cutout

    cache = CacheDir(tmp_path / "c2").prepare()
    task = Task("cutout", "u", other["obs_id"], 5, [], psf_key=other["psf_key"])
    body = tmp_path / "body.part"
    body.write_bytes(closed)
    assert not salvage_r7_cutout(cache, task, str(body)) and body.read_bytes() == closed  # no library yet
    assert keep_r7_library(cache, task, whole) and not keep_r7_library(cache, task, whole)
    assert salvage_r7_cutout(cache, task, str(body)) and body.read_bytes() == made


def test_fetch_completes_cutouts_whose_stream_ends_inside_the_epsf_table(arc, tmp_path):
    """End to end: half of the R7 IBE cutout streams are cut mid-body (inside the 3.9 MB EPSF
    table). Once a whole cutout has left the detector's ePSF library in the cache, cut bodies are
    completed from it instead of fetched again: every row done, fewer requests than the cuts would
    cost, the same fluxes as an unfaulted fetch."""
    u = arc.universe
    obs = _qr3(u, 8, dets=(3,))
    rows = _rows(arc, obs, "cutout", size_px=200)
    ref = _fetch(rows, tmp_path / "ref")
    arc.faults.truncate_rate, arc.faults.endpoints, arc.faults.seed = 0.5, ("ibe_cutout",), 7
    arc.clear_log()
    got = _fetch(rows, tmp_path / "cut")
    log = [e for e in arc.log if e.get("endpoint") == "ibe_cutout"]
    cut = [e for e in log if e.get("fault") == "truncated"]
    assert cut, "the fault must have cut some streams"
    assert len(log) < len(rows) + len(cut), (len(log), len(rows), len(cut))  # some cut bodies were completed
    cat = u.catalog()
    a = spxframe.measure(ref["path"].to_list(), cat, cache_dir=tmp_path / "ref").sort("source_id", "obs_id")
    b = spxframe.measure(got["path"].to_list(), cat, cache_dir=tmp_path / "cut").sort("source_id", "obs_id")
    assert a.height > 0 and a["source_id"].to_list() == b["source_id"].to_list()
    np.testing.assert_array_equal(a["flux"].to_numpy(), b["flux"].to_numpy())


def test_r7_cutouts_stop_after_zodi_once_the_epsf_library_is_cached(arc, tmp_path):
    """The EPSF table (~3.9 MB) is the same in every R7 cutout of a detector and version: once
    one whole cutout has left it in the cache, later cutout streams are closed after ZODI and
    completed from the library. Bytes fall several-fold, no request is repeated, and fluxes equal
    those of whole cutouts fetched one by one."""
    u = arc.universe
    rows = _rows(arc, _qr3(u, 6, dets=(2,)), "cutout", size_px=64)
    whole = [_fetch([r], tmp_path / f"whole{i}") for i, r in enumerate(rows)]  # each alone: no library
    arc.clear_log()
    first = _fetch(rows[:1], tmp_path / "one")  # whole: it leaves the detector's library in the cache
    rest = _fetch(rows[1:], tmp_path / "one")
    got = pl.concat([first, rest])
    assert len([e for e in arc.log if e.get("endpoint") == "ibe_cutout"]) == len(rows)  # none fetched twice
    per_whole = sum(int(w["bytes"].sum()) for w in whole) / len(rows)
    assert per_whole > EPSF_MIN_BYTES and first["bytes"].sum() > EPSF_MIN_BYTES
    assert (rest["bytes"] < per_whole / 10).all(), rest["bytes"].to_list()
    for p in got["path"]:
        names = [h.name for h in scan_fits(p)]
        assert names == ["PRIMARY", "IMAGE", "FLAGS", "VARIANCE", "ZODI", "EPSF", "WCS-WAVE"], names
    cat = u.catalog()
    a = pl.concat([spxframe.measure(w["path"].to_list(), cat, cache_dir=tmp_path / f"whole{i}")
                   for i, w in enumerate(whole)]).sort("source_id", "obs_id")
    b = spxframe.measure(got["path"].to_list(), cat, cache_dir=tmp_path / "one").sort("source_id", "obs_id")
    assert a.height > 0 and a.select("source_id", "obs_id").equals(b.select("source_id", "obs_id"))
    np.testing.assert_array_equal(a["flux"].to_numpy(), b["flux"].to_numpy())
    np.testing.assert_array_equal(a["wavelength"].to_numpy(), b["wavelength"].to_numpy())


@pytest.mark.parametrize("convention", ["rebase", "resample"])
def test_r7_cutouts_are_fetched_whole_when_their_wave_table_is_not_the_parents(arc, tmp_path, convention):
    """If IRSA rebases or re-samples a cutout's WCS-WAVE for its box (spec §8: UNCONFIRMED), a
    library table cannot stand in for it: no stream is closed early, and wavelengths equal those
    the shift recipe gives (where they are)."""
    u = arc.universe
    rows = _rows(arc, _qr3(u, 3, dets=(2,)), "cutout", size_px=64, offsets=((0.0, 0.0), (0.3, -0.2)))
    shift = [_fetch(rows[:1], tmp_path / "shift"), _fetch(rows[1:], tmp_path / "shift")]
    assert (shift[1]["bytes"] < EPSF_MIN_BYTES).all()  # the shift recipe: closed after ZODI
    saved = u.cutout_wave_convention
    u.cutout_wave_convention = convention
    try:
        other = [_fetch(rows[:1], tmp_path / convention), _fetch(rows[1:], tmp_path / convention)]
    finally:
        u.cutout_wave_convention = saved
    assert (other[1]["bytes"] > EPSF_MIN_BYTES).all()  # whole: their tables serve their own box only
    cat = u.catalog()
    a, b = (spxframe.measure(pl.concat(f)["path"].to_list(), cat, cache_dir=tmp_path / d).sort("source_id", "obs_id")
            for f, d in ((shift, "shift"), (other, convention)))
    assert a.height > 0 and a.select("source_id", "obs_id").equals(b.select("source_id", "obs_id"))
    np.testing.assert_allclose(b["wavelength"].to_numpy(), a["wavelength"].to_numpy(), rtol=0, atol=2e-6)
    np.testing.assert_array_equal(a["flux"].to_numpy(), b["flux"].to_numpy())
