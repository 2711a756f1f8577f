"""The HTTP transports of a run, built from its transfer settings.

Every request goes to the mirror through a transport made here:
:class:`~fetcher.http1.ThreadConnTransport` (HTTP/1.1, one keep-alive
connection per thread) unless ``--http2`` asks for httpcore's multiplexing
pool (:mod:`fetcher.pooled`).  Either way each TCP connection holds a token
of the run's connection cap.  Downloads and the crawl's listings call the
transport directly with requests made here (:func:`plain_get`; redirects are
followed by hand, within scope); the crawl's other requests go through an
``httpx.Client`` over the same transport.
"""

from __future__ import annotations

import base64
import functools
import re
import ssl
import threading
from collections.abc import Callable
from typing import Any

import httpx

from fetcher.config import Transfer
from fetcher.http1 import REUSE_BUFFER, ThreadConnTransport
from fetcher.limits import SharedLimits, TokenGate

__all__ = [
    "file_url",
    "make_client",
    "make_transport",
    "plain_get",
    "request_headers",
    "request_parts",
    "timeout_of",
    "tls_context",
]


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


def plain_get(url: str, t: Transfer) -> httpx.Request:
    """A plain GET of ``url`` (no Range, no condition), as an ``httpx.Client`` with
    :func:`request_headers` would build it, for the transport's ``handle_request``.

    The first request :func:`~fetcher.download.fetch_file` sends for a new file: the
    runner builds it ahead, to announce it to the transport (pipelining) and to hand
    it to ``fetch_file`` as ``prepared`` (one URL parse, not two). And every listing
    request of the crawl.
    """
    target = file_url(url, t.root)
    headers, extensions = request_parts(t)
    ready = _ready_headers(t)
    if ready is not None and isinstance(target, httpx.URL):
        # httpx's documented way to send a request exactly as built: with a stream, it adds
        # no headers of its own (here the Host it would add is in ``ready`` already)
        return httpx.Request("GET", target, headers=ready, stream=_NO_BODY, extensions=extensions)
    return httpx.Request("GET", target, headers=headers, extensions=extensions)


_NO_BODY = httpx.ByteStream(b"")


@functools.lru_cache(maxsize=16)
def _ready_headers(t: Transfer) -> httpx.Headers | None:
    """A GET's headers below ``t.root``, Host included, as httpx would make them; None when
    a request made with them would differ from one httpx builds (checked once per root)."""
    headers, extensions = request_parts(t)
    root = t.root
    try:
        sample = root + "a%2Bb/c~d,1:2@x.rpm"
        want = httpx.Request("GET", sample, headers=headers, extensions=extensions)
        ready = httpx.Headers(want.headers.raw)
        made = httpx.Request("GET", file_url(sample, root), headers=ready, stream=_NO_BODY,
                             extensions=extensions)  # fmt: skip
        same = (made.method, str(made.url), made.headers.raw, made.extensions) == (
            want.method, str(want.url), want.headers.raw, want.extensions
        )  # fmt: skip
        return ready if same and made.read() == want.read() == b"" else None
    except (httpx.InvalidURL, ValueError, TypeError):
        return None


# A path below the root that is already percent-encoded: nothing for httpx to check or
# change. Segments of unreserved and sub-delimiter characters, ':', '@' and upper-case
# escapes; no empty, '.' or '..' segment; no query, no fragment.
_SEGMENT = r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-F]{2})+"
_ENCODED_BELOW = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*/?")
_DOT_SEGMENT = re.compile(r"(?:^|/)\.\.?(?:/|$)")


def file_url(url: str, root: str) -> httpx.URL | str:
    """``url`` for a request: an ``httpx.URL`` made without parsing it, when it can be.

    httpx checks and normalises a URL one character at a time in Python, about
    10 µs for a package's path; the crawl's URLs are already in the form it would
    produce. Below ``root``, whose parse is kept, such a path only replaces the
    root's. Anything else is returned as it is, for httpx to parse.
    """
    below = _below_root(root)
    if below is None or not url.startswith(root):
        return url
    rest = url[len(root) :]
    if not _ENCODED_BELOW.fullmatch(rest) or _DOT_SEGMENT.search(rest):
        return url
    return below(rest)


@functools.lru_cache(maxsize=16)
def _below_root(root: str) -> Callable[[str], httpx.URL] | None:
    """Makes the URLs below ``root`` from its parse, if that gives what parsing would."""
    try:
        parsed = httpx.URL(root)
        ref = parsed._uri_reference  # httpx's parse: a NamedTuple, copied with a new path
        if str(parsed) != root or not ref.path.endswith("/") or ref.query or ref.fragment:
            return None

        def below(rest: str) -> httpx.URL:
            url = httpx.URL.__new__(httpx.URL)
            url._uri_reference = ref._replace(path=ref.path + rest)
            return url

        sample = "a%2Bb/c~d,1:2@x.rpm"
        made, want = below(sample), httpx.URL(root + sample)
        same = (made.raw_path, made.host, made.port, made.scheme) == (
            want.raw_path, want.host, want.port, want.scheme
        )  # fmt: skip
        return below if same and str(made) == str(want) else None
    except (AttributeError, TypeError, ValueError, httpx.InvalidURL):
        return None  # another httpx: parse every URL


@functools.lru_cache(maxsize=16)
def request_parts(t: Transfer) -> tuple[dict[str, str], dict[str, Any]]:
    """A run's request headers and extensions: one pair per run, shared read-only by
    every request (nothing mutates them). The body is read chunk by chunk as it comes
    and each chunk used before the next: a reused read buffer will do."""
    return request_headers(t), {"timeout": timeout_of(t).as_dict(), REUSE_BUFFER: True}


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
        ssl_context=lambda: tls_context(t.verify),
        timeout=timeout_of(t),
        gate=TokenGate(limits.connections, stop) if limits is not None else None,
        keepalive=keepalive,
        pipeline=t.pipeline if pipeline is None else pipeline,
        trusted=trusted,
        hold=limits.paused if limits is not None else None,
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


_TLS_LOCK = threading.Lock()
_TLS: dict[bool | str, ssl.SSLContext] = {}


def tls_context(verify: bool | str) -> ssl.SSLContext:
    """This process's TLS context for HTTP/1.1 connections that verify as ``verify``
    says, made once.

    Loading a CA store costs 20-40 ms of CPU (certifi's 144 certificates), and every
    transport paid it on its first https connection: the crawl's, each worker's,
    each one a worker made again. Made in the coordinator before the workers are
    forked, it is theirs too (:func:`fetcher.pipeline._make_executor`). Threads share
    it as a transport's threads always did; nothing changes it once made (httpcore's
    pool, which sets ALPN on its context, gets its own: :func:`make_transport`)."""
    with _TLS_LOCK:
        ctx = _TLS.get(verify)
        if ctx is None:
            ctx = _TLS[verify] = httpx.create_ssl_context(verify=_ssl_context(verify))
        return ctx


def _ssl_context(verify: bool | str) -> ssl.SSLContext | bool:
    # httpx 0.28 wants an SSLContext for a custom CA bundle (a path is deprecated).
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify
