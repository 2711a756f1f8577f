"""Resume: a run killed mid-transfer (SIGKILL to its whole process group) leaves no
truncated file under a final name and the next run continues where it stopped; a server
that ignores ``Range``, a file that changes between attempts, and a 206 with the wrong
``Content-Range`` never produce spliced bytes."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fetcher.config import Transfer
from fetcher.download import fetch_file
from fetcher.landing import partial_paths
from fetcher.models import Action, Job, RelPath, RemoteFile, Status
from fetcher.retry import build_retrying
from fetcher.transport import make_transport
from tests.background import process_group, semaphores_of
from tests.faultserver import Fault, FaultServer
from tests.faultserver import serving as _serving
from tests.servers import serve
from tests.trees import tree_manifest

RunFetch = Callable[..., Any]
REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def _parts(dest: Path) -> list[Path]:
    return sorted((dest / ".fetcher" / "partial").glob("*.part"))


def _partial_bytes(dest: Path) -> int:
    total = 0
    for p in _parts(dest):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def _assert_nothing_truncated(dest: Path, src: Path) -> None:
    """Every file under its final name in DEST is byte-identical to the source."""
    want = tree_manifest(src)
    for path, digest in tree_manifest(dest).items():
        if digest is not None:
            assert want.get(path) == digest, f"{path} differs from the source"


# --- 3. SIGKILL the whole process group, then resume ---------------------------------------


def test_kill_mid_transfer_then_resume(tmp_path: Path, run_fetch: RunFetch) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    rng = random.Random(7)
    (src / "big").mkdir(parents=True)
    for i in range(4):
        (src / "big" / f"part{i}.bin").write_bytes(rng.randbytes(24 * MIB))
    (src / "small.txt").write_bytes(b"small\n")
    tree_bytes = 4 * 24 * MIB + 6
    with _serving(src) as srv:
        srv.persist("/big/*", Fault.trickle(6 * MIB))
        argv = [sys.executable, "-m", "fetcher", "--mirror", srv.url, "--dest", str(dest),
                "--procs", "2", "--threads", "2", "-q"]  # fmt: skip
        log = (tmp_path / "run1.log").open("wb")
        held: set[str] = set()
        proc = subprocess.Popen(
            argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 30
            while _partial_bytes(dest) < 4 * MIB:
                assert proc.poll() is None, f"run ended early: {proc.returncode}"
                assert time.monotonic() < deadline, "no partial bytes after 30 s"
                time.sleep(0.05)
            held = semaphores_of(process_group(proc.pid))
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            log.close()
            # A run whose workers came from a fork server has named semaphores that
            # nobody unlinks once the group is killed: this test must not leave any behind.
            leaked = {name for name in held if os.path.exists(f"/dev/shm/{name}")}
            for name in leaked:
                with contextlib.suppress(OSError):
                    os.unlink(f"/dev/shm/{name}")
        assert proc.returncode == -signal.SIGKILL
        # The CLI forks its workers from a copy of itself (procs.fork_safe): its locks
        # have no names.
        assert leaked == set()
        _assert_nothing_truncated(dest, src)
        assert _parts(dest), "the killed run left no partial file to resume"

        srv.persist("/big/*", None)
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "2")
        assert r.code == 0, r
        assert tree_manifest(dest) == tree_manifest(src)
        assert _parts(dest) == []
        ranged = [q for q in srv.requests if q.is_file and q.status == 206]
        assert ranged, "nothing was resumed with a Range request"
        assert srv.file_bytes_sent < 1.2 * tree_bytes, (srv.file_bytes_sent, tree_bytes)


# --- 4. resume faults ------------------------------------------------------------------------

SIZE = 3 * MIB
"""Above download.RESUME_MIN, so a broken transfer keeps its partial file."""


def _first_attempt_breaks(srv: FaultServer, dest: Path, run_fetch: RunFetch) -> None:
    """Run once with one attempt per file; the file breaks after 1 MiB: a partial is kept."""
    srv.script("/pub/file.bin", [Fault.drop_after(MIB)])
    r = run_fetch("--mirror", srv.url + "pub/", "--dest", dest, "--procs", "1", "--retries", "1")
    assert r.code == 1, r
    assert not (dest / "file.bin").exists()
    assert _partial_bytes(dest) == MIB


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, run_fetch: RunFetch) -> None:
    dest = tmp_path / "dest"
    data = random.Random(1).randbytes(SIZE)
    with _serving() as srv:
        srv.add_file("/pub/file.bin", data)
        _first_attempt_breaks(srv, dest, run_fetch)
        srv.persist("/pub/file.bin", Fault.ignore_range())
        srv.reset_stats()
        r = run_fetch("--mirror", srv.url + "pub/", "--dest", dest, "--procs", "1")
        assert r.code == 0, r
        (req,) = [q for q in srv.requests if q.path == "/pub/file.bin"]
        assert req.headers.get("range") == f"bytes={MIB}-" and req.status == 200
    assert (dest / "file.bin").read_bytes() == data
    assert _parts(dest) == []


def test_file_changed_between_attempts_gives_the_new_content(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    dest = tmp_path / "dest"
    old = random.Random(2).randbytes(SIZE)
    new = random.Random(3).randbytes(SIZE)  # same size: only the validator tells them apart
    with _serving() as srv:
        srv.add_file("/pub/file.bin", old, last_modified=1_700_000_000)
        _first_attempt_breaks(srv, dest, run_fetch)
        srv.add_file("/pub/file.bin", new, last_modified=1_700_000_000)  # new ETag, same date
        srv.reset_stats()
        r = run_fetch("--mirror", srv.url + "pub/", "--dest", dest, "--procs", "1")
        assert r.code == 0, r
        (req,) = [q for q in srv.requests if q.path == "/pub/file.bin"]
        assert req.headers.get("if-range") and req.status == 200
    got = (dest / "file.bin").read_bytes()
    assert got[:MIB] != old[:MIB], "spliced: the old first MiB survived"
    assert got == new


def test_wrong_content_range_is_not_spliced(tmp_path: Path, run_fetch: RunFetch) -> None:
    dest = tmp_path / "dest"
    data = random.Random(4).randbytes(SIZE)
    with _serving() as srv:
        srv.add_file("/pub/file.bin", data)
        _first_attempt_breaks(srv, dest, run_fetch)
        srv.persist("/pub/file.bin", Fault.wrong_content_range())
        args = ("--mirror", srv.url + "pub/", "--dest", dest, "--procs", "1")
        # one attempt: the bad 206 is reported, nothing lands under the final name
        r = run_fetch(*args, "--retries", "1")
        assert r.code == 1, r
        assert "Content-Range" in r.output, r.output
        assert not (dest / "file.bin").exists()
        # the next attempt starts over (no Range, so no skew) and gets it right
        srv.reset_stats()
        r = run_fetch(*args)
        assert r.code == 0, r
        assert [q.headers.get("range") for q in srv.requests if q.is_file] == [None]
    assert (dest / "file.bin").read_bytes() == data


def test_wrong_content_range_then_retry_in_the_same_run(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    dest = tmp_path / "dest"
    data = random.Random(5).randbytes(SIZE)
    with _serving() as srv:
        srv.add_file("/pub/file.bin", data)
        _first_attempt_breaks(srv, dest, run_fetch)
        srv.script("/pub/file.bin", [Fault.wrong_content_range()])
        srv.reset_stats()
        r = run_fetch("--mirror", srv.url + "pub/", "--dest", dest, "--procs", "1")
        assert r.code == 0, r
        statuses = [q.status for q in srv.requests if q.is_file]
        assert statuses == [206, 200], statuses
    assert (dest / "file.bin").read_bytes() == data


def test_a_partial_of_a_weak_etag_resumes_by_its_date(tmp_path: Path, run_fetch: RunFetch) -> None:
    """A weak ETag never matches ``If-Range``: the resume names the version by its date."""
    dest = tmp_path / "dest"
    data = random.Random(12).randbytes(SIZE)
    with _serving() as srv:
        srv.add_file("/pub/file.bin", data, etag='W/"v1"', last_modified=1_700_000_000)
        _first_attempt_breaks(srv, dest, run_fetch)
        srv.reset_stats()
        r = run_fetch("--mirror", srv.url + "pub/", "--dest", dest, "--procs", "1")
        assert r.code == 0, r
        (req,) = [q for q in srv.requests if q.path == "/pub/file.bin"]
        assert req.headers.get("if-range") == "Tue, 14 Nov 2023 22:13:20 GMT", req.headers
        assert req.status == 206 and srv.file_bytes_sent == SIZE - MIB
    assert (dest / "file.bin").read_bytes() == data


@pytest.mark.parametrize("planted", ["partial", "sidecar"])
def test_a_link_planted_among_the_partial_files_is_not_written_through(
    tmp_path: Path, run_fetch: RunFetch, planted: str
) -> None:
    """``DEST/.fetcher/partial/`` is fetch's own: a symbolic link there (someone who can
    write to DEST, with fetch run as root) pointed the next partial file, or sidecar, at
    any file; it was opened through the link and overwritten. It is not opened now: the
    file fails, naming the link, and what it points at is as it was."""
    dest = tmp_path / "dest"
    victim = tmp_path / "victim.conf"
    victim.write_bytes(b"root:x:0:0\n")
    data = random.Random(13).randbytes(SIZE)
    part, meta = partial_paths(dest, RelPath("file.bin"))
    part.parent.mkdir(parents=True)
    link = part if planted == "partial" else meta.with_name(meta.name + ".tmp")
    link.symlink_to(victim)
    with _serving() as srv:
        srv.add_file("/pub/file.bin", data)
        r = run_fetch("--mirror", srv.url + "pub/", "--dest", dest, "--procs", "1",
                      "--retries", "1")  # fmt: skip
    assert r.code == 1, r
    assert "Too many levels of symbolic links" in r.output and link.name in r.output, r.output
    assert victim.read_bytes() == b"root:x:0:0\n"
    assert link.is_symlink() and not (dest / "file.bin").exists()


def _make_whole(dest: Path, data: bytes) -> None:
    """The partial file of ``file.bin`` holds all of ``data``: a run stopped after the last
    byte came and before the file took its name."""
    (part,) = _parts(dest)
    with part.open("ab") as fh:
        fh.write(data[part.stat().st_size :])


def test_a_partial_file_already_whole_takes_its_name_without_its_body_again(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """The resume from the partial's end gets a 416 with ``Content-Range: bytes */N``, N
    its length: the partial is checked and named, not fetched again whole."""
    dest = tmp_path / "dest"
    data = random.Random(8).randbytes(SIZE)
    with _serving() as srv:
        srv.add_file("/pub/file.bin", data)
        _first_attempt_breaks(srv, dest, run_fetch)
        _make_whole(dest, data)
        srv.reset_stats()
        r = run_fetch("--mirror", srv.url + "pub/", "--dest", dest, "--procs", "1")
        assert r.code == 0, r
        (req,) = [q for q in srv.requests if q.path == "/pub/file.bin"]
        assert req.headers.get("range") == f"bytes={SIZE}-" and req.headers.get("if-range")
        assert req.status == 416 and srv.file_bytes_sent == 0
    assert (dest / "file.bin").read_bytes() == data
    assert _parts(dest) == [] and not list((dest / ".fetcher" / "partial").iterdir())


@pytest.mark.parametrize("if_range", [True, False], ids=["if-range", "no-if-range"])
def test_a_whole_partial_of_an_older_version_is_not_named(
    tmp_path: Path, run_fetch: RunFetch, if_range: bool
) -> None:
    """The file changed upstream since: a server that honours If-Range answers it whole;
    one that does not says, in its 416, that the file is no longer the partial's length."""
    dest = tmp_path / "dest"
    old = random.Random(9).randbytes(SIZE)
    new = random.Random(10).randbytes(SIZE - MIB if not if_range else SIZE)
    with _serving() as srv:
        srv.add_file("/pub/file.bin", old)
        _first_attempt_breaks(srv, dest, run_fetch)
        _make_whole(dest, old)
        srv.add_file("/pub/file.bin", new)  # a new ETag
        if not if_range:
            srv.persist("/pub/file.bin", Fault.ignore_if_range())
        srv.reset_stats()
        r = run_fetch("--mirror", srv.url + "pub/", "--dest", dest, "--procs", "1")
        assert r.code == 0, r
        statuses = [q.status for q in srv.requests if q.path == "/pub/file.bin"]
        assert statuses == ([200] if if_range else [416, 200]), statuses
    assert (dest / "file.bin").read_bytes() == new
    assert _parts(dest) == []


@pytest.mark.parametrize("kind", ["nginx", "caddy", "apache", "lighttpd"])
def test_a_whole_partial_against_real_servers(
    tmp_path: Path, run_fetch: RunFetch, kind: str
) -> None:
    """Each answers the resume's If-Range that names its version with a 416. nginx gives
    only ``Content-Range: bytes */N``, caddy its validators with it: the partial takes its
    name. Apache and lighttpd say nothing of the file's length: it is fetched again."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    data = random.Random(11).randbytes(SIZE)
    (src / "pub").mkdir(parents=True)
    (src / "pub" / "file.bin").write_bytes(data)
    day_ago = time.time() - 86_400  # (Apache's ETag is weak for a file changed this second)
    os.utime(src / "pub" / "file.bin", (day_ago, day_ago))
    with serve(kind, src, tmp_path / kind) as srv:
        url = srv.url + "pub/file.bin"
        head = httpx.head(url).headers
        assert not head["etag"].startswith("W/"), head
        part, meta = partial_paths(dest, RelPath("file.bin"))
        part.parent.mkdir(parents=True)
        part.write_bytes(data)
        meta.write_text(
            json.dumps(
                {"url": url, "etag": head["etag"], "last_modified": head["last-modified"],
                 "size": SIZE}
            )
        )  # fmt: skip
        r = run_fetch("--mirror", srv.url + "pub/", "--dest", dest, "--procs", "1")
        assert r.code == 0, r
        named = kind in ("nginx", "caddy")
        want = [(416, f"bytes={SIZE}-")] + ([] if named else [(200, None)])
        logged = srv.requests(min_count=2 + len(want))
        gets = [q for q in logged if q.path == "/pub/file.bin" and q.method == "GET"]
        assert [(q.status, q.range) for q in gets] == want, gets
    assert (dest / "file.bin").read_bytes() == data
    assert not part.exists() and not meta.exists()


# --- the same at the seam: fetch_file over httpx.MockTransport ------------------------------

URL = "http://mirror.test/pub/file.bin"
_CHUNK = 256 * 1024


class _Body(httpx.SyncByteStream):
    """A body streamed as sent (``content=`` would be read up front, and iter_raw refuses);
    ``break_after`` cuts the connection after that many bytes."""

    def __init__(self, data: bytes, break_after: int | None = None) -> None:
        self.data = data
        self.break_after = break_after

    def __iter__(self) -> Iterator[bytes]:
        for pos in range(0, len(self.data), _CHUNK):
            if self.break_after is not None and pos >= self.break_after:
                raise httpx.ReadError("connection reset by peer")
            yield self.data[pos : pos + _CHUNK]


def _response(
    status: int, headers: dict[str, str], body: bytes, break_after: int | None = None
) -> httpx.Response:
    headers = {**headers, "Content-Length": str(len(body))}
    return httpx.Response(status, headers=headers, stream=_Body(body, break_after))


def _fetch(tmp_path: Path, size: int, handler: Callable[[httpx.Request], httpx.Response]) -> Any:
    f = RemoteFile(URL, RelPath("file.bin"), size, True)
    t = Transfer(dest=str(tmp_path), root="http://mirror.test/pub/", retries=2,
                 backoff_initial=0.0, backoff_max=0.0)  # fmt: skip
    with httpx.MockTransport(handler) as transport:
        retrying = build_retrying(t, sleep=lambda s: None)
        return fetch_file(transport, Job(f, Action.RESUME), t, retrying=retrying)


def _break_first(tmp_path: Path, data: bytes, headers: dict[str, str]) -> None:
    """A first fetch whose connection breaks after 1 MiB, twice: a partial file is kept."""
    out = _fetch(tmp_path, len(data), lambda r: _response(200, headers, data, break_after=MIB))
    assert out.status is Status.FAILED and "broke" in (out.error or ""), out
    part, _ = partial_paths(tmp_path, RelPath("file.bin"))
    assert part.stat().st_size == MIB


def test_206_with_a_different_etag_is_not_spliced(tmp_path: Path) -> None:
    """A server (or cache) that honours Range but ignores If-Range must not splice."""
    old, new = b"A" * (2 * MIB), b"B" * (2 * MIB)
    _break_first(tmp_path, old, {"ETag": '"old"'})
    seen: list[httpx.Headers] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        rng = request.headers.get("range")
        if rng:  # If-Range ignored: the range of the NEW content
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            crange = f"bytes {start}-{len(new) - 1}/{len(new)}"
            return _response(206, {"ETag": '"new"', "Content-Range": crange}, new[start:])
        return _response(200, {"ETag": '"new"'}, new)

    out = _fetch(tmp_path, len(new), handler)
    assert seen[0].get("if-range") == '"old"' and seen[0].get("range") == f"bytes={MIB}-"
    assert out.status is Status.FETCHED, out
    assert (tmp_path / "file.bin").read_bytes() == new


def test_206_with_a_different_total_is_not_spliced(tmp_path: Path) -> None:
    """No ETag, same Last-Modified, If-Range ignored: the new total length gives it away."""
    lm = "Tue, 14 Nov 2023 22:13:20 GMT"
    old, new = b"A" * (2 * MIB), b"B" * (3 * MIB)
    _break_first(tmp_path, old, {"Last-Modified": lm})

    def handler(request: httpx.Request) -> httpx.Response:
        rng = request.headers.get("range")
        if rng:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            crange = f"bytes {start}-{len(new) - 1}/{len(new)}"
            return _response(206, {"Last-Modified": lm, "Content-Range": crange}, new[start:])
        return _response(200, {"Last-Modified": lm}, new)

    out = _fetch(tmp_path, len(new), handler)
    assert out.status is Status.FETCHED, out
    assert (tmp_path / "file.bin").read_bytes() == new


@pytest.mark.parametrize("etag", ['"v1"', None])
def test_resume_continues_a_matching_partial(tmp_path: Path, etag: str | None) -> None:
    """The ordinary case: If-Range carries the ETag (else the date); the 206 is appended."""
    data = random.Random(6).randbytes(2 * MIB)
    headers = {"Last-Modified": "Tue, 14 Nov 2023 22:13:20 GMT"}
    if etag:
        headers["ETag"] = etag
    _break_first(tmp_path, data, headers)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["range"] == f"bytes={MIB}-"
        assert request.headers["if-range"] == (etag or headers["Last-Modified"])
        crange = f"bytes {MIB}-{len(data) - 1}/{len(data)}"
        return _response(206, {**headers, "Content-Range": crange}, data[MIB:])

    out = _fetch(tmp_path, len(data), handler)
    assert out.status is Status.FETCHED and out.received == MIB, out
    assert (tmp_path / "file.bin").read_bytes() == data


def test_a_partial_file_someone_else_wrote_into_is_not_published(tmp_path: Path) -> None:
    """A worker of a killed run may write into a partial file for up to a second after
    the next run resumed it: the bytes counted are then not the file's. Its size is
    checked before it takes the final name; the attempt fails and the retry fetches it
    whole (it was published at the wrong size, with exit 0)."""
    import fetcher.download as download

    body = os.urandom(3 << 20)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "big.bin").write_bytes(body)
    real = download.stream_body
    meddled: list[int] = []

    def stream_body(ctx: Any, resp: Any, fd: int, mode: str, digest: Any, cap: Any) -> int:
        received = real(ctx, resp, fd, mode, digest, cap)
        if mode == "ab" and not meddled:  # resuming: the other writer adds a piece
            meddled.append(received)
            with open(f"/proc/self/fd/{fd}", "ab") as other:
                other.write(b"x" * 30_000)
        return received

    with FaultServer(root=tmp_path / "www") as srv:
        srv.script("/big.bin", [Fault.drop_after(1 << 20)])  # a partial file to resume
        t = Transfer(dest=str(tmp_path / "d"), root=srv.url, backoff_initial=0.0)
        f = RemoteFile(srv.url + "big.bin", RelPath("big.bin"), len(body), True)
        with make_transport(t) as transport, pytest.MonkeyPatch.context() as mp:
            mp.setattr(download, "stream_body", stream_body)
            out = fetch_file(transport, Job(f, Action.NEW), t,
                             retrying=build_retrying(t, sleep=lambda s: None))  # fmt: skip
    assert meddled == [len(body) - (1 << 20)]  # the resumed attempt's bytes
    assert out.status is Status.FETCHED, out
    assert (tmp_path / "d" / "big.bin").read_bytes() == body


def test_a_restart_cut_off_before_its_first_byte_leaves_nothing_to_splice(
    tmp_path: Path,
) -> None:
    """A resume answered 200 (the file changed) starts the partial file over. Ended right
    there (here: the disk full as the partial file is opened; a kill alike), the old
    version's bytes were left under the new version's validator, and the next attempt
    resumed them with a 206: two versions in one file. The sidecar now changes only
    after the partial file has."""
    import errno

    import fetcher.landing as landing

    old = random.Random(4).randbytes(SIZE)
    new = random.Random(5).randbytes(SIZE)  # same size and date: only the ETag differs
    with _serving() as srv:
        srv.add_file("/pub/file.bin", old, last_modified=1_700_000_000)
        srv.script("/pub/file.bin", [Fault.drop_after(MIB)])
        t = Transfer(dest=str(tmp_path / "d"), root=srv.url + "pub/", retries=1)
        f = RemoteFile(srv.url + "pub/file.bin", RelPath("file.bin"), SIZE, True)

        def once() -> Any:
            with make_transport(t) as transport:
                return fetch_file(transport, Job(f, Action.NEW), t,
                                  retrying=build_retrying(t, sleep=lambda s: None))  # fmt: skip

        assert once().status is Status.FAILED  # 1 MiB kept, with the old ETag beside it
        srv.add_file("/pub/file.bin", new, last_modified=1_700_000_000)

        def full(self: Any, part: Path, mode: str) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(part))

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(landing.Out, "open_partial", full)
            assert once().fatal
        out = once()
    assert out.status is Status.FETCHED, out
    got = (tmp_path / "d" / "file.bin").read_bytes()
    assert got[:MIB] != old[:MIB], "spliced: the old first MiB survived"
    assert got == new
