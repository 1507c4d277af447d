"""``spectra(phot)``: one row per (source, channel), every visit of a source averaged per
spectral channel (:func:`spxframe.spherex.channel_edges`, 17 per band, one LVF resolution element
wide) with inverse-variance weights and honest errors (the formal errors scaled by the run's
empirical error scale per detector, :mod:`spxframe.science.scales`)."""

from __future__ import annotations

import numpy as np
import polars as pl

from spxframe import spherex
from spxframe.science import model as md
from spxframe.science import scales as sc
from spxframe.science.schemas import SPECTRA


def channels(band_index: np.ndarray, wavelength: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(channel index, channel width µm) of each row from its band's index in ``spherex.BANDS``
    (-1: unknown band, no channel); wavelengths just outside their band's nominal range go to its
    first or last channel."""
    ch = np.full(wavelength.size, -1, np.int64)
    width = np.full(wavelength.size, np.nan)
    for i, name in enumerate(spherex.BANDS):
        m = band_index == i
        if not m.any():
            continue
        edges = spherex.channel_edges(name)
        c = spherex.channel_of(name, wavelength[m])
        c = np.where(c >= 0, c, np.where(wavelength[m] < edges[0], 0, spherex.CHANNELS_PER_BAND - 1))
        ch[m] = c
        width[m] = np.diff(edges)[c]
    return ch, width


def spectra(phot: pl.DataFrame, *, scales: pl.DataFrame | None = None, error_scale: bool = True) -> pl.DataFrame:
    """Per-source spectra of :data:`spxframe.science.schemas.SPECTRA` from a photometry table.

    ``scales``: a table from :func:`error_scales` (default: estimated from ``phot``);
    ``error_scale=False`` uses the formal errors as they are.
    """
    prep = md.prepare(phot)
    if not error_scale:
        scale = np.ones(prep.groups.height)
    elif scales is None:
        scale, _ = sc.estimate(prep)
    else:
        scale = sc.scale_array(prep, scales)
    return from_prepared(prep, scale)


def from_prepared(prep: md.Prepared, scale: np.ndarray) -> pl.DataFrame:
    """The :data:`SPECTRA` table of prepared rows with error scale ``scale`` per group."""
    sigma = md.row_sigma(prep, scale)
    rows = prep.rows
    band = rows["band"] if "band" in rows.columns else pl.Series([f"D{d}" for d in rows["detector"].to_list()])
    names = list(spherex.BANDS)
    bidx = band.cast(pl.Utf8).replace_strict(names, list(range(len(names))), default=-1,
                                             return_dtype=pl.Int64).to_numpy()
    ch, width = channels(bidx, prep.lam)
    src = np.repeat(np.arange(prep.starts.size - 1), np.diff(prep.starts))
    ok = (ch >= 0) & (bidx >= 0)
    per_source = len(names) * spherex.CHANNELS_PER_BAND
    key = (src * per_source + bidx * spherex.CHANNELS_PER_BAND + ch)[ok]
    uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
    w = (1.0 / sigma**2)[ok]
    m = uniq.size
    sw = np.bincount(inv, w, m)
    mjd = prep.mjd[ok]
    mjd_min = np.full(m, np.inf)
    mjd_max = np.full(m, -np.inf)
    np.minimum.at(mjd_min, inv, mjd)
    np.maximum.at(mjd_max, inv, mjd)
    out = pl.DataFrame({
        "source_id": prep.ids.gather(uniq // per_source),
        "band": np.array(names)[(uniq % per_source) // spherex.CHANNELS_PER_BAND],
        "channel": uniq % spherex.CHANNELS_PER_BAND,
        "wavelength": np.bincount(inv, w * prep.lam[ok], m) / sw,
        "bandwidth": width[ok][first],
        "flux": np.bincount(inv, w * prep.flux[ok], m) / sw,
        "flux_err": 1.0 / np.sqrt(sw),
        "n_obs": np.bincount(inv, None, m),
        "mjd_min": mjd_min, "mjd_max": mjd_max,
    })
    return out.select([pl.col(c.name).cast(c.dtype) if c.name != "source_id" else pl.col(c.name)
                       for c in SPECTRA.columns])
