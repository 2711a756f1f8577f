"""Local worker processes: forked at once from a single-threaded coordinator, else started
from the fork server with the shards that need them; against a real server."""

from __future__ import annotations

import errno
import gc
import multiprocessing
import os
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
from tests.faultserver import FaultServer

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


def test_forked_workers_all_start_at_once_and_share_the_shards(tmp_path: Path) -> None:
    with FaultServer(root=_files(tmp_path / "www", 5, b"y")) as srv:
        ex = _forked(tmp_path / "d", srv.url, 3)
        assert len(ex._procs) == 3 and all(p.is_alive() for p in ex._procs)
        assert gc.get_freeze_count() == 0, "the coordinator's objects stay collectable"
        events = _run(tmp_path, srv.url, [Shard((_job(srv.url, i),)) for i in range(5)], ex)
    assert {e.worker for e in events if isinstance(e, WorkerExit)} == {0, 1, 2}
    done = [e.outcome for e in events if isinstance(e, FileDone)]
    assert sorted(o.path for o in done) == [f"f{i}" for i in range(5)]
    assert all(o.status is Status.FETCHED for o in done)
    assert (tmp_path / "d" / "f4").read_bytes() == b"y" * 5


def test_forked_workers_with_nothing_to_do_exit_cleanly(tmp_path: Path) -> None:
    with FaultServer(root=tmp_path) as srv:
        ex = _forked(tmp_path / "d", srv.url, 2)
        events = _run(tmp_path, srv.url, [], ex)
    assert sorted(e.worker for e in events if isinstance(e, WorkerExit)) == [0, 1]
    assert [p.exitcode for p in ex._procs] == [0, 0]


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


def test_workers_forked_before_one_that_cannot_start_are_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FaultServer(root=tmp_path) as srv:
        ctx = worker_context(fork=True)
        spawned: list[multiprocessing.process.BaseProcess] = []
        real_start_one = LocalExecutor._start_one

        def record(self: LocalExecutor) -> None:
            real_start_one(self)
            spawned.append(self._procs[-1])

        monkeypatch.setattr(LocalExecutor, "_start_one", record)
        _refuse_fork(monkeypatch, after=1)
        t = Transfer(dest=str(tmp_path / "d"), root=srv.url, threads=2)
        with pytest.raises(FatalIOError, match="cannot start worker process 1"):
            LocalExecutor(t, 3, SharedLimits.create(8, None, ctx), ctx)
    assert len(spawned) == 1
    assert not spawned[0].is_alive() and spawned[0].exitcode is not None
