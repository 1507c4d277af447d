"""lightcurves(): observations → plan → fetch → measure, by sky cell, resumable, to Parquet.

Output folder layout (``output_dir``)::

    observations.parquet   the archive's observations of the catalog (schema.OBSERVATIONS)
    manifest.parquet       one row per (source, observation, detector): request, path, status
    photometry.parquet     one row per (source, observation, detector); sorted by source, time
    run.json               versions, parameters, counts, timings per stage, bytes transferred
    results/query_summary.json   SPXQuery-style summary (total_size_gb, band_sizes, ...)
    data/D1 … data/D6      the fetched files;  psf/  cached PSF cubes (range reads)
    plots/                 PNG light curves / spectra of the first sources and a run summary
    parts/                 per-cell results (the unit of resume); safe to delete after a run

A rerun with the same ``output_dir`` does only what is missing: finished cells are skipped,
changed photometry options re-measure from the files on disk, failed transfers are retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time as _time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from . import schema
from .cells import DEFAULT_ORDER, cell_of

log = logging.getLogger("spxframe.pipeline")

_DEP_NAMES = ("numpy", "polars", "pyarrow", "numba", "astropy", "pyvo", "requests", "fsspec")


# ------------------------------------------------------------------------------ helpers

def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def write_parquet(df: pl.DataFrame, path: Path, table: schema.Table | None = None, *,
                  row_group_size: int | None = None) -> None:
    """Write ``df`` atomically as Parquet, units and descriptions in the file metadata."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tab = df.to_arrow()
    if table is not None:
        meta = dict(tab.schema.metadata or {})
        meta.update(schema.parquet_metadata(table))
        tab = tab.replace_schema_metadata(meta)
    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    pq.write_table(tab, tmp, row_group_size=row_group_size, compression="zstd")
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    out = {"spxframe": __import__("spxframe").__version__, "python": platform.python_version()}
    for n in _DEP_NAMES:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


# ------------------------------------------------------------------------------ the cell task

@dataclass
class CellTask:
    """Everything one sky cell needs; picklable, so it runs locally or on a Dask worker."""

    cell: int
    output_dir: str
    catalog: pl.DataFrame  # the cell's sources (normalised catalog)
    manifest: pl.DataFrame  # the cell's manifest rows (schema.MANIFEST)
    observations: pl.DataFrame  # obs_id, detector, mjd_mid, band of the cell's rows
    fetch_options: dict = field(default_factory=dict)
    measure_options: dict = field(default_factory=dict)
    plan_hash: str = ""
    measure_hash: str = ""
    progress: bool = False  # per-transfer progress bar (local runs with one or two cells)


def _part_paths(output_dir: str, cell: int) -> tuple[Path, Path, Path]:
    root = Path(output_dir) / "parts"
    return (root / "photometry" / f"cell={cell}" / "part.parquet",
            root / "manifest" / f"cell={cell}" / "part.parquet",
            root / "cells" / f"{cell}.json")


def cell_state(output_dir: str, cell: int) -> dict | None:
    """The done-marker of a cell, or None."""
    marker = _part_paths(output_dir, cell)[2]
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _missing_rows(manifest: pl.DataFrame, observations: pl.DataFrame, phot: pl.DataFrame) -> pl.DataFrame:
    """NaN rows (with a qc bit) for manifest rows that produced no measurement."""
    keys = phot.select("source_id", "obs_id", "detector") if phot.height else None
    m = manifest
    if keys is not None:
        m = m.join(keys, on=["source_id", "obs_id", "detector"], how="anti")
    if m.height == 0:
        return schema.empty(schema.PHOTOMETRY)
    qc = pl.when(pl.col("status") == "done").then(pl.lit(schema.QC["OFF_FILE"])) \
        .otherwise(pl.lit(schema.QC["FETCH_FAILED"]))
    rows = m.join(observations.select("obs_id", "detector", "mjd_mid"), on=["obs_id", "detector"], how="left") \
        .select("source_id", "obs_id", "detector", "band", pl.col("mjd_mid").alias("mjd"),
                qc.cast(pl.Int32).alias("qc"), pl.col("path").alias("file"))
    return schema.conform(rows, schema.PHOTOMETRY, extra=False).with_columns(
        pl.col("flags").fill_null(0), pl.col("flux").fill_null(float("nan")),
        pl.col("flux_err").fill_null(float("nan")))


def run_cell(task: CellTask) -> dict:
    """Fetch and measure one sky cell; write its parts atomically; return its summary.

    Idempotent: rerunning a cell overwrites its parts, so a retried task (a worker that died)
    leaves each row exactly once.
    """
    from .fetch import fetch
    from .photometry import measure

    t0 = _time.perf_counter()
    out = Path(task.output_dir)
    fetched = fetch(task.manifest, cache_dir=str(out), progress=task.progress, **task.fetch_options)
    fetched = schema.conform(fetched, schema.MANIFEST)
    t1 = _time.perf_counter()
    done = fetched.filter(pl.col("status") == "done")
    if done.height:
        # the manifest tells measure() which sources each file serves (and which were clipped),
        # so every done (source, obs, det) pair gets exactly one row
        phot = measure(done, task.catalog, **task.measure_options)
        phot = schema.conform(phot, schema.PHOTOMETRY).with_columns(pl.col("source_id").cast(pl.Utf8))
        planned = done.select("source_id", "obs_id", "detector", pl.col("path").alias("file"))
        phot = phot.join(planned, on=["source_id", "obs_id", "detector", "file"], how="semi")
        phot = phot.unique(subset=["source_id", "obs_id", "detector"], keep="first", maintain_order=True)
    else:
        phot = schema.empty(schema.PHOTOMETRY)
    phot = pl.concat([schema.conform(phot, schema.PHOTOMETRY, extra=False),
                      _missing_rows(fetched, task.observations, phot)], how="vertical_relaxed")
    t2 = _time.perf_counter()
    p_phot, p_man, marker = _part_paths(task.output_dir, task.cell)
    write_parquet(phot, p_phot, schema.PHOTOMETRY)
    write_parquet(fetched, p_man, schema.MANIFEST)
    n_failed = int((fetched.get_column("status") != "done").sum())
    summary = {
        "cell": task.cell, "sources": task.catalog.height, "rows": phot.height,
        "measured": int(phot.get_column("flux").is_not_nan().sum()) if phot.height else 0,
        "failed_transfers": n_failed,
        "bytes": int(fetched.select(pl.col("bytes").fill_null(0).sum()).item() or 0),
        "seconds_fetch": t1 - t0, "seconds_measure": t2 - t1,
        "plan_hash": task.plan_hash, "measure_hash": task.measure_hash,
        "complete": n_failed == 0,
    }
    _atomic_write_json(marker, summary)
    return summary


# ------------------------------------------------------------------------------ the driver

def _catalog_hash(cat: pl.DataFrame) -> str:
    cols = [c for c in ("source_id", "ra", "dec", "pmra", "pmdec", "ref_epoch") if c in cat.columns]
    h = cat.select(cols).hash_rows(seed=0).sort()
    return hashlib.sha256(h.to_numpy().tobytes()).hexdigest()[:16]


def _observations_cached(out: Path, cat: pl.DataFrame, query: dict, archive: Any):
    """observations.parquet if the same catalog and query produced it, else query the archive."""
    from .archive import observations as query_observations

    key = _hash({"catalog": _catalog_hash(cat), **query})
    state_path = out / "parts" / "observations.json"
    obs_path = out / "observations.parquet"
    try:
        if json.loads(state_path.read_text()).get("key") == key and obs_path.exists():
            log.info("reusing %s (same catalog and query)", obs_path)
            return pl.read_parquet(obs_path), True
    except (OSError, ValueError):
        pass
    obs = query_observations(cat, archive=archive, **query)
    write_parquet(schema.conform(obs, schema.OBSERVATIONS), obs_path, schema.OBSERVATIONS)
    _atomic_write_json(state_path, {"key": key})
    return obs, False


def lightcurves(
    catalog: Any,
    cutout_size: str | None = "200px",
    *,
    cutout_center: str | None = None,
    bands: list[str] | None = None,
    time: tuple[float, float] | None = None,
    collection: str = "spherex_qr2",
    access: str = "auto",
    output_dir: str | os.PathLike = "spxframe_out",
    archive: Any = None,
    progress: bool = True,
    aperture_radius: float = 2.0,
    bad_bits: list[int] | None = None,
    max_concurrency: int | None = None,
    storage_options: dict | None = None,
    cell_order: int = DEFAULT_ORDER,
    plots: int = 10,
    client: Any = None,
    _cell_func: Any = None,
) -> pl.DataFrame:
    """Measure every SPHEREx L2 image of every catalog source; write and return the photometry.

    Parameters
    ----------
    catalog : Polars or pandas DataFrame, astropy Table, or a Parquet/CSV path with
        ``source_id``, ``ra``, ``dec`` (deg, ICRS), optionally ``pmra``, ``pmdec`` (mas/yr) and
        ``ref_epoch`` (Julian year). Other columns ride along into the output.
    cutout_size : IRSA size grammar (``"200px"``, ``"3arcmin"``, ``"0.1"`` deg, ``"200,400px"``);
        None measures on full images.
    cutout_center : custom cutout centre (``"ra,dec"`` deg or ``"x,y px"``); default the source.
    bands : detectors to use, e.g. ``["D1", "D2"]``; default all six.
    time : (mjd_start, mjd_end) in MJD (UTC); default all.
    access : ``"auto"`` (cost model), ``"cutout"``, ``"range"`` (cloud byte ranges) or ``"full"``.
    output_dir : folder for the outputs (see module docstring); a rerun resumes it.
    archive : None for IRSA, a base URL, or the object ``spxframe.sim.serve()`` yields.
    aperture_radius : aperture radius in pixels (6.15″ each).
    bad_bits : FLAGS bits to mask (default ``schema.HARD_BAD_BITS``).
    max_concurrency : cap on concurrent transfers per host.
    cell_order : HEALPix order of the work cells (3 → ~7.3° cells; higher for finer resume/Dask units).
    plots : number of sources to plot into ``plots/`` (0 for none).
    client : a ``dask.distributed.Client``: run the cells on the cluster instead of locally.

    Returns
    -------
    polars.DataFrame in ``schema.PHOTOMETRY`` (fluxes in µJy), plus the catalog's own columns.
    """
    from .archive import check_query_options
    from .catalog import normalize_catalog
    from .plan import plan as make_plan
    from .sizes import parse_cutout_size

    t_start = _time.perf_counter()
    timings: dict[str, float] = {}
    # ---- validate everything before any network traffic
    cat = normalize_catalog(catalog)
    size = parse_cutout_size(cutout_size) if cutout_size is not None else None
    if access not in ("auto", "cutout", "range", "full"):
        from .errors import InputError
        raise InputError(f"access={access!r}: expected one of 'auto', 'cutout', 'range', 'full'")
    bands, time, _ = check_query_options(bands, time, collection)  # the archive's own validation
    measure_options = {"aperture_radius": float(aperture_radius)}
    if bad_bits is not None:
        schema.bits_to_mask(bad_bits)  # validates
        measure_options["bad_bits"] = sorted(int(b) for b in bad_bits)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    src_dtype = cat.schema["source_id"]

    # ---- observations (cached per catalog + query)
    t0 = _time.perf_counter()
    query = {"bands": bands, "time": list(time) if time is not None else None, "collection": collection}
    obs, reused = _observations_cached(out, cat, query, archive)
    timings["observations"] = _time.perf_counter() - t0

    # ---- plan (no network)
    t0 = _time.perf_counter()
    pl_ = make_plan(cat, obs, cutout_size=size, cutout_center=cutout_center, access=access, archive=archive)
    manifest = schema.conform(pl_.manifest, schema.MANIFEST)
    plan_hash = _hash({"size": str(size), "center": cutout_center, "access": access})
    measure_hash = _hash(measure_options)
    timings["plan"] = _time.perf_counter() - t0

    # ---- cells
    cells = cell_of(cat.get_column("ra").to_numpy(), cat.get_column("dec").to_numpy(), order=cell_order)
    cat_c = cat.with_columns(pl.Series("_cell", cells), pl.col("source_id").cast(pl.Utf8).alias("_sid"))
    man_c = manifest.join(cat_c.select(pl.col("_sid").alias("source_id"), "_cell"), on="source_id", how="left")
    obs_small = obs.select("obs_id", "detector", "mjd_mid", "band")
    fetch_options = {"max_concurrency": max_concurrency, "storage_options": storage_options}
    tasks, skipped = [], []
    for cell in np.unique(cells).tolist():
        state = cell_state(str(out), cell)
        if state and state.get("complete") and state.get("plan_hash") == plan_hash \
                and state.get("measure_hash") == measure_hash:
            skipped.append(state)
            continue
        tasks.append(CellTask(
            cell=cell, output_dir=str(out),
            catalog=cat_c.filter(pl.col("_cell") == cell).drop("_cell", "_sid"),
            manifest=man_c.filter(pl.col("_cell") == cell).drop("_cell"),
            observations=obs_small, fetch_options=fetch_options, measure_options=measure_options,
            plan_hash=plan_hash, measure_hash=measure_hash))
    log.info("%d cells: %d to run, %d already complete", len(tasks) + len(skipped), len(tasks), len(skipped))

    t0 = _time.perf_counter()
    if client is not None:
        from .distributed import run_cells_dask
        summaries = run_cells_dask(client, tasks, progress=progress, func=_cell_func)
    else:
        summaries = _run_cells_local(tasks, progress=progress)
    timings["fetch_and_measure"] = _time.perf_counter() - t0

    # ---- merge parts into the final tables
    t0 = _time.perf_counter()
    phot = _merge(out, cat, src_dtype, manifest, np.unique(cells).tolist())
    timings["merge"] = _time.perf_counter() - t0

    t0 = _time.perf_counter()
    if plots:
        from .plot import write_plots
        try:
            write_plots(phot, out / "plots", n_sources=plots)
        except Exception as exc:  # plots must never lose a run
            log.warning("plots not written: %s", exc)
    timings["plots"] = _time.perf_counter() - t0
    timings["total"] = _time.perf_counter() - t_start

    _write_run_json(out, locals_=dict(
        catalog_rows=cat.height, cutout_size=None if size is None else str(size),
        cutout_center=cutout_center, bands=bands, time=time, collection=collection, access=access,
        archive=_archive_name(archive), aperture_radius=aperture_radius, bad_bits=bad_bits,
        cell_order=cell_order, dask=client is not None, observations_reused=reused),
        summaries=summaries, skipped=skipped, timings=timings, plan_summary=getattr(pl_, "summary", None),
        phot=phot)
    _write_query_summary(out, obs, cat)
    return phot


def _archive_name(archive: Any) -> str:
    if archive is None or isinstance(archive, str):
        return archive or "irsa"
    return str(getattr(archive, "url", archive))


def _run_cells_local(tasks: list[CellTask], *, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    summaries = []
    if progress and len(tasks) <= 2:  # few big cells: show the transfers themselves
        for t in tasks:
            t.progress = True
        progress = False
    n_rows = sum(t.manifest.height for t in tasks)
    with tqdm(total=n_rows, unit="meas", desc="spxframe", disable=not progress or not tasks) as bar:
        for task in tasks:
            s = run_cell(task)
            summaries.append(s)
            bar.update(task.manifest.height)
            bar.set_postfix(cells=f"{len(summaries)}/{len(tasks)}", MB=f"{sum(x['bytes'] for x in summaries)/1e6:.0f}")
    return summaries


def _merge(out: Path, cat: pl.DataFrame, src_dtype: Any, manifest: pl.DataFrame,
           cells: list[int]) -> pl.DataFrame:
    """Join the parts of ``cells`` into photometry.parquet and manifest.parquet."""
    parts = [_part_paths(str(out), c) for c in cells]
    p_files = [p for p, _, _ in parts if p.exists()]
    m_files = [m for _, m, _ in parts if m.exists()]
    wanted = cat.select(pl.col("source_id").cast(pl.Utf8)).get_column("source_id")
    phot = pl.concat([pl.read_parquet(f) for f in p_files], how="vertical_relaxed") if p_files \
        else schema.empty(schema.PHOTOMETRY)
    phot = phot.filter(pl.col("source_id").is_in(wanted.implode()))
    man = pl.concat([pl.read_parquet(f) for f in m_files], how="vertical_relaxed") if m_files else manifest
    man = man.filter(pl.col("source_id").is_in(wanted.implode()))
    write_parquet(schema.conform(man, schema.MANIFEST).sort("source_id", "obs_id", "detector"),
                  out / "manifest.parquet", schema.MANIFEST)
    extra = [c for c in cat.columns if c not in phot.columns or c == "source_id"]
    phot = phot.with_columns(pl.col("source_id").cast(src_dtype, strict=False)) \
        .join(cat.select(extra), on="source_id", how="left") \
        .sort("source_id", "mjd", "detector")
    write_parquet(phot, out / "photometry.parquet", schema.PHOTOMETRY, row_group_size=65536)
    return phot


def _write_run_json(out: Path, *, locals_: dict, summaries: list[dict], skipped: list[dict],
                    timings: dict, plan_summary: Any, phot: pl.DataFrame) -> None:
    allc = summaries + skipped
    ok = phot.filter(pl.col("flux").is_not_nan()) if phot.height else phot
    run = {
        "versions": _versions(),
        "parameters": locals_,
        "counts": {
            "sources": locals_["catalog_rows"],
            "cells": len(allc), "cells_run": len(summaries), "cells_skipped": len(skipped),
            "measurements": phot.height, "measured": ok.height,
            "failed_transfers": sum(s.get("failed_transfers", 0) for s in summaries),
            "qc": {q.name: int((phot.get_column("qc") & q.value > 0).sum()) for q in schema.QC_BITS}
            if phot.height else {},
        },
        "bytes_transferred_this_run": sum(s.get("bytes", 0) for s in summaries),
        "timings_s": timings,
        "plan": plan_summary.to_dicts() if isinstance(plan_summary, pl.DataFrame)
        else plan_summary if isinstance(plan_summary, (dict, list, str, type(None))) else str(plan_summary),
        "finished": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime()),
    }
    _atomic_write_json(out / "run.json", run)


def _write_query_summary(out: Path, obs: pl.DataFrame, cat: pl.DataFrame) -> None:
    """results/query_summary.json as SPXQuery users know it (sizes of the files on disk)."""
    sizes: dict[str, int] = {b: 0 for b in schema.BANDS}
    for b in schema.BANDS:
        d = out / "data" / b
        if d.is_dir():
            sizes[b] = sum(p.stat().st_size for p in d.glob("*.fits"))
    counts = obs.group_by("band").agg(pl.len()).sort("band") if obs.height else None
    summary = {
        "total_size_gb": sum(sizes.values()) / 1e9,
        "band_sizes": {b: v / 1e9 for b, v in sizes.items()},
        "band_sizes_unit": "GB",
        "observations_per_band": dict(counts.iter_rows()) if counts is not None else {},
        "n_observations": obs.select(pl.col("obs_id").n_unique()).item() if obs.height else 0,
        "n_files": obs.height,
        "time_span_mjd": [float(obs["t_min"].min()), float(obs["t_max"].max())] if obs.height else None,
        "n_sources": cat.height,
    }
    _atomic_write_json(out / "results" / "query_summary.json", summary)


# ------------------------------------------------------------------------------ reading back

def read(output_dir: str | os.PathLike = "spxframe_out", *, table: str = "photometry",
         lazy: bool = False) -> pl.DataFrame | pl.LazyFrame:
    """Read a run's table (``photometry``, ``manifest`` or ``observations``) with Polars."""
    if table not in schema.TABLES:
        from .errors import InputError
        raise InputError(f"table={table!r}: expected one of {list(schema.TABLES)}")
    path = Path(output_dir) / f"{table}.parquet"
    if not path.exists():
        from .errors import InputError
        raise InputError(f"{path} does not exist: is {output_dir!s} the output_dir of a spxframe run?")
    return pl.scan_parquet(path) if lazy else pl.read_parquet(path)
