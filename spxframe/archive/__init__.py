"""Stage 1: IRSA's services (TAP, SIA2, DataLink) → the observations table."""

from spxframe.archive.query import Endpoints, check_query_options, observations, resolve_archive

__all__ = ["Endpoints", "check_query_options", "observations", "resolve_archive"]
