"""Output schemas of the science products (declared in :mod:`spxframe.schema`, with every table)."""

from __future__ import annotations

from spxframe.schema import ERROR_SCALES, SPECTRA, VARIABILITY

__all__ = ["SPECTRA", "VARIABILITY", "ERROR_SCALES"]
