"""Benchmark: spectra() + variability() for 10,000 sources against the photometry's time.

    .venv/bin/python benchmarks/bench_science.py [--quick] [--sources 10000]

The photometry table is drawn from the simulated sky's truth at the simulated survey's sampling
(the ``--sources`` sources nearest the generic wide field's centre of a sky with 30,000 sources
per field, as in ``bench_e2e.py --scaling``), with the per-detector noise of simulated runs and
formal errors understated by 2. Times (best of ``--rounds``, after a warm-up call that compiles
or loads the numba kernels; wall and CPU of all threads, since the machine is shared) are for
``products`` (error scales estimated once: 3 fits of every source, then both tables, as
``lightcurves()`` runs them) and for ``spectra`` and ``variability`` called alone (each estimates
the scales itself). The reference is the photometry time of the 10,000-source end-to-end run in
benchmarks/README.md (27.9 s for 429,223 measurements), scaled to the number of rows here.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import polars as pl

PHOTOMETRY_S, PHOTOMETRY_ROWS = 27.9, 429_223  #: benchmarks/README.md, 10,000 sources
E0 = {1: 38.5, 2: 39.0, 3: 42.0, 4: 55.0, 5: 98.0, 6: 130.0}


def table(n: int, seed: int = 0) -> pl.DataFrame:
    """A photometry table of the ``n`` sources nearest the generic wide field's centre."""
    from spxframe import sim
    from spxframe.sim.world import instrument as ins

    u = sim.Universe(seed=1, sources_per_field=30_000, releases=("qr2",))
    f = [x for x in u.fields if x["name"] == "wide_generic"][0]
    src = u.sources.filter(pl.col("field") == "wide_generic")
    d2 = ((src["ra"] - f["ra"]) * np.cos(np.radians(f["dec"]))) ** 2 + (src["dec"] - f["dec"]) ** 2
    ids = src.with_columns(d2.alias("d2")).sort("d2").head(n)["source_id"].to_numpy()
    parts = []
    obs = u.observations.filter(pl.col("field") == "wide_generic")
    for o, det, t0, t1 in obs.select("obs_id", "detector", "t_min", "t_max").iter_rows():
        x, y = u.truth_pixel(ids, o, det)
        m = np.isfinite(x)
        if m.any():
            lam, bw = ins.wave_at(det, x[m], y[m])
            parts.append(pl.DataFrame({"source_id": ids[m], "obs_id": o, "detector": det, "mjd": 0.5 * (t0 + t1),
                                       "wavelength": lam, "bandwidth": bw}))
    d = pl.concat(parts)
    det = d["detector"].to_numpy()
    truth = u.truth_flux(d["source_id"].to_numpy(), d["wavelength"].to_numpy(), d["mjd"].to_numpy())
    sig = np.sqrt(np.array([E0[k] for k in det]) ** 2 + 0.18 * np.clip(truth, 0, None))
    rng = np.random.default_rng(seed)
    return d.with_columns(pl.col("detector").cast(pl.Int8), pl.format("D{}", pl.col("detector")).alias("band"),
                          pl.Series("flux", truth + sig * rng.standard_normal(det.size)),
                          pl.Series("flux_err", sig / 2.0), pl.lit(0, dtype=pl.Int64).alias("flags"),
                          pl.lit(0, dtype=pl.Int32).alias("qc"))


def best(fn, rounds: int) -> tuple[float, float]:
    """(wall s, CPU s of all threads) of the fastest of ``rounds`` calls."""
    out = []
    for _ in range(rounds):
        t, c = time.perf_counter(), time.process_time()
        fn()
        out.append((time.perf_counter() - t, time.process_time() - c))
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1,000 sources, 2 rounds")
    a = ap.parse_args()
    n, rounds = (1_000, 2) if a.quick else (a.sources, a.rounds)
    import os

    from spxframe.science import products, spectra, variability

    t = time.perf_counter()
    phot = table(n)
    print(f"table: {phot.height:,} rows, {phot['source_id'].n_unique():,} sources ({time.perf_counter() - t:.1f} s); "
          f"load average {os.getloadavg()[0]:.1f}")
    t = time.perf_counter()
    variability(phot.head(2000))
    print(f"warm-up (numba compile or cache load): {time.perf_counter() - t:.1f} s")
    ref = PHOTOMETRY_S * phot.height / PHOTOMETRY_ROWS
    print(f"photometry of the same number of rows (README: 27.9 s for 429,223): {ref:.1f} s")
    for name, fn in (("products (error scales once, spectra, variability)", lambda: products(phot)),
                     ("spectra alone", lambda: spectra(phot)), ("variability alone", lambda: variability(phot))):
        wall, cpu = best(fn, rounds)
        print(f"{name}: wall {wall:.2f} s ({100 * wall / ref:.1f} %), CPU {cpu:.2f} s ({100 * cpu / ref:.1f} %)")
    print(products(phot)["error_scales"])


if __name__ == "__main__":
    main()
