"""matplotlib for files and notebooks: ``pyplot()`` picks the headless Agg backend unless a
notebook or an interactive backend is already in use (the one place that decides)."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot``, on the Agg backend unless an inline or interactive one is in use."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        try:
            matplotlib.use("Agg", force=False)
        except Exception:  # pragma: no cover - an interactive backend is already in use
            pass
    import matplotlib.pyplot as plt

    return plt
