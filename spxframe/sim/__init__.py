"""spxframe.sim: the simulated IRSA archive (sky, instrument, virtual files, HTTP services, faults).

``Universe`` is the truth (observations table, virtual files, cutouts); ``serve`` runs the
IRSA-like HTTP services on 127.0.0.1 (TAP, SIA2, DataLink, IBE files/cutouts, cloud copy);
``Faults`` injects failures. The sim shares only ``spxframe.schema`` constants with the client.
"""

from __future__ import annotations

from .faults import Faults
from .server import Archive, main, serve

__all__ = ["Universe", "BadRequest", "serve", "Faults", "Archive", "main"]


def __getattr__(name):  # Universe/BadRequest are imported lazily (sim-data modules)
    if name == "Universe":
        from .universe import Universe
        return Universe
    if name == "BadRequest":
        from .cutout import BadRequest
        return BadRequest
    raise AttributeError(f"module 'spxframe.sim' has no attribute {name!r}")
