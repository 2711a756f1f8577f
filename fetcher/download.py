"""Fetch one file robustly: stream, resume, verify, atomic rename, mtime.

An attempt asks for the file (:mod:`fetcher.exchange`), writes its body where it
waits for its name (:mod:`fetcher.landing`), checks it (length against the listing
and the headers, digest when one is known) and names it. A resume sends ``Range``
with ``If-Range`` from the partial file's sidecar and never splices two versions;
a big file may come in ranges on several connections (:mod:`fetcher.segments`).
:func:`fetch_file` runs the attempts under the retry policy and turns every per-file
failure into an :class:`~fetcher.models.Outcome`.
"""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from msgspec.structs import replace

from fetcher.config import Transfer
from fetcher.errors import (
    ChecksumMismatch,
    IncompleteDownload,
    IsADirectory,
    RangeMismatch,
    TransferError,
)
from fetcher.exchange import (
    CONTENT_RANGE,
    Ctx,
    Interrupted,
    PastListing,
    add_conditions,
    changed_since,
    digest_for,
    header_map,
    if_range_value,
    parse_last_modified,
    send,
    status_error,
    stream_body,
    unchanged,
)
from fetcher.landing import (
    Out,
    Where,
    discard,
    ensure_dir,
    name_partial,
    read_back,
    read_sidecar,
    unnamed_ok,
    write_json,
)
from fetcher.limits import SharedLimits
from fetcher.models import Action, Job, Outcome, RemoteFile, Scope, Status
from fetcher.retry import RetryPolicy, retry_after_seconds, with_retries
from fetcher.segments import attempt_segmented, segmentable

if TYPE_CHECKING:
    import tenacity  # loaded by fetcher.retry when a retry needs it, without tornado

__all__ = ["RESUME_MIN", "Deferred", "fetch_file", "pipelinable"]

RESUME_MIN = 1 << 20  # bodies smaller than this are refetched whole rather than resumed
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_UNSATISFIED = re.compile(r"bytes \*/(\d+)")  # a 416's Content-Range


class Deferred(Exception):
    """``fetch_file(defer=True)``: the first attempt failed, and the policy's say on it
    (a wait, another attempt) is left to ``fetch_file(failed=cause)`` later."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def pipelinable(job: Job) -> bool:
    """A small new file: one lane takes a train of them, their requests sent ahead.

    Its request is the plain GET (no Range, no condition), which is what the transport
    is told to expect; a bigger file, an update or a resume holds a lane to itself.
    """
    size = job.file.size
    return job.action is Action.NEW and size is not None and size <= RESUME_MIN


def _whole_or_ranges(ctx: Ctx, job: Job, where: Where, look: bool) -> Outcome:
    """One attempt: in ranges where ``--segments`` applies and the server gives them,
    else whole (``look``: see :func:`_attempt`)."""
    if segmentable(ctx, job, where):
        out = attempt_segmented(ctx, job, where)
        if out is not None:
            return out
        look = True
    return _attempt(ctx, job, where, look)


def _attempt(ctx: Ctx, job: Job, where: Where, look: bool) -> Outcome:
    out = Out()
    try:
        return _attempt_into(ctx, job, where, look, out)
    finally:
        out.close()


def _attempt_into(ctx: Ctx, job: Job, where: Where, look: bool, out: Out) -> Outcome:
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
        side = read_sidecar(meta, f.url) if part.exists() else None
    if side is not None:
        validator = if_range_value(side.get("etag"), side.get("last_modified"))
        size = part.stat().st_size
        if validator and size > 0:
            offset = size
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = validator
    if offset == 0:
        add_conditions(headers, job, final)

    resp, answered_by = send(ctx, f.url, headers)
    # The listing's exact size, which the body must have (after a redirect the listing
    # described the link, not the target): checked before, during and after the body.
    exact = f.size if f.size_exact and answered_by == f.url else None
    got = header_map(resp)
    try:
        status = resp.status_code
        if status == 304:
            return unchanged(job, final)
        whole = False
        if status == 416 and offset:
            whole = _whole_already(side, got, offset, exact)
            if not whole:
                # Our partial is not a prefix of what the server has now: start over.
                discard(where)
                raise RangeMismatch(f"server refused range {offset}- for {f.url}")
        elif status not in (200, 206):
            if status in (429, 503):
                ra = retry_after_seconds(got.get("retry-after"))
                if ra and ctx.limits is not None:
                    ctx.limits.pause(min(ra, t.retry_after_cap))
            raise status_error(resp, f.url)
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
            m = CONTENT_RANGE.fullmatch(got.get("content-range", "").strip())
            if not offset or not m or int(m.group(1)) != offset:
                discard(where)
                raise RangeMismatch(
                    f"206 with Content-Range {got.get('content-range')!r}"
                    f" for a request from byte {offset}; not spliced"
                )
            total = None if m.group(3) == "*" else int(m.group(3))
            changed = changed_since(side, etag, last_mod, total)
            if changed:
                # A server or cache that honours Range but ignores If-Range.
                discard(where)
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
                discard(where)
                raise IncompleteDownload(
                    f"{f.url} is {total} bytes (Content-Length), the listing says {f.size}"
                )
        # We asked for identity.  A server that sends Content-Encoding anyway (a .gz file
        # served as "gzip") sends the bytes as stored: iter_raw() keeps them undecoded,
        # and Content-Length counts those raw bytes.
        resumable = total is None or total - offset > RESUME_MIN
        # A small new file from its first byte can be written unnamed (see Out); an
        # update replaces a file, and a resume appends to its partial file. Staged
        # metadata, and an index read back before it is published, go to it too.
        unnamed = not resumable and not offset and job.action is Action.NEW
        unnamed = unnamed and not job.stage and not read_back(f)
        if not (unnamed and unnamed_ok(where, out, ctx.known_dirs)):
            part, meta = where.partial()
            ensure_dir(str(part.parent), ctx.known_dirs)
            # The partial file first (a 200 truncates the older version's bytes), then its
            # sidecar, whole or not at all: a kill between the two must not leave the new
            # version's validator over the old bytes (the next resume would splice them).
            out.open_partial(part, mode)
            if resumable and if_range_value(etag, last_mod):
                # The validator survives a crash with the partial file, so a later run can
                # resume with If-Range; small files just start over (one write less each).
                side_data = {"url": f.url, "etag": etag, "last_modified": last_mod, "size": total}
                write_json(meta, side_data)
            elif mode == "wb" and look:
                meta.unlink(missing_ok=True)  # an older version's, over these new bytes
        digest = digest_for(f.checksum, where.partial()[0] if offset else None)
        # A body of no stated length (chunked, or to the close) is cut off past the
        # listing's exact size: a hostile server's never ends, and filled the disk.
        cap = exact - offset if exact is not None else None
        try:
            received = 0 if whole else stream_body(ctx, resp, out.fd, mode, digest, cap)
        except PastListing:
            discard(where)
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
        discard(where)
        raise IncompleteDownload(f"got {size} bytes, the listing says {f.size}, for {f.url}")
    sha256 = None
    if digest is not None and f.checksum is not None:
        algo, want = f.checksum
        got = digest.hexdigest()
        if got.lower() != want.lower():
            discard(where)
            raise ChecksumMismatch(f"{algo} mismatch for {f.url}: expected {want}, got {got}")
        if algo == "sha256":
            sha256 = got
    mtime = parse_last_modified(last_mod) or f.mtime
    if out.unnamed:
        out.publish(where, mtime)
    else:
        part, meta = where.partial()
        on_disk = os.fstat(out.fd).st_size
        out.close()
        if on_disk != size:
            # Someone else wrote into it: a worker of a killed run, still winding down
            # (for up to a second), into the partial file this run resumed.
            discard(where)
            raise IncompleteDownload(
                f"the partial file of {f.url} holds {on_disk} bytes where {size} came"
            )
        name_partial(where, part, mtime, job, ctx.t, ctx.known_dirs)
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


def _whole_already(
    side: dict[str, Any] | None, got: Mapping[str, str], offset: int, exact: int | None
) -> bool:
    """A 416 to a resume from byte ``offset`` says the partial file holds the whole file:
    the server's length (``Content-Range: bytes */N``) is ``offset``, as the sidecar and
    the listing (``exact``) say it was, and the answer names no other version.

    The resume asked with ``If-Range``: a server that honours it answers a changed file
    whole (200), so its 416 is about the partial's version (nginx sends no validator with
    it). One that names a version is held to it, as a 206 is (:func:`changed_since`).
    Without ``Content-Range`` (Apache, lighttpd) nothing says how long the file is: it is
    fetched again."""
    m = _UNSATISFIED.fullmatch(got.get("content-range", "").strip())
    if side is None or m is None or int(m.group(1)) != offset:
        return False
    if side.get("size") != offset or (exact is not None and exact != offset):
        return False
    return changed_since(side, got.get("etag"), got.get("last-modified"), offset) is None


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
    ctx = Ctx(
        transport,
        t,
        scope or Scope.for_start(t.root, t.aliases),
        limits,
        stop,
        on_bytes,
        known_dirs,
        prepared,
    )
    where = Where(t.dest, f.path, job.stage)
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
                return _whole_or_ranges(ctx, job, where, not pipelinable(job))
            except Interrupted:
                raise
            except Exception as exc:  # noqa: BLE001 - judged by the policy just below
                if defer:
                    raise Deferred(exc) from None
                failed = exc

        def again() -> Outcome:
            nonlocal attempts
            attempts += 1
            return _whole_or_ranges(ctx, job, where, True)

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


def _kept_copy(where: Where, f: RemoteFile) -> Outcome | None:
    """DEST's copy of ``f``, unchanged, when its bytes have the SHA-256 ``f`` names (a
    :attr:`Action.VERIFY` job); None when they differ or it cannot be read."""
    assert f.checksum is not None
    try:
        st = os.stat(where.final)
        h = digest_for(f.checksum, Path(where.final))  # (sha256: decide() asks no other)
    except OSError:
        return None
    if h is None or h.hexdigest() != f.checksum[1].lower():
        return None
    return Outcome(
        f.path, f.url, Status.UNCHANGED, size=st.st_size, mtime=st.st_mtime,
        sha256=h.hexdigest(), stamp=f.stamp,
    )  # fmt: skip
