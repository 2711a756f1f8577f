"""HTTP/1.1 responses on the wire: the connection, the head parser and the body readers.

The parsing half of :mod:`fetcher.http1` (which owns connections, pipelining and the
exchange).  Strict where a hostile server could hurt, and nothing more: a bounded
head (its folded lines unfolded, as RFC 9112 section 5.2 has a user agent do), RFC
9112 section 6.3 framing (no body for HEAD, 1xx, 204 and 304; chunked when it is the
final transfer coding; else ``Content-Length``, conflicting values being an error;
else the body runs to the close), plain-hex chunk sizes, trailers bounded like a
head.  Failures are httpx's exception types, so the retry policy needs nothing new.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import select
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import httpx

__all__ = [
    "MAX_HEAD",
    "MAX_INTERIM",
    "MAX_TRAILER_LINES",
    "Body",
    "Conn",
    "Owner",
    "Stale",
    "framing",
    "has_token",
    "read_error",
    "read_head",
    "set_io_timeout",
    "timed_out",
    "write_all",
]

MAX_HEAD = 64 * 1024
"""Most bytes of a response head: of the final one and the interim (1xx) ones before it."""
MAX_INTERIM = 8
"""Most interim (1xx) answers skipped before a final one. A GET of this client meets one
100 Continue at most (it sends no ``Expect``), a 103 Early Hints or a few (RFC 8297 lets
a server send several), a WebDAV server's 102 Processing now and then: eight is past all
of them. Each one restarts the read timeout, so a server sending them without end held
the thread for ever, as a trickle would, and uncounted."""
MAX_CHUNK_LINE = 4096
MAX_TRAILER_LINES = 64
"""Most lines of a chunked body's trailer section, whose bytes count against MAX_HEAD as a
head's do. The trailer fields in use are a handful (a checksum, Server-Timing, gRPC's
status), and this client only reads past them; each line restarts the read timeout, so
a server sending them without end held the thread for ever."""
READ_SIZE = 256 * 1024
BIG_BUFFER = 1 << 20
DRAIN_MAX = 64 * 1024
DRAIN_TIMEOUT = 1.0
TLS_GATHER = 0.02
"""Seconds a TLS body's piece may gather records before it is handed on (see
:meth:`Body._tls_pieces`)."""
CLOSE_WAIT = 0.05  # seconds a connection the server closes may take to show it (see Conn.close)
NO_BODY_STATUS = frozenset({204, 304})
HEX = b"0123456789abcdefABCDEF"
LF_END = re.compile(rb"\n\r?\n")
"""The end of a head whose lines end in a bare LF (looked for only when no CRLF end is
there): RFC 9112 section 2.2 lets a recipient take LF for CRLF, and curl and httpx do."""


class Owner(Protocol):
    """What a body needs from the transport that sent its request."""

    read_timeout: float | None

    def done(self, conn: Conn, keep: bool) -> None:
        """The response is over: keep ``conn`` for the next request, or drop it."""


class Conn:
    """One TCP (or TLS) connection and the bytes read past the last response.

    Those bytes are ``rest[at:]``: one read off a pipelined connection holds several
    answers, and each head and body is taken by moving ``at``, not by copying what
    follows it (with 256 KiB reads and small files that copy was ~15 µs an answer).
    """

    __slots__ = (
        "_buf", "_head", "_release", "at", "busy", "closing", "key", "proven", "queued", "rest",
        "sock", "used",
    )  # fmt: skip

    def __init__(self, key: tuple[str, str, int], sock: socket.socket, release: Any) -> None:
        self.key = key
        self.sock = sock
        self.rest = b""
        self.at = 0
        self.used = False  # has carried a complete response (so it may have gone stale)
        self.proven = False  # has kept alive after an HTTP/1.1 response: may pipeline
        self.queued: deque[bytes] = deque()  # requests sent ahead, their answers still to come
        self.busy = False
        self.closing = False  # the server said it closes it (Connection: close, HTTP/1.0)
        self._release: Callable[[bool], None] | None = release
        self._buf: bytearray | None = None
        self._head: memoryview | None = None

    def buffer(self) -> memoryview:
        if self._buf is None:
            self._buf = bytearray(BIG_BUFFER)
        return memoryview(self._buf)

    def set_timeout(self, seconds: float | None) -> None:
        set_io_timeout(self.sock, seconds)

    def unread(self) -> int:
        """How many bytes were read past the last response taken."""
        return len(self.rest) - self.at

    def take(self, n: int) -> bytes:
        """The next ``n`` (or fewer) of the bytes read ahead, taken."""
        at = self.at
        piece = self.rest[at : at + n]
        self.skip_to(at + len(piece))
        return piece

    def skip_to(self, at: int) -> None:
        """Everything in ``rest`` before ``at`` is taken."""
        if at >= len(self.rest):
            self.rest, self.at = b"", 0
        else:
            self.at = at

    def feed(self, data: bytes) -> None:
        """``data`` was read: it follows what is still unread."""
        at = self.at
        self.rest = self.rest[at:] + data if at < len(self.rest) else data
        self.at = 0

    def recv(self) -> bytes:
        """Up to READ_SIZE bytes, read into this connection's own buffer and copied out.

        ``sock.recv(READ_SIZE)`` would allocate READ_SIZE for each read (above malloc's
        mmap threshold: an mmap, an mremap to what came and an munmap, and a page fault
        for every page touched); a small answer is only copied.
        """
        if self._head is None:
            self._head = memoryview(bytearray(READ_SIZE))
        n = self.sock.recv_into(self._head)
        return self._head[:n].tobytes()

    def close(self) -> None:
        """Close it and give its token back: at once if the server has closed its end
        (it counts the connection no more), else a moment later (see ``TokenGate``)."""
        gone = False
        try:
            gone = self.closing and _peer_closed(self.sock, CLOSE_WAIT)
            self.sock.close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release(gone)


def _peer_closed(sock: socket.socket, wait: float) -> bool:
    """The server's end of ``sock`` is closed (its FIN came), or comes within ``wait``."""
    if type(sock) is not socket.socket:
        return False  # (TLS: a close_notify may come first; the grace then)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    if not poller.poll(wait * 1000):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset: closed all the same


def set_io_timeout(sock: socket.socket, seconds: float | None) -> None:
    """How long one read or write on ``sock`` may wait; ``None``: for ever.

    A plain socket stays blocking and the kernel keeps the time (SO_RCVTIMEO and
    SO_SNDTIMEO): Python's own timeouts poll(2) before every recv and send, twice
    the calls, each a turn at the interpreter lock. A read or write that runs out
    of time then fails with EAGAIN, which :func:`timed_out` recognises. TLS
    sockets keep Python's timeouts (OpenSSL reads ahead of the kernel's view).
    """
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(seconds)
        return
    sock.settimeout(None)
    usec = 0 if seconds is None else max(1, round(seconds * 1_000_000))  # 0: for ever
    tv = struct.pack("ll", usec // 1_000_000, usec % 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def timed_out(exc: OSError) -> bool:
    """A read or write that ran out of time: Python's timeout, or the kernel's (EAGAIN)."""
    return isinstance(exc, TimeoutError | BlockingIOError)


def read_error(exc: OSError, what: str) -> httpx.TransportError:
    if timed_out(exc):
        return httpx.ReadTimeout(f"timed out {what}")
    return httpx.ReadError(f"{what}: {exc}")


class Body(httpx.SyncByteStream):
    """The body of one response, read straight off the connection."""

    def __init__(
        self,
        owner: Owner,
        conn: Conn,
        mode: str,
        length: int,
        reusable: bool,
        reuse_buffer: bool = False,
    ) -> None:
        self._reuse = reuse_buffer
        self._owner = owner
        self._conn: Conn | None = conn
        self._mode = mode  # "length", "chunked", "close" or "none"
        self._left = length
        self._total = length
        self._reusable = reusable and mode != "close"
        self._complete = mode == "none"
        self._started = False  # the caller began reading: what is left is not an error page

    # -- framing ------------------------------------------------------------
    def __iter__(self) -> Iterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        self._started = True
        try:
            if self._mode == "length":
                yield from self._by_length(conn)
            elif self._mode == "chunked":
                yield from self._chunked(conn)
            elif self._mode == "close":
                yield from self._to_close(conn)
        except OSError as exc:
            raise read_error(exc, "reading the body") from exc
        self._finish()

    def _by_length(self, conn: Conn) -> Iterator[bytes]:
        # self._left is kept current, so close() can drain what is left of a short body
        if conn.unread():
            take = conn.take(self._left)
            self._left -= len(take)
            yield take
        sock = conn.sock
        if self._left > READ_SIZE and self._reuse:
            view = conn.buffer()
            size = len(view)
            if isinstance(sock, ssl.SSLSocket):
                yield from self._tls_pieces(sock, view)  # type: ignore[misc]
                self._complete = True
                return
            while self._left > 0:
                n = sock.recv_into(view, min(self._left, size))
                if not n:
                    raise self._cut_short()
                self._left -= n
                yield view[:n]  # type: ignore[misc]
        else:
            while self._left > 0:
                data = sock.recv(self._left)
                if not data:
                    raise self._cut_short()
                self._left -= len(data)
                yield data
        self._complete = True

    def write_to(self, fd: int, on_chunk: Callable[[int], None]) -> int | None:
        """Move a large length-framed body into file ``fd`` with splice(2); its size.

        The bytes go from the socket through a pipe into the file's pages without
        being copied into Python. ``None`` (nothing read) when this body cannot go
        that way: not Linux, TLS, not framed by Content-Length, small, or begun;
        iterate it instead. ``fd`` must not be in append mode (splice refuses).

        Errors on the socket side are httpx's, as when iterating; errors writing
        the file are the ``OSError`` they are (a full disk is not a network fault).
        ``on_chunk(n)`` is called after each piece and may raise to stop.
        """
        conn = self._conn
        if (
            conn is None
            or self._started
            or self._mode != "length"
            or self._left <= READ_SIZE
            or not hasattr(os, "splice")
            or type(conn.sock) is not socket.socket
        ):
            return None
        self._started = True
        written = 0
        if conn.unread():
            take = conn.take(self._left)
            self._left -= len(take)
            write_all(fd, take)
            written += len(take)
            on_chunk(len(take))
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError, AttributeError):  # best effort: 64 KiB else
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, BIG_BUFFER)
            sock = conn.sock
            timeout = sock.gettimeout()
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            while self._left > 0:
                try:
                    n = os.splice(sock.fileno(), w, min(self._left, BIG_BUFFER))
                except BlockingIOError as exc:
                    if timeout is None:  # blocking: the kernel's read timeout ran out
                        raise read_error(exc, "reading the body") from exc
                    # Python's timeout makes the socket non-blocking: wait here
                    if not poller.poll(timeout * 1000):
                        raise read_error(TimeoutError(), "reading the body") from None
                    continue
                except OSError as exc:
                    raise read_error(exc, "reading the body") from exc
                if not n:
                    raise self._cut_short()
                self._left -= n
                piece = n
                while n:  # the pipe into the file: a plain blocking write
                    moved = os.splice(r, fd, n)
                    if not moved:
                        raise OSError(errno.EIO, "splice into the file moved nothing")
                    n -= moved
                written += piece
                on_chunk(piece)
        finally:
            os.close(r)
            os.close(w)
        self._complete = True
        self._finish()
        return written

    def _drain(self, conn: Conn) -> bool:
        """Read and drop a short unread body within DRAIN_TIMEOUT in all; True if done."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        try:
            conn.set_timeout(DRAIN_TIMEOUT)
            for _ in self._by_length(conn):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                conn.set_timeout(left)
            return True
        except (OSError, httpx.TransportError):
            return False
        finally:
            with contextlib.suppress(OSError):
                conn.set_timeout(self._owner.read_timeout)

    def _tls_pieces(self, sock: ssl.SSLSocket, view: memoryview) -> Iterator[memoryview]:
        """The body off a TLS connection, in pieces of many records each.

        One read of a TLS socket returns one record, at most 16 KiB: a piece per
        read made the caller write, count and check every 16 KiB (65,536 times a
        GiB). Records are gathered into ``view`` until it is full, the body is
        done, or :data:`TLS_GATHER` has passed since the piece's first record, so
        a slow body still comes on in pieces as they arrive."""
        size = len(view)
        while self._left > 0:
            want = min(self._left, size)
            got = sock.recv_into(view, want)
            if not got:
                raise self._cut_short()
            failed: OSError | None = None  # after the first record: hand on what came first
            closed = False
            until = time.monotonic() + TLS_GATHER
            try:
                while got < want and time.monotonic() <= until:
                    n = sock.recv_into(view[got:], want - got)
                    if not n:
                        closed = True
                        break
                    got += n
            except OSError as exc:
                failed = exc
            self._left -= got
            yield view[:got]
            if closed:
                raise self._cut_short()
            if failed is not None:
                raise failed

    def _cut_short(self) -> httpx.RemoteProtocolError:
        return httpx.RemoteProtocolError(
            f"connection closed after {self._total - self._left} of {self._total} body bytes"
        )

    def _chunked(self, conn: Conn) -> Iterator[bytes]:
        while True:
            line = self._line(conn, "chunk size")
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 16 or size_text.strip(HEX):
                raise httpx.RemoteProtocolError(f"bad chunk size line {line[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                self._trailers(conn)
                self._complete = True
                return
            while size > 0:
                if not conn.unread():
                    conn.feed(self._recv(conn))
                take = conn.take(size)
                size -= len(take)
                yield take
            if self._line(conn, "chunk end"):
                raise httpx.RemoteProtocolError("chunk data longer than its size")

    def _trailers(self, conn: Conn) -> None:
        """Read past the trailer section to the empty line that ends it: at most
        MAX_TRAILER_LINES lines and MAX_HEAD bytes (each line counted with a CRLF end),
        a ``RemoteProtocolError`` beyond."""
        left = MAX_HEAD
        for _ in range(MAX_TRAILER_LINES + 1):  # (the last one: the empty line)
            line = self._line(conn, "trailer")
            if not line:
                return
            left -= len(line) + 2
            if left < 0:
                raise httpx.RemoteProtocolError(f"trailer section over {MAX_HEAD} bytes")
        raise httpx.RemoteProtocolError(f"more than {MAX_TRAILER_LINES} trailer lines")

    def _to_close(self, conn: Conn) -> Iterator[bytes]:
        if conn.unread():
            yield conn.take(conn.unread())
        while data := conn.recv():
            yield data

    def _line(self, conn: Conn, what: str) -> bytes:
        # (ended by CRLF, or by a bare LF, which curl takes too)
        while (i := conn.rest.find(b"\n", conn.at)) < 0:
            if conn.unread() > MAX_CHUNK_LINE:
                raise httpx.RemoteProtocolError(f"{what} line too long")
            conn.feed(self._recv(conn))
        line = conn.rest[conn.at : i]
        conn.skip_to(i + 1)
        return line.removesuffix(b"\r")

    @staticmethod
    def _recv(conn: Conn) -> bytes:
        data = conn.recv()
        if not data:
            raise httpx.RemoteProtocolError("connection closed inside a chunked body")
        return data

    # -- end of the response ------------------------------------------------
    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Reuse only after a complete body with nothing read past it, unless answers
            # to pipelined requests are due (else bytes beyond the body mean a server that
            # does not frame its responses: not one to reuse).
            clean = not conn.unread() or bool(conn.queued)
            self._owner.done(conn, self._complete and self._reusable and clean)

    def close(self) -> None:
        # Closed before the end: the rest of a short body (an error page) is read and
        # dropped so the connection stays usable; a longer one is still on the wire, so
        # the connection goes.
        conn = self._conn
        unread = not self._started and self._mode == "length" and 0 < self._left <= DRAIN_MAX
        if conn is not None and unread and not self._drain(conn):
            self._complete = False
        self._finish()


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until all of ``data`` is written (or the error that stops it)."""
    n = os.write(fd, data)
    if n < len(data):
        view = memoryview(data)[n:]
        while view:
            view = view[os.write(fd, view) :]


class Stale(Exception):
    """A reused keep-alive connection turned out closed before it answered."""


def read_head(
    conn: Conn, within: float | None = None
) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
    """The next final response head on ``conn``: status, reason, headers (names
    lower-cased), version.

    Interim (1xx) heads before it are read and dropped (100 Continue, 103 Early Hints;
    101 Switching Protocols counts as final). More than :data:`MAX_INTERIM` of them, or
    over :data:`MAX_HEAD` bytes with the final head, is a ``RemoteProtocolError``,
    like any other malformed answer. Folded lines (obs-fold) are unfolded into the
    value they continue; the limit is on the bytes as sent, folds and all.

    ``within``: seconds a head may take from its first byte to its end (the read
    timeout), else ``httpx.ReadTimeout``. The read timeout bounds each read; a server
    sending a byte of its head every 29 s had held the thread for up to 64 KiB of them.
    """
    left = MAX_HEAD
    for _ in range(MAX_INTERIM + 1):
        status, reason, headers, version, size = _one_head(conn, left, within)
        if not 100 <= status < 200 or status == 101:
            return status, reason, headers, version
        left -= size
    raise httpx.RemoteProtocolError(f"more than {MAX_INTERIM} interim (1xx) responses")


def _one_head(
    conn: Conn, limit: int, within: float | None = None
) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes, int]:
    """The next head on ``conn``, 1xx or not, and its size; over ``limit`` bytes, or not
    whole ``within`` seconds of its first byte, an error."""
    buf, at = conn.rest, conn.at
    start = at
    began: float | None = None  # when its first byte was there (a head in pieces only)
    while (end := buf.find(b"\r\n\r\n", start)) < 0:
        if (lf := LF_END.search(buf, at)) is not None:
            end, after = lf.span()
            break
        if len(buf) - at > limit:
            raise _too_big(limit)
        if within is not None and len(buf) > at:
            now = time.monotonic()
            if began is None:
                began = now
            elif now - began > within:
                raise httpx.ReadTimeout(
                    f"the response head did not come whole within {within:g} s of its first byte"
                )
        start = max(0, len(buf) - at - 3)
        try:
            data = conn.recv()
        except OSError as exc:
            if conn.used and len(buf) == at and not timed_out(exc):
                raise Stale from exc
            raise read_error(exc, "waiting for the response") from exc
        if not data:
            if conn.used and len(buf) == at:
                raise Stale
            raise httpx.RemoteProtocolError(
                "server closed the connection without a complete response"
            )
        conn.feed(data)
        buf, at = conn.rest, 0
    else:
        after = end + 4
    if end - at > limit:
        raise _too_big(limit)
    size = after - at
    conn.skip_to(after)
    if after - end == 4:
        lines = buf[at:end].split(b"\r\n")
    else:
        lines = [line.removesuffix(b"\r") for line in buf[at:end].split(b"\n")]
    parts = lines[0].split(b" ", 2)
    version = parts[0]
    if (
        len(parts) < 2
        or version not in (b"HTTP/1.1", b"HTTP/1.0")
        or len(parts[1]) != 3
        or not parts[1].isdigit()
    ):
        raise httpx.RemoteProtocolError(f"bad status line {lines[0][:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            # obs-fold: the line continues the field before it. RFC 9112 section 5.2 has
            # a user agent replace each fold with SP (curl and h11 do); refused, such a
            # server's every file failed. Before any field there is nothing to continue.
            if not headers:
                raise httpx.RemoteProtocolError(f"bad header line {line[:80]!r}")
            name, value = headers[-1]
            headers[-1] = (name, (value + b" " + line.strip()).strip())
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"bad header line {line[:80]!r}")
        headers.append((name.lower(), value.strip()))
    return int(parts[1]), parts[2] if len(parts) > 2 else b"", headers, version, size


def _too_big(limit: int) -> httpx.RemoteProtocolError:
    if limit < MAX_HEAD:
        return httpx.RemoteProtocolError(f"response heads over {MAX_HEAD} bytes with the 1xx ones")
    return httpx.RemoteProtocolError(f"response head over {MAX_HEAD} bytes")


def framing(method: str, status: int, headers: list[tuple[bytes, bytes]]) -> tuple[str, int]:
    """How the body ends: ``("length", n)``, ``("chunked", 0)``, ``("close", 0)`` or ``("none", 0)``."""
    if method == "HEAD" or status in NO_BODY_STATUS:
        return "none", 0
    te = [v for k, v in headers if k == b"transfer-encoding"]
    if te:
        codings = b",".join(te).split(b",")
        if codings[-1].strip().lower() == b"chunked":
            return "chunked", 0
        return "close", 0
    lengths = {v for k, v in headers if k == b"content-length"}
    if lengths:
        values = {x.strip() for v in lengths for x in v.split(b",")}
        if len(values) != 1:
            raise httpx.RemoteProtocolError("conflicting Content-Length headers")
        value = values.pop()
        if not value.isdigit() or len(value) > 18:
            raise httpx.RemoteProtocolError(f"bad Content-Length {value[:40]!r}")
        n = int(value)
        return ("length", n) if n else ("none", 0)
    return "close", 0


def has_token(headers: list[tuple[bytes, bytes]], name: bytes, token: bytes) -> bool:
    return any(token == t.strip().lower() for k, v in headers if k == name for t in v.split(b","))
