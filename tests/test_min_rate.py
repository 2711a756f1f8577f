"""``--min-rate``: a body that trickles fails (and is retried); our own ``--limit-rate``
waits are not held against the server.

Against the fault server on 127.0.0.1, whose ``Fault.trickle`` sends a body at a fixed
rate; the CLI runs in-process (workers from the fork server, as in a real run).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fetcher.config import build_job
from fetcher.errors import ConfigError, TooSlow
from fetcher.limits import Pace
from tests.faultserver import Fault, FaultServer


def _www(tmp_path: Path, **sizes: int) -> dict[str, bytes]:
    """Files of random bytes of these sizes in ``tmp_path/www`` (the names with ``_`` for
    ``.``): their bodies, by file name."""
    (tmp_path / "www").mkdir()
    bodies = {name.replace("_", "."): os.urandom(n) for name, n in sizes.items()}
    for name, body in bodies.items():
        (tmp_path / "www" / name).write_bytes(body)
    return bodies


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pace_judges_a_stretch_at_a_time_and_leaves_out_our_own_waits() -> None:
    clock = _Clock()
    pace = Pace(1000.0, 10.0, clock)
    clock.now += 9.9
    pace.add(10, "the body")  # 10 B in 9.9 s: slow, but the stretch is not over
    clock.now += 0.2
    with pytest.raises(TooSlow) as exc:
        pace.add(10, "the body")  # 20 B in 10.1 s
    assert str(exc.value) == "the body came at 2 B/s over 10 s, under --min-rate 1000 B/s"

    pace = Pace(1000.0, 10.0, clock)
    clock.now += 10.5
    pace.add(20_000, "the body")  # fast enough: a new stretch starts here
    clock.now += 9.0
    pace.add(10, "the body")
    clock.now += 2.0
    pace.held(5.0)  # 11 s since, 5 of them our own --limit-rate wait: 6 s of the server's
    pace.add(10, "the body")
    clock.now += 4.0
    with pytest.raises(TooSlow, match=r"came at 3 B/s over 10 s"):
        pace.add(10, "the body")


def test_min_rate_is_validated_with_the_key_named() -> None:
    job = build_job({"url": "http://h/", "min_rate": "10k", "min_rate_time": 5}, "x")
    assert (job.min_rate, job.min_rate_time) == (10240.0, 5.0)
    assert (job.transfer().min_rate, job.transfer().min_rate_time) == (10240.0, 5.0)
    assert build_job({"url": "http://h/"}, "x").transfer().min_rate is None
    with pytest.raises(ConfigError, match=r"x\.min_rate: expected a rate"):
        build_job({"url": "http://h/", "min_rate": "slow"}, "x")
    with pytest.raises(ConfigError, match=r"x\.min_rate_time: expected a number from 1 to"):
        build_job({"url": "http://h/", "min_rate_time": 0}, "x")


@pytest.mark.parametrize("floor", [None, "32k"], ids=["no-floor", "min-rate"])
def test_a_trickled_file_fails_under_min_rate_and_the_others_land(
    tmp_path: Path, run_fetch, floor: str | None
) -> None:
    """A 24 KiB file at 8 KiB/s: waited for (3 s) without a floor; with one of 32 KiB/s
    over 1 s, each attempt fails after a second, and the file is not published."""
    bodies = _www(tmp_path, slow_bin=24 << 10, fast_bin=100 << 10)
    slow, fast = bodies["slow.bin"], bodies["fast.bin"]
    dest = tmp_path / "d"
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/slow.bin", Fault.trickle(8 << 10))
        argv = ["--mirror", srv.url, "--dest", dest, "--procs", "1", "--retries", "2"]
        if floor is not None:
            argv += ["--min-rate", floor, "--min-rate-time", "1"]
        r = run_fetch(*argv)
        asked = srv.count("GET", "/slow.bin")
    assert (dest / "fast.bin").read_bytes() == fast
    if floor is None:
        assert r.code == 0, r
        assert (dest / "slow.bin").read_bytes() == slow
        assert asked == 1
    else:
        assert r.code == 1, r
        assert not (dest / "slow.bin").exists()
        assert "under --min-rate 32.0 KiB/s" in r.output, r.output
        assert asked == 2  # retried: another attempt may find a better connection
        assert "Traceback" not in r.output


def test_a_trickled_listing_is_a_listing_error_and_blocks_delete(tmp_path: Path, run_fetch) -> None:
    www = tmp_path / "www"
    (www / "sub").mkdir(parents=True)
    for i in range(20):
        (www / "sub" / f"package-{i:02d}.rpm").write_bytes(b"x" * 100)
    (www / "top.txt").write_bytes(b"top")
    dest = tmp_path / "d"
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "local-only.rpm").write_bytes(b"kept")
    with FaultServer(root=www) as srv:
        srv.persist("/sub/", Fault.trickle(512))  # a listing of ~2 KiB: 4 s
        r = run_fetch(
            "--mirror", srv.url, "--dest", dest, "--retries", "1", "--delete", "--force",
            "--min-rate", "8k", "--min-rate-time", "1",
        )  # fmt: skip
        asked = srv.count("GET", "/sub/")
    assert r.code == 1, r
    assert asked == 1
    assert "under --min-rate 8.0 KiB/s" in r.output, r.output
    assert (dest / "top.txt").read_bytes() == b"top"
    assert (dest / "sub" / "local-only.rpm").read_bytes() == b"kept"  # --delete held back


def test_our_own_limit_rate_is_not_the_servers_slowness(tmp_path: Path, run_fetch) -> None:
    """``--limit-rate 256k`` below ``--min-rate 512k``: the body comes from the server at
    once and waits here; the file lands. Counted as the server's time, the floor failed it."""
    body = _www(tmp_path, big_bin=768 << 10)["big.bin"]
    dest = tmp_path / "d"
    with FaultServer(root=tmp_path / "www") as srv:
        r = run_fetch(
            "--mirror", srv.url, "--dest", dest, "--procs", "1", "--retries", "1",
            "--limit-rate", "256k", "--min-rate", "512k", "--min-rate-time", "1",
        )  # fmt: skip
    assert r.code == 0, r
    assert (dest / "big.bin").read_bytes() == body


def test_a_big_file_cut_off_for_trickling_resumes_on_its_retry(tmp_path: Path, run_fetch) -> None:
    """2 MiB at 128 KiB/s, the first time only: the body goes from the socket to the file
    in the kernel (splice), where the floor is looked at too; the retry asks for the rest."""
    body = _www(tmp_path, big_iso=2 << 20)["big.iso"]
    dest = tmp_path / "d"
    with FaultServer(root=tmp_path / "www") as srv:
        srv.script("/big.iso", [Fault.trickle(128 << 10)])
        r = run_fetch(
            "--mirror", srv.url, "--dest", dest, "--procs", "1", "--retries", "2",
            "--min-rate", "512k", "--min-rate-time", "1",
        )  # fmt: skip
        asked = [q for q in srv.requests if q.path == "/big.iso"]
        sent = srv.file_bytes_sent
    assert r.code == 0, r
    assert (dest / "big.iso").read_bytes() == body
    assert len(asked) == 2
    first, second = asked
    assert "range" not in {k.lower() for k in first.headers}
    ranges = [v for k, v in second.headers.items() if k.lower() == "range"]
    assert ranges and ranges[0].startswith("bytes=") and not ranges[0].startswith("bytes=0-")
    assert sent < len(body) + (256 << 10)  # the first attempt's bytes were kept
