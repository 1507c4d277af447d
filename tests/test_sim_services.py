"""The simulated archive's HTTP services, driven by the real clients (pyvo, requests, fsspec, astropy)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import requests

pyvo = pytest.importorskip("pyvo")
from pyvo.dal import DALQueryError  # noqa: E402

from spxframe import sim  # noqa: E402
from spxframe.sim.adql import geom  # noqa: E402
from spxframe.sim.adql.evaluate import run_query  # noqa: E402
from spxframe.sim.adql.values import Table  # noqa: E402


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tap(archive):
    return pyvo.dal.TAPService(archive.tap_url)


@pytest.fixture(scope="module")
def obs(archive):
    return archive.universe.observations


@pytest.fixture(scope="module")
def spot(obs):
    """A position inside several frames: the centre of the first frame."""
    return float(obs["s_ra"][0]), float(obs["s_dec"][0])


def frames_containing(obs, ra, dec):
    """Direct computation (independent of the ADQL engine): convex test by edge signs."""
    v = np.asarray(obs["poly"].to_list(), float)  # (N,4,2)
    xyz = geom.unit(v[..., 0], v[..., 1])
    p = geom.unit(ra, dec)
    return _inside_convex(xyz, p)


def _inside_convex(xyz, p):
    """Convex spherical polygons (N,k,3) vs one point: same side of every edge as the centre."""
    c = xyz.sum(axis=1)
    k = xyz.shape[1]
    ok = np.ones(len(xyz), bool)
    for i in range(k):
        n = np.cross(xyz[:, i], xyz[:, (i + 1) % k])
        ok &= np.einsum("nj,j->n", n, p) * np.einsum("nj,nj->n", n, c) > 0
    return ok


def first(archive, key="cloud_key"):
    o = archive.universe.observations
    return o[key][0]


# ---------------------------------------------------------------------------------------------
# TAP sync: spec §1.2 query shapes
# ---------------------------------------------------------------------------------------------
def test_tutorial_join_shape_1(tap, obs, spot):
    ra, dec = spot
    q = (f"SELECT 'https://irsa.ipac.caltech.edu/' || a.uri || '?center={ra},{dec}d&size=0.1' AS uri, "
         f"p.time_bounds_lower FROM spherex.artifact a JOIN spherex.plane p ON a.planeid = p.planeid "
         f"WHERE 1 = CONTAINS(POINT('ICRS', {ra}, {dec}), p.poly) ORDER BY p.time_bounds_lower")
    t = tap.search(q).to_table()
    want = frames_containing(obs, ra, dec)
    assert len(t) == want.sum() > 0
    assert all(u.startswith("https://irsa.ipac.caltech.edu/ibe/data/spherex/qr2/") and u.endswith("d&size=0.1")
               for u in t["uri"])
    assert np.all(np.diff(np.asarray(t["time_bounds_lower"])) >= 0)
    band = obs.filter(want)["energy_bandpassname"][0]
    t2 = tap.search(q.replace("ORDER BY", f"AND p.energy_bandpassname = '{band}' ORDER BY")).to_table()
    assert 0 < len(t2) <= len(t)


def test_spxquery_shape_2_async(tap, obs, spot):
    ra, dec = spot
    q = (f"SELECT 'https://irsa.ipac.caltech.edu/' || a.uri AS download_url, p.obs_publisher_did, "
         f"p.time_bounds_lower, p.time_bounds_upper, p.energy_bandpassname, p.energy_bounds_lower, "
         f"p.energy_bounds_upper FROM spherex.plane p JOIN spherex.artifact a ON a.planeid = p.planeid "
         f"WHERE CONTAINS(POINT('ICRS', {ra}, {dec}), p.poly) = 1 AND "
         f"(p.energy_bandpassname = 'SPHEREx-D1' OR p.energy_bandpassname = 'SPHEREx-D4') "
         f"ORDER BY p.time_bounds_lower")
    job = tap.submit_job(q)
    try:
        assert job.phase == "PENDING"
        job.run().wait(timeout=60)
        assert job.phase == "COMPLETED"
        job.raise_if_error()
        t = job.fetch_result().to_table()
    finally:
        job.delete()
    sel = obs.filter(frames_containing(obs, ra, dec)
                     & obs["energy_bandpassname"].is_in(["SPHEREx-D1", "SPHEREx-D4"]).to_numpy())
    assert len(t) == sel.height > 0
    assert set(t["obs_publisher_did"]) == set(sel["obs_publisher_did"])
    assert t["energy_bounds_lower"].unit == "m"


def test_obscore_alone_s_region_shape_3_and_run_async(tap, obs, spot):
    ra, dec = spot
    t = tap.run_async(f"SELECT * FROM spherex.obscore WHERE CONTAINS(POINT('ICRS',{ra},{dec}), s_region)=1").to_table()
    assert len(t) == frames_containing(obs, ra, dec).sum()
    assert all(u.startswith(tap.baseurl.replace("/TAP", "") + "/datalink/links/spherex?ID=ivo://")
               for u in t["access_url"])
    assert set(t["access_format"]) == {"application/x-votable+xml;content=datalink"}
    assert t["s_ra"].unit == "deg" and t["em_min"].unit == "m"


def test_whole_table_pulls_shape_4(tap, obs):
    t = tap.search("SELECT obsid, planeid, time_bounds_lower, time_bounds_upper, energy_bounds_lower, "
                   "energy_bounds_upper, energy_bandpassname FROM spherex.plane").to_table()
    assert len(t) == obs.height
    t = tap.search("SELECT obsid, observationid AS obs_id FROM spherex.observation").to_table()
    assert t.colnames == ["obsid", "obs_id"] and len(t) == obs["obsid"].n_unique()
    t = tap.search("SELECT planeid, uri FROM spherex.artifact").to_table()
    assert len(t) == obs.height and t["planeid"].dtype.kind == "i"


def test_csv_get_three_way_join_shape_5(archive, obs, spot):
    ra, dec = spot
    q = ("SELECT o.obs_id, o.obs_publisher_did, a.uri, o.t_min FROM spherex.obscore o "
         "JOIN spherex.plane p ON o.obs_publisher_did = p.obs_publisher_did "
         "JOIN spherex.artifact a ON a.planeid = p.planeid "
         f"WHERE CONTAINS(POINT('ICRS',o.s_ra,o.s_dec), CIRCLE('ICRS',{ra},{dec},3.0))=1 "
         "AND o.t_max >= 60000 AND o.t_min <= 70000 AND o.dataproduct_type='image' AND o.calib_level=2 "
         "AND o.data_rights='public' AND a.producttype='science'")
    r = requests.get(archive.tap_url + "/sync", params={"QUERY": q, "FORMAT": "CSV"}, timeout=60)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv")
    lines = r.text.strip().splitlines()
    assert lines[0] == "obs_id,obs_publisher_did,uri,t_min"
    d = geom.angdist(ra, dec, obs["s_ra"].to_numpy(), obs["s_dec"].to_numpy())
    assert len(lines) - 1 == int((d <= 3.0).sum()) > 0


def test_top_order_desc_shape_6(tap, spot):
    ra, dec = spot
    t = tap.search("SELECT TOP 7 obs_id, t_min, obs_collection FROM spherex.obscore WHERE "
                   f"CONTAINS(POINT('ICRS', s_ra, s_dec), CIRCLE('ICRS', {ra}, {dec}, 10)) = 1 "
                   "AND obs_collection = 'spherex_qr2_deep' ORDER BY t_min DESC").to_table()
    assert len(t) == 7 and np.all(np.diff(np.asarray(t["t_min"])) <= 0)


def test_astroquery_collections_shape_7(tap):
    t = tap.search("SELECT DISTINCT collection from caom.observation ORDER by collection").to_table()
    cols = list(t["collection"])
    assert cols == sorted(cols) and len(cols) == len(set(cols))
    assert {"spherex_qr2", "spherex_qr2_deep", "spherex_qr2_cal"} <= set(cols)
    t = tap.search("SELECT DISTINCT o.collection FROM caom.observation o JOIN caom.plane p ON o.obsid = p.obsid "
                   "WHERE (p.dataproducttype = 'image' OR p.dataproducttype = 'cube') ORDER BY o.collection").to_table()
    assert "spherex_qr2" in list(t["collection"]) and "spherex_qr2_cal" not in list(t["collection"])


# ---------------------------------------------------------------------------------------------
# TAP errors, quirks, MAXREC, uploads, UWS phases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q, msg", [
    ("SELEC * FROM spherex.plane", "syntax error"),
    ("SELECT * FROM spherex.nosuch", "does not exist"),
    ("SELECT nosuch FROM spherex.plane", "does not exist"),
    ("SELECT o.obs_id FROM spherex.obscore o JOIN spherex.plane p ON o.obs_publisher_did = p.obs_publisher_did "
     "WHERE CONTAINS(POINT('ICRS', 10, 20), o.s_region) = 1",
     "function st_covers(character varying, geography) does not exist"),
])
def test_errors_raise_dalqueryerror(tap, q, msg):
    with pytest.raises(DALQueryError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        tap.search(q)


def test_error_http_status_and_document(archive, tap):
    r = requests.post(archive.tap_url + "/sync", data={"REQUEST": "doQuery", "LANG": "ADQL", "QUERY": "SELECT"})
    assert r.status_code == 400
    assert '<INFO name="QUERY_STATUS" value="ERROR">' in r.text
    archive.tap.error_status = 200  # IRSA's status for ADQL errors is unconfirmed: both must work
    try:
        with pytest.raises(DALQueryError, match="syntax error"):
            tap.search("SELECT")
        job = tap.submit_job("SELECT")
        job.run().wait(timeout=30)
        assert job.phase == "ERROR"
        job.delete()
    finally:
        archive.tap.error_status = 400


def test_maxrec_overflow(tap, archive):
    r = tap.search("SELECT planeid FROM spherex.plane", maxrec=5)
    assert len(r) == 5 and r.query_status == "OVERFLOW"
    body = requests.get(archive.tap_url + "/sync", params={"QUERY": "SELECT planeid FROM spherex.plane",
                                                          "MAXREC": "3"}).text
    assert '<INFO name="QUERY_STATUS" value="OVERFLOW"/>' in body
    r = tap.search("SELECT planeid FROM spherex.plane WHERE planeid < 0")  # empty is not an error
    assert len(r) == 0 and r.fieldnames == ("planeid",)


def test_async_error_and_abort(tap):
    job = tap.submit_job("SELECT * FROM nowhere.table")
    job.run().wait(timeout=30)
    assert job.phase == "ERROR"
    with pytest.raises(DALQueryError, match="does not exist"):
        job.raise_if_error()
    job.delete()
    job = tap.submit_job("SELECT TOP 1 * FROM spherex.plane", SIM_DELAY=30)
    job.run()
    job.abort()
    assert job.phase == "ABORTED"
    with pytest.raises(DALQueryError):
        job.raise_if_error()
    job.delete()


def test_async_long_poll_and_uws_documents(tap, archive):
    job = tap.submit_job("SELECT TOP 3 planeid FROM spherex.plane", maxrec=2, SIM_DELAY=0.5)
    job.run()
    assert job.phase in ("QUEUED", "EXECUTING")
    job.wait(timeout=30)  # long poll (WAIT=-1) returns on the final phase
    assert job.phase == "COMPLETED" and job.result_uri.endswith(f"/async/{job.job_id}/results/result")
    t = job.fetch_result()
    assert len(t) == 2 and t.query_status == "OVERFLOW"
    assert requests.get(job.url + "/phase").text == "COMPLETED"
    assert job.job_id in requests.get(archive.tap_url + "/async").text
    job.delete()
    assert requests.get(job.url or archive.tap_url + "/async/x").status_code == 404
    caps = pyvo.dal.TAPService(archive.tap_url).capabilities
    assert any(c.standardid == "ivo://ivoa.net/std/TAP" for c in caps)
    assert "spherex.plane" in pyvo.dal.TAPService(archive.tap_url).tables.keys()


def test_upload_batched_query_1000_positions(tap, archive, obs):
    from astropy.table import Table as ATable
    rng = np.random.default_rng(5)
    # mostly wide-survey positions (deep-field ones return ~200 frames each), a few deep ones
    wide = obs.filter(obs["obs_collection"] == "spherex_qr2").sample(990, with_replacement=True, seed=3)
    deep = obs.filter(obs["obs_collection"] == "spherex_qr2_deep").sample(10, with_replacement=True, seed=3)
    cen = wide.vstack(deep)
    ra = (cen["s_ra"].to_numpy() + rng.normal(0, 1.0, 1000)) % 360
    dec = np.clip(cen["s_dec"].to_numpy() + rng.normal(0, 1.0, 1000), -89.9, 89.9)
    cat = ATable({"source_id": np.arange(1000, dtype=np.int64), "ra": ra, "dec": dec})
    bands = ", ".join(f"'SPHEREx-D{i}'" for i in range(1, 7))
    q = f"""SELECT u.source_id, o.obs_id, o.obs_publisher_did, o.obs_collection, o.energy_bandpassname,
       o.t_min, o.t_max, o.t_exptime, o.em_min, o.em_max, o.s_ra, o.s_dec, o.s_region,
       a.uri, a.contentlength, a.contentchecksum
FROM TAP_UPLOAD.cat AS u
JOIN spherex.plane AS p ON 1 = CONTAINS(POINT('ICRS', u.ra, u.dec), p.poly)
JOIN spherex.obscore AS o ON o.obs_publisher_did = p.obs_publisher_did
JOIN spherex.artifact AS a ON a.planeid = p.planeid
WHERE o.obs_collection IN ('spherex_qr2', 'spherex_qr2_deep') AND p.energy_bandpassname IN ({bands})
  AND p.time_bounds_upper >= 60000.0 AND p.time_bounds_lower <= 70000.0"""
    t = tap.search(q, uploads={"cat": cat}).to_table()  # timing: benchmarks/bench_sim.py
    got = set(zip(t["source_id"].tolist(), t["obs_publisher_did"].tolist()))
    dids = np.asarray(obs["obs_publisher_did"].to_list())
    want = set()
    for i in range(0, 1000, 10):  # brute force on a subsample
        for d in dids[frames_containing(obs, ra[i], dec[i])]:
            want.add((i, d))
    assert {g for g in got if g[0] % 10 == 0} == want
    assert len(t) > 100
    assert int(t["contentlength"][0]) == archive.universe.file_size(
        t["uri"][0].removeprefix("ibe/data/spherex/"))


# ---------------------------------------------------------------------------------------------
# SIA2, DataLink
# ---------------------------------------------------------------------------------------------
def test_sia2_search(archive, obs, spot):
    ra, dec = spot
    sia = pyvo.dal.SIA2Service(archive.sia_url)
    t = sia.search(pos=(ra, dec, 0.01)).to_table()
    assert len(t) == frames_containing(obs, ra, dec).sum()
    row = t[0]
    assert row["access_url"].startswith(archive.url + "/ibe/data/spherex/qr2/")
    assert row["access_format"] == "image/fits"
    ca = json.loads(row["cloud_access"])
    assert ca["aws"]["bucket_name"] == "nasa-irsa-spherex" and ca["aws"]["key"].startswith("qr2/")
    em = (float(np.min(t["em_min"])), float(np.min(t["em_min"])) + 1e-9)
    tb = sia.search(pos=(ra, dec, 0.01), band=em).to_table()
    assert 0 < len(tb) < len(t)
    from astropy.time import Time
    t0, t1 = float(np.min(t["t_min"])), float(np.min(t["t_min"])) + 1.0
    tt = sia.search(pos=(ra, dec, 0.01), time=(Time(t0, format="mjd"), Time(t1, format="mjd")),
                    collection=["spherex_qr2", "spherex_qr2_deep"]).to_table()
    assert 0 < len(tt) <= len(t) and np.all(np.asarray(tt["t_min"]) <= t1)
    none = sia.search(pos=(ra, dec, 0.01), collection="spherex_qr3").to_table()
    assert len(none) == 0


def test_sia2_raw_params(archive, spot):
    ra, dec = spot
    base = archive.sia_url
    r = requests.get(f"{base}?POS=circle+{ra}+{dec}+0.01&BAND=-Inf+Inf&MAXREC=0")
    assert r.status_code == 200 and "<TR>" not in r.text and "<FIELD" in r.text
    poly = f"POLYGON {ra - 0.01} {dec - 0.01} {ra + 0.01} {dec - 0.01} {ra} {dec + 0.01}"
    n_poly = requests.get(base, params={"POS": poly}).text.count("<TR>")
    n_range = requests.get(base, params={"POS": f"RANGE {ra - 0.01} {ra + 0.01} {dec - 0.01} {dec + 0.01}"}
                           ).text.count("<TR>")
    n_circ = requests.get(base, params={"POS": f"CIRCLE {ra} {dec} 0.01"}).text.count("<TR>")
    assert n_poly == n_range == n_circ > 0
    csv = requests.get(base, params={"POS": f"CIRCLE {ra} {dec} 0.01", "RESPONSEFORMAT": "csv"})
    assert csv.headers["Content-Type"].startswith("text/csv") and csv.text.count("\n") == n_circ + 1
    assert requests.get(base, params={"POS": "CIRCLE 1 2"}).status_code == 400


def test_datalink(archive, tap, spot, monkeypatch):
    from pyvo.dal.adhoc import DatalinkResults
    ra, dec = spot
    t = tap.search(f"SELECT TOP 1 access_url, obs_publisher_did FROM spherex.obscore "
                   f"WHERE CONTAINS(POINT('ICRS',{ra},{dec}), s_region)=1").to_table()
    dl = DatalinkResults.from_result_url(t["access_url"][0])
    this = list(dl.bysemantics("#this", include_narrower=False))
    assert len(this) == 1
    url = this[0]["access_url"]
    assert url.startswith(archive.url + "/ibe/data/spherex/qr2/") and this[0]["content_type"] == "application/fits"
    # the default include_narrower=True needs the IVOA vocabulary: offline, give pyvo a minimal one
    import pyvo.utils.vocabularies as voc
    monkeypatch.setattr(voc, "get_vocabulary", lambda name, force_update=False: {"terms": {"this": {"narrower": []}}})
    assert [r["access_url"] for r in dl.bysemantics("#this")] == [url]
    cut = list(dl.bysemantics("#cutout", include_narrower=False))[0]
    sd = dl.get_adhocservice_by_id(cut["service_def"])
    assert {p.name: p.value for p in sd.params}["accessURL"] == url
    assert {p.name for p in sd.groups[0].entries} >= {"center", "size"}
    aux = [r for r in dl if r["description"].startswith("cloud copy")]
    assert len(aux) == 1 and aux[0]["access_url"].startswith(archive.cloud_url + "/qr2/")
    bad = DatalinkResults.from_result_url(archive.url + "/datalink/links/spherex?ID=ivo://nope")
    assert "NotFoundFault" in bad[0]["error_message"]


# ---------------------------------------------------------------------------------------------
# IBE files and cutouts, cloud copy
# ---------------------------------------------------------------------------------------------
def test_ibe_head_range_404(archive):
    u = archive.universe
    key = first(archive)
    url = f"{archive.url}/ibe/data/spherex/{key}"
    h = requests.head(url)
    assert h.status_code == 200 and int(h.headers["Content-Length"]) == u.file_size(key)
    assert h.headers["Content-Type"] == "application/fits"
    r = requests.get(url, headers={"Range": "bytes=2880-5759"})
    assert r.status_code == 206 and r.content == u.read(key, 2880, 5760)
    assert r.headers["Content-Range"] == f"bytes 2880-5759/{u.file_size(key)}"
    r = requests.get(url, headers={"Range": "bytes=-100"})
    assert r.status_code == 206 and r.content == u.read(key, u.file_size(key) - 100, u.file_size(key))
    assert requests.get(url, headers={"Range": f"bytes={u.file_size(key)}-"}).status_code == 416
    assert requests.get(url + "x").status_code == 404


def test_fits_open_section_reads_little(archive):
    from astropy.io import fits
    u = archive.universe
    key = first(archive)
    url = f"{archive.url}/ibe/data/spherex/{key}"
    archive.clear_log()
    with fits.open(url, use_fsspec=True, fsspec_kwargs={"block_size": 256 * 1024}) as hdul:
        assert hdul[1].header["NAXIS1"] == 2040
        cut = hdul["IMAGE"].section[1000:1010, 1000:1010]
    sent = sum(e["bytes_sent"] for e in archive.log if e["endpoint"] == "ibe_file")
    assert cut.shape == (10, 10) and np.isfinite(cut).any()
    assert 0 < sent < 0.2 * u.file_size(key)


def test_fits_open_cutout_url(archive, obs):
    from astropy.io import fits
    key = first(archive)
    ra, dec = float(obs["s_ra"][0]), float(obs["s_dec"][0])
    url = f"{archive.url}/ibe/data/spherex/{key}?center={ra},{dec}d&size=60px"
    with fits.open(url, cache=False) as hdul:
        assert hdul["IMAGE"].data.shape == (60, 60)
    r = requests.get(f"{archive.url}/ibe/data/spherex/{key}?center={(ra + 180) % 360},{-dec}d&size=60px")
    assert r.status_code == 400 and r.headers["Content-Type"].startswith("text/plain")
    assert archive.log[-1]["endpoint"] == "ibe_cutout"


def test_cloud_copy_fsspec_range(archive):
    import fsspec
    u = archive.universe
    key = first(archive)
    fs = fsspec.filesystem("http")
    url = f"{archive.cloud_url}/{key}"
    with fs.open(url, "rb", block_size=2**16) as f:
        f.seek(5_000_000)
        data = f.read(100_000)
    assert data == u.read(key, 5_000_000, 5_100_000)
    assert fs.cat_file(url, start=70_000_000, end=70_000_100) == u.read(key, 70_000_000, 70_000_100)
    assert fs.size(url) == u.file_size(key)
    h = requests.head(url)
    assert h.headers["Accept-Ranges"] == "bytes" and h.headers["ETag"].startswith('"')
    assert h.headers["Content-Type"] == "binary/octet-stream"
    lst = requests.get(archive.cloud_url, params={"list-type": "2", "prefix": "qr2/", "delimiter": "/"}).text
    assert "<Prefix>qr2/level2/</Prefix>" in lst


def test_cloud_lag_404(universe):
    u = sim.Universe(seed=1, cloud_lag_fraction=0.5)
    o = u.observations
    missing = o.filter(~o["cloud_available"])
    assert missing.height > 0
    with sim.serve(universe=u) as arc:
        key = missing["cloud_key"][0]
        assert requests.head(f"{arc.cloud_url}/{key}").status_code == 404
        assert requests.head(f"{arc.url}/ibe/data/spherex/{key}").status_code == 200
        t = pyvo.dal.SIA2Service(arc.sia_url).search(pos=(float(missing["s_ra"][0]), float(missing["s_dec"][0]),
                                                          0.001)).to_table()
        ca = dict(zip(t["obs_publisher_did"], t["cloud_access"]))
        assert ca[missing["obs_publisher_did"][0]] == ""


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def faulty(universe):
    with sim.serve(universe=universe, faults=sim.Faults(seed=7)) as arc:
        yield arc


def test_fault_error_rate(faulty):
    faulty.faults.error_rate = 0.5
    faulty.faults.endpoints = {"tap"}
    codes = [requests.get(faulty.tap_url + "/sync",
                          params={"QUERY": "SELECT TOP 1 planeid FROM spherex.plane"}).status_code
             for _ in range(40)]
    assert set(codes) <= {200, 502, 503} and 8 < codes.count(200) < 32
    assert requests.get(faulty.url + "/datalink/links/spherex?ID=x").status_code == 200  # other endpoints unaffected
    faulty.faults.error_rate = 1.0
    with pytest.raises(pyvo.dal.DALServiceError):
        pyvo.dal.TAPService(faulty.tap_url).search("SELECT TOP 1 planeid FROM spherex.plane")
    assert [e["status"] for e in faulty.log if e["endpoint"] == "tap"][-1] in (502, 503)


def test_fault_truncation(faulty):
    faulty.faults.truncate_rate = 1.0
    key = first(faulty)
    url = f"{faulty.cloud_url}/{key}"
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        _ = requests.get(url, headers={"Range": "bytes=0-999999"}).content  # reading the body raises
    e = faulty.log[-1]
    assert e["fault"] == "truncated" and e["bytes_sent"] == 500_000
    faulty.faults.truncate_rate = 0.0
    assert len(requests.get(url, headers={"Range": "bytes=0-999999"}).content) == 1_000_000


def test_fault_cutout_concurrency_and_latency(faulty, obs):
    faulty.faults.max_cutout_concurrency = 2
    faulty.faults.latency_s = 0.5
    faulty.faults.retry_after_s = 3
    faulty.faults.endpoints = {"ibe_cutout"}
    key = first(faulty)
    url = f"{faulty.url}/ibe/data/spherex/{key}?center=100,100px&size=10px"
    out = []

    def get():
        r = requests.get(url)
        out.append((r.status_code, r.headers.get("Retry-After")))

    th = [threading.Thread(target=get) for _ in range(5)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    codes = sorted(c for c, _ in out)
    assert codes.count(200) == 2 and codes.count(503) == 3
    assert {ra for c, ra in out if c == 503} == {"3"}
    assert sum(e.get("fault") == "concurrency" for e in faulty.log) == 3
    ok = [e for e in faulty.log if e["status"] == 200]
    assert all(e["t_end"] - e["t_start"] >= 0.5 for e in ok)


def test_fault_bandwidth(faulty):
    faulty.faults.bandwidth_bps = 2_000_000
    key = first(faulty)
    r = requests.get(f"{faulty.cloud_url}/{key}", headers={"Range": "bytes=0-599999"})
    e = faulty.log[-1]
    assert len(r.content) == 600_000 and e["t_end"] - e["t_start"] >= 0.25


def test_faults_deterministic():
    a, b = sim.Faults(error_rate=0.3, seed=11), sim.Faults(error_rate=0.3, seed=11)
    assert [a.draw_error("tap") for _ in range(50)] == [b.draw_error("tap") for _ in range(50)]


# ---------------------------------------------------------------------------------------------
# ADQL engine and spherical geometry (no HTTP)
# ---------------------------------------------------------------------------------------------
def _square(ra, dec, h):
    c = geom.unit(ra, dec)
    e1 = np.cross([0, 0, 1.0], c)
    e1 = e1 / np.linalg.norm(e1) if np.linalg.norm(e1) > 1e-12 else np.array([1.0, 0, 0])
    e2 = np.cross(c, e1)
    t = np.tan(np.radians(h))
    out = []
    for x, y in [(-t, -t), (t, -t), (t, t), (-t, t)]:
        v = c + x * e1 + y * e2
        v /= np.linalg.norm(v)
        out.append([np.degrees(np.arctan2(v[1], v[0])) % 360, np.degrees(np.arcsin(v[2]))])
    return out


@pytest.fixture(scope="module")
def geo_tables():
    centres = [(0.2, 10.0), (359.8, -5.0), (123.0, 89.5), (45.0, -89.0), (200.0, 30.0)]
    verts = np.array([_square(r, d, 1.5) for r, d in centres])
    polys = geom.Polygons(verts)
    t = Table("t.poly", {"id": np.arange(len(centres)), "ra": np.array([c[0] for c in centres]),
                         "dec": np.array([c[1] for c in centres]),
                         "name": np.array(["a", "b", "c", None, "e"], dtype=object),
                         "poly": np.array(["p"] * len(centres), dtype=object)}, geoms={"poly": polys})
    return {"t.poly": t}, verts


@pytest.mark.parametrize("ra, dec", [(359.5, 10.3), (0.9, 9.2), (1.8, 10.0), (0.5, -5.5), (359.0, -4.0),
                                     (77.0, 89.9), (300.0, 88.8), (200.0, -88.5), (45.0, -90.0), (200.0, 30.0)])
def test_contains_matches_direct_geometry(geo_tables, ra, dec):
    tables, verts = geo_tables
    r = run_query(tables, f"SELECT id FROM t.poly WHERE 1 = CONTAINS(POINT('ICRS', {ra}, {dec}), poly)")
    xyz = geom.unit(verts[..., 0], verts[..., 1])
    p = geom.unit(ra, dec)
    want = np.nonzero(_inside_convex(xyz, p))[0]
    assert list(r.arrays[0]) == list(want)
    d = run_query(tables, f"SELECT id, DISTANCE(POINT('ICRS', ra, dec), POINT('ICRS', {ra}, {dec})) AS d FROM t.poly")
    c = run_query(tables, "SELECT id FROM t.poly WHERE CONTAINS(POINT('ICRS', ra, dec), "
                          f"CIRCLE('ICRS', {ra}, {dec}, 2.5)) = 1")
    assert list(c.arrays[0]) == [i for i, x in zip(d.arrays[0], d.arrays[1]) if x <= 2.5]


def test_adql_predicates_and_ordering(geo_tables):
    tables, _ = geo_tables

    def ids(where, order="id"):
        return list(run_query(tables, f"SELECT id FROM t.poly AS x WHERE {where} ORDER BY {order}").arrays[0])

    assert ids("x.id IN (1, 3) OR NOT (dec BETWEEN -10 AND 50)") == [1, 2, 3]
    assert ids("name IS NULL") == [3] and ids("name IS NOT NULL AND name LIKE '_'") == [0, 1, 2, 4]
    assert ids("name NOT IN ('a', 'b') AND id * 2 + 1 > 3") == [2, 4]
    assert ids("1=1", "dec DESC, id") == [2, 4, 0, 1, 3]
    r = run_query(tables, "SELECT TOP 2 id AS k, 'x' || name || '-' || id AS s FROM t.poly ORDER BY k DESC")
    assert r.names == ["k", "s"] and list(r.arrays[1]) == ["xe-4", None]
    assert list(run_query(tables, "SELECT COUNT(*) AS n FROM t.poly WHERE ra > 100").arrays[0]) == [3]
    r = run_query(tables, "SELECT CAST(dec AS INTEGER) AS d, CAST(id AS VARCHAR(8)) || 'x' AS s FROM t.poly "
                          "ORDER BY id LIMIT 2")
    assert list(r.arrays[0]) == [10, -5] and list(r.arrays[1]) == ["0x", "1x"]
    a = run_query(tables, "SELECT a.id, b.id FROM t.poly a JOIN t.poly b ON a.id = b.id + 1 ORDER BY 1")
    assert a.names == ["id", "id_2"] and list(a.arrays[0]) == [1, 2, 3, 4] and list(a.arrays[1]) == [0, 1, 2, 3]


def test_contains_property_random_polygons():
    """Random rotated squares anywhere (poles, RA wrap) vs the independent convex edge test."""
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=60, deadline=None, derandomize=True)
    @hyp.given(st.floats(0, 360), st.floats(-90, 90), st.floats(0.05, 5.0), st.floats(0, 90),
               st.floats(-1, 1), st.floats(-1, 1))
    def check(ra, dec, h, rot, fx, fy):
        sq = np.array(_square(ra, dec, h))
        # rotate the square about its centre by `rot` degrees (in the tangent plane)
        c = geom.unit(ra, dec)
        xyz = geom.unit(sq[:, 0], sq[:, 1])
        k = c / np.linalg.norm(c)
        th = np.radians(rot)
        xyz = (xyz * np.cos(th) + np.cross(k, xyz) * np.sin(th) + np.outer(xyz @ k, k) * (1 - np.cos(th)))
        verts = np.stack([np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])) % 360,
                          np.degrees(np.arcsin(np.clip(xyz[:, 2], -1, 1)))], axis=1)
        # a point near the polygon: offset by up to 1.5 h along two tangent directions
        e1 = np.cross([0, 0, 1.0], c)
        e1 = e1 / np.linalg.norm(e1) if np.linalg.norm(e1) > 1e-9 else np.array([1.0, 0, 0])
        e2 = np.cross(c, e1)
        p = c + np.tan(np.radians(1.5 * h)) * (fx * e1 + fy * e2)
        p /= np.linalg.norm(p)
        pra, pdec = np.degrees(np.arctan2(p[1], p[0])) % 360, np.degrees(np.arcsin(p[2]))
        polys = geom.Polygons(verts[None])
        want = _inside_convex(geom.unit(verts[None, :, 0], verts[None, :, 1]), geom.unit(pra, pdec))[0]
        tables = {"t.p": Table("t.p", {"id": np.array([0]), "poly": np.array(["p"], dtype=object)},
                               geoms={"poly": polys}),
                  "t.u": Table("t.u", {"ra": np.array([pra]), "dec": np.array([pdec])})}
        got = run_query(tables, f"SELECT id FROM t.p WHERE CONTAINS(POINT('ICRS', {float(pra)!r}, {float(pdec)!r}), "
                                "poly) = 1")
        joined = run_query(tables, "SELECT p.id FROM t.u AS u JOIN t.p AS p "
                                   "ON 1 = CONTAINS(POINT('ICRS', u.ra, u.dec), p.poly)")
        assert (len(got.arrays[0]) == 1) == bool(want) == (len(joined.arrays[0]) == 1)

    check()


def test_sia_lag(universe):
    o = universe.observations
    newest = o.sort("t_min").tail(1)
    ra, dec = float(newest["s_ra"][0]), float(newest["s_dec"][0])
    q = f"SELECT obs_publisher_did FROM spherex.obscore WHERE CONTAINS(POINT('ICRS',{ra},{dec}), s_region)=1"
    with sim.serve(universe=universe, faults=sim.Faults(sia_lag_days=1.0)) as arc:
        tap_ids = set(pyvo.dal.TAPService(arc.tap_url).search(q).to_table()["obs_publisher_did"])
        sia_ids = set(pyvo.dal.SIA2Service(arc.sia_url).search(pos=(ra, dec, 0.001)).to_table()["obs_publisher_did"])
    assert newest["obs_publisher_did"][0] in tap_ids - sia_ids
    assert sia_ids < tap_ids
