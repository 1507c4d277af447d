"""Figures of the science products (matplotlib; each function returns the Figure).

``plot_source_model(phot, source_id)``: the source's spectrum coloured by time with its spectral
model, and its residual light curve (data minus the spectral model) by band.
``plot_variability(var)``: the run's variability statistic against brightness.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from spxframe import spherex
from spxframe.mpl import pyplot
from spxframe.science import model as md
from spxframe.science import scales as sc

_BAND_COLOURS = dict(zip(spherex.BANDS, ("tab:blue", "tab:cyan", "tab:green", "tab:olive", "tab:orange", "tab:red")))


def _plt():
    return pyplot()


def _save(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        _plt().close(fig)
    return fig


def plot_source_model(phot: pl.DataFrame, source_id: Any, *, scales: pl.DataFrame | None = None,
                      path: str | Path | None = None):
    """Two panels for one source: flux (µJy) against wavelength coloured by time with the spectral
    model, and flux minus the model against time by band. ``scales``: the run's error scales
    (:func:`spxframe.science.error_scales`; default: the formal errors)."""
    plt = _plt()
    sid = pl.Series([source_id]).cast(phot.schema["source_id"], strict=False)[0]
    prep = md.prepare(phot.filter(pl.col("source_id") == sid))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    if prep.lam.size == 0:
        for ax in (ax1, ax2):
            ax.text(0.5, 0.5, "no good measurements", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    scale = np.ones(prep.groups.height) if scales is None else sc.scale_array(prep, scales)
    fit = md.fit(prep, scale)
    t = prep.mjd - prep.mjd.min()
    ax1.errorbar(prep.lam, prep.flux, yerr=fit.sigma, fmt="none", ecolor="0.75", elinewidth=0.8, zorder=1)
    s = ax1.scatter(prep.lam, prep.flux, c=t, cmap="viridis", s=14, zorder=2)
    o = np.argsort(prep.lam)
    ax1.plot(prep.lam[o], fit.model[o], color="k", lw=1.0, zorder=3, label="spectral model")
    fig.colorbar(s, ax=ax1, label=f"days since MJD {prep.mjd.min():.1f}", pad=0.01)
    ax1.set_xlabel("wavelength [µm]")
    ax1.set_ylabel("flux density [µJy]")
    ax1.legend(loc="best", fontsize=8, frameon=False)
    band = prep.rows["band"].to_numpy() if "band" in prep.rows.columns else np.array(
        [f"D{d}" for d in prep.rows["detector"].to_list()])
    for b, colour in _BAND_COLOURS.items():
        m = band == b
        if m.any():
            ax2.errorbar(prep.mjd[m], prep.flux[m] - fit.model[m], yerr=fit.sigma[m], fmt="o", ms=3.5,
                         color=colour, elinewidth=0.8, label=b)
    ax2.axhline(0, color="0.6", lw=0.8)
    ax2.set_xlabel("time [MJD]")
    ax2.set_ylabel("flux − spectral model [µJy]")
    ax2.legend(loc="best", fontsize=8, frameon=False, ncol=2)
    n = prep.lam.size
    dof = max(n - fit.npar[0], 0)
    chi = f"χ²/dof = {fit.chi2[0] / dof:.2f}" if dof > 0 else "untested"
    ax1.set_title("spectrum", fontsize=10)
    ax2.set_title(f"residual light curve ({chi})", fontsize=10)
    fig.suptitle(f"source {source_id}  ({n} measurements)", fontsize=11)
    return _save(fig, path)


def plot_variability(var: pl.DataFrame, *, path: str | Path | None = None):
    """χ²/dof about the spectral model and the fractional amplitude against brightness, one point
    per source of a :func:`spxframe.science.variability` table; variables in red."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    v = var.filter(pl.col("dof") > 0)
    flux = np.clip(v["mean_flux"].to_numpy(), 1e-3, None)
    isvar = v["variable"].to_numpy().astype(bool)
    for ax, col, label in ((ax1, "chi2_dof", "χ²/dof about the spectral model"),
                           (ax2, "frac_amp", "fractional rms amplitude")):
        y = v[col].to_numpy()
        ax.scatter(flux[~isvar], y[~isvar], s=8, color="0.5", label=f"constant ({(~isvar).sum()})")
        ax.scatter(flux[isvar], y[isvar], s=10, color="tab:red", label=f"variable ({isvar.sum()})")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-2 if col == "frac_amp" else 1.0)
        ax.set_xlabel("mean flux density [µJy]")
        ax.set_ylabel(label)
        ax.legend(loc="best", fontsize=8, frameon=False)
    ax1.axhline(1.0, color="0.7", lw=0.8)
    fig.suptitle(f"variability of {v.height} sources", fontsize=11)
    return _save(fig, path)
