"""The command line: main paths, help with units, exit codes a shell user can act on."""

from __future__ import annotations

import pytest
import subprocess
import sys
from pathlib import Path

import polars as pl
from test_pipeline import patch_catalog

SPX = [sys.executable, "-m", "spxframe.cli"]


def sh(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*SPX, *args], capture_output=True, text=True, timeout=600, **kw)


def test_help_explains_units():
    r = sh("lightcurves", "--help")
    assert r.returncode == 0
    for word in ("200px", "arcmin", "pixels", "MJD", "D1,D2", "cutout", "range", "full"):
        assert word in r.stdout, word


@pytest.mark.slow
def test_lightcurves_and_plot(archive, universe, tmp_path):
    cat = patch_catalog(universe, 8)
    csv = tmp_path / "cat.csv"
    cat.select("source_id", "ra", "dec").write_csv(csv)
    out = tmp_path / "out"
    r = sh("lightcurves", str(csv), "--cutout-size", "200px", "--out", str(out), "--archive", archive.url,
           "--bands", "D1,D4", "--no-progress", "--plots", "1")
    assert r.returncode == 0, r.stderr
    phot = pl.read_parquet(out / "photometry.parquet")
    assert phot.height > 0 and set(phot["band"].unique()) <= {"D1", "D4"}
    sid = str(phot["source_id"][0])
    r = sh("plot", str(out), sid)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_file()


def test_bad_input_exit_code(archive, tmp_path):
    csv = tmp_path / "bad.csv"
    pl.DataFrame({"source_id": [1, 2], "ra": [10.0, 11.0], "dec": [95.0, 0.0]}).write_csv(csv)
    r = sh("lightcurves", str(csv), "--out", str(tmp_path / "o"), "--archive", archive.url, "--no-progress")
    assert r.returncode == 2
    assert "dec" in r.stderr and "Traceback" not in r.stderr


def test_unreachable_archive_exit_code(tmp_path):
    csv = tmp_path / "c.csv"
    pl.DataFrame({"source_id": [1], "ra": [10.0], "dec": [0.0]}).write_csv(csv)
    r = sh("lightcurves", str(csv), "--out", str(tmp_path / "o"), "--archive", "http://127.0.0.1:9", "--no-progress")
    assert r.returncode == 3
    assert "127.0.0.1:9" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_demo_runs_and_reports_truth(tmp_path):
    r = sh("demo", "--sources", "12", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "recovered" in r.stdout and "measurements/s" in r.stdout
    assert (tmp_path / "demo" / "photometry.parquet").is_file()
    assert list((tmp_path / "demo" / "plots").glob("source_*.png"))
