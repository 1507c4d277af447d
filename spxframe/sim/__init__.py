"""spxframe.sim: the simulated IRSA archive (sky, instrument, virtual files, HTTP services, faults).

``Universe`` is the truth (observations table, virtual files, cutouts); ``serve`` runs the
IRSA-like HTTP services on 127.0.0.1 (TAP, SIA2, DataLink, IBE files/cutouts, cloud copy);
``Faults`` injects failures; ``main`` is ``spxframe sim serve``. Four rooms: ``world`` (sky,
instrument, survey, frames, headers, cutouts, ``Universe``), ``r7`` (pipeline R7 files of QR3, the
pre-R7 gains, the calibration products), ``services`` (HTTP) and ``adql`` (the TAP query engine);
modules import one way (no cycles). ``Universe(releases=("qr2", "qr3"))`` is the default sky,
``releases=("qr2",)`` the QR2-only one. The sim shares only ``spxframe.spherex`` constants with the
client.
"""

from __future__ import annotations

from .services.faults import Faults
from .services.server import Archive, main, serve

__all__ = ["Universe", "BadRequest", "SurveyConfig", "serve", "Faults", "Archive", "main"]


def __getattr__(name):  # the world (numba, astropy) is imported on first use
    if name == "Universe":
        from .world.universe import Universe
        return Universe
    if name == "BadRequest":
        from .world.cutout import BadRequest
        return BadRequest
    if name == "SurveyConfig":
        from .world.survey import SurveyConfig
        return SurveyConfig
    raise AttributeError(f"module 'spxframe.sim' has no attribute {name!r}")
