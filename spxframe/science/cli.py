"""``run_cli(kind, run_dir)``: the science products of a finished run (for ``spxframe spectra
RUN`` and ``spxframe variability RUN``)."""

from __future__ import annotations

import os

from spxframe.errors import InputError
from spxframe.science.products import products
from spxframe.science.schemas import ERROR_SCALES, SPECTRA, VARIABILITY
from spxframe.store import Store

KINDS = ("spectra", "variability")


def run_cli(kind: str, run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> str:
    """Compute ``kind`` (``"spectra"`` or ``"variability"``) from ``run_dir``'s photometry.parquet
    and write ``<kind>.parquet`` and ``error_scales.parquet`` (units in the Parquet metadata) into
    ``out`` (default: ``run_dir``). Returns the path written; prints nothing."""
    if kind not in KINDS:
        raise InputError(f"kind={kind!r}: expected one of {KINDS}")
    src = Store(run_dir, create=False)
    if not src.exists("photometry.parquet"):
        raise InputError(f"{src.path('photometry.parquet')} does not exist: is {os.fspath(run_dir)!r} a spxframe run?")
    res = products(src.read_parquet("photometry.parquet"))
    store = Store(out if out is not None else run_dir)
    store.write_parquet(f"{kind}.parquet", res[kind], SPECTRA if kind == "spectra" else VARIABILITY)
    store.write_parquet("error_scales.parquet", res["error_scales"], ERROR_SCALES)
    return store.path(f"{kind}.parquet")
