"""Runs watched while they go: ``pipeline.mirror`` in a thread against a server that holds
one listing, a CLI run in a session of its own (for signals to its process group), and the
named semaphores a run leaves in ``/dev/shm``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence

from fetcher.config import MirrorJob
from fetcher.models import Summary
from fetcher.pipeline import mirror
from tests.faultserver import Fault, FaultServer


def hold_listing(srv: FaultServer, files: dict[str, bytes], held: str) -> threading.Event:
    """Serve ``files`` (path → content); every request for ``held`` waits for the event."""
    gate = threading.Event()
    for path, data in files.items():
        srv.add_file(path, data)
    srv.persist(held, Fault.gated(gate))
    return gate


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


def named_semaphores() -> set[str]:
    """multiprocessing's named semaphores now in /dev/shm (empty where there is none)."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("sem.mp-")}
    except OSError:
        return set()


@contextlib.contextmanager
def fetch_session(
    argv: Sequence[str], *, shell_prefix: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m fetcher ARGV`` in a session of its own (stdout and stderr together,
    piped), through ``sh -c SHELL_PREFIX`` if given; its whole group killed if the test
    leaves it running."""
    cmd = [sys.executable, "-m", "fetcher", *argv]
    if shell_prefix is not None:
        cmd = ["sh", "-c", f'{shell_prefix} exec "$@"', "sh", *cmd]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
