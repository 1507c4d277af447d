"""Show the cost first: lightcurves(dry_run=True) and ``spxframe lightcurves --dry-run`` plan,
report and stop, with no request to the file, cutout or cloud endpoints."""

from __future__ import annotations

import json
import logging
import os

import polars as pl
import pytest
from test_pipeline import patch_catalog

import spxframe
from spxframe.cli import main

NO_PIXELS = {"ibe_file", "ibe_cutout", "cloud"}


@pytest.fixture(scope="module")
def cat(universe):
    return patch_catalog(universe, 12)


def _endpoints(archive) -> set[str]:
    return {r.get("endpoint") for r in archive.log}


def test_dry_run_returns_the_plan_and_writes_only_run_json(cat, archive, tmp_path, caplog):
    out = tmp_path / "out"
    archive.clear_log()
    with caplog.at_level(logging.INFO, logger="spxframe"):
        p = spxframe.lightcurves(cat, "64px", output_dir=out, archive=archive, progress=False, dry_run=True)
    assert not (_endpoints(archive) & NO_PIXELS), _endpoints(archive)
    assert "tap" in _endpoints(archive)  # the query is the only traffic
    assert sorted(os.listdir(out)) == ["run.json"]
    m = p.manifest
    assert m.height > 0 and set(m["source_id"]) == set(cat["source_id"])
    run = json.loads((out / "run.json").read_text())
    assert run["dry_run"] is True and run["bytes_transferred_this_run"] == 0
    exp = run["expected"]
    assert exp["measurements"] == m.height
    assert exp["images"] == m.select(pl.struct("obs_id", "detector").n_unique()).item()
    assert exp["bytes"] == int(p.summary["predicted_bytes"].sum()) + exp["calibration"]["bytes"] > 0
    assert exp["calibration"]["products"] > 0  # a first run into this cache: the products are counted
    assert exp["requests"] >= exp["images"] > 0 and exp["seconds"] > 0 and exp["disk_bytes"] > 0
    assert {r["access"] for r in exp["by_method"]} == set(m["access"])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{m.height} measurements" in text and "MB on disk" in text


def test_the_real_run_logs_the_same_plan_and_moves_about_what_it_said(cat, archive, tmp_path):
    """The prediction is honest: the run's bytes are within a factor of the plan's (QR2: exact
    layout; headers and re-centring move a little more or less)."""
    out = tmp_path / "out"
    p = spxframe.lightcurves(cat.head(3), "64px", output_dir=out, archive=archive, progress=False, dry_run=True)
    spxframe.lightcurves(cat.head(3), "64px", output_dir=out, archive=archive, progress=False, plots=0)
    run = json.loads((out / "run.json").read_text())
    assert run["expected"]["measurements"] == p.manifest.height
    moved = run["bytes_transferred_this_run"]
    assert 0.5 * p.totals["bytes"] < moved < 2.0 * p.totals["bytes"], (moved, p.totals["bytes"])


def test_cli_dry_run_exits_zero_and_prints_the_plan(cat, archive, tmp_path, capsys):
    path = tmp_path / "cat.parquet"
    cat.write_parquet(path)
    out = tmp_path / "out"
    archive.clear_log()
    code = main(["lightcurves", str(path), "--cutout-size", "64px", "--out", str(out), "--archive", archive.url,
                 "--dry-run", "--no-progress"])
    assert code == 0
    assert not (_endpoints(archive) & NO_PIXELS)
    printed = capsys.readouterr().out
    assert "measurements" in printed and "dry run" in printed
    assert sorted(os.listdir(out)) == ["run.json"]


def test_a_refused_upload_is_recorded_in_run_json(universe, archive, tmp_path):
    """Isolated sources go to TAP as an upload; when the archive refuses it (here 413), the run
    falls back to sky-region queries and run.json says so."""
    src = universe.catalog().join(universe.sources.select("source_id", "field"), on="source_id")
    cat = src.group_by("field", maintain_order=True).first().drop("field")
    out = tmp_path / "out"
    archive.faults.tap_upload_status = 413
    try:
        p = spxframe.lightcurves(cat, "64px", output_dir=out, archive=archive, progress=False, dry_run=True)
    finally:
        archive.faults.tap_upload_status = None
    assert p.manifest.height > 0
    q = json.loads((out / "run.json").read_text())["parameters"]["observations_query"]
    assert q["upload_fallback"]["status"] == 413 and q["sources_by_region"] == cat.height
