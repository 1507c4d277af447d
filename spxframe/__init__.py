"""spxframe: SPHEREx light curves and spectra for whole catalogs.

    >>> import spxframe
    >>> phot = spxframe.lightcurves(catalog_df, cutout_size="200px")

Stages (each takes and returns a Polars table): :func:`observations` → :func:`plan` →
:func:`fetch` → :func:`measure`; :func:`lightcurves` runs them all and writes Parquet;
:func:`read` reads a run back. ``spxframe.sim`` is a simulated IRSA archive on loopback.

No logging is configured at import; messages go to the ``spxframe`` logger.
"""

from __future__ import annotations

import importlib
import logging

from spxframe._version import __version__

__all__ = [
    "lightcurves",
    "observations",
    "plan",
    "fetch",
    "measure",
    "parse_cutout_size",
    "parse_cutout_center",
    "read",
    "spectra",
    "variability",
    "to_lightcurve",
    "errors",
    "__version__",
]

logging.getLogger("spxframe").addHandler(logging.NullHandler())

# ``plan`` and ``fetch`` share their names with their submodules: importing the submodule
# (``import spxframe.plan``) would rebind the package attribute to the module, so bind the
# functions eagerly; the submodule import system then leaves them alone.
from spxframe.fetcher.engine import fetch  # noqa: E402
from spxframe.planner.manifest import plan  # noqa: E402

_LAZY = {
    "lightcurves": ("spxframe.run.driver", "lightcurves"),
    "read": ("spxframe.results", "read"),
    "observations": ("spxframe.archive", "observations"),
    "measure": ("spxframe.photometry", "measure"),
    "parse_cutout_size": ("spxframe.sizes", "parse_cutout_size"),
    "parse_cutout_center": ("spxframe.sizes", "parse_cutout_center"),
    "spectra": ("spxframe.science", "spectra"),
    "variability": ("spxframe.science", "variability"),
    "to_lightcurve": ("spxframe.results", "to_lightcurve"),
    "errors": ("spxframe.errors", None),
}


def __getattr__(name: str):  # lazy: importing spxframe must not pull numba/astropy
    if name in _LAZY:
        mod, attr = _LAZY[name]
        m = importlib.import_module(mod)
        return m if attr is None else getattr(m, attr)
    raise AttributeError(f"module 'spxframe' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
