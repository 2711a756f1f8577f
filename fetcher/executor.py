"""Run shard runners somewhere: local worker processes, or a Dask cluster.

An executor takes shards with ``submit()``, is told ``finish()`` when no more
will come, and hands back batches of events with ``events()``.  It never
writes state or draws anything: that is the coordinator's job.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
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
    """Up to ``procs`` worker processes pulling small shards from one queue.

    With ``ctx`` the ``fork`` context (:func:`fetcher.procs.fork_safe` said this process
    has no other thread) every worker is forked here, now: later the crawl's and the
    display's threads are running and forking would copy them mid-step. A fork of a
    process that has imported everything costs about a millisecond, and an idle worker
    little more. Otherwise a worker is started from the fork server with each shard
    until there are ``procs`` of them, so a run that finds nothing to fetch starts none.
    ``limits`` must come from the same context.
    """

    def __init__(self, t: Transfer, procs: int, limits: SharedLimits, ctx: Any = None) -> None:
        self.shard_files = max(2, t.threads)
        self.small_shard_files = 4 * self.shard_files
        self._ctx = ctx or worker_context()
        self._shards: Any = self._ctx.Queue()
        self._events: Any = self._ctx.Queue()
        self._stop: Any = self._ctx.Event()
        self._args = (t, self._shards, self._events, limits, self._stop, os.getpid())
        self._max = max(1, procs)
        self._procs: list[Any] = []
        self._exited: set[int] = set()
        self._finished = False
        if self._ctx.get_start_method() == "fork":
            # Frozen, what the workers inherit is out of their collector's sight: its
            # passes do not write to (and so copy) the pages of a parent's objects.
            gc.freeze()
            try:
                while len(self._procs) < self._max:
                    self._start_one()
            except FatalIOError:
                self.kill()  # the ones already started would wait for shards that never come
                raise
            finally:
                gc.unfreeze()

    def _start_one(self) -> None:
        i = len(self._procs)
        p = self._ctx.Process(
            target=worker_main, args=(i, *self._args), name=f"fetch-worker-{i}", daemon=True
        )
        try:
            with _no_main_reimport():
                p.start()
        except OSError as exc:  # fork(2): EAGAIN at the process limit, ENOMEM
            raise FatalIOError(
                f"cannot start worker process {i}: {exc.strerror or exc}",
                hint="the system is at its process or memory limit; try a smaller --procs",
            ) from exc
        self._procs.append(p)

    def submit(self, shard: Shard) -> None:
        if self._finished:
            raise RuntimeError("submit() after finish()")
        self._shards.put(shard)
        if len(self._procs) < self._max:
            self._start_one()

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            for _ in self._procs:
                self._shards.put(None)

    def events(self, timeout: float) -> list[Event]:
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
        return all(i in self._exited or not p.is_alive() for i, p in enumerate(self._procs))

    def dead(self) -> list[int]:
        """Workers that died without saying goodbye (killed, crashed).

        Asked on every turn of the coordinator's loop: one poll of the workers' exit
        sentinels, not a waitpid (and a getpid) per worker."""
        watch = {p.sentinel: i for i, p in enumerate(self._procs) if i not in self._exited}
        if not watch:
            return []
        ended = [watch[s] for s in mp_wait(list(watch), timeout=0)]
        return sorted(i for i in ended if self._procs[i].exitcode not in (0, None))

    def stop(self) -> None:
        self._stop.set()

    def kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=5)

    def join(self, timeout: float = 10) -> None:
        for p in self._procs:
            p.join(timeout=timeout)
        self._shards.cancel_join_thread()
        self._events.cancel_join_thread()
