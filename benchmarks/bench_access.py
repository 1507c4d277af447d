"""Access by the user's link (issue 14): bytes, requests and time per measurement by access method
and by link, against the IBE cutout baseline, for isolated, clustered and dense catalogs.

    .venv/bin/python benchmarks/bench_access.py --quick   # a sample of each catalog's images + the target
    .venv/bin/python benchmarks/bench_access.py           # all three catalogs, every image (hours on the home link)
    .venv/bin/python benchmarks/bench_access.py --target-only   # the issue's target only (~2 min)

Links (the simulated archive's ``Faults``): ``fast`` = no cap, no latency; ``home`` =
``link_bps=5e6`` (all responses together) and ``latency_s=0.1`` before every response. The plans
for a link use ``CostModel.for_link`` with that link's figures (auto = the cost model's per-image
choice; on the fast link the model assumes 100 MB/s and 0.02 s). Methods: ``cutout`` (IBE
cutouts; the model may merge an image's sources into one), ``shared`` (one IBE cutout per
image), ``columns`` (cloud ranges of the boxes' own columns), ``rows`` (full-width rows: what
``auto`` chose for every image before issue 14, "today"), ``full`` (whole files), ``auto``.

The simulated cutout service spends only ``latency_s`` per cutout; IRSA's takes ~15 s (spec
§1.5) at two at a time, so the cutout rows' times are far better than IRSA would give; the
``model s`` column is the cost model's prediction with IRSA's 15 s. ``auto`` mixes columns and
rows per image; until fetch honours the manifest's per-row ``max_gap``, this benchmark runs
one fetch per max_gap value, concurrently, into one cache. Requests are counted in the
archive's log (file, cutout and cloud endpoints). Catalogs: ``isolated`` two sources per field
(the issue's target), ``clustered`` 30 sources within 0.4 deg of one deep-field source,
``dense`` 300 sources of the generic wide field. The sky is the default two-release one; QR2
and QR3 rows are reported separately. On this 2-core machine the simulator and the client share
the CPU: fast-link times are upper bounds.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl

import spxframe
from spxframe import sim
from spxframe.archive.query import observations
from spxframe.fetcher.engine import fetch
from spxframe.planner.cost import CostModel
from spxframe.planner.manifest import plan
from spxframe.sim.services.faults import Faults

LINKS = {"fast": dict(link_bps=None, latency_s=0.0), "home": dict(link_bps=5e6, latency_s=0.1)}
MODELS = {"fast": CostModel.for_link(bandwidth_Bps=100e6, latency_s=0.02),
          "home": CostModel.for_link(bandwidth_Bps=5e6, latency_s=0.1)}
FORCED = {"shared": "shared", "columns": "columns", "rows": "rows", "full": "full"}
FILE_ENDPOINTS = ("ibe_file", "ibe_cutout", "cloud")
QUICK_IMAGES = {"isolated": 40, "clustered": 8, "dense": 4}  #: images per catalog in --quick


def catalogs(u) -> dict[str, pl.DataFrame]:
    src = u.sources
    fields = src["field"].unique(maintain_order=True).to_list()
    iso = pl.concat([src.filter(pl.col("field") == f).head(2) for f in fields])
    deep = src.filter(pl.col("field") == fields[0])
    ra0, dec0 = deep["ra"][0], deep["dec"][0]
    d = np.hypot((deep["ra"].to_numpy() - ra0) * np.cos(np.radians(dec0)), deep["dec"].to_numpy() - dec0)
    clu = deep.filter(pl.Series(d < 0.4)).head(30)
    dense = src.filter(pl.col("field") == "wide_generic").head(300)
    return {n: c.select("source_id", "ra", "dec") for n, c in (("isolated", iso), ("clustered", clu), ("dense", dense))}


def make_plan(cat, obs, arc, *, size, method: str, link: str):
    cost = MODELS[link]
    kw = dict(cutout_size=size, archive=arc, cost=cost)
    if method == "cutout":
        return plan(cat, obs, access="cutout", **kw)
    if method == "auto":
        return plan(cat, obs, **kw)
    forced = obs.select("obs_id", "detector").with_columns(pl.lit(FORCED[method]).alias("access"))
    return plan(cat, obs, image_access=forced, **kw)


def run_fetch(m: pl.DataFrame, cache: Path) -> pl.DataFrame:
    """fetch() with each row's planned max_gap (one concurrent fetch per distinct value)."""
    gaps = m["max_gap"].unique().to_list()
    out: list[pl.DataFrame] = []
    lock = threading.Lock()

    def one(gap):
        part = m.filter(pl.col("max_gap").is_null() if gap is None else pl.col("max_gap") == gap)
        got = fetch(part, cache_dir=cache, progress=False, **({} if gap is None else {"max_gap": int(gap)}))
        with lock:
            out.append(got)

    threads = [threading.Thread(target=one, args=(g,)) for g in gaps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return pl.concat(out, how="vertical_relaxed")


def one_run(arc, cat, obs, *, size, method, link, measure: bool) -> dict:
    arc.faults.link_bps, arc.faults.latency_s = LINKS[link]["link_bps"], LINKS[link]["latency_s"]
    p = make_plan(cat, obs, arc, size=size, method=method, link=link)
    m = p.manifest.filter(pl.col("status") == "planned")
    model_s = float(p.summary["predicted_seconds"].sum())
    cache = Path(tempfile.mkdtemp(prefix="bench_access_"))
    try:
        arc.clear_log()
        t0 = time.perf_counter()
        got = run_fetch(m, cache)
        secs = time.perf_counter() - t0
        log = [e for e in arc.log if e.get("endpoint") in FILE_ENDPOINTS]
        frac_meas = float("nan")
        if measure:
            gb = got["bytes"].fill_null(0).sum() / 1e9
            print(f"  fetched {m.height} rows in {secs:.0f} s, {gb:.3f} GB; measuring", flush=True)
            done = got.filter(pl.col("status") == "done")
            try:
                ph = spxframe.measure(done, cat, cache_dir=cache, progress=False)
                frac_meas = float(ph["flux"].is_not_nan().sum()) / max(m.height, 1)
            except Exception as e:  # noqa: BLE001 — a broken measure() must not hide the fetch figures
                print(f"  measure() failed: {type(e).__name__}: {e}")
        rel = obs.select("obs_id", "detector", "release")
        g = got.join(rel, on=["obs_id", "detector"], how="left")
        by_rel = {r: int(g.filter(pl.col("release") == r)["bytes"].fill_null(0).sum())
                  for r in g["release"].unique().drop_nulls().to_list()}
        return dict(n=m.height, bytes=int(got["bytes"].fill_null(0).sum()), requests=len(log), seconds=secs,
                    model_s=model_s, done=float((got["status"] == "done").mean()), measured=frac_meas,
                    by_release=by_rel,
                    methods={f"{a}:{g}": k for a, g, k in m.group_by("access", "max_gap").len().rows()})
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def table(rows: list[dict]) -> None:
    base = {(r["catalog"], r["size"], r["link"]): r for r in rows if r["method"] == "cutout"}
    print(f"{'catalog':<10}{'size':>6} {'link':<5}{'method':<8}{'meas':>6}{'MB/meas':>9}{'req/meas':>9}"
          f"{'s/meas':>8}{'total s':>9}{'model s':>9}{'x cutout':>9}{'done':>6}{'measured':>9}  QR2/QR3 MB")
    for r in rows:
        b = base.get((r["catalog"], r["size"], r["link"]))
        ratio = b["seconds"] / r["seconds"] if b and r["seconds"] else float("nan")
        n = max(r["n"], 1)
        rel = "/".join(f"{r['by_release'].get(k, 0) / 1e6:,.0f}" for k in ("qr2", "qr3"))
        print(f"{r['catalog']:<10}{r['size']:>6} {r['link']:<5}{r['method']:<8}{r['n']:>6}{r['bytes'] / n / 1e6:>9.2f}"
              f"{r['requests'] / n:>9.1f}{r['seconds'] / n:>8.3f}{r['seconds']:>9.1f}{r['model_s']:>9.0f}{ratio:>9.2f}"
              f"{r['done']:>6.2f}{r['measured']:>9.2f}  {rel}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a sample of each catalog's images + the target")
    ap.add_argument("--images", type=int, default=None, help="limit every catalog to this many images")
    ap.add_argument("--target-only", action="store_true", help="only the issue's target run")
    ap.add_argument("--catalogs", default=None, help="comma-separated subset of isolated,clustered,dense")
    args = ap.parse_args(argv)
    u = sim.Universe(seed=1, cache_strips=768)
    rows: list[dict] = []
    with sim.serve(universe=u, faults=Faults()) as arc:
        cats = catalogs(u)
        names = [] if args.target_only else args.catalogs.split(",") if args.catalogs else list(cats)
        for name in names:
            cat = cats[name]
            obs = observations(cat, archive=arc).sort("obs_id", "detector")
            limit = args.images or (QUICK_IMAGES[name] if args.quick else None)
            if limit and obs.height > limit:  # every k-th image: both releases, all detectors
                obs = obs.gather_every(obs.height // limit).head(limit)
            for size in ("200px", None):
                for link in ("fast", "home"):
                    for method in ("cutout", "shared", "columns", "rows", "full", "auto"):
                        if method == "full" and name == "isolated" and link == "home":
                            continue  # 72 MB per measurement over 5 MB/s: ~14 s each, shown by the model
                        if method == "columns" and name != "isolated" and (size or name == "dense"):
                            continue  # ~800 requests per 200-px box (dense: per source): shown on isolated
                        if method == "shared" and name == "isolated":
                            continue  # one source per image: the same as cutout
                        r = one_run(arc, cat, obs, size=size, method=method, link=link, measure=False)
                        rows.append(dict(r, catalog=name, size=str(size or "None"), link=link, method=method))
                        print(f"  {name} {size} {link} {method}: {r['n']} measurements, {r['seconds']:.1f} s "
                              f"(model {r['model_s']:.0f} s), {r['bytes'] / 1e6:.0f} MB, {r['requests']} requests, "
                              f"done {r['done']:.2f}", flush=True)
        table(rows)
        print("\nTarget (issue 14): eight isolated sources, cutout_size=None, auto, over 5 MB/s + 0.1 s")
        cat = cats["isolated"]
        obs = observations(cat, archive=arc)
        r = one_run(arc, cat, obs, size=None, method="auto", link="home", measure=True)
        rel = {k: round(v / 1e6) for k, v in r["by_release"].items()}
        print(f"  {r['n']} measurements: {r['bytes'] / 1e9:.3f} GB moved (limit 0.78), {r['seconds']:.0f} s "
              f"(limit 208), measured {r['measured']:.3f} of rows (>= 0.95), fetched {r['done']:.3f}; "
              f"{r['requests']} requests; MB by release {rel}; rows by access:max_gap {r['methods']}")


if __name__ == "__main__":
    main()
