"""The QR2 → R7 gain correction (spec §3.10): the ``l3_flux_corrections`` product's per-pixel
factor f brings pre-R7 (QR2) pixels onto R7 gains: IMAGE × f, VARIANCE × f², ZODI left alone.
Never applied to R7-format files.

``calibration`` (as :func:`spxframe.measure` takes it): None (no correction), a folder holding
product files (``<family>_D<d>_spx_<token>.fits``, searched recursively, highest token per
detector and family — e.g. a run's ``cache_dir/cal``), a mapping detector → gain file, or a
mapping family → (detector → file) for several products (``l3_flux_corrections``,
``spectral_wcs``: :mod:`spxframe.photometry.wave`).

A product fetched by row ranges (a "partial product", :mod:`spxframe.fetcher.calib_ranges`) is
read like a whole one, but only at the rows its sidecar ``<file>.rows.json`` lists
(:func:`present_rows`): elsewhere the factor is unknown (NaN in :func:`load`'s map), and a
measurement whose stamp needs an unknown factor at a pixel with data is left uncorrected —
its whole stamp × 1, ``gain_factor`` 1.0 ("none", as on R7 images), with a warning — rather
than corrected in part or with a guessed factor.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Mapping

import numpy as np

from spxframe import spherex
from spxframe.errors import FileFormatError, InputError
from spxframe.fits.hdu import by_name, read_array, read_rows, scan

log = logging.getLogger("spxframe.photometry")

_NAME_RE = r"_D(\d)_spx_(cal-[A-Za-z0-9]+-v\d+-\d{4}-\d{3})\.fits$"  #: after the family name
ROWS_SUFFIX = ".rows.json"  #: a partial product's row list (as spxframe.fetcher.calib_ranges writes it)
_MAPS: dict[tuple, np.ndarray] = {}  #: (path, mtimes) -> the factor map (one read per process)
_LOCK = threading.Lock()


def _token_key(token: str) -> tuple[int, ...]:
    m = spherex.CAL_TOKEN_RE.search(token)
    return tuple(int(g) for g in m.groups()) if m else (-1,)


def resolve(calibration, family: str = spherex.GAIN_FAMILY) -> dict[int, str]:
    """detector -> file of the ``family`` product from a folder or a mapping (see the module
    docstring); a plain detector -> file mapping holds gain files (no other family's)."""
    if calibration is None:
        return {}
    if isinstance(calibration, Mapping):
        if any(isinstance(v, Mapping) for v in calibration.values()):  # family -> {detector: file}
            calibration = calibration.get(family) or {}
        elif family != spherex.GAIN_FAMILY:
            return {}
        out = {int(str(d).upper().lstrip("D")): os.fspath(p) for d, p in calibration.items()}
        bad = [p for p in out.values() if not os.path.isfile(p)]
        if bad:
            raise InputError(f"calibration: no such file(s) {bad}")
        return out
    root = os.fspath(calibration)
    if not os.path.isdir(root):
        raise InputError(f"calibration={root!r}: expected a folder of calibration product files or a mapping "
                         "detector -> file")
    pattern = re.compile(re.escape(family) + _NAME_RE)
    best: dict[int, tuple[tuple[int, ...], str]] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            m = pattern.search(name)
            if m:
                det, key = int(m.group(1)), _token_key(m.group(2))
                if det not in best or key > best[det][0]:
                    best[det] = (key, os.path.join(folder, name))
    return {d: p for d, (_, p) in best.items()}


def _clean(f: np.ndarray) -> np.ndarray:
    """Factors outside ``spherex.GAIN_VALID`` (or not finite) replaced by their row's median of
    valid factors (1.0 for a row without any)."""
    lo, hi = spherex.GAIN_VALID
    bad = ~(np.isfinite(f) & (f >= lo) & (f <= hi))
    if bad.any():
        rows = np.nonzero(bad.any(axis=1))[0]
        for r in rows:
            ok = f[r][~bad[r]]
            f[r, bad[r]] = np.median(ok) if ok.size else 1.0
    return f


def present_rows(path: str) -> list[tuple[int, int]] | None:
    """Row spans [a, b) a partial product holds (its ``ROWS_SUFFIX`` sidecar); None for a whole
    file (no sidecar); [] when the sidecar is unreadable (nothing trusted)."""
    try:
        with open(path + ROWS_SUFFIX, encoding="utf-8") as f:
            return sorted((int(a), int(b)) for a, b in json.load(f)["rows"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return []


def file_key(path: str) -> tuple:
    """What a per-process cache of a product is keyed on: path, its and its row list's mtimes."""
    try:
        side = os.stat(path + ROWS_SUFFIX).st_mtime_ns
    except FileNotFoundError:
        side = None
    return (path, os.stat(path).st_mtime_ns, side)


def per_file(cache: dict, path: str, read):
    """``read(path)``, cached in ``cache`` per process for as long as the file and its rows
    sidecar are unchanged (:func:`file_key`)."""
    key = file_key(path)
    with _LOCK:
        got = cache.get(key)
    if got is None:
        got = read(path)
        with _LOCK:
            cache[key] = got
    return got


def load(path: str) -> np.ndarray:
    """The factor map of a product file (float32, native order), cached per process; NaN at the
    rows a partial product lacks."""
    return per_file(_MAPS, path, _read_map)


def _read_map(path: str) -> np.ndarray:
    fd = os.open(path, os.O_RDONLY)
    try:
        hdus = scan(fd, path=path)
        h = by_name(hdus).get(spherex.GAIN_HDU)
        if h is None:  # the HDU name is not confirmed: the first full-detector image
            h = next((x for x in hdus if x.shape == (spherex.NPIX, spherex.NPIX)), None)
        if h is None:
            raise FileFormatError(f"{path}: no {spherex.GAIN_HDU} HDU nor any {spherex.NPIX}x{spherex.NPIX} image")
        rows = present_rows(path)
        if rows is None:
            f = _clean(read_array(fd, h).astype(np.float32))
        else:  # whole rows: each row's median is the whole file's
            f = np.full(h.shape, np.nan, np.float32)
            for a, b in rows:
                f[a:b] = _clean(read_rows(fd, h, a, b).astype(np.float32))
    finally:
        os.close(fd)
    return f


def apply(f: np.ndarray, stamps: list[np.ndarray], x: np.ndarray, y: np.ndarray, x0: int, y0: int,
          half: int) -> np.ndarray:
    """Correct the IMAGE and VARIANCE stamps (``stamps[0]``, ``stamps[1]``, as cut around the
    rounded file pixels ``x``, ``y`` with ``half``) in place: × f and × f² at each stamp pixel's
    parent position (file pixel + ``x0``, ``y0``). Returns f at each source's own pixel.
    A source whose stamp needs a factor ``f`` lacks (NaN: a partial product) where IMAGE or
    VARIANCE has data is not corrected at all (× 1; its factor is returned as NaN); see the module
    docstring."""
    n = f.shape[0]
    ix, iy = np.rint(x).astype(np.int64) + int(x0), np.rint(y).astype(np.int64) + int(y0)
    off = np.arange(-half, half + 1)
    rows = np.clip(iy[:, None] + off[None], 0, n - 1)
    cols = np.clip(ix[:, None] + off[None], 0, f.shape[1] - 1)
    g = f[rows[:, :, None], cols[:, None, :]].astype(np.float64)
    own = f[np.clip(iy, 0, n - 1), np.clip(ix, 0, f.shape[1] - 1)].astype(np.float64)
    unknown = np.isnan(g)
    if unknown.any():
        skip = (unknown & (np.isfinite(stamps[0]) | np.isfinite(stamps[1]))).any(axis=(1, 2)) | np.isnan(own)
        g[unknown] = 1.0
        g[skip] = 1.0
        own[skip] = np.nan  # the caller writes factor 1.0 and the GAIN_UNCORRECTED bit
        if skip.any():
            log.warning("%d measurement(s) left without the gain correction: the partial gain product lacks "
                        "factors they need (fetch them, or the whole product)", int(skip.sum()))
    stamps[0] *= g
    stamps[1] *= g * g
    return own
