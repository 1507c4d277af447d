"""Projection for the ADQL evaluator: select list, DISTINCT, aggregates, ORDER BY, TOP/OFFSET/MAXREC."""

from __future__ import annotations

import numpy as np
import polars as pl

from .functions import AGGS, evaluate
from .parser import AdqlError
from .values import Geo, Rel, Result, to_series


def _codes(a: np.ndarray) -> np.ndarray:
    s = to_series(np.asarray(a))
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
                v = np.int64(to_series(x).drop_nulls().n_unique())
            else:
                s = to_series(x)
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
