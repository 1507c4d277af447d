"""Good-data selection and the per-source spectral model fitted to all of a source's visits.

``prepare(phot)`` keeps the rows that are data (the run's good-data mask,
:func:`spxframe.schema.good_mask`) and sorts them by source;
``fit(prep, scale, mode)`` fits every source's spectral model (:mod:`spxframe.science.kernels`)
with the formal errors multiplied by a per-row error scale and returns the per-source χ² and the
per-row model and leverage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from spxframe import schema
from spxframe.science import kernels

MODES: dict[str, int] = {"constant": kernels.MODE_CONSTANT, "continuum": kernels.MODE_CONTINUUM,
                         "lines": kernels.MODE_LINES}
#: a line enters the model when it lowers χ² by at least this much
LINE_DCHI2: float = 20.0
#: relative flux-calibration floor added in quadrature to every error (the spectral model itself
#: follows power laws exactly and blackbodies to ~0.3 %)
FLOOR: float = 0.005


def good_rows(phot: pl.DataFrame) -> pl.DataFrame:
    """Rows of ``phot`` that are data: the run's good-data mask (:func:`spxframe.schema.good_mask`:
    no hard-bad FLAGS bit, no unusable qc bit, finite flux) with a positive error and a wavelength.
    Zero and negative fluxes are data."""
    good = pl.Series(schema.good_mask(phot)) if phot.height else pl.Series([], dtype=pl.Boolean)
    return phot.filter(good & (pl.col("flux_err") > 0) & pl.col("wavelength").is_finite() & (pl.col("wavelength") > 0))


@dataclass
class Prepared:
    """Good rows sorted by (source_id, mjd) and the row offsets of each source."""

    rows: pl.DataFrame
    ids: pl.Series  #: source_id of each slice
    starts: np.ndarray  #: slice k is rows [starts[k], starts[k+1])
    lam: np.ndarray
    mjd: np.ndarray
    flux: np.ndarray
    err: np.ndarray
    group: np.ndarray  #: error-scale group of each row (index into ``groups``)
    groups: pl.DataFrame  #: detector (and release) of each group


def _group_cols(df: pl.DataFrame) -> list[str]:
    return ["detector"] + (["release"] if "release" in df.columns else [])


def prepare(phot: pl.DataFrame) -> Prepared:
    """Select good rows and lay them out by source for the kernels."""
    rows = good_rows(phot).sort("source_id", "mjd")
    cols = _group_cols(rows)
    # a null detector or release is a group of its own (a join never matches nulls)
    rows = rows.with_columns(pl.col(c).fill_null(-1 if rows.schema[c].is_integer() else "") for c in cols)
    groups = rows.select(cols).unique().sort(cols).with_row_index("group")
    rows = rows.join(groups, on=cols, how="left", maintain_order="left")
    counts = rows.group_by("source_id", maintain_order=True).len()
    starts = np.zeros(counts.height + 1, np.int64)
    starts[1:] = np.cumsum(counts["len"].to_numpy())
    return Prepared(rows=rows, ids=counts["source_id"], starts=starts,
                    lam=rows["wavelength"].to_numpy().astype(np.float64),
                    mjd=rows["mjd"].to_numpy().astype(np.float64),
                    flux=rows["flux"].to_numpy().astype(np.float64),
                    err=rows["flux_err"].to_numpy().astype(np.float64),
                    group=rows["group"].to_numpy().astype(np.int64), groups=groups.drop("group"))


@dataclass
class Fit:
    """Per-source χ², fitted parameter count and line; per-row model and leverage."""

    chi2: np.ndarray
    npar: np.ndarray
    lines: np.ndarray  #: (sources, 3): line centre µm, Gaussian σ µm, amplitude µJy (NaN: no line)
    model: np.ndarray
    lev: np.ndarray
    sigma: np.ndarray  #: per-row error used (formal × scale)


def row_sigma(prep: Prepared, scale: np.ndarray, floor: float = FLOOR) -> np.ndarray:
    """Per-row error: ``err × scale[group]`` and ``floor × |flux|`` in quadrature."""
    return np.hypot(prep.err * np.asarray(scale, float)[prep.group], floor * np.abs(prep.flux))


def fit(prep: Prepared, scale: np.ndarray, mode: str = "lines", *, line_dchi2: float = LINE_DCHI2,
        floor: float = FLOOR) -> Fit:
    """Fit every source's spectral model with the errors of :func:`row_sigma`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
    sigma = row_sigma(prep, scale, floor)
    w = 1.0 / sigma**2
    chi2, npar, lines, model, lev = kernels.fit_all(prep.starts, prep.lam, prep.mjd, prep.flux, w, MODES[mode],
                                                    float(line_dchi2))
    return Fit(chi2=chi2, npar=npar, lines=lines, model=model, lev=lev, sigma=sigma)


def p_constant(chi2: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """P(χ² ≥ observed | constant source) for each source (NaN where dof ≤ 0)."""
    return kernels.chi2_sf_many(np.asarray(chi2, float), np.asarray(dof, float))
