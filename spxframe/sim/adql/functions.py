"""Expression evaluation for the ADQL evaluator (vectorised over numpy columns)."""

from __future__ import annotations

import numpy as np

from . import geom
from .parser import AdqlError
from .values import Circle, Geo, Point, PolyVal, Rel, like_regex

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
            raise AdqlError(f'invalid input syntax for type double precision: "{v}"') from None
    a = np.asarray(v)
    if a.dtype == object:
        try:
            return a.astype(np.float64)
        except (TypeError, ValueError):
            raise AdqlError("operator does not exist: character varying and numeric") from None
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
    """Value of expression tree ``e`` over the rows of ``rel`` (a scalar, a numpy column or a geometry)."""
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
        return _binary(e[1], evaluate(ev, rel, e[2]), evaluate(ev, rel, e[3]), n)
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
    if k in _PREDICATES:
        return _PREDICATES[k](ev, rel, e)
    if k == "func":
        return _func(ev, rel, e[1], e[2])
    if k == "star":
        raise AdqlError("* is only allowed in the select list or COUNT(*)")
    raise AdqlError(f"cannot evaluate {k}")


def _binary(op: str, a, b, n: int):
    """Arithmetic (+ - * / %, integer division for integers) and string concatenation (||)."""
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
    return None


def _in(ev, rel: Rel, e):
    """x [NOT] IN (list)."""
    n = rel.n
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


def _isnull(ev, rel: Rel, e):
    """x IS [NOT] NULL."""
    n = rel.n
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


def _like(ev, rel: Rel, e):
    """x [NOT] LIKE / ILIKE pattern."""
    n = rel.n
    x, p = evaluate(ev, rel, e[1]), evaluate(ev, rel, e[2])
    if not isinstance(p, str):
        raise AdqlError("LIKE needs a string pattern")
    rx = like_regex(p, e[4])
    xs = np.broadcast_to(np.asarray(_strs(x, n), dtype=object), (n,))
    r = np.fromiter((v is not None and rx.match(v) is not None for v in xs), bool, count=n)
    return ~r if e[3] else r


_PREDICATES = {"in": _in, "isnull": _isnull, "like": _like}


def geo_value(ev, rel, e):
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


def intersects(ev, rel, a: Geo, b: Geo, n):
    """ADQL INTERSECTS(a, b) over n rows (a point in a region is CONTAINS; ``ev`` may be None)."""
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
    """Value of function ``name`` (geometry constructors and predicates, math, strings, CAST)."""
    if name in _GEO_FUNCS:
        return _GEO_FUNCS[name](ev, rel, name, args)
    if name in _MATH1:
        with np.errstate(all="ignore"):
            return _MATH1[name](_num(evaluate(ev, rel, args[0])))
    if name in ("ATAN2", "POWER", "MOD", "ROUND", "TRUNCATE"):
        return _math2(name, [_num(evaluate(ev, rel, x)) for x in args])
    if name == "PI":
        return np.pi
    if name in ("LOWER", "UPPER", "TRIM"):
        v = _strs(evaluate(ev, rel, args[0]), rel.n)
        f = {"LOWER": str.lower, "UPPER": str.upper, "TRIM": str.strip}[name]
        if isinstance(v, str) or v is None:
            return None if v is None else f(v)
        return np.array([None if s is None else f(s) for s in v], dtype=object)
    if name.startswith("CAST_"):
        return _cast(name[5:], evaluate(ev, rel, args[0]), rel.n)
    if name in AGGS:
        raise AdqlError(f"aggregate function {name.lower()} is only allowed in the select list")
    raise AdqlError(f"function {name.lower()} does not exist")


def _math2(name: str, v: list):
    """ATAN2, POWER, MOD, ROUND, TRUNCATE of evaluated numeric arguments ``v``."""
    if name == "ATAN2":
        return np.arctan2(v[0], v[1])
    if name == "POWER":
        return np.power(np.asarray(v[0], float), v[1])
    if name == "MOD":
        return np.mod(v[0], v[1])
    d = int(v[1]) if len(v) > 1 else 0
    return np.round(v[0], d) if name == "ROUND" else np.trunc(np.asarray(v[0]) * 10 ** d) / 10 ** d


def _cast(typ: str, v, n: int):
    """CAST(v AS typ)."""
    if typ in ("VARCHAR", "CHAR", "CHARACTER", "TEXT"):
        return _strs(v, n)
    x = _num(v)
    if typ in ("INTEGER", "INT", "BIGINT", "SMALLINT"):
        return np.trunc(x).astype(np.int64) if np.all(np.isfinite(x)) else np.trunc(x)
    if typ in ("DOUBLE", "REAL", "FLOAT", "NUMERIC", "DECIMAL"):
        return np.asarray(x, dtype=np.float64)
    raise AdqlError(f"CAST to {typ.lower()} is not supported by this service")


def _point(ev, rel, name, args):
    a = _args_no_frame(ev, rel, args)
    if len(a) != 2:
        raise AdqlError("POINT needs a coordinate system and two coordinates")
    return Point(_num(evaluate(ev, rel, a[0])), _num(evaluate(ev, rel, a[1])))


def _circle(ev, rel, name, args):
    a = _args_no_frame(ev, rel, args)
    if len(a) == 2:
        c = geo_value(ev, rel, a[0])
        return Circle(c.ra, c.dec, _num(evaluate(ev, rel, a[1])))
    if len(a) != 3:
        raise AdqlError("CIRCLE needs a centre and a radius")
    return Circle(*(_num(evaluate(ev, rel, x)) for x in a))


def _polygon(ev, rel, name, args):
    """POLYGON(vertices or points) and BOX(centre, width, height)."""
    n = rel.n
    vals = []
    for x in _args_no_frame(ev, rel, args):
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


def _predicate(ev, rel, name, args):
    """CONTAINS / INTERSECTS as 0/1 integers."""
    if len(args) != 2:
        raise AdqlError(f"{name} needs two geometries")
    a, b = geo_value(ev, rel, args[0]), geo_value(ev, rel, args[1])
    f = _contains if name == "CONTAINS" else intersects
    return np.broadcast_to(np.asarray(f(ev, rel, a, b, rel.n)), (rel.n,)).astype(np.int64)


def _distance(ev, rel, name, args):
    if len(args) == 4:
        v = [_num(evaluate(ev, rel, x)) for x in args]
        return geom.angdist(*v)
    a, b = geo_value(ev, rel, args[0]), geo_value(ev, rel, args[1])
    if not (isinstance(a, Point) and isinstance(b, Point)):
        raise AdqlError("DISTANCE needs two points")
    return geom.angdist(_num(a.ra), _num(a.dec), _num(b.ra), _num(b.dec))


def _coord(ev, rel, name, args):
    p = geo_value(ev, rel, args[0])
    if not isinstance(p, (Point, Circle)):
        raise AdqlError(f"{name} needs a point")
    return p.ra if name == "COORD1" else p.dec


_GEO_FUNCS = {"POINT": _point, "CIRCLE": _circle, "POLYGON": _polygon, "BOX": _polygon, "CONTAINS": _predicate,
              "INTERSECTS": _predicate, "DISTANCE": _distance, "COORD1": _coord, "COORD2": _coord}
