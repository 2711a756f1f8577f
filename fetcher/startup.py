"""Imported first by fetch's own processes (the CLI, the worker fork server).

httpx imports its command-line client whenever click and pygments are installed
(the ``dask`` extra brings click): with rich's syntax highlighting, 30 ms of
start-up in every process, for a command fetch never runs. httpx expects that
module may be missing and puts a stub ``httpx.main`` in its place; a ``None`` in
``sys.modules`` makes it missing. This module does that (only before httpx is
imported) and sets the collector's pace, below: a program that imports fetch as
a library is left alone.

The cyclic garbage collector runs whenever 700 more container objects are alive
than at its last pass (Python's default), and each pass examines all of the new
ones. A run makes several per file (a listing entry, a job, an outcome, a state
row), nearly all freed by reference counting soon after; cycles are rare. At
50,000 a 5,000-file run makes the collector run twice, not ~110 times: its time
went from 20-25 ms of CPU over all processes to 0.1 ms (``gc.callbacks``).
Garbage in cycles still goes, a little later.
"""

from __future__ import annotations

import gc
import sys

__all__ = ["GC_THRESHOLD", "trim_imports"]

GC_THRESHOLD = 50_000


def trim_imports() -> None:
    if "httpx" not in sys.modules:
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


trim_imports()
gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
