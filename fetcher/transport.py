"""The HTTP transports of a run, built from its transfer settings.

Every request goes to the mirror through a transport made here:
:class:`~fetcher.http1.ThreadConnTransport` (HTTP/1.1, one keep-alive
connection per thread) unless ``--http2`` asks for httpcore's multiplexing
pool (:mod:`fetcher.pooled`).  Either way each TCP connection holds a token
of the run's connection cap.  Downloads call the transport directly (redirects
are followed by hand, within scope); the crawl goes through an
``httpx.Client`` over the same kind of transport.
"""

from __future__ import annotations

import base64
import ssl
import threading

import httpx

from fetcher.config import Transfer
from fetcher.http1 import ThreadConnTransport
from fetcher.limits import SharedLimits, TokenGate

__all__ = ["make_client", "make_transport", "request_headers", "timeout_of"]


def request_headers(t: Transfer) -> dict[str, str]:
    """The headers every request of a run carries (Basic auth too, when the URL had a user)."""
    headers = {"User-Agent": t.user_agent, "Accept-Encoding": "identity"}
    if t.auth is not None:
        token = base64.b64encode(":".join(t.auth).encode("utf-8")).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
    headers.update(t.headers)  # --header (none of the above but Authorization, never both)
    return headers


def timeout_of(t: Transfer) -> httpx.Timeout:
    return httpx.Timeout(t.read_timeout, connect=t.connect_timeout, pool=None)


def make_transport(
    t: Transfer,
    limits: SharedLimits | None = None,
    stop: threading.Event | None = None,
    pool_size: int | None = None,
    keepalive: bool = True,
    pipeline: int | None = None,
    trusted: bool = False,
) -> httpx.BaseTransport:
    """The transport for one process's threads, its connections capped by ``limits``.

    HTTP/1.1 goes through :class:`ThreadConnTransport` (one keep-alive connection
    per thread, no shared pool); ``--http2`` needs httpcore's multiplexing pool.
    ``keepalive=False`` closes each connection after its response, so a thread
    that pauses between requests does not sit on a token of the cap. ``pipeline``:
    requests in flight on one connection, when not ``t.pipeline``. ``trusted``: the
    server answered pipelined requests last time (see :class:`ThreadConnTransport`).
    """
    if t.http2 or t.proxy:
        # httpcore's pool: HTTP/2 multiplexing, or a proxy (absolute-form requests, CONNECT
        # for https); nothing pipelined or spliced then. Only imported when asked for.
        from fetcher.pooled import pooled_transport

        return pooled_transport(t, _ssl_context(t.verify), limits, stop, pool_size or t.threads)
    return ThreadConnTransport(
        ssl_context=lambda: httpx.create_ssl_context(verify=_ssl_context(t.verify)),
        timeout=timeout_of(t),
        gate=TokenGate(limits.connections, stop) if limits is not None else None,
        keepalive=keepalive,
        pipeline=t.pipeline if pipeline is None else pipeline,
        trusted=trusted,
    )


def make_client(
    t: Transfer,
    limits: SharedLimits | None = None,
    stop: threading.Event | None = None,
    pool_size: int | None = None,
    keepalive: bool = True,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    """A client over :func:`make_transport` (the crawl's; downloads use the transport),
    or over ``transport`` when the caller made it."""
    return httpx.Client(
        transport=transport or make_transport(t, limits, stop, pool_size, keepalive),
        timeout=timeout_of(t),
        headers=request_headers(t),
        follow_redirects=False,
        trust_env=False,  # no proxy or .netrc from the environment: fetch connects directly
    )


def _ssl_context(verify: bool | str) -> ssl.SSLContext | bool:
    # httpx 0.28 wants an SSLContext for a custom CA bundle (a path is deprecated).
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify
