"""How local worker processes start.

When the coordinator is still single-threaded at the start of a run (the CLI,
a script that calls :func:`fetcher.pipeline.mirror` before starting threads),
it forks a copy of itself there and then, before its crawl thread and its
display start, and that copy forks each worker when the first shards need it
(:class:`fetcher.executor.LocalExecutor`): a worker is a copy of a process that
has already imported everything, so no interpreter starts, no module is
imported again, and there is no fork server and no resource tracker; a run that
finds nothing to fetch starts no worker. Its locks and queues are anonymous (a
semaphore is unlinked as soon as it exists), so even a ``kill -9`` of the whole
process group leaves nothing behind in ``/dev/shm``.

Otherwise (threads already running, which forking would copy mid-step; a
platform without ``fork``) workers fork on demand from a ``multiprocessing``
fork server that has imported the worker's code (:mod:`fetcher.runner` and httpx)
once: a clean, single-threaded process, so nothing of the coordinator reaches a
worker, as with ``spawn``.

This module stays light: the CLI calls :func:`prestart` before it imports the
pipeline, so the server boots on another core meanwhile.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from typing import Any

__all__ = ["fork_safe", "prestart", "worker_context"]

WORKER_MODULES = ["fetcher.startup", "fetcher.runner"]


def fork_safe() -> bool:
    """True when this process may fork its workers itself: Linux, and one thread.

    Counts the kernel's threads (``/proc/self/task``), not just :mod:`threading`'s,
    so a thread some library started in C also counts; waits up to 0.1 s for one that
    :mod:`threading` has already joined to be gone.
    """
    if not sys.platform.startswith("linux"):
        return False
    for _ in range(20):
        try:
            if len(os.listdir("/proc/self/task")) == 1:
                return True
        except OSError:
            return False
        if threading.active_count() > 1:
            return False
        # A joined thread (a previous job's) leaves the kernel a moment after join()
        time.sleep(0.005)
    return False


def worker_context(fork: bool = False) -> Any:
    """``fork`` when asked (see :func:`fork_safe`), else ``forkserver`` where the platform
    has one (Linux, macOS), else ``spawn``."""
    if fork:
        return multiprocessing.get_context("fork")
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_MODULES)
    return ctx


def prestart() -> None:
    """Start the fork server now rather than when the first shard is ready.

    Not when this process will fork its workers itself."""
    if fork_safe():
        return
    if worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
