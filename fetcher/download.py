"""Fetch one file robustly: stream, resume, verify, atomic rename, mtime.

Bytes are written exactly as sent (``Accept-Encoding: identity``, raw stream)
to ``DEST/.fetcher/partial/<hash>``; only a complete, verified body is moved
to its final name with ``os.replace``.  A partial file is kept for the next
attempt (or the next run) together with a small sidecar recording the
validator (ETag / Last-Modified) it was fetched under, so a resume can send
``If-Range`` and never splice two versions of a file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import stat
import tempfile
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from msgspec.structs import replace

from fetcher.config import Transfer
from fetcher.errors import (
    ChecksumMismatch,
    FatalIOError,
    HTTPStatusError,
    IncompleteDownload,
    IsADirectory,
    RangeMismatch,
    RedirectRefused,
    StaleIndex,
    TransferError,
)
from fetcher.http1 import NoToken, ThreadConnTransport, origin
from fetcher.limits import SharedLimits
from fetcher.models import STATE_DIR, Action, Job, Outcome, RelPath, RemoteFile, Scope, Status
from fetcher.plan import is_top_metadata
from fetcher.retry import RetryPolicy, retry_after_seconds, with_retries
from fetcher.transport import file_url, plain_get, request_parts
from fetcher.wire import Body, write_all

if TYPE_CHECKING:
    import tenacity  # loaded by fetcher.retry when a retry needs it, without tornado

__all__ = [
    "Deferred",
    "Interrupted",
    "check_writable",
    "fetch_file",
    "move_into",
    "partial_dir",
    "partial_name",
    "partial_paths",
    "pipelinable",
    "plain_get",
    "staged_path",
    "unwritable",
    "write_json",
]

MAX_REDIRECTS = 5
RESUME_MIN = 1 << 20  # bodies smaller than this are refetched whole rather than resumed
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED = re.compile(r"bytes \*/(\d+)")  # a 416's Content-Range
# A partial file (or sidecar) is fetch's own, in DEST's state directory: a symbolic link
# there is someone else's, and is not written through (ELOOP: the file fails, naming it).
_PARTIAL_FLAGS = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW


class Interrupted(Exception):
    """The run is stopping; the partial file is kept for the next run."""


class Deferred(Exception):
    """``fetch_file(defer=True)``: the first attempt failed, and the policy's say on it
    (a wait, another attempt) is left to ``fetch_file(failed=cause)`` later."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def partial_name(path: RelPath) -> str:
    """The partial file's name for ``path`` (in ``.fetcher/partial/``): flat, fixed-length."""
    return hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".part"


def partial_paths(dest: Path, path: RelPath) -> tuple[Path, Path]:
    """The partial file and its sidecar for ``path``."""
    part = partial_dir(dest) / partial_name(path)
    return part, part.with_suffix(".json")


@functools.lru_cache(maxsize=16)
def partial_dir(dest: Path) -> Path:
    """Where DEST's partial files and their sidecars are kept."""
    return dest / STATE_DIR / "partial"


def staged_path(dest: str, path: str) -> str:
    """Where repository metadata waits, checked, for the rest of its group (``Job.stage``):
    ``.fetcher/staged/`` and the file's own path below it (what ``repo_refs`` reads)."""
    return os.path.join(dest, STATE_DIR, "staged", path)


def _read_sidecar(meta: Path, url: str) -> dict[str, Any] | None:
    try:
        data = json.loads(meta.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("url") != url:
        return None
    return data


_MONTHS = {
    m: i
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}


def _parse_last_modified(value: str | None) -> float | None:
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


class _Ctx:
    """Per-call plumbing: what ``fetch_file`` needs besides the job."""

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


def _send(ctx: _Ctx, url: str, headers: dict[str, str]) -> tuple[httpx.Response, str]:
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
        kept = _for_origin(headers, url, target)
        if kept is not headers:
            headers, plain = kept, False
        url = target
    raise RedirectRefused(f"more than {MAX_REDIRECTS} redirects from {seen[0]}")


_CREDENTIALS = frozenset({"authorization", "cookie"})


def _for_origin(headers: dict[str, str], url: str, target: str) -> dict[str, str]:
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


def _due(ctx: _Ctx, ready: httpx.Request | None) -> bool:
    """``ready`` (the runner's prepared GET) was sent ahead and its answer is on its way."""
    transport = ctx.transport
    return ready is not None and isinstance(transport, ThreadConnTransport) and transport.owes()


def pipelinable(job: Job) -> bool:
    """A small new file: one lane takes a train of them, their requests sent ahead.

    Its request is the plain GET (no Range, no condition), which is what the transport
    is told to expect; a bigger file, an update or a resume holds a lane to itself.
    """
    size = job.file.size
    return job.action is Action.NEW and size is not None and size <= RESUME_MIN


def _redirect_allowed(scope: Scope, target: str) -> bool:
    """Below the start URL on the mirror itself, or anywhere on a configured alias."""
    if scope.contains(target):
        return True
    u = httpx.URL(target)
    root = httpx.URL(scope.root)
    same_host = (u.scheme, u.host, u.port) == (root.scheme, root.host, root.port)
    return not same_host and scope.same_origin_or_alias(target)


def _status_error(resp: httpx.Response, url: str) -> HTTPStatusError:
    return HTTPStatusError(
        resp.status_code, url, retry_after_seconds(resp.headers.get("retry-after"))
    )


class _Where:
    """Where one file goes: its final name, and its partial file and sidecar when wanted.

    Plain strings for the final name (a ``Path`` per file costs more than the
    syscalls it names); the partial pair is made on first use, which most small
    files never reach. ``target``: the name the checked file takes, its final name
    or, for staged metadata (``Job.stage``), its name under ``.fetcher/staged/``.
    """

    __slots__ = ("_dest", "_part", "_path", "final", "parent", "target")

    def __init__(self, dest: str, path: RelPath, staged: bool = False) -> None:
        self.final = os.path.join(dest, path)
        self.parent = os.path.dirname(self.final)
        self.target = staged_path(dest, path) if staged else self.final
        self._dest = dest
        self._path = path
        self._part: tuple[Path, Path] | None = None

    def partial(self) -> tuple[Path, Path]:
        """The partial file and its sidecar."""
        if self._part is None:
            self._part = partial_paths(Path(self._dest), self._path)
        return self._part


def _attempt(ctx: _Ctx, job: Job, where: _Where, look: bool) -> Outcome:
    out = _Out()
    try:
        return _attempt_into(ctx, job, where, look, out)
    finally:
        out.close()


def _attempt_into(ctx: _Ctx, job: Job, where: _Where, look: bool, out: _Out) -> Outcome:
    """One attempt; ``look``: whether a partial file left by an earlier attempt may resume."""
    f = job.file
    t = ctx.t
    final = where.final
    headers = dict(ctx.headers)
    offset = 0
    # Looked for even when the plan saw no partial file (a NEW job): this attempt may
    # follow one that left it (a retry, a Dask task run again after its worker died);
    # not on a small new file's first attempt (see fetch_file).
    side = None
    if look:
        part, meta = where.partial()
        side = _read_sidecar(meta, f.url) if part.exists() else None
    if side is not None:
        validator = _if_range_value(side.get("etag"), side.get("last_modified"))
        size = part.stat().st_size
        if validator and size > 0:
            offset = size
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = validator
    if offset == 0:
        _add_conditions(headers, job, final)

    resp, answered_by = _send(ctx, f.url, headers)
    # The listing's exact size, which the body must have (after a redirect the listing
    # described the link, not the target): checked before, during and after the body.
    exact = f.size if f.size_exact and answered_by == f.url else None
    got = _header_map(resp)
    try:
        status = resp.status_code
        if status == 304:
            return _unchanged(job, final)
        whole = False
        if status == 416 and offset:
            whole = _whole_already(side, got, offset, exact)
            if not whole:
                # Our partial is not a prefix of what the server has now: start over.
                _discard(where)
                raise RangeMismatch(f"server refused range {offset}- for {f.url}")
        elif status not in (200, 206):
            if status in (429, 503):
                ra = retry_after_seconds(got.get("retry-after"))
                if ra and ctx.limits is not None:
                    ctx.limits.pause(min(ra, t.retry_after_cap))
            raise _status_error(resp, f.url)
        etag = got.get("etag")
        last_mod = got.get("last-modified")
        total: int | None
        if whole:
            # The partial file is the whole file: a run stopped after its last byte came,
            # before the file took its name. It is checked and named as a resume that has
            # nothing to add, not fetched again (a 4 GiB image, for a kill in its fsync).
            assert side is not None
            etag, last_mod = etag or side.get("etag"), last_mod or side.get("last_modified")
            total, mode = offset, "ab"
        elif status == 206:
            m = _CONTENT_RANGE.fullmatch(got.get("content-range", "").strip())
            if not offset or not m or int(m.group(1)) != offset:
                _discard(where)
                raise RangeMismatch(
                    f"206 with Content-Range {got.get('content-range')!r}"
                    f" for a request from byte {offset}; not spliced"
                )
            total = None if m.group(3) == "*" else int(m.group(3))
            changed = _changed_since(side, etag, last_mod, total)
            if changed:
                # A server or cache that honours Range but ignores If-Range.
                _discard(where)
                raise RangeMismatch(
                    f"{f.url} changed since the partial file ({changed}); not spliced"
                )
            mode = "ab"
        else:
            offset = 0
            mode = "wb"
            cl = got.get("content-length")
            total = int(cl) if cl and cl.isdigit() else None
            if total is not None and exact is not None and total != exact:
                # Could not land (see the check after the body): not read at all, where
                # each attempt had read it whole to find out (a big file changed upstream
                # since the crawl, five times over). Retried: another server behind the
                # name may have the listing's version.
                _discard(where)
                raise IncompleteDownload(
                    f"{f.url} is {total} bytes (Content-Length), the listing says {f.size}"
                )
        # We asked for identity.  A server that sends Content-Encoding anyway (a .gz file
        # served as "gzip") sends the bytes as stored: iter_raw() keeps them undecoded,
        # and Content-Length counts those raw bytes.
        resumable = total is None or total - offset > RESUME_MIN
        # A small new file from its first byte can be written unnamed (see _Out); an
        # update replaces a file, and a resume appends to its partial file. Staged
        # metadata, and an index read back before it is published, go to it too.
        unnamed = not resumable and not offset and job.action is Action.NEW
        unnamed = unnamed and not job.stage and not _read_back(f)
        if not (unnamed and _unnamed_ok(ctx, where, out)):
            part, meta = where.partial()
            _ensure_dir(str(part.parent), ctx.known_dirs)
            # The partial file first (a 200 truncates the older version's bytes), then its
            # sidecar, whole or not at all: a kill between the two must not leave the new
            # version's validator over the old bytes (the next resume would splice them).
            out.open_partial(part, mode)
            if resumable and _if_range_value(etag, last_mod):
                # The validator survives a crash with the partial file, so a later run can
                # resume with If-Range; small files just start over (one write less each).
                side_data = {"url": f.url, "etag": etag, "last_modified": last_mod, "size": total}
                write_json(meta, side_data)
            elif mode == "wb" and look:
                meta.unlink(missing_ok=True)  # an older version's, over these new bytes
        digest = _digest_for(f.checksum, where.partial()[0] if offset else None)
        # A body of no stated length (chunked, or to the close) is cut off past the
        # listing's exact size: a hostile server's never ends, and filled the disk.
        cap = exact - offset if exact is not None else None
        try:
            received = 0 if whole else _stream_body(ctx, resp, out.fd, mode, digest, cap)
        except _PastListing:
            _discard(where)
            raise IncompleteDownload(f"{f.url} goes on past the listing's {f.size} bytes") from None
    finally:
        resp.close()

    size = offset + received
    if total is not None and size != total:
        raise IncompleteDownload(f"got {size} of {total} bytes for {f.url}")
    cl = got.get("content-length")
    if status == 200 and cl and cl.isdigit() and received != int(cl):
        raise IncompleteDownload(f"got {received} of {cl} bytes for {f.url}")
    if exact is not None and size != exact:
        # The listing printed an exact size and the body disagrees: a cut-short body with
        # a matching Content-Length, or a file changed since the listing.  Either way it
        # must not land; a later attempt (or run) sees the file as the listing does.
        _discard(where)
        raise IncompleteDownload(f"got {size} bytes, the listing says {f.size}, for {f.url}")
    sha256 = None
    if digest is not None and f.checksum is not None:
        algo, want = f.checksum
        got = digest.hexdigest()
        if got.lower() != want.lower():
            _discard(where)
            raise ChecksumMismatch(f"{algo} mismatch for {f.url}: expected {want}, got {got}")
        if algo == "sha256":
            sha256 = got
    mtime = _parse_last_modified(last_mod) or f.mtime
    if out.unnamed:
        out.publish(where, mtime)
    else:
        part, meta = where.partial()
        on_disk = os.fstat(out.fd).st_size
        out.close()
        if on_disk != size:
            # Someone else wrote into it: a worker of a killed run, still winding down
            # (for up to a second), into the partial file this run resumed.
            _discard(where)
            raise IncompleteDownload(
                f"the partial file of {f.url} holds {on_disk} bytes where {size} came"
            )
        _name_partial(ctx, where, part, mtime, job)
        if resumable or offset:  # a sidecar was written, or this resume read one
            meta.unlink(missing_ok=True)
    return Outcome(
        f.path,
        f.url,
        Status.FETCHED,
        size=size,
        received=received,
        mtime=mtime,
        etag=etag,
        last_modified=last_mod,
        sha256=sha256,
        stamp=f.stamp,
    )


def _add_conditions(headers: dict[str, str], job: Job, final: str) -> None:
    """The plan's validators as conditions (a 304 then says the file has not changed), for
    a file the plan would check or found changed that is still there."""
    if job.action in (Action.CHECK, Action.CHANGED) and os.path.exists(final):
        if job.etag:
            headers["If-None-Match"] = job.etag
        if job.last_modified:
            headers["If-Modified-Since"] = job.last_modified


def _unchanged(job: Job, final: str) -> Outcome:
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


def _header_map(resp: httpx.Response) -> dict[str, str]:
    """The response's headers as a plain dict, names lower-cased, the first of a repeated one.

    (``httpx.Headers.get`` scans and re-normalises the whole list on every call; a
    download reads half a dozen headers.)
    """
    out: dict[str, str] = {}
    for name, value in resp.headers.raw:
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1").strip())
    return out


def _if_range_value(etag: str | None, last_modified: str | None) -> str | None:
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


def _whole_already(
    side: dict[str, Any] | None, got: Mapping[str, str], offset: int, exact: int | None
) -> bool:
    """A 416 to a resume from byte ``offset`` says the partial file holds the whole file:
    the server's length (``Content-Range: bytes */N``) is ``offset``, as the sidecar and
    the listing (``exact``) say it was, and the answer names no other version.

    The resume asked with ``If-Range``: a server that honours it answers a changed file
    whole (200), so its 416 is about the partial's version (nginx sends no validator with
    it). One that names a version is held to it, as a 206 is (:func:`_changed_since`).
    Without ``Content-Range`` (Apache, lighttpd) nothing says how long the file is: it is
    fetched again."""
    m = _UNSATISFIED.fullmatch(got.get("content-range", "").strip())
    if side is None or m is None or int(m.group(1)) != offset:
        return False
    if side.get("size") != offset or (exact is not None and exact != offset):
        return False
    return _changed_since(side, got.get("etag"), got.get("last-modified"), offset) is None


def _changed_since(
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


def _ensure_dir(d: str, known: set[str] | None) -> None:
    # ``known``: directories this runner made already; saves a mkdir syscall per file.
    if known is None or d not in known:
        try:
            os.makedirs(d, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            # ``filename``: the one in the way; further up (ENOTDIR), the file is found
            raise FileExistsError(
                errno.EEXIST, "a local file where the mirror has a directory", _in_the_way(d)
            ) from exc
        if known is not None and len(known) < 100_000:
            known.add(d)


def _in_the_way(d: str) -> str:
    """The nearest of ``d`` and its parents that exists and is not a directory (else ``d``)."""
    p = d
    while p and p != os.path.dirname(p):
        if os.path.lexists(p) and not os.path.isdir(p):
            return p
        p = os.path.dirname(p)
    return d


def _digest_for(checksum: tuple[str, str] | None, existing: Path | None) -> Any:
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


class _PastListing(Exception):
    """More bytes came than the listing's exact size: not this file (see ``_stream_body``)."""


def _stream_body(
    ctx: _Ctx, resp: httpx.Response, fd: int, mode: str, digest: Any, cap: int | None = None
) -> int:
    """The body into ``fd``: its length. ``cap``: the most it may be (the listing's exact
    size, less what a resume has); a body past it stops there, as :class:`_PastListing`."""
    received = 0
    limits = ctx.limits
    consume = limits.consume if limits is not None and limits.rate else None
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
                    raise _PastListing
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
                raise _PastListing
            write_all(fd, chunk)
            if digest is not None:
                digest.update(chunk)
            ctx.on_bytes(n)
            if consume is not None:
                consume(n)
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        raise IncompleteDownload(f"connection broke after {received} bytes: {exc}") from exc
    return received


class _Out:
    """Where one attempt writes its body: a file descriptor, closed by the attempt.

    Either the partial file in ``.fetcher/partial/`` (renamed into place once checked),
    or, for a small new file on Linux, an unnamed file in its own directory
    (``O_TMPFILE``) that gets its name once checked: nothing is left behind when the
    run dies, and nothing is renamed across directories, which takes the filesystem's
    rename lock (on a busy ext4 disk every writer queued behind it:
    ``benchmarks/bench_files.py``). Plain descriptor calls throughout: chunks are
    written as they come, so a buffered file object would only add a copy (and the
    ``fstat``, ``isatty`` and ``lseek`` of setting one up, per file).
    """

    __slots__ = ("fd", "unnamed")

    def __init__(self) -> None:
        self.fd = -1
        self.unnamed = False

    def open_partial(self, part: Path, mode: str) -> None:
        append = os.O_APPEND if mode == "ab" else os.O_TRUNC
        self.fd = os.open(part, _PARTIAL_FLAGS | os.O_CREAT | append, 0o666)

    def open_unnamed(self, directory: str) -> bool:
        """An unnamed file in ``directory``; False where the filesystem has none."""
        try:
            self.fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return False  # no O_TMPFILE here (NFS, an old kernel): the partial file
            raise
        self.unnamed = True
        return True

    def publish(self, where: _Where, mtime: float | None) -> None:
        """Give the checked unnamed file its name (and the server's time)."""
        if mtime is not None:
            os.utime(self.fd, (mtime, mtime))
        # A src_dir_fd makes os.link call linkat(AT_SYMLINK_FOLLOW): it links the file
        # behind /proc's entry for the descriptor (plain link(2) would refuse, EXDEV).
        src = f"/proc/self/fd/{self.fd}"
        try:
            os.link(src, where.final, src_dir_fd=self.fd, follow_symlinks=True)
        except FileExistsError:
            # The name was taken since the plan looked: replace it, atomically, as any
            # update is replaced (named in the partial directory first).
            part = where.partial()[0]
            part.parent.mkdir(parents=True, exist_ok=True)
            part.unlink(missing_ok=True)
            try:
                os.link(src, part, src_dir_fd=self.fd, follow_symlinks=True)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # (the final name's directory is another filesystem: see _replace)
                part = Path(_hidden_name(where.parent))
                os.link(src, part, src_dir_fd=self.fd, follow_symlinks=True)
            try:
                os.replace(part, where.final)
            except OSError:  # a directory in the way, say: no partial file left for it
                part.unlink(missing_ok=True)
                raise

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


_UNNAMED = {"ok": hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")}
"""Whether unnamed files can be used here; off for the process once a filesystem refuses."""


def _unnamed_ok(ctx: _Ctx, where: _Where, out: _Out) -> bool:
    """Open ``out`` as an unnamed file beside the final name if this system can."""
    if not _UNNAMED["ok"]:
        return False
    _ensure_dir(where.parent, ctx.known_dirs)
    if out.open_unnamed(where.parent):
        return True
    _UNNAMED["ok"] = False
    return False


SEGMENT_MIN = 16 << 20
"""Files from this size up are fetched in byte ranges with ``--segments`` (each at least
a quarter of this)."""


def _segmentable(ctx: _Ctx, job: Job, where: _Where) -> bool:
    """``--segments`` applies: a new or changed file of exactly known size, big enough, no
    digest to compute in order, over our own transport (whose threads each hold a
    connection); or a resume of a segmented attempt. A changed file is replaced whole
    once all its ranges are in, as any update is."""
    f = job.file
    if not (
        ctx.t.segments > 1
        and f.size_exact
        and f.size is not None
        and f.size >= SEGMENT_MIN
        and f.checksum is None
        and isinstance(ctx.transport, ThreadConnTransport)
    ):
        return False
    if job.action in (Action.NEW, Action.CHANGED):
        return True
    return job.action is Action.RESUME and _segmented_partial(where, f) is not None


def _segmented_partial(where: _Where, f: RemoteFile) -> dict[str, Any] | None:
    """The sidecar of an earlier segmented attempt at this file (same URL and size, its
    partial file still there): its ranges, the validator they were asked with, and the
    ones finished. None when there is none, or not such a one."""
    part, meta = where.partial()
    side = _read_sidecar(meta, f.url)
    if side is None or side.get("size") != f.size or not isinstance(side.get("validator"), str):
        return None
    try:
        ranges = [(int(a), int(b)) for a, b in side["ranges"]]
        done = {(int(a), int(b)) for a, b in side["done"]}
        whole = part.stat().st_size == f.size
    except (KeyError, TypeError, ValueError, OSError):
        return None
    if not whole or not done <= set(ranges) or not ranges:
        return None
    return {**side, "ranges": ranges, "done": done}


def _range_answer(
    resp: httpx.Response, r: tuple[int, int], size: int, validator: str | None
) -> bool:
    """A 206 for exactly bytes ``r`` of a file of ``size`` bytes, of ``validator``'s version.

    ``If-Range`` has a changed file answered whole; a server or cache that ignores it
    sends the range of the new version, which only its ETag (else Last-Modified) shows.
    """
    m = _CONTENT_RANGE.fullmatch(resp.headers.get("content-range", "").strip())
    if resp.status_code != 206 or m is None or m.group(3) != str(size):
        return False
    if (int(m.group(1)), int(m.group(2))) != r:
        return False
    if validator is None:
        return True
    side = {"etag" if validator.startswith(('"', "W/")) else "last_modified": validator}
    got = resp.headers
    return _changed_since(side, got.get("etag"), got.get("last-modified"), None) is None


def _attempt_segmented(ctx: _Ctx, job: Job, where: _Where) -> Outcome:
    # The first range's answer, closed whatever stops the attempt before its body is read
    # (a partial file that cannot be made, say): left open, its body stayed on the
    # thread's connection, and the next request there read it as its answer's head.
    held: list[httpx.Response] = []
    try:
        return _attempt_segmented_into(ctx, job, where, held)
    finally:
        for resp in held:
            resp.close()


def _attempt_segmented_into(
    ctx: _Ctx, job: Job, where: _Where, held: list[httpx.Response]
) -> Outcome:
    """One attempt at a big new or changed file as ``--segments`` byte ranges at once.

    The first range's answer brings the validator (ETag, else Last-Modified); every other
    range is asked for with it in ``If-Range``, so all the pieces are of one version. The
    ranges wait in a queue taken by this thread and by helper threads, each on a
    connection of its own, started only while a token of the cap is free at once
    (:meth:`ThreadConnTransport.helper`): with none free this thread takes every range in
    turn, and nothing waits for a connection that a waiting thread holds. Each piece is
    written at its offset in the partial file; the sidecar keeps the ranges, their
    validator and those finished (its validator is under a key of its own, so the plain
    resume never takes this file for a prefix). An attempt that finds such a sidecar goes
    on from it: the first range left is asked with ``If-Range``, and a whole answer (the
    file changed) starts over. A server that ignores ``Range``, or sends no validator, gets
    the plain attempt instead.
    """
    f = job.file
    size = f.size
    assert size is not None
    transport = ctx.transport
    assert isinstance(transport, ThreadConnTransport)
    part, meta = where.partial()
    side = _segmented_partial(where, f)
    resp: httpx.Response | None = None
    if side is not None:
        ranges, done, validator = side["ranges"], side["done"], side["validator"]
        left = [r for r in ranges if r not in done] or [ranges[-1]]  # (headers for the end)
        done.discard(left[0])
        a, b = left[0]
        resp, answered_by = _send(
            ctx, f.url, {**ctx.headers, "Range": f"bytes={a}-{b}", "If-Range": validator}
        )
        held.append(resp)
        if not _range_answer(resp, left[0], size, validator):
            resp.close()
            if resp.status_code not in (200, 206):
                raise _status_error(resp, f.url)
            _discard(where)  # another version now (or a range answered wrongly): over
            resp = None
    if resp is None:
        done = set()
        # twice as many ranges as connections, so that one slow connection is not the tail
        n = max(1, min(2 * ctx.t.segments, size // (SEGMENT_MIN // 4)))
        step = -(-size // n)
        ranges = [(a, min(a + step, size) - 1) for a in range(0, size, step)]
        left = ranges
        headers = {**ctx.headers, "Range": f"bytes=0-{ranges[0][1]}"}
        _add_conditions(headers, job, where.final)  # as for a whole update: 304 if not changed
        resp, answered_by = _send(ctx, f.url, headers)
        held.append(resp)
        if resp.status_code == 304:
            resp.close()
            return _unchanged(job, where.final)
        validator = _if_range_value(resp.headers.get("etag"), resp.headers.get("last-modified"))
        if not _range_answer(resp, ranges[0], size, None) or not validator:
            resp.close()
            if resp.status_code not in (200, 206):
                raise _status_error(resp, f.url)
            return _attempt(ctx, job, where, True)  # no ranges, or none safe to join: whole
        _ensure_dir(str(part.parent), ctx.known_dirs)
        fd = os.open(part, _PARTIAL_FLAGS | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    got = _header_map(resp)
    piece_headers = _for_origin(ctx.headers, f.url, answered_by)  # (redirected to an alias)
    lock = threading.Lock()
    finished: set[tuple[int, int]] = set(done)

    def save() -> None:  # under ``lock``: the sidecar says which ranges are in
        state = {"url": f.url, "size": size, "validator": validator, "ranges": ranges,
                 "done": sorted(finished)}  # fmt: skip
        write_json(meta, state)

    with lock:
        save()
    todo = list(reversed(left[1:]))  # popped from the end: in order
    failures: list[Exception] = []

    def piece(r: tuple[int, int], first: httpx.Response | None) -> None:
        a, b = r
        answer = first
        if answer is None:
            req = httpx.Request(
                "GET",
                file_url(answered_by, ctx.t.root),
                headers={**piece_headers, "Range": f"bytes={a}-{b}", "If-Range": validator},
                extensions=ctx.extensions,
            )
            answer = transport.handle_request(req)
        try:
            if not _range_answer(answer, r, size, validator):
                raise RangeMismatch(
                    f"{f.url} changed, or a range was answered wrongly, while fetched in"
                    f" {len(ranges)} segments (HTTP {answer.status_code}, Content-Range"
                    f" {answer.headers.get('content-range')!r} for bytes {a}-{b})"
                )
            out = os.open(part, _PARTIAL_FLAGS)
            try:
                os.lseek(out, a, os.SEEK_SET)
                got_n = _stream_body(ctx, answer, out, "wb", None)
            finally:
                os.close(out)
            if got_n != b - a + 1:
                raise IncompleteDownload(f"got {got_n} of {b - a + 1} bytes of a range of {f.url}")
            with lock:
                finished.add(r)
                save()
        finally:
            answer.close()

    def take() -> tuple[int, int] | None:
        with lock:
            return None if failures or not todo else todo.pop()

    def helper() -> None:
        transport.helper()
        try:
            while (r := take()) is not None:
                try:
                    piece(r, None)
                except NoToken:
                    with lock:
                        todo.append(r)  # back for a thread that has a connection
                    return
                except Exception as exc:  # noqa: BLE001 - raised by the attempt
                    with lock:
                        failures.append(exc)
                    return
        finally:
            transport.close_mine()

    helpers: list[threading.Thread] = []

    def more_helpers() -> None:
        # up to --segments connections on this file; tried again before each range this
        # thread takes, since tokens come free as other transfers end
        with lock:
            wanted = min(len(todo), ctx.t.segments - 1 - sum(h.is_alive() for h in helpers))
        for _ in range(wanted):
            h = threading.Thread(target=helper, name="segment", daemon=True)
            h.start()
            helpers.append(h)

    try:
        more_helpers()
        piece(left[0], resp)
        while True:
            while (r := take()) is not None:
                more_helpers()
                piece(r, None)
            for h in helpers:
                h.join()
            # a helper that found no connection gave its range back, maybe after this
            # thread had found the queue empty: those are this thread's now
            with lock:
                if failures or not todo:
                    break
    except Exception as exc:  # noqa: BLE001 - the helpers stop taking ranges; raised below
        with lock:
            failures.append(exc)
    finally:
        for h in helpers:
            h.join()
    if failures:
        raise failures[0]
    if finished != set(ranges):  # (cannot happen; a hole must never be published)
        raise IncompleteDownload(f"{len(set(ranges) - finished)} ranges of {f.url} missing")
    last_mod = got.get("last-modified")
    mtime = _parse_last_modified(last_mod) or f.mtime
    _name_partial(ctx, where, part, mtime, job)
    meta.unlink(missing_ok=True)
    return Outcome(
        f.path,
        f.url,
        Status.FETCHED,
        size=size,
        received=sum(b - a + 1 for a, b in finished - done),  # this attempt's, not a resume's
        mtime=mtime,
        etag=got.get("etag"),
        last_modified=last_mod,
        stamp=f.stamp,
    )


def write_json(meta: Path, data: Any) -> None:
    """``meta`` holds ``data`` (JSON), whole: written beside it, then renamed over it (a
    partial file's sidecar; the list of staged metadata being published)."""
    tmp = meta.with_name(meta.name + ".tmp")
    fd = os.open(tmp, _PARTIAL_FLAGS | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        write_all(fd, json.dumps(data).encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(tmp, meta)


def _read_back(f: RemoteFile) -> bool:
    """Metadata that names other metadata (``repomd.xml``, ``Release``), crawled from the
    listings: read back before it is published, to see that DEST holds what it names
    (:func:`fetcher.repo_refs.disagreement`). From ``--index``, its digest already ties
    it to the copy the run's file list came from."""
    return f.checksum is None and is_top_metadata(f.path)


def _name_partial(ctx: _Ctx, where: _Where, part: Path, mtime: float | None, job: Job) -> None:
    """The checked partial file takes its final name (and the server's time), atomically."""
    f = job.file
    if _read_back(f):
        from fetcher.repo_refs import disagreement

        why = disagreement(f.path, part.read_bytes(), ctx.t, job.gone)
        if why is not None:
            _discard(where)
            raise StaleIndex(
                f"{f.path} not published: {why} (rewritten upstream during the run?);"
                " the next run fetches what it names"
            )
    _ensure_dir(os.path.dirname(where.target), ctx.known_dirs)
    if mtime is not None:
        os.utime(part, (mtime, mtime))
    move_into(part, where.target)


def _hidden_name(directory: str | Path) -> str:
    """A fresh hidden name in ``directory`` for a file about to be renamed over its own
    (``tempfile.mkstemp``'s prefix, for when the file exists already)."""
    return os.path.join(directory, f".fetch-{secrets.token_hex(8)}")


def move_into(part: Path, target: str) -> None:
    """``os.replace(part, target)``, also where ``target``'s directory lies on another
    filesystem than DEST's partial files: a disk mounted inside DEST (or linked into it)
    for a big part of the mirror, which no rename reaches (EXDEV: every file there
    failed, on every run, after its whole body came in). There the checked file is
    copied into an unnamed file beside ``target`` that then takes the name, so the name
    holds the old file or all of the new one, and a run killed while it copies leaves
    nothing in the mirror."""
    try:
        os.replace(part, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    directory = os.path.dirname(target)
    out = _Out()
    tmp = None
    try:
        if not out.open_unnamed(directory):  # (no O_TMPFILE there: a hidden name instead)
            out.fd, tmp = tempfile.mkstemp(prefix=".fetch-", dir=directory)
        with open(part, "rb") as src:
            st = os.fstat(src.fileno())
            done = 0
            while done < st.st_size:
                n = os.sendfile(out.fd, src.fileno(), done, st.st_size - done)
                if n == 0:
                    raise IncompleteDownload(f"{part} shrank while it was copied")
                done += n
        with contextlib.suppress(PermissionError):  # FAT, exFAT: modes are the mount's
            os.fchmod(out.fd, stat.S_IMODE(st.st_mode))
        os.utime(out.fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        if tmp is None:
            tmp = _hidden_name(directory)
            os.link(f"/proc/self/fd/{out.fd}", tmp, src_dir_fd=out.fd, follow_symlinks=True)
        os.replace(tmp, target)
        tmp = None
    finally:
        out.close()
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    part.unlink()


def _discard(where: _Where) -> None:
    part, meta = where.partial()
    part.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)


def fetch_file(
    transport: httpx.BaseTransport,
    job: Job,
    t: Transfer,
    *,
    retrying: RetryPolicy,
    scope: Scope | None = None,
    limits: SharedLimits | None = None,
    stop: threading.Event | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
    on_retry: Callable[[int, str], None] | None = None,
    known_dirs: set[str] | None = None,
    prepared: httpx.Request | None = None,
    defer: bool = False,
    failed: Exception | None = None,
    failed_at: float | None = None,
) -> Outcome:
    """Fetch ``job`` into ``t.dest``; never raises for a per-file problem.

    A file of a pipelined train whose first attempt fails must not be retried at
    once: its retry would go out of turn, dropping the connection and the answers
    already on their way to the files behind it. With ``defer`` such a failure
    raises :class:`Deferred` instead; ``failed=`` its cause, later, takes the policy
    from there (the failure counts as attempt 1, its wait is waited then, counted from
    ``failed_at``: the waits of several files failed in one train pass together).

    Example::

        with make_transport(transfer) as transport:
            out = fetch_file(transport, job, transfer, retrying=build_retrying(transfer))

    Requests go straight to the transport (the seam; tests pass an
    ``httpx.MockTransport``): redirects are followed here, within scope.
    """
    f = job.file
    ctx = _Ctx(
        transport,
        t,
        scope or Scope.for_start(t.root, t.aliases),
        limits,
        stop,
        on_bytes,
        known_dirs,
        prepared,
    )
    where = _Where(t.dest, f.path, job.stage)
    attempts = 0

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            on_retry(state.attempt_number, str(state.outcome.exception()))

    if job.action is Action.VERIFY:
        kept = _kept_copy(where, f)
        if kept is not None:
            return kept
        job = replace(job, action=Action.CHANGED)  # other bytes than the digest: fetched
    attempts = 1
    try:
        # The first attempt runs bare (as with_retries does; here, made first, so that a
        # deferred one goes back to the runner unjudged), and a failure is replayed to
        # the policy as attempt 1.
        if failed is None:
            try:
                # A small new file's first attempt is the plain GET the runner may have
                # pipelined, and looks for no partial file: the plan saw none, and below
                # RESUME_MIN a body is fetched whole anyway. A retry looks.
                if _segmentable(ctx, job, where):
                    return _attempt_segmented(ctx, job, where)
                return _attempt(ctx, job, where, not pipelinable(job))
            except Interrupted:
                raise
            except Exception as exc:  # noqa: BLE001 - judged by the policy just below
                if defer:
                    raise Deferred(exc) from None
                failed = exc

        def again() -> Outcome:
            nonlocal attempts
            attempts += 1
            if _segmentable(ctx, job, where):
                return _attempt_segmented(ctx, job, where)
            return _attempt(ctx, job, where, True)

        return with_retries(
            retrying, again, failed=failed, failed_at=failed_at, before_sleep=before_sleep
        )
    except Interrupted:
        return Outcome(
            f.path, f.url, Status.FAILED, error="interrupted", attempts=attempts, stamp=f.stamp
        )
    except IsADirectory as exc:
        return Outcome(f.path, f.url, Status.DIRECTORY, error=str(exc), attempts=attempts)
    except TransferError as exc:
        return Outcome(
            f.path, f.url, Status.FAILED, error=str(exc), attempts=attempts, stamp=f.stamp
        )
    except httpx.HTTPError as exc:
        return Outcome(
            f.path,
            f.url,
            Status.FAILED,
            error=f"{type(exc).__name__}: {exc}",
            attempts=attempts,
            stamp=f.stamp,
        )
    except OSError as exc:
        fatal = exc.errno in _FATAL_ERRNOS
        culprit = exc.filename2 or exc.filename or where.final
        return Outcome(
            f.path,
            f.url,
            Status.FAILED,
            error=f"{culprit}: {exc.strerror or exc}",
            attempts=attempts,
            fatal=fatal,
            stamp=f.stamp,
        )


def _kept_copy(where: _Where, f: RemoteFile) -> Outcome | None:
    """DEST's copy of ``f``, unchanged, when its bytes have the SHA-256 ``f`` names (a
    :attr:`Action.VERIFY` job); None when they differ or it cannot be read."""
    assert f.checksum is not None
    try:
        st = os.stat(where.final)
        h = _digest_for(f.checksum, Path(where.final))  # (sha256: decide() asks no other)
    except OSError:
        return None
    if h is None or h.hexdigest() != f.checksum[1].lower():
        return None
    return Outcome(
        f.path, f.url, Status.UNCHANGED, size=st.st_size, mtime=st.st_mtime,
        sha256=h.hexdigest(), stamp=f.stamp,
    )  # fmt: skip


def check_writable(dest: Path) -> None:
    """Raise :class:`FatalIOError` when DEST cannot hold our state and partial files."""
    try:
        partial_dir(dest).mkdir(parents=True, exist_ok=True)
        # unique per thread: a Dask worker checks DEST from several tasks at once
        probe = dest / STATE_DIR / f".probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise unwritable(dest, exc) from exc


def unwritable(dest: Path, exc: OSError, doing: str = "write to") -> FatalIOError:
    """The error for DEST refused: ``cannot write to DEST: [the path in the way: ]why``."""
    where = f"{exc.filename}: " if exc.filename and str(exc.filename) != str(dest) else ""
    return FatalIOError(f"cannot {doing} {dest}: {where}{exc.strerror or exc}")
