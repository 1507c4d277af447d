"""An output folder written by spxframe 0.1 resumes: its cells are measured again from the cached
files (nothing is refetched) and its text ids come back in the catalog's dtype."""

from __future__ import annotations

import json

import polars as pl
import pytest
from test_pipeline import patch_catalog, transfers

import spxframe


@pytest.mark.slow
def test_a_01_output_folder_resumes_without_refetching(archive, universe, tmp_path):
    cat = patch_catalog(universe, 3)
    kw = dict(archive=archive, output_dir=tmp_path, progress=False, plots=0, bands=["D1"])
    first = spxframe.lightcurves(cat, "64px", **kw)
    assert first.height and first.schema["source_id"] == pl.Int64
    # make the folder look as 0.1 left it: done-markers without parts_version, text ids in the parts
    for marker in (tmp_path / "parts" / "cells").glob("*.json"):
        state = json.loads(marker.read_text())
        state.pop("parts_version")
        marker.write_text(json.dumps(state))
    for part in (tmp_path / "parts").glob("*/cell=*/part.parquet"):
        df = pl.read_parquet(part)
        df.with_columns(pl.col("source_id").cast(pl.Utf8)).write_parquet(part)
    archive.clear_log()
    again = spxframe.lightcurves(cat, "64px", **kw)
    assert transfers(archive) == []  # the cached files are reused, none refetched
    assert again.schema["source_id"] == pl.Int64
    cols = [c for c in first.columns if c != "file"]
    assert again.select(cols).sort("source_id", "obs_id", "detector").equals(
        first.select(cols).sort("source_id", "obs_id", "detector"))
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["counts"]["cells_run"] >= 1  # the 0.1 cells were not trusted, they were re-measured
