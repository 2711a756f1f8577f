"""Output that cannot be written is dropped; the sync, its files and its exit code are not.

``fetch ... | head`` (the reader leaves), a log collector restarted under a
running job, ``fetch ... >&-``, a report or metrics file that is a FIFO, a symlink
or cannot be written: each against a real server.
"""

from __future__ import annotations

import io
import json
import os
import select
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fetcher.stdio import GuardedStream
from tests.faultserver import Fault, FaultServer
from tests.trees import settled

FILES = {f"d/f{i:02}.bin": bytes([i]) * (3000 + i) for i in range(12)}


def _tree(tmp_path: Path) -> Path:
    www = tmp_path / "www"
    for rel, data in FILES.items():
        (www / rel).parent.mkdir(parents=True, exist_ok=True)
        (www / rel).write_bytes(data)
    return settled(www)


def _env(unbuffered: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    return env


def _assert_mirrored(dest: Path) -> None:
    for rel, data in FILES.items():
        assert (dest / rel).read_bytes() == data, rel


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "unbuffered"])
def test_a_reader_gone_before_the_summary_loses_nothing(tmp_path: Path, unbuffered: str) -> None:
    with FaultServer(root=_tree(tmp_path)) as srv:
        argv = ["--mirror", srv.url, "--dest", str(tmp_path / "d"), "--procs", "1"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "fetcher", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(unbuffered),
        )  # fmt: skip
        assert proc.stdout is not None
        proc.stdout.close()
        _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err and b"Exception ignored" not in err, err
    assert proc.returncode == 0, err  # every file was fetched: the run's own exit code
    assert b"stdout is gone (Broken pipe); the run goes on without it" in err, err
    _assert_mirrored(tmp_path / "d")


def test_a_reader_gone_mid_run_does_not_stop_the_sync(tmp_path: Path) -> None:
    # fetch -v | head -1: the reader leaves while one file is still held by the server
    gate = threading.Event()
    with FaultServer(root=_tree(tmp_path)) as srv:
        srv.script("/d/f11.bin", [Fault.gated(gate)])
        argv = ["--mirror", srv.url, "--dest", str(tmp_path / "d"), "--procs", "2", "-v",
                "--log-format", "json"]  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "fetcher", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()  # the run's first event
            assert first.startswith(b'{"ts": '), first
            assert srv.wait_for(1, path="/d/f11.bin", timeout=30)
            proc.stdout.close()
            assert proc.poll() is None  # still running: f11 is held
        finally:
            gate.set()
        _, err = proc.communicate(timeout=60)
        assert b"Traceback" not in err, err
        assert proc.returncode == 0, err
        assert b"stdout is gone (Broken pipe)" in err, err
        _assert_mirrored(tmp_path / "d")
        # and the state was saved as usual: a second run fetches nothing
        srv.reset_stats()
        again = subprocess.run(
            [sys.executable, "-m", "fetcher", *argv[:-3]],
            capture_output=True, timeout=60, env=_env(), check=False,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert not [r for r in srv.requests if r.path.endswith(".bin")]


@pytest.mark.parametrize("closed", [">&-", "2>&-", ">&- 2>&-", "<&- >&- 2>&-"])
def test_closed_standard_descriptors_at_start(tmp_path: Path, closed: str) -> None:
    # Without care the first file opened would take descriptor 1, and "stdout" would be
    # written into a downloaded file.
    with FaultServer(root=_tree(tmp_path)) as srv:
        argv = ["--mirror", srv.url, "--dest", str(tmp_path / "d"), "--procs", "1", "-v"]
        script = f'exec "$@" {closed}'
        done = subprocess.run(
            ["sh", "-c", script, "sh", sys.executable, "-m", "fetcher", *argv],
            capture_output=True, timeout=60, env=_env(), check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"Traceback" not in done.stderr, done.stderr
    _assert_mirrored(tmp_path / "d")
    extra = {p.relative_to(tmp_path / "d").as_posix() for p in (tmp_path / "d").rglob("*")
             if p.is_file() and ".fetcher" not in p.parts}  # fmt: skip
    assert extra == set(FILES)


def test_the_guard_drops_output_after_a_failure_and_tells_once() -> None:
    told: list[str] = []

    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    g = GuardedStream(Broken(), "stdout", lambda dead: told.append(dead.dead))
    assert g.write("abc") == 3
    g.write("more")
    g.flush()
    assert g.dead == "Broken pipe" and told == ["Broken pipe"]
    ok = GuardedStream(io.StringIO(), "stdout")
    ok.write("x")
    assert ok.dead is None and ok.getvalue() == "x"  # anything else is the stream's own


def test_report_and_metrics_go_through_a_fifo_and_a_symlink(tmp_path: Path, run_fetch) -> None:
    # a FIFO (or /dev/stdout) is written, not replaced by a file; a symlink's target is
    # replaced whole and the link stays
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    real = tmp_path / "textfiles" / "fetch.prom"
    real.parent.mkdir()
    real.write_text("old\n")
    link = tmp_path / "fetch.prom"
    link.symlink_to(real)
    held = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # the collector: fetch's open won't block
    try:
        with FaultServer(root=_tree(tmp_path)) as srv:
            r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "d", "--procs", "1",
                          "--report", fifo, "--metrics", link)  # fmt: skip
        report = os.read(held, 1 << 20)
    finally:
        os.close(held)
    assert r.code == 0, r.output
    assert json.loads(report)["exit_code"] == 0
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert link.is_symlink() and "fetch_files_fetched" in real.read_text()
    assert sorted(p.name for p in real.parent.iterdir()) == ["fetch.prom"]  # no temp left


def test_metrics_that_cannot_be_written_do_not_take_the_report(tmp_path: Path, run_fetch) -> None:
    # (under a file: a directory itself is refused before the run)
    (tmp_path / "afile").write_text("")
    metrics = tmp_path / "afile" / "m.prom"
    with FaultServer(root=_tree(tmp_path)) as srv:
        r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "d", "--procs", "1",
                      "--report", tmp_path / "r.json", "--metrics", metrics)  # fmt: skip
    assert r.code == 4, r.output
    assert f"cannot write --metrics {metrics}: Not a directory" in r.output, r.output
    assert json.loads((tmp_path / "r.json").read_text())["exit_code"] == 0
    _assert_mirrored(tmp_path / "d")


def test_a_log_file_that_cannot_be_opened_is_a_usage_error(tmp_path: Path, run_fetch) -> None:
    (tmp_path / "afile").write_text("")
    r = run_fetch("--mirror", "http://127.0.0.1:9/", "--dest", tmp_path / "d",
                  "--log-file", tmp_path / "afile" / "x.log")  # fmt: skip
    assert r.code == 2, r.output
    assert "cannot open --log-file" in r.output and "Not a directory" in r.output
    assert not (tmp_path / "d").exists()  # before anything was done


def test_a_log_file_made_in_a_new_directory(tmp_path: Path, run_fetch) -> None:
    log = tmp_path / "var" / "log" / "fetch.log"
    with FaultServer(root=_tree(tmp_path)) as srv:
        r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "d", "--procs", "1",
                      "--log-file", log)  # fmt: skip
    assert r.code == 0, r.output
    assert "fetched" in log.read_text().splitlines()[-1]


def test_a_log_whose_reader_leaves_mid_run_does_not_stop_the_sync(tmp_path: Path) -> None:
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    gate = threading.Event()
    try:
        with FaultServer(root=_tree(tmp_path)) as srv:
            srv.script("/d/f11.bin", [Fault.gated(gate)])
            argv = ["--mirror", srv.url, "--dest", str(tmp_path / "d"), "--procs", "1", "-v",
                    "--log-file", str(fifo)]  # fmt: skip
            proc = subprocess.Popen(
                [sys.executable, "-m", "fetcher", *argv],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(),
            )  # fmt: skip
            try:
                assert srv.wait_for(1, path="/d/f11.bin", timeout=30)
                ready, _, _ = select.select([reader], [], [], 30)
                assert ready and os.read(reader, 1 << 16)  # the log has begun
                os.close(reader)
                reader = -1
                assert proc.poll() is None  # still running: f11 is held
            finally:
                gate.set()
            _, err = proc.communicate(timeout=60)
    finally:
        if reader >= 0:
            os.close(reader)
    assert b"Traceback" not in err, err
    assert proc.returncode == 0, err
    assert f"cannot write --log-file {fifo} (Broken pipe); the run goes on".encode() in err, err
    _assert_mirrored(tmp_path / "d")


def test_a_report_on_stdout_is_alone_there(tmp_path: Path) -> None:
    # fetch ... --report - | jq .exit_code: the summary goes to stderr instead
    with FaultServer(root=_tree(tmp_path)) as srv:
        done = subprocess.run(
            [sys.executable, "-m", "fetcher", "--mirror", srv.url, "--dest", str(tmp_path / "d"),
             "--procs", "1", "--report", "-"],
            capture_output=True, timeout=60, env=_env(), check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["exit_code"] == 0 and report["jobs"][0]["fetched"]["files"] == len(FILES)
    assert b"fetched" in done.stderr
    assert not (tmp_path / "-").exists() and not Path("-").exists()
    _assert_mirrored(tmp_path / "d")


def test_report_and_metrics_cannot_both_be_stdout(tmp_path: Path, run_fetch) -> None:
    # they were written one after the other there, which neither reader could parse
    r = run_fetch("--mirror", "http://127.0.0.1:9/", "--dest", tmp_path / "d",
                  "--report", "-", "--metrics", "-")  # fmt: skip
    assert r.code == 2 and "--report - and --metrics -" in r.output, r.output
    assert not (tmp_path / "d").exists()


def test_report_and_metrics_cannot_be_one_file(tmp_path: Path, run_fetch) -> None:
    # the metrics were written over the report, by another name for it too
    (tmp_path / "link").symlink_to(tmp_path / "out")
    for other in (tmp_path / "out", tmp_path / "link", tmp_path / "sub" / ".." / "out"):
        r = run_fetch("--mirror", "http://127.0.0.1:9/", "--dest", tmp_path / "d",
                      "--report", tmp_path / "out", "--metrics", other)  # fmt: skip
        assert r.code == 2 and "one file for both" in r.output, (other, r.output)
    assert not (tmp_path / "d").exists() and not (tmp_path / "out").exists()


def test_the_log_file_and_the_report_or_metrics_cannot_be_one_file(
    tmp_path: Path, run_fetch
) -> None:
    # the report (or metrics), written atomically at the end, replaced the log that
    # --log-file appends to, with the lines of every run before
    log = tmp_path / "fetch.log"
    log.write_text("the lines of the runs before\n")
    with FaultServer() as srv:
        srv.add_file("/a.bin", b"x" * 100)
        for flag in ("--report", "--metrics"):
            r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "d",
                          "--log-file", log, flag, tmp_path / "." / "fetch.log")  # fmt: skip
            assert r.code == 2 and "one file for both" in r.output, (flag, r.output)
            assert "would be written over the log" in r.output, r.output
        requests = srv.count()
    assert requests == 0
    assert log.read_text() == "the lines of the runs before\n"
    assert not (tmp_path / "d").exists()


def test_a_directory_as_report_or_metrics_is_refused_before_the_run(
    tmp_path: Path, run_fetch
) -> None:
    # it was found only once the sync was done (exit 4), and again on every timer's run
    (tmp_path / "reports").mkdir()
    with FaultServer() as srv:
        srv.add_file("/a.bin", b"x" * 100)
        for flag in ("--report", "--metrics"):
            r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "d", flag, tmp_path / "reports")
            assert r.code == 2, (flag, r.output)
            assert f"fetch: error: {flag} {tmp_path / 'reports'}: a directory" in r.output, r
        requests = srv.count()
    assert requests == 0 and not (tmp_path / "d").exists()
    assert not list((tmp_path / "reports").iterdir())


def test_a_command_that_only_prints_says_nothing_when_its_reader_left(tmp_path: Path) -> None:
    # fetch --config m.toml --check | head -1: no sync to keep going, nothing to report
    cfg = tmp_path / "m.toml"
    cfg.write_text("".join(f'[jobs.j{i}]\nurl = "http://127.0.0.1:9/{i}/"\n' for i in range(300)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fetcher", "--config", str(cfg), "--check"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == b"", err


def test_metrics_go_through_a_fifo_and_to_dev_stdout(tmp_path: Path) -> None:
    # written as they are, as a report is: the last run's samples are read from a regular
    # file only (reading a FIFO or this run's own stdout would wait for ever)
    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)
    held = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # the collector: fetch's open won't block
    try:
        with FaultServer(root=_tree(tmp_path)) as srv:
            for target in (fifo, "/dev/stdout"):
                argv = ["--mirror", srv.url, "--dest", str(tmp_path / "d"), "--procs", "1",
                        "-q", "--metrics", str(target)]  # fmt: skip
                proc = subprocess.Popen(
                    [sys.executable, "-m", "fetcher", *argv],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                )  # fmt: skip
                try:
                    out, err = proc.communicate(timeout=60)
                finally:
                    proc.kill()  # (stuck, it holds SIGTERM until its metrics are written)
                assert proc.returncode == 0, err
                assert b"Traceback" not in err, err
                if target == fifo:
                    out = os.read(held, 1 << 20)
                assert b'fetch_exit_code{mirror="' in out, out
    finally:
        os.close(held)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    _assert_mirrored(tmp_path / "d")


def test_metrics_over_a_damaged_old_file_are_written(tmp_path: Path, run_fetch) -> None:
    metrics = tmp_path / "fetch.prom"
    metrics.write_bytes(b"\xff\xfe garbage, not UTF-8\n")
    with FaultServer(root=_tree(tmp_path)) as srv:
        r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "d", "--procs", "1",
                      "--metrics", metrics)  # fmt: skip
    assert r.code == 0, r.output
    assert 'fetch_exit_code{mirror="' in metrics.read_text()
