"""Big bodies go from the socket into the file with splice(2) (``Body.write_to``).

Against nginx and the fault server: the bytes land exactly, the connection is
reused afterwards, a body cut short or stalled fails like any other and leaves
nothing under the final name, a stop mid-body keeps the partial file, and the
paths that must see the bytes (a checksum, a rate limit, a resume) still
iterate them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import msgspec
import pytest

from fetcher.config import Transfer
from fetcher.download import fetch_file
from fetcher.landing import partial_paths
from fetcher.limits import SharedLimits, local_limits
from fetcher.models import Action, Job, Outcome, RelPath, RemoteFile, Status
from fetcher.retry import build_retrying
from fetcher.transport import make_transport
from fetcher.wire import READ_SIZE
from tests.faultserver import Fault, FaultServer
from tests.servers import serve
from tests.test_http1 import CountingSemaphore

pytestmark = pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux-only")

MIB = 1 << 20


@pytest.fixture
def spliced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes moved from a socket by each os.splice call (calls from a pipe not counted)."""
    moved: list[int] = []
    real = os.splice

    def spy(src: int, dst: int, count: int, *args: object, **kwargs: object) -> int:
        n = real(src, dst, count, *args, **kwargs)  # type: ignore[arg-type]
        if os.readlink(f"/proc/self/fd/{src}").startswith("socket:"):
            moved.append(n)
        return n

    monkeypatch.setattr(os, "splice", spy)
    return moved


@pytest.fixture
def www(tmp_path: Path) -> dict[str, bytes]:
    root = tmp_path / "www"
    root.mkdir()
    files = {
        "big.bin": os.urandom(3 * MIB + 12345),
        "second.bin": os.urandom(2 * MIB),
        "small.bin": os.urandom(1000),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def _job(base: str, name: str, size: int) -> Job:
    return Job(RemoteFile(base + name, RelPath(name), size, True), Action.NEW)


def _fetch(
    dest: Path,
    base: str,
    names: list[tuple[str, int]],
    limits: SharedLimits | None = None,
    read_timeout: float = 30.0,
) -> tuple[list[Outcome], int]:
    """Fetch ``names`` one after the other on one transport; outcomes and bytes reported."""
    t = Transfer(
        dest=str(dest),
        root=base,
        retries=1,
        backoff_initial=0.0,
        backoff_max=0.0,
        read_timeout=read_timeout,
    )
    reported = 0

    def on_bytes(n: int) -> None:
        nonlocal reported
        reported += n

    outs = []
    with make_transport(t, limits) as transport:
        for name, size in names:
            outs.append(
                fetch_file(
                    transport,
                    _job(base, name, size),
                    t,
                    limits=limits,
                    retrying=build_retrying(t, sleep=lambda s: None),
                    on_bytes=on_bytes,
                )
            )
    return outs, reported


@pytest.mark.real_server
def test_nginx_big_files_are_spliced_and_the_connection_reused(
    tmp_path: Path, www: dict[str, bytes], spliced: list[int]
) -> None:
    sem = CountingSemaphore(4)
    limits = msgspec.structs.replace(local_limits(4), connections=sem)
    with serve("nginx", tmp_path / "www", tmp_path / "nginx") as srv:
        names = [(n, len(www[n])) for n in ("big.bin", "small.bin", "second.bin")]
        outs, reported = _fetch(tmp_path / "d", srv.url, names, limits)
        assert [o.status for o in outs] == [Status.FETCHED] * 3, outs
        for name, data in www.items():
            assert (tmp_path / "d" / name).read_bytes() == data, name
        # the two big bodies went through splice, less what came in with each head
        assert len(www["big.bin"]) + len(www["second.bin"]) - sum(spliced) <= 2 * READ_SIZE
        assert reported == sum(len(d) for d in www.values())
        logged = srv.requests(min_count=3)
        assert [q.status for q in logged] == [200, 200, 200]
        assert sem.taken == 1, "a spliced body cost the connection"


def test_fault_server_big_file_spliced_then_the_connection_reused(
    tmp_path: Path, www: dict[str, bytes], spliced: list[int]
) -> None:
    with FaultServer(root=tmp_path / "www") as srv:
        outs, _ = _fetch(
            tmp_path / "d", srv.url, [("big.bin", len(www["big.bin"])), ("small.bin", 1000)]
        )
        assert [o.status for o in outs] == [Status.FETCHED] * 2, outs
        assert (tmp_path / "d" / "big.bin").read_bytes() == www["big.bin"]
        assert sum(spliced) >= len(www["big.bin"]) - READ_SIZE
        assert srv.connections == 1


def test_a_body_cut_short_fails_and_nothing_lands(
    tmp_path: Path, www: dict[str, bytes], spliced: list[int]
) -> None:
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/big.bin", Fault.drop_after(2 * MIB))
        (out,), _ = _fetch(tmp_path / "d", srv.url, [("big.bin", len(www["big.bin"]))])
    assert out.status is Status.FAILED and "broke" in (out.error or ""), out
    assert spliced, "the body did not go through splice"
    assert not (tmp_path / "d" / "big.bin").exists()


def test_a_stalled_body_times_out_and_nothing_lands(
    tmp_path: Path, www: dict[str, bytes], spliced: list[int]
) -> None:
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/big.bin", Fault.hang(after_bytes=MIB))
        (out,), _ = _fetch(
            tmp_path / "d", srv.url, [("big.bin", len(www["big.bin"]))], read_timeout=0.5
        )
    assert out.status is Status.FAILED and "timed out" in (out.error or ""), out
    assert spliced
    assert not (tmp_path / "d" / "big.bin").exists()


def test_a_stop_mid_body_keeps_the_partial_file(
    tmp_path: Path, www: dict[str, bytes], spliced: list[int]
) -> None:
    stop = threading.Event()
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/big.bin", Fault.trickle(4 * MIB))
        base = srv.url
        t = Transfer(dest=str(tmp_path / "d"), root=base, retries=1)
        seen = 0

        def on_bytes(n: int) -> None:
            nonlocal seen
            seen += n
            if seen >= MIB:
                stop.set()

        with make_transport(t, stop=stop) as transport:
            out = fetch_file(
                transport,
                _job(base, "big.bin", len(www["big.bin"])),
                t,
                retrying=build_retrying(t),
                stop=stop,
                on_bytes=on_bytes,
            )
    assert out.status is Status.FAILED and out.error == "interrupted", out
    assert spliced
    part, _ = partial_paths(tmp_path / "d", RelPath("big.bin"))
    assert MIB <= part.stat().st_size < len(www["big.bin"])
    assert part.read_bytes() == www["big.bin"][: part.stat().st_size]
    assert not (tmp_path / "d" / "big.bin").exists()


@pytest.mark.parametrize("why", ["checksum", "rate"])
def test_bodies_that_must_be_seen_are_iterated(
    tmp_path: Path, www: dict[str, bytes], spliced: list[int], why: str
) -> None:
    import hashlib

    data = www["big.bin"]
    with FaultServer(root=tmp_path / "www") as srv:
        base = srv.url
        t = Transfer(dest=str(tmp_path / "d"), root=base, retries=1)
        f = RemoteFile(base + "big.bin", RelPath("big.bin"), len(data), True)
        limits = None
        if why == "checksum":
            f = RemoteFile(
                f.url, f.path, f.size, True, checksum=("sha256", hashlib.sha256(data).hexdigest())
            )
        else:
            limits = SharedLimits.create(4, 64 * MIB)
        with make_transport(t, limits) as transport:
            out = fetch_file(
                transport, Job(f, Action.NEW), t, retrying=build_retrying(t), limits=limits
            )
    assert out.status is Status.FETCHED, out
    assert (tmp_path / "d" / "big.bin").read_bytes() == data
    assert spliced == []
    if why == "checksum":
        assert out.sha256 == hashlib.sha256(data).hexdigest()


def test_a_resume_appends_by_iterating(
    tmp_path: Path, www: dict[str, bytes], spliced: list[int]
) -> None:
    data = www["big.bin"]
    with FaultServer(root=tmp_path / "www") as srv:
        srv.script("/big.bin", [Fault.drop_after(2 * MIB)])
        (first,), _ = _fetch(tmp_path / "d", srv.url, [("big.bin", len(data))])
        assert first.status is Status.FAILED, first
        spliced.clear()
        t = Transfer(dest=str(tmp_path / "d"), root=srv.url, retries=1)
        job = Job(
            RemoteFile(srv.url + "big.bin", RelPath("big.bin"), len(data), True), Action.RESUME
        )
        with make_transport(t) as transport:
            out = fetch_file(transport, job, t, retrying=build_retrying(t))
        ranged = [q for q in srv.requests if q.headers.get("range")]
    assert out.status is Status.FETCHED, out
    assert (tmp_path / "d" / "big.bin").read_bytes() == data
    assert ranged and ranged[-1].status == 206
    assert spliced == []
