"""A worker's feeder (how many shards it takes while its lanes are busy) and its lanes (which
files each takes), against a real server."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fetcher.config import Transfer
from fetcher.http1 import pipelined_lanes
from fetcher.limits import local_limits
from fetcher.models import (
    Action,
    FileDone,
    Job,
    Outcome,
    RelPath,
    RemoteFile,
    Retried,
    Status,
    WorkerExit,
)
from fetcher.procs import worker_context
from fetcher.retry import build_retrying
from fetcher.runner import ShardRunner, worker_main
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


def _serve_files(www: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    www.mkdir()
    for name, data in files.items():
        (www / name).write_bytes(data)
    return files


def _jobs(url: str, files: dict[str, bytes], names: list[str] | None = None) -> list[Job]:
    return [
        Job(RemoteFile(url + n, RelPath(n), len(files[n]), True), Action.NEW)
        for n in names or files
    ]


def _run_while(t: Transfer, jobs: list[Job], ready: Callable[[], bool], gate: threading.Event,
               why: str, meanwhile: Callable[[], object] = lambda: None) -> list[Outcome]:  # fmt: skip
    """Run ``jobs`` in a thread, wait (30 s at most) until ``ready()``, call ``meanwhile()``,
    open ``gate``, and return the outcomes; ``why``: what it means if ``ready()`` never is."""
    out: list[Outcome] = []
    runner = threading.Thread(
        target=lambda: out.extend(ShardRunner(t, 0, lambda evs: None).run(jobs))
    )
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready(), why
        assert not out, "the run ended while an answer was held"
        meanwhile()
    finally:
        gate.set()
        runner.join(timeout=60)
    assert not runner.is_alive()
    return out


def test_small_files_share_one_connection_and_big_ones_do_not_wait_for_them(
    tmp_path: Path,
) -> None:
    # Four lanes of --pipeline 4: the small files go as trains on one connection, 16
    # deep; the other lanes take the big files, from wherever they are in the queue.
    # The last small file's answer is held until both big files are in place.
    small = {f"s{i:02d}.bin": os.urandom(100 + i) for i in range(60)}
    big = {f"big{i}.bin": os.urandom(BIG) for i in range(2)}
    files = _serve_files(tmp_path / "www", {**small, **big})
    dest = tmp_path / "d"
    gate = threading.Event()
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/s59.bin", Fault.gated(gate))
        t = Transfer(dest=str(dest), root=srv.url, threads=4, pipeline=4)
        jobs = _jobs(srv.url, files, ["big0.bin", *small, "big1.bin"])
        out = _run_while(
            t, jobs, lambda: all((dest / n).exists() for n in big), gate,
            "a big file waited for the small ones",
        )  # fmt: skip
        requests = srv.requests
        most_open = srv.max_concurrent_connections
    assert [o.status for o in out] == [Status.FETCHED] * len(jobs)
    assert all((dest / n).read_bytes() == data for n, data in files.items())
    on = {q.connection for q in requests if q.path.startswith("/s")}
    assert len(on) == 1, f"small files went on {len(on)} connections"
    assert most_open <= 3, most_open  # the fourth lane had nothing to open one for


def test_a_run_ends_when_its_last_train_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Four lanes, one of them on the small files (trains of up to 128: three here); the
    # other three wait for a place and must be woken when the last train is taken, not
    # at their next look at the queue (made an hour here). A Dask task is one run() per
    # shard, and waited up to half a second for them.
    monkeypatch.setattr("fetcher.runner.LOOK_AGAIN", 3600.0)
    files = _serve_files(
        tmp_path / "www", {f"f{i:03d}.bin": os.urandom(50 + i % 7) for i in range(300)}
    )
    dest = tmp_path / "d"
    with FaultServer(root=tmp_path / "www") as srv:
        t = Transfer(dest=str(dest), root=srv.url, threads=4, pipeline=8)
        out: list[Outcome] = []
        runner = threading.Thread(
            target=lambda: out.extend(
                ShardRunner(t, 0, lambda evs: None).run(_jobs(srv.url, files))
            ),
            daemon=True,
        )
        runner.start()
        runner.join(timeout=60)
        assert not runner.is_alive(), "run() waited for lanes that had nothing left to take"
    assert [o.status for o in out] == [Status.FETCHED] * len(files)
    assert all((dest / n).read_bytes() == d for n, d in files.items())


def test_a_file_that_fails_mid_train_is_retried_after_the_train_not_in_its_middle(
    tmp_path: Path,
) -> None:
    # f2's first answer is a 503 while f3.. are already asked for on the same connection.
    # Retried at once, its request would come out of turn: the connection, and the answers
    # on their way to f3.., would go (the server would serve them twice). It is retried
    # when the train is over: every other file asked for once, on one connection.
    files = _serve_files(tmp_path / "www", {f"f{i}.bin": os.urandom(100 + i) for i in range(10)})
    dest = tmp_path / "d"
    events: list[Any] = []
    with FaultServer(root=tmp_path / "www") as srv:
        srv.script("/f2.bin", [Fault.status(503)])
        t = Transfer(dest=str(dest), root=srv.url, threads=1, pipeline=4, backoff_initial=0.05)
        out = ShardRunner(t, 0, events.extend).run(_jobs(srv.url, files))
        asked = Counter(q.path for q in srv.requests)
        connections = srv.connections
    assert [o.status for o in out] == [Status.FETCHED] * 10, out
    assert all((dest / n).read_bytes() == d for n, d in files.items())
    assert asked == Counter({"/" + n: 2 if n == "f2.bin" else 1 for n in files}), asked
    assert connections == 1, connections
    retried = [e for e in events if isinstance(e, Retried)]
    assert [(e.path, e.attempt) for e in retried] == [("f2.bin", 1)], retried


def test_the_waits_before_retrying_a_train_s_failed_files_overlap(tmp_path: Path) -> None:
    # Every file of a train is answered 503 with Retry-After: 1 (a mirror shedding load).
    # Each one's retry waits for the train to end, then for its own second since its
    # failure: those seconds pass together. Served one after another, eight files had
    # waited eight seconds, and a train of 32 with Retry-After: 30 sixteen minutes.
    files = _serve_files(tmp_path / "www", {f"f{i}.bin": os.urandom(100 + i) for i in range(8)})
    dest = tmp_path / "d"
    waits: list[float] = []
    with FaultServer(root=tmp_path / "www") as srv:
        srv.script("/f*", [Fault.status(503, retry_after="1")] * len(files))
        t = Transfer(dest=str(dest), root=srv.url, threads=1, pipeline=8)
        runner = ShardRunner(t, 0, lambda events: None)

        def sleep(seconds: float) -> None:
            waits.append(seconds)
            runner.stop.wait(seconds)

        runner.retrying = build_retrying(t, sleep=sleep)
        started = time.monotonic()
        out = runner.run(_jobs(srv.url, files))
        took = time.monotonic() - started
        asked = Counter(q.path for q in srv.requests)
    assert [o.status for o in out] == [Status.FETCHED] * len(files), out
    assert all((dest / n).read_bytes() == d for n, d in files.items())
    assert asked == Counter({"/" + n: 2 for n in files}), asked
    assert sum(waits) < 2.5 and took < 4, (waits, took)


def test_a_429_holds_back_requests_not_the_answers_already_on_their_way(
    tmp_path: Path,
) -> None:
    # A mirror sheds load: every request of a burst is answered 429, Retry-After: 1. The
    # run pauses for that host: no request goes out for a second after each 429. But the
    # answers to requests already sent are read at once; waiting before each of them (the
    # pause renewed by each 429 read) had taken a second per file, and the whole run
    # (every lane, every process shares the pause) a train's length of Retry-Afters.
    files = _serve_files(tmp_path / "www", {f"f{i}.bin": os.urandom(100 + i) for i in range(8)})
    dest = tmp_path / "d"
    with FaultServer(root=tmp_path / "www") as srv:
        srv.script("/f*", [Fault.status(429, retry_after="1")] * len(files))
        t = Transfer(dest=str(dest), root=srv.url, threads=1, pipeline=8)
        runner = ShardRunner(t, 0, lambda events: None, local_limits(4))
        started = time.monotonic()
        out = runner.run(_jobs(srv.url, files))
        took = time.monotonic() - started
        requests = [q for q in srv.requests if q.path.startswith("/f")]
    assert [o.status for o in out] == [Status.FETCHED] * len(files), out
    assert all((dest / n).read_bytes() == d for n, d in files.items())
    assert Counter(q.path for q in requests) == Counter({"/" + n: 2 for n in files})
    # polite still: the first file's 429 held back the requests not sent yet for its second
    first, second = requests[0], requests[1]
    assert first.status == 429 and first.finished is not None
    assert second.started - first.finished >= 0.9, second.started - first.finished
    assert took < 4.5, took


def _held_train(
    tmp_path: Path,
    held_path: str,
    ready: Callable[[Path], bool],
    why: str,
    meanwhile: Callable[[Path], object],
) -> Counter[str]:
    """100 small files on two lanes of --pipeline 4 (one lane takes the small files, 8
    deep, in trains of up to 32), ``held_path``'s answer held until ``ready(dest)``;
    ``meanwhile(dest)`` is checked then. All must arrive whole; the requests per path."""
    files = _serve_files(
        tmp_path / "www", {f"s{i:03d}.bin": os.urandom(50 + i) for i in range(100)}
    )
    dest = tmp_path / "d"
    gate = threading.Event()
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist(held_path, Fault.gated(gate))
        t = Transfer(dest=str(dest), root=srv.url, threads=2, pipeline=4)
        jobs = _jobs(srv.url, files)
        out = _run_while(
            t, jobs, lambda: ready(dest), gate, why, lambda: meanwhile(dest)
        )  # fmt: skip
        asked = Counter(q.path for q in srv.requests)
    assert [o.status for o in out] == [Status.FETCHED] * len(jobs)
    assert all((dest / n).read_bytes() == d for n, d in files.items())
    return asked


def test_while_the_small_file_lane_is_held_up_another_lane_takes_the_small_files(
    tmp_path: Path,
) -> None:
    # The first file's answer is held (a CDN's cache miss): nothing was sent behind it
    # on its new connection, so after runner.STALL_UNKNOWN (no answer has come yet to
    # tell how long one takes) the rest of its train goes back to the queue and the
    # other lane takes it, and the next trains; they all arrive meanwhile. (Before, its
    # train of 31 waited for the held answer.)
    def held(dest: Path) -> None:
        assert (dest / "s001.bin").exists(), "s001 waited for the held answer"

    _held_train(
        tmp_path, "/s000.bin", lambda dest: (dest / "s099.bin").exists(),
        "the files after the held train waited for it", held,
    )  # fmt: skip


def test_a_held_up_train_keeps_what_it_sent_ahead_and_hands_on_the_rest(
    tmp_path: Path,
) -> None:
    # The eleventh file's answer is held, its connection kept alive by then: up to 7
    # requests went behind it (8 deep); the rest of the 32-file train (at least s018 to
    # s031) goes to the other lane. Nothing is asked for twice: what was sent ahead stays
    # on its connection, where its answers come once the held one has.
    def held(dest: Path) -> None:
        assert not (dest / "s010.bin").exists()
        # sent right behind it (s010 itself went ahead of s009's answer): it waits
        assert not (dest / "s011.bin").exists(), "s011 came before the answer ahead of it"

    asked = _held_train(
        tmp_path, "/s010.bin",
        lambda dest: all((dest / f"s{i:03d}.bin").exists() for i in range(31, 100)),
        "the rest of the held train waited for it", held,
    )  # fmt: skip
    assert set(asked.values()) == {1}, [p for p, n in asked.items() if n > 1]


def test_files_waiting_behind_held_up_answers_leave_room_for_more_shards(
    tmp_path: Path,
) -> None:
    # One worker, four lanes of --pipeline 8 (small files on one lane, 32 deep; the feeder
    # keeps 68 files here). Three shards of 32 small files come one after another, the
    # second answer of each held (a CDN's cache misses): the first answer proves the
    # connection, the other 31 go ahead on it and wait, and the next shard goes to
    # another lane. The fourth shard must still be taken, by the fourth lane: the 90
    # files behind the held answers wait for them, not for a lane. (Before, they counted
    # as the worker's load, the feeder took nothing more, and the fourth lane idled with
    # the server ready, as did 4 of 16 connections in benchmarks/run.py's `held` for its
    # first 4 s.)
    names = {x: [f"{x}{i:02d}.bin" for i in range(32)] for x in "abcd"}
    files = _serve_files(
        tmp_path / "www", {n: os.urandom(64 + len(n)) for group in names.values() for n in group}
    )
    dest = tmp_path / "d"
    gate = threading.Event()
    ctx = worker_context()
    shards, events, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    with FaultServer(root=tmp_path / "www") as srv:
        for x in "abc":
            srv.persist(f"/{x}01.bin", Fault.gated(gate))
        t = Transfer(dest=str(dest), root=srv.url, threads=4, pipeline=8)
        assert pipelined_lanes(t.threads, t.pipeline) == (1, 32)
        p = ctx.Process(target=worker_main, args=(0, t, shards, events, None, stop))
        p.start()
        try:
            for x in "abc":
                shards.put(Shard(tuple(_jobs(srv.url, files, names[x]))))
                assert srv.wait_for(1, path=f"/{x}01.bin", timeout=30), f"shard {x} not started"
            shards.put(Shard(tuple(_jobs(srv.url, files, names["d"]))))
            deadline = time.monotonic() + 20
            while not all((dest / n).exists() for n in names["d"]):
                assert time.monotonic() < deadline, "the fourth shard waited for the held answers"
                time.sleep(0.02)
            assert not (dest / "a01.bin").exists()
            gate.set()
            shards.put(None)
            got = _events_until_exits(events, 1, time.monotonic() + 60)
        finally:
            gate.set()
            stop.set()
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    done = [e.outcome for e in got if isinstance(e, FileDone)]
    assert sorted(o.path for o in done) == sorted(files)
    assert all(o.status is Status.FETCHED for o in done)
    assert all((dest / n).read_bytes() == d for n, d in files.items())


@pytest.mark.parametrize(
    ("threads", "pipeline", "lanes", "depth"),
    [
        (4, 8, 1, 32),  # the defaults: one lane per process, 32 deep
        (4, 4, 1, 16),
        (1, 4, 1, 4),
        (2, 4, 1, 8),
        (8, 8, 2, 32),
        (16, 8, 4, 32),
        (5, 8, 2, 20),  # 40 in flight: two lanes of 20, not 32 + 8
        (4, 64, 4, 64),  # asked for 64 on a connection: never less deep than that
        (4, 1, 4, 1),  # no pipelining: every lane, one request at a time
        (0, 4, 1, 4),
    ],
)
def test_pipelined_lanes(threads: int, pipeline: int, lanes: int, depth: int) -> None:
    assert pipelined_lanes(threads, pipeline) == (lanes, depth)
    if pipeline > 1:
        assert lanes * depth >= max(1, threads) * pipeline  # nothing asked for is lost
