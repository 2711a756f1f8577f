"""The project's scripted fault-injection HTTP/1.1 server.

::

    with FaultServer(root=tree) as srv:            # serve a directory from disk ...
        srv.add_file("/a/b.bin", data)              # ... plus in-memory files
        srv.script("/a/b.bin", [Fault.status(503, retry_after="1"), Fault.drop_after(1000)])
        srv.persist("/slow.bin", Fault.ignore_range())
        ...  # point the client at srv.url
        assert srv.count(path="/a/b.bin") == 3 and srv.pending("/a/b.bin") == 0

Real sockets on 127.0.0.1 (TLS with ``tls=ssl_context``), keep-alive, one
daemon thread per connection.  Directories get an nginx-autoindex-style
listing (``<pre>``, exact sizes, ``dd-Mon-YYYY HH:MM`` UTC dates, hrefs
percent-encoded from the UTF-8 names, directories first with a trailing
``/``); files get ``Content-Length``, ``ETag``, ``Last-Modified``, single
``Range`` requests (206 / 416), ``If-Range`` and ``If-None-Match`` /
``If-Modified-Since`` (304).

Faults: each request to a path takes the next :meth:`FaultServer.script`-ed
fault for it (consumed in order, then normal service), combined with the
path's :meth:`FaultServer.persist`-ent fault, if any.  A rule's path is an
exact decoded path (``"/a/b c.bin"``), or a prefix when it ends with ``*``.
Faults combine with ``|``: ``Fault.ignore_range() | Fault.drop_after(100)``.

Everything that blocks (hang, trickle, delay) ends when the server closes:
closing sets an event the handlers wait on and shuts down every open
connection, then joins the handler threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import gzip as gzip_module
import hashlib
import html
import mimetypes
import os
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

__all__ = [
    "AUTO",
    "DirEntry",
    "Fault",
    "FaultServer",
    "GeneratedTree",
    "Request",
    "generated_body",
    "nginx_listing",
    "serving",
]

AUTO: object = type("Auto", (), {"__repr__": lambda self: "AUTO"})()
"""Default for ``etag=`` / ``last_modified=``: derive one (hash of content; now)."""

_CHUNK = 256 * 1024
_VIRTUAL_DIR_MTIME = 1_600_000_000.0
_BEFORE_HEADERS = -1


# --- faults -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """How to misbehave on one request.  Build with the class methods; combine with ``|``."""

    code: int | None = None
    body: bytes | None = None
    location: str | None = None
    wait: float = 0.0
    gate: threading.Event | None = None
    abort: bool = False
    stall_at: int | None = None
    drop_at: int | None = None
    drop_reset: bool = False
    truncate: int | None = None
    no_range: bool = False
    no_if_range: bool = False
    skew_range: bool = False
    rate: float | None = None
    gzipped: bool = False
    chunk: bool = False
    headers: tuple[tuple[str, str | None], ...] = ()

    @classmethod
    def ok(cls) -> Fault:
        """Serve normally (a placeholder in a script)."""
        return cls()

    @classmethod
    def status(
        cls,
        code: int,
        *,
        retry_after: str | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Fault:
        """Answer ``code`` (with ``Retry-After``, if given) and a short text body."""
        extra = dict(headers or {})
        if retry_after is not None:
            extra["Retry-After"] = retry_after
        return cls(code=code, body=body, headers=tuple(extra.items()))

    @classmethod
    def redirect(cls, location: str, code: int = 302) -> Fault:
        """Answer ``code`` with ``Location: location`` (a path or an absolute URL)."""
        if not 300 <= code < 400:
            raise ValueError(f"not a redirect status: {code}")
        return cls(code=code, location=location)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Wait ``seconds`` (or until shutdown) before answering normally."""
        return cls(wait=seconds)

    @classmethod
    def gated(cls, event: threading.Event) -> Fault:
        """Hold the request until ``event`` is set (or shutdown), then answer normally.

        For deterministic concurrency tests: gate every request, wait until N
        have arrived (:meth:`FaultServer.wait_for`), check the counters, set it.
        """
        return cls(gate=event)

    @classmethod
    def reset(cls) -> Fault:
        """Close the connection with a TCP RST before answering."""
        return cls(abort=True)

    @classmethod
    def hang(cls, after_bytes: int | None = None) -> Fault:
        """Stop answering until the server shuts down (or the client leaves).

        ``None``: send nothing at all; ``n``: send the headers and ``n`` body bytes first.
        """
        return cls(stall_at=_BEFORE_HEADERS if after_bytes is None else after_bytes)

    @classmethod
    def drop_after(cls, n_bytes: int, *, reset: bool = False) -> Fault:
        """Send the headers (full ``Content-Length``) and ``n_bytes`` of body, then close.

        The close is an orderly FIN, or a RST with ``reset=True``.
        """
        return cls(drop_at=n_bytes, drop_reset=reset)

    @classmethod
    def short_body(cls, n_bytes: int) -> Fault:
        """Serve the file as if it were only its first ``n_bytes`` (consistent headers)."""
        return cls(truncate=n_bytes)

    @classmethod
    def ignore_range(cls) -> Fault:
        """Answer ``200`` with the whole file even when ``Range`` is asked."""
        return cls(no_range=True)

    @classmethod
    def ignore_if_range(cls) -> Fault:
        """Answer a ``Range`` with 206 even when ``If-Range`` names another version."""
        return cls(no_if_range=True)

    @classmethod
    def wrong_content_range(cls) -> Fault:
        """Answer a range with 206 whose ``Content-Range`` claims start + 1."""
        return cls(skew_range=True)

    @classmethod
    def trickle(cls, bytes_per_sec: float) -> Fault:
        """Send the body at ``bytes_per_sec`` (until done, the client leaves or shutdown)."""
        if bytes_per_sec <= 0:
            raise ValueError("bytes_per_sec must be > 0")
        return cls(rate=float(bytes_per_sec))

    @classmethod
    def gzip(cls) -> Fault:
        """``Content-Encoding: gzip`` whatever the client accepts; length is the gzip's."""
        return cls(gzipped=True)

    @classmethod
    def chunked(cls) -> Fault:
        """``Transfer-Encoding: chunked`` instead of ``Content-Length``."""
        return cls(chunk=True)

    @classmethod
    def header(cls, name: str, value: str | None) -> Fault:
        """Set a response header (``None`` removes it, e.g. ``ETag`` or ``Content-Length``)."""
        return cls(headers=((name, value),))

    def __or__(self, other: Fault) -> Fault:
        """Both faults: ``other``'s settings win where both set one; headers add up."""
        if not isinstance(other, Fault):
            return NotImplemented
        changes = {
            f.name: getattr(other, f.name)
            for f in dataclasses.fields(Fault)
            if f.name != "headers" and getattr(other, f.name) != f.default
        }
        return dataclasses.replace(self, headers=self.headers + other.headers, **changes)


@dataclass(slots=True)
class _Rule:
    pattern: str
    method: str | None

    def matches(self, path: str, method: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        if self.pattern.endswith("*"):
            return path.startswith(self.pattern[:-1])
        return path == self.pattern


@dataclass(slots=True)
class _Script(_Rule):
    faults: deque[Fault] = field(default_factory=deque)


@dataclass(slots=True)
class _Persistent(_Rule):
    fault: Fault = field(default_factory=Fault)


# --- recorded requests --------------------------------------------------------


@dataclass(slots=True)
class Request:
    """One request the server received (a snapshot; see :attr:`FaultServer.requests`)."""

    method: str
    target: str
    """The raw request target, as sent: percent-encoded, with any query."""
    path: str
    """The target's path, percent-decoded once (UTF-8, surrogate escapes), no query."""
    headers: dict[str, str]
    """Request headers, names lower-cased (a repeated header keeps its last value)."""
    connection: int
    """Serial number of the TCP connection it came on (1, 2, ...)."""
    started: float
    """``time.monotonic()`` when it arrived."""
    finished: float | None = None
    status: int | None = None
    """Status sent, or ``None`` if none was (reset, hang)."""
    bytes_sent: int = 0
    """Body bytes handed to the socket."""
    fault: Fault | None = None
    is_file: bool = False
    """The body was (part of) a file, not a listing, redirect or error page."""


# --- resources ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: str
    is_dir: bool
    size: int = 0
    mtime: float = 0.0


@dataclass(slots=True)
class _File:
    size: int
    etag: str | None
    last_modified: float | None
    content_type: str
    data: bytes | None = None
    disk: Path | None = None
    generated: str | None = None

    def read(self, start: int, length: int) -> Iterator[bytes]:
        """The bytes ``[start, start + length)``, in chunks."""
        if self.data is not None:
            view = memoryview(self.data)
            for pos in range(start, start + length, _CHUNK):
                yield bytes(view[pos : min(pos + _CHUNK, start + length)])
        elif self.disk is not None:
            with open(self.disk, "rb") as f:
                f.seek(start)
                left = length
                while left > 0:
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:
                        return
                    left -= len(chunk)
                    yield chunk
        elif self.generated is not None:
            for pos in range(start, start + length, _CHUNK):
                yield generated_body(self.generated, min(_CHUNK, start + length - pos), pos)


@dataclass(slots=True)
class _Listing:
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    status: int = 200


def generated_body(path: str, length: int, offset: int = 0) -> bytes:
    """Bytes ``[offset, offset + length)`` of a generated file: a pure function of ``path``.

    Byte ``i`` is byte ``i % 32`` of ``sha256(path + "\\0" + str(i // 32))``.
    """
    first, last = offset // 32, (offset + length + 31) // 32
    prefix = path.encode("utf-8", "surrogateescape") + b"\0"
    blocks = b"".join(hashlib.sha256(prefix + str(i).encode()).digest() for i in range(first, last))
    skip = offset - first * 32
    return blocks[skip : skip + length]


class GeneratedTree:
    """A listing tree made up on the fly: ``PREFIX dNNNN/ fNNN.bin``; nothing on disk.

    Sizes, dates and bodies are pure functions of the path, so two servers (or
    two runs) agree, and a test can compute any expected file with
    :meth:`content`.
    """

    def __init__(self, prefix: str, dirs: int, files_per_dir: int, min_size: int, max_size: int):
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"prefix must start and end with '/': {prefix!r}")
        if dirs < 0 or files_per_dir < 0 or not 0 <= min_size <= max_size:
            raise ValueError("need dirs, files_per_dir >= 0 and 0 <= min_size <= max_size")
        self.prefix = prefix
        self.dirs = dirs
        self.files_per_dir = files_per_dir
        self.min_size = min_size
        self.max_size = max_size
        self._dir_width = max(4, len(str(dirs - 1)))
        self._file_width = max(3, len(str(files_per_dir - 1)))

    @property
    def count(self) -> int:
        return self.dirs * self.files_per_dir

    def dir_name(self, d: int) -> str:
        return f"d{d:0{self._dir_width}d}"

    def file_name(self, f: int) -> str:
        return f"f{f:0{self._file_width}d}.bin"

    def files(self) -> Iterator[tuple[str, int]]:
        """Every file's decoded URL path and size."""
        for d in range(self.dirs):
            for f in range(self.files_per_dir):
                path = f"{self.prefix}{self.dir_name(d)}/{self.file_name(f)}"
                yield path, self.size(path)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files())

    def size(self, path: str) -> int:
        digest = hashlib.sha256(b"size:" + path.encode()).digest()
        return self.min_size + int.from_bytes(digest[:8], "big") % (
            self.max_size - self.min_size + 1
        )

    def mtime(self, path: str) -> float:
        digest = hashlib.sha256(b"mtime:" + path.encode()).digest()
        return 1_600_000_000 + int.from_bytes(digest[:8], "big") % 100_000_000 // 60 * 60

    def content(self, path: str) -> bytes:
        return generated_body(path, self.size(path))

    def _index(self, name: str, stem: str, suffix: str, limit: int) -> int | None:
        digits = name.removeprefix(stem).removesuffix(suffix)
        if not (name.startswith(stem) and name.endswith(suffix) and digits.isdigit()):
            return None
        i = int(digits)
        return i if i < limit and name == f"{stem}{digits}{suffix}" else None

    def lookup(self, path: str) -> _File | list[DirEntry] | str | None:
        """A file, a directory's entries, ``"redirect"`` (directory without ``/``), or None."""
        rest = path[len(self.prefix) :]
        if path == self.prefix:
            return [
                DirEntry(self.dir_name(d), True, 0, _VIRTUAL_DIR_MTIME) for d in range(self.dirs)
            ]
        parts = rest.split("/")
        if len(parts) > 2 or self._index(parts[0], "d", "", self.dirs) is None:
            return None
        if len(parts) == 1:
            return "redirect"
        if parts[1] == "":
            entries = []
            for f in range(self.files_per_dir):
                name = self.file_name(f)
                p = f"{path}{name}"
                entries.append(DirEntry(name, False, self.size(p), self.mtime(p)))
            return entries
        if self._index(parts[1], "f", ".bin", self.files_per_dir) is None:
            return None
        return _File(
            self.size(path),
            f'"g-{hashlib.sha256(path.encode()).hexdigest()[:16]}"',
            self.mtime(path),
            "application/octet-stream",
            generated=path,
        )


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def nginx_listing(dir_path: str, entries: Sequence[DirEntry]) -> bytes:
    """An nginx-autoindex page (``autoindex_exact_size on``, UTC dates) for ``entries``.

    Like nginx: directories first, then bytewise name order; hrefs percent-encode
    every byte but ``A-Za-z0-9-._~``; display names are cut to 50 bytes (47 and
    ``..>``, even mid-character) and padded by bytes.
    """
    title = html.escape(dir_path, quote=False).encode("utf-8", "surrogateescape")
    out = [
        b"<html>\r\n<head><title>Index of " + title + b"</title></head>\r\n<body>\r\n"
        b"<h1>Index of " + title + b'</h1><hr><pre><a href="../">../</a>\r\n'
    ]
    ordered = sorted(entries, key=lambda e: (not e.is_dir, os.fsencode(e.name)))
    for e in ordered:
        raw = os.fsencode(e.name) + (b"/" if e.is_dir else b"")
        href = quote(os.fsencode(e.name), safe="") + ("/" if e.is_dir else "")
        shown = raw if len(raw) <= 50 else raw[:47] + b"..>"
        display = html.escape(shown.decode("utf-8", "surrogateescape"), quote=False)
        when = datetime.fromtimestamp(e.mtime, UTC)
        date = f"{when.day:02d}-{_MONTHS[when.month - 1]}-{when.year} {when:%H:%M}"
        size = "-" if e.is_dir else str(e.size)
        out.append(
            f'<a href="{href}">'.encode()
            + display.encode("utf-8", "surrogateescape")
            + b"</a>"
            + b" " * (50 - len(shown))
            + f" {date} {size:>19}\r\n".encode()
        )
    out.append(b"</pre><hr></body>\r\n</html>\r\n")
    return b"".join(out)


def _error_page(code: int) -> bytes:
    phrase = _phrase(code)
    return (
        f"<html>\r\n<head><title>{code} {phrase}</title></head>\r\n<body>\r\n"
        f"<center><h1>{code} {phrase}</h1></center>\r\n</body>\r\n</html>\r\n"
    ).encode()


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


def _http_date(when: float) -> str:
    return email.utils.formatdate(int(when), usegmt=True)


def _parse_http_date(value: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _epoch(when: object) -> float | None:
    if when is None:
        return None
    if isinstance(when, datetime):
        return when.timestamp()
    if isinstance(when, int | float):
        return float(when)
    raise TypeError(f"last_modified must be an epoch, a datetime or None, not {when!r}")


def _etag_matches(header: str, etag: str | None) -> bool:
    """``If-None-Match`` (weak comparison)."""
    if etag is None:
        return False
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(t.strip().removeprefix("W/") == bare for t in header.split(","))


# --- the server -----------------------------------------------------------------


class FaultServer:
    """A scripted HTTP/1.1 server on ``127.0.0.1``.  Use as a context manager."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        idle_timeout: float = 30.0,
    ) -> None:
        self.root = root.resolve() if root is not None else None
        self.tls = tls
        self.idle_timeout = idle_timeout
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._files: dict[str, _File] = {}
        self._listings: dict[str, _Listing] = {}
        self._generated: list[GeneratedTree] = []
        self._etags: dict[str, str | None] = {}
        self._dates: dict[str, float | None] = {}
        self._scripts: list[_Script] = []
        self._persistent: list[_Persistent] = []
        self._requests: list[Request] = []
        self._open: dict[int, tuple[socket.socket, int]] = {}
        self._threads: set[threading.Thread] = set()
        self._connections = 0
        self._active_requests = 0
        self.max_concurrent_connections = 0
        self.max_concurrent_requests = 0
        self.keep_alive = True
        """False: every response closes its connection (``Connection: close``)."""
        self.errors: list[str] = []
        """Tracebacks of unexpected exceptions in handlers (client disconnects excluded)."""
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None

    # lifecycle

    def __enter__(self) -> FaultServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(raise_on_stuck=exc_info[0] is None)

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("already started")
        self._server = _Server(self)
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="faultserver-accept",
            daemon=True,
        )
        self._serve_thread.start()

    def close(self, *, timeout: float = 10.0, raise_on_stuck: bool = True) -> None:
        """Stop accepting, end every connection (and every hang), join the threads."""
        server = self._server
        if server is None or self._stopping.is_set():
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            sockets = [sock for sock, _ in self._open.values()]
            threads = list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):  # not SSLSocket.shutdown: it unwraps
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for t in [*threads, self._serve_thread]:
            if t is not None:
                t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck and raise_on_stuck:
            raise RuntimeError(f"fault server threads did not stop: {stuck}")

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/"

    # content

    def add_file(
        self,
        path: str,
        data: bytes,
        *,
        etag: str | object | None = AUTO,
        last_modified: float | datetime | object | None = AUTO,
        content_type: str | None = None,
    ) -> None:
        """Serve ``data`` at the decoded ``path``; replaces any earlier file there.

        ``etag``: a quoted ETag, ``None`` for no header, or AUTO (a hash of
        ``data``, so new content means a new ETag).  ``last_modified``: an epoch,
        a datetime, ``None`` for no header, or AUTO (now).
        """
        _check_path(path)
        if etag is AUTO:
            etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        when = time.time() if last_modified is AUTO else _epoch(last_modified)
        ctype = content_type or mimetypes.guess_type(path)[0] or "application/octet-stream"
        with self._lock:
            self._files[path] = _File(
                len(data), etag if isinstance(etag, str) else None, when, ctype, data=bytes(data)
            )
            self._etags.pop(path, None)
            self._dates.pop(path, None)

    def add_listing(
        self,
        path: str,
        body: bytes,
        *,
        content_type: str = "text/html; charset=utf-8",
        status: int = 200,
    ) -> None:
        """Serve ``body`` (any bytes) as the listing of the directory ``path`` (ends in ``/``)."""
        _check_path(path)
        if not path.endswith("/"):
            raise ValueError(f"a listing's path ends with '/': {path!r}")
        with self._lock:
            self._listings[path] = _Listing(bytes(body), content_type, status)

    def add_generated_tree(
        self,
        prefix: str = "/gen/",
        dirs: int = 2000,
        files_per_dir: int = 100,
        *,
        min_size: int = 1,
        max_size: int = 4096,
    ) -> GeneratedTree:
        """Serve a made-up tree of ``dirs * files_per_dir`` files below ``prefix``."""
        tree = GeneratedTree(prefix, dirs, files_per_dir, min_size, max_size)
        with self._lock:
            self._generated.append(tree)
        return tree

    def remove(self, path: str) -> None:
        """Stop serving the in-memory file or listing at ``path``."""
        with self._lock:
            self._files.pop(path, None)
            self._listings.pop(path, None)

    def set_etag(self, path: str, etag: str | None) -> None:
        """Change the ETag of any file (memory, disk or generated); ``None`` drops the header."""
        with self._lock:
            self._etags[path] = etag

    def set_last_modified(self, path: str, when: float | datetime | None) -> None:
        """Change the Last-Modified (and listing date) of any file; ``None`` drops the header."""
        with self._lock:
            self._dates[path] = _epoch(when)

    def content(self, path: str) -> bytes:
        """The bytes served (without faults) at the decoded file ``path``."""
        found = self._resolve(path)
        if not isinstance(found, _File):
            raise KeyError(f"no file at {path!r}")
        return b"".join(found.read(0, found.size))

    # faults

    def script(self, path: str, faults: Sequence[Fault], *, method: str | None = None) -> None:
        """Queue ``faults`` for the next requests to ``path`` (``method`` only, if given)."""
        with self._lock:
            self._scripts.append(_Script(path, method, deque(faults)))

    def persist(self, path: str, fault: Fault | None, *, method: str | None = None) -> None:
        """Apply ``fault`` to every request to ``path`` from now on; ``None`` clears it.

        A redirect loop: ``srv.persist("/loop/", Fault.redirect("/loop/"))``.
        """
        with self._lock:
            self._persistent = [
                p for p in self._persistent if (p.pattern, p.method) != (path, method)
            ]
            if fault is not None:
                self._persistent.append(_Persistent(path, method, fault))

    def pending(self, path: str | None = None) -> int:
        """Scripted faults not yet consumed (for ``path``, or in all)."""
        with self._lock:
            return sum(len(s.faults) for s in self._scripts if path is None or s.pattern == path)

    def clear_faults(self) -> None:
        with self._lock:
            self._scripts.clear()
            self._persistent.clear()

    def _take_fault(self, path: str, method: str) -> Fault | None:
        with self._lock:
            fault = None
            for p in self._persistent:
                if p.matches(path, method):
                    fault = p.fault if fault is None else fault | p.fault
            for s in self._scripts:
                if s.faults and s.matches(path, method):
                    scripted = s.faults.popleft()
                    fault = scripted if fault is None else fault | scripted
                    break
            return fault

    # counting

    @property
    def requests(self) -> list[Request]:
        """Every request received so far, oldest first (snapshots)."""
        with self._lock:
            return [dataclasses.replace(r, headers=dict(r.headers)) for r in self._requests]

    def count(
        self, method: str | None = None, path: str | None = None, status: int | None = None
    ) -> int:
        """How many requests matched ``method``, decoded ``path`` and ``status``."""
        with self._lock:
            return sum(
                1
                for r in self._requests
                if (method is None or r.method == method)
                and (path is None or r.path == path)
                and (status is None or r.status == status)
            )

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent in all (files, listings, error pages)."""
        with self._lock:
            return sum(r.bytes_sent for r in self._requests)

    @property
    def file_bytes_sent(self) -> int:
        """Body bytes of files sent (not listings, redirects or error pages)."""
        with self._lock:
            return sum(r.bytes_sent for r in self._requests if r.is_file)

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        with self._lock:
            return self._connections

    @property
    def open_connections(self) -> int:
        """TCP connections open now."""
        with self._lock:
            return len(self._open)

    def reset_stats(self) -> None:
        """Forget recorded requests and maxima (open connections still count)."""
        with self._lock:
            self._requests.clear()
            self.max_concurrent_connections = len(self._open)
            self.max_concurrent_requests = self._active_requests
            self.errors.clear()

    def wait_for(self, count: int, *, path: str | None = None, timeout: float = 5.0) -> bool:
        """Poll until at least ``count`` requests (to ``path``) arrived; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.count(path=path) < count:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # connection bookkeeping (called by _Server)

    def _connected(self, sock: socket.socket) -> int:
        with self._lock:
            self._connections += 1
            self._open[id(sock)] = (sock, self._connections)
            self.max_concurrent_connections = max(self.max_concurrent_connections, len(self._open))
            return self._connections

    def _disconnected(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.pop(id(sock), None)

    # resolving paths

    def _resolve(self, path: str) -> _File | _Listing | str | None:
        """A file, a listing, ``"redirect"`` (add a ``/``) or None (404)."""
        found = self._lookup(path)
        if isinstance(found, _File):
            found = dataclasses.replace(found)
            with self._lock:
                if path in self._etags:
                    found.etag = self._etags[path]
                if path in self._dates:
                    found.last_modified = self._dates[path]
        return found

    def _lookup(self, path: str) -> _File | _Listing | str | None:
        with self._lock:  # memory first; the disk is read outside the lock
            if path in self._listings:
                return self._listings[path]
            if path in self._files:
                return self._files[path]
            trees = list(self._generated)
        for tree in trees:
            if path.startswith(tree.prefix):
                found = tree.lookup(path)
                if isinstance(found, list):
                    return _Listing(nginx_listing(path, found))
                return found
        disk = self._disk_path(path)
        if disk is not None and disk.is_file():
            st = disk.stat()
            ctype = mimetypes.guess_type(disk.name)[0] or "application/octet-stream"
            return _File(
                st.st_size, f'"{st.st_mtime_ns:x}-{st.st_size:x}"', st.st_mtime, ctype, disk=disk
            )
        with self._lock:
            is_dir = path == "/" or self._implied_dir(path)
            below = self._implied_dir(path + "/")
        is_dir = is_dir or (disk is not None and disk.is_dir())
        if (is_dir or below) and not path.endswith("/"):
            return "redirect"
        if is_dir:
            return _Listing(nginx_listing(path, self._entries(path, disk)))
        return None

    def _disk_path(self, path: str) -> Path | None:
        if self.root is None:
            return None
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") or "\0" in p for p in parts):
            return None
        return self.root.joinpath(*parts)

    def _virtual_paths(self) -> Iterator[str]:
        yield from self._files
        yield from self._listings
        for tree in self._generated:
            yield tree.prefix

    def _implied_dir(self, dir_path: str) -> bool:
        return dir_path.endswith("/") and any(
            p.startswith(dir_path) and p != dir_path for p in self._virtual_paths()
        )

    def _entries(self, dir_path: str, disk: Path | None) -> list[DirEntry]:
        entries: dict[str, DirEntry] = {}
        if disk is not None and disk.is_dir():
            with os.scandir(disk) as it:
                for de in it:
                    st = de.stat()
                    is_dir = de.is_dir()
                    size = 0 if is_dir else st.st_size
                    entries[de.name] = DirEntry(de.name, is_dir, size, st.st_mtime)
        with self._lock:
            return self._virtual_entries(dir_path, entries)

    def _virtual_entries(self, dir_path: str, entries: dict[str, DirEntry]) -> list[DirEntry]:
        """Add in-memory files and implied directories; apply date overrides."""
        for name, e in entries.items():
            when = self._dates.get(dir_path + name)
            if when is not None:
                entries[name] = dataclasses.replace(e, mtime=when)
        for p in self._virtual_paths():
            if not p.startswith(dir_path) or p == dir_path:
                continue
            name, slash, _ = p[len(dir_path) :].partition("/")
            if slash:
                entries.setdefault(name, DirEntry(name, True, 0, _VIRTUAL_DIR_MTIME))
            elif p in self._files:
                f = self._files[p]
                when = self._dates.get(p, f.last_modified)
                entries[name] = DirEntry(name, False, f.size, when or 0.0)
        return list(entries.values())


def _check_path(path: str) -> None:
    if not path.startswith("/"):
        raise ValueError(f"paths start with '/': {path!r}")


# --- socket server and handler --------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, owner: FaultServer) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)
        if owner.tls is not None:
            self.socket = owner.tls.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        serial = self.owner._connected(request)
        t = threading.Thread(
            target=self._run,
            args=(request, client_address),
            name=f"faultserver-conn-{serial}",
            daemon=True,
        )
        with self.owner._lock:
            self.owner._threads.add(t)
        t.start()

    def _run(self, request: socket.socket, client_address: object) -> None:
        try:
            self.finish_request(request, client_address)  # type: ignore[arg-type]
        except Exception:
            self.handle_error(request, client_address)  # type: ignore[arg-type]
        finally:
            self.shutdown_request(request)  # type: ignore[arg-type]
            with self.owner._lock:
                self.owner._threads.discard(threading.current_thread())

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        self.owner._disconnected(request)
        super().shutdown_request(request)  # type: ignore[arg-type]

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # no getfqdn() lookup
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def handle_error(self, request: object, client_address: object) -> None:
        """Disconnects and timeouts (OSError) are the client's business; keep the rest."""
        if not isinstance(sys.exc_info()[1], OSError):
            with self.owner._lock:
                self.owner.errors.append(traceback.format_exc())


class _Abort(Exception):
    """End this connection now (client gone, server stopping, or a fault)."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "faultserver"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        owner = self.server.owner
        self.timeout = owner.idle_timeout
        with owner._lock:
            self.serial = owner._open[id(self.request)][1]
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(owner.idle_timeout)
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _not_allowed(self) -> None:
        self._serve(head=False, allowed=False)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    # one request

    def _serve(self, head: bool, allowed: bool = True) -> None:
        owner = self.server.owner
        target = self.requestline.split(" ")[1] if " " in self.requestline else self.path
        raw_path = unquote_to_bytes(target.split("?", 1)[0].split("#", 1)[0])
        path = raw_path.decode("utf-8", "surrogateescape")
        rec = Request(
            self.command,
            target,
            path,
            {k.lower(): v for k, v in self.headers.items()},
            self.serial,
            time.monotonic(),
        )
        self._skip_request_body()
        if not owner.keep_alive:
            self.close_connection = True
        with owner._lock:
            owner._requests.append(rec)
            owner._active_requests += 1
            owner.max_concurrent_requests = max(
                owner.max_concurrent_requests, owner._active_requests
            )
        try:
            rec.fault = fault = owner._take_fault(path, self.command) or Fault()
            if allowed:
                self._respond(rec, fault, head)
            else:
                self._simple(rec, fault, 405, _error_page(405), head, [("Allow", "GET, HEAD")])
        except (_Abort, OSError):
            self.close_connection = True
        finally:
            with owner._lock:
                owner._active_requests -= 1
                rec.finished = time.monotonic()

    def _skip_request_body(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit():
            self.rfile.read(int(length))

    def _respond(self, rec: Request, fault: Fault, head: bool) -> None:
        owner = self.server.owner
        if fault.wait and owner._stopping.wait(fault.wait):
            raise _Abort
        while fault.gate is not None and not fault.gate.wait(0.05):
            if owner._stopping.is_set():
                raise _Abort
        if fault.abort:
            self._reset()
            raise _Abort
        if fault.stall_at == _BEFORE_HEADERS:
            self._stall()
            raise _Abort
        if fault.location is not None:
            body = _error_page(fault.code or 302)
            self._simple(rec, fault, fault.code or 302, body, head, [("Location", fault.location)])
            return
        if fault.code is not None:
            body = fault.body if fault.body is not None else _error_page(fault.code)
            self._simple(rec, fault, fault.code, body, head, [])
            return
        found = owner._resolve(rec.path)
        if found is None:
            self._simple(rec, fault, 404, _error_page(404), head, [])
        elif found == "redirect":
            location = rec.target.split("?", 1)[0] + "/"
            self._simple(rec, fault, 301, _error_page(301), head, [("Location", location)])
        elif isinstance(found, _Listing):
            self._simple(
                rec, fault, found.status, found.body, head, [("Content-Type", found.content_type)]
            )
        elif isinstance(found, _File):
            self._file(rec, fault, found, head)

    def _simple(
        self,
        rec: Request,
        fault: Fault,
        code: int,
        body: bytes,
        head: bool,
        headers: list[tuple[str, str]],
    ) -> None:
        if not any(k.lower() == "content-type" for k, _ in headers):
            headers.append(("Content-Type", "text/html"))
        self._send(rec, fault, code, headers, body, head, is_file=False)

    def _file(self, rec: Request, fault: Fault, f: _File, head: bool) -> None:
        size = f.size if fault.truncate is None else min(f.size, fault.truncate)
        headers = [("Content-Type", f.content_type), ("Accept-Ranges", "bytes")]
        if f.last_modified is not None:
            headers.append(("Last-Modified", _http_date(f.last_modified)))
        if f.etag is not None:
            headers.append(("ETag", f.etag))
        inm, ims = rec.headers.get("if-none-match"), rec.headers.get("if-modified-since")
        since = _parse_http_date(ims) if ims else None
        if (inm is not None and _etag_matches(inm, f.etag)) or (
            inm is None
            and since is not None
            and f.last_modified is not None
            and int(f.last_modified) <= since
        ):
            self._send(rec, fault, 304, headers, b"", True, is_file=False)
            return
        code, start, length = 200, 0, size
        wanted = _parse_range(rec.headers.get("range"), size)
        holds = fault.no_if_range or self._if_range_holds(rec, f)
        if wanted is not None and not fault.no_range and holds:
            if wanted == "unsatisfiable":
                headers = [("Content-Range", f"bytes */{size}")]
                self._send(rec, fault, 416, headers, _error_page(416), head, is_file=False)
                return
            start, end = wanted
            code, length = 206, end - start + 1
            shift = 1 if fault.skew_range else 0
            headers.append(("Content-Range", f"bytes {start + shift}-{end + shift}/{size}"))
        body: bytes | Iterator[bytes] = f.read(start, length)
        if fault.gzipped:
            body = gzip_module.compress(b"".join(body), mtime=0)
            headers.append(("Content-Encoding", "gzip"))
        self._send(
            rec,
            fault,
            code,
            headers,
            body,
            head,
            is_file=True,
            length=length,
            sendfile=(f.disk, start) if f.disk is not None else None,
        )

    def _if_range_holds(self, rec: Request, f: _File) -> bool:
        value = rec.headers.get("if-range")
        if value is None:
            return True
        if value.startswith(('"', "W/")):
            return f.etag is not None and not f.etag.startswith("W/") and value == f.etag
        when = _parse_http_date(value)
        return when is not None and f.last_modified is not None and int(f.last_modified) == when

    # writing

    def _send(
        self,
        rec: Request,
        fault: Fault,
        code: int,
        headers: list[tuple[str, str]],
        body: bytes | Iterator[bytes],
        head: bool,
        *,
        is_file: bool,
        length: int | None = None,
        sendfile: tuple[Path, int] | None = None,
    ) -> None:
        if isinstance(body, bytes):
            length = len(body)
        assert length is not None
        chunked = fault.chunk and code not in (204, 304)
        base = [("Server", self.server_version), ("Date", _http_date(time.time()))]
        if chunked:
            base.append(("Transfer-Encoding", "chunked"))
        elif code != 304:
            base.append(("Content-Length", str(length)))
        merged: dict[str, tuple[str, str]] = {}
        for name, value in [*base, *headers]:
            merged[name.lower()] = (name, value)
        for name, maybe in fault.headers:
            if maybe is None:
                merged.pop(name.lower(), None)
            else:
                merged[name.lower()] = (name, maybe)
        delimited = chunked or "content-length" in merged or code == 304 or head
        if not delimited:
            self.close_connection = True
        merged["connection"] = ("Connection", "close" if self.close_connection else "keep-alive")
        lines = [f"HTTP/1.1 {code} {_phrase(code)}"] + [f"{k}: {v}" for k, v in merged.values()]
        rec.status, rec.is_file = code, is_file
        head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if head or code == 304:
            self.wfile.write(head_bytes)
            return
        plain = not (
            chunked or fault.rate or fault.drop_at is not None or fault.stall_at is not None
        )
        if plain and isinstance(body, bytes):  # one write: no Nagle stall between the two
            with self.server.owner._lock:
                rec.bytes_sent += len(body)
            self.wfile.write(head_bytes + body)
            return
        self.wfile.write(head_bytes)
        if length == 0 and plain:
            return  # (socket.sendfile refuses a count of 0; it raised and closed the connection)
        if plain and sendfile is not None and self.server.owner.tls is None:
            path, offset = sendfile
            with self.server.owner._lock:
                rec.bytes_sent += length
            with open(path, "rb") as f:
                self.connection.sendfile(f, offset, length)
            return
        chunks = [body] if isinstance(body, bytes) else body
        limit = min(x for x in (fault.drop_at, fault.stall_at, 1 << 62) if x is not None)
        sent = 0
        for chunk in chunks:
            for piece in self._pace(chunk[: limit - sent], fault):
                self._write(rec, piece, chunked)
                sent += len(piece)
            if sent >= limit:
                break
        if fault.drop_at is not None:
            self._drop(fault)
        if fault.stall_at is not None:
            self._stall()
            raise _Abort
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _pace(self, chunk: bytes, fault: Fault) -> Iterator[bytes]:
        """``chunk`` in pieces at the trickle rate (whole without one)."""
        if not fault.rate:
            if chunk:
                yield chunk
            return
        step = max(1, int(fault.rate / 20))
        for pos in range(0, len(chunk), step):
            if self.server.owner._stopping.wait(step / fault.rate):
                raise _Abort
            yield chunk[pos : pos + step]

    def _write(self, rec: Request, data: bytes, chunked: bool) -> None:
        if not data:
            return
        with self.server.owner._lock:
            rec.bytes_sent += len(data)
        if chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)

    def _drop(self, fault: Fault) -> None:
        if fault.drop_reset:
            self._reset()
        else:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        raise _Abort

    def _reset(self) -> None:
        """Close with RST: linger 0, then the last reference to the socket goes."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.rfile.close()
        self.connection.close()

    def _stall(self) -> None:
        """Wait until shutdown, or until the client closes its end."""
        owner = self.server.owner
        tls = isinstance(self.connection, ssl.SSLSocket)
        while not owner._stopping.wait(0.05):
            if tls:
                continue
            try:
                self.connection.setblocking(False)
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return
                finally:
                    self.connection.setblocking(True)
                    self.connection.settimeout(owner.idle_timeout)
            except BlockingIOError:
                continue
            except OSError:
                return


def _parse_range(value: str | None, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=`` range as ``(first, last)``, ``"unsatisfiable"``, or None (ignore)."""
    if not value or not value.startswith("bytes=") or "," in value:
        return None
    first, dash, last = value[6:].strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return "unsatisfiable"
            return (max(0, size - n), size - 1) if size else "unsatisfiable"
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or end < start:
        return None if start < size else "unsatisfiable"
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


@contextlib.contextmanager
def serving(root: Path | None = None) -> Iterator[FaultServer]:
    """A fault server that stops at the end and fails the test if a handler raised."""
    with FaultServer(root=root) as srv:
        yield srv
    assert not srv.errors, "fault server handler errors:\n" + "\n".join(srv.errors)
