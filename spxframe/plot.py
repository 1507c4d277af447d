"""Light-curve and spectrum figures (matplotlib), and a run summary.

``plot_source(phot, source_id)`` draws flux against time coloured by wavelength and flux
against wavelength coloured by time, with error bars; points with quality problems (any
``qc`` bit other than NONPOSITIVE_FLUX, or FLAGS bits in the hard-bad set) are drawn as open
grey circles so they stay visible but do not read as good data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from spxframe import schema, spherex

log = logging.getLogger("spxframe.plot")

_SOFT_QC = schema.QC["NONPOSITIVE_FLUX"] | schema.QC["APERTURE_EDGE"] | schema.QC["CUTOUT_CLIPPED"] \
    | schema.QC["LEGACY_PSF_HEADER"]


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        try:
            matplotlib.use("Agg", force=False)
        except Exception:  # pragma: no cover - an interactive backend is already in use
            pass
    import matplotlib.pyplot as plt

    return plt


def _good(df: pl.DataFrame) -> np.ndarray:
    qc = df.get_column("qc").fill_null(0).to_numpy()
    flags = df.get_column("flags").fill_null(0).to_numpy()
    return ((qc & ~_SOFT_QC) == 0) & ((flags & spherex.DEFAULT_BAD_MASK) == 0)


def plot_source(phot: pl.DataFrame, source_id: Any, *, path: str | Path | None = None, title: str | None = None):
    """Two panels for one source: flux (µJy) vs time (MJD), flux vs wavelength (µm).

    Returns the matplotlib Figure; writes a PNG when ``path`` is given.
    """
    plt = _plt()
    sid = pl.Series([source_id]).cast(phot.schema["source_id"], strict=False)[0]
    df = phot.filter((pl.col("source_id") == sid) & pl.col("flux").is_not_nan()).sort("mjd")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    if df.height == 0:
        for ax in (ax1, ax2):
            ax.text(0.5, 0.5, "no measurements", ha="center", va="center", transform=ax.transAxes)
    else:
        t, lam = df["mjd"].to_numpy(), df["wavelength"].to_numpy()
        f, e = df["flux"].to_numpy(), df["flux_err"].to_numpy()
        good = _good(df)
        for ax, x, c, cmap, clabel in ((ax1, t, lam, "turbo", "wavelength [µm]"),
                                       (ax2, lam, t - t.min(), "viridis", f"days since MJD {t.min():.1f}")):
            ax.errorbar(x[good], f[good], yerr=e[good], fmt="none", ecolor="0.7", elinewidth=0.8, zorder=1)
            sc = ax.scatter(x[good], f[good], c=c[good], cmap=cmap, s=14, zorder=2,
                            vmin=np.nanmin(c), vmax=np.nanmax(c))
            if (~good).any():
                ax.scatter(x[~good], f[~good], facecolors="none", edgecolors="0.5", s=18, zorder=2,
                           label=f"flagged ({(~good).sum()})")
                ax.legend(loc="best", fontsize=8, frameon=False)
            ax.axhline(0, color="0.85", lw=0.8, zorder=0)
            fig.colorbar(sc, ax=ax, label=clabel, pad=0.01)
            ax.set_ylabel("flux density [µJy]")
        ax1.set_xlabel("time [MJD]")
        ax2.set_xlabel("wavelength [µm]")
        ax1.set_title("light curve", fontsize=10)
        ax2.set_title("spectrum", fontsize=10)
    fig.suptitle(title or f"source {source_id}  ({df.height} measurements)", fontsize=11)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def plot_summary(phot: pl.DataFrame, *, path: str | Path | None = None):
    """Run summary: measurements per band, SNR distribution, counts of each qc bit."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), constrained_layout=True)
    bands = list(spherex.BANDS)
    counts = [phot.filter(pl.col("band") == b).height for b in bands]
    axes[0].bar(bands, counts, color="tab:blue")
    axes[0].set_title("measurements per band", fontsize=10)
    snr = phot.get_column("snr").drop_nulls().drop_nans().to_numpy() if phot.height else np.array([])
    if snr.size:
        lo = max(np.percentile(snr, 0.5), -10)
        axes[1].hist(np.clip(snr, lo, 1000), bins=60, color="tab:orange")
        axes[1].set_yscale("log")
    axes[1].set_title("SNR", fontsize=10)
    axes[1].set_xlabel("flux / flux_err")
    qc = phot.get_column("qc").fill_null(0).to_numpy() if phot.height else np.array([], dtype=int)
    names = [q.name for q in schema.QC_BITS]
    vals = [int(((qc & q.value) > 0).sum()) for q in schema.QC_BITS]
    axes[2].barh(names, vals, color="tab:red")
    axes[2].set_title(f"qc bits ({phot.height} rows)", fontsize=10)
    axes[2].tick_params(axis="y", labelsize=7)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def write_plots(phot: pl.DataFrame, plot_dir: str | Path, *, n_sources: int = 10) -> list[Path]:
    """PNG figures for the ``n_sources`` best-measured sources and a run summary."""
    plot_dir = Path(plot_dir)
    paths = [plot_dir / "summary.png"]
    plot_summary(phot, path=paths[0])
    if phot.height:
        best = (phot.filter(pl.col("flux").is_not_nan()).group_by("source_id")
                .agg(pl.col("snr").median().alias("m"), pl.len().alias("n"))
                .sort(["n", "m"], descending=True).head(n_sources))
        for sid in best.get_column("source_id").to_list():
            p = plot_dir / f"source_{sid}.png"
            plot_source(phot, sid, path=p)
            paths.append(p)
    log.info("wrote %d plots to %s", len(paths), plot_dir)
    return paths
