"""The Dask executor against a scheduler and a worker in processes of their own, which a
test can kill (a ``LocalCluster``'s scheduler lives in the test's process)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.background import fetch_session
from tests.faultserver import Fault, FaultServer

pytest.importorskip("distributed")

pytestmark = pytest.mark.slow


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, cwd=log.parent
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.fixture
def scheduler(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A ``dask scheduler`` and one ``dask worker`` on 127.0.0.1: the scheduler's address
    and process; both are killed when the test ends."""
    home = tmp_path / "dask"
    home.mkdir()
    info = home / "scheduler.json"
    sched = _start(
        ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--no-dashboard", "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(info)],
        home / "scheduler.log",
    )  # fmt: skip
    worker: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 30
        while not info.exists() and time.monotonic() < deadline and sched.poll() is None:
            time.sleep(0.05)
        assert info.exists(), (home / "scheduler.log").read_text()
        worker = _start(
            ["distributed.cli.dask_worker", "--scheduler-file", str(info), "--host", "127.0.0.1",
             "--nthreads", "2", "--no-nanny", "--no-dashboard", "--dashboard-address", "127.0.0.1:0"],
            home / "worker.log",
        )  # fmt: skip
        address = json.loads(info.read_text())["address"]
        log = home / "scheduler.log"
        while "Register worker" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "Register worker" in log.read_text(), (home / "worker.log").read_text()
        yield address, sched
    finally:
        if worker is not None:
            _stop(worker)
        _stop(sched)


def test_scheduler_lost_mid_run_stops_the_run_with_a_clear_error(
    tmp_path: Path, scheduler: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """Shards submitted after the scheduler had gone (the crawl still going) were never
    done, nor ever failed: the run waited for them for ever. Now it stops at once, exit 4
    with the reason, the report written, and none of distributed's tracebacks."""
    address, sched = scheduler
    www = tmp_path / "www"
    for d in ("a", "b"):
        (www / "m" / d).mkdir(parents=True)
        for i in range(4):
            (www / "m" / d / f"f{i}.bin").write_bytes(os.urandom(1 << 20))
    dest = tmp_path / "o"
    report = tmp_path / "report.json"
    with FaultServer(root=www) as srv:
        srv.persist("/m/a/f*", Fault.trickle(200_000))
        gate = threading.Event()
        srv.persist("/m/b/", Fault.gated(gate))  # the crawl goes on after the scheduler
        argv = ["--mirror", srv.url + "m/", "--dest", str(dest), "--threads", "2",
                "--max-connections", "4", "--executor", "dask", "--scheduler", address,
                "--report", str(report), "--log-format", "text"]  # fmt: skip
        try:
            with fetch_session(argv) as proc:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and srv.file_bytes_sent < 100_000:
                    time.sleep(0.05)
                assert srv.file_bytes_sent >= 100_000, "no download started"
                sched.send_signal(signal.SIGKILL)
                sched.wait(timeout=10)
                # the tasks see it gone (and stop) as the coordinator's client does: the
                # crawl goes on from then
                while time.monotonic() < deadline + 10 and srv.open_connections > 1:
                    time.sleep(0.05)
                gate.set()
                try:
                    out, _ = proc.communicate(timeout=8)
                except subprocess.TimeoutExpired:
                    _fail_with_output(proc, "the run did not end after its scheduler had gone")
        finally:
            gate.set()
    text = out.decode(errors="replace")
    assert proc.returncode == 4, text
    assert f"lost the Dask scheduler at {address}" in text, text
    assert "Traceback" not in text, text
    (job,) = json.loads(report.read_text())["jobs"]
    assert job["exit_code"] == 4 and "lost the Dask scheduler" in job["fatal"], job
    assert not [p for p in dest.rglob("f*.bin") if p.stat().st_size != 1 << 20]


def test_a_hung_scheduler_does_not_hold_a_stopped_run(
    tmp_path: Path, scheduler: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """A scheduler that stops answering (its machine hung; here SIGSTOP) held the run's
    loop in a request to it for ever, and the stop that a SIGTERM began too: the run's
    look at the workers each second, its stop Event and its cancel had no time limit
    (and a request made just as a scheduler died waited out the client's reconnecting,
    which failed a run in CI), and the stop then waited 30 s for tasks that could not
    say they had stopped. Each request now waits a few seconds at most, and the tasks
    are given up: the stopped run ends, exit 130, without a traceback. The tasks, which
    cannot hear the stop, take a scheduler silent for 10 s as one (before, they went on
    and published their files in DEST after their run had ended)."""
    address, sched = scheduler
    www = tmp_path / "www"
    (www / "m").mkdir(parents=True)
    for i in range(4):
        (www / "m" / f"f{i}.bin").write_bytes(os.urandom(4 << 20))  # ~20 s each
    dest = tmp_path / "o"
    argv_tail = ["--dest", str(dest), "--threads", "2", "--max-connections", "4",
                 "--executor", "dask", "--scheduler", address, "--log-format", "text"]  # fmt: skip
    with FaultServer(root=www) as srv:
        srv.persist("/m/f*", Fault.trickle(200_000))
        with fetch_session(["--mirror", srv.url + "m/", *argv_tail]) as proc:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and srv.file_bytes_sent < 100_000:
                time.sleep(0.05)
            assert srv.file_bytes_sent >= 100_000, "no download started"
            sched.send_signal(signal.SIGSTOP)  # (the fixture's SIGKILL ends it still)
            os.kill(proc.pid, signal.SIGTERM)
            began = time.monotonic()
            try:
                out, _ = proc.communicate(timeout=40)
            except subprocess.TimeoutExpired:
                _fail_with_output(proc, "the stopped run waited on its hung scheduler")
            took = time.monotonic() - began
            while time.monotonic() < began + 30 and srv.open_connections:
                time.sleep(0.1)
            tasks_ran = time.monotonic() - began
            assert not srv.open_connections, "the run's tasks are still downloading"
    text = out.decode(errors="replace")
    assert proc.returncode == 130, text
    assert "Traceback" not in text, text
    assert took < 20, f"{took:.1f} s from SIGTERM to exit"
    assert tasks_ran < 25, f"the tasks ran {tasks_ran:.1f} s after the SIGTERM"
    assert not list(dest.rglob("f*.bin")), "a file was published after the run ended"


def _fail_with_output(proc: subprocess.Popen[bytes], why: str) -> NoReturn:
    """Kill the run's process group and fail with what it printed."""
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=10)
    pytest.fail(f"{why}:\n{out.decode(errors='replace')}")


def test_join_waits_for_a_task_that_has_not_ended(tmp_path: Path) -> None:
    """A run that stopped (Ctrl-C, a stop event, a fatal error) with a task still
    outstanding (one running takes up to half a second to see the stop) crashed in
    join() with distributed's "ValueError: No clients found": ``distributed.wait`` looks
    for a default client, and the run's is not one. Now join() waits on the futures
    themselves, up to its timeout."""
    with _one_task_queued(tmp_path) as ex:
        started = time.monotonic()
        ex.join(timeout=0.5)  # no worker: the task never starts, nor ends
        assert 0.4 < time.monotonic() - started < 5
    assert ex.done()


@contextlib.contextmanager
def _one_task_queued(tmp_path: Path) -> Iterator[Any]:
    """A DaskExecutor at a cluster with no worker, one shard (one file) submitted and the
    run's submissions finished: its task queued at the scheduler, never started."""
    from distributed import LocalCluster

    from fetcher.config import MirrorJob
    from fetcher.dask_executor import DaskExecutor
    from fetcher.models import Action, Job, RemoteFile, rel_path
    from fetcher.shard import Shard

    (tmp_path / ".fetcher").mkdir()
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        job = MirrorJob(
            url="http://127.0.0.1:9/", dest=tmp_path, executor="dask",
            scheduler=cluster.scheduler_address,
        )  # fmt: skip
        ex = DaskExecutor(job.transfer(), job)
        try:
            f = RemoteFile("http://127.0.0.1:9/a.bin", rel_path("a.bin"), 10)
            ex.submit(Shard((Job(f, Action.NEW),)))
            ex.finish()
            yield ex
        finally:
            ex.kill()


def test_a_stopped_run_drops_its_tasks_that_never_started(tmp_path: Path) -> None:
    """A task still queued at the scheduler (a busy cluster, or no worker yet) sees the
    stop Event only once it starts: Ctrl-C waited 30 s for it, then join()'s 10 s. Now
    stop() cancels the run's tasks no worker is running, and the run ends at once."""
    from fetcher.models import FileDone, Status

    with _one_task_queued(tmp_path) as ex:
        ex.stop()
        got = []
        deadline = time.monotonic() + 5
        while not ex.done() and time.monotonic() < deadline:
            got += ex.events(timeout=0.1)
        assert ex.done(), "the run still waits for a task no worker will run"
    (out,) = [ev.outcome for ev in got if isinstance(ev, FileDone)]
    assert out.status is Status.FAILED and out.error == "interrupted"


def test_a_run_at_a_scheduler_with_no_workers_says_so_and_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a scheduler with no worker the run's tasks queued there, and the run waited
    for ever without a word. Now, once they have waited NO_WORKERS_WAIT, it says so, once,
    and goes on waiting (a worker may join) until it is stopped."""
    from distributed import LocalCluster

    from fetcher import dask_executor
    from fetcher.config import MirrorJob
    from fetcher.models import Reporter
    from fetcher.pipeline import mirror

    monkeypatch.setattr(dask_executor, "NO_WORKERS_WAIT", 0.3)
    monkeypatch.setattr(dask_executor, "_WORKERS_POLL", 0.1)

    class Notices(Reporter):
        def __init__(self) -> None:
            self.said: list[str] = []

        def notice(self, message: str) -> None:
            self.said.append(message)

    rep = Notices()
    stop = threading.Event()
    result: list[Any] = []
    www = tmp_path / "www" / "m"
    www.mkdir(parents=True)
    (www / "a.bin").write_bytes(b"x" * 100)
    with (
        LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster,
        FaultServer(root=tmp_path / "www") as srv,
    ):
        address = cluster.scheduler_address
        job = MirrorJob(url=srv.url + "m/", dest=tmp_path / "o", executor="dask", scheduler=address)
        th = threading.Thread(target=lambda: result.append(mirror(job, rep, stop=stop)))
        th.start()
        try:
            want = f"the Dask scheduler at {address} has no workers; waiting for one"
            deadline = time.monotonic() + 10
            while want not in rep.said and time.monotonic() < deadline:
                time.sleep(0.05)
            assert want in rep.said, rep.said
            # the run goes on waiting, and says it no more
            deadline = time.monotonic() + 1
            while th.is_alive() and time.monotonic() < deadline:
                th.join(timeout=0.1)
            assert th.is_alive(), "the run ended at a scheduler with no workers"
            assert rep.said.count(want) == 1, rep.said
        finally:
            stop.set()
            th.join(timeout=30)
        assert not th.is_alive(), "a stop did not end the run"
    (summary,) = result
    assert not summary.fetched.files


def test_a_shard_whose_worker_died_says_so_not_a_retry_count(tmp_path: Path) -> None:
    """A task whose workers died under it (distributed's ``KilledWorker``) failed its
    files as "Dask task failed after 2 retries: KilledWorker: ...", a count of retries
    that never ran: Dask gives up on it after its own allowed failures. The files now say
    that the worker running them died, and that the next run resumes them."""
    import dask
    from distributed import Client, LocalCluster

    from fetcher.config import MirrorJob
    from fetcher.dask_executor import DaskExecutor
    from fetcher.models import Action, FileDone, Job, RemoteFile, Status, rel_path
    from fetcher.shard import Shard

    dest = tmp_path / "o"
    (dest / ".fetcher").mkdir(parents=True)
    gate = threading.Event()
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        LocalCluster(
            n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
        FaultServer() as srv,
    ):
        srv.add_file("/a.bin", b"x" * 1000)
        srv.persist("/a.bin", Fault.gated(gate))  # held until the worker is gone
        job = MirrorJob(
            url=srv.url, dest=dest, executor="dask", scheduler=cluster.scheduler_address
        )
        ex = DaskExecutor(job.transfer(), job)
        got: list[Any] = []
        try:
            f = RemoteFile(srv.url + "a.bin", rel_path("a.bin"), 1000)
            ex.submit(Shard((Job(f, Action.NEW),)))
            ex.finish()
            deadline = time.monotonic() + 20
            while not srv.count(path="/a.bin") and time.monotonic() < deadline:
                got += ex.events(timeout=0.05)
            assert srv.count(path="/a.bin"), "the task never asked for its file"
            (pid,) = client.run(os.getpid).values()
            os.kill(pid, signal.SIGKILL)
            while not ex.done() and time.monotonic() < deadline:
                got += ex.events(timeout=0.1)
            assert ex.done(), "the task whose worker died never ended"
        finally:
            gate.set()
            ex.kill()
    (out,) = [ev.outcome for ev in got if isinstance(ev, FileDone)]
    assert out.status is Status.FAILED
    assert "worker running it died" in (out.error or ""), out.error
    assert "next run resumes" in (out.error or ""), out.error
    assert "retries" not in (out.error or ""), out.error


def test_readme_cluster_commands_keep_their_dashboards_on_an_address() -> None:
    """README's ``dask scheduler`` / ``dask worker`` example left each process's dashboard
    listening on every interface (its default): each line now says where, with a flag the
    installed ``dask`` command takes."""
    import shlex

    from distributed.cli import dask_scheduler, dask_worker

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## More than one machine", 1)[1]
    lines = [ln.split("$ ", 1)[1] for ln in section.splitlines() if "$ dask " in ln]
    assert len(lines) >= 2, lines
    for line in lines:
        argv = shlex.split(line)
        command = {"scheduler": dask_scheduler.main, "worker": dask_worker.main}[argv[1]]
        known = {opt for p in command.params for opt in p.opts + p.secondary_opts}
        flags = [a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")]
        assert not set(flags) - known, (line, set(flags) - known)
        assert {"--dashboard-address", "--no-dashboard"} & set(flags), line
        for i, a in enumerate(argv):
            if a == "--dashboard-address":
                host = argv[i + 1].rsplit(":", 1)[0]
                assert host not in ("", "0.0.0.0", "::", "[::]"), line
