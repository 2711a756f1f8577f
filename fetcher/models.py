"""The pipeline's vocabulary: frozen, slotted, picklable values, and scope rules.

``rel_path()`` is the only way to make a :data:`RelPath`; every join below
DEST goes through one, so an unsafe name cannot reach the filesystem.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import posixpath
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, NewType
from urllib.parse import unquote_to_bytes, urldefrag, urlsplit

import msgspec

from fetcher.errors import UnsafePath

if TYPE_CHECKING:
    from fetcher.postprocess import PostCounts, PostOutcome

__all__ = [
    "STATE_DIR",
    "Action",
    "BytesEvent",
    "Counts",
    "CrawlProblem",
    "Event",
    "FileDone",
    "FileStarted",
    "Job",
    "Listing",
    "ListingEntry",
    "Notice",
    "Outcome",
    "RelPath",
    "RemoteDir",
    "RemoteFile",
    "Reporter",
    "Retried",
    "Scope",
    "Status",
    "Summary",
    "UnchangedDir",
    "WorkerExit",
    "WorkerFatal",
    "names_digest",
    "normalise_dir_url",
    "rel_path",
]

RelPath = NewType("RelPath", str)
"""A '/'-separated, decoded path that is safe to join below DEST."""

STATE_DIR = ".fetcher"
"""DEST's private directory (state, lock, partial files); never mirrored into."""

_MAX_SEGMENT_BYTES = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # C0 controls and DEL


def rel_path(encoded: str) -> RelPath:
    """Decode a percent-encoded relative URL path into a safe :data:`RelPath`.

    Each segment is percent-decoded exactly once, as UTF-8.  Raises
    :class:`UnsafePath` for anything that could resolve outside DEST or cannot
    be stored as a file name::

        >>> rel_path("a%20b/caf%C3%A9.rpm")
        'a b/café.rpm'
        >>> rel_path("a/%2e%2e/etc")
        Traceback (most recent call last):
        ...
        fetcher.errors.UnsafePath: unsafe path segment '..' in 'a/%2e%2e/etc'
    """
    if not encoded or encoded.startswith("/"):
        raise UnsafePath(f"not a relative path: {encoded!r}")
    segments = encoded.split("/")
    out: list[str] = []
    for raw in segments:
        if "\\" in raw:
            raise UnsafePath(f"backslash in path {encoded!r}")
        try:
            data = unquote_to_bytes(raw)
        except UnicodeEncodeError:  # a lone surrogate: no bytes could name this file
            raise UnsafePath(f"name is not valid UTF-8: {encoded!r}") from None
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UnsafePath(f"name is not valid UTF-8: {encoded!r}") from None
        if name in ("", ".", ".."):
            raise UnsafePath(f"unsafe path segment {name!r} in {encoded!r}")
        if "/" in name or "\\" in name:
            raise UnsafePath(f"separator inside a name in {encoded!r}")
        if _CONTROL.search(name):
            raise UnsafePath(f"control character in name {encoded!r}")
        if len(data) > _MAX_SEGMENT_BYTES:
            raise UnsafePath(f"name longer than {_MAX_SEGMENT_BYTES} bytes: {encoded[:60]!r}...")
        out.append(name)
    if out[0] == STATE_DIR:
        raise UnsafePath(f"{STATE_DIR!r} is reserved for fetch's own state: {encoded!r}")
    return RelPath("/".join(out))


def _split_url(url: str) -> tuple[str, str, int, str]:
    try:
        parts = urlsplit(url)
        port = parts.port
        url.encode("utf-8")
    except ValueError:  # "http://[::1", port 99999, a lone surrogate
        raise UnsafePath(f"not a usable URL: {url!r}") from None
    scheme = parts.scheme.lower()
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme, 0)
    return scheme, (parts.hostname or "").lower(), port, parts.path


@functools.lru_cache(maxsize=64)
def _root_parts(root: str) -> tuple[str, str, int, tuple[bytes, ...]]:
    """A scope root's scheme, host, port and decoded path segments (asked per URL)."""
    scheme, host, port, path = _split_url(root)
    # Empty segments count: "//pub/x" is not "/pub/x" to every server.
    inner = path[1:].removesuffix("/")
    return scheme, host, port, tuple(unquote_to_bytes(s) for s in inner.split("/")) if inner else ()


class Scope(msgspec.Struct, frozen=True):
    """Which URLs belong to the mirror: same origin (or an alias), below ``root``.

    ``root`` is normalised to end with '/'.  ``aliases`` are ``host[:port]``
    strings of other servers that carry the same tree (followed in redirects).
    """

    root: str
    aliases: tuple[str, ...] = ()

    @staticmethod
    def for_start(url: str, aliases: tuple[str, ...] = ()) -> Scope:
        url = urldefrag(url)[0].split("?", 1)[0]
        if not url.endswith("/"):
            url += "/"
        return Scope(url, aliases)

    def _origin_ok(self, scheme: str, host: str, port: int) -> bool:
        root = _root_parts(self.root)
        if (scheme, host, port) == root[:3]:
            return True
        if scheme not in ("http", "https") or (root[0] == "https" and scheme != "https"):
            return False  # an https mirror's alias is https too: no body (nor password) in clear
        for alias in self.aliases:
            a = alias.lower()
            if a == host or a == f"{host}:{port}":
                return True
        return False

    def relative(self, url: str) -> RelPath | None:
        """The in-scope relative path of ``url``, ``None`` when out of scope.

        Raises :class:`UnsafePath` for an in-scope URL whose name is unsafe.
        The root itself has no relative path and gives ``None``.
        """
        url = url.partition("#")[0]  # not urldefrag(): it raises on "http://[x"
        if "?" in url:
            return None
        scheme, host, port, path = _split_url(url)
        if not self._origin_ok(scheme, host, port):
            return None
        # Compare decoded segments, so %7E and ~ are the same place, but keep
        # the encoded remainder for rel_path() to decode exactly once.
        if not path.startswith("/"):
            return None
        rsegs = _root_parts(self.root)[3]
        segs = path[1:].split("/")
        if len(segs) <= len(rsegs):
            return None
        if tuple(unquote_to_bytes(s) for s in segs[: len(rsegs)]) != rsegs:
            return None
        rest = segs[len(rsegs) :]
        if rest and rest[-1] == "":
            rest = rest[:-1]
        if not rest:
            return None
        return rel_path("/".join(rest))

    def child(self, parent_url: str, parent_path: str, url: str) -> RelPath | None:
        """``relative(url)`` for a link on the listing of the directory ``parent_url``.

        ``parent_url`` ends with '/' and ``parent_path`` is its relative path (``""`` for
        the root). A name right below it is checked alone rather than the whole URL
        parsed again; anything else, or a name that fails, goes through
        :meth:`relative` and gets its verdict and message.
        """
        if url.startswith(parent_url):
            name = url[len(parent_url) :]
            if name.endswith("/"):
                name = name[:-1]
            if name and "/" not in name and "?" not in name and "#" not in name:
                try:
                    seg = rel_path(name)
                except UnsafePath:
                    return self.relative(url)
                return RelPath(f"{parent_path}/{seg}") if parent_path else seg
        return self.relative(url)

    def contains(self, url: str) -> bool:
        """True when ``url`` is the root or lies below it (unsafe names excluded)."""
        try:
            return self.relative(url) is not None or self.is_root(url)
        except UnsafePath:
            return False

    def is_root(self, url: str) -> bool:
        try:
            a = _split_url(url.partition("#")[0])
        except UnsafePath:
            return False
        b = _split_url(self.root)
        return a[:3] == b[:3] and a[3].rstrip("/") == b[3].rstrip("/")

    def same_origin_or_alias(self, url: str) -> bool:
        """True for the mirror's own origin or a configured alias; False for anything unusable.

        A predicate never raises: a hostile ``Location: http://host:99999/`` is just "no".
        """
        try:
            scheme, host, port, _ = _split_url(url)
        except UnsafePath:
            return False
        return self._origin_ok(scheme, host, port)


def normalise_dir_url(url: str) -> str:
    """The canonical form of a directory URL, for the crawl's visited set."""
    parts = urlsplit(url)
    path = posixpath.normpath(unquote_to_bytes(parts.path).decode("utf-8", "surrogateescape"))
    if not path.endswith("/"):
        path += "/"
    host = (parts.hostname or "").lower()
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower(), 0)
    return f"{parts.scheme.lower()}://{host}:{port}{path}"


class ListingEntry(msgspec.Struct, frozen=True):
    """One link of a directory listing, as the page shows it."""

    url: str
    """Absolute URL, resolved against the page (or its ``<base href>``), no fragment."""
    name: str
    """The link's text or, when truncated, the last segment of the URL, decoded."""
    is_dir: bool
    size: int | None = None
    """Bytes; rounded when ``size_exact`` is false (``2.3K``)."""
    size_exact: bool = False
    date: str | None = None
    """The date exactly as printed, whitespace-normalised (timezone unknown)."""
    mtime: float | None = None
    """``date`` parsed as UTC epoch seconds, when it could be parsed."""

    @property
    def stamp(self) -> str | None:
        """What the listing says about this file, for change detection."""
        if self.size is None and self.date is None:
            return None
        return f"{self.size if self.size is not None else '-'}|{self.date or '-'}"


class RemoteFile(msgspec.Struct, frozen=True):
    """A file below the start URL, as found by the crawl or an index."""

    url: str
    path: RelPath
    size: int | None = None
    size_exact: bool = False
    mtime: float | None = None
    stamp: str | None = None
    """The listing's size and date text; equal stamps mean unchanged."""
    checksum: tuple[str, str] | None = None
    """``(algorithm, hexdigest)`` when an index publishes one."""


class RemoteDir(msgspec.Struct, frozen=True):
    """A directory below the start URL (mirrored even when empty)."""

    path: RelPath


class Listing(msgspec.Struct, frozen=True):
    """What one directory's listing gave a run, kept for the next (``State.put_listing``).

    When the next run reads the same bytes there (``digest``: the page and the crawl's
    options) and the state's rows of that directory are still exactly these files
    with these stamps (``names``), all intact in DEST, every file of it is unchanged
    as the plan would find them one by one: the crawl skips the page's parse and the
    plan's per-file work (:class:`UnchangedDir`).
    """

    url: str
    """The directory's URL as the crawl asked for it (a redirect's target may be another's)."""
    path: str
    """The directory's path below the mirror's root."""
    digest: bytes
    names: bytes
    """The files' paths and stamps, hashed (:func:`names_digest`)."""
    files: int
    dirs: tuple[tuple[str, str], ...]
    """Its directories to crawl: ``(url, path)`` each, in page order."""
    fp: bytes
    """The fingerprint of its entries (the crawl's loop check)."""


def names_digest(files: Iterable[tuple[str, str]]) -> bytes:
    """``(path, stamp)`` pairs, hashed in path order: the same set gives the same bytes."""
    h = hashlib.blake2b(digest_size=16)
    for path, stamp in sorted(files):
        h.update(f"{path}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.digest()


class UnchangedDir(msgspec.Struct, frozen=True):
    """A directory whose listing and files are as the last run left them: ``files`` (its
    files' paths), ``nbytes`` in all, each unchanged; ``url``: its kept listing's."""

    path: RelPath
    files: tuple[str, ...]
    nbytes: int
    url: str


class CrawlProblem(msgspec.Struct, frozen=True):
    """Something the crawl refused or could not read; ``kind`` says which."""

    url: str
    message: str
    kind: str
    """``listing`` (could not read: blocks deletion), ``unsure`` (read, but maybe cut
    short: blocks deletion too), ``unsafe``, ``loop`` or ``depth``."""
    path: str | None = None
    """``depth``: the directory not crawled, below the start (its local files stay)."""


class Action(enum.StrEnum):
    NEW = "new"
    CHANGED = "changed"
    RESUME = "resume"
    CHECK = "check"
    """The listing shows neither size nor date: ask with a conditional GET."""
    VERIFY = "verify"
    """Unchanged, with a SHA-256 from the listings or the index that DEST's copy was never
    checked against (fetched before it was published): hash that copy; fetch the file
    again only if it differs."""


class Job(msgspec.Struct, frozen=True):
    """One file to fetch, and what we know that makes the request conditional."""

    file: RemoteFile
    action: Action
    etag: str | None = None
    last_modified: str | None = None
    stage: bool = False
    """Repository metadata: named under ``.fetcher/staged/`` once checked, not in place;
    the coordinator publishes the staged files together once the last is in (or drops
    them), so DEST never holds a new index under an older file that names it."""
    gone: frozenset[str] = frozenset()
    """A ``Release`` / ``InRelease``: the files below its directory that DEST holds and this
    run did not find upstream. Such a ``Release`` names every form of its indices, the
    uncompressed ``Packages`` too, which a mirror may stop carrying: a stale copy left in
    DEST (until ``--delete``) is not the mirror's, and must not hold the suite back."""


class Status(enum.StrEnum):
    FETCHED = "fetched"
    UNCHANGED = "unchanged"
    FAILED = "failed"
    DIRECTORY = "directory"


class Outcome(msgspec.Struct, frozen=True):
    """What happened to one :class:`Job`; the only thing workers return."""

    path: RelPath
    url: str
    status: Status
    size: int = 0
    received: int = 0
    mtime: float | None = None
    etag: str | None = None
    last_modified: str | None = None
    sha256: str | None = None
    stamp: str | None = None
    error: str | None = None
    attempts: int = 1
    fatal: bool = False
    """The failure is about DEST (disk full, unwritable), not about this file."""


class BytesEvent(msgspec.Struct, frozen=True):
    """Bytes a worker received, summed over a moment (the display's rate)."""

    worker: int
    nbytes: int


class FileStarted(msgspec.Struct, frozen=True):
    """A worker began a file."""

    worker: int
    path: RelPath
    size: int | None


class Retried(msgspec.Struct, frozen=True):
    """A file's attempt failed and another is coming, after the policy's wait."""

    worker: int
    path: RelPath
    attempt: int
    reason: str


class FileDone(msgspec.Struct, frozen=True):
    """A file's outcome, whatever it is."""

    worker: int
    outcome: Outcome


class WorkerFatal(msgspec.Struct, frozen=True):
    """A worker cannot go on (DEST is full or unwritable): the run stops."""

    worker: int
    message: str


class WorkerExit(msgspec.Struct, frozen=True):
    """A worker ended cleanly: every shard it took is reported."""

    worker: int


class Notice(msgspec.Struct, frozen=True):
    """Something the run should say while it goes on (a cluster with no workers): the
    executor's word, shown by the reporter; unlike :class:`WorkerFatal`, nothing stops."""

    worker: int
    message: str


Event = BytesEvent | FileStarted | Retried | FileDone | WorkerFatal | WorkerExit | Notice


class Counts(msgspec.Struct):
    """Files and bytes of one kind in a run's summary."""

    files: int = 0
    bytes: int = 0
    unsized: int = 0
    """Of ``files``, those whose size no listing gave (not in ``bytes``: a plan's bytes
    are then a lower bound)."""


class Summary(msgspec.Struct):
    """The result of one mirror run; ``report.py`` renders it."""

    url: str
    dest: str
    fetched: Counts = msgspec.field(default_factory=Counts)
    unchanged: Counts = msgspec.field(default_factory=Counts)
    skipped: Counts = msgspec.field(default_factory=Counts)
    failed: list[tuple[str, str]] = msgspec.field(default_factory=list)
    deleted: list[str] = msgspec.field(default_factory=list)
    deleted_dirs: list[str] = msgspec.field(default_factory=list)
    """Directories ``--delete`` removed (or would): not upstream, empty after it; ``a/b/``."""
    vanished: int = 0
    listing_errors: list[tuple[str, str]] = msgspec.field(default_factory=list)
    notices: list[str] = msgspec.field(default_factory=list)
    directories: int = 0
    started: float = 0.0
    finished: float = 0.0
    downloaded: float = 0.0
    """When the downloads were over, before the wait for post-processing (``--post``);
    0 when the run had none to wait for."""
    interrupted: bool = False
    fatal: str | None = None
    dry_run: bool = False
    planned: dict[str, Counts] = msgspec.field(default_factory=dict)
    post: dict[str, int] = msgspec.field(default_factory=dict)
    post_failed: list[tuple[str, str]] = msgspec.field(default_factory=list)
    post_failed_before: list[tuple[str, str]] = msgspec.field(default_factory=list)
    """Post-processing outputs not tried: they failed before on the same input with the
    same rule (``--retry-failed-post`` tries them); not this run's failures (exit 0)."""
    error: str | None = None
    """The run did not start: a usage, lock or I/O error (``error_code`` says which)."""
    error_code: int = 0
    skipped_run: bool = False
    """The run did not start: DEST was locked by another run (``--skip-if-locked``)."""

    @property
    def unchanged_files(self) -> int:
        """Files found unchanged: by a conditional request, or skipped by the plan."""
        skipped = self.planned.get("skipped")
        return self.unchanged.files + (skipped.files if skipped else 0)

    @property
    def elapsed(self) -> float:
        """Seconds the run took (never 0: rates divide by it)."""
        return max(self.finished - self.started, 1e-9)

    @property
    def download_seconds(self) -> float:
        """Seconds the downloads took: the run's, less the wait for its ffmpeg work (which
        would make a download rate of post-processing time)."""
        return max((self.downloaded or self.finished) - self.started, 1e-9)

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return self.error_code
        if self.interrupted:
            return 130
        if self.fatal:
            return 4
        if self.failed or self.listing_errors or self.post_failed:
            return 1
        return 0


class Reporter:
    """What the coordinator tells the outside world (the CLI's display, logs).

    Every method does nothing here: this class is also the silent reporter, and
    a display overrides what it shows.
    """

    def begin(self) -> None:
        """The run is starting: a display may start drawing (and its threads) now."""

    def planned(self, job: Job) -> None: ...
    def skipped(self, f: RemoteFile) -> None: ...
    def skipped_many(self, n: int) -> None: ...
    def transferred(self, nbytes: int) -> None: ...
    def started(self, ev: FileStarted) -> None: ...
    def finished(self, out: Outcome) -> None: ...
    def retried(self, ev: Retried) -> None: ...
    def problem(self, p: CrawlProblem) -> None: ...
    def notice(self, message: str) -> None: ...
    def crawl_done(self) -> None: ...
    def post_progress(self, counts: PostCounts) -> None: ...
    def post_failed(self, out: PostOutcome) -> None: ...
    def close(self) -> None: ...
