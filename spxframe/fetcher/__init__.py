"""Stage 3: the manifest → files on disk (cutouts, byte ranges, whole files; retries, claims)."""

from spxframe.fetcher.engine import fetch

__all__ = ["fetch"]
