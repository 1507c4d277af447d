"""TAP (sync + UWS async) for the simulated archive, independent of the HTTP layer.

Handlers return ``(status, headers: dict, body: bytes)``.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from ..adql.evaluate import Evaluator
from ..adql.parser import AdqlError, parse
from ..adql.values import Table
from . import votable as vt

DEFAULT_MAXREC = 5_000_000
VOT_CT = "application/x-votable+xml"


def first(params: dict, key: str, default=None):
    v = params.get(key.upper())
    if v is None:
        return default
    return v[0] if isinstance(v, list) else v


def parse_uploads(params: dict, files: dict) -> dict:
    """UPLOAD=name,param:part[;...] + multipart parts -> {'tap_upload.name': Table}."""
    spec = first(params, "UPLOAD")
    out = {}
    if not spec:
        return out
    from astropy.io.votable import parse as vparse
    for item in spec.split(";"):
        if not item.strip():
            continue
        try:
            name, ref = item.split(",", 1)
        except ValueError:
            raise AdqlError(f"malformed UPLOAD parameter: {item!r}") from None
        name = name.strip().lower()
        if not ref.startswith("param:"):
            raise AdqlError(f"UPLOAD by URL is not supported by this service: {ref}")
        part = ref[6:]
        data = files.get(part)
        if data is None:
            raise AdqlError(f"UPLOAD part {part!r} is missing from the request")
        try:
            vot = vparse(io.BytesIO(data), verify="ignore")
            tab = vot.get_first_table()
        except Exception as ex:  # noqa: BLE001
            raise AdqlError(f"cannot parse uploaded table {name!r}: {ex}") from ex
        cols, meta = {}, {}
        arr = tab.array
        for f in tab.fields:
            a = arr[f.name]
            mask = np.ma.getmaskarray(a)
            d = np.ma.getdata(a)
            if d.dtype.kind == "f":
                d = np.where(mask, np.nan, d).astype(np.float64)
            elif d.dtype.kind in "iub":
                d = d.astype(np.int64) if d.dtype.kind != "b" else d.astype(bool)
            else:
                d = np.array([None if m else (x.decode() if isinstance(x, bytes) else str(x))
                              for x, m in zip(d.tolist(), mask)], dtype=object)
            cols[f.name.lower()] = d
            meta[f.name.lower()] = {"unit": str(f.unit) if f.unit else None, "ucd": f.ucd}
        out[f"tap_upload.{name}"] = Table(f"tap_upload.{name}", cols, meta)
    return out


class TapService:
    """Executes TAP requests over ``tables`` (dict name -> Table)."""

    def __init__(self, tables: dict, tap_url: str):
        self.tables = tables
        self.tap_url = tap_url
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.error_status = 400  # HTTP status of sync ADQL errors (IRSA's is unconfirmed: 200 or 400)

    # ---- sync ---------------------------------------------------------------------------
    def execute(self, params: dict, files: dict) -> tuple[int, dict, bytes]:
        """Run the query; (status, headers, body); errors as an ERROR VOTable with 400."""
        try:
            req = first(params, "REQUEST", "doQuery")
            if req.lower() != "doquery":
                raise AdqlError(f"unsupported REQUEST: {req}")
            lang = first(params, "LANG", "ADQL")
            if not lang.upper().startswith("ADQL"):
                raise AdqlError(f"unsupported LANG: {lang}")
            query = first(params, "QUERY")
            if not query:
                raise AdqlError("missing parameter QUERY")
            fmt = (first(params, "FORMAT") or first(params, "RESPONSEFORMAT") or "votable").lower()
            maxrec = first(params, "MAXREC")
            try:
                maxrec = DEFAULT_MAXREC if maxrec in (None, "") else int(maxrec)
            except ValueError:
                raise AdqlError(f"MAXREC must be an integer: {maxrec!r}") from None
            if maxrec < 0:
                raise AdqlError("MAXREC must not be negative")
            tables = dict(self.tables)
            tables.update(parse_uploads(params, files))
            res = Evaluator(tables).run(parse(query), maxrec)
        except AdqlError as ex:
            return self.error_status, {"Content-Type": VOT_CT, "X-Sim-Error": "1"}, vt.error_votable(str(ex))
        except Exception as ex:  # noqa: BLE001 - internal error still gives a TAP error document
            return 500, {"Content-Type": VOT_CT}, vt.error_votable(f"internal error: {type(ex).__name__}: {ex}")
        if fmt in ("csv", "text/csv"):
            return 200, {"Content-Type": "text/csv"}, vt.csv(res.names, res.arrays)
        if fmt in ("tsv", "text/tab-separated-values"):
            body = vt.csv(res.names, res.arrays).replace(b",", b"\t")
            return 200, {"Content-Type": "text/tab-separated-values"}, body
        if not (fmt.startswith("votable") or "votable" in fmt or fmt in ("text/xml", "application/xml")):
            return 400, {"Content-Type": VOT_CT}, vt.error_votable(f"unsupported FORMAT: {fmt}")
        body = vt.votable(res.names, res.arrays, res.meta, overflow=res.overflow)
        return 200, {"Content-Type": VOT_CT}, body

    # ---- async (UWS 1.1) ----------------------------------------------------------------
    def create_job(self, params: dict, files: dict) -> Job:
        job = Job(uuid.uuid4().hex[:16], params, files, self)
        with self.lock:
            self.jobs[job.id] = job
        if (first(params, "PHASE") or "").upper() == "RUN":
            job.run()
        return job

    def get(self, jid: str) -> Job | None:
        with self.lock:
            return self.jobs.get(jid)

    def delete(self, jid: str) -> bool:
        with self.lock:
            job = self.jobs.pop(jid, None)
        if job:
            job.abort()
        return job is not None

    def joblist_xml(self) -> bytes:
        with self.lock:
            jobs = list(self.jobs.values())
        items = "".join(f'<uws:jobref id="{j.id}" xlink:href="{self.tap_url}/async/{j.id}">'
                        f"<uws:phase>{j.phase}</uws:phase></uws:jobref>" for j in jobs)
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<uws:jobs {_NS} version="1.1">{items}</uws:jobs>\n').encode()


_NS = ('xmlns:uws="http://www.ivoa.net/xml/UWS/v1.0" xmlns:xlink="http://www.w3.org/1999/xlink" '
       'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"')


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Job:
    ACTIVE = ("QUEUED", "EXECUTING")

    def __init__(self, jid, params, files, service: TapService):
        self.id, self.params, self.files, self.service = jid, dict(params), dict(files), service
        self.phase = "PENDING"
        self.created = time.time()
        self.started = self.ended = None
        self.destruction = self.created + 7 * 86400
        self.execution_duration = 3600
        self.result: tuple[int, dict, bytes] | None = None
        self.error: str | None = None
        self.cond = threading.Condition()
        self.url = f"{service.tap_url}/async/{jid}"
        self.delay_s = float(first(params, "SIM_DELAY", 0) or 0)  # test hook: keep EXECUTING this long

    def _set(self, phase):
        with self.cond:
            self.phase = phase
            self.cond.notify_all()

    def run(self):
        with self.cond:
            if self.phase != "PENDING":
                return
            self.phase = "QUEUED"
        threading.Thread(target=self._work, daemon=True, name=f"uws-{self.id}").start()

    def _work(self):
        self.started = time.time()
        self._set("EXECUTING")
        if self.delay_s:
            end = time.time() + self.delay_s
            with self.cond:
                while self.phase == "EXECUTING" and time.time() < end:
                    self.cond.wait(end - time.time())
        if self.phase != "EXECUTING":
            return
        status, headers, body = self.service.execute(self.params, self.files)
        with self.cond:
            if self.phase != "EXECUTING":
                return
            self.ended = time.time()
            if status == 200 and "X-Sim-Error" not in headers:
                self.result = (status, headers, body)
                self.phase = "COMPLETED"
            else:
                self.result = (status, headers, body)
                self.error = _error_text(body)
                self.phase = "ERROR"
            self.cond.notify_all()

    def abort(self):
        with self.cond:
            if self.phase in ("PENDING", "QUEUED", "EXECUTING"):
                self.phase = "ABORTED"
                self.ended = time.time()
                self.cond.notify_all()

    def wait(self, timeout: float):
        """UWS 1.1 WAIT: block while the job is QUEUED/EXECUTING (QUEUED -> EXECUTING is not
        reported as a change, so pyvo's wait() returns on the final phase without sleeping);
        a PENDING job returns at once (nothing would change it)."""
        with self.cond:
            end = time.time() + timeout
            while self.phase in self.ACTIVE and time.time() < end:
                self.cond.wait(max(0.0, end - time.time()))

    def xml(self) -> bytes:
        def el(tag, val):
            if val is None:
                return f'<uws:{tag} xsi:nil="true"/>'
            return f"<uws:{tag}>{escape(str(val))}</uws:{tag}>"
        params = "".join(f"<uws:parameter id={quoteattr(k.lower())}>"
                         f"{escape(str(v[0] if isinstance(v, list) else v))}</uws:parameter>"
                         for k, v in self.params.items())
        parts = [f'<?xml version="1.0" encoding="UTF-8"?>\n<uws:job {_NS} version="1.1">',
                 el("jobId", self.id), el("runId", None), el("ownerId", None), el("phase", self.phase),
                 el("quote", None), el("creationTime", _iso(self.created)), el("startTime", _iso(self.started)),
                 el("endTime", _iso(self.ended)), el("executionDuration", self.execution_duration),
                 el("destruction", _iso(self.destruction)), f"<uws:parameters>{params}</uws:parameters>"]
        if self.phase == "COMPLETED":
            parts.append(f'<uws:results><uws:result id="result" xlink:type="simple" '
                         f'xlink:href="{self.url}/results/result"/></uws:results>')
        else:
            parts.append("<uws:results/>")
        if self.phase == "ERROR":
            parts.append(f'<uws:errorSummary type="fatal" hasDetail="true"><uws:message>'
                         f"{escape(self.error or 'error')}</uws:message></uws:errorSummary>")
        parts.append("</uws:job>\n")
        return "".join(parts).encode()

    def set_destruction(self, value: str):
        try:
            self.destruction = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            self.destruction = time.time() + timedelta(days=7).total_seconds()


def _error_text(body: bytes) -> str:
    s = body.decode("utf-8", "replace")
    i = s.find('value="ERROR">')
    if i < 0:
        return s[:500]
    j = s.find("</INFO>", i)
    from xml.sax.saxutils import unescape
    return unescape(s[i + len('value="ERROR">'):j])


def capabilities_xml(tap_url: str) -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<vosi:capabilities xmlns:vosi="http://www.ivoa.net/xml/VOSICapabilities/v1.0"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vr="http://www.ivoa.net/xml/VOResource/v1.0"
 xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1" xmlns:tr="http://www.ivoa.net/xml/TAPRegExt/v1.0">
<capability standardID="ivo://ivoa.net/std/TAP" xsi:type="tr:TableAccess">
<interface xsi:type="vs:ParamHTTP" role="std"><accessURL use="base">{tap_url}</accessURL></interface>
<language><name>ADQL</name><version ivo-id="ivo://ivoa.net/std/ADQL#v2.0">2.0</version>
<description>ADQL subset of the spxframe simulated archive</description></language>
<outputFormat><mime>application/x-votable+xml</mime><alias>votable</alias></outputFormat>
<outputFormat><mime>text/csv</mime><alias>csv</alias></outputFormat>
<uploadMethod ivo-id="ivo://ivoa.net/std/TAPRegExt#upload-inline"/>
<retentionPeriod><default>604800</default></retentionPeriod>
<outputLimit><default unit="row">{DEFAULT_MAXREC}</default><hard unit="row">{DEFAULT_MAXREC}</hard></outputLimit>
</capability>
<capability standardID="ivo://ivoa.net/std/VOSI#capabilities">
<interface xsi:type="vs:ParamHTTP"><accessURL use="full">{tap_url}/capabilities</accessURL></interface></capability>
<capability standardID="ivo://ivoa.net/std/VOSI#tables-1.1">
<interface xsi:type="vs:ParamHTTP"><accessURL use="full">{tap_url}/tables</accessURL></interface></capability>
</vosi:capabilities>
""".encode()


def sia_capabilities_xml(sia_url: str) -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<vosi:capabilities xmlns:vosi="http://www.ivoa.net/xml/VOSICapabilities/v1.0"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1">
<capability standardID="ivo://ivoa.net/std/SIA#query-2.0">
<interface xsi:type="vs:ParamHTTP" role="std" version="2.0"><accessURL use="base">{sia_url}</accessURL></interface>
</capability>
<capability standardID="ivo://ivoa.net/std/VOSI#capabilities">
<interface xsi:type="vs:ParamHTTP"><accessURL use="full">{sia_url}/capabilities</accessURL></interface></capability>
</vosi:capabilities>
""".encode()


def tables_xml(tables: dict) -> bytes:
    from .votable import _datatype
    schemas: dict[str, list] = {}
    for name, t in tables.items():
        schemas.setdefault(name.split(".")[0], []).append(t)
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n'
           '<vosi:tableset xmlns:vosi="http://www.ivoa.net/xml/VOSITables/v1.0" '
           'xmlns:vs="http://www.ivoa.net/xml/VODataService/v1.1" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">']
    for s, ts in schemas.items():
        out.append(f"<schema><name>{s}</name>")
        for t in ts:
            out.append(f'<table type="table"><name>{t.name}</name><description>{escape(t.description)}</description>')
            for c, a in t.columns.items():
                dt, size = _datatype(np.asarray(a))
                unit = (t.meta.get(c) or {}).get("unit")
                out.append(f"<column><name>{c}</name>" + (f"<unit>{unit}</unit>" if unit else "")
                           + f'<dataType xsi:type="vs:VOTableType"{" arraysize=" + quoteattr(size) if size else ""}>'
                           + f'{dt}</dataType></column>')
            out.append("</table>")
        out.append("</schema>")
    out.append("</vosi:tableset>\n")
    return "".join(out).encode()
