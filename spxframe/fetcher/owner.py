"""Who is writing: this process's identity on a filesystem shared by processes, threads and hosts.

Temporary files (``<path>.<pid>@<host>.<token>.part``) and claim lock files carry the writer's
process id and host, so a later fetch can tell whether their writer is gone (only checkable for
processes of the same host; other hosts' files are judged by age).
"""

from __future__ import annotations

import os
import re
import secrets
import socket

#: this host, as written into temporary-file names and lock files
HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"

PART_SUFFIX = ".part"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def tmp_name(path: str) -> str:
    """A temporary name beside ``path``: ``<path>.<pid>@<host>.<token>.part`` (never trusted by a
    rerun; removed by the cache sweep once its process is gone)."""
    return f"{path}.{os.getpid()}@{HOST}.{secrets.token_hex(4)}{PART_SUFFIX}"


def part_writer(name: str) -> tuple[int, str]:
    """(pid, host) of the process that named a temporary file (see :func:`tmp_name`);
    pid -1 when the name carries none, host '' when unknown."""
    tag = name.split(".")[-3] if name.count(".") >= 3 else ""
    pid_s, _, host = tag.partition("@")
    try:
        return int(pid_s), host
    except ValueError:
        return -1, host


def gone(pid: int, host: str) -> bool | None:
    """Whether process ``pid`` of ``host`` has ended: True/False on this host, None elsewhere
    (another host's process cannot be checked). A pid <= 0 counts as gone."""
    if host not in ("", HOST):
        return None
    return pid <= 0 or not pid_alive(pid)
