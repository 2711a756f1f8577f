"""The httpcore connection pool, for ``--http2`` or a proxy, under the run's connection cap.

HTTP/1.1 needs none of this (:mod:`fetcher.http1`); HTTP/2 multiplexes requests
over a shared connection, which is what httpcore's pool is for.  Its network
backend is wrapped so that every TCP connection holds a token of the cap.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

from fetcher.config import Transfer
from fetcher.limits import SharedLimits, TokenGate

__all__ = ["CappedBackend", "pooled_transport"]


def pooled_transport(
    t: Transfer,
    verify: ssl.SSLContext | bool,
    limits: SharedLimits | None,
    stop: threading.Event | None,
    size: int,
) -> httpx.HTTPTransport:
    """httpcore's pool (HTTP/2 when asked for and the server offers it; through ``t.proxy``
    when there is one), capped by ``limits``."""
    # httpcore reads 64 KiB per socket read; a bigger read cuts the per-chunk overhead.
    httpcore._sync.http11.HTTP11Connection.READ_NUM_BYTES = 256 * 1024
    transport = httpx.HTTPTransport(
        verify=verify,
        http2=t.http2,
        proxy=httpx.Proxy(t.proxy) if t.proxy else None,
        limits=httpx.Limits(
            max_connections=size, max_keepalive_connections=size, keepalive_expiry=30
        ),
    )
    if limits is not None:
        pool = transport._pool
        backend = CappedBackend(pool._network_backend, limits.connections, stop)
        backend.pool = pool
        if t.proxy:
            proxy = httpx.URL(t.proxy)
            backend.proxy = (proxy.host, proxy.port or (443 if proxy.scheme == "https" else 80))
        pool._network_backend = backend
    return transport


class _CappedStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, gate: TokenGate) -> None:
        self._inner = inner
        self._gate: TokenGate | None = gate

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            gate, self._gate = self._gate, None
            if gate is not None:
                gate.release()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, server_hostname, timeout)
        self._inner = tls
        return self

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    def __del__(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.release_now()


class CappedBackend(httpcore.NetworkBackend):
    """An httpcore backend whose every TCP connection holds one token of ``sem``.

    Waiting for a token is interruptible by ``stop`` and never times out by
    itself: a thread beyond the cap simply waits its turn.
    """

    def __init__(
        self, inner: httpcore.NetworkBackend, sem: Any, stop: threading.Event | None = None
    ) -> None:
        self._inner = inner
        self._gate = TokenGate(sem, stop)
        self.pool: httpcore.ConnectionPool | None = None
        """The pool this backend serves; its idle connections can give their tokens back."""
        self.proxy: tuple[str, int] | None = None
        """The proxy's host and port, which the pool connects to instead of the mirror's."""

    def _reclaim(self) -> bool:
        # httpcore binds a request to a new connection as it arrives, before it connects.
        # If our own idle keep-alive connections hold the tokens, that request would wait
        # for ever: close one idle connection of this pool, under the pool's lock.
        pool = self.pool
        if pool is None:
            return False
        with pool._optional_thread_lock:
            idle = [c for c in pool._connections if c.is_idle()]
            if not idle:
                return False
            victim = idle[0]
            pool._connections.remove(victim)
        victim.close()
        return True

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        if not self._gate.acquire(self._reclaim):
            raise httpcore.ConnectError("stopping")
        try:
            stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        except httpcore.ConnectError as exc:
            self._gate.release_now()
            # (httpcore says only "[Errno 111] Connection refused": through a proxy, read as
            # the mirror refusing; fetcher.http1 names the host it could not reach as well)
            what = "the proxy " if (host, port) == self.proxy else ""
            raise httpcore.ConnectError(f"cannot connect to {what}{host}:{port}: {exc}") from exc
        except BaseException:
            self._gate.release_now()
            raise
        return _CappedStream(stream, self._gate)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        return self._inner.connect_unix_socket(path, timeout, socket_options)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)
