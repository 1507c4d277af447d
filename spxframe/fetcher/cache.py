"""The local cache of fetched files: one :class:`CacheDir` per run, handed to whoever needs it.

    >>> cache = CacheDir("~/.cache/spxframe")        # or "file:///scratch/cache", or a Path
    >>> fetch(manifest, cache_dir=cache)

Layout (relative to the cache root)::

    data/D<n>/<obs_id>D<n>_x<x0>_y<y0>_<nx>x<ny>.fits   cutout / range (planned box, parent pixels)
    data/D<n>/<obs_id>D<n>_full.fits                      full file
    psf/<psf_key>.fits                                    PSF cube / R7 ePSF library (range reads)
    <file>.ok                                             JSON sidecar written after verification
    <file>.<pid>@<host>.<token>.part                      write in progress (never trusted)
    <file>.lock                                           claim: a fetch is making <file>

A file only reaches its final name through a temporary ``.part`` file and an atomic rename after
verification (size, FITS blocks, END cards, the HDUs, MD5 when known); its ``.ok`` sidecar
follows. :meth:`CacheDir.sweep` removes ``.part`` and ``.lock`` files their writers left behind.

Sizes are bytes, times seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from typing import Any

from spxframe import spherex
from spxframe.errors import FileFormatError, InputError
from spxframe.fetcher import claims
from spxframe.fetcher.owner import PART_SUFFIX, gone, part_writer, tmp_name
from spxframe.fetcher.ranges import Box
from spxframe.fetcher.ranges_r7 import EPSF_HDUS  # noqa: F401  (re-exported)
from spxframe.fits.hdu import quick_check, scan_fits

log = logging.getLogger("spxframe.fetch")

DETECTORS: tuple[int, ...] = tuple(int(b[1:]) for b in spherex.BANDS)   # 1..6
#: what a cached PSF library file holds: the QR2 cube; checked with ``required=PSF_HDUS``, an R7
#: ePSF library (:data:`EPSF_HDUS`, the file's EPSF table) under the same ``psf/`` name is accepted too
PSF_HDUS: tuple[str, ...] = ("PRIMARY", "PSF")
OK_SUFFIX = ".ok"
STALE_PART_S = 24 * 3600.0   # .part / .lock files older than this (s) are removed whoever wrote them


# --------------------------------------------------------------------------------------
# names (relative to the cache root, POSIX separators)
# --------------------------------------------------------------------------------------


def local_name(obs_id: str, detector: int, box: Box | None = None, *, full: bool = False,
               request: str | None = None) -> str:
    """Path of a fetched file relative to the cache root (POSIX separators).

    ``obs_id`` must match the SPHEREx format (``2025W18_2B_0001_1``) and ``detector`` be 1-6, so
    nothing the archive sends can escape the cache. Without a box (and not full) the name
    carries a hash of ``request``. Raises :class:`InputError`."""
    obs_id = str(obs_id)
    if not spherex.OBS_ID_RE.match(obs_id):
        raise InputError(f"obs_id {obs_id!r} does not look like a SPHEREx observation id (YYYYWww_NX_LLLL_S)")
    try:
        det = int(detector)
    except (TypeError, ValueError):
        raise InputError(f"detector {detector!r} is not 1-6") from None
    if det not in DETECTORS:
        raise InputError(f"detector {detector!r} is not 1-6")
    stem = f"{obs_id}D{det}"
    if full:
        name = f"{stem}_full.fits"
    elif box is not None:
        vals = (box.x0, box.y0, box.nx, box.ny)
        if any(int(v) != v for v in vals) or box.x0 < 0 or box.y0 < 0 or box.nx <= 0 or box.ny <= 0 \
                or max(vals) > 10**6:
            raise InputError(f"bad pixel box {vals} for {stem}")
        name = f"{stem}_x{box.x0}_y{box.y0}_{box.nx}x{box.ny}.fits"
    else:
        h = hashlib.sha1((request or "").encode()).hexdigest()[:16]
        name = f"{stem}_req{h}.fits"
    return f"data/D{det}/{name}"


def psf_name(psf_key: str) -> str:
    """Path of a cached PSF cube relative to the cache root; ``psf_key`` is validated."""
    if not spherex.PSF_KEY_RE.match(psf_key or "") or ".." in psf_key:
        raise InputError(f"psf_key {psf_key!r} is not a safe cache key")
    return f"psf/{psf_key}.fits"


def inside(root: str, rel: str) -> str:
    """Absolute path of ``rel`` under ``root``; :class:`InputError` if it would escape ``root``."""
    path = os.path.realpath(os.path.join(root, rel))
    if not path.startswith(os.path.realpath(root) + os.sep):
        raise InputError(f"{rel!r} would escape cache_dir {root!r}")
    return path


def sidecar(path: str) -> str:
    """The ``.ok`` sidecar of a verified file."""
    return path + OK_SUFFIX


def file_md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _local_root(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    elif "://" in text:
        raise InputError(f"cache_dir={text!r}: must be a local (or mounted) folder")
    if not text:
        raise InputError("cache_dir is empty")
    return os.path.realpath(os.path.expanduser(text))


# --------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------


class CacheDir:
    """The local folder of fetched files: layout, atomic writes, verification, clean-up.

    Made once per run from a path (``~`` expanded, ``file://`` accepted, other URLs refused with
    :class:`InputError`); :meth:`prepare` creates the layout and checks that it is writable.
    ``os.fspath(cache)`` is its root. A pickled CacheDir (sent to a cluster worker) is resolved
    and prepared again where it is unpickled: ``~`` is that machine's home."""

    def __init__(self, path: str | os.PathLike) -> None:
        if isinstance(path, CacheDir):
            path = path.spec
        self.spec = os.fspath(path)
        self.root = _local_root(path)
        self._prepared = False

    def __reduce__(self) -> tuple[Any, ...]:
        return CacheDir, (self.spec,)

    @classmethod
    def of(cls, path: str | os.PathLike | CacheDir) -> CacheDir:
        """``path`` itself when it is a :class:`CacheDir`, else a new one."""
        return path if isinstance(path, CacheDir) else cls(path)

    def __fspath__(self) -> str:
        return self.root

    def __repr__(self) -> str:
        return f"CacheDir({self.root!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheDir) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def folders(self) -> list[str]:
        """The folders that hold files (absolute): ``psf`` and ``data/D1`` … ``data/D6``."""
        return [os.path.join(self.root, d) for d in ("psf", *(f"data/D{i}" for i in DETECTORS))]

    def prepare(self) -> CacheDir:
        """Create the layout and check it is writable (once); :class:`InputError` if not."""
        if self._prepared:
            return self
        try:
            for d in (os.path.join(self.root, "data"), *self.folders):
                os.makedirs(d, exist_ok=True)
            probe = os.path.join(self.root, f".write-test.{os.getpid()}.{secrets.token_hex(4)}{PART_SUFFIX}")
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as e:
            raise InputError(f"cache_dir {self.root!r} is not writable: {e}") from e
        self._prepared = True
        return self

    def path(self, rel: str) -> str:
        """Absolute path of a name relative to the root (:class:`InputError` if it escapes)."""
        return inside(self.root, rel)

    # ---- writes -------------------------------------------------------------------

    @staticmethod
    def atomic_write(path: str, data: bytes) -> None:
        """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
        tmp = tmp_name(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def mark_ok(self, path: str, request: dict[str, Any], md5: str | None = None) -> None:
        """Write the JSON sidecar of a verified file (size, md5, request), atomically."""
        info = {"size": os.path.getsize(path), "md5": md5, "request": request, "time": time.time()}
        self.atomic_write(sidecar(path), json.dumps(info, sort_keys=True).encode())

    def place(self, tmp: str, path: str, request: dict[str, Any], md5: str | None) -> None:
        """Rename a verified temporary file to its final name and write its sidecar."""
        os.replace(tmp, path)
        self.mark_ok(path, request, md5)

    def write_verified(self, path: str, data: bytes, request: dict[str, Any], *,
                       required: tuple[str, ...] | None = None) -> None:
        """Write a FITS file built in memory: temporary file, structural check, rename, sidecar."""
        tmp = tmp_name(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            scan_fits(tmp, required=required)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.mark_ok(path, request, hashlib.md5(data).hexdigest())

    # ---- verification -------------------------------------------------------------

    def is_verified(self, path: str, *, required: tuple[str, ...] | None = None, md5: str | None = None,
                    request: dict[str, Any] | None = None, cheap: bool = False) -> bool:
        """Whether ``path`` is a complete, verified file. With a sidecar: size and first card
        (cheap). Without (e.g. killed between rename and sidecar): a full structural check (and
        MD5 when ``md5`` is given), after which the sidecar is written; with ``cheap`` a file
        without a sidecar is not trusted (no full scan, e.g. while another fetch writes it)."""
        if not os.path.isfile(path):
            return False
        try:
            with open(sidecar(path), "rb") as f:
                info = json.loads(f.read())
            ok = quick_check(path, int(info["size"]))
            if ok and md5 and info.get("md5") and info["md5"].lower() != md5.lower():
                ok = False
            if ok:
                return True
        except FileNotFoundError:
            if cheap:
                return False
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return self._verify_scan(path, required, md5, request)

    def _verify_scan(self, path: str, required: tuple[str, ...] | None, md5: str | None,
                     request: dict[str, Any] | None) -> bool:
        try:
            if required == PSF_HDUS:  # a PSF library of either format (QR2 cube, R7 ePSF table)
                names = [h.name for h in scan_fits(path, required=("PRIMARY",))]
                if "PSF" not in names and "EPSF" not in names:
                    raise FileFormatError(f"{path}: neither a PSF cube nor an EPSF table (HDUs {names})")
            else:
                scan_fits(path, required=required)
            digest = file_md5(path) if md5 else None
            if md5 and digest != md5.lower():
                log.warning("%s: MD5 %s differs from the archive's %s; refetching", path, digest, md5)
                return False
        except FileFormatError as e:
            log.warning("cached file rejected (%s); refetching", e)
            return False
        except OSError:
            return False
        self.mark_ok(path, request or {}, digest)
        return True

    # ---- clean-up -----------------------------------------------------------------

    def sweep(self, max_age: float = STALE_PART_S) -> int:
        """Remove the ``.part`` and ``.lock`` files whose writers are gone: those of this host's
        dead processes at once, any host's once older than ``max_age`` s. Live claims of other
        hosts are left to the claim waiters. Returns how many files were removed."""
        n = 0
        now = time.time()
        for d in self.folders:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                p = os.path.join(d, name)
                if name.endswith(PART_SUFFIX):
                    n += _remove_stale_part(p, name, now, max_age)
                elif name.endswith(claims.LOCK_SUFFIX):
                    n += claims.break_if_stale(p, now, max_age)
        return n


def _remove_stale_part(path: str, name: str, now: float, max_age: float) -> bool:
    try:
        old = now - os.path.getmtime(path) > max_age
    except OSError:
        return False
    if not (old or gone(*part_writer(name))):
        return False
    try:
        os.unlink(path)
        return True
    except OSError:
        return False
