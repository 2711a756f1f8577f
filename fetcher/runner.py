"""The per-process shard runner: one transport, one thread pool, batched events.

The same :class:`ShardRunner` serves a local worker process (fed from a
queue, :func:`worker_main`) and a Dask task (:func:`run_shard`).  It catches
every per-file failure inside :func:`fetcher.download.fetch_file`, so nothing
escapes to break the pool; events go back to the coordinator in batches.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fetcher.config import Transfer
from fetcher.download import fetch_file
from fetcher.http1 import ThreadConnTransport
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
from fetcher.transport import make_transport

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


class ShardRunner:
    """Fetches jobs on a bounded thread pool over one transport; reports through ``send``."""

    def __init__(
        self,
        t: Transfer,
        worker: int,
        send: Callable[[list[Event]], None],
        limits: SharedLimits | None = None,
        stop: threading.Event | None = None,
        parent: int | None = None,
    ) -> None:
        """``parent``: the coordinator's PID; when it is gone, this runner stops."""
        self.t = t
        self.worker = worker
        # A multiprocessing Event takes a cross-process lock on every is_set(); the hot
        # path (per chunk, per file) checks this local copy, kept in step by the ticker.
        self._shared_stop = stop
        self.stop = threading.Event()
        self._parent = parent
        self.orphaned = False
        self.limits = limits
        self.transport = make_transport(t, limits, self.stop)
        self.scope = Scope.for_start(t.root, t.aliases)
        self.retrying = build_retrying(t, sleep=self._sleep)
        self.pool = ThreadPoolExecutor(t.threads, thread_name_prefix=f"w{worker}")
        self.batch = _Batcher(send, worker)
        self.known_dirs: set[Path] = set()
        self._lock = threading.Lock()
        self._inflight = 0
        self._released = False
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._closed = threading.Event()
        self._ticker.start()

    def _sleep(self, seconds: float) -> None:
        self.stop.wait(seconds)

    def _tick(self) -> None:
        while not self._closed.wait(0.1):
            if self._shared_stop is not None and self._shared_stop.is_set():
                self.stop.set()
            if self._parent is not None and os.getppid() != self._parent:
                # the coordinator is gone (killed): stop, keeping partial files for resume
                self.orphaned = True
                self.stop.set()
            self.batch.flush()

    def fetch(self, job: Job) -> Outcome:
        self._released = False
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
            out = self._fetch(job, on_retry)
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

    def _fetch(self, job: Job, on_retry: Callable[[int, str], None]) -> Outcome:
        return fetch_file(
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
        )

    def submit(self, job: Job) -> Future[Outcome]:
        with self._lock:
            self._inflight += 1
        fut = self.pool.submit(self.fetch, job)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _fut: Future[Outcome]) -> None:
        with self._lock:
            self._inflight -= 1
            idle = not self._inflight
        if idle:
            # Nothing left running here: report now rather than at the next tick, or the
            # end of a run (and the next shard) waits for it.
            self.batch.flush()

    def release_idle(self) -> None:
        """Close idle keep-alive connections so other processes can have their tokens.

        Called when this worker has nothing to do: an idle connection still holds one
        of the run's ``--max-connections`` tokens, and another worker may be waiting.
        """
        with self._lock:
            if self._inflight or self._released:
                return
            self._released = True
            if isinstance(self.transport, ThreadConnTransport):
                self.transport.close_idle()
                return
            old, self.transport = self.transport, make_transport(self.t, self.limits, self.stop)
        old.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self._closed.set()
        self._ticker.join()
        self.batch.flush()
        self.transport.close()


def worker_main(
    worker: int,
    t: Transfer,
    shards: Any,
    events: Any,
    limits: SharedLimits | None,
    stop: Any,
    parent: int | None = None,
) -> None:
    """Entry point of a local worker process (``spawn``): pull shards until ``None``."""
    # Ctrl-C reaches the whole process group; only the coordinator decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    runner = ShardRunner(t, worker, events.put, limits, stop, parent)
    # A few jobs queued beyond the threads keep them busy between shards; more would
    # sit here while another worker idles at the end of the run.
    inflight = threading.BoundedSemaphore(t.threads + 2)
    try:
        while not runner.stop.is_set():
            try:
                shard: Shard | None = shards.get(timeout=0.5)
            except queue.Empty:
                runner.release_idle()
                continue
            if shard is None:
                break
            for job in shard.jobs:
                while not inflight.acquire(timeout=0.5):
                    if runner.stop.is_set():
                        break
                else:
                    runner.submit(job).add_done_callback(lambda _f: inflight.release())
                    continue
                break
    finally:
        runner.close()
        if runner.orphaned:
            # nobody reads the queues any more: do not wait at exit to flush them
            events.cancel_join_thread()
            shards.cancel_join_thread()
        else:
            events.put([WorkerExit(worker)])


def run_shard(
    shard: Shard, t: Transfer, worker: int = 0, limits: SharedLimits | None = None
) -> list[Outcome]:
    """Run one shard to completion in this process; the Dask task body."""
    sink: list[Event] = []
    runner = ShardRunner(t, worker, sink.extend, limits)
    try:
        futures = [runner.submit(j) for j in shard.jobs]
        return [f.result() for f in futures]
    finally:
        runner.close()
