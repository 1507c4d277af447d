"""Wavelength and bandwidth (µm) of a measurement at the source's parent pixel.

Two sources, in order of preference (spec §3.7, §3.10):

- ``"spectral_wcs"``: the ``spectral_wcs`` calibration product's per-pixel maps CWAVE and CBAND
  (µm, 2040x2040, the L2 pixel frame), bilinear between the four pixel centres around the
  source's zero-based parent position (x, y) — pixel (i, j) holds the value at its centre.
  The science-grade wavelengths; read by a few ``pread`` calls per source (the maps stay on disk).
- ``"wcs-wave"``: the file's own WCS-WAVE table (bilinear between its control points, about 1 nm:
  "visualisation grade"), indexed through the file's W system
  (:class:`spxframe.fits.wcs.WaveAxes`), so IBE cutouts give the parent's values whichever way
  the service rewrote CRPIXnW or the table.

Which release's product serves an image of each release is :data:`WAVE_RELEASE` (the spec
leaves open whether R7's maps serve QR2 images: §3.10 says only that both are in the L2 pixel
frame). ``calibration`` as :func:`spxframe.photometry.gains.resolve` reads it, family
:data:`WAVE_FAMILY`.

A product fetched by row ranges (a partial product: :func:`spxframe.photometry.gains.present_rows`)
serves a file's sources only when it holds the rows of all of them (both rows of each bilinear
read); otherwise that file's wavelengths come from its WCS-WAVE lookup (``wave_source`` says which,
one value per file), with a warning — never from an unfetched pixel.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from spxframe import spherex
from spxframe.errors import FileFormatError
from spxframe.fits import l2file as mef
from spxframe.fits import wcs as _wcs
from spxframe.fits.hdu import by_name, scan
from spxframe.photometry import gains as _gains

WAVE_FAMILY: str = spherex.WAVE_FAMILY  #: the product holding per-pixel wavelength maps (spec §3.10)
WAVE_HDUS: tuple[str, str] = spherex.WAVE_HDUS  #: its HDUs: central wavelength and bandwidth, µm
WAVE_RELEASE: str = spherex.WAVE_RELEASE  #: the release whose maps serve every image (see spherex)

_TABLES: dict[bytes, mef.WaveTable] = {}  #: WCS-WAVE tables by content (one parse per process)
_MAPS: dict[tuple, tuple[int, int, int]] = {}  #: (path, mtimes) -> CWAVE, CBAND offsets, width
log = logging.getLogger("spxframe.photometry")


def resolve(calibration) -> dict[int, str]:
    """detector -> ``spectral_wcs`` file from ``measure``'s ``calibration`` argument."""
    return _gains.resolve(calibration, WAVE_FAMILY)


def _map_layout(path: str) -> tuple[int, int, int]:
    """(data offset of CWAVE, of CBAND, row length in pixels) of a product file, cached per process."""
    return _gains.per_file(_MAPS, path, _read_layout)


def _read_layout(path: str) -> tuple[int, int, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        named = by_name(scan(fd, path=path))
    finally:
        os.close(fd)
    hdus = [named.get(n) for n in WAVE_HDUS]
    if any(h is None or len(h.shape) != 2 or h.bitpix != -32 for h in hdus):
        raise FileFormatError(f"{path}: no float32 {' and '.join(WAVE_HDUS)} images")
    if hdus[0].shape != hdus[1].shape:
        raise FileFormatError(f"{path}: {WAVE_HDUS[0]} and {WAVE_HDUS[1]} differ in shape")
    return hdus[0].data_offset, hdus[1].data_offset, hdus[0].shape[1]


def covered(path: str, yp: np.ndarray) -> bool:
    """Whether the maps at ``path`` hold both rows every bilinear read at parent rows ``yp`` uses
    (always for a whole product; a partial one: the rows its sidecar lists)."""
    rows = _gains.present_rows(path)
    if rows is None:
        return True
    yp = np.asarray(yp, np.float64)
    j = np.clip(np.floor(yp[np.isfinite(yp)]).astype(np.int64), 0, spherex.NPIX - 2)
    have = np.zeros(spherex.NPIX + 1, bool)
    for a, b in rows:
        have[max(a, 0):max(b, 0)] = True
    return bool((have[j] & have[j + 1]).all())


def from_maps(path: str, xp: np.ndarray, yp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(wavelength, bandwidth) µm at zero-based parent pixels (xp, yp), bilinear between the
    CWAVE/CBAND pixel centres (positions beyond the outer centres take the edge pixels' slope)."""
    off_w, off_b, n = _map_layout(path)
    xp, yp = np.asarray(xp, np.float64), np.asarray(yp, np.float64)
    ok = np.isfinite(xp) & np.isfinite(yp)
    i = np.clip(np.floor(np.where(ok, xp, 0.0)).astype(np.int64), 0, n - 2)
    j = np.clip(np.floor(np.where(ok, yp, 0.0)).astype(np.int64), 0, n - 2)
    fx, fy = xp - i, yp - j
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in (off_w, off_b):
            v = np.empty((len(i), 2, 2))
            for k in range(len(i)):
                for r in (0, 1):
                    pos = off + 4 * ((j[k] + r) * n + i[k])
                    v[k, r] = np.frombuffer(os.pread(fd, 8, pos), ">f4")
            out.append((1 - fx) * (1 - fy) * v[:, 0, 0] + fx * (1 - fy) * v[:, 0, 1]
                       + (1 - fx) * fy * v[:, 1, 0] + fx * fy * v[:, 1, 1])
    finally:
        os.close(fd)
    return tuple(np.where(ok, a, np.nan) for a in out)


def from_table(info: mef.MefInfo, fd: int, xp: np.ndarray, yp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(wavelength, bandwidth) µm at zero-based parent pixels from the file's WCS-WAVE table,
    indexed through the file's own W system; NaN without a table."""
    if not info.wave_key:
        return np.full(len(xp), np.nan), np.full(len(xp), np.nan)
    tab = _TABLES.get(info.wave_key)
    if tab is None:
        tab = _TABLES[info.wave_key] = mef.parse_wave_table(fd, info.hdus["WCS-WAVE"])
    u, v = _wcs.wave_axes(info.image, info.x0, info.y0).index(xp, yp, info.x0, info.y0)
    return tab(u, v)


def wavelengths(info: mef.MefInfo, fd: int, xp: np.ndarray, yp: np.ndarray, maps: dict[int, str] | None = None
                ) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(wavelength µm, bandwidth µm, ``wave_source``) of sources at zero-based parent pixels
    (xp, yp) of an open file: the ``spectral_wcs`` maps of the file's detector when ``maps``
    (detector -> product file) has them, else the file's WCS-WAVE lookup; source None when
    neither exists."""
    path = (maps or {}).get(info.detector)
    if path is not None and not covered(path, yp):
        log.warning("%s: the partial %s product lacks rows of these sources: WCS-WAVE wavelengths instead",
                    info.obs_id, WAVE_FAMILY)
        path = None
    if path is not None:
        w, b = from_maps(path, xp, yp)
        return w, b, "spectral_wcs"
    w, b = from_table(info, fd, xp, yp)
    return w, b, ("wcs-wave" if info.wave_key else None)
