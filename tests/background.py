"""A run of ``pipeline.mirror`` in a thread, for tests that look at the server meanwhile."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from fetcher.config import MirrorJob
from fetcher.models import Summary
from fetcher.pipeline import mirror


@contextlib.contextmanager
def mirror_in_background(job: MirrorJob, release: threading.Event) -> Iterator[list[Summary]]:
    """Start ``mirror(job)`` in a thread; yield the list its summary will be put in.

    On leaving, ``release`` is set (the gate the test held the server with) and the run is
    waited for, at most 60 s; a run still going then fails the test.
    """
    result: list[Summary] = []
    th = threading.Thread(target=lambda: result.append(mirror(job)), daemon=True)
    th.start()
    try:
        yield result
    finally:
        release.set()
        th.join(timeout=60)
    assert not th.is_alive(), "the run did not finish within 60 s of its release"
