"""The one exception tree of ``fetch``.

Every error pickles (it may cross a process boundary) and carries a message
meant for a person, plus an optional hint saying what to do about it::

    FetchError
    ├── UsageError ............ bad option or argument            (exit 2)
    │   └── ConfigError ....... a config file is missing or wrong   (exit 2)
    ├── LockHeld .............. another run holds DEST's lock       (exit 3)
    ├── FatalIOError .......... DEST unwritable, disk full          (exit 4)
    ├── UnsafePath ............ a remote name that cannot live safely below DEST
    ├── ListingError .......... a directory listing could not be read or was refused
    ├── PostProcessError ...... ffmpeg failed, timed out or could not start (``.tail``)
    │   └── PostTimeout ....... ffmpeg ran past its timeout (and was killed)
    └── TransferError ......... one file could not be fetched (recorded, run goes on)
        ├── HTTPStatusError ... an HTTP status we do not accept (``.retryable``)
        ├── IncompleteDownload  fewer bytes than announced, or a connection cut
        ├── TooSlow ........... a body slower than --min-rate (``--min-rate-time``)
        ├── RangeMismatch ..... a 206 answer for a range we did not ask for
        ├── RedirectRefused ... a redirect off the mirror or too many hops
        ├── ChecksumMismatch .. the bytes do not match the published digest
        ├── StaleIndex ........ an index naming files DEST does not hold as it says
        └── IsADirectory ...... the "file" turned out to be a directory

Foreign exceptions (httpx, OSError) are translated where they enter, with
``raise ... from exc``, so the rest of the code only sees this tree.
"""

from __future__ import annotations

__all__ = [
    "ChecksumMismatch",
    "ConfigError",
    "FatalIOError",
    "FetchError",
    "HTTPStatusError",
    "IncompleteDownload",
    "IsADirectory",
    "ListingError",
    "LockHeld",
    "PostProcessError",
    "PostTimeout",
    "RangeMismatch",
    "RedirectRefused",
    "StaleIndex",
    "TooSlow",
    "TransferError",
    "UnsafePath",
    "UsageError",
]


class FetchError(Exception):
    """Base of every error ``fetch`` raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(FetchError):
    """A bad command line."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file that is missing, unreadable or invalid."""


class LockHeld(FetchError):
    """Another run holds the destination's lock."""

    exit_code = 3


class FatalIOError(FetchError):
    """The run cannot go on: the destination cannot be written (permissions, disk full), or
    the system will not start another process."""

    exit_code = 4


class UnsafePath(FetchError):
    """A remote name that cannot be stored safely below DEST."""


class ListingError(FetchError):
    """A directory listing could not be fetched, or was refused."""


class PostProcessError(FetchError):
    """ffmpeg failed, timed out or could not start; ``tail`` is the end of its stderr."""

    def __init__(self, message: str, tail: str = "") -> None:
        super().__init__(message)
        self.args = (message, tail)
        self.tail = tail


class PostTimeout(PostProcessError):
    """ffmpeg ran past its timeout and was killed: with the same input, rule and
    timeout, it would again."""


class TransferError(FetchError):
    """One file could not be fetched; recorded as a failed outcome."""

    retryable = False


_WHY = {
    401: ": credentials needed, or refused (user:password@ in the URL, or a ~/.netrc entry)",
    407: ": the proxy wants credentials (--proxy http://user:password@host:port)",
}


class HTTPStatusError(TransferError):
    """The server answered with a status we do not accept."""

    def __init__(self, status: int, url: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} for {url}{_WHY.get(status, '')}")
        self.args = (status, url, retry_after)
        self.status = status
        self.url = url
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return self.status in (408, 425, 429) or self.status >= 500


class IncompleteDownload(TransferError):
    """The body ended before the announced length, or the connection broke."""

    retryable = True


class TooSlow(TransferError):
    """A body that came slower than ``--min-rate`` over ``--min-rate-time`` seconds: a
    server that trickles. Retried (a big file resumes from its partial file)."""

    retryable = True


class RangeMismatch(TransferError):
    """A ``206`` answered a different range than the one asked for."""

    retryable = True


class RedirectRefused(TransferError):
    """A redirect leaving the mirror, or a redirect chain that is too long."""


class ChecksumMismatch(TransferError):
    """The received bytes do not match the published digest."""

    retryable = True


class StaleIndex(TransferError):
    """Repository metadata (``repomd.xml``, ``Release``) that names files DEST does not hold
    as it says: rewritten upstream during the run. Not retried: the next run lists the
    files it names."""


class IsADirectory(TransferError):
    """A link without a trailing slash that redirects to a directory."""
