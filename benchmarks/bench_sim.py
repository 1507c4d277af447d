"""The simulated archive (spxframe.sim.serve on 127.0.0.1): file serving, end to end, services.

    .venv/bin/python benchmarks/bench_sim.py --files [--before /tmp/baseline]   # per-request times
    .venv/bin/python benchmarks/bench_sim.py --e2e 30 [--before /tmp/baseline]  # lightcurves() end to end
    .venv/bin/python benchmarks/bench_sim.py [--quick] [--seed 1]               # services throughput

``--files`` times, each on frames nobody asked for before (fresh): an IBE cutout of 60 px and of
200 px, a byte-range read of 200 rows of each of the 4 pixel planes (4 requests), and a whole-file
GET; it also prints the md5 of each response, so two trees can be checked to serve the same bytes.
``--e2e N``: ``spxframe.lightcurves`` of the first N sources of ``universe.catalog()`` at 60 px,
then the same run again (nothing left to draw). ``--before DIR`` runs the same measurement on the
tree in DIR (a checkout of an earlier commit) in a subprocess and prints both side by side.
The services table: cloud range reads (MB/s), full-file GET (MB/s), cutouts per second (sequential
and 4 in parallel), the batched 1,000-position TAP_UPLOAD query, a positional TAP query and SIA2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

BLOCK = 2880
PLANE_BYTES = -(-2040 * 2040 * 4 // BLOCK) * BLOCK
#: (header blocks, data bytes) of PRIMARY, IMAGE, FLAGS, VARIANCE, ZODI (QR2 L2 layout)
_LAYOUT = ((1, 0), (7, PLANE_BYTES), (5, PLANE_BYTES), (4, PLANE_BYTES), (4, PLANE_BYTES))


def plane_rows(plane: int, r0: int, r1: int) -> tuple[int, int]:
    """Byte range [start, stop) of rows [r0, r1) of pixel plane ``plane`` (0 IMAGE .. 3 ZODI)."""
    pos = 0
    for k, (hb, nb) in enumerate(_LAYOUT):
        pos += hb * BLOCK
        if k == plane + 1:
            return pos + r0 * 2040 * 4, pos + r1 * 2040 * 4
        pos += nb
    raise ValueError(plane)


def timeit(fn, reps=1):
    best = float("inf")
    out = None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def services(args) -> int:
    import pyvo
    from astropy.table import Table

    from spxframe import sim

    t0 = time.perf_counter()
    universe = sim.Universe(seed=args.seed, releases=("qr2",))
    t_universe = time.perf_counter() - t0
    rows = []
    with sim.serve(universe=universe) as arc:
        obs = universe.observations
        keys = obs["cloud_key"].to_list()
        s = requests.Session()
        n_range = 8 if args.quick else 32
        size = 2 * 1024 * 1024
        rng = np.random.default_rng(0)
        starts = rng.integers(0, 60_000_000, n_range)

        def ranges():
            tot = 0
            for i, st in enumerate(starts):
                r = s.get(f"{arc.cloud_url}/{keys[i % len(keys)]}", headers={"Range": f"bytes={st}-{st + size - 1}"})
                tot += len(r.content)
            return tot

        ranges()  # warm the strip caches a little
        dt, tot = timeit(ranges, 1 if args.quick else 2)
        rows.append(("cloud range reads (2 MiB, sequential)", f"{tot / dt / 1e6:8.1f} MB/s", f"{n_range} requests"))

        def full():
            r = s.get(f"{arc.url}/ibe/data/spherex/{keys[1]}", stream=True)
            return sum(len(c) for c in r.iter_content(1 << 20))

        dt, tot = timeit(full, 1)
        rows.append(("full file GET (IBE)", f"{tot / dt / 1e6:8.1f} MB/s", f"{tot / 1e6:.1f} MB"))

        n_cut = 6 if args.quick else 20
        cen = list(zip(obs["s_ra"].to_list(), obs["s_dec"].to_list()))

        def cut(i):
            ra, dec = cen[i % len(cen)]
            r = requests.get(f"{arc.url}/ibe/data/spherex/{keys[i % len(keys)]}?center={ra},{dec}d&size=200px"
                             "&gzip=false")
            assert r.status_code == 200, r.text[:200]
            return len(r.content)

        dt, _ = timeit(lambda: [cut(i) for i in range(n_cut)], 1)
        rows.append(("cutouts 200px, sequential", f"{n_cut / dt:8.2f} /s", f"{n_cut} cutouts"))
        with ThreadPoolExecutor(4) as ex:
            dt, _ = timeit(lambda: list(ex.map(cut, range(n_cut, 2 * n_cut))), 1)
        rows.append(("cutouts 200px, 4 in parallel", f"{n_cut / dt:8.2f} /s", f"{n_cut} cutouts"))

        tap = pyvo.dal.TAPService(arc.tap_url)
        pick = obs.sample(1000, with_replacement=True, seed=1)
        cat = Table({"source_id": np.arange(1000), "ra": (pick["s_ra"].to_numpy() + rng.normal(0, 1, 1000)) % 360,
                     "dec": np.clip(pick["s_dec"].to_numpy() + rng.normal(0, 1, 1000), -89.9, 89.9)})
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
        arc.clear_log()
        dt, res = timeit(lambda: tap.search(q, uploads={"cat": cat}), 1 if args.quick else 3)
        srv = min(e["t_end"] - e["t_start"] for e in arc.log if e["endpoint"] == "tap")
        mb = max(e["bytes_sent"] for e in arc.log if e["endpoint"] == "tap") / 1e6
        rows.append(("TAP upload 1,000 positions, server side", f"{srv:8.2f} s",
                     f"query + {mb:.0f} MB VOTable streamed"))
        rows.append(("TAP upload 1,000 positions, pyvo end to end", f"{dt:8.2f} s",
                     f"{len(res)} rows; parse dominates"))
        wide = obs.filter(obs["obs_collection"] == "spherex_qr2").sample(1000, with_replacement=True, seed=2)
        cat_w = Table({"source_id": np.arange(1000), "ra": (wide["s_ra"].to_numpy() + rng.normal(0, 0.5, 1000)) % 360,
                       "dec": np.clip(wide["s_dec"].to_numpy() + rng.normal(0, 0.5, 1000), -89.9, 89.9)})
        dt, res = timeit(lambda: tap.search(q, uploads={"cat": cat_w}), 1 if args.quick else 3)
        rows.append(("TAP upload 1,000 wide-survey positions, pyvo", f"{dt:8.2f} s", f"{len(res)} rows"))
        ra, dec = cen[0]
        q1 = ("SELECT a.uri, p.time_bounds_lower FROM spherex.artifact a "
              "JOIN spherex.plane p ON a.planeid = p.planeid "
              f"WHERE 1 = CONTAINS(POINT('ICRS', {ra}, {dec}), p.poly) ORDER BY p.time_bounds_lower")
        dt, res = timeit(lambda: tap.search(q1), 3)
        rows.append(("TAP positional join (tutorial shape)", f"{dt * 1e3:8.1f} ms", f"{len(res)} rows"))
        sia = pyvo.dal.SIA2Service(arc.sia_url)
        dt, res = timeit(lambda: sia.search(pos=(ra, dec, 0.1)), 3)
        rows.append(("SIA2 CIRCLE query", f"{dt * 1e3:8.1f} ms", f"{len(res)} rows"))
    print(f"spxframe.sim services  (universe seed {args.seed}: {obs.height} files, built in {t_universe:.2f} s)")
    w = max(len(r[0]) for r in rows)
    for name, val, note in rows:
        print(f"  {name:<{w}}  {val}   ({note})")
    return 0


def _get(url: str, **kw) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    r = requests.get(url, **kw)
    assert r.status_code in (200, 206), (r.status_code, r.text[:200])
    return time.perf_counter() - t0, r.content


def files(seed: int, reps: int) -> dict:
    """Per-request times (s, median over ``reps`` fresh frames) and md5s of the responses."""
    from spxframe import sim

    out: dict = {"t": {}, "md5": {}}
    with sim.serve(seed=seed, releases=("qr2",)) as arc:
        obs = arc.universe.observations
        keys, ra, dec = obs["cloud_key"].to_list(), obs["s_ra"].to_list(), obs["s_dec"].to_list()
        fresh = iter(range(3, len(keys), 37))  # every measurement on frames not touched before
        base = f"{arc.url}/ibe/data/spherex/"
        for d in range(1, 7):  # compile kernels, make each detector's PSF cube: not per-frame costs
            i = obs["detector"].to_list().index(d)
            _get(f"{base}{keys[i]}?center={ra[i]},{dec[i]}d&size=60px&gzip=false")

        def run(name, one):
            ts, cs = [], []
            for _ in range(reps):
                i = next(fresh)
                c0 = time.process_time()
                dt, body = one(i)
                ts.append(dt)
                cs.append(time.process_time() - c0)
                out["md5"][f"{name} #{i}"] = hashlib.md5(body).hexdigest()
            out["t"][name] = float(np.median(ts))
            out["t"][f"{name}, CPU s"] = float(np.median(cs))

        for px in (60, 200):
            run(f"IBE cutout {px} px", lambda i, px=px: _get(f"{base}{keys[i]}?center={ra[i]},{dec[i]}d&size={px}px"
                                                               "&gzip=false"))

        def ranges(i):
            t0, parts = time.perf_counter(), []
            for plane in range(4):
                a, b = plane_rows(plane, 900, 1100)
                parts.append(_get(f"{arc.cloud_url}/{keys[i]}", headers={"Range": f"bytes={a}-{b - 1}"})[1])
            return time.perf_counter() - t0, b"".join(parts)

        run("range read 200 rows x 4 planes", ranges)

        def as_fetched(i):  # what the fetcher asks of each image: the headers, then 60 rows of each plane
            t0, parts = time.perf_counter(), [_get(f"{arc.cloud_url}/{keys[i]}", headers={"Range": "bytes=0-46079"})[1]]
            with ThreadPoolExecutor(4) as ex:
                parts += [r[1] for r in ex.map(lambda pl: _get(f"{arc.cloud_url}/{keys[i]}", headers={
                    "Range": "bytes={}-{}".format(*np.add(plane_rows(pl, 1500, 1560), (0, -1)))}), range(4))]
            return time.perf_counter() - t0, b"".join(parts)

        run("image as the fetcher reads it (headers + 60 rows x 4 planes)", as_fetched)
        run("whole file (IBE GET)", lambda i: _get(f"{base}{keys[i]}"))
    return out


def e2e(seed: int, n: int) -> dict:
    """``lightcurves()`` of the first ``n`` catalog sources at 60 px, then the same run again."""
    import spxframe
    from spxframe import sim

    out: dict = {"t": {}, "md5": {}}
    with sim.serve(seed=seed, releases=("qr2",)) as arc, tempfile.TemporaryDirectory() as tmp:
        cat = arc.universe.catalog().head(n)
        t0, c0 = time.perf_counter(), time.process_time()
        phot = spxframe.lightcurves(cat, "60px", archive=arc, output_dir=tmp, progress=False)
        out["t"][f"lightcurves {n} sources 60 px"] = time.perf_counter() - t0
        out["t"]["  CPU seconds of that run (all threads; robust to load)"] = time.process_time() - c0
        ncut = sum(e["endpoint"] == "ibe_cutout" for e in arc.log)
        t0 = time.perf_counter()
        spxframe.lightcurves(cat, "60px", archive=arc, output_dir=tmp, progress=False)
        out["t"]["same run again (nothing to draw)"] = time.perf_counter() - t0
        cols = [c for c in ("source_id", "obs_id", "detector", "flux", "flux_err") if c in phot.columns]
        tab = phot.select(cols).sort(cols[:3])
        out["md5"][f"photometry ({phot.height} rows, {ncut} cutouts)"] = hashlib.md5(
            tab.write_csv().encode()).hexdigest()
    return out


def side_by_side(args, argv) -> int:
    """Run this measurement here and on the tree ``args.before`` (subprocess), print both."""
    res = {}
    for label, root in (("before", args.before), ("after", None)):
        env = dict(os.environ)
        if root:
            env["PYTHONPATH"] = os.path.abspath(root) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, os.path.abspath(__file__), *[a for a in argv if a != args.before and a != "--before"],
               "--json"]
        p = subprocess.run(cmd, env=env, cwd=root or os.getcwd(), capture_output=True, text=True, check=True)
        res[label] = json.loads(p.stdout.strip().splitlines()[-1])
    b, a = res["before"], res["after"]
    w = max(len(k) for k in a["t"])
    print(f"  {'':<{w}}  {'before':>9}  {'after':>9}  speed-up")
    for k in a["t"]:
        tb, ta = b["t"].get(k, float("nan")), a["t"][k]
        print(f"  {k:<{w}}  {tb:8.3f}s  {ta:8.3f}s  {tb / ta:6.1f}x")
    same = all(b["md5"].get(k) == v for k, v in a["md5"].items()) and b["md5"].keys() == a["md5"].keys()
    for k, v in a["md5"].items():
        print(f"  md5 {k}: {v} {'same' if b['md5'].get(k) == v else 'DIFFERENT (before ' + str(b['md5'].get(k)) + ')'}")
    print("  identical responses before and after" if same else "  RESPONSES DIFFER")
    return 0 if same else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--files", action="store_true", help="per-request times on fresh frames (and md5s)")
    ap.add_argument("--reps", type=int, default=3, help="fresh frames per --files measurement")
    ap.add_argument("--e2e", type=int, default=0, metavar="N", help="lightcurves() of N sources at 60 px")
    ap.add_argument("--before", default=None, metavar="DIR", help="also run on the tree in DIR, side by side")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not (args.files or args.e2e):
        return services(args)
    if args.before:
        return side_by_side(args, argv)
    res = e2e(args.seed, args.e2e) if args.e2e else files(args.seed, args.reps)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res["t"].items():
            print(f"  {k:<40} {v:8.3f} s")
        for k, v in res["md5"].items():
            print(f"  md5 {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
