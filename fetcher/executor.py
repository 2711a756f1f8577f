"""Run shard runners somewhere: local worker processes, or a Dask cluster.

An executor takes shards with ``submit()``, is told ``finish()`` when no more
will come, and hands back batches of events with ``events()``.  It never
writes state or draws anything: that is the coordinator's job.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import queue
import signal
import sys
from collections.abc import Iterator
from multiprocessing.connection import wait as mp_wait
from typing import Any, Protocol

from fetcher.config import Transfer
from fetcher.errors import FatalIOError
from fetcher.limits import SharedLimits
from fetcher.models import Event, WorkerExit
from fetcher.procs import worker_context
from fetcher.runner import worker_main
from fetcher.shard import Shard

__all__ = ["Executor", "LocalExecutor"]


class Executor(Protocol):
    shard_files: int
    """How many files a shard should hold: a worker commits to a whole shard at once,
    so small shards keep the end of a run even; a Dask task wants more to be worth it."""
    small_shard_files: int
    """The same for small new files (:func:`~fetcher.download.pipelinable`), which a
    worker's lanes take in trains: more of them to a shard cost the end of a run little."""
    lost: str
    """Why a file came back "interrupted" when the run had not asked it to stop (its
    worker went): the failure the run records for it."""

    def submit(self, shard: Shard) -> None: ...
    def finish(self) -> None: ...
    def events(self, timeout: float) -> list[Event]: ...
    def done(self) -> bool: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def join(self, timeout: float) -> None: ...
    def dead(self) -> list[int]: ...


@contextlib.contextmanager
def _no_main_reimport() -> Iterator[None]:
    # spawn and forkserver re-import the parent's __main__ in every child (for the `fetch`
    # script that is the CLI, rich, the pipeline, ...: ~0.3 s of CPU per worker). The
    # workers' target lives in fetcher.runner, so they need none of it: hide __main__'s
    # origin meanwhile.
    main = sys.modules["__main__"]
    saved: dict[str, Any] = {
        k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__
    }
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


class LocalExecutor:
    """Up to ``procs`` worker processes pulling small shards from one queue; a worker
    starts with each shard until there are ``procs`` of them, so a run that finds
    nothing to fetch starts none.

    With ``ctx`` the ``fork`` context (:func:`fetcher.procs.fork_safe` said this process
    has no other thread) the workers are forked from a copy of this process made here,
    now (:func:`_zygote_main`): later the crawl's and the display's threads are running,
    and forking this process would copy them mid-step. The copy has imported everything
    and starts no thread, so a worker forked from it costs about a millisecond, on the
    other core. (Forking all ``procs`` workers here instead cost the coordinator ~5 ms
    before its first request, and each idle worker ~5 ms of CPU: 14 ms of a 0.25 s
    re-sync that fetches nothing.) Otherwise a worker is started from the fork server.
    ``limits`` must come from the same context.
    """

    lost = "interrupted: its worker process stopped"

    def __init__(self, t: Transfer, procs: int, limits: SharedLimits, ctx: Any = None) -> None:
        self.shard_files = max(2, t.threads)
        self.small_shard_files = 4 * self.shard_files
        self._ctx = ctx or worker_context()
        self._shards: Any = self._ctx.Queue()
        self._events: Any = self._ctx.Queue()
        self._stop: Any = self._ctx.Event()
        self._args = (t, self._shards, self._events, limits, self._stop, os.getpid())
        self._max = max(1, procs)
        self._started = 0  # workers asked for
        self._procs: list[Any] = []  # (fork server) the workers, by index
        self._exited: set[int] = set()
        self._finished = False
        # (fork) the copy that forks the workers, asked through _cmd, which also brings
        # its news: a worker's PID, its exit code, a fork that failed (by worker index)
        self._zygote: Any = None
        self._cmd: Any = None
        self._pids: dict[int, int] = {}
        self._codes: dict[int, int | None] = {}
        if self._ctx.get_start_method() == "fork":
            self._start_zygote()

    def _start_zygote(self) -> None:
        mine, theirs = self._ctx.Pipe()
        z = self._ctx.Process(
            target=_zygote_main, args=(theirs, mine, self._args), name="fetch-workers"
        )
        # Frozen, what the workers inherit is out of their collector's sight: its passes
        # do not write to (and so copy) the pages of a parent's objects.
        gc.freeze()
        try:
            with _no_main_reimport():
                z.start()
        except OSError as exc:  # fork(2): EAGAIN at the process limit, ENOMEM
            mine.close()
            raise _cannot_start("worker processes", exc.strerror or str(exc)) from exc
        finally:
            gc.unfreeze()
            theirs.close()
        self._zygote, self._cmd = z, mine

    def _start_one(self) -> None:
        i = self._started
        if self._zygote is not None:
            with contextlib.suppress(OSError):  # it is gone: dead() says so
                self._cmd.send(i)
            self._started += 1
            return
        p = self._ctx.Process(
            target=worker_main, args=(i, *self._args), name=f"fetch-worker-{i}", daemon=True
        )
        try:
            with _no_main_reimport():
                p.start()
        except OSError as exc:  # fork(2): EAGAIN at the process limit, ENOMEM
            raise _cannot_start(f"worker process {i}", exc.strerror or str(exc)) from exc
        self._procs.append(p)
        self._started += 1

    def _news(self) -> None:
        """Take in what the workers' parent has said since last asked (``fork``); all of
        it, before saying that a worker could not start."""
        if self._cmd is None:
            return
        refused: FatalIOError | None = None
        try:
            while self._cmd.poll(0):
                what, i, value = self._cmd.recv()
                if what == "pid":
                    self._pids[i] = value
                elif what == "exit":
                    self._codes[i] = value
                else:  # "failed": fork(2) said no
                    self._codes[i] = None
                    refused = refused or _cannot_start(f"worker process {i}", value)
        except (EOFError, OSError):
            pass  # it is gone: dead() says so
        if refused is not None:
            raise refused

    def submit(self, shard: Shard) -> None:
        if self._finished:
            raise RuntimeError("submit() after finish()")
        self._shards.put(shard)
        if self._started < self._max:
            self._start_one()

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            for _ in range(self._started):
                self._shards.put(None)
            if self._cmd is not None:
                with contextlib.suppress(OSError):
                    self._cmd.send(None)  # no more workers: it ends when they have

    def events(self, timeout: float) -> list[Event]:
        self._news()
        out: list[Event] = []
        try:
            batch = self._events.get(timeout=timeout)
        except queue.Empty:
            batch = None
        while batch is not None:
            out.extend(batch)
            try:
                batch = self._events.get_nowait()
            except queue.Empty:
                batch = None
        for ev in out:
            if isinstance(ev, WorkerExit):
                self._exited.add(ev.worker)
        return out

    def done(self) -> bool:
        """All workers started have exited (cleanly, or died); true when none started."""
        if self._zygote is not None:
            self._news()
            if not self._zygote.is_alive():
                return True  # its workers end with it (they watch it)
            return all(i in self._exited or i in self._codes for i in range(self._started))
        return all(i in self._exited or not p.is_alive() for i, p in enumerate(self._procs))

    def dead(self) -> list[int]:
        """Workers that died without saying goodbye (killed, crashed).

        Asked on every turn of the coordinator's loop: one poll of the workers' exit
        sentinels (under ``fork``, of their parent's news and its sentinel), not a
        waitpid (and a getpid) per worker."""
        if self._zygote is not None:
            self._news()
            if mp_wait([self._zygote.sentinel], timeout=0):
                self._news()  # what it said before it went
                # its workers cannot outlive it: the ones not known to have ended
                # cleanly are lost with it
                lost = set(range(self._started)) - self._exited - set(self._codes)
            else:
                lost = set()
            return sorted(lost | {i for i, code in self._codes.items() if code != 0})
        watch = {p.sentinel: i for i, p in enumerate(self._procs) if i not in self._exited}
        if not watch:
            return []
        ended = [watch[s] for s in mp_wait(list(watch), timeout=0)]
        return sorted(i for i in ended if self._procs[i].exitcode not in (0, None))

    def stop(self) -> None:
        self._stop.set()

    def kill(self) -> None:
        if self._zygote is not None:
            # Its workers are killed by their parent, which has not reaped them yet, so
            # none of their PIDs can be another process's by then; from here one could
            # be, once the parent has reaped it (or died, and init has).
            if self._zygote.is_alive():
                with contextlib.suppress(OSError):
                    self._cmd.send(_KILL)
                self._zygote.join(timeout=5)
            if self._zygote.is_alive():
                self._zygote.kill()  # its workers see it go, and stop (runner.worker_main)
            self._zygote.join(timeout=5)
            with contextlib.suppress(FatalIOError):
                self._news()
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=5)

    def join(self, timeout: float = 10) -> None:
        if self._zygote is not None:
            if not self._finished:
                with contextlib.suppress(OSError):
                    self._cmd.send(None)  # no more workers (finish() says so too)
            self._zygote.join(timeout=timeout)  # it ends once its workers have
            with contextlib.suppress(FatalIOError):
                self._news()
        for p in self._procs:
            p.join(timeout=timeout)
        self._shards.cancel_join_thread()
        self._events.cancel_join_thread()


def _cannot_start(what: str, reason: str) -> FatalIOError:
    """fork(2) refused (EAGAIN at the process limit, ENOMEM), here or in the workers' parent."""
    return FatalIOError(
        f"cannot start {what}: {reason}",
        hint="the system is at its process or memory limit; try a smaller --procs",
    )


_KILL = -1
"""Asks the workers' parent to kill its workers and end (``LocalExecutor.kill``)."""


def _zygote_main(cmd: Any, theirs: Any, args: tuple[Any, ...]) -> None:
    """The workers' parent under ``fork`` (see :class:`LocalExecutor`): forks worker ``i``
    when ``cmd`` brings ``i`` and says its PID, says each worker's exit code when it
    ends, and ends when ``cmd`` has brought ``None`` and its workers have ended, or at
    once, its workers killed, when it brings ``_KILL``.

    It starts no thread (forking a threaded process copies its threads mid-step), so
    it talks over a pipe, whose ``send`` writes at once, and puts nothing on a queue.
    When the coordinator dies, ``cmd`` reads as closed and this process ends at once;
    its workers watch it as they would the coordinator, and stop.
    """
    theirs.close()  # the coordinator's end: its death must read as the end of ``cmd``
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a worker's (runner.worker_main)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ctx = multiprocessing.get_context("fork")
    workers: dict[Any, tuple[int, Any]] = {}  # index and process, by exit sentinel
    more = True
    while more or workers:
        # (``cmd`` is read to the end: after ``None`` it may still bring _KILL)
        for ready in mp_wait([cmd, *workers]):
            if ready in workers:  # a worker's exit sentinel
                i, p = workers.pop(ready)
                p.join()
                _say(cmd, ("exit", i, p.exitcode))
                continue
            try:
                want: int | None = cmd.recv()
            except (EOFError, OSError):
                os._exit(0)  # the coordinator is gone: so is this, and its workers stop
            if want is None:
                more = False
                continue
            if want == _KILL:
                for _, p in workers.values():
                    p.kill()
                for i, p in workers.values():
                    p.join()
                    _say(cmd, ("exit", i, p.exitcode))
                os._exit(0)
            p = ctx.Process(
                target=_worker_main, args=(cmd, want, os.getpid(), *args),
                name=f"fetch-worker-{want}", daemon=True,
            )  # fmt: skip
            try:
                p.start()
            except OSError as exc:  # fork(2): EAGAIN at the process limit, ENOMEM
                _say(cmd, ("failed", want, exc.strerror or str(exc)))
                continue
            workers[p.sentinel] = (want, p)
            _say(cmd, ("pid", want, p.pid))


def _worker_main(
    cmd: Any, i: int, parent: int, t: Transfer, shards: Any, events: Any, limits: Any,
    stop: Any, _: int,
) -> None:  # fmt: skip
    """A worker forked by the workers' parent, ``parent`` (its PID, as it said it). Not
    ``os.getppid()`` here: that parent may have ended (its coordinator killed) between the
    fork and this line, and the worker then watched PID 1, or a subreaper, forever."""
    cmd.close()  # its parent's line to the coordinator is not the worker's
    # the process it watches is its parent, this copy, not the coordinator
    worker_main(i, t, shards, events, limits, stop, parent, forked_by=True)


def _say(cmd: Any, news: tuple[Any, ...]) -> None:
    with contextlib.suppress(OSError):  # the coordinator is gone: recv() will say so
        cmd.send(news)
