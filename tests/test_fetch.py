"""fetch(): transfers against the simulated archive on 127.0.0.1 (cutout, range, full), faults,
kill-and-resume, range-vs-IBE identity, cache keys, path safety, Retry-After, injection.

Manifests are built by hand from ``universe.observations`` so these tests do not depend on plan().
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spxframe.errors import InputError
from spxframe.fetcher import cache as C
from spxframe.fetcher import ranges as R
from spxframe.fits import cards, hdu

F = importlib.import_module("spxframe.fetcher.engine")  # the module; ``spxframe.fetch`` is the function

PLANES = ("IMAGE", "FLAGS", "VARIANCE", "ZODI")

# --------------------------------------------------------------------------------------
# pure helpers (no network)
# --------------------------------------------------------------------------------------


def test_format_card_roundtrip_astropy():
    from astropy.io import fits

    made = [cards.format_card("CRPIX1", 1020.5 - 37, "reference pixel"), cards.format_card("NAXIS1", 60),
             cards.format_card("CRPIX2A", 1.0 - 1900), cards.format_card("CRPIX1W", -0.0),
             cards.format_card("PSFFILE", "psf/D3_l2b-v20-2025-247.fits", "cube"),
             cards.format_card("SIMPLE", True), cards.format_card("TINY", 1e-30)]
    assert all(len(c) == 80 for c in made)
    h = fits.Header.fromstring(b"".join(made).decode() + "END".ljust(80))
    assert h["CRPIX1"] == 983.5 and h["NAXIS1"] == 60 and h["CRPIX2A"] == -1899.0
    assert h["PSFFILE"] == "psf/D3_l2b-v20-2025-247.fits" and h["SIMPLE"] is True and h["TINY"] == 1e-30
    assert h.comments["CRPIX1"] == "reference pixel"


def test_edit_header_and_parse():
    from astropy.io import fits

    hdr = fits.ImageHDU(np.zeros((5, 7), ">f4"), name="IMAGE").header
    hdr["CRPIX1"] = (10.5, "x ref")
    hdr["CRPIX1A"] = 1.0
    for i in range(60):
        hdr[f"K{i}"] = i
    raw = hdr.tostring().encode()
    assert cards.header_length(raw) == len(raw) and len(raw) % 2880 == 0
    assert cards.header_length(raw[:-2880]) is None or len(raw) == 2880
    new = cards.edit_header(raw, update={"CRPIX1": 10.5 - 3, "CRPIX1A": 1.0 - 3, "ABSENT": 1}, delete=["K3"],
                        append=[("PSFFILE", "psf/x.fits", "c")])
    h = fits.Header.fromstring(new.decode())
    assert h["CRPIX1"] == 7.5 and h.comments["CRPIX1"] == "x ref" and h["CRPIX1A"] == -2.0
    assert "K3" not in h and "ABSENT" not in h and h["PSFFILE"] == "psf/x.fits"
    keys = cards.parse_header(new)
    assert keys["NAXIS1"] == 7 and keys["EXTNAME"] == "IMAGE" and keys["BITPIX"] == -32


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 500)), min_size=0, max_size=30),
       st.integers(0, 300))
def test_coalesce_covers_and_respects_gap(spans, gap):
    ranges = [(s, s + n) for s, n in spans]
    merged = R.coalesce(ranges, max_gap=gap)
    for s, e in ranges:  # every range inside one merged range
        assert any(ms <= s and e <= me for ms, me in merged)
    for (_s0, e0), (s1, _e1) in zip(merged, merged[1:]):
        assert s1 - e0 > gap  # merged ranges are separated by more than the gap
    assert sum(e - s for s, e in merged) <= sum(e - s for s, e in ranges) + gap * len(ranges)


def test_local_names_cannot_escape(tmp_path):
    b = R.Box(10, 20, 30, 40)
    assert C.local_name("2025W19_2B_0073_2", 3, b) == "data/D3/2025W19_2B_0073_2D3_x10_y20_30x40.fits"
    assert C.local_name("2025W19_2B_0073_2", 3, full=True) == "data/D3/2025W19_2B_0073_2D3_full.fits"
    for bad in ("../../etc/passwd", "2025W19_2B_0073_2/../../x", "/abs", "2025W19_2B_0073_2\x00", "", "a" * 300):
        with pytest.raises(InputError):
            C.local_name(bad, 3, b)
    for det in (0, 7, "3/../..", None):
        with pytest.raises(InputError):
            C.local_name("2025W19_2B_0073_2", det, b)
    with pytest.raises(InputError):
        C.local_name("2025W19_2B_0073_2", 3, R.Box(-5, 0, 10, 10))
    for bad in ("../x", "a/b", ".hidden", "x..y", ""):
        with pytest.raises(InputError):
            C.psf_name(bad)
    with pytest.raises(InputError):
        C.inside(str(tmp_path), "../outside.fits")


def test_cache_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    m = pl.DataFrame({"obs_id": ["2025W19_2B_0073_2"], "detector": [3], "access": ["full"],
                      "url": ["http://127.0.0.1:9/x.fits"]})
    with pytest.raises(InputError, match="not writable"):
        F.fetch(m, cache_dir=blocker / "cache", progress=False)
    with pytest.raises(InputError, match="url"):
        F.fetch(m.drop("url"), cache_dir=tmp_path / "c", progress=False)


def test_retry_policy_and_limiter():
    from spxframe.fetcher.http import HostLimiter, RetryPolicy, parse_retry_after

    p = RetryPolicy(retries=3, backoff=0.5, max_backoff=4.0, max_retry_after=2.0)
    assert all(0.25 <= p.delay(1) <= 0.5 for _ in range(50))
    assert all(p.delay(10) <= 4.0 for _ in range(50))
    assert 2.0 <= p.delay(1, retry_after=100.0) <= 2.1  # bounded
    assert 1.0 <= p.delay(1, retry_after=1.0) <= 1.1
    assert parse_retry_after("3") == 3.0 and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    lim = HostLimiter(8, 4)
    t0 = time.monotonic()
    lim.overload(t0)
    lim.overload(t0 - 1)  # an answer to a request started before the decrease: ignored
    assert lim.limit == 2.0 and lim.decreases == 1
    # issue 14: grow back only below the level that was overloaded; try it again only after a
    # quiet spell (PROBE_AFTER successes), and a level that fails again waits twice as long
    for _ in range(10):
        lim.success()
    assert lim.ceiling == 3 and lim.limit == 3.0
    for _ in range(lim.probe_after):
        lim.success()
    assert lim.ceiling == 4
    lim.overload(time.monotonic(), retry_after=0.3)   # the retried level fails: back below it, later
    assert lim.ceiling == 3 and lim.probe_after == 2 * 16
    t0 = time.monotonic()
    with lim.slot():   # Retry-After honoured: no request starts before it
        assert time.monotonic() - t0 >= 0.25
    for _ in range(400):   # a long run without 503s: back up to the cap
        lim.success()
    assert lim.limit == 8.0


# --------------------------------------------------------------------------------------
# simulated archive
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arc(universe):
    """Our own server (faults are mutated here), reset before each test that uses it."""
    from spxframe import sim

    with sim.serve(universe=universe) as a:
        yield a


@pytest.fixture
def sarc(arc):
    f = arc.faults
    saved = {k: getattr(f, k) for k in ("error_rate", "latency_s", "bandwidth_bps", "truncate_rate",
                                       "max_cutout_concurrency", "retry_after_s", "error_rates", "endpoints")}
    f.error_rate, f.truncate_rate, f.latency_s, f.error_rates, f.endpoints = 0.0, 0.0, 0.0, {}, None
    f.bandwidth_bps, f.max_cutout_concurrency, f.retry_after_s = None, None, 0.2
    arc.clear_log()
    yield arc
    for k, v in saved.items():
        setattr(f, k, v)


def _obs(universe, n: int, *, det: int | None = None) -> list[dict]:
    o = universe.observations
    if "cloud_available" in o.columns:
        o = o.filter(pl.col("cloud_available"))
    if det is not None:
        o = o.filter(pl.col("detector") == det)
    return o.head(n).to_dicts()


def _ibe_box(universe, key: str, center: str, size: str) -> R.Box:
    """The box the archive's cutout covers, zero-based parent px."""
    return R.Box(*universe.cutout_box(key, center, size))


def _rows(arc, obs: list[dict], access: str, *, size_px: int = 40, offsets=((0.0, 0.0),), source0: int = 0):
    """Manifest rows: for each observation and offset (deg) from the field centre, one box."""
    u = arc.universe
    rows = []
    k = source0
    for o in obs:
        for dra, ddec in offsets:
            ra = o["s_ra"] + dra / max(np.cos(np.radians(o["s_dec"])), 0.1)
            dec = o["s_dec"] + ddec
            center, size = f"{ra:.7f},{dec:.7f}", f"{size_px}px"
            box = _ibe_box(u, o["cloud_key"], center, size)
            if access == "cutout":
                url = f"{arc.url}/{o['uri']}?center={center}&size={size}&gzip=false"
            elif access == "range":
                url = f"{arc.cloud_url}/{o['cloud_key']}"
            else:
                url = f"{arc.url}/{o['uri']}"
            rows.append(dict(source_id=str(k), obs_id=o["obs_id"], detector=int(o["detector"]),
                             band=f"D{int(o['detector'])}", ra=ra, dec=dec, access=access,
                             request_id=f"{o['obs_id']}D{o['detector']}:{access}:{k if access == 'cutout' else ''}",
                             url=url, ranges="", box_x0=box.x0, box_y0=box.y0, box_nx=box.nx, box_ny=box.ny,
                             clipped=False, psf_key=o.get("psf_key"), status="planned",
                             _center=center, _size=size, _key=o["cloud_key"]))
            k += 1
    return rows


def _manifest(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])


def _fits(path_or_bytes):
    from astropy.io import fits

    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return fits.open(src)


def test_range_cutout_equals_ibe_cutout(sarc, tmp_path):
    """Range-read cutouts and IBE cutouts of the same boxes: identical pixels, equivalent headers."""
    u = sarc.universe
    obs = _obs(u, 2)
    offs = ((0.0, 0.0), (0.3, -0.2), (-0.5, 0.4))
    cut = _rows(sarc, obs, "cutout", size_px=40, offsets=offs)
    rng = _rows(sarc, obs, "range", size_px=40, offsets=offs, source0=100)
    out = pl.concat([F.fetch(_manifest(cut), cache_dir=tmp_path / "ibe", progress=False),
                     F.fetch(_manifest(rng), cache_dir=tmp_path / "rng", progress=False)])
    assert out["status"].to_list() == ["done"] * len(out), out["error"].to_list()
    # requests: one per cutout; range: headers, windows, rows, PSF once — few per file
    cloud = [e for e in sarc.log if e.get("endpoint") == "cloud"]
    assert len([e for e in sarc.log if e.get("endpoint") == "ibe_cutout"]) == len(cut)
    assert 0 < len(cloud) <= 16 * len(obs)
    paths = dict(zip(out["source_id"].to_list(), out["path"].to_list()))
    for c, r in zip(cut, rng):
        pc, pr = paths[c["source_id"]], paths[r["source_id"]]
        assert pc != pr
        ibe = u.cutout(c["_key"], c["_center"], c["_size"])
        assert Path(pc).read_bytes() == ibe  # the IBE cutout stored as served
        with _fits(ibe) as a, _fits(pr) as b:
            assert [h.name for h in a] == [h.name for h in b]
            for name in PLANES:
                assert a[name].data.tobytes() == b[name].data.tobytes(), name
                ha, hb = a[name].header, b[name].header
                for key in ("NAXIS1", "NAXIS2", "CRPIX1", "CRPIX2", "CRPIX1A", "CRPIX2A", "CRPIX1W", "CRPIX2W"):
                    assert ha.get(key) == hb.get(key), (name, key)
                assert {k: v for k, v in ha.items() if k not in ("CHECKSUM", "DATASUM")} == \
                    {k: v for k, v in hb.items() if k not in ("CHECKSUM", "DATASUM")}, name
            assert a["WCS-WAVE"].header == b["WCS-WAVE"].header
            assert a["WCS-WAVE"].data.tobytes() == b["WCS-WAVE"].data.tobytes()
            assert a[0].header == b[0].header
            pa, pb = a["PSF"].header, b["PSF"].header
            assert pb["NAXIS"] == 0 and "NAXIS3" not in pb
            skip = {"NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "PSFFILE", "CHECKSUM", "DATASUM"}
            assert {k: v for k, v in pa.items() if k not in skip} == {k: v for k, v in pb.items() if k not in skip}
            rel = pb["PSFFILE"]
            assert rel == f"psf/{r['psf_key']}.fits"
            with _fits(str(tmp_path / "rng" / rel)) as p:
                assert p["PSF"].data.tobytes() == a["PSF"].data.tobytes()
                assert p["PSF"].header == a["PSF"].header
    # the PSF cube was read once per psf_key
    psf_bytes = 121 * 101 * 101 * 4
    big = [e for e in cloud if (e.get("bytes_sent") or 0) >= psf_bytes]
    assert len(big) <= len({r["psf_key"] for r in rng})


def test_faults_every_row_done_or_failed(sarc, tmp_path):
    """20 % 502/503, 10 % truncated bodies, latency, cutout concurrency cap 4: every row ends done
    with the archive's bytes, or failed with a reason after the retry budget."""
    u = sarc.universe
    f = sarc.faults
    f.error_rate, f.truncate_rate, f.latency_s, f.max_cutout_concurrency = 0.2, 0.1, 0.02, 4
    obs = _obs(u, 6)
    rows = (_rows(sarc, obs[:4], "cutout", size_px=30, offsets=((0, 0), (0.2, 0.2)))
            + _rows(sarc, obs[2:6], "range", size_px=30, offsets=((0, 0), (-0.2, 0.1)), source0=100)
            + _rows(sarc, obs[5:6], "full", size_px=30, source0=200))
    retries = 6
    out = F.fetch(_manifest(rows), cache_dir=tmp_path, progress=False, retries=retries, backoff=0.05,
                  max_backoff=0.5, max_concurrency=6)
    by = {r["source_id"]: r for r in rows}
    n_done = 0
    for r in out.iter_rows(named=True):
        assert r["status"] in ("done", "failed")
        assert 0 <= r["attempts"] <= retries + 1
        if r["status"] == "failed":
            assert r["error"] and r["attempts"] >= 1
            continue
        n_done += 1
        src = by[r["source_id"]]
        data = Path(r["path"]).read_bytes()
        if r["access"] == "cutout":
            assert data == u.cutout(src["_key"], src["_center"], src["_size"])
        elif r["access"] == "full":
            assert len(data) == u.file_size(src["_key"])
            assert data[:2880 * 20] == u.read(src["_key"], 0, 2880 * 20)
        else:
            with _fits(data) as a, _fits(u.cutout(src["_key"], src["_center"], src["_size"])) as b:
                for name in PLANES:
                    assert a[name].data.tobytes() == b[name].data.tobytes()
    assert n_done >= len(rows) - 2  # with 7 attempts almost nothing should fail
    statuses = [e["status"] for e in sarc.log]
    assert any(s in (502, 503) for s in statuses)  # faults really happened
    # no leftovers
    assert not list(tmp_path.rglob("*.part"))


def test_cache_key_separates_sizes_and_rerun_skips(sarc, tmp_path):
    u = sarc.universe
    obs = _obs(u, 1)
    a = _rows(sarc, obs, "cutout", size_px=20)
    b = _rows(sarc, obs, "cutout", size_px=44, source0=1)
    c = (_rows(sarc, obs, "range", size_px=20, offsets=((0.1, 0.1),), source0=2)
         + _rows(sarc, obs, "range", size_px=44, offsets=((0.1, 0.1),), source0=3))
    m = _manifest(a + b + c)
    out = F.fetch(m, cache_dir=tmp_path, progress=False)
    assert set(out["status"]) == {"done"}
    paths = out["path"].to_list()
    assert len(set(paths)) == 4
    assert all(Path(p).is_relative_to(tmp_path) for p in paths)
    assert all(Path(p + ".ok").exists() for p in paths)
    with _fits(paths[0]) as x, _fits(paths[1]) as y:
        assert x["IMAGE"].data.shape != y["IMAGE"].data.shape
    sarc.clear_log()
    again = F.fetch(out, cache_dir=tmp_path, progress=False)
    assert set(again["status"]) == {"done"} and again["path"].to_list() == paths
    assert [e for e in sarc.log if e.get("endpoint") in ("ibe_cutout", "cloud", "ibe_file")] == []
    # a truncated file (sidecar now wrong) and a file without a sidecar are both re-verified
    Path(paths[0]).write_bytes(Path(paths[0]).read_bytes()[:-2880])
    Path(paths[2] + ".ok").unlink()
    third = F.fetch(out, cache_dir=tmp_path, progress=False)
    assert set(third["status"]) == {"done"}
    hits = [e for e in sarc.log if e.get("endpoint") == "ibe_cutout"]
    assert len(hits) == 1  # only the damaged cutout was fetched again
    assert Path(paths[2] + ".ok").exists()
    # a PSF cube that went missing is fetched again (with the range cutouts that point at it)
    for p in (tmp_path / "psf").iterdir():
        p.unlink()
    sarc.clear_log()
    fourth = F.fetch(out, cache_dir=tmp_path, progress=False)
    assert set(fourth["status"]) == {"done"}
    assert len(list((tmp_path / "psf").glob("*.fits"))) == 1
    assert not [e for e in sarc.log if e.get("endpoint") == "ibe_cutout"]


def test_bad_rows_fail_without_escaping(sarc, tmp_path):
    u = sarc.universe
    obs = _obs(u, 1)
    good = _rows(sarc, obs, "cutout", size_px=20)
    evil = dict(good[0], source_id="e1", obs_id="../../../../tmp/evil")
    evil2 = dict(good[0], source_id="e2", access="range", url=f"{sarc.cloud_url}/{obs[0]['cloud_key']}",
                 psf_key="../../evil", box_x0=good[0]["box_x0"] + 5)
    outside = dict(good[0], source_id="e3",
                   url=f"{sarc.url}/{obs[0]['uri']}?center={obs[0]['s_ra']},{-obs[0]['s_dec']}&size=20px&gzip=false",
                   box_x0=good[0]["box_x0"] + 7)
    missing = dict(good[0], source_id="e4", access="full", url=f"{sarc.url}/ibe/data/spherex/qr2/nope.fits")
    nodet = dict(good[0], source_id="e5", detector=None, box_x0=good[0]["box_x0"] + 9)
    out = F.fetch(_manifest(good + [evil, evil2, outside, missing, nodet]), cache_dir=tmp_path / "c", progress=False,
                  retries=2, backoff=0.01)
    st_ = dict(zip(out["source_id"], out["status"]))
    err = dict(zip(out["source_id"], out["error"]))
    assert st_["0"] == "done"
    assert st_["e1"] == "failed" and "obs_id" in err["e1"]
    assert st_["e2"] == "failed" and "psf_key" in err["e2"]
    assert st_["e3"] == "failed" and "400" in err["e3"]
    assert st_["e4"] == "failed" and "404" in err["e4"]
    assert st_["e5"] == "failed" and "detector" in err["e5"]
    att = dict(zip(out["source_id"], out["attempts"]))
    assert att["e3"] == 1 and att["e4"] == 1  # 4xx: no retries
    assert not (tmp_path / "tmp").exists() and not (tmp_path / "evil.fits").exists()
    for p in (tmp_path / "c").rglob("*"):
        assert p.resolve().is_relative_to((tmp_path / "c").resolve())


def test_retry_after_honoured_and_bounded(sarc, tmp_path):
    u = sarc.universe
    obs = _obs(u, 1)
    rows = _rows(sarc, obs, "cutout", size_px=20)
    f = sarc.faults
    f.error_rate, f.retry_after_s = 1.0, 0.4
    t0 = time.monotonic()
    out = F.fetch(_manifest(rows), cache_dir=tmp_path, progress=False, retries=2, backoff=0.01, max_backoff=0.01)
    dt = time.monotonic() - t0
    assert out["status"][0] == "failed" and out["attempts"][0] == 3
    assert any(s in out["error"][0] for s in ("502", "503"))
    n503 = sum(1 for e in sarc.log if e["status"] == 503)
    assert dt >= 0.35 * min(n503, 2)  # waited Retry-After after the 503s (not just 10 ms backoff)
    # bounded: a huge Retry-After is capped by max_retry_after
    f.retry_after_s = 3600
    t0 = time.monotonic()
    out = F.fetch(_manifest(rows), cache_dir=tmp_path, progress=False, retries=2, backoff=0.01,
                  max_backoff=0.01, max_retry_after=0.2)
    assert time.monotonic() - t0 < 5 and out["status"][0] == "failed"
    # and the request succeeds once the archive recovers
    f.error_rate = 0.0
    out = F.fetch(_manifest(rows), cache_dir=tmp_path, progress=False)
    assert out["status"][0] == "done"


def test_session_and_storage_options_injection(sarc, tmp_path):
    import aiohttp
    import requests

    u = sarc.universe
    obs = _obs(u, 1)
    rows = _rows(sarc, obs, "cutout", size_px=20) + _rows(sarc, obs, "range", size_px=20, source0=1,
                                                          offsets=((0.1, 0.1),))

    class CountingSession(requests.Session):
        calls: list[str] = []

        def request(self, method, url, *a, **kw):
            CountingSession.calls.append(url)
            return super().request(method, url, *a, **kw)

    starts: list[str] = []

    async def on_start(session, ctx, params):
        starts.append(params.headers.get("X-Token", ""))

    tc = aiohttp.TraceConfig()
    tc.on_request_start.append(on_start)
    sess = CountingSession()
    sess.headers["X-Token"] = "abc"
    out = F.fetch(_manifest(rows), cache_dir=tmp_path, progress=False, session=sess,
                  storage_options={"headers": {"X-Token": "xyz"}, "client_kwargs": {"trace_configs": [tc]}})
    assert set(out["status"]) == {"done"}
    assert len(CountingSession.calls) == 1 and "center=" in CountingSession.calls[0]
    assert starts and set(starts) == {"xyz"}


_KILL_SCRIPT = textwrap.dedent("""
    import importlib, sys, polars as pl; F = importlib.import_module('spxframe.fetcher.engine')
    m = pl.read_parquet(sys.argv[1])
    F.fetch(m, cache_dir=sys.argv[2], progress=False, max_concurrency=2)
""")


def test_killed_run_resumes_without_refetching(sarc, tmp_path):
    """Kill a fetch mid-transfer (slow bandwidth), rerun: nothing corrupt is trusted, verified
    files are not fetched again, the rest completes."""
    u = sarc.universe
    obs = _obs(u, 4)
    rows = _rows(sarc, obs, "cutout", size_px=24) + _rows(sarc, obs[:2], "range", size_px=24, source0=100)
    man = tmp_path / "m.parquet"
    _manifest(rows).write_parquet(man)
    cache = tmp_path / "cache"
    sarc.faults.bandwidth_bps = 2_000_000  # a 5 MB cutout takes ~2.5 s
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(man), str(cache)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kill once a data file is done and another is in flight
            oks = list(cache.rglob("*.fits.ok")) if cache.exists() else []
            parts = list(cache.rglob("*.part")) if cache.exists() else []
            if any("data" in str(p) for p in oks) and parts:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    sarc.faults.bandwidth_bps = None
    # files at their final names were verified before the rename (their .ok sidecar may be
    # missing if the kill fell between rename and sidecar: a rerun re-verifies and keeps them)
    done_before = {p.name for p in cache.rglob("*.fits")}
    assert done_before
    # every file at a final name is complete; partial transfers are only *.part
    for p in cache.rglob("*.fits"):
        hdu.scan_fits(p, required=("PRIMARY", "PSF") if p.parent.name == "psf" else hdu.REQUIRED_HDUS)
    time.sleep(0.3)
    t_rerun = time.time()  # the killed client's sockets may still be logged: look at later requests
    out = F.fetch(_manifest(rows), cache_dir=cache, progress=False)
    assert set(out["status"]) == {"done"}, out["error"].to_list()
    assert not list(cache.rglob("*.part"))
    log = [e for e in sarc.log if e["t_start"] >= t_rerun]
    fetched_again = {(e["path"], e.get("query") or "") for e in log if e.get("endpoint") == "ibe_cutout"}
    n_cut_done = 0
    for r in out.iter_rows(named=True):
        if r["access"] != "cutout":
            continue
        path_q = r["url"].split(str(sarc.url), 1)[1]
        p, q = path_q.split("?", 1)
        if Path(r["path"]).name in done_before:
            n_cut_done += 1
            assert (p, q) not in fetched_again and r["attempts"] == 0 and r["bytes"] == 0
        else:
            assert (p, q) in fetched_again
    assert len(fetched_again) == len([r for r in rows if r["access"] == "cutout"]) - n_cut_done
    # the range files finished before the kill were not read again either
    rng_done = [r for r in out.iter_rows(named=True) if r["access"] == "range" and Path(r["path"]).name in done_before]
    for r in rng_done:
        assert r["attempts"] == 0
    # every file verifies
    for r in out.iter_rows(named=True):
        hdu.scan_fits(r["path"])


# --------------------------------------------------------------------------------------
# range reads of an odd-shaped file (header lengths unlike the nominal QR2 layout)
# --------------------------------------------------------------------------------------


def _odd_mef(nx: int = 130, ny: int = 97, image_cards: int = 300, psf_cards: int = 1200) -> bytes:
    """A 7-HDU MEF whose headers are far from the nominal sizes (IMAGE 8+ blocks, PSF 30+ blocks)."""
    from astropy.io import fits

    rng = np.random.default_rng(5)
    hdus = [fits.PrimaryHDU()]
    hdus[0].header["VERSION"] = "6.5.6"
    for name, dt in (("IMAGE", ">f4"), ("FLAGS", ">i4"), ("VARIANCE", ">f4"), ("ZODI", ">f4")):
        h = fits.ImageHDU((rng.normal(size=(ny, nx)) * 1e3).astype(dt), name=name)
        for k, v in (("CRPIX1", 65.5), ("CRPIX2", 49.0), ("CRPIX1A", 1.0), ("CRPIX2A", 1.0),
                     ("CRPIX1W", 0.0), ("CRPIX2W", 0.0)):
            h.header[k] = v
        for i in range(image_cards if name == "IMAGE" else 3):
            h.header[f"JUNK{i}"] = (i * 0.5, "padding card")
        hdus.append(h)
    psf = fits.ImageHDU(rng.normal(size=(9, 11, 11)).astype(">f4"), name="PSF")
    for i in range(psf_cards):
        psf.header[f"ZC{i + 1}"] = (float(i), f"Center of x zone ({i % 3}, {i // 3})")
    hdus.append(psf)
    hdus.append(fits.BinTableHDU.from_columns(
        [fits.Column("X", "5E", array=np.arange(5, dtype=float)[None]),
         fits.Column("VALUES", "50E", array=np.arange(50, dtype=float)[None])], name="WCS-WAVE"))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


@pytest.fixture
def odd_server():
    """A plain HTTP server with Range support serving one odd MEF; yields (url, bytes, log)."""
    import http.server
    import re as _re

    data = _odd_mef()
    log: list[str] = []
    agents: set[str] = set()

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            rg = self.headers.get("Range")
            log.append(rg or "")
            agents.add(self.headers.get("User-Agent", ""))
            m = _re.match(r"bytes=(\d+)-(\d+)$", rg or "")
            if m:
                s, e = int(m[1]), min(int(m[2]) + 1, len(data))
                body, code = data[s:e], 206
            else:
                body, code = data, 200
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            if code == 206:
                self.send_header("Content-Range", f"bytes {s}-{e - 1}/{len(data)}")
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/qr2/level2/x/l2b-v20-2025-247/2/f.fits", data, log
    srv.shutdown()
    assert agents == {F.USER_AGENT}, agents  # our User-Agent on range reads and full GETs


def test_range_read_parses_unusual_header_lengths(odd_server, tmp_path):
    from astropy.io import fits

    url, data, log = odd_server
    boxes = [(3, 4, 20, 10), (100, 80, 40, 30), (0, 0, 130, 97)]  # the second is clipped to 30x17
    m = pl.DataFrame([dict(source_id=str(i), obs_id="2025W19_2B_0073_2", detector=2, access="range", url=url,
                           request_id="r", box_x0=b[0], box_y0=b[1], box_nx=b[2], box_ny=b[3])
                      for i, b in enumerate(boxes)])
    out = F.fetch(m, cache_dir=tmp_path, progress=False)
    assert set(out["status"]) == {"done"}, out["error"].to_list()
    with fits.open(io.BytesIO(data)) as parent:
        assert len(parent["IMAGE"].header.tostring()) // 2880 >= 8
        for (x0, y0, nx, ny), path in zip(boxes, out["path"]):
            nx, ny = min(nx, 130 - x0), min(ny, 97 - y0)
            with fits.open(path) as c:
                for name in PLANES:
                    assert np.array_equal(c[name].data, parent[name].data[y0:y0 + ny, x0:x0 + nx])
                    assert c[name].header["CRPIX1"] == 65.5 - x0 and c[name].header["CRPIX2A"] == 1.0 - y0
                    assert c[name].header["CRPIX1W"] == -x0 and c[name].header["JUNK2"] == 1.0
                assert c["PSF"].header["ZC1000"] == 999.0 and c["PSF"].header["NAXIS"] == 0
                assert c["PSF"].header["PSFFILE"] == "psf/D2_l2b-v20-2025-247.fits"
                assert c["WCS-WAVE"].data.tobytes() == parent["WCS-WAVE"].data.tobytes()
        with fits.open(tmp_path / "psf" / "D2_l2b-v20-2025-247.fits") as p:
            assert np.array_equal(p["PSF"].data, parent["PSF"].data)
    assert len(log) <= 16


def test_range_recentres_predicted_box(sarc, tmp_path):
    """A planned box around a predicted pixel a few px off is re-derived from the file's WCS:
    the range cutout then equals the IBE cutout for center=ra,dec; recenter=False keeps it."""
    u = sarc.universe
    o = _obs(u, 1)[0]
    ra, dec = round(o["s_ra"] + 0.1, 7), round(o["s_dec"] - 0.1, 7)
    center, size = f"{ra:.7f},{dec:.7f}", "30px"
    x0, y0, nx, ny = u.cutout_box(o["cloud_key"], center, size)
    xp, yp = x0 + 14.5 + 3.2, y0 + 14.5 - 2.7  # a prediction off by a few pixels
    bx, by = R.nearest_box_start(xp, 30), R.nearest_box_start(yp, 30)
    assert (bx, by) != (x0, y0)
    row = dict(source_id="1", obs_id=o["obs_id"], detector=int(o["detector"]), ra=ra, dec=dec, x_parent=xp,
               y_parent=yp, access="range", request_id="r", url=f"{sarc.cloud_url}/{o['cloud_key']}",
               box_x0=bx, box_y0=by, box_nx=30, box_ny=30, clipped=False, psf_key=o["psf_key"])
    out = F.fetch(pl.DataFrame([row]), cache_dir=tmp_path / "a", progress=False)
    assert out["status"][0] == "done" and Path(out["path"][0]).name.endswith(f"_x{bx}_y{by}_30x30.fits")
    with _fits(out["path"][0]) as a, _fits(u.cutout(o["cloud_key"], center, size)) as b:
        for name in PLANES:
            assert a[name].data.tobytes() == b[name].data.tobytes()
            assert a[name].header["CRPIX1A"] == b[name].header["CRPIX1A"] == 1 - x0
    out = F.fetch(pl.DataFrame([row]), cache_dir=tmp_path / "b", progress=False, recenter=False)
    with _fits(out["path"][0]) as a:
        assert a["IMAGE"].header["CRPIX1A"] == 1 - bx and a["IMAGE"].header["CRPIX2A"] == 1 - by


def test_full_file_md5_checked(odd_server, tmp_path):
    import hashlib

    url, data, log = odd_server
    url = url.replace("/f.fits", "/g.fits")
    row = dict(source_id="1", obs_id="2025W19_2B_0073_2", detector=2, access="full", url=url, request_id="f")
    good = pl.DataFrame([dict(row, checksum=hashlib.md5(data).hexdigest())])
    out = F.fetch(good, cache_dir=tmp_path / "a", progress=True)
    assert out["status"][0] == "done" and Path(out["path"][0]).read_bytes() == data
    bad = pl.DataFrame([row])
    obs = pl.DataFrame({"obs_id": ["2025W19_2B_0073_2"], "detector": [2], "size": [len(data)],
                        "checksum": ["0" * 32]})
    out = F.fetch(bad, cache_dir=tmp_path / "b", progress=False, observations=obs, retries=1, backoff=0.01)
    assert out["status"][0] == "failed" and "MD5" in out["error"][0] and out["attempts"][0] == 2
    assert out["path"][0] is None and not list((tmp_path / "b").rglob("*.fits"))
    assert not list((tmp_path / "b").rglob("*.part"))
    # a cached file whose checksum no longer matches the archive's is fetched again
    out = F.fetch(bad, cache_dir=tmp_path / "a", progress=False, observations=obs, retries=0)
    assert out["status"][0] == "failed"


def test_adaptive_concurrency_under_cutout_cap(sarc, tmp_path):
    """The archive refuses more than 2 concurrent cutouts; fetch asks for up to 8 and adapts."""
    u = sarc.universe
    f = sarc.faults
    f.max_cutout_concurrency, f.latency_s, f.retry_after_s = 2, 0.15, 0.1
    rows = _rows(sarc, _obs(u, 3), "cutout", size_px=16, offsets=((0, 0), (0.1, 0), (0, 0.1), (0.1, 0.1)))
    out = F.fetch(_manifest(rows), cache_dir=tmp_path, progress=False, max_concurrency=8, backoff=0.05)
    assert set(out["status"]) == {"done"}, out["error"].to_list()
    n503 = sum(1 for e in sarc.log if e["status"] == 503)
    n200 = sum(1 for e in sarc.log if e["status"] == 200 and e["endpoint"] == "ibe_cutout")
    assert n200 == len(rows)
    assert 1 <= n503 <= len(rows)  # it hit the cap, then backed off instead of hammering


def test_gzipped_cutout_stored_uncompressed(sarc, tmp_path):
    u = sarc.universe
    rows = _rows(sarc, _obs(u, 1), "cutout", size_px=18)
    rows[0]["url"] = rows[0]["url"].replace("gzip=false", "gzip=true")
    out = F.fetch(_manifest(rows), cache_dir=tmp_path, progress=False)
    assert out["status"][0] == "done", out["error"][0]
    assert Path(out["path"][0]).read_bytes() == u.cutout(rows[0]["_key"], rows[0]["_center"], rows[0]["_size"])


def test_cache_dir_object_and_path_forms(sarc, tmp_path, monkeypatch):
    """One CacheDir per run: made from a path (``~`` expanded, ``file://`` accepted, other URLs
    refused), handed to fetch(); fetch() with the same folder as a plain path finds its files."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = C.CacheDir("~/spx-cache")
    assert cache.root == str((tmp_path / "spx-cache").resolve()) and os.fspath(cache) == cache.root
    assert C.CacheDir(f"file://{tmp_path}/spx-cache") == cache == C.CacheDir(tmp_path / "spx-cache")
    assert C.CacheDir.of(cache) is cache
    assert pickle.loads(pickle.dumps(cache)) == cache  # a cluster worker resolves it again
    for bad in ("s3://bucket/cache", "https://example.org/cache", ""):
        with pytest.raises(InputError, match="cache_dir"):
            C.CacheDir(bad)
    rows = _rows(sarc, _obs(sarc.universe, 1), "cutout", size_px=20)
    out = F.fetch(_manifest(rows), cache_dir=cache, progress=False)
    assert out["status"].to_list() == ["done"] and Path(out["path"][0]).is_relative_to(tmp_path / "spx-cache")
    assert (tmp_path / "spx-cache" / "psf").is_dir() and (tmp_path / "spx-cache" / "data" / "D6").is_dir()
    sarc.clear_log()
    again = F.fetch(out, cache_dir=str(tmp_path / "spx-cache"), progress=False)
    assert again["path"].to_list() == out["path"].to_list() and again["status"].to_list() == ["done"]
    assert not [e for e in sarc.log if e.get("endpoint") == "ibe_cutout"]  # a cache hit


@pytest.mark.parametrize("form, kept", [
    (lambda h: "md5:" + h, True), (lambda h: "MD5:" + h.upper(), True), (lambda h: h.upper(), True),
    (lambda h: " " + h + " ", True), (lambda h: "sha256:" + "ab" * 32, False), (lambda h: "", False),
])
def test_checksum_forms(odd_server, tmp_path, caplog, form, kept):
    """contentchecksum as bare hex or md5:hex in any case is checked; another form is no checksum
    (one warning), never a mismatch that throws a good file away."""
    import hashlib
    import logging

    url, data, log = odd_server
    url = url.replace("/f.fits", "/g.fits")
    digest = hashlib.md5(data).hexdigest()
    row = dict(source_id="1", obs_id="2025W19_2B_0073_2", detector=2, access="full", url=url, request_id="f")
    with caplog.at_level(logging.WARNING, logger="spxframe"):
        out = F.fetch(pl.DataFrame([dict(row, checksum=form(digest))]), cache_dir=tmp_path / "a", progress=False)
    assert out["status"][0] == "done" and Path(out["path"][0]).read_bytes() == data
    warned = [r for r in caplog.records if "not an MD5" in r.getMessage()]
    assert bool(warned) == (form(digest).strip() != "" and not kept)
    if kept:  # the same form with a wrong digest is a mismatch: the file is refused
        wrong = form("0" * 32)
        out = F.fetch(pl.DataFrame([dict(row, checksum=wrong)]), cache_dir=tmp_path / "b", progress=False,
                      retries=0)
        assert out["status"][0] == "failed" and "MD5" in out["error"][0]
