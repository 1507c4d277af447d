"""Progress bars: one place that makes them (tqdm), so every stage's bar looks and behaves alike."""

from __future__ import annotations

import warnings
from typing import Any


def bar(*, total: int | None, desc: str, unit: str, enabled: bool = True, leave: bool = True) -> Any:
    """A tqdm bar named ``desc`` counting ``unit``; disabled (drawing nothing) when not ``enabled``.

    ``tqdm.auto`` draws a widget in Jupyter and text elsewhere; without ipywidgets it warns and
    falls back to text: the warning is silenced, the text bar kept.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave)
