"""HTTP/1.1 pipelining: ThreadConnTransport(pipeline=N).expect() and ``fetch --pipeline N``.

Transport tests run the scripted raw server of tests/test_http1.py, which sees the
request bytes as they arrive: a script can hold back an answer until more requests
are buffered behind it (:func:`wait_buffered`), so "sent ahead, before the answer"
is checked without timing guesses.  Each answered request is logged as
``(connection, target, requests already buffered behind it)``.

End-to-end tests mirror ~200 small files with the CLI from the fault server and from
real nginx (behind :class:`Relay`, a TCP relay that counts open connections and
client writes carrying more than one request).
"""

from __future__ import annotations

import gzip
import hashlib
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from fetcher.config import Transfer
from fetcher.download import RESUME_MIN
from fetcher.http1 import MAX_DEPTH, ThreadConnTransport
from fetcher.limits import TokenGate
from fetcher.models import Action, Job, RelPath, RemoteFile, Status
from fetcher.runner import ShardRunner
from tests.faultserver import FaultServer, serving
from tests.servers import serve
from tests.test_http1 import (
    WAIT,
    Peer,
    RawServer,
    Script,
    fetch,
    new_transport,
    ok,
    run_threads,
)

pytestmark = pytest.mark.timeout(60)

SHORT = 0.3  # seconds a held answer waits for requests that must NOT come
Log = list[tuple[int, str, int]]  # (connection index, target, requests buffered behind it)


# --- server side helpers ------------------------------------------------------------


def target_of(raw: bytes) -> str:
    return raw.split(b" ", 2)[1].decode()


def buffered(peer: Peer) -> int:
    """Complete requests the server has received but not read yet (bodiless GETs)."""
    return peer._buf.count(b"\r\n\r\n")


def wait_buffered(peer: Peer, n: int, timeout: float) -> int:
    """Read until ``n`` requests are buffered behind the current one, or ``timeout``."""
    deadline = time.monotonic() + timeout
    old = peer.sock.gettimeout()
    try:
        while buffered(peer) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            peer.sock.settimeout(left)
            try:
                data = peer.sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            peer._buf += data
    finally:
        peer.sock.settimeout(old)
    return buffered(peer)


Hold = dict[str, tuple[int, float]]  # target -> (requests to wait for behind it, seconds)


def echo(
    log: Log, hold: Hold | None = None, *, close_after_burst: bool = False, reset: bool = False
) -> Script:
    """Answer each request with its own target (body and X-For), holding some answers.

    ``close_after_burst``: a request with others buffered behind it gets its answer
    (keep-alive, no ``Connection: close``) and then the server closes, FIN (reading
    and dropping what the client still sends) or RST (``reset``): the requests
    behind it are never answered.
    """
    hold = hold or {}

    def script(peer: Peer, index: int) -> None:
        while (req := peer.read_request()) is not None:
            target = target_of(req)
            want, window = hold.get(target, (0, 0.0))
            ahead = wait_buffered(peer, want, window) if want else buffered(peer)
            log.append((index, target, ahead))
            peer.send(ok(target.encode(), f"X-For: {target}"))
            if close_after_burst and ahead:
                if reset:
                    peer.reset()
                    return
                peer.half_close()
                peer.wait_eof()
                return

    return script


def get(url: str) -> httpx.Request:
    return httpx.Request("GET", url)


def fetch_all(t: ThreadConnTransport, base: str, paths: list[str]) -> list[bytes]:
    out = []
    for p in paths:
        r, body = fetch(t, base + p)
        assert r.status_code == 200, p
        assert r.headers["x-for"] == p
        out.append(body)
    return out


def on(srv: RawServer, index: int) -> list[str]:
    return [target_of(raw) for raw in srv.requests_on(index)]


@pytest.fixture
def make_transport() -> Iterator[Callable[..., ThreadConnTransport]]:
    made: list[ThreadConnTransport] = []

    def make(**kwargs: object) -> ThreadConnTransport:
        t = new_transport(**kwargs)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


# --- 1. requests go ahead on a proven connection -------------------------------------


@pytest.mark.parametrize("depth", [4, 2, 1])
def test_expected_requests_go_ahead_on_one_connection(
    make_transport: Callable[..., ThreadConnTransport], depth: int
) -> None:
    log: Log = []
    sent_ahead = min(3, depth - 1)
    # /a's answer waits until 3 requests are buffered behind it (for as long as they
    # may take to come when they should; SHORT when fewer are due).
    window = WAIT if sent_ahead == 3 else SHORT
    t = make_transport(pipeline=depth)
    with RawServer(echo(log, {"/a": (3, window)})) as srv:
        assert fetch_all(t, srv.url, ["/warm"]) == [b"/warm"]
        train = ["/b", "/c", "/d", "/e"]
        t.expect([get(srv.url + p) for p in train])
        assert fetch_all(t, srv.url, ["/a", *train]) == [b"/a", b"/b", b"/c", b"/d", b"/e"]
        assert srv.accepts == 1
        assert on(srv, 0) == ["/warm", "/a", "/b", "/c", "/d", "/e"]
        assert len(srv.requests) == 6
    ahead = {target: n for _, target, n in log}
    assert ahead["/warm"] == 0
    assert ahead["/a"] == sent_ahead, log  # /b, /c, /d came before /a was answered
    assert all(n <= depth - 1 for n in ahead.values()), log  # never more than N-1 ahead
    if depth == 1:
        assert all(n == 0 for n in ahead.values()), log


def test_fresh_connection_sends_its_first_request_alone(
    make_transport: Callable[..., ThreadConnTransport],
) -> None:
    log: Log = []
    t = make_transport(pipeline=4)
    with RawServer(echo(log, {"/a": (3, SHORT), "/b": (3, WAIT)})) as srv:
        t.expect([get(srv.url + p) for p in ["/b", "/c", "/d", "/e"]])
        assert fetch_all(t, srv.url, ["/a", "/b", "/c", "/d", "/e"]) == [
            b"/a",
            b"/b",
            b"/c",
            b"/d",
            b"/e",
        ]
        assert srv.accepts == 1
        assert on(srv, 0) == ["/a", "/b", "/c", "/d", "/e"]
    ahead = {target: n for _, target, n in log}
    assert ahead["/a"] == 0, log  # not yet proven: nothing went with it
    assert ahead["/b"] == 3, log  # proven after /a: /c, /d, /e went behind /b


def test_nothing_goes_ahead_while_held_but_the_answers_due_are_read(
    make_transport: Callable[..., ThreadConnTransport],
) -> None:
    # ``hold`` is the run's pause (a 429's Retry-After): no request is sent ahead while
    # it holds; those already sent are answered and read, and nothing is lost or repeated.
    log: Log = []
    held = threading.Event()
    t = make_transport(pipeline=4, hold=held.is_set)
    with RawServer(echo(log, {"/a": (3, WAIT), "/b": (2, SHORT)})) as srv:
        fetch_all(t, srv.url, ["/warm"])
        train = ["/b", "/c", "/d", "/e", "/f"]
        t.expect([get(srv.url + p) for p in train])
        assert fetch_all(t, srv.url, ["/a"]) == [b"/a"]  # /b, /c, /d went behind it
        held.set()
        assert t.owes()
        assert fetch_all(t, srv.url, ["/b", "/c", "/d"]) == [b"/b", b"/c", b"/d"]
        assert not t.owes()
        held.clear()
        assert fetch_all(t, srv.url, ["/e", "/f"]) == [b"/e", b"/f"]
        assert srv.accepts == 1
        assert on(srv, 0) == ["/warm", "/a", *train]
    ahead = {target: n for _, target, n in log}
    assert ahead["/a"] == 3, log
    # held: nothing went behind /b, /c or /d; then /f went behind /e
    assert (ahead["/b"], ahead["/c"], ahead["/d"], ahead["/e"]) == (2, 1, 0, 1), log


def test_each_thread_pipelines_its_own_train_on_its_own_connection(
    make_transport: Callable[..., ThreadConnTransport],
) -> None:
    log: Log = []
    hold: Hold = {f"/t{i}/a": (3, WAIT) for i in range(3)}
    t = make_transport(pipeline=4)
    with RawServer(echo(log, hold)) as srv:

        def work(i: int) -> None:
            fetch_all(t, srv.url, [f"/t{i}/warm"])
            train = [f"/t{i}/{x}" for x in "bcd"]
            t.expect([get(srv.url + p) for p in train])
            got = fetch_all(t, srv.url, [f"/t{i}/a", *train])
            assert got == [p.encode() for p in [f"/t{i}/a", *train]]
            t.expect([])

        assert run_threads(work, 3) == []
        assert srv.accepts == 3
        per_thread = sorted(on(srv, k) for k in range(3))
        assert per_thread == [
            [f"/t{i}/{x}" for x in ["warm", "a", "b", "c", "d"]] for i in range(3)
        ]
    assert sorted(n for _, target, n in log if target.endswith("/a")) == [3, 3, 3], log


# --- 2. requests out of turn, trains cut short ----------------------------------------


def test_request_out_of_turn_drops_the_connection_and_goes_fresh(
    make_transport: Callable[..., ThreadConnTransport],
) -> None:
    log: Log = []
    t = make_transport(pipeline=4)
    with RawServer(echo(log, {"/a": (2, WAIT)})) as srv:
        fetch_all(t, srv.url, ["/warm"])
        t.expect([get(srv.url + "/b"), get(srv.url + "/c")])
        assert fetch_all(t, srv.url, ["/a"]) == [b"/a"]
        assert fetch_all(t, srv.url, ["/x"]) == [b"/x"]  # not /b: out of turn
        assert srv.peer(0).closed.wait(WAIT), "the connection owing /b and /c stayed open"
        assert fetch_all(t, srv.url, ["/b", "/c"]) == [b"/b", b"/c"]
        assert srv.accepts == 2
        assert on(srv, 0) == ["/warm", "/a", "/b", "/c"]
        # sent anew: /x alone on a new connection, then /b with /c ahead of its answer
        # (still this thread's next requests)
        assert on(srv, 1) == ["/x", "/b", "/c"]
    assert (0, "/a", 2) in log
    assert [n for i, _, n in log if i == 1] == [0, 1, 0], log


def test_expect_nothing_drops_a_connection_owing_answers_and_frees_its_token(
    make_transport: Callable[..., ThreadConnTransport],
) -> None:
    log: Log = []
    sem = threading.BoundedSemaphore(1)
    t = make_transport(pipeline=4, gate=TokenGate(sem))
    with RawServer(echo(log, {"/a": (3, WAIT)})) as srv:
        fetch_all(t, srv.url, ["/warm"])
        t.expect([get(srv.url + p) for p in ["/b", "/c", "/d"]])
        assert fetch_all(t, srv.url, ["/a", "/b"]) == [b"/a", b"/b"]
        assert not sem.acquire(blocking=False), "the connection should hold the only token"
        t.expect([])  # the train ends early: /c and /d are not wanted
        assert srv.peer(0).closed.wait(WAIT), "the connection owing /c and /d stayed open"
        assert sem.acquire(timeout=WAIT), "the dropped connection kept its token"
        sem.release()
        # /c and /d asked for after all: a new connection, each sent on its own
        assert fetch_all(t, srv.url, ["/c", "/d"]) == [b"/c", b"/d"]
        assert srv.accepts == 2
        assert on(srv, 1) == ["/c", "/d"]
    assert (0, "/a", 3) in log


def test_expect_nothing_keeps_a_connection_owing_nothing(
    make_transport: Callable[..., ThreadConnTransport],
) -> None:
    log: Log = []
    t = make_transport(pipeline=4)
    with RawServer(echo(log, {"/a": (2, WAIT)})) as srv:
        fetch_all(t, srv.url, ["/warm"])
        t.expect([get(srv.url + "/b"), get(srv.url + "/c")])
        fetch_all(t, srv.url, ["/a", "/b", "/c"])
        t.expect([])  # the train is complete: nothing owed, the connection stays
        fetch_all(t, srv.url, ["/after"])
        assert srv.accepts == 1
        assert on(srv, 0) == ["/warm", "/a", "/b", "/c", "/after"]


# --- 3. a server that drops pipelined requests ------------------------------------------


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_server_closing_after_the_first_answer_of_a_burst(
    make_transport: Callable[..., ThreadConnTransport], reset: bool
) -> None:
    log: Log = []
    # /a2 and /a3 wait a moment for requests that must not come: pipelining is off by then
    hold = {"/a1": (1, WAIT), "/c1": (1, WAIT), "/a2": (1, SHORT), "/a3": (3, SHORT)}
    t = make_transport(pipeline=4)
    with RawServer(echo(log, hold, close_after_burst=True, reset=reset)) as srv:
        fetch_all(t, srv.url, ["/warm"])
        for k in (1, 2, 3):
            train = [f"/b{k}", f"/c{k}", f"/d{k}"]
            t.expect([get(srv.url + p) for p in train])
            got = fetch_all(t, srv.url, [f"/a{k}", *train])
            assert got == [p.encode() for p in [f"/a{k}", *train]]
            t.expect([])
        # connection 0: /a1 went with /b1.. behind it, was answered, then the close.
        # /b1 (lost) went again alone on connection 1, a new one; /c1 and /d1, still
        # expected, went as a train there: /c1 answered, then the close, /d1 lost again.
        # Two lost: from /d1 on, on connection 2, every request goes on its own.
        assert srv.accepts == 3
        # what each server side read as requests (the rest of a burst was never read)
        assert on(srv, 0) == ["/warm", "/a1"]
        assert on(srv, 1) == ["/b1", "/c1"]
        assert on(srv, 2) == ["/d1", "/a2", "/b2", "/c2", "/d2", "/a3", "/b3", "/c3", "/d3"]
    answered = [(i, target) for i, target, _ in log]
    assert answered == [
        (0, "/warm"),
        (0, "/a1"),
        (1, "/b1"),
        (1, "/c1"),
        (2, "/d1"),
        (2, "/a2"),
        (2, "/b2"),
        (2, "/c2"),
        (2, "/d2"),
        (2, "/a3"),
        (2, "/b3"),
        (2, "/c3"),
        (2, "/d3"),
    ]
    ahead = {target: n for _, target, n in log}
    assert ahead["/a1"] >= 1 and ahead["/c1"] >= 1, log
    assert [n for i, _, n in log if i == 2] == [0] * 9, log


# --- 4. close_idle and close_one_idle spare a connection with answers due ----------------


def test_close_idle_spares_a_connection_with_answers_due(
    make_transport: Callable[..., ThreadConnTransport],
) -> None:
    log: Log = []
    t = make_transport(pipeline=4)
    with RawServer(echo(log, {"/a": (2, WAIT)})) as srv:
        fetch_all(t, srv.url, ["/warm"])
        t.expect([get(srv.url + "/b"), get(srv.url + "/c")])
        fetch_all(t, srv.url, ["/a"])
        # idle between two requests of the train, but /b and /c are on their way
        t.close_idle()
        assert t.close_one_idle() is False
        assert fetch_all(t, srv.url, ["/b"]) == [b"/b"]
        t.close_idle()
        assert fetch_all(t, srv.url, ["/c"]) == [b"/c"]
        assert srv.accepts == 1, "a connection with answers due was closed"
        assert not srv.peer(0).saw_eof.is_set()
        # the train is complete: now the connection is idle like any other
        t.close_idle()
        assert srv.peer(0).saw_eof.wait(WAIT), "close_idle left the connection open"
        fetch_all(t, srv.url, ["/d"])
        assert t.close_one_idle() is True
        assert srv.peer(1).saw_eof.wait(WAIT)
        assert srv.accepts == 2
    assert (0, "/a", 2) in log


# --- 5. response framing inside a pipeline ------------------------------------------------


def _head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


FRAMED = {
    "/len": _head("HTTP/1.1 200 OK", "X-For: /len", "Content-Length: 11") + b"length body",
    "/chunked": _head("HTTP/1.1 200 OK", "X-For: /chunked", "Transfer-Encoding: chunked")
    + b"4\r\nchun\r\n3;ext=1\r\nked\r\n0\r\nX-Trailer: t\r\n\r\n",
    "/nocontent": _head("HTTP/1.1 204 No Content", "X-For: /nocontent"),
    # a 304 carries the representation's length: no body follows all the same
    "/notmod": _head(
        "HTTP/1.1 304 Not Modified", "X-For: /notmod", 'ETag: "e"', "Content-Length: 1234"
    ),
    "/empty": _head("HTTP/1.1 200 OK", "X-For: /empty", "Content-Length: 0"),
    "/missing": _head("HTTP/1.1 404 Not Found", "X-For: /missing", "Content-Length: 600")
    + b"<p>no such file</p>".ljust(600, b"."),
    "/last": _head("HTTP/1.1 200 OK", "X-For: /last", "Content-Length: 7") + b"the end",
}


@pytest.mark.parametrize("delivery", ["one-write", "dribbled"])
def test_framing_inside_a_pipelined_burst(
    make_transport: Callable[..., ThreadConnTransport], delivery: str
) -> None:
    paths = list(FRAMED)
    behind = len(paths) - 1
    log: Log = []

    def script(peer: Peer, index: int) -> None:
        req = peer.read_request()
        if req is None:
            return
        peer.send(ok(b"warm"))
        first = peer.read_request()
        if first is None:
            return
        log.append((index, target_of(first), wait_buffered(peer, behind, WAIT)))
        reqs = [first]
        for _ in range(behind):
            req = peer.read_request()
            if req is None:
                return
            reqs.append(req)
        answers = b"".join(FRAMED[target_of(r)] for r in reqs)
        (peer.send if delivery == "one-write" else peer.dribble)(answers)
        while (req := peer.read_request()) is not None:
            peer.send(ok(b"still good"))

    t = make_transport(pipeline=len(paths))
    with RawServer(script) as srv:
        assert fetch(t, srv.url + "/warm")[1] == b"warm"
        t.expect([get(srv.url + p) for p in paths[1:]])
        seen = {}
        for p in paths:
            resp = t.handle_request(get(srv.url + p))
            try:
                if p == "/missing":  # an error page the caller does not read
                    body = None
                else:
                    body = b"".join(bytes(c) for c in resp.iter_raw())
            finally:
                resp.close()
            seen[p] = (resp.status_code, resp.headers["x-for"], body)
        assert fetch(t, srv.url + "/after")[1] == b"still good"
        assert srv.accepts == 1, "a response in the burst cost the connection"
        assert on(srv, 0) == ["/warm", *paths, "/after"]
    assert log == [(0, "/len", behind)]
    assert seen == {
        "/len": (200, "/len", b"length body"),
        "/chunked": (200, "/chunked", b"chunked"),
        "/nocontent": (204, "/nocontent", b""),
        "/notmod": (304, "/notmod", b""),
        "/empty": (200, "/empty", b""),
        "/missing": (404, "/missing", None),
        "/last": (200, "/last", b"the end"),
    }


# --- 6. end to end: the CLI --------------------------------------------------------------------


class Relay:
    """A TCP relay on 127.0.0.1 to ``upstream``: counts connections open at once and the
    client writes that carry more than one complete request (pipelined ones)."""

    def __init__(self, upstream: int) -> None:
        self._upstream = upstream
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.open = self.max_open = self.accepted = self.bursts = 0
        self.errors: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> Relay:
        self._acceptor.start()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._stop.set()
        self._acceptor.join(2)
        self._listener.close()
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 2
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        for s in socks:
            s.close()
        stuck = sum(th.is_alive() for th in [self._acceptor, *threads])
        if exc_type is None:
            assert not stuck, f"{stuck} relay threads did not stop"
            assert not self.errors, self.errors

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self._upstream), timeout=5)
            except OSError as exc:
                self.errors.append(f"upstream: {exc!r}")
                client.close()
                continue
            client.settimeout(None)
            up.settimeout(None)
            with self._lock:
                self.accepted += 1
                self.open += 1
                self.max_open = max(self.max_open, self.open)
                self._socks += [client, up]
                pumps = [
                    threading.Thread(target=self._pump, args=(client, up, True), daemon=True),
                    threading.Thread(target=self._pump, args=(up, client, False), daemon=True),
                ]
                self._threads += pumps
            for th in pumps:
                th.start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and data.count(b"\r\n\r\n") > 1:
                    with self._lock:
                        self.bursts += 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if from_client:
                with self._lock:
                    self.open -= 1
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def _small_tree(root: Path) -> dict[str, bytes]:
    """~200 small files in four directories, an empty one, and one too big to pipeline."""
    rng = random.Random(42)
    files = {
        f"d{d}/f{i:03d}.bin": rng.randbytes(rng.randrange(1, 3000))
        for d in range(4)
        for i in range(50)
    }
    files["top.txt"] = b"top\n"
    files["empty.bin"] = b""
    files["d2/big.bin"] = rng.randbytes(RESUME_MIN + 4321)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _check_mirror(dest: Path, files: dict[str, bytes]) -> None:
    got = {
        p.relative_to(dest).as_posix()
        for p in dest.rglob("*")
        if p.is_file() and ".fetcher" not in p.relative_to(dest).parts
    }
    assert got == set(files)
    bad = [rel for rel, data in files.items() if (dest / rel).read_bytes() != data]
    assert not bad, f"{len(bad)} files differ, e.g. {bad[:3]}"


def _cli(url: str, dest: Path, pipeline: int) -> list[str | Path]:
    return [
        "--mirror",
        url,
        "--dest",
        dest,
        "--max-connections",
        "4",
        "--procs",
        "1",
        "--pipeline",
        str(pipeline),
        "-q",
    ]


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("pipeline") / "www"
    return root, _small_tree(root)


@pytest.mark.parametrize("pipeline", [4, 1])
def test_cli_mirrors_from_the_fault_server(
    tmp_path: Path, run_fetch, small_tree: tuple[Path, dict[str, bytes]], pipeline: int
) -> None:
    root, files = small_tree
    dest = tmp_path / "dest"
    with serving(root) as srv:
        r = run_fetch(*_cli(srv.url, dest, pipeline))
        requests = srv.requests
        max_open = srv.max_concurrent_connections
        accepted = srv.connections
    assert r.code == 0, r
    _check_mirror(dest, files)
    per_file = Counter(q.path for q in requests if not q.path.endswith("/"))
    assert per_file == Counter({"/" + rel: 1 for rel in files}), "a file was requested twice"
    assert all(q.method == "GET" and q.status == 200 for q in requests if q.path in per_file)
    assert max_open <= 4, max_open
    # keep-alive: a few connections carried everything
    assert accepted <= 12, accepted
    busiest = Counter(q.connection for q in requests).most_common(1)[0][1]
    assert busiest >= 20, busiest


@pytest.mark.real_server
@pytest.mark.parametrize("pipeline", [4, 1])
def test_cli_mirrors_from_nginx(
    tmp_path: Path, run_fetch, small_tree: tuple[Path, dict[str, bytes]], pipeline: int
) -> None:
    root, files = small_tree
    dest = tmp_path / "dest"
    with serve("nginx", root, tmp_path / "nginx") as srv, Relay(srv.port) as relay:
        r = run_fetch(*_cli(relay.url, dest, pipeline))
        logged = srv.requests(min_count=len(files) + 5)
    assert r.code == 0, r
    _check_mirror(dest, files)
    per_file = Counter(q.path for q in logged if not q.path.endswith("/"))
    assert per_file == Counter({"/" + rel: 1 for rel in files}), "a file was requested twice"
    assert all(q.method == "GET" and q.status == 200 for q in logged if q.path in per_file)
    assert relay.max_open <= 4, relay.max_open
    assert relay.accepted <= 12, relay.accepted
    if pipeline == 1:
        assert relay.bursts == 0, "requests went ahead with --pipeline 1"
    else:
        assert relay.bursts > 0, "no request was ever sent ahead with --pipeline 4"


class _CountingSocket:
    """A connection's socket that counts the writes made on it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.writes = 0

    def sendall(self, data: bytes) -> None:
        self.writes += 1
        self._sock.sendall(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


@pytest.mark.real_server
@pytest.mark.parametrize("depth", [16, 4])
def test_requests_go_ahead_to_nginx_in_groups(tmp_path: Path, depth: int) -> None:
    # 16 deep, requests are written 4 at a time (once 4 places are free): ~1 write per 4
    # files, where one per file had cost a system call here and a wake-up of nginx each
    root = tmp_path / "root"
    root.mkdir()
    names = [f"f{i:03d}.bin" for i in range(101)]
    for i, name in enumerate(names):
        (root / name).write_bytes(random.Random(i).randbytes(100 + i))
    t = new_transport(pipeline=depth)
    try:
        with serve("nginx", root, tmp_path / "nginx") as srv:
            warm, *train = [srv.url + name for name in names]
            r, _ = fetch(t, warm)
            assert r.status_code == 200
            conn = t._local.conn
            counting = conn.sock = _CountingSocket(conn.sock)
            t.expect([get(u) for u in train[1:]])
            for i, url in enumerate(train, start=1):
                r, body = fetch(t, url)
                assert r.status_code == 200
                assert body == random.Random(i).randbytes(100 + i), url
            logged = srv.requests(min_count=len(names))
        assert t._local.conn is conn, "the train did not stay on one connection"
    finally:
        t.close()
    assert [q.path for q in logged] == ["/" + name for name in names]
    # the first write carries the first request and depth - 1 behind it; then one write
    # per depth // 4 answers read (16 deep: 22 writes, not 85; 4 deep: one per request)
    batch = depth // 4
    assert counting.writes == 1 + -(-(len(train) - depth) // batch), counting.writes


# --- 7. a process's small files, gathered on few connections -------------------------------


def _echo_jobs(url: str, n: int) -> list[Job]:
    """Files ``/s000`` ..: the echo scripts answer each with its own target."""
    paths = [f"s{i:03d}" for i in range(n)]
    return [Job(RemoteFile(f"{url}/{p}", RelPath(p), len(p) + 1, True), Action.NEW) for p in paths]


def test_a_process_sends_its_small_files_on_one_connection_32_deep(tmp_path: Path) -> None:
    log: Log = []
    # four lanes of --pipeline 8 (the defaults): 32 in flight, all on one connection; /s001's
    # answer waits until 31 requests are buffered behind it (as long as they may take to come)
    assert MAX_DEPTH == 4 * 8
    with RawServer(echo(log, {"/s001": (MAX_DEPTH - 1, WAIT)})) as srv:
        t = Transfer(dest=str(tmp_path / "d"), root=srv.url + "/", threads=4, pipeline=8)
        out = ShardRunner(t, 0, lambda evs: None).run(_echo_jobs(srv.url, 80))
        accepts, most_open = srv.accepts, srv.max_open
    assert [o.status for o in out] == [Status.FETCHED] * 80, out[0]
    assert (tmp_path / "d" / "s079").read_bytes() == b"/s079"
    ahead = {target: n for _, target, n in log}
    assert ahead["/s000"] == 0  # a new connection: one request, until it has kept alive
    assert ahead["/s001"] == MAX_DEPTH - 1, log[:3]
    assert accepts == most_open == 1, "small files went on more than one connection"


def test_when_pipelining_stops_every_lane_takes_small_files_again(tmp_path: Path) -> None:
    log: Log = []
    answer = echo(log, close_after_burst=True)  # drops what was sent ahead: twice, and it is off
    holder: list[RawServer] = []

    def script(peer: Peer, index: int) -> None:
        if index >= 2:  # from the third connection on, pipelining is off
            deadline = time.monotonic() + 10
            # hold this connection's first answer until a second lane has a connection open
            while holder[0].max_open < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        answer(peer, index)

    with RawServer(script) as srv:
        holder.append(srv)
        t = Transfer(dest=str(tmp_path / "d"), root=srv.url + "/", threads=2, pipeline=4)
        out = ShardRunner(t, 0, lambda evs: None).run(_echo_jobs(srv.url, 200))
        most_open = srv.max_open
    assert [o.status for o in out] == [Status.FETCHED] * 200, [o for o in out if o.error][:1]
    assert (tmp_path / "d" / "s199").read_bytes() == b"/s199"
    assert most_open == 2, "the second lane never took small files after pipelining stopped"
    bursts = [(i, target) for i, target, n in log if n]
    assert [i for i, _ in bursts] == [0, 1], bursts  # two lost bursts, then one at a time


@pytest.mark.real_server
def test_a_keep_alive_limit_mid_train_costs_one_connection_per_limit(
    tmp_path: Path, run_fetch, small_tree: tuple[Path, dict[str, bytes]]
) -> None:
    # nginx closes a connection after 10 requests, with requests sent ahead still on it
    # (never read): they go again on the next connection, in order and still pipelined.
    # Before, they were forgotten: the next ones came out of turn there, and each such
    # connection was dropped with answers due (files served twice, connections wasted).
    root, files = small_tree
    dest = tmp_path / "dest"
    with (
        serve("nginx", root, tmp_path / "nginx", keepalive_requests=10) as srv,
        Relay(srv.port) as relay,
    ):
        r = run_fetch(*_cli(relay.url, dest, 4))
        logged = srv.requests(min_count=len(files) + 5)
    assert r.code == 0, r
    _check_mirror(dest, files)
    per_file = Counter(q.path for q in logged if not q.path.endswith("/"))
    assert per_file == Counter({"/" + rel: 1 for rel in files}), "a file was requested twice"
    # ~10 requests a connection (and the crawl's few)
    assert relay.accepted <= len(logged) // 10 + 8, (relay.accepted, len(logged))
    assert relay.bursts >= len(logged) // 10 // 2, "pipelining stopped"


# --- 8. origins ------------------------------------------------------------------------------


def test_expected_request_for_another_origin_is_not_sent_ahead(
    make_transport: Callable[..., ThreadConnTransport],
) -> None:
    log_a: Log = []
    log_b: Log = []
    t = make_transport(pipeline=4)
    with RawServer(echo(log_a)) as a, RawServer(echo(log_b)) as b:
        fetch_all(t, a.url, ["/warm"])
        t.expect([get(b.url + "/other"), get(a.url + "/mine")])
        assert fetch_all(t, a.url, ["/first"]) == [b"/first"]
        assert fetch_all(t, b.url, ["/other"]) == [b"/other"]
        assert fetch_all(t, a.url, ["/mine"]) == [b"/mine"]
        assert [target for _, target, _ in log_b] == ["/other"]
        assert "/other" not in on(a, 0), "a request for B was sent to A"


def _yum_split_between(a: FaultServer, b: FaultServer, n: int) -> None:
    """A yum repository on ``a`` whose packages lie on ``a`` and, by ``xml:base``, on ``b``
    (in runs of three: a, a, a, b, b, b, ...)."""
    entries = []
    for i in range(n):
        href = f"Packages/p{i:03d}.rpm"
        body = bytes([i % 256]) * (100 + i)
        on_b = (i // 3) % 2 == 1
        (b if on_b else a).add_file("/" + href, body)
        base = f' xml:base="{b.url}"' if on_b else ""
        entries.append(
            '<package type="rpm"><name>x</name>'
            f'<checksum type="sha256" pkgid="YES">{hashlib.sha256(body).hexdigest()}</checksum>'
            f'<time file="1700000000" build="1700000000"/><size package="{len(body)}"/>'
            f'<location{base} href="{href}"/></package>'
        )
    primary = gzip.compress(
        (
            '<?xml version="1.0"?><metadata xmlns="http://linux.duke.edu/metadata/common" '
            f'packages="{n}">{"".join(entries)}</metadata>'
        ).encode()
    )
    digest = hashlib.sha256(primary).hexdigest()
    href = f"repodata/{digest}-primary.xml.gz"
    a.add_file("/" + href, primary)
    a.add_file(
        "/repodata/repomd.xml",
        (
            '<?xml version="1.0"?><repomd xmlns="http://linux.duke.edu/metadata/repo">'
            f'<data type="primary"><checksum type="sha256">{digest}</checksum>'
            f'<location href="{href}"/><timestamp>1700000000</timestamp>'
            f"<size>{len(primary)}</size></data></repomd>"
        ).encode(),
    )


def test_cli_alias_packages_are_not_sent_to_the_wrong_server(tmp_path: Path, run_fetch) -> None:
    with serving() as a, serving() as b:
        _yum_split_between(a, b, 60)
        r = run_fetch(
            *_cli(a.url, tmp_path / "dest", 4),
            "--index",
            "repodata",
            "--alias",
            f"127.0.0.1:{b.port}",
        )
        assert r.code == 0, r
        assert len(list((tmp_path / "dest" / "Packages").iterdir())) == 60
        wrong_a = [q.path for q in a.requests if q.headers["host"] != f"127.0.0.1:{a.port}"]
        wrong_b = [q.path for q in b.requests if q.headers["host"] != f"127.0.0.1:{b.port}"]
        assert (wrong_a, wrong_b) == ([], [])


# --- 8. bad values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pipeline", "0"], "--pipeline: expected an integer from 1 to 32, got 0"),
        (["--pipeline", "99"], "--pipeline: expected an integer from 1 to 32, got 99"),
        (["--pipeline", "x"], "argument --pipeline: invalid int value: 'x'"),
    ],
)
def test_bad_pipeline_option(args: list[str], message: str, run_fetch) -> None:
    r = run_fetch("--mirror", "http://127.0.0.1:9/", *args)
    assert r.code == 2, r
    assert message in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize(
    ("value", "shown"),
    [('"x"', '"x"'), ("0", "0"), ("33", "33"), ("true", "True"), ("4.0", "4.0")],
)
def test_bad_pipeline_in_a_config_file(tmp_path: Path, value: str, shown: str, run_fetch) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(f"[jobs.a]\nurl = 'http://127.0.0.1:9/'\npipeline = {value}\n")
    r = run_fetch("--config", cfg)
    assert r.code == 2, r
    assert f"m.toml: jobs.a.pipeline: expected an integer from 1 to 32, got {shown}" in r.output
    assert "Traceback" not in r.output


def test_good_pipeline_values_are_accepted(tmp_path: Path, run_fetch) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text("[jobs.a]\nurl = 'http://127.0.0.1:9/'\npipeline = 32\n")
    r = run_fetch("--config", cfg, "--check")
    assert r.code == 0, r
    assert "pipeline = 32" in r.output
    r = run_fetch("--config", cfg, "--check", "--pipeline", "1")
    assert r.code == 0, r
    assert "pipeline = 1" in r.output


@pytest.mark.real_server
def test_every_real_server_takes_the_default_32_deep_pipeline(
    server_kind: str, served, tmp_path: Path, run_fetch
) -> None:
    # 150 small files in one directory, one process with the defaults: one lane 32 deep.
    # Each server answers every file once, in order (Apache's keep-alive limit of 100
    # drops the requests sent ahead past it; they go again on the next connection).
    root = tmp_path / "www"
    (root / "d").mkdir(parents=True)
    files = {f"d/f{i:03d}.bin": random.Random(i).randbytes(100 + i) for i in range(150)}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    srv = served(server_kind, root)
    dest = tmp_path / "dest"
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1")
    assert r.code == 0, r
    assert {rel: (dest / rel).read_bytes() for rel in files} == files
    logged = srv.requests(min_count=len(files) + 2)
    per_file = Counter(q.path for q in logged if q.path.endswith(".bin"))
    assert per_file == Counter({"/" + rel: 1 for rel in files}), "a file was asked for twice"
