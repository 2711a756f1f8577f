"""How a downloaded file gets its name, against the fault server and nginx.

A small new file is written unnamed in its own directory (Linux ``O_TMPFILE``) and
linked to its name once complete; everything else goes through ``.fetcher/partial/``.
Either way no file is ever seen under its final name before it is whole.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

import fetcher.exchange as exchange
import fetcher.landing as landing
from fetcher.config import Transfer
from fetcher.download import RESUME_MIN, fetch_file
from fetcher.landing import partial_paths
from fetcher.models import Action, Job, Outcome, RelPath, RemoteFile, Status
from fetcher.retry import build_retrying
from fetcher.transport import make_transport
from tests.faultserver import Fault, FaultServer
from tests.servers import serve

WAIT = 10.0
OLD = 1_600_000_000

unnamed_files = pytest.mark.skipif(
    not landing.UNNAMED["ok"], reason="no O_TMPFILE or /proc here: always the partial file"
)


def _fetch(dest: Path, base: str, name: str, size: int, action: Action = Action.NEW) -> Outcome:
    t = Transfer(dest=str(dest), root=base, retries=1, read_timeout=2.0)
    job = Job(RemoteFile(base + name, RelPath(name), size, True), action)
    with make_transport(t) as transport:
        return fetch_file(transport, job, t, retrying=build_retrying(t, sleep=lambda s: None))


def _partials(dest: Path) -> list[str]:
    d = dest / ".fetcher" / "partial"
    return sorted(os.listdir(d)) if d.is_dir() else []


@unnamed_files
def test_a_small_new_file_has_no_name_until_it_is_whole(tmp_path: Path) -> None:
    data = os.urandom(200_000)
    (tmp_path / "www" / "sub").mkdir(parents=True)
    (tmp_path / "www" / "sub" / "f.deb").write_bytes(data)
    os.utime(tmp_path / "www" / "sub" / "f.deb", (OLD, OLD))
    dest = tmp_path / "d"
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/sub/f.deb", Fault.trickle(100_000))  # about 2 s of body
        done: list[Outcome] = []
        th = threading.Thread(
            target=lambda: done.append(_fetch(dest, srv.url, "sub/f.deb", len(data)))
        )
        th.start()
        try:
            deadline = time.monotonic() + WAIT
            while not (dest / "sub").is_dir() and time.monotonic() < deadline:
                time.sleep(0.01)
            # mid-transfer: the directory exists, the file has no name anywhere
            assert os.listdir(dest / "sub") == [] and _partials(dest) == []
            assert th.is_alive() and not done
        finally:
            th.join(WAIT)
    (out,) = done
    assert out.status is Status.FETCHED, out
    final = dest / "sub" / "f.deb"
    assert final.read_bytes() == data and final.stat().st_mtime == OLD
    assert oct(final.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert _partials(dest) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@unnamed_files
def test_a_small_file_cut_short_leaves_nothing_behind(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "f.bin").write_bytes(data)
    dest = tmp_path / "d"
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/f.bin", Fault.drop_after(100_000))
        out = _fetch(dest, srv.url, "f.bin", len(data))
    assert out.status is Status.FAILED and out.attempts == 1, out
    assert not (dest / "f.bin").exists()
    assert _partials(dest) == []  # the partial-file way left a dead .part here


def test_big_files_and_updates_still_go_through_the_partial_file(tmp_path: Path) -> None:
    big = os.urandom(RESUME_MIN + 100_000)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "big.bin").write_bytes(big)
    (tmp_path / "www" / "small.bin").write_bytes(b"new contents")
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "small.bin").write_bytes(b"old")
    with FaultServer(root=tmp_path / "www") as srv:
        # cut short: a big file keeps its partial file for a resume
        srv.script("/big.bin", [Fault.drop_after(RESUME_MIN // 2)])
        out = _fetch(dest, srv.url, "big.bin", len(big))
        assert out.status is Status.FAILED, out
        part, _ = partial_paths(dest, RelPath("big.bin"))
        assert part.exists() and not (dest / "big.bin").exists()
        out = _fetch(dest, srv.url, "big.bin", len(big), Action.RESUME)
        assert out.status is Status.FETCHED and (dest / "big.bin").read_bytes() == big
        # an update replaces the old file in one step
        out = _fetch(dest, srv.url, "small.bin", 12, Action.CHANGED)
    assert out.status is Status.FETCHED, out
    assert (dest / "small.bin").read_bytes() == b"new contents"
    assert _partials(dest) == []


@unnamed_files
def test_a_name_taken_since_the_plan_is_replaced_whole(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "f.bin").write_bytes(b"fresh" * 1000)
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "f.bin").write_bytes(b"stale")  # appeared after the plan called it new
    with FaultServer(root=tmp_path / "www") as srv:
        out = _fetch(dest, srv.url, "f.bin", 5000)
    assert out.status is Status.FETCHED, out
    assert (dest / "f.bin").read_bytes() == b"fresh" * 1000
    assert _partials(dest) == []


def test_local_files_and_directories_in_the_way_fail_those_files_only(
    tmp_path: Path, run_fetch
) -> None:
    www = tmp_path / "www"
    for rel in ("a/x.bin", "b/y.bin", "c/z.bin"):
        (www / rel).parent.mkdir(parents=True, exist_ok=True)
        (www / rel).write_bytes(rel.encode() * 500)
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "a").write_bytes(b"mine")  # a file where the mirror has a directory
    (dest / "b" / "y.bin" / "sub").mkdir(parents=True)  # a directory where it has a file
    with FaultServer(root=www) as srv:
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1")
    assert r.code == 1, r.output
    assert f"{dest / 'a'}: a local file where the mirror has a directory" in r.output
    assert f"{dest / 'b' / 'y.bin'}: Is a directory" in r.output
    assert (dest / "a").read_bytes() == b"mine" and (dest / "b" / "y.bin" / "sub").is_dir()
    assert (dest / "c" / "z.bin").read_bytes() == b"c/z.bin" * 500
    assert _partials(dest) == []


def test_a_file_that_became_a_directory_upstream_gives_way_if_the_mirror_fetched_it(
    tmp_path: Path, run_fetch
) -> None:
    # "a" and "b" were files, fetched; upstream both are directories now. "a" is as the
    # mirror fetched it: it gives way. "b" was edited here since: it is kept, and the
    # files below it fail, as any local file in the way does.
    www = tmp_path / "www"
    www.mkdir()
    for name in ("a", "b", "c", "f", "keep.txt"):
        (www / name).write_bytes(name.encode() * 300)
        os.utime(www / name, (1_700_000_001, 1_700_000_001))
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1")
        assert run_fetch(*args).code == 0
        # "f" is on a FAT disk, which keeps a file's time to 2 s: as the mirror's as "a"
        os.utime(dest / "f", (1_700_000_000, 1_700_000_000))
        for name in ("a", "b", "c", "f"):
            (www / name).unlink()
            (www / name / "sub").mkdir(parents=True)
            (www / name / "sub" / "inner.txt").write_bytes(name.encode() * 50)
        (dest / "b").write_bytes(b"edited here")
        (dest / "c").write_bytes(b"X" * 300)  # edited too, to the same size (it went)
        r = run_fetch(*args)
    assert r.code == 1, r.output
    for name in ("a", "f"):
        assert (dest / name / "sub" / "inner.txt").read_bytes() == name.encode() * 50
        assert f"{name}: a file fetched before is a directory upstream now; replaced" in r.output
    assert (dest / "b").read_bytes() == b"edited here"
    assert (dest / "c").read_bytes() == b"X" * 300
    assert f"{dest / 'b'}: a local file where the mirror has a directory" in r.output
    assert (dest / "keep.txt").read_bytes() == b"keep.txt" * 300
    con = sqlite3.connect(dest / ".fetcher" / "state.sqlite")
    try:
        paths = {p for (p,) in con.execute("SELECT path FROM files")}
    finally:
        con.close()
    assert "a" not in paths and "a/sub/inner.txt" in paths and "b" in paths
    assert "f" not in paths and "f/sub/inner.txt" in paths
    assert _partials(dest) == []


def test_a_directory_that_became_a_file_again_gives_way_unless_someone_s_file_is_in_it(
    tmp_path: Path, run_fetch
) -> None:
    """The reverse of the case above: "x" was a directory of the mirror's files and is a
    file upstream now. It failed ('Is a directory') on every run until --delete had
    cleared it, two runs later. A directory holding a file of someone else's stays."""
    www = tmp_path / "www"
    for name in ("x", "z"):
        (www / name / "sub").mkdir(parents=True)
        (www / name / "sub" / "y.bin").write_bytes(b"y" * 50)
        (www / name / "w.bin").write_bytes(b"w" * 60)
    (www / "keep.txt").write_bytes(b"k" * 10)
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1")
        assert run_fetch(*args).code == 0
        (dest / "z" / "mine.txt").write_bytes(b"mine")  # someone's, below z
        for name in ("x", "z"):
            shutil.rmtree(www / name)
            (www / name).write_bytes(name.encode() * 100)
        r = run_fetch(*args)
    assert r.code == 1, r.output  # z: in the way, as before
    assert "x: a directory fetched before is a file upstream now; replaced" in r.output
    assert (dest / "x").read_bytes() == b"x" * 100
    assert (dest / "z" / "mine.txt").read_bytes() == b"mine"
    assert (dest / "z" / "sub" / "y.bin").read_bytes() == b"y" * 50
    con = sqlite3.connect(dest / ".fetcher" / "state.sqlite")
    try:
        paths = {p for (p,) in con.execute("SELECT path FROM files")}
    finally:
        con.close()
    assert "x" in paths and not {"x/w.bin", "x/sub/y.bin"} & paths and "z/w.bin" in paths


@pytest.mark.parametrize("case", ["dry run", "big state"])
def test_a_directory_that_became_a_file_gives_way_in_a_dry_run_and_a_big_state(
    tmp_path: Path, run_fetch, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Whether "x" was a directory of the earlier run was told only by the state's rows
    read whole, which neither a dry run nor a state of over ROWS_AT_ONCE files does: a
    dry run --delete counted x's files as deletions the real run would not make (exit 1,
    "over the limit", for a run that then deleted within it), and a big mirror's real
    run failed x ('Is a directory'). Seen comparing a dry run with the run after it."""
    import fetcher.state

    www = tmp_path / "www"
    (www / "x").mkdir(parents=True)
    (www / "x" / "inner.bin").write_bytes(b"i" * 50)
    for i in range(5):
        (www / f"f{i}.bin").write_bytes(b"f" * 70)
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1", "--delete")
        assert run_fetch(*args).code == 0
        shutil.rmtree(www / "x")
        (www / "x").write_bytes(b"x" * 100)
        (www / "f0.bin").unlink()
        if case == "big state":
            monkeypatch.setattr(fetcher.state, "ROWS_AT_ONCE", 1)
        r = run_fetch(*args, "--max-delete", "1", *(["--dry-run"] if case == "dry run" else []))
    assert r.code == 0, r.output
    assert "x: a directory fetched before is a file upstream now; replaced" in r.output
    assert "over the limit" not in r.output, r.output
    if case == "dry run":
        assert "would delete f0.bin" in r.output, r.output
        assert (dest / "x" / "inner.bin").read_bytes() == b"i" * 50
    else:
        assert (dest / "x").read_bytes() == b"x" * 100
        assert not (dest / "f0.bin").exists()


def test_a_dry_run_plans_a_file_that_became_a_directory_as_the_run_does(
    tmp_path: Path, run_fetch
) -> None:
    """Upstream, the file "y" of the last run is a directory now. A --delete dry run
    counted y as a deletion, over --max-delete 0 (exit 1), where the run after it let y
    give way to the directory and deleted nothing (exit 0); seen comparing the two by
    hand. Now the dry run says what the run does."""
    www = tmp_path / "www"
    www.mkdir()
    for i in range(5):
        (www / f"f{i}.bin").write_bytes(b"f" * 70)
    (www / "y").write_bytes(b"y" * 40)
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1", "--delete")
        assert run_fetch(*args).code == 0
        (www / "y").unlink()
        (www / "y").mkdir()
        (www / "y" / "in.bin").write_bytes(b"i" * 30)
        dry = run_fetch(*args, "--max-delete", "0", "--dry-run")
        assert (dest / "y").read_bytes() == b"y" * 40  # (a dry run changes nothing)
        real = run_fetch(*args, "--max-delete", "0")
    note = "y: a file fetched before is a directory upstream now; replaced"
    for r in (dry, real):
        assert r.code == 0, r.output
        assert note in r.output, r.output
        assert "delete" not in r.output.replace("--delete", ""), r.output
    assert (dest / "y" / "in.bin").read_bytes() == b"i" * 30


def test_without_unnamed_files_the_partial_file_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that refuses O_TMPFILE (NFS, an old kernel): the partial-file way."""
    real_open = os.open

    def refusing(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
            raise OSError(95, "Operation not supported")  # EOPNOTSUPP
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing)
    monkeypatch.setitem(landing.UNNAMED, "ok", landing.UNNAMED["ok"])
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.bin").write_bytes(b"a" * 3000)
    (tmp_path / "www" / "b.bin").write_bytes(b"b" * 3000)
    dest = tmp_path / "d"
    with FaultServer(root=tmp_path / "www") as srv:
        outs = [_fetch(dest, srv.url, n, 3000) for n in ("a.bin", "b.bin")]
    assert [o.status for o in outs] == [Status.FETCHED, Status.FETCHED], outs
    assert (dest / "a.bin").read_bytes() == b"a" * 3000
    assert (dest / "b.bin").read_bytes() == b"b" * 3000
    assert landing.UNNAMED["ok"] is False  # asked once, then not again


@pytest.mark.real_server
def test_nginx_small_files_land_whole_with_their_dates(tmp_path: Path, run_fetch) -> None:
    src = tmp_path / "www"
    files = {f"d{i % 3}/f{i}.rpm": os.urandom(1000 + 997 * i) for i in range(30)}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
        os.utime(src / rel, (OLD + 60, OLD + 60))
    with serve("nginx", src, tmp_path / "nginx") as srv:
        r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "d", "--procs", "2")
    assert r.code == 0, r
    for rel, data in files.items():
        got = tmp_path / "d" / rel
        assert got.read_bytes() == data and got.stat().st_mtime == OLD + 60, rel
    assert _partials(tmp_path / "d") == []


def test_last_modified_read_by_position_agrees_with_the_general_parser() -> None:
    # download reads the usual IMF-fixdate by position; every answer must be the one
    # email.utils gives, for good dates and for near misses alike.
    import random
    from datetime import UTC, datetime
    from email.utils import format_datetime, parsedate_to_datetime

    def general(v: str) -> float | None:
        try:
            return parsedate_to_datetime(v).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None

    rng = random.Random(5)
    samples = [
        format_datetime(datetime.fromtimestamp(rng.uniform(0, 4e9), UTC), usegmt=True)
        for _ in range(2000)
    ]
    broken = ["Tue, 31 Feb 2026 10:00:00 GMT", "Tue, 10 Xyz 2026 10:00:00 GMT",
              "Tue, 10 Nov 2026 24:00:00 GMT", "Tue, 10 Nov 2026 10:00:61 GMT",
              "Tue, 1x Nov 2026 10:00:00 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
              "Sun Nov  6 08:49:37 1994", "Tue, 10 Nov 2026 10:00:00 UTC", "", "garbage"]  # fmt: skip
    for v in samples + broken:
        assert exchange.parse_last_modified(v) == general(v), v
    assert exchange.parse_last_modified("Sun, 06 Nov 1994 08:49:37 GMT") == 784111777.0


def test_a_plain_get_is_the_request_httpx_would_build(tmp_path: Path) -> None:
    # Below the root, plain_get builds the request with its Host header ready (httpx's
    # stream= form); elsewhere httpx builds it. Either way the same request goes out.
    import httpx

    from fetcher.transport import plain_get, request_headers

    root = "http://127.0.0.1:8080/pub/"
    t = Transfer(dest=str(tmp_path), root=root)
    urls = [root + "a/b%2Bc~1_amd64.deb", root + "x%20y/", root + "q?x=1",
            "http://127.0.0.1:8080/other/z", "http://127.0.0.1:8081/pub/a"]  # fmt: skip
    for url in urls:
        got = plain_get(url, t)
        want = httpx.Request("GET", url, headers=request_headers(t))
        assert (got.method, str(got.url), got.url.raw_path, got.headers.raw) == (
            want.method, str(want.url), want.url.raw_path, want.headers.raw
        ), url  # fmt: skip
        assert got.read() == b""


def test_files_below_the_root_are_asked_for_with_the_right_host(
    tmp_path: Path,
) -> None:
    www = tmp_path / "www"
    (www / "pub").mkdir(parents=True)
    (www / "pub" / "f.bin").write_bytes(b"f" * 100)
    with FaultServer(root=www) as srv:
        out = _fetch(tmp_path / "d", srv.url + "pub/", "f.bin", 100)
        (req,) = [q for q in srv.requests if q.path == "/pub/f.bin"]
    assert out.status is Status.FETCHED, out
    assert req.headers.get("host") == f"127.0.0.1:{srv.port}"
    assert req.headers.get("accept-encoding") == "identity"
    assert req.headers.get("user-agent", "").startswith("fetch/")
