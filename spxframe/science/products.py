"""``products(phot)``: spectra, variability and the error scales of a run in one pass (the error
scale is estimated once and both products use it), for ``lightcurves()`` and the CLI."""

from __future__ import annotations

import polars as pl

from spxframe.science import model as md
from spxframe.science import scales as sc
from spxframe.science import spectrum, variable


def products(phot: pl.DataFrame, *, fap: float = sc.FAP) -> dict[str, pl.DataFrame]:
    """``{"spectra": ..., "variability": ..., "error_scales": ...}`` from a photometry table
    (schemas in :mod:`spxframe.science.schemas`)."""
    prep = md.prepare(phot)
    scale, fit = sc.estimate(prep, fap=fap)
    return {"spectra": spectrum.from_prepared(prep, scale), "variability": variable.from_fit(prep, fit, fap),
            "error_scales": sc.scales_table(prep, scale)}
