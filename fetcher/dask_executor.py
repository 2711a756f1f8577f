"""Run shards as tasks on a Dask cluster (``--executor dask --scheduler tcp://HOST:8786``).

One task is one shard: :func:`run_shard_task` builds a
:class:`~fetcher.runner.ShardRunner` on the worker (its own ``httpx.Client``
and thread pool), fetches the shard's files into DEST and returns plain
:class:`~fetcher.models.Outcome` values.  The coordinator alone writes state,
progress and reports, exactly as with local processes.

Progress
    arrives per shard, when its task completes: a :class:`BytesEvent` with the
    shard's bytes, then a :class:`FileDone` per file.  Dask hands results back
    cleanly only when a task ends; a ``Queue``/``Pub`` for bytes would put a
    scheduler round trip on every batch of every worker for a display, and
    shards are small (≤ 32 files, ≤ 32 MiB), so per-shard steps are fine.

Connection cap
    ``--max-connections`` holds across the cluster because the coordinator
    hands out the connections.  Before a task is submitted it takes up to
    ``--threads`` tokens from the run's connection semaphore (the one the crawl
    also draws from) and sizes the task to what it got: the task runs that many
    threads over a client capped by ``local_limits(n)``.  The tokens come back
    when the task's future completes.  So the crawl and the tasks in flight
    hold at most the cap's connections in all, and a crawl thread waiting for
    a connection is woken by the first token given back.  Shards that get no
    token wait in this executor, not on the cluster.  ``--limit-rate`` is
    split the same way: each task gets ``rate × n ÷ cap``.

Failures
    A file that fails is a FAILED outcome from the runner, as locally.  A task
    that raises is retried twice by Dask; a worker that dies mid-task has its
    task rescheduled by Dask elsewhere, and partial files in DEST plus resume
    make the retry cheap.  When Dask gives up (retries exhausted,
    ``KilledWorker``) every file of the shard becomes a FAILED outcome with
    the reason.  A worker that cannot see or write DEST fails its shard with a
    reason naming the host: DEST must be the same path on a shared filesystem.
    Tasks queued at a scheduler with no worker wait there; after
    :data:`NO_WORKERS_WAIT` the run says so (a :class:`~fetcher.models.Notice`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
from msgspec.structs import replace

from fetcher.config import MirrorJob, Transfer
from fetcher.errors import FatalIOError, UsageError
from fetcher.landing import check_writable
from fetcher.limits import SharedLimits, local_limits
from fetcher.models import (
    STATE_DIR,
    BytesEvent,
    Event,
    FileDone,
    Notice,
    Outcome,
    Status,
    WorkerFatal,
)
from fetcher.runner import run_shard
from fetcher.shard import MAX_FILES, Shard

__all__ = ["DaskExecutor", "check_scheduler", "require_distributed", "run_shard_task"]

INSTALL_HINT = "pip install 'fetcher[dask]'"
TASK_RETRIES = 2
NO_WORKERS_WAIT = 10.0
"""Seconds a run's tasks wait at a scheduler with no worker before the run says so."""
_WORKERS_POLL = 1.0  # seconds between the coordinator's looks at the scheduler's workers
_ASK_TIMEOUT = 5.0
"""Seconds the coordinator waits for its scheduler to answer one request (:meth:`DaskExecutor._ask`)."""


def require_distributed() -> ModuleType:
    """``distributed``, or a :class:`UsageError` saying how to install it."""
    try:
        return importlib.import_module("distributed")
    except ImportError as exc:
        raise UsageError(
            f"--executor dask needs Dask distributed, which is not installed ({exc})",
            INSTALL_HINT,
        ) from None


def run_shard_task(
    shard: Shard, t: Transfer, worker: int = 0, stop: str | None = None, mark: str | None = None
) -> list[Outcome]:
    """The Dask task: check DEST is this worker's too, then run the shard; ``stop`` names
    the run's :class:`distributed.Event` (see :class:`_RunWatch`), ``mark`` is what the
    coordinator wrote in its DEST (:data:`RUN_MARK`)."""
    dest = Path(t.dest)
    host = socket.gethostname()
    # The coordinator made DEST/.fetcher before submitting anything; a worker that
    # does not see it has another filesystem there, and must not create a private DEST.
    # Nor may it write into another DEST/.fetcher at that path (a stale local copy
    # where the mount failed, another site's export): the run would count files it
    # never sees. That one does not hold this run's mark.
    if not (dest / STATE_DIR).is_dir() or (mark is not None and _read_mark(dest) != mark):
        return failed_outcomes(
            shard,
            f"worker {host} cannot see DEST {dest}: mount it at the same path on every worker",
        )
    try:
        check_writable(dest)
    except FatalIOError as exc:
        return failed_outcomes(shard, f"worker {host} cannot write DEST: {exc.message}")
    _stop_profiler()
    limits = local_limits(t.threads, t.limit_rate)
    watch = _RunWatch(stop, limits) if stop else None
    try:
        return run_shard(shard, t, worker, limits, watch)
    finally:
        if watch is not None:
            watch.close()


RUN_MARK = "dask-run"
"""In DEST/.fetcher: the running coordinator's mark, which each task checks it sees."""


def _read_mark(dest: Path) -> str | None:
    try:
        return (dest / STATE_DIR / RUN_MARK).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _write_mark(dest: Path, mark: str) -> None:
    path = dest / STATE_DIR / RUN_MARK
    tmp = path.with_name(f"{RUN_MARK}.{mark}")
    try:
        tmp.write_text(mark + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise FatalIOError(f"cannot write {path}: {exc.strerror or exc}") from exc


class _RunWatch:
    """Is the run that submitted this task still on? The task's runner asks ten times a
    second (its ``parent_alive``); a thread of this task waits on the run's Event at the
    scheduler, which the coordinator sets when it stops. Dask's cancel() does not
    interrupt a task that is running: without this, a stopped run's tasks went on
    downloading into DEST after it had ended and let go of the lock, beside the next
    run's. The scheduler gone counts as stopped as well, and so does one silent for
    :data:`_SILENT_SCHEDULER` (hung: its run gives up its tasks), and this task no longer
    wanted there: a coordinator that dies (kill -9, OOM) sets no Event, and its tasks
    went on with their shards, beside the next run's (local workers watch their
    parent); the scheduler forgets a lost client's tasks, and tells their workers.

    Between two waits it also shares the task's pause gate with the run's other tasks
    (:class:`_SharedPause`)."""

    def __init__(self, name: str, limits: SharedLimits) -> None:
        dist = require_distributed()
        # the worker's client, taken in the task's thread: the watching thread has none
        client = dist.get_client()
        self._client = client
        self._name = name
        self._pause = _SharedPause(dist.Variable(_pause_name(name), client=client), limits)
        with contextlib.suppress(Exception):  # a task started during a pause keeps it
            self._pause.sync()
        self._worker = dist.get_worker()
        self._key = self._worker.get_current_task()
        self._alive = True
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="run-watch", daemon=True)
        self._thread.start()

    def __call__(self) -> bool:
        return self._alive and self._wanted()

    def _wanted(self) -> bool:
        # (a read of the worker's state, from another thread than its event loop's: one
        # dict lookup and an attribute; "cancelled" is a running task the scheduler let go)
        ts = self._worker.state.tasks.get(self._key)
        return ts is not None and ts.state != "cancelled"

    def _watch(self) -> None:
        while not self._done.is_set():
            try:
                # (Event.wait, with a bound: one at a hung scheduler waited for ever, and the
                # task went on into DEST after its run had given it up and ended)
                if self._client.sync(
                    self._client.scheduler.event_wait, name=self._name, timeout=_PAUSE_POLL,
                    callback_timeout=_PAUSE_POLL + _SILENT_SCHEDULER,
                ):  # fmt: skip
                    break
            except Exception:  # noqa: BLE001 - the scheduler gone or silent (whatever distributed raises)
                break
            with contextlib.suppress(Exception):  # (the scheduler gone: the Event says so)
                self._pause.sync()
        self._alive = self._done.is_set()

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)


_PAUSE_POLL = 0.5  # seconds between a task's looks at the run's Event and pause
_SILENT_SCHEDULER = 10.0
"""Seconds of a scheduler's silence after which a task takes its run as stopped."""


def _pause_name(stop: str) -> str:
    return f"{stop}-pause"


class _SharedPause:
    """A pause gate shared through a :class:`distributed.Variable` at the scheduler.

    A ``429``/``503`` with ``Retry-After`` pauses the whole run for the mirror (README),
    but each task has limits of its own (:func:`~fetcher.limits.local_limits`): under
    Dask the task that read it held back while the run's other tasks went on asking.
    Now each task (and the coordinator, for its crawl) writes a pause of its own that
    outlasts the run's to the Variable, or takes the run's when it outlasts its own, at
    most every :data:`_PAUSE_POLL`. The deadline is wall-clock time, as the gate's: the
    machines' clocks are assumed to agree to well under a second (NTP).
    """

    def __init__(self, var: Any, limits: SharedLimits) -> None:
        self._var = var
        self._limits = limits
        self._known = 0.0  # the run's deadline, as last read or written here

    def sync(self, read: bool = True) -> None:
        """Write this process's pause if it is the newer, else (``read``) take the run's."""
        mine = float(self._limits.pause_until.value)
        if mine > self._known:
            self._var.set(mine, callback_timeout=_ASK_TIMEOUT)
            self._known = mine
            return
        if not read:
            return
        theirs = float(
            self._var.get(timeout=_PAUSE_POLL, callback_timeout=_PAUSE_POLL + _ASK_TIMEOUT)
        )
        self._known = max(self._known, theirs)
        if theirs > mine:
            with self._limits.lock:
                if theirs > self._limits.pause_until.value:
                    self._limits.pause_until.value = theirs


def _stop_profiler() -> None:
    # Dask's statistical profiler calls sys._current_frames() every 10 ms.  On CPython
    # 3.11 a garbage collection that starts inside that call, while another thread is
    # exiting, deadlocks the whole worker (python/cpython#106883).  Every task starts
    # and ends a thread pool, so we hit it in about one run in ten: a task "processing"
    # for ever, every thread of the worker waiting on a lock (py-spy: gc_collect_main
    # under _PyThread_CurrentFrames).  The profile is a diagnostic we do not need.
    if sys.version_info >= (3, 12):
        return
    try:
        worker = require_distributed().get_worker()
    except ValueError:  # not inside a Dask worker (a direct call, a test)
        return
    pc = worker.periodic_callbacks.get("profile")
    if pc is not None:
        worker.loop.add_callback(pc.stop)  # the callback belongs to the worker's event loop


def failed_outcomes(shard: Shard, reason: str, attempts: int = 0) -> list[Outcome]:
    return [
        Outcome(
            j.file.path,
            j.file.url,
            Status.FAILED,
            error=reason,
            attempts=attempts,
            stamp=j.file.stamp,
        )
        for j in shard.jobs
    ]


class _Task(msgspec.Struct):
    future: Any
    shard: Shard
    tokens: int
    seq: int


class DaskExecutor:
    """Shards as Dask tasks; the :class:`~fetcher.executor.Executor` protocol.

    ``client`` may be injected (tests, an embedding application); otherwise one
    is connected to ``job.scheduler`` and closed by :meth:`kill`.
    """

    shard_files = MAX_FILES
    small_shard_files = MAX_FILES
    lost = "interrupted: its Dask task stopped (the scheduler lost, or it was cancelled)"

    def __init__(
        self,
        t: Transfer,
        job: MirrorJob,
        limits: SharedLimits | None = None,
        client: Any = None,
    ) -> None:
        dist = require_distributed()
        cap = job.max_connections
        self._budget = cap
        self._per_task = max(1, min(job.threads, self._budget))
        self._rate_per_conn = job.limit_rate / cap if job.limit_rate else None
        # Workers run elsewhere, in another directory: give them an absolute DEST.
        self._t = replace(t, dest=str(Path(t.dest).absolute()))
        self._limits = limits
        self._own_client = client is None
        self._client = client if client is not None else _connect(dist, job.scheduler)
        self._pending: deque[Shard] = deque()
        self._running: dict[str, _Task] = {}
        self._completed: queue.Queue[Any] = queue.Queue()
        self._ready: list[Event] = []
        self._held = 0
        self._seq = 0
        self._finished = False
        self._stopped = False
        self._address = job.scheduler or "its address"
        self._lost = False  # the client lost its scheduler (see _check_scheduler)
        self._unanswered = False  # the scheduler let the last request time out (_ask)
        self._workers_due = 0.0  # next look at the scheduler's workers (_check_workers)
        self._no_workers_since: float | None = None  # seen with none since then
        self._told_no_workers = False
        # what the run's tasks watch (_RunWatch): set on stop, at the scheduler
        self._stop_name = f"fetch-stop-{uuid.uuid4().hex}"
        # what they check they see in DEST (run_shard_task): only this run's DEST has it
        self._mark = uuid.uuid4().hex
        _write_mark(Path(self._t.dest), self._mark)
        # the run's pause gate, there too: the crawl's (this process's limits) and the tasks'
        self._pause_var = dist.Variable(_pause_name(self._stop_name), client=self._client)
        self._pause_var.set(0.0)  # (a task reads it without waiting)
        self._pause = _SharedPause(self._pause_var, limits) if limits is not None else None
        self._pause_due = 0.0

    # -- the protocol ------------------------------------------------------
    def submit(self, shard: Shard) -> None:
        if self._stopped:
            self._ready.extend(_events(-1, failed_outcomes(shard, "interrupted")))
            return
        self._pending.append(shard)
        self._dispatch()

    def finish(self) -> None:
        self._finished = True

    def events(self, timeout: float) -> list[Event]:
        self._check_scheduler()  # (before asking it anything)
        self._sync_pause()
        self._check_workers()
        self._dispatch()
        out, self._ready = self._ready, []
        try:
            fut = self._completed.get(timeout=timeout) if timeout > 0 and not out else None
        except queue.Empty:
            fut = None
        while fut is not None:
            self._collect(fut, out)
            try:
                fut = self._completed.get_nowait()
            except queue.Empty:
                fut = None
        self._dispatch()
        return out

    def done(self) -> bool:
        return not self._running and (self._stopped or (self._finished and not self._pending))

    def dead(self) -> list[int]:
        return []  # a lost worker's task is rescheduled by Dask, not lost

    def stop(self) -> None:
        """Submit nothing more, and tell the tasks running to stop: they end within a
        second or so, their files partial, and report as local workers do (:meth:`join`
        waits for that)."""
        # (also at a run's end: a task cancelled from outside was reported as such while
        # its thread ran on)
        if not self._stopped and self._seq and self._answering():
            try:
                self._ask(self._client.scheduler.event_set, name=self._stop_name)
                self._drop_unstarted()
            except Exception:  # noqa: BLE001 - the scheduler is gone: so are its tasks' orders
                pass
        if not self._stopped and self._unanswered:
            # a hung scheduler: the tasks cannot be told, nor say they stopped; the run
            # does not wait for them (it waited out its drain, 30 s)
            self._give_up("interrupted")
        self._stopped = True
        while self._pending:
            self._ready.extend(_events(-1, failed_outcomes(self._pending.popleft(), "interrupted")))

    def _drop_unstarted(self) -> None:
        """Cancel the run's tasks no worker has taken yet (queued on a busy cluster, or
        one with no worker): they would see the stop Event only once started, and a
        stopped run waited for them (Ctrl-C: 30 s, then :meth:`join`'s 10 s). Those
        running are left to stop and report what they did."""
        taken = {
            key for keys in self._ask(self._client.scheduler.processing).values() for key in keys
        }
        idle = [t.future for t in self._running.values() if t.future.key not in taken]
        if idle:
            self._cancel(idle)

    def kill(self) -> None:
        """Stop, and give up on the tasks still running (cancelled at the scheduler)."""
        self.stop()
        tasks = self._give_up("interrupted")
        if tasks and self._answering():
            with contextlib.suppress(Exception):  # (the scheduler may be gone)
                self._cancel([task.future for task in tasks])
        if self._answering():
            # (the stop Event stays: a task that has not seen it yet must; the Variable
            # would only pile up at a scheduler that outlives many runs)
            with contextlib.suppress(Exception):
                self._pause_var.delete()
        if self._own_client:
            self._own_client = False
            if self._answering():
                self._client.close(timeout=10)
                return
            # Closing a client that is still trying to reach its lost scheduler cancels
            # that attempt, and distributed logs the cancellation, traceback and all, over
            # the run's summary: the run has said why it stopped. (A hung one: the close
            # times out.)
            log = logging.getLogger("distributed.client")
            level = log.level
            log.setLevel(logging.CRITICAL)
            try:
                with contextlib.suppress(Exception):
                    self._client.close(timeout=2)
            finally:
                log.setLevel(level)

    def join(self, timeout: float = 10) -> None:
        """Wait up to ``timeout`` for the tasks still out to end (:meth:`stop` told them).

        On the futures themselves: ``distributed.wait`` looks for a default client, which
        this one is not (``set_as_default=False``), and raised "No clients found", a
        traceback in place of the run's summary, whenever a task was still out (queued
        on a busy or workerless cluster, slow to stop); it also raises for a cancelled
        future."""
        deadline = time.monotonic() + timeout
        while self._answering() and time.monotonic() < deadline:
            if all(task.future.done() for task in self._running.values()):
                return
            time.sleep(0.05)

    # -- inside ------------------------------------------------------------
    def _ask(self, call: Callable[..., Awaitable[Any]], /, **kwargs: Any) -> Any:
        """``call(**kwargs)``, a request to the scheduler, on the client's loop, waited for
        at most :data:`_ASK_TIMEOUT` (then ``TimeoutError``). Without a bound a request
        made as the scheduler died (before the client had seen it go: a second on a
        loaded machine) waited for the client's connect timeout and its retries, and one
        to a hung scheduler for ever: the run's loop stood still, and its Ctrl-C too."""
        try:
            answer = self._client.sync(call, callback_timeout=_ASK_TIMEOUT, **kwargs)
        except TimeoutError:
            self._unanswered = True
            raise
        self._unanswered = False
        return answer

    def _cancel(self, futures: list[Any]) -> None:
        # (``asynchronous`` is the inner call's: ``cancel`` gives the coroutine to await)
        self._ask(functools.partial(self._client.cancel, futures, asynchronous=True))

    def _give_up(self, reason: str) -> list[_Task]:
        """The tasks out, their files reported failed for ``reason``, forgotten here."""
        tasks = list(self._running.values())
        self._running.clear()
        for task in tasks:
            self._release(task.tokens)
            self._ready.extend(_events(task.seq, failed_outcomes(task.shard, reason)))
        return tasks

    def _answering(self) -> bool:
        """Is the scheduler worth a request as the run stops? Not once lost, nor when it
        let the last one time out: the stop goes on without it (its tasks see the
        scheduler gone, or the run's Event, and stop)."""
        return not self._lost and not self._unanswered and self._client.status == "running"

    def _sync_pause(self) -> None:
        now = time.monotonic()
        if self._pause is None or self._stopped or now < self._pause_due:
            return
        self._pause_due = now + _PAUSE_POLL
        with contextlib.suppress(Exception):  # (the scheduler gone: _check_scheduler says so)
            # the crawl's pause goes out at once, for the tasks to come too; the tasks'
            # is read (a round trip) only while some run
            self._pause.sync(read=bool(self._running))

    def _check_workers(self) -> None:
        """Say once when the run's tasks have waited :data:`NO_WORKERS_WAIT` at a scheduler
        with no worker at all: they queue there, the run waited for ever, and nothing told
        why. The run goes on waiting (a worker may join; a stop still ends it); the notice
        comes again only if every worker leaves after one had come."""
        now = time.monotonic()
        if not self._running or self._stopped or self._lost or now < self._workers_due:
            return
        self._workers_due = now + _WORKERS_POLL
        try:
            workers = len(self._ask(self._client.scheduler.ncores))
        except Exception:  # noqa: BLE001 - the scheduler gone: _check_scheduler says so
            return
        if workers:
            self._no_workers_since = None
            self._told_no_workers = False
            return
        if self._no_workers_since is None:
            self._no_workers_since = now
        if not self._told_no_workers and now - self._no_workers_since >= NO_WORKERS_WAIT:
            self._told_no_workers = True
            self._ready.append(
                Notice(-1, f"the Dask scheduler at {self._address} has no workers; waiting for one")
            )

    def _check_scheduler(self) -> None:
        """Stop the run once the client has lost its scheduler: Dask cancels the futures
        it had then, but one submitted while it tries to reconnect (the crawl goes on) was
        never done nor failed, and the run waited for it for ever. The tasks see the
        scheduler gone too, and stop (:class:`_RunWatch`)."""
        if self._lost or self._client.status == "running":
            return
        self._lost = True
        self._ready.append(
            WorkerFatal(-1, f"lost the Dask scheduler at {self._address}; run again to resume")
        )
        self._give_up(_LOST)
        while self._pending:
            self._ready.extend(_events(-1, failed_outcomes(self._pending.popleft(), _LOST)))
        self._stopped = True

    def _dispatch(self) -> None:
        self._check_scheduler()
        while self._pending and not self._stopped:
            n = self._acquire(min(self._per_task, self._budget - self._held))
            if not n:
                return
            shard = self._pending.popleft()
            self._seq += 1
            t = replace(
                self._t,
                threads=n,
                limit_rate=self._rate_per_conn * n if self._rate_per_conn else None,
            )
            fut = self._client.submit(
                run_shard_task, shard, t, self._seq, self._stop_name, self._mark, pure=False,
                retries=TASK_RETRIES,
            )  # fmt: skip
            self._running[fut.key] = _Task(fut, shard, n, self._seq)
            fut.add_done_callback(self._completed.put)

    def _acquire(self, want: int) -> int:
        if want <= 0:
            return 0
        got = want
        if self._limits is not None:
            got = 0
            while got < want and self._limits.connections.acquire(False):
                got += 1
        self._held += got
        return got

    def _release(self, n: int) -> None:
        self._held -= n
        if self._limits is not None:
            for _ in range(n):
                self._limits.connections.release()

    def _collect(self, fut: Any, out: list[Event]) -> None:
        task = self._running.pop(fut.key, None)
        if task is None:  # cancelled by stop(), already reported
            return
        self._release(task.tokens)
        status = fut.status
        if status == "finished":
            outcomes: list[Outcome] = fut.result()
        elif status == "cancelled":
            lost = self._client.status != "running"  # (Dask cancels them as it sees it go)
            outcomes = failed_outcomes(task.shard, _LOST if lost else "interrupted")
        else:
            exc = fut.exception()
            if isinstance(exc, require_distributed().KilledWorker):
                outcomes = _killed(task.shard, exc)
            else:
                reason = (
                    f"Dask task failed after {TASK_RETRIES} retries: {type(exc).__name__}: {exc}"
                )
                outcomes = failed_outcomes(task.shard, reason, attempts=TASK_RETRIES + 1)
        out.extend(_events(task.seq, outcomes))


_LOST = "the Dask scheduler was lost"


def _killed(shard: Shard, exc: Any) -> list[Outcome]:
    """The files of a task whose workers died while running it (``KilledWorker``).

    Dask gives up on such a task after ``distributed.scheduler.allowed-failures`` deaths,
    not after :data:`TASK_RETRIES` (those are for a task that raises): its files failed
    as "failed after 2 retries: KilledWorker", as if the mirror had refused them, when
    the worker (killed, out of memory, its machine lost) was the cause. Their partial
    files stay in DEST for the next run."""
    deaths = int(getattr(exc, "allowed_failures", 0)) + 1
    last = getattr(getattr(exc, "last_worker", None), "address", None)
    said = [f"{deaths} workers in turn"] if deaths > 1 else []
    if last:
        said.append(f"the last at {last}" if said else str(last))
    detail = f" ({', '.join(said)})" if said else ""
    reason = f"the Dask worker running it died{detail}; the next run resumes it"
    return failed_outcomes(shard, reason, attempts=deaths)


def _events(worker: int, outcomes: list[Outcome]) -> list[Event]:
    events: list[Event] = []
    nbytes = sum(o.received for o in outcomes)
    if nbytes:
        events.append(BytesEvent(worker, nbytes))
    for o in outcomes:
        events.append(FileDone(worker, o))
        if o.fatal:
            events.append(WorkerFatal(worker, o.error or "fatal I/O error on a worker"))
    return events


def check_scheduler(address: str | None, timeout: float) -> None:
    """A :class:`UsageError` unless a TCP connection to the scheduler at ``address`` opens.

    Asked before a run makes DEST and takes its lock: ``Client`` retries a refused
    connection for its whole timeout (10 s), and the run had made DEST, its lock and
    its state by then. A port that answers is left for ``Client`` to check (the
    scheduler logs the probe at INFO: "closed before handshake completed"); an address
    of a scheme not over TCP is too."""
    if not address:
        raise _no_scheduler()
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, loc = parse_address(address)
        if scheme not in ("tcp", "tls", "ws", "wss"):  # (all of them over TCP)
            return
        host, port = parse_host_port(loc, 8786)
    except ValueError as exc:
        raise _bad_address(address, exc) from None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
        raise _unreachable(address, f"cannot connect to {host}:{port}: {why}") from None


def _no_scheduler() -> UsageError:
    return UsageError(
        "--executor dask needs --scheduler tcp://HOST:8786 (or DASK_SCHEDULER_ADDRESS)",
        "start one with 'dask scheduler --host HOST'",
    )


def _unreachable(address: str, why: object) -> UsageError:
    return UsageError(
        f"cannot reach the Dask scheduler at {address}: {why}",
        "is 'dask scheduler' running there, and its port open to this machine?",
    )


def _bad_address(address: str, exc: ValueError) -> UsageError:
    return UsageError(f"--scheduler {address}: {exc}", "give the scheduler as tcp://HOST:PORT")


def _connect(dist: ModuleType, address: str | None) -> Any:
    if not address:
        raise _no_scheduler()
    try:
        return dist.Client(address, timeout=10, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise _unreachable(address, exc) from None
    except ValueError as exc:  # an address distributed cannot read (a scheme it lacks)
        raise _bad_address(address, exc) from None
