"""A worker's feeder: how many shards it takes while its lanes are busy, against a real server."""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from fetcher.config import Transfer
from fetcher.models import Action, FileDone, Job, RelPath, RemoteFile, Status, WorkerExit
from fetcher.procs import worker_context
from fetcher.runner import worker_main
from fetcher.shard import Shard
from tests.faultserver import Fault, FaultServer

BIG = 2 << 20
"""Above download.RESUME_MIN: each file holds a lane to itself."""


def _events_until_exits(events: Any, n: int, deadline: float) -> list[object]:
    got: list[object] = []
    while sum(isinstance(e, WorkerExit) for e in got) < n:
        assert time.monotonic() < deadline, f"workers did not finish: {got}"
        try:
            got += events.get(timeout=0.2)
        except queue.Empty:
            continue
    return got


def test_a_worker_whose_lanes_hold_big_files_leaves_the_next_shards_to_another(
    tmp_path: Path,
) -> None:
    www = tmp_path / "www"
    www.mkdir()
    for i in range(4):
        (www / f"big{i}.bin").write_bytes(os.urandom(BIG))
    gate = threading.Event()
    ctx = worker_context()
    shards, events, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs: list[Any] = []
    with FaultServer(root=www) as srv:
        srv.persist("/big*", Fault.gated(gate))
        t = Transfer(dest=str(tmp_path / "d"), root=srv.url, threads=2)
        for i in range(4):
            f = RemoteFile(f"{srv.url}big{i}.bin", RelPath(f"big{i}.bin"), BIG, True)
            shards.put(Shard((Job(f, Action.NEW),)))  # one shard per big file, as make_shards does

        def start(worker: int) -> None:
            p = ctx.Process(target=worker_main, args=(worker, t, shards, events, None, stop))
            p.start()
            procs.append(p)

        try:
            start(0)
            assert srv.wait_for(2, timeout=30), "the first worker's two lanes never asked"
            # Both of its lanes wait on a big file: the other two shards must still be
            # in the queue for a worker that has a free lane.
            start(1)
            assert srv.wait_for(4, timeout=30), f"only {srv.count()} files in flight"
            assert srv.max_concurrent_requests == 4
            gate.set()
            shards.put(None)
            shards.put(None)
            got = _events_until_exits(events, 2, time.monotonic() + 60)
        finally:
            gate.set()
            stop.set()
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    done = [e for e in got if isinstance(e, FileDone)]
    assert sorted(e.outcome.path for e in done) == [f"big{i}.bin" for i in range(4)]
    assert all(e.outcome.status is Status.FETCHED for e in done)
    assert sorted(e.worker for e in done) == [0, 0, 1, 1]
    assert (tmp_path / "d" / "big3.bin").read_bytes() == (www / "big3.bin").read_bytes()
