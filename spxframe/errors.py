"""spxframe's exceptions. Every error names the column, value, URL or status it is about."""

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


class FetchError(SpxframeError):
    """A transfer failed after its retry budget (recorded in the manifest, raised only on request)."""


class FileFormatError(SpxframeError):
    """A local file is not a readable SPHEREx L2 file (names the path and the HDU/keyword)."""
