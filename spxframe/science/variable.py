"""``variability(phot)``: one row per source, the scatter of its measurements about its own
spectral model.

SPHEREx sees a source at a new wavelength on almost every visit, so a light curve mixes the
spectrum with the variability. Each source's fluxes are fitted, all visits together, by a smooth
spectral model (:mod:`spxframe.science.kernels`: ln-flux polynomial in ln λ and 1/λ — power laws
exactly, blackbodies to ~0.3 % — plus at most one emission line when the data demand it and no
visit that sees it is also bright away from it), with the formal errors scaled by the run's
empirical error scale per detector (:mod:`spxframe.science.scales`). ``p_constant`` is the χ²
probability of that scatter for a constant source; ``variable`` is ``p_constant < fap``.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from spxframe.science import model as md
from spxframe.science import scales as sc
from spxframe.science import stats
from spxframe.science.schemas import VARIABILITY


def _columns(prep: md.Prepared, fit: md.Fit, fap: float) -> dict[str, np.ndarray]:
    n = np.diff(prep.starts)
    dof = sc.dof_of(prep, fit)
    p = md.p_constant(fit.chi2, dof)
    var = np.nan_to_num(p, nan=1.0) < fap
    ev, eerr, tau, nvis = stats.source_stats(prep.starts, prep.mjd, prep.flux - fit.model, fit.sigma, fit.lev, var)
    w = 1.0 / fit.sigma**2
    idx = np.repeat(np.arange(n.size), n)
    mean = np.bincount(idx, w * fit.model, n.size) / np.maximum(np.bincount(idx, w, n.size), 1e-300)
    amean = np.abs(mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        famp = np.sqrt(ev) / amean
        ferr = np.where(ev > 0, eerr / (2.0 * np.sqrt(ev) * amean), np.sqrt(eerr) / amean)
        chi2_dof = np.where(dof > 0, fit.chi2 / dof, np.nan)
    return {"n_obs": n, "n_visits": nvis, "n_params": fit.npar, "chi2": fit.chi2, "dof": dof, "chi2_dof": chi2_dof,
            "p_constant": p, "variable": var, "mean_flux": mean, "excess_var": ev, "excess_var_err": eerr,
            "frac_amp": famp, "frac_amp_err": ferr, "timescale": tau, "line_wavelength": fit.lines[:, 0],
            "line_sigma": fit.lines[:, 1], "line_amp": fit.lines[:, 2]}


def variability(phot: pl.DataFrame, *, fap: float = sc.FAP, scales: pl.DataFrame | None = None,
                error_scale: bool = True, mode: str = "lines") -> pl.DataFrame:
    """One row per source of ``phot`` (a photometry table) with good measurements: the variability
    statistics of :data:`spxframe.science.schemas.VARIABILITY`.

    ``fap``: false-alarm probability of ``variable`` (default 0.0027, 3 σ). ``scales``: a table
    from :func:`error_scales` (default: estimated from ``phot`` itself, which needs the run's
    ensemble of sources); ``error_scale=False`` uses the formal errors as they are. ``mode``:
    ``"lines"`` (the spectral model), ``"continuum"`` (no line) or ``"constant"`` (the naive
    scatter about the mean flux, which calls sources with steep spectra or lines variable).
    """
    prep = md.prepare(phot)
    if not error_scale:
        fit = md.fit(prep, np.ones(prep.groups.height), mode)
    elif scales is None:
        _, fit = sc.estimate(prep, mode=mode, fap=fap)
    else:
        fit = md.fit(prep, sc.scale_array(prep, scales), mode)
    return from_fit(prep, fit, fap)


def from_fit(prep: md.Prepared, fit: md.Fit, fap: float = sc.FAP) -> pl.DataFrame:
    """The :data:`VARIABILITY` table of an existing fit."""
    out = pl.DataFrame({"source_id": prep.ids, **_columns(prep, fit, fap)})
    return out.select([pl.col(c.name).cast(c.dtype) if c.name != "source_id" else pl.col(c.name)
                       for c in VARIABILITY.columns])
