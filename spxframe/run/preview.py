"""What a run will cost, shown before any pixel traffic: the plan's images, measurements,
requests by method, bytes to move, the expected time and the disk space the cache needs.

:func:`lightcurves` logs :func:`report` after planning; with ``dry_run=True`` it stops there and
writes only ``run.json`` (:func:`dry_run_record`). Bytes are the plan's predictions (exact for QR2
files, estimates for QR3's compressed FLAGS); seconds come from the plan's cost model (the link
an earlier run into the same cache measured, else the documented defaults), allowing for the
fetcher's concurrency.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from spxframe import spherex
from spxframe.planner.cost import cutout_bytes


def disk_bytes(manifest: pl.DataFrame) -> int:
    """Bytes the cache will hold after the run (predicted): one file per IBE cutout or whole
    image, one box file per range-read measurement (its PSF is shared and counted once per key)."""
    m = manifest.filter(pl.col("status") == "planned")
    if m.height == 0:
        return 0
    per_request = m.filter(pl.col("access") != "range").unique("request_id")
    total = int(per_request["predicted_bytes"].sum())
    rng = m.filter(pl.col("access") == "range")
    if rng.height:
        boxes = cutout_bytes(rng["box_nx"].to_numpy(), rng["box_ny"].to_numpy())
        total += int(boxes.sum()) - rng.height * spherex.PSF_BYTES  # box files carry no PSF data
        total += rng["psf_key"].n_unique() * spherex.PSF_BYTES
    return total


def totals(manifest: pl.DataFrame, summary: pl.DataFrame, *,
           calibration: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The run's predicted totals: sources, images, measurements, requests, bytes (moved and on
    disk), seconds, and per access method the same figures (``by_method``). ``calibration``: the
    products' predictions (:func:`spxframe.fetcher.calib.estimate_products`, one per family),
    summed into ``calibration`` and included in the totals."""
    m = manifest
    images = m.select(pl.struct("obs_id", "detector").n_unique()).item() if m.height else 0
    cal = {k: sum(c[k] for c in calibration or []) for k in ("products", "bytes", "requests", "seconds",
                                                             "disk_bytes")}
    return {
        "sources": m["source_id"].n_unique() if m.height else 0,
        "images": int(images),
        "measurements": m.height,
        "not_plannable": int((m["status"] != "planned").sum()) if m.height else 0,
        "requests": int(summary["requests"].sum() if summary.height else 0) + int(cal["requests"]),
        "bytes": int(summary["predicted_bytes"].sum() if summary.height else 0) + int(cal["bytes"]),
        "disk_bytes": disk_bytes(m) + int(cal["disk_bytes"]),
        "seconds": float(summary["predicted_seconds"].sum() if summary.height else 0.0) + float(cal["seconds"]),
        "by_method": summary.to_dicts(),
        "calibration": cal,
    }


def report(t: dict[str, Any]) -> str:
    """A few human lines from :func:`totals` (MB = 10^6 bytes)."""
    lines = [f"plan: {t['measurements']} measurements of {t['sources']} sources on {t['images']} images; "
             f"{t['requests']} requests moving {t['bytes'] / 1e6:,.1f} MB, about {_duration(t['seconds'])} "
             f"on the assumed link; {t['disk_bytes'] / 1e6:,.1f} MB on disk"]
    for r in t["by_method"]:
        lines.append(f"  {r['access']:<7} {r['images']:>7} images {r['rows']:>8} measurements "
                     f"{r['requests']:>8} requests {r['predicted_bytes'] / 1e6:>11,.1f} MB "
                     f"~{_duration(r['predicted_seconds'])}")
    cal = t.get("calibration") or {}
    if cal.get("products"):
        lines.append(f"  {'calib.':<7} {cal['products']:>7} products {'':>21}{cal['requests']:>8} requests "
                     f"{cal['bytes'] / 1e6:>11,.1f} MB ~{_duration(cal['seconds'])}")
    if t["not_plannable"]:
        lines.append(f"  {t['not_plannable']} measurement(s) cannot be made (no overlap): NaN rows")
    return "\n".join(lines)


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
