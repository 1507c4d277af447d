"""Fast VOTable (TABLEDATA) and CSV writers for the simulated services."""

from __future__ import annotations

import io
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import polars as pl

VOTABLE_HEAD = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                '<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3" '
                'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">\n')


def _datatype(a: np.ndarray) -> tuple[str, str | None]:
    k = a.dtype.kind
    if k == "f":
        return ("float" if a.dtype.itemsize == 4 else "double"), None
    if k in "iu":
        return {1: "short", 2: "short", 4: "int"}.get(a.dtype.itemsize, "long"), None
    if k == "b":
        return "boolean", None
    return "char", "*"


def _series(a: np.ndarray) -> pl.Series:
    k = a.dtype.kind
    if k == "f":
        s = pl.Series(a.astype(np.float64))
        return s.cast(pl.Utf8)
    if k in "iu":
        return pl.Series(a.astype(np.int64)).cast(pl.Utf8)
    if k == "b":
        return pl.Series(np.where(a, "T", "F"))
    vals = [None if v is None else str(v) for v in a.tolist()]
    s = pl.Series(vals, dtype=pl.Utf8)
    if s.str.contains(r"[&<>]").any():
        s = s.str.replace_all("&", "&amp;", literal=True).str.replace_all(
            "<", "&lt;", literal=True).str.replace_all(">", "&gt;", literal=True)
    return s


def field_xml(name, a, meta) -> str:
    dt, size = _datatype(a)
    attrs = f'name={quoteattr(name)} ID={quoteattr("col_" + name)} datatype="{dt}"'
    if size:
        attrs += f' arraysize="{size}"'
    for key in ("unit", "ucd", "utype", "xtype"):
        if meta.get(key):
            attrs += f" {key}={quoteattr(meta[key])}"
    desc = meta.get("description")
    if desc:
        return f"<FIELD {attrs}><DESCRIPTION>{escape(desc)}</DESCRIPTION></FIELD>"
    return f"<FIELD {attrs}/>"


def tabledata(arrays) -> str:
    n = len(arrays[0]) if arrays else 0
    if n == 0:
        return ""
    cols = {}
    parts = [pl.lit("<TR><TD>")]
    for i, a in enumerate(arrays):
        cols[f"c{i}"] = _series(np.asarray(a))
        if i:
            parts.append(pl.lit("</TD><TD>"))
        parts.append(pl.col(f"c{i}").fill_null(""))
    parts.append(pl.lit("</TD></TR>"))
    df = pl.DataFrame(cols)
    rows = df.select(pl.concat_str(parts).alias("r"))["r"]
    return "\n".join(rows.to_list()) + "\n"


def votable(names, arrays, metas, *, overflow=False, infos=(), extra_resources="",
            table_name="result", resource_attrs='type="results"') -> bytes:
    """A complete VOTable document with one results table."""
    out = [VOTABLE_HEAD, f"<RESOURCE {resource_attrs}>\n",
           '<INFO name="QUERY_STATUS" value="OK"/>\n']
    for k, v in infos:
        out.append(f"<INFO name={quoteattr(k)} value={quoteattr(str(v))}/>\n")
    out.append(f'<TABLE name="{table_name}">\n')
    for name, a, meta in zip(names, arrays, metas):
        out.append(field_xml(name, np.asarray(a), meta or {}) + "\n")
    out.append("<DATA><TABLEDATA>\n")
    out.append(tabledata(arrays))
    out.append("</TABLEDATA></DATA>\n</TABLE>\n")
    if overflow:
        out.append('<INFO name="QUERY_STATUS" value="OVERFLOW"/>\n')
    out.append("</RESOURCE>\n")
    out.append(extra_resources)
    out.append("</VOTABLE>\n")
    return "".join(out).encode("utf-8")


def error_votable(message: str) -> bytes:
    return (VOTABLE_HEAD + '<RESOURCE type="results">\n'
            f'<INFO name="QUERY_STATUS" value="ERROR">{escape(message)}</INFO>\n'
            "</RESOURCE>\n</VOTABLE>\n").encode("utf-8")


def csv(names, arrays) -> bytes:
    cols = {}
    for name, a in zip(names, arrays):
        a = np.asarray(a)
        cols[name] = pl.Series([None if v is None else str(v) for v in a.tolist()], dtype=pl.Utf8) \
            if a.dtype == object else pl.Series(a)
    buf = io.BytesIO()
    pl.DataFrame(cols).write_csv(buf)
    return buf.getvalue()
