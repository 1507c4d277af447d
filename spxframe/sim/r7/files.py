"""QR3 (pipeline R7) files of a ``Universe``, and the pre-R7 gains of its QR2 files (spec §3.9, §3.10).

A QR3 frame is drawn by the same ``Frame`` as a QR2 one (R7 gains: the truth); its
:class:`~spxframe.sim.r7.qr3flags.Patches` are drawn once per frame and painted into every box
(bits ORed into FLAGS, their light added to IMAGE). Its bytes are an :class:`~spxframe.sim.r7.mef.R7File`
whose FLAGS tile lengths are computed on first need from the FLAGS alone (no noise, no full
source model) and cached per frame, so a HEAD costs one FLAGS pass and nothing is rendered up front.

With QR3 in the universe, QR2 IMAGE = truth / f and VARIANCE = truth variance / f² (f: the pre-R7
gain map of ``gains``); ZODI, FLAGS and headers are unchanged.
"""

from __future__ import annotations

import gzip as _gzip
import threading
from collections import OrderedDict

import numpy as np

from spxframe.spherex import NPIX

from ..world import headers as hd
from ..world import instrument as ins
from . import calib, gains, mef
from .epsf import epsf_hdu
from .qr3flags import Patches
from .rice import TileTable

PLANES = ("IMAGE", "FLAGS", "VARIANCE", "ZODI")


def saturated(frame) -> np.ndarray:
    """Sources of a ``Frame`` whose brightest pixel (sky included) reaches the overflow level."""
    out = np.zeros(frame.src_x.size, bool)
    cand = np.flatnonzero(frame.src_peak > ins.SATURATION_MJYSR - 1.0)  # peak: an upper bound of any pixel
    if cand.size:
        st = frame.stamps(cand)
        yy = np.clip(np.floor(frame.src_y[cand] + 0.5).astype(int), 0, NPIX - 1)
        xx = np.clip(np.floor(frame.src_x[cand] + 0.5).astype(int), 0, NPIX - 1)
        sky = frame.sky_at(yy, xx)
        out[cand] = np.array([s.max() for s in st]) + sky > ins.SATURATION_MJYSR
    return out


def draw_patches(seed: int, r: int, frame) -> Patches:
    """The QR3 flag patches of frame row ``r`` (one draw per frame, from its own stream)."""
    return Patches.draw(seed, r, frame.det, frame.src_x, frame.src_y, frame.src_peak, saturated(frame))


def paint(patches: Patches, planes: dict[str, np.ndarray], r0: int, r1: int, c0: int, c1: int) -> dict:
    """``planes`` of a box (file dtypes) with the patches' bits ORed into FLAGS and light added to IMAGE."""
    idx = patches.touching(r0, r1, c0, c1)
    if not idx.size:
        return planes
    flags = np.array(planes["FLAGS"], np.int32)
    light = np.zeros(flags.shape)
    patches.paint(r0, r1, c0, c1, flags, light)
    img = (np.asarray(planes["IMAGE"], np.float64) + light).astype(planes["IMAGE"].dtype)
    return {**planes, "FLAGS": flags.astype(planes["FLAGS"].dtype), "IMAGE": img}


def to_pre_r7(seed: int, det: int, planes: dict[str, np.ndarray], r0: int, r1: int, c0: int, c1: int) -> dict:
    """QR2 planes of a box on the pre-R7 gains: IMAGE / f, VARIANCE / f² (NaNs stay NaN)."""
    img, var = gains.to_qr2(planes["IMAGE"], planes["VARIANCE"], gains.gain_map(seed, det, r0, r1, c0, c1))
    return {**planes, "IMAGE": img.astype(planes["IMAGE"].dtype), "VARIANCE": var.astype(planes["VARIANCE"].dtype)}


class _Cache:
    """A small thread-safe LRU dict."""

    def __init__(self, size: int) -> None:
        self.size, self.d, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key, make):
        with self.lock:
            if key in self.d:
                self.d.move_to_end(key)
                return self.d[key]
        val = make()
        with self.lock:
            val = self.d.setdefault(key, val)
            self.d.move_to_end(key)
            while len(self.d) > self.size:
                self.d.popitem(last=False)
        return val


class R7Files:
    """The R7 files and cutouts of a universe's QR3 rows. ``u``: the ``Universe`` (its frames,
    metas and cached planes); knobs: ``epsf_spelling`` (a key of ``epsf.SPELLINGS``), ``epsf_tdim``
    (TDIM on the EPSF column) and ``cutout_flags_compressed`` (FLAGS of cutouts RICE-compressed)."""

    def __init__(self, u, *, epsf_spelling: str = "r7", epsf_tdim: bool = True,
                 cutout_flags_compressed: bool = True) -> None:
        self.u, self.spelling, self.tdim, self.cutout_compressed = u, epsf_spelling, bool(epsf_tdim), \
            bool(cutout_flags_compressed)
        self._patches = _Cache(512)
        self._counts = _Cache(4096)
        self._files = _Cache(64)  #: row -> R7File (holds a few strips of compressed tiles)
        self._lengths: dict[int, np.ndarray] = {}  #: row -> FLAGS tile lengths (16 kB each), kept
        self._lock = threading.Lock()

    def patches(self, r: int) -> Patches:
        return self._patches.get(r, lambda: draw_patches(self.u.seed, r, self.u._frame(r)))

    def epsf(self, det: int) -> tuple[bytes, bytes]:
        return epsf_hdu(int(det), None, self.spelling, self.tdim)

    def counts(self, r: int) -> dict[str, int]:
        """IMAGE ``L2 N_<FLAG>`` counts: the QR2 flags' plus the patches' new bits (cached per frame)."""
        return self._counts.get(r, lambda: {**self.u._full_meta(r)["counts"], **self.patches(r).counts()})

    def headers(self, r: int, box: tuple[int, int, int, int] | None = None) -> dict:
        """R7 headers of a frame (``box`` None) or of a cutout box (x0, y0, nx, ny)."""
        meta = self.u._full_meta(r)
        x0, y0, nx, ny = box or (0, 0, NPIX, NPIX)
        qr2 = {"PRIMARY": hd.primary_header(meta)}
        qr2.update({n: hd.plane_header(n, meta, x0, y0, nx, ny) for n in PLANES})
        return mef.r7_headers(qr2, self.counts(r), str(meta["version"]))

    def flag_rows(self, r: int, r0: int, r1: int) -> np.ndarray:
        """FLAGS rows [r0, r1) of a frame without its noise or faint sources (as the strips hold them)."""
        if all((r, s) in self.u._strips for s in range(r0 // 64, (r1 - 1) // 64 + 1)):
            return self.u._rows(r, "FLAGS", r0, r1)
        fr = self.u._frame(r)
        f = fr.flags(r0, r1, fr.source_model(r0, r1, bright_only=True), fr.background(r0, r1))
        self.patches(r).paint(r0, r1, 0, NPIX, f, np.zeros(f.shape))
        return f

    def file(self, r: int) -> mef.R7File:
        def make() -> mef.R7File:
            det = int(self.u._obs[r]["detector"])
            tiles = TileTable(lambda a, b: self.flag_rows(r, a, b), (NPIX, NPIX), lengths=self._lengths.get(r))
            return mef.R7File(self.headers(r), lambda n, a, b: self.u._rows(r, n, a, b), (NPIX, NPIX),
                              self.epsf(det), mef.wave_hdu(det), tiles=tiles)
        return self._files.get(r, make)

    def sized(self, r: int) -> bool:
        """True when the file's exact size is known (its FLAGS tile lengths were computed)."""
        return r in self._lengths

    def size(self, r: int) -> int:
        f = self.file(r)
        n = f.size
        with self._lock:
            self._lengths.setdefault(r, f.tiles.lengths)
        return n

    def read(self, r: int, start: int, stop: int | None) -> bytes:
        return self.file(r).read(start, stop)

    def cutout(self, r: int, box: tuple[int, int, int, int], gzip: bool = False) -> bytes:
        """An R7 cutout: the planes trimmed to the box, FLAGS compressed (or not: the knob), the EPSF
        table whole, the 9x9 WCS-WAVE table."""
        x0, y0, nx, ny = box
        planes = self.u._box(r, box)
        det = int(self.u._obs[r]["detector"])
        f = mef.R7File(self.headers(r, box), lambda n, a, b: planes[n][a:b], (ny, nx), self.epsf(det),
                       mef.wave_hdu(det), compress_flags=self.cutout_compressed)
        data = f.read()
        return _gzip.compress(data, compresslevel=1, mtime=0) if gzip else data


# ----------------------------------------------------------------------------- calibration products

def cal_index(seed: int, releases: tuple[str, ...]) -> dict[str, tuple[str, str, str, int]]:
    """Path (``<release>/<family>/<token>/<det>/<file>``) -> (release, family, token, detector) of
    every calibration product the releases publish."""
    out = {}
    for rel in releases:
        for fam in calib.HDU_NAMES:
            for det in range(1, 7):
                for tok in calib.tokens(rel, fam, det):
                    out[calib.path(rel, fam, tok, det)] = (rel, fam, tok, det)
    return out
