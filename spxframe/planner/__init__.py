"""Stage 2: catalog × observations → the manifest (per-image access chosen by a cost model)."""

from spxframe.planner.manifest import plan

__all__ = ["plan"]
