"""Runs watched while they go: ``pipeline.mirror`` in a thread against a server that holds
one listing, a CLI run in a session of its own (for signals to its process group), and the
named semaphores a run's processes hold."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence

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


def semaphores_of(pids: Iterable[int]) -> set[str]:
    """multiprocessing's named semaphores in /dev/shm (``sem.mp-*``) that these processes
    have open: theirs alone, not those of anything else running on the machine (a test
    that counted every new name there failed, and unlinked another program's, when
    another test suite ran beside it). glibc maps a semaphore under a temporary name it
    then links to the real one, so the maps give its inode, not its name."""
    inodes = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    fields = line.split()
                    if len(fields) >= 6 and fields[5].startswith("/dev/shm/sem."):
                        inodes.add(int(fields[4]))
        except OSError:
            continue  # gone, or not ours to read
    found = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir("/dev/shm"):
            if entry.name.startswith("sem.mp-"):
                with contextlib.suppress(OSError):
                    if entry.inode() in inodes:
                        found.add(entry.name)
    return found


def process_group(pgid: int) -> list[int]:
    """The processes now in process group ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and fields[2] == str(pgid):  # state, ppid, pgrp
            pids.append(int(entry))
    return pids


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
