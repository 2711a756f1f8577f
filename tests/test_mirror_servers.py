"""One hard tree, served in turn by the fault server and by real nginx, Apache, lighttpd,
Caddy and python http.server, mirrored byte for byte with nothing extra and nothing above."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.faultserver import FaultServer
from tests.servers import visible_manifest
from tests.trees import make_hard_tree, settled, tree_manifest


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    """The hard tree at /pub/tree/, with files above and beside it that must not be fetched."""
    base = tmp_path_factory.mktemp("www")
    manifest = make_hard_tree(base / "pub" / "tree")
    (base / "above.txt").write_text("above the start URL\n")
    (base / "pub" / "sibling").mkdir()
    (base / "pub" / "sibling" / "secret.txt").write_text("beside the start URL\n")
    (base / "pub" / "treeX").mkdir()
    (base / "pub" / "treeX" / "prefix-trap.txt").write_text(
        "a prefix of the start path, not below it\n"
    )
    return base, manifest


def _check(dest: Path, expected: dict[str, str | None]) -> None:
    got = tree_manifest(dest)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert not missing, f"missing {len(missing)}: {missing[:10]}"
    assert not extra, f"extra {len(extra)}: {extra[:10]}"
    wrong = [p for p in expected if got[p] != expected[p]]
    assert not wrong, f"content differs: {wrong[:10]}"
    assert not list((dest / ".fetcher" / "partial").glob("*.part")), "partial files left behind"


@pytest.mark.real_server
def test_real_server_mirror(server_kind: str, served, published, tmp_path: Path, run_fetch) -> None:
    base, manifest = published
    srv = served(server_kind, base)
    dest = tmp_path / "dest"
    r = run_fetch(
        "--mirror", srv.url + "pub/tree/", "--dest", dest, "--procs", "2", "--threads", "4"
    )
    assert r.code == 0, r
    _check(dest, visible_manifest(server_kind, manifest))
    for req in srv.requests():
        assert req.path.startswith("/pub/tree/"), f"request outside the start directory: {req}"
        assert "?" not in req.target, f"sort link followed: {req}"


def test_fault_server_mirror(published, tmp_path: Path, run_fetch) -> None:
    base, manifest = published
    with FaultServer(root=base) as srv:
        dest = tmp_path / "dest"
        r = run_fetch(
            "--mirror", srv.url + "pub/tree/", "--dest", dest, "--procs", "2", "--threads", "4"
        )
        assert r.code == 0, r
        _check(dest, manifest)
        paths = [q.path for q in srv.requests]
        assert paths and all(p.startswith("/pub/tree/") for p in paths), [
            p for p in paths if not p.startswith("/pub/tree/")
        ][:5]
        # sizes and dates come from the listing: no HEAD, one GET per file
        assert srv.count(method="HEAD") == 0
        files = sum(1 for v in manifest.values() if v is not None)
        assert srv.count(method="GET") == files + sum(1 for v in manifest.values() if v is None) + 1


def test_default_dest_is_last_segment(
    published, tmp_path: Path, run_fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    del published
    small = tmp_path / "www" / "pub" / "Packages"
    small.mkdir(parents=True)
    (small / "a.rpm").write_bytes(b"rpm")
    monkeypatch.chdir(tmp_path)
    with FaultServer(root=tmp_path / "www") as srv:
        for start in ("pub/Packages/", "pub/Packages/./", "pub/x/../Packages/"):
            r = run_fetch("--mirror", srv.url + start, "-q")
            assert r.code == 0, r
            assert (tmp_path / "Packages" / "a.rpm").read_bytes() == b"rpm"
            shutil.rmtree(tmp_path / "Packages")


@pytest.mark.real_server
@pytest.mark.parametrize("style", ["fancy", "table"])
def test_links_of_apache_readmes_are_not_entries(
    style: str, served, tmp_path: Path, run_fetch
) -> None:
    """Apache shows HEADER.html above a listing and README.html below it (Debian's config).
    Their links were entries: a file and a directory that do not exist asked for (404)
    on every run, the directory made in DEST, and a listing error that kept off --delete."""
    src = tmp_path / "www"
    (src / "sub").mkdir(parents=True)
    (src / "a.iso").write_bytes(b"iso\n")
    (src / "sub" / "b.txt").write_bytes(b"b\n")
    (src / "HEADER.html").write_text(
        '<h2>Mirror</h2><p>See <a href="/">home</a>, <a href="ChangeLog">the change log</a>,'
        ' <a href="old/">old releases</a>, <a href="/status.html">status</a> and'
        ' <a href="a.iso">the image</a>.</p>\n'
    )
    (src / "README.html").write_text(
        '<p>From <a href="https://upstream.invalid/">upstream</a>: <a href="sub/b.txt">b</a>,'
        ' <a href="SHA256SUMS">sums</a>, <a href="?C=N;O=D">by name</a></p>\n'
    )
    (src / "sub" / "README.html").write_text('<p><a href="../gone/x.iso">moved</a></p>\n')
    srv = served("apache", settled(src), style=style, readmes=True)
    dest = tmp_path / "dest"
    for _ in range(2):
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1")
        assert r.code == 0, r
        _check(dest, tree_manifest(src))
    asked = {q.path for q in srv.requests()}
    assert asked.isdisjoint({"/ChangeLog", "/old/", "/status.html", "/SHA256SUMS", "/gone/"})
    assert asked >= {"/", "/sub/", "/a.iso", "/sub/b.txt", "/HEADER.html", "/README.html"}
