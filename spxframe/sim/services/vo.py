"""SIA2 and DataLink answers of the simulated archive (pure functions of params -> bytes)."""

from __future__ import annotations

import re
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from ..adql import geom
from ..adql.functions import intersects
from ..adql.values import Circle, PolyVal, Rel
from . import votable as vt

VOT_CT = "application/x-votable+xml"


class SiaError(ValueError):
    pass


def _floats(s: str, n=None, name="") -> list[float]:
    toks = [t for t in re.split(r"[\s+,]+(?=[-+]?[\dIiNn.])|\s+", s.strip()) if t]
    try:
        vals = [float(t) for t in toks]
    except ValueError:
        raise SiaError(f"{name}: cannot parse numbers in {s!r}") from None
    if n is not None and len(vals) not in (n if isinstance(n, tuple) else (n,)):
        raise SiaError(f"{name}: expected {n} values, got {s!r}")
    return vals


def _split_words(s: str) -> list[str]:
    # pyvo sends spaces (GET-encoded as '+' or %20); '+' may also survive literally
    return [t for t in re.split(r"[\s]+|\+(?=[A-Za-z\d.-])", s.strip()) if t]


def pos_mask(obscore, pos: str, n: int) -> np.ndarray:
    words = _split_words(pos)
    if not words:
        raise SiaError("POS is empty")
    shape = words[0].upper()
    try:
        vals = [float(w) for w in words[1:]]
    except ValueError:
        raise SiaError(f"POS: cannot parse {pos!r}") from None
    polys = obscore.geoms["s_region"]
    if shape == "CIRCLE":
        if len(vals) != 3:
            raise SiaError(f"POS CIRCLE needs ra dec radius: {pos!r}")
        ra, dec, r = vals
        if not (-90 <= dec <= 90) or r < 0:
            raise SiaError(f"POS out of range: {pos!r}")
        region = Circle(ra, dec, r)
        cra, cdec, crad = ra, dec, r
    elif shape in ("RANGE", "POLYGON"):
        if shape == "RANGE":
            if len(vals) != 4:
                raise SiaError(f"POS RANGE needs ra1 ra2 dec1 dec2: {pos!r}")
            r1, r2, d1, d2 = vals
            r1, r2 = (0.0, 360.0) if (np.isinf(r1) or np.isinf(r2)) else (r1, r2)
            d1, d2 = max(d1, -90.0), min(d2, 90.0)
            if r2 < r1:
                r2 += 360.0
            # sample the box edges so that constant-dec sides are followed closely
            ras = np.linspace(r1, r2, 9)
            decs = np.linspace(d1, d2, 9)
            ring = [(a, d1) for a in ras] + [(r2, d) for d in decs[1:]] + \
                   [(a, d2) for a in ras[::-1][1:]] + [(r1, d) for d in decs[::-1][1:-1]]
            if r2 - r1 >= 180 or d2 - d1 >= 180:  # large boxes: test centres only
                ra_c, dec_c = obscore.columns["s_ra"], obscore.columns["s_dec"]
                return (((ra_c - r1) % 360 <= (r2 - r1)) | (r2 - r1 >= 360)) & (dec_c >= d1) & (dec_c <= d2)
            pts = np.array(ring)
        else:
            if len(vals) < 6 or len(vals) % 2:
                raise SiaError(f"POS POLYGON needs at least 3 vertices: {pos!r}")
            pts = np.array(vals).reshape(-1, 2)
        q = geom.Polygons([pts])
        region = PolyVal(q)
        cra, cdec = q.center_radec[0]
        crad = q.radius[0]
    else:
        raise SiaError(f"POS shape {words[0]!r} not supported (CIRCLE, RANGE, POLYGON)")
    # prefilter by centre distance, then the exact intersection test
    cand = np.nonzero(geom.angdist(cra, cdec, polys.center_radec[:, 0], polys.center_radec[:, 1])
                      <= crad + polys.radius + 1e-9)[0]
    mask = np.zeros(n, bool)
    if len(cand):
        rel = Rel({"o": (obscore, cand)}, len(cand))
        hit = intersects(None, rel, PolyVal(polys, cand), region, len(cand))
        mask[cand[np.asarray(hit, bool)]] = True
    return mask


def _interval(s: str, name: str) -> tuple[float, float]:
    v = _floats(s.replace("+Inf", " Inf").replace("+inf", " inf"), (1, 2), name)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def sia_query(obscore, extra: dict, params: dict, newest_allowed: float | None,
              hidden: np.ndarray | None = None) -> tuple[int, dict, bytes]:
    """SIA2 query over the obscore table; ``extra``: per-row SIA column overrides; ``hidden``:
    rows SIA does not show yet (a lagging index)."""
    try:
        c = obscore.columns
        n = obscore.nrows
        mask = np.ones(n, bool)
        for pos in params.get("POS", []):
            mask &= pos_mask(obscore, pos, n)
        for band in params.get("BAND", []):
            lo, hi = _interval(band, "BAND")
            mask &= (c["em_min"] <= hi) & (c["em_max"] >= lo)
        for t in params.get("TIME", []):
            lo, hi = _interval(t, "TIME")
            mask &= (c["t_min"] <= hi) & (c["t_max"] >= lo)
        for key, colname in (("COLLECTION", "obs_collection"), ("ID", "obs_publisher_did"),
                             ("FACILITY", "facility_name"), ("INSTRUMENT", "instrument_name"),
                             ("DPTYPE", "dataproduct_type"), ("TARGET", "target_name")):
            vals = params.get(key, [])
            if vals:
                m = np.zeros(n, bool)
                for v in vals:
                    m |= c[colname] == v
                mask &= m
        if params.get("CALIB"):
            mask &= np.isin(c["calib_level"], [int(v) for v in params["CALIB"]])
        for e in params.get("EXPTIME", []):
            lo, hi = _interval(e, "EXPTIME")
            mask &= (c["t_exptime"] >= lo) & (c["t_exptime"] <= hi)
        if newest_allowed is not None:
            mask &= c["t_min"] <= newest_allowed
        if hidden is not None:
            mask &= ~hidden
        maxrec = params.get("MAXREC", [None])[0]
        maxrec = None if maxrec in (None, "") else int(maxrec)
        fmt = (params.get("RESPONSEFORMAT", params.get("FORMAT", ["votable"]))[0] or "votable").lower()
    except (SiaError, ValueError) as ex:
        return 400, {"Content-Type": VOT_CT}, vt.error_votable(f"UsageError: {ex}")
    idx = np.nonzero(mask)[0]
    overflow = False
    if maxrec is not None and len(idx) > maxrec:
        idx, overflow = idx[:maxrec], maxrec > 0
    names, arrays, metas = [], [], []
    for name, a in list(c.items()) + [(k, v) for k, v in extra.items() if k not in c]:
        a = extra.get(name, a)
        names.append(name)
        arrays.append(a[idx])
        metas.append(obscore.meta.get(name, {}))
    if fmt in ("csv", "text/csv"):
        return 200, {"Content-Type": "text/csv"}, vt.csv(names, arrays)
    return 200, {"Content-Type": VOT_CT}, vt.votable(names, arrays, metas, overflow=overflow)


DATALINK_FIELDS = ["ID", "access_url", "service_def", "error_message", "semantics", "description",
                   "content_type", "content_length"]


def datalink(row: dict | None, did: str, base_url: str, cloud_url: str) -> bytes:
    """DataLink document for one obs_publisher_did (``row``: the observations row or None)."""
    rows = []
    extra = ""
    if row is None:
        rows.append([did, "", "", f"NotFoundFault: {did}", "#this", "", "", -1])
    else:
        ibe = f"{base_url}/{row['uri']}"
        size = int(row.get("contentlength") or 0)
        rows.append([did, ibe, "", "", "#this", "SPHEREx Level 2 spectral image (MEF)", "application/fits", size])
        rows.append([did, "", "ibe-cutout", "", "#cutout", "IBE cutout service for this image", "application/fits", -1])
        if row.get("cloud_available", True):
            rows.append([did, f"{cloud_url}/{row['cloud_key']}", "", "", "#auxiliary",
                         "cloud copy (AWS S3 bucket nasa-irsa-spherex, us-east-1)", "application/fits", size])
        extra = (
            '<RESOURCE type="meta" utype="adhoc:service" ID="ibe-cutout" name="ibe-cutout">\n'
            '<DESCRIPTION>IRSA IBE cutout service: append center and size to the file URL</DESCRIPTION>\n'
            '<PARAM name="standardID" datatype="char" arraysize="*" value="ivo://irsa.ipac/ibe#cutout"/>\n'
            f'<PARAM name="accessURL" datatype="char" arraysize="*" value={quoteattr(ibe)}/>\n'
            '<GROUP name="inputParams">\n'
            '<PARAM name="center" datatype="char" arraysize="*" ucd="pos.eq" value="">'
            "<DESCRIPTION>x,y[units]: ra,dec in deg (or d, rad, arcsec, arcmin) or px/pix/pixels"
            "</DESCRIPTION></PARAM>\n"
            '<PARAM name="size" datatype="char" arraysize="*" value="">'
            "<DESCRIPTION>x[,y][units]: px, pix, pixels, arcsec, arcmin, deg, rad (default deg)</DESCRIPTION></PARAM>\n"
            '<PARAM name="gzip" datatype="char" arraysize="*" value="false">'
            '<DESCRIPTION>true|false</DESCRIPTION></PARAM>\n'
            "</GROUP>\n</RESOURCE>\n")
    arrays = []
    for j, f in enumerate(DATALINK_FIELDS):
        col = [r[j] for r in rows]
        arrays.append(np.array(col, dtype=np.int64) if f == "content_length" else np.array(col, dtype=object))
    metas = [{"ucd": u} for u in ("meta.id;meta.main", "meta.ref.url", "meta.ref", "meta.code.error",
                                  "meta.code", "meta.note", "meta.code.mime", "phys.size;meta.file")]
    metas[-1]["unit"] = "byte"
    return vt.votable(DATALINK_FIELDS, arrays, metas, extra_resources=extra)


def escape_text(s: str) -> str:
    return escape(s)
