"""HTTP routes of the simulated TAP service: /TAP/sync, /TAP/async (UWS 1.1), VOSI."""

from __future__ import annotations

from .tap import capabilities_xml, tables_xml


def route_tap(arc, method, path, p, files):
    """TAP sync/async (UWS)/VOSI routes -> (status, headers, body)."""
    tap = arc.tap
    sub = path[len("/TAP"):].strip("/")
    if sub == "sync":
        return tap.execute(p, files)
    if sub == "capabilities":
        return 200, {"Content-Type": "text/xml"}, capabilities_xml(arc.tap_url)
    if sub == "tables":
        return 200, {"Content-Type": "text/xml"}, tables_xml(arc.tables)
    if sub == "availability":
        return 200, {"Content-Type": "text/xml"}, (
            b'<?xml version="1.0"?><vosi:availability xmlns:vosi="http://www.ivoa.net/xml/VOSIAvailability/v1.0">'
            b"<vosi:available>true</vosi:available></vosi:availability>")
    if sub == "async":
        if method == "POST":
            job = tap.create_job(p, files)
            return 303, {"Location": job.url, "Content-Type": "text/plain"}, job.url.encode()
        return 200, {"Content-Type": "text/xml"}, tap.joblist_xml()
    if not sub.startswith("async/"):
        return 404, {"Content-Type": "text/plain"}, b"404 Not Found\n"
    rest = sub[len("async/"):].split("/")
    job = tap.get(rest[0])
    if job is None:
        return 404, {"Content-Type": "text/plain"}, f"no such job: {rest[0]}\n".encode()
    what = "/".join(rest[1:])
    if what == "":
        return _job(arc, job, method, p)
    return _job_resource(job, what, method, p, files)


def _job(arc, job, method, p):
    """/TAP/async/<job>: the job document (WAIT blocks), or DELETE."""
    if method == "DELETE" or (method == "POST" and (p.get("ACTION") or [""])[0].upper() == "DELETE"):
        arc.tap.delete(job.id)
        return 303, {"Location": arc.tap_url + "/async", "Content-Type": "text/plain"}, b""
    if "WAIT" in p:
        try:
            w = float(p["WAIT"][0])
        except ValueError:
            w = 0.0
        job.wait(60.0 if w < 0 else min(w, 60.0))
    return 200, {"Content-Type": "text/xml"}, job.xml()


def _job_resource(job, what, method, p, files):
    """/TAP/async/<job>/<what>: phase, results/result, error, parameters and the UWS attributes."""
    if what == "phase":
        if method == "POST":
            ph = (p.get("PHASE") or [""])[0].upper()
            if ph == "RUN":
                job.run()
            elif ph == "ABORT":
                job.abort()
            else:
                return 400, {"Content-Type": "text/plain"}, f"bad PHASE: {ph}\n".encode()
            return 303, {"Location": job.url, "Content-Type": "text/plain"}, b""
        return 200, {"Content-Type": "text/plain"}, job.phase.encode()
    if what == "results/result":
        if job.phase != "COMPLETED" or job.result is None:
            return 404, {"Content-Type": "text/plain"}, f"job {job.id} has no result (phase {job.phase})\n".encode()
        return job.result
    if what == "error":
        if job.phase == "ERROR" and job.result is not None:
            return 200, job.result[1], job.result[2]
        return 404, {"Content-Type": "text/plain"}, b"no error\n"
    if what == "parameters":
        if method == "POST":
            if job.phase != "PENDING":
                return 400, {"Content-Type": "text/plain"}, b"job is not PENDING\n"
            for k, v in p.items():
                job.params[k] = v
            job.files.update(files)
            return 303, {"Location": job.url, "Content-Type": "text/plain"}, b""
        return 200, {"Content-Type": "text/xml"}, job.xml()
    if what in ("executionduration", "destruction", "quote", "owner"):
        if method == "POST":
            key = what.upper()
            if what == "executionduration" and p.get(key):
                job.execution_duration = int(float(p[key][0]))
            elif what == "destruction" and p.get(key):
                job.set_destruction(p[key][0])
            return 303, {"Location": job.url, "Content-Type": "text/plain"}, b""
        val = {"executionduration": job.execution_duration, "destruction": job.destruction, "quote": "",
               "owner": ""}[what]
        return 200, {"Content-Type": "text/plain"}, str(val).encode()
    return 404, {"Content-Type": "text/plain"}, b"404 Not Found\n"
