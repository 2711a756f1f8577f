"""Imported first by fetch's own processes (the CLI, the worker fork server).

httpx imports its command-line client whenever click and pygments are installed
(the ``dask`` extra brings click): with rich's syntax highlighting, 30 ms of
start-up in every process, for a command fetch never runs. httpx expects that
module may be missing and puts a stub ``httpx.main`` in its place; a ``None`` in
``sys.modules`` makes it missing. This module only does that, and only before
httpx is imported: a program that imports fetch as a library is left alone.
"""

from __future__ import annotations

import sys

__all__ = ["trim_imports"]


def trim_imports() -> None:
    if "httpx" not in sys.modules:
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


trim_imports()
