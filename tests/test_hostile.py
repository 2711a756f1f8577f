"""Hostile and broken mirrors: nothing escapes DEST, nothing leaves the mirror, nothing hangs.

Every test runs the real CLI (``run_fetch``) or ``pipeline.mirror`` against the
scripted :class:`~tests.faultserver.FaultServer` on 127.0.0.1, and checks both
sides: what the server was asked for (its request log) and what landed on disk.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from fetcher.config import Transfer, build_job
from fetcher.crawl import CrawlOptions, crawl
from fetcher.download import fetch_file
from fetcher.listing import parse_listing
from fetcher.models import Action, CrawlProblem, Job, RelPath, RemoteFile, Status, Summary
from fetcher.pipeline import mirror
from fetcher.retry import build_retrying
from fetcher.transport import make_transport
from tests.faultserver import DirEntry, Fault, FaultServer, nginx_listing

START = "/pub/start/"
CANARY = "escape-canary-7f3a"
"""A name no test writes on purpose: finding it anywhere outside DEST means an escape."""


def _page(*hrefs: bytes, head: bytes = b"") -> bytes:
    """A bare listing page: one ``<a>`` per href, the href's bytes as the link text."""
    links = b"".join(b'<a href="' + h + b'">' + h + b"</a>\r\n" for h in hrefs)
    return b"<html><head>" + head + b"</head><body><pre>" + links + b"</pre></body></html>"


def _tree(root: Path) -> set[str]:
    """Every path below ``root``, relative, '/'-separated (symlinks not followed)."""
    out = set()
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirs + files:
            out.add(name if rel == "." else f"{rel}/{name}")
    return out


def _mirrored(dest: Path) -> set[str]:
    return {p for p in _tree(dest) if not p.startswith(".fetcher")}


def _no_traceback(output: str) -> None:
    assert "Traceback" not in output, output
    assert "unexpected " not in output, output  # crawl's last-resort catch of a bug


@pytest.fixture(autouse=True)
def _quiet_stderr(capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    """Nothing may print a traceback: not the CLI, not a thread, not a worker process."""
    yield
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


def _all_below_start(srv: FaultServer, start: str = START) -> None:
    bad = [(r.method, r.target) for r in srv.requests if not r.path.startswith(start)]
    assert not bad, f"requests outside {start}: {bad}"
    host = f"127.0.0.1:{srv.port}"
    other_host = [
        (r.target, r.headers.get("host")) for r in srv.requests if r.headers.get("host") != host
    ]
    assert not other_host, f"requests for another host name: {other_host}"


@contextlib.contextmanager
def _listener(host: str) -> Iterator[tuple[socket.socket, int]]:
    """A bare listening socket: a connection to it would sit in its accept queue."""
    sock = socket.create_server((host, 0))
    sock.setblocking(False)
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


def _bounded_mirror(srv: FaultServer, dest: Path, seconds: float, **options: object) -> Summary:
    """``pipeline.mirror`` of the start directory, stopped (and failed) if it outlasts ``seconds``."""
    job = build_job({"url": srv.url + START[1:], "dest": str(dest), "procs": 1, **options}, "t")
    stop, hung = threading.Event(), threading.Event()
    timer = threading.Timer(seconds, lambda: (hung.set(), stop.set()))
    timer.start()
    try:
        summary = mirror(job, stop=stop)
    finally:
        timer.cancel()
    assert not hung.is_set(), f"the run was still going after {seconds} s"
    return summary


def _accepted_nothing(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


# --- 1. escaping hrefs ------------------------------------------------------------


def test_escaping_hrefs_never_fetched_nor_written(tmp_path: Path, run_fetch) -> None:
    sandbox = tmp_path / "sandbox"
    dest = sandbox / "dest"
    sandbox.mkdir()
    before_tmp = set(os.listdir(tempfile.gettempdir()))
    with (
        FaultServer() as srv,
        FaultServer() as other,
        _listener("127.0.0.2") as (far, far_port),
    ):
        op = other.port
        escaping = [
            b"../",
            b"../" + CANARY.encode(),
            b"../../etc/passwd",
            b"../../../../../../../../tmp/" + CANARY.encode(),
            b"%2e%2e/",
            b"%2e%2e/" + CANARY.encode(),
            b"%2E%2E/" + CANARY.encode(),
            b"..%2f" + CANARY.encode(),
            b"%2e%2e%2f" + CANARY.encode(),
            b".%2e/" + CANARY.encode(),
            b"sub/../../" + CANARY.encode(),
            b"sub/%2e%2e/%2e%2e/" + CANARY.encode(),
            b"/etc/passwd",
            b"/pub/other/x",
            b"/pub/" + CANARY.encode(),
            b"/pub/startx/trap.txt",  # a prefix of the start path, not below it
            f"http://127.0.0.1:{op}{START}x.txt".encode(),
            f"//127.0.0.1:{op}{START}x.txt".encode(),
            f"//127.0.0.1:{op}/x".encode(),
            f"http://127.0.0.2:{far_port}{START}y.txt".encode(),
            f"//127.0.0.2:{far_port}/y".encode(),
            f"http://localhost:{srv.port}{START}viahost.txt".encode(),
            f"https://127.0.0.1:{srv.port}{START}tls.txt".encode(),
            f"ftp://127.0.0.1:{srv.port}{START}ftp.txt".encode(),
            b"file:///etc/passwd",
            b"file://" + str(sandbox).encode() + b"/" + CANARY.encode(),
            b"javascript:alert(1)",
            b"JavaScript:alert(document.cookie)",
            b"mailto:x@y",
            b"data:text/plain,hello",
            b"..\\..\\" + CANARY.encode(),
            b"..\\",
            b"\\\\127.0.0.2\\share\\x",
            b"?C=N;O=D",
            b"#top",
        ]
        unsafe_in_scope = [
            b"a%5c..%5c" + CANARY.encode(),
            b"a%2fb",
            b"nul\x00raw.txt",
            b"nul%00enc.txt",
            b"ctl%0a.txt",
            b".fetcher/state.sqlite",
            b"%2efetcher/lock",
            b"bad%2fdir/",
        ]
        srv.add_listing(START, _page(b"good.txt", b"sub/", *escaping, *unsafe_in_scope))
        srv.add_file(START + "good.txt", b"good")
        srv.add_file(START + "sub/in.txt", b"in")
        # Everything an escape could reach exists, so a request would succeed.
        for path in ("/etc/passwd", "/pub/other/x", f"/pub/{CANARY}", "/pub/startx/trap.txt",
                     f"/{CANARY}", f"/tmp/{CANARY}", "/pub/x", "/x"):  # fmt: skip
            srv.add_file(path, b"outside")
        other.add_file(START + "x.txt", b"other host")
        other.add_file("/x", b"other host")

        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1")

        _no_traceback(r.output)
        assert r.code == 1, r
        _all_below_start(srv)
        assert other.requests == [], "another port of the same host was contacted"
        assert _accepted_nothing(far), "another host was contacted"
        fetched = {r.path for r in srv.requests}
        assert fetched <= {START, START + "good.txt", START + "sub/", START + "sub/in.txt"}, fetched
    assert _mirrored(dest) == {"good.txt", "sub", "sub/in.txt"}
    assert (dest / "good.txt").read_bytes() == b"good"
    assert _tree(sandbox) - {"dest"} == {p for p in _tree(sandbox) if p.startswith("dest/")}
    assert CANARY not in " ".join(_tree(tmp_path))
    assert not any(CANARY in name for name in set(os.listdir(tempfile.gettempdir())) - before_tmp)
    # every unsafe in-scope name is a reported failure, named in the summary
    failed = [line for line in r.output.splitlines() if line.strip().startswith("failed ")]
    for raw in (
        b"a%5c",
        b"a%2fb",
        b"nul",
        b"ctl%0a",
        b".fetcher/state",
        b"%2efetcher",
        b"bad%2fdir",
    ):
        assert any(raw.decode() in line for line in failed), (raw, failed)


def test_escaping_base_href_is_ignored(tmp_path: Path, run_fetch) -> None:
    """``<base href>`` pointing above the start, or off-site, cannot pull links out of scope."""
    with FaultServer() as srv, FaultServer() as other:
        srv.add_listing(START, _page(b"x.txt", b"up/", b"off/"))
        srv.add_listing(START + "up/", _page(b"x.txt", b"etc/passwd", head=b'<base href="../../">'))
        off = f'<base href="http://127.0.0.1:{other.port}/">'.encode()
        srv.add_listing(START + "off/", _page(b"x.txt", b"y/", head=off))
        srv.add_file(START + "x.txt", b"x")
        for path in ("/pub/x.txt", "/x.txt", "/etc/passwd", "/pub/etc/passwd"):
            srv.add_file(path, b"outside")
        other.add_file("/x.txt", b"other")
        other.add_listing("/y/", _page(b"z.txt"))
        dest = tmp_path / "d"
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1")
        _no_traceback(r.output)
        assert r.code == 0, r
        _all_below_start(srv)
        assert sorted(q.path for q in srv.requests) == sorted(
            [START, START + "x.txt", START + "up/", START + "off/"]
        )
        assert other.requests == []
        assert _mirrored(dest) == {"x.txt", "up", "off"}


# --- 2. redirects -------------------------------------------------------------------


def test_repository_metadata_naming_paths_above_the_start_is_not_followed(
    tmp_path: Path, run_fetch
) -> None:
    """``--index``: a Release whose component is ``../../../secret``, or a repomd.xml whose
    primary is ``../../secret/…``, made fetch GET and HEAD ``/pub/secret/…``: httpx drops
    the dot segments of the URL the index's name was joined into, and only the names of
    files to mirror were checked against the start URL, not those of indices to read."""
    packages = b"Package: p\nFilename: pool/p.deb\nSize: 3\n\n"
    pk = hashlib.sha256(packages).hexdigest()
    up = "../../../secret"
    release = (
        f"Suite: stable\nComponents: main {up}\nArchitectures: amd64\nSHA256:\n"
        f" {pk} {len(packages)} main/binary-amd64/Packages\n"
        f" {pk} {len(packages)} {up}/binary-amd64/Packages\n"
        f" {pk} {len(packages)} {up}/i18n/Translation-en\n"
    ).encode()
    primary = gzip.compress(b"<metadata xmlns='http://linux.duke.edu/metadata/common'/>")
    pd = hashlib.sha256(primary).hexdigest()
    repomd = (
        "<repomd xmlns='http://linux.duke.edu/metadata/repo'><data type='primary'>"
        f"<checksum type='sha256'>{pd}</checksum><location href='../../secret/primary.xml.gz'/>"
        f"<size>{len(primary)}</size></data></repomd>"
    ).encode()
    with FaultServer() as srv:
        srv.add_listing(START + "dists/", _page(b"stable/"))
        srv.add_file(START + "dists/stable/Release", release)
        srv.add_file(START + "dists/stable/main/binary-amd64/Packages", packages)
        srv.add_file(START + "pool/p.deb", b"deb")
        srv.add_file(START + "yum/repodata/repomd.xml", repomd)
        srv.add_file("/pub/secret/binary-amd64/Packages", packages)
        srv.add_file("/pub/secret/i18n/Translation-en", packages)
        srv.add_file("/pub/secret/primary.xml.gz", primary)
        r = run_fetch(
            "--mirror", srv.url + START[1:], "--dest", tmp_path / "deb", "--index", "debian"
        )
        _no_traceback(r.output)
        assert r.code == 1, r
        _all_below_start(srv)
        assert (tmp_path / "deb" / "pool" / "p.deb").read_bytes() == b"deb"
        # the rest of the index is read on: only what lies above is refused, and named
        assert "index outside the start URL" not in r.output, r
        for name in ("binary-amd64/Packages", "i18n/Translation-en"):
            assert f"failed {srv.url}pub/start/dists/stable/{up}/{name}: " in r.output, r

        srv.reset_stats()
        yum = START + "yum/"
        r = run_fetch(
            "--mirror", srv.url + yum[1:], "--dest", tmp_path / "yum", "--index", "repodata"
        )
        _no_traceback(r.output)
        assert r.code == 1, r
        _all_below_start(srv, yum)
        assert "index outside the start URL" in r.output, r


def test_redirect_off_mirror_refused_unless_alias(tmp_path: Path, run_fetch) -> None:
    with FaultServer() as srv, FaultServer() as other:
        srv.add_file(START + "off.bin", b"would be from the mirror")
        srv.persist(
            START + "off.bin", Fault.redirect(f"http://127.0.0.1:{other.port}{START}off.bin")
        )
        srv.add_file(START + "stay.bin", b"stay")
        srv.persist(START + "stay.bin", Fault.redirect(f"{START}real/stay.bin"))
        srv.add_file(START + "real/stay.bin", b"stay, moved")
        srv.add_file(START + "up.bin", b"x")
        srv.persist(START + "up.bin", Fault.redirect("/pub/secret.bin"))
        srv.add_file("/pub/secret.bin", b"above the start")
        other.add_file(START + "off.bin", b"from the alias")

        dest = tmp_path / "d"
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1")
        _no_traceback(r.output)
        assert r.code == 1, r
        assert other.requests == []
        assert srv.count(path="/pub/secret.bin") == 0
        assert not (dest / "off.bin").exists() and not (dest / "up.bin").exists()
        assert "off.bin: redirect off the mirror refused" in r.output, r
        assert "up.bin: redirect off the mirror refused" in r.output, r
        assert (dest / "stay.bin").read_bytes() == b"stay, moved"
        assert srv.count(path=START + "off.bin") == 1  # a refusal is not retried

        dest2 = tmp_path / "d2"
        r = run_fetch(
            "--mirror", srv.url + START[1:], "--dest", dest2, "--procs", "1",
            "--alias", f"127.0.0.1:{other.port}", "--exclude", "up.bin",
        )  # fmt: skip
        assert r.code == 0, r
        assert (dest2 / "off.bin").read_bytes() == b"from the alias"
        assert other.count(path=START + "off.bin") == 1
        assert [q.path for q in other.requests] == [START + "off.bin"]


def test_redirect_chains_stop_after_five_hops(tmp_path: Path, run_fetch) -> None:
    with FaultServer() as srv:
        srv.add_listing(START, _page(b"loop.bin", b"self.bin", b"chain.bin", b"ok.bin"))
        srv.persist(START + "loop.bin", Fault.redirect(START + "loop2.bin"))
        srv.persist(START + "loop2.bin", Fault.redirect(START + "loop.bin"))
        srv.persist(START + "self.bin", Fault.redirect(START + "self.bin"))
        srv.persist(START + "chain.bin", Fault.redirect(START + "hop/1"))
        for i in range(1, 50):  # ever new targets: only the hop count can stop it
            srv.persist(f"{START}hop/{i}", Fault.redirect(f"{START}hop/{i + 1}", code=307))
        srv.add_file(START + "ok.bin", b"ok")
        dest = tmp_path / "d"
        t0 = time.monotonic()
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1")
        assert time.monotonic() - t0 < 30
        _no_traceback(r.output)
        assert r.code == 1, r
        assert (dest / "ok.bin").read_bytes() == b"ok"
        assert not (dest / "loop.bin").exists() and not (dest / "chain.bin").exists()
        hops = sum(1 for q in srv.requests if q.path.startswith(START + "hop/"))
        assert srv.count(path=START + "chain.bin") == 1 and hops == 5, hops
        assert srv.count(path=START + "loop.bin") == 1 and srv.count(path=START + "loop2.bin") == 1
        assert "loop.bin: redirect loop" in r.output, r
        assert "self.bin: redirect loop" in r.output and srv.count(path=START + "self.bin") == 1
        assert "chain.bin: more than 5 redirects" in r.output, r


@pytest.mark.parametrize("location", ["http://127.0.0.1:99999/x", "http://[::1/x", "http:///x"])
def test_unusable_location_is_refused(tmp_path: Path, location: str) -> None:
    """A Location no URL parser agrees on: refused, for a file and a listing, without hanging."""
    with FaultServer() as srv:
        srv.add_listing(START, _page(b"a.txt", b"sub/", b"ok.txt"))
        srv.add_file(START + "a.txt", b"a")
        srv.persist(START + "a.txt", Fault.redirect(location))
        srv.persist(START + "sub/", Fault.redirect(location))
        srv.add_file(START + "ok.txt", b"ok")
        summary = _bounded_mirror(srv, tmp_path / "d", seconds=20, retries=2)
        assert [p for p, _ in summary.failed] == ["a.txt"], summary.failed
        assert [u for u, _ in summary.listing_errors] == [srv.url + START[1:] + "sub/"]
        assert summary.fetched.files == 1 and (tmp_path / "d" / "ok.txt").exists()
        _all_below_start(srv)


def test_listing_redirect_off_mirror_is_a_listing_error(tmp_path: Path, run_fetch) -> None:
    with FaultServer() as srv, FaultServer() as other:
        srv.add_listing(START, _page(b"away/", b"ok.txt"))
        srv.persist(START + "away/", Fault.redirect(f"http://127.0.0.1:{other.port}/away/"))
        srv.add_file(START + "ok.txt", b"ok")
        other.add_listing("/away/", _page(b"x.txt"))
        other.add_file("/away/x.txt", b"x")
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", tmp_path / "d", "--procs", "1")
        _no_traceback(r.output)
        assert r.code == 1, r
        assert other.requests == []
        assert "redirects off the mirror" in r.output, r
        assert (tmp_path / "d" / "ok.txt").exists()


def test_a_start_url_that_moved_says_where_to(tmp_path: Path, run_fetch) -> None:
    # http -> https, or a mirror moved to another host: nothing is fetched from there
    # unasked, and the error names the URL to use
    with FaultServer() as srv, FaultServer() as other:
        srv.persist(START, Fault.redirect(f"http://127.0.0.1:{other.port}/new/"))
        other.add_listing("/new/", _page(b"x.txt"))
        other.add_file("/new/x.txt", b"x")
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", tmp_path / "d", "--procs", "1")
        _no_traceback(r.output)
        assert r.code == 1, r
        assert other.requests == []
        moved = f"the start URL has moved: mirror http://127.0.0.1:{other.port}/new/ instead"
        assert moved in r.output, r
        again = run_fetch(
            "--mirror", f"http://127.0.0.1:{other.port}/new/", "--dest", tmp_path / "e"
        )
        assert again.code == 0 and (tmp_path / "e" / "x.txt").read_bytes() == b"x", again


# --- 3. depth and loops --------------------------------------------------------------


def test_ever_deeper_listing_stops_at_depth(tmp_path: Path, run_fetch) -> None:
    """``a/`` → ``a/a/`` → ...; each level differs (a file named after it), 300 levels deep."""
    with FaultServer() as srv:
        path = START
        for level in range(300):
            srv.add_listing(path, _page(b"a/", f"f{level}.txt".encode()))
            path += "a/"
        depth = 6
        t0 = time.monotonic()
        r = run_fetch(
            "--mirror", srv.url + START[1:], "--dest", tmp_path / "d", "--procs", "1",
            "--depth", str(depth), "--dry-run",
        )  # fmt: skip
        assert time.monotonic() - t0 < 20
        _no_traceback(r.output)
        listings = sum(1 for q in srv.requests if q.path.endswith("/"))
        assert listings == depth + 1, listings  # the start and `depth` levels below it
        assert f"deeper than --depth {depth}" in r.output, r


def test_self_similar_listing_stops_at_once(tmp_path: Path, run_fetch) -> None:
    """Every URL below ``a/`` answers the same page: recognised as a loop, whatever the depth."""
    with FaultServer() as srv:
        srv.add_listing(START, _page(b"a/", b"top.txt"))
        srv.persist(START + "a/*", Fault.status(200, body=_page(b"a/", b"same.txt")))
        srv.add_file(START + "top.txt", b"top")
        t0 = time.monotonic()
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", tmp_path / "d", "--procs", "1")
        assert time.monotonic() - t0 < 20
        _no_traceback(r.output)
        assert r.code == 0, r
        assert srv.count() <= 10, [q.path for q in srv.requests]
        assert "identical to an ancestor" in r.output, r


def _symlink_tree(base: Path) -> Path:
    root = base / "pub" / "start"
    (root / "d" / "sub").mkdir(parents=True)
    (root / "top.txt").write_text("top")
    (root / "d" / "file.txt").write_text("in d")
    (root / "d" / "sub" / "deep.txt").write_text("in sub")
    (root / "d" / "sub" / "loop").symlink_to("..")  # d/sub/loop -> d
    (root / "d" / "sub" / "self").symlink_to(".")  # d/sub/self -> d/sub
    return base


def _check_symlink_mirror(dest: Path, output: str, paths: list[str]) -> None:
    assert _mirrored(dest) >= {"top.txt", "d/file.txt", "d/sub/deep.txt"}
    # not even the loop's directory: it is a view of an ancestor, not a directory of its own
    assert not [p for p in _mirrored(dest) if "loop" in p or "self" in p], _mirrored(dest)
    looped = [p for p in paths if "/loop/" in p[len(START) :] and not p.endswith("/")]
    assert not looped, looped
    # each real file was asked for exactly once: nothing of the loop twice
    files = [p for p in paths if not p.endswith("/")]
    assert sorted(files) == sorted(set(files)), files
    assert paths.count(START + "d/sub/loop/") <= 1 and paths.count(START + "d/sub/self/") <= 1
    assert "symlink loop" in output, output


def test_server_side_symlink_loop_recognised(tmp_path: Path, run_fetch) -> None:
    base = _symlink_tree(tmp_path / "www")
    dest = tmp_path / "d"
    with FaultServer(root=base) as srv:
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1")
        _no_traceback(r.output)
        assert r.code == 0, r
        _all_below_start(srv)
        _check_symlink_mirror(dest, r.output, [q.path for q in srv.requests])


@pytest.mark.real_server
def test_symlink_loop_on_nginx(tmp_path: Path, served, run_fetch) -> None:
    srv = served("nginx", _symlink_tree(tmp_path / "www"))
    dest = tmp_path / "d"
    r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1")
    _no_traceback(r.output)
    _check_symlink_mirror(dest, r.output, [q.path for q in srv.requests()])


@pytest.mark.real_server
@pytest.mark.parametrize("kind", ["python", "nginx"])
def test_a_directory_named_as_its_only_subdirectory_is_no_loop(
    tmp_path: Path, served, run_fetch, kind: str
) -> None:
    """``pkg/`` holds only ``pkg/``: its listing is the start's again, on a page without
    dates (python) or with both made in one minute (nginx). It was taken for a symlink
    loop and ``pkg/pkg/`` never read; a real loop below it (``self -> .``) still is one."""
    base = tmp_path / "www"
    inner = base / "pub" / "start" / "pkg" / "pkg"
    inner.mkdir(parents=True)
    (inner / "file.txt").write_bytes(b"inside pkg/pkg\n")
    (inner / "self").symlink_to(".")
    for p in (inner / "file.txt", inner, inner.parent):
        os.utime(p, (1_700_000_000, 1_700_000_000))
    srv = served(kind, base)
    dest = tmp_path / "d"
    args = ("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1")
    r = run_fetch(*args)
    _no_traceback(r.output)
    assert r.code == 0, r
    assert _mirrored(dest) == {"pkg", "pkg/pkg", "pkg/pkg/file.txt"}, r.output
    assert (dest / "pkg" / "pkg" / "file.txt").read_bytes() == b"inside pkg/pkg\n"
    assert "symlink loop" in r.output and "/pkg/pkg/self/" in r.output, r.output
    first = len(srv.requests(min_count=1))
    r = run_fetch(*args)  # the kept listings of the last run: the same verdicts
    assert r.code == 0, r
    assert _mirrored(dest) == {"pkg", "pkg/pkg", "pkg/pkg/file.txt"}, r.output
    again = [q for q in srv.requests()[first:] if not q.path.endswith("/")]
    assert again == [] or kind == "python", again  # (python: no dates, so asked with 304s)
    assert all(q.status == 304 for q in again), again


def test_a_loop_that_cannot_be_told_is_a_listing_error(tmp_path: Path, run_fetch) -> None:
    """``a/`` lists as the start does, and ``a/a/``, which would tell, cannot be read."""
    with FaultServer() as srv:
        srv.add_listing(START, _page(b"a/"))
        srv.add_listing(START + "a/", _page(b"a/"))
        srv.persist(START + "a/a/", Fault.status(403))
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", tmp_path / "d", "--procs", "1")
        _no_traceback(r.output)
        assert r.code != 0, r
        assert "no listing below it to tell a symlink loop by: HTTP 403" in r.output, r
        assert srv.count(path=START + "a/a/") >= 1
        assert srv.count(path=START + "a/a/a/") == 0


def test_one_file_under_two_spellings_fetched_once(tmp_path: Path, run_fetch) -> None:
    """``a.txt``, ``%61.txt`` and ``%61%2Etxt`` are one local file: one request, no race."""
    with FaultServer() as srv:
        srv.add_listing(START, _page(b"a.txt", b"%61.txt", b"%61%2Etxt", b"sub/", b"%73ub/"))
        srv.add_file(START + "a.txt", b"A" * 100_000)
        srv.add_file(START + "sub/y", b"y")
        dest = tmp_path / "d"
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "2")
        assert r.code == 0, r
        assert srv.count(path=START + "a.txt") == 1
        assert srv.count(path=START + "sub/") == 1
        assert (dest / "a.txt").read_bytes() == b"A" * 100_000
        assert _mirrored(dest) == {"a.txt", "sub", "sub/y"}


def test_file_and_directory_of_one_name(tmp_path: Path, run_fetch) -> None:
    with FaultServer() as srv:
        srv.add_listing(START, _page(b"dup", b"dup/", b"ok.txt"))
        srv.add_file(START + "dup", b"a file")
        srv.add_file(START + "dup/x", b"x")
        srv.add_file(START + "ok.txt", b"ok")
        dest = tmp_path / "d"
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1")
        _no_traceback(r.output)
        assert r.code == 1, r
        assert (dest / "dup" / "x").read_bytes() == b"x"
        assert srv.count(path=START + "dup") == 0
        assert "a file and a directory of this name" in r.output, r


# --- 4. big listings --------------------------------------------------------------------


def _big_page(n: int) -> bytes:
    entries = [
        DirEntry(f"pkg-{i:06d}-1.0.noarch.rpm", False, 1000 + i, 1_700_000_000 + i * 60)
        for i in range(n)
    ]
    return nginx_listing(START, entries)


def test_fifty_thousand_entry_listing(tmp_path: Path, run_fetch) -> None:
    page = _big_page(50_000)
    t0 = time.monotonic()
    entries = parse_listing(page, "http://127.0.0.1:1" + START)
    assert time.monotonic() - t0 < 10
    assert len(entries) == 50_000 and entries[-1].size == 1000 + 49_999
    with FaultServer() as srv:
        srv.add_listing(START, page)
        t0 = time.monotonic()
        r = run_fetch(
            "--mirror", srv.url + START[1:], "--dest", tmp_path / "d", "--procs", "1", "--dry-run"
        )
        assert time.monotonic() - t0 < 30
        assert r.code == 0, r
        assert srv.count() == 1
        assert "50000" in r.output.replace(",", ""), r


def test_big_listing_memory_is_bounded() -> None:
    """Parsing a 50,000-entry page (6 MiB) costs tens of MiB, in a fresh process to measure."""
    # VmHWM is the peak of this process's own memory map, which exec starts afresh;
    # ru_maxrss would also remember the pages of the (large) pytest process it forked from.
    code = (
        "import re\n"
        "from tests.test_hostile import _big_page\n"
        "from fetcher.listing import parse_listing\n"
        "def hwm():\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "page = _big_page(50_000)\n"
        "before = hwm()\n"
        "assert len(parse_listing(page, 'http://127.0.0.1:1/pub/start/')) == 50_000\n"
        "print(hwm() - before)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    grew_kib = int(out.stdout.split()[-1])
    assert grew_kib < 200 * 1024, f"parsing grew the process by {grew_kib >> 10} MiB"


@pytest.mark.parametrize("how", ["content-length", "chunked", "gzip-bomb"])
def test_listing_over_size_cap_refused(tmp_path: Path, how: str) -> None:
    with FaultServer() as srv:
        if how == "gzip-bomb":  # 40 KiB on the wire, 8 MiB once decoded
            bomb = gzip.compress(b"<pre>" + b"<a href=x>x</a>\n" * (1 << 19), mtime=0)
            srv.add_listing(START, bomb)
            srv.persist(START, Fault.header("Content-Encoding", "gzip"))
        else:
            srv.add_listing(START, _big_page(20_000))  # ~2.5 MiB
        if how == "chunked":
            srv.persist(START, Fault.chunked())
        job = build_job({"url": srv.url + START[1:], "dest": str(tmp_path / "d"), "procs": 1}, "t")
        job = msgspec.structs.replace(job, max_listing_bytes=1 << 20)
        summary = mirror(job)
        assert summary.exit_code == 1
        assert summary.fetched.files == 0
        [(url, why)] = summary.listing_errors
        assert url.endswith(START) and "1048576 byte cap" in why, why
        assert srv.count() == 1  # a refusal is not retried


# --- 5. malformed pages and names ---------------------------------------------------


def test_malformed_and_truncated_pages(tmp_path: Path, run_fetch) -> None:
    with FaultServer() as srv:
        srv.add_listing(
            START,
            b"<html><body><pre>\x00<<a href=ok1.txt>ok1</a> <A HREF='ok2.txt'>ok2</A>\n"
            b'<table><tr><td><a href="a&amp;b.txt">a&amp;b.txt</a></td></tr>'  # unclosed table
            b'<a href="&#46;&#46;/' + CANARY.encode() + b'">dots as entities</a>\n'
            b'<a href="&#x2e;&#x2e;&#x2f;x">hex entities</a>\n'
            b'<a href="caf&eacute;.txt">caf&eacute;.txt</a>\n'
            b'<a href="sub/"><b><i>sub</a></b>\n'
            b'<a href="<script>x</script>">weird</a><a href="ok3.txt">ok3</a><a href="ok4.tx',
        )
        srv.add_listing(
            START + "sub/", b'<pre><a href="inner.txt">inner.txt</a> 01-Jan-20'
        )  # truncated
        for name in ("ok1.txt", "ok2.txt", "ok3.txt", "a&b.txt", "café.txt", "sub/inner.txt"):
            srv.add_file(START + name, name.encode())
        srv.add_file(f"/pub/{CANARY}", b"outside")
        dest = tmp_path / "d"
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1")
        _no_traceback(r.output)
        assert r.code == 0, r
        _all_below_start(srv)
        for name in ("ok1.txt", "ok2.txt", "ok3.txt", "a&b.txt", "café.txt", "sub/inner.txt"):
            assert (dest / name).read_bytes() == name.encode(), (name, r)


@pytest.mark.parametrize("body", ["gzip", "binary", "empty"])
def test_a_page_that_is_no_listing_deletes_nothing(tmp_path: Path, run_fetch, body: str) -> None:
    """A directory's page sent as text/html but holding no HTML at all (compressed without
    its Content-Encoding, bytes of something else, nothing) was read as an empty directory:
    a clean crawl, and --delete removed every file below it."""
    sub = _page(b"a.txt", b"b.txt")
    with FaultServer() as srv:
        srv.add_listing(START, _page(b"sub/", *(b"f%d.txt" % i for i in range(40))))
        srv.add_listing(START + "sub/", sub)
        for i in range(40):
            srv.add_file(START + f"f{i}.txt", b"f")
        srv.add_file(START + "sub/a.txt", b"a")
        srv.add_file(START + "sub/b.txt", b"b")
        dest = tmp_path / "d"
        args = ("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1", "--delete")
        assert run_fetch(*args).code == 0
        served = {"gzip": gzip.compress(sub), "binary": bytes(range(256)) * 8, "empty": b""}
        srv.add_listing(START + "sub/", served[body])
        r = run_fetch(*args)
        _no_traceback(r.output)
        assert r.code == 1, r
        assert "not a directory listing (no links, and no HTML in it)" in r.output, r
        assert (dest / "sub" / "a.txt").read_bytes() == b"a"
        assert (dest / "sub" / "b.txt").read_bytes() == b"b"
        # a page of no links that is HTML is an empty directory, as before
        srv.add_listing(START + "sub/", b"<html><body><pre></pre></body></html>")
        r = run_fetch(*args)
        assert r.code == 0, r
        assert not (dest / "sub" / "a.txt").exists()


def test_a_page_nested_past_the_parser_s_depth_is_read_whole_or_is_an_error(
    tmp_path: Path, run_fetch
) -> None:
    """A page that leaves a ``<font>`` or ``<div>`` open on each row nests one level a row;
    libxml2 stopped at 256 levels and gave the rows before as the whole listing: the rest
    of the directory was silently not there (and --delete removed its files). Now 2048
    levels are read, and a page past them is a listing error, not a shorter directory."""
    with FaultServer() as srv:
        srv.add_listing(START, _page(b"font/", b"div/"))
        font = b"".join(b'<font size=2><a href="f%d">f%d</a><br>\n' % (i, i) for i in range(400))
        div = b"".join(b'<div><a href="d%d">d%d</a>\n' % (i, i) for i in range(2100))
        srv.add_listing(START + "font/", b"<html><body>" + font + b"</body></html>")
        srv.add_listing(START + "div/", b"<html><body>" + div + b"</body></html>")
        for i in range(400):
            srv.add_file(START + f"font/f{i}", b"f")
        dest = tmp_path / "d"
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1", "-q")
        _no_traceback(r.output)
        assert r.code == 1, r
        assert len(list((dest / "font").iterdir())) == 400
        assert "the page could not be read whole (Excessive depth in document: 2048)" in r.output
        assert srv.count(path=START + "div/d0") == 0 and not list((dest / "div").iterdir())


def test_a_page_of_more_links_than_the_parser_may_take_is_an_error_not_gigabytes(
    tmp_path: Path, run_fetch
) -> None:
    """The HTML parser takes ~1.1 KB a link: a hostile page of tiny links under the byte
    cap took gigabytes and seconds of CPU, per crawl connection. Past listing.MAX_LINKS
    a page is a listing error, unread: the rest of the mirror goes on, and --delete
    keeps the files below it."""
    most = 500_000  # listing.MAX_LINKS
    with FaultServer() as srv:
        srv.add_listing(START, _page(b"ok.txt", b"spam/"))
        srv.add_file(START + "ok.txt", b"ok")
        links = b"".join(b'<a href="%d">.</a>' % i for i in range(most + 1))
        srv.add_listing(START + "spam/", b"<html><body>" + links + b"</body></html>")
        dest = tmp_path / "d"
        (dest / "spam").mkdir(parents=True)
        (dest / "spam" / "kept.txt").write_bytes(b"mine")
        r = run_fetch(
            "--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1", "-q", "--delete"
        )
        _no_traceback(r.output)
        assert r.code == 1, r
        assert (dest / "ok.txt").read_bytes() == b"ok"
        assert (dest / "spam" / "kept.txt").read_bytes() == b"mine"
        assert f"more than {most:,} links" in r.output, r
        assert srv.count(path=START + "spam/0") == 0


def test_non_utf8_names_are_reported(tmp_path: Path, run_fetch) -> None:
    with FaultServer() as srv:
        srv.add_listing(
            START,
            _page(b"caf\xe9.txt", b"caf%E9-enc.txt", b"ok.txt", b"gbk/"),
            content_type="text/html",
        )
        srv.add_listing(
            START + "gbk/",
            _page(b"\xd6\xd0\xce\xc4.txt", b"ok2.txt", head=b'<meta charset="gbk">'),
            content_type="text/html",
        )
        srv.add_file(START + "ok.txt", b"ok")
        srv.add_file(START + "gbk/ok2.txt", b"ok2")
        srv.add_file(START + "caf\udce9.txt", b"latin-1 name")
        srv.add_file(START + "caf\udce9-enc.txt", b"latin-1 name")
        srv.add_file(START + "gbk/\udcd6\udcd0\udcce\udcc4.txt", b"gbk name")
        dest = tmp_path / "d"
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1")
        _no_traceback(r.output)
        assert r.code == 1, r
        assert (dest / "ok.txt").read_bytes() == b"ok"
        assert (dest / "gbk" / "ok2.txt").read_bytes() == b"ok2"
        assert _mirrored(dest) == {"ok.txt", "gbk", "gbk/ok2.txt"}
        failed = [line for line in r.output.splitlines() if line.strip().startswith("failed")]
        assert sum("not valid UTF-8" in line for line in failed) == 3, failed
        assert not any(q.path.startswith(START + "caf") for q in srv.requests)


def test_path_too_long_for_the_filesystem_is_a_failure(tmp_path: Path, run_fetch) -> None:
    """Every name is under 255 bytes, but 25 levels of them pass PATH_MAX (4096)."""
    with FaultServer() as srv:
        deep = START + "".join(f"{i:02d}{'x' * 198}/" for i in range(25))
        srv.add_file(deep + "deep.txt", b"deep")
        srv.add_file(START + "ok.txt", b"ok")
        dest = tmp_path / "d"
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1", "-q")
        _no_traceback(r.output)
        assert r.code == 1, r
        assert "File name too long" in r.output, r
        assert (dest / "ok.txt").read_bytes() == b"ok"


# --- 6. polite retries --------------------------------------------------------------------


def _gaps(srv: FaultServer, path: str) -> list[float]:
    times = [q.started for q in srv.requests if q.path == path]
    return [b - a for a, b in itertools.pairwise(times)]


def test_503_burst_and_429_retry_after(tmp_path: Path, run_fetch) -> None:
    with FaultServer() as srv:
        srv.add_file(START + "burst.bin", b"b" * 100)
        srv.script(START + "burst.bin", [Fault.status(503), Fault.status(503)])
        srv.add_file(START + "busy.bin", b"r" * 100)
        # 2 s: longer than any first backoff (0.5-1 s), so only Retry-After explains the gap
        srv.script(START + "busy.bin", [Fault.status(429, retry_after="2")])
        srv.add_file(START + "down.bin", b"d" * 100)
        srv.persist(START + "down.bin", Fault.status(503))
        srv.add_file(START + "gone.bin", b"g")
        srv.persist(START + "gone.bin", Fault.status(404))
        srv.add_file(START + "secret.bin", b"s")
        srv.persist(START + "secret.bin", Fault.status(403))
        dest = tmp_path / "d"
        t0 = time.monotonic()
        r = run_fetch(
            "--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1", "--retries", "3"
        )
        assert time.monotonic() - t0 < 30
        _no_traceback(r.output)
        assert r.code == 1, r
        assert (dest / "burst.bin").read_bytes() == b"b" * 100
        assert (dest / "busy.bin").read_bytes() == b"r" * 100
        assert srv.count(path=START + "burst.bin") == 3
        assert srv.count(path=START + "busy.bin") == 2
        [gap] = _gaps(srv, START + "busy.bin")
        assert 1.9 <= gap < 10, gap  # Retry-After: 2 honoured
        assert srv.count(path=START + "down.bin") == 3  # no more than --retries attempts
        assert srv.count(path=START + "gone.bin") == 1
        assert srv.count(path=START + "secret.bin") == 1
        for name, why in (
            ("down.bin", "HTTP 503"),
            ("gone.bin", "HTTP 404"),
            ("secret.bin", "HTTP 403"),
        ):
            assert f"{name}: {why}" in r.output, r


def test_listing_503_retried_politely(tmp_path: Path, run_fetch) -> None:
    with FaultServer() as srv:
        srv.add_file(START + "x.txt", b"x")
        srv.script(START, [Fault.status(503, retry_after="2")])
        srv.add_listing(START + "gone/", _page(b"y"))
        srv.persist(START + "gone/", Fault.status(404))
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", tmp_path / "d", "--procs", "1")
        assert srv.count(path=START) == 2
        [gap] = _gaps(srv, START)
        assert 1.9 <= gap < 10, gap
        assert srv.count(path=START + "gone/") == 1
        assert r.code == 1 and "listing error" in r.output, r
        assert (tmp_path / "d" / "x.txt").read_bytes() == b"x"


def test_garbage_retry_after_is_survived(tmp_path: Path) -> None:
    """``Retry-After: ²`` (a digit to str.isdigit, not to float) on a listing and a file."""
    with FaultServer() as srv:
        srv.add_file(START + "a.txt", b"a")
        srv.add_file(START + "b.txt", b"b")
        srv.script(START, [Fault.status(503, retry_after="\u00b2")])
        srv.script(START + "a.txt", [Fault.status(503, retry_after="\u00b2")])
        srv.script(START + "b.txt", [Fault.status(429, retry_after="soon")])
        summary = _bounded_mirror(srv, tmp_path / "d", seconds=20)
        assert summary.exit_code == 0, (summary.failed, summary.listing_errors)
        assert srv.count(path=START) == 2 and srv.count(path=START + "a.txt") == 2


def test_unexpected_listing_error_is_not_a_clean_crawl(tmp_path: Path) -> None:
    """Whatever breaks while one listing is read, the crawl reports it and goes on."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/pub/start/":
            return httpx.Response(200, html=_page(b"bad/", b"good/", b"x.txt").decode())
        if request.url.path == "/pub/start/bad/":
            raise RuntimeError("something no one thought of")
        if request.url.path == "/pub/start/good/":
            return httpx.Response(200, html=_page(b"y.txt").decode())
        return httpx.Response(404)

    t = Transfer(dest=str(tmp_path), root="http://mirror.test/pub/start/", retries=2)
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        items = list(crawl(client, t, CrawlOptions(), sleep=lambda s: None))
    problems = [i for i in items if isinstance(i, CrawlProblem)]
    assert [(p.url, p.kind) for p in problems] == [("http://mirror.test/pub/start/bad/", "listing")]
    assert "RuntimeError" in problems[0].message
    files = sorted(i.path for i in items if isinstance(i, RemoteFile))
    assert files == ["good/y.txt", "x.txt"]


# --- 7. broken bodies ---------------------------------------------------------------------


def test_dropped_connection_resumes_with_range(tmp_path: Path, run_fetch) -> None:
    data = os.urandom(3 << 20)  # over download.RESUME_MIN: worth resuming
    with FaultServer() as srv:
        srv.add_file(START + "big.bin", data)
        srv.script(START + "big.bin", [Fault.drop_after(2 << 20)])
        dest = tmp_path / "d"
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1")
        assert r.code == 0, r
        assert (dest / "big.bin").read_bytes() == data
        first, second = (q for q in srv.requests if q.path == START + "big.bin")
        assert "range" not in first.headers
        got = second.headers.get("range", "")
        assert got.startswith("bytes=") and got.endswith("-"), second.headers
        assert 0 < int(got[6:-1]) <= 2 << 20
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'  # the fault server's AUTO ETag
        assert second.headers.get("if-range") == etag, second.headers
        assert second.status == 206


def test_folded_header_lines_are_read_unfolded(tmp_path: Path, run_fetch) -> None:
    # An old server folds its long header lines (obs-fold, RFC 9112 section 5.2): each
    # file failed every attempt with a RemoteProtocolError. Unfolded, the date keeps its
    # seconds (the listing has only the minute) and the length frames the body.
    when = 1_700_000_007  # Tue, 14 Nov 2023 22:13:27 GMT
    with FaultServer() as srv:
        srv.add_file(START + "folded.txt", b"folded\n", last_modified=when)
        srv.persist(
            START + "folded.txt",
            Fault.header("Last-Modified", "Tue, 14 Nov 2023\r\n 22:13:27 GMT")
            | Fault.header("Content-Length", "\r\n\t7"),
        )
        dest = tmp_path / "d"
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1")
        _no_traceback(r.output)
        assert r.code == 0, r
        assert (dest / "folded.txt").read_bytes() == b"folded\n"
        assert (dest / "folded.txt").stat().st_mtime == when
        assert srv.count(path=START + "folded.txt") == 1


def test_short_body_never_lands(tmp_path: Path, run_fetch) -> None:
    """Cut-off bodies, on every attempt: a failure, and no file under the final name."""
    with FaultServer() as srv:
        srv.add_file(START + "cut.bin", b"c" * 10_000)
        srv.persist(START + "cut.bin", Fault.drop_after(5_000))
        srv.add_file(START + "ok.bin", b"ok")
        dest = tmp_path / "d"
        r = run_fetch(
            "--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1", "--retries", "2"
        )
        _no_traceback(r.output)
        assert r.code == 1, r
        assert srv.count(path=START + "cut.bin") == 2
        assert not (dest / "cut.bin").exists()
        assert "cut.bin:" in r.output and "10000" in r.output, r
        assert (dest / "ok.bin").exists()


def test_short_body_with_consistent_headers_never_lands(tmp_path: Path, run_fetch) -> None:
    with FaultServer() as srv:
        srv.add_file(START + "short.bin", b"s" * 10_000)
        srv.persist(START + "short.bin", Fault.short_body(5_000))
        dest = tmp_path / "d"
        r = run_fetch(
            "--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1", "--retries", "2"
        )
        _no_traceback(r.output)
        assert not (dest / "short.bin").exists(), (dest / "short.bin").stat().st_size
        assert r.code == 1, r


def test_a_file_whose_length_is_not_the_listing_s_is_not_read_at_all(tmp_path: Path) -> None:
    # The listing printed an exact size; the server's Content-Length says another (the
    # file was rewritten since the crawl, or a mirror behind the same name is behind).
    # The body cannot land, so it is not read: each attempt had fetched the whole file
    # (an ISO five times over) to find out. Still retried: another backend may agree.
    www = tmp_path / "www"
    www.mkdir()
    (www / "iso.img").write_bytes(os.urandom(3 << 20))
    dest = tmp_path / "d"
    received: list[int] = []
    with FaultServer(root=www) as srv:
        t = Transfer(dest=str(dest), root=srv.url, retries=3)
        job = Job(RemoteFile(srv.url + "iso.img", RelPath("iso.img"), 2 << 20, True), Action.NEW)
        with make_transport(t) as transport:
            out = fetch_file(
                transport, job, t, retrying=build_retrying(t, sleep=lambda s: None),
                on_bytes=received.append,
            )  # fmt: skip
        asked = srv.count(path="/iso.img")
    assert out.status is Status.FAILED, out
    assert "listing says 2097152" in (out.error or ""), out
    assert asked == 3 and out.attempts == 3, (asked, out)
    assert sum(received) == 0, sum(received)
    assert not (dest / "iso.img").exists()
    partial = dest / ".fetcher" / "partial"
    assert not partial.exists() or not list(partial.iterdir())


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_a_body_without_length_past_the_listing_s_size_is_cut_off(
    tmp_path: Path, run_fetch, framing: str
) -> None:
    # The listing says 2 MiB, exactly; the server sends a body of no stated length (chunked,
    # or to the close) that goes on: 64 MiB here, for ever from a hostile server. It was
    # read to its end (the disk filled, and the run ended with exit 4) before the size was
    # compared; it is cut off past the listing's size, nothing of it kept.
    www = tmp_path / "www"
    (www / "pub").mkdir(parents=True)
    (www / "pub" / "ok.txt").write_bytes(b"fine\n")
    when = 1_700_000_000
    listing = nginx_listing(
        "/pub/",
        [DirEntry("big.iso", False, 2 << 20, when), DirEntry("ok.txt", False, 5, when)],
    )
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        srv.add_listing("/pub/", listing)
        srv.add_file("/pub/big.iso", b"\0" * (64 << 20), last_modified=when)
        fault = Fault.chunked() if framing == "chunked" else Fault.header("Content-Length", None)
        srv.persist("/pub/big.iso", fault)
        r = run_fetch("--mirror", srv.url + "pub/", "--dest", dest, "--retries", "1")
        sent = srv.file_bytes_sent
    assert r.code == 1, r
    assert "2097152" in r.output and "big.iso" in r.output, r.output
    assert (dest / "ok.txt").read_bytes() == b"fine\n"
    assert not (dest / "big.iso").exists()
    partial = dest / ".fetcher" / "partial"
    assert not partial.exists() or not list(partial.iterdir())
    assert sent < 32 << 20, sent  # (what the sockets' buffers took before the cut)


def test_trickling_server_hits_read_timeout(tmp_path: Path, run_fetch) -> None:
    with FaultServer() as srv:
        srv.add_file(START + "slow.bin", b"s" * 1000)
        # One byte a second against a half-second read timeout: every attempt times out.
        # (A gap just under the timeout would never trip it: there is no overall deadline.)
        srv.persist(START + "slow.bin", Fault.trickle(1))
        srv.add_file(START + "ok.bin", b"ok")
        dest = tmp_path / "d"
        t0 = time.monotonic()
        r = run_fetch(
            "--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1",
            "--timeout", "0.5", "--retries", "2",
        )  # fmt: skip
        elapsed = time.monotonic() - t0
        _no_traceback(r.output)
        assert elapsed < 20, elapsed
        assert r.code == 1, r
        assert not (dest / "slow.bin").exists()
        assert srv.count(path=START + "slow.bin") == 2
        assert "slow.bin:" in r.output and "ReadTimeout" in r.output, r
        assert (dest / "ok.bin").read_bytes() == b"ok"


# --- 8. Content-Encoding ----------------------------------------------------------------------


def test_gzip_encoding_stored_as_served(tmp_path: Path, run_fetch) -> None:
    tarball = gzip.compress(os.urandom(50_000) + b"\0" * 50_000, mtime=0)
    with FaultServer() as srv:
        # No sizes in the listing: only Content-Length (the raw length) can check the body.
        srv.add_listing(START, _page(b"labelled.tar.gz", b"x.tar.gz"))
        # Apache's "AddEncoding gzip .gz": the file's own bytes, labelled gzip
        srv.add_file(START + "labelled.tar.gz", tarball)
        srv.persist(START + "labelled.tar.gz", Fault.header("Content-Encoding", "gzip"))
        # a server compressing on the fly although we asked for identity
        srv.add_file(START + "x.tar.gz", tarball)
        srv.persist(START + "x.tar.gz", Fault.gzip())
        dest = tmp_path / "d"
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1")
        assert r.code == 0, r
        assert (dest / "labelled.tar.gz").read_bytes() == tarball
        on_wire = gzip.compress(tarball, mtime=0)
        assert (dest / "x.tar.gz").read_bytes() == on_wire  # not decoded, not re-encoded
        [sent] = [q.bytes_sent for q in srv.requests if q.path == START + "x.tar.gz"]
        assert sent == len(on_wire)  # one request: the raw length passed the size check
        for q in srv.requests:
            if q.path != START:
                assert q.headers.get("accept-encoding") == "identity", q.headers


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate", "zstd"])
def test_a_listing_compressed_although_identity_was_asked(
    tmp_path: Path, run_fetch, coding: str
) -> None:
    """gzip and deflate (zlib's, or raw as some servers send it) are read, as a server
    misconfigured so sends them; any other coding is refused unread, naming it."""
    import zlib

    import zstandard

    page = _page(b"a.txt", b"b.txt")
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    sent = {
        "gzip": gzip.compress(page, mtime=0),
        "deflate": zlib.compress(page),
        "raw-deflate": raw.compress(page) + raw.flush(),
        "zstd": zstandard.ZstdCompressor().compress(page),
    }[coding]
    with FaultServer() as srv:
        srv.add_listing(START, sent)
        srv.persist(START, Fault.header("Content-Encoding", coding.removeprefix("raw-")))
        srv.add_file(START + "a.txt", b"a")
        srv.add_file(START + "b.txt", b"b")
        dest = tmp_path / "d"
        r = run_fetch("--mirror", srv.url + START[1:], "--dest", dest, "--procs", "1")
        _no_traceback(r.output)
        if coding == "zstd":
            assert r.code == 1, r
            assert "listing sent with Content-Encoding 'zstd' (identity was asked)" in r.output
            assert srv.count() == 1  # not retried
        else:
            assert r.code == 0, r
            assert (dest / "a.txt").read_bytes() == b"a" and (dest / "b.txt").read_bytes() == b"b"


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_a_compressed_listing_bomb_stays_small(tmp_path: Path, coding: str) -> None:
    """A listing of ~1 MiB on the wire that decodes to 1 GiB: gzip is decoded only as far
    as the cap; zstd is not decoded at all. httpx decoded each chunk whole before the cap
    was looked at: a zstd page of 128 KiB grew fetch by 8 GiB."""
    import zlib

    import zstandard

    zeros = bytes(64 << 20)
    if coding == "gzip":
        z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        bomb = z.compress(b"<pre>") + b"".join(z.compress(zeros) for _ in range(16)) + z.flush()
    else:
        z = zstandard.ZstdCompressor().compressobj()
        bomb = z.compress(b"<pre>") + b"".join(z.compress(zeros) for _ in range(16)) + z.flush()
    del zeros
    code = (
        "import re, sys\n"
        "from fetcher.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "print(code, hwm)\n"
    )
    with FaultServer() as srv:
        srv.add_listing(START, bomb)
        srv.persist(START, Fault.header("Content-Encoding", coding))
        out = subprocess.run(
            [sys.executable, "-c", code, "--mirror", srv.url + START[1:], "--dest",
             str(tmp_path / "d"), "--procs", "1", "-qq"],
            cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert len(bomb) < 2 << 20, len(bomb)
    code_seen, hwm_kib = map(int, out.stdout.split()[-2:])
    assert code_seen == 1, out
    assert hwm_kib < 400 * 1024, f"the listing grew fetch to {hwm_kib >> 10} MiB"


# --- names that act on a terminal -----------------------------------------------------


_TRICKS = {
    "csi\u009b2J.txt": b"clears the screen on a terminal that takes C1",  # 8-bit CSI, "ESC [ 2 J"
    "invoice\u202etxt.exe": b"reads as invoiceexe.txt",  # right-to-left override
}


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_names_that_act_on_a_terminal_are_shown_escaped(tmp_path: Path, fmt: str) -> None:
    # A mirror's file names may hold C1 controls and bidirectional overrides (only C0 is
    # refused in names): the files are mirrored as named, and every line fetch writes
    # shows those characters as \uXXXX escapes, never raw. JSON lines read them back.
    dest = tmp_path / "d"
    with FaultServer() as srv:
        for name, data in _TRICKS.items():
            srv.add_file(START + name, data)
        argv = [sys.executable, "-m", "fetcher", "--mirror", srv.url + START[1:], "--dest",
                str(dest), "--procs", "1", "-v", "--log-format", fmt]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for name, data in _TRICKS.items():
        assert (dest / name).read_bytes() == data
    out = done.stdout + done.stderr
    assert "\u009b" not in out and "\u202e" not in out, out
    assert "\\u009b" in out and "\\u202e" in out, out
    if fmt == "json":
        said = {json.loads(line).get("path") for line in done.stdout.splitlines()}
        assert set(_TRICKS) <= said, said
