"""SPHEREx instrument and file facts, written once: bands, detectors, pixel scale, FITS block
size, HDU names and the QR2 byte layout, FLAGS bits, the PSF cache key, the releases table and
the spectral channels.

References are to the archive specification (``docs/design.md`` lists it): §2.4 detectors,
§3.1 file layout, §3.9 QR3, §4 FLAGS bits, §5 realistic numbers. Every other module — the
simulated archive included — takes these facts from here and never writes them again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------------------
# Instrument and file constants (spec §2.4, §3.1, §5)
# --------------------------------------------------------------------------------------

NPIX: int = 2040  #: detector side, pixels
PIXEL_SCALE_ARCSEC: float = 6.15  #: nominal pixel scale, arcsec / pixel
EXPTIME_S: float = 113.5826  #: XPOSURE, seconds
MJY_SR_TO_UJY_PER_ARCSEC2: float = 23.5044  #: µJy = MJy/sr × Ω[arcsec²] × 23.5044
FULL_FILE_BYTES: int = 71_634_240  #: size of a QR2 L2 MEF
PSF_SHAPE: tuple[int, int, int] = (121, 101, 101)  #: numpy shape of the PSF cube
PSF_OVERSAMP: int = 10  #: PSF pixels per detector pixel
PSF_ZONES_PER_SIDE: int = 11
HDU_NAMES: tuple[str, ...] = ("PRIMARY", "IMAGE", "FLAGS", "VARIANCE", "ZODI", "PSF", "WCS-WAVE")
#: the HDUs of a pipeline R7 (QR3) file, in file order (spec §3.9): the EPSF table replaces the PSF
#: cube (a local cutout may hold it in an external library named by an ``EPSFFILE`` card instead)
R7_HDU_NAMES: tuple[str, ...] = ("PRIMARY", "IMAGE", "FLAGS", "VARIANCE", "ZODI", "EPSF", "WCS-WAVE")
#: the HDUs a complete L2 file holds, per file format (``Release.format``)
HDUS_BY_FORMAT: dict[str, tuple[str, ...]] = {"qr2": HDU_NAMES, "r7": R7_HDU_NAMES}
PLANE_HDUS: tuple[str, ...] = ("IMAGE", "FLAGS", "VARIANCE", "ZODI")

#: band -> (lambda_min µm, lambda_max µm, resolving power)   [DOC-P]
BANDS: dict[str, tuple[float, float, float]] = {
    "D1": (0.75, 1.09, 39.0),
    "D2": (1.10, 1.62, 41.0),
    "D3": (1.63, 2.41, 41.0),
    "D4": (2.42, 3.82, 35.0),
    "D5": (3.83, 4.41, 112.0),
    "D6": (4.42, 5.00, 128.0),
}
#: detectors that see the same sky at the same time
DETECTOR_PAIRS: dict[int, int] = {1: 4, 2: 5, 3: 6, 4: 1, 5: 2, 6: 3}

#: farthest a detector's outer pixel corner lies from its frame centre, degrees: the nominal
#: half-diagonal is 2040 × 6.15″ / √2 = 2.464°, real corners reach about 2.53° with SIP
#: distortion (measured on QR2 footprints); the archive queries add the edge margin to it
FOOTPRINT_RADIUS_DEG: float = 2.53

IRSA_URL: str = "https://irsa.ipac.caltech.edu"
CLOUD_BUCKET: str = "nasa-irsa-spherex"
CLOUD_URL: str = "https://nasa-irsa-spherex.s3.us-east-1.amazonaws.com"

# --------------------------------------------------------------------------------------
# FLAGS bits (spec §4.1) and our defaults (spec §4.2 consensus)
# --------------------------------------------------------------------------------------

FLAG_BITS: dict[str, int] = {
    "TRANSIENT": 0,
    "OVERFLOW": 1,
    "SUR_ERROR": 2,
    "PHANTOM": 4,
    "REFERENCE": 5,
    "NONFUNC": 6,
    "DICHROIC": 7,
    "MISSING_DATA": 9,
    "HOT": 10,
    "COLD": 11,
    "FULLSAMPLE": 12,
    "PHANMISS": 14,
    "NONLINEAR": 15,
    "PERSIST": 17,
    "OUTLIER": 19,
    "SOURCE": 21,
}
HARD_BAD_BITS: frozenset[int] = frozenset({0, 2, 6, 7, 9, 10, 11, 14, 15, 17})
#: bits pipeline R7 added (spec §3.9, §4.1; observed in QR3 files, not in the official docs)
R7_FLAG_BITS: dict[str, int] = {"CROSSTALK": 20, "GHOST": 22, "GHOST_FPA": 23, "GHOST_EXT": 24,
                                "STREAK": 25, "BLOOM": 26, "SNOWBALL": 27, "HALO": 28, "SATELLITE_HALO": 29}
#: the R7 bits masked by default (the IRSA Mosaic Tool set, spec §4.2); unused in QR2 files
R7_HARD_BAD_BITS: frozenset[int] = frozenset(R7_FLAG_BITS.values())
OPTIONAL_BAD_BITS: frozenset[int] = frozenset({1, 4, 5, 19})
NEVER_REJECT_BITS: frozenset[int] = frozenset({12, 21})


def bits_to_mask(bits: set[int] | frozenset[int] | list[int]) -> int:
    """OR of ``1 << b`` over ``bits``; refuses SOURCE/FULLSAMPLE (never rejected)."""
    bad = set(bits) & NEVER_REJECT_BITS
    if bad:
        raise ValueError(f"bits {sorted(bad)} (FULLSAMPLE/SOURCE) are informational and cannot be masked")
    mask = 0
    for b in bits:
        if not 0 <= int(b) < 32:
            raise ValueError(f"flag bit {b!r} out of range 0..31")
        mask |= 1 << int(b)
    return mask


DEFAULT_BAD_MASK: int = bits_to_mask(HARD_BAD_BITS)

# --------------------------------------------------------------------------------------
# FITS and the QR2 byte layout (spec §3.1)
# --------------------------------------------------------------------------------------

BLOCK: int = 2880  #: FITS block, bytes
CARD: int = 80  #: FITS header card, bytes
ROW_BYTES: int = NPIX * 4  #: bytes per float32/int32 plane row
PLANE_BYTES: int = NPIX * ROW_BYTES  #: bytes per 2040×2040 plane
PSF_BYTES: int = 4_939_200  #: QR2 PSF cube data (121×101×101 float32, padded)
#: header blocks per HDU of a QR2 file (IMAGE may have 8 in some versions: parse, don't assume)
QR2_HEADER_BLOCKS: dict[str, int] = {"PRIMARY": 1, "IMAGE": 7, "FLAGS": 5, "VARIANCE": 4, "ZODI": 4,
                                     "PSF": 15, "WCS-WAVE": 1}


def _qr2_layout() -> dict[str, tuple[int, int, int]]:
    out, pos = {}, 0
    data = {"PRIMARY": 0, "IMAGE": PLANE_BYTES, "FLAGS": PLANE_BYTES, "VARIANCE": PLANE_BYTES,
            "ZODI": PLANE_BYTES, "PSF": PSF_BYTES, "WCS-WAVE": BLOCK}
    for h in HDU_NAMES:
        start, dstart = pos, pos + QR2_HEADER_BLOCKS[h] * BLOCK
        pos = dstart + data[h]
        out[h] = (start, dstart, pos)
    assert pos == FULL_FILE_BYTES
    return out


#: nominal QR2 layout: HDU → (header start, data start, data end) in bytes
QR2_LAYOUT: dict[str, tuple[int, int, int]] = _qr2_layout()

#: an observation id, e.g. ``2025W18_2B_0001_1`` (spec §2.3); it becomes part of cache file names
OBS_ID_RE = re.compile(r"^\d{4}W\d{2}_\d[A-Z]_\d{4}_\d{1,2}$")

# --------------------------------------------------------------------------------------
# The PSF cache key: detector + processing version (spec §2.1, §3.6)
# --------------------------------------------------------------------------------------

#: the processing-version directory of an archive path, e.g. ``l2b-v20-2025-247``
PROCESSING_VERSION_RE = re.compile(r"/(l2b-v[0-9A-Za-z.+-]+)/")
#: what a PSF cache key may look like (it becomes a file name under ``cache_dir/psf/``)
PSF_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def psf_key(url: str, detector: int) -> str | None:
    """PSF cache key ``D<det>_<processing version>`` from a file's URL or cloud key, or None when
    the path holds no ``/l2b-v…/`` directory. Files with one key share one PSF cube."""
    m = PROCESSING_VERSION_RE.search(url or "")
    return f"D{int(detector)}_{m.group(1)}" if m else None

# --------------------------------------------------------------------------------------
# Releases (spec §0.3, §3.9): a release is a row; a row's release comes from its collection
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """One Level-2 release of the archive.

    ``collections``: its ObsCore collections (wide, deep); ``cal_collection``: its calibration
    collection; ``format``: the file format readers dispatch on (``"qr2"`` = pipeline 6.x MEF with
    a PSF cube, ``"r7"`` = pipeline R7 with compressed FLAGS and an EPSF table); ``gains``:
    ``"pre-r7"`` or ``"r7"``; ``precedence``: the newest release wins where two hold the same
    (obs_id, detector); ``doi``: the release's DOI (the QR2 DOI is not settled, spec §8).
    """

    name: str
    collections: tuple[str, ...]
    cal_collection: str
    format: str
    gains: str
    precedence: int
    doi: str


RELEASES: dict[str, Release] = {
    "qr2": Release("qr2", ("spherex_qr2", "spherex_qr2_deep"), "spherex_qr2_cal", "qr2", "pre-r7", 2,
                   "10.26131/IRSA652"),
    "qr3": Release("qr3", ("spherex_qr3", "spherex_qr3_deep"), "spherex_qr3_cal", "r7", "r7", 3,
                   "10.26131/IRSA662"),
}
#: the releases queried when the user names none: those whose file format the readers handle
#: (a release of another format is refused with a clear error rather than producing unreadable files)
READABLE_FORMATS: frozenset[str] = frozenset({"qr2", "r7"})
DEFAULT_RELEASES: tuple[str, ...] = tuple(n for n, r in RELEASES.items() if r.format in READABLE_FORMATS)
#: every collection of every release (calibration collections included)
COLLECTIONS: tuple[str, ...] = tuple(c for r in RELEASES.values() for c in (*r.collections, r.cal_collection))


def release_of(collection: str) -> Release | None:
    """The release a collection belongs to (None for an unknown collection)."""
    for r in RELEASES.values():
        if collection in r.collections or collection == r.cal_collection:
            return r
    return None


def format_of(release: str | None) -> str:
    """The file format of a release name (``"qr2"`` for an unknown or missing one: the only
    format before releases were recorded)."""
    r = RELEASES.get(str(release or "").lower())
    return r.format if r is not None else "qr2"


# --------------------------------------------------------------------------------------
# R7 (QR3) byte figures for planning (spec §3.9): estimates, the real sizes vary per file
# --------------------------------------------------------------------------------------

#: compressed FLAGS bytes per full-width row (~1.8 kB with few SOURCE pixels, ~6 kB when half of
#: them carry SOURCE); plan-time figures take the upper end, the fetch records what was moved
R7_FLAGS_ROW_BYTES_EST: int = 6_000
#: the EPSF table (441 zones x 33x33 float64 plus the zone columns; 451 zones on D3), bytes
R7_EPSF_BYTES_EST: int = 3_900_000
#: a whole R7 file: headers, IMAGE/VARIANCE/ZODI planes, the compressed FLAGS (heap ~12 MB), EPSF
R7_FULL_FILE_BYTES_EST: int = 3 * PLANE_BYTES + 12_000_000 + R7_EPSF_BYTES_EST + 40 * BLOCK

# --------------------------------------------------------------------------------------
# Calibration products (spec §3.10): found through the directory listing, highest token wins
# --------------------------------------------------------------------------------------

#: the product that brings pre-R7 (QR2) pixels onto R7 gains: QR2 IMAGE x f, VARIANCE x f^2
GAIN_FAMILY: str = "l3_flux_corrections"
#: the release that publishes it (the newest release on R7 gains)
GAIN_RELEASE: str = "qr3"
#: its HDU name (not confirmed, spec §8); a file without it uses its first 2040x2040 image HDU
GAIN_HDU: str = "FLUX_CORRECTION"
#: factors outside this range are bad pixels (spec §3.10): the row median is used instead
GAIN_VALID: tuple[float, float] = (0.5, 2.0)
#: per-pixel wavelength maps CWAVE/CBAND, µm (spec §3.10)
WAVE_FAMILY: str = "spectral_wcs"
#: their HDU names (not confirmed, spec §8)
WAVE_HDUS: tuple[str, str] = ("CWAVE", "CBAND")
#: the release whose spectral_wcs serves images of every release: the newest calibration (R7 v5;
#: it differs from QR2's v4 only by +0.0064 µm on band 5). Whether R7's maps serve QR2 images is
#: not confirmed (§3.10): "qr2" takes QR2's own v4 maps instead.
WAVE_RELEASE: str = "qr3"
#: directory listing and file tree of the products, under the archive's base URL
CAL_LIST_PATH: str = "ibe/dir/list/spherex"
CAL_DATA_PATH: str = "ibe/data/spherex"
#: a product token, e.g. ``cal-flxc-v1-2026-191`` (version, then year-day order the tokens)
CAL_TOKEN_RE = re.compile(r"cal-[A-Za-z0-9]+-v(\d+)-(\d{4})-(\d{3})")

# --------------------------------------------------------------------------------------
# Spectral channels: ~17 per detector, one LVF resolution element wide (spec §2.4)
# --------------------------------------------------------------------------------------

CHANNELS_PER_BAND: int = 17


def channel_edges(band: str) -> np.ndarray:
    """The ``CHANNELS_PER_BAND + 1`` channel edges of ``band`` in µm, evenly spaced in log λ
    (constant resolving power across the band, as the linear variable filter)."""
    lo, hi, _ = BANDS[band]
    return np.geomspace(lo, hi, CHANNELS_PER_BAND + 1)


def channel_of(band: str, wavelength_um) -> np.ndarray:
    """Channel index 0..16 of each wavelength (µm) in ``band``; -1 outside the band."""
    edges = channel_edges(band)
    w = np.asarray(wavelength_um, float)
    idx = np.searchsorted(edges, w, side="right") - 1
    idx = np.where((w >= edges[0]) & (w <= edges[-1]), np.clip(idx, 0, CHANNELS_PER_BAND - 1), -1)
    return idx.astype(np.int64)
