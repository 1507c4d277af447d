"""Empirical error scale per detector (and release) from the ensemble of sources in a run.

Formal errors of SPHEREx photometry are known to understate the scatter. For every group of
rows (detector, plus ``release`` when the table has that column) the scale is the robust width
(1.4826 × median absolute value) of the leverage-corrected residuals about each source's
spectral model, in units of the current errors:

1. fit every source's continuum with the formal errors; scale₁ from the residuals of all sources;
2. refit with scale₁ (lines allowed), flag the sources that are variable at the default
   false-alarm probability, take scale₂ from the residuals of the others; the final fit uses it.

Groups with fewer than :data:`MIN_ROWS` usable rows take the median scale of the others (1 when
none has enough). The formal errors in the photometry table are never changed.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from spxframe.science import model as md

MIN_ROWS: int = 30  #: usable rows a group needs for its own scale
MIN_DOF: int = 3  #: a source is tested (and its residuals used) when its fit leaves this many dof
FAP: float = 0.0027  #: default false-alarm probability of ``variable`` (3 σ two-sided)
MAX_LEVERAGE: float = 0.8  #: rows fitted this closely by their own value say nothing about the noise


def _robust(prep: md.Prepared, fit: md.Fit, scale: np.ndarray, use_source: np.ndarray) -> np.ndarray:
    n = np.diff(prep.starts)
    z = (prep.flux - fit.model) / fit.sigma / np.sqrt(np.clip(1.0 - fit.lev, 1e-6, None))
    ok = np.repeat(use_source, n) & (fit.lev < MAX_LEVERAGE) & np.isfinite(z)
    new = np.full(scale.size, np.nan)
    for g in range(scale.size):
        zz = z[ok & (prep.group == g)]
        if zz.size >= MIN_ROWS:
            new[g] = scale[g] * 1.4826 * np.median(np.abs(zz))
    if np.all(np.isnan(new)):
        return np.where(np.isnan(new), scale, new) if scale.size else scale
    return np.where(np.isnan(new), np.nanmedian(new), new)


def dof_of(prep: md.Prepared, fit: md.Fit) -> np.ndarray:
    """Degrees of freedom per source (0 where fewer than :data:`MIN_DOF` remain)."""
    dof = np.diff(prep.starts) - fit.npar
    return np.where(dof >= MIN_DOF, dof, 0.0)


def estimate(prep: md.Prepared, *, mode: str = "lines", fap: float = FAP, iterations: int = 1
             ) -> tuple[np.ndarray, md.Fit]:
    """Scale per group of ``prep`` and the final fit made with it (see module docstring)."""
    scale = np.ones(prep.groups.height)
    if prep.starts.size < 2:
        return scale, md.fit(prep, scale, mode)
    fit = md.fit(prep, scale, "continuum" if mode == "lines" else mode)
    dof = dof_of(prep, fit)
    scale = _robust(prep, fit, scale, dof > 0)
    for _ in range(iterations):
        fit = md.fit(prep, scale, mode)
        dof = dof_of(prep, fit)
        var = md.p_constant(fit.chi2, dof) < fap
        scale = _robust(prep, fit, scale, (dof > 0) & ~var)
    return scale, md.fit(prep, scale, mode)


def scales_table(prep: md.Prepared, scale: np.ndarray) -> pl.DataFrame:
    """The error scales as a table (schema :data:`spxframe.science.schemas.ERROR_SCALES`)."""
    counts = pl.DataFrame({"group": prep.group, "source_id": prep.rows["source_id"]}).group_by("group").agg(
        pl.len().alias("n_rows"), pl.col("source_id").n_unique().alias("n_sources"))
    out = prep.groups.with_row_index("group").with_columns(pl.Series("scale", np.asarray(scale, float)))
    out = out.join(counts.with_columns(pl.col("group").cast(pl.UInt32)), on="group", how="left")
    return out.drop("group").with_columns(pl.col("n_rows").fill_null(0).cast(pl.Int64),
                                          pl.col("n_sources").fill_null(0).cast(pl.Int64))


def scale_array(prep: md.Prepared, scales: pl.DataFrame) -> np.ndarray:
    """Per-group scale of ``prep`` from a table returned by :func:`error_scales` (1 where absent)."""
    keys = [c for c in prep.groups.columns if c in scales.columns]
    j = prep.groups.join(scales.select(*keys, "scale"), on=keys, how="left", maintain_order="left")
    return j["scale"].fill_null(1.0).to_numpy().astype(float)


def error_scales(phot: pl.DataFrame, *, mode: str = "lines", fap: float = FAP) -> pl.DataFrame:
    """Empirical error scale per detector (and release): columns detector, [release], scale,
    n_rows, n_sources. Multiply ``flux_err`` by ``scale`` for errors that match the scatter."""
    prep = md.prepare(phot)
    scale, _ = estimate(prep, mode=mode, fap=fap)
    return scales_table(prep, scale)
