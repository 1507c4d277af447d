"""Stage 4: files on disk + catalog → the photometry table (numba kernels beside slow references)."""

from spxframe.photometry.forced import measure

__all__ = ["measure"]
