"""Light-curve and spectrum figures (matplotlib), and a run summary.

``plot_source(phot, source_id)`` draws one light curve per band (flux against time, coloured by
wavelength within the band, since every visit falls on a different part of the filter) and
below them the spectrum (flux against wavelength, coloured by time). ``channel=k`` keeps only
spectral channel ``k`` of each band (``spherex.channel_of``). The time axis is broken at gaps
longer than ``gap_days`` (the survey revisits a field every ~6 months).

Good data (:func:`spxframe.results.good_mask`: no hard-bad FLAGS bit, no unusable qc bit, a
finite flux; zero and negative fluxes included) are filled circles with error bars. Measurements
with a hard-bad FLAGS bit in the aperture are black crosses, those with an unusable qc bit
(saturated, too much masked) red triangles; rows with no flux at all are counted in the legend.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from spxframe import schema, spherex
from spxframe.mpl import pyplot
from spxframe.results import Q_BAD_FLAGS, Q_NO_FLUX, _as_frame, channels, quality, source_rows

log = logging.getLogger("spxframe.plot")

GOOD_STYLE = dict(marker="o", s=16, zorder=3)
BAD_FLAGS_STYLE = dict(marker="x", s=26, color="k", linewidths=1.0, zorder=4)
UNUSABLE_STYLE = dict(marker="^", s=26, facecolors="none", edgecolors="tab:red", linewidths=1.0, zorder=4)


def _plt():
    return pyplot()


def time_segments(t: np.ndarray, gap_days: float) -> list[tuple[float, float]]:
    """(start, end) of the runs of ``t`` (days) separated by gaps longer than ``gap_days``."""
    t = np.unique(t[np.isfinite(t)])
    if t.size == 0:
        return []
    cut = np.flatnonzero(np.diff(t) > gap_days)
    starts = np.r_[t[0], t[cut + 1]]
    ends = np.r_[t[cut], t[-1]]
    return list(zip(starts.tolist(), ends.tolist()))


def _classes(df: pl.DataFrame) -> dict[str, np.ndarray]:
    """Row masks: good, hard-bad FLAGS, unusable qc (both with a flux), and no flux."""
    q = quality(df)
    no_flux = (q & Q_NO_FLUX) != 0
    bad_flags = ~no_flux & ((q & Q_BAD_FLAGS) != 0)
    return {"good": q == 0, "bad_flags": bad_flags, "unusable": ~no_flux & ~bad_flags & (q != 0),
            "no_flux": no_flux}


def _draw(ax, x, f, e, cls, color, norm, cmap):
    """Good points (coloured, with error bars) and the two kinds of bad points of one panel."""
    g = cls["good"]
    ax.errorbar(x[g], f[g], yerr=e[g], fmt="none", ecolor="0.75", elinewidth=0.8, zorder=2)
    sc = ax.scatter(x[g], f[g], c=color[g], cmap=cmap, norm=norm, **GOOD_STYLE)
    ax.scatter(x[cls["bad_flags"]], f[cls["bad_flags"]], **BAD_FLAGS_STYLE)
    ax.scatter(x[cls["unusable"]], f[cls["unusable"]], **UNUSABLE_STYLE)
    lo, hi = ax.get_ylim()
    if lo < 0 < hi:  # a zero line where fluxes reach it; a bright source keeps its own scale
        ax.axhline(0, color="0.85", lw=0.8, zorder=0)
    return sc


def _break_marks(axes: list) -> None:
    """Hide the spines between time segments and draw // marks on the break."""
    for i, ax in enumerate(axes):
        kw = dict(marker=[(-1, -1.5), (1, 1.5)], markersize=8, linestyle="none", color="0.3", mec="0.3",
                  mew=1, clip_on=False, transform=ax.transAxes)
        if i > 0:
            ax.spines["left"].set_visible(False)
            ax.tick_params(axis="y", which="both", left=False, labelleft=False)
            ax.plot([0, 0], [0, 1], **kw)
        if i < len(axes) - 1:
            ax.spines["right"].set_visible(False)
            ax.plot([1, 1], [0, 1], **kw)


def release_starts(df: pl.DataFrame) -> list[tuple[float, str]]:
    """(first MJD, name) of each release after the first one present in ``df`` (its ``release``
    column): where a light curve changes file format and calibration."""
    if "release" not in df.columns or not df.height:
        return []
    first = df.filter(pl.col("release").is_not_null() & pl.col("mjd").is_finite()) \
        .group_by("release").agg(pl.col("mjd").min()).sort("mjd")
    return [(float(m), str(r).upper()) for r, m in first.iter_rows()][1:]


def _mark_releases(axes, segs, starts: list[tuple[float, str]]) -> None:
    for mjd, name in starts:
        for ax, (t0, t1) in zip(axes, segs):
            pad = max(2.0, 0.05 * (t1 - t0))
            if t0 - pad <= mjd <= t1 + pad:
                ax.axvline(mjd, color="0.35", ls="--", lw=0.9, zorder=0, label=f"{name} from here")
                ax.text(mjd, 0.98, f" {name}", transform=ax.get_xaxis_transform(), va="top", fontsize=7,
                        color="0.3")


def _band_row(fig, axes, df: pl.DataFrame, band: str, segs) -> None:
    """One band's light curve over the time segments ``segs`` (one axis each), coloured by wavelength."""
    import matplotlib.colors as mcolors

    lo, hi, _ = spherex.BANDS[band]
    norm = mcolors.Normalize(lo, hi)
    t, lam = df["mjd"].to_numpy(), df["wavelength"].to_numpy()
    f, e = df["flux"].to_numpy(), df["flux_err"].to_numpy()
    cls = _classes(df)
    sc = None
    for ax, (t0, t1) in zip(axes, segs):
        pad = max(2.0, 0.05 * (t1 - t0))
        sc = _draw(ax, t, f, e, cls, lam, norm, "turbo")
        ax.set_xlim(t0 - pad, t1 + pad)
        ax.locator_params(axis="x", nbins=max(2, min(5, int((t1 - t0) / 5) + 2)))
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    _break_marks(axes)
    _mark_releases(axes, segs, release_starts(df))
    axes[0].set_ylabel(f"{band} flux [µJy]")
    fig.colorbar(sc, ax=axes, label=f"{band} λ [µm]", pad=0.01, aspect=12)


def _spectrum(fig, ax, df: pl.DataFrame) -> None:
    import matplotlib.colors as mcolors

    t = df["mjd"].to_numpy()
    ok = np.isfinite(t)
    t0 = float(np.nanmin(t)) if ok.any() else 0.0
    norm = mcolors.Normalize(0, max(float(np.nanmax(t)) - t0, 1.0) if ok.any() else 1.0)
    sc = _draw(ax, df["wavelength"].to_numpy(), df["flux"].to_numpy(), df["flux_err"].to_numpy(),
               _classes(df), t - t0, norm, "viridis")
    ax.set_xlabel("wavelength [µm]")
    ax.set_ylabel("flux [µJy]")
    fig.colorbar(sc, ax=ax, label=f"days since MJD {t0:.1f}", pad=0.01, aspect=12)


def _n(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def _legend(fig, cls: dict[str, np.ndarray]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="none", marker="o", color="0.45",
                      label=f"good ({int(cls['good'].sum())}): no hard-bad FLAGS, no unusable qc bit")]
    if cls["bad_flags"].any():
        handles.append(Line2D([], [], ls="none", marker="x", color="k",
                              label=f"hard-bad FLAGS bit in the aperture ({int(cls['bad_flags'].sum())})"))
    if cls["unusable"].any():
        handles.append(Line2D([], [], ls="none", marker="^", mfc="none", mec="tab:red",
                              label=f"unusable qc: saturated / masked ({int(cls['unusable'].sum())})"))
    if cls["no_flux"].any():
        handles.append(Line2D([], [], ls="none", label=f"{_n(int(cls['no_flux'].sum()), 'row')} without a flux "
                              "(off the file, fetch or read failed, no PSF, masked)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)


def plot_source(phot: Any, source_id: Any, *, bands: list[str] | None = None, channel: int | None = None,
                gap_days: float = 60.0, spectrum: bool = True, path: str | Path | None = None,
                title: str | None = None):
    """Per-band light curves of one source (flux in µJy against MJD, coloured by wavelength), time
    axis broken at gaps over ``gap_days``, and its spectrum below (``spectrum=False`` to omit).

    ``bands``: the bands to draw (default every band the source has); ``channel``: keep only that
    spectral channel (0..16) of each band. ``phot``: a photometry DataFrame, its Parquet file or
    a run's output_dir. An unknown ``source_id`` raises :class:`~spxframe.errors.InputError`.
    Returns the matplotlib Figure; writes a PNG when ``path`` is given.
    """
    from spxframe.errors import InputError

    plt = _plt()
    frame, _ = _as_frame(phot)
    df = source_rows(frame, source_id)
    if bands is not None:
        unknown = [b for b in bands if b not in spherex.BANDS]
        if unknown:
            raise InputError(f"bands={bands!r}: unknown {unknown}; expected some of {list(spherex.BANDS)}")
        df = df.filter(pl.col("band").is_in(list(bands)))
    if channel is not None:
        if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) \
                or not 0 <= channel < spherex.CHANNELS_PER_BAND:
            raise InputError(f"channel={channel!r}: expected an integer 0..{spherex.CHANNELS_PER_BAND - 1}")
        df = df.filter(pl.Series(channels(df) == int(channel)))
    cls = _classes(df)
    plotted = df.filter(pl.Series(~cls["no_flux"]))
    present = [b for b in spherex.BANDS if b in set(plotted["band"].to_list())]
    segs = time_segments(plotted["mjd"].to_numpy(), gap_days) or [(0.0, 1.0)]
    nrows = max(len(present), 1) + (1 if spectrum and present else 0)
    fig = plt.figure(figsize=(12, 1.9 * nrows + 1.2), layout="constrained")
    widths = [max(t1 - t0, 0.08 * (segs[-1][1] - segs[0][0]), 1.0) for t0, t1 in segs]
    gs = fig.add_gridspec(nrows, len(segs), width_ratios=widths)
    if not present:
        ax = fig.add_subplot(gs[0, :])
        ax.text(0.5, 0.5, "no measurements with a flux", ha="center", va="center", transform=ax.transAxes)
    top: list = []
    for i, band in enumerate(present):
        axes = [fig.add_subplot(gs[i, j], sharex=top[j] if top else None) for j in range(len(segs))]
        top = top or axes
        for ax in axes[1:]:
            ax.sharey(axes[0])
        _band_row(fig, axes, plotted.filter(pl.col("band") == band), band, segs)
        if i < len(present) - 1:
            for ax in axes:
                ax.tick_params(axis="x", labelbottom=False)
        else:
            axes[0].set_xlabel("MJD (UTC)" if len(segs) == 1 else f"MJD (UTC); axis broken at gaps > {gap_days:g} d",
                               loc="left")
    if spectrum and present:
        _spectrum(fig, fig.add_subplot(gs[-1, :]), plotted)
    _legend(fig, cls)
    what = f", channel {channel}" if channel is not None else ""
    fig.suptitle(title or f"source {source_id}: {_n(df.height, 'measurement')} in {_n(len(present), 'band')}{what}",
                 fontsize=11)
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
