"""Vectorised evaluation of the ADQL subset over in-memory tables.

Supported: SELECT [DISTINCT] [TOP n] (*, t.*, expressions [AS alias]); FROM t [AS] a
[, t2 | [INNER] JOIN t2 [AS] b ON cond]...; WHERE with AND/OR/NOT, = <> < > <= >=, [NOT] IN,
[NOT] BETWEEN, IS [NOT] NULL, [NOT] LIKE/ILIKE; arithmetic + - * / %, || concatenation;
CONTAINS / INTERSECTS / DISTANCE / POINT / CIRCLE / POLYGON / COORD1 / COORD2; common math
and string functions; COUNT/MIN/MAX/SUM/AVG without GROUP BY; ORDER BY (ASC/DESC, aliases,
positions); OFFSET.

Joins: equality conditions become hash joins; CONTAINS(POINT(left), region(right)) (or the
reverse) becomes a spatial join (centre-distance prefilter, then the exact test); single-table
WHERE conjuncts are pushed down before joining.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from . import geom
from .functions import evaluate, geo_value
from .parser import AdqlError, Query, parse
from .project import project
from .values import Circle, Geo, Point, PolyVal, Rel, Result, to_series

ST_COVERS_ERROR = "function st_covers(character varying, geography) does not exist"
MAX_CROSS = 5_000_000


def _conjuncts(e):
    if e is None:
        return []
    if e[0] == "and":
        return _conjuncts(e[1]) + _conjuncts(e[2])
    return [e]


class Evaluator:
    def __init__(self, tables: dict):
        self.tables = tables  # qualified lower-case name -> Table

    # ---- name resolution ----------------------------------------------------------------
    def _resolve(self, aliases: dict, qual, name):
        """-> alias owning the column."""
        if qual is not None:
            cands = [a for a, t in aliases.items()
                     if a == qual or t.name == qual or t.name.split(".")[-1] == qual]
            if not cands:
                raise AdqlError(f'missing FROM-clause entry for table "{qual}"')
            a = cands[0]
            if name not in aliases[a].columns:
                raise AdqlError(f'column {qual}.{name} does not exist')
            return a
        cands = [a for a, t in aliases.items() if name in t.columns]
        if not cands:
            raise AdqlError(f'column "{name}" does not exist')
        if len(cands) > 1:
            raise AdqlError(f'column reference "{name}" is ambiguous')
        return cands[0]

    def _refs(self, aliases, e, out=None):
        out = set() if out is None else out
        if isinstance(e, tuple):
            if e[0] == "col":
                out.add(self._resolve(aliases, e[1], e[2]))
            else:
                for x in e[1:]:
                    if isinstance(x, (tuple, list)):
                        for y in (x if isinstance(x, list) else [x]):
                            self._refs(aliases, y, out)
        return out

    # ---- run ----------------------------------------------------------------------------
    def run(self, q: Query | str, maxrec: int | None = None) -> Result:
        if isinstance(q, str):
            q = parse(q)
        trefs = [q.table] + [j.table for j in q.joins]
        aliases = {}
        for t in trefs:
            if t.name not in self.tables:
                raise AdqlError(f'relation "{t.name}" does not exist')
            if t.alias in aliases:
                raise AdqlError(f'table name "{t.alias}" specified more than once')
            aliases[t.alias] = self.tables[t.name]
        self.aliases = aliases
        if len(trefs) > 1:
            self._check_quirk(q, aliases)
        where = _conjuncts(q.where)
        wrefs = [self._refs(aliases, c) for c in where]
        pushed = {a: [c for c, r in zip(where, wrefs) if r == {a}] for a in aliases}
        rest = [(c, r) for c, r in zip(where, wrefs) if len(r) != 1]
        rel = self._base(q.table.alias, aliases[q.table.alias], pushed[q.table.alias])
        have = {q.table.alias}
        for j in q.joins:
            a = j.table.alias
            right = self._base(a, aliases[a], pushed[a])
            have.add(a)
            conds = _conjuncts(j.on)
            usable = [c for c, r in rest if r <= have and r]
            rest = [(c, r) for c, r in rest if not (r <= have and r)]
            rel = self._join(rel, right, a, conds + usable)
        for c, _ in rest:  # constant conjuncts (e.g. 1=1)
            rel = rel.take(self._mask(rel, c))
        return self._project(q, rel, maxrec)

    def _check_quirk(self, q, aliases):
        def walk(e):
            if not isinstance(e, tuple):
                return
            if e[0] == "func" and e[1] in ("CONTAINS", "INTERSECTS"):
                for arg in e[2]:
                    if isinstance(arg, tuple) and arg[0] == "col" and arg[2] == "s_region":
                        fn = "st_covers" if e[1] == "CONTAINS" else "st_intersects"
                        raise AdqlError(ST_COVERS_ERROR.replace("st_covers", fn))
            for x in e[1:]:
                for y in (x if isinstance(x, list) else [x]):
                    walk(y)
        for j in q.joins:
            walk(j.on)
        walk(q.where)

    def _base(self, alias, table, conds) -> Rel:
        rel = Rel({alias: (table, np.arange(table.nrows))}, table.nrows)
        for c in conds:
            rel = rel.take(self._mask(rel, c))
        return rel

    def _mask(self, rel, c) -> np.ndarray:
        v = self.eval(rel, c)
        if isinstance(v, Geo):
            raise AdqlError("a geometry is not a condition")
        v = np.asarray(v)
        if v.dtype == object:
            v = np.array([bool(x) if x is not None else False for x in np.broadcast_to(v, (rel.n,))])
        elif v.dtype.kind == "f":
            v = np.nan_to_num(v, nan=0.0) != 0
        return np.broadcast_to(v.astype(bool), (rel.n,))

    # ---- joins --------------------------------------------------------------------------
    def _join(self, rel: Rel, right: Rel, ra: str, conds) -> Rel:
        left_aliases = set(rel.parts)
        side = {}
        for c in conds:
            side[id(c)] = self._refs(self.aliases, c)
        # 1) equality
        for c in conds:
            if c[0] == "cmp" and c[1] == "=":
                l_r = self._refs(self.aliases, c[2])
                r_r = self._refs(self.aliases, c[3])
                if l_r and r_r and l_r <= left_aliases and r_r == {ra}:
                    lk, rk = c[2], c[3]
                elif l_r and r_r and r_r <= left_aliases and l_r == {ra}:
                    lk, rk = c[3], c[2]
                else:
                    continue
                ii, jj = _hash_join(self._vals(rel, lk), self._vals(right, rk))
                return self._finish(rel, right, ii, jj, [x for x in conds if x is not c])
        # 2) spatial
        for c in conds:
            f = _contains_call(c)
            if f is None:
                continue
            pt, reg = f
            p_r, g_r = self._refs(self.aliases, pt), self._refs(self.aliases, reg)
            if p_r <= left_aliases and g_r == {ra}:
                prel, grel, swap = rel, right, False
            elif g_r <= left_aliases and p_r == {ra}:
                prel, grel, swap = right, rel, True
            else:
                continue
            p = self.eval(prel, pt)
            g = geo_value(self, grel, reg)
            if not isinstance(p, Point):
                continue
            cra, cdec, crad = _region_centres(g, grel.n)
            if cra is None:
                continue
            pra = np.broadcast_to(np.asarray(p.ra, float), (prel.n,))
            pdec = np.broadcast_to(np.asarray(p.dec, float), (prel.n,))
            ii, jj = geom.candidate_pairs(pra, pdec, cra, cdec, crad)
            if swap:
                ii, jj = jj, ii
                o = np.lexsort((jj, ii))
                ii, jj = ii[o], jj[o]
            return self._finish(rel, right, ii, jj, conds)  # exact test re-evaluates c
        # 3) cross join
        if rel.n * right.n > MAX_CROSS:
            raise AdqlError("join without a usable equality or CONTAINS condition is too large")
        ii = np.repeat(np.arange(rel.n), right.n)
        jj = np.tile(np.arange(right.n), rel.n)
        return self._finish(rel, right, ii, jj, conds)

    def _finish(self, rel, right, ii, jj, conds) -> Rel:
        parts = {a: (t, i[ii]) for a, (t, i) in rel.parts.items()}
        for a, (t, i) in right.parts.items():
            parts[a] = (t, i[jj])
        out = Rel(parts, len(ii))
        for c in conds:
            out = out.take(self._mask(out, c))
        return out

    def _vals(self, rel, e):
        v = self.eval(rel, e)
        if isinstance(v, Geo):
            raise AdqlError("cannot join on a geometry")
        return np.broadcast_to(np.asarray(v), (rel.n,))

    # ---- projection ---------------------------------------------------------------------
    def _project(self, q: Query, rel: Rel, maxrec) -> Result:
        return project(self, q, rel, maxrec)

    # ---- expressions --------------------------------------------------------------------
    def eval(self, rel: Rel, e):
        return evaluate(self, rel, e)

    def column(self, rel: Rel, qual, name):
        a = self._resolve({k: t for k, (t, _) in rel.parts.items()}, qual, name)
        t, idx = rel.parts[a]
        return t, idx, name


def _contains_call(c):
    """CONTAINS(pt, reg) = 1, 1 = CONTAINS(...), or bare CONTAINS(...) -> (pt, reg)."""
    if c[0] == "func" and c[1] in ("CONTAINS", "INTERSECTS") and len(c[2]) == 2:
        f = c
    elif c[0] == "cmp" and c[1] == "=":
        f = None
        for x, y in ((c[2], c[3]), (c[3], c[2])):
            if x[0] == "func" and x[1] in ("CONTAINS", "INTERSECTS") and y == ("lit", 1) and len(x[2]) == 2:
                f = x
        if f is None:
            return None
    else:
        return None
    a, b = f[2]
    if a[0] == "func" and a[1] == "POINT":
        return a, b
    if f[1] == "INTERSECTS" and b[0] == "func" and b[1] == "POINT":
        return b, a
    return None


def _region_centres(g, n):
    if isinstance(g, Circle):
        return (np.broadcast_to(np.asarray(g.ra, float), (n,)),
                np.broadcast_to(np.asarray(g.dec, float), (n,)),
                np.broadcast_to(np.asarray(g.r, float), (n,)))
    if isinstance(g, PolyVal):
        idx = g.indices(n)
        cr = g.polys.center_radec[idx]
        return cr[:, 0], cr[:, 1], g.polys.radius[idx]
    return None, None, None


def _hash_join(lk: np.ndarray, rk: np.ndarray):
    ls, rs = to_series(lk), to_series(rk)
    if ls.dtype != rs.dtype:
        if ls.dtype.is_numeric() and rs.dtype.is_numeric():
            ls, rs = ls.cast(pl.Float64), rs.cast(pl.Float64)
        elif len(ls) and len(rs) and not (ls.dtype == pl.Null or rs.dtype == pl.Null):
            raise AdqlError(f"operator does not exist: {ls.dtype} = {rs.dtype}")
        else:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
    left = pl.DataFrame({"k": ls, "i": np.arange(len(lk), dtype=np.int64)})
    right = pl.DataFrame({"k": rs, "j": np.arange(len(rk), dtype=np.int64)})
    j = left.join(right, on="k", how="inner").sort(["i", "j"])
    return j["i"].to_numpy(), j["j"].to_numpy()


def run_query(tables: dict, adql: str, maxrec: int | None = None) -> Result:
    """Parse and evaluate ``adql`` over ``tables`` (qualified lower-case name -> Table)."""
    return Evaluator(tables).run(parse(adql), maxrec)
