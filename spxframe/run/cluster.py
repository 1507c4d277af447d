"""The same per-cell work units on ``dask.distributed``.

Each sky cell is one task running :func:`spxframe.run.cell.run_cell`, which writes its own
part of the Parquet dataset (``parts/photometry/cell=<id>/part.parquet``) atomically and is
idempotent, so a task retried after a worker died leaves each row exactly once. The driver
then merges the parts exactly as a local run does, so results are identical.

On a real cluster, the outputs go to storage every worker and the driver can reach: an fsspec
URL (``s3://``, ``gs://``, ``abfs://``, credentials in ``output_options``) or a shared file system
mounted at the same path everywhere. The fetched L2 files go to ``cache_dir``, a local folder on
each worker (photometry memory-maps them; it need not be shared — a part records the results,
not the files) or a shared mount, where concurrent cells claim a file before fetching it so it
is downloaded once::

    from dask.distributed import Client
    client = Client("tcp://scheduler:8786")
    spxframe.lightcurves(catalog, "200px", client=client,
                         output_dir="s3://my-bucket/spherex/run1",
                         output_options={"profile": "science"},
                         cache_dir="/local/scratch/spxframe-cache",
                         cell_order=5)   # ~1.8° cells: more, smaller tasks than the default 7°

Rerunning the same call resumes: cells whose done-marker is in ``output_dir`` are skipped.
Install ``spxframe[dask]`` (and ``s3fs``/``gcsfs`` for the URL) on the workers as well.
"""

from __future__ import annotations

import logging
from typing import Any

from spxframe.progress import bar as progress_bar
from spxframe.run.cell import run_cell

log = logging.getLogger("spxframe.run.cluster")


def run_cells_dask(client: Any, tasks: list, *, progress: bool = True, retries: int = 3,
                   func: Any = None) -> list[dict]:
    """Run ``tasks`` (``CellTask``) on a ``dask.distributed.Client``; return their summaries.

    ``func`` replaces :func:`spxframe.run.cell.run_cell` (fault-injection tests only).
    A task whose worker dies is rescheduled by the scheduler; one that raises is retried
    ``retries`` times. Either way its part is rewritten whole, so rows are never doubled.
    """
    from dask.distributed import as_completed

    if not tasks:
        return []
    futures = client.map(func or run_cell, tasks, retries=retries, pure=False,
                         key=[f"spxframe-cell-{t.cell}-{t.plan_hash}-{t.measure_hash}" for t in tasks])
    summaries = []
    with progress_bar(total=len(tasks), unit="cell", desc="cells on dask", enabled=progress) as bar:
        for fut in as_completed(futures):
            summaries.append(fut.result())
            bar.update(1)
    return sorted(summaries, key=lambda s: s["cell"])
