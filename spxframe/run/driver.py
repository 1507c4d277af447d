"""lightcurves(): observations → plan → fetch → measure, by sky cell, resumable, to Parquet.

Output folder layout (``output_dir``)::

    observations.parquet   the archive's observations of the catalog (schema.OBSERVATIONS)
    manifest.parquet       one row per (source, observation, detector): request, path, status
    photometry.parquet     one row per (source, observation, detector); by sky cell, then source, time
    run.json               versions, parameters, counts, timings per stage, bytes transferred
    results/query_summary.json   SPXQuery-style summary (total_size_gb, band_sizes, ...)
    plots/                 PNG light curves / spectra of the first sources and a run summary
    parts/                 per-cell results (the unit of resume); safe to delete after a run

The fetched files (``data/D1`` … ``data/D6``, ``psf/``) go to ``cache_dir``, by default the
output folder itself. ``output_dir`` may be an fsspec URL (``s3://bucket/run``; options in
``output_options``); the cache must then be a local (or shared POSIX) folder, because photometry
memory-maps the files.

A rerun with the same ``output_dir`` does only what is missing: finished cells are skipped
(when their sources, the query, the cutouts and the cell order are unchanged),
changed photometry options re-measure from the files on disk, failed transfers are retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time as _time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from spxframe import schema, spherex
from spxframe.run.cells import DEFAULT_ORDER, cell_of
from spxframe.run.outputs import merge, part_paths, write_plots, write_query_summary, write_run_json
from spxframe.store import Store, is_url

log = logging.getLogger("spxframe.run.driver")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ the cell task

@dataclass
class CellTask:
    """Everything one sky cell needs; picklable, so it runs locally or on a Dask worker."""

    cell: int
    output_dir: str  # path or fsspec URL of the run's outputs
    catalog: pl.DataFrame  # the cell's sources (normalised catalog)
    observations: pl.DataFrame  # the run's observations (schema.OBSERVATIONS)
    plan_options: dict = field(default_factory=dict)  # cutout_size, cutout_center, access, archive
    fetch_options: dict = field(default_factory=dict)
    measure_options: dict = field(default_factory=dict)
    plan_hash: str = ""
    measure_hash: str = ""
    progress: bool = False  # per-transfer progress bar (local runs with one or two cells)
    cache_dir: str = ""  # local folder of the fetched files (default: output_dir)
    output_options: dict | None = None  # fsspec storage options of output_dir


def cell_state(store: Store, cell: int) -> dict | None:
    """The done-marker of a cell, or None."""
    return store.read_json(part_paths(cell)[2])


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
    """Plan, fetch and measure one sky cell; write its parts atomically; return its summary.

    The cell is planned here, not by the driver, so the driver never holds the whole manifest:
    memory follows the largest cell, not the catalog.

    Idempotent: rerunning a cell overwrites its parts, so a retried task (a worker that died)
    leaves each row exactly once.
    """
    from spxframe.fetcher.engine import fetch
    from spxframe.photometry.forced import measure
    from spxframe.planner.manifest import plan

    tp = _time.perf_counter()
    store = Store(task.output_dir, task.output_options)
    cache_dir = os.path.expanduser(task.cache_dir or task.output_dir)
    cell_plan = plan(task.catalog, task.observations, **task.plan_options)
    t0 = _time.perf_counter()
    fetched = fetch(schema.conform(cell_plan.manifest, schema.MANIFEST), cache_dir=cache_dir,
                    progress=task.progress, **task.fetch_options)
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
    p_phot, p_man, marker = part_paths(task.cell)
    store.write_parquet(p_phot, phot, schema.PHOTOMETRY)
    store.write_parquet(p_man, fetched, schema.MANIFEST)
    n_failed = int((fetched.get_column("status") != "done").sum())
    summary = {
        "cell": task.cell, "sources": task.catalog.height, "rows": phot.height,
        "measured": int(phot.get_column("flux").is_not_nan().sum()) if phot.height else 0,
        "failed_transfers": n_failed,
        "bytes": int(fetched.select(pl.col("bytes").fill_null(0).sum()).item() or 0),
        "seconds_plan": t0 - tp, "seconds_fetch": t1 - t0, "seconds_measure": t2 - t1,
        "plan_hash": task.plan_hash, "measure_hash": task.measure_hash,
        "complete": n_failed == 0, "plan": cell_plan.summary.to_dicts(),
    }
    store.write_json(marker, summary)
    return summary


# ------------------------------------------------------------------------------ the driver

def _catalog_hash(cat: pl.DataFrame) -> str:
    cols = [c for c in ("source_id", "ra", "dec", "pmra", "pmdec", "ref_epoch") if c in cat.columns]
    h = cat.select(cols).hash_rows(seed=0).sort()
    return hashlib.sha256(h.to_numpy().tobytes()).hexdigest()[:16]


def _observations_cached(store: Store, cat: pl.DataFrame, query: dict, archive: Any):
    """observations.parquet if the same catalog and query produced it, else query the archive."""
    from spxframe.archive.query import observations as query_observations

    key = _hash({"catalog": _catalog_hash(cat), **query})
    state = store.read_json("parts/observations.json")
    if state and state.get("key") == key and store.exists("observations.parquet"):
        log.info("reusing %s/observations.parquet (same catalog and query)", store.url)
        return store.read_parquet("observations.parquet"), True
    obs = query_observations(cat, archive=archive, **query)
    store.write_parquet("observations.parquet", schema.conform(obs, schema.OBSERVATIONS), schema.OBSERVATIONS)
    store.write_json("parts/observations.json", {"key": key})
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
    cache_dir: str | os.PathLike | None = None,
    output_options: dict | None = None,
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
    output_dir : folder or fsspec URL for the outputs (see module docstring); a rerun resumes it.
    cache_dir : local folder for the fetched files (default: ``output_dir`` when it is a folder,
        ``~/.cache/spxframe`` when it is a URL; ``~`` is expanded on each worker). On a cluster,
        a folder on each worker or a shared mount.
    output_options : fsspec storage options for a URL ``output_dir`` (credentials, endpoint).
    archive : None for IRSA, a base URL, or the object ``spxframe.sim.serve()`` yields.
    aperture_radius : aperture radius in pixels (6.15″ each).
    bad_bits : FLAGS bits to mask (default ``spherex.HARD_BAD_BITS``).
    max_concurrency : cap on concurrent transfers per host.
    cell_order : HEALPix order of the work cells (3 → ~7.3° cells; higher for finer resume/Dask units).
    plots : number of sources to plot into ``plots/`` (0 for none).
    client : a ``dask.distributed.Client``: run the cells on the cluster instead of locally.

    Returns
    -------
    polars.DataFrame in ``schema.PHOTOMETRY`` (fluxes in µJy), plus the catalog's own columns,
    ordered by sky cell, then source, then time (each source's rows are contiguous).
    """
    from spxframe.archive.query import check_query_options, resolve_archive
    from spxframe.catalog import normalize_catalog
    from spxframe.sizes import parse_cutout_center, parse_cutout_size

    t_start = _time.perf_counter()
    timings: dict[str, float] = {}
    # ---- validate everything before any network traffic
    cat = normalize_catalog(catalog)
    size = parse_cutout_size(cutout_size) if cutout_size is not None else None
    if cutout_center is not None:
        parse_cutout_center(cutout_center)  # validates
    if access not in ("auto", "cutout", "range", "full"):
        from spxframe.errors import InputError
        raise InputError(f"access={access!r}: expected one of 'auto', 'cutout', 'range', 'full'")
    bands, time, _ = check_query_options(bands, time, collection)  # the archive's own validation
    measure_options = {"aperture_radius": float(aperture_radius)}
    if bad_bits is not None:
        spherex.bits_to_mask(bad_bits)  # validates
        measure_options["bad_bits"] = sorted(int(b) for b in bad_bits)
    if cache_dir is not None:
        cache_dir = str(cache_dir).removeprefix("file://")
        if is_url(cache_dir):
            from spxframe.errors import InputError
            raise InputError(f"cache_dir={cache_dir!r}: must be a local (or mounted) folder; "
                             "photometry memory-maps the fetched files")
    store = Store(output_dir, output_options)
    if cache_dir is None:
        cache_dir = "~/.cache/spxframe" if is_url(output_dir) else store.root
    src_dtype = cat.schema["source_id"]

    # ---- observations (cached per catalog + query)
    t0 = _time.perf_counter()
    query = {"bands": bands, "time": list(time) if time is not None else None, "collection": collection}
    obs, reused = _observations_cached(store, cat, query, archive)
    timings["observations"] = _time.perf_counter() - t0

    # ---- cells: each is planned, fetched and measured as one unit (locally or on Dask)
    plan_options = {"cutout_size": size, "cutout_center": cutout_center, "access": access,
                    "archive": resolve_archive(archive)}
    plan_hash = _hash({"size": str(size), "center": cutout_center, "access": access})
    measure_hash = _hash(measure_options)
    cells = cell_of(cat.get_column("ra").to_numpy(), cat.get_column("dec").to_numpy(), order=cell_order)
    cat_c = cat.with_columns(pl.Series("_cell", cells))
    if access == "auto" and len(np.unique(cells)) > 1:
        # decide each image's access once for the whole catalog, so that cells sharing an image
        # fetch it the same way (one whole file, not a whole file here and range reads there);
        # only this per-image decision is kept, not the catalog's manifest
        from spxframe.planner.manifest import plan as make_plan
        whole = make_plan(cat, obs, **plan_options).manifest
        plan_options["image_access"] = whole.filter(pl.col("status") == "planned") \
            .group_by("obs_id", "detector").agg(pl.first("access"))
        del whole
    fetch_options = {"max_concurrency": max_concurrency, "storage_options": storage_options}
    tasks, skipped = [], []
    for cell in np.unique(cells).tolist():
        ccat = cat_c.filter(pl.col("_cell") == cell).drop("_cell")
        # a cell is done only for the same sources, query, cutouts and cell order
        cell_hash = _hash({"plan": plan_hash, "query": query, "order": cell_order, "cat": _catalog_hash(ccat)})
        state = cell_state(store, cell)
        if state and state.get("complete") and state.get("plan_hash") == cell_hash \
                and state.get("measure_hash") == measure_hash:
            skipped.append(state)
            continue
        tasks.append(CellTask(
            cell=cell, output_dir=store.url, cache_dir=cache_dir, output_options=output_options,
            catalog=ccat, observations=obs, plan_options=plan_options,
            fetch_options=fetch_options, measure_options=measure_options,
            plan_hash=cell_hash, measure_hash=measure_hash))
    log.info("%d cells: %d to run, %d already complete", len(tasks) + len(skipped), len(tasks), len(skipped))

    t0 = _time.perf_counter()
    if client is not None:
        from spxframe.run.cluster import run_cells_dask
        summaries = run_cells_dask(client, tasks, progress=progress, func=_cell_func)
    else:
        summaries = _run_cells_local(tasks, progress=progress)
    timings["plan_fetch_measure"] = _time.perf_counter() - t0
    for k in ("plan", "fetch", "measure"):
        timings[f"cells_{k}_s"] = sum(x.get(f"seconds_{k}", 0.0) for x in summaries)

    # ---- merge parts into the final tables (streaming, one cell at a time)
    t0 = _time.perf_counter()
    counts, sizes = merge(store, cat, src_dtype, np.unique(cells).tolist())
    phot = store.read_parquet("photometry.parquet")
    timings["merge"] = _time.perf_counter() - t0

    t0 = _time.perf_counter()
    if plots:
        write_plots(store, phot, plots)
    timings["plots"] = _time.perf_counter() - t0
    timings["total"] = _time.perf_counter() - t_start

    write_run_json(store, parameters=dict(
        catalog_rows=cat.height, cutout_size=None if size is None else str(size),
        cutout_center=cutout_center, bands=bands, time=time, collection=collection, access=access,
        archive=_archive_name(archive), aperture_radius=aperture_radius, bad_bits=bad_bits,
        cell_order=cell_order, dask=client is not None, observations_reused=reused, cache_dir=cache_dir),
        summaries=summaries, skipped=skipped, timings=timings,
        counts=counts)
    write_query_summary(store, sizes, obs, cat)
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
    n_src = sum(t.catalog.height for t in tasks)
    with tqdm(total=n_src, unit="src", desc="spxframe", disable=not progress or not tasks) as bar:
        for task in tasks:
            s = run_cell(task)
            summaries.append(s)
            bar.update(task.catalog.height)
            bar.set_postfix(cells=f"{len(summaries)}/{len(tasks)}", MB=f"{sum(x['bytes'] for x in summaries)/1e6:.0f}")
    return summaries


# ------------------------------------------------------------------------------ reading back

def read(output_dir: str | os.PathLike = "spxframe_out", *, table: str = "photometry",
         lazy: bool = False, storage_options: dict | None = None) -> pl.DataFrame | pl.LazyFrame:
    """Read a run's table (``photometry``, ``manifest`` or ``observations``) with Polars.

    ``output_dir`` may be an fsspec URL (``storage_options``: fsspec options, as
    ``lightcurves``'s ``output_options``); ``lazy`` returns a LazyFrame that reads only what a
    query needs (Polars for local files, a pyarrow dataset over fsspec for URLs).
    """
    from spxframe.errors import InputError

    if table not in schema.TABLES:
        raise InputError(f"table={table!r}: expected one of {list(schema.TABLES)}")
    store = Store(output_dir, storage_options, create=False)
    rel = f"{table}.parquet"
    if not store.exists(rel):
        raise InputError(f"{store.path(rel)} does not exist: is {output_dir!s} the output_dir of a spxframe run?")
    if lazy:
        if store.local:
            return pl.scan_parquet(store.path(rel))
        import pyarrow.dataset as ds
        return pl.scan_pyarrow_dataset(ds.dataset(store.path(rel), filesystem=store.fs, format="parquet"))
    return store.read_parquet(rel)
