"""Config-driven, unattended runs: jobs from TOML, reports, metrics, logs, politeness limits."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faultserver import Fault, FaultServer

REPO = Path(__file__).resolve().parent.parent


def _tree(root: Path, n: int = 5, size: int = 1000) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"f{i}.bin").write_bytes(os.urandom(size))


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_validate(config: Path, run_fetch) -> None:
    r = run_fetch("--config", config, "--check")
    assert r.code == 0, r
    assert "job(s) valid" in r.output


def test_two_jobs_one_fails(tmp_path: Path, run_fetch) -> None:
    _tree(tmp_path / "www" / "good")
    cfg = tmp_path / "m.toml"
    with FaultServer(root=tmp_path / "www") as srv:
        cfg.write_text(
            f"[defaults]\nprocs = 1\nretries = 1\n"
            f'[jobs.broken]\nurl = "{srv.url}missing/"\ndest = "out/broken"\n'
            f'[jobs.good]\nurl = "{srv.url}good/"\ndest = "out/good"\n'
        )
        report, metrics = tmp_path / "r.json", tmp_path / "m.prom"
        r = run_fetch("--config", cfg, "--report", report, "--metrics", metrics)
    assert r.code == 1, r
    assert sorted(p.name for p in (tmp_path / "out" / "good").iterdir()) == [".fetcher"] + [
        f"f{i}.bin" for i in range(5)
    ]
    doc = json.loads(report.read_text())
    jobs = {j["job"]: j for j in doc["jobs"]}
    assert doc["exit_code"] == 1
    assert jobs["good"]["exit_code"] == 0 and jobs["good"]["fetched"]["files"] == 5
    assert (
        jobs["broken"]["exit_code"] == 1 and "404" in jobs["broken"]["listing_errors"][0]["error"]
    )

    parser = pytest.importorskip("prometheus_client.parser")
    samples = {
        (s.name, s.labels["mirror"]): s.value
        for fam in parser.text_string_to_metric_families(metrics.read_text())
        for s in fam.samples
    }
    assert samples[("fetch_exit_code", "good")] == 0
    assert samples[("fetch_exit_code", "broken")] == 1
    assert samples[("fetch_files_fetched", "good")] == 5
    assert ("fetch_last_success_timestamp_seconds", "good") in samples
    assert ("fetch_last_success_timestamp_seconds", "broken") not in samples


def test_metrics_of_one_job_keep_the_other_jobs_series(tmp_path: Path, run_fetch) -> None:
    """A timer per job (--job), one metrics file: each run rewrites its job's series and
    keeps the others'; the other jobs' series went with each run. A run of the whole
    config writes its jobs only (a job gone from it goes from the file)."""
    _tree(tmp_path / "www" / "a")
    _tree(tmp_path / "www" / "b")
    cfg, metrics = tmp_path / "m.toml", tmp_path / "m.prom"
    with FaultServer(root=tmp_path / "www") as srv:
        cfg.write_text(
            f'[jobs.a]\nurl = "{srv.url}a/"\n[jobs.b]\nurl = "{srv.url}b/"\n'
            f'[jobs.c]\nurl = "{srv.url}c/"\n'
        )
        for job in ("a", "b"):
            r = run_fetch("--config", cfg, "--job", job, "--procs", "1", "--metrics", metrics)
            assert r.code == 0, r
        text = metrics.read_text()
        assert 'fetch_exit_code{mirror="a"} 0' in text and 'fetch_exit_code{mirror="b"} 0' in text
        assert text.count("# TYPE fetch_exit_code gauge") == 1, text
        cfg.write_text(f'[jobs.b]\nurl = "{srv.url}b/"\n')
        assert run_fetch("--config", cfg, "--procs", "1", "--metrics", metrics).code == 0
    text = metrics.read_text()
    assert 'mirror="a"' not in text and 'fetch_exit_code{mirror="b"} 0' in text, text


def test_metrics_label_jobs_mirror_and_read_the_old_job_label(tmp_path: Path, run_fetch) -> None:
    """Prometheus gives every scraped series the ``job`` of its scrape (node_exporter's):
    a ``job`` label in the textfile came out as ``exported_job``, and an alert written
    against ``job="a"`` matched nothing. A file of the old label keeps its job's last
    success across the first failing run of the new one."""
    cfg, metrics = tmp_path / "m.toml", tmp_path / "m.prom"
    metrics.write_text(
        "# TYPE fetch_last_success_timestamp_seconds gauge\n"
        'fetch_last_success_timestamp_seconds{job="a"} 1700000000\n'
        'fetch_exit_code{job="a"} 0\n'
    )
    with FaultServer(root=tmp_path / "www") as srv:
        cfg.write_text(f'[jobs.a]\nurl = "{srv.url}missing/"\nretries = 1\n')
        r = run_fetch("--config", cfg, "--procs", "1", "--metrics", metrics)
    assert r.code == 1, r
    parser = pytest.importorskip("prometheus_client.parser")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in parser.text_string_to_metric_families(metrics.read_text())
        for s in fam.samples
    }
    assert samples[("fetch_exit_code", (("mirror", "a"),))] == 1
    assert samples[("fetch_last_success_timestamp_seconds", (("mirror", "a"),))] == 1700000000
    assert all(labels == (("mirror", "a"),) for _, labels in samples), samples


def test_a_dry_run_leaves_the_metrics_of_the_last_real_run(tmp_path: Path, run_fetch) -> None:
    """A --dry-run with --metrics wrote its job's series as if it had synced: a new last
    success time (exit 0), 0 files fetched, all unchanged; an alert on the last success
    was silenced by a plan (seen running the CLI by hand). Its series are now kept as
    the last real run left them, and its report says it was a dry run."""
    _tree(tmp_path / "www" / "a")
    metrics, report = tmp_path / "m.prom", tmp_path / "r.json"
    with FaultServer(root=tmp_path / "www") as srv:
        argv = ["--mirror", srv.url + "a/", "--dest", tmp_path / "o", "--procs", "1",
                "--metrics", metrics]  # fmt: skip
        assert run_fetch(*argv).code == 0
        before = metrics.read_text()
        (tmp_path / "www" / "a" / "new.bin").write_bytes(b"n" * 10)
        r = run_fetch(*argv, "--dry-run", "--report", report)
    assert r.code == 0, r
    assert metrics.read_text() == before
    assert 'fetch_files_fetched{mirror="' + srv.url + 'a/"} 5' in before, before
    assert json.loads(report.read_text())["jobs"][0]["dry_run"] is True
    assert not (tmp_path / "o" / "new.bin").exists()


def test_metrics_count_listing_errors(tmp_path: Path, run_fetch) -> None:
    """A run whose crawl could not read a listing exits 1 with every file it saw fetched:
    the metrics said fetch_files_failed 0 and nothing else of it (found by the scheduled
    sync review). fetch_listing_errors counts them."""
    _tree(tmp_path / "www" / "a")
    _tree(tmp_path / "www" / "a" / "sub")
    metrics = tmp_path / "m.prom"
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/a/sub/", Fault.status(500))
        argv = ["--mirror", srv.url + "a/", "--dest", tmp_path / "o", "--procs", "1",
                "--retries", "1", "--metrics", metrics]  # fmt: skip
        assert run_fetch(*argv).code == 1
        text = metrics.read_text()
        assert 'fetch_listing_errors{mirror="' + srv.url + 'a/"} 1' in text, text
        assert 'fetch_files_failed{mirror="' + srv.url + 'a/"} 0' in text, text
        srv.clear_faults()
        assert run_fetch(*argv).code == 0
    assert 'fetch_listing_errors{mirror="' + srv.url + 'a/"} 0' in metrics.read_text()


def test_job_selection(tmp_path: Path, run_fetch) -> None:
    _tree(tmp_path / "www" / "a")
    _tree(tmp_path / "www" / "b")
    cfg = tmp_path / "m.toml"
    with FaultServer(root=tmp_path / "www") as srv:
        cfg.write_text(f'[jobs.a]\nurl = "{srv.url}a/"\n[jobs.b]\nurl = "{srv.url}b/"\n')
        r = run_fetch("--config", cfg, "--job", "b", "--procs", "1")
        assert r.code == 0, r
        assert not (tmp_path / "a").exists() and (tmp_path / "b" / "f0.bin").exists()
        assert not any(q.path.startswith("/a/") for q in srv.requests)
        assert run_fetch("--config", cfg, "--job", "nope").code == 2


def test_command_line_paths_are_the_current_directory_s_and_go_to_the_jobs_run(
    tmp_path: Path, run_fetch, monkeypatch: pytest.MonkeyPatch, tls
) -> None:
    """--dest, --ca-cert, --post-dest given with --config are the current directory's (the
    file's own paths its directory's); --dest goes to the --job jobs only, and is still
    refused where it would be another job's."""
    etc, cwd = tmp_path / "etc", tmp_path / "work"
    etc.mkdir()
    cwd.mkdir()
    (cwd / "ca.pem").write_bytes(tls.ca_pem.read_bytes())
    cfg = etc / "m.toml"
    cfg.write_text(
        "[jobs.a]\nurl = 'https://127.0.0.1:9/a/'\n[[jobs.a.post]]\naction = 'probe'\n"
        "[jobs.b]\nurl = 'https://127.0.0.1:9/b/'\n"
    )
    monkeypatch.chdir(cwd)
    r = run_fetch("--config", cfg, "--job", "a", "--dest", "here", "--ca-cert", "ca.pem",
                  "--post-dest", "clips", "--check")  # fmt: skip
    assert r.code == 0, r
    assert f"a: https://127.0.0.1:9/a/ → {cwd / 'here'}" in r.output
    assert f"ca_cert = {cwd / 'ca.pem'}" in r.output and f"post_dest = {cwd / 'clips'}" in r.output
    assert "b: " not in r.output and "1 job(s) valid" in r.output
    both = run_fetch("--config", cfg, "--dest", "here", "--check")
    assert both.code == 2, both
    assert f"m.toml: jobs.b: dest {cwd / 'here'} is jobs.a's too" in both.output
    assert "hint: --dest goes to every job run: pick one with --job" in both.output
    theirs = run_fetch("--config", cfg, "--job", "a", "--dest", etc / "b", "--check")
    assert theirs.code == 2, theirs
    assert f"m.toml: jobs.b: dest {etc / 'b'} is jobs.a's too" in theirs.output
    assert "hint: --dest overlaps jobs.b's dest: give a directory of its own" in theirs.output


BAD_CONFIGS = [
    (
        '[jobs.c]\nurl = "http://127.0.0.1:9/"\nthreads = "eight"\n',
        'm.toml: jobs.c.threads: expected an integer from 1 to 1024, got "eight"',
    ),
    (
        '[jobs.c]\nurl = "http://127.0.0.1:9/"\nprocs = 0\n',
        "m.toml: jobs.c.procs: expected an integer from 1 to 1024, got 0",
    ),
    ('[jobs.c]\nurl = "http://127.0.0.1:9/"\nthreds = 2\n', "m.toml: jobs.c.threds: unknown key"),
    ('[jobs.c]\nurl = "gopher://x/"\n', "m.toml: jobs.c.url: expected an http:// or https:// URL"),
    (
        '[jobs.c]\nurl = "http://127.0.0.1:9/"\nlimit_rate = "lots"\n',
        "m.toml: jobs.c.limit_rate: expected a rate",
    ),
    (
        '[jobs.c]\nurl = "http://127.0.0.1:9/"\ntimeout = 1e300\n',
        "m.toml: jobs.c.timeout: expected a number from 0.001 to 86400, got 1e+300",
    ),
    (
        '[defaults]\nlimit_rate = 0.001\n[jobs.c]\nurl = "http://127.0.0.1:9/"\n',
        "m.toml: defaults.limit_rate: expected a rate like 500k, 10M or a number of bytes per second, from 1 to 1024G, got 0.001",
    ),
    (
        '[jobs.c]\nurl = "http://127.0.0.1:9/"\n[[jobs.c.post]]\naction = "explode"\n',
        "jobs.c.post[0].action",
    ),
    (
        '[jobs.c]\nurl = "http://127.0.0.1:9/"\n[[jobs.c.post]]\naction = "transcode"\nheight = "tall"\n',
        "jobs.c.post[0].height",
    ),
    (
        '[defaults]\npost = 3\n[jobs.c]\nurl = "http://127.0.0.1:9/"\n[[jobs.c.post]]\naction = "probe"\n',
        "m.toml: defaults.post: expected an array of tables ([[defaults.post]])",
    ),
    (
        '[defaults]\npost = 3\n[jobs.c]\nurl = "http://127.0.0.1:9/"\n',
        "m.toml: defaults.post: expected an array of tables ([[defaults.post]])",
    ),
    (
        '[[defaults.post]]\naction = "probe"\n[jobs.c]\nurl = "http://127.0.0.1:9/"\npost = "thumbnails"\n',
        "m.toml: jobs.c.post: expected an array of tables ([[jobs.c.post]])",
    ),
    ("[jobs.c]\nurl = \n", "m.toml: not valid TOML"),
    ("[defaults]\nprocs = 2\n", "m.toml: no [jobs.NAME] table"),
    ('[jobs.c]\ndest = "x"\n', "m.toml: jobs.c: missing required key 'url'"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_config_exit_2_names_the_key(
    tmp_path: Path, text: str, message: str, run_fetch
) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(text)
    r = run_fetch("--config", cfg)
    assert r.code == 2, r
    assert message in r.output
    assert "Traceback" not in r.output
    assert "Traceback" not in r.output


def test_missing_config_file(tmp_path: Path, run_fetch) -> None:
    r = run_fetch("--config", tmp_path / "nope.toml")
    assert r.code == 2 and "no such config file" in r.output


def test_piped_output_has_no_ansi_and_json_lines_parse(tmp_path: Path) -> None:
    _tree(tmp_path / "www" / "d", n=20)
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/d/f3.bin", Fault.status(404))
        srv.persist("/d/f4.bin", Fault.status(404))
        env = {**os.environ, "TERM": "xterm-256color", "FORCE_COLOR": "", "COLUMNS": "80"}
        env.pop("FORCE_COLOR")
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "fetcher",
                "--mirror",
                srv.url + "d/",
                "--dest",
                str(tmp_path / "o"),
                "--procs",
                "1",
                "--retries",
                "1",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert p.returncode == 1, p.stderr
        out = p.stdout + p.stderr
        assert "\x1b[" not in out
        assert "failed: f3.bin" in out and "f4.bin" in out
        # the closing summary: plain aligned lines, no box drawing
        assert re.search(r"^  fetched\s+18\s+\d", p.stdout, re.M), p.stdout
        assert re.search(r"^  failed\s+2$", p.stdout, re.M), p.stdout
        assert not set("│┃━─┏└") & set(p.stdout), p.stdout
        for line in p.stdout.splitlines():
            assert len(line) < 400
        log = tmp_path / "run.log"
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "fetcher",
                "--mirror",
                srv.url + "d/",
                "--dest",
                str(tmp_path / "o2"),
                "--procs",
                "1",
                "--retries",
                "1",
                "--log-format",
                "json",
                "--log-file",
                str(log),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert p.returncode == 1
        assert re.search(r"^  fetched\s+18\s", p.stdout, re.M), p.stdout  # stdout: the summary
        # JSON lines on stdout: every line parses, the summary is their last event
        p = subprocess.run(
            [sys.executable, "-m", "fetcher", "--mirror", srv.url + "d/", "--dest",
             str(tmp_path / "o3"), "--procs", "1", "--retries", "1", "--log-format", "json"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert p.returncode == 1, p.stderr
    stdout = [json.loads(line) for line in p.stdout.splitlines()]
    assert stdout[-1]["event"] == "summary", stdout[-1]
    assert stdout[-1]["fetched"]["files"] == 18 and stdout[-1]["exit_code"] == 1
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"status", "failed"} <= {r["event"] for r in records}
    assert sorted(r["path"] for r in records if r["event"] == "failed") == ["f3.bin", "f4.bin"]
    assert records[-1]["event"] == "summary"
    assert sorted(f["path"] for f in records[-1]["failed"]) == ["f3.bin", "f4.bin"]


def test_limit_rate_shared_by_processes(tmp_path: Path, run_fetch) -> None:
    rate = 2 << 20  # 2 MiB/s in all, over 2 processes
    size = 1 << 20
    _tree(tmp_path / "www" / "r", n=10, size=size)  # 10 MiB → about 5 s
    with FaultServer(root=tmp_path / "www") as srv:
        t0 = time.monotonic()
        r = run_fetch(
            "--mirror",
            srv.url + "r/",
            "--dest",
            tmp_path / "o",
            "--procs",
            "2",
            "--threads",
            "2",
            "--limit-rate",
            str(rate),
        )
        end = time.monotonic()
        wall = end - t0
        assert r.code == 0, r
        firsts = [q.started for q in srv.requests if q.is_file]
    # from the first file request the server saw to the end of the run: socket buffers
    # hide the client's pace from the server's own "finished" times
    transfer = end - min(firsts)
    achieved = 10 * size / transfer
    assert 0.85 * rate <= achieved <= 1.15 * rate, (
        f"{achieved / rate:.2f} of the limit in {transfer:.2f} s (wall {wall:.1f} s)"
    )


def test_connection_cap_holds_across_processes(tmp_path: Path, run_fetch) -> None:
    _tree(tmp_path / "www" / "c", n=60, size=20_000)
    for d in range(4):
        _tree(tmp_path / "www" / "c" / f"sub{d}", n=10, size=5_000)
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/c/*", Fault.delay(0.02))
        r = run_fetch(
            "--mirror",
            srv.url + "c/",
            "--dest",
            tmp_path / "o",
            "--procs",
            "3",
            "--threads",
            "8",
            "--max-connections",
            "5",
        )
        assert r.code == 0, r
        assert 2 <= srv.max_concurrent_requests <= 5, srv.max_concurrent_requests
        # A socket the client has closed to hand its token on is seen closed by the
        # server a moment later, so the server may count one extra at that instant.
        assert srv.max_concurrent_connections <= 6, srv.max_concurrent_connections
        assert len([q for q in srv.requests if q.is_file]) == 100


def test_a_stop_while_the_run_starts_is_reported(tmp_path: Path, run_fetch) -> None:
    """SIGTERM while the run waits for its state file (another process holds it): exit
    130, and the report and metrics say the run was interrupted (the stop escaped the
    run, outside the part that counts, and neither was written)."""
    import signal
    import sqlite3

    from tests.background import fetch_session

    _tree(tmp_path / "www" / "s", n=2)
    dest = tmp_path / "o"
    report, metrics = tmp_path / "r.json", tmp_path / "m.prom"
    with FaultServer(root=tmp_path / "www") as srv:
        url = srv.url + "s/"
        assert run_fetch("--mirror", url, "--dest", dest).code == 0
        state = dest / ".fetcher" / "state.sqlite"
        db = sqlite3.connect(state, isolation_level=None)
        try:
            db.execute("BEGIN EXCLUSIVE")
            argv = ["--mirror", url, "--dest", str(dest), "--report", str(report),
                    "--metrics", str(metrics)]  # fmt: skip
            with fetch_session(argv) as proc:
                fds = Path(f"/proc/{proc.pid}/fd")
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # until the run has the state file open
                    with contextlib.suppress(OSError):
                        if any(os.readlink(fd) == str(state) for fd in fds.iterdir()):
                            break
                    time.sleep(0.01)
                else:
                    pytest.fail("the run never opened its state file")
                os.kill(proc.pid, signal.SIGTERM)
                out, _ = proc.communicate(timeout=60)
        finally:
            db.close()
    assert proc.returncode == 130, out.decode(errors="replace")
    job = json.loads(report.read_text())["jobs"][0]
    assert job["interrupted"] is True and job["exit_code"] == 130, job
    assert 'fetch_exit_code{mirror="' in metrics.read_text()
    assert b"Traceback" not in out


def test_a_stop_keeps_the_metrics_of_the_jobs_it_kept_from_starting(tmp_path: Path) -> None:
    """SIGTERM (a systemctl stop) during the second of three jobs: the third never ran,
    and the metrics file lost its series, its last success time with them, so an alert
    on that went silent instead of firing later (seen stopping a config run by hand).
    The jobs that did not start keep their series."""
    import signal
    import threading

    from tests.background import fetch_session

    jobs = ("a", "slow", "b")
    for d in jobs:
        _tree(tmp_path / "www" / d, n=2)
    cfg, metrics = tmp_path / "m.toml", tmp_path / "m.prom"
    with FaultServer(root=tmp_path / "www") as srv:
        cfg.write_text(
            "[defaults]\nprocs = 1\n"
            + "".join(f'[jobs.{d}]\nurl = "{srv.url}{d}/"\ndest = "o/{d}"\n' for d in jobs)
        )
        argv = ["--config", str(cfg), "-q", "--metrics", str(metrics)]
        first = subprocess.run(
            [sys.executable, "-m", "fetcher", *argv], capture_output=True, timeout=120
        )
        assert first.returncode == 0, first
        before = metrics.read_text()
        assert 'fetch_last_success_timestamp_seconds{mirror="b"}' in before, before
        gate = threading.Event()
        srv.persist("/slow/", Fault.gated(gate))
        srv.reset_stats()
        try:
            with fetch_session(argv) as proc:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not srv.count(path="/slow/"):
                    time.sleep(0.02)
                assert srv.count(path="/slow/"), "the second job never asked for its listing"
                os.kill(proc.pid, signal.SIGTERM)
                gate.set()
                out, _ = proc.communicate(timeout=60)
        finally:
            gate.set()
    assert proc.returncode == 130, out.decode(errors="replace")
    text = metrics.read_text()
    assert 'fetch_exit_code{mirror="slow"} 130' in text, text
    kept = [line for line in before.splitlines() if 'mirror="b"' in line]
    assert kept and all(line in text.splitlines() for line in kept), text


def test_lock_held_skip_if_locked(tmp_path: Path, run_fetch) -> None:
    import fcntl

    _tree(tmp_path / "www" / "l", n=1)
    dest = tmp_path / "o"
    metrics, report, log = tmp_path / "m.prom", tmp_path / "r.json", tmp_path / "l.log"
    with FaultServer(root=tmp_path / "www") as srv:
        assert run_fetch("--mirror", srv.url + "l/", "--dest", dest, "--metrics", metrics).code == 0
        before = metrics.read_text()
        srv.reset_stats()
        with open(dest / ".fetcher" / "lock", "w") as fh:
            fh.write("pid 4242, started 2026-01-01 00:00:00\n")
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_EX)
            r = run_fetch("--mirror", srv.url + "l/", "--dest", dest, "--log-file", log)
            assert r.code == 3 and "pid 4242" in r.output, r
            # the log says why the run ended, not that it was crawling (it never started)
            logged = log.read_text()
            assert "status:" not in logged and "error: " in logged and "pid 4242" in logged, logged
            r = run_fetch("--mirror", srv.url + "l/", "--dest", dest, "--skip-if-locked",
                          "--metrics", metrics, "--report", report)  # fmt: skip
            assert r.code == 0 and "skipped" in r.output, r
        assert srv.count() == 0
    # a skipped run did nothing: the job's metrics stay as the last real run left them (the
    # last success time was "now", keeping a hung run's alert quiet), and the report says so
    assert metrics.read_text() == before
    assert json.loads(report.read_text())["jobs"][0]["skipped_run"] is True


def test_a_job_whose_files_failed_outranks_a_locked_one(tmp_path: Path, run_fetch) -> None:
    """One job's DEST is held by another run (3), another job's file fails (1): the run
    exits 1. It exited 3, which a timer that takes 3 as success (the shipped unit's
    SuccessExitStatus=3) reported as a good run."""
    import fcntl

    _tree(tmp_path / "www" / "a", n=1)
    _tree(tmp_path / "www" / "b", n=2)
    cfg = tmp_path / "m.toml"
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/b/f1.bin", Fault.status(404))
        cfg.write_text(
            f'[jobs.a]\nurl = "{srv.url}a/"\ndest = "{tmp_path / "da"}"\n'
            f'[jobs.b]\nurl = "{srv.url}b/"\ndest = "{tmp_path / "db"}"\n'
        )
        assert run_fetch("--config", cfg, "--job", "a").code == 0
        with open(tmp_path / "da" / ".fetcher" / "lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            r = run_fetch("--config", cfg)
    assert r.code == 1, r
    assert "f1.bin" in r.output and "lock" in r.output, r


def test_a_skipped_run_reports_dest_as_a_real_run_does(
    tmp_path: Path, run_fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DEST given relative: the report of a run --skip-if-locked skipped names it as the
    real run's report does, absolute (it said "o", which a reader elsewhere cannot place)."""
    import fcntl

    _tree(tmp_path / "www" / "l", n=1)
    monkeypatch.chdir(tmp_path)
    first, skipped = tmp_path / "r1.json", tmp_path / "r2.json"
    with FaultServer(root=tmp_path / "www") as srv:
        assert run_fetch("--mirror", srv.url + "l/", "--dest", "o", "--report", first).code == 0
        with open(tmp_path / "o" / ".fetcher" / "lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            r = run_fetch("--mirror", srv.url + "l/", "--dest", "o", "--skip-if-locked",
                          "--report", skipped)  # fmt: skip
            assert r.code == 0, r
    real, held = (json.loads(p.read_text())["jobs"][0] for p in (first, skipped))
    assert held["skipped_run"] is True
    assert held["dest"] == real["dest"] == str(tmp_path / "o")


def test_json_lines_on_stdout_are_only_json_with_q_and_when_skipped(
    tmp_path: Path, run_fetch
) -> None:
    """--log-format json without --log-file: every line printed is a JSON event, the
    summary last; -q leaves out the status lines, not the summary's format, and a run
    skipped by --skip-if-locked says so in its event, not in a line of text beside it."""
    import fcntl

    _tree(tmp_path / "www" / "l", n=3)
    dest = tmp_path / "o"

    def events(output: str) -> list[dict]:
        return [json.loads(line) for line in output.splitlines() if line.strip()]

    with FaultServer(root=tmp_path / "www") as srv:
        r = run_fetch("--mirror", srv.url + "l/", "--dest", dest, "-q", "--log-format", "json")
        assert r.code == 0, r
        got = events(r.output)
        assert [e["event"] for e in got] == ["summary"], got
        assert got[-1]["fetched"]["files"] == 3 and got[-1]["exit_code"] == 0
        with open(dest / ".fetcher" / "lock", "w") as fh:
            fh.write("pid 4242, started 2026-01-01 00:00:00\n")
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_EX)
            for quiet in ((), ("-q",)):
                r = run_fetch("--mirror", srv.url + "l/", "--dest", dest, "--skip-if-locked",
                              "--log-format", "json", *quiet)  # fmt: skip
                assert r.code == 0, r
                got = events(r.output)
                assert got[-1]["event"] == "summary" and got[-1]["skipped_run"] is True, got
                assert "pid 4242" in got[-1]["notices"][-1]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_log_line_of_a_config_run_names_its_job(tmp_path: Path, run_fetch, fmt: str) -> None:
    """Several jobs, one --log-file (the README's cron line): each status, failure and
    listing error says which job it is about. Only the JSON summary did: a text log's
    "failed: f1.bin: HTTP 404" could be any job's, and so could its summary line."""
    _tree(tmp_path / "www" / "a", n=2)
    _tree(tmp_path / "www" / "b", n=2)
    cfg, log = tmp_path / "m.toml", tmp_path / "run.log"
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/b/f1.bin", Fault.status(404))
        cfg.write_text(
            f"[defaults]\nprocs = 1\nretries = 1\n"
            f'[jobs.a]\nurl = "{srv.url}a/"\ndest = "out/a"\n'
            f'[jobs.b]\nurl = "{srv.url}b/"\ndest = "out/b"\n'
            f'[jobs.c]\nurl = "{srv.url}missing/"\ndest = "out/c"\n'
        )
        r = run_fetch("--config", cfg, "--log-file", log, "--log-format", fmt)
    assert r.code == 1, r
    lines = log.read_text().splitlines()
    if fmt == "json":
        events = [json.loads(line) for line in lines]
        assert all(e.get("job") in ("a", "b", "c") for e in events), events
        failed = [e for e in events if e["event"] == "failed"]
        assert [(e["job"], e["path"]) for e in failed] == [("b", "f1.bin")], failed
        assert any(e["job"] == "c" and e["event"] == "listing" for e in events), events
    else:
        said = [line.split(" ", 2)[2] for line in lines]  # (after the date and time)
        assert all(s.startswith(("a: ", "b: ", "c: ")) for s in said), said
        assert any(s.startswith("b: failed: f1.bin") for s in said), said
        assert any(s.startswith("c: listing: ") for s in said), said
        assert [s.partition(":")[0] for s in said if "summary:" in s] == ["a", "b", "c"], said


def test_a_json_log_keeps_its_summary_when_a_name_is_not_utf8(tmp_path: Path, run_fetch) -> None:
    """A DEST, or a stray file --delete removes, whose name's bytes are not UTF-8: the
    summary event (its ``dest``, its ``deleted``) could not be written to the UTF-8 log,
    which was given up ("cannot write --log-file") and ended without it. The report
    writes such a name as JSON's ``\\udcXX`` escapes; the log now does too."""
    _tree(tmp_path / "www", n=2)
    dest = os.fsdecode(os.fsencode(str(tmp_path)) + b"/od\xff")
    stray = os.fsdecode(b"stray\xfe")
    log = tmp_path / "run.log"
    with FaultServer(root=tmp_path / "www") as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1").code == 0
        (Path(dest) / stray).write_bytes(b"not upstream")
        args = ["--mirror", srv.url, "--dest", dest, "--delete", "--force"]
        r = run_fetch(*args, "--log-file", log, "--log-format", "json")
    assert r.code == 0, r
    events = [json.loads(line) for line in log.read_text("utf-8").splitlines()]
    summary = events[-1]
    assert summary["event"] == "summary", events
    assert summary["dest"] == dest and summary["deleted"] == [stray], summary
    assert not (Path(dest) / stray).exists()


def _unit(path: Path) -> dict[str, list[str]]:
    """A systemd unit's ``Key=value`` settings (every section), each key's values in order."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", ";", "[")):
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_shipped_service_unit_runs_as_written(tmp_path: Path) -> None:
    """configs/systemd/fetch-mirror@.service, installed as the README says: its User= can
    write the --report it names (/var/lib/fetch is made for it: StateDirectory=, else
    every run synced, then failed with exit 4 on the report), and `systemctl stop` (or a
    shutdown) during a sync is no failure: fetch exits 130 on the SIGTERM, which systemd
    counts as one unless SuccessExitStatus says otherwise."""
    import shlex
    import shutil

    unit = REPO / "configs" / "systemd" / "fetch-mirror@.service"
    settings = _unit(unit)
    argv = shlex.split(settings["ExecStart"][0])
    report = Path(argv[argv.index("--report") + 1])
    state_dirs = " ".join(settings.get("StateDirectory", [])).split()
    assert report.parent.parent == Path("/var/lib"), report
    assert report.parent.name in state_dirs, settings
    success = " ".join(settings["SuccessExitStatus"]).split()
    assert {"3", "130"} <= set(success), success
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # (the program is not installed here: the unit is checked as it is otherwise)
    text = unit.read_text().replace("/usr/local/bin/fetch", shutil.which("true") or "/bin/true")
    for suffix in ("service", "timer"):
        src = unit.with_suffix(f".{suffix}")
        (tmp_path / f"fetch-mirror@t.{suffix}").write_text(
            text if suffix == "service" else src.read_text()
        )
    p = subprocess.run(
        [analyze, "verify", "--man=no", "fetch-mirror@t.service", "fetch-mirror@t.timer"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr


def test_the_readme_cron_line_runs_as_written(tmp_path: Path, run_fetch) -> None:
    """The README's crontab line names fetch by the path the shipped unit does: cron runs
    it with PATH=/usr/bin:/bin, where a bare `fetch` (pip's /usr/local/bin) is not found
    and every run mails "fetch: not found". Its options, with the paths moved here, run
    a config's jobs and write the log, report and metrics."""
    import shlex

    readme = (REPO / "README.md").read_text()
    cron = next(line.strip() for line in readme.splitlines() if line.strip().startswith("17 "))
    fields = cron.split(None, 6)
    assert fields[5] == "mirror", cron  # (/etc/crontab and /etc/cron.d: a user field)
    argv = shlex.split(fields[6])
    unit = _unit(REPO / "configs" / "systemd" / "fetch-mirror@.service")
    assert argv[0] == shlex.split(unit["ExecStart"][0])[0], cron
    _tree(tmp_path / "www" / "a", n=2)
    with FaultServer(root=tmp_path / "www") as srv:
        cfg = tmp_path / "mirrors.toml"
        cfg.write_text(f'[jobs.a]\nurl = "{srv.url}a/"\ndest = "out/a"\n')
        moved = [
            str(tmp_path / Path(a).name) if a.startswith("/") and a != "/etc/fetch/mirrors.toml"
            else str(cfg) if a.startswith("/") else a
            for a in argv[1:]
        ]  # fmt: skip
        r = run_fetch(*moved)
    assert r.code == 0, r
    assert (tmp_path / "out" / "a" / "f1.bin").exists()
    for opt in ("--log-file", "--report", "--metrics"):
        assert (tmp_path / Path(argv[argv.index(opt) + 1]).name).stat().st_size > 0, opt


def test_the_command_line_turns_off_what_the_config_turns_on(tmp_path: Path, run_fetch) -> None:
    """The shipped mirrors.toml sets delete = true in [defaults]; the command line, which
    the README says overrides the file, had only --delete: a job could not be run once
    without deleting (nor without skip_if_locked, insecure, ...). --no-OPTION does it,
    for every true-or-false key; an unused --no-force is no mistake to refuse."""
    _tree(tmp_path / "www" / "a", n=3)
    cfg, dest = tmp_path / "m.toml", tmp_path / "out"
    with FaultServer(root=tmp_path / "www") as srv:
        cfg.write_text(
            f"[defaults]\ndelete = true\nforce = true\nskip_if_locked = true\n"
            f'[jobs.a]\nurl = "{srv.url}a/"\ndest = "{dest}"\n'
        )
        assert run_fetch("--config", cfg).code == 0
        (dest / "gone.bin").write_bytes(b"not upstream")
        r = run_fetch("--config", cfg, "--check", "--no-delete", "--no-skip-if-locked")
        assert r.code == 0, r
        assert "delete = False" in r.output and "skip_if_locked = False" in r.output, r
        r = run_fetch("--config", cfg, "--no-delete", "--no-force")
        assert r.code == 0, r
        assert (dest / "gone.bin").exists()
        assert run_fetch("--config", cfg).code == 0
        assert not (dest / "gone.bin").exists()
    r = run_fetch("--mirror", "http://127.0.0.1:9/", "--dest", dest, "--no-dry-run", "--check")
    assert r.code == 2 and "--check go with --config" in r.output, r


def test_qq_says_nothing_of_a_run_that_ended_well(tmp_path: Path) -> None:
    """cron mails whatever a run prints: with -q every run's summary, so an operator learnt
    to ignore the mails. With -qq standard output is empty unless the run ends with another
    exit code than 0, and then it holds the summary; a log file still gets every run."""
    _tree(tmp_path / "www" / "d", n=4)
    log = tmp_path / "log"

    def fetch(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "fetcher", "--mirror", srv.url + "d/",
                "--dest", str(tmp_path / "o"), "--retries", "1", *extra]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    with FaultServer(root=tmp_path / "www") as srv:
        for extra in ((), ("--log-format", "json"), ("--log-file", str(log))):
            p = fetch("-qq", *extra)
            assert (p.returncode, p.stdout, p.stderr) == (0, "", ""), (extra, p)
        assert log.read_text().count("unchanged") >= 1
        (tmp_path / "www" / "d" / "f9.bin").write_bytes(b"new")
        srv.persist("/d/f9.bin", Fault.status(500))
        p = fetch("-qq")
        assert p.returncode == 1 and "failed" in p.stdout and "f9.bin" in p.stdout, p
        p = fetch("-q")  # (once: the summary whatever the outcome)
        assert p.returncode == 1 and "unchanged" in p.stdout, p


def test_the_last_status_line_counts_the_files_a_conditional_get_found_unchanged(
    tmp_path: Path, run_fetch
) -> None:
    """A listing without sizes or dates (Python's http.server) makes every file of a
    re-sync a conditional GET; the 304s were counted in the summary's "unchanged" but not
    in the status line's, which ended the log with "3/3 files, ... 0 unchanged"."""
    with FaultServer() as srv:
        links = "".join(f'<a href="f{i}.bin">f{i}.bin</a>\n' for i in range(3))
        srv.add_listing("/d/", f"<html><body>{links}</body></html>".encode())
        for i in range(3):
            srv.add_file(f"/d/f{i}.bin", b"x" * 100, last_modified=1_600_000_000)
        argv = ("--mirror", srv.url + "d/", "--dest", tmp_path / "o", "--log-format", "json")
        assert run_fetch(*argv).code == 0
        r = run_fetch(*argv)
        conditional = srv.count(path="/d/f0.bin", status=304)
    assert r.code == 0, r
    assert conditional == 1
    records = [json.loads(line) for line in r.output.splitlines()]
    summary = records[-1]
    status = [rec for rec in records if rec["event"] == "status"][-1]
    assert summary["event"] == "summary" and summary["unchanged"]["files"] == 3, summary
    assert (status["files_done"], status["skipped"]) == (3, 3), status
