"""Values of the ADQL evaluator: tables, results, relations and geometry values.

Shared by ``evaluate`` (the query engine), ``functions`` (expressions) and ``project`` (SELECT
lists), which import it and never each other upwards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from . import geom


@dataclass
class Table:
    """A named table: ordered numpy columns, per-column metadata, optional geometries."""

    name: str
    columns: dict  # lower-case name -> np.ndarray (strings as object arrays)
    meta: dict = field(default_factory=dict)  # name -> {'unit','ucd','description','xtype'}
    geoms: dict = field(default_factory=dict)  # name -> geom.Polygons aligned with rows
    description: str = ""

    @property
    def nrows(self) -> int:
        for v in self.columns.values():
            return len(v)
        return 0


@dataclass
class Result:
    names: list
    arrays: list
    meta: list
    overflow: bool = False


# geometry values ---------------------------------------------------------------------------
class Geo:
    kind = ""


class Point(Geo):
    kind = "point"

    def __init__(self, ra, dec):
        self.ra, self.dec = ra, dec


class Circle(Geo):
    kind = "circle"

    def __init__(self, ra, dec, r):
        self.ra, self.dec, self.r = ra, dec, r


class PolyVal(Geo):
    """Polygons ``polys`` taken at row indices ``idx`` (None: the single polygon 0)."""

    kind = "polygon"

    def __init__(self, polys: geom.Polygons, idx=None, column=None):
        self.polys, self.idx, self.column = polys, idx, column

    def indices(self, n):
        return np.zeros(n, np.int64) if self.idx is None else self.idx


# relation ----------------------------------------------------------------------------------
class Rel:
    def __init__(self, parts: dict, n: int):
        self.parts = parts  # alias -> (Table, idx)
        self.n = n

    def take(self, sel) -> Rel:
        parts = {a: (t, i[sel]) for a, (t, i) in self.parts.items()}
        n = len(next(iter(parts.values()))[1]) if parts else 0
        return Rel(parts, n)


def to_series(a: np.ndarray) -> pl.Series:
    """A numpy column as a polars Series (ints as int64, floats as float64, objects as values)."""
    if a.dtype == object:
        return pl.Series(a.tolist())
    if a.dtype.kind in "iub":
        return pl.Series(a.astype(np.int64))
    if a.dtype.kind == "f":
        return pl.Series(a.astype(np.float64))
    return pl.Series(a.tolist())


def like_regex(pattern: str, ci: bool) -> re.Pattern:
    """The regular expression of a LIKE pattern (``%`` any run, ``_`` one character)."""
    out = []
    for ch in pattern:
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
    return re.compile("^" + "".join(out) + "$", re.S | (re.I if ci else 0))
