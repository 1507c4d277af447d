"""Every table's schema and units, and our qc bits.

This is the one place where column names, dtypes, units and descriptions are declared.
Every stage builds its output table from these declarations (``empty(TABLE)``,
``conform(df, TABLE)``), and the Parquet writer stores the units in the file metadata
(``parquet_metadata(TABLE)``) so astropy and Polars readers get them.

Instrument and file facts (bands, bit numbers, file geometry) live in :mod:`spxframe.spherex`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from spxframe.spherex import DEFAULT_BAD_MASK, FLAG_BITS

# --------------------------------------------------------------------------------------
# Our quality bits (photometry column ``qc``)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QcBit:
    bit: int
    name: str
    doc: str

    @property
    def value(self) -> int:
        return 1 << self.bit


QC_BITS: tuple[QcBit, ...] = (
    QcBit(0, "OFF_FILE", "the source position is outside this file's pixels; flux is NaN"),
    QcBit(1, "APERTURE_EDGE",
          "the aperture crosses the file (cutout or detector) edge; missing pixels corrected by the PSF"),
    QcBit(2, "MASKED_FRACTION", "less than 1 - max_masked_fraction of the PSF-weighted aperture is usable "
          "(masked, off the file, or a saturated core); flux NaN"),
    QcBit(3, "FEW_BACKGROUND", "too few unmasked background pixels; background taken from the ZODI plane only"),
    QcBit(4, "NAN_VARIANCE", "at least one aperture pixel had NaN variance and was masked"),
    QcBit(5, "LEGACY_PSF_HEADER", "PSF zone cards in the legacy (VERSION 6.4-6.5.5, no +psffix1) order; corrected"),
    QcBit(6, "NONPOSITIVE_FLUX", "flux <= 0: the measurement is kept, mag_ab is NaN"),
    QcBit(7, "CUTOUT_CLIPPED", "the cutout was clipped at the detector edge (smaller than requested)"),
    QcBit(8, "FETCH_FAILED", "the file could not be fetched; flux is NaN (see manifest error)"),
    QcBit(9, "SATURATED", "an aperture pixel carries OVERFLOW (bit 1) or BLOOM (bit 26)"),
    QcBit(10, "NO_PSF", "no usable PSF zone; aperture correction is NaN and flux NaN"),
    QcBit(11, "READ_ERROR", "the file could not be read or is not a SPHEREx L2 file; flux is NaN"),
    QcBit(12, "GAIN_UNCORRECTED", "a QR2 image measured without the QR2 -> R7 gain correction the run asked for "
          "(the product lacks this detector or the pixels); gain_factor 1.0"),
)
QC: dict[str, int] = {q.name: q.value for q in QC_BITS}


def describe_qc(value: int) -> list[str]:
    """Names of the qc bits set in ``value``."""
    return [q.name for q in QC_BITS if int(value) & q.value]


# --------------------------------------------------------------------------------------
# Table schemas
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    dtype: Any  # a polars dtype
    unit: str | None
    description: str


@dataclass(frozen=True)
class Table:
    name: str
    key: tuple[str, ...]
    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def schema_for(self, id_dtype: Any = None) -> dict[str, Any]:
        """Column → polars dtype; ``source_id`` takes ``id_dtype`` (the catalog's; text if None)."""
        return {c.name: (id_dtype or pl.Utf8) if c.dtype is CATALOG_ID else c.dtype for c in self.columns}

    @property
    def schema(self) -> dict[str, Any]:
        return self.schema_for(None)

    def __getitem__(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


C = Column
#: the dtype of ``source_id``: whatever the user's catalog has (Int64 or Utf8), kept in every table
CATALOG_ID = object()
F64, F32, I64, I32, I16, I8, U32, STR, BOOL = (
    pl.Float64, pl.Float32, pl.Int64, pl.Int32, pl.Int16, pl.Int8, pl.UInt32, pl.Utf8, pl.Boolean,
)

OBSERVATIONS = Table(
    "observations",
    ("obs_id", "detector"),
    (
        C("obs_id", STR, None, "observation id, e.g. 2025W18_2B_0001_1 (no detector)"),
        C("detector", I8, None, "detector number 1-6"),
        C("band", STR, None, "D1..D6"),
        C("collection", STR, None, "obs_collection, e.g. spherex_qr2 or spherex_qr2_deep"),
        C("release", STR, None, "the release the collection belongs to (spxframe.spherex.RELEASES), e.g. qr2"),
        C("obs_publisher_did", STR, None, "ivo://irsa.ipac/<collection>?<obs_id>/D<n>"),
        C("t_min", F64, "d", "exposure start, MJD (UTC)"),
        C("t_max", F64, "d", "exposure end, MJD (UTC)"),
        C("mjd_mid", F64, "d", "mid-exposure, MJD (UTC)"),
        C("exptime", F64, "s", "exposure time"),
        C("em_min", F64, "um", "shortest wavelength on the detector"),
        C("em_max", F64, "um", "longest wavelength on the detector"),
        C("s_ra", F64, "deg", "field centre RA (ICRS)"),
        C("s_dec", F64, "deg", "field centre Dec (ICRS)"),
        C("s_region", STR, None, "footprint, STC-S POLYGON ICRS of the outer pixel corners"),
        C("file_url", STR, None, "IBE URL of the full L2 MEF"),
        C("cloud_key", STR, None, "key of the file in the public cloud bucket (may be empty when the copy lags)"),
        C("size", I64, "byte", "file size"),
        C("checksum", STR, None, "MD5 of the file as the archive reports it (may be empty)"),
    ),
)

MANIFEST = Table(
    "manifest",
    ("source_id", "obs_id", "detector"),
    (
        C("source_id", CATALOG_ID, None, "catalog source id (the catalog's dtype)"),
        C("obs_id", STR, None, "observation id"),
        C("detector", I8, None, "detector number 1-6"),
        C("band", STR, None, "D1..D6"),
        C("ra", F64, "deg", "source RA used for planning"),
        C("dec", F64, "deg", "source Dec used for planning"),
        C("x_parent", F64, "pix", "predicted zero-based x in the parent (full) image"),
        C("y_parent", F64, "pix", "predicted zero-based y in the parent (full) image"),
        C("access", STR, None, "cutout | range | full"),
        C("request_id", STR, None, "id of the transfer this row's pixels come from (shared by rows of one transfer)"),
        C("url", STR, None, "the exact request URL (IBE cutout, cloud object or full file)"),
        C("ranges", STR, None, "JSON list of [start, stop) byte ranges for access=range, else empty"),
        C("max_gap", I64, "byte", "access=range: byte ranges closer than this are read as one (0: the boxes' "
                                  "own columns, one range per box row per plane; >= one row: full-width rows); "
                                  "null: fetch's max_gap"),
        C("box_x0", I32, "pix", "zero-based first column of the planned box in the parent image"),
        C("box_y0", I32, "pix", "zero-based first row of the planned box in the parent image"),
        C("box_nx", I32, "pix", "planned box width (after clipping to the detector)"),
        C("box_ny", I32, "pix", "planned box height (after clipping to the detector)"),
        C("clipped", BOOL, None, "the requested box was clipped at the detector edge"),
        C("psf_key", STR, None, "cache key of the PSF cube (detector + calibration version) for range reads"),
        C("predicted_bytes", I64, "byte", "predicted transfer size of this row's request "
                                              "(shared requests counted once per request_id)"),
        C("path", STR, None, "local file path once fetched"),
        C("status", STR, None, "planned | done | failed"),
        C("bytes", I64, "byte", "bytes transferred for the request"),
        C("attempts", I32, None, "transfer attempts made"),
        C("error", STR, None, "last error text for failed transfers"),
    ),
)

PHOTOMETRY = Table(
    "photometry",
    ("source_id", "obs_id", "detector"),
    (
        C("source_id", CATALOG_ID, None, "catalog source id (the catalog's dtype)"),
        C("obs_id", STR, None, "observation id"),
        C("detector", I8, None, "detector number 1-6"),
        C("band", STR, None, "D1..D6"),
        C("mjd", F64, "d", "mid-exposure time, MJD (UTC)"),
        C("bjd_tdb", F64, "d", "barycentric mid-exposure time, BJD (TDB); from the spacecraft position "
                                "X_SC/Y_SC/Z_SC when in the header, else from the Earth's position"),
        C("wavelength", F64, "um", "central wavelength at the source's parent pixel (see wave_source)"),
        C("bandwidth", F64, "um", "bandwidth at the source's parent pixel (see wave_source)"),
        C("x", F64, "pix", "zero-based x of the source in the measured file"),
        C("y", F64, "pix", "zero-based y of the source in the measured file"),
        C("flux", F64, "uJy", "total point-source flux density (aperture-corrected, background-subtracted)"),
        C("flux_err", F64, "uJy", "1-sigma error of flux, from VARIANCE and the background error"),
        C("snr", F64, None, "flux / flux_err"),
        C("mag_ab", F64, "mag", "AB magnitude (NaN when flux <= 0)"),
        C("mag_ab_err", F64, "mag", "1-sigma error of mag_ab"),
        C("background", F64, "MJy/sr", "local background residual per pixel after the scaled ZODI model"),
        C("background_err", F64, "MJy/sr", "error of the background per pixel"),
        C("zodi_scale", F64, None, "fitted scale of the ZODI plane to the local sky"),
        C("aperture_radius", F64, "pix", "aperture radius"),
        C("aperture_correction", F64, None, "total / (unmasked aperture) PSF fraction applied to the aperture sum"),
        C("masked_fraction", F64, None, "PSF-weighted fraction of the aperture that was masked"),
        C("pixel_area", F64, "arcsec2", "pixel solid angle at the source"),
        C("flags", I64, None, "SPHEREx FLAGS bits OR-ed over the aperture"),
        C("qc", I32, None, "spxframe quality bits (see spxframe.schema.QC_BITS)"),
        C("file", STR, None, "path of the measured file"),
        C("release", STR, None, "the archive release of the image (from its collection), e.g. qr2, qr3; "
                                 "null from measure() on files"),
        C("gain_factor", F64, None, "QR2 -> R7 gain factor applied at the source's pixel (1.0: none; R7 images)"),
        C("wave_source", STR, None, "where wavelength and bandwidth came from: 'spectral_wcs' (the calibration "
          "product's CWAVE/CBAND maps, bilinear at the source's parent pixel) or 'wcs-wave' (the file's "
          "WCS-WAVE lookup through its W system, ~1 nm)"),
    ),
)

SPECTRA = Table(
    "spectra",
    ("source_id", "band", "channel"),
    (
        C("source_id", CATALOG_ID, None, "catalog source id (the catalog's dtype)"),
        C("band", STR, None, "D1..D6"),
        C("channel", I8, None, "channel 0-16 of the band (spxframe.spherex.channel_edges)"),
        C("wavelength", F64, "um", "inverse-variance weighted mean wavelength of the channel's measurements"),
        C("bandwidth", F64, "um", "width of the channel (one LVF resolution element, constant resolving power)"),
        C("flux", F64, "uJy", "inverse-variance weighted mean flux density over all visits"),
        C("flux_err", F64, "uJy", "1-sigma error of flux from the errors scaled by the run's empirical error scale "
                                  "(and the relative calibration floor)"),
        C("n_obs", I32, None, "measurements averaged"),
        C("mjd_min", F64, "d", "first measurement, MJD (UTC)"),
        C("mjd_max", F64, "d", "last measurement, MJD (UTC)"),
    ),
)

VARIABILITY = Table(
    "variability",
    ("source_id",),
    (
        C("source_id", CATALOG_ID, None, "catalog source id (the catalog's dtype)"),
        C("n_obs", I32, None, "good measurements used"),
        C("n_visits", I32, None, "visits (measurements less than 0.05 d apart form one visit)"),
        C("n_params", I8, None, "parameters of the source's spectral model (continuum 1-4, +3 with a line)"),
        C("chi2", F64, None, "chi-square of the measurements about the source's spectral model (scaled errors)"),
        C("dof", F64, None, "degrees of freedom (0: too few measurements to test)"),
        C("chi2_dof", F64, None, "chi2 / dof"),
        C("p_constant", F64, None, "probability of chi2 this large or larger for a constant source; NaN untested"),
        C("variable", BOOL, None, "p_constant < the false-alarm probability (default 0.0027)"),
        C("mean_flux", F64, "uJy", "mean of the spectral model over the measurements (brightness)"),
        C("excess_var", F64, "uJy2", "variance of the flux about the spectral model beyond the scaled errors "
                                     "(maximum likelihood, >= 0)"),
        C("excess_var_err", F64, "uJy2", "1-sigma error of excess_var"),
        C("frac_amp", F64, None, "fractional rms amplitude sqrt(excess_var) / mean_flux"),
        C("frac_amp_err", F64, None, "1-sigma error of frac_amp"),
        C("timescale", F64, "d", "shortest time lag at which the residual structure function reaches half its "
                                 "plateau (lags binned 0.05, 0.5, 2, 7, 30, 100 d); NaN when not variable"),
        C("line_wavelength", F64, "um", "centre of the emission line in the spectral model (NaN: none)"),
        C("line_sigma", F64, "um", "Gaussian sigma of that line"),
        C("line_amp", F64, "uJy", "peak flux density of that line above the continuum"),
    ),
)

ERROR_SCALES = Table(
    "error_scales",
    ("detector",),
    (
        C("detector", I8, None, "detector number 1-6"),
        C("scale", F64, None, "empirical error scale: the scatter about the spectral models / flux_err"),
        C("n_rows", I64, None, "measurements of this detector in the run"),
        C("n_sources", I64, None, "sources with measurements on this detector"),
    ),
)

TABLES: dict[str, Table] = {t.name: t for t in (OBSERVATIONS, MANIFEST, PHOTOMETRY, SPECTRA, VARIABILITY, ERROR_SCALES)}


def empty(table: Table, id_dtype: Any = None) -> pl.DataFrame:
    """An empty DataFrame with the table's columns and dtypes (``source_id`` as ``id_dtype``)."""
    return pl.DataFrame(schema=table.schema_for(id_dtype))


def conform(df: pl.DataFrame, table: Table, *, extra: bool = True) -> pl.DataFrame:
    """Cast ``df`` to ``table``'s dtypes, add missing columns as nulls, order columns.

    Columns not in the schema are kept at the end when ``extra`` (user columns ride along).
    """
    exprs = []
    for c in table.columns:
        if c.dtype is CATALOG_ID:  # the catalog's own dtype: never cast
            exprs.append(pl.col(c.name) if c.name in df.columns else pl.lit(None, dtype=pl.Utf8).alias(c.name))
        elif c.name in df.columns:
            exprs.append(pl.col(c.name).cast(c.dtype, strict=False))
        else:
            exprs.append(pl.lit(None, dtype=c.dtype).alias(c.name))
    others = [n for n in df.columns if n not in table.names] if extra else []
    return df.select(exprs + [pl.col(n) for n in others])


def parquet_metadata(table: Table) -> dict[bytes, bytes]:
    """Key-value metadata for a Parquet file: units and descriptions per column."""
    cols = {c.name: {"unit": c.unit, "description": c.description} for c in table.columns}
    meta = {"table": table.name, "key": list(table.key), "columns": cols,
            "qc_bits": {q.name: {"bit": q.bit, "doc": q.doc} for q in QC_BITS},
            "flag_bits": FLAG_BITS}
    return {b"spxframe": json.dumps(meta).encode()}


# --------------------------------------------------------------------------------------
# The good-data mask (documented in spxframe.results), shared by plots, exports and science
# --------------------------------------------------------------------------------------

#: qc bits that make a measurement unusable (the flux is NaN or cannot be trusted)
UNUSABLE_QC: int = (QC["OFF_FILE"] | QC["MASKED_FRACTION"] | QC["FETCH_FAILED"]
                    | QC["SATURATED"] | QC["NO_PSF"] | QC["READ_ERROR"])
#: ``quality`` bit: a hard-bad FLAGS bit (``HARD_BAD_BITS``) is set in the aperture
Q_BAD_FLAGS: int = 1 << 16
#: ``quality`` bit: the flux or its error is missing or NaN
Q_NO_FLUX: int = 1 << 17
#: the ``quality`` bits and what they mean (the qc bits keep their ``QC_BITS`` positions)
QUALITY_BITS: dict[str, int] = {**{q.name: q.value for q in QC_BITS if q.value & UNUSABLE_QC},
                                "BAD_FLAGS": Q_BAD_FLAGS, "NO_FLUX": Q_NO_FLUX}


def _ints(df: pl.DataFrame, name: str) -> np.ndarray:
    if name not in df.columns:
        return np.zeros(df.height, dtype=np.int64)
    return df.get_column(name).fill_null(0).cast(pl.Int64).to_numpy()


def floats(df: pl.DataFrame, name: str) -> np.ndarray:
    """Column ``name`` as float64 (NaN for nulls, all NaN when the column is missing)."""
    if name not in df.columns:
        return np.full(df.height, np.nan)
    return df.get_column(name).cast(pl.Float64).fill_null(np.nan).to_numpy()


def quality(df: pl.DataFrame, *, bad_flags: int = DEFAULT_BAD_MASK) -> np.ndarray:
    """Per row, the reasons it is not good data as bits (0 = good; see the module docstring).

    The unusable qc bits keep their ``qc`` positions; ``Q_BAD_FLAGS`` marks a FLAGS bit of
    ``bad_flags`` (default the hard-bad bits) in the aperture, ``Q_NO_FLUX`` a missing flux.
    """
    q = _ints(df, "qc") & UNUSABLE_QC
    q |= np.where((_ints(df, "flags") & int(bad_flags)) != 0, Q_BAD_FLAGS, 0)
    ok = np.isfinite(floats(df, "flux")) & np.isfinite(floats(df, "flux_err"))
    q |= np.where(ok, 0, Q_NO_FLUX)
    return q.astype(np.int32)


def good_mask(df: pl.DataFrame, *, bad_flags: int = DEFAULT_BAD_MASK) -> np.ndarray:
    """True for good measurements: no hard-bad FLAGS bit, no unusable qc bit, a finite flux.

    Zero and negative fluxes are good data. See the module docstring for the full definition.
    """
    return quality(df, bad_flags=bad_flags) == 0


def describe_quality(value: int) -> list[str]:
    """Names of the :data:`QUALITY_BITS` set in ``value``."""
    return [name for name, bit in QUALITY_BITS.items() if int(value) & bit]


# --------------------------------------------------------------------------------------
# Units astropy reads back from Parquet (its table-meta YAML)
# --------------------------------------------------------------------------------------

#: units of the catalog columns that ride along into the photometry table
CATALOG_UNITS: dict[str, tuple[str, str]] = {
    "ra": ("deg", "catalog RA (ICRS)"), "dec": ("deg", "catalog Dec (ICRS)"),
    "pmra": ("mas / yr", "catalog proper motion in RA, times cos(Dec)"),
    "pmdec": ("mas / yr", "catalog proper motion in Dec"),
}


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML flow scalar


def string_lengths(tab: Any) -> dict[str, int]:
    """Longest value (characters) of each string column of a pyarrow table (0 when all null);
    ``{}`` for a table without rows. The maximum over several tables is that of their union."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out: dict[str, int] = {}
    if not tab.num_rows:  # nothing to measure: astropy would truncate to a guessed length
        return out
    for field in tab.schema:
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            out[field.name] = int(pc.max(pc.utf8_length(tab.column(field.name))).as_py() or 0)
    return out


def astropy_meta(arrow_schema: Any, table: Table, str_lengths: dict[str, int] | None = None
                 ) -> dict[bytes, bytes]:
    """Parquet key-value metadata astropy reads back: ``QTable.read(path)`` then has the units.

    ``arrow_schema``: the pyarrow schema, or table, about to be written; every one of its
    columns is listed (astropy requires that), with the unit and description of ``table``'s
    column of that name. Returns ``b"table_meta_yaml"`` (astropy's table-meta YAML) and, per
    string column, ``b"table::len::<name>"`` (its longest value: without it astropy warns and
    measures) from ``str_lengths`` or, given a table, from its data. Merge it into the schema
    metadata next to ``schema.parquet_metadata(table)``.
    """
    import pyarrow as pa

    if isinstance(arrow_schema, pa.Table):
        str_lengths = string_lengths(arrow_schema) if str_lengths is None else str_lengths
        arrow_schema = arrow_schema.schema
    fields = arrow_schema
    known = {c.name: c for c in table.columns}
    lines = ["datatype:"]
    for field in fields:
        t = field.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            dtype = "string"
        elif pa.types.is_boolean(t):
            dtype = "bool"
        elif pa.types.is_integer(t) or pa.types.is_floating(t):
            dtype = t.to_pandas_dtype().__name__
        else:
            dtype = "string"
        entry = [f"name: {_yaml_str(field.name)}"]
        col = known.get(field.name)
        unit, doc = (col.unit, col.description) if col is not None else CATALOG_UNITS.get(field.name, (None, None))
        if unit:
            entry.append(f"unit: {_yaml_str(unit)}")
        entry.append(f"datatype: {dtype}")
        if doc:
            entry.append(f"description: {_yaml_str(doc)}")
        lines.append("- {" + ", ".join(entry) + "}")
    lines += ["meta:", f"  spxframe_table: {table.name}"]
    out = {b"table_meta_yaml": "\n".join(lines).encode()}
    for name, n in (str_lengths or {}).items():
        out[f"table::len::{name}".encode()] = str(max(int(n), 1)).encode()
    return out
