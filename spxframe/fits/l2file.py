"""Reading SPHEREx L2 MEFs (full files and cutouts): headers, planes, A/W systems, PSF zones.

Speed (DESIGN "Speed rules"): headers are parsed by hand (``spxframe.fits.cards``; astropy
``fits.open`` costs milliseconds per file); only the HDUs that are needed are read; PSF cube
planes are read only when first needed for a key; the parent celestial WCS (TAN-SIP,
``spxframe.fits.wcs``) is built once per (OBSID, DETECTOR, VERSION) and shared by all cutouts of that
parent through the A-system offsets ``x0 = 1 - CRPIX1A``, ``y0 = 1 - CRPIX2A``.

Both formats (spec §3.9): QR2 (pipeline 6.x: plain FLAGS, ``MP_`` bit cards, the PSF cube) and
R7/QR3 (RICE_1 tile-compressed FLAGS, ``MSKN`` bit cards, the EPSF table, HDU offsets that vary
from file to file: every header is parsed). :func:`file_format` tells them apart by the file's
own content; the ePSF library is read with :func:`epsf_library`.

Coordinates: ``x, y`` zero-based pixels; "parent" pixels = file pixels + (x0, y0).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import zlib
from dataclasses import dataclass, field

import numpy as np

from spxframe import spherex
from spxframe.errors import FileFormatError
from spxframe.fits import flagbits
from spxframe.fits.cards import Header  # noqa: F401  (re-exported)
from spxframe.fits.epsf import EpsfLibrary, history_source, is_epsf_hdu, read_epsf, read_epsf_file
from spxframe.fits.hdu import HDU, by_name, scan
from spxframe.fits.psf import PsfPlanes, PsfZones, is_legacy_version, parse_psf_zones  # noqa: F401  (re-exported)
from spxframe.fits.tiles import is_tiled
from spxframe.fits.wcs import parent_wcs, pixel_area_arcsec2, table_bilinear  # noqa: F401  (re-exported)

_TFORM = {"D": ">f8", "E": ">f4", "J": ">i4", "K": ">i8", "I": ">i2", "B": ">u1"}


# ------------------------------------------------------------------------------ WCS-WAVE
@dataclass
class WaveTable:
    """Control points of the W system: index vectors X (nX,), Y (nY,) — 1-based parent pixels in a
    whole file, but in the file's own W frame in a cutout (:class:`spxframe.fits.wcs.WaveAxes` maps
    pixels to them); V (nY, nX, 2) µm."""

    x: np.ndarray
    y: np.ndarray
    values: np.ndarray

    def __call__(self, xp1: np.ndarray, yp1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bilinear (wavelength, bandwidth) in µm at table index coordinates (ψ_X, ψ_Y) (spec §3.7):
        ``WaveAxes.index`` of the file's pixels, which for a whole file are its 1-based pixels."""
        r = table_bilinear(self.x, self.y, self.values, np.ascontiguousarray(xp1, np.float64),
                           np.ascontiguousarray(yp1, np.float64))
        return r[:, 0], r[:, 1]


def parse_wave_table(fd: int, hdu: HDU) -> WaveTable:
    h = hdu.header
    row = os.pread(fd, int(h["NAXIS1"]), hdu.data_offset)
    cols, pos = {}, 0
    for k in range(1, int(h["TFIELDS"]) + 1):
        m = re.match(r"\s*(\d*)([A-Z])", str(h[f"TFORM{k}"]))
        rep, code = int(m.group(1) or 1), m.group(2)
        dt = np.dtype(_TFORM[code])
        a = np.frombuffer(row[pos:pos + rep * dt.itemsize], dt).astype(np.float64)
        pos += rep * dt.itemsize
        tdim = h.get(f"TDIM{k}")
        if tdim:
            a = a.reshape(tuple(int(v) for v in str(tdim).strip("() ").split(","))[::-1])
        cols[str(h[f"TTYPE{k}"]).strip().upper()] = a
    x, y, v = cols["X"].ravel(), cols["Y"].ravel(), cols["VALUES"]
    return WaveTable(np.ascontiguousarray(x), np.ascontiguousarray(y),
                     np.ascontiguousarray(v.reshape(len(y), len(x), 2)))


# ------------------------------------------------------------------------------ files
@dataclass
class MefInfo:
    """What photometry needs from one file (planes are read later with :func:`read_rows`)."""

    path: str
    obs_id: str
    detector: int
    version: str
    shape: tuple[int, int]  #: (ny, nx) of the file's planes
    x0: int  #: parent column of file column 0
    y0: int
    mjd: float  #: mid-exposure MJD (UTC)
    sc_pos_km: tuple[float, float, float] | None  #: geocentric spacecraft position
    image: Header
    hdus: dict[str, HDU] = field(default_factory=dict)
    psf_key: str = ""
    psf_header: Header | None = None
    psffile: str | None = None  #: path of the external PSF cube (range reads), see :func:`psf_path`
    wave_key: bytes = b""
    format: str = "qr2"  #: ``"qr2"`` (pipeline 6.x, PSF cube) or ``"r7"`` (QR3: EPSF table), see :func:`file_format`
    flag_bits: dict[str, int] = field(default_factory=dict)  #: the FLAGS bit map (either card style)
    epsf_hdu: HDU | None = None  #: the EPSF table (R7 files)
    epsf_key: str = ""  #: the ePSF library's identity: detector + HISTORY label + header id
    epsffile: str | None = None  #: path of an external ePSF library (EPSFFILE card), see :func:`open_info`


def file_format(named: dict[str, HDU], version: str, epsf: HDU | None = None) -> str:
    """``"r7"`` for a pipeline R7 (QR3) file — an EPSF table (``epsf``, or one among ``named``), a
    tile-compressed FLAGS or VERSION 7.x — else ``"qr2"``. Decided by the file's own format, never
    by its time."""
    if epsf is None:
        epsf = next((h for h in named.values() if is_epsf_hdu(h)), None)
    if epsf is not None or is_tiled(named["FLAGS"].header):
        return "r7"
    m = re.match(r"\s*(\d+)\.", version or "")
    return "r7" if m and int(m.group(1)) >= 7 else "qr2"


def psf_path(path: str, psffile: str, cache_dir: str | os.PathLike | None = None, *, card: str = "PSFFILE") -> str:
    """Where the PSF cube of a range-read cutout lies; ``psffile`` is its PSFFILE card (or, with
    ``card='EPSFFILE'``, where the ePSF library of an R7 file without its EPSF table lies).

    fetch writes ``PSFFILE = 'psf/<psf_key>.fits'`` (relative to the cache root) into files it
    stores at ``<cache root>/data/D<d>/<name>.fits``. The rule, first match wins:

    1. ``cache_dir`` given: ``cache_dir/psf/<psf_key>.fits`` (the key is PSFFILE's file name,
       checked against ``spherex.PSF_KEY_RE``), and nothing else;
    2. an absolute PSFFILE, as is;
    3. PSFFILE relative to the file's own folder, if that file exists;
    4. PSFFILE relative to the cache root of fetch's layout, i.e. two folders above a file that
       sits in ``data/D<d>/`` (caches written by every version so far), if that file exists.

    Raises :class:`FileFormatError` naming the card and the paths tried.
    """
    pf = str(psffile).strip()
    if cache_dir is not None:
        name = os.path.basename(pf)
        key = name[:-5] if name.endswith(".fits") else ""
        if not spherex.PSF_KEY_RE.match(key) or ".." in key:
            raise FileFormatError(f"{path}: {card} = {pf!r} names no PSF cache key")
        tried = [os.path.join(os.fspath(cache_dir), "psf", key + ".fits")]
    elif os.path.isabs(pf):
        tried = [pf]
    else:
        folder = os.path.dirname(os.path.abspath(path))
        tried = [os.path.join(folder, pf)]
        up, det = os.path.split(folder)
        root, data = os.path.split(up)
        if data == "data" and re.fullmatch(r"D\d", det):
            tried.append(os.path.join(root, pf))
    for p in tried:
        if os.path.isfile(p):
            return os.path.normpath(p)
    raise FileFormatError(f"{path}: the PSF of {card} = {pf!r} is not at {' nor '.join(tried)}"
                          + ("" if cache_dir is not None else " (pass cache_dir= the fetch cache)"))


def open_info(path: str, fd: int, *, cache_dir: str | os.PathLike | None = None) -> MefInfo:
    """Scan a file and parse what photometry needs; raises :class:`FileFormatError` for files that
    are not SPHEREx L2 files (or whose PSFFILE cube is not found, see :func:`psf_path`)."""
    hdus = scan(fd, os.fstat(fd).st_size, path=path)
    named = by_name(hdus)
    missing = [n for n in spherex.PLANE_HDUS if n not in named]
    if missing:
        raise FileFormatError(f"{path}: not a SPHEREx L2 file (no {', '.join(missing)} HDU)")
    im = named["IMAGE"].header
    im.index()  # ~40 look-ups follow (here and for the WCS): a keyword index is cheaper than a full parse
    prim = named["PRIMARY"].header
    version = prim.get("VERSION")
    version = str((im.get("VERSION", "") if version is None else version) or "")
    det = im.get("DETECTOR")
    det = prim.get("DETECTOR") if det is None else det
    if det is None:
        raise FileFormatError(f"{path}: no DETECTOR keyword")
    det = int(str(det).strip().lstrip("Dd"))
    x0 = int(round(1 - float(im.get("CRPIX1A", 1.0))))
    y0 = int(round(1 - float(im.get("CRPIX2A", 1.0))))
    mjd = im.get("MJD-AVG")
    if mjd is None:
        b, e = im.get("MJD-BEG"), im.get("MJD-END")
        mjd = (b + e) / 2 if b is not None and e is not None else im.get("MJD-OBS", math.nan)
    sc = tuple(float(im[k]) for k in ("X_SC", "Y_SC", "Z_SC")) if "X_SC" in im and "Z_SC" in im else None
    ny, nx = named["IMAGE"].shape
    obsid = im.get("OBSID")
    info = MefInfo(path, str(prim.get("OBSID", "") if obsid is None else obsid).strip(), det, version, (ny, nx),
                   x0, y0, float(mjd), sc, im, named)
    ep = named.get("EPSF") or next((h for h in hdus if h.name not in spherex.HDU_NAMES and is_epsf_hdu(h)), None)
    info.format = file_format(named, version, ep)
    info.flag_bits = flagbits.flag_bits(named["FLAGS"].header)
    ext = prim.get("EPSFFILE") or im.get("EPSFFILE") or (ep.header.get("EPSFFILE") if ep is not None else None)
    if ep is not None and not (ext and _no_rows(ep)):
        info.epsf_hdu = ep
        info.epsf_key = f"D{det}|{history_source(ep.header.raw) or ''}|{_header_id(ep.header.raw)}"
    elif info.format == "r7" and ext:
        # an R7 file stored without its EPSF table (a range-read cutout: an EPSF header stub with
        # no rows, or no EPSF HDU): the library lies in a file of its own (the epsf product or
        # any file holding the table), found as PSFFILE is
        info.epsffile = psf_path(path, str(ext), cache_dir, card="EPSFFILE")
        info.epsf_key = "file:" + info.epsffile
    ph = named.get("PSF")
    if ph is not None:
        info.psf_header = ph.header
        pf = ph.header.get("PSFFILE")
        if pf:
            info.psffile = psf_path(path, str(pf), cache_dir)
            info.psf_key = "file:" + info.psffile
        else:
            info.psf_key = f"D{det}|{version}|{_header_id(ph.header.raw)}"
    wv = named.get("WCS-WAVE")
    if wv is not None:
        info.wave_key = hashlib.blake2b(wv.header.raw + os.pread(fd, wv.data_size, wv.data_offset),
                                        digest_size=12).digest()
    return info


def _no_rows(hdu: HDU) -> bool:
    """A table HDU without data: the EPSF header stub of a range-read R7 cutout."""
    return hdu.data_size == 0


_HEADER_IDS: dict[tuple[int, int], list[bytes]] = {}


def _header_id(raw: bytes) -> str:
    """A short id unique to the exact bytes of a header in this process (CRC + byte comparison)."""
    k = (zlib.crc32(raw), len(raw))
    seen = _HEADER_IDS.setdefault(k, [])
    for i, r in enumerate(seen):
        if r == raw:
            return f"{k[0]:08x}{k[1]:x}.{i}"
    seen.append(raw)
    return f"{k[0]:08x}{k[1]:x}.{len(seen) - 1}"


def psf_cube(info: MefInfo, fd: int):
    """The file's (nzones, py, px) PSF cube as a :class:`~spxframe.fits.psf.PsfPlanes` (planes read on
    demand): its own PSF data, or the PSFFILE cube; None if absent or unreadable."""
    if not info.psffile:
        hd = info.hdus.get("PSF")
        return PsfPlanes(hd.shape, hd.dtype) if hd is not None and len(hd.shape) == 3 else None
    try:
        pfd = os.open(info.psffile, os.O_RDONLY)
    except OSError:
        return None
    try:
        cubes = [hd for hd in scan(pfd, os.fstat(pfd).st_size, path=info.psffile) if len(hd.shape) == 3]
    finally:
        os.close(pfd)
    hd = cubes[0] if cubes else None
    return None if hd is None else PsfPlanes(hd.shape, hd.dtype, info.psffile, hd.data_offset)


def epsf_library(info: MefInfo, fd: int) -> EpsfLibrary:
    """The file's ePSF library: its EPSF table, or the EPSFFILE library; raises
    :class:`FileFormatError` if there is none or it is unreadable."""
    if info.epsf_hdu is not None:
        return read_epsf(fd, info.epsf_hdu)
    if info.epsffile:
        return read_epsf_file(info.epsffile)
    raise FileFormatError(f"{info.path}: no EPSF table")


def load_psf_planes(cube, info: MefInfo, fd: int, planes) -> None:
    """Read the ``planes`` of ``cube`` (from :func:`psf_cube`) that are not loaded yet."""
    if cube.path is None:
        cube.load(planes, fd, info.hdus["PSF"].data_offset)
    else:
        cube.load(planes)
