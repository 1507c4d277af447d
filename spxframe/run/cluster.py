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
import threading
import time
from typing import Any

from spxframe.progress import bar as progress_bar
from spxframe.run.cell import run_cell

log = logging.getLogger("spxframe.run.cluster")


def run_cells_dask(client: Any, tasks: list, *, progress: bool = True, retries: int = 3,
                   func: Any = None, idle_warn_s: float = 60.0) -> list[dict]:
    """Run ``tasks`` (``CellTask``) on a ``dask.distributed.Client``; return their summaries.

    ``func`` replaces :func:`spxframe.run.cell.run_cell` (fault-injection tests only).

    - A task that raises is retried ``retries`` times by the scheduler.
    - A task whose worker dies is rescheduled by the scheduler; one the scheduler gives up on
      (``KilledWorker``: it was on ``distributed.scheduler.allowed-failures`` + 1 workers that
      died) is submitted again, up to ``retries`` times, before the run fails.
    - A finished cell's summary is taken from the cluster at once, so a worker that dies later
      does not make the scheduler recompute cells already done.
    - While no worker is connected for ``idle_warn_s`` seconds the run says so in the log (it
      keeps waiting: an adaptive cluster may be scaling up).

    Either way a cell's part is rewritten whole, so rows are never doubled.
    """
    from dask.distributed import as_completed
    from distributed import KilledWorker

    if not tasks:
        return []
    func = func or run_cell
    keys = [f"spxframe-cell-{t.cell}-{t.plan_hash}-{t.measure_hash}" for t in tasks]
    futures = client.map(func, tasks, retries=retries, pure=False, key=keys)
    task_of = dict(zip(keys, tasks))
    again: dict[str, int] = {}
    summaries = []
    with progress_bar(total=len(tasks), unit="cell", desc="cells on dask", enabled=progress) as bar, \
            _NoWorkersWarning(client, idle_warn_s):
        done = as_completed(futures)
        del futures  # as_completed holds the pending ones; a finished one is released below
        for fut in done:
            base = fut.key.split("~")[0]
            try:
                summaries.append(fut.result())
            except KilledWorker as e:
                n = again[base] = again.get(base, 0) + 1
                if n > retries:
                    raise
                log.warning("cell %s: %s; submitting it again (%d/%d)", task_of[base].cell, e, n, retries)
                done.add(client.submit(func, task_of[base], retries=retries, pure=False, key=f"{base}~{n}"))
                continue
            finally:
                fut.release()
            bar.update(1)
    return sorted(summaries, key=lambda s: s["cell"])


class _NoWorkersWarning:
    """A thread that logs a warning while ``client``'s cluster has had no worker for ``after_s``."""

    def __init__(self, client: Any, after_s: float) -> None:
        self.client, self.after_s = client, float(after_s)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="spxframe-dask-watch", daemon=True)

    def __enter__(self) -> _NoWorkersWarning:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        since, warned = None, False
        while not self.stop.wait(min(5.0, self.after_s)):
            try:
                n = len(self.client.scheduler_info().get("workers", {}))
            except Exception:  # the client is closing, or the scheduler is briefly unreachable
                continue
            now = time.monotonic()
            if n:
                since, warned = None, False
                continue
            since = since or now
            if not warned and now - since >= self.after_s:
                log.warning("no Dask worker connected for %.0f s; cells wait for one (a rerun resumes "
                            "from the cells already written)", now - since)
                warned = True
