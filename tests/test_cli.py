"""The command line: main paths, help with units, exit codes a shell user can act on."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
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
    r = sh("demo", "--sources", "6", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "recovered" in r.stdout and "measurements/s" in r.stdout
    assert (tmp_path / "demo" / "photometry.parquet").is_file()
    assert list((tmp_path / "demo" / "plots").glob("source_*.png"))
    assert "cache" in r.stdout and f"spxframe clean {tmp_path / 'demo'}" in r.stdout
    assert "previous run" not in r.stdout
    r = sh("demo", "--sources", "6", "--out", str(tmp_path / "demo"))  # a rerun: rows reused, none new
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"of which\s+\d+ already in the previous run's output, 0 new", r.stdout), r.stdout
    assert "0.0 MB in 0 HTTP requests" in r.stdout


# ------------------------------------------------------------------------------------------------
# a smooth first hour: --version, help, export, clean, errors that name what is wrong
# ------------------------------------------------------------------------------------------------


def test_version():
    import spxframe

    r = sh("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"spxframe {spxframe.__version__}"


@pytest.mark.parametrize("cmd", [["lightcurves"], ["plot"], ["export"], ["clean"], ["demo"], ["sim", "serve"]])
def test_help_says_each_default_once(cmd):
    r = sh(*cmd, "--help")
    assert r.returncode == 0, r.stderr
    blocks: list[str] = []
    for line in r.stdout.splitlines():  # one block per argument: its line and its indented continuation
        if re.match(r"^  \S", line) or not blocks:
            blocks.append(line)
        else:
            blocks[-1] += " " + line.strip()
    doubled = [b for b in blocks if b.lower().count("default") > 1]
    assert not doubled, doubled
    assert "(default: None)" not in r.stdout


@pytest.fixture
def made_run(tmp_path):
    """A run folder with a photometry table made directly (no archive traffic)."""
    from test_results import make_phot

    from spxframe import schema
    from spxframe.store import Store

    out = tmp_path / "run"
    Store(out).write_parquet("photometry.parquet", make_phot(), schema.PHOTOMETRY)
    return out


def test_export_csv(made_run, tmp_path):
    r = sh("export", str(made_run), "--csv")
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in (made_run / "lightcurves").glob("*.csv"))
    assert files == ["7.csv", "8.csv"] and "2 CSV light curves" in r.stdout
    head = (made_run / "lightcurves" / "7.csv").read_text().splitlines()[0]
    assert head.startswith("obs_id,mjd,flux,flux_error,mag_ab,mag_ab_error,wavelength,bandwidth,band,flag,snr")
    r = sh("export", str(made_run), "--csv", "-o", str(tmp_path / "csv"))
    assert r.returncode == 0 and len(list((tmp_path / "csv").glob("*.csv"))) == 2


def test_clean_deletes_the_cache_and_keeps_the_tables(made_run):
    (made_run / "data" / "D2").mkdir(parents=True)
    (made_run / "data" / "D2" / "f.fits").write_bytes(b"\0" * 2_000_000)
    r = sh("clean", str(made_run), "--dry-run")
    assert r.returncode == 0 and "2.0 MB" in r.stdout and (made_run / "data").exists()
    r = sh("clean", str(made_run))
    assert r.returncode == 0 and "freed 2.0 MB" in r.stdout
    assert not (made_run / "data").exists() and (made_run / "photometry.parquet").is_file()


def test_plot_unknown_source_names_it(made_run):
    r = sh("plot", str(made_run), "999999")
    assert r.returncode == 2 and "999999" in r.stderr and "Traceback" not in r.stderr
    r = sh("plot", str(made_run), "7", "--band", "D4")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_file()


@pytest.mark.parametrize("option, value, word", [
    ("aperture_radius", 99.0, "aperture_radius"),
    ("aperture_radius", -1.0, "aperture_radius"),
    ("aperture_radius", "2", "aperture_radius"),
    ("cutout_size", "3parsec", "cutout_size"),
    ("cutout_center", "north", "cutout_center"),
    ("access", "ftp", "access"),
    ("bands", ["D9"], "D9"),
    ("max_concurrency", 0, "max_concurrency"),
    ("plots", -1, "plots"),
    ("cell_order", 40, "cell_order"),
    ("bad_bits", [21], "bad_bits"),
])
def test_options_are_checked_before_any_traffic(archive, tmp_path, option, value, word):
    """A wrong option is a ValueError subclass naming it (and the allowed values), before any request."""
    import spxframe
    from spxframe.errors import InputError

    cat = pl.DataFrame({"source_id": [1], "ra": [10.0], "dec": [0.0]})
    kw = {"cutout_size": "200px", option: value}
    archive.clear_log()
    with pytest.raises(InputError) as exc:
        spxframe.lightcurves(cat, archive=archive, output_dir=tmp_path / "o", progress=False, **kw)
    assert isinstance(exc.value, ValueError) and word in str(exc.value)
    assert archive.log == []


def test_output_dir_that_is_a_file_is_named(archive, tmp_path):
    import spxframe
    from spxframe.errors import InputError

    f = tmp_path / "a_file"
    f.write_text("x")
    archive.clear_log()
    with pytest.raises(InputError, match="output_dir"):
        spxframe.lightcurves(pl.DataFrame({"source_id": [1], "ra": [10.0], "dec": [0.0]}), "200px",
                             archive=archive, output_dir=f, progress=False)
    assert archive.log == []


def test_cli_bad_option_exit_code_before_traffic(archive, tmp_path):
    csv = tmp_path / "c.csv"
    pl.DataFrame({"source_id": [1], "ra": [10.0], "dec": [0.0]}).write_csv(csv)
    archive.clear_log()
    r = sh("lightcurves", str(csv), "--out", str(tmp_path / "o"), "--archive", archive.url, "--no-progress",
           "--aperture-radius", "40")
    assert r.returncode == 2 and "aperture_radius" in r.stderr and "Traceback" not in r.stderr
    r = sh("lightcurves", str(csv), "--out", str(tmp_path / "o"), "--archive", archive.url, "--no-progress",
           "--time", "60000")
    assert r.returncode == 2 and "--time" in r.stderr
    assert archive.log == []


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_a_rerun_resumes(archive, universe, tmp_path):
    import signal
    import time

    cat = patch_catalog(universe, 4)
    csv = tmp_path / "cat.csv"
    cat.select("source_id", "ra", "dec").write_csv(csv)
    args = [*SPX, "lightcurves", str(csv), "--out", str(tmp_path / "o"), "--archive", archive.url, "--plots", "0",
            "--no-progress", "--bands", "D1,D2", "--cutout-size", "64px"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "o").glob("data/D*/*.fits")):
        time.sleep(0.05)  # interrupt once transfers are under way
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == ["spxframe: interrupted; rerun the same command to resume"], err[-2000:]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("kind", ["spectra", "variability"])
def test_science_products_from_a_run(made_run, kind):
    r = sh(kind, str(made_run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()) == made_run / f"{kind}.parquet"
    assert pl.read_parquet(made_run / f"{kind}.parquet").height > 0
