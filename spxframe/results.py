"""Reading a run back: :func:`read` (Polars), astropy tables and time series with units, a
lightkurve ``LightCurve``, per-source CSV files, and the good-data mask they all share.

The good-data mask (:func:`good_mask`)
--------------------------------------
A measurement is *good* when its ``quality`` (:func:`quality`) is 0, that is when

- no hard-bad SPHEREx FLAGS bit (``spherex.HARD_BAD_BITS``: transient, error, non-functional,
  dichroic, missing data, hot, cold, phantom-missing, non-linear, persistence) is set in its
  aperture (``flags``),
- none of the qc bits that make a measurement unusable is set (``UNUSABLE_QC``: OFF_FILE,
  MASKED_FRACTION, FETCH_FAILED, SATURATED, NO_PSF, READ_ERROR), and
- its flux and flux error are finite numbers.

Zero and negative fluxes are data (a faint source scatters around zero): they are good. The
soft qc bits (APERTURE_EDGE, FEW_BACKGROUND, NAN_VARIANCE, LEGACY_PSF_HEADER, NONPOSITIVE_FLUX,
CUTOUT_CLIPPED) describe a measurement that was corrected or is worth a look, not a bad one.

Every row of a source is kept by :func:`to_timeseries`, :func:`to_lightcurve` and
:func:`export_csv`; the mask travels as a ``quality`` column (0 = good) and a ``good`` column.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from spxframe import schema, spherex
from spxframe.errors import InputError
from spxframe.schema import (  # noqa: F401  (the good-data mask and the astropy metadata live in schema)
    CATALOG_UNITS,
    Q_BAD_FLAGS,
    Q_NO_FLUX,
    QUALITY_BITS,
    UNUSABLE_QC,
    astropy_meta,
    describe_quality,
    floats,
    good_mask,
    quality,
    string_lengths,
)
from spxframe.store import Store, is_url


def read(output_dir: str | os.PathLike = "spxframe_out", *, table: str = "photometry",
         lazy: bool = False, output_options: dict | None = None) -> pl.DataFrame | pl.LazyFrame:
    """Read a run's table (``photometry``, ``manifest`` or ``observations``) with Polars.

    ``output_dir`` may be an fsspec URL (``output_options``: its fsspec options, as in
    :func:`spxframe.lightcurves`); ``lazy`` returns a LazyFrame that reads only what a
    query needs (Polars for local files, a pyarrow dataset over fsspec for URLs).
    """
    if table not in schema.TABLES:
        raise InputError(f"table={table!r}: expected one of {list(schema.TABLES)}")
    store = Store(output_dir, output_options, create=False)
    rel = f"{table}.parquet"
    if not store.exists(rel):
        raise InputError(f"{store.path(rel)} does not exist: is {output_dir!s} the output_dir of a spxframe run?")
    if lazy:
        if store.local:
            return pl.scan_parquet(store.path(rel))
        import pyarrow.dataset as ds
        return pl.scan_pyarrow_dataset(ds.dataset(store.path(rel), filesystem=store.fs, format="parquet"))
    return store.read_parquet(rel)


# --------------------------------------------------------------------------------------
# Units in the Parquet files
# --------------------------------------------------------------------------------------


def units_from_parquet(path: str | os.PathLike) -> dict[str, str | None]:
    """Column → unit string, from the ``spxframe`` key of a Parquet file's metadata."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"spxframe")
    if not raw:
        return {}
    return {k: v.get("unit") for k, v in json.loads(raw)["columns"].items()}


# --------------------------------------------------------------------------------------
# The good-data mask
# --------------------------------------------------------------------------------------


def with_quality(df: pl.DataFrame) -> pl.DataFrame:
    """``df`` with ``channel`` (spectral channel in its band), ``quality`` and ``good`` columns."""
    return df.with_columns(pl.Series("channel", channels(df), dtype=pl.Int16),
                           pl.Series("quality", quality(df), dtype=pl.Int32),
                           pl.Series("good", good_mask(df), dtype=pl.Boolean))


def channels(df: pl.DataFrame) -> np.ndarray:
    """Spectral channel of each row within its band (``spherex.channel_of``; -1 when unknown)."""
    out = np.full(df.height, -1, dtype=np.int64)
    if not df.height:
        return out
    bands = df.get_column("band").fill_null("").to_numpy()
    lam = floats(df, "wavelength")
    for band in spherex.BANDS:
        sel = bands == band
        if sel.any():
            out[sel] = spherex.channel_of(band, lam[sel])
    return out


# --------------------------------------------------------------------------------------
# One source's rows
# --------------------------------------------------------------------------------------


def _as_frame(data: Any) -> tuple[pl.DataFrame, dict[str, str | None]]:
    if isinstance(data, (str, os.PathLike)):
        if is_url(data):
            import fsspec
            url = str(data) if str(data).endswith(".parquet") else str(data).rstrip("/") + "/photometry.parquet"
            with fsspec.open(url, "rb") as f:
                return pl.read_parquet(f), {c.name: c.unit for c in schema.PHOTOMETRY.columns}
        p = Path(data)
        if p.is_dir():
            p = p / "photometry.parquet"
        if not p.is_file():
            raise InputError(f"{p} does not exist: expected a photometry.parquet or the output_dir of a run")
        return pl.read_parquet(p), units_from_parquet(p)
    if not isinstance(data, pl.DataFrame):
        raise InputError(f"expected a Polars DataFrame, a photometry.parquet or an output_dir, "
                         f"not {type(data).__name__}")
    return data, {c.name: c.unit for c in schema.PHOTOMETRY.columns}


def source_rows(phot: pl.DataFrame, source_id: Any) -> pl.DataFrame:
    """Every row of ``source_id`` (sorted by time); an :class:`InputError` naming the id when
    the table has no such source."""
    dtype = phot.schema.get("source_id")
    if dtype is None:
        raise InputError("the table has no source_id column: is it a spxframe photometry table?")
    sid = pl.Series([source_id]).cast(dtype, strict=False)[0]
    df = phot.filter(pl.col("source_id") == sid) if sid is not None else phot.clear()
    if df.height == 0:
        some = phot.get_column("source_id").unique(maintain_order=True).head(5).to_list()
        raise InputError(f"source_id={source_id!r} is not in the table ({phot['source_id'].n_unique()} sources, "
                         f"e.g. {some})")
    return df.sort("mjd", "detector", nulls_last=True)


def _select(df: pl.DataFrame, band: str | None, channel: int | None) -> pl.DataFrame:
    if band is not None:
        if band not in spherex.BANDS:
            raise InputError(f"band={band!r}: expected one of {list(spherex.BANDS)} or None")
        df = df.filter(pl.col("band") == band)
    if channel is not None:
        if band is None:
            raise InputError(f"channel={channel!r} needs a band: channels are numbered within each band")
        if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) \
                or not 0 <= channel < spherex.CHANNELS_PER_BAND:
            raise InputError(f"channel={channel!r}: expected an integer 0..{spherex.CHANNELS_PER_BAND - 1}")
        df = df.filter(pl.Series(channels(df) == int(channel)))
    return df


# --------------------------------------------------------------------------------------
# astropy and lightkurve
# --------------------------------------------------------------------------------------


def to_qtable(data: Any):
    """An astropy ``QTable`` of a photometry table (DataFrame, Parquet file or output_dir).

    Columns with units become ``Quantity`` columns (flux in µJy, wavelength in µm, ...).
    """
    import astropy.units as u
    from astropy.table import QTable

    df, units = _as_frame(data)
    qt = QTable()
    for name in df.columns:
        col = df.get_column(name)
        arr = col.to_numpy() if col.dtype != pl.Utf8 else np.asarray(col.to_list(), dtype=object)
        unit = units.get(name)
        if unit and col.dtype.is_numeric():
            qt[name] = arr.astype(float) * u.Unit(unit)
        else:
            qt[name] = arr
    return qt


def _times(df: pl.DataFrame, time_column: str):
    """astropy Time of ``time_column``: ``bjd_tdb`` holds a full Julian date (TDB), ``mjd`` an MJD
    (UTC). Missing times are masked. Shown as MJD in either scale."""
    from astropy.time import Time

    if time_column not in ("bjd_tdb", "mjd"):
        raise InputError(f"time_column={time_column!r}: expected 'bjd_tdb' (BJD, TDB) or 'mjd' (MJD, UTC)")
    vals = np.ma.masked_invalid(floats(df, time_column))
    if time_column == "bjd_tdb":
        t = Time(vals, format="jd", scale="tdb")
    else:
        t = Time(vals, format="mjd", scale="utc")
    t.format = "mjd"
    return t


def to_timeseries(data: Any, *, source_id: Any = None, time_column: str = "bjd_tdb"):
    """An astropy ``TimeSeries`` (time = BJD_TDB, or MJD UTC with ``time_column='mjd'``).

    With ``source_id``, only that source's rows (an :class:`InputError` names an unknown id).
    Every row is kept (missing times are masked); ``quality``, ``good`` and ``channel`` columns
    carry the good-data mask (see the module docstring).
    """
    from astropy.timeseries import TimeSeries

    df, _ = _as_frame(data)
    df = source_rows(df, source_id) if source_id is not None else df
    df = with_quality(df)
    t = _times(df, time_column)
    return TimeSeries(time=t, data=to_qtable(df))


def to_lightcurve(phot: Any, source_id: Any, band: str | None = None, channel: int | None = None):
    """A ``lightkurve.LightCurve`` of one source: time BJD (TDB), flux and flux_err in µJy.

    ``band`` (``"D1"`` … ``"D6"``; None = all bands) and ``channel`` (0..16 within ``band``,
    ``spherex.channel_of``) select rows. Every selected row is kept; columns ``quality`` (0 =
    good, bits in :data:`QUALITY_BITS`), ``good``, ``wavelength``, ``bandwidth`` (µm), ``band``,
    ``channel``, ``detector``, ``obs_id``, ``mjd``, ``snr``, ``mag_ab``, ``flags`` and ``qc``.
    ``phot``: a photometry DataFrame, its Parquet file or a run's output_dir. Needs lightkurve
    (``pip install spxframe[lightkurve]``).
    """
    import astropy.units as u

    with warnings.catch_warnings():  # lightkurve warns at import about optional modules
        warnings.simplefilter("ignore")
        import lightkurve as lk

    df, _ = _as_frame(phot)
    df = with_quality(_select(source_rows(df, source_id), band, channel))
    lc = lk.LightCurve(time=_times(df, "bjd_tdb"), flux=floats(df, "flux") * u.uJy,
                       flux_err=floats(df, "flux_err") * u.uJy, quality=df.get_column("quality").to_numpy())
    for name, unit in (("wavelength", u.um), ("bandwidth", u.um), ("mjd", u.d), ("mag_ab", u.mag)):
        lc[name] = floats(df, name) * unit
    for name in ("band", "obs_id"):
        lc[name] = np.asarray(df.get_column(name).fill_null("").to_list(), dtype=str)
    for name in ("channel", "detector", "flags", "qc", "good", "snr"):
        lc[name] = df.get_column(name).to_numpy()
    lc.meta.update({"OBJECT": str(source_id), "LABEL": f"source {source_id}", "MISSION": "SPHEREx",
                    "BAND": band or "all", "CHANNEL": channel, "TIMESYS": "TDB", "TIMEREF": "SOLARSYSTEM"})
    return lc


def source_view(phot: pl.DataFrame, source_id: Any) -> pl.DataFrame:
    """One source's light curve at its wavelengths: rows sorted by wavelength then time, with
    ``channel`` (``spherex.channel_of``) so that repeated visits at the same wavelength line up."""
    df = source_rows(phot, source_id)
    return df.with_columns(pl.Series("channel", channels(df), dtype=pl.Int16)).sort("wavelength", "mjd")


# --------------------------------------------------------------------------------------
# CSV export
# --------------------------------------------------------------------------------------

#: CSV column → photometry column (the names an SPXQuery user's scripts read)
CSV_COLUMNS: dict[str, str] = {
    "obs_id": "obs_id", "mjd": "mjd", "flux": "flux", "flux_error": "flux_err", "mag_ab": "mag_ab",
    "mag_ab_error": "mag_ab_err", "wavelength": "wavelength", "bandwidth": "bandwidth", "band": "band",
    "flag": "flags", "snr": "snr",
}


def _csv_name(source_id: Any) -> str:
    s = "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in str(source_id))
    return (s or "_") + ".csv"


def export_csv(output_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
               output_options: dict | None = None) -> list[Path]:
    """One CSV light curve per source: ``<out>/<source_id>.csv`` (default ``output_dir/lightcurves``).

    Columns: obs_id, mjd (UTC), flux, flux_error (µJy), mag_ab, mag_ab_error, wavelength,
    bandwidth (µm), band, flag (SPHEREx FLAGS over the aperture), snr, then detector, bjd_tdb,
    channel, qc, quality and good (the good-data mask). Every row is kept, sorted by time.
    ``out`` must be a local folder; ``output_dir`` may be a URL (then ``out`` is required).
    """
    if out is None:
        if is_url(output_dir):
            raise InputError(f"output_dir={str(output_dir)!r} is a URL: give a local folder for the CSV files")
        out = Path(output_dir) / "lightcurves"
    out = Path(out)
    if out.is_file():
        raise InputError(f"{out} is a file; expected a folder for the CSV files")
    phot = read(output_dir, output_options=output_options)
    out.mkdir(parents=True, exist_ok=True)
    cols = [pl.col(src).alias(dst) for dst, src in CSV_COLUMNS.items()]
    cols += [pl.col(c) for c in ("detector", "bjd_tdb", "channel", "qc", "quality", "good")]
    paths = []
    for (sid,), df in with_quality(phot).partition_by("source_id", as_dict=True, maintain_order=True).items():
        p = out / _csv_name(sid)
        df.sort("mjd", "detector", nulls_last=True).select(cols).write_csv(p)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------------------
# The fetched-file cache on disk
# --------------------------------------------------------------------------------------

#: folders of a cache_dir that hold fetched files (``spxframe.fetcher`` writes them)
CACHE_FOLDERS: tuple[str, ...] = ("data", "psf")


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cache_size(cache_dir: str | os.PathLike) -> int:
    """Bytes held by the fetched files (``data/``, ``psf/``) under ``cache_dir`` (a run's output
    folder when no ``cache_dir`` was given)."""
    root = Path(os.path.expanduser(str(cache_dir)))
    return sum(_du(root / d) for d in CACHE_FOLDERS if (root / d).exists())


def clean_cache(cache_dir: str | os.PathLike, *, parts: bool = False, dry_run: bool = False
                ) -> tuple[list[str], int]:
    """Delete the fetched files (``data/``, ``psf/``) under ``cache_dir``; with ``parts`` also the
    per-cell results (``parts/``: a rerun then measures everything again). The tables
    (``*.parquet``), ``run.json`` and ``plots/`` stay. Returns (folders deleted, bytes freed).

    A rerun of the same run fetches the files again. Do not clean a cache a run is using.
    """
    import shutil

    if is_url(cache_dir):
        raise InputError(f"cache_dir={str(cache_dir)!r}: the cache is a local folder")
    root = Path(os.path.expanduser(str(cache_dir)))
    if not root.is_dir():
        raise InputError(f"cache_dir={str(cache_dir)!r} is not a folder")
    names = [d for d in (*CACHE_FOLDERS, *(("parts",) if parts else ())) if (root / d).is_dir()]
    nbytes = sum(_du(root / d) for d in names)
    if not dry_run:
        for d in names:
            shutil.rmtree(root / d)
    return [str(root / d) for d in names], nbytes
