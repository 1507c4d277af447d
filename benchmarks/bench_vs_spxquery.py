"""spxframe.measure vs SPXQuery 0.4.1 itself, per file, on the same 200 px cutout files.

    .venv/bin/python benchmarks/bench_vs_spxquery.py [--quick] [--files N] [--spxquery-python PATH]

SPXQuery 0.4.1 is installed from PyPI into its own environment (``benchmarks/.venv-spxquery``,
created on first use; it is not a dependency of spxframe). Its per-file photometry function
``spxquery.processing.photometry.extract_source_photometry(path, Source(ra, dec))`` is called
on our simulated cutouts (IBE layout, PSF cube included) in a subprocess that times each
call; spxframe measures the same files in this process. Both are compared to the simulated
truth: bias = median(flux / true − 1) over bright sources, pull = (flux − true) / flux_err
(median and 1.4826·MAD width), and how many files each returned a measurement for.

Timing is interleaved so that load from other jobs on the (shared) machine hits both sides
alike: SPXQuery runs in one persistent subprocess that times its whole loop over the files each
time it is told to, and ``--rounds`` rounds (default 3) alternate spxframe, SPXQuery, spxframe,
...; each side's figure is its minimum over the rounds. Before each spxframe round its per-file
caches (parent WCS, PSF cube, PSF zones, WCS-WAVE) are cleared, so every round pays the
per-parent costs again: every file here is a different parent image. Both sides are warmed up
once first (imports, numba cache, the page cache) outside the timing.

Measured with ``--files 200`` (147 files, each from a different parent image), 2 cores, minimum
of 3 interleaved rounds: before the per-file work was cut, 1.79 vs 30.7 ms/file (17.1x, load
average 1.1) and 1.60 vs 31.1 (19.5x, load 7-9); after, 0.69 vs 31.0 ms/file (45.1x, load 1.3),
0.76 vs 33.3 (43.9x, load 0.8), 0.78 vs 33.2 (42.7x, load 1.3), 0.71 vs 30.6 (43.4x, load 6).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

SPXQ_SCRIPT = r"""
import json, sys, time, logging, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.CRITICAL)
from pathlib import Path
from spxquery.core.config import Source, PhotometryConfig
from spxquery.processing.photometry import extract_source_photometry
jobs = json.load(open(sys.argv[1]))
cfg = PhotometryConfig()
extract_source_photometry(Path(jobs[0]["path"]), Source(ra=jobs[0]["ra"], dec=jobs[0]["dec"]), cfg)  # warm-up
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:  # one timed pass over all files per line received
    out = []
    t0 = time.perf_counter()
    for j in jobs:
        r = extract_source_photometry(Path(j["path"]), Source(ra=j["ra"], dec=j["dec"]), cfg)
        out.append(None if r is None else dict(path=j["path"], flux=r.flux, flux_err=r.flux_error,
                                               wavelength=r.wavelength, mjd=r.mjd))
    print(json.dumps({"seconds": time.perf_counter() - t0, "results": out}), flush=True)
"""


def spxquery_python(arg: str | None) -> str:
    if arg:
        return arg
    env = HERE / ".venv-spxquery"
    py = env / "bin" / "python"
    if not py.exists():
        print("creating", env, "with spxquery==0.4.1 from PyPI ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "spxquery==0.4.1"], check=True)
    return str(py)


def accuracy(u, sid, flux, err, wav, mjd) -> dict:
    ok = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    true = u.truth_flux(sid[ok], wav[ok], mjd[ok])
    f, e = flux[ok], err[ok]
    pull = (f - true) / e
    med = float(np.median(pull)) if pull.size else float("nan")
    bright = true > 30 * e
    bias = float(np.median(f[bright] / true[bright] - 1)) if bright.any() else float("nan")
    width = float(1.4826 * np.median(np.abs(pull - med))) if pull.size else float("nan")
    return {"n": int(ok.sum()), "bias": bias, "pull_median": med, "pull_width": width}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 files instead of 300")
    ap.add_argument("--files", type=int, default=None)
    ap.add_argument("--spxquery-python", default=None, help="python of an environment with spxquery 0.4.1")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (minimum per side)")
    a = ap.parse_args(argv)
    n = a.files or (40 if a.quick else 300)
    py = spxquery_python(a.spxquery_python)

    from spxframe import sim

    u = sim.Universe(seed=1, releases=("qr2",))
    tmp = tempfile.mkdtemp(prefix="spx_vs_spxq_")
    try:
        return _run(a, n, py, u, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ~0.8 GB of cutouts for --files 200


def _run(a, n: int, py: str, u, tmp: str) -> int:
    from bench_photometry import make_files

    import spxframe

    paths, pairs = make_files(u, tmp, n, 200, per_parent=1)
    n = len(paths)  # the field may hold fewer parent images than asked for
    sids = pairs["source_id"].cast(pl.Int64).to_numpy()
    cat = u.catalog().filter(pl.col("source_id").is_in(sids.tolist()))
    pos = {int(s): (float(r), float(d)) for s, r, d in cat.select("source_id", "ra", "dec").iter_rows()}

    jobs = [{"path": p, "ra": pos[int(s)][0], "dec": pos[int(s)][1], "source_id": int(s)}
            for p, s in zip(paths, sids)]
    jf = os.path.join(tmp, "jobs.json")
    json.dump(jobs, open(jf, "w"))
    q = subprocess.Popen([py, "-c", SPXQ_SCRIPT, jf], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    q.stdout.readline()  # SPXQuery imported and warmed up

    def run_spxquery() -> dict:
        q.stdin.write("run\n")
        q.stdin.flush()
        line = q.stdout.readline()
        if not line:
            raise RuntimeError("the SPXQuery subprocess died")
        return json.loads(line)

    from spxframe.photometry import forced as photometry
    spxframe.measure(pairs.head(1), cat)  # warm-up: imports, numba cache
    t_spx, t_q, loads = [], [], []
    for rnd in range(a.rounds):  # interleaved: load from other jobs hits both sides alike
        for c in (photometry._WCS_CACHE, photometry._PSF_CACHE, photometry._ZONE_CACHE, photometry._WAVE_CACHE):
            c.clear()
        t0 = time.perf_counter()
        phot = spxframe.measure(pairs, cat)
        t_spx.append(time.perf_counter() - t0)
        spxq = run_spxquery()
        t_q.append(spxq["seconds"])
        loads.append(os.getloadavg()[0])
        print(f"round {rnd + 1}: spxframe {1e3 * t_spx[-1] / n:.2f} ms/file, SPXQuery {1e3 * t_q[-1] / n:.2f} ms/file, "
              f"load average {loads[-1]:.2f}", flush=True)
    q.stdin.close()
    q.wait()
    t_spx, t_q = min(t_spx), min(t_q)
    phot = phot.with_columns(pl.col("source_id").cast(pl.Int64))
    by_path = {j["path"]: j["source_id"] for j in jobs}
    got = [x for x in spxq["results"] if x is not None]

    acc_spx = accuracy(u, phot["source_id"].to_numpy(), phot["flux"].to_numpy(), phot["flux_err"].to_numpy(),
                       phot["wavelength"].to_numpy(), phot["mjd"].to_numpy())
    acc_q = accuracy(u, np.array([by_path[x["path"]] for x in got]), np.array([x["flux"] for x in got]),
                     np.array([x["flux_err"] for x in got]), np.array([x["wavelength"] for x in got]),
                     np.array([x["mjd"] for x in got]))
    print(f"\n{n} files of 200x200 px (PSF cube included), one source each; machine: {os.cpu_count()} cores; "
          f"minimum of {a.rounds} interleaved rounds; load average {min(loads):.2f}-{max(loads):.2f}\n")
    print(f"{'':22s}{'ms/file':>9s}{'rows':>7s}{'bias':>9s}{'pull med':>10s}{'pull width':>12s}")
    for name, t, acc, rows in (("spxframe.measure", t_spx, acc_spx, phot.height),
                               ("SPXQuery 0.4.1", t_q, acc_q, len(got))):
        print(f"{name:22s}{1e3 * t / n:9.2f}{rows:7d}{acc['bias']:+9.3f}{acc['pull_median']:+10.2f}"
              f"{acc['pull_width']:12.2f}")
    print(f"\nspeed ratio SPXQuery / spxframe per file: {t_q / t_spx:.1f}x")
    print(f"SPXQuery returned no measurement for {n - len(got)} of {n} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
