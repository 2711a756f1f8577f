"""The per-process shard runner: one transport, a few lanes (threads), batched events.

The same :class:`ShardRunner` serves a local worker process (fed from a
queue, :func:`worker_main`) and a Dask task (:func:`run_shard`).  It catches
every per-file failure inside :func:`fetcher.download.fetch_file`, so nothing
escapes to break the pool; events go back to the coordinator in batches.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import httpx

from fetcher.config import Transfer
from fetcher.download import Deferred, fetch_file, pipelinable
from fetcher.http1 import Announced, ThreadConnTransport, pipelined_lanes
from fetcher.limits import SharedLimits
from fetcher.models import (
    BytesEvent,
    Event,
    FileDone,
    FileStarted,
    Job,
    Outcome,
    Retried,
    Scope,
    Status,
    WorkerExit,
    WorkerFatal,
)
from fetcher.retry import build_retrying
from fetcher.shard import Shard
from fetcher.transport import make_transport, plain_get

__all__ = ["ShardRunner", "run_shard", "worker_main"]

_STARTED_MIN_SIZE = 1 << 20  # FileStarted only for files worth watching


class _Batcher:
    """Collects events and hands them on in batches (per-event IPC costs more than the event)."""

    def __init__(
        self, send: Callable[[list[Event]], None], worker: int, interval: float = 0.1
    ) -> None:
        self._send = send
        self._worker = worker
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._bytes = 0
        self._interval = interval
        self._last = time.monotonic()

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self._bytes += n
        if time.monotonic() - self._last > self._interval:
            self.flush()

    def add(self, ev: Event) -> None:
        with self._lock:
            self._events.append(ev)
            full = len(self._events) >= 256
        if full or time.monotonic() - self._last > self._interval:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            events, self._events = self._events, []
            if self._bytes:
                events.insert(0, BytesEvent(self._worker, self._bytes))
                self._bytes = 0
            self._last = time.monotonic()
        if events:
            self._send(events)


STALL = 0.1
"""Seconds without a small file done after which a lane on small files counts as held up,
at least: see :meth:`ShardRunner._held_up_after`."""

STALL_ANSWERS = 4.0
"""A lane on small files is held up once it has waited this many times as long as a
train's first answer usually takes (the round trip and the server's time), and at least
:data:`STALL` seconds."""

STALL_UNKNOWN = 1.0
"""Seconds a lane waits before it counts as held up while no train's first answer has
come yet (how long one takes is not known: a far mirror's round trip may be most of it)."""


class _Train:
    """What a lane's train has still to fetch, each job with its prepared GET (or None),
    and its requests announced to the transport (None: nothing sent ahead). Another
    thread may take back the jobs not yet sent (``ShardRunner._rescue``), under ``lock``."""

    __slots__ = ("announced", "jobs", "lock")

    def __init__(
        self, jobs: Iterable[tuple[Job, httpx.Request | None]], announced: Announced | None
    ) -> None:
        self.jobs = deque(jobs)
        self.announced = announced
        self.lock = threading.Lock()


LOOK_AGAIN = 0.5
"""Seconds a lane with nothing it may take waits before it looks at the queue again
(it is woken sooner whenever that changes)."""


class ShardRunner:
    """Fetches jobs on ``t.threads`` lanes over one transport; reports through ``send``.

    Jobs wait in one local queue.  Each lane (a thread, with its own keep-alive
    connection) takes a *train*: the next job and, when they are small new files,
    the ones behind it, which the transport may pipeline on that connection.  A
    train is at most a fair share of what is queued, so the lanes stay even when
    the queue runs short.

    Small files are gathered onto few lanes: the ``threads × pipeline`` requests a
    process may have in flight go on as few connections as hold them, at most
    32 on one (:func:`~fetcher.http1.pipelined_lanes`; with the defaults, one
    lane per process), and the other lanes take the big files. Lanes on small files
    spend their time in Python and system calls, each giving the GIL to another
    lane and taking it back: one lane 16 deep costs a process half the CPU per file
    of four lanes 4 deep, and at 50 ms RTT moves more files (fewer gaps between
    trains). A server that drops pipelined requests turns pipelining off
    (:attr:`ThreadConnTransport.pipelining`), and then every lane takes small files
    again, one request at a time.

    A lane that has not finished a small file for a while (:meth:`_held_up_after`: an
    answer held up, a CDN's cache miss or a slow disk, and the files behind it in its
    train waiting for it) leaves its place to another lane, and the part of its train
    it has not sent yet goes back to the queue for the other lanes (:meth:`_rescue`);
    only the answers already due on its connection wait behind the slow one.

    What a feeder keeps here is counted as *load*: a small new file counts one, a
    file that holds a lane to itself (a big one, an update, a resume) counts a
    lane's share of :attr:`enough`. So a worker whose lanes are all on big files
    takes no more shards, and they go to a worker with a free lane, instead of
    waiting here behind a long transfer. The small files sent ahead behind a held-up
    answer do not count: they wait for it, not for a lane, and the other lanes take
    more meanwhile.
    """

    def __init__(
        self,
        t: Transfer,
        worker: int,
        send: Callable[[list[Event]], None],
        limits: SharedLimits | None = None,
        stop: threading.Event | None = None,
        parent_alive: Callable[[], bool] | None = None,
    ) -> None:
        """``parent_alive``: is the coordinator still there? When not, this runner stops."""
        self.t = t
        self.worker = worker
        # A multiprocessing Event takes a cross-process lock on every is_set(); the hot
        # path (per chunk, per file) checks this local copy, kept in step by the ticker.
        self._shared_stop = stop
        self.stop = threading.Event()
        self._parent_alive = parent_alive
        self.orphaned = False
        self.limits = limits
        lanes = max(1, t.threads)
        self._small_lanes, self._small_depth = pipelined_lanes(lanes, t.pipeline)
        self.transport = make_transport(t, limits, self.stop, pipeline=self._small_depth)
        # the transport that takes a train's requests ahead; None: one request at a time
        self._ahead = (
            self.transport
            if isinstance(self.transport, ThreadConnTransport) and t.pipeline > 1
            else None
        )
        self.depth = t.pipeline if self._ahead is not None else 1
        # The feeder's marks: enough jobs here to fill every lane's pipeline twice over
        # and one more (more would sit here while another worker idles at the end of the
        # run), refilled from half of that, so it wakes once per few shards, not once per
        # file. A heavy job is a lane's share of enough: all lanes on them is enough.
        self._heavy = 2 * self.depth + 1
        self.once = lanes * self.depth
        self.enough = lanes * self._heavy
        self.scope = Scope.for_start(t.root, t.aliases)
        self.retrying = build_retrying(t, sleep=self._sleep)
        self.batch = _Batcher(send, worker)
        self.known_dirs: set[str] = set()
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._big_queued = 0  # jobs in the queue that are not small new files
        self._load = 0  # of the jobs queued or running here (see the class's note)
        self._heavy_done = 0  # lanes freed by a heavy job: a feeder waiting is told
        self._wake_below = 0  # a feeder waits for a load below this (0: nobody waits)
        self._closing = False
        self._released = False
        # lanes on a train of small files now (by thread): when each began it or last
        # finished one of its files
        self._small_at: dict[int, float] = {}
        self._trains: dict[int, _Train] = {}  # what each lane's train has still to fetch
        self._was_held: set[int] = set()  # the lanes held up at the ticker's last look
        self._first_answer: float | None = None  # how long a train's first file takes
        self._results: dict[int, Outcome] | None = None
        self._lanes = [
            threading.Thread(target=self._lane, name=f"w{worker}-{i}", daemon=True)
            for i in range(max(1, t.threads))
        ]
        for lane in self._lanes:
            lane.start()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._closed = threading.Event()
        self._ticker.start()

    def _sleep(self, seconds: float) -> None:
        self.stop.wait(seconds)

    def _tick(self) -> None:
        while not self._closed.wait(0.1):
            self._rescue()
            if self._shared_stop is not None and self._shared_stop.is_set():
                self.stop.set()
            if self._parent_alive is not None and not self._parent_alive():
                # the coordinator is gone (killed): stop, keeping partial files for resume
                self.orphaned = True
                self.stop.set()
            self.batch.flush()

    # -- the queue ------------------------------------------------------------
    def _weight(self, job: Job) -> int:
        return 1 if pipelinable(job) else self._heavy

    def add(self, jobs: Iterable[Job]) -> None:
        jobs = list(jobs)
        weights = [self._weight(j) for j in jobs]
        load = sum(weights)
        big = sum(w > 1 for w in weights)
        with self._cond:
            self._jobs.extend(jobs)
            self._big_queued += big
            self._load += load
            self._released = False
            self._cond.notify_all()

    def pending(self) -> int:
        """The load of the jobs queued or running here (0: none), but for the small files
        waiting behind a held-up answer (:meth:`_unstuck_load`)."""
        with self._cond:
            return self._unstuck_load()

    def wait_below(self, n: int, timeout: float) -> None:
        """Wait until :meth:`pending` is below ``n``, or a lane that a heavy job held is
        free (or ``timeout``)."""
        with self._cond:
            self._wake_below = n
            freed = self._heavy_done
            try:
                self._cond.wait_for(
                    lambda: self._unstuck_load() < n or self._heavy_done != freed, timeout
                )
            finally:
                self._wake_below = 0

    def _held_up(self) -> list[int]:
        """The lanes on small files that have finished none for a while (under ``_cond``)."""
        now, after = time.monotonic(), self._held_up_after()
        return [lane for lane, at in self._small_at.items() if now - at >= after]

    def _unstuck_load(self) -> int:
        """The load here but for the small files of held-up lanes' trains (under
        ``_cond``). Those wait for the slow answer ahead of them, not for a lane: the
        feeder takes as much more for the other lanes, which would otherwise idle with
        the server ready."""
        trains = self._trains
        if not trains:
            return self._load
        return self._load - sum(
            len(trains[lane].jobs) for lane in self._held_up() if lane in trains
        )

    def _take(self, held: bool) -> tuple[list[Job], bool]:
        """The next train, and whether it is one of small files (which holds a place
        among the small-file lanes). ``held``: this lane's last train was one: its place
        goes back, or is kept for the next small train (no other lane can take it between)."""
        me = threading.get_ident()
        with self._cond:
            if held:
                del self._small_at[me]
            while True:
                jobs = self._jobs
                if not jobs:
                    if self._closing:
                        return [], False
                    self._cond.wait(LOOK_AGAIN)
                    continue
                gathered = self._ahead is not None and self._ahead.pipelining
                busy, room = self._small_places(gathered)
                if pipelinable(jobs[0]) and busy < room:
                    self._small_at[me] = time.monotonic()
                    train, small = self._small_train(room, gathered), True
                    busy += 1
                else:
                    # the first big file: at the head, or further back while every
                    # small-file lane is busy
                    if not self._big_queued:
                        self._cond.wait(LOOK_AGAIN)
                        continue
                    i = next(i for i, j in enumerate(jobs) if not pipelinable(j))
                    train, small = [jobs[i]], False
                    del jobs[i]
                    self._big_queued -= 1
                if jobs and ((busy < room and pipelinable(jobs[0])) or self._big_queued):
                    self._cond.notify_all()  # another lane's turn (the feeder waits here too)
                elif not jobs and self._closing:
                    # the last train: lanes waiting for a place among the small-file lanes
                    # end now, not at their next look (close() joins them; a Dask task
                    # waited up to half a second for it)
                    self._cond.notify_all()
                return train, small

    def _small_places(self, gathered: bool) -> tuple[int, int]:
        """Lanes on small files and not held up, and how many may be."""
        if not gathered:
            return len(self._small_at), len(self._lanes)
        now, after = time.monotonic(), self._held_up_after()
        busy = sum(now - t < after for t in self._small_at.values())
        return busy, self._small_lanes

    def _held_up_after(self) -> float:
        """Seconds without a small file done after which a lane counts as held up: many
        times what a train's first file usually takes (on a far mirror the first answer
        of every train takes a round trip or more), and at least :data:`STALL`;
        :data:`STALL_UNKNOWN` until a first answer has come."""
        usual = self._first_answer
        return STALL_UNKNOWN if usual is None else max(STALL, STALL_ANSWERS * usual)

    def _answered_first(self, seconds: float) -> None:
        """A train's first file took ``seconds``. The estimate follows a faster one at
        once and a slower one a twentieth of the way: a held-up answer is what it is
        there to tell apart, not to learn from."""
        usual = self._first_answer
        if usual is None or seconds < usual:
            self._first_answer = seconds
        else:
            self._first_answer = usual + (seconds - usual) / 20

    def _rescue(self) -> None:
        """The part of each held-up lane's train it has not sent yet goes back to the head
        of the queue, where another lane takes it: it would wait for the slow answer for
        nothing. (What was sent ahead stays: its answers come on that connection.)"""
        if self._ahead is None or not self._ahead.pipelining:
            return
        if self.limits is not None and self.limits.paused():
            return  # the server asked for a pause: nobody is to take more meanwhile
        with self._cond:
            back: list[Job] = []
            held = self._held_up()
            for lane in held:
                train = self._trains.get(lane)
                if train is None or train.announced is None:
                    continue
                with train.lock:
                    # the requests not sent are the last of the train's jobs, in order
                    n = train.announced.withdraw(len(train.jobs))
                    taken = [train.jobs.pop()[0] for _ in range(n)]
                back += reversed(taken)
            self._jobs.extendleft(reversed(back))
            if back or not self._was_held.issuperset(held):
                # a server that holds answers up: every lane may take small files now,
                # and the feeder more of them (see _unstuck_load); both are told at once
                self._small_lanes = len(self._lanes)
                self._cond.notify_all()
            self._was_held = set(held)

    def _small_train(self, lanes: int, gathered: bool) -> list[Job]:
        jobs = self._jobs
        share = -(-len(jobs) // lanes)
        longest = min(4 * self._small_depth, share) if gathered else 1
        train = [jobs.popleft()]
        while len(train) < longest and jobs and pipelinable(jobs[0]):
            train.append(jobs.popleft())
        return train

    def _lane(self) -> None:
        ahead = self._ahead
        me = threading.get_ident()
        small = False
        while True:
            train, small = self._take(small)
            if not train:
                return
            # The plain GETs of a train, built once: announced to the transport (which may
            # send them ahead) and handed to fetch_file, which sends exactly these.
            ready = [plain_get(j.file.url, self.t) for j in train] if len(train) > 1 else []
            announced = ahead.expect(ready[1:]) if ahead is not None and ready else None
            gets: list[httpx.Request | None] = [*ready] if ready else [None]
            left = _Train(zip(train, gets, strict=True), announced)
            if announced is not None:
                with self._cond:
                    self._trains[me] = left
            # first attempts failed mid-train, and when
            later: list[tuple[Job, Exception, float]] = []
            began: float | None = time.monotonic() if small and announced is not None else None
            try:
                while True:
                    with left.lock:
                        if not left.jobs:
                            break
                        job, prepared = left.jobs.popleft()
                        more = bool(left.jobs)
                    out = self.fetch(job, prepared, defer=ahead is not None and more)
                    if began is not None:
                        self._answered_first(time.monotonic() - began)
                        began = None
                    if isinstance(out, Exception):
                        later.append((job, out, time.monotonic()))
                        self._answered()  # (not held up: the answer came)
                    else:
                        self._finished(job, out)
            finally:
                if announced is not None:
                    with self._cond:
                        del self._trains[me]
                    assert ahead is not None
                    ahead.expect([])
            # their retries, now that no answers wait behind them; each one's wait counts
            # from its failure, so the waits pass together, not one after another
            for job, failure, at in later:
                out = self.fetch(job, failed=failure, failed_at=at)
                assert not isinstance(out, Exception)
                self._finished(job, out)

    def _answered(self) -> None:
        """This lane's file has its answer, if not yet its outcome: the lane is not held up."""
        me = threading.get_ident()
        with self._cond:
            if me in self._small_at:
                self._small_at[me] = time.monotonic()

    def _finished(self, job: Job, out: Outcome) -> None:
        weight = self._weight(job)
        with self._cond:
            self._load -= weight
            if self._results is not None:
                self._results[id(job)] = out
            idle = not self._load
            if weight > 1:
                self._heavy_done += 1
            else:
                me = threading.get_ident()
                if me in self._small_at:
                    self._small_at[me] = time.monotonic()
            # Only the feeder waits for jobs to finish (lanes wait for jobs to come): wake
            # it when it asked to be, not once per small file.
            if self._wake_below and (self._load < self._wake_below or weight > 1):
                self._cond.notify_all()
        if idle:
            # Nothing left here: report now rather than at the next tick, or the end of
            # a run (and the next shard) waits for it.
            self.batch.flush()

    # -- one file -------------------------------------------------------------
    def fetch(
        self,
        job: Job,
        prepared: httpx.Request | None = None,
        *,
        defer: bool = False,
        failed: Exception | None = None,
        failed_at: float | None = None,
    ) -> Outcome | Exception:
        """One file's outcome; with ``defer``, a failed first attempt's error instead (see
        :func:`fetch_file`), to be given back as ``failed`` (and when, ``failed_at``) for
        the rest of its attempts."""
        f = job.file
        if self.stop.is_set():
            return Outcome(
                f.path, f.url, Status.FAILED, error="interrupted", attempts=0, stamp=f.stamp
            )
        if f.size is None or f.size >= _STARTED_MIN_SIZE:
            self.batch.add(FileStarted(self.worker, f.path, f.size))

        def on_retry(attempt: int, reason: str) -> None:
            self.batch.add(Retried(self.worker, f.path, attempt, reason))

        try:
            out = fetch_file(
                self.transport,
                job,
                self.t,
                retrying=self.retrying,
                scope=self.scope,
                limits=self.limits,
                stop=self.stop,
                on_bytes=self.batch.add_bytes,
                on_retry=on_retry,
                known_dirs=self.known_dirs,
                prepared=prepared,
                defer=defer,
                failed=failed,
                failed_at=failed_at,
            )
        except Deferred as exc:
            return exc.cause
        except Exception as exc:  # noqa: BLE001 - a worker must return an Outcome, always:
            # an escaping exception would leave the file unreported and the run waiting.
            out = Outcome(
                f.path,
                f.url,
                Status.FAILED,
                error=f"internal error: {type(exc).__name__}: {exc}",
                stamp=f.stamp,
            )
        self.batch.add(FileDone(self.worker, out))
        if out.fatal:
            self.stop.set()
            self.batch.add(WorkerFatal(self.worker, out.error or "fatal I/O error"))
        return out

    def release_idle(self) -> None:
        """Close idle keep-alive connections so other processes can have their tokens.

        Called when this worker has nothing to do: an idle connection still holds one
        of the run's ``--max-connections`` tokens, and another worker may be waiting.
        """
        with self._cond:
            if self._load or self._released:
                return
            self._released = True
            if isinstance(self.transport, ThreadConnTransport):
                self.transport.close_idle()
                return
            old, self.transport = self.transport, make_transport(self.t, self.limits, self.stop)
        old.close()

    def run(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Fetch ``jobs`` and return their outcomes, in order (then the runner is closed)."""
        with self._cond:
            self._results = {}
        self.add(jobs)
        self.close()
        results = self._results
        return [results[id(j)] for j in jobs]

    def close(self, wait: float | None = None) -> bool:
        """Finish every job queued (each ends at once if the run is stopping), then stop.

        With ``wait``, give the lanes that many seconds in all to end; False (nothing
        else closed) if one has not: it is waiting on a server."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = None if wait is None else time.monotonic() + wait
        for lane in self._lanes:
            lane.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if lane.is_alive():
                return False
        self._closed.set()
        self._ticker.join()
        self.batch.flush()
        self.transport.close()
        return True


_ORPHAN_GRACE = 1.0  # seconds an orphaned worker's lanes get to stop


def worker_main(
    worker: int,
    t: Transfer,
    shards: Any,
    events: Any,
    limits: SharedLimits | None,
    stop: Any,
    parent: int | None = None,
    *,
    forked_by: bool = False,
) -> None:
    """Entry point of a local worker process: pull shards until ``None``.

    ``parent`` is the PID of the process to watch: the coordinator, or the copy of it
    that forked the workers. This process's own parent is watched by its PID (through
    multiprocessing's pipe to it, whose other end every worker forked after this one
    holds a copy of, it would read as closed only once they had all ended too); any
    other (under ``forkserver`` a worker's parent is the fork server) through the pipe
    multiprocessing keeps to the process that started it.

    ``forked_by``: ``parent`` is the process that forked this one (it said its own PID),
    whether or not it is still this one's parent: a worker started after its parent
    ended has the stop it would have had a moment later, at once.

    A worker whose parent is gone stops; a lane still waiting on a server then (up to
    the read timeout) is not waited for beyond a second: the next run may already hold
    DEST, and must not find this one still writing a partial file.
    """
    # Ctrl-C (and a terminal's hangup) reach the whole process group; only the coordinator
    # decides what they mean.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # A worker forked from the coordinator has its handlers: SIGTERM ends a worker.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    alive: Callable[[], bool] | None = None
    watch = multiprocessing.parent_process()
    if parent is not None and (forked_by or os.getppid() == parent):
        alive = lambda: os.getppid() == parent  # noqa: E731
    elif watch is not None:
        alive = watch.is_alive
    runner = ShardRunner(t, worker, events.put, limits, stop, alive)
    try:
        while not runner.stop.is_set():
            if runner.pending() >= runner.enough:
                runner.wait_below(runner.once + 1, timeout=0.5)
                continue
            try:
                shard: Shard | None = shards.get(timeout=0.5)
            except queue.Empty:
                runner.release_idle()
                continue
            if shard is None:
                break
            runner.add(shard.jobs)
    finally:
        if runner.orphaned:
            # nobody reads the queues any more: do not wait at exit to flush them
            events.cancel_join_thread()
            shards.cancel_join_thread()
            if not runner.close(wait=_ORPHAN_GRACE):
                os._exit(0)  # a lane is stuck on a server; its partial file stays as is
        else:
            runner.close()
            events.put([WorkerExit(worker)])


def run_shard(
    shard: Shard,
    t: Transfer,
    worker: int = 0,
    limits: SharedLimits | None = None,
    parent_alive: Callable[[], bool] | None = None,
) -> list[Outcome]:
    """Run one shard to completion in this process (or until ``parent_alive()`` says no);
    the Dask task body."""
    sink: list[Event] = []
    return ShardRunner(t, worker, sink.extend, limits, parent_alive=parent_alive).run(shard.jobs)
