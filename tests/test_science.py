"""Per-source spectra and variability that knows the spectrum (spxframe.science).

Fast tests draw photometry tables straight from the simulated sky's truth at the (wavelength,
time) sampling of the simulated survey: every wide-field visit of every source, the wavelength at
its parent pixel from the instrument's LVF, and noise with the per-detector error model real runs
of the simulated archive give (flux_err² ≈ e_det² + 0.18 µJy · flux).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from spxframe import schema, sim, spherex
from spxframe.science import error_scales, spectra, variability
from spxframe.science.cli import run_cli
from spxframe.science.plots import plot_source_model, plot_variability
from spxframe.science.schemas import SPECTRA, VARIABILITY
from spxframe.sim.world import instrument as ins

#: background-limited error per detector (µJy) and source Poisson term, fitted to a simulated run
E0 = {1: 38.5, 2: 39.0, 3: 42.0, 4: 55.0, 5: 98.0, 6: 130.0}
POISSON = 0.18
UNDERSTATE = {1: 3.0, 2: 1.5, 3: 2.0, 4: 1.0, 5: 4.0, 6: 2.5}


@pytest.fixture(scope="module")
def sky():
    return sim.Universe(seed=1, releases=("qr2",))


@pytest.fixture(scope="module")
def sampling(sky):
    """(source, visit, detector, wavelength) of 400 sources of the generic wide field."""
    obs = sky.observations.filter(pl.col("field") == "wide_generic")
    ids = sky.sources.filter(pl.col("field") == "wide_generic").head(400)["source_id"].to_numpy()
    parts = []
    for o, det, t0, t1 in obs.select("obs_id", "detector", "t_min", "t_max").iter_rows():
        x, y = sky.truth_pixel(ids, o, det)
        m = np.isfinite(x)
        if m.any():
            lam, bw = ins.wave_at(det, x[m], y[m])
            parts.append(pl.DataFrame({"source_id": ids[m], "obs_id": o, "detector": det,
                                       "mjd": 0.5 * (t0 + t1), "wavelength": lam, "bandwidth": bw}))
    return pl.concat(parts)


def draw(sky, samp: pl.DataFrame, seed: int, understate: dict | float = 1.0) -> pl.DataFrame:
    """A photometry table: truth + noise; ``flux_err`` = true noise / understate[detector]."""
    rng = np.random.default_rng(seed)
    sid, det = samp["source_id"].to_numpy(), samp["detector"].to_numpy()
    truth = sky.truth_flux(sid, samp["wavelength"].to_numpy(), samp["mjd"].to_numpy())
    sig = np.sqrt(np.array([E0[d] for d in det]) ** 2 + POISSON * np.clip(truth, 0, None))
    und = np.array([understate[d] for d in det]) if isinstance(understate, dict) else np.full(det.size, understate)
    return samp.with_columns(
        pl.col("detector").cast(pl.Int8), pl.format("D{}", pl.col("detector")).alias("band"),
        pl.Series("flux", truth + sig * rng.standard_normal(det.size)), pl.Series("flux_err", sig / und),
        pl.Series("truth", truth), pl.lit(0, dtype=pl.Int64).alias("flags"), pl.lit(0, dtype=pl.Int32).alias("qc"))


def truth_table(sky, phot: pl.DataFrame, understate: dict | float = 1.0) -> pl.DataFrame:
    """Per source: class, line, n and the rms (in true-noise σ) of its true change about the best
    constant-in-time copy of its own spectrum at the observed wavelengths and times."""
    src = sky.sources.select("source_id", "var_class", "line_um", "var_t0")
    d = phot.join(src, on="source_id")
    ref = sky.truth_flux(d["source_id"].to_numpy(), d["wavelength"].to_numpy(), d["var_t0"].to_numpy())
    und = np.array([understate[x] for x in d["detector"]]) if isinstance(understate, dict) else understate
    d = d.with_columns(pl.Series("ref", ref), (pl.col("flux_err") * und).alias("sig"))
    d = d.with_columns((1 / pl.col("sig") ** 2).alias("w"))
    c = (pl.col("w") * pl.col("truth") * pl.col("ref")).sum() / (pl.col("w") * pl.col("ref") ** 2).sum()
    per = d.group_by("source_id").agg(
        pl.col("var_class").first(), pl.col("line_um").first().is_not_nan().alias("has_line"), pl.len().alias("n"),
        (((pl.col("truth") - c * pl.col("ref")) / pl.col("sig")) ** 2).mean().sqrt().alias("strength"))
    return per


def rates(var: pl.DataFrame, tt: pl.DataFrame) -> dict[str, float]:
    j = tt.join(var.select("source_id", "variable"), on="source_id", how="left").with_columns(
        pl.col("variable").fill_null(False))
    const = j.filter(pl.col("var_class") == "constant")
    strong = j.filter((pl.col("var_class") != "constant") & (pl.col("strength") >= 3))
    lines = const.filter(pl.col("has_line"))
    return {"found": strong["variable"].mean(), "n_strong": strong.height,
            "const_fa": const["variable"].mean(), "n_const": const.height,
            "line_fa": lines["variable"].mean(), "n_lines": lines.height, "line_flagged": int(lines["variable"].sum())}


@pytest.fixture(scope="module")
def phot(sky, sampling):
    return draw(sky, sampling, seed=3)


@pytest.fixture(scope="module")
def truth(sky, phot):
    return truth_table(sky, phot)


def test_variables_found_constants_and_line_emitters_spared(phot, truth):
    var = variability(phot)
    r = rates(var, truth)
    assert r["n_strong"] >= 30 and r["n_const"] >= 150 and r["n_lines"] >= 30, r
    assert r["found"] >= 0.90, r
    assert r["const_fa"] <= 0.03, r
    assert r["line_fa"] <= 0.05, r


def test_naive_scatter_and_smooth_continuum_call_line_emitters_variable(phot, truth):
    """Without the spectral model the same statistics fail: the scatter about the mean flux calls
    most constant line emitters (and steep spectra) variable, a smooth continuum without lines
    still calls several line emitters variable."""
    naive = rates(variability(phot, mode="constant"), truth)
    assert naive["line_fa"] >= 0.4 and naive["const_fa"] >= 0.3, naive
    smooth = rates(variability(phot, mode="continuum"), truth)
    assert smooth["line_fa"] > 0.10, smooth
    full = rates(variability(phot), truth)
    assert full["line_flagged"] < smooth["line_flagged"] < naive["line_flagged"], (full, smooth, naive)


def test_error_scale_recovers_understated_noise(sky, sampling):
    low = draw(sky, sampling, seed=4, understate=UNDERSTATE)
    tt = truth_table(sky, low, UNDERSTATE)
    sc = error_scales(low).sort("detector")
    assert sc["detector"].to_list() == [1, 2, 3, 4, 5, 6]
    got = dict(zip(sc["detector"].to_list(), sc["scale"].to_list()))
    for d, f in UNDERSTATE.items():
        assert got[d] == pytest.approx(f, rel=0.12), (d, got)
    raw = rates(variability(low, error_scale=False), tt)
    assert raw["const_fa"] > 0.5, raw  # the formal errors alone call most constant sources variable
    r = rates(variability(low, scales=sc), tt)
    assert r["found"] >= 0.90 and r["const_fa"] <= 0.03 and r["line_fa"] <= 0.05, r
    # the photometry's formal errors are left alone
    assert low["flux_err"].equals(draw(sky, sampling, seed=4, understate=UNDERSTATE)["flux_err"])


def test_spectra_of_constant_sources_resolve_the_channels_and_match_the_truth(sky, sampling):
    low = draw(sky, sampling, seed=5, understate=UNDERSTATE)
    spec = spectra(low)
    const = sky.sources.filter(pl.col("var_class") == "constant")["source_id"]
    rows = low.filter(pl.col("source_id").is_in(const.implode()))
    # the truth of each channel: the same inverse-variance weighted mean of the true fluxes
    ch = np.zeros(rows.height, np.int64)
    for b in spherex.BANDS:  # wavelengths just outside a band go to its first or last channel
        m = (rows["band"] == b).to_numpy()
        lam = rows["wavelength"].to_numpy()[m]
        c = spherex.channel_of(b, lam)
        ch[m] = np.where(c >= 0, c, np.where(lam < spherex.BANDS[b][0], 0, spherex.CHANNELS_PER_BAND - 1))
    tr = rows.with_columns(pl.Series("channel", ch, dtype=pl.Int8), (1 / pl.col("flux_err") ** 2).alias("w")).group_by(
        "source_id", "band", "channel").agg(((pl.col("w") * pl.col("truth")).sum() / pl.col("w").sum()).alias("true"))
    s = spec.join(tr, on=["source_id", "band", "channel"], how="inner")
    assert s.height == spec.filter(pl.col("source_id").is_in(const.implode())).height
    per = s.group_by("source_id").agg(pl.len().alias("bins"), pl.col("n_obs").sum().alias("n"))
    need = max(12, 0.6 * per["n"].median())
    assert per["bins"].median() >= need, (per["bins"].median(), need)
    pull = ((s["flux"] - s["true"]) / s["flux_err"]).to_numpy()
    width = 1.4826 * np.median(np.abs(pull - np.median(pull)))
    assert 0.8 <= width <= 1.25, width
    good = s.filter(pl.col("true") > 20 * pl.col("flux_err"))
    rel = ((good["flux"] - good["true"]) / good["true"]).to_numpy()
    assert good.height > 100 and abs(np.median(rel)) <= 0.02 and np.median(np.abs(rel)) <= 0.02
    # without the error scale the same spectra claim errors several times too small
    raw = spectra(low, error_scale=False).join(tr, on=["source_id", "band", "channel"], how="inner")
    raw_pull = ((raw["flux"] - raw["true"]) / raw["flux_err"]).to_numpy()
    assert 1.4826 * np.median(np.abs(raw_pull)) > 1.5


def test_schemas_bad_rows_and_source_id_dtype(phot):
    sub = phot.filter(pl.col("source_id").is_in(phot["source_id"].unique().sort().head(40).implode()))
    sub = sub.with_columns(pl.col("source_id").cast(pl.Utf8))
    # rows that are not data (the good-data mask, schema.good_mask): every unusable qc bit, a
    # hard-bad FLAGS bit in the aperture, a NaN flux; a zero flux is data
    bad = sub.head(8).with_columns(
        pl.Series("qc", [schema.QC[n] for n in ("OFF_FILE", "MASKED_FRACTION", "FETCH_FAILED", "READ_ERROR",
                                                "NO_PSF", "SATURATED")] + [0, 0], dtype=pl.Int32),
        pl.Series("flags", [0] * 6 + [1 << 10, 0], dtype=pl.Int64),  # bit 10: HOT
        pl.Series("flux", [1e9] * 7 + [float("nan")]))
    zero = sub.head(1).with_columns(pl.lit(0.0).alias("flux"), pl.lit(schema.QC["NONPOSITIVE_FLUX"]).alias("qc"))
    sc = error_scales(sub)
    var = variability(pl.concat([sub, bad]), scales=sc)
    assert var.equals(variability(sub, scales=sc))
    assert var.columns == VARIABILITY.names and var.schema["source_id"] == pl.Utf8
    assert var["n_obs"].sum() == sub.height
    with_zero = variability(pl.concat([sub, zero]), scales=sc)
    assert with_zero["n_obs"].sum() == sub.height + 1
    spec = spectra(pl.concat([sub, bad]), scales=sc)
    assert spec.columns == SPECTRA.names
    assert spec["n_obs"].sum() == sub.height
    assert (spec["flux_err"] > 0).all() and (spec["mjd_min"] <= spec["mjd_max"]).all()
    for c in SPECTRA.columns[1:]:
        assert spec.schema[c.name] == c.dtype, c.name


def test_variability_columns_describe_the_variables(phot, truth):
    var = variability(phot).join(truth, on="source_id")
    const = var.filter(pl.col("var_class") == "constant")
    assert const["chi2_dof"].median() == pytest.approx(1.0, abs=0.2)
    strong = var.filter(pl.col("variable") & (pl.col("var_class") == "periodic"))
    assert strong.height >= 5
    assert (strong["frac_amp"] > 0).all() and (strong["frac_amp_err"] > 0).all()
    assert (strong["timescale"] < 30).mean() >= 0.5  # periods of 2-30 d vary within a pass
    assert const.filter(~pl.col("variable"))["timescale"].is_nan().all()
    lines = var.filter(pl.col("line_wavelength").is_not_nan() & (pl.col("var_class") == "constant"))
    assert lines.height >= 5 and lines["has_line"].all()


def test_plots_and_cli(phot, tmp_path):
    import matplotlib.figure

    sub = phot.filter(pl.col("source_id").is_in(phot["source_id"].unique().sort().head(60).implode()))
    var = variability(sub)
    fig = plot_variability(var, path=tmp_path / "v.png")
    assert isinstance(fig, matplotlib.figure.Figure) and (tmp_path / "v.png").stat().st_size > 1000
    sid = var.filter(pl.col("dof") > 0).sort("chi2_dof")["source_id"][-1]
    fig = plot_source_model(sub, sid, scales=error_scales(sub))
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) >= 2
    run = tmp_path / "run"
    run.mkdir()
    sub.drop("truth").write_parquet(run / "photometry.parquet")
    path = run_cli("variability", run)
    assert pl.read_parquet(path).equals(var)
    run_cli("spectra", run, out=tmp_path / "elsewhere")
    assert pl.read_parquet(tmp_path / "elsewhere" / "spectra.parquet").height > 0
    assert pl.read_parquet(tmp_path / "elsewhere" / "error_scales.parquet").height == 6


@pytest.mark.slow
def test_end_to_end_through_lightcurves_with_understated_variance(tmp_path):
    """lightcurves() on the simulated archive whose VARIANCE planes understate the noise by 2:
    the science products recover the factor and keep constant sources constant."""
    import spxframe

    u = sim.Universe(seed=1, variance_understate=2.0, releases=("qr2",))
    cat = u.catalog().join(u.sources.select("source_id", "field"), on="source_id").filter(
        pl.col("field") == "wide_generic")
    ra0, dec0 = float(cat["ra"].median()), float(cat["dec"].median())
    d2 = ((cat["ra"] - ra0) * np.cos(np.radians(dec0))) ** 2 + (cat["dec"] - dec0) ** 2
    cat = cat.with_columns(d2.alias("_d")).sort("_d").head(80).drop("_d", "field")
    with sim.serve(universe=u) as arc:
        phot = spxframe.lightcurves(cat, "200px", archive=arc, output_dir=tmp_path, progress=False, plots=0)
    run_cli("variability", tmp_path)
    run_cli("spectra", tmp_path)
    # flux_err holds VARIANCE (understated by 2) and the background error measured from the pixels'
    # scatter (not understated): the scale that matches the scatter lies between 1 and 2, near 2
    sc = pl.read_parquet(tmp_path / "error_scales.parquet")
    assert sc.height == 6 and sc["scale"].is_between(1.4, 2.2).all(), sc
    var = pl.read_parquet(tmp_path / "variability.parquet").with_columns(pl.col("source_id").cast(pl.Int64))
    good = phot.filter(pl.col("flux").is_finite())
    tt = truth_table(u, good.with_columns(pl.Series("truth", u.truth_flux(
        good["source_id"].to_numpy(), good["wavelength"].to_numpy(), good["mjd"].to_numpy()))), 2.0)
    r = rates(var, tt)
    assert r["const_fa"] <= 0.1 and r["found"] >= 0.75, r
    raw = rates(variability(phot, error_scale=False).with_columns(pl.col("source_id").cast(pl.Int64)), tt)
    assert raw["const_fa"] > 2 * max(r["const_fa"], 0.05), (raw, r)
    spec = pl.read_parquet(tmp_path / "spectra.parquet")
    assert spec.height > 12 * var.height * 0.5
