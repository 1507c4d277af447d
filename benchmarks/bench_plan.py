"""Benchmark: observations() + plan() for 1,000 and 10,000 sources against the simulated archive.

    .venv/bin/python benchmarks/bench_plan.py --quick

Prints per catalog size: TAP requests sent (HTTP requests to /TAP), observation rows, manifest
rows, predicted bytes and requests per access method, and wall times (s).
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import polars as pl


def catalog(universe, n: int, seed: int = 0) -> pl.DataFrame:
    """``n`` sources drawn from the sim's fields (jittered copies with new ids beyond its own)."""
    src = universe.sources.select("source_id", "ra", "dec")
    if n <= src.height:
        return src.sample(n, seed=seed)
    rng = np.random.default_rng(seed)
    pick = src.sample(n, seed=seed, with_replacement=True)
    dec = np.clip(pick["dec"].to_numpy() + rng.normal(0, 0.05, n), -89.99, 89.99)
    ra = (pick["ra"].to_numpy() + rng.normal(0, 0.05, n) / np.cos(np.radians(dec))) % 360
    return pl.DataFrame({"source_id": np.arange(10**9, 10**9 + n), "ra": ra, "dec": dec})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 and 10,000 sources only")
    ap.add_argument("--strategy", default="auto", choices=["auto", "upload", "regions"])
    ap.add_argument("--size", default="200px")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from spxframe import sim
    from spxframe.archive.query import observations
    from spxframe.planner.manifest import plan

    sizes = [1000, 10000] if args.quick else [1000, 10000, 30000]
    t0 = time.perf_counter()
    with sim.serve(seed=1, releases=("qr2",)) as archive:
        print(f"sim archive up in {time.perf_counter() - t0:.1f} s at {archive.url}")
        for n in sizes:
            cat = catalog(archive.universe, n)
            archive.clear_log()
            t1 = time.perf_counter()
            obs, matches = observations(cat, archive=archive, strategy=args.strategy, return_matches=True)
            t_obs = time.perf_counter() - t1
            tap = [r for r in archive.log if r.get("endpoint") == "tap"]
            t2 = time.perf_counter()
            p = plan(cat, obs, matches=matches, cutout_size=args.size, archive=archive)
            t_plan = time.perf_counter() - t2
            t3 = time.perf_counter()
            p2 = plan(cat, obs, cutout_size=args.size, archive=archive)  # own spatial search
            t_plan2 = time.perf_counter() - t3
            assert p2.manifest.height == p.manifest.height
            print(f"\n== {n:,} sources ({args.strategy}, cutout_size={args.size})")
            print(f"TAP HTTP requests: {len(tap)}  ({sum(r.get('bytes_sent', 0) for r in tap) / 1e6:.1f} MB received)")
            print(f"observations: {obs.height:,} images, {matches.height:,} matches; {t_obs:.2f} s")
            print(f"manifest: {p.manifest.height:,} rows; plan {t_plan:.2f} s (with matches), "
                  f"{t_plan2:.2f} s (own search)")
            print(p)


if __name__ == "__main__":
    main()
