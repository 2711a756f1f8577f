"""A lean HTTP/1.1 transport for file bodies: one keep-alive connection per thread.

httpx's default transport (httpcore) shares one connection pool between the
threads of a process: every request takes the pool lock twice, waits on a
per-request ``threading.Event`` and runs h11's general state machine, and
every socket operation sets a timeout anew.  On a mirror of small files that
is most of a download's CPU (see benchmarks/RESULTS.md).  A download thread
needs none of it: it sends one request at a time, so it owns one connection.

:class:`ThreadConnTransport` is an ``httpx.BaseTransport`` (the seam httpx is
built around), so callers keep using ``httpx.Request``/``httpx.Response`` and
httpx's exception types, which the retry policy understands.  It speaks
HTTP/1.1 to one origin at a time per thread; the parser is strict where a
hostile server could hurt (bounded head, checked framing) and nothing more:

* framing per RFC 9112 section 6.3: no body for HEAD, 1xx, 204 and 304;
  chunked when it is the final transfer coding; else ``Content-Length``
  (conflicting values are an error); else the body runs to the close;
* a response head over 64 KiB (with the interim 1xx heads before it), more
  than 8 interim answers to one request, a malformed status line or header
  line (a folded line continues the field before it, RFC 9112 section 5.2),
  a bad chunk size, a trailer section over 64 KiB or 64 lines, or a
  connection closed inside a body is a ``RemoteProtocolError``; socket
  timeouts are ``ConnectTimeout`` / ``ReadTimeout`` / ``WriteTimeout``, other
  socket failures ``ConnectError`` / ``ReadError`` / ``WriteError``, each
  raised from the original error;
* a reused keep-alive connection that the server has closed in the meantime
  is replaced once, silently, before any response byte arrived (GET and
  HEAD only: they are idempotent);
* pipelining (``pipeline=N``): a thread announces its next GETs with
  :meth:`ThreadConnTransport.expect`; once its connection has kept alive
  after an HTTP/1.1 answer, up to N-1 of them (for that connection's server)
  are written right behind the current request and their answers read in
  order when they are asked for. They go in groups, once N/4 places are free
  (or all that are left fit): on loopback one write per request was ~10 % of
  a small file's CPU here and a wake-up of the server each. Anything out of
  turn drops the connection; requests sent ahead on a connection that goes (a
  keep-alive limit, a close) are the thread's next requests again, in order;
  a server that drops pipelined requests twice gets no more of them; while
  ``hold()`` says the server asked for a pause (a 429's ``Retry-After``),
  nothing more goes ahead, and the answers already due are read as they come;
  another thread may take back the announced requests not yet sent
  (:meth:`Announced.withdraw`), as a lane held up by a slow answer gives the
  rest of its train to another lane;
* a short error page the caller does not read is drained (1 s at most), so
  it does not cost the connection;
* with the ``REUSE_BUFFER`` request extension, large bodies are read with
  ``recv_into`` into one reused buffer per connection: the chunks are
  ``memoryview`` slices valid until the next one is asked for (write them,
  hash them, then let go).

Each TCP connection holds a token of the run's connection cap (``gate``), so
``--max-connections`` holds across processes exactly as with httpcore.
"""

from __future__ import annotations

# socket.create_connection() encodes the host name with this codec on first use;
# imported here, a worker forked from the coordinator does not import it again.
import contextlib
import encodings.idna  # noqa: F401
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import httpx

from fetcher.limits import TokenGate
from fetcher.wire import (
    Body,
    Conn,
    Stale,
    framing,
    has_token,
    read_head,
    set_io_timeout,
    timed_out,
)

__all__ = [
    "MAX_DEPTH",
    "REUSE_BUFFER",
    "Announced",
    "NoToken",
    "ThreadConnTransport",
    "origin",
    "pipelined_lanes",
]

REUSE_BUFFER = "fetch.reuse_buffer"
"""Request extension: True lets a big body come as memoryviews of one reused buffer, each
valid only until the next chunk is asked for (for a caller that writes them at once)."""


MAX_DEPTH = 32
"""Most requests in flight on one connection, unless ``--pipeline`` asks for more."""


def pipelined_lanes(threads: int, pipeline: int) -> tuple[int, int]:
    """How many threads take trains of pipelined requests, and how deep each goes.

    ``threads × pipeline`` requests in flight, on as few threads (connections) as
    hold them: at most :data:`MAX_DEPTH` on one, or ``pipeline`` if more was asked
    for. Without pipelining, every thread, one request at a time. Threads of one
    process hand each other the interpreter lock around every system call: fewer
    of them, each with a longer train, do the same in less CPU (RESULTS.md).
    """
    threads = max(1, threads)
    if pipeline <= 1:
        return threads, 1
    inflight = threads * pipeline
    lanes = min(threads, -(-inflight // max(MAX_DEPTH, pipeline)))
    return lanes, -(-inflight // lanes)


class Announced:
    """A thread's requests announced to be sent ahead (:meth:`ThreadConnTransport.expect`),
    (origin, head) each, in order, minus those sent or asked for since.

    Only that thread sends them; any thread may take back the last ones not yet sent
    (:meth:`withdraw`): a lane held up by a slow answer hands the rest of its train to
    another lane, which asks for them on its own connection."""

    __slots__ = ("items", "lock")

    def __init__(self, items: Iterable[tuple[tuple[str, str, int], bytes]]) -> None:
        self.items = deque(items)
        self.lock = threading.Lock()

    def withdraw(self, most: int) -> int:
        """Take back up to ``most`` of the last requests not yet sent; how many went."""
        with self.lock:
            n = min(most, len(self.items))
            for _ in range(n):
                self.items.pop()
            return n


class NoToken(httpx.ConnectError):
    """A helper thread found no free token of the connection cap (see ``helper``)."""


class ThreadConnTransport(httpx.BaseTransport):
    """HTTP/1.1 with one keep-alive connection per calling thread; see the module docstring."""

    def __init__(
        self,
        *,
        ssl_context: Callable[[], ssl.SSLContext],
        timeout: httpx.Timeout,
        gate: TokenGate | None = None,
        keepalive: bool = True,
        pipeline: int = 1,
        trusted: bool = False,
        hold: Callable[[], bool] | None = None,
    ) -> None:
        self._ssl_factory = ssl_context  # built on the first https connection (loading CAs costs)
        self._ssl: ssl.SSLContext | None = None
        self._keepalive = keepalive
        self._depth = max(1, pipeline)
        # Requests go ahead in groups once this many places are free (or all that are
        # left fit): each write is a system call here and a wake-up of the server.
        self._batch = max(1, self._depth // 4)
        self._lost = 0  # pipelined requests a server dropped; two, and pipelining stops
        # The server answered requests sent ahead last time (``trusted``): a new connection
        # pipelines from its first request instead of after its first answer, which saves
        # a round trip. The first connection that goes with requests due ends the trust.
        self._trusted = trusted
        self._answered_ahead = 0
        # True while the server asked for a pause (429/503 Retry-After): nothing more is
        # sent ahead then; the answers already due are still read
        self._hold = hold
        self._connect_timeout = timeout.connect
        self.read_timeout = timeout.read
        self._gate = gate
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: set[Conn] = set()
        self._closed = False
        self._aborted = False  # abort(): the run is stopping, no new connection

    # -- connections ----------------------------------------------------------
    def _connect(self, key: tuple[str, str, int]) -> Conn:
        scheme, host, port = key
        if self._aborted:
            raise httpx.ConnectError("stopping")
        release = None
        if self._gate is not None:
            if getattr(self._local, "no_wait", False):
                if not self._gate.try_acquire(reclaim=self.close_one_idle):
                    raise NoToken("every connection of the cap is in use")
            elif not self._gate.acquire(reclaim=self.close_one_idle):
                raise httpx.ConnectError("stopping")
            release = self._gate.release
        try:
            try:
                sock = socket.create_connection((host, port), timeout=self._connect_timeout)
            except TimeoutError as exc:
                raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
            except OSError as exc:
                raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if scheme == "https":
                    if self._ssl is None:
                        self._ssl = self._ssl_factory()
                    sock = self._ssl.wrap_socket(sock, server_hostname=host)
                set_io_timeout(sock, self.read_timeout)
            except TimeoutError as exc:
                sock.close()
                raise httpx.ConnectTimeout(f"TLS handshake with {host}:{port} timed out") from exc
            except OSError as exc:  # ssl.SSLError is an OSError
                sock.close()
                raise httpx.ConnectError(f"TLS with {host}:{port} failed: {exc}") from exc
        except BaseException:
            if self._gate is not None:
                self._gate.release_now()
            raise
        conn = Conn(key, sock, release)
        conn.busy = True
        conn.proven = self._trusted
        with self._lock:
            self._conns.add(conn)
        return conn

    def _drop(self, conn: Conn) -> None:
        with self._lock:
            self._conns.discard(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
            if conn.queued:
                # Sent ahead on it and never to be answered there: still this thread's
                # next requests, in order. Forgotten, the next top-up sent the ones after
                # them, which then came out of turn: each connection that carried them was
                # dropped with answers due (a keep-alive limit reached mid-train did that).
                expect = self._expected()
                if expect is not None:
                    with expect.lock:
                        expect.items.extendleft((conn.key, h) for h in reversed(conn.queued))
                conn.queued.clear()
        conn.close()

    def done(self, conn: Conn, keep: bool) -> None:
        """A response is over (called by its body): keep ``conn`` for this thread, or drop it."""
        conn.busy = False
        if keep and self._keepalive and not self._closed:
            conn.used = conn.proven = True
        else:
            if conn.queued:
                self._trusted = False  # it closes with requests sent ahead unanswered
            self._drop(conn)

    def close_one_idle(self) -> bool:
        """Close one idle connection (another thread's): its token is wanted. True if one was."""
        with self._lock:
            # (answers still due on a connection belong to its thread's next requests)
            victim = next((c for c in self._conns if not c.busy and not c.queued), None)
            if victim is None:
                return False
            self._conns.discard(victim)
        victim.close()
        return True

    def helper(self) -> None:
        """The calling thread is a helper: its connecting never waits for a token of the
        cap (:class:`NoToken` instead), so a thread that waits for helpers cannot deadlock
        with them."""
        self._local.no_wait = True

    def close_mine(self) -> None:
        """Close the calling thread's connection, if it is idle (a helper that is done)."""
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.busy and not conn.queued:
            self._drop(conn)

    def close_idle(self) -> None:
        """Close every connection not carrying a response now (their tokens go back)."""
        with self._lock:
            idle = [c for c in self._conns if not c.busy and not c.queued]
            self._conns.difference_update(idle)
        for c in idle:
            c.close()

    def abort(self) -> None:
        """A run is stopping: every exchange in flight ends now. Each connection's socket is
        shut down, so a thread waiting on an answer (a listing the server is slow to send)
        gets an error at once instead of at the server's pace or the read timeout; the
        thread that owns it closes it, and no new one is made."""
        self._aborted = True  # (nor is a request sent again on a fresh one: _connect)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            c.close()

    # -- pipelining -----------------------------------------------------------
    @property
    def pipelined(self) -> bool:
        """Requests sent ahead were answered, and none was dropped: the next run's
        transport to this server may be ``trusted``."""
        return self._answered_ahead > 0 and self._lost == 0

    @property
    def pipelining(self) -> bool:
        """Requests may go ahead: asked for, and the server has not dropped any twice."""
        return self._depth > 1 and self._lost < 2

    def expect(self, requests: Sequence[httpx.Request]) -> Announced:
        """This thread's next requests, in order: they may be sent ahead (pipelined).

        Each one is sent, at most ``pipeline - 1`` ahead of the one being answered,
        on a connection that has already kept alive after an HTTP/1.1 response.
        A request made out of turn (a redirect, a retry, different headers) just
        goes on a fresh connection; the answers due on the old one are not wanted.
        """
        announced = Announced(
            (origin(r.url), self._head_bytes(r)) for r in requests if r.method == "GET"
        )
        self._local.expect = announced
        conn: Conn | None = getattr(self._local, "conn", None)
        if not requests and conn is not None and conn.queued:
            self._drop(conn)  # a train cut short: the answers still due are not wanted
        return announced

    def owes(self) -> bool:
        """This thread's connection has requests sent ahead still to be answered: the next
        of them is on the server's side already (no pause holds its answer back)."""
        conn: Conn | None = getattr(self._local, "conn", None)
        return conn is not None and bool(conn.queued)

    def _expected(self) -> Announced | None:
        """This thread's announced requests."""
        return getattr(self._local, "expect", None)

    def _top_up(self, conn: Conn) -> list[bytes]:
        expect = self._expected()
        if expect is None or not expect.items or not conn.proven or not self.pipelining:
            return []
        free = self._depth - 1 - len(conn.queued)
        if free < self._batch and free < len(expect.items):
            return []
        if self._hold is not None and self._hold():
            return []
        extra = []
        with expect.lock:  # (against a withdraw from another thread)
            items = expect.items
            # only requests for this connection's server, and in order: stop at another's
            while items and items[0][0] == conn.key and len(conn.queued) < self._depth - 1:
                head = items.popleft()[1]
                conn.queued.append(head)
                extra.append(head)
        return extra

    def _consume_expectation(self, key: tuple[str, str, int], head: bytes) -> None:
        expect = self._expected()
        if expect is None or not expect.items:
            return
        with expect.lock:
            items = expect.items
            if (key, head) in items:
                while items.popleft() != (key, head):
                    pass

    # -- one exchange ---------------------------------------------------------
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        key = origin(url)
        head = self._head_bytes(request)
        conn = self._take_own(key)
        sent = False
        if conn is not None and conn.queued:
            if conn.queued[0] == head:
                conn.queued.popleft()
                sent = True  # its answer is on the way (and it left the expected when sent)
            else:
                self._drop(conn)  # it owes answers we no longer want
                conn = None
        if not sent:
            # not one of the requests sent ahead: the ones announced before it are not wanted
            self._consume_expectation(key, head)
        for _ in range(2):
            fresh = conn is None
            if conn is None:
                conn = self._connect(key)
                self._local.conn = conn
            try:
                response = self._exchange(request, conn, head, sent)
                if sent:
                    self._answered_ahead += 1
                return response
            except Stale:
                self._trusted = False
                self._drop(conn)
                conn = None
                # Once more on a new connection: only an idempotent request, and only if
                # this one had gone ahead or had been sent on a reused connection.
                if request.method not in ("GET", "HEAD") or (fresh and not sent):
                    raise httpx.RemoteProtocolError(
                        "server closed the connection without a response"
                    ) from None
                if sent:
                    self._lost += 1  # the server dropped a pipelined request
                    sent = False
            except BaseException as exc:
                self._trusted = False
                if sent and isinstance(exc, httpx.ReadTimeout):
                    self._lost += 1  # a server that takes pipelined requests and never answers
                self._drop(conn)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _take_own(self, key: tuple[str, str, int]) -> Conn | None:
        """This thread's idle connection to ``key``, marked busy; None if there is none."""
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is None:
            return None
        with self._lock:
            # another thread may have closed it meanwhile to take its token
            if conn.key == key and conn in self._conns:
                conn.busy = True
                return conn
        self._local.conn = None
        if conn.key != key:
            self._drop(conn)
        return None

    @staticmethod
    def _head_bytes(request: httpx.Request) -> bytes:
        target = request.url.raw_path  # path and query, already percent-encoded by httpx
        lines = [request.method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def _exchange(
        self, request: httpx.Request, conn: Conn, head: bytes, sent: bool
    ) -> httpx.Response:
        sock = conn.sock
        out = [] if sent else [head]
        if not sent and request.method not in ("GET", "HEAD"):
            out.append(request.read())
        if request.method == "GET":
            out += self._top_up(conn)
        try:
            if out:
                sock.sendall(b"".join(out))
        except OSError as exc:
            if conn.used and not timed_out(exc):
                raise Stale from exc
            if timed_out(exc):
                raise httpx.WriteTimeout("timed out sending the request") from exc
            raise httpx.WriteError(f"sending the request: {exc}") from exc
        # (interim answers skipped; a head that trickles is cut off at the read timeout)
        status, reason, headers, version = read_head(conn, self.read_timeout)
        conn.used = False  # this connection has answered: no longer a stale-reuse suspect
        mode, length = framing(request.method, status, headers)
        reusable = version == b"HTTP/1.1" and not has_token(headers, b"connection", b"close")
        if not reusable:
            conn.closing = True
        return httpx.Response(
            status,
            headers=headers,
            stream=Body(
                self, conn, mode, length, reusable, bool(request.extensions.get(REUSE_BUFFER))
            ),
            request=request,
            extensions={"http_version": version, "reason_phrase": reason},
        )


def origin(url: httpx.URL) -> tuple[str, str, int]:
    """``url``'s scheme, host and port (the default one where it names none)."""
    return (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
