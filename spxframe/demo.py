"""``make demo`` / ``spxframe demo``: the whole job against the simulated archive.

Starts the simulated IRSA archive on 127.0.0.1, takes a few hundred simulated sources (with
variables among them), runs :func:`spxframe.lightcurves`, and prints a short summary: sources,
measurements, bytes, time, for the variable sources the recovered amplitude against the
simulated truth, and at the end where the outputs are and how much disk the file cache holds (a
rerun tells the rows it reused from the new ones).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import polars as pl


def demo_catalog(universe, n_sources: int) -> pl.DataFrame:
    """``n_sources`` simulated sources of one wide field, every variability class included."""
    cat = universe.catalog()
    src = universe.sources.select("source_id", "var_class", "field")
    cat = cat.join(src, on="source_id", how="left")
    wide = [f["name"] for f in universe.fields if f["collection"] == "spherex_qr2"]
    cat = cat.filter(pl.col("field") == (wide[0] if wide else cat["field"][0]))
    # a compact patch (sources share images) with every class represented
    ra0, dec0 = float(cat["ra"].median()), float(cat["dec"].median())
    d = ((cat["ra"] - ra0) * np.cos(np.radians(dec0))) ** 2 + (cat["dec"] - dec0) ** 2
    cat = cat.with_columns(d.alias("_d")).sort("_d")
    variables = cat.filter(pl.col("var_class") != "constant").group_by("var_class", maintain_order=True) \
        .head(4).select(cat.columns)
    rest = cat.join(variables.select("source_id"), on="source_id", how="anti") \
        .head(max(n_sources - variables.height, 0))
    return pl.concat([variables, rest]).drop("_d", "field")


def amplitude_table(phot: pl.DataFrame, universe, *, per_class: int = 3) -> pl.DataFrame:
    """Per variable source: true and recovered variability amplitude (µJy).

    The amplitude is the standard deviation of the flux over the source's measurements; the
    recovered one has the noise removed (sqrt(var(flux) - mean(flux_err²))), so it is an
    unbiased estimate of the true one. ``per_class`` sources of each class, the most variable.
    """
    ok = phot.filter(pl.col("flux").is_not_nan() & (pl.col("var_class") != "constant"))
    if ok.height == 0:
        return pl.DataFrame()
    truth = universe.truth_flux(ok["source_id"].to_numpy(), ok["wavelength"].to_numpy(), ok["mjd"].to_numpy())
    ok = ok.with_columns(pl.Series("truth", np.asarray(truth, dtype=float)))
    amp = (ok.group_by("source_id", "var_class")
           .agg(pl.col("truth").std().alias("true_amp_uJy"),
                (pl.col("flux").var() - (pl.col("flux_err") ** 2).mean()).clip(0).sqrt().alias("recovered_amp_uJy"),
                pl.col("flux_err").median().alias("median_err_uJy"), pl.len().alias("n"))
           .with_columns((pl.col("recovered_amp_uJy") / pl.col("true_amp_uJy")).alias("ratio")))
    return (amp.sort("true_amp_uJy", descending=True).group_by("var_class", maintain_order=True)
            .head(per_class).sort("var_class", "true_amp_uJy", descending=[False, True]))


def _previous_keys(output_dir: str) -> pl.DataFrame | None:
    """(source_id, obs_id, detector) of the measured rows an earlier run left in ``output_dir``."""
    path = Path(output_dir) / "photometry.parquet"
    if not path.is_file():
        return None
    return pl.read_parquet(path, columns=["source_id", "obs_id", "detector", "flux"]) \
        .filter(pl.col("flux").is_not_nan()).drop("flux")


def _final_screen(phot: pl.DataFrame, cat: pl.DataFrame, run: dict, *, wall: float, n_req: int,
                  before: pl.DataFrame | None, output_dir: str) -> None:
    from spxframe.results import cache_size

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_meas = int(phot["flux"].is_not_nan().sum())
    print()
    print(f"sources            {cat.height}")
    print(f"rows / measured    {phot.height} / {n_meas}")
    if before is not None:
        keys = ["source_id", "obs_id", "detector"]
        reused = phot.filter(pl.col("flux").is_not_nan()).join(before, on=keys, how="semi").height
        print(f"  of which         {reused} already in the previous run's output, {n_meas - reused} new")
    print(f"bytes transferred  {run['bytes_transferred_this_run'] / 1e6:.1f} MB in {n_req} HTTP requests")
    print(f"wall time          {wall:.1f} s   ({n_meas / max(wall, 1e-9):.0f} measurements/s)")
    print(f"peak memory        {peak_mb:.0f} MB")
    out = Path(output_dir).resolve()
    print(f"\noutputs in {out}/")
    print("  photometry.parquet, manifest.parquet, observations.parquet, run.json, "
          "results/query_summary.json, plots/")
    print(f"  CSV light curves: spxframe export {output_dir} --csv")
    print(f"cache              {cache_size(out) / 1e6:.1f} MB of fetched files in {out}/data and psf/")
    print(f"                   a rerun reuses them; delete them with: spxframe clean {output_dir}")


def run_demo(*, output_dir: str = "spxframe_out", n_sources: int = 300, seed: int = 1) -> int:
    """Run the demo; returns a process exit code."""
    import spxframe
    from spxframe import sim

    t0 = time.perf_counter()
    before = _previous_keys(output_dir)
    with sim.serve(seed=seed, cache_strips=512, releases=("qr2",)) as archive:
        print(f"simulated IRSA archive at {archive.url}  (cloud copy at {archive.cloud_url})")
        cat = demo_catalog(archive.universe, n_sources)
        print(f"catalog: {cat.height} simulated sources, classes "
              f"{dict(cat.group_by('var_class').len().iter_rows())}")
        phot = spxframe.lightcurves(cat, "200px", output_dir=output_dir, archive=archive, progress=True)
        wall = time.perf_counter() - t0
        amp = amplitude_table(phot, archive.universe)
        n_req = len(archive.log)
    run = json.loads((Path(output_dir) / "run.json").read_text())
    if amp.height:
        print("\nvariable sources: recovered vs true amplitude (flux standard deviation, noise removed, µJy)")
        with pl.Config(tbl_rows=30, float_precision=2, tbl_hide_dataframe_shape=True):
            print(amp)
    _final_screen(phot, cat, run, wall=wall, n_req=n_req, before=before, output_dir=output_dir)
    return 0
