"""A small forward HTTP proxy on 127.0.0.1 for tests: absolute-form GETs, one per
connection, and CONNECT tunnels (for https).

It resolves hosts through ``hosts`` (``{"mirror.test": 8080}`` → 127.0.0.1:8080) and
never connects anywhere but 127.0.0.1, so a test can use a name no resolver knows.
Each request it saw is kept (``seen``: method, target, Proxy-Authorization). The
answer is passed on with ``Connection: close`` and the connection closed after it.
"""

from __future__ import annotations

import selectors
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["ForwardProxy", "Seen"]

_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class Seen:
    method: str
    target: str
    proxy_auth: str | None


@dataclass
class ForwardProxy:
    hosts: dict[str, int] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __enter__(self) -> ForwardProxy:
        t = threading.Thread(target=self._accept, name="proxy", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join(timeout=10)
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            with self._lock:
                self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        except OSError:  # a client gone mid-way (a refused certificate resets the tunnel)
            pass

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            head = _read_head(conn)
            if head is None:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = [ln for ln in lines[1:] if ln]
            auth = next(
                (v.strip() for n, _, v in (h.partition(":") for h in headers)
                 if n.lower() == "proxy-authorization"),
                None,
            )  # fmt: skip
            with self._lock:
                self.seen.append(Seen(method, target, auth))
            if method == "CONNECT":  # https: a tunnel to the named port, on 127.0.0.1 only
                self._tunnel(conn, target)
                return
            parts = urlsplit(target)
            port = self.hosts.get(parts.hostname or "")
            if method != "GET" or parts.scheme != "http" or port is None:
                conn.sendall(
                    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                return
            keep = [h for h in headers if h.partition(":")[0].lower() not in
                    ("proxy-authorization", "proxy-connection", "connection", "host")]  # fmt: skip
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            request = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", *keep, "Connection: close"]
            with socket.create_connection(("127.0.0.1", port), timeout=10) as up:
                up.sendall(("\r\n".join(request) + "\r\n\r\n").encode("latin-1"))
                answer = _read_head(up, keep_rest=True)
                if answer is None:
                    return
                head_end = answer.index(b"\r\n\r\n")
                status, *rest = answer[:head_end].decode("latin-1").split("\r\n")
                rest = [h for h in rest if h.partition(":")[0].lower() != "connection"]
                out = "\r\n".join([status, *rest, "Connection: close"]) + "\r\n\r\n"
                conn.sendall(out.encode("latin-1") + answer[head_end + 4 :])
                while chunk := up.recv(1 << 16):
                    conn.sendall(chunk)

    def _tunnel(self, conn: socket.socket, target: str) -> None:
        host, _, port = target.rpartition(":")
        if host not in (*self.hosts, "localhost", "127.0.0.1") or not port.isdigit():
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as up:
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            with selectors.DefaultSelector() as sel:
                sel.register(conn, selectors.EVENT_READ, up)
                sel.register(up, selectors.EVENT_READ, conn)
                while not self._stop.is_set():
                    ready = sel.select(timeout=10)
                    if not ready:
                        return  # idle for 10 s: done
                    for key, _ in ready:
                        data = key.fileobj.recv(1 << 16)  # type: ignore[union-attr]
                        if not data:
                            return
                        key.data.sendall(data)


def _read_head(sock: socket.socket, keep_rest: bool = False) -> bytes | None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(1 << 16)
        if not chunk or len(buf) > _MAX_HEAD:
            return None
        buf += chunk
    return buf if keep_rest else buf[: buf.index(b"\r\n\r\n")]
