"""Flux accuracy against the simulated truth, measured the same way by every photometry test."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from spxframe.schema import QC


@dataclass
class Accuracy:
    """``ratio``: median flux/truth of bright clean rows; ``pull_median``, ``pull_width`` (robust
    sigma) of (flux − truth)/flux_err over clean rows; how many rows were bright and clean."""

    ratio: float
    pull_median: float
    pull_width: float
    n_bright: int
    n_clean: int


def accuracy(df: pl.DataFrame, true: np.ndarray, isolated: np.ndarray) -> Accuracy:
    """Clean = isolated and none of SATURATED, APERTURE_EDGE, FEW_BACKGROUND; bright = clean with
    truth above 50 sigma and below 3e4 µJy."""
    f, e = df["flux"].to_numpy(), df["flux_err"].to_numpy()
    soft = QC["SATURATED"] | QC["APERTURE_EDGE"] | QC["FEW_BACKGROUND"]
    clean = isolated & ((df["qc"].to_numpy() & soft) == 0)
    bright = clean & (true > 50 * e) & (true < 3e4)
    pull = (f[clean] - true[clean]) / e[clean]
    med = float(np.median(pull))
    return Accuracy(float(np.median(f[bright] / true[bright])), med, float(1.4826 * np.median(np.abs(pull - med))),
                    int(bright.sum()), int(clean.sum()))
