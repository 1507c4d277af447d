"""One transfer task, run in a worker thread: claim its files, transfer, verify, write.

``cutout`` and ``full`` tasks are one streamed GET each; ``range`` tasks read headers, box rows
and WCS-WAVE of the cloud copy and write local cutouts (PSF header only, ``PSFFILE`` pointing at
the PSF cube, cached once per key). Files another fetch is making are handed back to the
scheduler (``task.deferred``) with their :class:`~spxframe.fetcher.claims.Wait`. A cloud object
that answers 404 is fetched from IBE: a whole file directly, range boxes as IBE cutout tasks
handed back to the scheduler (``task.fallback``).
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import threading
from collections.abc import Callable
from typing import Any

from spxframe.errors import FileFormatError, InputError
from spxframe.fetcher import claims
from spxframe.fetcher.cache import PSF_HDUS, CacheDir, file_md5, psf_name
from spxframe.fetcher.http import (
    Cancelled,
    Download,
    Limiters,
    RangeClient,
    RetryPolicy,
    TransferError,
    call_with_retries,
    stream_to_file,
)
from spxframe.fetcher.owner import tmp_name
from spxframe.fetcher.ranges import Box, RangeFile, build_cutout, psf_file_bytes
from spxframe.fetcher.ranges_r7 import (
    EPSF,
    EPSF_HDUS,
    descriptor_ranges,
    epsf_file_bytes,
    flags_image,
    library_from_file,
    salvage_cutout,
    through_zodi,
)
from spxframe.fetcher.tasks import CLOUD_MISSES, CLOUD_MISSING_STATUS, Target, Task, ibe_fallback, ibe_url_of
from spxframe.fits.hdu import HDU, scan_fits
from spxframe.spherex import BLOCK

log = logging.getLogger("spxframe.fetch")

_FAILS = (FileFormatError, InputError, OSError, KeyError, ValueError, claims.ClaimTimeout)


class Worker:
    """Runs transfer tasks (thread-safe; one per fetch() call)."""

    def __init__(self, cache: CacheDir, *, session: Any, fs: Any, policy: RetryPolicy, limiters: Limiters,
                 timeout: tuple[float, float], on_bytes: Callable[[int], None], max_gap: int,
                 headers: dict[str, str] | None, stale_claim: float, claim_timeout: float) -> None:
        self.cache, self.session, self.fs, self.policy = cache, session, fs, policy
        self.limiters, self.timeout, self.on_bytes, self.max_gap = limiters, timeout, on_bytes, max_gap
        self.headers = headers
        self.watcher = claims.Watcher(stale_claim)
        self.claim_timeout = float(claim_timeout)
        self.stop = threading.Event()
        self._psf_locks: dict[str, threading.Lock] = {}
        self._psf_guard = threading.Lock()
        self._layout_guess: dict[str, dict[str, int]] = {}

    def run(self, task: Task) -> Task:
        """Claim, transfer and write the task's files; every failure ends up in ``task.errors``."""
        counter = [0]

        def on_bytes(n: int) -> None:
            counter[0] += n
            self.on_bytes(n)

        held = [t.claim for t in task.targets if t.claim is not None]   # taken by the scheduler
        by_others: list[Target] = []
        try:
            self._claim(task, held, by_others)
            if task.targets:
                if task.access == "range":
                    self._range_or_ibe(task, on_bytes)
                else:
                    self._get(task, on_bytes)
        except Cancelled:
            for t in task.targets:
                task.errors.setdefault(t.rel, "cancelled")
        except TransferError as e:
            task.attempts = max(task.attempts, getattr(e, "attempts", 1))
            self._fail_rest(task, str(e))
        except _FAILS as e:
            self._fail_rest(task, f"{type(e).__name__}: {e}")
            log.warning("%s: %s", task.url, e)
        except Exception as e:  # noqa: BLE001 — one bad transfer must not stop the others
            log.exception("unexpected error fetching %s", task.url)
            self._fail_rest(task, f"{type(e).__name__}: {e}")
        finally:
            for c in held:
                c.release()
        task.targets.extend(by_others)
        task.bytes = counter[0]
        for rel, err in task.errors.items():
            if err == "cancelled":  # an interrupted run: said once by fetch(), not per transfer
                log.debug("cancelled %s (%s)", rel, task.url)
            else:
                log.warning("failed %s (%s): %s", rel, task.url, err)
        return task

    @staticmethod
    def _fail_rest(task: Task, error: str) -> None:
        for t in task.targets:
            if t.rel not in task.done:
                task.errors[t.rel] = error

    # ---- claims: one transfer per file across fetches ----------------------------------

    def ready(self, task: Task, t: Target, *, cheap: bool = False) -> bool:
        """Whether ``t`` is a verified file (range cutouts: and their PSF cube). ``cheap``: only
        trust files with a sidecar (no full scan while another fetch may be writing them)."""
        if not self.cache.is_verified(t.path, md5=task.md5_check, request=t.request, cheap=cheap):
            return False
        if task.access == "range" and task.psf_key:
            return self.cache.is_verified(self.cache.path(psf_name(task.psf_key)), required=PSF_HDUS, cheap=cheap)
        return True

    def wait_for(self, task: Task, t: Target) -> claims.Wait:
        """The wait for ``t``'s claim: done once another fetch has made it."""
        return claims.Wait(t.path, watcher=self.watcher, timeout=self.claim_timeout, what=task.url, name=t.rel,
                           done=lambda: self.ready(task, t, cheap=True))

    def _claim(self, task: Task, held: list[claims.Claim], by_others: list[Target]) -> None:
        """Claim the task's targets (those the scheduler claimed are held already). Those another
        fetch holds go to ``task.deferred`` (the scheduler waits for them), those made meanwhile
        (or timed out waiting) to ``by_others`` (not transferred here: no attempts, no bytes);
        ``task.targets`` keeps the claimed ones still to make."""
        mine: list[Target] = []
        for t in task.targets:
            if self.stop.is_set():
                raise Cancelled()
            got: claims.Claim | bool | None = t.claim
            t.claim = None
            if got is None:
                t.wait = t.wait or self.wait_for(task, t)
                try:
                    got = t.wait.step()
                except claims.ClaimTimeout as e:
                    task.errors[t.rel] = str(e)
                    got = None
                if isinstance(got, claims.Claim):
                    held.append(got)
            if got is False:
                log.debug("%s: %s is being fetched by %s; waiting", task.url, t.rel,
                          claims.describe_owner(t.path))
                task.deferred.append(t)
                continue
            t.wait = None
            if isinstance(got, claims.Claim) and not self.ready(task, t):
                mine.append(t)  # ours to make (not made by another fetch since our cache check)
                continue
            if got is not None:
                task.done.add(t.rel)
            task.by_others.add(t.rel)
            by_others.append(t)
        task.targets = mine

    # ---- the cloud copy lags the archive: IBE in its place ----------------------------------

    def _range_or_ibe(self, task: Task, on_bytes: Callable[[int], None]) -> None:
        """range reads of the cloud object; when it is missing (404, remembered for the run) its
        boxes become IBE cutout tasks (``task.fallback``, run by the scheduler) on the same files."""
        if task.url not in CLOUD_MISSES:
            try:
                self._range(task, on_bytes)
                return
            except TransferError as e:
                if e.status not in CLOUD_MISSING_STATUS or task.done or ibe_url_of(task.url) is None:
                    raise
                CLOUD_MISSES.add(task.url)
                log.info("%s: not in the cloud copy (HTTP %s); its %d box(es) come from IBE cutouts", task.url,
                         e.status, len(task.targets))
        task.fallback, errors = ibe_fallback(task)
        task.errors.update(errors)
        task.targets = [t for t in task.targets if t.rel in errors]   # the others are the fallback's

    # ---- cutout / full: one streamed GET ------------------------------------------------

    def _get(self, task: Task, on_bytes: Callable[[int], None]) -> None:
        """cutout / full: one streamed GET, verified, then renamed into place. A whole file from
        the cloud copy that answers 404 comes from IBE instead (remembered for the run)."""
        urls = [task.url]
        ibe = ibe_url_of(task.url) if task.access == "full" else None
        if ibe is not None:
            urls = [ibe] if task.url in CLOUD_MISSES else [task.url, ibe]
        for k, url in enumerate(urls):
            try:
                self._get_one(task, url, on_bytes)
            except TransferError as e:
                if e.status not in CLOUD_MISSING_STATUS or k + 1 == len(urls):
                    raise
                CLOUD_MISSES.add(url)
                log.info("%s: not in the cloud copy (HTTP %s); fetching it from IBE", url, e.status)
                continue
            if url != task.url:
                task.used_url = url
            return

    def _get_one(self, task: Task, url: str, on_bytes: Callable[[int], None]) -> None:
        target = task.targets[0]
        kind = "cutout" if task.access == "cutout" else "data"
        limiter = self.limiters.get(url, kind)
        tmp = tmp_name(target.path)
        md5: list[str | None] = [None]

        whole = [False]  # set once a stream stopped after ZODI could not be completed

        def attempt(n: int) -> Download:
            try:
                dl = stream_to_file(self.session, url, tmp, timeout=self.timeout, stop=self.stop,
                                    on_bytes=on_bytes, headers=self.headers, latency_probe=task.access == "full",
                                    enough=None if whole[0] else stop_after_zodi(self.cache, task))
                if not dl.complete:  # we closed it after ZODI: the cached library completes it
                    if not salvage_r7_cutout(self.cache, task, tmp):
                        whole[0] = True
                        raise TransferError(f"{url}: cutout stopped after ZODI could not be completed from "
                                            "the ePSF library; fetching it whole", transient=True)
                    dl = Download(os.path.getsize(tmp), file_md5(tmp), None, {})
                md5[0] = _check_body(task, target, tmp, dl)
            except TransferError as e:  # an R7 cutout body that ends inside its EPSF table: complete it
                if whole[0] or e.status is not None or not os.path.exists(tmp) \
                        or not salvage_r7_cutout(self.cache, task, tmp):
                    raise
                dl = Download(os.path.getsize(tmp), file_md5(tmp), None, {})
                md5[0] = _check_body(task, target, tmp, dl)  # the structure again; records the served box
            return dl

        try:
            _, att = call_with_retries(attempt, policy=self.policy, limiter=limiter, stop=self.stop, what=url)
            task.attempts += att
            self.cache.place(tmp, target.path, target.request, md5[0])
            keep_r7_library(self.cache, task, target.path)
        except TransferError as e:
            task.attempts += getattr(e, "attempts", 1)
            e.attempts = task.attempts  # type: ignore[attr-defined]
            raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        task.done.add(target.rel)

    # ---- range reads ----------------------------------------------------------------

    def _range(self, task: Task, on_bytes: Callable[[int], None]) -> None:
        """range: headers, box rows and WCS-WAVE from the cloud copy, PSF cube (R7: the EPSF
        table) once per key, local cutouts written like IBE cutouts (PSF or EPSF header only,
        PSFFILE / EPSFFILE). An R7 file's FLAGS tile descriptors ride with its last header batch,
        their heap bytes with the box rows."""
        rc = RangeClient(self.fs, policy=self.policy, limiters=self.limiters, stop=self.stop, on_bytes=on_bytes)

        def read(ranges: list[tuple[int, int]]) -> tuple[list[bytes], int | None]:
            data, total, att = rc.read(task.url, ranges)
            task.attempts = max(task.attempts, att)
            return data, total

        rf = RangeFile(read, task.url)
        boxes: dict[str, Box] = {}

        def descriptors(partial: list[HDU]) -> list[tuple[int, int]]:
            img = flags_image(partial)
            if img is None or not any(h.name == "IMAGE" for h in partial):
                return []
            boxes.update(_resolved(task, rf, partial))
            d = descriptor_ranges(img, list(boxes.values()))
            return [(min(r[0] for r in d), max(r[1] for r in d))] if d else []  # 8 B per row: one read

        # header lengths of earlier files with this psf_key: read exactly those (a miss costs a read)
        layout = rf.read_layout(guess=self._layout_guess.get(task.psf_key or ""), extra=descriptors)
        if task.psf_key:
            self._layout_guess[task.psf_key] = {h.extname: h.header_size // BLOCK for h in layout[2:]}
        if not boxes:
            boxes.update(_resolved(task, rf, layout))
        store = rf.read_boxes(layout, list(boxes.values()),
                              max_gap=self.max_gap if task.max_gap is None else task.max_gap)
        lib = next((h for h in layout if h.extname in ("PSF", EPSF)), None)
        psf_rel = psf_name(task.psf_key) if task.psf_key else None
        if psf_rel is not None and lib is not None:
            wave = next((h for h in layout if h.extname == "WCS-WAVE"), None) if lib.extname == EPSF else None
            keep = wave.header.raw + store.get(wave.data_offset, wave.next_offset) if wave is not None else b""
            self._ensure_psf(task, lib, psf_rel, rf.read, keep=keep)
        for t in task.targets:
            b = boxes.get(t.rel)
            if b is None:
                continue
            data = build_cutout(layout, b, store, psffile=psf_rel or "")
            self.cache.write_verified(t.path, data, t.request)
            task.done.add(t.rel)

    def _psf_lock(self, key: str) -> threading.Lock:
        with self._psf_guard:
            return self._psf_locks.setdefault(key, threading.Lock())

    def _ensure_psf(self, task: Task, psf: HDU, rel: str, read: Callable, *, keep: bytes = b"") -> None:
        """The PSF cube of ``psf`` (R7: the ePSF library, the file's EPSF table, followed by
        ``keep``: its WCS-WAVE HDU bytes) at ``cache/rel``, fetched once per key (other threads
        and fetches wait, holding no transfer slot)."""
        path = self.cache.path(rel)
        req = {"psf_key": task.psf_key, "url": task.url, "offset": psf.data_offset}
        epsf = psf.extname == EPSF
        need = EPSF_HDUS if epsf else PSF_HDUS

        def verified(cheap: bool = False) -> bool:
            return self.cache.is_verified(path, required=need, request=req, cheap=cheap)

        with self._psf_lock(rel):
            if verified():
                return
            claim = claims.claim_or_wait(path, done=lambda: verified(cheap=True), watcher=self.watcher,
                                         timeout=self.claim_timeout, stop=self.stop, what=task.url)
            if claim is None:
                return
            try:
                if verified():
                    return
                (data,) = read([(psf.data_offset, psf.next_offset)])
                body = epsf_file_bytes(psf, data, task.psf_key or "", wave=keep) if epsf else \
                    psf_file_bytes(psf, data, task.psf_key or "")
                self.cache.write_verified(path, body, req, required=need)
                log.info("cached %s %s", "ePSF library" if epsf else "PSF cube", rel)
            finally:
                claim.release()


def _resolved(task: Task, rf: RangeFile, layout: list[HDU]) -> dict[str, Box]:
    """The final box of each target (re-centred, clipped: :meth:`RangeFile.resolve_boxes`); a
    target whose box misses the image gets its error in ``task.errors``."""
    out: dict[str, Box] = {}
    resolved = rf.resolve_boxes(layout, [(t.box, t.center) for t in task.targets])  # type: ignore[misc]
    for t, b in zip(task.targets, resolved):
        if isinstance(b, str):
            task.errors[t.rel] = b
        else:
            if b != t.box:
                log.debug("%s: box %s re-centred/clipped to %s", t.rel, t.box, b)
            out[t.rel] = b
    return out


def stop_after_zodi(cache: CacheDir, task: Task) -> Callable[[bytearray], bool | None] | None:
    """For a cutout task: the ``enough`` of :func:`~spxframe.fetcher.http.stream_to_file` that
    closes an R7 cutout stream once PRIMARY..ZODI arrived, if by then its detector and version
    have a cached ePSF library (another cutout may have kept it while this one streamed). The EPSF
    table (~3.9 MB) then never travels; :func:`salvage_r7_cutout` completes the file."""
    if task.access != "cutout" or not task.psf_key:
        return None

    def enough(body: bytearray) -> bool | None:
        at = through_zodi(body)
        return r7_library_cached(cache, task) if at else at
    return enough


def r7_library_cached(cache: CacheDir, task: Task) -> bool:
    """Whether ``task`` is an R7 cutout whose detector and version have a verified ePSF library in
    the cache: then its stream is closed once PRIMARY..ZODI arrived (the EPSF table, ~3.9 MB, is
    never sent again) and :func:`salvage_r7_cutout` completes the file."""
    return task.access == "cutout" and bool(task.psf_key) and \
        cache.is_verified(cache.path(psf_name(task.psf_key)), required=EPSF_HDUS, cheap=True)


def salvage_r7_cutout(cache: CacheDir, task: Task, tmp: str) -> bool:
    """An R7 IBE cutout body in ``tmp`` whose stream closed after ZODI (inside the EPSF table; the
    server stopped early, or the client stopped it because the ePSF is cached): rewritten in
    place as a complete local cutout — PRIMARY..ZODI as received, an EPSF header stub with
    ``EPSFFILE`` and the WCS-WAVE of the cached library ``psf/<psf_key>.fits`` of the same
    detector and version (:func:`spxframe.fetcher.ranges_r7.salvage_cutout`). False (nothing
    changed: the caller retries) when the task is not an R7 cutout with a cached library or the
    body lacks a whole PRIMARY..ZODI."""
    if not r7_library_cached(cache, task):
        return False
    rel = psf_name(task.psf_key)
    lib = cache.path(rel)
    with open(tmp, "rb") as f:
        data = f.read()
    with open(lib, "rb") as f:
        made = salvage_cutout(data, f.read(), epsffile=rel)
    if made is None:
        return False
    with open(tmp, "wb") as f:
        f.write(made)
    scan_fits(tmp)  # the file's own format: the R7 HDUs, whole
    log.info("%s: cutout stream ended after ZODI; completed with the cached ePSF library %s", task.url, rel)
    return True


def keep_r7_library(cache: CacheDir, task: Task, path: str) -> bool:
    """After a whole R7 IBE cutout is placed at ``path``: its EPSF table and WCS-WAVE become the
    cached library ``psf/<psf_key>.fits`` if none is cached yet (so later cutouts of the same
    detector and version may be completed by :func:`salvage_r7_cutout`). True if written."""
    if task.access != "cutout" or not task.psf_key:
        return False
    lib = cache.path(psf_name(task.psf_key))
    if cache.is_verified(lib, required=EPSF_HDUS, cheap=True):
        return False
    with open(path, "rb") as f:
        body = library_from_file(f.read(), task.psf_key)
    if body is None:
        return False
    cache.write_verified(lib, body, {"psf_key": task.psf_key, "url": task.url}, required=EPSF_HDUS)
    return True


def _check_body(task: Task, target: Target, tmp: str, dl: Download) -> str:
    """Check a downloaded body in ``tmp`` (gunzipped in place if the server sent gzip): size and
    MD5 of full files, FITS structure; notes the box an IBE cutout holds. Returns its MD5;
    raises a transient :class:`TransferError` if it is not right."""
    with open(tmp, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:  # gzip body despite gzip=false
        _gunzip_in_place(tmp, target.path, task.url)
    digest = file_md5(tmp) if gzipped else dl.md5
    if task.access == "full":
        if task.size and os.path.getsize(tmp) != task.size:
            raise TransferError(f"size {os.path.getsize(tmp)} != archive size {task.size} for {task.url}",
                                transient=True)
        if task.md5 and digest != task.md5.lower():
            raise TransferError(f"MD5 {digest} != archive MD5 {task.md5} for {task.url}", transient=True)
    try:
        hdus = scan_fits(tmp)
    except FileFormatError as e:
        raise TransferError(f"bad FITS from {task.url}: {e}", transient=True) from e
    if task.access == "cutout":  # the box the server cut (its WCS may differ from the plan's)
        k = next(h.keys for h in hdus if h.extname == "IMAGE")
        try:
            served = [int(round(1 - float(k["CRPIX1A"]))), int(round(1 - float(k["CRPIX2A"]))),
                      int(k["NAXIS1"]), int(k["NAXIS2"])]
            target.request["served_box"] = served
            if target.box is not None and served != [target.box.x0, target.box.y0, target.box.nx, target.box.ny]:
                log.debug("%s: server cut box %s, planned %s", task.url, served, target.box)
        except (KeyError, TypeError, ValueError):
            pass
    return digest


def _gunzip_in_place(tmp: str, path: str, url: str) -> None:
    dec = tmp_name(path)
    try:
        with gzip.open(tmp, "rb") as fi, open(dec, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
        os.replace(dec, tmp)
    except (OSError, EOFError) as e:
        raise TransferError(f"bad gzip body from {url}: {e}", transient=True) from e
    finally:
        if os.path.exists(dec):
            os.unlink(dec)
