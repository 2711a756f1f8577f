"""A mirror that changes while it is being synced: its files and its repository metadata
rewritten between the listing and the download, and runs killed in the middle of it.
Every change is made to the served tree itself, at a moment the fault server's gates
pick; each run must leave DEST a consistent mirror (the old state or the new one)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.faultserver import Fault, FaultServer
from tests.trees import tree_manifest

RunFetch = Callable[..., Any]

OLD = 1_700_000_000.0
"""Source mtimes: fixed and old, so listing dates are stable across runs."""


def _age(www: Path, when: float = OLD) -> None:
    for p in www.rglob("*"):
        os.utime(p, (when, when))


@contextlib.contextmanager
def _changed_when_asked(
    srv: FaultServer, path: str, change: Callable[[], None]
) -> Iterator[threading.Thread]:
    """The next request for ``path`` waits while ``change()`` rewrites the served tree."""
    gate = threading.Event()
    srv.reset_stats()
    srv.script(path, [Fault.gated(gate)])

    def when_asked() -> None:
        try:
            if srv.wait_for(1, path=path, timeout=60):
                change()
        finally:
            gate.set()

    th = threading.Thread(target=when_asked, daemon=True)
    th.start()
    try:
        yield th
    finally:
        gate.set()
        th.join(timeout=60)


def _repomd(primary: bytes) -> tuple[str, bytes]:
    digest = hashlib.sha256(primary).hexdigest()
    href = f"repodata/{digest}-primary.xml.gz"
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<repomd xmlns="http://linux.duke.edu/metadata/repo"><data type="primary">'
        f'<checksum type="sha256">{digest}</checksum><location href="{href}"/>'
        f"<size>{len(primary)}</size></data></repomd>\n"
    )
    return href, xml.encode()


def _release(packages: bytes) -> bytes:
    digest = hashlib.sha256(packages).hexdigest()
    return (
        "Origin: test\nSuite: stable\nComponents: main\nArchitectures: amd64\nSHA256:\n"
        f" {digest} {len(packages):8d} main/binary-amd64/Packages.gz\n"
    ).encode()


def _yum(www: Path, primary: bytes) -> None:
    for old in (www / "repodata").glob("*-primary.xml.gz"):
        old.unlink()
    href, xml = _repomd(primary)
    (www / href).write_bytes(primary)
    (www / "repodata" / "repomd.xml").write_bytes(xml)


def _debian(www: Path, packages: bytes) -> None:
    suite = www / "dists" / "stable"
    (suite / "main" / "binary-amd64" / "Packages.gz").write_bytes(packages)
    (suite / "Release").write_bytes(_release(packages))


def test_an_index_rewritten_upstream_after_the_files_it_names_is_not_published(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """Upstream rewrites its metadata between the run's GET of ``primary`` / ``Packages.gz``
    and its GET of ``repomd.xml`` / ``Release``, which keep their size (checksums and dates
    are fixed-width). The new ones named a primary this run never saw, and a
    ``Packages.gz`` of other bytes than DEST's; published, every client of the mirror met
    a missing file or a checksum error, and the run said 0. The old copies stay, the run
    says which and exits 1, and the next run brings the new set whole."""
    www = tmp_path / "www"
    (www / "repodata").mkdir(parents=True)
    (www / "dists" / "stable" / "main" / "binary-amd64").mkdir(parents=True)
    (www / "Packages").mkdir()
    for i in range(4):
        (www / "Packages" / f"p{i}.rpm").write_bytes(bytes([i]) * 300)
    _yum(www, b"primary, first")
    _debian(www, b"Packages, first")
    _age(www)
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        old = tree_manifest(dest)
        (www / "Packages" / "p4.rpm").write_bytes(b"a new package")
        for k, top in enumerate(("/repodata/repomd.xml", "/dists/stable/Release"), 1):
            # touched upstream (so this run asks for them), then rewritten while it does
            for p in ("repodata/repomd.xml", "dists/stable/Release"):
                os.utime(www / p, (OLD + k * 7200, OLD + k * 7200))

            def rewrite() -> None:
                _yum(www, b"primary, later")
                _debian(www, b"Packages, later")

            with _changed_when_asked(srv, top, rewrite):
                r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete")
            assert r.code == 1, r.output
            assert f"{top[1:]} not published" in r.output, r.output
            assert "rewritten upstream during the run" in r.output, r.output
            # DEST is the old repository, whole: its index and the files it names
            now = tree_manifest(dest)
            for p in ("repodata/repomd.xml", "dists/stable/Release"):
                assert now[p] == old[p], p
            assert (dest / _repomd(b"primary, first")[0]).exists()
            assert (dest / "dists/stable/main/binary-amd64/Packages.gz").read_bytes() == (
                b"Packages, first"
            )
            _yum(www, b"primary, first")
            _debian(www, b"Packages, first")
            _age(www)
        _yum(www, b"primary, later")
        _debian(www, b"Packages, later")
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete")
    assert r.code == 0, r.output
    assert tree_manifest(dest) == tree_manifest(www)
