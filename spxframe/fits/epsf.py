"""The EPSF table of a QR3 (pipeline R7) file or of the ``epsf`` calibration product (spec §3.9).

One row per zone of a lattice over the detector (21x21; 11x41 on D3 — read from the table, never
assumed), rows x-fast from the lower-left zone. Each row holds the zone's lattice indices, its
centre (0-based L2 pixels), a few statistics and the effective PSF: a 33x33 array oversampled
``OVSMPX`` x ``OVSMPY`` times, flattened x-fast (a TDIM may or may not be present). The pixel
response is already in it: the flux fraction in a native pixel is OVSMPX x OVSMPY x the ePSF
sampled at the pixel's centre (see :mod:`spxframe.photometry.epsf`).

The column and keyword names are UNCONFIRMED (spec §8), so each is found by role through the
aliases of :data:`COLUMN_ALIASES` and :data:`KEYWORD_ALIASES` (extend them there); a missing
required role raises :class:`~spxframe.errors.FileFormatError` naming what the table does have.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from spxframe.errors import FileFormatError
from spxframe.fits.hdu import HDU, scan
from spxframe.fits.tiles import as_read

#: role -> accepted column names, the first the most likely (spec §3.9)
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "binx": ("BINX", "XBIN", "IX", "ZONE_X", "ZONEX"),
    "biny": ("BINY", "YBIN", "IY", "ZONE_Y", "ZONEY"),
    "xcenter": ("XCENTER", "XCTR", "X_CENTER", "XCEN", "XC"),
    "ycenter": ("YCENTER", "YCTR", "Y_CENTER", "YCEN", "YC"),
    "xwidth": ("XWIDTH", "XWID", "X_WIDTH"),
    "ywidth": ("YWIDTH", "YWID", "Y_WIDTH"),
    "nstar": ("NSTAR", "NSTARS", "N_STAR"),
    "neff": ("NEFF_MEAN", "NEFF", "N_EFF"),
    "cwave": ("CWAVE", "WAVELENGTH", "LAMBDA"),
    "cband": ("CBAND", "BANDWIDTH"),
    "epsf": ("EPSF", "PSF", "EPSF_DATA", "DATA"),
}
REQUIRED_COLUMNS: tuple[str, ...] = ("xcenter", "ycenter", "epsf")
#: role -> accepted header keywords
KEYWORD_ALIASES: dict[str, tuple[str, ...]] = {
    "ovsmpx": ("OVSMPX", "OVERSAMPX", "OVERSAMP", "OVSAMP", "OVERSMPL"),
    "ovsmpy": ("OVSMPY", "OVERSAMPY", "OVERSAMP", "OVSAMP", "OVERSMPL"),
    "detector": ("DETECTOR", "DETNUM", "DET"),
    "ordering": ("ORDERING", "ORDER"),
    "detcoord": ("DETCOORD",),
}
NORM_TOL = 1e-3  #: an array whose sum is further than this from 1 is renormalised
EXTNAME = "EPSF"
_TFORM_RE = re.compile(r"^\s*(\d*)([LXBIJKAEDCM])")
_DTYPES = {"L": "S1", "X": "u1", "B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "A": "S1", "E": ">f4",
           "D": ">f8", "C": ">c8", "M": ">c16"}
_HISTORY_RE = re.compile(rb"HISTORY (.{0,72})")
_SOURCE_RE = re.compile(r"calibration source file\s*:\s*(\S+)", re.I)


@dataclass
class EpsfLibrary:
    """The ePSF of every zone, on the zone lattice.

    ``arrays``: (nzy, nzx, py, px) float64, each summing to 1, indexed [zone y, zone x, y, x];
    ``xcenter``/``ycenter``: (nzy, nzx) zone centres, 0-based L2 pixels; ``ovsmpx``/``ovsmpy``:
    oversampling; ``valid``: (nzy, nzx) zones with a usable array (finite, positive sum);
    ``extras``: role -> (nzy, nzx) array of the optional columns found (neff, nstar, cwave,
    cband, xwidth, ywidth); ``columns``/``keywords``: role -> the name found in the file;
    ``renormalised``: how many arrays were rescaled to unit sum; ``source``: the HISTORY
    "Calibration source file" label (opaque) or None.
    """

    arrays: np.ndarray
    xcenter: np.ndarray
    ycenter: np.ndarray
    ovsmpx: int
    ovsmpy: int
    valid: np.ndarray
    extras: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)
    keywords: dict = field(default_factory=dict)
    renormalised: int = 0
    detector: int | None = None
    source: str | None = None

    @property
    def lattice(self) -> tuple[int, int]:
        """(zones along y, zones along x)."""
        return self.arrays.shape[0], self.arrays.shape[1]

    @property
    def flat(self) -> np.ndarray:
        """(nzones, py, px) arrays, zone k = iy * nzx + ix (x-fast)."""
        return self.arrays.reshape(-1, *self.arrays.shape[2:])

    def zone_of(self, xp, yp) -> np.ndarray:
        """Flat zone index (into :attr:`flat`) of the nearest valid zone centre to each 0-based
        parent pixel position (xp, yp)."""
        xs, ys = self.xcenter[self.valid], self.ycenter[self.valid]
        idx = np.flatnonzero(self.valid.ravel())
        xp, yp = np.atleast_1d(np.asarray(xp, float)), np.atleast_1d(np.asarray(yp, float))
        d = (xp[:, None] - xs[None]) ** 2 + (yp[:, None] - ys[None]) ** 2
        return idx[np.argmin(d, axis=1)]


def _get(h, role: str, aliases: dict, found: dict):
    for k in aliases[role]:
        v = h.get(k)
        if v is not None:
            found[role] = k
            return v
    return None


def _table_dtype(h, where: str) -> tuple[np.dtype, list[str], dict[str, tuple[int, ...]]]:
    """(row dtype, column names upper-cased, name -> numpy cell shape from TDIMn)."""
    names, fmts, shapes = [], [], {}
    for i in range(1, int(h.get("TFIELDS", 0) or 0) + 1):
        tform = str(h.get(f"TFORM{i}", ""))
        m = _TFORM_RE.match(tform)
        if not m:
            raise FileFormatError(f"{where}TFORM{i} = {tform!r} is not a fixed-width column")
        name = str(h.get(f"TTYPE{i}") or f"COL{i}").strip().upper()
        rep, code = int(m.group(1) or 1), m.group(2)
        if code == "X":
            rep = -(-rep // 8)
        fmt = f"S{rep}" if code == "A" else (_DTYPES[code] if rep == 1 else (str(rep) + _DTYPES[code]))
        names.append(name)
        fmts.append(fmt)
        tdim = h.get(f"TDIM{i}")
        if tdim:
            shapes[name] = tuple(int(t) for t in re.findall(r"\d+", str(tdim)))[::-1]
    return np.dtype({"names": names, "formats": fmts}), names, shapes


def _column(table, names, role: str, found: dict, where: str, h, required: bool):
    for alias in COLUMN_ALIASES[role]:
        if alias in names:
            found[role] = alias
            a = table[alias]
            i = names.index(alias) + 1
            scal, zero = h.get(f"TSCAL{i}"), h.get(f"TZERO{i}")
            if scal is not None or zero is not None:
                a = a * float(scal if scal is not None else 1.0) + float(zero or 0.0)
            return a
    if required:
        raise FileFormatError(f"{where}no {role} column (tried {list(COLUMN_ALIASES[role])}; "
                              f"the table has {names})")
    return None


def _lattice(xc, yc, bx, by, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Zero-based lattice indices of each row: BINX/BINY when present, else the ranks of the
    distinct centre values (rounded to 0.01 px)."""
    if bx is None or by is None:
        bx = np.unique(np.round(xc, 2), return_inverse=True)[1]
        by = np.unique(np.round(yc, 2), return_inverse=True)[1]
    bx, by = np.asarray(bx, np.int64).ravel(), np.asarray(by, np.int64).ravel()
    bx, by = bx - bx.min(), by - by.min()
    nzx, nzy = int(bx.max()) + 1, int(by.max()) + 1
    seen = np.zeros((nzy, nzx), np.int64)
    np.add.at(seen, (by, bx), 1)
    if (seen != 1).any():
        raise FileFormatError(f"{where}the zone lattice {nzy}x{nzx} (y x) is not covered once by the "
                              f"{len(bx)} rows ({int((seen == 0).sum())} zones missing, "
                              f"{int((seen > 1).sum())} repeated)")
    return bx, by


def _oversampling(h, keywords: dict, where: str, oversamp) -> tuple[int, int]:
    if oversamp is not None:
        ox, oy = (oversamp, oversamp) if np.isscalar(oversamp) else oversamp
        return int(ox), int(oy)
    ox, oy = _get(h, "ovsmpx", KEYWORD_ALIASES, keywords), _get(h, "ovsmpy", KEYWORD_ALIASES, keywords)
    if ox is None or oy is None:
        raise FileFormatError(f"{where}no oversampling keyword (tried {list(KEYWORD_ALIASES['ovsmpx'])}; "
                              f"the header has {sorted(k for k in h.keys() if not k.startswith(('TTYPE', 'TFORM')))})")
    return int(ox), int(oy)


def _array_shape(names, shapes, key: str, n: int, where: str) -> tuple[int, int]:
    if key in shapes and len(shapes[key]) == 2:
        py, px = shapes[key]
    else:
        side = math.isqrt(n)
        if side * side != n:
            raise FileFormatError(f"{where}{key} holds {n} values and no 2-D TDIM: cannot tell its shape")
        py = px = side
    if py * px != n:
        raise FileFormatError(f"{where}{key} TDIM {shapes.get(key)} does not match its {n} values")
    return py, px


def parse_epsf(h, data: bytes, *, where: str = "EPSF: ", oversamp=None) -> EpsfLibrary:
    """The :class:`EpsfLibrary` of an EPSF BINTABLE from its header ``h`` (our
    :class:`~spxframe.fits.cards.Header`) and its data bytes (the table body; a heap is not
    needed). ``oversamp`` (int or (x, y)) overrides the header's oversampling keywords."""
    if hasattr(h, "index"):
        h.index()  # some 40 look-ups follow: a keyword index is cheaper than scanning for each
    dt, names, shapes = _table_dtype(h, where)
    nrow = int(h.get("NAXIS2", 0) or 0)
    if dt.itemsize != int(h.get("NAXIS1", 0) or 0):
        raise FileFormatError(f"{where}columns take {dt.itemsize} bytes a row, NAXIS1 = {h.get('NAXIS1')}")
    if len(data) < dt.itemsize * nrow:
        raise FileFormatError(f"{where}table data truncated ({len(data)} of {dt.itemsize * nrow} bytes)")
    table = np.frombuffer(data, dt, count=nrow)
    cols, keys = {}, {}
    got = {r: _column(table, names, r, cols, where, h, r in REQUIRED_COLUMNS) for r in COLUMN_ALIASES}
    ox, oy = _oversampling(h, keys, where, oversamp)
    ordering = _get(h, "ordering", KEYWORD_ALIASES, keys)
    if ordering is not None and "xfast" not in re.sub(r"[^a-z]", "", str(ordering).lower()):
        raise FileFormatError(f"{where}ORDERING = {ordering!r}: only x-fast arrays are read")
    raw = np.array(got["epsf"], np.float64).reshape(nrow, -1)  # a native-endian copy of its own
    py, px = _array_shape(names, shapes, cols["epsf"], raw.shape[1], where)
    bx, by = _lattice(np.asarray(got["xcenter"], float).ravel(), np.asarray(got["ycenter"], float).ravel(),
                      got["binx"], got["biny"], where)
    nzy, nzx = int(by.max()) + 1, int(bx.max()) + 1
    if nrow == nzy * nzx and np.array_equal(by * nzx + bx, np.arange(nrow)):  # rows x-fast, as written
        arrays = raw.reshape(nzy, nzx, py, px)
    else:
        arrays = np.zeros((nzy, nzx, py, px))
        arrays[by, bx] = raw.reshape(nrow, py, px)
    sums = arrays.sum(axis=(2, 3))
    valid = np.isfinite(sums) & (sums > 0)
    if not valid.any():
        raise FileFormatError(f"{where}no zone holds a finite array with a positive sum")
    fix = valid & (np.abs(sums - 1.0) > NORM_TOL)
    arrays[fix] /= sums[fix][:, None, None]
    arrays[~valid] = 0.0

    def grid(a):
        g = np.full((nzy, nzx), np.nan)
        g[by, bx] = np.asarray(a, float).ravel()
        return g

    extras = {r: grid(got[r]) for r in ("xwidth", "ywidth", "nstar", "neff", "cwave", "cband") if got[r] is not None}
    det = _get(h, "detector", KEYWORD_ALIASES, keys)
    return EpsfLibrary(arrays=arrays, xcenter=grid(got["xcenter"]), ycenter=grid(got["ycenter"]), ovsmpx=ox,
                       ovsmpy=oy, valid=valid, extras=extras, columns=cols, keywords=keys,
                       renormalised=int(fix.sum()), detector=None if det is None else int(det),
                       source=history_source(h.raw))


def history_source(raw: bytes) -> str | None:
    """The file named by a ``HISTORY Calibration source file: <name>`` card (an opaque label)."""
    for m in _HISTORY_RE.finditer(bytes(raw)):
        s = _SOURCE_RE.search(m.group(1).decode("ascii", "replace"))
        if s:
            return s.group(1)
    return None


def is_epsf_hdu(hdu: HDU) -> bool:
    """An HDU named EPSF, or any BINTABLE with an ePSF-role column (the calibration product's
    HDU name is not confirmed, spec §8)."""
    if hdu.name == EXTNAME:
        return True
    h = hdu.header
    if str(h.get("XTENSION", "")).strip() != "BINTABLE":
        return False
    ttypes = {str(h.get(f"TTYPE{i}", "")).strip().upper() for i in range(1, int(h.get("TFIELDS", 0) or 0) + 1)}
    return bool(ttypes & set(COLUMN_ALIASES["epsf"])) and bool(ttypes & set(COLUMN_ALIASES["xcenter"]))


def read_epsf(read, hdu: HDU, *, oversamp=None) -> EpsfLibrary:
    """The EPSF table of a located HDU, its body read through ``read(start, stop) -> bytes`` (or
    from an open file descriptor, or an object with ``get(start, stop)``)."""
    read = as_read(read)
    nbytes = int(hdu.naxis[0]) * int(hdu.naxis[1]) if len(hdu.naxis) == 2 else 0
    data = read(hdu.data_offset, hdu.data_offset + nbytes)
    return parse_epsf(hdu.header, data, where=f"HDU {hdu.index} ({hdu.name or 'no EXTNAME'}): ", oversamp=oversamp)


def read_epsf_file(path: str | os.PathLike, *, oversamp=None) -> EpsfLibrary:
    """The EPSF table of a local file: a QR3 L2 file, its IBE cutout, or the ``epsf`` product."""
    fd = os.open(path, os.O_RDONLY)
    try:
        hdus = scan(fd, path=str(path))
        hit = [h for h in hdus if is_epsf_hdu(h)]
        if not hit:
            raise FileFormatError(f"{path}: no EPSF table (HDUs {[h.name for h in hdus]})")
        return read_epsf(fd, hit[0], oversamp=oversamp)
    finally:
        os.close(fd)
