"""fetch(): concurrent fetches into one cache_dir transfer each file once (claims, spxframe.fetcher.claims).

Real parts only: the simulated archive on 127.0.0.1, fetch() in subprocesses and threads, lock
files on disk. The archive's request log says what was transferred how often.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from spxframe.fetcher import cache as C
from spxframe.fetcher import claims as _claims
from spxframe.fetcher import ranges as R
from spxframe.fetcher.owner import HOST as _HOST
from spxframe.fits import hdu

F = importlib.import_module("spxframe.fetcher.engine")


@pytest.fixture(scope="module")
def arc(universe):
    from spxframe import sim

    with sim.serve(universe=universe) as a:
        yield a


@pytest.fixture
def sarc(arc):
    f = arc.faults
    saved = {k: getattr(f, k) for k in ("error_rate", "latency_s", "bandwidth_bps", "truncate_rate",
                                       "max_cutout_concurrency", "retry_after_s", "error_rates", "endpoints")}
    f.error_rate, f.truncate_rate, f.latency_s, f.error_rates, f.endpoints = 0.0, 0.0, 0.0, {}, None
    f.bandwidth_bps, f.max_cutout_concurrency, f.retry_after_s = None, None, 0.1
    arc.clear_log()
    yield arc
    for k, v in saved.items():
        setattr(f, k, v)


def _obs(universe, n: int) -> list[dict]:
    o = universe.observations
    if "cloud_available" in o.columns:
        o = o.filter(pl.col("cloud_available"))
    return o.head(n).to_dicts()


def _rows(arc, obs: list[dict], access: str, *, size_px: int = 24, offsets=((0.0, 0.0),), source0: int = 0,
          cloud_full: bool = False) -> list[dict]:
    u = arc.universe
    rows = []
    k = source0
    for o in obs:
        for dra, ddec in offsets:
            ra = o["s_ra"] + dra / max(np.cos(np.radians(o["s_dec"])), 0.1)
            dec = o["s_dec"] + ddec
            center, size = f"{ra:.7f},{dec:.7f}", f"{size_px}px"
            box = R.Box(*u.cutout_box(o["cloud_key"], center, size))
            if access == "cutout":
                url = f"{arc.url}/{o['uri']}?center={center}&size={size}&gzip=false"
            elif access == "range" or cloud_full:
                url = f"{arc.cloud_url}/{o['cloud_key']}"
            else:
                url = f"{arc.url}/{o['uri']}"
            rows.append(dict(source_id=str(k), obs_id=o["obs_id"], detector=int(o["detector"]), ra=ra, dec=dec,
                             access=access, request_id=f"{k}", url=url, box_x0=box.x0, box_y0=box.y0,
                             box_nx=box.nx, box_ny=box.ny, clipped=False, psf_key=o.get("psf_key"),
                             checksum=_md5(u, o["cloud_key"]) if access == "full" else None,
                             size=int(o["contentlength"]), status="planned"))
            k += 1
    return rows


_MD5: dict[str, str] = {}


def _md5(u, key: str) -> str:
    """MD5 of the archive's file (the sim publishes no checksum): fetch checks full files against it."""
    if key not in _MD5:
        _MD5[key] = hashlib.md5(u.read(key, 0, u.file_size(key))).hexdigest()
    return _MD5[key]


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.name.endswith((".lock", ".part"))]


# a fetch in another process: waits at a barrier so two of them start together
_SCRIPT = textwrap.dedent("""
    import importlib, json, os, sys, time, polars as pl
    F = importlib.import_module('spxframe.fetcher.engine')
    man, cache, ready, go, out, kw = sys.argv[1:7]
    m = pl.read_parquet(man)
    open(ready, 'w').close()
    t0 = time.monotonic()
    while go != '-' and not os.path.exists(go):
        if time.monotonic() - t0 > 60:
            sys.exit('no go')
        time.sleep(0.01)
    F.fetch(m, cache_dir=cache, progress=False, **json.loads(kw)).write_parquet(out)
""")


def _start(man: Path, cache: Path, tag: str, tmp: Path, go: str = "-", **kw) -> tuple[subprocess.Popen, Path, Path]:
    ready, out = tmp / f"{tag}.ready", tmp / f"{tag}.parquet"
    p = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(man), str(cache), str(ready), go, str(out),
                          json.dumps(kw)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return p, ready, out


def _finish(p: subprocess.Popen, timeout: float = 60) -> None:
    try:
        _, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err.decode()[-3000:]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _fake_lock(path: Path, *, pid: int, host: str) -> Path:
    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": pid, "host": host, "token": "feedbeef", "time": time.time()}))
    return lock


# --------------------------------------------------------------------------------------
# (1) two processes, one cache: every file from the server once
# --------------------------------------------------------------------------------------


def test_two_processes_fetch_each_file_once(sarc, tmp_path):
    u = sarc.universe
    obs = _obs(u, 3)
    rows = (_rows(sarc, obs[:1], "full")
            + _rows(sarc, obs[1:3], "cutout", offsets=((0, 0), (0.2, -0.1)), source0=10)
            + _rows(sarc, obs[1:3], "range", offsets=((0.1, 0.1), (-0.2, 0.2)), source0=20))
    man = tmp_path / "m.parquet"
    pl.DataFrame(rows).write_parquet(man)
    cache = tmp_path / "cache"
    sarc.faults.latency_s = 0.25  # every request holds its claim a while: the other process must wait
    go = tmp_path / "go"
    procs = [_start(man, cache, tag, tmp_path, str(go), max_concurrency=4) for tag in ("a", "b")]
    deadline = time.monotonic() + 60
    while not all(r.exists() for _, r, _ in procs):
        assert time.monotonic() < deadline and all(p.poll() is None for p, _, _ in procs)
        time.sleep(0.02)
    sarc.clear_log()
    go.touch()
    for p, _, _ in procs:
        _finish(p)
    outs = [pl.read_parquet(o) for _, _, o in procs]
    log = list(sarc.log)

    # each full file and each cutout was requested exactly once, each PSF cube read once
    full = Counter(e["path"] for e in log if e["endpoint"] == "ibe_file")
    assert full == Counter({f"/{obs[0]['uri']}": 1}), full
    cut = Counter((e["path"], e["query"]) for e in log if e["endpoint"] == "ibe_cutout")
    assert len(cut) == 4 and set(cut.values()) == {1}, cut
    psf_bytes = 121 * 101 * 101 * 4
    big = Counter(e["path"] for e in log if e["endpoint"] == "cloud" and e["bytes_sent"] >= psf_bytes)
    assert len(big) == len({r["psf_key"] for r in rows if r["access"] == "range"}) and set(big.values()) == {1}
    assert all(e["status"] in (200, 206) for e in log)

    for out in outs:  # both report every row done, at the same verified files
        assert out["status"].to_list() == ["done"] * len(rows), out["error"].to_list()
    assert outs[0]["path"].to_list() == outs[1]["path"].to_list()
    # each transfer was made by one of the two; the other waited (attempts 0, bytes 0)
    att = np.array([o["attempts"].to_list() for o in outs])
    assert not ((att[0] > 0) & (att[1] > 0)).any(), att
    byt = np.array([o["bytes"].to_list() for o in outs])
    assert byt.sum() == sum(e["bytes_sent"] for e in log if e["endpoint"] in ("ibe_file", "ibe_cutout", "cloud"))
    fp = Path(outs[0]["path"][0])
    assert fp.stat().st_size == u.file_size(obs[0]["cloud_key"]) == rows[0]["size"]
    assert hashlib.md5(fp.read_bytes()).hexdigest() == rows[0]["checksum"]
    for p in outs[0]["path"]:
        hdu.scan_fits(p)
        assert Path(p + ".ok").exists()
    assert _leftovers(cache) == []


# --------------------------------------------------------------------------------------
# (2) stale claims do not block
# --------------------------------------------------------------------------------------


def test_lock_of_dead_process_is_cleaned(sarc, tmp_path):
    u = sarc.universe
    rows = _rows(sarc, _obs(u, 1), "cutout") + _rows(sarc, _obs(u, 1), "range", offsets=((0.2, 0.2),), source0=1)
    cache = tmp_path / "c"
    dead = _dead_pid()
    locks = [_fake_lock(cache / C.local_name(r["obs_id"], r["detector"], R.Box(r["box_x0"], r["box_y0"],
                                                                             r["box_nx"], r["box_ny"])),
                        pid=dead, host=_HOST) for r in rows]
    locks.append(_fake_lock(cache / C.psf_name(rows[1]["psf_key"]), pid=dead, host=_HOST))
    t0 = time.monotonic()
    out = F.fetch(pl.DataFrame(rows), cache_dir=cache, progress=False, stale_claim=600, claim_timeout=600)
    assert time.monotonic() - t0 < 30
    assert out["status"].to_list() == ["done", "done"], out["error"].to_list()
    assert not any(lk.exists() for lk in locks) and _leftovers(cache) == []
    assert len([e for e in sarc.log if e["endpoint"] == "ibe_cutout"]) == 1


def test_untouched_foreign_claim_is_broken_after_stale_claim(sarc, tmp_path):
    """A claim from another host (its pid cannot be checked) that nobody touches is taken over
    after ``stale_claim`` s, for a data file (waited on in the main loop) and a PSF cube (waited on
    in the worker)."""
    u = sarc.universe
    o = _obs(u, 2)
    rows = _rows(sarc, o[:1], "cutout") + _rows(sarc, o[1:2], "range", offsets=((0.2, 0.2),), source0=1)
    cache = tmp_path / "c"
    r0 = rows[0]
    lk_cut = _fake_lock(cache / C.local_name(r0["obs_id"], r0["detector"], R.Box(r0["box_x0"], r0["box_y0"],
                                                                               r0["box_nx"], r0["box_ny"])),
                        pid=os.getpid(), host="elsewhere")
    lk_psf = _fake_lock(cache / C.psf_name(rows[1]["psf_key"]), pid=1, host="elsewhere")
    t0 = time.monotonic()
    out = F.fetch(pl.DataFrame(rows), cache_dir=cache, progress=False, stale_claim=0.6, claim_timeout=30)
    dt = time.monotonic() - t0
    assert out["status"].to_list() == ["done", "done"], out["error"].to_list()
    assert 0.55 <= dt < 20, dt
    assert not lk_cut.exists() and not lk_psf.exists() and _leftovers(cache) == []
    assert len([e for e in sarc.log if e["endpoint"] == "ibe_cutout"]) == 1
    # the cutout was requested only after the claim went stale
    first = min(e["t_start"] for e in sarc.log if e["endpoint"] == "ibe_cutout")
    assert first >= time.time() - dt + 0.5


def test_claimer_killed_mid_transfer(sarc, tmp_path):
    """Process A is downloading a full file (slowly) when it is killed; B, waiting on its claim,
    sees the claimer's pid gone and downloads the file itself at once."""
    u = sarc.universe
    o = _obs(u, 1)
    man = tmp_path / "a.parquet"
    pl.DataFrame(_rows(sarc, o, "full")).write_parquet(man)
    b_rows = _rows(sarc, o, "full", cloud_full=True)
    cache = tmp_path / "c"
    f = sarc.faults
    f.bandwidth_bps, f.endpoints = 4_000_000, ("ibe_file",)  # A would need ~18 s
    pa, _, _ = _start(man, cache, "a", tmp_path)
    final = cache / C.local_name(o[0]["obs_id"], o[0]["detector"], full=True)
    lock = Path(str(final) + ".lock")
    try:
        deadline = time.monotonic() + 60
        # A is transferring (its download's temporary file, not the lock's: <name>.lock.<pid>@...part)
        while not [p for p in final.parent.glob(final.name + ".*.part") if not p.name.startswith(lock.name)]:
            assert time.monotonic() < deadline and pa.poll() is None, pa.stderr.read().decode()[-2000:]
            time.sleep(0.01)
        assert lock.exists()
        res = {}
        th = threading.Thread(target=lambda: res.update(b=F.fetch(pl.DataFrame(b_rows), cache_dir=cache,
                                                                  progress=False, claim_timeout=60)))
        th.start()
        time.sleep(0.5)
        assert th.is_alive() and not [e for e in sarc.log if e["endpoint"] == "cloud"]  # B waits
        pa.kill()
        pa.wait(10)
        t_kill = time.monotonic()
        th.join(60)
        assert time.monotonic() - t_kill < 10
    finally:
        if pa.poll() is None:
            pa.kill()
    b = res["b"]
    assert b["status"][0] == "done", b["error"][0]
    assert final.stat().st_size == b_rows[0]["size"]
    assert hashlib.md5(final.read_bytes()).hexdigest() == b_rows[0]["checksum"]
    assert len([e for e in sarc.log if e["endpoint"] == "cloud"]) == 1
    assert not lock.exists()  # A's .part stays until the next run's clean-up (A's pid is gone)
    F.fetch(pl.DataFrame(b_rows), cache_dir=cache, progress=False)
    assert _leftovers(cache) == []


# --------------------------------------------------------------------------------------
# (3) a claimer that fails; a claimer that never finishes
# --------------------------------------------------------------------------------------


def test_waiter_fetches_itself_when_claimer_fails(sarc, tmp_path):
    """Process A claims a full file but the archive answers its requests (IBE) with errors; B,
    waiting on A's claim, fetches the file itself (from the cloud copy) once A gives up."""
    u = sarc.universe
    o = _obs(u, 1)
    a_rows = _rows(sarc, o, "full")
    b_rows = _rows(sarc, o, "full", cloud_full=True)
    man = tmp_path / "a.parquet"
    pl.DataFrame(a_rows).write_parquet(man)
    cache = tmp_path / "c"
    f = sarc.faults
    f.error_rates, f.latency_s, f.endpoints = {"ibe_file": 1.0}, 0.3, ("ibe_file",)
    pa, _, out_a = _start(man, cache, "a", tmp_path, retries=3, backoff=0.2, max_backoff=0.3)
    lock = Path(str(cache / C.local_name(o[0]["obs_id"], o[0]["detector"], full=True)) + ".lock")
    deadline = time.monotonic() + 60
    while not lock.exists():  # A holds the claim
        assert time.monotonic() < deadline and pa.poll() is None, pa.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    t_b = time.time()
    b = F.fetch(pl.DataFrame(b_rows), cache_dir=cache, progress=False, claim_timeout=60)
    _finish(pa)
    a = pl.read_parquet(out_a)
    assert a["status"][0] == "failed" and ("502" in a["error"][0] or "503" in a["error"][0])
    assert b["status"][0] == "done", b["error"][0]
    p = Path(b["path"][0])
    assert p.stat().st_size == a_rows[0]["size"]
    assert hashlib.md5(p.read_bytes()).hexdigest() == a_rows[0]["checksum"]
    ibe = [e for e in sarc.log if e["endpoint"] == "ibe_file"]
    cloud = [e for e in sarc.log if e["endpoint"] == "cloud"]
    assert len(ibe) == 4 and all(e["status"] in (502, 503) for e in ibe)  # A: 1 + 3 retries
    assert len(cloud) == 1 and cloud[0]["status"] == 200  # B: once, after A gave up
    assert cloud[0]["t_start"] >= max(e["t_end"] for e in ibe) and any(e["t_start"] >= t_b for e in ibe)
    assert _leftovers(cache) == []


def test_waiter_fails_cleanly_when_everyone_fails(sarc, tmp_path):
    """Two threads of one process want the same cutout; the archive fails every request: both end
    'failed' within their retry budget, no file, no temporary or lock file."""
    u = sarc.universe
    rows = _rows(sarc, _obs(u, 1), "cutout")
    f = sarc.faults
    f.error_rates, f.latency_s = {"ibe_cutout": 1.0}, 0.2
    cache = tmp_path / "c"
    res = {}

    def one(tag):
        res[tag] = F.fetch(pl.DataFrame(rows), cache_dir=cache, progress=False, retries=1, backoff=0.1,
                           max_backoff=0.1, claim_timeout=20)

    t0 = time.monotonic()
    ths = [threading.Thread(target=one, args=(t,)) for t in ("a", "b")]
    for t in ths:
        t.start()
    for t in ths:
        t.join(30)
    assert time.monotonic() - t0 < 15
    for tag in ("a", "b"):
        out = res[tag]
        assert out["status"][0] == "failed" and out["path"][0] is None
        assert "502" in out["error"][0] or "503" in out["error"][0], out["error"][0]
    # one claimed and failed (2 attempts), then the other took over and failed too (2 attempts)
    assert len([e for e in sarc.log if e["endpoint"] == "ibe_cutout"]) == 4
    assert not list(cache.rglob("*.fits")) and _leftovers(cache) == []


def test_wait_is_bounded_by_claim_timeout(sarc, tmp_path):
    """A claim that stays alive (another host's, touched) but never ends: rows fail after
    claim_timeout with a clear error; nothing is downloaded and the foreign lock is left alone."""
    u = sarc.universe
    o = _obs(u, 2)
    rows = _rows(sarc, o[:1], "full") + _rows(sarc, o[1:2], "range", source0=1)
    cache = tmp_path / "c"
    lk_full = _fake_lock(cache / C.local_name(o[0]["obs_id"], o[0]["detector"], full=True), pid=7, host="elsewhere")
    lk_psf = _fake_lock(cache / C.psf_name(rows[1]["psf_key"]), pid=7, host="elsewhere")
    t0 = time.monotonic()
    out = F.fetch(pl.DataFrame(rows), cache_dir=cache, progress=False, claim_timeout=0.8, stale_claim=60)
    dt = time.monotonic() - t0
    assert 0.75 <= dt < 10, dt
    assert out["status"].to_list() == ["failed", "failed"]
    for err in out["error"]:
        assert "timed out" in err and "7@elsewhere" in err, err
    assert not [e for e in sarc.log if e["endpoint"] == "ibe_file"]
    assert not [e for e in sarc.log if e["endpoint"] == "cloud" and e["bytes_sent"] >= 121 * 101 * 101 * 4]
    assert lk_full.exists() and lk_psf.exists()
    assert not list(cache.rglob("*.fits")) and not list(cache.rglob("*.part"))


# --------------------------------------------------------------------------------------
# the claim primitives
# --------------------------------------------------------------------------------------


def test_claim_primitives(tmp_path):
    path = str(tmp_path / "f.fits")
    c = _claims.try_claim(path, stale_s=0.4)
    assert c is not None and _claims.try_claim(path) is None
    info = _claims.read_owner(path + ".lock")
    assert info["pid"] == os.getpid() and info["host"] == _HOST and info["token"] == c.token
    w = _claims.Watcher(stale_s=0.4)
    m0 = os.stat(path + ".lock").st_mtime_ns
    time.sleep(0.6)  # the heartbeat (every 0.1 s) keeps it alive
    assert w.state(path) == "held" and os.stat(path + ".lock").st_mtime_ns > m0
    assert w.state(path) == "held"
    c.release()
    assert not os.path.exists(path + ".lock") and w.state(path) == "free"
    # a lock of this very process that no thread holds (e.g. left by a crash) is orphaned
    _fake_lock(Path(path), pid=os.getpid(), host=_HOST)
    assert w.state(path) == "free" and not os.path.exists(path + ".lock")
    # release never removes somebody else's lock
    c = _claims.try_claim(path)
    lk = Path(path + ".lock")
    lk.unlink()
    _fake_lock(Path(path), pid=1, host="elsewhere")
    c.release()
    assert lk.exists()
    # breaking only removes the file judged stale
    st = os.stat(lk)
    os.utime(lk, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a heartbeat since
    assert not _claims.break_lock(str(lk), st) and lk.exists()
    assert _claims.break_lock(str(lk), os.stat(lk)) and not lk.exists()
    assert not list(tmp_path.glob("*.part"))
    # claim_or_wait: returns None once the file is made, raises after the timeout
    lk2 = _fake_lock(Path(path), pid=1, host="elsewhere")
    with pytest.raises(_claims.ClaimTimeout, match="1@elsewhere"):
        _claims.claim_or_wait(path, done=lambda: False, watcher=_claims.Watcher(60), timeout=0.2)
    assert _claims.claim_or_wait(path, done=lambda: True, watcher=_claims.Watcher(60), timeout=0.2) is None
    lk2.unlink()
    c = _claims.claim_or_wait(path, done=lambda: False, watcher=_claims.Watcher(60), timeout=0.2)
    assert c is not None
    c.release()


def test_claim_wait_steps(tmp_path):
    """The one waiting mechanism, a look at a time: held (look again later, backing off),
    taken over once the lock is gone, done once the file is made, failed after the timeout."""
    path = str(tmp_path / "f.fits")
    lk = _fake_lock(Path(path), pid=1, host="elsewhere")
    made = []
    w = _claims.Wait(path, watcher=_claims.Watcher(60), timeout=5, done=lambda: bool(made), poll=(0.05, 0.1))
    t0 = time.monotonic()
    assert w.step() is False and w.due >= t0 + 0.05
    assert w.step() is False and w.delay == 0.1  # backed off to the longest interval
    made.append(1)
    assert w.step() is True and lk.exists()  # made by the claimer: its lock is left alone
    made.clear()
    lk.unlink()
    c = w.step()
    assert isinstance(c, _claims.Claim) and _claims.read_owner(path + ".lock")["token"] == c.token
    c.release()
    _fake_lock(Path(path), pid=1, host="elsewhere")
    w = _claims.Wait(path, watcher=_claims.Watcher(60), timeout=0.1, done=lambda: False, name="data/f.fits")
    time.sleep(0.15)
    with pytest.raises(_claims.ClaimTimeout, match="1@elsewhere to fetch data/f.fits"):
        w.step()


def test_one_sweep_removes_what_dead_writers_left(tmp_path):
    """CacheDir.sweep: temporary files and locks of this host's dead processes go at once, any
    host's once older than max_age; live writers' files (this process, a fresh foreign one) stay."""
    cache = C.CacheDir(tmp_path / "c").prepare()
    d = Path(cache.root) / "data" / "D2"
    dead = _dead_pid()
    f = d / "2025W19_2B_0073_2D2_full.fits"

    def part(pid, host, age=0.0):
        p = Path(f"{f}.{pid}@{host}.{os.urandom(4).hex()}.part")
        p.write_bytes(b"x")
        if age:
            os.utime(p, (time.time() - age, time.time() - age))
        return p

    gone = [part(dead, _HOST), part("x", _HOST), part(7, "elsewhere", age=2 * 86400),
            _fake_lock(d / "a.fits", pid=dead, host=_HOST)]
    old_lock = _fake_lock(d / "b.fits", pid=7, host="elsewhere")
    os.utime(old_lock, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    gone.append(old_lock)
    psf_part = Path(cache.path("psf/D2_l2b-v20-2025-247.fits.lock")).with_name(
        f"D2_l2b-v20-2025-247.fits.lock.{dead}@{_HOST}.beef.part")  # a lock-breaker's leftover
    psf_part.write_bytes(b"{}")
    gone.append(psf_part)
    live = _claims.try_claim(str(d / "c.fits"))
    kept = [part(os.getpid(), _HOST), part(7, "elsewhere"), _fake_lock(d / "e.fits", pid=7, host="elsewhere"),
            d / "c.fits.lock"]
    try:
        assert cache.sweep() == len(gone)
        assert not [p for p in gone if p.exists()] and all(p.exists() for p in kept)
        assert cache.sweep(max_age=0) == len(kept)  # past max_age whoever wrote them
    finally:
        live.release()
