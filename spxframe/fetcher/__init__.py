"""Stage 3: the manifest → files on disk (cutouts, byte ranges, whole files; retries, claims)."""

from spxframe.fetcher.cache import CacheDir
from spxframe.fetcher.engine import fetch

__all__ = ["fetch", "CacheDir"]
