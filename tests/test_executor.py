"""Local worker processes start with the shards that need them, against a real server."""

from __future__ import annotations

import time
from pathlib import Path

from fetcher.config import Transfer
from fetcher.executor import LocalExecutor
from fetcher.limits import SharedLimits
from fetcher.models import Action, FileDone, Job, RelPath, RemoteFile, Status, WorkerExit
from fetcher.procs import worker_context
from fetcher.shard import Shard
from tests.faultserver import FaultServer


def _drain(ex: LocalExecutor, deadline: float) -> list[object]:
    events: list[object] = []
    while not ex.done() and time.monotonic() < deadline:
        events += ex.events(timeout=0.1)
    return events + ex.events(timeout=0)


def _run(tmp_path: Path, url: str, shards: list[Shard]) -> list[object]:
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


def test_a_worker_starts_per_shard_up_to_procs(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    for i in range(6):
        (www / f"f{i}").write_bytes(b"x" * (i + 1))
    with FaultServer(root=www) as srv:

        def job(i: int) -> Job:
            return Job(RemoteFile(f"{srv.url}f{i}", RelPath(f"f{i}"), i + 1, True), Action.NEW)

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
