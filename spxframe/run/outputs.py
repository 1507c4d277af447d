"""The run's final tables and records, written from the per-cell parts.

The merge streams: it reads one cell's part at a time and appends it to ``photometry.parquet``
as row groups, so its memory is that of the largest cell, not of the run. The file is ordered by
sky cell, then source, then time, so each source's rows are contiguous (one cell holds each
source whole) and a source's light curve is one or two row groups.
"""

from __future__ import annotations

import logging
import platform
import time as _time
from importlib import metadata
from typing import Any

import polars as pl

from spxframe import schema, spherex
from spxframe._version import __version__
from spxframe.store import Store, with_units

log = logging.getLogger("spxframe.run.driver")

_DEP_NAMES = ("numpy", "polars", "pyarrow", "numba", "astropy", "pyvo", "requests", "fsspec")
ROW_GROUP = 65536


def part_paths(cell: int) -> tuple[str, str, str]:
    """(photometry part, manifest part, done marker) of ``cell``, relative to the output root."""
    return (f"parts/photometry/cell={cell}/part.parquet", f"parts/manifest/cell={cell}/part.parquet",
            f"parts/cells/{cell}.json")


class _Appender:
    """Appends frames to a ParquetWriter in row groups of ~``ROW_GROUP`` rows."""

    def __init__(self, writer: Any, arrow_schema: Any) -> None:
        self.w, self.schema, self.buf, self.n = writer, arrow_schema, [], 0

    def add(self, df: pl.DataFrame) -> None:
        if df.height:
            self.buf.append(df)
            self.n += df.height
        if self.n >= ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            tab = pl.concat(self.buf, how="vertical_relaxed").to_arrow()
            self.w.write_table(tab.select(self.schema.names).cast(self.schema), row_group_size=ROW_GROUP)
        self.buf, self.n = [], 0


def merge(store: Store, cat: pl.DataFrame, src_dtype: Any, cells: list[int]) -> tuple[dict, dict]:
    """Write photometry.parquet and manifest.parquet from the parts of ``cells``, one cell at a time.

    Returns (counts, bytes of this run's fetched files per band). Parts are buffered to
    ~``ROW_GROUP`` rows, so many small cells still make few row groups. The catalog's own columns
    are joined on; only sources of ``cat`` are kept (a reused output folder may hold parts of
    other sources).
    """
    wanted = cat.get_column("source_id").implode()
    extra = [c for c in cat.columns if c not in schema.PHOTOMETRY.names or c == "source_id"]
    catx = cat.select(extra)

    def mine(part: pl.DataFrame) -> pl.DataFrame:
        # parts written by 0.1 hold text ids: read every part in the catalog's dtype
        part = part.with_columns(pl.col("source_id").cast(src_dtype, strict=False))
        return part.filter(pl.col("source_id").is_in(wanted))

    def finish(part: pl.DataFrame) -> pl.DataFrame:
        part = schema.conform(part, schema.PHOTOMETRY, extra=False)
        return part.join(catx, on="source_id", how="left").sort("source_id", "mjd", "detector")

    def finish_man(part: pl.DataFrame) -> pl.DataFrame:
        return schema.conform(part, schema.MANIFEST).sort("source_id", "obs_id", "detector")

    p_schema = with_units(finish(schema.empty(schema.PHOTOMETRY, src_dtype)).to_arrow(), schema.PHOTOMETRY).schema
    m_schema = with_units(finish_man(schema.empty(schema.MANIFEST, src_dtype)).to_arrow(), schema.MANIFEST).schema
    # astropy reads the units back from its table-meta YAML; text lengths spare it a warning per column
    p_len = _string_lengths(store, [part_paths(c)[0] for c in cells], catx)
    m_len = _string_lengths(store, [part_paths(c)[1] for c in cells], None)
    p_schema = p_schema.with_metadata({**p_schema.metadata, **schema.astropy_meta(p_schema, schema.PHOTOMETRY, p_len)})
    m_schema = m_schema.with_metadata({**m_schema.metadata, **schema.astropy_meta(m_schema, schema.MANIFEST, m_len)})
    counts = {"measurements": 0, "measured": 0, "qc": {q.name: 0 for q in schema.QC_BITS}}
    sizes: dict[str, int] = {b: 0 for b in spherex.BANDS}
    seen: set[str] = set()
    with store.parquet_writer("photometry.parquet", p_schema) as pw, \
            store.parquet_writer("manifest.parquet", m_schema) as mw:
        phot_out, man_out = _Appender(pw, p_schema), _Appender(mw, m_schema)
        for cell in cells:
            p_rel, m_rel, _ = part_paths(cell)
            if store.exists(m_rel):
                man = finish_man(mine(store.read_parquet(m_rel)))
                man_out.add(man)
                _add_sizes(sizes, seen, man)
            if not store.exists(p_rel):
                continue
            part = finish(mine(store.read_parquet(p_rel)))
            counts["measurements"] += part.height
            counts["measured"] += int(part.get_column("flux").is_not_nan().sum())
            qc = part.get_column("qc").fill_null(0)
            for q in schema.QC_BITS:
                counts["qc"][q.name] += int((qc & q.value > 0).sum())
            phot_out.add(part)
        phot_out.flush()
        man_out.flush()
    return counts, sizes


def _string_lengths(store: Store, rels: list[str], extra: pl.DataFrame | None) -> dict[str, int]:
    """Longest value of each text column over the parts ``rels`` (and the catalog columns ``extra``)."""
    import pyarrow.parquet as pq

    out = {c: int(extra[c].str.len_chars().max() or 0) for c, t in extra.schema.items() if t == pl.Utf8} \
        if extra is not None else {}
    for rel in rels:
        if not store.exists(rel):
            continue
        with store.fs.open(store.path(rel), "rb") as f:
            names = [fld.name for fld in pq.read_schema(f) if str(fld.type) in ("string", "large_string")]
            f.seek(0)
            lengths = schema.string_lengths(pq.read_table(f, columns=names))
        for c, n in lengths.items():
            out[c] = max(out.get(c, 0), n)
    return out


def _add_sizes(sizes: dict[str, int], seen: set[str], man: pl.DataFrame) -> None:
    """Add the sizes of ``man``'s fetched files not seen before: from the cache when the driver
    sees it, else (per-worker caches on a cluster) the bytes the transfer reported."""
    import os

    done = man.filter((pl.col("status") == "done") & pl.col("path").is_not_null()) \
        .unique("path", keep="first").select("band", "path", "bytes")
    for band, path, nbytes in done.iter_rows():
        if path in seen or band not in sizes:
            continue
        seen.add(path)
        try:
            sizes[band] += os.path.getsize(path)
        except OSError:
            sizes[band] += int(nbytes or 0)


def versions() -> dict[str, str]:
    out = {"spxframe": __version__, "python": platform.python_version()}
    for n in _DEP_NAMES:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


def write_dry_run_json(store: Store, *, parameters: dict, expected: dict, timings: dict) -> None:
    """run.json of a dry run: versions, parameters and what the run would cost (``expected``:
    :func:`spxframe.run.preview.totals`); nothing was fetched or measured."""
    store.write_json("run.json", {
        "versions": versions(), "parameters": parameters, "dry_run": True, "expected": expected,
        "bytes_transferred_this_run": 0, "timings_s": timings,
        "finished": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime())})


def write_run_json(store: Store, *, parameters: dict, summaries: list[dict], skipped: list[dict],
                   timings: dict, counts: dict, plan: list[dict], error_scales: list[dict] | None = None,
                   calibration: list[dict] | None = None, expected: dict | None = None) -> None:
    """run.json: versions, parameters, counts, timings per stage, bytes transferred (calibration
    products included), the calibration products used (release, family, token per detector) and
    the plan's prediction (``expected``) beside what happened."""
    allc = summaries + skipped
    run = {
        "versions": versions(),
        "parameters": parameters,
        "expected": expected or {},
        "counts": {
            "sources": parameters["catalog_rows"],
            "cells": len(allc), "cells_run": len(summaries), "cells_skipped": len(skipped),
            "failed_transfers": sum(s.get("failed_transfers", 0) for s in summaries),
            "cloud_fallback_rows": sum(s.get("cloud_fallback_rows", 0) for s in summaries),
            **counts,
        },
        "bytes_transferred_this_run": sum(s.get("bytes", 0) for s in summaries)
        + sum(c.get("bytes", 0) for c in calibration or []),
        "calibration": calibration or [],
        "timings_s": timings,
        "plan": plan,
        "error_scales": error_scales or [],
        "finished": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime()),
    }
    store.write_json("run.json", run)


def write_science(store: Store, phot: pl.DataFrame) -> list[dict]:
    """spectra.parquet, variability.parquet and error_scales.parquet from the run's photometry;
    returns the error scales (for run.json). A failure is logged, never loses the run."""
    from spxframe.science import products

    try:
        res = products(phot)
    except Exception as exc:  # noqa: BLE001 - the photometry is written; the science is extra
        log.warning("spectra/variability not computed: %s", exc)
        return []
    for name, table in (("spectra", schema.SPECTRA), ("variability", schema.VARIABILITY),
                        ("error_scales", schema.ERROR_SCALES)):
        store.write_parquet(f"{name}.parquet", res[name], table)
    return res["error_scales"].to_dicts()


def write_query_summary(store: Store, sizes: dict[str, int], obs: pl.DataFrame, cat: pl.DataFrame) -> None:
    """results/query_summary.json as SPXQuery users know it; ``sizes``: bytes per band of this
    run's fetched files (from :func:`merge`)."""
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
    store.write_json("results/query_summary.json", summary)


def write_plots(store: Store, phot: pl.DataFrame, n_sources: int) -> None:
    """PNG plots into ``plots/`` of the store (drawn locally, then copied for remote stores)."""
    import tempfile

    from spxframe.plot import write_plots as draw

    try:
        if store.local:
            draw(phot, store.path("plots"), n_sources=n_sources)
        else:
            with tempfile.TemporaryDirectory(prefix="spxframe-plots-") as d:
                draw(phot, d, n_sources=n_sources)
                store.put_dir(d, "plots")
    except Exception as exc:  # plots must never lose a run
        log.warning("plots not written: %s", exc)
