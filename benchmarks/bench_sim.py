"""Throughput of the simulated archive's HTTP services (spxframe.sim.serve on 127.0.0.1).

    .venv/bin/python benchmarks/bench_sim.py [--quick] [--seed 1]

Prints a small table: cloud range reads (MB/s), full-file GET (MB/s), cutouts per second
(sequential and 4 in parallel), the batched 1,000-position TAP_UPLOAD query, a positional
TAP query and a SIA2 query.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests


def timeit(fn, reps=1):
    best = float("inf")
    out = None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    import pyvo
    from astropy.table import Table

    from spxframe import sim

    t0 = time.perf_counter()
    universe = sim.Universe(seed=args.seed)
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
            r = requests.get(f"{arc.url}/ibe/data/spherex/{keys[i % len(keys)]}?center={ra},{dec}d&size=200px&gzip=false")
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
        rows.append(("TAP upload 1,000 positions, server side", f"{srv:8.2f} s", f"query + {mb:.0f} MB VOTable streamed"))
        rows.append(("TAP upload 1,000 positions, pyvo end to end", f"{dt:8.2f} s", f"{len(res)} rows; parse dominates"))
        wide = obs.filter(obs["obs_collection"] == "spherex_qr2").sample(1000, with_replacement=True, seed=2)
        cat_w = Table({"source_id": np.arange(1000), "ra": (wide["s_ra"].to_numpy() + rng.normal(0, 0.5, 1000)) % 360,
                       "dec": np.clip(wide["s_dec"].to_numpy() + rng.normal(0, 0.5, 1000), -89.9, 89.9)})
        dt, res = timeit(lambda: tap.search(q, uploads={"cat": cat_w}), 1 if args.quick else 3)
        rows.append(("TAP upload 1,000 wide-survey positions, pyvo", f"{dt:8.2f} s", f"{len(res)} rows"))
        ra, dec = cen[0]
        q1 = (f"SELECT a.uri, p.time_bounds_lower FROM spherex.artifact a JOIN spherex.plane p ON a.planeid = p.planeid "
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


if __name__ == "__main__":
    raise SystemExit(main())
