"""Fetch the same measurements by IBE cutout, cloud range reads and full files from the simulated
archive with realistic latency and bandwidth; print bytes per measurement, requests and wall time.

    .venv/bin/python benchmarks/bench_fetch.py            # 200 measurements: 20 files x 10 boxes
    .venv/bin/python benchmarks/bench_fetch.py --quick    # 40 measurements: 5 files x 8 boxes
    .venv/bin/python benchmarks/bench_fetch.py --quick --qr3 --size 200   # QR3 (pipeline R7) files

``--qr3`` measures QR3 (pipeline R7) files of a two-release sky instead: RICE-compressed FLAGS
read as tile descriptors then heap bytes, the EPSF table (~3.9 MB) fetched once per detector by
range reads; IBE cutouts carry it too (spec §3.9), but once one has left the detector's ePSF
library in the cache the fetch closes the later cutout streams after ZODI.

Setting (defaults): every request waits ``--latency`` 0.2 s before its first byte (server time +
round trip) and each response streams at ``--bandwidth`` 50 MB/s (per connection, as on a fast
link to S3/IRSA); cutout concurrency is capped at 4 by the archive (503 + Retry-After beyond, as
IRSA); fetch() runs with its defaults (cutouts: 4 concurrent, adaptive; files/ranges: 8).
Boxes are ``--size`` px squares (default 64) at random positions on each file. The simulated files
are generated before timing (the simulator's CPU cost to synthesise pixels is not transfer time).
On this 2-core machine the simulator and the client share the CPU, so wall times of the
byte-heavy methods are upper bounds; bytes and request counts are exact. ``MB`` is what the
server wrote; ``read MB`` what the client read: they differ when the client closes a stream
early (R7 cutouts after ZODI), the difference being what sat in socket buffers on 127.0.0.1 (on
a real link, about one bandwidth-delay product per closed stream).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl


def build(arc, n_files: int, per_file: int, size: int, seed: int = 3, release: str | None = None,
          detector: int | None = None) -> dict[str, pl.DataFrame]:
    """Manifests (cutout, range, full) for the same ``n_files × per_file`` boxes (``size`` px) on
    files of ``release`` and ``detector`` (None: any)."""
    u = arc.universe
    obs = u.observations
    if "cloud_available" in obs.columns:
        obs = obs.filter(pl.col("cloud_available"))
    if release is not None:
        obs = obs.filter(pl.col("release") == release)
    if detector is not None:
        obs = obs.filter(pl.col("detector") == detector)
    obs = obs.head(n_files).to_dicts()
    rng = np.random.default_rng(seed)
    base = getattr(u, "cutout_pixel_base", 0)
    out: dict[str, list[dict]] = {"cutout": [], "range": [], "full": []}
    k = 0
    for o in obs:
        for _ in range(per_file):
            x, y = rng.uniform(size, 2040 - size, 2).round().astype(int)
            center, sz = f"{x + base},{y + base}px", f"{size}px"
            x0, y0, nx, ny = u.cutout_box(o["cloud_key"], center, sz)
            common = dict(source_id=str(k), obs_id=o["obs_id"], detector=int(o["detector"]),
                          box_x0=x0, box_y0=y0, box_nx=nx, box_ny=ny, psf_key=o["psf_key"],
                          x_parent=float(x), y_parent=float(y), status="planned")
            det = f"{o['obs_id']}D{o['detector']}"
            out["cutout"].append(dict(common, access="cutout", request_id=f"{det}:cutout:{k}",
                                      url=f"{arc.url}/{o['uri']}?center={center}&size={sz}&gzip=false"))
            out["range"].append(dict(common, access="range", request_id=f"{det}:range",
                                     url=f"{arc.cloud_url}/{o['cloud_key']}"))
            out["full"].append(dict(common, access="full", request_id=f"{det}:full", url=f"{arc.url}/{o['uri']}"))
            k += 1
    return {m: pl.DataFrame(rows) for m, rows in out.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 files x 8 boxes instead of 20 x 10")
    ap.add_argument("--files", type=int, default=None)
    ap.add_argument("--per-file", type=int, default=None)
    ap.add_argument("--size", type=int, default=64, help="box side in pixels")
    ap.add_argument("--latency", type=float, default=0.2, help="seconds before the first byte of each response")
    ap.add_argument("--bandwidth", type=float, default=50e6, help="bytes/s per response")
    ap.add_argument("--methods", default="cutout,range,full")
    ap.add_argument("--max-gap", type=int, default=None, help="fetch(max_gap=...) for range reads, bytes")
    ap.add_argument("--qr3", action="store_true", help="QR3 (pipeline R7) files of a two-release sky")
    ap.add_argument("--detector", type=int, default=None, help="files of this detector only (one PSF/ePSF key)")
    args = ap.parse_args(argv)
    n_files = args.files or (5 if args.quick else 20)
    per_file = args.per_file or (8 if args.quick else 10)

    from spxframe import sim
    from spxframe.fetcher.engine import fetch
    from spxframe.sim.world.frame import NSTRIP

    u = sim.Universe(seed=1, cache_strips=(n_files + 2) * NSTRIP, releases=("qr2", "qr3") if args.qr3 else ("qr2",))
    with sim.serve(universe=u) as arc:
        man = build(arc, n_files, per_file, args.size, release="qr3" if args.qr3 else None,
                    detector=args.detector)
        n = man["cutout"].height
        t0 = time.perf_counter()
        keys = [r for r in man["range"]["url"].unique().to_list()]
        for url in keys:  # synthesise the files once (the simulator's cost, not transfer time)
            key = url.split(arc.cloud_url + "/", 1)[1]
            for _ in u.iter_file(key):
                pass
        print(f"simulated {len(keys)} files in {time.perf_counter() - t0:.1f} s (not counted)")
        arc.faults.latency_s = args.latency
        arc.faults.bandwidth_bps = args.bandwidth
        arc.faults.max_cutout_concurrency = 4
        print(f"{n} measurements ({n_files} {'QR3 ' if args.qr3 else ''}files x {per_file} boxes of {args.size} px); "
              f"latency {args.latency:g} s, bandwidth {args.bandwidth / 1e6:g} MB/s per response, "
              f"cutout concurrency cap 4")
        if args.qr3:
            print(f"{man['range']['psf_key'].n_unique()} detector+version keys: as many ePSF libraries by range reads")
        print(f"{'method':<8}{'requests':>10}{'MB':>10}{'MB/meas':>10}{'read MB':>9}{'wall s':>9}"
              f"{'failed':>8}{'503':>6}")
        res = {}
        for method in args.methods.split(","):
            tmp = Path(tempfile.mkdtemp(prefix=f"bench_fetch_{method}_"))
            try:
                arc.clear_log()
                t0 = time.perf_counter()
                kw = {"max_gap": args.max_gap} if args.max_gap is not None and method == "range" else {}
                out = fetch(man[method], cache_dir=tmp, progress=False, **kw)
                wall = time.perf_counter() - t0
                log = [e for e in arc.log if e.get("endpoint") in ("ibe_cutout", "ibe_file", "cloud")]
                nbytes = sum(e.get("bytes_sent") or 0 for e in log)
                n503 = sum(1 for e in log if e.get("status") == 503)
                failed = int((out["status"] != "done").sum())
                res[method] = (len(log), nbytes, wall)
                read = int(out["bytes"].fill_null(0).sum())  # what the client read (a closed stream stops here)
                print(f"{method:<8}{len(log):>10}{nbytes / 1e6:>10.1f}{nbytes / n / 1e6:>10.3f}{read / 1e6:>9.1f}"
                      f"{wall:>9.1f}{failed:>8}{n503:>6}")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if "cutout" in res and "range" in res:
            c, r = res["cutout"][1], res["range"][1]
            print(f"range moves {r / c:.3f} x the bytes of cutouts ({(1 - r / c) * 100:.0f} % less), "
                  f"{res['range'][0] / res['cutout'][0]:.2f} x the requests, "
                  f"{res['cutout'][2] / res['range'][2]:.1f} x faster")


if __name__ == "__main__":
    main()
