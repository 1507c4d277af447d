"""Bytes and seconds of the calibration products for 8 isolated sources (wide_generic, 64 px
cutouts), ranged vs whole, on the simulated archive; optional emulated link on product files.

    .venv/bin/python benchmarks/bench_calib_ranges.py 8 none     # the local simulator
    .venv/bin/python benchmarks/bench_calib_ranges.py 8 5e6      # 5 MB/s, 0.1 s on product files
"""
import json
import os
import shutil
import sys

import numpy as np
import polars as pl

import spxframe
from spxframe import sim
from spxframe.planner.cost import record_link

universe = sim.Universe(seed=1, cache_strips=256)
N, link = int(sys.argv[1]), sys.argv[2]  # link: "none" or "5e6"
with sim.serve(universe=universe) as arc:
    src = universe.sources.filter(pl.col("flux_2um") < 8000)
    cat = (src.filter(pl.col("field") == "wide_generic").sort("flux_2um", descending=True).head(N)
           .select("source_id", "ra", "dec", "pmra", "pmdec", "ref_epoch"))
    res = {}
    for mode in ("ranges", "whole"):
        root = f"/tmp/cr/b_{mode}"
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(f"{root}/cache")
        bw = 1e13 if mode == "whole" else (25e6 if link == "none" else float(link))
        record_link(f"{root}/cache", nbytes=int(bw * 10), seconds=10.0, request_s=0.1)  # the cost model's link
        if link != "none":
            arc.faults.link_bps, arc.faults.latency_s, arc.faults.endpoints = float(link), 0.1, ("ibe_file",)
        ph = spxframe.lightcurves(cat, "64px", archive=arc, output_dir=f"{root}/out", cache_dir=f"{root}/cache",
                                  progress=False, plots=0, access="cutout")
        arc.faults.link_bps, arc.faults.latency_s, arc.faults.endpoints = None, 0.0, None
        run = json.loads(open(f"{root}/out/run.json").read())
        res[mode] = ph.sort("obs_id", "detector", "source_id")
        print(mode, "calibration_s", round(run["timings_s"]["calibration"], 2), "measurements", ph.height,
              {c["family"]: (c["bytes"], sorted(set(c["access"].values()))) for c in run["calibration"]})
    a, b = res["ranges"], res["whole"]
    print("identical:", all(np.array_equal(a[c].to_numpy(), b[c].to_numpy(), equal_nan=True)
                            for c in ("flux", "flux_err", "wavelength", "bandwidth", "gain_factor")))
