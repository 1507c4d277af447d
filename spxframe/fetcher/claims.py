"""Claims on cache files: one download per file across processes, threads and hosts.

Before a fetch downloads (or builds) a file at ``path`` it takes a claim: the lock file
``<path>.lock``, created atomically. Whoever finds a live claim does not download; it waits for
the file's ``.ok`` sidecar (see :mod:`spxframe.fetcher.cache`), and takes over once the claim is gone
(the claimer finished without a verified file, e.g. its transfer failed) or stale (the claimer
died). Claims only save transfers: every file still reaches its final name through a verified
temporary file and an atomic rename, so a lost race or a wrongly broken claim costs bytes, never
correctness.

Mechanism (chosen to work on a shared POSIX filesystem, NFSv3/v4 included):

- creation: the owner's JSON (``pid``, ``host``, ``token``, ``time``, ``what``) is written to a
  unique temporary file (``<lock>.<pid>@<host>.<token>.part``) which is then hard-linked to
  ``<path>.lock``. ``link()`` is atomic and fails if the name exists, on NFS too (the classic
  NFS-safe lock; a lost reply is recognised by the temporary file's link count), and the lock
  never exists without its owner's identity. Where hard links are not supported the lock is
  created with ``open(O_CREAT | O_EXCL)`` and the JSON written after it.
  ``fcntl``/``flock`` locks were not used: they vanish silently on NFS mounted ``nolock``, are
  per-process (threads of one process do not exclude each other) and drop when *any*
  descriptor of the file is closed.
- heartbeat: a daemon thread of the owning process touches (``utime``) every lock it holds every
  ``stale_s / 4`` seconds (at most 30 s) while the transfer runs.
- staleness: a claim held by this host's process ``pid`` is dead as soon as that pid is gone
  (or, for this very process, as soon as its token is no longer held). A claim from another host
  (or one whose owner cannot be read) is stale once its modification time has not changed for
  ``stale_s`` seconds *as observed on the waiter's own clock* (so clock skew between hosts and the
  NFS server does not matter; NFS attribute caching delays an observation by at most ~60 s, well
  inside the defaults).
- breaking: a stale lock is renamed aside (atomic; only one waiter wins) and checked: if it is not
  the file judged stale (a new claim, or a heartbeat since), it is linked back. The aside name ends
  in ``.part``, so the cache sweep (:meth:`spxframe.fetcher.cache.CacheDir.sweep`) removes leftovers.
- release: always in ``finally``; the lock is unlinked only if it still carries the owner's token.
- waiting: one mechanism, :class:`Wait`; each :meth:`Wait.step` takes one look (claim it, made
  by the claimer, still held, or timed out). :func:`claim_or_wait` drives it blocking (a worker
  thread); fetch()'s scheduler drives many waits at once without holding a thread or a slot.

Times are seconds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from spxframe.fetcher.http import Cancelled
from spxframe.fetcher.owner import HOST, gone, tmp_name

log = logging.getLogger("spxframe.fetch")

LOCK_SUFFIX = ".lock"
DEFAULT_STALE_S = 120.0     # a claim whose lock file has not been touched for this long is dead
DEFAULT_WAIT_S = 900.0      # longest wait for another fetch's transfer of one file


def lock_name(path: str) -> str:
    return path + LOCK_SUFFIX


# --------------------------------------------------------------------------------------
# held claims of this process and their heartbeat
# --------------------------------------------------------------------------------------

_held: dict[str, Claim] = {}          # token -> claim, for this process
_held_lock = threading.Condition()
_beat_thread: threading.Thread | None = None


def _heartbeat() -> None:
    global _beat_thread
    while True:
        with _held_lock:
            if not _held:
                _beat_thread = None
                return
            claims = list(_held.values())
            now = time.monotonic()
            due = min(c.next_beat for c in claims)
            if due > now:
                _held_lock.wait(due - now)
                continue
        for c in claims:
            if c.next_beat <= now:
                c.next_beat = now + c.beat_s
                try:
                    os.utime(c.lock)
                except OSError:  # broken by someone (we were judged stale) or removed: nothing to keep alive
                    pass


def _after_fork() -> None:  # a forked child holds none of its parent's claims and has no heartbeat
    global _held, _held_lock, _beat_thread
    _held, _held_lock, _beat_thread = {}, threading.Condition(), None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _register(c: Claim) -> None:
    global _beat_thread
    with _held_lock:
        _held[c.token] = c
        if _beat_thread is None:
            _beat_thread = threading.Thread(target=_heartbeat, name="spxframe-claim-heartbeat", daemon=True)
            _beat_thread.start()
        _held_lock.notify_all()


def _unregister(c: Claim) -> None:
    with _held_lock:
        _held.pop(c.token, None)
        _held_lock.notify_all()


def held_here(token: str) -> bool:
    with _held_lock:
        return token in _held


# --------------------------------------------------------------------------------------
# claims
# --------------------------------------------------------------------------------------


@dataclass
class Claim:
    """A claim held by this process on ``path`` (its lock file is ``lock``)."""

    path: str
    lock: str
    token: str
    beat_s: float
    next_beat: float = 0.0

    def release(self) -> None:
        """Remove the lock if it is still ours; never raises."""
        _unregister(self)
        try:
            if read_owner(self.lock).get("token") == self.token:
                os.unlink(self.lock)
        except OSError:
            pass


def read_owner(lock: str) -> dict:
    """The owner JSON of a lock file ({} if missing, empty or unreadable)."""
    try:
        with open(lock, "rb") as f:
            info = json.loads(f.read() or b"{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def try_claim(path: str, *, stale_s: float = DEFAULT_STALE_S, what: str = "") -> Claim | None:
    """Take the claim on ``path`` if nobody holds it; None if somebody does."""
    lock = lock_name(path)
    token = secrets.token_hex(8)
    c = Claim(path, lock, token, beat_s=max(0.05, min(30.0, stale_s / 4.0)))
    c.next_beat = time.monotonic() + c.beat_s
    body = json.dumps({"pid": os.getpid(), "host": HOST, "token": token, "time": time.time(),
                       "what": what[:300]}).encode()
    _register(c)  # before the lock exists: a thread of ours must never see our own lock as orphaned
    try:
        if _create(lock, body):
            return c
    except BaseException:
        _unregister(c)
        raise
    _unregister(c)
    return None


def _create(lock: str, body: bytes) -> bool:
    """Create ``lock`` with ``body`` atomically; False if it exists."""
    tmp = tmp_name(lock)
    try:
        with open(tmp, "wb") as f:
            f.write(body)
        try:
            os.link(tmp, lock)
            return True
        except FileExistsError:
            try:  # NFS: a retransmitted link() whose first try succeeded answers EEXIST
                return os.stat(tmp).st_nlink == 2
            except OSError:
                return False
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
                return _create_excl(lock, body)
            try:  # NFS: the link may have been made although the reply was lost
                if os.stat(tmp).st_nlink == 2:
                    return True
            except OSError:
                pass
            raise
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _create_excl(lock: str, body: bytes) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, body)
    finally:
        os.close(fd)
    return True


def _owner_dead(info: dict) -> bool:
    """Whether the owner recorded in a lock is known dead (only checkable on this host)."""
    if info.get("host") != HOST:
        return False
    try:
        pid = int(info.get("pid"))
    except (TypeError, ValueError):
        return False
    if pid == os.getpid():
        return not held_here(str(info.get("token")))
    return bool(gone(pid, HOST))


def break_lock(lock: str, seen: os.stat_result) -> bool:
    """Remove ``lock`` if it is still the file described by ``seen`` (same inode, untouched since);
    True if the lock is gone afterwards. Safe against a concurrent breaker or a new claim."""
    aside = tmp_name(lock)
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        st = os.stat(aside)
        if (st.st_ino, st.st_mtime_ns) != (seen.st_ino, seen.st_mtime_ns):
            try:  # a fresh claim or a heartbeat since we looked: put it back
                os.link(aside, lock)
            except OSError:
                pass
            return False
        return True
    finally:
        try:
            os.unlink(aside)
        except OSError:
            pass


class Watcher:
    """A waiter's view of other fetches' claims: free, live or stale (observed on our clock)."""

    def __init__(self, stale_s: float = DEFAULT_STALE_S) -> None:
        self.stale_s = float(stale_s)
        self._seen: dict[str, tuple[int, int, float]] = {}   # lock -> (ino, mtime_ns, first seen)
        self._guard = threading.Lock()

    def state(self, path: str) -> str:
        """'free' (no lock, or a stale one just broken) or 'held' (someone is on it)."""
        lock = lock_name(path)
        try:
            st = os.stat(lock)
        except FileNotFoundError:
            self._forget(lock)
            return "free"
        except OSError:  # cannot look (e.g. ESTALE on NFS): assume held; waits are bounded anyway
            return "held"
        now = time.monotonic()
        with self._guard:
            prev = self._seen.get(lock)
            if prev is None or prev[:2] != (st.st_ino, st.st_mtime_ns):
                self._seen[lock] = prev = (st.st_ino, st.st_mtime_ns, now)
        info = read_owner(lock)
        dead = _owner_dead(info)
        if dead or now - prev[2] >= self.stale_s:
            why = "its process is gone" if dead else f"untouched for {now - prev[2]:.0f} s"
            if break_lock(lock, st):
                log.info("broke stale claim on %s by %s@%s (%s)", path, info.get("pid", "?"),
                         info.get("host", "?"), why)
                self._forget(lock)
                return "free"
        return "held"

    def _forget(self, lock: str) -> None:
        with self._guard:
            self._seen.pop(lock, None)


class ClaimTimeout(Exception):
    """Waited longer than the timeout for another fetch's transfer."""


def describe_owner(path: str) -> str:
    info = read_owner(lock_name(path))
    return f"{info.get('pid', '?')}@{info.get('host', '?')}" if info else "another fetch"


# --------------------------------------------------------------------------------------
# waiting for another fetch's claim: the one mechanism
# --------------------------------------------------------------------------------------

POLL = (0.05, 2.0)   # s: first and longest interval between looks at another fetch's claim


class Wait:
    """Waiting for the claim on ``path`` to end: ours, made by the claimer, or timed out.

    Each :meth:`step` takes one look. ``done()`` says whether the file was made (typically: a
    verified file with its sidecar); ``name`` labels the file in the timeout message. The wait
    starts when the object is made; ``due`` is when the next look is worth taking (backoff from
    ``poll[0]`` to ``poll[1]`` s)."""

    def __init__(self, path: str, *, watcher: Watcher, timeout: float, done: Callable[[], bool],
                 what: str = "", name: str | None = None, poll: tuple[float, float] = POLL) -> None:
        self.path, self.watcher, self.timeout, self.done, self.what = path, watcher, float(timeout), done, what
        self.name = name or os.path.basename(path)
        self.poll = poll
        self.since = time.monotonic()
        self.delay = poll[0]
        self.due = self.since

    def step(self) -> Claim | bool:
        """One look: a :class:`Claim` (ours now: make the file), True (the claimer made it) or
        False (still held by a live fetch: look again at ``due``). Takes over released or stale
        claims; raises :class:`ClaimTimeout` once held longer than ``timeout`` s."""
        while True:
            c = try_claim(self.path, stale_s=self.watcher.stale_s, what=self.what)
            if c is not None:
                return c
            if self.done():
                return True
            if self.watcher.state(self.path) != "free":  # free: released or stale just broken, try again
                break
        now = time.monotonic()
        if now - self.since > self.timeout:
            raise ClaimTimeout(f"timed out after {self.timeout:g} s waiting for {describe_owner(self.path)} "
                               f"to fetch {self.name}")
        self.due = now + self.delay
        self.delay = min(self.poll[1], self.delay * 1.5)
        return False


def claim_or_wait(path: str, *, done: Callable[[], bool], watcher: Watcher, timeout: float,
                  stop: threading.Event | None = None, what: str = "",
                  poll: tuple[float, float] = POLL) -> Claim | None:
    """Blocking form of :class:`Wait`: a claim on ``path``, or None once ``done()`` (the file was
    made by the claimer). Waits with backoff (holding no transfer slot) while another live fetch
    holds it, takes over stale or released claims; raises :class:`ClaimTimeout` after
    ``timeout`` s and :class:`Cancelled` when ``stop`` is set."""
    w = Wait(path, done=done, watcher=watcher, timeout=timeout, what=what, poll=poll)
    while True:
        got = w.step()
        if got is not False:
            return None if got is True else got
        dt = max(0.0, w.due - time.monotonic())
        if stop is not None:
            if stop.wait(dt):
                raise Cancelled()
        else:
            time.sleep(dt)


# --------------------------------------------------------------------------------------
# cleaning (driven by the cache sweep)
# --------------------------------------------------------------------------------------


def break_if_stale(lock: str, now: float, max_age: float) -> bool:
    """Remove the lock file ``lock`` if its owner is known dead (this host) or it is older than
    ``max_age`` s (``now``: ``time.time()``); True if removed. Live claims of other hosts are
    left to :class:`Watcher`."""
    try:
        st = os.stat(lock)
    except OSError:
        return False
    return (_owner_dead(read_owner(lock)) or now - st.st_mtime > max_age) and break_lock(lock, st)
