"""spxframe's exceptions, one hierarchy. Every error names the column, value, URL or status it is about.

    SpxframeError
    ├── InputError (also a ValueError)   bad catalog, option or value; raised before any traffic
    ├── ArchiveError                     the archive answered with an error (url, status, retry_after, hint)
    │   └── ArchiveUnreachable           no connection after all retries
    └── FileFormatError (also a ValueError)  a file is not a readable SPHEREx L2 file (path, HDU, keyword)

A transfer that fails is not raised: it is a manifest row with status ``failed`` and its error text.
"""

from __future__ import annotations


class SpxframeError(Exception):
    """Base class of spxframe's errors."""


class InputError(SpxframeError, ValueError):
    """Bad user input (catalog column, coordinate, option), raised before any network traffic."""


class ArchiveError(SpxframeError):
    """The archive answered with an error or could not be reached.

    Attributes: ``url``, ``status`` (HTTP status or None), ``retry_after`` (seconds or None),
    ``hint`` (what the user can do).
    """

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None,
                 retry_after: float | None = None, hint: str | None = None) -> None:
        self.url, self.status, self.retry_after, self.hint = url, status, retry_after, hint
        parts = [message]
        if status is not None:
            parts.append(f"HTTP {status}")
        if url:
            parts.append(f"url={url}")
        if retry_after is not None:
            parts.append(f"retry after {retry_after:g} s")
        if hint:
            parts.append(f"hint: {hint}")
        super().__init__("; ".join(parts))


class ArchiveUnreachable(ArchiveError):
    """No connection to the archive (DNS, refused, timeouts after all retries)."""


class FileFormatError(SpxframeError, ValueError):
    """A local file is not a readable SPHEREx L2 file (names the path and the HDU/keyword)."""
