"""Local worker processes, started with the shards that need them: forked from a copy of a
single-threaded coordinator, else from the fork server; against a real server."""

from __future__ import annotations

import errno
import gc
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fetcher.config import Transfer
from fetcher.errors import FatalIOError
from fetcher.executor import LocalExecutor
from fetcher.limits import SharedLimits
from fetcher.models import Action, FileDone, Job, RelPath, RemoteFile, Status, WorkerExit
from fetcher.procs import worker_context
from fetcher.shard import Shard
from tests.faultserver import Fault, FaultServer

RunFetch = Callable[..., Any]


def _drain(ex: LocalExecutor, deadline: float) -> list[object]:
    events: list[object] = []
    while not ex.done() and time.monotonic() < deadline:
        events += ex.events(timeout=0.1)
    return events + ex.events(timeout=0)


def _run(
    tmp_path: Path, url: str, shards: list[Shard], ex: LocalExecutor | None = None
) -> list[object]:
    if ex is None:
        t = Transfer(dest=str(tmp_path / "d"), root=url, threads=2)
        limits = SharedLimits.create(8, None, worker_context())
        ex = LocalExecutor(t, 4, limits)
    try:
        for s in shards:
            ex.submit(s)
        ex.finish()
        events = _drain(ex, time.monotonic() + 60)
        assert ex.done() and ex.dead() == []
        return events
    finally:
        ex.stop()
        ex.join(timeout=10)
        ex.kill()


def test_nothing_submitted_starts_no_worker(tmp_path: Path) -> None:
    with FaultServer(root=tmp_path) as srv:
        assert _run(tmp_path, srv.url, []) == []


def _files(www: Path, n: int, byte: bytes) -> Path:
    """``f0`` .. ``f{n-1}`` of 1 .. n bytes."""
    www.mkdir()
    for i in range(n):
        (www / f"f{i}").write_bytes(byte * (i + 1))
    return www


def _job(url: str, i: int) -> Job:
    return Job(RemoteFile(f"{url}f{i}", RelPath(f"f{i}"), i + 1, True), Action.NEW)


def test_a_worker_starts_per_shard_up_to_procs(tmp_path: Path) -> None:
    with FaultServer(root=_files(tmp_path / "www", 6, b"x")) as srv:

        def job(i: int) -> Job:
            return _job(srv.url, i)

        one = _run(tmp_path / "one", srv.url, [Shard((job(0), job(1)))])
        many = _run(tmp_path / "many", srv.url, [Shard((job(i),)) for i in range(6)])
    exits = [e for e in one if isinstance(e, WorkerExit)]
    assert len(exits) == 1, one
    done = [e.outcome for e in one if isinstance(e, FileDone)]
    assert sorted(o.path for o in done) == ["f0", "f1"]
    assert all(o.status is Status.FETCHED for o in done)
    assert len({e.worker for e in many if isinstance(e, WorkerExit)}) == 4  # procs, not 6
    assert len([e for e in many if isinstance(e, FileDone)]) == 6
    assert (tmp_path / "many" / "d" / "f5").read_bytes() == b"x" * 6


def _forked(dest: Path, url: str, procs: int) -> LocalExecutor:
    ctx = worker_context(fork=True)
    t = Transfer(dest=str(dest), root=url, threads=2)
    return LocalExecutor(t, procs, SharedLimits.create(8, None, ctx), ctx)


def _ppid(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    return int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])


def test_forked_workers_start_with_the_shards_from_one_copy_of_the_coordinator(
    tmp_path: Path,
) -> None:
    www = _files(tmp_path / "www", 5, b"y")
    with FaultServer(root=www) as srv:
        ex = _forked(tmp_path / "d", srv.url, 3)
        assert gc.get_freeze_count() == 0, "the coordinator's objects stay collectable"
        zygote = ex._zygote.pid
        assert ex._zygote.is_alive() and _ppid(zygote) == os.getpid()
        assert ex._started == 0 and ex.events(timeout=0) == []  # no shard yet: no worker
        try:
            for i in range(5):
                ex.submit(Shard((_job(srv.url, i),)))
            deadline = time.monotonic() + 30
            events: list[object] = []
            while len(ex._pids) < 3 and time.monotonic() < deadline:
                events += ex.events(timeout=0.05)
            # (a worker waits for shards until finish(): all three are there to be asked)
            parents = {_ppid(pid) for pid in ex._pids.values()}
            assert parents == {zygote}, "forked from the copy, not from this process"
        finally:
            ex.finish()
        events += _drain(ex, time.monotonic() + 60)
        assert ex.done() and ex.dead() == []
        ex.join(timeout=10)
    assert ex._zygote.exitcode == 0 and ex._codes == {0: 0, 1: 0, 2: 0}
    assert {e.worker for e in events if isinstance(e, WorkerExit)} == {0, 1, 2}
    done = [e.outcome for e in events if isinstance(e, FileDone)]
    assert sorted(o.path for o in done) == [f"f{i}" for i in range(5)]
    assert all(o.status is Status.FETCHED for o in done)
    assert (tmp_path / "d" / "f4").read_bytes() == b"y" * 5


def test_forked_with_nothing_to_do_starts_no_worker(tmp_path: Path) -> None:
    with FaultServer(root=tmp_path) as srv:
        ex = _forked(tmp_path / "d", srv.url, 2)
        assert _run(tmp_path, srv.url, [], ex) == []
    assert ex._started == 0 and ex._pids == {}
    assert ex._zygote.exitcode == 0


def _two_workers(ex: LocalExecutor, url: str, files: int) -> None:
    """Submit ``files`` one-file shards to a two-worker executor; return once both run."""
    for i in range(files):
        ex.submit(Shard((_job(url, i),)))
    deadline = time.monotonic() + 30
    while len(ex._pids) < 2 and time.monotonic() < deadline:
        ex.events(timeout=0.05)
    assert sorted(ex._pids) == [0, 1]  # both wait for shards until finish()


def test_a_killed_worker_is_dead_and_kill_ends_the_others(tmp_path: Path) -> None:
    www = _files(tmp_path / "www", 4, b"k")
    with FaultServer(root=www) as srv:
        ex = _forked(tmp_path / "d", srv.url, 2)
        try:
            _two_workers(ex, srv.url, 4)
            os.kill(ex._pids[1], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while not ex.dead() and time.monotonic() < deadline:
                ex.events(timeout=0.05)
            assert ex.dead() == [1] and not ex.done()
        finally:
            ex.stop()
            ex.kill()
        survivor = ex._pids[0]
        assert not ex._zygote.is_alive()
        deadline = time.monotonic() + 15
        while _ppid(survivor) is not None and time.monotonic() < deadline:
            time.sleep(0.02)  # (reaped by whoever adopted it)
        assert _ppid(survivor) is None, "a worker outlived kill()"


def _ended(pid: int) -> bool:
    """Gone, or a zombie its new parent has yet to reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_a_worker_sees_its_parent_go_whatever_the_workers_forked_after_it_do(
    tmp_path: Path,
) -> None:
    """A worker watches the workers' parent by its PID. Through the pipe multiprocessing
    keeps to a parent, whose other end every worker forked later holds a copy of, worker 0
    saw its parent go only once worker 1 had ended too: here never (it is stopped)."""
    www = _files(tmp_path / "www", 2, b"s")
    with FaultServer(root=www) as srv:
        ex = _forked(tmp_path / "d", srv.url, 2)
        second = None
        try:
            _two_workers(ex, srv.url, 2)
            first, second = ex._pids[0], ex._pids[1]
            os.kill(second, signal.SIGSTOP)
            os.kill(ex._zygote.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not _ended(first) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _ended(first), "worker 0 outlived its parent while worker 1 was stopped"
        finally:
            if second is not None and not _ended(second):
                os.kill(second, signal.SIGKILL)  # this test's own worker, by its PID
            ex.stop()
            ex.kill()


def test_kill_after_finish_ends_workers_waiting_on_a_silent_server_at_once(
    tmp_path: Path,
) -> None:
    """After finish() the workers' parent still takes kill()'s word: it kills its workers
    (waiting on a server that never answers, for up to the 30 s read timeout) and ends."""
    www = _files(tmp_path / "www", 2, b"h")
    with FaultServer(root=www) as srv:
        for i in range(2):
            srv.persist(f"/f{i}", Fault.hang())
        ex = _forked(tmp_path / "d", srv.url, 2)
        try:
            _two_workers(ex, srv.url, 2)
            deadline = time.monotonic() + 30
            # (one worker may take both files, the second pipelined behind the first)
            while srv.count(path="/f0") + srv.count(path="/f1") < 1:
                assert time.monotonic() < deadline, "the workers never asked"
                time.sleep(0.02)
            ex.finish()
            started = time.monotonic()
            ex.kill()
            took = time.monotonic() - started
        finally:
            ex.stop()
            ex.kill()
        assert took < 3, f"kill() took {took:.1f} s"
        assert not ex._zygote.is_alive()
        deadline = time.monotonic() + 10
        while not all(_ended(pid) for pid in ex._pids.values()):
            assert time.monotonic() < deadline, "a worker outlived kill()"
            time.sleep(0.02)


def _refuse_fork(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """Let ``after`` worker starts through, then fail the way fork(2) does at the limit."""
    real = multiprocessing.process.BaseProcess.start
    started = {"n": 0}

    def start(self: multiprocessing.process.BaseProcess) -> None:
        if started["n"] >= after:
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        started["n"] += 1
        real(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)


def test_a_worker_that_cannot_start_ends_the_run_with_a_clear_error(
    tmp_path: Path, run_fetch: RunFetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FaultServer(root=_files(tmp_path / "www", 3, b"z")) as srv:
        _refuse_fork(monkeypatch, after=0)
        r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "d", "--procs", "2")
    assert r.code == 4, r
    assert "cannot start worker process 0: Resource temporarily unavailable" in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "d" / "f0").exists()


def test_when_the_workers_parent_cannot_start_the_error_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _refuse_fork(monkeypatch, after=0)
    with pytest.raises(FatalIOError, match="cannot start worker processes: Resource tempor"):
        _forked(tmp_path / "d", "http://127.0.0.1:9/", 2)


def test_workers_forked_before_one_that_cannot_start_are_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    www = _files(tmp_path / "www", 3, b"w")
    with FaultServer(root=www) as srv:
        _refuse_fork(monkeypatch, after=2)  # the workers' parent, then worker 0
        ex = _forked(tmp_path / "d", srv.url, 3)
        try:
            with pytest.raises(FatalIOError, match="cannot start worker process 1"):
                for i in range(3):
                    ex.submit(Shard((_job(srv.url, i),)))
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    ex.events(timeout=0.05)
        finally:
            ex.stop()
            ex.kill()  # as the pipeline does when a run ends on a fatal error
        assert sorted(ex._pids) == [0]
        first = ex._pids[0]
        deadline = time.monotonic() + 15
        while _ppid(first) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _ppid(first) is None and not ex._zygote.is_alive()
