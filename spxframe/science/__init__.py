"""Science products beside the photometry: per-source spectra and variability that knows the
spectrum.

    >>> from spxframe.science import spectra, variability, error_scales
    >>> spec = spectra(phot)          # one row per (source, channel)
    >>> var = variability(phot)       # one row per source
    >>> both = products(phot)         # both, and the error scales, with one error-scale estimate

Modules are named so that they never shadow these functions (``spectrum`` holds ``spectra``,
``variable`` holds ``variability``).
"""

from __future__ import annotations

from spxframe.science.products import products
from spxframe.science.scales import error_scales
from spxframe.science.schemas import ERROR_SCALES, SPECTRA, VARIABILITY
from spxframe.science.spectrum import spectra
from spxframe.science.variable import variability

__all__ = ["spectra", "variability", "error_scales", "products", "SPECTRA", "VARIABILITY", "ERROR_SCALES"]
