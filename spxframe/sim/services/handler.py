"""HTTP request handler of the simulated archive: routing, faults, streaming, logging."""

from __future__ import annotations

import gzip as gz
import hashlib
import inspect
import socket
import time
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

from ..world.cutout import BadRequest
from . import vo
from .tap import VOT_CT, sia_capabilities_xml
from .tapweb import route_tap

CHUNK = 1 << 20
BUCKET = "nasa-irsa-spherex"
IBE_PREFIX = "/ibe/data/spherex/"
LIST_PREFIX = "/ibe/dir/list/spherex/"
LAST_MODIFIED = "Mon, 01 Dec 2025 00:00:00 GMT"


class Stream:
    """A body produced by ``read(start, stop)`` over [start, stop)."""

    def __init__(self, read, start: int, stop: int):
        self.read, self.start, self.stop = read, start, stop

    def __len__(self):
        return self.stop - self.start


def endpoint_of(path: str, query: dict) -> str:
    if path.startswith("/TAP"):
        return "tap"
    if path.rstrip("/") == "/SIA" or path.startswith("/SIA/"):
        return "sia"
    if path.startswith("/datalink/"):
        return "datalink"
    if path.startswith(IBE_PREFIX):
        return "ibe_cutout" if ("center" in query or "size" in query) else "ibe_file"
    if path.startswith(LIST_PREFIX):
        return "ibe_list"
    if path == "/" + BUCKET or path.startswith("/" + BUCKET + "/"):
        return "cloud"
    return "other"


def parse_range(h: str | None, size: int):
    """-> None (no/ignored range), (start, stop) or 'bad'."""
    if not h:
        return None
    h = h.strip()
    if not h.lower().startswith("bytes=") or "," in h:
        return None
    spec = h[6:].strip()
    try:
        a, b = spec.split("-", 1)
        if a == "":
            n = int(b)
            if n <= 0:
                return "bad"
            return (max(0, size - n), size)
        start = int(a)
        stop = size if b == "" else min(int(b) + 1, size)
    except ValueError:
        return "bad"
    if start >= size or stop <= start:
        return "bad"
    return (start, stop)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "spxframe-sim/0.1"

    def log_message(self, *args):  # silence stderr
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # ---- request ------------------------------------------------------------------------
    def _body_params(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        ctype = self.headers.get("Content-Type", "")
        params, files = {}, {}
        if ctype.startswith("multipart/form-data"):
            msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                data = part.get_payload(decode=True) or b""
                if part.get_filename() is not None or name not in ("QUERY", "LANG", "REQUEST", "MAXREC",
                                                                   "FORMAT", "UPLOAD", "PHASE", "RESPONSEFORMAT"):
                    files[name] = data
                params.setdefault(name, []).append(data.decode("utf-8", "replace"))
        elif body:
            params = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return params, files

    def _dispatch(self, method):
        arc = self.server.archive
        t0 = time.time()
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        qraw = parts.query
        query = parse_qs(qraw, keep_blank_values=True)
        ep = endpoint_of(path, query)
        self._rec = {"method": method, "path": path, "query": qraw, "status": None, "bytes_sent": 0,
                     "range": self.headers.get("Range"), "t_start": t0, "t_end": None, "endpoint": ep}
        counted = False
        arc.record(self._rec)  # in the log from the start; status/bytes_sent/t_end fill in
        try:
            params, files = self._body_params()  # any body is read, so keep-alive stays in sync
            allp = {k.upper(): v for k, v in query.items()}
            for k, v in params.items():
                allp.setdefault(k.upper(), []).extend(v)
            f = arc.faults
            if ep == "ibe_cutout":
                with arc.cutout_lock:
                    cap = f.max_cutout_concurrency
                    if cap is not None and arc.cutouts_active >= cap:
                        over = True
                    else:
                        over = False
                        arc.cutouts_active += 1
                        counted = True
                if over:
                    return self._send(503, {"Content-Type": "text/plain", "Retry-After": _ra(f)},
                                      b"503 Service Unavailable: too many concurrent cutout requests\n", ep,
                                      fault="concurrency")
            lat = f.latency(ep)  # server-side work time (holds a cutout slot)
            if lat:
                time.sleep(lat)
            code = f.draw_error(ep)
            if code is not None:
                return self._send(code, {"Content-Type": "text/plain", "Retry-After": _ra(f)},
                                  f"{code} {'Bad Gateway' if code == 502 else 'Service Unavailable'} "
                                  "(simulated)\n".encode(),
                                  ep, fault="error")
            status, headers, body = self._route(method, path, allp, files, ep)
            self._send(status, headers, body, ep, method=method)
        except BrokenPipeError:
            self.close_connection = True
        except ConnectionError:
            self.close_connection = True
        except Exception as ex:  # noqa: BLE001
            if self._rec.get("status") is not None:  # headers already out: cut the connection
                self._rec["fault"] = self._rec.get("fault") or f"server error mid-body: {ex}"
                self.close_connection = True
                return
            try:
                self._send(500, {"Content-Type": "text/plain"},
                           f"internal error: {type(ex).__name__}: {ex}\n".encode(), ep)
            except OSError:
                self.close_connection = True
        finally:
            if counted:
                with arc.cutout_lock:
                    arc.cutouts_active -= 1
            self._rec["t_end"] = time.time()

    # ---- routing ------------------------------------------------------------------------
    def _route(self, method, path, p, files, ep):
        arc = self.server.archive
        if ep == "tap":
            refuse = arc.faults.tap_upload_status
            if refuse is not None and any(str(v).strip() for v in p.get("UPLOAD") or []):
                self._rec["fault"] = "tap_upload"
                return int(refuse), {"Content-Type": "text/plain"}, \
                    f"{int(refuse)} table upload not accepted by this service (simulated)\n".encode()
            return route_tap(arc, method, path, p, files)
        if ep == "sia":
            if path.rstrip("/").endswith("/capabilities"):
                return 200, {"Content-Type": "text/xml"}, sia_capabilities_xml(arc.sia_url)
            if path.rstrip("/").endswith("/availability"):
                return route_tap(arc, method, "/TAP/availability", p, files)
            lag = arc.faults.sia_lag_days
            newest = arc.t_min_max - lag if lag > 0 else None
            return vo.sia_query(arc.tables["spherex.obscore"], arc.sia_extra, p, newest, arc.sia_hidden())
        if ep == "datalink":
            if not path.rstrip("/").endswith("/links/spherex"):
                return 404, {"Content-Type": "text/plain"}, b"no such DataLink service\n"
            ids = p.get("ID") or [""]
            i = arc.did_index.get(ids[0])
            row = arc.row(i) if i is not None else None
            body = vo.datalink(row, ids[0], arc.url, arc.cloud_url)
            return 200, {"Content-Type": VOT_CT + ";content=datalink"}, body
        if ep in ("ibe_file", "ibe_cutout"):
            return self._ibe(method, path[len(IBE_PREFIX):], p, ep)
        if ep == "ibe_list":
            return _dir_list(arc, path[len(LIST_PREFIX):])
        if ep == "cloud":
            return self._cloud(method, path, p)
        if path in ("/", ""):
            return 200, {"Content-Type": "text/plain"}, (
                b"spxframe simulated IRSA archive\n"
                b"/TAP /SIA /datalink/links/spherex /ibe/data/spherex/ /nasa-irsa-spherex/\n")
        return 404, {"Content-Type": "text/plain"}, b"404 Not Found\n"

    def _file(self, method, key, ctype, extra=None):
        arc = self.server.archive
        size = arc.file_size(key)
        rng = parse_range(self.headers.get("Range"), size)
        h = {"Content-Type": ctype, "Accept-Ranges": "bytes", "Last-Modified": LAST_MODIFIED}
        h.update(extra or {})
        if rng == "bad":
            h.update({"Content-Range": f"bytes */{size}", "Content-Type": "text/plain"})
            return 416, h, b"416 Range Not Satisfiable\n"
        read = arc.universe.read
        if rng is None:
            return 200, h, Stream(lambda a, b: read(key, a, b), 0, size)
        h["Content-Range"] = f"bytes {rng[0]}-{rng[1] - 1}/{size}"
        return 206, h, Stream(lambda a, b: read(key, a, b), rng[0], rng[1])

    def _ibe(self, method, key, p, ep):
        arc = self.server.archive
        if ep == "ibe_file" and key in arc.cal_keys:
            return self._file(method, key, "application/fits")
        if key not in arc.key_index:
            if ep == "ibe_file" and (key == "" or key.endswith("/")):
                listing = _listing(arc, key)
                if listing is not None:
                    return 200, {"Content-Type": "text/html"}, listing
            return 404, {"Content-Type": "text/plain"}, f"404 Not Found: /ibe/data/spherex/{key}\n".encode()
        if ep == "ibe_file":
            return self._file(method, key, "application/fits")
        center = (p.get("CENTER") or [""])[0]
        size = (p.get("SIZE") or [""])[0]
        gzip_ = (p.get("GZIP") or ["false"])[0].strip().lower() in ("true", "1", "yes", "t")
        if not center or not size:
            return 400, {"Content-Type": "text/plain"}, b"400 Bad Request: cutouts need both center and size\n"
        try:
            body = _cutout(arc.universe, key, center, size, gzip_)
        except BadRequest as ex:
            return 400, {"Content-Type": "text/plain"}, f"400 Bad Request: {ex}\n".encode()
        is_gz = body[:2] == b"\x1f\x8b"
        return 200, {"Content-Type": "application/gzip" if is_gz else "application/fits"}, body

    def _cloud(self, method, path, p):
        arc = self.server.archive
        key = path[len("/" + BUCKET):].lstrip("/")
        if key == "" or "LIST-TYPE" in p:
            return self._list(p)
        i = arc.key_index.get(key)
        if key in arc.cal_keys:
            return self._file(method, key, "binary/octet-stream",
                              {"ETag": f'"{hashlib.md5(key.encode()).hexdigest()}"',
                               "Access-Control-Allow-Origin": "*", "x-amz-request-id": "SIM"})
        if i is None or not arc.cloud_avail[i]:
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
                    f"<Message>The specified key does not exist.</Message><Key>{escape(key)}</Key></Error>\n").encode()
            return 404, {"Content-Type": "application/xml"}, body
        etag = arc.checksums[i] or hashlib.md5(f"{key}:{arc.file_size(key)}".encode()).hexdigest()
        return self._file(method, key, "binary/octet-stream",
                          {"ETag": f'"{etag}"', "Access-Control-Allow-Origin": "*", "x-amz-request-id": "SIM"})

    def _list(self, p):
        arc = self.server.archive
        prefix = (p.get("PREFIX") or [""])[0]
        delim = (p.get("DELIMITER") or [""])[0]
        maxkeys = int((p.get("MAX-KEYS") or ["1000"])[0])
        start_after = (p.get("CONTINUATION-TOKEN") or p.get("START-AFTER") or [""])[0]
        keys = sorted([k for k, i in arc.key_index.items() if arc.cloud_avail[i] and k.startswith(prefix)]
                      + [k for k in arc.cal_keys if k.startswith(prefix)])
        contents, prefixes = [], []
        seen = set()
        for k in keys:
            if start_after and k <= start_after:
                continue
            rest = k[len(prefix):]
            if delim and delim in rest:
                cp = prefix + rest.split(delim, 1)[0] + delim
                if cp not in seen:
                    seen.add(cp)
                    prefixes.append(cp)
            else:
                contents.append(k)
            if len(contents) + len(prefixes) >= maxkeys:
                break
        last = max(contents[-1:] + prefixes[-1:]) if (contents or prefixes) else ""
        truncated = bool(keys) and last != "" and last < keys[-1] and len(contents) + len(prefixes) >= maxkeys
        items = "".join(f"<Contents><Key>{escape(k)}</Key><LastModified>2025-12-01T00:00:00.000Z</LastModified>"
                        f"<Size>{arc.list_size(k)}</Size><StorageClass>STANDARD</StorageClass></Contents>"
                        for k in contents)
        cps = "".join(f"<CommonPrefixes><Prefix>{escape(c)}</Prefix></CommonPrefixes>" for c in prefixes)
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{BUCKET}</Name><Prefix>{escape(prefix)}</Prefix>"
                f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount>"
                f"<MaxKeys>{maxkeys}</MaxKeys><Delimiter>{escape(delim)}</Delimiter><IsTruncated>{str(truncated).lower()}</IsTruncated>"
                + (f"<NextContinuationToken>{escape(last)}</NextContinuationToken>" if truncated else "")
                + items + cps + "</ListBucketResult>\n").encode()
        return 200, {"Content-Type": "application/xml"}, body

    # ---- response -----------------------------------------------------------------------
    def _send(self, status, headers, body, ep, method="GET", fault=None):
        arc = self.server.archive
        f = arc.faults
        length = len(body)
        self._rec["status"] = status
        if fault:
            self._rec["fault"] = fault
        if method == "HEAD" or length == 0:
            self._rec["t_end"] = time.time()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if method == "HEAD" or length == 0:
            return
        cut = length
        if status < 300 and f.draw_truncate(ep):
            cut = max(0, length // 2)
            self._rec["fault"] = "truncated"
        bps = f.bandwidth(ep)
        link = f.link(ep)  # the shared link: every response's chunks queue on one wire
        t0 = time.time()
        sent = 0
        pos = 0
        step = min([CHUNK, *(max(1024, int(r / 20)) for r in (bps, link) if r)])
        while pos < cut:
            n = min(step, cut - pos)
            if isinstance(body, Stream):
                data = body.read(body.start + pos, body.start + pos + n)
            else:
                data = body[pos:pos + n]
            if bps:  # pace: this chunk is "on the wire" until t0 + (sent + n) / bps
                lag = t0 + (sent + len(data)) / bps - time.time()
                if lag > 0:
                    time.sleep(lag)
            if link:
                arc.link.wait(len(data), link)
            pos += n
            # the log is updated before the bytes leave, so a client that has read the whole
            # response always finds its final entry
            self._rec["bytes_sent"] = sent + len(data)
            if pos >= cut:
                self._rec["t_end"] = time.time()
            self.wfile.write(data)
            sent += len(data)
        if cut < length:
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _listing(arc, prefix: str) -> bytes | None:
    """A minimal IBE-style directory index of the immediate children of ``prefix``."""
    children = set()
    for k in arc.key_index:
        if k.startswith(prefix):
            rest = k[len(prefix):]
            children.add(rest.split("/", 1)[0] + ("/" if "/" in rest else ""))
    if not children:
        return None
    items = "".join(f'<a href="{escape(c)}">{escape(c)}</a>\n' for c in sorted(children))
    return (f"<html><head><title>Index of /ibe/data/spherex/{escape(prefix)}</title></head><body>"
            f"<h1>Index of /ibe/data/spherex/{escape(prefix)}</h1><pre>\n{items}</pre></body></html>\n").encode()


def _dir_list(arc, rest: str):
    """``/ibe/dir/list/spherex/<release>/<family>``: the family's files as JSON lines."""
    parts = [p for p in rest.split("/") if p]
    if len(parts) != 2:
        return 404, {"Content-Type": "text/plain"}, b"404 Not Found: list <release>/<family>\n"
    body = arc.universe.cal_listing(*parts) if hasattr(arc.universe, "cal_listing") else ""
    if not body:
        return 404, {"Content-Type": "text/plain"}, f"404 Not Found: no {rest}\n".encode()
    return 200, {"Content-Type": "application/x-ndjson"}, body.encode()


def _ra(f) -> str:
    v = f.retry_after_s
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


_CUTOUT_HAS_GZIP = {}


def _cutout(universe, key, center, size, gzip_):
    fn = universe.cutout
    if fn not in _CUTOUT_HAS_GZIP:
        try:
            _CUTOUT_HAS_GZIP[fn] = "gzip" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            _CUTOUT_HAS_GZIP[fn] = False
    if _CUTOUT_HAS_GZIP.get(fn):
        return fn(key, center, size, gzip=gzip_)
    body = fn(key, center, size)
    return gz.compress(body, compresslevel=1) if gzip_ and body[:2] != b"\x1f\x8b" else body
