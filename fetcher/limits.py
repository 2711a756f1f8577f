"""Politeness limits that hold across every process of a run.

* a cap on open connections to the mirror (one token per TCP connection,
  taken when a transport opens a socket and given back when it closes), so
  ``--max-connections`` holds however many processes and threads there are;
* a pause gate: a ``429``/``503`` with ``Retry-After`` seen by any thread
  slows the whole run down for that host, not just that thread;
* a token bucket for ``--limit-rate`` shared by all workers;
* and the other way round, a floor on the server's rate (``--min-rate``,
  :class:`Pace`): a body that trickles fails, where each byte just inside the
  read timeout had held its thread, and the run, for as long as the server liked.

:class:`SharedLimits` is built by the coordinator from ``multiprocessing``
primitives of the workers' context and handed to workers when they start.
Without one (a Dask task, a unit test) each limit is process-local.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from fetcher.errors import TooSlow
from fetcher.progress import human_bytes

__all__ = ["Pace", "SharedLimits", "TokenGate", "local_limits", "pace"]


class SharedLimits(msgspec.Struct, frozen=True):
    """Cross-process limits; every field pickles to a worker process."""

    connections: Any  # a Semaphore (multiprocessing or threading)
    pause_until: Any  # a Value('d') holding a time.time() deadline
    rate: float | None
    bucket: Any  # Value('d') tokens, Value('d') last refill
    bucket_stamp: Any
    lock: Any

    @staticmethod
    def create(max_connections: int, rate: float | None, ctx: Any = None) -> SharedLimits:
        ctx = ctx or multiprocessing.get_context("spawn")
        lock = ctx.Lock()
        return SharedLimits(
            connections=ctx.BoundedSemaphore(max_connections),
            pause_until=ctx.Value("d", 0.0, lock=False),
            rate=rate,
            bucket=ctx.Value("d", 0.0, lock=False),
            bucket_stamp=ctx.Value("d", time.monotonic(), lock=False),
            lock=lock,
        )

    # -- pause gate -------------------------------------------------------
    def pause(self, seconds: float) -> None:
        until = time.time() + seconds
        with self.lock:
            if until > self.pause_until.value:
                self.pause_until.value = until

    def paused(self) -> bool:
        """A ``429``/``503`` asked for a pause that has not ended: send no new request."""
        return bool(self.pause_until.value > time.time())

    def wait_pause(
        self, stop: threading.Event | None = None, sleep: Callable[[float], Any] = time.sleep
    ) -> None:
        while True:
            left = self.pause_until.value - time.time()
            if left <= 0 or (stop is not None and stop.is_set()):
                return
            sleep(min(left, 0.5))

    # -- rate -------------------------------------------------------------
    def consume(self, nbytes: int, sleep: Callable[[float], Any] = time.sleep) -> None:
        """Block until ``nbytes`` may be sent under the shared rate."""
        if not self.rate:
            return
        burst = max(self.rate * 0.25, 65536.0)
        with self.lock:
            now = time.monotonic()
            tokens = min(burst, self.bucket.value + (now - self.bucket_stamp.value) * self.rate)
            tokens -= nbytes
            self.bucket.value = tokens
            self.bucket_stamp.value = now
        if tokens < 0:
            sleep(-tokens / self.rate)


class Pace:
    """``--min-rate``: one body's bytes, counted as they come; fewer than ``rate`` a second
    over a stretch of ``window`` seconds is :class:`~fetcher.errors.TooSlow` (curl's
    ``--speed-limit``/``--speed-time``, aria2c's ``--lowest-speed-limit``).

    The read timeout alone bounds the wait for each read, not for the body: a server
    sending a byte every 29 s held a file, and the run with it, for ever. Time this
    process spent in its own ``--limit-rate`` waits (:meth:`held`) is not the server's
    and does not count. Looked at as bytes come, so a stall is found by the read
    timeout, a trickle within a window of its next byte."""

    __slots__ = ("_clock", "_got", "_held", "_since", "rate", "window")

    def __init__(
        self, rate: float, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.window = window
        self._clock = clock
        self._since = clock()
        self._got = 0
        self._held = 0.0

    def add(self, n: int, what: str) -> None:
        """``n`` more bytes of ``what`` (named in the error) came."""
        self._got += n
        now = self._clock()
        span = now - self._since - self._held
        if span < self.window:
            return
        if self._got < self.rate * span:
            raise TooSlow(
                f"{what} came at {human_bytes(self._got / span)}/s over {span:.0f} s,"
                f" under --min-rate {human_bytes(self.rate)}/s"
            )
        self._since, self._got, self._held = now, 0, 0.0

    def held(self, seconds: float) -> None:
        """This process held the body back ``seconds`` itself (``--limit-rate``)."""
        self._held += seconds


def pace(rate: float | None, window: float) -> Pace | None:
    """A :class:`Pace` for one body, or None without ``--min-rate``."""
    return Pace(rate, window) if rate else None


def local_limits(max_connections: int, rate: float | None = None) -> SharedLimits:
    """The same limits for one process only (Dask tasks, tests)."""
    return SharedLimits(
        connections=threading.BoundedSemaphore(max_connections),
        pause_until=_Box(0.0),
        rate=rate,
        bucket=_Box(0.0),
        bucket_stamp=_Box(time.monotonic()),
        lock=threading.Lock(),
    )


class _Box:
    __slots__ = ("value",)

    def __init__(self, value: float) -> None:
        self.value = value


_CLOSE_GRACE = 0.05  # seconds; connections close rarely (idle workers, reclaim, crawl end)
_SLICE = 0.05  # seconds a waiting thread waits before it looks at ``stop`` and reclaims again


class TokenGate:
    """One process's side of the connection cap: a token per open connection.

    A closing connection hands its token to a thread of this process that waits
    for one (it was usually closed for that thread's sake), rather than to any
    process: no churn.  Waiting never times out by itself; it ends when a token
    comes or ``stop`` is set.

    A thread waiting on the semaphore cannot be woken by a token handed over beside
    it, so one waiting thread of the process at most waits on the semaphore (the
    *blocker*) and the others wait on the condition, which a token handed over
    wakes at once.  A token given back while the blocker alone waits goes to the
    semaphore it waits on: that wakes it at once too (a thread of another process
    waiting on the semaphore then may take it first; the cap holds all the same).
    """

    def __init__(self, sem: Any, stop: threading.Event | None = None) -> None:
        self._sem = sem
        self._stop = stop
        self._cond = threading.Condition()
        self._waiting = 0  # threads in acquire(), the blocker among them
        self._blocked = False  # a thread of acquire() waits on the semaphore
        self._spare = 0  # tokens handed over, for the threads waiting on the condition

    def acquire(self, reclaim: Callable[[], bool] = lambda: False) -> bool:
        """Take a token; ``reclaim`` may close an idle connection of ours to free one.

        False when the run is stopping.
        """
        blocker = False
        with self._cond:
            self._waiting += 1
        try:
            while True:
                with self._cond:
                    if self._spare:
                        self._spare -= 1
                        return True
                    if not self._blocked:
                        self._blocked = blocker = True
                    if not blocker and self._cond.wait(_SLICE):
                        continue  # a token handed over, or the semaphore free to wait on
                if blocker and self._sem.acquire(True, _SLICE):
                    return True
                if self._stop is not None and self._stop.is_set():
                    return False
                reclaim()
        finally:
            with self._cond:
                self._waiting -= 1
                if blocker:
                    self._blocked = False
                    self._cond.notify()  # another waiting thread waits on the semaphore now
                extra = max(0, self._spare - self._beside())
                self._spare -= extra
            for _ in range(extra):
                self._sem.release()

    def try_acquire(self, reclaim: Callable[[], bool] = lambda: False) -> bool:
        """Take a token if one is free now; else, if ``reclaim`` closed an idle connection
        of ours, the token it frees (given back after the close grace: a wait of at most
        one slice). Never waits for another connection to end."""
        return self._take(0) or (reclaim() and self._take(_SLICE))

    def _take(self, timeout: float) -> bool:
        with self._cond:
            if self._spare:
                self._spare -= 1
                return True
        return bool(self._sem.acquire(True, timeout))  # (positional: block/blocking)

    def _beside(self) -> int:
        """The waiting threads a token handed over can wake (under ``_cond``): all but the
        blocker.  One that has yet to find out whether it is the blocker counts: it
        looks for a spare token first."""
        return self._waiting - self._blocked

    def release(self, closed: bool = False) -> None:
        """Give a token back, a moment later, so the server has seen the close first.

        The cap then holds as the server counts connections, too. ``closed``: the
        server has closed its end already (it counts the connection no more): at once.
        A server that closes every connection (HTTP/1.0, keep-alive off) had cost each
        thread the moment per file.
        """
        if closed:
            self.release_now()
            return
        timer = threading.Timer(_CLOSE_GRACE, self.release_now)
        timer.daemon = True
        timer.start()

    def release_now(self) -> None:
        with self._cond:
            if self._beside() > self._spare:
                self._spare += 1
                self._cond.notify()
                return
        self._sem.release()
