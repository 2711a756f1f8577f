"""The Dask executor against a real ``distributed.LocalCluster`` on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fetcher.config import Transfer
from fetcher.dask_executor import run_shard_task
from fetcher.models import Action, Job, RemoteFile, Status, rel_path
from fetcher.shard import Shard
from tests.faultserver import Fault, FaultServer
from tests.trees import make_simple_tree, tree_manifest

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with distributed.LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=2,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",  # (None is the default, :8787: shared)
    ) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: Any) -> Iterator[Any]:
    with distributed.Client(cluster, set_as_default=False) as c:
        yield c


def _dask(cluster: Any) -> tuple[str, ...]:
    return ("--executor", "dask", "--scheduler", cluster.scheduler_address)


def test_dask_tree_is_byte_identical_to_local(tmp_path: Path, run_fetch, cluster) -> None:
    src = make_simple_tree(tmp_path / "www" / "t", files=150, dirs=5, min_size=1, max_size=40_000)
    with FaultServer(root=tmp_path / "www") as srv:
        local = run_fetch("--mirror", srv.url + "t/", "--dest", tmp_path / "local", "-q")
        dask = run_fetch(
            "--mirror", srv.url + "t/", "--dest", tmp_path / "dask", "-q", *_dask(cluster)
        )
        assert local.code == 0, local
        assert dask.code == 0, dask
    assert tree_manifest(tmp_path / "dask") == tree_manifest(tmp_path / "local") == src
    # the coordinator wrote state: a second run fetches nothing
    with FaultServer(root=tmp_path / "www") as srv:
        again = run_fetch("--mirror", srv.url + "t/", "--dest", tmp_path / "dask", *_dask(cluster))
        assert again.code == 0, again
        assert not [q for q in srv.requests if q.is_file]


def test_one_failing_file_is_reported_and_the_rest_complete(
    tmp_path: Path, run_fetch, cluster
) -> None:
    src = make_simple_tree(tmp_path / "www" / "f", files=40, dirs=2, min_size=1, max_size=5000)
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/f/d001/f000011.bin", Fault.status(404))
        r = run_fetch("--mirror", srv.url + "f/", "--dest", tmp_path / "o", *_dask(cluster))
    assert r.code == 1, r
    assert "d001/f000011.bin" in r.output
    del src["d001/f000011.bin"]
    assert tree_manifest(tmp_path / "o") == src


def test_connection_cap_holds_across_the_cluster(tmp_path: Path, run_fetch, cluster) -> None:
    src = make_simple_tree(tmp_path / "www" / "c", files=80, dirs=4, min_size=1, max_size=20_000)
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/c/d*", Fault.delay(0.02))
        r = run_fetch(
            "--mirror", srv.url + "c/", "--dest", tmp_path / "o", "-q",
            "--threads", "2", "--max-connections", "5", *_dask(cluster),
        )  # fmt: skip
        assert r.code == 0, r
        assert 2 <= srv.max_concurrent_requests <= 5, srv.max_concurrent_requests
        # A socket closed to hand its token on is seen closed by the server a moment
        # later, so the server may count one extra at that instant (as for local runs).
        assert srv.max_concurrent_connections <= 6, srv.max_concurrent_connections
    assert tree_manifest(tmp_path / "o") == src


def test_worker_that_cannot_see_dest_fails_its_shard(tmp_path: Path) -> None:
    f = RemoteFile("http://127.0.0.1:9/a.bin", rel_path("a.bin"), 10)
    shard = Shard((Job(f, Action.NEW),))
    t = Transfer(dest=str(tmp_path / "not-mounted"), root="http://127.0.0.1:9/")
    (out,) = run_shard_task(shard, t)
    assert out.status is Status.FAILED
    assert "cannot see DEST" in (out.error or "")
    assert not (tmp_path / "not-mounted").exists()


def test_worker_with_another_dest_at_the_same_path_fails_its_shard(tmp_path: Path) -> None:
    """A DEST/.fetcher of another filesystem at the path (a stale local copy where the
    mount failed, another site's export) passed the check: the worker wrote the files
    there, a private copy, and the run counted them fetched. The task now checks the
    run's mark, which the coordinator wrote in its own DEST."""
    dest = tmp_path / "elsewhere"
    (dest / ".fetcher").mkdir(parents=True)
    (dest / ".fetcher" / "dask-run").write_text("an older run\n")
    f = RemoteFile("http://127.0.0.1:9/a.bin", rel_path("a.bin"), 10)
    shard = Shard((Job(f, Action.NEW),))
    t = Transfer(dest=str(dest), root="http://127.0.0.1:9/")
    (out,) = run_shard_task(shard, t, 0, None, "this run")
    assert out.status is Status.FAILED
    assert "cannot see DEST" in (out.error or ""), out.error


def test_missing_extra_is_a_usage_error(tmp_path: Path, run_fetch, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.bin").write_bytes(b"x" * 100)
    with FaultServer(root=tmp_path / "www") as srv:
        r = run_fetch(
            "--mirror", srv.url, "--dest", tmp_path / "o",
            "--executor", "dask", "--scheduler", "tcp://127.0.0.1:1",
        )  # fmt: skip
    assert r.code == 2, r
    assert "pip install 'fetcher[dask]'" in r.output


def test_dask_without_a_scheduler_is_a_usage_error(tmp_path: Path, run_fetch, monkeypatch) -> None:
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.bin").write_bytes(b"x" * 100)
    with FaultServer(root=tmp_path / "www") as srv:
        r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "o", "--executor", "dask")
    assert r.code == 2, r
    assert "--scheduler" in r.output


def test_a_dask_job_short_of_its_scheduler_or_extra_is_refused_before_anything_starts(
    tmp_path: Path, run_fetch, monkeypatch
) -> None:
    """Both were found out only as the executor was made: DEST, its lock and its state
    made, the jobs before it in the file run, and --check had said the file was valid."""
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.bin").write_bytes(b"x" * 100)
    with FaultServer(root=tmp_path / "www") as srv:
        config = tmp_path / "m.toml"
        config.write_text(
            f'[jobs.first]\nurl = "{srv.url}"\ndest = "first"\n'
            f'[jobs.second]\nurl = "{srv.url}"\ndest = "second"\nexecutor = "dask"\n'
        )
        checked = run_fetch("--config", config, "--check")
        r = run_fetch("--config", config)
        alone = run_fetch("--mirror", srv.url, "--dest", tmp_path / "o", "--executor", "dask")
        monkeypatch.setitem(sys.modules, "distributed", None)
        extra = run_fetch(
            "--mirror", srv.url, "--dest", tmp_path / "o",
            "--executor", "dask", "--scheduler", "tcp://127.0.0.1:1",
        )  # fmt: skip
        requests = srv.count()
    assert checked.code == r.code == alone.code == 2, (checked, r, alone)
    assert "m.toml: jobs.second.scheduler: missing" in r.output, r
    assert "--scheduler: missing" in alone.output, alone
    assert extra.code == 2 and "pip install 'fetcher[dask]'" in extra.output, extra
    assert requests == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.toml", "www"]


def test_an_unreachable_scheduler_is_refused_before_dest_is_made(tmp_path: Path, run_fetch) -> None:
    """A refused scheduler port was found out only by the Dask client, after its 10 s
    of retries, with DEST, its lock and its state already made (seen running the CLI
    by hand). One TCP connect now says so before anything is made."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.bin").write_bytes(b"x" * 100)
    with socket.socket() as s:  # a port nothing listens on: bound, then let go
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with FaultServer(root=tmp_path / "www") as srv:
        began = time.monotonic()
        r = run_fetch(
            "--mirror", srv.url, "--dest", tmp_path / "o",
            "--executor", "dask", "--scheduler", f"tcp://127.0.0.1:{port}",
        )  # fmt: skip
        took = time.monotonic() - began
        requests = srv.count()
    assert r.code == 2, r
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in r.output, r
    assert "refused" in r.output, r
    assert not (tmp_path / "o").exists()
    assert requests == 0
    assert took < 5, took  # (the client's own retries took 10 s)


def test_ctrl_c_stops_the_tasks_running_on_the_cluster(tmp_path: Path, cluster) -> None:
    """Dask's cancel() does not interrupt a running task: a stopped run's tasks went on
    downloading into DEST after the run had exited and let go of its lock (a next run's
    shared partial files, twice the connection cap). They now stop within seconds."""
    from tests.background import fetch_session

    make_simple_tree(tmp_path / "www" / "s", files=8, dirs=2, min_size=3 << 20, max_size=3 << 20)
    dest = tmp_path / "o"
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/s/d*", Fault.trickle(400_000))  # each file ~7 s
        argv = ["--mirror", srv.url + "s/", "--dest", str(dest), "--threads", "2",
                "--max-connections", "4", *_dask(cluster)]  # fmt: skip
        with fetch_session(argv) as proc:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and srv.file_bytes_sent < 500_000:
                time.sleep(0.05)
            assert srv.file_bytes_sent >= 500_000, "no download started"
            os.kill(proc.pid, signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out.decode(errors="replace")
        # the cluster forgets a cancelled task at once, but its thread ran on: watch the
        # server instead, until every connection has gone
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and srv.open_connections:
            time.sleep(0.05)
        assert not srv.open_connections, "the run's tasks are still downloading"
    assert not list(dest.rglob("f*.bin")), "a file was published after the run ended"


def test_a_killed_coordinator_s_tasks_stop(tmp_path: Path, cluster) -> None:
    """Local workers stop when their coordinator dies (kill -9, OOM); Dask tasks went on
    downloading the rest of their shards into DEST, whose lock was free, beside the next
    run's. The scheduler forgets a dead client's tasks: a task now stops once its worker
    has been told so."""
    from tests.background import fetch_session

    make_simple_tree(tmp_path / "www" / "s", files=8, dirs=2, min_size=3 << 20, max_size=3 << 20)
    dest = tmp_path / "o"
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/s/d*", Fault.trickle(400_000))  # each file ~7 s
        argv = ["--mirror", srv.url + "s/", "--dest", str(dest), "--threads", "2",
                "--max-connections", "4", *_dask(cluster)]  # fmt: skip
        with fetch_session(argv) as proc:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and srv.file_bytes_sent < 500_000:
                time.sleep(0.05)
            assert srv.file_bytes_sent >= 500_000, "no download started"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and srv.open_connections:
            time.sleep(0.05)
        assert not srv.open_connections, "the dead run's tasks are still downloading"
    assert not list(dest.rglob("f*.bin")), "a file was published after the run had died"


def test_an_address_distributed_cannot_read_is_a_usage_error() -> None:
    """distributed's ValueError (build_job checks the form; a scheme may still be missing
    from this installation) is a usage error, not a traceback."""
    from types import SimpleNamespace

    from fetcher.dask_executor import _connect
    from fetcher.errors import UsageError

    def client(address: str, **kwargs: object) -> None:
        raise ValueError(f"unknown address scheme {address.partition(':')[0]!r}")

    with pytest.raises(UsageError, match=r"^--scheduler ws://h:1: unknown address scheme 'ws'$"):
        _connect(SimpleNamespace(Client=client), "ws://h:1")  # type: ignore[arg-type]


def test_a_task_cancelled_from_outside_fails_its_files_and_stops(
    tmp_path: Path, run_fetch, cluster, client
) -> None:
    """Its files fail as the Dask task's, not "its worker process stopped", and the task,
    whose thread Dask's cancel does not stop, ends with the run rather than downloading
    on into DEST."""
    make_simple_tree(tmp_path / "www" / "x", files=4, dirs=1, min_size=3 << 20, max_size=3 << 20)
    dest = tmp_path / "o"
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/x/d*", Fault.trickle(300_000))
        result: list[Any] = []
        argv = ("--mirror", srv.url + "x/", "--dest", dest, "--threads", "2",
                "--max-connections", "2", *_dask(cluster))  # fmt: skip
        th = threading.Thread(target=lambda: result.append(run_fetch(*argv)))
        th.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and srv.file_bytes_sent < 300_000:
                time.sleep(0.05)
            keys = [k for ks in client.processing().values() for k in ks]
            assert keys, "no task running"
            client.cancel([distributed.Future(k, client) for k in keys], force=True)
        finally:
            th.join(timeout=60)
        assert not th.is_alive()
        deadline = time.monotonic() + 10  # and the cancelled task's downloads end too
        while time.monotonic() < deadline and srv.open_connections:
            time.sleep(0.05)
        assert not srv.open_connections, "the cancelled task is still downloading"
    (r,) = result
    assert r.code == 1, r.output
    assert "interrupted: its Dask task stopped" in r.output, r.output
    assert not list(dest.rglob("f*.bin")), "a file was published after the run ended"


def test_retry_after_pauses_every_task_of_the_run(tmp_path: Path, run_fetch, cluster) -> None:
    """A 429 with Retry-After pauses the whole run (README), not just the task that read
    it: each task has limits of its own, and the others went on asking meanwhile."""
    www = tmp_path / "www" / "p"
    for d in ("a", "b"):
        (www / d).mkdir(parents=True)
        for i in range(40):
            (www / d / f"f{i:02d}.bin").write_bytes(os.urandom(2000))
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/p/a/f*", Fault.delay(0.05))
        srv.persist("/p/b/f*", Fault.delay(0.05))
        # a file request of the first task, once both are under way
        srv.script("/p/a/f*", [Fault.ok()] * 8 + [Fault.status(429, retry_after="3")])
        r = run_fetch(
            "--mirror", srv.url + "p/", "--dest", tmp_path / "o", "-q", "--threads", "1",
            "--max-connections", "2", "--pipeline", "1", *_dask(cluster),
        )  # fmt: skip
        assert r.code == 0, r
        requests = srv.requests
    (limited,) = [q for q in requests if q.status == 429]
    assert limited.finished is not None
    # every task has heard of the pause within its next look (every 0.5 s)
    during = [
        q.path for q in requests
        if q.path != limited.path and limited.finished + 1.2 < q.started < limited.finished + 2.8
    ]  # fmt: skip
    assert not during, f"requests during the 3 s pause: {during}"


def test_killed_worker_task_is_retried_and_tree_is_complete(
    tmp_path: Path, run_fetch, cluster, client
) -> None:
    # Last in the module: the nanny restarts the killed worker, but it costs a few seconds.
    src = make_simple_tree(
        tmp_path / "www" / "k", files=12, dirs=2, min_size=3 << 20, max_size=3 << 20
    )
    with FaultServer(root=tmp_path / "www") as srv:
        # slow enough that the victim is mid-file; files resume only above 1 MiB left
        srv.persist("/k/d*", Fault.trickle(1_000_000))
        result: list[Any] = []
        argv = ("--mirror", srv.url + "k/", "--dest", tmp_path / "o", "-q", "--threads", "2",
                "--max-connections", "5", *_dask(cluster))  # fmt: skip
        th = threading.Thread(target=lambda: result.append(run_fetch(*argv)))
        th.start()
        deadline = time.monotonic() + 20
        victim = None
        while victim is None and time.monotonic() < deadline:
            # a worker with a shard running whose files have started to arrive
            busy = [w for w, keys in client.processing().items() if keys]
            if busy and srv.file_bytes_sent > 1_000_000:
                victim = busy[0]
            else:
                time.sleep(0.05)
        assert victim is not None, "no task started"
        pid = client.run(os.getpid, workers=[victim])[victim]
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        srv.persist("/k/d*", None)  # the rest at full speed
        th.join(timeout=60)
        assert not th.is_alive()
        (r,) = result
        assert r.code == 0, r
        ranged = [q for q in srv.requests if q.is_file and "range" in q.headers]
    assert tree_manifest(tmp_path / "o") == src
    assert ranged, "the retried shard should have resumed its partial files"
