"""Reading a run back: :func:`read` (Polars), QTable / TimeSeries with units, a per-source view."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from spxframe import schema, spherex
from spxframe.errors import InputError
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


def units_from_parquet(path: str | os.PathLike) -> dict[str, str | None]:
    """Column → unit string, from the ``spxframe`` key of a Parquet file's metadata."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"spxframe")
    if not raw:
        return {}
    return {k: v.get("unit") for k, v in json.loads(raw)["columns"].items()}


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
        return pl.read_parquet(p), units_from_parquet(p)
    return data, {c.name: c.unit for c in schema.PHOTOMETRY.columns}


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


def to_timeseries(data: Any, *, source_id: Any = None, time_column: str = "bjd_tdb"):
    """An astropy ``TimeSeries`` (time = BJD_TDB, or MJD UTC with ``time_column='mjd'``).

    With ``source_id``, only that source's rows (the natural input of lightkurve-style tools).
    """
    from astropy.time import Time
    from astropy.timeseries import TimeSeries

    df, units = _as_frame(data)
    if source_id is not None:
        sid = pl.Series([source_id]).cast(df.schema["source_id"], strict=False)[0]
        df = df.filter(pl.col("source_id") == sid)
    df = df.filter(pl.col(time_column).is_not_null() & pl.col(time_column).is_not_nan()).sort(time_column)
    if time_column == "bjd_tdb":
        t = Time(df.get_column("bjd_tdb").to_numpy(), format="mjd", scale="tdb")
    else:
        t = Time(df.get_column("mjd").to_numpy(), format="mjd", scale="utc")
    qt = to_qtable(df)
    return TimeSeries(time=t, data=qt)


def source_view(phot: pl.DataFrame, source_id: Any) -> pl.DataFrame:
    """One source's light curve at its wavelengths: rows sorted by wavelength then time.

    Adds ``channel`` (the wavelength bin of ~one LVF channel, index within the band) so that
    repeated visits at the same wavelength line up.
    """
    sid = pl.Series([source_id]).cast(phot.schema["source_id"], strict=False)[0]
    df = phot.filter(pl.col("source_id") == sid)
    out = []
    for band, (lo, hi, _r) in spherex.BANDS.items():
        sub = df.filter(pl.col("band") == band)
        if sub.height:
            ch = np.floor(17 * np.log(sub["wavelength"].to_numpy() / lo) / np.log(hi / lo))
            out.append(sub.with_columns(pl.Series("channel", np.clip(ch, 0, 16)).cast(pl.Int16)))
    if not out:
        return df.with_columns(pl.lit(None, dtype=pl.Int16).alias("channel"))
    return pl.concat(out).sort("wavelength", "mjd")
