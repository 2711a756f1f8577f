"""``--segments``: one big file in byte ranges on several connections at once.

Each range is asked for with ``If-Range`` naming the version the first range came
from, written at its offset in the partial file; the sidecar keeps which ranges are
in, so a later attempt goes on from there. A server that ignores ``Range`` or names
no version gets the whole-file attempt instead (:func:`attempt_segmented` says so).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

import httpx

from fetcher.errors import IncompleteDownload, RangeMismatch
from fetcher.exchange import (
    CONTENT_RANGE,
    Ctx,
    add_conditions,
    changed_since,
    for_origin,
    header_map,
    if_range_value,
    parse_last_modified,
    send,
    status_error,
    stream_body,
    unchanged,
)
from fetcher.http1 import NoToken, ThreadConnTransport
from fetcher.landing import (
    PARTIAL_FLAGS,
    Where,
    discard,
    ensure_dir,
    name_partial,
    read_sidecar,
    write_json,
)
from fetcher.models import Action, Job, Outcome, RemoteFile, Status
from fetcher.transport import file_url

__all__ = ["SEGMENT_MIN", "attempt_segmented", "segmentable"]


SEGMENT_MIN = 16 << 20
"""Files from this size up are fetched in byte ranges with ``--segments`` (each at least
a quarter of this)."""


def segmentable(ctx: Ctx, job: Job, where: Where) -> bool:
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


def _segmented_partial(where: Where, f: RemoteFile) -> dict[str, Any] | None:
    """The sidecar of an earlier segmented attempt at this file (same URL and size, its
    partial file still there): its ranges, the validator they were asked with, and the
    ones finished. None when there is none, or not such a one."""
    part, meta = where.partial()
    side = read_sidecar(meta, f.url)
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
    m = CONTENT_RANGE.fullmatch(resp.headers.get("content-range", "").strip())
    if resp.status_code != 206 or m is None or m.group(3) != str(size):
        return False
    if (int(m.group(1)), int(m.group(2))) != r:
        return False
    if validator is None:
        return True
    side = {"etag" if validator.startswith(('"', "W/")) else "last_modified": validator}
    got = resp.headers
    return changed_since(side, got.get("etag"), got.get("last-modified"), None) is None


def attempt_segmented(ctx: Ctx, job: Job, where: Where) -> Outcome | None:
    """One attempt at ``job`` in ranges (see :func:`_attempt_segmented_into`); None when
    the server gave no ranges, or none safe to join: the file is for a whole attempt."""
    # The first range's answer, closed whatever stops the attempt before its body is read
    # (a partial file that cannot be made, say): left open, its body stayed on the
    # thread's connection, and the next request there read it as its answer's head.
    held: list[httpx.Response] = []
    try:
        return _attempt_segmented_into(ctx, job, where, held)
    finally:
        for resp in held:
            resp.close()


def _finished(
    ctx: Ctx, job: Job, where: Where, side: dict[str, Any], held: list[httpx.Response]
) -> Outcome | None:
    """Every range of an earlier attempt is in: a run stopped after the last one came and
    before the file took its name (a big image's fsync). Its last byte, asked with
    ``If-Range``, says the server still has that version and brings the headers to name
    it by: the file is named, where it had fetched its last range again (an eighth of a
    4 GiB image). None, the partial file discarded, when the server has another version."""
    f = job.file
    size = f.size
    assert size is not None
    last = (size - 1, size - 1)
    resp, _ = send(
        ctx, f.url, {**ctx.headers, "Range": f"bytes={size - 1}-", "If-Range": side["validator"]}
    )
    held.append(resp)
    if not _still(resp, last, size, side["validator"], where, f.url):
        return None
    got = header_map(resp)
    byte = resp.read()
    with open(where.partial()[0], "rb") as fh:
        fh.seek(size - 1)
        if fh.read(1) != byte:  # (a server that ignores If-Range and sends another version)
            discard(where)
            return None
    return _named(ctx, job, where, got, 0)


def _still(
    resp: httpx.Response, r: tuple[int, int], size: int, validator: str, where: Where, url: str
) -> bool:
    """``resp`` is bytes ``r`` of the version the partial file holds (see :func:`_range_answer`).
    Else it is closed, a status that is no answer to a range raised, and the partial file
    discarded: the server has another version now (or answered the range wrongly)."""
    if _range_answer(resp, r, size, validator):
        return True
    resp.close()
    if resp.status_code not in (200, 206):
        raise status_error(resp, url)
    discard(where)
    return False


def _named(ctx: Ctx, job: Job, where: Where, got: Mapping[str, str], received: int) -> Outcome:
    """The partial file, all its ranges in, named by the answer's headers ``got``."""
    f = job.file
    assert f.size is not None
    part, meta = where.partial()
    last_mod = got.get("last-modified")
    mtime = parse_last_modified(last_mod) or f.mtime
    name_partial(where, part, mtime, job, ctx.t, ctx.known_dirs)
    meta.unlink(missing_ok=True)
    return Outcome(
        f.path, f.url, Status.FETCHED, size=f.size, received=received, mtime=mtime,
        etag=got.get("etag"), last_modified=last_mod, stamp=f.stamp,
    )  # fmt: skip


def _attempt_segmented_into(
    ctx: Ctx, job: Job, where: Where, held: list[httpx.Response]
) -> Outcome | None:
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
    if side is not None and side["done"] == set(side["ranges"]):
        named = _finished(ctx, job, where, side, held)
        if named is not None:
            return named
        side = None  # (discarded: another version now)
    if side is not None:
        ranges, done, validator = side["ranges"], side["done"], side["validator"]
        left = [r for r in ranges if r not in done]
        done.discard(left[0])
        a, b = left[0]
        resp, answered_by = send(
            ctx, f.url, {**ctx.headers, "Range": f"bytes={a}-{b}", "If-Range": validator}
        )
        held.append(resp)
        if not _still(resp, left[0], size, validator, where, f.url):
            resp = None  # over
    if resp is None:
        done = set()
        # twice as many ranges as connections, so that one slow connection is not the tail
        n = max(1, min(2 * ctx.t.segments, size // (SEGMENT_MIN // 4)))
        step = -(-size // n)
        ranges = [(a, min(a + step, size) - 1) for a in range(0, size, step)]
        left = ranges
        headers = {**ctx.headers, "Range": f"bytes=0-{ranges[0][1]}"}
        add_conditions(headers, job, where.final)  # as for a whole update: 304 if not changed
        resp, answered_by = send(ctx, f.url, headers)
        held.append(resp)
        if resp.status_code == 304:
            resp.close()
            return unchanged(job, where.final)
        validator = if_range_value(resp.headers.get("etag"), resp.headers.get("last-modified"))
        if not _range_answer(resp, ranges[0], size, None) or not validator:
            resp.close()
            if resp.status_code not in (200, 206):
                raise status_error(resp, f.url)
            return None  # no ranges, or none safe to join: the file is fetched whole
        ensure_dir(str(part.parent), ctx.known_dirs)
        fd = os.open(part, PARTIAL_FLAGS | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    got = header_map(resp)
    piece_headers = for_origin(ctx.headers, f.url, answered_by)  # (redirected to an alias)
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
            out = os.open(part, PARTIAL_FLAGS)
            try:
                os.lseek(out, a, os.SEEK_SET)
                got_n = stream_body(ctx, answer, out, "wb", None)
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
    return _named(
        ctx, job, where, got, sum(b - a + 1 for a, b in finished - done)
    )  # (not a resume's)
