"""How local worker processes start.

Workers fork from a ``multiprocessing`` fork server that has imported the
worker's code (:mod:`fetcher.runner`: httpx, tenacity) once, instead of each
being a fresh interpreter that imports it again. The server is a clean,
single-threaded process: nothing of the coordinator (its crawl thread, its
state database, the display) reaches a worker, as with ``spawn``.

This module stays light: the CLI calls :func:`prestart` before it imports the
pipeline, so the server boots on another core meanwhile.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

__all__ = ["prestart", "worker_context"]

WORKER_MODULES = ["fetcher.startup", "fetcher.runner"]


def worker_context() -> Any:
    """``forkserver`` where the platform has one (Linux, macOS), else ``spawn``."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_MODULES)
    return ctx


def prestart() -> None:
    """Start the fork server now rather than when the first shard is ready."""
    if worker_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
