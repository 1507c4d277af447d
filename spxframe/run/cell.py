"""One sky cell's work unit: fetch and measure its slice of the run's plan, write its parts.

A :class:`CellTask` is picklable, so the same :func:`run_cell` runs locally or on a Dask worker.
The run plans the whole catalog once (:func:`spxframe.plan`); each task carries only its cell's
manifest rows and the observations those rows refer to.
"""

from __future__ import annotations

import time as _time
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from spxframe import schema
from spxframe.fetcher import CacheDir, fetch
from spxframe.fetcher.http import request_seconds
from spxframe.photometry import measure
from spxframe.run.outputs import part_paths
from spxframe.store import Store

#: version of the parts/ layout and of the cell done-markers; a marker of another version is
#: not trusted (its cell is measured again from the cached files, nothing is refetched)
PARTS_VERSION = 2


@dataclass
class CellTask:
    """Everything one sky cell needs; picklable, so it runs locally or on a Dask worker."""

    cell: int
    output_dir: str  #: path or fsspec URL of the run's outputs
    catalog: pl.DataFrame  #: the cell's sources (normalised catalog)
    manifest: pl.DataFrame  #: the cell's rows of the run's plan (schema.MANIFEST)
    observations: pl.DataFrame  #: the observations the cell's rows refer to (schema.OBSERVATIONS)
    cache: CacheDir  #: the run's cache of fetched files (picklable: re-resolved on a worker)
    fetch_options: dict = field(default_factory=dict)
    measure_options: dict = field(default_factory=dict)
    plan_hash: str = ""
    measure_hash: str = ""
    progress: Any = False  #: the run's fetch bar (local runs), or a bool
    output_options: dict | None = None  #: fsspec storage options of output_dir
    plan_summary: list = field(default_factory=list)  #: the cell's rows of the plan summary


def cell_state(store: Store, cell: int) -> dict | None:
    """The done-marker of a cell written by this version of the parts layout, or None."""
    state = store.read_json(part_paths(cell)[2])
    if state is not None and state.get("parts_version") != PARTS_VERSION:
        return None
    return state


def _missing_rows(manifest: pl.DataFrame, observations: pl.DataFrame, phot: pl.DataFrame) -> pl.DataFrame:
    """NaN rows (with a qc bit) for manifest rows that produced no measurement."""
    id_dtype = manifest.schema["source_id"]
    m = manifest
    if phot.height:
        m = m.join(phot.select("source_id", "obs_id", "detector"), on=["source_id", "obs_id", "detector"], how="anti")
    if m.height == 0:
        return schema.empty(schema.PHOTOMETRY, id_dtype)
    qc = pl.when(pl.col("status") == "done").then(pl.lit(schema.QC["OFF_FILE"])) \
        .otherwise(pl.lit(schema.QC["FETCH_FAILED"]))
    rows = m.join(observations.select("obs_id", "detector", "mjd_mid"), on=["obs_id", "detector"], how="left") \
        .select("source_id", "obs_id", "detector", "band", pl.col("mjd_mid").alias("mjd"),
                qc.cast(pl.Int32).alias("qc"), pl.col("path").alias("file"))
    return schema.conform(rows, schema.PHOTOMETRY, extra=False).with_columns(
        pl.col("flags").fill_null(0), pl.col("flux").fill_null(float("nan")),
        pl.col("flux_err").fill_null(float("nan")))


def _cloud_fallbacks(planned: pl.DataFrame, fetched: pl.DataFrame) -> int:
    """Rows planned from the cloud copy (byte ranges, or a whole cloud object) that came from IBE
    because the object was not in the bucket yet (the fetcher's fallback)."""
    def from_cloud(m: pl.DataFrame) -> int:
        if m.height == 0:
            return 0
        return int(((m["access"] == "range") | ((m["access"] == "full") & ~m["url"].str.contains("/ibe/"))).sum())
    return max(from_cloud(planned) - from_cloud(fetched), 0)


def _measure_done(fetched: pl.DataFrame, task: CellTask) -> pl.DataFrame:
    """Photometry of the fetched rows: exactly one row per done (source, obs, detector)."""
    id_dtype = fetched.schema["source_id"]
    done = fetched.filter(pl.col("status") == "done")
    if not done.height:
        return schema.empty(schema.PHOTOMETRY, id_dtype)
    # the manifest tells measure() which sources each file serves (and which were clipped)
    phot = measure(done, task.catalog, cache_dir=task.cache, **task.measure_options)
    phot = schema.conform(phot, schema.PHOTOMETRY).with_columns(pl.col("source_id").cast(id_dtype))
    planned = done.select("source_id", "obs_id", "detector", pl.col("path").alias("file"))
    phot = phot.join(planned, on=["source_id", "obs_id", "detector", "file"], how="semi")
    return phot.unique(subset=["source_id", "obs_id", "detector"], keep="first", maintain_order=True)


def _with_release(phot: pl.DataFrame, observations: pl.DataFrame) -> pl.DataFrame:
    """Each row's release from the observations table (a row's release comes from its collection)."""
    if "release" not in observations.columns or not phot.height:
        return phot
    rel = observations.select("obs_id", pl.col("detector").cast(phot.schema["detector"]), "release") \
        .unique(["obs_id", "detector"], keep="first")
    return phot.drop("release").join(rel, on=["obs_id", "detector"], how="left").select(phot.columns)


def run_cell(task: CellTask) -> dict:
    """Fetch and measure one sky cell; write its parts atomically; return its summary.

    Idempotent: rerunning a cell overwrites its parts, so a retried task (a worker that died)
    leaves each row exactly once.
    """
    store = Store(task.output_dir, task.output_options)
    t0 = _time.perf_counter()
    fetched = fetch(schema.conform(task.manifest, schema.MANIFEST), cache_dir=task.cache,
                    progress=task.progress, **task.fetch_options)
    fetched = schema.conform(fetched, schema.MANIFEST)
    t1 = _time.perf_counter()
    phot = _measure_done(fetched, task)
    phot = pl.concat([schema.conform(phot, schema.PHOTOMETRY, extra=False),
                      _missing_rows(fetched, task.observations, phot)], how="vertical_relaxed")
    phot = _with_release(phot, task.observations)
    t2 = _time.perf_counter()
    p_phot, p_man, marker = part_paths(task.cell)
    store.write_parquet(p_phot, phot, schema.PHOTOMETRY)
    store.write_parquet(p_man, fetched, schema.MANIFEST)
    n_failed = int((fetched.get_column("status") != "done").sum())
    summary = {
        "cell": task.cell, "sources": task.catalog.height, "rows": phot.height,
        "measured": int(phot.get_column("flux").is_not_nan().sum()) if phot.height else 0,
        "failed_transfers": n_failed, "cloud_fallback_rows": _cloud_fallbacks(task.manifest, fetched),
        "bytes": int(fetched.select(pl.col("bytes").fill_null(0).sum()).item() or 0),
        "seconds_fetch": t1 - t0, "seconds_measure": t2 - t1, "request_s": request_seconds(),
        "plan_hash": task.plan_hash, "measure_hash": task.measure_hash,
        "complete": n_failed == 0, "plan": task.plan_summary, "parts_version": PARTS_VERSION,
    }
    store.write_json(marker, summary)
    return summary
