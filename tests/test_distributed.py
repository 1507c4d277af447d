"""The same cells on dask.distributed: identical results, and a worker death loses nothing."""

from __future__ import annotations

import os
import sys
import threading
import time

import polars as pl
import pytest
from test_pipeline import patch_catalog

import spxframe
from spxframe.run.cell import run_cell

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow  # end-to-end runs on a cluster


def _sorted(df: pl.DataFrame) -> pl.DataFrame:
    return df.drop("file").sort("source_id", "obs_id", "detector")


@pytest.fixture(scope="module")
def catalog(universe):
    return patch_catalog(universe, 6)


@pytest.fixture(scope="module")
def local_run(archive, catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return spxframe.lightcurves(catalog, "200px", archive=archive, output_dir=out, progress=False,
                                plots=0, cell_order=10)


@pytest.mark.parametrize("where", ["path", "url"])
def test_threads_cluster_matches_local(archive, catalog, local_run, tmp_path, where):
    """Cells as Dask tasks write their parts to a folder or an fsspec URL (shared storage); the
    driver's merge gives the local run's rows and values."""
    import fsspec

    out = str(tmp_path) if where == "path" else f"memory://dask-{os.getpid()}/{tmp_path.name}"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        phot = spxframe.lightcurves(catalog, "200px", archive=archive, output_dir=out, cache_dir=tmp_path / "cache",
                                    progress=False, plots=0, cell_order=10, client=client)
    assert _sorted(phot).equals(_sorted(local_run))
    fs, root = fsspec.core.url_to_fs(out)
    parts = fs.glob(f"{root}/parts/photometry/cell=*/part.parquet")
    assert len(parts) > 1  # partitioned by cell
    assert spxframe.read(out).equals(phot)
    import pyarrow.parquet as pq
    with fs.open(f"{root}/photometry.parquet", "rb") as f:
        assert pq.ParquetFile(f).metadata.num_row_groups == 1  # small cells share a row group


def _dies_once_mid_cell(task):
    """Run the cell; the first cell to start kills its worker process while it runs.

    One death only, at least 3 s into the worker process's life: a worker dying while its nanny
    still restarts another can leave a LocalCluster without workers (seen in ``distributed``
    2026.8 when every cell killed its worker: the run then waits forever on an empty cluster).
    The other worker carries on meanwhile."""
    import psutil

    try:  # the one cell that creates the sentinel dies
        os.close(os.open(os.path.join(task.output_dir, "a-worker-died"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        first = True
    except FileExistsError:
        first = False
    if first:
        time.sleep(max(0.0, 3.0 - (time.time() - psutil.Process().create_time())))
        threading.Timer(0.2, lambda: os._exit(17)).start()
        run_cell(task)
        time.sleep(5)  # the timer fires before we return
    return run_cell(task)


def test_worker_death_is_retried_and_rows_are_unique(archive, catalog, local_run, tmp_path, caplog):
    """A worker dies mid-cell. With the scheduler told to give up on a task at its first worker
    death (``KilledWorker``), the driver submits the cell again: nothing is lost and no row is
    doubled."""
    import cloudpickle
    import dask

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # one task per worker at a time, so the death hits only the cell that caused it
    config = {"distributed.scheduler.allowed-failures": 0, "distributed.scheduler.worker-saturation": 1.0}
    with dask.config.set(config), caplog.at_level("WARNING", logger="spxframe"), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                     dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        phot = spxframe.lightcurves(catalog, "200px", archive=archive, output_dir=tmp_path, progress=False,
                                    plots=0, cell_order=10, client=client, _cell_func=_dies_once_mid_cell)
    assert (tmp_path / "a-worker-died").exists()  # a worker really died
    again = [r for r in caplog.records if "submitting it again" in r.getMessage()]
    assert len(again) == 1  # the killed cell went back to the cluster
    assert phot.select("source_id", "obs_id", "detector").is_unique().all()
    assert _sorted(phot).equals(_sorted(local_run))


def _summary(task):
    return {"cell": task.cell}


def test_a_cluster_without_workers_is_reported_and_the_run_goes_on_when_one_joins(caplog):
    """No worker for ``idle_warn_s``: one warning in the log; the cells run once a worker joins."""
    from types import SimpleNamespace

    from spxframe.run.cluster import run_cells_dask

    tasks = [SimpleNamespace(cell=c, plan_hash="p", measure_hash="m") for c in (3, 1, 2)]
    with caplog.at_level("WARNING", logger="spxframe"), \
            distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        def join_after_the_warning():
            while not any("no Dask worker" in r.getMessage() for r in caplog.records):
                time.sleep(0.2)
            cluster.scale(1)
        threading.Thread(target=join_after_the_warning, daemon=True).start()
        summaries = run_cells_dask(client, tasks, progress=False, func=_summary, idle_warn_s=1.0)
    assert [s["cell"] for s in summaries] == [1, 2, 3]
    assert sum("no Dask worker" in r.getMessage() for r in caplog.records) == 1
