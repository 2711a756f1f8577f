"""How a run starts its workers: when it may fork them itself, and what a fork must not keep."""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from fetcher.config import build_job
from fetcher.errors import LockHeld
from fetcher.live import RichReporter
from fetcher.state import RunLock
from tests.background import hold_listing, mirror_in_background, semaphores_of
from tests.faultserver import FaultServer

REPO = Path(__file__).resolve().parent.parent


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks itself on Linux only")
def test_fork_safe_only_while_the_process_has_one_thread() -> None:
    code = (
        "import threading; from fetcher.procs import fork_safe, worker_context\n"
        "print(fork_safe(), worker_context(fork_safe()).get_start_method())\n"
        "e = threading.Event(); t = threading.Thread(target=e.wait); t.start()\n"
        "print(fork_safe(), worker_context(fork_safe()).get_start_method())\n"
        "e.set(); t.join(); print(fork_safe())\n"
    )
    assert _python(code).split("\n") == ["True fork", "False forkserver", "True"]


def test_a_forked_child_does_not_keep_the_run_lock(tmp_path: Path) -> None:
    lock = RunLock(tmp_path)
    lock.acquire()
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait until the parent says so, holding whatever it inherited
        os.close(w)
        os.write(ready_w, b"!")  # the fork's hooks have run by now
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    os.close(ready_w)
    try:
        assert select.select([ready_r], [], [], 30)[0], "the child did not start"
        os.close(ready_r)
        lock.release()
        again = RunLock(tmp_path)
        again.acquire()  # LockHeld if the child's copy of the descriptor still held it
        again.release()
    finally:
        os.close(w)
        os.waitpid(pid, 0)


def test_the_run_lock_still_excludes_a_second_run(tmp_path: Path) -> None:
    with RunLock(tmp_path), pytest.raises(LockHeld):
        RunLock(tmp_path).acquire()


def _refresh_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if type(t).__name__ == "_RefreshThread"]


def test_the_live_display_starts_its_thread_at_begin_not_before() -> None:
    rep = RichReporter(Console(file=io.StringIO(), force_terminal=True, width=80))
    assert _refresh_threads() == []  # the run may still fork its workers
    rep.begin()
    try:
        assert len(_refresh_threads()) == 1
    finally:
        rep.close()
    assert _refresh_threads() == []
    RichReporter(Console(file=io.StringIO())).close()  # closing one never begun is fine


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="named semaphores live in /dev/shm")
def test_a_dry_run_makes_no_cross_process_locks(tmp_path: Path) -> None:
    # Only the coordinator takes connection tokens in a dry run: process-local locks do,
    # and no named semaphore (nor multiprocessing's tracker process for them) is made.
    with FaultServer() as srv:
        gate = hold_listing(srv, {"/pub/a.txt": b"a", "/pub/sub/b.txt": b"b"}, "/pub/sub/")
        job = build_job(
            {"url": srv.url + "pub/", "dest": str(tmp_path / "d"), "dry_run": True}, "t"
        )
        before = semaphores_of([os.getpid()])
        with mirror_in_background(job, gate) as result:
            assert srv.wait_for(1, path="/pub/sub/", timeout=30), "the crawl never got to sub/"
            made = semaphores_of([os.getpid()]) - before
    assert made == set()
    assert result and result[0].exit_code == 0


_WORKER_STARTS_AFTER_ITS_PARENT_DIED = """
import os, sys
import fetcher.executor as executor

run_worker = executor._worker_main

def held(*args):
    with open(os.environ["HOLD"], "rb") as fifo:  # the test lets it go on
        fifo.read()
    run_worker(*args)

executor._worker_main = held
from fetcher.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _group(pgid: int) -> dict[int, int]:
    """The live processes of process group ``pgid``: PID -> parent PID."""
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state not in "ZX":
            out[int(entry.name)] = int(ppid)
    return out


def _until(what: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not what():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _let_go(fifo: Path) -> bool:
    """Open ``fifo`` for writing and close it (its reader reads the end), once it has one."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # (ENXIO: no reader yet)
        return False
    os.close(fd)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks itself on Linux only")
def test_a_worker_whose_parent_died_as_it_forked_it_stops(tmp_path: Path) -> None:
    """A worker watches its parent (the copy of the coordinator that forks the workers)
    by its own parent PID, which it read as it started. The coordinator killed (SIGKILL,
    that process alone) just as a worker was forked, the workers' parent ended at once,
    and the worker, started a moment after, took its new parent (PID 1, or a subreaper)
    for the one to watch: it never stopped, for as long as the machine ran. The
    workers' parent now gives its PID to each worker it forks."""
    www = tmp_path / "www"
    www.mkdir()
    for i in range(4):
        (www / f"f{i}.bin").write_bytes(bytes([i]) * 5000)
    hold = tmp_path / "hold"
    os.mkfifo(hold)
    with FaultServer(root=www) as srv:
        argv = [sys.executable, "-c", _WORKER_STARTS_AFTER_ITS_PARENT_DIED, "--mirror",
                srv.url, "--dest", str(tmp_path / "d"), "--procs", "1", "-q"]  # fmt: skip
        proc = subprocess.Popen(argv, cwd=REPO, env=dict(os.environ, HOLD=str(hold)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        try:
            workers: list[int] = []

            def forked() -> bool:
                group = _group(proc.pid)
                zygotes = [pid for pid, ppid in group.items() if ppid == proc.pid]
                workers[:] = [pid for pid, ppid in group.items() if ppid in zygotes]
                return bool(workers)

            assert _until(forked, 30), "no worker was forked"
            os.kill(proc.pid, signal.SIGKILL)  # the coordinator alone
            proc.wait(10)
            assert _until(lambda: set(_group(proc.pid)) == set(workers), 10)
            assert _until(lambda: _let_go(hold), 10)  # the worker starts now, its parent gone
            assert _until(lambda: not _group(proc.pid), 5), "the worker is still running"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
