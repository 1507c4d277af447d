"""Expression evaluation and projection for ``adqleval`` (vectorised over numpy columns)."""

from __future__ import annotations

import numpy as np
import polars as pl

from . import geom
from .adql import AdqlError
from .adqleval import Circle, Geo, Point, PolyVal, Rel, _to_series, like_regex

_MATH1 = {
    "ABS": np.abs, "SQRT": np.sqrt, "SIN": lambda x: np.sin(x), "COS": np.cos, "TAN": np.tan,
    "ASIN": np.arcsin, "ACOS": np.arccos, "ATAN": np.arctan, "RADIANS": np.radians,
    "DEGREES": np.degrees, "FLOOR": np.floor, "CEILING": np.ceil, "CEIL": np.ceil, "EXP": np.exp,
    "LOG": np.log, "LOG10": np.log10,
}
AGGS = ("COUNT", "MIN", "MAX", "SUM", "AVG", "COUNT_DISTINCT")


def _num(v):
    if isinstance(v, Geo):
        raise AdqlError("a geometry cannot be used as a number")
    if v is None:
        return np.nan
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            raise AdqlError(f'invalid input syntax for type double precision: "{v}"')
    a = np.asarray(v)
    if a.dtype == object:
        try:
            return a.astype(np.float64)
        except (TypeError, ValueError):
            raise AdqlError("operator does not exist: character varying and numeric")
    return a


def _is_str(v):
    return isinstance(v, str) or (isinstance(v, np.ndarray) and v.dtype == object)


def _strs(v, n):
    """Value -> object array of str (None stays None)."""
    if isinstance(v, str) or v is None:
        return v
    a = np.asarray(v)
    if a.dtype == object:
        return a
    if a.ndim == 0:
        x = a.item()
        return repr(x) if isinstance(x, float) else str(x)
    if a.dtype.kind == "f":
        return np.array([repr(float(x)) for x in a], dtype=object)
    return a.astype(str).astype(object)


def _bool(v, n):
    if isinstance(v, Geo):
        raise AdqlError("a geometry is not a condition")
    a = np.asarray(v)
    if a.dtype == object:
        a = np.array([bool(x) if x is not None else False for x in np.broadcast_to(a, (n,))], bool)
    elif a.dtype.kind == "f":
        a = np.nan_to_num(a, nan=0.0) != 0
    return np.broadcast_to(a.astype(bool), (n,)) if a.ndim == 0 else a.astype(bool)


def _cmp(op, a, b, n):
    if a is None or b is None:
        return np.zeros(n, bool)
    if _is_str(a) != _is_str(b):
        a, b = (_num(a), _num(b))
    elif not _is_str(a):
        a, b = _num(a), _num(b)
    ops = {"=": np.equal, "<>": np.not_equal, "<": np.less, ">": np.greater,
           "<=": np.less_equal, ">=": np.greater_equal}
    try:
        r = ops[op](a, b)
    except TypeError:
        aa = np.broadcast_to(np.asarray(a, dtype=object), (n,))
        bb = np.broadcast_to(np.asarray(b, dtype=object), (n,))
        r = np.array([x is not None and y is not None and bool(ops[op](x, y)) for x, y in zip(aa, bb)], bool)
    r = np.asarray(r)
    if r.dtype == object:
        r = r.astype(bool)
    for v in (a, b):  # SQL: a comparison with NULL is not true
        if isinstance(v, np.ndarray) and v.dtype == object:
            r = r & ~np.array([x is None for x in np.broadcast_to(v, (n,))], bool)
    return r


def evaluate(ev, rel: Rel, e):
    k = e[0]
    n = rel.n
    if k == "lit":
        return e[1]
    if k == "col":
        t, idx, name = ev.column(rel, e[1], e[2])
        return t.columns[name][idx]
    if k == "neg":
        return -_num(evaluate(ev, rel, e[1]))
    if k == "bin":
        a, b = evaluate(ev, rel, e[2]), evaluate(ev, rel, e[3])
        op = e[1]
        if op == "||":
            a, b = _strs(a, n), _strs(b, n)
            if a is None or b is None:
                return None
            try:
                return np.add(np.asarray(a, dtype=object), np.asarray(b, dtype=object))
            except TypeError:
                aa = np.broadcast_to(np.asarray(a, dtype=object), (n,))
                bb = np.broadcast_to(np.asarray(b, dtype=object), (n,))
                return np.array([None if x is None or y is None else x + y for x, y in zip(aa, bb)], dtype=object)
        a, b = _num(a), _num(b)
        with np.errstate(divide="ignore", invalid="ignore"):
            if op == "+":
                return a + b
            if op == "-":
                return a - b
            if op == "*":
                return a * b
            if op == "/":
                if np.asarray(a).dtype.kind in "iu" and np.asarray(b).dtype.kind in "iu":
                    return np.floor_divide(a, b)
                return np.true_divide(a, b)
            if op == "%":
                return np.mod(a, b)
    if k == "cmp":
        return _cmp(e[1], evaluate(ev, rel, e[2]), evaluate(ev, rel, e[3]), n)
    if k == "and":
        return _bool(evaluate(ev, rel, e[1]), n) & _bool(evaluate(ev, rel, e[2]), n)
    if k == "or":
        return _bool(evaluate(ev, rel, e[1]), n) | _bool(evaluate(ev, rel, e[2]), n)
    if k == "not":
        return ~_bool(evaluate(ev, rel, e[1]), n)
    if k == "between":
        x = evaluate(ev, rel, e[1])
        r = _cmp(">=", x, evaluate(ev, rel, e[2]), n) & _cmp("<=", x, evaluate(ev, rel, e[3]), n)
        return ~r if e[4] else r
    if k == "in":
        x = evaluate(ev, rel, e[1])
        r = np.zeros(n, bool)
        for item in e[2]:
            r = r | _cmp("=", x, evaluate(ev, rel, item), n)
        if not e[3]:
            return r
        isnull = np.broadcast_to(np.asarray(x is None if not isinstance(x, np.ndarray) else
                                            ([v is None for v in x] if x.dtype == object else
                                             (np.isnan(x) if x.dtype.kind == "f" else False))), (n,))
        return ~r & ~isnull
    if k == "isnull":
        x = evaluate(ev, rel, e[1])
        if x is None:
            r = np.ones(n, bool)
        else:
            a = np.asarray(x)
            if a.dtype == object:
                r = np.array([v is None for v in np.broadcast_to(a, (n,))], bool)
            elif a.dtype.kind == "f":
                r = np.broadcast_to(np.isnan(a), (n,))
            else:
                r = np.zeros(n, bool)
        return ~r if e[2] else r
    if k == "like":
        x, p = evaluate(ev, rel, e[1]), evaluate(ev, rel, e[2])
        if not isinstance(p, str):
            raise AdqlError("LIKE needs a string pattern")
        rx = like_regex(p, e[4])
        xs = np.broadcast_to(np.asarray(_strs(x, n), dtype=object), (n,))
        r = np.fromiter((v is not None and rx.match(v) is not None for v in xs), bool, count=n)
        return ~r if e[3] else r
    if k == "func":
        return _func(ev, rel, e[1], e[2])
    if k == "star":
        raise AdqlError("* is only allowed in the select list or COUNT(*)")
    raise AdqlError(f"cannot evaluate {k}")


def _geo(ev, rel, e):
    if e[0] == "col":
        t, idx, name = ev.column(rel, e[1], e[2])
        if name in t.geoms:
            return PolyVal(t.geoms[name], idx, column=name)
        raise AdqlError(f'column "{name}" is not a geometry')
    v = evaluate(ev, rel, e)
    if not isinstance(v, Geo):
        raise AdqlError("expected a geometry (POINT, CIRCLE, POLYGON or a region column)")
    return v


def _args_no_frame(ev, rel, args):
    if args and args[0][0] == "lit" and isinstance(args[0][1], str):
        args = args[1:]
    return args


def _poly_arrays(ev, rel, g: PolyVal):
    idx = g.indices(rel.n)
    return g.polys, idx


def _contains(ev, rel, a: Geo, b: Geo, n):
    if isinstance(a, Point):
        if isinstance(b, Circle):
            return geom.angdist(_num(a.ra), _num(a.dec), _num(b.ra), _num(b.dec)) <= _num(b.r)
        if isinstance(b, PolyVal):
            polys, idx = _poly_arrays(ev, rel, b)
            ra = np.broadcast_to(np.asarray(_num(a.ra), float), (n,))
            dec = np.broadcast_to(np.asarray(_num(a.dec), float), (n,))
            return polys.contains_pairs(idx, geom.unit(ra, dec))
        if isinstance(b, Point):
            return geom.angdist(_num(a.ra), _num(a.dec), _num(b.ra), _num(b.dec)) < 1e-9
    if isinstance(a, Circle) and isinstance(b, Circle):
        return geom.angdist(_num(a.ra), _num(a.dec), _num(b.ra), _num(b.dec)) + _num(a.r) <= _num(b.r)
    if isinstance(a, PolyVal):
        polys, idx = _poly_arrays(ev, rel, a)
        v = polys.verts[idx]  # (n,k,2)
        ok = np.ones(len(idx), bool)
        for j in range(v.shape[1]):
            ok &= _contains(ev, rel, Point(v[:, j, 0], v[:, j, 1]), b, n)
        return ok
    raise AdqlError(f"CONTAINS({a.kind}, {b.kind}) is not supported by this service")


def _intersects(ev, rel, a: Geo, b: Geo, n):
    if isinstance(a, Point):
        return _contains(ev, rel, a, b, n)
    if isinstance(b, Point):
        return _contains(ev, rel, b, a, n)
    if isinstance(a, Circle) and isinstance(b, Circle):
        return geom.angdist(_num(a.ra), _num(a.dec), _num(b.ra), _num(b.dec)) <= _num(a.r) + _num(b.r)
    if isinstance(a, Circle):
        a, b = b, a
    if isinstance(b, Circle):  # polygon a, circle b
        polys, idx = _poly_arrays(ev, rel, a)
        inside = _contains(ev, rel, Point(b.ra, b.dec), a, n)
        v = geom.unit(polys.verts[idx][..., 0], polys.verts[idx][..., 1])  # (n,k,3)
        p = np.broadcast_to(geom.unit(_num(b.ra), _num(b.dec)), (len(idx), 3))[:, None, :]
        d = geom.point_arc_distance(p, v, np.roll(v, -1, axis=1)).min(axis=1)
        return inside | (d <= _num(b.r))
    # polygon / polygon
    pa, ia = _poly_arrays(ev, rel, a)
    pb, ib = _poly_arrays(ev, rel, b)
    m = max(len(ia), len(ib))
    ia, ib = np.broadcast_to(ia, (m,)), np.broadcast_to(ib, (m,))
    va, vb = pa.verts[ia], pb.verts[ib]
    r = np.zeros(m, bool)
    for j in range(va.shape[1]):
        r |= pb.contains_pairs(ib, geom.unit(va[:, j, 0], va[:, j, 1]))
    for j in range(vb.shape[1]):
        r |= pa.contains_pairs(ia, geom.unit(vb[:, j, 0], vb[:, j, 1]))
    ua, ub = geom.unit(va[..., 0], va[..., 1]), geom.unit(vb[..., 0], vb[..., 1])
    for i in range(va.shape[1]):
        for j in range(vb.shape[1]):
            r |= geom.segments_intersect_sphere(ua[:, i], ua[:, (i + 1) % va.shape[1]],
                                                ub[:, j], ub[:, (j + 1) % vb.shape[1]])
    return r


def _func(ev, rel, name, args):
    n = rel.n
    if name == "POINT":
        a = _args_no_frame(ev, rel, args)
        if len(a) != 2:
            raise AdqlError("POINT needs a coordinate system and two coordinates")
        return Point(_num(evaluate(ev, rel, a[0])), _num(evaluate(ev, rel, a[1])))
    if name == "CIRCLE":
        a = _args_no_frame(ev, rel, args)
        if len(a) == 2:
            c = _geo(ev, rel, a[0])
            return Circle(c.ra, c.dec, _num(evaluate(ev, rel, a[1])))
        if len(a) != 3:
            raise AdqlError("CIRCLE needs a centre and a radius")
        return Circle(*(_num(evaluate(ev, rel, x)) for x in a))
    if name in ("POLYGON", "BOX"):
        a = _args_no_frame(ev, rel, args)
        vals = []
        for x in a:
            v = evaluate(ev, rel, x)
            if isinstance(v, Point):
                vals += [_num(v.ra), _num(v.dec)]
            else:
                vals.append(_num(v))
        if name == "BOX":
            if len(vals) != 4:
                raise AdqlError("BOX needs a centre, a width and a height")
            ra, dec, w, h = vals
            cosd = np.cos(np.radians(dec))
            vals = [ra - w / 2 / cosd, dec - h / 2, ra + w / 2 / cosd, dec - h / 2,
                    ra + w / 2 / cosd, dec + h / 2, ra - w / 2 / cosd, dec + h / 2]
        if len(vals) < 6 or len(vals) % 2:
            raise AdqlError("POLYGON needs at least three vertices")
        if all(np.ndim(v) == 0 for v in vals):
            return PolyVal(geom.Polygons([np.asarray(vals, float).reshape(-1, 2)]))
        arr = np.stack([np.broadcast_to(np.asarray(v, float), (n,)) for v in vals], axis=1)
        return PolyVal(geom.Polygons(arr.reshape(n, -1, 2)), np.arange(n))
    if name in ("CONTAINS", "INTERSECTS"):
        if len(args) != 2:
            raise AdqlError(f"{name} needs two geometries")
        a, b = _geo(ev, rel, args[0]), _geo(ev, rel, args[1])
        f = _contains if name == "CONTAINS" else _intersects
        return np.broadcast_to(np.asarray(f(ev, rel, a, b, n)), (n,)).astype(np.int64)
    if name == "DISTANCE":
        if len(args) == 4:
            v = [_num(evaluate(ev, rel, x)) for x in args]
            return geom.angdist(*v)
        a, b = _geo(ev, rel, args[0]), _geo(ev, rel, args[1])
        if not (isinstance(a, Point) and isinstance(b, Point)):
            raise AdqlError("DISTANCE needs two points")
        return geom.angdist(_num(a.ra), _num(a.dec), _num(b.ra), _num(b.dec))
    if name in ("COORD1", "COORD2"):
        p = _geo(ev, rel, args[0])
        if not isinstance(p, (Point, Circle)):
            raise AdqlError(f"{name} needs a point")
        return p.ra if name == "COORD1" else p.dec
    if name in _MATH1:
        with np.errstate(all="ignore"):
            return _MATH1[name](_num(evaluate(ev, rel, args[0])))
    if name in ("ATAN2", "POWER", "MOD", "ROUND", "TRUNCATE"):
        v = [_num(evaluate(ev, rel, x)) for x in args]
        if name == "ATAN2":
            return np.arctan2(v[0], v[1])
        if name == "POWER":
            return np.power(np.asarray(v[0], float), v[1])
        if name == "MOD":
            return np.mod(v[0], v[1])
        d = int(v[1]) if len(v) > 1 else 0
        return np.round(v[0], d) if name == "ROUND" else np.trunc(np.asarray(v[0]) * 10 ** d) / 10 ** d
    if name == "PI":
        return np.pi
    if name in ("LOWER", "UPPER", "TRIM"):
        v = _strs(evaluate(ev, rel, args[0]), n)
        f = {"LOWER": str.lower, "UPPER": str.upper, "TRIM": str.strip}[name]
        if isinstance(v, str) or v is None:
            return None if v is None else f(v)
        return np.array([None if s is None else f(s) for s in v], dtype=object)
    if name in AGGS:
        raise AdqlError(f"aggregate function {name.lower()} is only allowed in the select list")
    raise AdqlError(f"function {name.lower()} does not exist")


# ------------------------------------------------------------------------------------------
def _codes(a: np.ndarray) -> np.ndarray:
    s = _to_series(np.asarray(a))
    r = s.rank("dense")
    mx = (r.max() or 0) + 1
    return r.fill_null(mx).to_numpy().astype(np.int64)


def _aggregate(ev, rel, items):
    names, arrays, metas = [], [], []
    for e, alias in items:
        if not (e[0] == "func" and e[1] in AGGS):
            raise AdqlError("column must appear in the GROUP BY clause or be used in an aggregate function")
        fn, args = e[1], e[2]
        if args and args[0][0] == "star":
            v = np.int64(rel.n)
        else:
            x = np.broadcast_to(np.asarray(evaluate(ev, rel, args[0])), (rel.n,))
            if fn == "COUNT":
                v = np.int64(np.sum(~_null_mask(x)))
            elif fn == "COUNT_DISTINCT":
                v = np.int64(_to_series(x).drop_nulls().n_unique())
            else:
                s = _to_series(x)
                v = getattr(s, {"MIN": "min", "MAX": "max", "SUM": "sum", "AVG": "mean"}[fn])()
        names.append(alias or fn.lower().replace("_distinct", ""))
        arrays.append(np.array([v], dtype=object if isinstance(v, str) or v is None else None))
        metas.append({})
    return names, arrays, metas


def _null_mask(x):
    if x.dtype == object:
        return np.array([v is None for v in x], bool)
    if x.dtype.kind == "f":
        return np.isnan(x)
    return np.zeros(len(x), bool)


def project(ev, q, rel: Rel, maxrec):
    from .adqleval import Result
    items = []
    for e, alias in q.select:
        if e[0] == "star":
            for a, (t, _) in rel.parts.items():
                if e[1] is None or e[1] == a or t.name == e[1] or t.name.split(".")[-1] == e[1]:
                    items += [(("col", a, c), None) for c in t.columns if not c.startswith("_")]
            if e[1] is not None and not any(i[0][1] == e[1] for i in items) and e[1] not in rel.parts:
                raise AdqlError(f'missing FROM-clause entry for table "{e[1]}"')
        else:
            items.append((e, alias))
    if any(e[0] == "func" and e[1] in AGGS for e, _ in items):
        names, arrays, metas = _aggregate(ev, rel, items)
        return Result(names, arrays, metas)
    if q.distinct and rel.n:
        vals = [np.broadcast_to(np.asarray(_plain(evaluate(ev, rel, e))), (rel.n,)) for e, _ in items]
        df = pl.DataFrame({f"c{i}": _codes(v) for i, v in enumerate(vals)})
        keep = df.with_row_index("_r").unique(subset=[f"c{i}" for i in range(len(vals))],
                                               keep="first", maintain_order=True)["_r"].to_numpy()
        rel = rel.take(keep)
    if q.order and rel.n:
        keys = []
        for e, desc in q.order:
            if e[0] == "lit" and isinstance(e[1], int):
                if not 1 <= e[1] <= len(items):
                    raise AdqlError(f"ORDER BY position {e[1]} is not in select list")
                e = items[e[1] - 1][0]
            elif e[0] == "col" and e[1] is None:
                for se, al in items:
                    if al is not None and al.lower() == e[2]:
                        e = se
                        break
            v = np.broadcast_to(np.asarray(_plain(evaluate(ev, rel, e))), (rel.n,))
            c = _codes(v)
            keys.append(-c if desc else c)
        order = np.lexsort(keys[::-1])
        rel = rel.take(order)
    start = q.offset or 0
    limit = rel.n - start
    overflow = False
    if q.top is not None:
        limit = min(limit, q.top)
    if maxrec is not None and limit > maxrec:
        limit, overflow = maxrec, True
    if start or limit < rel.n:
        rel = rel.take(np.arange(start, start + max(limit, 0)))
    names, arrays, metas = [], [], []
    seen = {}
    for e, alias in items:
        v = evaluate(ev, rel, e)
        v = _plain(v)
        a = np.asarray(v)
        if a.ndim == 0:
            a = np.full(rel.n, v, dtype=object if isinstance(v, str) or v is None else None)
        meta = {}
        if e[0] == "col":
            t, _, cname = ev.column(rel, e[1], e[2])
            meta = dict(t.meta.get(cname, {}))
            name = alias or cname
        elif e[0] == "func":
            name = alias or e[1].lower()
        else:
            name = alias or "expr"
        name = name.lower() if alias is None else name
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 1
        names.append(name)
        arrays.append(a)
        metas.append(meta)
    return Result(names, arrays, metas, overflow)


def _plain(v):
    if isinstance(v, Geo):
        raise AdqlError("geometry values cannot be returned or compared by this service")
    return v
