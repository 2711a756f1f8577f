"""--segments: a big new file fetched as byte ranges at once, joined into one file.

Against the project's server (scripted: concurrency held open, Range ignored, a
version change mid-way) and nginx (the real thing, with its per-connection rate cap).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from fetcher.config import Transfer
from fetcher.download import fetch_file
from fetcher.landing import partial_paths
from fetcher.models import Action, Job, RelPath, RemoteFile, Status
from fetcher.retry import build_retrying
from fetcher.segments import SEGMENT_MIN
from fetcher.transport import make_transport
from tests.background import fetch_session
from tests.faultserver import Fault, FaultServer
from tests.servers import serve

SIZE = SEGMENT_MIN + (4 << 20) + 12345  # 5 ranges of ~4 MiB (each at least SEGMENT_MIN/4)


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(SIZE)


def _www(tmp_path: Path, payload: bytes) -> Path:
    (tmp_path / "www" / "iso").mkdir(parents=True)
    (tmp_path / "www" / "iso" / "big.img").write_bytes(payload)
    (tmp_path / "www" / "iso" / "small.txt").write_bytes(b"s")
    return tmp_path / "www"


def _ranges(size: int, segments: int) -> list[str]:
    n = min(2 * segments, size // (SEGMENT_MIN // 4))  # twice the connections, >= 4 MiB each
    step = -(-size // n)
    return [f"bytes={a}-{min(a + step, size) - 1}" for a in range(0, size, step)]


def test_ranges_at_once_of_one_version_joined(tmp_path: Path, payload: bytes, run_fetch) -> None:
    gate = threading.Event()
    with FaultServer(root=_www(tmp_path, payload)) as srv:
        # the second range is held until two more are in flight: they run at once
        srv.script("/iso/big.img", [Fault.ok(), Fault.gated(gate)])
        done: dict[str, object] = {}

        def run() -> None:
            done["r"] = run_fetch("--mirror", f"{srv.url}iso/", "--dest", tmp_path / "d",
                                  "--segments", "4", "--procs", "1")  # fmt: skip

        t = threading.Thread(target=run)
        t.start()
        try:
            assert srv.wait_for(4, path="/iso/big.img", timeout=30)
        finally:
            gate.set()
            t.join(timeout=60)
        reqs = [q for q in srv.requests if q.path == "/iso/big.img"]
    r = done["r"]
    assert r.code == 0, r.output  # type: ignore[attr-defined]
    assert (tmp_path / "d" / "big.img").read_bytes() == payload
    assert sorted(q.headers["range"] for q in reqs) == sorted(_ranges(SIZE, 4))
    first = next(q for q in reqs if q.headers["range"] == _ranges(SIZE, 4)[0])
    assert "if-range" not in first.headers
    etag = {q.headers.get("if-range") for q in reqs if q is not first}
    assert len(etag) == 1 and None not in etag  # every other range: one version
    assert not list((tmp_path / "d" / ".fetcher" / "partial").iterdir())


@pytest.mark.parametrize("dated", [True, False], ids=["last-modified", "no-date"])
def test_a_weak_etag_is_not_what_the_ranges_name(
    tmp_path: Path, payload: bytes, run_fetch, dated: bool
) -> None:
    """``If-Range`` never matches a weak ETag (``W/``, as a CDN or an encoding server sends):
    with it every range but the first came back whole, and the file failed. The ranges name
    the version by its date instead; with no date either, the file comes whole at once."""
    with FaultServer(root=_www(tmp_path, b"")) as srv:
        srv.add_file(
            "/iso/big.img", payload, etag='W/"v1"', last_modified=1_700_000_000 if dated else None
        )
        r = run_fetch("--mirror", f"{srv.url}iso/", "--dest", tmp_path / "d", "--segments", "4",
                      "--procs", "1")  # fmt: skip
        reqs = [q for q in srv.requests if q.path == "/iso/big.img"]
    assert r.code == 0, r.output
    assert (tmp_path / "d" / "big.img").read_bytes() == payload
    if dated:
        assert sorted(q.headers["range"] for q in reqs) == sorted(_ranges(SIZE, 4))
        assert {q.headers.get("if-range") for q in reqs[1:]} == {"Tue, 14 Nov 2023 22:13:20 GMT"}
        assert [q.status for q in reqs] == [206] * len(reqs)
    else:  # the first range, then the whole file
        assert [(q.status, q.headers.get("range")) for q in reqs] == [
            (206, _ranges(SIZE, 4)[0]), (200, None)
        ]  # fmt: skip


def test_a_server_that_ignores_range_gets_one_whole_request(
    tmp_path: Path, payload: bytes, run_fetch
) -> None:
    with FaultServer(root=_www(tmp_path, payload)) as srv:
        srv.persist("/iso/big.img", Fault.ignore_range())
        r = run_fetch("--mirror", f"{srv.url}iso/", "--dest", tmp_path / "d", "--segments", "4")
        reqs = [q for q in srv.requests if q.path == "/iso/big.img"]
    assert r.code == 0, r.output
    assert (tmp_path / "d" / "big.img").read_bytes() == payload
    assert [("range" in q.headers) for q in reqs] == [True, False]


def test_a_range_of_another_version_fails_the_attempt_and_the_retry_lands(
    tmp_path: Path, payload: bytes, run_fetch
) -> None:
    with FaultServer(root=_www(tmp_path, payload)) as srv:
        # the second range answered whole (as a changed file is, under If-Range)
        srv.script("/iso/big.img", [Fault.ok(), Fault.ignore_range()])
        r = run_fetch("--mirror", f"{srv.url}iso/", "--dest", tmp_path / "d", "--segments", "4",
                      "--procs", "1", "-v")  # fmt: skip
        asked = [q.headers.get("range") for q in srv.requests if q.path == "/iso/big.img"]
    assert r.code == 0, r.output
    assert "changed, or a range was answered wrongly" in r.output  # the retry says why
    assert (tmp_path / "d" / "big.img").read_bytes() == payload
    # the retry goes on from the ranges already in: the first is never asked again
    ranges = _ranges(SIZE, 4)
    assert asked.count(ranges[0]) == 1 and set(asked) == set(ranges), asked


def test_a_segmented_partial_is_never_resumed_as_a_prefix(
    tmp_path: Path, payload: bytes, run_fetch
) -> None:
    dest = tmp_path / "d"
    part, meta = partial_paths(dest, RelPath("big.img"))
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * SIZE)  # as an interrupted segmented attempt leaves it
    with FaultServer(root=_www(tmp_path, payload)) as srv:
        meta.write_text(json.dumps({"url": f"{srv.url}iso/big.img", "segments": 4, "size": SIZE}))
        r = run_fetch("--mirror", f"{srv.url}iso/", "--dest", dest, "--procs", "1")
        reqs = [q for q in srv.requests if q.path == "/iso/big.img"]
    assert r.code == 0, r.output
    assert (dest / "big.img").read_bytes() == payload
    assert len(reqs) == 1 and "range" not in reqs[0].headers


@pytest.mark.real_server
def test_nginx_with_a_per_connection_rate_cap(tmp_path: Path, payload: bytes, run_fetch) -> None:
    with serve("nginx", _www(tmp_path, payload), tmp_path / "nginx", limit_rate="50m") as srv:
        r = run_fetch("--mirror", f"{srv.url}iso/", "--dest", tmp_path / "d", "--segments", "4",
                      "--max-connections", "8")  # fmt: skip
        log = Path(srv.access_log).read_text()
    assert r.code == 0, r.output
    assert (tmp_path / "d" / "big.img").read_bytes() == payload
    n = len(_ranges(SIZE, 4))
    assert log.count("/iso/big.img") == n and log.count("\t206\t") == n, log


def test_an_update_goes_in_ranges_and_an_unchanged_one_is_a_304(
    tmp_path: Path, payload: bytes, run_fetch
) -> None:
    www = _www(tmp_path, payload)
    big = www / "iso" / "big.img"
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        srv.set_etag("/iso/big.img", '"v1"')
        args = ("--mirror", f"{srv.url}iso/", "--dest", dest, "--segments", "4", "--procs", "1")
        assert run_fetch(*args).code == 0
        os.utime(big, (2_000_000_000, 2_000_000_000))  # newer date, same version
        srv.reset_stats()
        same = run_fetch(*args)
        touched = [q for q in srv.requests if q.path == "/iso/big.img"]
        assert (dest / "big.img").read_bytes() == payload
        new = payload[::-1]
        big.write_bytes(new)
        srv.set_etag("/iso/big.img", '"v2"')
        os.utime(big, (2_000_000_100, 2_000_000_100))
        srv.reset_stats()
        changed = run_fetch(*args)
        replaced = [q for q in srv.requests if q.path == "/iso/big.img"]
    assert same.code == 0 and changed.code == 0, (same.output, changed.output)
    assert len(touched) == 1 and touched[0].headers["if-none-match"] == '"v1"'  # a 304
    assert (dest / "big.img").read_bytes() == new
    assert sorted(q.headers["range"] for q in replaced) == sorted(_ranges(SIZE, 4))


def test_with_no_free_connection_every_range_still_comes_once(
    tmp_path: Path, payload: bytes, run_fetch
) -> None:
    # --max-connections 1: helpers never get a connection; the file's own lane takes each
    # range in turn (and none is left out or asked twice)
    with FaultServer(root=_www(tmp_path, payload)) as srv:
        r = run_fetch("--mirror", f"{srv.url}iso/", "--dest", tmp_path / "d", "--segments", "8",
                      "--max-connections", "1", "--procs", "1")  # fmt: skip
        reqs = [q for q in srv.requests if q.path == "/iso/big.img"]
        most = srv.max_concurrent_connections
    assert r.code == 0, r.output
    assert (tmp_path / "d" / "big.img").read_bytes() == payload
    assert sorted(q.headers["range"] for q in reqs) == sorted(_ranges(SIZE, 8))
    assert most == 1


def _after_a_stopped_run(
    tmp_path: Path, payload: bytes, served: bytes, server: str, done: int, run_fetch
) -> tuple[list[str], set[str], int]:
    """A segmented attempt at version "v1" stopped with its first ``done`` of 5 ranges in
    (their bytes in the partial file, the sidecar naming them), then a run against a server
    of ``served`` ("v1" when ``server`` is "same-version", else "v2", honouring If-Range or
    not), which must land the file: the ranges asked for, in order; the If-Range values
    sent; the file bytes sent."""
    dest = tmp_path / "d"
    ranges = [tuple(int(x) for x in r.removeprefix("bytes=").split("-")) for r in _ranges(SIZE, 4)]
    part, meta = partial_paths(dest, RelPath("big.img"))
    part.parent.mkdir(parents=True)
    kept = bytearray(SIZE)
    for a, b in ranges[:done]:
        kept[a : b + 1] = payload[a : b + 1]
    part.write_bytes(bytes(kept))
    with FaultServer(root=_www(tmp_path, served)) as srv:
        srv.set_etag("/iso/big.img", '"v1"' if server == "same-version" else '"v2"')
        if server == "changed-ignoring-if-range":
            srv.persist("/iso/big.img", Fault.ignore_if_range())
        meta.write_text(json.dumps({
            "url": f"{srv.url}iso/big.img", "size": SIZE, "validator": '"v1"',
            "ranges": ranges, "done": ranges[:done],
        }))  # fmt: skip
        r = run_fetch("--mirror", f"{srv.url}iso/", "--dest", dest, "--segments", "4",
                      "--procs", "1")  # fmt: skip
        reqs = [q for q in srv.requests if q.path == "/iso/big.img"]
        sent = srv.file_bytes_sent
    assert r.code == 0, r.output
    assert (dest / "big.img").read_bytes() == served  # never v1's ranges joined to v2's
    assert not meta.exists() and not part.exists()
    return [q.headers["range"] for q in reqs], {q.headers.get("if-range") for q in reqs}, sent


@pytest.mark.parametrize("server", ["same-version", "changed", "changed-ignoring-if-range"])
def test_an_interrupted_segmented_file_goes_on_from_its_ranges(
    tmp_path: Path, payload: bytes, run_fetch, server: str
) -> None:
    # as a run stopped after three of five ranges of version "v1" leaves it (the plan then
    # says resume); a server that ignores If-Range sends the ranges of "v2" all the same,
    # and only their ETag shows that they are not to be joined to the ranges kept
    same_version = server == "same-version"
    served = payload if same_version else bytes(b ^ 0xFF for b in payload[:4096]) + payload[4096:]
    asked, if_range, _ = _after_a_stopped_run(tmp_path, payload, served, server, 3, run_fetch)
    if same_version:
        assert sorted(asked) == sorted(_ranges(SIZE, 4)[3:])  # only the two ranges left
        assert if_range == {'"v1"'}
    else:  # the first range left is of another version: all over again
        assert sorted(asked) == sorted([_ranges(SIZE, 4)[3], *_ranges(SIZE, 4)])


@pytest.mark.parametrize("server", ["same-version", "changed", "changed-ignoring-if-range"])
def test_a_segmented_file_whose_ranges_are_all_in_is_named_after_one_byte(
    tmp_path: Path, payload: bytes, run_fetch, server: str
) -> None:
    # as a run stopped after the last range came and before the file took its name leaves
    # it: every range in. The last range was fetched again (an eighth of a 4 GiB image);
    # now its last byte, asked with If-Range, confirms the version and names the file.
    same_version = server == "same-version"
    served = payload if same_version else payload[:-4096] + bytes(b ^ 0xFF for b in payload[-4096:])
    asked, if_range, sent = _after_a_stopped_run(tmp_path, payload, served, server, 5, run_fetch)
    assert asked[0] == f"bytes={SIZE - 1}-"
    if same_version:
        assert asked == [f"bytes={SIZE - 1}-"] and sent < 4096  # the one byte (and small.txt)
        assert if_range == {'"v1"'}
    else:  # another version: all its ranges
        assert sorted(asked[1:]) == sorted(_ranges(SIZE, 4))


def test_a_range_answered_with_another_etag_fails_the_attempt(
    tmp_path: Path, payload: bytes, run_fetch
) -> None:
    with FaultServer(root=_www(tmp_path, payload)) as srv:
        # the second range comes as a 206 of "another version" (If-Range ignored)
        other = Fault.ignore_if_range() | Fault.header("ETag", '"other"')
        srv.script("/iso/big.img", [Fault.ok(), other])
        r = run_fetch("--mirror", f"{srv.url}iso/", "--dest", tmp_path / "d", "--segments", "4",
                      "--procs", "1", "-v")  # fmt: skip
        asked = [q.headers.get("range") for q in srv.requests if q.path == "/iso/big.img"]
    assert r.code == 0, r.output
    assert "changed, or a range was answered wrongly" in r.output
    assert (tmp_path / "d" / "big.img").read_bytes() == payload
    assert len(asked) > len(_ranges(SIZE, 4))  # the range of "another version" asked again


def test_ctrl_c_mid_way_then_the_next_run_fetches_only_the_ranges_left(
    tmp_path: Path, payload: bytes, run_fetch
) -> None:
    import signal
    import time

    dest = tmp_path / "d"
    _part, meta = partial_paths(dest, RelPath("big.img"))
    ranges = _ranges(SIZE, 2)  # 4 ranges on 2 connections
    with FaultServer(root=_www(tmp_path, payload)) as srv:
        # the first two ranges come at once, the others slowly: stopped between them
        srv.script("/iso/big.img", [Fault.ok(), Fault.ok(), Fault.trickle(256 << 10),
                                    Fault.trickle(256 << 10)])  # fmt: skip
        argv = ["--mirror", f"{srv.url}iso/", "--dest", str(dest), "--segments", "2",
                "--procs", "1"]  # fmt: skip
        with fetch_session(argv) as proc:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                done = json.loads(meta.read_text()).get("done", []) if meta.exists() else []
                if len(done) >= 2:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("two ranges never finished")
            os.killpg(proc.pid, signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out.decode(errors="replace")
        assert not (dest / "big.img").exists()
        kept = {f"bytes={a}-{b}" for a, b in json.loads(meta.read_text())["done"]}
        assert len(kept) >= 2 and kept < set(ranges)
        srv.clear_faults()
        srv.reset_stats()
        r = run_fetch("--mirror", f"{srv.url}iso/", "--dest", dest, "--segments", "2",
                      "--procs", "1")  # fmt: skip
        asked = sorted(q.headers["range"] for q in srv.requests if q.path == "/iso/big.img")
    assert r.code == 0, r.output
    assert (dest / "big.img").read_bytes() == payload
    assert asked == sorted(set(ranges) - kept)  # those finished before Ctrl-C: not again


def test_an_attempt_stopped_before_its_first_range_is_read_leaves_its_connection_clean(
    tmp_path: Path, payload: bytes
) -> None:
    # The first range is answered, then the attempt stops before reading it (here its
    # sidecar cannot be written: a directory is in the way). Its answer was left open, on
    # the thread's connection: the next file's request there read that body as its head,
    # and failed.
    www = _www(tmp_path, payload)
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        t = Transfer(dest=str(dest), root=srv.url, segments=4, threads=1, retries=1)
        meta = partial_paths(dest, RelPath("iso/big.img"))[1]
        meta.with_name(meta.name + ".tmp").mkdir(parents=True)

        def job(name: str, size: int) -> Job:
            url = srv.url + name
            return Job(RemoteFile(url, RelPath(name), size, size_exact=True), Action.NEW)

        with make_transport(t) as transport:
            policy = build_retrying(t)
            big = fetch_file(transport, job("iso/big.img", SIZE), t, retrying=policy)
            small = fetch_file(transport, job("iso/small.txt", 1), t, retrying=policy)
        asked = [q.path for q in srv.requests]
    assert big.status is Status.FAILED and "Is a directory" in (big.error or ""), big
    assert small.status is Status.FETCHED, small
    assert (dest / "iso" / "small.txt").read_bytes() == b"s"
    assert asked == ["/iso/big.img", "/iso/small.txt"], asked
