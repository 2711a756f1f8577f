"""The coordinator: the only place that knows the order of the stages.

``mirror(job)`` crawls in a background thread, plans each file against the
state as it arrives, packs jobs into shards for the executor, and consumes the
executor's events: progress, state writes, post-processing.  Repository
metadata is published last; deletion waits for a complete, error-free crawl.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import queue
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
from msgspec.structs import replace

from fetcher.config import MirrorJob, Transfer
from fetcher.crawl import CrawlItem, CrawlOptions, Intact, crawl
from fetcher.disk import Disk
from fetcher.download import pipelinable
from fetcher.errors import FatalIOError, FetchError
from fetcher.executor import Executor, LocalExecutor
from fetcher.http1 import ThreadConnTransport, pipelined_lanes
from fetcher.landing import check_writable, move_into, staged_path, unwritable, write_json
from fetcher.limits import SharedLimits, local_limits
from fetcher.models import (
    STATE_DIR,
    BytesEvent,
    Counts,
    CrawlProblem,
    Event,
    FileDone,
    FileStarted,
    Job,
    Listing,
    Notice,
    Outcome,
    RelPath,
    RemoteDir,
    RemoteFile,
    Reporter,
    Retried,
    Status,
    Summary,
    UnchangedDir,
    WorkerFatal,
)
from fetcher.plan import (
    ListingClock,
    LocalFile,
    decide,
    is_metadata,
    publish_step,
    wanted,
)
from fetcher.procs import fork_safe, worker_context
from fetcher.prune import below_any, drop_partials, local_files, not_seen, prune
from fetcher.shard import make_shards
from fetcher.state import RunLock, State
from fetcher.transport import make_client, make_transport, tls_context

if TYPE_CHECKING:  # post-processing is imported when a run asks for it (--post)
    from fetcher.ffmpeg import FFmpeg
    from fetcher.postprocess import PostOutcome, PostPool

__all__ = ["Reporter", "mirror"]  # Reporter lives in fetcher.models; re-exported

_BATCH = 64  # crawl items handed to the coordinator at once, at most
_AHEAD = 20_000  # files planned but not finished before the crawl is made to wait
_CRAWL_DONE = object()


class _Run(msgspec.Struct):
    """One run's working state in the coordinator."""

    job: MirrorJob
    dest: Path
    state: State
    run_id: int
    summary: Summary
    reporter: Reporter
    outstanding: dict[str, Job] = msgspec.field(default_factory=dict)
    held: list[Job] = msgspec.field(default_factory=list)
    held_back: bool = False  # repository metadata not published: other files failed
    # fetched metadata waiting under .fetcher/staged/ to be published together (Job.stage)
    staged: list[Outcome] = msgspec.field(default_factory=list)
    unsure: bool = False  # a listing may have been cut short (CrawlProblem "unsure")
    uncrawled: set[str] = msgspec.field(default_factory=set)  # directories past --depth
    batch: list[Job] = msgspec.field(default_factory=list)
    crawl_complete: bool = False
    pipelined: bool | None = None  # the crawl's requests sent ahead were answered (state)
    kept: dict[str, Listing] | None = None  # the listings the last run kept (if used)
    listed: set[str] = msgspec.field(default_factory=set)  # the listings this run read or kept
    crawlers: int = 0
    # batches of at most _BATCH crawl items, and _CRAWL_DONE once per crawl
    inbox: queue.Queue[Any] = msgspec.field(
        default_factory=lambda: queue.Queue(maxsize=10_000 // _BATCH)
    )
    stop: threading.Event = msgspec.field(default_factory=threading.Event)
    limits: SharedLimits | None = None
    threads: list[threading.Thread] = msgspec.field(default_factory=list)
    transports: list[ThreadConnTransport] = msgspec.field(default_factory=list)  # the crawls'
    post: PostPool | None = None
    derived: Path | None = None
    failed_posts: set[str] = msgspec.field(default_factory=set)  # outputs with a FailedPost
    executor: Executor | None = None
    fork: bool = False  # local workers come from a fork of this process (procs.fork_safe)
    seen_dirs: set[str] = msgspec.field(default_factory=set)
    # the files of directories found unchanged (UnchangedDir): seen upstream by this run,
    # told to prune from here rather than by a last_seen written to each of their rows
    unchanged: set[str] = msgspec.field(default_factory=set)
    disk: Disk | None = None
    clock: ListingClock = msgspec.field(
        default_factory=ListingClock
    )  # the listing's zone (adoption)
    # files another tool may have put in DEST, if the listing's zone is this far from UTC
    unsure_zone: dict[int, list[tuple[Job, LocalFile]]] = msgspec.field(default_factory=dict)


def mirror(
    job: MirrorJob,
    reporter: Reporter | None = None,
    *,
    stop: threading.Event | None = None,
) -> Summary:
    """Mirror ``job.url`` into ``job.dest``; returns the run's :class:`Summary`.

    Raises :class:`~fetcher.errors.LockHeld` or :class:`~fetcher.errors.FatalIOError`
    before anything starts when DEST is busy or unwritable.
    """
    rep = reporter or Reporter()
    dest = job.dest.absolute()
    summary = Summary(url=job.url, dest=str(dest), started=time.time(), dry_run=job.dry_run)
    ffmpeg = None
    derived = job.derived_root()
    if job.post:
        from fetcher.postprocess import check_derived
        from fetcher.postrules import require_ffmpeg

        ffmpeg = None if job.dry_run else require_ffmpeg(job.post)
        check_derived(dest, derived)
        # else every file is fetched, then each of its outputs fails with the same errno
        _could_write(derived)
    if job.dry_run:
        _could_write(dest)  # a plan the real run could not carry out is not a plan
        state = State.open(dest, readonly=True)
        return _run_with_state(job, dest, state, summary, rep, stop, None, derived)
    if job.executor == "dask":
        from fetcher.dask_executor import check_scheduler

        check_scheduler(job.scheduler, job.connect_timeout)  # before DEST, its lock, its state
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        if not dest.exists():  # (a dangling symlink: nothing there to name)
            raise unwritable(dest, exc, "create") from exc
        # a file: "cannot create DEST: File exists" read as if DEST were made already
        raise unwritable(dest, NotADirectoryError(errno.ENOTDIR, "Not a directory")) from exc
    except OSError as exc:
        raise unwritable(dest, exc, "create") from exc
    lock = RunLock(dest)
    try:
        lock.acquire()
    except OSError as exc:
        raise unwritable(dest, exc) from exc
    try:
        check_writable(dest)
        _drop_staged(dest)  # a killed run's
        state = State.open(dest)
        return _run_with_state(job, dest, state, summary, rep, stop, ffmpeg, derived)
    finally:
        lock.release()


def _could_write(dest: Path) -> None:
    """Raise the real run's error if it could not make or write DEST (a file there, or
    under it; read-only or not ours), without writing anything: a dry run's check."""
    probe = dest
    while not probe.exists():
        if probe.is_symlink():  # dangling: the real run's mkdir fails on it as well
            raise unwritable(
                dest, FileExistsError(errno.EEXIST, "File exists", str(probe)), "create"
            )
        probe = probe.parent
    if not probe.is_dir():
        doing = "create" if probe != dest else "write to"
        raise unwritable(
            dest, NotADirectoryError(errno.ENOTDIR, "Not a directory", str(probe)), doing
        )
    if not os.access(probe, os.W_OK | os.X_OK):  # (false for root on a read-only mount too)
        ro = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        why = (errno.EROFS, "Read-only file system") if ro else (errno.EACCES, "Permission denied")
        raise unwritable(dest, OSError(*why, str(probe)))


def _run_with_state(
    job: MirrorJob,
    dest: Path,
    state: State,
    summary: Summary,
    rep: Reporter,
    stop: threading.Event | None,
    ffmpeg: FFmpeg | None,
    derived: Path,
) -> Summary:
    try:
        run = _Run(job, dest, state, state.begin_run(job.url), summary, rep)
        run.disk = Disk(dest, state)
        if stop is not None:
            run.stop = stop
        if ffmpeg is not None:
            run.derived = derived
            from fetcher.postprocess import PostPool

            failed = state.failed_posts()
            run.failed_posts = set(failed)
            run.post = PostPool(
                ffmpeg, job.post, dest, derived, jobs=job.post_jobs,
                failed=failed, retry_failed=job.retry_failed_post,
            )  # fmt: skip
        try:
            _coordinate(run)
            if not summary.dry_run or job.delete:
                prune(
                    job, summary, state, run.run_id, dest,
                    blocked=_delete_blocked(run), seen_dirs=run.seen_dirs, derived=run.derived,
                    new_dirs=run.disk.fresh, unchanged=run.unchanged, found=run.disk.found,
                    uncrawled=run.uncrawled,
                )  # fmt: skip
            if not summary.dry_run and _crawl_clean(run):
                # partial files of a killed run that nothing upstream stands for any more
                drop_partials(dest, (path for path, _ in summary.failed))
            if run.kept and _crawl_clean(run):
                # directories gone upstream (or out of the selection): their kept listings go
                state.forget_listings([url for url in run.kept if url not in run.listed])
            summary.finished = time.time()
            state.end_run(run.run_id, _crawl_clean(run), summary.exit_code, run.pipelined)
        except FatalIOError as exc:
            # e.g. the disk filled up under the state database: still report the run
            summary.fatal = summary.fatal or _with_hint(exc)
            summary.finished = time.time()
        finally:
            if run.executor is not None:
                # The workers were told to end when the downloads were over, and have
                # been exiting while the run was wound up here: wait for them now.
                run.executor.join(timeout=10)
                run.executor.kill()
            if not summary.dry_run:
                _drop_staged(dest)  # what a stopped run did not publish
    finally:
        try:
            state.close()
        except FatalIOError as exc:
            summary.fatal = summary.fatal or _with_hint(exc)
    return summary


def _with_hint(exc: FetchError) -> str:
    return f"{exc.message}; {exc.hint}" if exc.hint else exc.message


def _crawl_clean(run: _Run) -> bool:
    s = run.summary
    return (
        run.crawl_complete
        and not s.listing_errors
        and not run.unsure
        and not s.interrupted
        and not s.fatal
    )


def _delete_blocked(run: _Run) -> str | None:
    """Why ``--delete`` may not act on this run, or None."""
    if not _crawl_clean(run):
        return (
            "the crawl was incomplete, had listing errors or read a listing that may be cut short"
        )
    if run.held_back:
        # the old metadata is what clients read, and it may list what is gone upstream
        return (
            "the new repository metadata was not published (other files failed), and the "
            "old may still list what is gone upstream"
        )
    return None


def _start_crawl(run: _Run, root: str, prefix: str = "") -> None:
    """Crawl below ``root`` in a thread; items go to ``run.inbox``, paths under ``prefix``."""
    job = run.job
    t = replace(job.transfer(), root=root)
    opts = CrawlOptions(
        depth=job.depth - (prefix.count("/") + 1 if prefix else 0),
        include=job.include,
        exclude=job.exclude,
        concurrency=max(1, job.max_connections),
        listing_rate=job.listing_rate,
        max_listing_bytes=job.max_listing_bytes,
        min_rate=job.min_rate,
        min_rate_time=job.min_rate_time,
        verify=job.verify_digests,
        suites=job.suites,
        components=job.components,
        architectures=job.architectures,
    )
    inbox, stop = run.inbox, run.stop
    assert run.limits is not None
    # pipelined from the first request when the last run's were answered
    trusted = not prefix and run.state.pipelined(job.url)
    # pages as the last run read them: not parsed again while DEST is as it left it
    kept = not prefix and job.index == "html" and not job.post and not job.dry_run
    listings = run.kept = run.state.listings() if kept else None
    # where the last run found files: their listings are asked for at once (see crawl()).
    # With its listings kept, the directories it read say as much from a row each (50
    # directories: 0.1 ms, against 5 ms for 5,000 files' URLs, before the first request).
    if prefix or job.index != "html":
        known: Sequence[str] = ()
    else:
        known = sorted(listings) if listings else run.state.directories()
    intact = run.disk.intact if kept and run.disk is not None else None

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                inbox.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    # Items go on in batches: a listing's files at once (the crawl says when it is about
    # to wait for the next listing), not one hand-off between two threads per file.
    batch: list[CrawlItem] = []

    def flush() -> None:
        if batch:
            items = batch.copy()
            batch.clear()
            put(items)

    # Listings in flight: every connection while there is nothing to download (a
    # re-sync that finds nothing new is all listings), else half of them, the rest
    # for the downloads; on narrowing, the crawl's idle connections give back their
    # tokens of the cap.
    narrow = max(1, min(8, job.max_connections // 2))

    def body() -> None:
        wide = True

        def width() -> int:
            nonlocal wide
            if not (run.outstanding or run.batch or run.held):
                wide = True
                return opts.concurrency
            if wide:
                wide = False
                close_idle = getattr(transport, "close_idle", None)
                if close_idle is not None:
                    close_idle()
            return narrow

        try:
            # Under a tiny cap the crawl must not sit on a token between listings.
            keep = job.max_connections >= 3
            # listings in trains on a connection (pipelined), as small files are, as deep
            # as the crawl makes them
            depth = pipelined_lanes(opts.concurrency, t.pipeline)[1]
            transport = make_transport(
                t, run.limits, stop, opts.concurrency, keep, depth, trusted=trusted
            )
            if isinstance(transport, ThreadConnTransport):
                run.transports.append(transport)  # (aborted when the run stops)
            with make_client(t, transport=transport) as client:
                ahead = transport if isinstance(transport, ThreadConnTransport) else None
                walk = _walk(
                    job, client, t, opts, stop, prefix, flush, width, ahead, known, listings,
                    intact, transport,
                )  # fmt: skip
                for item in walk:
                    if prefix and isinstance(item, RemoteFile | RemoteDir):
                        item = replace(item, path=RelPath(f"{prefix}/{item.path}"))
                    elif prefix and isinstance(item, CrawlProblem) and item.path:
                        item = replace(item, path=f"{prefix}/{item.path}")
                    batch.append(item)
                    if len(batch) >= _BATCH:
                        flush()
            if isinstance(transport, ThreadConnTransport) and not prefix and depth > 1:
                run.pipelined = transport.pipelined
        except FetchError as exc:
            batch.append(CrawlProblem(root, str(exc), "listing"))
        except Exception as exc:  # noqa: BLE001 - the crawl thread must never die silently:
            # a dead crawl would look like an empty mirror (and, with --delete, an empty one).
            batch.append(
                CrawlProblem(root, f"crawl stopped: {type(exc).__name__}: {exc}", "listing")
            )
        finally:
            flush()
            inbox.put(_CRAWL_DONE)

    run.crawlers += 1
    run.crawl_complete = False
    th = threading.Thread(target=body, name="crawl", daemon=True)
    th.start()
    run.threads.append(th)


def _walk(
    job: MirrorJob,
    client: httpx.Client,
    t: Transfer,
    opts: CrawlOptions,
    stop: threading.Event,
    prefix: str,
    on_wait: Callable[[], object],
    width: Callable[[], int],
    ahead: ThreadConnTransport | None,
    known: Sequence[str],
    listings: Mapping[str, Listing] | None = None,
    intact: Intact | None = None,
    transport: httpx.BaseTransport | None = None,
) -> Iterator[CrawlItem]:
    """The file list: from the HTML listings, or from repository metadata (``--index``)."""
    if job.index != "html" and not prefix:
        from fetcher.repo_index import index_files

        return index_files(client, t, opts, job.index, stop=stop, on_wait=on_wait)
    expect, pipelining = (ahead.expect, lambda: ahead.pipelining) if ahead else (None, None)
    return crawl(
        client, t, opts, stop=stop, on_wait=on_wait, width=width, ahead=expect,
        pipelining=pipelining, known=known, listings=listings, intact=intact,
        transport=transport,
    )  # fmt: skip


def _coordinate(run: _Run) -> None:
    job = run.job
    local = job.executor != "dask" and not job.dry_run
    run.fork = local and fork_safe()
    if local:
        ctx = worker_context(run.fork)
        run.limits = SharedLimits.create(job.max_connections, job.limit_rate, ctx)
    else:
        # a dry run, or Dask (whose tasks cap themselves): only this process takes tokens,
        # so no cross-process locks (nor, under forkserver, named semaphores and a tracker)
        run.limits = local_limits(job.max_connections, job.limit_rate)
    try:
        if run.fork:
            _make_executor(run)  # forks the workers' parent, before this process starts a thread
        run.reporter.begin()
        _start_crawl(run, job.url)
        if run.disk is not None:
            run.disk.read_rows(run.inbox.empty, run.kept)
        if not job.dry_run:
            # ready (a Dask client connects) while the first listings are read; local
            # workers from the fork server start with the first shards, so a run with
            # nothing to fetch has none
            _make_executor(run)
        _loop(run)
        if run.stop.is_set() and (
            run.outstanding or run.held or run.batch or not run.crawl_complete
        ):
            run.summary.interrupted = True  # stopped from outside (the caller's stop event)
        if run.post is not None:
            run.summary.downloaded = time.time()
            _finish_post(run)
    except KeyboardInterrupt:
        run.summary.interrupted = True
        run.stop.set()
        if run.post is not None:
            run.post.cancel()
        if run.executor is not None:
            run.executor.stop()
            try:
                _drain(run, deadline=time.monotonic() + 30)
            except KeyboardInterrupt:
                run.executor.kill()
    finally:
        run.stop.set()
        for transport in run.transports:
            transport.abort()  # a listing on its way at the server's pace ends now
        if run.executor is not None:
            run.executor.finish()
            run.executor.stop()  # (joined once the run is wound up: _run_with_state)
        for th in run.threads:
            th.join(timeout=10)
        if run.post is not None:
            if not run.post.closed:
                run.post.cancel()
            _post_outcomes(run, run.post.close(wait=True))  # (what a stop's cancel() left)
        run.state.flush()


def _loop(run: _Run) -> None:
    while True:
        # 1. take what the crawl found, while the workers are not too far behind. Until
        # then this loop waits on the crawl, not on the workers: a shard goes out as soon
        # as a listing brings files, and the workers' news waits a moment.
        crawl_first = run.crawlers and len(run.outstanding) < _AHEAD
        took = 0
        while run.crawlers and len(run.outstanding) < _AHEAD and took < 2000:
            try:
                got = run.inbox.get(timeout=0 if took else 0.05)
            except queue.Empty:
                break
            if got is _CRAWL_DONE:
                took += 1
                run.crawlers -= 1
                if not run.crawlers:
                    # a crawl told to stop ends quietly, its last batches dropped: it is
                    # over, not complete (nor may --delete take its word for what is upstream)
                    run.crawl_complete = not run.stop.is_set()
                    if run.crawl_complete:
                        for waiting in run.unsure_zone.values():  # never trusted: fetched
                            for j, _local in waiting:
                                _plan(run, j)
                    run.unsure_zone.clear()
                    run.reporter.crawl_done()
                continue
            took += len(got)
            for item in got:
                _take(run, item)
            if len(run.batch) >= max(_BATCH, len(run.outstanding)):
                break  # hand these on now: the workers have less than this to do
        if run.summary.fatal or run.stop.is_set():
            break
        # 2. hand full shards on; publish metadata once everything else is in
        if run.batch:
            _submit(run, run.batch)
            run.batch = []
        if run.crawl_complete and not run.outstanding:
            if not run.held:
                _publish_staged(run)
                break
            if run.summary.failed:
                for j in run.held:
                    _failed_here(run, j.file.path, j.file.url, _NOT_PUBLISHED)
                run.held = []
                run.held_back = True
            else:
                # In steps: the indices first, then the files that point at them
                # (repomd.xml, Release, InRelease), so no client sees a dangling index,
                # then their signatures (plan.publish_step); a step waits for the last
                # and is held back if anything in it failed.
                step = min(publish_step(j.file.path) for j in run.held)
                _submit(
                    run,
                    [
                        replace(j, gone=_gone_below(run, j.file.path, run.staged))
                        for j in run.held
                        if publish_step(j.file.path) == step
                    ],
                )
                run.held = [j for j in run.held if publish_step(j.file.path) != step]
            continue
        # 3. events from the workers, and finished post-processing
        if run.post is not None:
            _post_outcomes(run, run.post.poll())
        if run.executor is not None:
            _handle(run, run.executor.events(timeout=0 if crawl_first else 0.05))
            dead = run.executor.dead()
            if dead and run.outstanding:
                run.summary.fatal = f"worker process(es) {dead} died; run again to resume"
                for j in run.outstanding.values():
                    _failed_here(run, j.file.path, j.file.url, "worker process died")
                run.outstanding.clear()
                break


def _publish_staged(run: _Run) -> None:
    """Give the staged metadata its names in DEST, in ``publish_step`` order (the indices,
    then the files that point at them, then their signatures), when every file is in;
    else none of it: an index updated in place (``Packages.gz``) must not stand under an
    older ``Release`` that names other bytes. Each is a rename in DEST's filesystem, so
    clients see the new set whole within moments, as rsync's ``--delay-updates`` has it.
    The set is written down first (``_PUBLISHING``): a run killed or stopped between two
    renames has the rest published by :func:`_drop_staged`, not dropped. One that cannot
    take its name (someone's directory there) gives the names the set took before it
    back to the old files (kept aside, linked or copied, under ``.fetcher/replaced/``)."""
    s = run.summary
    staged = sorted(run.staged, key=lambda o: (publish_step(o.path), o.path))
    run.staged = []
    if not staged:
        return
    if not s.failed:
        _check_kept_tops(run, staged)
    if not s.failed:
        _begin_publishing(run.dest, [o.path for o in staged])
        failed = _rename_all(run.dest, [o.path for o in staged])
        if failed is None:
            for out in staged:
                s.fetched.files += 1
                s.fetched.bytes += out.size
                run.state.record(run.run_id, out)
                run.reporter.finished(out)
                _post(run, out.path, force=True)
        else:
            path, why = failed
            for o in staged:
                if o.path == path:
                    _failed_here(run, o.path, o.url, f"cannot publish: {why}")
        (run.dest / STATE_DIR / _PUBLISHING).unlink(missing_ok=True)
    if s.failed:  # with whatever failed: the old copies stay, all of them
        run.held_back = True
        failed_paths = {path for path, _ in s.failed}
        for o in staged:
            if o.path not in failed_paths:
                _failed_here(run, o.path, o.url, _NOT_PUBLISHED)


def _check_kept_tops(run: _Run, staged: list[Outcome]) -> None:
    """A ``Release`` / ``InRelease`` / ``repomd.xml`` in DEST that this run did not fetch
    again stays as it is over the staged files: it must still agree with them. A
    ``Packages.gz`` rewritten in place upstream after the run read its suite's listing
    (the ``Release`` unchanged there) but before it read the index's own came alone, and
    took its name under the old ``Release``, which names other bytes. Such a set fails
    (``s.failed``): none of it is published, and the next run fetches both."""
    from fetcher.repo_refs import disagreement

    names = {o.path for o in staged}
    tops: set[str] = set()
    for path in names:
        parts = path.split("/")
        for i in range(len(parts)):
            d = "/".join(parts[:i])
            for top in ("Release", "InRelease", "repodata/repomd.xml"):
                tops.add(f"{d}/{top}" if d else top)
    t = run.job.transfer()
    for top in sorted(tops - names):
        if not wanted(top, False, t.include, t.exclude):
            continue
        try:
            body = (run.dest / top).read_bytes()
        except OSError:
            continue  # none there (or not a file): nothing stands over the set
        why = disagreement(top, body, replace(t, dest=str(run.dest)), _gone_below(run, top, staged))
        if why is not None:
            o = next((o for o in staged if f"names {o.path}," in why), staged[0])
            _failed_here(
                run, o.path, o.url,
                f"{o.path} not published: {top}, kept in DEST (not fetched again by this"
                f" run), disagrees: {why} (rewritten upstream during the run?); the next"
                " run fetches both",
            )  # fmt: skip
            return


def _gone_below(run: _Run, top: str, staged: list[Outcome]) -> frozenset[str]:
    """For a ``Release`` / ``InRelease`` (``Job.gone``): the files below its directory that
    DEST holds and this run did not find upstream, as :func:`prune` finds vanished files.
    Empty when the crawl may have missed some (``_crawl_clean``), and for a ``Release`` at
    DEST's top (all of DEST is not walked for it): the check stays whole then. A file in
    DEST that upstream dropped, and that the ``Release`` names as a form a mirror need not
    carry (the uncompressed ``Packages``), no longer holds the suite back."""
    directory = top.rpartition("/")[0]
    if posixpath.basename(top) not in ("Release", "InRelease") or not directory:
        return frozenset()
    if not _crawl_clean(run):
        return frozenset()
    fetched = {o.path for o in staged}  # (their rows are written once they are published)
    files = (f"{directory}/{rel}" for rel in local_files(run.dest / directory))
    return frozenset(
        not_seen(
            files,
            run.state,
            run.run_id,
            skip=lambda rel: (
                rel in run.unchanged or rel in fetched or below_any(rel, run.uncrawled)
            ),
        )
    )


def _rename_all(dest: Path, paths: list[RelPath]) -> tuple[RelPath, str] | None:
    """Rename each staged file in ``paths`` over its name in DEST, in order; None when all
    did. Else undo those done (each old file kept aside first is put back, a name that
    was free is freed) and say which one could not, and why."""
    old_dir = dest / STATE_DIR / "replaced"  # (not in staged/: a mirror may have ".old/")
    done: list[tuple[str, str | None]] = []  # (final, the old file's copy or None)
    for path in paths:
        final = os.path.join(dest, path)
        kept = os.path.join(old_dir, path)
        try:
            try:
                os.makedirs(os.path.dirname(kept), exist_ok=True)
                _keep_aside(final, kept)
            except FileNotFoundError:
                kept = ""  # a new name: nothing to put back
            except IsADirectoryError:
                kept = ""  # the rename below says why
            _take_name(dest, path)
        except OSError as exc:
            for name, copy in reversed(done):
                with contextlib.suppress(OSError):
                    if copy:
                        move_into(Path(copy), name)
                    else:
                        os.unlink(name)
            return path, exc.strerror or str(exc)
        done.append((final, kept or None))
    return None


def _keep_aside(final: str, kept: str) -> None:
    """The old file at ``final`` linked at ``kept``; copied where it cannot be linked.

    Where ``final`` lies on another filesystem than DEST's state directory (a disk
    mounted inside DEST for ``dists/``: EXDEV), on one without hard links (FAT, exFAT:
    EPERM), or is someone else's (``fs.protected_hardlinks``: EPERM). A directory at
    ``final`` (Linux will not link one: EPERM) raises ``IsADirectoryError``; a file that
    can be neither linked nor copied raises, and is not replaced: the put-back would
    have nothing to put back (the new file was removed from a name taken as free)."""
    try:
        os.link(final, kept, follow_symlinks=False)
        return
    except FileNotFoundError:
        raise
    except OSError as exc:
        if stat.S_ISDIR(os.lstat(final).st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", final) from exc
    shutil.copy2(final, kept, follow_symlinks=False)


def _take_name(dest: Path, path: str) -> None:
    """The staged file of ``path`` takes its name in DEST (its directory made if need be):
    a rename, or a copy that then takes the name where the directory is on another
    filesystem (:func:`~fetcher.landing.move_into`)."""
    final = os.path.join(dest, path)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    move_into(Path(staged_path(str(dest), path)), final)


_PUBLISHING = "publishing"
"""In DEST's state directory while a run publishes its staged metadata: their paths, in
the order they take their names (JSON)."""


def _begin_publishing(dest: Path, paths: list[RelPath]) -> None:
    """Write the list down, whole (or not at all: a full disk publishes as before, the
    renames need no space)."""
    marker = dest / STATE_DIR / _PUBLISHING
    try:
        write_json(marker, paths)
    except OSError:
        marker.with_name(marker.name + ".tmp").unlink(missing_ok=True)


_NOT_PUBLISHED = "metadata not published: other files failed"


def _drop_staged(dest: Path) -> None:
    """Staged metadata a run did not publish (stopped, or killed before): the next run
    fetches it again, as DEST's older copies and their rows say.

    But a publication that had begun (``_PUBLISHING`` names its files) is finished first,
    in its order: the run was killed or stopped between two renames, leaving a new
    ``Packages.gz`` under the old ``Release``, say, which names other bytes. Dropped, the
    rest waited for a run that publishes metadata, none while any file failed; the set
    was whole and checked, so its remaining files take their names now."""
    state_dir = dest / STATE_DIR
    marker = state_dir / _PUBLISHING
    try:
        paths = json.loads(marker.read_text("utf-8"))
    except (OSError, ValueError):
        paths = []  # none begun (it is written whole, or not at all)
    for path in paths if isinstance(paths, list) else []:
        if not isinstance(path, str) or path.startswith("/") or ".." in path.split("/"):
            continue  # not one of ours
        try:
            _take_name(dest, path)
        except OSError:
            continue  # published before the kill, or cannot be: the next run says
    marker.unlink(missing_ok=True)
    shutil.rmtree(state_dir / "staged", ignore_errors=True)
    shutil.rmtree(state_dir / "replaced", ignore_errors=True)


def _failed_here(run: _Run, path: RelPath, url: str, why: str) -> None:
    """A planned file that fails here, not in a worker: counted as a worker's would be."""
    run.summary.failed.append((path, why))
    run.state.seen(run.run_id, path)
    run.reporter.finished(Outcome(path, url, Status.FAILED, error=why))


def _drain(run: _Run, deadline: float) -> None:
    ex = run.executor
    while ex is not None and not ex.done() and time.monotonic() < deadline:
        _handle(run, ex.events(timeout=0.1))
    if ex is not None:
        _handle(run, ex.events(timeout=0))


def _take(run: _Run, item: CrawlItem) -> None:
    s = run.summary
    disk = run.disk
    assert disk is not None
    if isinstance(item, UnchangedDir):
        run.unchanged.update(item.files)  # seen, as each unchanged RemoteFile is
        c = s.planned.setdefault("skipped", Counts())
        c.files += len(item.files)
        c.bytes += item.nbytes
        run.reporter.skipped_many(len(item.files))
        run.listed.add(item.url)
        return
    if isinstance(item, Listing):
        run.state.put_listing(item)
        run.listed.add(item.url)
        return
    if isinstance(item, RemoteDir):
        s.directories += 1
        run.seen_dirs.add(item.path)
        try:
            if disk.add_dir(item.path, create=not run.job.dry_run):
                s.notices.append(
                    f"{item.path}: a file fetched before is a directory upstream now; replaced"
                )
        except OSError as exc:
            s.failed.append((item.path, f"cannot create directory: {exc.strerror or exc}"))
        return
    if isinstance(item, CrawlProblem):
        if item.kind == "listing":
            s.listing_errors.append((item.url, item.message))
        elif item.kind == "unsafe":
            s.failed.append((item.url, item.message))
        else:
            if item.kind == "unsure":
                run.unsure = True
            elif item.kind == "depth" and item.path:
                run.uncrawled.add(item.path)  # out of this run's selection: kept
            s.notices.append(f"{item.url}: {item.message}")
        run.reporter.problem(item)
        return
    f = item
    local = disk.local(f.path)
    # (only for an exact size: a listing gives none for a directory, which a hand-written
    # page may link without its '/', and whose files must not go for it)
    dry: list[str] | None = [] if run.job.dry_run else None
    if local is None and f.size_exact and disk.clear_dir(f.path, dry):
        s.notices.append(f"{f.path}: a directory fetched before is a file upstream now; replaced")
        if dry:  # (a dry run: what --delete would take is what the real run would)
            run.unchanged.update(dry)
    row = disk.row(f.path)
    d = decide(f, row, local, partial=disk.has_partial(f.path), clock=run.clock)
    if d.adopt and local is not None:
        _adopt(run, f, local)
    elif d.job is None:
        run.state.seen(run.run_id, f.path)
        _count(s, "skipped", local.size if local else 0)
        run.reporter.skipped(f)
        _post(run, f.path)  # catches up on outputs missing or older than the file
    elif d.offset is not None and local is not None:
        # The same file if the listing's zone is d.offset from UTC: held until enough
        # files say so (then adopted), or until the crawl ends (then fetched).
        waiting = run.unsure_zone.setdefault(d.offset, [])
        waiting.append((d.job, local))
        if run.clock.vote(d.offset):
            for j, lf in run.unsure_zone.pop(d.offset):
                _adopt(run, j.file, lf)
    else:
        _plan(run, d.job)


def _adopt(run: _Run, f: RemoteFile, local: LocalFile) -> None:
    """A file another tool put in DEST, the one listed: recorded, not fetched."""
    run.state.adopt(run.run_id, f, local.size, local.mtime)
    _count(run.summary, "skipped", local.size)
    run.reporter.skipped(f)
    _post(run, f.path)


def _plan(run: _Run, j: Job) -> None:
    f = j.file
    _count(run.summary, j.action.value, f.size)
    run.reporter.planned(j)
    if run.job.dry_run:
        run.state.seen(run.run_id, f.path)  # upstream, so never a deletion candidate
        return
    if is_metadata(f.path):
        run.held.append(replace(j, stage=True))
    else:
        run.batch.append(j)


def _count(s: Summary, key: str, nbytes: int | None) -> None:
    c = s.planned.setdefault(key, Counts())
    c.files += 1
    if nbytes is None:  # (a listing without sizes: python -m http.server, a plain list)
        c.unsized += 1
    else:
        c.bytes += nbytes


def _make_executor(run: _Run) -> Executor:
    if run.executor is None:
        assert run.limits is not None
        if run.job.executor == "dask":
            from fetcher.dask_executor import DaskExecutor

            run.executor = DaskExecutor(run.job.transfer(), run.job, run.limits)
        else:
            t = run.job.transfer()
            if run.fork and t.root.startswith("https:") and not (t.http2 or t.proxy):
                tls_context(t.verify)  # the workers inherit it: one CA store loaded, not one each
            ctx = worker_context(run.fork)
            run.executor = LocalExecutor(t, run.job.procs, run.limits, ctx)
    return run.executor


def _submit(run: _Run, jobs: list[Job]) -> None:
    executor = _make_executor(run)
    # Files that hold a lane each in shards of a few, big ones first; small new files,
    # which lanes take in trains, in bigger shards (fewer hand-offs, per-shard costs).
    light: list[Job] = []
    heavy: list[Job] = []
    for j in jobs:
        run.outstanding[j.file.path] = j
        (light if pipelinable(j) else heavy).append(j)
    shards = make_shards(heavy, max_files=executor.shard_files)
    shards += make_shards(light, max_files=executor.small_shard_files)
    for shard in shards:
        executor.submit(shard)


def _handle(run: _Run, events: list[Event]) -> None:
    s = run.summary
    rep = run.reporter
    for ev in events:
        if isinstance(ev, BytesEvent):
            rep.transferred(ev.nbytes)
        elif isinstance(ev, FileDone):
            out = ev.outcome
            job = run.outstanding.pop(out.path, None)
            if out.status is Status.FETCHED and job is not None and job.stage:
                run.staged.append(out)  # published (and counted) with its group
                continue
            if out.status is Status.FETCHED:
                s.fetched.files += 1
                s.fetched.bytes += out.size
                run.state.record(run.run_id, out)
                # force: the server's date may be older than outputs of the old file
                _post(run, out.path, force=True)
            elif out.status is Status.UNCHANGED:
                s.unchanged.files += 1
                s.unchanged.bytes += out.size
                run.state.record(run.run_id, out)
                _post(run, out.path)
            elif out.status is Status.DIRECTORY:
                # a link without a trailing slash that turned out to be a directory
                if run.job.depth > out.path.count("/"):
                    s.notices.append(f"{out.path}: a directory linked without '/'; crawled")
                    _start_crawl(run, out.url.rstrip("/") + "/", out.path)
                else:  # as the crawl's own directories past --depth: out of the selection
                    run.uncrawled.add(out.path)
                    s.notices.append(
                        f"{out.path}: a directory linked without '/', deeper than --depth"
                        f" {run.job.depth}; not crawled"
                    )
            else:
                if out.error != "interrupted":
                    s.failed.append((out.path, out.error or "failed"))
                elif not (run.stop.is_set() or s.fatal):
                    # stopped, but not by this run: its worker lost its parent (killed),
                    # or a Dask task its scheduler (lost, or cancelled from outside).
                    # Never a clean run.
                    why = run.executor.lost if run.executor else "interrupted"
                    out = replace(out, error=why)
                    s.failed.append((out.path, why))
                run.state.seen(run.run_id, out.path)
            rep.finished(out)
        elif isinstance(ev, FileStarted):
            rep.started(ev)
        elif isinstance(ev, Retried):
            rep.retried(ev)
        elif isinstance(ev, WorkerFatal) and not s.fatal:
            s.fatal = ev.message
            rep.notice(f"stopping: {ev.message}")
        elif isinstance(ev, Notice):
            rep.notice(ev.message)


def _post_outcomes(run: _Run, outs: list[PostOutcome]) -> None:
    from fetcher.postprocess import PostStatus

    s = run.summary
    for o in outs:
        key = f"{o.label} {o.status.value}"
        s.post[key] = s.post.get(key, 0) + 1
        if o.failure is not None:  # would fail again: not tried while file and rule stay
            run.state.record_failed_post(o.failure)
            run.failed_posts.add(o.output)
        elif o.status in (PostStatus.DONE, PostStatus.SKIPPED) and o.output in run.failed_posts:
            run.state.forget_failed_post(o.output)
            run.failed_posts.discard(o.output)
        if o.status is PostStatus.FAILED_BEFORE:
            s.post_failed_before.append((f"{o.rel} ({o.label})", o.error or "failed"))
        if o.status is PostStatus.FAILED:
            s.post_failed.append((f"{o.rel} ({o.label})", o.error or "failed"))
            run.reporter.post_failed(o)
            if o.undecodable:
                # a probe found that the file does not decode: fetch it again next run
                # (not after a timeout, a kill or a disk error: it would never end)
                run.state.invalidate(o.rel)
    if run.post is not None and outs:
        run.reporter.post_progress(run.post.counts)


def _post(run: _Run, rel: str, force: bool = False) -> None:
    """Hand a file in place to post-processing, unless there is none, or a stop has
    cancelled it (files still finish while a stopped run drains its workers)."""
    if run.post is not None and not run.post.closed and run.post.submit(rel, force=force):
        run.reporter.post_progress(run.post.counts)  # (else shown once one has finished)


def _finish_post(run: _Run) -> None:
    """Let queued post-processing finish (the downloads are done), unless interrupted."""
    pool = run.post
    assert pool is not None
    if run.summary.interrupted or run.summary.fatal:
        pool.cancel()
        _post_outcomes(run, pool.close(wait=True))
        return
    try:
        while True:
            c = pool.counts
            if not (c.queued or c.running):
                break
            _post_outcomes(run, pool.poll())
            # the downloads are over: nothing else keeps the status (and its lines) going
            run.reporter.post_progress(pool.counts)
            time.sleep(0.1)
    except KeyboardInterrupt:
        run.summary.interrupted = True
        pool.cancel()
    _post_outcomes(run, pool.close(wait=True))
