"""Catalog normalisation and validation, shared by every stage.

:func:`normalize_catalog` accepts a Polars or pandas DataFrame, an astropy Table, a pyarrow
Table, a dict of columns, or a path to a Parquet/CSV file, and returns a Polars DataFrame with

* ``source_id``: kept in its own type — ``Int64`` for any integer input (never through float),
  ``Utf8`` for text. Integral float ids below 2**53 are accepted as ``Int64`` (with a warning).
  Every table after it (plan, manifest, photometry) keeps that dtype; :func:`restore_source_id`
  casts ids read from elsewhere (e.g. text) to the dtype :func:`source_id_dtype` reports.
* ``ra`` (deg, wrapped into [0, 360)), ``dec`` (deg, |dec| <= 90), Float64, finite.
* ``pmra``, ``pmdec`` (mas/yr; ``pmra`` includes cos δ as Gaia's) and ``ref_epoch`` (Julian
  year) when given; null proper motions become 0; a missing ``ref_epoch`` with proper motions
  defaults to 2016.0 (Gaia DR3) with a logged warning.
* every other user column, unchanged, after these.

Problems raise :class:`spxframe.errors.InputError` naming the column and values: missing
columns (with a suggestion when e.g. ``RA`` or ``ID`` was given), null/NaN/inf coordinates,
|dec| > 90, duplicate ``source_id`` (with examples), an empty catalog.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from spxframe.errors import InputError

__all__ = ["normalize_catalog", "source_id_dtype", "restore_source_id", "REQUIRED"]

log = logging.getLogger("spxframe.catalog")

REQUIRED = ("source_id", "ra", "dec")
OPTIONAL = ("pmra", "pmdec", "ref_epoch")
DEFAULT_REF_EPOCH = 2016.0
_SYNONYMS = {
    "source_id": ("id", "sourceid", "source", "objid", "obj_id", "object_id", "name", "designation", "srcid"),
    "ra": ("ra", "raj2000", "ra_icrs", "ra_deg", "radeg", "alpha", "ra_j2000"),
    "dec": ("dec", "dej2000", "de", "decl", "dec_icrs", "dec_deg", "decdeg", "delta", "dec_j2000", "de_icrs"),
    "pmra": ("pmra", "pm_ra", "pmracosdec"),
    "pmdec": ("pmdec", "pm_dec", "pmde"),
    "ref_epoch": ("ref_epoch", "epoch", "refepoch"),
}


def _to_polars(catalog: Any) -> pl.DataFrame:
    if isinstance(catalog, pl.DataFrame):
        return catalog
    if isinstance(catalog, pl.LazyFrame):
        return catalog.collect()
    if isinstance(catalog, (str, os.PathLike)):
        path = Path(catalog)
        if not path.exists():
            raise InputError(f"catalog file {str(path)!r} does not exist")
        suffix = path.suffix.lower()
        try:
            if suffix in (".parquet", ".pq"):
                return pl.read_parquet(path)
            if suffix in (".csv", ".txt", ".tsv"):
                return pl.read_csv(path, separator="\t" if suffix == ".tsv" else ",",
                                   infer_schema_length=None)
        except Exception as exc:  # noqa: BLE001 - report any reader failure as bad input
            raise InputError(f"could not read catalog file {str(path)!r}: {exc}") from exc
        raise InputError(f"catalog file {str(path)!r}: unsupported type {suffix!r} (use .parquet or .csv)")
    mod = type(catalog).__module__
    if mod.startswith("pandas"):
        import pandas as pd

        if isinstance(catalog, pd.DataFrame):
            df = catalog.reset_index(drop=not _named_index(catalog))
            return pl.from_pandas(df)
    if mod.startswith("astropy"):
        cols = {}
        for name in catalog.colnames:
            col = catalog[name]
            arr = np.ma.asarray(col)
            if getattr(arr, "mask", np.ma.nomask) is not np.ma.nomask and arr.mask.any():
                cols[name] = pl.Series(name, arr.filled(np.nan if arr.dtype.kind == "f" else arr.fill_value)
                                       ).scatter(np.flatnonzero(arr.mask), None)
            else:
                cols[name] = pl.Series(name, np.asarray(arr))
        return pl.DataFrame(cols)
    if mod.startswith("pyarrow"):
        return pl.from_arrow(catalog)
    if isinstance(catalog, dict):
        return pl.DataFrame(catalog)
    raise InputError(f"catalog must be a Polars/pandas DataFrame, astropy/pyarrow Table, dict or a "
                     f".parquet/.csv path, got {type(catalog).__name__}")


def _named_index(df: Any) -> bool:
    return any(n is not None for n in df.index.names)


def _suggest(missing: str, columns: list[str]) -> str:
    lower = {c.lower(): c for c in columns}
    for cand in (missing, *_SYNONYMS.get(missing, ())):
        if cand in lower:
            found = lower[cand]
            return f" (found {found!r}: rename it to {missing!r}, e.g. df.rename({{{found!r}: {missing!r}}}))"
    return ""


def _check_finite(df: pl.DataFrame, col: str) -> None:
    s = df[col]
    bad = s.is_null() | ~s.is_finite()
    if bad.any():
        rows = df.filter(bad).head(5)
        ex = ", ".join(f"source_id={sid!r}: {v!r}" for sid, v in zip(rows["source_id"].to_list(), rows[col].to_list()))
        raise InputError(f"column {col!r} has {int(bad.sum())} null/NaN/inf value(s), e.g. {ex}")


def _source_ids(s: pl.Series) -> pl.Series:
    dt = s.dtype
    if dt.is_integer():
        if dt == pl.UInt64 and s.max() is not None and s.max() > np.iinfo(np.int64).max:
            return s.cast(pl.Utf8)
        return s.cast(pl.Int64)
    if dt in (pl.Utf8, pl.Categorical) or dt == pl.Object:
        out = s.cast(pl.Utf8)
        if (out.str.strip_chars() == "").any():
            raise InputError("column 'source_id' has empty text values")
        return out
    if dt.is_float():
        v = s.to_numpy()
        if not np.all(np.isfinite(v)):
            raise InputError("column 'source_id' has NaN/inf values")
        if np.all(v == np.round(v)) and np.all(np.abs(v) < 2**53):
            log.warning("source_id is floating point; converted to Int64 (store ids as integers or text "
                        "to avoid precision loss above 2**53)")
            return s.cast(pl.Int64)
        raise InputError("column 'source_id' is floating point with non-integral or > 2**53 values: "
                         "ids would lose precision; load it as int64 or text")
    raise InputError(f"column 'source_id' must be integer or text, got {dt}")


def normalize_catalog(catalog: Any) -> pl.DataFrame:
    """Validate and normalise a catalog (see the module docstring); no network traffic.

    Returns a Polars DataFrame: ``source_id``, ``ra``, ``dec`` (deg), ``pmra``, ``pmdec``
    (mas/yr), ``ref_epoch`` (yr) when proper motions were given, then the user's columns.
    """
    df = _to_polars(catalog)
    if df.height == 0:
        raise InputError("the catalog is empty (0 rows)")
    for col in REQUIRED:
        if col not in df.columns:
            raise InputError(f"catalog has no column {col!r}{_suggest(col, df.columns)}; "
                             f"columns are {df.columns[:20]}")
    if df["source_id"].null_count():
        raise InputError(f"column 'source_id' has {df['source_id'].null_count()} null value(s)")
    df = df.with_columns(_source_ids(df["source_id"]).alias("source_id"))
    for col in ("ra", "dec"):
        if not (df[col].dtype.is_numeric()):
            raise InputError(f"column {col!r} must be numeric degrees, got {df[col].dtype}")
        df = df.with_columns(pl.col(col).cast(pl.Float64))
        _check_finite(df, col)
    bad = df.filter(pl.col("dec").abs() > 90)
    if bad.height:
        ex = ", ".join(f"source_id={a!r}: dec={b!r}" for a, b in bad.select("source_id", "dec").head(5).iter_rows())
        raise InputError(f"column 'dec' has {bad.height} value(s) with |dec| > 90 deg, e.g. {ex}")
    df = df.with_columns(pl.when(pl.col("ra") % 360.0 >= 360.0).then(0.0).otherwise(pl.col("ra") % 360.0).alias("ra"))
    dup = df["source_id"].is_duplicated()
    if dup.any():
        ex = df.filter(dup)["source_id"].unique(maintain_order=True).head(5).to_list()
        raise InputError(f"column 'source_id' has {int(dup.sum())} rows with duplicated ids, e.g. {ex}")
    has_pm = any(c in df.columns for c in ("pmra", "pmdec"))
    if has_pm:
        for col in ("pmra", "pmdec"):
            if col not in df.columns:
                raise InputError(f"catalog has {'pmra' if col == 'pmdec' else 'pmdec'} but no {col!r}")
            if not df[col].dtype.is_numeric():
                raise InputError(f"column {col!r} must be numeric mas/yr, got {df[col].dtype}")
            df = df.with_columns(pl.col(col).cast(pl.Float64).fill_nan(None).fill_null(0.0))
            _check_finite(df, col)
        if "ref_epoch" not in df.columns:
            log.warning("catalog has proper motions but no 'ref_epoch': assuming %.1f (Gaia DR3)", DEFAULT_REF_EPOCH)
            df = df.with_columns(pl.lit(DEFAULT_REF_EPOCH).alias("ref_epoch"))
    if "ref_epoch" in df.columns:
        if not df["ref_epoch"].dtype.is_numeric():
            raise InputError(f"column 'ref_epoch' must be a Julian year (e.g. 2016.0), got {df['ref_epoch'].dtype}")
        df = df.with_columns(pl.col("ref_epoch").cast(pl.Float64).fill_nan(None).fill_null(DEFAULT_REF_EPOCH))
        bad = df.filter((pl.col("ref_epoch") < 1800) | (pl.col("ref_epoch") > 2200))
        if bad.height:
            raise InputError(f"column 'ref_epoch' must be a Julian year; got e.g. {bad['ref_epoch'][0]!r} "
                             f"(an MJD or JD?)")
    first = [c for c in (*REQUIRED, *OPTIONAL) if c in df.columns]
    return df.select(first + [c for c in df.columns if c not in first])


def source_id_dtype(catalog: pl.DataFrame) -> pl.DataType:
    """The dtype of a normalised catalog's ``source_id`` (``Int64`` or ``Utf8``)."""
    return catalog.schema["source_id"]


def restore_source_id(df: pl.DataFrame, dtype: pl.DataType) -> pl.DataFrame:
    """Cast ``df``'s text ``source_id`` back to ``dtype`` (the catalog's, see :func:`source_id_dtype`)."""
    return df.with_columns(pl.col("source_id").cast(dtype))
