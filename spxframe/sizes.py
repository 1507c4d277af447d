"""The ``cutout_size`` / ``cutout_center`` grammar (IRSA IBE cutouts, spec §1.5).

Sizes: one value (square) or ``w,h`` (width along NAXIS1, height along NAXIS2) with an
optional unit suffix: ``px``, ``pix``, ``pixels``, ``arcsec``, ``arcmin``, ``deg``, ``d``
(IRSA's tutorials), ``rad``; no unit means degrees. Examples: ``"200px"``, ``"3arcmin"``,
``"0.1"``, ``"200,400px"``, ``"2,5arcmin"``. ``str(size)`` is the value of IRSA's ``size=``
parameter (``200,200px``, ``3,3arcmin``, ``0.1,0.1deg``).

Centers: ``"ra,dec"`` in degrees, or with an angular unit (``"10,10deg"``, ``"3.141,1.56rad"``,
``"10,10d"``), or ``"x,y px"`` (pixel coordinates; spxframe defines them as **zero-based parent
pixels**, the convention of the manifest's ``x_parent``/``y_parent``). RA is range-reduced into
[0, 360); |Dec| > 90 is an error.

Differences from the SPXQuery documentation (we follow IRSA):

* SPXQuery quotes a 6.2″ pixel scale; we use the nominal 6.15″ (``spherex.PIXEL_SCALE_ARCSEC``),
  so ``"0.1"`` (deg) is round(360 / 6.15) = 59 px here (58 at SPXQuery's 6.2″).
* SPXQuery documents ``"10.3,5.2arcmin"`` as "arcminutes from the reference"; in IRSA's
  grammar an angular unit on ``center`` means absolute RA, Dec in that unit, and so it does here.
* Angular sizes are converted to pixels with round-half-up at the nominal scale (IRSA's exact
  rounding is unconfirmed, spec §1.5); the result is at least 1 pixel.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

from spxframe.spherex import NPIX, PIXEL_SCALE_ARCSEC

__all__ = ["CutoutSize", "CutoutCenter", "parse_cutout_size", "parse_cutout_center", "measurement_size", "UNITS"]

#: unit spelling -> (canonical unit, degrees per unit; None for pixels)
UNITS: dict[str, tuple[str, float | None]] = {
    "px": ("px", None), "pix": ("px", None), "pixel": ("px", None), "pixels": ("px", None),
    "arcsec": ("arcsec", 1 / 3600), "arcmin": ("arcmin", 1 / 60),
    "deg": ("deg", 1.0), "d": ("deg", 1.0), "": ("deg", 1.0), "rad": ("rad", 180 / math.pi),
}
_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf|infinity)"
_RE = re.compile(rf"^\s*({_NUM})\s*(?:,\s*({_NUM})\s*)?([a-z]*)\s*$", re.IGNORECASE)


def _fmt(v: float) -> str:
    """Shortest exact-ish text of a number (no trailing zeros, ints without '.0')."""
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _split(text: str, what: str) -> tuple[float, float | None, str]:
    m = _RE.match(text)
    if not m:
        raise ValueError(f"malformed {what} {text!r}: expected 'a[,b][unit]' with unit one of "
                         f"px, pix, pixels, arcsec, arcmin, deg, d, rad (no unit = degrees)")
    a, b, unit = m.group(1), m.group(2), m.group(3).lower()
    if unit not in UNITS:
        raise ValueError(f"unknown unit {m.group(3)!r} in {what} {text!r}; "
                         f"use one of px, pix, pixels, arcsec, arcmin, deg, d, rad")
    return float(a), (None if b is None else float(b)), unit


@dataclass(frozen=True)
class CutoutSize:
    """A cutout size: ``width`` × ``height`` in ``unit`` (``px``, ``arcsec``, ``arcmin``, ``deg``, ``rad``)."""

    width: float
    height: float
    unit: str = "px"

    def __post_init__(self) -> None:
        if self.unit not in {"px", "arcsec", "arcmin", "deg", "rad"}:
            raise ValueError(f"unknown cutout size unit {self.unit!r}")
        for name, v in (("width", self.width), ("height", self.height)):
            if not math.isfinite(v):
                raise ValueError(f"cutout size {name} must be finite, got {v!r}")
            if v <= 0:
                raise ValueError(f"cutout size {name} must be positive, got {_fmt(v)}{self.unit}")
        nx, ny = self.pixels()
        if max(nx, ny) > NPIX:
            raise ValueError(f"cutout size {self} is {nx}x{ny} px, larger than the {NPIX}x{NPIX} px "
                             f"detector; use access='full' for full images")
        if nx == NPIX and ny == NPIX:
            warnings.warn(f"cutout size {self} is the full {NPIX}x{NPIX} px detector; "
                          f"access='full' (whole images) is cheaper", UserWarning, stacklevel=3)

    @property
    def degrees_per_unit(self) -> float | None:
        """Degrees per unit of this size (None for pixels)."""
        return UNITS[self.unit][1]

    def pixels(self, scale_arcsec: float = PIXEL_SCALE_ARCSEC) -> tuple[int, int]:
        """(nx, ny) in detector pixels, rounded half-up at ``scale_arcsec`` (″/px), at least 1."""
        f = self.degrees_per_unit
        conv = 1.0 if f is None else f * 3600.0 / scale_arcsec
        return (max(1, math.floor(self.width * conv + 0.5)), max(1, math.floor(self.height * conv + 0.5)))

    def degrees(self, scale_arcsec: float = PIXEL_SCALE_ARCSEC) -> tuple[float, float]:
        """(width, height) in degrees (pixels converted at ``scale_arcsec``)."""
        f = self.degrees_per_unit
        conv = scale_arcsec / 3600.0 if f is None else f
        return self.width * conv, self.height * conv

    def __str__(self) -> str:  # IRSA's size= value
        return f"{_fmt(self.width)},{_fmt(self.height)}{self.unit}"


@dataclass(frozen=True)
class CutoutCenter:
    """A cutout center: sky (``ra``, ``dec`` in degrees) when ``pixel`` is False, else parent
    pixel coordinates (``x``, ``y``; zero-based) stored in the same two fields."""

    a: float
    b: float
    pixel: bool = False

    def __post_init__(self) -> None:
        for v in (self.a, self.b):
            if not math.isfinite(v):
                raise ValueError(f"cutout center coordinates must be finite, got {self.a!r},{self.b!r}")
        if not self.pixel:
            if abs(self.b) > 90:
                raise ValueError(f"cutout center Dec {self.b!r} deg is outside [-90, 90]")
            ra = self.a % 360.0
            object.__setattr__(self, "a", 0.0 if ra >= 360.0 else ra)  # -1e-300 % 360 == 360

    @property
    def ra(self) -> float:
        if self.pixel:
            raise AttributeError("a pixel cutout center has no ra; use .x")
        return self.a

    @property
    def dec(self) -> float:
        if self.pixel:
            raise AttributeError("a pixel cutout center has no dec; use .y")
        return self.b

    @property
    def x(self) -> float:
        if not self.pixel:
            raise AttributeError("a sky cutout center has no x; use .ra")
        return self.a

    @property
    def y(self) -> float:
        if not self.pixel:
            raise AttributeError("a sky cutout center has no y; use .dec")
        return self.b

    def __str__(self) -> str:  # IRSA's center= value
        return f"{_fmt(self.a)},{_fmt(self.b)}px" if self.pixel else f"{_fmt(self.a)},{_fmt(self.b)}"


#: outer annulus radius (px) of ``measure()``'s default background annulus (5, 9) px
MEASUREMENT_R_OUT_PX = 9.0
#: px of slack on each side of the photometry stamp (the planner's pixel is a prediction; range
#: reads and IBE cutouts re-centre the box on the source's exact pixel)
MEASUREMENT_MARGIN_PX = 2


def measurement_size(*, r_out: float = MEASUREMENT_R_OUT_PX, margin_px: int = MEASUREMENT_MARGIN_PX) -> CutoutSize:
    """The box ``cutout_size=None`` fetches: what one forced-photometry measurement reads, the
    stamp ``measure()`` cuts around the source (half-width ``ceil(max(r_out, 5.5)) + 1`` px, the
    aperture and the background annulus of outer radius ``r_out`` px) plus ``margin_px`` px per
    side. The defaults give 25 × 25 px (2.6′ at 6.15″/px)."""
    if not (math.isfinite(r_out) and r_out > 0) or margin_px < 0:
        raise ValueError(f"need r_out > 0 and margin_px >= 0, got {r_out}, {margin_px}")
    n = 2 * (math.ceil(max(r_out, 5.5)) + 1 + int(margin_px)) + 1
    return CutoutSize(min(n, NPIX), min(n, NPIX), "px")


def parse_cutout_size(text: str | int | float | tuple | CutoutSize) -> CutoutSize:
    """Parse a cutout size (IRSA grammar, see the module docstring).

    Accepts a string, a :class:`CutoutSize`, an int (pixels), a float (degrees) or a
    ``(w, h)`` tuple of ints (pixels). Raises ``ValueError`` naming the problem for zero,
    negative, NaN/inf values, unknown units, malformed text and sizes > 2040 px; warns when
    the size equals the full detector.
    """
    if isinstance(text, CutoutSize):
        return text
    if isinstance(text, bool):
        raise ValueError(f"cutout size must be text or a number, got {text!r}")
    if isinstance(text, int):
        return CutoutSize(text, text, "px")
    if isinstance(text, float):
        return CutoutSize(text, text, "deg")
    if isinstance(text, tuple) and len(text) == 2 and all(isinstance(v, int) for v in text):
        return CutoutSize(text[0], text[1], "px")
    if not isinstance(text, str):
        raise ValueError(f"cutout size must be text like '200px', got {type(text).__name__} {text!r}")
    a, b, unit = _split(text, "cutout size")
    return CutoutSize(a, a if b is None else b, UNITS[unit][0])


def parse_cutout_center(text: str | tuple | CutoutCenter) -> CutoutCenter:
    """Parse a cutout center: ``"ra,dec[unit]"`` (angular unit, default deg) or ``"x,ypx"``.

    A ``(ra, dec)`` tuple of numbers is taken as degrees. Raises ``ValueError`` for malformed
    text, unknown units, a single value, non-finite values and |Dec| > 90.
    """
    if isinstance(text, CutoutCenter):
        return text
    if isinstance(text, tuple) and len(text) == 2:
        return CutoutCenter(float(text[0]), float(text[1]), False)
    if not isinstance(text, str):
        raise ValueError(f"cutout center must be text like '304.7,42.5', got {type(text).__name__} {text!r}")
    a, b, unit = _split(text, "cutout center")
    if b is None:
        raise ValueError(f"cutout center {text!r} needs two values, 'ra,dec' or 'x,ypx'")
    canon, f = UNITS[unit]
    if canon == "px":
        return CutoutCenter(a, b, True)
    return CutoutCenter(a * f, b * f, False)
