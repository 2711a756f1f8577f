"""One request for a file and its answer, as every attempt makes it.

The GET (the runner's prepared one, else built here) with redirects followed by hand:
within scope or to an alias, at most :data:`MAX_REDIRECTS` hops, credentials kept to
the mirror's origin. Then what an attempt reads of the answer: its headers once, as a
plain dict; the validators that name its version; and its body, streamed into a file
descriptor as it comes, counted, capped and stopped with the run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

from fetcher.config import Transfer
from fetcher.errors import HTTPStatusError, IncompleteDownload, IsADirectory, RedirectRefused
from fetcher.http1 import ThreadConnTransport, origin
from fetcher.limits import Pace, SharedLimits, pace
from fetcher.models import Action, Job, Outcome, Scope, Status
from fetcher.retry import retry_after_seconds
from fetcher.transport import file_url, plain_get, request_parts
from fetcher.wire import Body, write_all

__all__ = [
    "CONTENT_RANGE",
    "MAX_REDIRECTS",
    "Ctx",
    "Interrupted",
    "PastListing",
    "add_conditions",
    "changed_since",
    "digest_for",
    "for_origin",
    "header_map",
    "if_range_value",
    "parse_last_modified",
    "send",
    "status_error",
    "stream_body",
    "unchanged",
]


MAX_REDIRECTS = 5


CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class Interrupted(Exception):
    """The run is stopping; the partial file is kept for the next run."""


_MONTHS = {
    m: i
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}


def parse_last_modified(value: str | None) -> float | None:
    if not value:
        return None
    # The form servers send (RFC 9110's IMF-fixdate, "Sun, 06 Nov 1994 08:49:37 GMT")
    # read by position: a third of the general parser's cost, once per file.
    if len(value) == 29 and value[3:5] == ", " and value.endswith(" GMT"):
        v = value
        with contextlib.suppress(KeyError, ValueError, OverflowError):
            return datetime(int(v[12:16]), _MONTHS[v[8:11]], int(v[5:7]), int(v[17:19]),
                            int(v[20:22]), int(v[23:25]), tzinfo=UTC).timestamp()  # fmt: skip
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class Ctx:
    """Per-call plumbing: what an attempt (:func:`~fetcher.download.fetch_file`) needs besides the job."""

    def __init__(
        self,
        transport: httpx.BaseTransport,
        t: Transfer,
        scope: Scope,
        limits: SharedLimits | None,
        stop: threading.Event | None,
        on_bytes: Callable[[int], None],
        known_dirs: set[str] | None = None,
        prepared: httpx.Request | None = None,
    ) -> None:
        self.known_dirs = known_dirs
        self.transport = transport
        self.t = t
        self.headers, self.extensions = request_parts(t)
        self.prepared = prepared
        self.scope = scope
        self.limits = limits
        self.stop = stop
        self.on_bytes = on_bytes


def send(ctx: Ctx, url: str, headers: dict[str, str]) -> tuple[httpx.Response, str]:
    """GET with redirects followed by hand: in scope (or to an alias) and at most 5 hops.

    Returns the response and the URL that gave it.
    """
    seen = [url]
    # built ahead by the runner (the plain GET of this file): good for the first hop of
    # the first attempt, unless this attempt carries other headers (Range, conditions)
    ready, ctx.prepared = ctx.prepared, None
    plain = headers == ctx.headers
    if not plain:
        ready = None
    for _ in range(MAX_REDIRECTS + 1):
        # A pause holds back requests, not the answer to one sent ahead (the runner's
        # prepared GET, due on this thread's connection): waiting to read it spares the
        # server nothing, and each 429 read renews the pause, so a train of them had
        # been read one Retry-After apart.
        if ctx.limits is not None and ctx.limits.paused() and not _due(ctx, ready):
            ctx.limits.wait_pause(ctx.stop)
        if ready is not None:
            req = ready
        elif plain:
            req = plain_get(url, ctx.t)
        else:
            req = httpx.Request(
                "GET", file_url(url, ctx.t.root), headers=headers, extensions=ctx.extensions
            )
        ready = None
        resp = ctx.transport.handle_request(req)
        if resp.status_code not in (301, 302, 303, 307, 308):
            return resp, url
        location = resp.headers.get("location")
        resp.close()
        if not location:
            raise HTTPStatusError(resp.status_code, url)
        try:
            target = str(httpx.URL(url).join(location)).split("#", 1)[0]
        except (httpx.InvalidURL, ValueError):
            raise RedirectRefused(f"unusable redirect from {url}: {location[:200]!r}") from None
        if target == seen[0] + "/":
            raise IsADirectory(f"{seen[0]} is a directory (redirects to {target})")
        if not _redirect_allowed(ctx.scope, target):
            raise RedirectRefused(f"redirect off the mirror refused: {url} -> {target}")
        if target in seen:
            raise RedirectRefused(f"redirect loop: {' -> '.join([*seen, target])}")
        seen.append(target)
        kept = for_origin(headers, url, target)
        if kept is not headers:
            headers, plain = kept, False
        url = target
    raise RedirectRefused(f"more than {MAX_REDIRECTS} redirects from {seen[0]}")


_CREDENTIALS = frozenset({"authorization", "cookie"})


def for_origin(headers: dict[str, str], url: str, target: str) -> dict[str, str]:
    """``headers`` for ``target``, which ``url`` redirected to: without the credentials
    (``Authorization`` from the URL's user, ~/.netrc or ``--header``; a ``Cookie``) when
    ``target`` is another origin (an alias: another host, port or scheme), as curl and
    httpx have it. They were given for the mirror's host: an alias may be anyone's
    server in a mirror network, or plain http. ``headers`` itself when nothing goes."""
    if not any(k.lower() in _CREDENTIALS for k in headers):
        return headers
    if origin(httpx.URL(url)) == origin(httpx.URL(target)):
        return headers
    return {k: v for k, v in headers.items() if k.lower() not in _CREDENTIALS}


def _due(ctx: Ctx, ready: httpx.Request | None) -> bool:
    """``ready`` (the runner's prepared GET) was sent ahead and its answer is on its way."""
    transport = ctx.transport
    return ready is not None and isinstance(transport, ThreadConnTransport) and transport.owes()


def _redirect_allowed(scope: Scope, target: str) -> bool:
    """Below the start URL on the mirror itself, or anywhere on a configured alias."""
    if scope.contains(target):
        return True
    u = httpx.URL(target)
    root = httpx.URL(scope.root)
    same_host = (u.scheme, u.host, u.port) == (root.scheme, root.host, root.port)
    return not same_host and scope.same_origin_or_alias(target)


def status_error(resp: httpx.Response, url: str) -> HTTPStatusError:
    return HTTPStatusError(
        resp.status_code, url, retry_after_seconds(resp.headers.get("retry-after"))
    )


def add_conditions(headers: dict[str, str], job: Job, final: str) -> None:
    """The plan's validators as conditions (a 304 then says the file has not changed), for
    a file the plan would check or found changed that is still there."""
    if job.action in (Action.CHECK, Action.CHANGED) and os.path.exists(final):
        if job.etag:
            headers["If-None-Match"] = job.etag
        if job.last_modified:
            headers["If-Modified-Since"] = job.last_modified


def unchanged(job: Job, final: str) -> Outcome:
    """The outcome of a 304: the local file stands."""
    f = job.file
    return Outcome(
        f.path,
        f.url,
        Status.UNCHANGED,
        size=os.stat(final).st_size,
        etag=job.etag,
        last_modified=job.last_modified,
        stamp=f.stamp,
    )


def header_map(resp: httpx.Response) -> dict[str, str]:
    """The response's headers as a plain dict, names lower-cased, the first of a repeated one.

    (``httpx.Headers.get`` scans and re-normalises the whole list on every call; a
    download reads half a dozen headers.)
    """
    out: dict[str, str] = {}
    for name, value in resp.headers.raw:
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1").strip())
    return out


def if_range_value(etag: str | None, last_modified: str | None) -> str | None:
    """What ``If-Range`` may carry to name this version: its ETag, unless that is weak
    (``W/``), which ``If-Range`` never matches (RFC 9110, section 13.1.5: the server
    answers the whole file); then its Last-Modified date; else nothing (no resume).

    A weak ETag is what a server sends for a file it may encode on the fly, or changed
    within the second (Apache); a CDN may weaken every ETag it passes on. Sent anyway,
    every resume began again from byte 0, and every range of a segmented download but
    the first came back whole, which failed the file."""
    if etag and not etag.startswith("W/"):
        return etag
    return last_modified or None


def changed_since(
    side: dict[str, Any] | None, etag: str | None, last_mod: str | None, total: int | None
) -> str | None:
    """Why a 206 answer belongs to another version than the partial file, or None."""
    if side is None:
        return None
    old_etag, old_lm, old_size = side.get("etag"), side.get("last_modified"), side.get("size")
    if etag and isinstance(old_etag, str) and etag != old_etag:
        return f"ETag {old_etag} -> {etag}"
    if not (etag and old_etag) and last_mod and isinstance(old_lm, str) and last_mod != old_lm:
        return f"Last-Modified {old_lm} -> {last_mod}"
    if isinstance(old_size, int) and total is not None and total != old_size:
        return f"size {old_size} -> {total}"
    return None


def digest_for(checksum: tuple[str, str] | None, existing: Path | None) -> Any:
    if checksum is None:
        return None
    try:
        h = hashlib.new(checksum[0])
    except ValueError:  # a digest this Python lacks
        return None
    if existing is not None:
        with existing.open("rb") as fh:
            h = hashlib.file_digest(fh, lambda: h)
    return h


class PastListing(Exception):
    """More bytes came than the listing's exact size: not this file (see ``stream_body``)."""


def _held_back(consume: Callable[[int], object], floor: Pace, n: int) -> None:
    """``consume(n)`` (``--limit-rate``), its wait not counted against the server's rate."""
    start = time.monotonic()
    consume(n)
    floor.held(time.monotonic() - start)


def stream_body(
    ctx: Ctx, resp: httpx.Response, fd: int, mode: str, digest: Any, cap: int | None = None
) -> int:
    """The body into ``fd``: its length. ``cap``: the most it may be (the listing's exact
    size, less what a resume has); a body past it stops there, as :class:`PastListing`.
    Slower than ``--min-rate``, it stops as :class:`~fetcher.errors.TooSlow`."""
    received = 0
    limits = ctx.limits
    consume: Callable[[int], object] | None = None
    if limits is not None and limits.rate:
        consume = limits.consume
    t = ctx.t
    floor = pace(t.min_rate, t.min_rate_time)
    if floor is not None and consume is not None:
        consume = functools.partial(_held_back, consume, floor)
    try:
        # A big body that nothing here needs to see (no digest, no rate limit) goes
        # from the socket to the file in the kernel; append mode cannot (resumes).
        write_to = getattr(resp.stream, "write_to", None)
        if write_to is not None and digest is None and mode == "wb" and consume is None:

            def moved(n: int) -> None:
                nonlocal received
                received += n
                if ctx.stop is not None and ctx.stop.is_set():
                    raise Interrupted
                if cap is not None and received > cap:
                    raise PastListing
                if floor is not None:
                    floor.add(n, "the body")
                ctx.on_bytes(n)

            if write_to(fd, moved) is not None:
                return received
        # Our own transport's body is read as it is; httpx's iter_raw around it only
        # counts and re-chunks (nothing to decode: the raw bytes are what is written).
        stream = resp.stream
        for chunk in stream if type(stream) is Body else resp.iter_raw():
            if ctx.stop is not None and ctx.stop.is_set():
                raise Interrupted
            n = len(chunk)
            received += n
            if cap is not None and received > cap:
                raise PastListing
            if floor is not None:
                floor.add(n, "the body")
            write_all(fd, chunk)
            if digest is not None:
                digest.update(chunk)
            ctx.on_bytes(n)
            if consume is not None:
                consume(n)
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        raise IncompleteDownload(f"connection broke after {received} bytes: {exc}") from exc
    return received
