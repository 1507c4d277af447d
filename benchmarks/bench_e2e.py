"""End to end against the simulated archive: lightcurves() per access method, locally and on Dask.

    .venv/bin/python benchmarks/bench_e2e.py [--quick] [--sources 100,1000] [--access auto,range,cutout]
                                             [--dask] [--scaling 100,1000,10000] [--sources-per-field 30000]
                                             [--cell-order 3]

The simulated archive runs in this process (on 127.0.0.1); each configuration runs
``spxframe.lightcurves`` in a fresh subprocess (cold caches, its own output folder) and
reports wall time, rows, measurements per second and its own peak RSS. Requests and bytes
per endpoint come from the server's request log. Note that the simulated archive renders
every pixel it serves on this same 2-core machine, so wall times include the archive's
work (it is the dominant cost for ``full``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CHILD = r"""
import json, resource, sys, time
import polars as pl
import spxframe
cat_path, url, out, access, use_dask, order = sys.argv[1:7]
cat = pl.read_parquet(cat_path)
client = None
if use_dask == "1":
    from dask.distributed import Client, LocalCluster
    client = Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None))
t0 = time.perf_counter()
phot = spxframe.lightcurves(cat, "200px", archive=url, output_dir=out, access=access, progress=False,
                            plots=0, client=client, cell_order=int(order))
wall = time.perf_counter() - t0
run = json.load(open(out + "/run.json"))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if client is not None:
    rss = max([rss] + [w["metrics"]["memory"] / 2**20 for w in client.scheduler_info()["workers"].values()])
print(json.dumps({"wall": wall, "rows": phot.height, "measured": int(phot["flux"].is_not_nan().sum()),
                  "peak_mb": rss, "cells": run["counts"]["cells"],
                  **{"t_" + k: v for k, v in run["timings_s"].items()}}))
"""


def patch(universe, n: int) -> pl.DataFrame:
    cat = universe.catalog().join(universe.sources.select("source_id", "field"), on="source_id")
    wide = [f["name"] for f in universe.fields if f["collection"] == "spherex_qr2"]
    cat = cat.filter(pl.col("field").is_in(wide))
    # the n sources nearest the centre of the first wide field, then the next fields
    out = []
    for name in wide:
        c = cat.filter(pl.col("field") == name)
        ra0, dec0 = float(c["ra"].median()), float(c["dec"].median())
        d2 = ((c["ra"] - ra0) * np.cos(np.radians(dec0))) ** 2 + (c["dec"] - dec0) ** 2
        out.append(c.with_columns(d2.alias("_d")).sort("_d").drop("_d", "field"))
    return pl.concat(out).head(n)


def run_one(archive, cat: pl.DataFrame, access: str, use_dask: bool, order: int = 3) -> dict:
    tmp = tempfile.mkdtemp(prefix="spx_e2e_")
    cp = os.path.join(tmp, "cat.parquet")
    cat.write_parquet(cp)
    archive.clear_log()
    r = subprocess.run([sys.executable, "-c", CHILD, cp, archive.url, os.path.join(tmp, "out"), access,
                        "1" if use_dask else "0", str(order)], capture_output=True, text=True)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)  # outputs are ~0.7 MB per measurement: don't fill the disk
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    log = list(archive.log)
    for ep in ("tap", "ibe_cutout", "ibe_file", "cloud"):
        sel = [x for x in log if x.get("endpoint") == ep]
        res[f"req_{ep}"] = len(sel)
        res[f"MB_{ep}"] = sum(x.get("bytes_sent") or 0 for x in sel) / 1e6
    res["MB_total"] = sum(res[f"MB_{ep}"] for ep in ("tap", "ibe_cutout", "ibe_file", "cloud"))
    res["kB_per_meas"] = 1e3 * res["MB_total"] / max(res["measured"], 1)
    res["meas_per_s"] = res["measured"] / res["wall"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30 sources, auto and range only")
    ap.add_argument("--sources", default="1000")
    ap.add_argument("--access", default="auto,range,cutout")
    ap.add_argument("--dask", action="store_true", help="also run each size with a 2-worker LocalCluster")
    ap.add_argument("--dask-only", action="store_true", help="only the LocalCluster runs")
    ap.add_argument("--scaling", default="", help="comma-separated catalog sizes for the scaling table (access=auto)")
    ap.add_argument("--sources-per-field", type=int, default=None,
                    help="denser simulated sky (default 2,000 per wide field; 30000 holds a 10,000-source patch)")
    ap.add_argument("--cell-order", type=int, default=3, help="HEALPix order of the work cells")
    a = ap.parse_args(argv)
    from spxframe import sim

    sizes = [30] if a.quick else [int(x) for x in a.sources.split(",") if x]
    methods = ["auto", "range"] if a.quick else a.access.split(",")
    rows = []
    with sim.serve(seed=1, sources_per_field=a.sources_per_field, cache_strips=256,
                   releases=("qr2",)) as archive:
        u = archive.universe
        for n in sizes:
            cat = patch(u, n)
            for m in ([] if a.dask_only else methods):
                rows.append({"sources": cat.height, "access": m, "dask": False,
                             **run_one(archive, cat, m, False, a.cell_order)})
                print(rows[-1], flush=True)
            if a.dask or a.dask_only:
                rows.append({"sources": cat.height, "access": "auto", "dask": True,
                             **run_one(archive, cat, "auto", True, a.cell_order)})
                print(rows[-1], flush=True)
        for n in [int(x) for x in a.scaling.split(",") if x]:
            cat = patch(u, n)
            rows.append({"sources": cat.height, "access": "auto", "dask": False, "scaling": True,
                         **run_one(archive, cat, "auto", False, a.cell_order)})
            print(rows[-1], flush=True)
    df = pl.DataFrame(rows)
    cols = ["sources", "access", "dask", "wall", "measured", "meas_per_s", "MB_total", "kB_per_meas",
            "req_tap", "req_ibe_cutout", "req_cloud", "req_ibe_file", "peak_mb", "cells", "t_observations",
            "t_plan_fetch_measure", "t_cells_plan_s", "t_cells_fetch_s", "t_cells_measure_s", "t_merge"]
    with pl.Config(tbl_rows=50, tbl_cols=20, float_precision=1, tbl_width_chars=200):
        print(df.select([c for c in cols if c in df.columns]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
