"""Output that cannot be written is dropped; the sync, its files and its exit code are not.

``fetch ... | head`` (the reader leaves), a log collector restarted under a
running job, ``fetch ... >&-``: each against a real server, through the console
script's entry point as a user runs it.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fetcher.stdio import GuardedStream
from tests.faultserver import Fault, FaultServer

FILES = {f"d/f{i:02}.bin": bytes([i]) * (3000 + i) for i in range(12)}


def _tree(tmp_path: Path) -> Path:
    www = tmp_path / "www"
    for rel, data in FILES.items():
        (www / rel).parent.mkdir(parents=True, exist_ok=True)
        (www / rel).write_bytes(data)
    return www


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
