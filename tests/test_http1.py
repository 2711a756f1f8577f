"""ThreadConnTransport (fetcher/http1.py) against a scripted raw TCP server and real nginx.

The raw server (:class:`RawServer`) listens on 127.0.0.1 and runs one script per
accepted connection, ``script(peer, index)``: the script reads requests
(:meth:`Peer.read_request`, which records their raw bytes) and writes whatever
bytes it likes.  The server counts accepted connections, tracks how many are
open at once (a connection counts as open until the client's FIN arrives or the
script closes it) and on exit shuts every connection down and joins its threads.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fetcher.http1 import REUSE_BUFFER, ThreadConnTransport
from fetcher.limits import TokenGate
from fetcher.wire import (
    MAX_INTERIM,
    MAX_TRAILER_LINES,
    Body,
    Conn,
    framing,
    read_head,
    set_io_timeout,
    timed_out,
)
from tests.servers import free_port, serve

pytestmark = pytest.mark.timeout(30)

TIMEOUT = httpx.Timeout(0.5, connect=2)
WAIT = 3.0  # seconds: the deadline for anything a test polls for


# --- the scripted raw server ----------------------------------------------------


class Peer:
    """The server's side of one accepted connection, as a script sees it."""

    def __init__(self, server: RawServer, sock: socket.socket, index: int) -> None:
        self.sock = sock
        self.index = index
        self._server = server
        self._buf = b""
        # A non-blocking twin of the socket, to peek for the client's FIN without
        # disturbing the script (which blocks on ``sock`` with a timeout).
        self._probe = sock.dup()
        self._probe.setblocking(False)
        self.saw_eof = threading.Event()  # the script read EOF: the client closed
        self.closed = threading.Event()  # the server side is closed (script done)

    def read_request(self) -> bytes | None:
        """The next request (head and any Content-Length body), recorded; None at EOF."""
        while b"\r\n\r\n" not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                self.saw_eof.set()
                return None
            self._buf += data
        end = self._buf.index(b"\r\n\r\n") + 4
        raw, self._buf = self._buf[:end], self._buf[end:]
        m = re.search(rb"\r\ncontent-length: *(\d+)\r\n", raw, re.IGNORECASE)
        need = int(m.group(1)) if m else 0
        while len(self._buf) < need:
            data = self.sock.recv(65536)
            if not data:
                self.saw_eof.set()
                return None
            self._buf += data
        raw, self._buf = raw + self._buf[:need], self._buf[need:]
        self._server._record(self.index, raw)
        return raw

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def dribble(self, data: bytes) -> None:
        """Send one byte at a time (the client sees the bytes in many small reads)."""
        for i in range(len(data)):
            self.sock.sendall(data[i : i + 1])

    def wait_eof(self) -> None:
        """Read and discard until the client closes (or the server stops)."""
        while self.sock.recv(65536):
            pass
        self.saw_eof.set()

    def half_close(self) -> None:
        """End the response stream (FIN) but keep reading what the client sends."""
        self.sock.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """Close with a TCP reset instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._close()

    def client_gone(self) -> bool:
        """The client has closed its end (or the script has closed ours)."""
        if self.closed.is_set():
            return True
        try:
            return self._probe.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _close(self) -> None:
        with self._server._lock:
            self.closed.set()
            self.sock.close()
            self._probe.close()

    def _shutdown(self) -> None:
        try:
            self._probe.shutdown(socket.SHUT_RDWR)  # wakes a script blocked on the socket
        except OSError:
            pass


Script = Callable[[Peer, int], None]


class RawServer:
    """A listening socket on 127.0.0.1 running ``script(peer, index)`` per connection."""

    def __init__(self, script: Script, *, conn_timeout: float = 5.0) -> None:
        self._script = script
        self._conn_timeout = conn_timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.peers: list[Peer] = []
        self.requests: list[tuple[int, bytes]] = []  # (connection index, raw request)
        self.max_open = 0
        self.errors: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._listener.settimeout(0.05)  # the accept loop checks _stop this often
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def accepts(self) -> int:
        with self._lock:
            return len(self.peers)

    def peer(self, index: int) -> Peer:
        with self._lock:
            return self.peers[index]

    def requests_on(self, index: int) -> list[bytes]:
        with self._lock:
            return [raw for i, raw in self.requests if i == index]

    def _record(self, index: int, raw: bytes) -> None:
        with self._lock:
            self.requests.append((index, raw))

    def __enter__(self) -> RawServer:
        self._acceptor.start()
        return self

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(self._conn_timeout)
            with self._lock:
                peer = Peer(self, sock, len(self.peers))
                still_open = sum(1 for p in self.peers if not p.client_gone())
                self.max_open = max(self.max_open, still_open + 1)
                self.peers.append(peer)
                thread = threading.Thread(target=self._run, args=(peer,), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _run(self, peer: Peer) -> None:
        try:
            self._script(peer, peer.index)
        except ConnectionError:
            pass  # the client went away: scripts need not care
        except OSError as exc:
            if not self._stop.is_set():
                self.errors.append(f"connection {peer.index}: {exc!r}")
        except BaseException as exc:
            self.errors.append(f"connection {peer.index}: {exc!r}")
        finally:
            peer._close()

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._stop.set()
        self._acceptor.join(2)
        self._listener.close()
        with self._lock:
            peers, threads = list(self.peers), list(self._threads)
        for p in peers:
            p._shutdown()
        deadline = time.monotonic() + 2
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(t.is_alive() for t in [self._acceptor, *threads])
        if exc_type is None:
            assert not stuck, f"{stuck} raw server threads did not stop"
            assert not self.errors, "raw server script errors: " + "; ".join(self.errors)


# --- scripts and responses -------------------------------------------------------


def ok(body: bytes = b"hello", *headers: str) -> bytes:
    head = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def keep_answering(answer: bytes | Callable[[bytes], bytes]) -> Script:
    """Answer every request on the connection until the client closes it."""

    def script(peer: Peer, index: int) -> None:
        while (req := peer.read_request()) is not None:
            peer.send(answer(req) if callable(answer) else answer)

    return script


def answer_then_close(*responses: bytes, reset: bool = False) -> Script:
    """Answer one request with each response, then close (FIN, or RST if ``reset``)."""

    def script(peer: Peer, index: int) -> None:
        for response in responses:
            if peer.read_request() is None:
                return
            peer.send(response)
        if reset:
            peer.reset()

    return script


def read_then_close(peer: Peer, index: int) -> None:
    peer.read_request()


def never_answer(peer: Peer, index: int) -> None:
    if peer.read_request() is not None:
        peer.wait_eof()


def by_index(*scripts: Script) -> Script:
    """Connection i runs scripts[i]; later connections run the last one."""

    def script(peer: Peer, index: int) -> None:
        scripts[min(index, len(scripts) - 1)](peer, index)

    return script


def send_then(raw: bytes, *, close: bool, dribble: bool = False) -> Script:
    """Answer the first request with ``raw``; then close, or hold the connection open."""

    def script(peer: Peer, index: int) -> None:
        if peer.read_request() is None:
            return
        (peer.dribble if dribble else peer.send)(raw)
        if not close:
            peer.wait_eof()

    return script


# --- client side ----------------------------------------------------------------


def new_transport(**kwargs: Any) -> ThreadConnTransport:
    kwargs.setdefault("timeout", TIMEOUT)
    return ThreadConnTransport(ssl_context=ssl.create_default_context, **kwargs)


@pytest.fixture
def transport() -> Iterator[ThreadConnTransport]:
    t = new_transport()
    try:
        yield t
    finally:
        t.close()


def fetch(
    t: ThreadConnTransport, url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[httpx.Response, bytes]:
    """One exchange through the transport; the body copied chunk by chunk."""
    resp = t.handle_request(httpx.Request(method, url, headers=headers))
    try:
        body = b"".join(bytes(chunk) for chunk in resp.iter_raw())
    finally:
        resp.close()
    return resp, body


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def run_threads(target: Callable[[int], None], n: int) -> list[str]:
    """Run ``target(i)`` in n threads; the errors they raised."""
    errors: list[str] = []

    def wrap(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:
            errors.append(f"thread {i}: {exc!r}")

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert not any(th.is_alive() for th in threads), "client threads did not finish"
    return errors


# --- 1. keep-alive and the request bytes -------------------------------------------


def test_keepalive_two_gets_share_one_connection(transport: ThreadConnTransport) -> None:
    def answer(req: bytes) -> bytes:
        target = req.split(b" ", 2)[1]
        return ok(target, "X-Spaced:   padded value  ", "Server: raw")

    with RawServer(keep_answering(answer)) as srv:
        headers = {"User-Agent": "fetch-test/1.0", "Range": "bytes=0-", "X-Custom": "a b"}
        r1, b1 = fetch(transport, f"{srv.url}/dir%20x/f.txt?a=1&b=%2F", headers=headers)
        r2, b2 = fetch(transport, f"{srv.url}/second")
        assert srv.accepts == 1
        reqs = srv.requests_on(0)

    assert (r1.status_code, b1, r2.status_code, b2) == (
        200,
        b"/dir%20x/f.txt?a=1&b=%2F",
        200,
        b"/second",
    )
    assert r1.headers["x-spaced"] == "padded value"
    assert r1.headers["content-length"] == str(len(b1))
    assert r1.http_version == "HTTP/1.1"
    assert r1.reason_phrase == "OK"
    assert len(reqs) == 2
    lines = reqs[0].split(b"\r\n")
    assert lines[0] == b"GET /dir%20x/f.txt?a=1&b=%2F HTTP/1.1"
    assert reqs[0].endswith(b"\r\n\r\n")
    assert f"Host: 127.0.0.1:{srv.port}".encode() in lines
    for name, value in headers.items():
        assert f"{name}: {value}".encode() in lines
    assert reqs[1].startswith(b"GET /second HTTP/1.1\r\n")


def test_each_thread_has_its_own_connection(transport: ThreadConnTransport) -> None:
    with RawServer(keep_answering(ok())) as srv:

        def work(i: int) -> None:
            for _ in range(3):
                assert fetch(transport, f"{srv.url}/t{i}")[1] == b"hello"

        assert run_threads(work, 3) == []
        assert srv.accepts == 3
        for i in range(3):
            assert len(srv.requests_on(i)) == 3


def test_switching_origin_closes_the_old_connection(transport: ThreadConnTransport) -> None:
    with RawServer(keep_answering(ok(b"A"))) as a, RawServer(keep_answering(ok(b"B"))) as b:
        assert fetch(transport, f"{a.url}/1")[1] == b"A"
        assert fetch(transport, f"{b.url}/1")[1] == b"B"
        assert a.peer(0).saw_eof.wait(WAIT), "the connection to A stayed open"
        assert fetch(transport, f"{a.url}/2")[1] == b"A"
        assert (a.accepts, b.accepts) == (2, 1)


# --- 2. responses that end the connection -------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        ok(b"hi", "Connection: close"),
        ok(b"hi", "Connection: keep-alive, Close"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi",
    ],
    ids=["connection-close", "close-token-in-list", "http-1.0"],
)
def test_response_that_ends_the_connection_is_not_reused(
    transport: ThreadConnTransport, response: bytes
) -> None:
    with RawServer(keep_answering(response)) as srv:
        r, body = fetch(transport, f"{srv.url}/1")
        assert body == b"hi"
        assert srv.peer(0).saw_eof.wait(WAIT), "the client kept the connection open"
        assert fetch(transport, f"{srv.url}/2")[1] == b"hi"
        assert srv.accepts == 2
    assert r.http_version == response[:8].decode()


def test_keepalive_false_closes_after_each_response() -> None:
    t = new_transport(keepalive=False)
    try:
        with RawServer(keep_answering(ok())) as srv:
            for i in range(3):
                assert fetch(t, f"{srv.url}/{i}")[1] == b"hello"
            assert srv.accepts == 3
    finally:
        t.close()


# --- 3. stale keep-alive connections -------------------------------------------------


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_stale_keepalive_connection_is_replaced_silently(
    transport: ThreadConnTransport, reset: bool
) -> None:
    go = threading.Event()

    def first(peer: Peer, index: int) -> None:
        peer.read_request()
        peer.send(ok(b"one"))
        go.wait(WAIT)  # the client has read the response: the connection is idle
        if reset:
            peer.reset()

    with RawServer(by_index(first, keep_answering(ok(b"two")))) as srv:
        assert fetch(transport, f"{srv.url}/1")[1] == b"one"
        go.set()
        assert srv.peer(0).closed.wait(WAIT)  # the server closed the idle connection
        r, body = fetch(transport, f"{srv.url}/2")
        assert (r.status_code, body) == (200, b"two")
        assert srv.accepts == 2
        assert srv.requests_on(1)[0].startswith(b"GET /2 HTTP/1.1\r\n")


def test_fresh_connection_closed_without_response_raises(transport: ThreadConnTransport) -> None:
    with RawServer(read_then_close) as srv:
        with pytest.raises(httpx.RemoteProtocolError):
            fetch(transport, f"{srv.url}/x")
        assert srv.accepts == 1  # no retry on a fresh connection


def test_stale_retry_happens_only_once(transport: ThreadConnTransport) -> None:
    with RawServer(by_index(answer_then_close(ok()), read_then_close)) as srv:
        assert fetch(transport, f"{srv.url}/1")[1] == b"hello"
        assert srv.peer(0).closed.wait(WAIT)
        with pytest.raises(httpx.RemoteProtocolError):
            fetch(transport, f"{srv.url}/2")
        assert srv.accepts == 2


def test_reused_connection_closed_inside_a_response_is_not_retried(
    transport: ThreadConnTransport,
) -> None:
    def script(peer: Peer, index: int) -> None:
        peer.read_request()
        peer.send(ok())
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")  # then close: a response byte had come

    with RawServer(script) as srv:
        assert fetch(transport, f"{srv.url}/1")[1] == b"hello"
        with pytest.raises(httpx.RemoteProtocolError):
            fetch(transport, f"{srv.url}/2")
        assert srv.accepts == 1


def test_reused_connection_that_stalls_times_out_without_retry(
    transport: ThreadConnTransport,
) -> None:
    def script(peer: Peer, index: int) -> None:
        peer.read_request()
        peer.send(ok())
        never_answer(peer, index)

    with RawServer(script) as srv:
        assert fetch(transport, f"{srv.url}/1")[1] == b"hello"
        with pytest.raises(httpx.ReadTimeout):
            fetch(transport, f"{srv.url}/2")
        assert srv.accepts == 1


# --- 4. framing ---------------------------------------------------------------------

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value\r\nhello\r\n"
    b"1A\r\nabcdefghijklmnopqrstuvwxyz\r\n"
    b"0003 ; ext\r\n!!!\r\n"
    b"0\r\nX-Trailer: yes\r\nX-Other: 1\r\n\r\n"
)


@pytest.mark.parametrize("dribble", [False, True], ids=["whole", "byte-by-byte"])
def test_chunked_body_is_reassembled(transport: ThreadConnTransport, dribble: bool) -> None:
    def script(peer: Peer, index: int) -> None:
        peer.read_request()
        (peer.dribble if dribble else peer.send)(CHUNKED)
        keep_answering(ok(b"next"))(peer, index)

    with RawServer(script) as srv:
        r, body = fetch(transport, f"{srv.url}/chunked")
        assert body == b"hello" + b"abcdefghijklmnopqrstuvwxyz" + b"!!!"
        assert r.headers["transfer-encoding"] == "chunked"
        assert fetch(transport, f"{srv.url}/next")[1] == b"next"
        assert srv.accepts == 1  # the trailer was consumed: the connection was reusable


def _trailers(*lines: bytes) -> bytes:
    """A chunked answer whose last chunk has ``lines`` as its trailer section."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
    return head + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


TRAILERS_AT_THE_CAP = [b"X-T-%02d: %s" % (i, b"t" * 990) for i in range(MAX_TRAILER_LINES)]
TRAILERS_PAST_THE_CAP: dict[str, bytes] = {
    "one-line-too-many": _trailers(*(b"X-T: %d" % i for i in range(MAX_TRAILER_LINES + 1))),
    "over-64k": _trailers(*(b"X-T-%02d: %s" % (i, b"t" * 4000) for i in range(20))),
}


def test_trailers_up_to_the_cap_are_read(transport: ThreadConnTransport) -> None:
    raw = _trailers(*TRAILERS_AT_THE_CAP)  # as many lines as allowed, 1000 bytes each
    with RawServer(send_then(raw, close=False)) as srv:
        assert fetch(transport, f"{srv.url}/x")[1] == b"hello"


@pytest.mark.parametrize(
    "raw", list(TRAILERS_PAST_THE_CAP.values()), ids=list(TRAILERS_PAST_THE_CAP)
)
def test_trailers_past_the_cap_raise_protocol_error(
    transport: ThreadConnTransport, raw: bytes
) -> None:
    # The trailer lines were read until the empty line, however many came: the section
    # has the head's 64 KiB and at most MAX_TRAILER_LINES lines.
    with RawServer(by_index(send_then(raw, close=False), keep_answering(ok()))) as srv:
        with pytest.raises(httpx.RemoteProtocolError, match="trailer"):
            fetch(transport, f"{srv.url}/bad")
        assert fetch(transport, f"{srv.url}/good")[1] == b"hello"  # on a new connection
        assert srv.accepts == 2


def test_endless_trailers_fail_at_once(transport: ThreadConnTransport) -> None:
    # Each trailer line restarts the read timeout: sent without end, they held the
    # thread until the server stopped.
    left: list[bool] = []  # the client went away before the script's deadline

    def script(peer: Peer, index: int) -> None:
        if peer.read_request() is None:
            return
        peer.send(_trailers()[:-2])  # the last chunk, and no end to its trailers
        deadline = time.monotonic() + WAIT
        try:
            while not peer.client_gone() and time.monotonic() < deadline:
                peer.send(b"X-Trailer: more\r\n" * 16)
        except ConnectionError:
            pass
        left.append(time.monotonic() < deadline)

    with RawServer(script) as srv:
        start = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError, match="trailer"):
            fetch(transport, f"{srv.url}/x")
        assert time.monotonic() - start < WAIT / 2
        assert srv.peer(0).closed.wait(WAIT)
        assert left == [True], "the client kept reading trailer lines"


def test_transfer_encoding_wins_over_content_length(transport: ThreadConnTransport) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\nabcdef\r\n0\r\n\r\n"
    )
    with RawServer(send_then(raw, close=False)) as srv:
        assert fetch(transport, f"{srv.url}/x")[1] == b"abcdef"


@pytest.mark.parametrize("size", [10, 600_000], ids=["small", "larger-than-a-read"])
def test_close_delimited_body_is_read_to_eof(transport: ThreadConnTransport, size: int) -> None:
    data = random_bytes(size, seed=size)
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + data

    def script(peer: Peer, index: int) -> None:
        peer.read_request()
        peer.send(raw)
        peer.half_close()  # the body ends here; a request sent after it would be recorded
        while peer.read_request() is not None:
            pass

    with RawServer(script) as srv:
        r, body = fetch(transport, f"{srv.url}/1")
        assert body == data
        assert "content-length" not in r.headers
        assert srv.peer(0).saw_eof.wait(WAIT), "the client kept the connection"
        assert fetch(transport, f"{srv.url}/2")[1] == data
        assert srv.accepts == 2
        assert [len(srv.requests_on(i)) for i in range(2)] == [1, 1]


@pytest.mark.parametrize(
    ("method", "response", "status"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", 200),
        ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 200),
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", 204),
        ("GET", b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\nETag: "x"\r\n\r\n', 304),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 200),
    ],
    ids=["head", "head-chunked", "204", "304", "length-0"],
)
def test_responses_without_body_keep_the_connection(
    transport: ThreadConnTransport, method: str, response: bytes, status: int
) -> None:
    def script(peer: Peer, index: int) -> None:
        peer.read_request()
        peer.send(response)
        keep_answering(ok(b"after"))(peer, index)

    with RawServer(script) as srv:
        r, body = fetch(transport, f"{srv.url}/1", method)
        assert (r.status_code, body) == (status, b"")
        # had the client waited for a body, this would time out or read "after" as one
        r2, body2 = fetch(transport, f"{srv.url}/2")
        assert (r2.status_code, body2) == (200, b"after")
        assert srv.accepts == 1
        assert srv.requests_on(0)[0].startswith(f"{method} /1 HTTP/1.1\r\n".encode())


@pytest.mark.parametrize("dribble", [False, True], ids=["whole", "byte-by-byte"])
def test_interim_responses_are_skipped(transport: ThreadConnTransport, dribble: bool) -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        + ok(b"final", "X-Final: 1")
    )

    def script(peer: Peer, index: int) -> None:
        peer.read_request()
        (peer.dribble if dribble else peer.send)(raw)
        keep_answering(ok(b"next"))(peer, index)

    with RawServer(script) as srv:
        r, body = fetch(transport, f"{srv.url}/1")
        assert (r.status_code, body) == (200, b"final")
        assert r.headers.get("x-final") == "1"
        assert "link" not in r.headers
        assert fetch(transport, f"{srv.url}/2")[1] == b"next"
        assert srv.accepts == 1


@pytest.mark.parametrize("extra", [0, 1], ids=["at-the-cap", "one-past-the-cap"])
def test_interim_responses_are_capped(transport: ThreadConnTransport, extra: int) -> None:
    # Interim answers were skipped without a count: a server could hold the thread
    # with them for ever. Up to MAX_INTERIM go; one more fails the attempt.
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    raw = interim * (MAX_INTERIM + extra) + ok(b"final")
    with RawServer(by_index(send_then(raw, close=False), keep_answering(ok()))) as srv:
        if extra:
            with pytest.raises(httpx.RemoteProtocolError, match="interim"):
                fetch(transport, f"{srv.url}/1")
            assert fetch(transport, f"{srv.url}/2")[1] == b"hello"  # on a new connection
            assert srv.accepts == 2
        else:
            assert fetch(transport, f"{srv.url}/1")[1] == b"final"


def test_endless_interim_responses_fail_at_once(transport: ThreadConnTransport) -> None:
    # Each interim head restarts the read timeout (as a trickle does): sent without end,
    # they held the thread until the server stopped, then it timed out.
    left: list[bool] = []  # the client went away before the script's deadline

    def script(peer: Peer, index: int) -> None:
        if peer.read_request() is None:
            return
        deadline = time.monotonic() + WAIT
        try:
            while not peer.client_gone() and time.monotonic() < deadline:
                peer.send(b"HTTP/1.1 102 Processing\r\n\r\n")
        except ConnectionError:
            pass
        left.append(time.monotonic() < deadline)

    with RawServer(script) as srv:
        start = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError, match="interim"):
            fetch(transport, f"{srv.url}/x")
        assert time.monotonic() - start < WAIT / 2
        assert srv.peer(0).closed.wait(WAIT)
        assert left == [True], "the client kept reading interim answers"


def test_a_head_that_trickles_is_cut_off_at_the_read_timeout(
    transport: ThreadConnTransport,
) -> None:
    # A byte of the head every 0.2 s, each well inside the 0.5 s read timeout: the head of
    # ~40 bytes would take 8 s, and one of 64 KiB (the head limit) took hours. Once it has
    # begun, a head must be whole within the read timeout.
    head = ok(b"hello")
    sent: list[int] = []

    def script(peer: Peer, index: int) -> None:
        if peer.read_request() is None:
            return
        deadline = time.monotonic() + 4 * WAIT
        try:
            for i in range(len(head)):
                if peer.client_gone() or time.monotonic() > deadline:
                    break
                peer.send(head[i : i + 1])
                sent.append(i)
                time.sleep(0.2)  # (the server's pace, not a wait for the client)
        except ConnectionError:
            pass

    with RawServer(script) as srv:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout, match=r"head did not come whole within 0\.5 s"):
            fetch(transport, f"{srv.url}/x")
        took = time.monotonic() - start
        assert took < 1.5, took  # the read timeout after the first byte, and one read more
        assert 2 <= len(sent) < len(head) // 2


def test_interim_heads_count_against_the_head_limit(transport: ThreadConnTransport) -> None:
    # Each head under 64 KiB, together over it: the interim heads share the limit with
    # the final one, so what a server may send before its answer stays bounded.
    links = [f"Link: </{i}-{'l' * 1000}.css>; rel=preload" for i in range(25)]  # ~25 KiB
    interim = _head("HTTP/1.1 103 Early Hints", *links)
    raw = interim * 3 + ok(b"final")
    with RawServer(by_index(send_then(raw, close=False), keep_answering(ok()))) as srv:
        with pytest.raises(httpx.RemoteProtocolError, match="head"):
            fetch(transport, f"{srv.url}/1")
        assert fetch(transport, f"{srv.url}/2")[1] == b"hello"
        assert srv.accepts == 2


@pytest.mark.parametrize("dribble", [False, True], ids=["whole", "byte-by-byte"])
def test_lines_ended_by_a_bare_lf_are_read(transport: ThreadConnTransport, dribble: bool) -> None:
    # RFC 9112 section 2.2: a recipient may take a bare LF for CRLF, and curl and httpx
    # do. Waiting for a CRLF CRLF that never came, every request timed out.
    raws = [
        b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\nContent-Length: 5\nX-A: 1\n\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\nX-A: 2\r\n\nnext",  # mixed
        b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\nX-A: 3\n\n5;x=1\nchunk\n0\nX-T: 1\n\n",
    ]

    def script(peer: Peer, index: int) -> None:
        for raw in raws:
            if peer.read_request() is None:
                return
            (peer.dribble if dribble else peer.send)(raw)
        keep_answering(ok(b"crlf"))(peer, index)

    with RawServer(script) as srv:
        got = [fetch(transport, f"{srv.url}/{i}") for i in range(4)]
        assert [(r.status_code, r.headers.get("x-a"), body) for r, body in got] == [
            (200, "1", b"hello"),
            (200, "2", b"next"),
            (200, "3", b"chunk"),
            (200, None, b"crlf"),
        ]
        assert srv.accepts == 1


@pytest.mark.parametrize("dribble", [False, True], ids=["whole", "byte-by-byte"])
def test_folded_header_lines_are_unfolded(transport: ThreadConnTransport, dribble: bool) -> None:
    # RFC 9112 section 5.2: a user agent that receives an obs-fold (a line starting with
    # SP or HTAB) MUST replace it with SP before interpreting the value; curl and h11 do.
    # Each of these answers was a RemoteProtocolError, and every retry failed alike.
    raws = [
        b'HTTP/1.1 200 OK\r\nContent-Length:\r\n 5\r\nETag:\r\n\t"v1"\r\n'
        b"X-A: a \r\n  continued\r\n\tand again\r\n\r\nhello",
        b"HTTP/1.1 200 OK\nX-A: a\n X-B: b\nContent-Length: 4\n\nnext",  # bare LFs
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>;\r\n rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\n chunked\r\nX-A: 3\r\n\r\n"
        b"5\r\nchunk\r\n0\r\n\r\n",
    ]

    def script(peer: Peer, index: int) -> None:
        for raw in raws:
            if peer.read_request() is None:
                return
            (peer.dribble if dribble else peer.send)(raw)
        keep_answering(ok(b"plain"))(peer, index)

    with RawServer(script) as srv:
        got = [fetch(transport, f"{srv.url}/{i}") for i in range(4)]
        first = got[0][0].headers
        assert (first["content-length"], first["etag"]) == ("5", '"v1"')
        assert first["x-a"] == "a continued and again"
        assert got[1][0].headers["x-a"] == "a X-B: b" and "x-b" not in got[1][0].headers
        assert got[2][0].headers["transfer-encoding"] == "chunked"
        assert [(r.status_code, body) for r, body in got] == [
            (200, b"hello"),
            (200, b"next"),
            (200, b"chunk"),
            (200, b"plain"),
        ]
        assert srv.accepts == 1  # every body was framed right: the connection went on


def test_a_large_head_under_the_limit_is_accepted(transport: ThreadConnTransport) -> None:
    pads = [f"X-Pad-{i}: {'p' * 1000}" for i in range(60)]  # about 60 KiB
    with RawServer(send_then(ok(b"big head", *pads), close=False)) as srv:
        r, body = fetch(transport, f"{srv.url}/x")
        assert body == b"big head"
        assert r.headers["x-pad-59"] == "p" * 1000


# --- 5. hostile responses ------------------------------------------------------------

_PAD = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))  # 70 KiB of head


def _head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


HOSTILE: dict[str, bytes] = {
    "conflicting-content-length": _head("HTTP/1.1 200 OK", "Content-Length: 5", "Content-Length: 6")
    + b"hello!",
    "conflicting-content-length-list": _head("HTTP/1.1 200 OK", "Content-Length: 5, 6") + b"hello!",
    "content-length-abc": _head("HTTP/1.1 200 OK", "Content-Length: abc") + b"hello",
    "content-length-negative": _head("HTTP/1.1 200 OK", "Content-Length: -5") + b"hello",
    "content-length-plus": _head("HTTP/1.1 200 OK", "Content-Length: +5") + b"hello",
    "content-length-empty": _head("HTTP/1.1 200 OK", "Content-Length:") + b"hello",
    "status-not-a-number": _head("HTTP/1.1 abc OK", "Content-Length: 0"),
    "status-bad-protocol": _head("FOO 200 OK", "Content-Length: 0"),
    "status-two-digits": _head("HTTP/1.1 20 OK", "Content-Length: 0"),
    "status-four-digits": _head("HTTP/1.1 2000 OK", "Content-Length: 0"),
    "status-http2": _head("HTTP/2.0 200 OK", "Content-Length: 0"),
    "status-missing": _head("HTTP/1.1", "Content-Length: 0"),
    "header-without-colon": _head("HTTP/1.1 200 OK", "X-Fine: 1", "NoColonHere"),
    "header-empty-name": _head("HTTP/1.1 200 OK", ": value", "Content-Length: 0"),
    "header-space-before-colon": _head("HTTP/1.1 200 OK", "Content-Length : 5") + b"hello",
    "obs-fold-before-any-field": _head("HTTP/1.1 200 OK", " X-A: a", "Content-Length: 0"),
    "obs-fold-tab-before-any-field": _head("HTTP/1.1 200 OK", "\tX-A: a", "Content-Length: 0"),
    "obs-fold-splits-content-length": _head("HTTP/1.1 200 OK", "Content-Length: 5", " 6")
    + b"hello!",
    "head-over-64k-no-blank-line": b"HTTP/1.1 200 OK\r\n" + _PAD,
    "head-over-64k-then-blank-line": b"HTTP/1.1 200 OK\r\n" + _PAD + b"Content-Length: 0\r\n\r\n",
    "head-over-64k-in-folded-lines": b"HTTP/1.1 200 OK\r\nX-Pad: a\r\n"
    + b"".join(b" %s\r\n" % (b"a" * 1000) for _ in range(70))
    + b"Content-Length: 0\r\n\r\n",
    "chunk-size-not-hex": _head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked") + b"zz\r\n",
    "chunk-size-empty": _head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked") + b"\r\nhello",
    "chunk-size-only-extension": _head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")
    + b";ext=1\r\nhello\r\n",
    "chunk-size-negative": _head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked") + b"-5\r\n",
    "chunk-size-17-digits": _head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")
    + b"00000000000000005\r\nhello\r\n0\r\n\r\n",
    "chunk-size-line-too-long": _head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")
    + b"5;"
    + b"x" * 5000,
    "chunk-longer-than-size": _head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")
    + b"5\r\nhelloEXTRA\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_response_raises_protocol_error(transport: ThreadConnTransport, raw: bytes) -> None:
    # The server holds the connection open after the bad bytes: a client that waits
    # for more would end in a ReadTimeout, which is not what this test expects.
    with RawServer(by_index(send_then(raw, close=False), keep_answering(ok()))) as srv:
        with pytest.raises(httpx.RemoteProtocolError):
            fetch(transport, f"{srv.url}/bad")
        # the broken connection is gone; the next request works on a new one
        assert fetch(transport, f"{srv.url}/good")[1] == b"hello"
        assert srv.accepts == 2


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (_head("HTTP/1.1 200 OK", "Content-Length: 1000") + b"x" * 500, "500 of 1000"),
        (
            _head("HTTP/1.1 200 OK", "Content-Length: 2097152") + b"x" * 1048576,
            "1048576 of 2097152",
        ),
        (
            _head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked") + b"a\r\nhello",
            "inside a chunked body",
        ),
        (
            _head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked") + b"5\r\nhello\r\n",
            "inside a chunked body",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "without a complete response"),
    ],
    ids=["length-small", "length-large", "in-chunk", "before-last-chunk", "in-head"],
)
def test_connection_closed_early_raises_protocol_error(
    transport: ThreadConnTransport, raw: bytes, match: str
) -> None:
    with (
        RawServer(send_then(raw, close=True)) as srv,
        pytest.raises(httpx.RemoteProtocolError, match=match),
    ):
        fetch(transport, f"{srv.url}/cut")


@pytest.mark.parametrize(
    "size_line", [b"0x5", b"+5", b"0_5"], ids=["0x-prefix", "plus-sign", "underscore"]
)
def test_chunk_size_must_be_plain_hex(transport: ThreadConnTransport, size_line: bytes) -> None:
    raw = (
        _head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked")
        + size_line
        + b"\r\nhello\r\n0\r\n\r\n"
    )
    with (
        RawServer(send_then(raw, close=False)) as srv,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        fetch(transport, f"{srv.url}/x")


# --- 6. timeouts and connect errors ----------------------------------------------------


def test_read_timeout_when_the_server_never_answers(transport: ThreadConnTransport) -> None:
    with RawServer(never_answer) as srv:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            fetch(transport, f"{srv.url}/slow")
        elapsed = time.monotonic() - start
        assert 0.4 <= elapsed < 2.0, elapsed
        assert srv.peer(0).saw_eof.wait(WAIT), "the timed-out connection was kept open"
        assert srv.accepts == 1


def test_read_timeout_inside_a_body(transport: ThreadConnTransport) -> None:
    raw = _head("HTTP/1.1 200 OK", "Content-Length: 10") + b"12345"
    with RawServer(send_then(raw, close=False)) as srv:
        resp = transport.handle_request(httpx.Request("GET", f"{srv.url}/x"))
        try:
            with pytest.raises(httpx.ReadTimeout):
                for _ in resp.iter_raw():
                    pass
        finally:
            resp.close()
        assert srv.peer(0).saw_eof.wait(WAIT)


def test_connect_to_a_closed_port_raises_connect_error() -> None:
    sem = threading.BoundedSemaphore(1)
    t = new_transport(gate=TokenGate(sem))
    try:
        with pytest.raises(httpx.ConnectError):
            fetch(t, f"http://127.0.0.1:{free_port()}/x")
        assert sem.acquire(blocking=False), "the failed connect kept its token"
        sem.release()
    finally:
        t.close()


# --- 7. a large body (recv_into a reused buffer) -----------------------------------------


def test_large_body_is_byte_identical(transport: ThreadConnTransport) -> None:
    data = random_bytes(3 << 20, seed=3)

    def script(peer: Peer, index: int) -> None:
        peer.read_request()
        peer.send(_head("HTTP/1.1 200 OK", f"Content-Length: {len(data)}") + data)
        keep_answering(ok(b"small"))(peer, index)

    with RawServer(script) as srv:
        big = httpx.Request("GET", f"{srv.url}/big", extensions={REUSE_BUFFER: True})
        resp = transport.handle_request(big)
        digest = hashlib.sha256()
        views = size = 0
        try:
            for chunk in resp.iter_raw():
                views += isinstance(chunk, memoryview)
                size += len(chunk)
                digest.update(bytes(chunk))
        finally:
            resp.close()
        assert size == len(data)
        assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
        assert views > 0, "the body did not go through the recv_into buffer"
        assert fetch(transport, f"{srv.url}/small")[1] == b"small"
        assert srv.accepts == 1


def test_client_get_of_a_large_body_is_intact(transport: ThreadConnTransport) -> None:
    data = random_bytes(3 << 20, seed=4)
    raw = _head("HTTP/1.1 200 OK", f"Content-Length: {len(data)}") + data
    with RawServer(send_then(raw, close=False)) as srv:
        with httpx.Client(transport=transport) as client:
            body = client.get(f"{srv.url}/big").content
        assert len(body) == len(data)
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()


# --- 8. the connection cap ----------------------------------------------------------------


def test_connection_cap_holds_and_tokens_come_back() -> None:
    sem = threading.BoundedSemaphore(2)
    t = new_transport(gate=TokenGate(sem), timeout=httpx.Timeout(5, connect=2))
    done: list[int] = []
    try:
        with RawServer(keep_answering(ok())) as srv:

            def work(i: int) -> None:
                for k in range(5):
                    assert fetch(t, f"{srv.url}/{i}/{k}")[1] == b"hello"
                    done.append(i)

            assert run_threads(work, 6) == []
            assert len(done) == 30
            assert len(srv.requests) == 30
            assert 1 <= srv.max_open <= 2, srv.max_open
            assert srv.accepts >= 2

            # every connection is idle now: close_idle gives both tokens back (50 ms later)
            t.close_idle()
            assert sem.acquire(timeout=WAIT)
            assert sem.acquire(timeout=WAIT)
            sem.release()
            sem.release()

            # a new connection takes a token again; close() gives it back
            assert fetch(t, f"{srv.url}/again")[1] == b"hello"
            t.close()
            assert sem.acquire(timeout=WAIT)
            assert sem.acquire(timeout=WAIT)
            sem.release()
            sem.release()
            assert srv.peer(srv.accepts - 1).saw_eof.wait(WAIT)
    finally:
        t.close()


@pytest.mark.parametrize(
    "answer",
    [
        ok(b"bye", "Connection: close"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nbye",
        b"HTTP/1.0 200 OK\r\n\r\nbye",  # to the close
    ],
    ids=["connection-close", "http-1.0", "http-1.0-to-the-close"],
)
def test_a_connection_the_server_closes_gives_its_token_back_at_once(answer: bytes) -> None:
    # A server that closes every connection (HTTP/1.0, keep-alive off, its keep-alive
    # limit) no longer counts it once its FIN is here: the token goes back then. Given
    # back 50 ms later as for a close of ours, each file had cost its thread 50 ms.
    sem = threading.BoundedSemaphore(1)
    t = new_transport(gate=TokenGate(sem), timeout=httpx.Timeout(5, connect=2))
    try:
        with RawServer(send_then(answer, close=True)) as srv:
            started = time.monotonic()
            for i in range(20):
                assert fetch(t, f"{srv.url}/{i}")[1] == b"bye"
            took = time.monotonic() - started
            assert srv.accepts == 20
            assert srv.max_open == 1, srv.max_open
        assert took < 0.5, took  # 20 x 50 ms waited for tokens before
    finally:
        t.close()


def test_a_connection_closed_by_the_client_gives_its_token_back_a_moment_later() -> None:
    # The server sees our close a moment after we make it: the cap holds as it counts.
    sem = threading.BoundedSemaphore(1)
    t = new_transport(gate=TokenGate(sem), keepalive=False, timeout=httpx.Timeout(5, connect=2))
    try:
        with RawServer(keep_answering(ok())) as srv:
            started = time.monotonic()
            for i in range(5):
                assert fetch(t, f"{srv.url}/{i}")[1] == b"hello"
            took = time.monotonic() - started
            assert srv.accepts == 5
        assert took >= 4 * 0.05, took
    finally:
        t.close()


class RecordingSemaphore:
    """A semaphore for a TokenGate that records what each wait on it came to.

    A wait lasts up to WAIT, however short a slice the gate asks for: a loaded machine
    cannot end one before the test hands its token over, so a wait that came to False
    is one that the hand-over did not end.
    """

    def __init__(self) -> None:
        self._sem = threading.Semaphore(0)
        self.waited = threading.Event()  # a thread has begun to wait on it
        self.results: list[bool] = []

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        self.waited.set()
        got = self._sem.acquire(blocking, WAIT if blocking else None)
        self.results.append(got)
        return got

    def release(self) -> None:
        self._sem.release()


def _acquire_in_threads(
    gate: TokenGate, n: int, **kwargs: Any
) -> tuple[list[threading.Thread], list[bool]]:
    """n threads that each wait for a token of ``gate``; what each acquire returned."""
    got: list[bool] = []
    threads = [
        threading.Thread(target=lambda: got.append(gate.acquire(**kwargs)), daemon=True)
        for _ in range(n)
    ]
    for th in threads:
        th.start()
    return threads, got


def _join(threads: list[threading.Thread]) -> None:
    for th in threads:
        th.join(2 * WAIT)
    assert not any(th.is_alive() for th in threads), "a thread still waits for a token"


def test_a_token_handed_to_the_waiting_thread_wakes_it_at_once() -> None:
    # A closing connection hands its token to the thread of this process that waits
    # for one. Handed over beside the semaphore that thread waited on, it came only
    # once that wait ran out: up to 50 ms of each hand-over.
    sem = RecordingSemaphore()
    gate = TokenGate(sem)
    threads, got = _acquire_in_threads(gate, 1)
    assert sem.waited.wait(WAIT)
    gate.release_now()
    _join(threads)
    assert got == [True]
    assert sem.results == [True], "the token came only once a wait on the semaphore ran out"


def test_tokens_handed_to_two_waiting_threads_wake_each_at_once() -> None:
    # One thread waits on the semaphore, the other for a token handed over.
    sem = RecordingSemaphore()
    gate = TokenGate(sem)
    threads, got = _acquire_in_threads(gate, 2)
    assert sem.waited.wait(WAIT)
    gate.release_now()
    gate.release_now()
    _join(threads)
    assert got == [True, True]
    assert False not in sem.results, "a token came only once a wait on the semaphore ran out"


def test_stop_ends_every_wait_for_a_token_and_reclaim_runs_while_waiting() -> None:
    sem = threading.Semaphore(0)
    stop = threading.Event()
    gate = TokenGate(sem, stop)
    reclaimed: list[threading.Event] = [threading.Event() for _ in range(3)]
    got: list[bool] = []

    def wait(i: int) -> None:
        def reclaim() -> bool:
            reclaimed[i].set()
            return False

        got.append(gate.acquire(reclaim))

    threads = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(3)]
    for th in threads:
        th.start()
    # every thread waits (one on the semaphore, two beside it) and asks to reclaim
    assert all(ev.wait(WAIT) for ev in reclaimed)
    stop.set()
    _join(threads)
    assert got == [False, False, False]
    assert not sem.acquire(blocking=False), "a stopped wait made a token"
    gate.release_now()  # nobody waits: back to the semaphore
    assert sem.acquire(blocking=False)


def test_a_token_reclaim_frees_goes_to_the_thread_that_waits() -> None:
    sem = threading.Semaphore(0)
    gate = TokenGate(sem)
    calls: list[int] = []

    def reclaim() -> bool:
        # an idle connection of ours, closed by the server already: its token back at once
        calls.append(1)
        if len(calls) == 1:
            gate.release_now()
            return True
        return False

    threads, got = _acquire_in_threads(gate, 1, reclaim=reclaim)
    _join(threads)
    assert got == [True]
    assert calls == [1]
    assert not sem.acquire(blocking=False), "the token was handed over twice"


@pytest.mark.parametrize(
    "make_sem",
    [threading.Semaphore, multiprocessing.get_context("spawn").Semaphore],
    ids=["threading", "multiprocessing"],
)
def test_no_token_is_lost_or_made_by_many_takes_and_hand_overs(
    make_sem: Callable[[int], Any],
) -> None:
    # Tokens are connection slots shared by processes: one lost shrinks the cap for
    # good, one made twice breaks it. A plain semaphore counts either.
    cap = 3
    sem = make_sem(cap)
    stop = threading.Event()
    gate = TokenGate(sem, stop)
    lock = threading.Lock()
    held = [0, 0]  # now, most at once

    def work(i: int) -> None:
        for k in range(300 if i else 150):
            if k % 5 == 0:
                if not gate.try_acquire():
                    continue
            elif not gate.acquire():
                return  # stopping
            with lock:
                held[0] += 1
                held[1] = max(held)
            with lock:
                held[0] -= 1
            if k % 40 == 0:
                gate.release()  # a moment later, from a timer
            else:
                gate.release_now()
        stop.set()  # the first thread done stops the others amid their hand-overs

    assert run_threads(work, 8) == []
    assert held[1] <= cap, f"{held[1]} tokens held at once under a cap of {cap}"
    for _ in range(cap):
        assert sem.acquire(True, WAIT), "a token was lost"
    assert not sem.acquire(False), "a token was made twice"


# --- 9. close_idle ----------------------------------------------------------------------------


def test_close_idle_closes_the_connection_and_the_next_request_reconnects(
    transport: ThreadConnTransport,
) -> None:
    with RawServer(keep_answering(ok())) as srv:
        assert fetch(transport, f"{srv.url}/1")[1] == b"hello"
        assert not srv.peer(0).saw_eof.is_set()
        transport.close_idle()
        assert srv.peer(0).saw_eof.wait(WAIT), "close_idle left the connection open"
        assert fetch(transport, f"{srv.url}/2")[1] == b"hello"
        assert srv.accepts == 2
        assert srv.requests_on(1)[0].startswith(b"GET /2 HTTP/1.1\r\n")


def test_close_idle_spares_a_connection_carrying_a_response(
    transport: ThreadConnTransport,
) -> None:
    data = random_bytes(100_000, seed=5)
    with RawServer(keep_answering(ok(data))) as srv:
        resp = transport.handle_request(httpx.Request("GET", f"{srv.url}/1"))
        try:
            transport.close_idle()  # the head is read, the body is not: the connection is busy
            body = b"".join(bytes(c) for c in resp.iter_raw())
        finally:
            resp.close()
        assert body == data
        assert fetch(transport, f"{srv.url}/2")[1] == data
        assert srv.accepts == 1


# --- real nginx --------------------------------------------------------------------------------


class CountingSemaphore:
    """A semaphore for a TokenGate that counts the tokens taken: one per connection."""

    def __init__(self, value: int) -> None:
        self._sem = threading.BoundedSemaphore(value)
        self._lock = threading.Lock()
        self.taken = 0

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        got = self._sem.acquire(blocking, timeout)
        if got:
            with self._lock:
                self.taken += 1
        return got

    def release(self) -> None:
        self._sem.release()


def _nginx_tree(root: Path) -> dict[str, bytes]:
    files = {
        "empty.txt": b"",
        "one.txt": b"1",
        "small.txt": b"small file\n" * 10,
        "page.bin": random_bytes(4096, seed=10),
        "mid.bin": random_bytes(300_000, seed=11),
        "big.bin": random_bytes(1_500_000, seed=12),
    }
    files.update({f"many/file-{i:03d}-with-a-longish-name.txt": b"x%d" % i for i in range(150)})
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


@pytest.mark.real_server
def test_nginx_sequential_gets_reuse_one_connection(tmp_path: Path) -> None:
    root = tmp_path / "root"
    files = _nginx_tree(root)
    top = [name for name in files if "/" not in name]
    sem = CountingSemaphore(4)
    t = new_transport(gate=TokenGate(sem), timeout=httpx.Timeout(5, connect=2))
    try:
        with serve("nginx", root, tmp_path / "nginx") as srv:
            base = srv.url.rstrip("/")
            for _ in range(2):
                for name in top:
                    r, body = fetch(t, f"{base}/{name}", headers={"Accept-Encoding": "identity"})
                    assert r.status_code == 200, name
                    assert body == files[name], name
                r, listing = fetch(t, f"{base}/many/")
                assert r.status_code == 200
                assert r.headers.get("transfer-encoding") == "chunked"
                assert listing.startswith(b"<html>")
                assert listing.rstrip().endswith(b"</html>")
                for i in range(150):
                    assert b'href="file-%03d-with-a-longish-name.txt"' % i in listing
            assert sem.taken == 1, "the thread opened more than one connection"
            logged = srv.requests(min_count=2 * (len(top) + 1))
            assert [q.status for q in logged] == [200] * (2 * (len(top) + 1))
    finally:
        t.close()


@pytest.mark.real_server
def test_nginx_404_then_200_and_conditional_requests_on_one_connection(tmp_path: Path) -> None:
    root = tmp_path / "root"
    data = random_bytes(50_000, seed=20)
    root.mkdir()
    (root / "file.bin").write_bytes(data)
    sem = CountingSemaphore(4)
    t = new_transport(gate=TokenGate(sem), timeout=httpx.Timeout(5, connect=2))
    try:
        with serve("nginx", root, tmp_path / "nginx") as srv:
            url = srv.url + "file.bin"
            r, body = fetch(t, srv.url + "missing.bin")
            assert r.status_code == 404
            assert b"404 Not Found" in body
            assert len(body) == int(r.headers["content-length"])
            r, body = fetch(t, url)
            assert (r.status_code, body) == (200, data)
            etag = r.headers["etag"]
            r, body = fetch(t, url, "HEAD")
            assert (r.status_code, body) == (200, b"")
            assert r.headers["content-length"] == str(len(data))
            r, body = fetch(t, url, headers={"If-None-Match": etag})
            assert (r.status_code, body) == (304, b"")
            r, body = fetch(t, url, headers={"Range": "bytes=10-19"})
            assert (r.status_code, body) == (206, data[10:20])
            r, body = fetch(t, url)
            assert (r.status_code, body) == (200, data)
            assert sem.taken == 1, "a response left the connection unusable"
            logged = srv.requests(min_count=6)
            assert [(q.method, q.status) for q in logged] == [
                ("GET", 404),
                ("GET", 200),
                ("HEAD", 200),
                ("GET", 304),
                ("GET", 206),
                ("GET", 200),
            ]
    finally:
        t.close()


def test_plain_sockets_keep_time_in_the_kernel_both_ways() -> None:
    """Blocking, with SO_RCVTIMEO / SO_SNDTIMEO: a read or write that runs out of time
    fails with EAGAIN, which counts as a timeout; None waits for ever."""
    a, b = socket.socketpair()
    with a, b:
        set_io_timeout(a, 0.2)
        assert a.gettimeout() is None  # blocking: no poll(2) before each call
        t0 = time.monotonic()
        with pytest.raises(OSError) as read:
            a.recv(10)
        assert timed_out(read.value) and 0.15 <= time.monotonic() - t0 < 2.0
        with pytest.raises(OSError) as write:  # b never reads: the buffers fill up
            a.sendall(b"x" * (64 << 20))
        assert timed_out(write.value)
        set_io_timeout(a, None)
        raw = a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
        assert raw == bytes(len(raw)), "None must clear the timeout"


class _Owner:
    read_timeout = None

    def __init__(self) -> None:
        self.done_with: list[bool] = []

    def done(self, conn: Conn, keep: bool) -> None:
        self.done_with.append(keep)


def test_answers_read_together_are_taken_without_copying_what_follows() -> None:
    """Answers that arrive in one read (pipelined small files) are taken by moving a
    cursor over that read: what follows each one is not copied (it was, twice an
    answer). A head cut in two by the reads still parses, and every body is intact."""
    bodies = [bytes([65 + i]) * (1000 + 7 * i) for i in range(5)]
    wire = b"".join(
        b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nETag: "%d"\r\n\r\n%s' % (len(x), i, x)
        for i, x in enumerate(bodies)
    )
    cut = wire.index(b"Content-Length", len(wire) - len(bodies[-1]) - 60)
    a, b = socket.socketpair()
    with a, b:
        b.sendall(wire[:cut])  # four answers and the start of the fifth's head
        conn = Conn(("http", "127.0.0.1", 80), a, None)
        owner = _Owner()
        read: bytes | None = None
        got = []
        for i in range(4):
            status, _, headers, _ = read_head(conn)
            if read is None:
                read = conn.rest
            assert conn.rest is read, f"answer {i}: the read was copied"
            mode, length = framing("GET", status, headers)
            got.append(b"".join(Body(owner, conn, mode, length, True)))
            assert (b"etag", b'"%d"' % i) in headers
        fourth_end = wire.index(bodies[3]) + len(bodies[3])
        assert conn.rest is read and conn.unread() == cut - fourth_end
        b.sendall(wire[cut:])
        status, _, headers, _ = read_head(conn)
        mode, length = framing("GET", status, headers)
        got.append(b"".join(Body(owner, conn, mode, length, True)))
        assert got == bodies
        assert conn.unread() == 0 and conn.rest == b""
        assert owner.done_with == [False, False, False, False, True]  # reused once drained
