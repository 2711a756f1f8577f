"""Incremental sync against real servers: unchanged re-runs fetch no bodies, one change
fetches one file, conditional GETs accept 304, ``--delete`` and its guard, ``--dry-run``
touches nothing, the state schema, adoption of a tree made by another tool, and the
memory of a 200,000-file dry run.  Every count is the server's own."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fetcher.landing import partial_paths
from fetcher.models import RelPath
from fetcher.state import SCHEMA_VERSION
from tests.faultserver import Fault, FaultServer, nginx_listing
from tests.faultserver import serving as _serving
from tests.servers import serve
from tests.trees import make_simple_tree, tree_manifest

OLD = 1_700_000_000.0
"""Source mtimes: fixed and old, so listing dates are stable across runs."""
NEWER = OLD + 3 * 3600 + 7 * 60
"""A date that differs from OLD in the listing (minutes, hours), for a changed file."""

RunFetch = Callable[..., Any]


def _make_source(root: Path, files: int = 30, dirs: int = 3) -> dict[str, str | None]:
    make_simple_tree(root, files=files, dirs=dirs, min_size=512, max_size=8192, seed=3)
    for p in root.rglob("*"):
        os.utime(p, (OLD, OLD))
    return tree_manifest(root)


def _file_paths(manifest: dict[str, str | None]) -> list[str]:
    return [p for p, v in manifest.items() if v is not None]


def _file_requests(srv: FaultServer) -> list[str]:
    """Requests to anything but a directory listing (GET or HEAD, any status)."""
    return [r.path for r in srv.requests if not r.path.endswith("/")]


def _change(path: Path, data: bytes, when: float = NEWER) -> None:
    path.write_bytes(data)
    os.utime(path, (when, when))


def _assert_same(dest: Path, src: Path) -> None:
    got, want = tree_manifest(dest), tree_manifest(src)
    assert got == want, (
        f"missing {sorted(set(want) - set(got))[:5]}, extra {sorted(set(got) - set(want))[:5]},"
        f" differ {[p for p in want if p in got and got[p] != want[p]][:5]}"
    )
    assert not list((dest / ".fetcher" / "partial").glob("*.part")), "partial files left"


def _report(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text("utf-8"))
    job: dict[str, Any] = doc["jobs"][0]
    return job


# --- 1. unchanged re-run, then one change ------------------------------------------------


def test_a_rewrite_in_the_minute_of_the_last_fetch_is_not_missed(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """A listing's dates are to the minute: a file fetched in the minute it changed, then
    rewritten in that minute to the same size, shows the same line. It was skipped for
    good; the next run now asks the server (git's "racily clean" files)."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    minute = time.time() // 60 * 60  # this minute's start: both versions are dated in it
    (src / "status.json").write_bytes(b'{"build": 1}')
    os.utime(src / "status.json", (minute + 1, minute + 1))
    (src / "old.txt").write_bytes(b"settled")
    os.utime(src / "old.txt", (1_700_000_000, 1_700_000_000))
    with FaultServer(root=src) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        (src / "status.json").write_bytes(b'{"build": 2}')  # same size, same listed minute
        os.utime(src / "status.json", (minute + 2, minute + 2))
        srv.reset_stats()
        r = run_fetch("--mirror", srv.url, "--dest", dest)
        assert r.code == 0, r.output
        assert (dest / "status.json").read_bytes() == b'{"build": 2}', r.output
        asked = [q for q in srv.requests if q.is_file or q.path.endswith((".json", ".txt"))]
    # a conditional GET for the racy file only; the settled one is not asked
    assert [(q.path, "if-none-match" in q.headers) for q in asked] == [("/status.json", True)]


def test_a_version_rolled_back_upstream_is_fetched_although_the_server_says_304(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """The listing shows another size, with an older date; a server without ETags answers
    the row's If-Modified-Since with 304. That 304 kept the newer local file, and the
    listing's new stamp was recorded against it: stale for good."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    (src / "pkg.tar").write_bytes(b"NEW" * 100)
    os.utime(src / "pkg.tar", (1_700_036_000, 1_700_036_000))
    with FaultServer(root=src) as srv:
        srv.set_etag("/pkg.tar", None)  # (Apache's FileETag None)
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        (src / "pkg.tar").write_bytes(b"old" * 80)  # the version before, rolled back
        os.utime(src / "pkg.tar", (1_700_000_000, 1_700_000_000))
        srv.set_etag("/pkg.tar", None)
        for _ in range(2):  # (the second run: nothing left to do)
            r = run_fetch("--mirror", srv.url, "--dest", dest)
            assert r.code == 0, r.output
            assert (dest / "pkg.tar").read_bytes() == b"old" * 80, r.output
        gets = [q for q in srv.requests if q.path == "/pkg.tar"]
    assert "if-modified-since" not in gets[1].headers  # asked for whole, not conditionally
    assert len(gets) == 2


def test_unchanged_rerun_fetches_nothing_then_one_change_fetches_one(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    manifest = _make_source(src)
    with _serving(src) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1")
        r = run_fetch(*args)
        assert r.code == 0, r
        _assert_same(dest, src)
        assert sorted(_file_requests(srv)) == sorted("/" + p for p in _file_paths(manifest))

        srv.reset_stats()
        r = run_fetch(*args)
        assert r.code == 0, r
        assert _file_requests(srv) == [], "an unchanged re-run requested files"
        assert srv.file_bytes_sent == 0
        assert srv.count(method="GET") == 4  # the root and three directory listings

        changed = _file_paths(manifest)[7]
        _change(src / changed, b"new content, new size\n" * 50)
        srv.reset_stats()
        r = run_fetch(*args)
        assert r.code == 0, r
        assert _file_requests(srv) == ["/" + changed]
        _assert_same(dest, src)
        assert (dest / changed).stat().st_mtime == NEWER


@pytest.mark.real_server
def test_unchanged_rerun_against_nginx(tmp_path: Path, run_fetch: RunFetch) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    manifest = _make_source(src)
    with serve("nginx", src, tmp_path / "nginx") as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1")
        r = run_fetch(*args)
        assert r.code == 0, r
        _assert_same(dest, src)
        first = len(srv.requests(min_count=len(manifest) + 1))

        r = run_fetch(*args)
        assert r.code == 0, r
        second = srv.requests(min_count=first + 4)[first:]
        assert [q.path for q in second if not q.path.endswith("/")] == []
        assert len(second) == 4, second

        # Same size, a new date: nginx shows minutes, so the change is a new minute.
        changed = _file_paths(manifest)[11]
        size = (src / changed).stat().st_size
        _change(src / changed, bytes(size))
        r = run_fetch(*args)
        assert r.code == 0, r
        third = srv.requests(min_count=first + 4 + 5)[first + 4 :]
        fetched = [q for q in third if not q.path.endswith("/")]
        assert [q.path for q in fetched] == ["/" + changed], third
        assert fetched[0].bytes_sent == size
        _assert_same(dest, src)


@pytest.mark.real_server
def test_a_resync_repairs_what_was_lost_or_damaged_in_dest(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    # The plan looks at DEST's known files and directories while the first listings are
    # on their way (disk.Disk.read_rows): what it saw there must be what it acts on.
    src, dest = tmp_path / "src", tmp_path / "dest"
    files = _file_paths(_make_source(src, files=30, dirs=3))
    with serve("nginx", src, tmp_path / "nginx") as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1")
        r = run_fetch(*args)
        assert r.code == 0, r
        first = len(srv.requests(min_count=len(files) + 4))
        lost = files[0]
        cut = next(p for p in files if not p.startswith(lost.split("/")[0] + "/"))
        gone_dir = next(p for p in files if "/" in p and not p.startswith(cut.split("/")[0]))
        gone_dir = gone_dir.split("/")[0]
        (dest / lost).unlink()
        with open(dest / cut, "r+b") as f:
            f.truncate(10)
        shutil.rmtree(dest / gone_dir)
        r = run_fetch(*args)
        assert r.code == 0, r
        _assert_same(dest, src)
        again = srv.requests(min_count=first + 4)[first:]
        want = {lost, cut} | {p for p in files if p.startswith(gone_dir + "/")}
        assert {q.path[1:] for q in again if not q.path.endswith("/")} == want
        assert {q.status for q in again} == {200}  # in full: no 304 keeps a damaged copy


def test_kept_directories_are_checked_while_nothing_else_is_waiting(tmp_path: Path) -> None:
    # With every known file looked at and the first listings still on their way, read_rows
    # checks the kept listings' directories as intact() would, and intact() answers from
    # that: as of the look, as the plan's own answers are (see the test below).
    from fetcher.disk import Disk
    from fetcher.models import Listing, Outcome, Status, names_digest
    from fetcher.state import State

    dest = tmp_path / "d"
    st = State.open(dest)
    try:
        run_id = st.begin_run("http://mirror.test/")
        paths = [f"a/f{i}" for i in range(3)] + [f"b/g{i}" for i in range(2)]
        for p in paths:
            st.record(run_id, Outcome(RelPath(p), "http://mirror.test/" + p, Status.FETCHED,
                                      size=2, mtime=1.0, stamp="s"))  # fmt: skip
            (dest / p).parent.mkdir(parents=True, exist_ok=True)
            (dest / p).write_bytes(b"xy")
        st.flush()

        def kept(d: str, n: int) -> Listing:
            names = names_digest([(p, "s") for p in paths if p.startswith(d + "/")])
            return Listing(f"http://mirror.test/{d}/", d, b"page", names, n, (), b"fp")

        a, b = kept("a", 3), kept("b", 2)
        disk = Disk(dest, st)
        disk.read_rows(lambda: True, {a.url: a, b.url: b})
        assert set(disk._checked) == {"a", "b"}
        (dest / "a" / "f0").unlink()  # after the check: its answer stands for this run
        assert disk.intact("a", a) == (("a/f0", "a/f1", "a/f2"), 6)
        assert disk.intact("b", b) == (("b/g0", "b/g1"), 4)
        other = kept("a", 2)  # not the listing checked (two files): asked afresh
        assert disk.intact("a", other) is None

        assert disk.found is not None and sorted(disk.found) == sorted(paths)  # DEST listed
        (dest / "a" / "mine.txt").write_bytes(b"of nobody's")
        import fetcher.disk

        with pytest.MonkeyPatch.context() as m:
            m.setattr(fetcher.disk, "ROWS_AT_ONCE", 4)  # DEST has 5 files now
            big = Disk(dest, st)  # DEST holds more files than the state: prune() walks it
            big.read_rows(lambda: True, {a.url: a, b.url: b})
            assert big._checked and big.found is None

        late = Disk(dest, st)  # the crawl's first answer came before the files were looked at
        late.read_rows(lambda: False, {a.url: a, b.url: b})
        assert late._checked == {} and late.found is None
        assert late.intact("a", a) is None and late.intact("b", b) == (("b/g0", "b/g1"), 4)
    finally:
        st.close()


def test_the_plan_looks_at_known_files_only_while_nothing_else_is_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fetcher.disk import Disk, _stat
    from fetcher.models import Outcome, Status
    from fetcher.state import State

    dest = tmp_path / "d"
    st = State.open(dest)
    try:
        run_id = st.begin_run("http://mirror.test/")
        paths = [f"a/b/f{i:03d}" for i in range(200)] + ["top"]
        for p in paths:
            st.record(run_id, Outcome(RelPath(p), "http://mirror.test/" + p, Status.FETCHED,
                                      size=1, mtime=1.0, stamp="x"))  # fmt: skip
        st.flush()
        (dest / "a" / "b").mkdir(parents=True)
        for p in paths[::2]:
            (dest / p).write_bytes(b"x")
        disk = Disk(dest, st)
        answers = iter([True, True, False])
        disk.read_rows(lambda: next(answers))  # the first listing came after two looks
        assert len(disk._looked) == 128  # 64 files a look
        assert disk._dirs == {"a", "a/b"}
        (dest / paths[0]).unlink()  # looked at before this: the plan sees it as it was
        assert disk.local(RelPath(paths[0])) is not None
        assert disk.local(RelPath(paths[0])) is None  # once; then it looks again
        assert all(disk.local(RelPath(p)) == _stat(str(dest / p)) for p in paths[1:])
        made: list[Path] = []
        monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: made.append(self))
        disk.add_dir(RelPath("a/b"), create=True)  # known to be there: not made again
        disk.add_dir(RelPath("a/c"), create=True)
        assert made == [dest / "a" / "c"]
    finally:
        st.close()


# --- 2. no sizes or dates in the listing: conditional GET ---------------------------------


def test_conditional_get_when_listing_has_no_metadata_python(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    manifest = _make_source(src, files=12, dirs=2)
    files = _file_paths(manifest)
    with serve("python", src, tmp_path / "py") as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1")
        r = run_fetch(*args)
        assert r.code == 0, r
        _assert_same(dest, src)
        first = len(srv.requests(min_count=len(manifest) + 1))

        r = run_fetch(*args)
        assert r.code == 0, r
        second = srv.requests(min_count=first + len(files) + 3)[first:]
        gets = [q for q in second if not q.path.endswith("/")]
        assert sorted(q.path for q in gets) == sorted("/" + p for p in files)
        # http.server answers If-Modified-Since with 304 and no body
        assert {q.status for q in gets} == {304}, gets
        _assert_same(dest, src)


def _bare_listing(names: list[str]) -> bytes:
    links = "".join(f'<li><a href="{n}">{n}</a></li>\n' for n in names)
    return f"<html><body><ul>\n{links}</ul></body></html>\n".encode()


def test_conditional_get_sends_validators_and_accepts_304(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    dest = tmp_path / "dest"
    names = [f"f{i}.bin" for i in range(6)]
    with _serving() as srv:
        for i, n in enumerate(names):
            srv.add_file(f"/pub/{n}", os.urandom(3000 + i), last_modified=OLD + i * 60)
        srv.add_listing("/pub/", _bare_listing(names))
        args = ("--mirror", srv.url + "pub/", "--dest", dest, "--procs", "1")
        r = run_fetch(*args)
        assert r.code == 0, r
        assert srv.file_bytes_sent == sum(3000 + i for i in range(6))

        srv.reset_stats()
        r = run_fetch(*args)
        assert r.code == 0, r
        gets = [q for q in srv.requests if not q.path.endswith("/")]
        assert len(gets) == len(names)
        for q in gets:
            assert "if-none-match" in q.headers and "if-modified-since" in q.headers, q.headers
            assert q.status == 304, q
        assert srv.file_bytes_sent == 0

        # a changed file answers 200 to the same conditional GET and is replaced
        srv.add_file("/pub/f2.bin", b"changed\n", last_modified=NEWER)
        srv.reset_stats()
        r = run_fetch(*args)
        assert r.code == 0, r
        assert [q.status for q in srv.requests if q.is_file] == [200]
        assert (dest / "f2.bin").read_bytes() == b"changed\n"
        assert (dest / "f2.bin").stat().st_mtime == NEWER


# --- 7. --delete, the guard, vanished files, listing errors ------------------------------


@pytest.fixture
def mirrored(tmp_path: Path, run_fetch: RunFetch) -> Any:
    """A 20-file source on the fault server, already mirrored once."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    manifest = _make_source(src, files=20, dirs=2)
    with _serving(src) as srv:
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1")
        assert r.code == 0, r
        yield srv, src, dest, _file_paths(manifest)


_KILLED_AFTER_ONE_DELETE = """
import os, signal, sys
real = os.unlink
dest = sys.argv[sys.argv.index("--dest") + 1]

def unlink(path, *a, **k):
    real(path, *a, **k)
    if os.fspath(path).startswith(dest + "/") and "/.fetcher/" not in os.fspath(path):
        os.killpg(0, signal.SIGKILL)  # the first file --delete removes is gone

os.unlink = unlink
from fetcher.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _sums(root: Path) -> None:
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
             for p in sorted(root.glob("*.bin"))]  # fmt: skip
    (root / "SHA256SUMS").write_text("".join(lines))
    os.utime(root / "SHA256SUMS", (OLD + len(lines), OLD + len(lines)))


def test_a_run_killed_while_it_deletes_leaves_no_rows_for_what_it_deleted(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """``--delete`` removed the files, then their rows: a run killed in between left the
    rows of files gone from DEST and from upstream, which no later run looks at again
    (deletion starts from DEST's files). ``--verify-only`` reported them missing for
    good, and their directory's listing could never be kept. The rows go first; a file
    left without one is still not upstream, and the next ``--delete`` removes it."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}.bin").write_bytes(bytes([i]) * (1000 + i))
    _sums(src)
    for p in src.rglob("*.bin"):
        os.utime(p, (OLD, OLD))
    with _serving(src) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest, "--verify").code == 0
        for i in (1, 2, 3):
            (src / f"f{i}.bin").unlink()
        _sums(src)
        argv = [sys.executable, "-c", _KILLED_AFTER_ONE_DELETE, "--mirror", srv.url,
                "--dest", str(dest), "--verify", "--delete", "--force", "-q"]  # fmt: skip
        proc = subprocess.run(argv, cwd=Path(__file__).resolve().parent.parent,
                              capture_output=True, start_new_session=True, timeout=60,
                              check=False)  # fmt: skip
        assert proc.returncode == -9, proc.stderr.decode()
        assert sum((dest / f"f{i}.bin").exists() for i in (1, 2, 3)) == 2
        r = run_fetch("--verify-only", dest)
        assert r.code == 0, r.output
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--verify", "--delete", "--force")
        assert r.code == 0, r.output
    _assert_same(dest, src)
    con = sqlite3.connect(dest / ".fetcher" / "state.sqlite")
    try:
        rows = {path for (path,) in con.execute("SELECT path FROM files")}
    finally:
        con.close()
    assert rows == {p.name for p in src.iterdir()}


def test_delete_removes_one_vanished_file_and_reports_it(
    mirrored: Any, tmp_path: Path, run_fetch: RunFetch
) -> None:
    srv, src, dest, files = mirrored
    gone = files[4]
    (src / gone).unlink()
    report = tmp_path / "report.json"
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete", "--report", report)
    assert r.code == 0, r
    assert not (dest / gone).exists()
    assert _report(report)["deleted"] == [gone]
    assert "deleted" in r.output
    _assert_same(dest, src)
    con = sqlite3.connect(dest / ".fetcher" / "state.sqlite")
    try:
        assert con.execute("SELECT COUNT(*) FROM files WHERE path = ?", (gone,)).fetchone()[0] == 0
    finally:
        con.close()


def test_delete_removes_directories_not_upstream_and_lists_them(
    mirrored: Any, tmp_path: Path, run_fetch: RunFetch
) -> None:
    """Directories that are not upstream go once empty, as with ``rsync --delete``, the
    user's own empty ones too, and each is listed (they went silently): not an excluded
    one, not one upstream that is empty, not one holding a link to a directory."""
    srv, src, dest, _files = mirrored
    (src / "old").mkdir()
    (src / "old" / "x.bin").write_bytes(b"x" * 100)
    (src / "empty-upstream").mkdir()
    assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
    assert (dest / "old" / "x.bin").exists() and (dest / "empty-upstream").is_dir()
    shutil.rmtree(src / "old")
    for d in ("mine/empty", "excluded", "links"):
        (dest / d).mkdir(parents=True)
    (dest / "links" / "to-dir").symlink_to(tmp_path)
    report = tmp_path / "report.json"
    args = ["--mirror", srv.url, "--dest", dest, "--delete", "--exclude", "excluded",
            "--report", report]  # fmt: skip
    dry = run_fetch(*args, "--dry-run")
    assert dry.code == 0, dry.output
    assert (dest / "old" / "x.bin").exists() and (dest / "mine" / "empty").is_dir()
    would = {line.split()[-1] for line in dry.output.splitlines() if "would delete" in line}
    assert would == {"old/x.bin", "old/", "mine/", "mine/empty/"}, dry.output
    r = run_fetch(*args)
    assert r.code == 0, r.output
    got = _report(report)
    assert got["deleted"] == ["old/x.bin"]
    assert sorted(got["deleted_dirs"]) == ["mine/", "mine/empty/", "old/"]
    assert "mine/empty/" in r.output  # in the summary's list, as deleted files are
    assert not (dest / "old").exists() and not (dest / "mine").exists()
    for d in ("excluded", "links", "empty-upstream"):
        assert (dest / d).is_dir(), d
    (dest / "links" / "to-dir").unlink()
    for d in ("excluded", "links"):
        (dest / d).rmdir()
    _assert_same(dest, src)  # and nothing else went


def test_without_delete_vanished_files_are_kept_and_counted(
    mirrored: Any, tmp_path: Path, run_fetch: RunFetch
) -> None:
    srv, src, dest, files = mirrored
    for p in files[:3]:
        (src / p).unlink()
    report = tmp_path / "report.json"
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--report", report)
    assert r.code == 0, r
    assert all((dest / p).exists() for p in files[:3])
    job = _report(report)
    assert job["vanished"] == 3 and job["deleted"] == []
    assert "gone upstream (kept)" in r.output


@pytest.mark.parametrize("rows_at_once", [20_000, 3])
def test_vanished_files_are_the_same_read_at_once_or_in_batches(
    mirrored: Any,
    tmp_path: Path,
    run_fetch: RunFetch,
    monkeypatch: pytest.MonkeyPatch,
    rows_at_once: int,
) -> None:
    # A small state's sightings are read in one pass (State.seen_in); a big one's are
    # asked 500 local files at a time (seen_among). Both find the same files.
    from fetcher.state import State

    monkeypatch.setattr("fetcher.state.ROWS_AT_ONCE", rows_at_once)
    asked: list[int] = []
    among = State.seen_among
    monkeypatch.setattr(
        State, "seen_among", lambda st, r, p: asked.append(len(p)) or among(st, r, p)
    )
    srv, src, dest, files = mirrored
    for p in files[:3]:
        (src / p).unlink()
    (dest / "d000" / "mine.txt").write_bytes(b"not upstream, never fetched")
    report = tmp_path / "report.json"
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--report", report)
    assert r.code == 0, r
    assert _report(report)["vanished"] == 4
    assert (sum(asked) > 0) is (rows_at_once < len(files))
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete", "--force", "--report", report)
    assert r.code == 0, r
    assert sorted(_report(report)["deleted"]) == sorted([*files[:3], "d000/mine.txt"])
    _assert_same(dest, src)


@pytest.mark.parametrize("rows_at_once", [20_000, 3])
def test_a_stray_whose_name_is_not_utf8_is_counted_and_deleted(
    mirrored: Any,
    tmp_path: Path,
    run_fetch: RunFetch,
    monkeypatch: pytest.MonkeyPatch,
    rows_at_once: int,
) -> None:
    # A local file no fetch made (left by another tool) whose name's bytes are not UTF-8:
    # its path, surrogate-escaped, went into the state's queries, which cannot encode it.
    # The run ended in a traceback, every --delete run after it too, with nothing deleted.
    monkeypatch.setattr("fetcher.state.ROWS_AT_ONCE", rows_at_once)
    srv, src, dest, files = mirrored
    (src / files[0]).unlink()
    stray = os.fsdecode(b"d000/stray\xff\xfe.bin")
    (dest / stray).write_bytes(b"not upstream, never fetched")
    report = tmp_path / "report.json"
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--report", report)
    assert r.code == 0, r
    assert _report(report)["vanished"] == 2
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete", "--force", "--report", report)
    assert r.code == 0, r
    assert sorted(_report(report)["deleted"]) == sorted([files[0], stray])
    _assert_same(dest, src)


def test_delete_guard_refuses_half_the_tree_unless_forced(
    mirrored: Any, tmp_path: Path, run_fetch: RunFetch
) -> None:
    srv, src, dest, files = mirrored
    gone = [p for p in files if p.startswith("d001/")]
    assert len(gone) == len(files) // 2
    shutil.rmtree(src / "d001")  # half the files, and their directory
    before = tree_manifest(dest)
    report = tmp_path / "report.json"
    args = ("--mirror", srv.url, "--dest", dest, "--delete", "--report", report)
    r = run_fetch(*args)
    assert r.code == 1, r
    assert tree_manifest(dest) == before, "the guard let files be deleted"
    assert _report(report)["deleted"] == []
    assert "max-delete" in r.output

    r = run_fetch(*args, "--force")
    assert r.code == 0, r
    assert sorted(_report(report)["deleted"]) == sorted(gone)
    _assert_same(dest, src)  # the emptied directory went too
    assert not (dest / "d001").exists()


def test_deleted_paths_are_listed_in_the_summary(mirrored: Any, run_fetch: RunFetch) -> None:
    srv, src, dest, files = mirrored
    (src / files[4]).unlink()
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete")
    assert r.code == 0, r
    assert files[4] in r.output, r.output


def test_listing_error_blocks_all_deletion(
    mirrored: Any, tmp_path: Path, run_fetch: RunFetch
) -> None:
    srv, src, dest, files = mirrored
    top = [p for p in files if p.startswith("d000/")]
    (src / top[0]).unlink()
    srv.persist("/d001/", Fault.status(500))
    srv.reset_stats()
    before = tree_manifest(dest)
    report = tmp_path / "report.json"
    r = run_fetch(
        "--mirror", srv.url, "--dest", dest, "--delete", "--force", "--retries", "1",
        "--report", report,
    )  # fmt: skip
    assert r.code == 1, r
    assert tree_manifest(dest) == before, "files were deleted after an incomplete crawl"
    job = _report(report)
    assert job["deleted"] == [] and job["listing_errors"], job
    assert srv.count(path="/d001/") == 1  # --retries 1: one attempt


# --- 8. --dry-run -----------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, tuple[bool, int, int, str]]:
    out: dict[str, tuple[bool, int, int, str]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[p.relative_to(root).as_posix()] = (p.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return out


def test_dry_run_changes_nothing_and_shows_the_plan(
    mirrored: Any, tmp_path: Path, run_fetch: RunFetch
) -> None:
    srv, src, dest, files = mirrored
    _change(src / files[0], b"changed upstream\n" * 100)
    (src / files[1]).unlink()
    (src / "d000" / "brand-new.bin").write_bytes(b"n" * 5000)
    before = _snapshot(dest)
    assert ".fetcher/state.sqlite" in before
    report = tmp_path / "report.json"
    srv.reset_stats()
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--dry-run", "--report", report)
    assert r.code == 0, r
    assert _snapshot(dest) == before, "the dry run changed DEST"
    assert _file_requests(srv) == []
    planned = _report(report)["planned"]
    assert planned["new"] == {"files": 1, "bytes": 5000}
    assert planned["changed"] == {"files": 1, "bytes": 1700}
    assert planned["skipped"]["files"] == len(files) - 2
    for label in ("to fetch: new", "to fetch: changed", "unchanged (skip)"):
        assert label in r.output, r.output


def test_dry_run_delete_lists_only_the_vanished_file(
    mirrored: Any, tmp_path: Path, run_fetch: RunFetch
) -> None:
    srv, src, dest, files = mirrored
    (src / files[1]).unlink()
    before = _snapshot(dest)
    report = tmp_path / "report.json"
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--dry-run", "--delete", "--report", report)
    assert r.code == 0, r
    assert _report(report)["deleted"] == [files[1]]
    assert "to delete" in r.output and f"would delete {files[1]}" in r.output
    assert _snapshot(dest) == before


def test_dry_run_delete_does_not_list_changed_files(
    mirrored: Any, tmp_path: Path, run_fetch: RunFetch
) -> None:
    srv, src, dest, files = mirrored
    _change(src / files[0], b"changed upstream\n" * 100)
    (src / files[1]).unlink()
    report = tmp_path / "report.json"
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--dry-run", "--delete", "--report", report)
    assert r.code == 0, r
    assert _report(report)["deleted"] == [files[1]]


def test_dry_run_on_a_fresh_dest_creates_nothing(tmp_path: Path, run_fetch: RunFetch) -> None:
    src = tmp_path / "src"
    manifest = _make_source(src, files=10, dirs=2)
    total = sum((src / p).stat().st_size for p in _file_paths(manifest))
    dest = tmp_path / "nothing" / "here"
    report = tmp_path / "report.json"
    with _serving(src) as srv:
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--dry-run", "--report", report)
        assert r.code == 0, r
        assert _file_requests(srv) == []
    assert not (tmp_path / "nothing").exists()
    assert _report(report)["planned"]["new"] == {"files": 10, "bytes": total}
    assert "to fetch: new" in r.output and "10" in r.output


_HOT_JOURNAL = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=DELETE")
db.execute("PRAGMA cache_size=1")  # pages go to the file before the commit
db.execute("BEGIN")
db.execute("UPDATE files SET size = size + 1, stamp = 'torn'")
for _ in range(50):
    db.execute("INSERT INTO runs (url) VALUES (?)", ("x" * 4000,))
os.kill(os.getpid(), 9)
"""


def test_a_dry_run_and_verify_only_read_a_state_left_with_a_hot_journal(
    mirrored: Any, tmp_path: Path, run_fetch: RunFetch
) -> None:
    """Each run switches the state to WAL as it opens it and back to a rollback journal as
    it closes it, both through ``state.sqlite-journal``: a run killed then leaves a hot
    journal, which only a connection that may write can roll back. A dry run (and
    ``--verify-only``) opens read-only and stopped with exit 4, telling the user to remove
    the state. They read a rolled-back copy instead, and DEST stays as it was."""
    srv, src, dest, files = mirrored
    db = dest / ".fetcher" / "state.sqlite"
    subprocess.run([sys.executable, "-c", _HOT_JOURNAL, str(db)], check=False, timeout=30)
    assert (dest / ".fetcher" / "state.sqlite-journal").stat().st_size > 0
    (src / files[1]).unlink()
    before = _snapshot(dest)
    report = tmp_path / "report.json"
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--dry-run", "--delete", "--report", report)
    assert r.code == 0, r.output
    planned = _report(report)["planned"]
    assert planned["skipped"]["files"] == len(files) - 1, planned  # the rows as committed
    assert _report(report)["deleted"] == [files[1]]
    r = run_fetch("--verify-only", dest)  # (a mirror of listings: no digests, but read)
    assert r.code == 0 and "nothing to check" in r.output, r.output
    assert _snapshot(dest) == before, "a read-only run changed DEST"
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete")
    assert r.code == 0, r.output
    assert not (dest / ".fetcher" / "state.sqlite-journal").exists()
    _assert_same(dest, src)


# --- 9. state schema, adoption ----------------------------------------------------------


def test_state_schema_version_and_newer_version_refused(mirrored: Any, run_fetch: RunFetch) -> None:
    srv, _, dest, _ = mirrored
    db = dest / ".fetcher" / "state.sqlite"
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        con.execute("PRAGMA user_version = 7")
    finally:
        con.close()
    for extra in ((), ("--dry-run",)):
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1", *extra)
        assert r.code == 4, r
        assert "schema version 7" in r.output and "Traceback" not in r.output, r.output
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 7, "a newer file was changed"
    finally:
        con.close()


def _indexes(db: Path) -> tuple[int, list[str]]:
    con = sqlite3.connect(db)
    try:
        names = con.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
        return con.execute("PRAGMA user_version").fetchone()[0], sorted(n for (n,) in names)
    finally:
        con.close()


def test_a_schema_1_state_file_is_brought_forward_and_its_rows_kept(
    mirrored: Any, run_fetch: RunFetch
) -> None:
    srv, src, dest, _ = mirrored
    db = dest / ".fetcher" / "state.sqlite"
    con = sqlite3.connect(db)
    try:  # as schema 1 left it: an index on last_seen, no runs.pipelined, no listings
        con.execute("CREATE INDEX files_last_seen ON files(last_seen)")
        con.execute("ALTER TABLE runs DROP COLUMN pipelined")
        con.execute("DROP TABLE listings")
        con.execute("PRAGMA user_version = 1")
        con.commit()
    finally:
        con.close()
    assert _indexes(db)[0] == 1 and "files_last_seen" in _indexes(db)[1]
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1", "--dry-run")
    assert r.code == 0, r
    assert _indexes(db)[0] == 1, "a dry run changed the state file"
    srv.reset_stats()
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1", "--delete")
    assert r.code == 0, r
    assert _file_requests(srv) == [], "the rows of schema 1 were not used"
    version, indexes = _indexes(db)
    assert version == SCHEMA_VERSION == 6 and "files_last_seen" not in indexes, indexes
    assert _last_run_pipelined(dest) == 1  # schema 3: the run's pipelined requests answered
    con = sqlite3.connect(db)
    try:  # schema 4: what each listing gave the run
        assert con.execute("SELECT COUNT(*) FROM listings").fetchone()[0] == 3
    finally:
        con.close()
    _assert_same(dest, src)


def test_a_schema_4_state_file_whose_listings_lack_their_path_is_brought_forward(
    mirrored: Any, run_fetch: RunFetch
) -> None:
    """Schema 4 as it was first written kept listings without their directory's path: the
    run brings the file forward (the kept listings go; the files' rows stay) instead of
    failing on the missing column."""
    srv, src, dest, _ = mirrored
    db = dest / ".fetcher" / "state.sqlite"
    con = sqlite3.connect(db)
    try:
        con.execute("DROP TABLE listings")
        con.execute(
            "CREATE TABLE listings (url TEXT PRIMARY KEY, digest BLOB NOT NULL, names BLOB NOT"
            " NULL, files INTEGER NOT NULL, dirs TEXT NOT NULL, fp BLOB NOT NULL)"
        )
        con.execute("PRAGMA user_version = 4")
        con.commit()
    finally:
        con.close()
    srv.reset_stats()
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1")
    assert r.code == 0 and "Traceback" not in r.output, r.output
    assert _file_requests(srv) == [], "the files' rows were not used"
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert (
            con.execute("SELECT COUNT(*) FROM listings WHERE path IS NOT NULL").fetchone()[0] == 3
        )
    finally:
        con.close()
    _assert_same(dest, src)


def test_unreadable_state_file_is_a_clear_error(mirrored: Any, run_fetch: RunFetch) -> None:
    srv, _, dest, _ = mirrored
    (dest / ".fetcher" / "state.sqlite").write_bytes(b"this is not a database\n" * 200)
    for extra in ((), ("--dry-run",)):
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1", *extra)
        assert r.code == 4, r
        assert "state database" in r.output and "Traceback" not in r.output, r.output


def test_a_state_file_another_program_holds_is_not_called_damaged(
    mirrored: Any, run_fetch: RunFetch
) -> None:
    """An sqlite3 shell in a write transaction on the state: the run stopped with the
    advice to remove the state file, which was whole."""
    import sqlite3

    srv, _, dest, _ = mirrored
    db = sqlite3.connect(dest / ".fetcher" / "state.sqlite", timeout=0)
    try:
        db.execute("BEGIN EXCLUSIVE")
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1")
    finally:
        db.rollback()
        db.close()
    assert r.code == 4, r
    assert "cannot read state database: database is locked" in r.output, r.output
    assert "another program has DEST/.fetcher/state.sqlite open" in r.output, r.output
    assert "remove DEST/.fetcher/state.sqlite" not in r.output, r.output
    assert run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1").code == 0


def test_a_state_file_damaged_past_its_header_is_a_clear_error_and_reported(
    mirrored: Any, tmp_path: Path, run_fetch: RunFetch
) -> None:
    """Pages after the first overwritten: the header reads fine, the tables do not (it was
    SQLite's traceback, exit 1, and no report)."""
    srv, _, dest, _ = mirrored
    db = dest / ".fetcher" / "state.sqlite"
    data = bytearray(db.read_bytes())
    assert len(data) > 4096
    data[4096:] = random.Random(5).randbytes(len(data) - 4096)
    db.write_bytes(bytes(data))
    report = tmp_path / "report.json"
    for extra in ((), ("--dry-run",)):
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1", "--report", report,
                      *extra)  # fmt: skip
        assert r.code == 4, r.output
        assert "cannot read state database" in r.output and "Traceback" not in r.output, r.output
        assert "remove DEST/.fetcher/state.sqlite" in r.output, r.output
        job = _report(report)
        assert "database disk image is malformed" in (job["fatal"] or job["error"]), job
    r = run_fetch("--verify-only", dest)
    assert r.code == 4 and "cannot read state database" in r.output, r.output
    db.unlink()  # the way out the message gives: files on disk are adopted
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1")
    assert r.code == 0, r.output


def test_start_up_error_releases_the_lock(mirrored: Any, run_fetch: RunFetch) -> None:
    srv, _, dest, _ = mirrored
    db = dest / ".fetcher" / "state.sqlite"
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA user_version = 7")
    finally:
        con.close()
    assert run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1").code == 4
    db.unlink()
    r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1")
    assert r.code == 0, r


def test_tree_made_by_another_tool_is_adopted(tmp_path: Path, run_fetch: RunFetch) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    _make_source(src)
    shutil.copytree(src, dest)  # copy2: same mtimes, no .fetcher
    with _serving(src) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1")
        r = run_fetch(*args)
        assert r.code == 0, r
        assert _file_requests(srv) == [], "an adoptable file was downloaded"
        _assert_same(dest, src)
        srv.reset_stats()
        r = run_fetch(*args)  # adopted rows make the next run a no-op too
        assert r.code == 0, r
        assert _file_requests(srv) == []


@pytest.mark.real_server
@pytest.mark.parametrize(
    ("tz", "files", "adopted"),
    [("Asia/Kolkata", 24, True), ("America/St_Johns", 24, True), ("Asia/Kolkata", 2, False)],
    ids=["india-24", "newfoundland-24", "india-2"],
)
def test_tree_made_by_another_tool_is_adopted_in_a_zone_not_whole_hours_from_utc(
    tmp_path: Path, run_fetch: RunFetch, tz: str, files: int, adopted: bool
) -> None:
    """nginx printing its local time (+5:30, -3:30): a tree whose files have the server's own
    times is adopted once three files agree on that offset, the first ones included; two
    files are too few to trust it, and are fetched (the listing could be another zone)."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    paths = _file_paths(_make_source(src, files=files, dirs=2))
    for i, rel in enumerate(sorted(paths)):
        os.utime(src / rel, (OLD + i * 4111, OLD + i * 4111))  # dates of their own
    shutil.copytree(src, dest)  # copy2: the same times, no .fetcher
    report = tmp_path / "report.json"
    with serve("nginx", src, tmp_path / "nginx", localtime=True, tz=tz) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1")
        r = run_fetch(*args, "--report", report)
        assert r.code == 0, r
        logged = srv.requests(min_count=len(paths) + 3)
        fetched = sorted(q.path[1:] for q in logged if not q.path.endswith("/"))
        assert fetched == ([] if adopted else sorted(paths)), fetched
        planned = _report(report)["planned"]
        assert planned.get("skipped", {}).get("files", 0) == (len(paths) if adopted else 0)
        _assert_same(dest, src)
        before = len(srv.requests(min_count=len(logged)))
        r = run_fetch(*args)  # recorded either way: the next run fetches nothing
        assert r.code == 0, r
        again = srv.requests(min_count=before + 3)[before:]
        assert [q.path for q in again if not q.path.endswith("/")] == []


def test_partly_adopted_tree_plans_each_directory_from_what_is_on_disk(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """One directory already there (adopted, fetched nothing), one absent (fetched); a
    partial file left by an earlier run is planned as a resume, not a new download."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    manifest = _make_source(src, files=12, dirs=3)
    files = _file_paths(manifest)
    have = sorted({p.split("/")[0] for p in files if "/" in p})[0]
    shutil.copytree(src / have, dest / have)  # copy2: same mtimes
    adopted = [p for p in files if p.startswith(have + "/")]
    missing = [p for p in files if p not in adopted]
    assert adopted and missing
    part, _ = partial_paths(dest, RelPath(missing[0]))
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x")
    report = tmp_path / "report.json"
    with _serving(src) as srv:
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--dry-run", "--report", report)
        assert r.code == 0, r
        planned = _report(report)["planned"]
        assert planned["resume"]["files"] == 1, planned
        assert planned["new"]["files"] == len(missing) - 1, planned
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1")
        assert r.code == 0, r
        fetched = sorted(p.lstrip("/") for p in _file_requests(srv))
    assert fetched == sorted(missing)
    _assert_same(dest, src)


# --- 9b. a re-run asks for the listings it knows at once ---------------------------------


def _deep_source(root: Path) -> None:
    """a/b/c/d/leaf.txt four levels down, a file beside each level, and e/gone/x.txt."""
    for rel in ("a/b/c/d/leaf.txt", "a/top.txt", "a/b/mid.txt", "a/b/c/low.txt", "e/gone/x.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode() * 40)
    for p in root.rglob("*"):
        os.utime(p, (OLD, OLD))


@pytest.mark.parametrize("extra", [(), ("--dry-run",)], ids=["kept-listings", "file-rows"])
def test_rerun_asks_known_listings_before_the_root_answers(
    tmp_path: Path, run_fetch: RunFetch, extra: tuple[str, ...]
) -> None:
    """The root's answer is held back until the deepest known listing has been asked for:
    a crawl that walks level by level could not ask for it first (it waits 5 s, then fails).
    The directories come from the kept listings, or (a dry run keeps none, nor reads
    them) from the files' rows."""
    import threading

    src, dest = tmp_path / "src", tmp_path / "dest"
    _deep_source(src)
    with _serving(src) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1")
        assert run_fetch(*args).code == 0
        args += extra
        srv.reset_stats()
        release = threading.Event()
        srv.script("/", [Fault.gated(release)])
        deep_first: list[bool] = []

        def watch() -> None:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not srv.count(path="/a/b/c/d/"):
                release.wait(0.01)
            deep_first.append(bool(srv.count(path="/a/b/c/d/")))
            release.set()

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            r = run_fetch(*args)
        finally:
            release.set()
            watcher.join(10)
        assert r.code == 0, r
        assert deep_first == [True], "the deep listing waited for the root's"
        assert _file_requests(srv) == []
        listings = sorted(q.path for q in srv.requests)
        assert listings == ["/", "/a/", "/a/b/", "/a/b/c/", "/a/b/c/d/", "/e/", "/e/gone/"]
        _assert_same(dest, src)


def _first_writes(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """Requests in the first write of each client connection (by socket), from now on."""
    import socket

    firsts: dict[int, int] = {}
    real = socket.socket.sendall

    def sendall(self: socket.socket, data: Any, *args: Any) -> Any:
        head = bytes(data[:4])
        if head == b"GET " and id(self) not in firsts:
            firsts[id(self)] = bytes(data).count(b" HTTP/1.1\r\n")
        return real(self, data, *args)

    monkeypatch.setattr(socket.socket, "sendall", sendall)
    return firsts


def _last_run_pipelined(dest: Path) -> int | None:
    con = sqlite3.connect(dest / ".fetcher" / "state.sqlite")
    try:
        row = con.execute("SELECT pipelined FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else row[0]
    finally:
        con.close()


def test_a_rerun_pipelines_from_its_first_request_while_the_server_keeps_up(
    tmp_path: Path, run_fetch: RunFetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a run whose requests sent ahead were all answered, the next one sends its
    listings ahead on a new connection at once (not after its first answer: a round trip
    less). A server that then closes each connection ends that: the run still completes,
    the state says so, and the run after it waits for proof again."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    _deep_source(src)
    with _serving(src) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1")
        firsts = _first_writes(monkeypatch)
        assert run_fetch(*args).code == 0
        assert firsts and max(firsts.values()) == 1, firsts  # a first run proves each connection
        assert _last_run_pipelined(dest) == 1

        firsts.clear()
        assert run_fetch(*args).code == 0
        assert max(firsts.values()) > 1, firsts  # listings sent ahead on the first write

        srv.keep_alive = False
        firsts.clear()
        srv.reset_stats()
        r = run_fetch(*args)
        assert r.code == 0, r
        assert _file_requests(srv) == []
        assert _last_run_pipelined(dest) == 0
        # only a connection opened before the first one closed sent requests ahead
        assert sum(n > 1 for n in firsts.values()) <= 2, firsts
        firsts.clear()
        assert run_fetch(*args).code == 0
        assert max(firsts.values()) == 1, firsts
    _assert_same(dest, src)


@pytest.mark.parametrize("how", ["removed", "unlinked", "failing"])
def test_a_known_directory_gone_upstream_is_no_listing_error(
    tmp_path: Path, run_fetch: RunFetch, how: str
) -> None:
    """A directory of the last run that is gone (404) or no longer in its parent's listing
    (still served) is asked for once, then ignored: the crawl is clean, --delete removes
    its files, and the listing of a directory still linked is what counts. One that fails
    is not retried once the crawl is over (nor waited for: the Retry-After is 30 s)."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    _deep_source(src)
    with _serving(src) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1", "--delete", "--force")
        assert run_fetch(*args).code == 0
        assert (dest / "e/gone/x.txt").is_file()
        if how == "removed":
            shutil.rmtree(src / "e/gone")
        else:
            srv.add_listing("/e/", nginx_listing("/e/", []))  # /e/gone/ is still served
        if how == "failing":  # and fails: not retried once the crawl is over
            srv.persist("/e/gone/", Fault.status(503, retry_after="30"))
        srv.reset_stats()
        started = time.monotonic()
        r = run_fetch(*args)
        assert r.code == 0, r
        assert time.monotonic() - started < 15, "waited out the Retry-After of a listing not needed"
        assert "listing" not in r.output.lower(), r.output
        assert not (dest / "e/gone").exists()
        assert srv.count(path="/e/gone/") == 1
        assert (dest / "a/b/c/d/leaf.txt").is_file()


def test_known_directories_below_the_start_within_depth_and_filters() -> None:
    from fetcher.crawl import CrawlOptions, _ahead
    from fetcher.models import Scope

    scope = Scope.for_start("http://h:8/pub/")
    known = [
        "http://h:8/pub/a/b/c/",
        "http://h:8/pub/a/b/",  # again, as an ancestor
        "http://h:8/pub/x%20y/",
        "http://h:8/other/z/",  # above the start
        "http://elsewhere/pub/q/",  # another server
        "http://h:8/pub/skip/deep/",
        "http://h:8/pub/a/../../etc/",  # not a path below the start
    ]
    got = [(d.url, d.path, d.depth) for d in _ahead(known, scope, CrawlOptions(depth=2))]
    assert got == [
        ("http://h:8/pub/a/", "a", 1),
        ("http://h:8/pub/skip/", "skip", 1),
        ("http://h:8/pub/x%20y/", "x y", 1),
        ("http://h:8/pub/a/b/", "a/b", 2),
        ("http://h:8/pub/skip/deep/", "skip/deep", 2),
    ]
    excluded = _ahead(known, scope, CrawlOptions(exclude=("skip",)))
    assert [d.path for d in excluded] == ["a", "x y", "a/b", "a/b/c"]
    assert all(
        d.ahead is not None and not d.ahead.done() for d in _ahead(known, scope, CrawlOptions())
    )


# --- 9c. a page as the last run read it, over files as it left them: not parsed ----------


def _count_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import fetcher.crawl

    pages: list[str] = []
    real = fetcher.crawl._parse

    def parse(body: bytes, url: str) -> Any:
        pages.append(url)
        return real(body, url)

    monkeypatch.setattr(fetcher.crawl, "_parse", parse)
    return pages


@contextlib.contextmanager
def _nginx_mirror(
    tmp_path: Path, run_fetch: RunFetch, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, Path, list[str], list[str], Path, tuple[Any, ...]]]:
    """A 30-file tree in three directories served by nginx, mirrored once with --report:
    (src, dest, files, the pages parsed since, the report, the arguments of that run)."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    files = _file_paths(_make_source(src, files=30, dirs=3))
    pages = _count_parses(monkeypatch)
    report = tmp_path / "report.json"
    with serve("nginx", src, tmp_path / "nginx") as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1", "--report", report)
        assert run_fetch(*args).code == 0
        assert len(pages) == 4  # the root and three directories
        yield src, dest, files, pages, report, args


@pytest.mark.real_server
def test_an_unchanged_page_over_intact_files_is_not_parsed_again(
    tmp_path: Path, run_fetch: RunFetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _nginx_mirror(tmp_path, run_fetch, monkeypatch) as (src, dest, files, pages, report, args):
        pages.clear()
        r = run_fetch(*args)
        assert r.code == 0, r
        assert pages == []  # every page as last time, every file in place
        job = _report(report)
        assert job["unchanged"]["files"] == len(files), job
        assert job["fetched"]["files"] == 0, job
        _assert_same(dest, src)

        # one file changed upstream: its page is read, the others are not
        changed = files[5]
        _change(src / changed, b"longer now\n" * 300)
        pages.clear()
        r = run_fetch(*args)
        assert r.code == 0, r
        assert [u.rstrip("/").rsplit("/", 1)[-1] for u in pages] == [changed.split("/")[0]]
        assert _report(report)["fetched"]["files"] == 1
        _assert_same(dest, src)
        pages.clear()
        assert run_fetch(*args).code == 0
        assert pages == []  # and it is kept again

        # another version of fetch (its readers may read a page better): each read again once
        import fetcher.crawl

        monkeypatch.setattr(fetcher.crawl, "__version__", "0.0.0+other")
        fetcher.crawl._options_key.cache_clear()
        try:
            pages.clear()
            assert run_fetch(*args).code == 0
            assert len(pages) == len({f.split("/")[0] for f in files}) + 1  # and the root's
            pages.clear()
            assert run_fetch(*args).code == 0
            assert pages == []
        finally:
            fetcher.crawl._options_key.cache_clear()  # (keys made with the other version)


@pytest.mark.real_server
def test_delete_keeps_the_files_of_pages_kept_unparsed_and_finds_strays_among_them(
    tmp_path: Path, run_fetch: RunFetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An unchanged directory's files are seen by the run without their rows being
    # written again (pipeline: run.unchanged): --delete must still know them upstream,
    # and a file of nobody's beside them is still a stray.
    with _nginx_mirror(tmp_path, run_fetch, monkeypatch) as (src, dest, files, pages, report, args):
        stray = dest / files[0].split("/")[0] / "mine.txt"
        stray.write_bytes(b"not upstream, never fetched")
        pages.clear()
        r = run_fetch(*args, "--delete")
        assert r.code == 0, r
        assert pages == []  # every page kept: no file of the mirror was seen one by one
        job = _report(report)
        assert job["deleted"] == [stray.relative_to(dest).as_posix()], job
        assert job["unchanged"]["files"] == len(files), job
        assert not stray.exists()
        _assert_same(dest, src)
        pages.clear()
        r = run_fetch(*args, "--delete")
        assert r.code == 0, r
        assert pages == [] and _report(report)["deleted"] == []
        _assert_same(dest, src)


def test_a_resync_whose_listings_take_a_while_checks_and_lists_dest_meanwhile(
    tmp_path: Path, run_fetch: RunFetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The listings are held until the plan has looked at DEST (read_rows): it has time to
    # check every kept directory and to list DEST, and the end of the run works from that
    # list instead of walking DEST again. A stray beside the mirror's files still goes.
    import threading

    import fetcher.pipeline
    import fetcher.prune
    from fetcher.disk import Disk

    src, dest = tmp_path / "src", tmp_path / "dest"
    files = _file_paths(_make_source(src, files=20, dirs=2))
    looked = threading.Event()
    real_read_rows = Disk.read_rows
    disks: list[Disk] = []

    def read_rows(disk: Disk, *args: Any) -> None:
        disks.append(disk)
        try:
            real_read_rows(disk, *args)
        finally:
            looked.set()

    walks: list[str] = []
    real_local_files = fetcher.prune.local_files

    def walked(dest: Path, skip: Any = frozenset()) -> Any:
        walks.append("prune")
        return real_local_files(dest, skip)

    report = tmp_path / "report.json"
    with _serving(src) as srv:
        args = ["--mirror", srv.url, "--dest", dest, "--procs", "1", "--report", report]
        assert run_fetch(*args).code == 0
        stray = dest / files[0].split("/")[0] / "mine.txt"
        stray.write_bytes(b"not upstream")
        monkeypatch.setattr(Disk, "read_rows", read_rows)
        monkeypatch.setattr(fetcher.prune, "local_files", walked)  # prune's own walk only
        srv.persist("/*", Fault.gated(looked))
        r = run_fetch(*args, "--delete", "--force")
        assert r.code == 0, r
    assert len(disks) == 1 and disks[0].found is not None
    assert len(disks[0]._checked) == 3  # the root and both directories, checked early
    assert walks == [], "prune walked DEST again"
    job = _report(report)
    assert job["deleted"] == [stray.relative_to(dest).as_posix()], job
    assert job["unchanged"]["files"] == len(files) and job["fetched"]["files"] == 0, job
    _assert_same(dest, src)


@pytest.mark.parametrize("damage", ["truncated", "removed", "partial", "excluded"])
def test_a_kept_page_is_read_again_when_dest_or_the_options_differ(
    tmp_path: Path, run_fetch: RunFetch, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    files = _file_paths(_make_source(src, files=20, dirs=2))
    victim = next(p for p in files if p.startswith("d001/"))
    pages = _count_parses(monkeypatch)
    report = tmp_path / "report.json"
    with _serving(src) as srv:
        args = ["--mirror", srv.url, "--dest", dest, "--procs", "1", "--report", report]
        assert run_fetch(*args).code == 0
        assert run_fetch(*args).code == 0
        if damage == "truncated":
            with open(dest / victim, "r+b") as f:
                f.truncate(3)
        elif damage == "removed":
            (dest / victim).unlink()
        elif damage == "partial":
            part, _meta = partial_paths(dest, RelPath(victim))
            part.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(b"left by a killed run")
        else:
            args += ["--exclude", "*.nothing"]  # another selection: its pages are read
        pages.clear()
        srv.reset_stats()
        r = run_fetch(*args)
        assert r.code == 0, r
        read = sorted(u.rstrip("/").rsplit("/", 1)[-1] for u in pages)
        if damage == "excluded":
            assert len(read) == 3 and _file_requests(srv) == []
        else:
            assert read == ["d001"]  # that directory's page, and only it
            assert _file_requests(srv) == ["/" + victim]
        _assert_same(dest, src)


def test_a_file_that_failed_keeps_its_page_read_until_it_is_in(
    tmp_path: Path, run_fetch: RunFetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    files = _file_paths(_make_source(src, files=10, dirs=1))
    pages = _count_parses(monkeypatch)
    with _serving(src) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1", "--retries", "1")
        srv.persist("/" + files[3], Fault.status(500))
        assert run_fetch(*args).code == 1
        srv.clear_faults()
        pages.clear()
        srv.reset_stats()
        r = run_fetch(*args)
        assert r.code == 0, r
        assert _file_requests(srv) == ["/" + files[3]]  # the page was read: it is fetched
        assert [u.rstrip("/").rsplit("/", 1)[-1] for u in pages] == ["d000"]  # not the root
        _assert_same(dest, src)
        pages.clear()
        assert run_fetch(*args).code == 0
        assert pages == []


def test_a_listing_reached_by_a_redirect_is_kept_for_the_directory_that_asked(
    tmp_path: Path, run_fetch: RunFetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "b/" redirects to "a/", whose page holds only a directory. Kept by the page's URL,
    # b's view of it (nothing below b) would have stood for a's on the next run, and a's
    # directory would not have been crawled: its files vanished, and --delete would
    # have removed them. Kept by the URL asked for, each directory has its own.
    www = tmp_path / "www"
    (www / "a" / "sub").mkdir(parents=True)
    (www / "a" / "sub" / "f.txt").write_bytes(b"below a directory-only page" * 10)
    (www / "b").mkdir()
    dest = tmp_path / "d"
    pages = _count_parses(monkeypatch)
    report = tmp_path / "report.json"
    with _serving(www) as srv:
        srv.persist("/b/", Fault.redirect(srv.url + "a/"))
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1", "--report", report)
        for _ in range(3):
            pages.clear()
            r = run_fetch(*args, "--delete")
            assert r.code == 0, r
            assert (dest / "a" / "sub" / "f.txt").exists()
            job = _report(report)
            assert job["vanished"] == 0 and job["deleted"] == [], job
        assert len(pages) < 4  # kept pages were used meanwhile


def test_the_kept_listing_of_a_directory_gone_upstream_goes_after_a_clean_crawl(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    _make_source(src, files=12, dirs=3)

    def kept() -> list[str]:
        con = sqlite3.connect(dest / ".fetcher" / "state.sqlite")
        try:
            return sorted(p for (p,) in con.execute("SELECT path FROM listings"))
        finally:
            con.close()

    with _serving(src) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1", "--retries", "1")
        assert run_fetch(*args).code == 0
        assert kept() == ["", "d000", "d001", "d002"]
        shutil.rmtree(src / "d002")
        srv.persist("/d001/", Fault.status(500))  # an unread listing: the crawl is not clean
        assert run_fetch(*args).code == 1
        assert kept() == ["", "d000", "d001", "d002"]
        srv.clear_faults()
        assert run_fetch(*args).code == 0
        assert kept() == ["", "d000", "d001"]


def test_kept_listings_round_trip_and_a_dry_run_reads_every_page(
    tmp_path: Path, run_fetch: RunFetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fetcher.models import Listing
    from fetcher.state import State

    st = State.open(tmp_path / "d")
    try:
        kept = Listing(
            "http://m.test/a/", "a", b"d" * 16, b"n" * 16, 2, (("http://m.test/a/b/", "a/b"),),
            b"f",
        )  # fmt: skip
        st.put_listing(kept)
        st.flush()
        assert st.listings() == {"http://m.test/a/": kept}
    finally:
        st.close()
    dry = State.open(tmp_path / "d", readonly=True)
    try:
        assert dry.listings() == {}  # a dry run plans every file itself
    finally:
        dry.close()
    src, dest = tmp_path / "src", tmp_path / "dest"
    _make_source(src, files=10, dirs=1)
    pages = _count_parses(monkeypatch)
    with _serving(src) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1").code == 0
        pages.clear()
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1", "--dry-run")
        assert r.code == 0, r
        assert len(pages) == 2


# --- 10. scale ----------------------------------------------------------------------------


@pytest.mark.slow
def test_dry_run_of_200k_files_stays_small(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    with _serving() as srv:
        tree = srv.add_generated_tree("/gen/", dirs=2000, files_per_dir=100)
        argv = [
            sys.executable, "-m", "fetcher", "--mirror", srv.url + "gen/",
            "--dest", str(tmp_path / "dest"), "--dry-run", "-q", "--report", str(report),
        ]  # fmt: skip
        started = time.monotonic()
        # Measure through a small wrapper process: a child forked straight from this
        # (large) pytest process would count pytest's own pages in its peak RSS.
        wrapper = (
            "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(rc)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", wrapper, *argv], cwd=Path(__file__).parent.parent,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240,
        )  # fmt: skip
        output = proc.stdout
        wall = time.monotonic() - started
    line = [x for x in output.decode(errors="replace").splitlines() if x.startswith("MAXRSS ")][-1]
    peak_mib = int(line.split()[1]) / 1024
    print(f"dry run of {tree.count} files: {wall:.1f} s wall, peak RSS {peak_mib:.0f} MiB")
    assert proc.returncode == 0, output.decode(errors="replace")[-2000:]
    planned = _report(report)["planned"]
    assert planned["new"]["files"] == tree.count == 200_000
    assert peak_mib < 300, f"peak RSS {peak_mib:.0f} MiB"


def _lookup_steps(tmp_path: Path, rows: int) -> int:
    """SQLite VM steps (in thousands) to ask which of 500 paths this run saw, with ``rows`` seen."""
    from fetcher.models import Outcome, Status
    from fetcher.state import State

    st = State.open(tmp_path / f"d{rows}")
    try:
        run_id = st.begin_run("http://mirror.test/")
        paths = [f"pool/{i % 50}/f{i}.deb" for i in range(rows)]
        for p in paths:
            st.record(run_id, Outcome(RelPath(p), "http://mirror.test/" + p, Status.FETCHED,
                                      size=1, mtime=1.0, stamp="x"))  # fmt: skip
        st.flush()
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        st._db.set_progress_handler(count, 1000)
        assert st.seen_among(run_id, paths[:500]) == set(paths[:500])
        st._db.set_progress_handler(None, 0)
        return steps[0]
    finally:
        st.close()


@pytest.mark.parametrize("delete", [False, True])
def test_vanished_files_from_a_listing_made_earlier_are_the_ones_still_there(
    tmp_path: Path, delete: bool
) -> None:
    # A re-sync lists DEST while its first listings are on their way (Disk.read_rows) and
    # prune() works from that list: a file listed then that is gone now, or is one of the
    # run's directories now (a file upstream became one), is not counted or deleted.
    from fetcher.config import build_job
    from fetcher.models import Outcome, Status, Summary
    from fetcher.prune import local_files, prune
    from fetcher.state import State

    dest = tmp_path / "d"
    for rel in ["seen.txt", "stray.txt", "gone.txt", "now_a_dir", "kept/same.txt"]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(b"x")
    st = State.open(dest)
    try:
        found = list(local_files(dest))
        assert sorted(found) == [
            "gone.txt", "kept/same.txt", "now_a_dir", "seen.txt", "stray.txt"
        ]  # fmt: skip
        (dest / "gone.txt").unlink()  # by someone else, meanwhile
        (dest / "now_a_dir").unlink()  # given way to the directory upstream
        (dest / "now_a_dir").mkdir()
        run_id = st.begin_run("http://127.0.0.1:9/")
        st.record(run_id, Outcome(RelPath("seen.txt"), "http://127.0.0.1:9/seen.txt",
                                  Status.UNCHANGED, size=1, mtime=1.0, stamp="s"))  # fmt: skip
        job = build_job(
            {"url": "http://127.0.0.1:9/", "dest": str(dest), "delete": delete, "force": True}, "t"
        )
        s = Summary(url=job.url, dest=str(dest), started=0.0)
        prune(job, s, st, run_id, dest, blocked=None, seen_dirs={"kept", "now_a_dir"},
              derived=None, unchanged={"kept/same.txt"}, found=found)  # fmt: skip
    finally:
        st.close()
    if delete:
        assert (s.deleted, s.failed) == (["stray.txt"], [])
        assert not (dest / "stray.txt").exists()
    else:
        assert (s.vanished, s.deleted) == (1, [])
    assert (dest / "now_a_dir").is_dir() and (dest / "kept" / "same.txt").exists()


def test_vanished_file_lookup_does_not_grow_with_the_mirror(tmp_path: Path) -> None:
    # The end of every run asks, 500 local files at a time, which ones the crawl saw.
    # Looked up by path, a batch costs the same however many files the run saw; read
    # through the last_seen index it cost every row of the run (quadratic in files).
    small, big = _lookup_steps(tmp_path, 1000), _lookup_steps(tmp_path, 16_000)
    assert big <= 2 * small + 2, (small, big)


def test_metadata_published_last_and_top_level_index_after_the_rest(
    tmp_path: Path, run_fetch
) -> None:
    www = tmp_path / "www"
    (www / "Packages").mkdir(parents=True)
    (www / "repodata").mkdir()
    for i in range(6):
        (www / "Packages" / f"p{i}.rpm").write_bytes(b"rpm" * (i + 1))
    (www / "repodata" / "abc-primary.xml.gz").write_bytes(b"primary")
    (www / "repodata" / "repomd.xml").write_bytes(b"<repomd/>")
    with FaultServer(root=www) as srv:
        r = run_fetch(
            "--mirror", srv.url, "--dest", tmp_path / "d", "--procs", "2", "--threads", "2"
        )
        assert r.code == 0, r
        reqs = [q for q in srv.requests if q.is_file]
    ends = {q.path: q.finished for q in reqs}
    starts = {q.path: q.started for q in reqs}
    last_package = max(t for p, t in ends.items() if p.startswith("/Packages/"))
    assert starts["/repodata/abc-primary.xml.gz"] >= last_package
    assert starts["/repodata/repomd.xml"] >= ends["/repodata/abc-primary.xml.gz"]


def test_a_directorys_rows_come_in_one_query(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The plan asks for the rows of a listing's files together (one range of the primary
    # key), which must hold exactly the paths below that directory.
    from fetcher.models import Outcome, Status
    from fetcher.state import State

    st = State.open(tmp_path / "d")
    try:
        run_id = st.begin_run("http://mirror.test/")
        paths = ["a/b/x", "a/b/sub/y", "a/bc/z", "a/b0", "a/b.txt", "a/b", "b/x", "a/a/x"]
        for p in paths:
            st.record(run_id, Outcome(RelPath(p), "http://mirror.test/" + p, Status.FETCHED,
                                      size=len(p), mtime=1.0, stamp="x"))  # fmt: skip
        st.flush()
        statements: list[str] = []
        st._db.set_trace_callback(statements.append)
        rows = st.rows_in("a/b")
        st._db.set_trace_callback(None)
        assert rows is not None and sorted(rows) == ["a/b/sub/y", "a/b/x"]
        assert rows["a/b/x"].size == len("a/b/x")
        assert len(statements) == 1
        assert st.rows_in("") is None  # the root: its files are asked for one by one
        monkeypatch.setattr("fetcher.state.ROWS_AT_ONCE", 1)
        assert st.rows_in("a/b") is None  # more than it holds at once: asked one by one
        assert st.rows_in("b") == {"b/x": st.get("b/x")}
        monkeypatch.setattr("fetcher.state.ROWS_AT_ONCE", len(paths))
        every = st.every_row()  # the whole state at once, while it is small
        assert every is not None and sorted(every) == sorted(paths)
        assert every["a/b/x"] == st.get("a/b/x")
        monkeypatch.setattr("fetcher.state.ROWS_AT_ONCE", len(paths) - 1)
        statements.clear()
        st._db.set_trace_callback(statements.append)
        assert st.every_row() is None
        st._db.set_trace_callback(None)
        assert not any("etag" in q for q in statements), statements  # counted, no row read
        assert st.directories() == [  # where files were: asked for at once by the next crawl
            "http://mirror.test/a/", "http://mirror.test/a/a/",
            "http://mirror.test/a/b/", "http://mirror.test/a/b/sub/", "http://mirror.test/a/bc/",
            "http://mirror.test/b/",
        ]  # fmt: skip
    finally:
        st.close()
    dry = State.open(tmp_path / "d", readonly=True)
    try:
        assert dry.rows_in("a/b") is None  # a dry run's sightings live elsewhere: get() answers
        assert dry.every_row() is None
    finally:
        dry.close()


@pytest.mark.parametrize("limit", [999, 23])
def test_the_state_is_written_in_groups_of_rows_within_sqlites_limit(
    tmp_path: Path, limit: int
) -> None:
    # A flush writes its rows a statement per group (not one per row: the sqlite3 module
    # lets go of the interpreter lock at every step), within the parameters SQLite allows:
    # 23 leaves groups of 2 rows of 11 columns. Every row lands; a path twice in one flush
    # keeps its last row; sightings and forgetting go by groups of paths too.
    from fetcher.models import Outcome, Status
    from fetcher.state import State

    st = State.open(tmp_path / "d")
    try:
        st._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)
        run_id = st.begin_run("http://mirror.test/")
        paths = [f"d{i % 7}/f{i:04d}" for i in range(2500)]
        for p in [*paths, paths[5]]:
            st.record(run_id, Outcome(RelPath(p), "http://mirror.test/" + p, Status.FETCHED,
                                      size=len(p), mtime=1.25, stamp=p))  # fmt: skip
        st.record(run_id, Outcome(RelPath(paths[5]), "http://mirror.test/x", Status.FETCHED,
                                  size=99, mtime=2.5, stamp="again"))  # fmt: skip
        statements: list[str] = []
        st._db.set_trace_callback(statements.append)
        st.flush()
        inserts = [q for q in statements if q.startswith("INSERT")]
        assert 2 <= len(inserts) <= 2502 // (limit // 11) + 1, len(inserts)
        assert st.count() == 2500
        again = st.get(paths[5])
        assert again is not None and (again.size, again.mtime, again.stamp) == (99, 2.5, "again")
        assert st.get(paths[2499]) == st.rows_in("d0")[paths[2499]]  # type: ignore[index]
        later = st.begin_run("http://mirror.test/")
        for p in paths[:1500]:
            st.seen(later, p)
        st.flush()
        marked = [p for p in paths if (row := st.get(p)) is not None and row.last_seen == later]
        assert marked == paths[:1500]
        st.forget(paths[:2000])
        assert st.count() == 500 and st.get(paths[0]) is None and st.get(paths[2000]) is not None
    finally:
        st.close()


def test_the_end_of_a_run_does_not_read_back_the_directories_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever is in a directory this run created, this run fetched: only the files in
    # directories that were there before are looked up as possibly gone upstream.
    from fetcher.config import build_job
    from fetcher.pipeline import mirror

    www = tmp_path / "www"
    for rel in ["top.txt", "old/a.txt", "new/b.txt", "new/deep/c.txt"]:
        (www / rel).parent.mkdir(parents=True, exist_ok=True)
        (www / rel).write_bytes(rel.encode())
    dest = tmp_path / "d"
    (dest / "old").mkdir(parents=True)
    (dest / "old" / "extra.txt").write_bytes(b"not upstream")
    import fetcher.disk
    import fetcher.pipeline
    import fetcher.prune

    asked: list[str] = []  # the local files the run looks at for the end of the run
    real = fetcher.prune.local_files

    def local_files(dest: Path, skip: Any = frozenset()) -> Any:
        for rel in real(dest, skip):
            asked.append(rel)
            yield rel

    monkeypatch.setattr(fetcher.prune, "local_files", local_files)
    monkeypatch.setattr(fetcher.pipeline, "local_files", local_files)
    monkeypatch.setattr(fetcher.disk, "local_files", local_files)  # (early, a re-sync)
    with FaultServer(root=www) as srv:
        job = build_job({"url": srv.url, "dest": str(dest), "procs": 1}, "t")
        first = mirror(job)
        assert (first.exit_code, first.fetched.files, first.vanished) == (0, 4, 1)
        assert sorted(asked) == ["old/a.txt", "old/extra.txt", "top.txt"]
        asked.clear()
        second = mirror(job)
    assert (second.exit_code, second.vanished) == (0, 1)
    assert sorted(asked) == [
        "new/b.txt", "new/deep/c.txt", "old/a.txt", "old/extra.txt", "top.txt"
    ]  # fmt: skip


def _grid(www: Path, dirs: int, files: int) -> Path:
    """``www/d{i}/f{j}.bin``, each file's bytes a function of its place."""
    for d in range(dirs):
        (www / f"d{d}").mkdir(parents=True)
        for f in range(files):
            (www / f"d{d}" / f"f{f}.bin").write_bytes(bytes([d, f]) * 40)
    return www


def test_a_crawl_stopped_through_the_api_is_not_complete_and_deletes_nothing(
    tmp_path: Path,
) -> None:
    """``mirror(job, stop=...)`` stopped mid-crawl: the crawl ends quietly, its last
    listings never read, so what it found is not all that is upstream. The run is
    interrupted and ``--delete`` (even forced) removes nothing; it removed every file
    of the unread directories while the crawl's end counted as its completion."""
    import threading

    from fetcher.config import build_job
    from fetcher.pipeline import mirror

    www = _grid(tmp_path / "www", 8, 5)
    dest = tmp_path / "d"
    options = {"dest": str(dest), "procs": 1, "delete": True, "force": True}
    with FaultServer(root=www) as srv:
        first = mirror(build_job({"url": srv.url, **options}, "t"))
        assert first.exit_code == 0 and first.fetched.files == 40
        gate, stop = threading.Event(), threading.Event()
        srv.persist("/d5/", Fault.gated(gate))

        def stop_while_d5_is_held() -> None:
            deadline = time.monotonic() + 30
            while srv.count(path="/d5/") < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            stop.set()
            gate.set()

        th = threading.Thread(target=stop_while_d5_is_held)
        th.start()
        try:
            second = mirror(build_job({"url": srv.url, **options}, "t"), stop=stop)
        finally:
            gate.set()
            th.join(timeout=30)
    assert second.interrupted and second.deleted == [], (second.deleted, second.notices)
    assert len([p for p in dest.rglob("*.bin") if ".fetcher" not in p.parts]) == 40


def test_delete_is_skipped_while_new_repository_metadata_is_held_back(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """Upstream rotates its repodata and adds a package that fails: the new repomd.xml is
    held back, so the old one is what clients read, and it names the old primary file,
    which --delete removed (a repository broken until the next good run)."""
    www = tmp_path / "www"
    (www / "repodata").mkdir(parents=True)
    (www / "Packages").mkdir()
    for i in range(40):
        (www / "Packages" / f"p{i}.rpm").write_bytes(bytes([i]) * 200)
    (www / "repodata" / "aaa-primary.xml.gz").write_bytes(b"old primary")
    (www / "repodata" / "repomd.xml").write_text("<repomd>aaa-primary.xml.gz</repomd>")
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete", "--procs", "1")
        assert r.code == 0, r.output
        (www / "repodata" / "aaa-primary.xml.gz").unlink()
        (www / "repodata" / "bbb-primary.xml.gz").write_bytes(b"new primary")
        (www / "repodata" / "repomd.xml").write_text("<repomd>bbb-primary.xml.gz</repomd>")
        (www / "Packages" / "p40.rpm").write_bytes(b"new package")
        srv.persist("/Packages/p40.rpm", Fault.status(500))
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete", "--procs", "1",
                      "--retries", "1")  # fmt: skip
    assert r.code == 1, r.output
    assert "metadata not published" in r.output, r.output
    assert "--delete skipped: the new repository metadata was not published" in r.output
    assert (dest / "repodata" / "repomd.xml").read_text() == "<repomd>aaa-primary.xml.gz</repomd>"
    assert (dest / "repodata" / "aaa-primary.xml.gz").read_bytes() == b"old primary"


def test_a_listing_ended_by_the_close_without_a_closing_tag_blocks_delete(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """A listing with neither a length nor chunks ends where the connection does: cut
    short, it looked whole, and --delete removed every file of the directories it no
    longer named. Whole (its closing tag at the end), it is read as any other."""
    import httpx

    www = _grid(tmp_path / "www", 6, 3)
    dest = tmp_path / "d"
    unframed = Fault.header("Content-Length", None) | Fault.header("Connection", "close")
    with FaultServer(root=www) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest, "--delete").code == 0
        page = httpx.get(srv.url).content
        srv.persist("/", unframed | Fault.drop_after(page.index(b"d3/")))
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete", "--force")
        assert "may be cut short" in r.output and "--delete skipped" in r.output, r.output
        assert len(list(dest.glob("d*/f*.bin"))) == 18
        (www / "d0" / "f0.bin").unlink()  # gone upstream; the listing whole, unframed
        srv.clear_faults()
        srv.persist("/", unframed)
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete")
    assert r.code == 0 and "may be cut short" not in r.output, r.output
    assert not (dest / "d0" / "f0.bin").exists() and len(list(dest.glob("d*/f*.bin"))) == 17


def test_a_compressed_listing_cut_short_within_its_length_blocks_delete(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """A listing sent gzip-compressed (though fetch asks for identity) whose stream stops
    before its end, inside a Content-Length that fits it: httpx's decoder gives the part
    it has without a word, the page looked whole, and --delete removed every file of the
    directories it no longer named."""
    import gzip
    import zlib

    import httpx

    www = _grid(tmp_path / "www", 6, 3)
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest, "--delete").code == 0
        page = httpx.get(srv.url).content
        packed = gzip.compress(page, mtime=0)
        cut = next(
            n for n in range(len(packed)) if b"d2/" in zlib.decompressobj(31).decompress(packed[:n])
        )
        srv.add_listing("/", packed[:cut])
        srv.persist("/", Fault.header("Content-Encoding", "gzip"))
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete", "--force")
        assert "may be cut short" in r.output and "--delete skipped" in r.output, r.output
        assert len(list(dest.glob("d*/f*.bin"))) == 18
        srv.add_listing("/", packed)  # whole, compressed: read as any other
        (www / "d0" / "f0.bin").unlink()
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete")
    assert r.code == 0 and "may be cut short" not in r.output, r.output
    assert not (dest / "d0" / "f0.bin").exists() and len(list(dest.glob("d*/f*.bin"))) == 17


def test_a_directory_linked_without_a_slash_is_crawled_and_past_depth_kept(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """A hand-written index links the directory ``a/deep`` as ``deep``: the server's
    redirect to ``deep/`` shows it is one, and it is crawled; past --depth it is out of
    the selection like the crawl's own such directories (it was a failed file, and
    --delete removed its files)."""
    www = tmp_path / "www"
    (www / "a" / "deep").mkdir(parents=True)
    (www / "b.bin").write_bytes(b"b" * 50)
    (www / "a" / "deep" / "g.bin").write_bytes(b"g" * 60)
    page = b'<html><body><pre><a href="../">../</a>\n<a href="deep">deep</a>\n</pre></body></html>'
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        srv.add_listing("/a/", page)
        r = run_fetch("--mirror", srv.url, "--dest", dest)
        assert r.code == 0, r.output
        assert "a/deep: a directory linked without '/'; crawled" in r.output
        assert (dest / "a" / "deep" / "g.bin").read_bytes() == b"g" * 60
        (www / "b.bin").unlink()  # gone upstream, within the depth
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete", "--force", "--depth", "1")
    assert r.code == 0, r.output
    assert "a/deep: a directory linked without '/', deeper than --depth 1" in r.output
    assert not (dest / "b.bin").exists()
    assert (dest / "a" / "deep" / "g.bin").read_bytes() == b"g" * 60


def test_delete_keeps_the_files_of_directories_past_depth(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """A directory past --depth is not crawled, so its files are not seen upstream: they
    are out of the run's selection, as excluded files are, and --delete keeps them (it
    removed every one, beside the run's own 'not crawled' notice)."""
    www = _grid(tmp_path / "www", 2, 3)
    for i in range(2):  # (names of their own: a listing the same as an ancestor's is a loop)
        (www / "d0" / "deep" / f"x{i}").mkdir(parents=True)
        for j in range(2):
            (www / "d0" / "deep" / f"x{i}" / f"g{j}.bin").write_bytes(bytes([i, j]) * 30)
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        assert len(list(dest.rglob("*.bin"))) == 10
        (www / "d1" / "f2.bin").unlink()  # gone upstream, within the depth
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete", "--force", "--depth", "2")
    assert r.code == 0 and "not crawled" in r.output, r.output
    assert not (dest / "d1" / "f2.bin").exists()
    assert len(list((dest / "d0" / "deep").rglob("g*.bin"))) == 4, r.output


def test_verify_only_on_a_mirror_without_digests_says_there_was_nothing_to_check(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """A mirror of plain listings records no digest: --verify-only said "every recorded
    digest matches", which a cron job's reader takes for a checked mirror."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a" * 100)
    (src / "b.bin").write_bytes(b"b" * 100)
    dest = tmp_path / "d"
    with _serving(src) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        r = run_fetch("--verify-only", dest)
        assert r.code == 0, r
        assert "nothing to check" in r.output and "every recorded digest" not in r.output, r
        (src / "SHA256SUMS").write_text(
            "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                    for p in sorted(src.glob("*.bin")))
        )  # fmt: skip
        dest = tmp_path / "verified"
        assert run_fetch("--mirror", srv.url, "--dest", dest, "--verify").code == 0
    r = run_fetch("--verify-only", dest)
    assert r.code == 0 and "every recorded digest matches (2 files)" in r.output, r


def test_a_dry_run_of_listings_without_sizes_does_not_plan_zero_bytes(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """Python's http.server (and plain Apache lists) show no sizes: the plan said
    "to fetch: new  3  0 B", as if the files were empty."""
    report = tmp_path / "report.json"
    with FaultServer() as srv:
        links = "".join(f'<a href="f{i}.bin">f{i}.bin</a>\n' for i in range(3))
        srv.add_listing("/d/", f"<html><body>{links}</body></html>".encode())
        for i in range(3):
            srv.add_file(f"/d/f{i}.bin", b"x" * 1000)
        r = run_fetch("--mirror", srv.url + "d/", "--dest", tmp_path / "o", "--dry-run",
                      "--report", report)  # fmt: skip
    assert r.code == 0, r
    assert re.search(r"to fetch: new\s+3\s+size unknown\n", r.output), r.output
    assert _report(report)["planned"]["new"] == {"files": 3, "bytes": 0, "unsized": 3}


def test_deletions_are_listed_in_path_order(tmp_path: Path, run_fetch: RunFetch) -> None:
    """They came in DEST's directory order (creation order, or a hash's), so two runs'
    reports and summaries of the same deletions differed."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep.bin").write_bytes(b"k" * 100)
    dest = tmp_path / "d"
    report = tmp_path / "report.json"
    with _serving(src) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        names = ["z.old", "a.old", "m.old", "b/c.old", "b.old"]
        (dest / "b").mkdir()
        for name in names:
            (dest / name).write_bytes(b"x")
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete", "--force",
                      "--report", report)  # fmt: skip
    assert r.code == 0, r.output
    assert _report(report)["deleted"] == sorted(names)
    assert re.findall(r"deleted (\S+\.old)", r.output) == sorted(names), r.output
