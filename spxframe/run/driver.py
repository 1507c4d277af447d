"""lightcurves(): observations → plan → fetch → measure, by sky cell, resumable, to Parquet.

Output folder layout (``output_dir``)::

    observations.parquet   the archive's observations of the catalog (schema.OBSERVATIONS)
    manifest.parquet       one row per (source, observation, detector): request, path, status
    photometry.parquet     one row per (source, observation, detector); by sky cell, then source, time
    spectra.parquet        one row per (source, channel): the mean spectrum (spxframe.spectra)
    variability.parquet    one row per source: variability about its own spectrum (spxframe.variability)
    error_scales.parquet   the run's empirical error scale per detector
    run.json               versions, parameters, counts, timings per stage, the plan, bytes transferred
    results/query_summary.json   SPXQuery-style summary (total_size_gb, band_sizes, ...)
    plots/                 PNG light curves / spectra of the first sources and a run summary
    parts/                 per-cell results (the unit of resume); safe to delete after a run

The catalog is planned once (:func:`spxframe.plan`); each sky cell (:mod:`spxframe.run.cells`)
takes its slice of the plan and is fetched and measured as one unit, locally or on Dask
(:mod:`spxframe.run.cluster`). The fetched files (``data/D1`` … ``data/D6``, ``psf/``) go to
``cache_dir``, by default the output folder itself. ``output_dir`` may be an fsspec URL
(``s3://bucket/run``; options in ``output_options``); the cache must then be a local (or shared
POSIX) folder, because photometry memory-maps the files.

A rerun with the same ``output_dir`` does only what is missing: finished cells are skipped
(when their sources, the query, the cutouts and the cell order are unchanged), changed
photometry options re-measure from the files on disk, failed transfers are retried. Parts
written by an earlier version of the parts layout are measured again from the cached files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time as _time
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from spxframe import schema, spherex
from spxframe.archive import check_query_options, resolve_archive
from spxframe.archive import observations as query_observations
from spxframe.catalog import normalize_catalog
from spxframe.errors import InputError
from spxframe.fetcher import CacheDir
from spxframe.fetcher.calib import estimate_products, fetch_products
from spxframe.fits import flagbits
from spxframe.planner import plan as make_plan
from spxframe.planner.cost import load_link, record_link
from spxframe.planner.manifest import Plan, summarize
from spxframe.progress import bar as progress_bar
from spxframe.run import preview
from spxframe.run.cell import CellTask, cell_state, run_cell
from spxframe.run.cells import DEFAULT_ORDER, cell_of
from spxframe.run.cluster import run_cells_dask
from spxframe.run.outputs import (
    merge,
    write_dry_run_json,
    write_plots,
    write_query_summary,
    write_run_json,
    write_science,
)
from spxframe.sizes import CutoutSize, parse_cutout_center, parse_cutout_size
from spxframe.store import Store, is_url

log = logging.getLogger("spxframe.run")

ACCESS = ("auto", "cutout", "range", "full")
DEFAULT_CACHE = "~/.cache/spxframe"  #: cache_dir when output_dir is a URL
OBSERVATIONS_MAX_AGE_S = 86400.0  #: a cached observations table older than this is queried again
MAX_APERTURE_PX = 5.0  #: the aperture must fit inside the background annulus (5-9 px)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _catalog_hash(cat: pl.DataFrame) -> str:
    cols = [c for c in ("source_id", "ra", "dec", "pmra", "pmdec", "ref_epoch") if c in cat.columns]
    h = cat.select(cols).hash_rows(seed=0).sort()
    return hashlib.sha256(h.to_numpy().tobytes()).hexdigest()[:16]


def _rows_hash(manifest: pl.DataFrame) -> str:
    """The planned (source, observation, detector) rows; not how they are fetched, which follows
    the measured link and may change between runs without making a finished cell stale."""
    h = manifest.select("obs_id", "detector", pl.col("source_id").cast(pl.Utf8)).hash_rows(seed=0).sort()
    return hashlib.sha256(h.to_numpy().tobytes()).hexdigest()[:16]


@dataclass
class RunOptions:
    """A run's options, validated before any network traffic."""

    size: CutoutSize | None
    cutout_center: str | None
    access: str
    query: dict  #: bands, time, collection for the observations query
    measure_options: dict
    cache: CacheDir  #: made once per run and handed to every cell
    store: Store

    @property
    def plan_hash(self) -> str:
        return _hash({"size": str(self.size), "center": self.cutout_center, "access": self.access})


def _grammar(option: str, parse, value):
    """``parse(value)``, its ValueError re-raised as an :class:`InputError` naming ``option``."""
    try:
        return parse(value)
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(f"{option}={value!r}: {exc}") from None


def _check_numbers(aperture_radius, max_concurrency, cell_order, plots) -> None:
    """The numeric options: finite, in range, of the right type."""
    r = aperture_radius
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < float(r) <= MAX_APERTURE_PX:
        raise InputError(f"aperture_radius={r!r}: expected a number of pixels in (0, {MAX_APERTURE_PX}] "
                         f"(inside the background annulus)")
    if max_concurrency is not None and (isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int)
                                        or max_concurrency < 1):
        raise InputError(f"max_concurrency={max_concurrency!r}: expected a positive integer or None")
    if isinstance(cell_order, bool) or not isinstance(cell_order, int) or not 0 <= cell_order <= 29:
        raise InputError(f"cell_order={cell_order!r}: expected an integer HEALPix order in 0..29")
    if isinstance(plots, bool) or not isinstance(plots, int) or plots < 0:
        raise InputError(f"plots={plots!r}: expected a number of sources >= 0")


def _validate(cutout_size, cutout_center, access, bands, time, collection, releases, aperture_radius, bad_bits,
              cache_dir, output_dir, output_options) -> RunOptions:
    """Check every option (raising :class:`InputError` naming it) and resolve the defaults."""
    size = _grammar("cutout_size", parse_cutout_size, cutout_size) if cutout_size is not None else None
    if cutout_center is not None:
        _grammar("cutout_center", parse_cutout_center, cutout_center)
    if access not in ACCESS:
        raise InputError(f"access={access!r}: expected one of {', '.join(map(repr, ACCESS))}")
    bands, time, _ = check_query_options(bands, time, collection, releases)  # the archive's own validation
    measure_options: dict[str, Any] = {"aperture_radius": float(aperture_radius)}
    if bad_bits is not None:
        items = bad_bits.replace(";", ",").split(",") if isinstance(bad_bits, str) else list(bad_bits)
        _grammar("bad_bits", flagbits.bad_bits, items)  # numbers or names (e.g. "HOT", "GHOST")
        measure_options["bad_bits"] = sorted({str(b).strip().upper() for b in items if str(b).strip()})
    if not is_url(output_dir) and os.path.isfile(os.path.expanduser(str(output_dir))):
        raise InputError(f"output_dir={str(output_dir)!r} is a file; expected a folder (or an fsspec URL)")
    if cache_dir is None:
        cache = CacheDir(DEFAULT_CACHE if is_url(output_dir) else os.path.expanduser(str(output_dir)))
    else:  # refuses URLs: photometry memory-maps the fetched files
        cache = CacheDir(cache_dir)
        if os.path.isfile(cache.root):
            raise InputError(f"cache_dir={str(cache_dir)!r} is a file; expected a folder")
    store = Store(output_dir, output_options)
    if isinstance(releases, str):
        releases = [releases]
    query = {"bands": bands, "time": list(time) if time is not None else None, "collection": collection,
             "releases": None if releases is None else sorted(str(r).lower() for r in releases)}
    return RunOptions(size, cutout_center, access, query, measure_options, cache, store)


def _observations_cached(store: Store, cat: pl.DataFrame, query: dict, archive: Any, *, refresh: bool = False,
                         write: bool = True):
    """observations.parquet if the same catalog and query produced it less than
    :data:`OBSERVATIONS_MAX_AGE_S` ago (and ``refresh`` is False), else query the archive: the
    archive adds data weekly, so a rerun a day later sees the new images. ``write`` False (a dry
    run) leaves the output folder as it was."""
    # releases=None means this version's default releases: a version that reads more sees more
    key = _hash({"catalog": _catalog_hash(cat), **query, "default_releases": list(spherex.DEFAULT_RELEASES)})
    state = store.read_json("parts/observations.json")
    fresh = state and _time.time() - float(state.get("queried_at", 0)) < OBSERVATIONS_MAX_AGE_S
    if not refresh and fresh and state.get("key") == key and store.exists("observations.parquet"):
        log.info("reusing %s/observations.parquet (same catalog and query, queried %.1f h ago)", store.url,
                 (_time.time() - float(state["queried_at"])) / 3600)
        return store.read_parquet("observations.parquet"), True, {"reused": True, **state.get("query", {})}
    report: dict = {}  # how the query went (upload or regions, a refused upload): for run.json
    obs = query_observations(cat, archive=archive, report=report, **query)
    if not write:
        return obs, False, report
    store.write_parquet("observations.parquet", schema.conform(obs, schema.OBSERVATIONS), schema.OBSERVATIONS)
    store.write_json("parts/observations.json", {"key": key, "queried_at": _time.time(), "query": report})
    return obs, False, report


def _cell_tasks(cat: pl.DataFrame, obs: pl.DataFrame, manifest: pl.DataFrame, opts: RunOptions, *,
                cell_order: int, fetch_options: dict, output_options: dict | None):
    """One :class:`CellTask` per sky cell not already complete; and the done-markers of the rest."""
    cells = cell_of(cat.get_column("ra").to_numpy(), cat.get_column("dec").to_numpy(), order=cell_order)
    cat_c = cat.with_columns(pl.Series("_cell", cells))
    man_c = manifest.join(cat_c.select("source_id", "_cell"), on="source_id", how="left")
    by_cell = man_c.partition_by("_cell", as_dict=True, include_key=False) if man_c.height else {}
    empty_man = man_c.clear().drop("_cell")
    measure_hash = _hash(opts.measure_options)
    tasks, skipped = [], []
    for (cell,), ccat in cat_c.partition_by("_cell", as_dict=True, maintain_order=True).items():
        ccat = ccat.drop("_cell")
        cman = by_cell.get((cell,), empty_man)  # one pass over the manifest, not one per cell
        # a cell is done only for the same sources, query, cutouts, cell order and planned rows
        # (new observations of the archive's weekly additions make new rows)
        cell_hash = _hash({"plan": opts.plan_hash, "query": opts.query, "order": cell_order,
                           "cat": _catalog_hash(ccat), "rows": _rows_hash(cman)})
        state = cell_state(opts.store, cell)
        if state and state.get("complete") and state.get("plan_hash") == cell_hash \
                and state.get("measure_hash") == measure_hash:
            skipped.append(state)
            continue
        cobs = obs.join(cman.select("obs_id", "detector").unique(), on=["obs_id", "detector"], how="semi")
        tasks.append(CellTask(
            cell=cell, output_dir=opts.store.url, catalog=ccat, manifest=cman, observations=cobs,
            cache=opts.cache, output_options=output_options, fetch_options=fetch_options,
            measure_options=opts.measure_options, plan_hash=cell_hash, measure_hash=measure_hash))
    log.info("%d cells: %d to run, %d already complete", len(tasks) + len(skipped), len(tasks), len(skipped))
    return sorted(tasks, key=lambda t: t.cell), skipped, np.unique(cells).tolist()


def lightcurves(
    catalog: Any,
    cutout_size: str | None = "200px",
    *,
    cutout_center: str | None = None,
    bands: list[str] | None = None,
    time: tuple[float, float] | None = None,
    releases: str | list[str] | None = None,
    collection: str | None = None,
    refresh: bool = False,
    gain_correction: bool = True,
    access: str = "auto",
    output_dir: str | os.PathLike = "spxframe_out",
    cache_dir: str | os.PathLike | None = None,
    output_options: dict | None = None,
    archive: Any = None,
    progress: bool = True,
    aperture_radius: float = 2.0,
    bad_bits: list[int] | None = None,
    max_concurrency: int | None = None,
    cloud_options: dict | None = None,
    cell_order: int = DEFAULT_ORDER,
    plots: int = 10,
    client: Any = None,
    dry_run: bool = False,
    _cell_func: Any = None,
) -> pl.DataFrame | Plan:
    """Measure every SPHEREx L2 image of every catalog source; write and return the photometry.

    Parameters
    ----------
    catalog : Polars or pandas DataFrame, astropy Table, or a Parquet/CSV path with
        ``source_id``, ``ra``, ``dec`` (deg, ICRS), optionally ``pmra``, ``pmdec`` (mas/yr) and
        ``ref_epoch`` (Julian year). Other columns ride along into the output.
    cutout_size : IRSA size grammar (``"200px"``, ``"3arcmin"``, ``"0.1"`` deg, ``"200,400px"``);
        None fetches only what the measurement needs (see :func:`spxframe.plan`).
    cutout_center : custom cutout centre (``"ra,dec"`` deg or ``"x,y px"``); default the source.
    bands : detectors to use, e.g. ``["D1", "D2"]``; default all six.
    time : (mjd_start, mjd_end) in MJD (UTC); default all.
    releases : archive releases to read, e.g. ``["qr2"]``; None reads every release this version
        reads (:data:`spxframe.spherex.DEFAULT_RELEASES`: QR2 and QR3). A row's release comes from
        its collection; photometry rows carry it in ``release``.
    collection : expert override: archive collections to query instead of ``releases`` (not both).
    refresh : query the archive again even when the output folder holds a recent observations
        table (it is reused for a day; the archive adds data weekly).
    gain_correction : bring QR2 (pre-R7) images onto R7 gains with the ``l3_flux_corrections``
        product (IMAGE x f, VARIANCE x f^2; fetched once per detector into ``cache_dir/cal``);
        never applied to R7 images. Rows carry ``gain_factor`` (1.0 when not corrected).
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
    cloud_options : fsspec HTTP options for the cloud copy's byte-range reads (headers, proxies).
    cell_order : HEALPix order of the work cells (3 → ~7.3° cells; higher for finer resume/Dask units).
    plots : number of sources to plot into ``plots/`` (0 for none).
    client : a ``dask.distributed.Client``: run the cells on the cluster instead of locally.
    dry_run : stop after planning: log what the run would cost (images, measurements, requests by
        method, bytes, expected time, disk space), write only ``run.json`` and return the plan.
        Only the archive's query service is contacted (or nothing, when the output folder holds
        a recent observations table); no file, cutout or cloud request is sent.

    Returns
    -------
    polars.DataFrame in ``schema.PHOTOMETRY`` (fluxes in µJy), plus the catalog's own columns,
    ordered by sky cell, then source, then time (each source's rows are contiguous). With
    ``dry_run=True``, the :class:`spxframe.planner.Plan` (``manifest``, ``summary``, ``totals``).
    """
    t_start = _time.perf_counter()
    timings: dict[str, float] = {}
    cat = normalize_catalog(catalog)  # everything is validated before any network traffic
    _check_numbers(aperture_radius, max_concurrency, cell_order, plots)
    opts = _validate(cutout_size, cutout_center, access, bands, time, collection, releases, aperture_radius,
                     bad_bits, cache_dir, output_dir, output_options)
    t0 = _time.perf_counter()
    obs, reused, query_report = _observations_cached(opts.store, cat, opts.query, archive, refresh=refresh,
                                                     write=not dry_run)
    timings["observations"] = _time.perf_counter() - t0

    t0 = _time.perf_counter()  # the catalog is planned once; each cell takes its slice
    link = load_link(opts.cache.root)  # the link an earlier run into this cache measured, else the defaults
    the_plan = make_plan(cat, obs, cutout_size=opts.size, cutout_center=cutout_center, access=access,
                         archive=resolve_archive(archive), cost=link,
                         annulus_r_out=float(opts.measure_options.get("annulus", (5.0, 9.0))[1]))
    timings["plan"] = _time.perf_counter() - t0
    needs = _calibration_needs(obs, the_plan.manifest, opts, gain_correction)
    expected = _expected(the_plan, needs, opts, link)
    parameters = dict(
        catalog_rows=cat.height, cutout_size=None if opts.size is None else str(opts.size),
        cutout_center=cutout_center, bands=opts.query["bands"], time=opts.query["time"], collection=collection,
        releases=opts.query["releases"], releases_used=_releases_used(obs), gain_correction=bool(gain_correction),
        access=access, archive=_archive_name(archive), aperture_radius=aperture_radius, bad_bits=bad_bits,
        cell_order=cell_order, dask=client is not None, observations_reused=reused, cache_dir=opts.cache.root,
        dry_run=bool(dry_run), observations_query=query_report,
        link_assumed={"bandwidth_Bps": link.bandwidth_Bps, "request_s": link.request_s})
    if dry_run:
        the_plan.totals = expected
        write_dry_run_json(opts.store, parameters=parameters, expected=expected, timings=timings)
        return the_plan
    t0 = _time.perf_counter()
    calibration = _calibration(needs, opts, archive, link)
    timings["calibration"] = _time.perf_counter() - t0
    fetch_options = {"max_concurrency": max_concurrency, "storage_options": cloud_options}
    tasks, skipped, cells = _cell_tasks(cat, obs, the_plan.manifest, opts, cell_order=cell_order,
                                        fetch_options=fetch_options, output_options=output_options)
    for t in tasks:
        t.plan_summary = summarize(t.manifest).to_dicts()

    t0 = _time.perf_counter()
    if client is not None:
        summaries = run_cells_dask(client, tasks, progress=progress, func=_cell_func or run_cell)
    else:
        summaries = _run_cells_local(tasks, progress=progress)
    timings["fetch_measure"] = _time.perf_counter() - t0
    for k in ("fetch", "measure"):
        timings[f"cells_{k}_s"] = sum(x.get(f"seconds_{k}", 0.0) for x in summaries)
    if client is None:  # cells ran one after another here: their bytes over their fetch time is the link
        rtt = [x["request_s"] for x in summaries if x.get("request_s")]
        parameters["link_measured"] = record_link(opts.cache.root, nbytes=sum(x.get("bytes", 0) for x in summaries),
                                                  seconds=timings["cells_fetch_s"],
                                                  request_s=float(np.median(rtt)) if rtt else None)

    t0 = _time.perf_counter()  # merge parts into the final tables (streaming, one cell at a time)
    counts, sizes = merge(opts.store, cat, cat.schema["source_id"], cells)
    phot = opts.store.read_parquet("photometry.parquet")
    timings["merge"] = _time.perf_counter() - t0
    t0 = _time.perf_counter()
    scales = write_science(opts.store, phot)
    timings["science"] = _time.perf_counter() - t0
    t0 = _time.perf_counter()
    if plots:
        write_plots(opts.store, phot, plots)
    timings["plots"] = _time.perf_counter() - t0
    timings["total"] = _time.perf_counter() - t_start
    write_run_json(opts.store, parameters=parameters, expected=expected, summaries=summaries, skipped=skipped,
                   timings=timings, counts=counts, plan=the_plan.summary.to_dicts(), error_scales=scales,
                   calibration=calibration)
    write_query_summary(opts.store, sizes, obs, cat)
    return phot


def _expected(the_plan: Any, needs: list[tuple[str, str, list[int], dict]], opts: RunOptions,
              link: Any) -> dict[str, Any]:
    """The run's predicted totals, calibration products included, logged (:mod:`.preview`)."""
    expected = preview.totals(the_plan.manifest, the_plan.summary, calibration=[
        estimate_products(dets, cache=opts.cache, family=family, release=release, need=need, cost=link)
        for family, release, dets, need in needs])
    log.info("%s", preview.report(expected))
    return expected


def _calibration_needs(obs: pl.DataFrame, manifest: pl.DataFrame, opts: RunOptions,
                       gain_correction: bool) -> list[tuple[str, str, list[int], dict]]:
    """(family, release, detectors, rows needed per detector) of each calibration product the run
    reads: the gain correction (``l3_flux_corrections``) for detectors with QR2-format (pre-R7
    gains) rows, the wavelength maps (``spectral_wcs`` of ``WAVE_RELEASE``) for every detector
    measured; the rows are those measurement reads them at (gains: each QR2 measurement's stamp;
    wavelengths: the rows around each source)."""
    from spxframe.fetcher.calib_ranges import rows_needed
    from spxframe.photometry.wave import WAVE_FAMILY, WAVE_RELEASE

    if not gain_correction or not manifest.height or "release" not in obs.columns:
        return []
    imgs = obs.join(manifest.select("obs_id", "detector").unique(), on=["obs_id", "detector"], how="semi")
    pre = [n for n, r in spherex.RELEASES.items() if r.gains != "r7"]
    qr2 = manifest.join(obs.filter(pl.col("release").is_in(pre)).select("obs_id", "detector").unique(),
                        on=["obs_id", "detector"], how="semi")
    half = int(np.ceil(max(float(opts.measure_options.get("annulus", (5.0, 9.0))[1]), 5.5))) + 1  # measure's stamp
    wanted = ((spherex.GAIN_FAMILY, spherex.GAIN_RELEASE, imgs.filter(pl.col("release").is_in(pre)),
               rows_needed(qr2, half=half)),
              (WAVE_FAMILY, WAVE_RELEASE, imgs, rows_needed(manifest, half=0, point=True)))
    return [(family, release, sorted(set(rows.get_column("detector").to_list())), need)
            for family, release, rows, need in wanted if rows.height]


def _calibration(needs: list[tuple[str, str, list[int], dict]], opts: RunOptions, archive: Any,
                 cost: Any) -> list[dict]:
    """The calibration products of the run (:func:`_calibration_needs`), each fetched once per
    detector into the cache, whole or as byte ranges of the rows the run reads, whichever ``cost``
    (the plan's link model, as in the estimate) prefers (``fetch_products(need=...)``).
    Sets ``opts.measure_options['calibration']`` = family -> {detector: file} (so a change of
    product re-measures). Returns run.json's records of the products (gains first)."""
    url, records, chosen = None, [], {}
    for family, release, dets, need in needs:
        url = url or resolve_archive(archive).url
        got = fetch_products(dets, base_url=url, cache=opts.cache, family=family, release=release, need=need,
                             cost=cost)
        if got.paths:
            chosen[family] = {str(d): p for d, p in sorted(got.paths.items())}
        records.append(got.record())
    if chosen:
        opts.measure_options["calibration"] = chosen
    return records


def _releases_used(obs: pl.DataFrame) -> dict[str, dict]:
    """run.json's record of each release in the run: its DOI and number of images."""
    if not obs.height or "release" not in obs.columns:
        return {}
    counts = dict(obs.group_by("release").agg(pl.len()).iter_rows())
    return {name: {"doi": r.doi, "collections": list(r.collections), "format": r.format, "images": counts[name]}
            for name, r in spherex.RELEASES.items() if name in counts}


def _archive_name(archive: Any) -> str:
    if archive is None or isinstance(archive, str):
        return archive or "irsa"
    return str(getattr(archive, "url", archive))


def _run_cells_local(tasks: list[CellTask], *, progress: bool) -> list[dict]:
    """Run the cells one after another, with one bar per stage: ``fetch`` (transfers, across all
    cells) and ``measure`` (images measured)."""
    n_req = sum(t.manifest.filter(pl.col("status") == "planned").get_column("request_id").n_unique() for t in tasks)
    n_img = sum(t.manifest.select(pl.struct("obs_id", "detector").n_unique()).item() if t.manifest.height else 0
                for t in tasks)
    summaries: list[dict] = []
    on = progress and bool(tasks)
    with progress_bar(total=n_req, unit="file", desc="fetch", enabled=on) as fetch_bar, \
            progress_bar(total=n_img, unit="image", desc="measure", enabled=on) as measure_bar:
        for task in tasks:
            if on:
                task.progress = fetch_bar  # a live object: local runs only (not pickled to Dask)
            summaries.append(run_cell(task))
            task.progress = False
            measure_bar.update(task.manifest.select(pl.struct("obs_id", "detector").n_unique()).item()
                               if task.manifest.height else 0)
            measure_bar.set_postfix(cells=f"{len(summaries)}/{len(tasks)}")
    return summaries
