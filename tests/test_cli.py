"""The command line: exit codes, messages, --help, Ctrl-C."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fetcher import __version__
from tests.background import fetch_session
from tests.faultserver import Fault, FaultServer


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "nothing to do"),
        (["--mirror", "ftp://x/"], "--mirror: expected an http:// or https:// URL"),
        (
            ["--mirror", "http://127.0.0.1:9/", "--threads", "0"],
            "--threads: expected an integer from 1 to 1024, got 0",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--max-connections", "100000000000000000000"],
            "--max-connections: expected an integer from 1 to 1024",
        ),
        (["--mirror", "http://127.0.0.1:99999/"], "--mirror: expected a port from 0 to 65535"),
        (["--mirror", "http://127.0.0.1:x/"], "--mirror: expected a port from 0 to 65535"),
        (["--mirror", "http://127.0.0.1/a\udcff/"], "--mirror: expected a URL in UTF-8"),
        (["--mirror", "http://127.0.0.1/a\tb/"], "--mirror: expected a URL without control"),
        (
            ["--mirror", "http://127.0.0.1:9/", "--header", "Range: bytes=0-"],
            "--header: Range is set by fetch itself",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--header", "X-A: b\r\nX-B: c"],
            "--header: the value of X-A must be one line",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--header", "NoColon"],
            "--header: expected 'Name: value' headers",
        ),
        (  # an empty one among several, not the list's Python repr: got ('*.rpm', '')
            ["--mirror", "http://127.0.0.1:9/", "--include", "*.rpm", "--include="],
            """--include: expected a non-empty string or a list of them, got ""\n""",
        ),
        (  # the header at fault, not the list's Python repr: got ('X-A: b', 'X-Token abc')
            ["--mirror", "http://127.0.0.1:9/", "--header", "X-A: b", "--header", "X-Token abc"],
            """--header: expected 'Name: value' headers, got "X-Token abc"\n""",
        ),
        (
            ["--mirror", "http://u:p@127.0.0.1:9/", "--header", "Authorization: Bearer x"],
            "--mirror: credentials in the URL and an Authorization header",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--user-agent", "a\nb"],
            "--user-agent: expected one line",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--proxy", "socks5://p:1"],
            "--proxy: expected an http:// or https:// proxy URL, or direct",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--procs", "x"],
            "argument --procs: invalid int value",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--limit-rate", "fast"],
            "--limit-rate: expected a rate",
        ),
        (["--mirror", "http://127.0.0.1:9/", "--max-delete", "lots"], "--max-delete"),
        (
            ["--mirror", "http://127.0.0.1:9/", "--timeout", "1e300"],
            "--timeout: expected a number from 0.001 to 86400, got 1e+300",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--connect-timeout", "1e10"],
            "--connect-timeout: expected a number from 0.001 to 86400, got 10000000000.0",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--limit-rate", "1e-6"],
            '--limit-rate: expected a rate like 500k, 10M or a number of bytes per second, from 1 to 1024G, got "1e-6"',
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--limit-rate", "0.001"],
            '--limit-rate: expected a rate like 500k, 10M or a number of bytes per second, from 1 to 1024G, got "0.001"',
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--listing-rate", "1e-6"],
            "--listing-rate: expected a number from 0.001 to 10000, got 1e-06",
        ),
        (["--mirror", "http://127.0.0.1:9/", "--post", "explode"], "explode"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        *(
            (
                ["--mirror", "http://127.0.0.1:9/", "--executor", "dask", "--scheduler", bad],
                f'--scheduler: expected tcp://HOST:PORT (or tls://, ws://, wss://), got "{bad}"',
            )
            for bad in ("garbage", "tcp://127.0.0.1", "foo://127.0.0.1:1", "tcp://127.0.0.1:8786/x")
        ),
        (["--job", "x"], "--job and --check go with --config"),
        (
            ["--mirror", "http://127.0.0.1:9/pub/", "/some/dest"],
            "fetch: error: unexpected argument '/some/dest' (did you mean --dest?)",
        ),
        (
            ["http://127.0.0.1:9/pub/", "--mirror", "http://127.0.0.1:9/pub/"],
            "fetch: error: unexpected argument 'http://127.0.0.1:9/pub/' (did you mean --dest?)",
        ),
        (
            ["--config", "m.toml", "nightly"],
            "fetch: error: unexpected argument 'nightly' (did you mean --job or --dest?)",
        ),
        (
            ["--config", "m.toml", "http://127.0.0.1:9/"],
            "fetch: error: --mirror goes without --config",
        ),
        (["--verify-only", "d", "e"], "fetch: error: unexpected argument 'e' (--verify-only takes"),
        (  # accepted, and no report or metrics written: what a timer's alert waits for
            ["--verify-only", "d", "--report", "r.json", "--metrics", "m.prom", "--procs", "2"],
            "fetch: error: --verify-only takes no --procs, --report, --metrics: it prints",
        ),
        # options that mean something only beside another: said, not silently dropped
        (
            ["--mirror", "http://127.0.0.1:9/", "--scheduler", "tcp://127.0.0.1:8786"],
            "fetch: error: --scheduler goes with --executor dask",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--arch", "amd64"],
            "fetch: error: --arch goes with --index debian",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--force"],
            "fetch: error: --force goes with --delete",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--max-delete", "5"],
            "fetch: error: --max-delete goes with --delete",
        ),
        (  # (the run went on, and made nothing where it was told to)
            ["--mirror", "http://127.0.0.1:9/", "--post-dest", "previews"],
            "fetch: error: --post-dest goes with --post",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--post-jobs", "1"],
            "fetch: error: --post-jobs goes with --post",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--retry-failed-post"],
            "fetch: error: --retry-failed-post goes with --post",
        ),
        (
            ["--verify-only", "d", "--mirror", "http://127.0.0.1:9/"],
            "fetch: error: --verify-only checks a DEST on its own",
        ),
    ],
)
def test_usage_errors_exit_2_without_traceback(
    argv: list[str], message: str, run_fetch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # (a default DEST is made here, were a run to start)
    r = run_fetch(*argv)
    assert r.code == 2, r
    assert message in r.output
    assert "Traceback" not in r.output
    assert not list(tmp_path.iterdir())  # refused before anything was made


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--mirror", "http://user:s3cret@127.0.0.1:99999/pub/"],
            '--mirror: expected a port from 0 to 65535 in "http://127.0.0.1:99999/pub/"',
        ),
        (
            ["--mirror", "ftp://user:s3cret@127.0.0.1/pub/"],
            '--mirror: expected an http:// or https:// URL, got "ftp://127.0.0.1/pub/"',
        ),
        (
            ["--mirror", "http://a@b:s3cret@127.0.0.1:x/"],
            '--mirror: expected a port from 0 to 65535 in "http://127.0.0.1:x/"',
        ),
        (
            ["--mirror", "http://user:s3cret@127.0.0.1/a\tb/"],
            "--mirror: expected a URL without control characters, got 'http://127.0.0.1/a\\tb/'",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--proxy", "ftp://pu:s3cret@127.0.0.1:3128"],
            '--proxy: expected an http:// or https:// proxy URL, or direct, got "ftp://127.0.0.1:3128"',
        ),
    ],
)
def test_a_url_refused_is_shown_without_its_password(
    argv: list[str], message: str, run_fetch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    r = run_fetch(*argv)
    assert r.code == 2, r
    assert message in r.output
    assert "s3cret" not in r.output and "Traceback" not in r.output


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--mirror", "http://exa mple.org/"],
            '--mirror: invalid host "exa mple.org" in "http://exa mple.org/"',
        ),
        (["--mirror", "http://a b/"], '--mirror: invalid host "a b" in "http://a b/"'),
        (
            ["--mirror", "http://u:s3cret@a..b/x/"],
            '--mirror: invalid host "a..b" in "http://a..b/x/"',
        ),
        (["--mirror", "http://-x-/"], '--mirror: invalid host "-x-" in "http://-x-/"'),
        (["--mirror", "http://256.256.256.256/"], '--mirror: invalid host "256.256.256.256" in'),
        (
            ["--mirror", "http://[::1]x/"],
            '--mirror: expected a port from 0 to 65535 in "http://[::1]x/"',
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--proxy", "http://a b:3128"],
            '--proxy: invalid host "a b" in "http://a b:3128"',
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--proxy", "http://pu:s3cret@127.0.0.1:99999"],
            '--proxy: expected a port from 0 to 65535 in "http://127.0.0.1:99999"',
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--proxy", "http://127.0.0.1:3128\n"],
            "--proxy: expected a URL without control characters",
        ),
        (
            ["--mirror", "http://127.0.0.1:9/", "--alias", "a..b"],
            '--alias: expected HOST or HOST:PORT, such as mirror.example.org, got "a..b"',
        ),
    ],
)
def test_a_host_no_connection_could_be_made_to_is_a_usage_error(
    argv: list[str], message: str, run_fetch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before anything starts, not a listing error (exit 1) after a name lookup."""
    monkeypatch.chdir(tmp_path)

    def no_lookup(*args: object, **kwargs: object) -> None:
        raise OSError("this test looks up no name")

    monkeypatch.setattr("socket.getaddrinfo", no_lookup)  # (were the host taken)
    r = run_fetch(*argv, "--dry-run", "--retries", "1")
    assert r.code == 2, r
    assert message in r.output
    assert "s3cret" not in r.output and "Traceback" not in r.output
    assert not list(tmp_path.iterdir())


def test_a_dask_scheduler_address_from_the_environment_is_checked_too(
    run_fetch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not distributed's ValueError traceback after its 20 s connect timeout: exit 2 now."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "garbage")
    started = time.monotonic()
    r = run_fetch("--mirror", "http://127.0.0.1:9/", "--executor", "dask")
    assert r.code == 2, r
    assert (
        'fetch: error: $DASK_SCHEDULER_ADDRESS: expected tcp://HOST:PORT (or tls://, ws://, wss://), got "garbage"'
        in r.output
    )
    assert "Traceback" not in r.output and time.monotonic() - started < 10


def test_a_dest_in_a_state_directory_or_inside_another_mirror_is_refused(
    run_fetch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its --delete (or the other mirror's) would remove a mirror's state and lock, or
    files that are not the other's: refused before anything is made."""
    root = tmp_path.resolve()
    monkeypatch.chdir(root)
    state = root / "out1" / ".fetcher"
    state.mkdir(parents=True)
    (state / "state.sqlite").write_bytes(b"")  # (only looked for, never opened)
    (state / "lock").write_bytes(b"")
    (root / "link").symlink_to(state)
    in_state = "lies in a state directory (.fetcher), which is fetch's own"
    inside = f"lies inside the mirror {root / 'out1'}, whose --delete would remove it"
    for dest, message in (
        ("out1/.fetcher", f"--dest: {state} {in_state}"),
        ("out1/.fetcher/x", f"--dest: {state / 'x'} {in_state}"),
        ("link/x", f"--dest: {state / 'x'} {in_state}"),
        ("out1/sub/deeper", f"--dest: {root / 'out1/sub/deeper'} {inside}"),
        ("./x/../out1/sub", f"--dest: {root / 'out1/sub'} {inside}"),
    ):
        r = run_fetch("--mirror", "http://127.0.0.1:9/pub/", "--dest", dest, "--delete")
        assert r.code == 2, r
        assert f"fetch: error: {message}" in r.output and "Traceback" not in r.output
    monkeypatch.chdir(root / "out1")  # the default DEST, ./pub, is inside the mirror too
    r = run_fetch("--mirror", "http://127.0.0.1:9/pub/", "--delete")
    assert r.code == 2 and f"--dest: {root / 'out1/pub'} {inside}" in r.output, r
    cfg = root / "m.toml"
    cfg.write_text("[jobs.a]\nurl = 'http://127.0.0.1:9/pub/'\ndest = 'out1/sub'\n")
    r = run_fetch("--config", cfg, "--check")
    assert r.code == 2 and f"m.toml: jobs.a.dest: {root / 'out1/sub'} {inside}" in r.output, r
    assert sorted(p.name for p in state.iterdir()) == ["lock", "state.sqlite"]
    assert sorted(p.name for p in (root / "out1").iterdir()) == [".fetcher"]
    # the mirror itself, and a directory beside it, are fine
    cfg.write_text(
        "[jobs.a]\nurl = 'http://127.0.0.1:9/a/'\ndest = 'out1'\n"
        "[jobs.b]\nurl = 'http://127.0.0.1:9/b/'\ndest = 'out2'\n"
    )
    assert run_fetch("--config", cfg, "--check").code == 0


def test_every_key_check_prints_is_a_key_a_config_file_takes(tmp_path: Path, run_fetch) -> None:
    """--check printed max_listing_bytes, a fixed cap: copied into the file, it was refused
    as an unknown key (did you mean 'listing_rate'?)."""
    cfg = tmp_path / "m.toml"
    cfg.write_text("[jobs.a]\nurl = 'http://127.0.0.1:9/a/'\n")
    check = run_fetch("--config", cfg, "--check")
    assert check.code == 0, check
    keys = re.findall(r"^    (\w+) = ", check.output, re.M)
    assert "max_connections" in keys and "post" in keys, check.output
    for key in keys:
        table = "[[jobs.a.post]]\naction = 'probe'\n" if key == "post" else ""
        value = {"url": "'http://127.0.0.1:9/a/'", "post": ""}.get(key)
        own = f"{key} = 1\n" if value is None else ""
        cfg.write_text(f"[jobs.a]\nurl = 'http://127.0.0.1:9/a/'\n{own}{table}")
        r = run_fetch("--config", cfg, "--check")
        assert "unknown key" not in r.output, (key, r.output)


def test_a_path_no_file_can_have_is_a_usage_error(tmp_path: Path, run_fetch) -> None:
    """A NUL in a path of the file, or a ``~user`` of no such user, was a traceback
    (``ValueError: embedded null byte``, ``RuntimeError: Could not determine home
    directory.``), not the key and its problem."""
    cfg = tmp_path / "m.toml"
    nobody = "~no-such-user-7f3a"
    for key, value, message in (
        (
            "dest",
            '"a\\u0000b"',
            r"jobs.a.dest: expected a path without NUL characters, got 'a\x00b'",
        ),
        ("post_dest", '"o\\u0000"', "jobs.a.post_dest: expected a path without NUL characters"),
        ("ca_cert", '"c\\u0000"', "jobs.a.ca_cert: expected a path without NUL characters"),
        ("dest", f"'{nobody}/a'", f"jobs.a.dest: no home directory for {nobody}"),
        ("post_dest", f"'{nobody}'", f"jobs.a.post_dest: no home directory for {nobody}"),
    ):
        cfg.write_text(f"[jobs.a]\nurl = 'http://127.0.0.1:9/a/'\n{key} = {value}\n")
        r = run_fetch("--config", cfg, "--check")
        assert r.code == 2, (key, value, r)
        assert f"fetch: error: m.toml: {message}" in r.output and "Traceback" not in r.output, r
    r = run_fetch("--mirror", "http://127.0.0.1:9/a/", "--dest", f"{nobody}/a", "--dry-run")
    assert r.code == 2 and f"fetch: error: --dest: no home directory for {nobody}" in r.output, r
    assert list(tmp_path.iterdir()) == [cfg]


def test_an_endless_config_file_is_refused_not_read_into_memory(tmp_path: Path) -> None:
    """``--config /dev/zero`` (or any huge file given by mistake) was read whole: the
    machine ran out of memory and the kernel killed the biggest process. Here under a
    1 GiB address-space limit, where reading it whole ends in a MemoryError."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    big = tmp_path / "big.toml"
    with big.open("wb") as f:  # sparse: 17 MiB that take no disk
        f.truncate(17 << 20)
    for path in ("/dev/zero", str(big)):
        r = subprocess.run(
            [sys.executable, "-m", "fetcher", "--config", path, "--check"],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=limit,
        )
        assert r.returncode == 2, r
        assert r.stderr == f"fetch: error: {path}: over 16 MiB, too big for a config file\n", r


def test_outputs_in_dest_s_state_directory_are_refused(tmp_path: Path, run_fetch) -> None:
    """``--report DEST/.fetcher/state.sqlite`` wrote the report over the state (the next
    run: 'cannot read state database: file is not a database'), and --log-file there
    appended lines to it."""
    dest = tmp_path / "d"
    with FaultServer() as srv:
        srv.add_file("/pub/a.txt", b"a")
        args = ("--mirror", srv.url + "pub/", "--dest", dest, "--procs", "1")
        assert run_fetch(*args).code == 0
        state = dest / ".fetcher" / "state.sqlite"
        before = state.read_bytes()
        for flag, path in (
            ("--report", state),
            ("--metrics", dest / ".fetcher" / "lock"),
            ("--log-file", state),
            ("--log-file", dest / ".fetcher" / "partial" / "fetch.log"),
        ):
            r = run_fetch(*args, flag, path)
            assert r.code == 2, (flag, path, r)
            assert f"fetch: error: {flag} {path} lies in {dest / '.fetcher'}, which is" in r.output
        assert state.read_bytes() == before
        assert not (dest / ".fetcher" / "partial" / "fetch.log").exists()
        r = run_fetch(*args, "--report", tmp_path / "r.json")
        assert r.code == 0 and json.loads((tmp_path / "r.json").read_text())["jobs"], r


def test_the_demo_refuses_bad_options_before_building_its_sample(tmp_path: Path, run_fetch) -> None:
    for bad, message in (("--pipeline=0", "--pipeline: expected an integer from 1 to 32"),
                         ("--bogus", "unrecognized arguments: --bogus"),
                         # the demo's own option, passed on: was refused after the build
                         ("--procs=0", "--procs: expected an integer from 1 to 1024")):  # fmt: skip
        r = run_fetch("demo", "--dir", tmp_path / "demo", "--no-media", bad)
        assert r.code == 2 and message in r.output, r
        assert not (tmp_path / "demo").exists()


def test_the_demo_in_a_directory_it_cannot_write_says_so_without_a_traceback(
    tmp_path: Path, run_fetch
) -> None:
    (tmp_path / "file").write_text("not a directory")
    r = run_fetch("demo", "--dir", tmp_path / "file", "--no-media")
    assert r.code == 4, r
    assert "fetch: error: cannot build the sample: " in r.output, r
    assert "Not a directory" in r.output and "Traceback" not in r.output, r
    assert (tmp_path / "file").read_text() == "not a directory"


def test_a_deleted_working_directory_is_a_usage_error(tmp_path: Path) -> None:
    """A cron job whose directory was removed: a clear message, nothing written anywhere."""
    gone = tmp_path / "gone"
    gone.mkdir()
    script = f"cd {shlex.quote(str(gone))} && rmdir {shlex.quote(str(gone))} && exec " + shlex.join(
        [sys.executable, "-m", "fetcher", "--mirror", "http://127.0.0.1:9/", "--dest", "d"]
    )
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "the current directory no longer exists" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_version_and_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fetcher", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == f"fetch {__version__}"
    out = subprocess.run(
        [sys.executable, "-m", "fetcher", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for flag in (
        "--mirror",
        "--dest",
        "--procs",
        "--max-connections",
        "--threads",
        "--include",
        "--exclude",
        "--depth",
        "--retries",
        "--timeout",
        "--dry-run",
        "--delete",
        "--quiet",
        "--verbose",
        "exit codes",
    ):
        assert flag in out.stdout, flag


def test_the_help_s_config_example_runs_a_job_of_that_file(
    run_fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fetcher.cli import EPILOG

    examples = [shlex.split(line)[1:] for line in EPILOG.splitlines() if "fetch --config" in line]
    assert examples
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # (its path is the repository's)
    for argv in examples:
        r = run_fetch(*argv, "--check")
        assert r.code == 0 and "1 job(s) valid" in r.output, (argv, r)


def test_some_files_failed_exit_1_and_listed(tmp_path: Path, run_fetch) -> None:
    (tmp_path / "www").mkdir()
    for name in ("a.bin", "b.bin", "c.bin"):
        (tmp_path / "www" / name).write_bytes(name.encode() * 100)
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/b.bin", Fault.status(403))
        r = run_fetch(
            "--mirror", srv.url, "--dest", tmp_path / "d", "--procs", "2", "--threads", "4"
        )
        assert srv.count(path="/b.bin") == 1  # 403 is not retried
    assert r.code == 1, r
    assert "b.bin: HTTP 403" in r.output
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [".fetcher", "a.bin", "c.bin"]


def test_dry_run_lists_the_plan(tmp_path: Path, run_fetch) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.bin").write_bytes(b"x" * 5000)
    with FaultServer(root=tmp_path / "www") as srv:
        r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "d", "--dry-run")
        assert srv.count(path="/a.bin") == 0
    assert r.code == 0, r
    assert "to fetch: new" in r.output and "4.9 KiB" in r.output
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["ctrl-c", "sigterm", "hangup"]
)
def test_interrupt_exits_130_keeps_partials_and_resumes(
    tmp_path: Path, sig: signal.Signals, run_fetch
) -> None:
    www = tmp_path / "www"
    www.mkdir()
    payload = os.urandom(3 << 20)
    (www / "big.bin").write_bytes(payload)
    (www / "small.txt").write_bytes(b"small")
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        srv.script("/big.bin", [Fault.trickle(512 * 1024)])
        argv = ["--mirror", srv.url, "--dest", str(dest), "--procs", "1"]
        with fetch_session(argv) as proc:
            deadline = time.monotonic() + 30
            partial = dest / ".fetcher" / "partial"
            while time.monotonic() < deadline:
                parts = list(partial.glob("*.part")) if partial.exists() else []
                if parts and parts[0].stat().st_size > 256 * 1024:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the download never started")
            os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C does: the whole group
            out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out.decode(errors="replace")
        assert b"Traceback" not in out
        assert not (dest / "big.bin").exists()
        assert any(p.stat().st_size > 0 for p in partial.glob("*.part"))
        sent_before = srv.file_bytes_sent
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1")
        assert r.code == 0, r
        assert (dest / "big.bin").read_bytes() == payload
        assert srv.file_bytes_sent - sent_before < len(payload)  # resumed, not restarted


def test_a_stop_while_a_listing_is_slow_to_come_acts_at_once(tmp_path: Path) -> None:
    """SIGTERM while the server takes its time over a listing: the run waited for the
    crawl's thread, stuck on that answer, for up to 10 s (the join's limit) before it
    ended (found by the scheduled-sync review, 8.5 s against a listing held 10 s). The
    crawl's connections are shut down as the run stops."""
    www = tmp_path / "www"
    (www / "slow").mkdir(parents=True)
    (www / "slow" / "f.bin").write_bytes(b"f")
    with FaultServer(root=www) as srv:
        srv.persist("/slow/", Fault.delay(60))
        argv = ["--mirror", srv.url, "--dest", str(tmp_path / "d"), "--procs", "1"]
        with fetch_session(argv) as proc:
            assert srv.wait_for(1, path="/slow/", timeout=30), "the listing was never asked for"
            stopped = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
            took = time.monotonic() - stopped
    assert proc.returncode == 130, out.decode(errors="replace")
    assert b"Traceback" not in out
    assert took < 5, f"{took:.1f} s from SIGTERM to exit"


_SIGTERM_IN_A_FINALIZER = """
import signal, sys
import fetcher.pipeline as pipeline

class Dropped:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)  # its handler runs here, in a finalizer

take, fired = pipeline._take, []

def first_take(run, item):
    if not fired:
        fired.append(Dropped())
        fired[:] = [True]  # the finalizer runs now
    take(run, item)

pipeline._take = first_take
from fetcher.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_sigterm_that_lands_in_a_finalizer_still_stops_the_run(tmp_path: Path) -> None:
    """SIGTERM (and SIGHUP) stop a run by raising KeyboardInterrupt wherever the main
    thread is. When that is a finalizer (a weak reference's callback, a ``__del__``:
    threads and queues have them), Python prints "Exception ignored in ..." and drops
    the exception: the run went on to its end and said 0, and systemd, its stop ignored,
    killed it after its timeout. The handler also sets the run's stop event, which the
    coordinator checks between steps."""
    www = tmp_path / "www"
    www.mkdir()
    for i in range(6):
        (www / f"f{i}.bin").write_bytes(bytes([i]) * 4000)
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        argv = [sys.executable, "-c", _SIGTERM_IN_A_FINALIZER, "--mirror", srv.url,
                "--dest", str(dest), "--procs", "1"]  # fmt: skip
        proc = subprocess.run(argv, cwd=Path(__file__).resolve().parent.parent,
                              capture_output=True, timeout=60, start_new_session=True,
                              check=False)  # fmt: skip
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert "Exception ignored in" in out  # (the situation this test is about)
    assert proc.returncode == 130, out
    assert "interrupted" in out, out


_STOPPED_WHILE_LOADING = """
import os, signal, sys
import fetcher.console as console

console.catch_early()  # what the console script does first
os.kill(os.getpid(), int(sys.argv.pop(1)))  # as if it came while the rest of fetch loads
sys.argv[0] = "fetch"
console.run()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "hangup"])
def test_a_stop_while_fetch_loads_ends_as_an_interrupted_run_with_its_report(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """A timer's stop (SIGTERM) in fetch's first tenth of a second, while its modules
    load, ended the process at once: exit 143 (129 for SIGHUP), no report, no metrics, an
    alert's last-run time left as it was. Now the run is reported as interrupted, exit
    130, and nothing was asked of the mirror."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "a.bin").write_bytes(b"a" * 4000)
    dest, report, metrics = tmp_path / "d", tmp_path / "r.json", tmp_path / "m.prom"
    with FaultServer(root=www) as srv:
        argv = [sys.executable, "-c", _STOPPED_WHILE_LOADING, str(int(sig)), "--mirror",
                srv.url, "--dest", str(dest), "--procs", "1", "--report", str(report),
                "--metrics", str(metrics)]  # fmt: skip
        proc = subprocess.run(argv, cwd=Path(__file__).resolve().parent.parent,
                              capture_output=True, timeout=60, start_new_session=True,
                              check=False)  # fmt: skip
        asked = srv.count()
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "interrupted" in out, out
    [job] = json.loads(report.read_text())["jobs"]
    assert job["interrupted"] is True and job["exit_code"] == 130, job
    assert "fetch_exit_code{mirror=" in metrics.read_text()
    assert asked == 0 and not (dest / "a.bin").exists()


def test_under_nohup_a_hangup_does_not_stop_the_run(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    for i in range(6):
        (www / f"f{i}.bin").write_bytes(bytes([i]) * 4000)
    dest = tmp_path / "d"
    gate = threading.Event()
    with FaultServer(root=www) as srv:
        srv.script("/f5.bin", [Fault.gated(gate)])
        argv = ["--mirror", srv.url, "--dest", str(dest), "--procs", "2"]
        with fetch_session(argv, shell_prefix='trap "" HUP;') as proc:
            try:
                assert srv.wait_for(1, path="/f5.bin", timeout=30)
                os.killpg(proc.pid, signal.SIGHUP)  # the terminal closes, f5 still held
            finally:
                gate.set()
            out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode(errors="replace")
    for i in range(6):
        assert (dest / f"f{i}.bin").read_bytes() == bytes([i]) * 4000


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out.update(int(x) for x in (task / "children").read_text().split())
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def _workers(pid: int) -> tuple[set[int], set[int]]:
    """(worker processes, the processes they were started from) below the coordinator
    ``pid``.

    When the coordinator started single-threaded, as the CLI does, workers are forks
    of a copy of it (the same command line) that it forked first; else forks of a fork
    server (a child of the coordinator) where the platform has one, else spawned
    children.
    """
    workers: set[int] = set()
    parents: set[int] = set()
    own = _cmdline(pid)
    for c in _children(pid):
        cmd = _cmdline(c)
        if b"spawn_main" in cmd:
            workers.add(c)
        elif cmd == own or b"multiprocessing.forkserver" in cmd:
            parents.add(c)
            with contextlib.suppress(FileNotFoundError):
                workers.update(_children(c))
    return workers, parents


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _fetch_with_workers(
    srv: FaultServer, dest: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], set[int], set[int]]:
    """The CLI on ``srv`` with two workers of two threads each, once both are running:
    (the process, the workers, the process they were forked from)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fetcher", "--mirror", srv.url, "--dest", str(dest),
         "--procs", "2", "--threads", "2", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    workers: set[int] = set()
    parents: set[int] = set()
    while time.monotonic() < deadline and len(workers) < 2:
        workers, parents = _workers(proc.pid)
        time.sleep(0.05)
    assert len(workers) == 2 and len(parents) == 1, (workers, parents)
    return proc, workers, parents


def _gone_within(pids: set[int], seconds: float) -> list[int]:
    """Those of ``pids`` still running after ``seconds`` (killed then, not left behind)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.05)
    alive = [p for p in pids if _running(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    return alive


@pytest.mark.parametrize("stalled", [False, True], ids=["trickling", "stalled"])
def test_workers_exit_soon_after_the_coordinator_is_killed(tmp_path: Path, stalled: bool) -> None:
    """``kill -9`` of the coordinator: its workers and their parent are gone within
    seconds, and no truncated file is published; DEST's lock is free for the next run
    meanwhile. Stalled: each worker waits on a silent server (a 60 s read timeout).
    Each watches its parent by PID: through multiprocessing's pipe a worker saw it go
    only once every worker forked after it had ended, and one waiting on a server was
    waited for until its read timeout."""
    www = tmp_path / "www"
    www.mkdir()
    for i in range(6):  # three shards of two: a worker starts with each, up to --procs
        (www / f"slow{i}.bin").write_bytes(os.urandom(2 << 20))  # a lane each, not a train
    with FaultServer(root=www) as srv:
        srv.persist("/slow*", Fault.hang(after_bytes=100_000) if stalled else Fault.trickle(65536))
        proc, workers, parents = _fetch_with_workers(srv, tmp_path / "d", "--timeout", "60")
        try:
            # the CLI starts single-threaded: the workers' parent is a copy of it
            assert [_cmdline(p) for p in parents] == [_cmdline(proc.pid)]
            deadline = time.monotonic() + 30
            asked = lambda: sum(srv.count(path=f"/slow{i}.bin") for i in range(6))  # noqa: E731
            while time.monotonic() < deadline and asked() < 2:
                time.sleep(0.05)
            assert asked() >= 2
            proc.kill()  # the coordinator only, as `kill -9 PID` would
            proc.wait(timeout=10)
            alive = _gone_within(workers | parents, 8)
            assert not alive, f"workers still running 8 s after their coordinator: {alive}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not list((tmp_path / "d").glob("slow*.bin"))  # no truncated file published


def test_a_run_whose_workers_parent_is_killed_is_not_a_clean_run(tmp_path: Path) -> None:
    """The files its workers were fetching end "interrupted", which a run that did not ask
    them to stop counts as failures: not exit 0 with nothing fetched."""
    www = tmp_path / "www"
    www.mkdir()
    for i in range(4):  # two shards of two, all four files in flight in the two workers
        (www / f"slow{i}.bin").write_bytes(os.urandom(2 << 20))  # a lane each, not a train
    with FaultServer(root=www) as srv:
        srv.persist("/slow*", Fault.trickle(64 * 1024))
        proc, workers, parents = _fetch_with_workers(srv, tmp_path / "d")
        try:
            (zygote,) = parents
            os.kill(zygote, signal.SIGKILL)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert not _gone_within(workers, 8)
    text = out.decode(errors="replace")
    assert proc.returncode in (1, 4), text
    assert "interrupted: its worker process stopped" in text or "died" in text, text
    assert not list((tmp_path / "d").glob("slow*.bin"))
    # the last status line counts as the summary does (it said "4/4 files, 0 failed")
    last = re.findall(r"status: (\d+)/\S+ files, .*?, (\d+) failed", text)[-1]
    failed = re.findall(r"^ *failed +(\d+) *$", text, re.M)[-1]
    assert last[1] == failed, text


def test_the_plain_summary_lists_what_the_table_would(tmp_path: Path) -> None:
    import io

    from fetcher.models import Counts, Summary
    from fetcher.report import one_line, render_plain

    s = Summary(url="http://m.test/pub/", dest="/srv/pub", started=10.0, finished=12.5)
    s.fetched = Counts(3, 3 << 20)
    s.failed = [(f"f{i}.bin", "HTTP 404 [x]") for i in range(23)]
    s.deleted = ["old.bin"]
    s.directories = 4
    s.fatal = "disk full"
    buf = io.StringIO()
    render_plain(s, buf, "pub")
    lines = buf.getvalue().splitlines()
    assert lines[0] == "pub: http://m.test/pub/ → /srv/pub"
    assert lines[1:6] == [
        "  fetched       3  3.0 MiB (1.2 MiB/s)",
        "  unchanged     0",
        "  deleted       1",
        "  failed       23",
        "  directories   4  2.5 s",
    ]
    assert "  deleted old.bin" in lines
    assert "  failed f0.bin: HTTP 404 [x]" in lines  # verbatim: no markup to read
    assert "  failed f20.bin: HTTP 404 [x]" not in lines  # 20 shown, then a count
    assert "  … and 3 more (see --report)" in lines
    assert lines[-1] == "stopped: disk full"
    assert one_line(s) == (
        "summary: 3 fetched (3.0 MiB), 0 unchanged, 23 failed, 1 deleted, 4 directories in 2.5 s"
        " (stopped)"
    )


def test_a_text_log_file_ends_with_the_summary_line(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    for i in range(3):
        (tmp_path / "www" / f"f{i}.bin").write_bytes(b"x" * (100 + i))
    log = tmp_path / "run.log"
    with FaultServer(root=tmp_path / "www") as srv:
        done = subprocess.run(
            [sys.executable, "-m", "fetcher", "--mirror", srv.url, "--dest", str(tmp_path / "d"),
             "--procs", "1", "-q", "--log-file", str(log)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    last = log.read_text().splitlines()[-1]
    assert re.fullmatch(
        r"\S+ \S+ summary: 3 fetched \(303 B\), 0 unchanged, 0 failed, 0 directories in [\d.]+ s",
        last,
    ), last
    assert re.search(r"^  fetched\s+3  303 B", done.stdout, re.M), done.stdout  # and the console


def test_a_text_cell_in_the_plain_summary_does_not_push_the_counts_apart() -> None:
    import io

    from fetcher.models import Counts, Summary
    from fetcher.report import render_plain

    s = Summary(url="http://m.test/", dest="/d", started=0.0, finished=0.25, directories=17)
    s.planned = {"skipped": Counts(310, 5)}
    s.post = {"probe skipped": 3, "thumbnails skipped": 3}
    buf = io.StringIO()
    render_plain(s, buf)
    assert buf.getvalue().splitlines()[1:] == [
        "  fetched           0  0 B (0 B/s)",
        "  unchanged       310",
        "  post-processed  probe skipped 3, thumbnails skipped 3",
        "  failed            0",
        "  directories      17  0.2 s",
    ]


def test_the_log_line_counts_post_processing_failed_and_not_tried() -> None:
    """A log's last line said nothing of ffmpeg work: not the outputs that failed, nor
    those not tried because they failed before."""
    from fetcher.models import Summary
    from fetcher.report import one_line

    s = Summary(url="http://m.test/", dest="/d", started=0.0, finished=0.5, directories=1)
    s.post_failed = [("a.mp4 (probe)", "moov atom not found")]
    s.post_failed_before = [("b.mp4 (transcode)", "timed out after 79 s"), ("c.mp4 (audio)", "…")]
    assert one_line(s) == (
        "summary: 0 fetched (0 B), 0 unchanged, 0 failed, 1 post-processing failed,"
        " 2 post-processing failed before (not tried), 1 directories in 0.5 s"
    )


@pytest.mark.parametrize("server", ["fault", pytest.param("nginx", marks=pytest.mark.real_server)])
def test_a_start_url_that_is_a_file_says_how_to_fetch_it(
    tmp_path: Path, server: str, run_fetch
) -> None:
    from tests.servers import serve

    www = tmp_path / "www"
    (www / "iso").mkdir(parents=True)
    (www / "iso" / "disc 1.iso").write_bytes(os.urandom(5000))
    (www / "iso" / "other.iso").write_bytes(b"x")
    served = FaultServer(root=www) if server == "fault" else serve("nginx", www, tmp_path / "nginx")
    with served as srv:
        r = run_fetch("--mirror", f"{srv.url}iso/disc%201.iso", "--dest", tmp_path / "d")
        assert r.code == 1, r
        hint = f"is a file, not a directory listing: to fetch it, mirror its directory with --mirror {srv.url}iso/ --include 'disc 1.iso'"
        assert hint in r.output, r.output
        missing = run_fetch("--mirror", f"{srv.url}iso/none", "--dest", tmp_path / "e")
        assert missing.code == 1 and "is a file" not in missing.output, missing
        # and the command it suggests does fetch it, alone
        again = run_fetch(
            "--mirror", f"{srv.url}iso/", "--include", "disc 1.iso", "--dest", tmp_path / "f"
        )
    assert again.code == 0, again
    assert [p.name for p in (tmp_path / "f").iterdir() if p.name != ".fetcher"] == ["disc 1.iso"]


def test_credentials_in_the_url_go_with_every_request_and_nowhere_else(
    tmp_path: Path, run_fetch
) -> None:
    www = tmp_path / "www"
    (www / "pub" / "sub").mkdir(parents=True)
    (www / "pub" / "a.txt").write_bytes(b"a")
    (www / "pub" / "sub" / "big.bin").write_bytes(os.urandom(3 << 20))  # not pipelined
    dest, report, log = tmp_path / "d", tmp_path / "r.json", tmp_path / "fetch.log"
    with FaultServer(root=www) as srv:
        url = srv.url.replace("http://", "http://mirror%40user:s3cr%3At@") + "pub/"
        r = run_fetch("--mirror", url, "--dest", dest, "--procs", "1", "--report", report,
                      "--log-file", log, "--metrics", tmp_path / "m.prom")  # fmt: skip
        requests = srv.requests
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[jobs.a]\nurl = "{url}"\ndest = "x"\n')
    check = run_fetch("--config", cfg, "--check")
    assert r.code == 0, r.output
    assert {q.path for q in requests} == {"/pub/", "/pub/sub/", "/pub/a.txt", "/pub/sub/big.bin"}
    basic = "Basic " + base64.b64encode(b"mirror@user:s3cr:t").decode()
    assert all(q.headers.get("authorization") == basic for q in requests), requests
    assert (dest / "sub" / "big.bin").stat().st_size == 3 << 20
    assert check.code == 0 and "user and password from the URL (not shown)" in check.output
    shown = [
        r.output,
        check.output,
        report.read_text(),
        log.read_text(),
        (tmp_path / "m.prom").read_text(),
    ]
    shown.append((dest / ".fetcher" / "state.sqlite").read_bytes().decode("latin-1"))
    assert all("s3cr" not in text and "mirror%40user" not in text for text in shown)
    assert f"{srv.url}pub/ → {dest}" in r.output  # the URL, without them


@pytest.mark.parametrize("given", ["url-user", "header"])
def test_credentials_do_not_follow_a_redirect_to_an_alias(
    tmp_path: Path, run_fetch, given: str
) -> None:
    """An alias (``--alias``) is another origin, maybe anyone's server in a mirror network,
    maybe plain http: the mirror's credentials (from the URL, ~/.netrc or an Authorization
    ``--header``) went there with every redirected file, and with each range of a
    segmented one. Other headers still go, as curl has it."""
    small, big = b"s" * 100, os.urandom(17 << 20)  # big: in ranges (--segments 2)
    with FaultServer() as srv, FaultServer() as other:
        for name, data in (("small.bin", small), ("big.bin", big)):
            srv.add_file(f"/pub/{name}", data)
            srv.persist(f"/pub/{name}", Fault.redirect(f"http://127.0.0.1:{other.port}/m/{name}"))
            other.add_file(f"/m/{name}", data)
        srv.add_file("/pub/here.txt", b"here")
        if given == "url-user":
            url, extra = srv.url.replace("http://", "http://user:s3cr3t@") + "pub/", []
            sent = "Basic " + base64.b64encode(b"user:s3cr3t").decode()
        else:
            url, extra = srv.url + "pub/", ["--header", "Authorization: Bearer t0k3n"]
            sent = "Bearer t0k3n"
        dest = tmp_path / "d"
        r = run_fetch("--mirror", url, "--dest", dest, "--procs", "1", "--segments", "2",
                      "--alias", f"127.0.0.1:{other.port}", "--header", "X-Team: mirrors",
                      *extra)  # fmt: skip
        mine, theirs = srv.requests, other.requests
    assert r.code == 0, r.output
    assert (dest / "small.bin").read_bytes() == small and (dest / "big.bin").read_bytes() == big
    assert all(q.headers.get("authorization") == sent for q in mine), mine
    assert len(theirs) >= 3 and {q.path for q in theirs} == {"/m/small.bin", "/m/big.bin"}
    assert [q.headers.get("authorization") for q in theirs] == [None] * len(theirs), theirs
    assert all(q.headers.get("x-team") == "mirrors" for q in theirs), theirs


@pytest.mark.parametrize("proxied", [False, True], ids=["direct", "via-proxy"])
def test_headers_and_user_agent_go_with_every_request(
    tmp_path: Path, run_fetch, proxied: bool
) -> None:
    from tests.proxyserver import ForwardProxy

    www = tmp_path / "www"
    (www / "sub").mkdir(parents=True)
    for i in range(20):  # pipelined (direct)
        (www / f"s{i}.txt").write_bytes(b"s" * i)
    (www / "sub" / "big.bin").write_bytes(os.urandom(3 << 20))
    with FaultServer(root=www) as srv, ForwardProxy({"127.0.0.1": srv.port}) as px:
        extra = ["--proxy", px.url] if proxied else []
        r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "d", "--procs", "2",
                      "--header", "X-Api-Token: t0k3n", "--header", "Accept-Language:  en",
                      "--user-agent", "mirror-bot/2 (ops@example.org)", *extra)  # fmt: skip
        requests = srv.requests
    assert r.code == 0, r.output
    assert len(requests) == 23 and (len(px.seen) == 23) is proxied
    for q in requests:
        assert q.headers.get("x-api-token") == "t0k3n", q
        assert q.headers.get("accept-language") == "en", q
        assert q.headers.get("user-agent") == "mirror-bot/2 (ops@example.org)", q
    assert (tmp_path / "d" / "sub" / "big.bin").stat().st_size == 3 << 20
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[jobs.a]\nurl = "{srv.url}"\nheaders = {{X-Api-Token = "t0k3n"}}\n')
    check = run_fetch("--config", cfg, "--check")
    assert check.code == 0 and "X-Api-Token: (not shown)" in check.output, check.output
    assert "t0k3n" not in check.output


def test_a_netrc_entry_authenticates_the_mirror_s_host(
    tmp_path: Path, run_fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    www = tmp_path / "www"
    (www / "sub").mkdir(parents=True)
    (www / "sub" / "a.txt").write_bytes(b"a")
    netrc = tmp_path / "netrc"
    netrc.write_text(
        "machine elsewhere.example login x password y\nmachine 127.0.0.1 login mirror password n3trc\n"
    )
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    with FaultServer(root=www) as srv:
        r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "d", "--procs", "1")
        requests = srv.requests
        netrc.write_text("mach 127.0.0.1 login x\n")  # broken: a clear error, nothing done
        bad = run_fetch("--mirror", srv.url, "--dest", tmp_path / "e")
    assert r.code == 0, r.output
    basic = "Basic " + base64.b64encode(b"mirror:n3trc").decode()
    assert len(requests) == 3 and all(q.headers.get("authorization") == basic for q in requests)
    assert "n3trc" not in r.output
    assert bad.code == 2 and f"{netrc}:" in bad.output and "Traceback" not in bad.output, bad.output
    assert not (tmp_path / "e").exists()


def test_a_netrc_that_is_not_text_is_a_usage_error(
    tmp_path: Path, run_fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_bytes(b"machine 127.0.0.1 login mirror password p\xe4ss\n")  # Latin-1
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))  # (read as UTF-8, then the locale's: UTF-8 here)
    r = run_fetch("--mirror", "http://127.0.0.1:9/", "--dest", tmp_path / "d")
    assert r.code == 2, r
    assert f"fetch: error: {netrc}: not UTF-8 text" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "d").exists()


def test_a_401_says_how_to_give_credentials(tmp_path: Path, run_fetch) -> None:
    www = tmp_path / "www"
    (www / "pub" / "locked").mkdir(parents=True)
    (www / "pub" / "a.txt").write_bytes(b"a")
    (www / "pub" / "b.txt").write_bytes(b"b")
    with FaultServer(root=www) as srv:
        srv.persist("/pub/locked/", Fault.status(401))
        srv.persist("/pub/b.txt", Fault.status(401))
        r = run_fetch("--mirror", f"{srv.url}pub/", "--dest", tmp_path / "d", "--procs", "1")
        asked = [q.path for q in srv.requests]
    assert r.code == 1, r.output
    why = "credentials needed, or refused (user:password@ in the URL, or a ~/.netrc entry)"
    assert f"HTTP 401 for {srv.url}pub/locked/: {why}" in r.output
    assert f"HTTP 401 for {srv.url}pub/b.txt: {why}" in r.output
    assert asked.count("/pub/b.txt") == 1 and asked.count("/pub/locked/") == 1  # not retried
    assert (tmp_path / "d" / "a.txt").read_bytes() == b"a"


def test_names_paths_and_globs_that_look_like_markup_are_shown_as_given(
    tmp_path: Path, run_fetch
) -> None:
    """Brackets in a job's name, URL, DEST, globs or a failed file's name are the user's
    (or the server's) text: shown as they are, never read as rich markup (a DEST of
    'mirror[/archive]' crashed the summary before the report was written, '[a-z]*.rpm'
    was shown as '*.rpm' by --check, a file named '[/x]' that failed crashed the live
    display)."""
    import io

    from rich.console import Console

    from fetcher.live import RichReporter
    from fetcher.models import Outcome, Status, Summary
    from fetcher.report import render

    cfg = tmp_path / "m.toml"
    cfg.write_text(
        '[jobs."x[/]"]\nurl = "http://127.0.0.1:9/pub/"\ndest = "[red]d"\n'
        'include = ["[a-z]*.rpm", "*.[ch]"]\n'
    )
    r = run_fetch("--config", cfg, "--check")
    assert r.code == 0, r.output
    assert "x[/]: http://127.0.0.1:9/pub/ → " in r.output and "[red]d" in r.output, r.output
    assert "include = ('[a-z]*.rpm', '*.[ch]')" in r.output, r.output

    buf = io.StringIO()
    term = Console(file=buf, force_terminal=True, width=200, color_system=None)
    s = Summary(url="http://m.test/[b]pub/", dest="/srv/mirror[/archive]", started=1, finished=2)
    render(s, term, "[bold]job")
    shown = " ".join(buf.getvalue().split())  # (the title wraps at the table's width)
    assert "[bold]job: http://m.test/[b]pub/ → /srv/mirror[/archive]" in shown, shown

    rep = RichReporter(Console(file=(out := io.StringIO()), force_terminal=True, width=200))
    rep.finished(Outcome("a/[/x]", "http://m.test/a/%5B/x%5D", Status.FAILED, error="[/]bad"))
    rep.close()
    assert "a/[/x]: [/]bad" in out.getvalue()


def test_a_report_of_a_dest_whose_name_is_not_utf8(tmp_path: Path) -> None:
    import json

    from fetcher.models import Summary
    from fetcher.report import write_report

    dest = os.fsdecode(os.fsencode(str(tmp_path)) + b"/od\xff")  # as argv gives it
    report = tmp_path / "r.json"
    write_report(report, [(None, Summary(url="http://m.test/", dest=dest, started=1, finished=2))])
    assert json.loads(report.read_text("utf-8"))["jobs"][0]["dest"] == dest


def test_a_run_into_a_dest_that_looks_like_markup_or_is_not_utf8_ends_with_its_report(
    tmp_path: Path,
) -> None:
    """Against a server: the terminal's summary title is DEST as given (it crashed after
    the run, before the report), and a DEST whose name is not UTF-8 gets its report."""
    import io
    import json

    from rich.console import Console

    from fetcher.cli import main

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.txt").write_bytes(b"a")
    raw = os.fsdecode(os.fsencode(str(tmp_path)) + b"/od\xff")
    with FaultServer(root=tmp_path / "www") as srv:
        for dest in (str(tmp_path / "mirror[/archive]"), raw):
            buf = io.StringIO()
            term = Console(file=buf, force_terminal=True, width=300, color_system=None)
            report = tmp_path / "r.json"
            code = main(["--mirror", srv.url, "--dest", dest, "--report", str(report)], term)
            assert code == 0, buf.getvalue()
            assert json.loads(report.read_text("utf-8"))["jobs"][0]["dest"] == dest
            if "[" in dest:
                # (the title wraps at the table's width, inside the path too)
                assert f"→{dest}" in "".join(buf.getvalue().split()), buf.getvalue()
            assert (Path(dest) / "a.txt").read_bytes() == b"a"
