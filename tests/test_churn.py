"""A mirror that changes while it is being synced: its files and its repository metadata
rewritten between the listing and the download, and runs killed in the middle of it.
Every change is made to the served tree itself, at a moment the fault server's gates
pick; each run must leave DEST a consistent mirror (the old state or the new one)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faultserver import Fault, FaultServer
from tests.trees import tree_manifest

RunFetch = Callable[..., Any]
REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20

OLD = 1_700_000_000.0
"""Source mtimes: fixed and old, so listing dates are stable across runs."""


def _age(www: Path, when: float = OLD) -> None:
    for p in www.rglob("*"):
        os.utime(p, (when, when))


@contextlib.contextmanager
def _changed_when_asked(
    srv: FaultServer, path: str, change: Callable[[], None], after: str | None = None
) -> Iterator[threading.Thread]:
    """The next request for ``path`` waits while ``change()`` rewrites the served tree;
    with ``after``, the change comes once ``after`` has been answered (and ``path``
    waits until then)."""
    gate = threading.Event()
    srv.reset_stats()
    srv.script(path, [Fault.gated(gate)])

    def answered(at: str) -> bool:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(q.path == at and q.finished for q in srv.requests):
                return True
            time.sleep(0.01)
        return False

    def when_asked() -> None:
        try:
            if answered(after) if after else srv.wait_for(1, path=path, timeout=60):
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


def _packages_naming(*debs: str) -> bytes:
    return "".join(f"Package: {d}\nFilename: pool/{d}/{d}.deb\nSize: 9\n\n" for d in debs).encode()


def _primary_naming(*rpms: str) -> bytes:
    entries = "".join(
        f'<package type="rpm"><name>{r}</name><size package="9"/>'
        f'<location href="pool/{r}/{r}.rpm"/></package>'
        for r in rpms
    )
    xml = f'<metadata xmlns="http://linux.duke.edu/metadata/common">{entries}</metadata>'
    return gzip.compress(xml.encode(), mtime=0)


@pytest.mark.parametrize("kind", ["yum"])
def test_an_index_naming_a_package_added_after_its_directory_was_listed_is_not_published(
    tmp_path: Path, run_fetch: RunFetch, kind: str
) -> None:
    """Upstream adds a package (``pool/b/``) and the new ``primary`` / ``Packages.gz``
    naming it after the run listed ``pool/`` but before it listed the metadata. The new
    ``repomd.xml`` / ``Release`` named a ``primary`` / ``Packages.gz`` DEST held, and was
    published: the run said 0, and every client installing the new package met a 404.
    The packages the new list names are looked for as well."""
    www = tmp_path / "www"
    (www / "pool" / "a").mkdir(parents=True)
    (www / "dists" / "stable" / "main" / "binary-amd64").mkdir(parents=True)
    (www / "repodata").mkdir()
    (www / "pool" / "a" / f"a.{'rpm' if kind == 'yum' else 'deb'}").write_bytes(b"package a")

    def publish(*names: str) -> None:
        if kind == "yum":
            _yum(www, _primary_naming(*names))
        else:
            _debian(www, _packages_naming(*names))

    publish("a")
    _age(www)
    dest = tmp_path / "d"
    listing = "/repodata/" if kind == "yum" else "/dists/stable/main/binary-amd64/"
    with FaultServer(root=www) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        old = tree_manifest(dest)

        def add_b() -> None:
            (www / "pool" / "b").mkdir()
            (www / "pool" / "b" / f"b.{'rpm' if kind == 'yum' else 'deb'}").write_bytes(
                b"package b"
            )
            publish("a", "b")
            _age(www, OLD + 7200)

        # the metadata's listing is answered once pool/ was listed
        with _changed_when_asked(srv, listing, add_b, after="/pool/"):
            # (listings one per request: none waits in line behind the gated one)
            r = run_fetch("--mirror", srv.url, "--dest", dest, "--pipeline", "1")
        assert r.code == 1, r.output
        assert "not published" in r.output and "which names pool/b/b." in r.output, r.output
        assert tree_manifest(dest) == old
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete", "--force")
    assert r.code == 0, r.output
    assert tree_manifest(dest) == tree_manifest(www)


def test_a_release_whose_packages_name_a_package_dest_lacks_is_not_published(
    tmp_path: Path,
) -> None:
    """The same check for a ``Release``: the ``Packages`` list it names (one form per
    directory read) names a package DEST lacks or holds with another size."""
    from fetcher.config import Transfer
    from fetcher.repo_refs import disagreement

    dest = tmp_path / "d"
    packages = gzip.compress(_packages_naming("a", "b"), mtime=0)
    index = dest / "dists/stable/main/binary-amd64/Packages.gz"
    index.parent.mkdir(parents=True)
    index.write_bytes(packages)
    (dest / "pool" / "a").mkdir(parents=True)
    (dest / "pool" / "a" / "a.deb").write_bytes(b"package a")
    t = Transfer(dest=str(dest), root="http://mirror.test/")
    release = _release(packages)
    why = disagreement("dists/stable/Release", release, t)
    assert why is not None and "which names pool/b/b.deb, which is not in DEST" in why, why
    (dest / "pool" / "b").mkdir()
    (dest / "pool" / "b" / "b.deb").write_bytes(b"short")
    why = disagreement("dists/stable/Release", release, t)
    assert why is not None and "pool/b/b.deb, which has 5 bytes in DEST, not 9" in why, why
    (dest / "pool" / "b" / "b.deb").write_bytes(b"package b")
    assert disagreement("dists/stable/Release", release, t) is None
    assert disagreement("dists/stable/InRelease", release, t) is None
    t = Transfer(dest=str(dest), root="http://mirror.test/", exclude=("pool/b",))
    (dest / "pool" / "b" / "b.deb").unlink()
    assert disagreement("dists/stable/Release", release, t) is None  # left out on purpose


def test_an_index_naming_files_the_selection_leaves_out_is_published(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """A mirror that leaves out part of the repository metadata (``--exclude '*filelists*'``,
    a big file few clients ask for) still publishes its repomd.xml, whose check of what
    DEST holds passes over what the selection leaves out; it was refused on every run."""
    www = tmp_path / "www"
    (www / "repodata").mkdir(parents=True)
    entries = ""
    for kind, body in (("primary", b"primary, first"), ("filelists", b"filelists, big")):
        digest = hashlib.sha256(body).hexdigest()
        (www / "repodata" / f"{digest}-{kind}.xml.gz").write_bytes(body)
        entries += (
            f'<data type="{kind}"><checksum type="sha256">{digest}</checksum>'
            f'<location href="repodata/{digest}-{kind}.xml.gz"/><size>{len(body)}</size></data>'
        )
    (www / "repodata" / "repomd.xml").write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<repomd xmlns="http://linux.duke.edu/metadata/repo">{entries}</repomd>\n'
    )
    _age(www)
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--exclude", "*filelists*")
    assert r.code == 0, r.output
    assert (dest / "repodata" / "repomd.xml").read_bytes() == (
        www / "repodata" / "repomd.xml"
    ).read_bytes()
    assert not list((dest / "repodata").glob("*filelists*"))


def _partials(dest: Path) -> list[str]:
    part = dest / ".fetcher" / "partial"
    return sorted(p.name for p in part.iterdir()) if part.is_dir() else []


def _begun(dest: Path) -> list[Path]:
    """Partial files with a sidecar and some bytes: a next run resumes them."""
    part = dest / ".fetcher" / "partial"
    begun = []
    for p in part.glob("*.part") if part.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):
            if p.stat().st_size >= 64 * 1024 and p.with_suffix(".json").exists():
                begun.append(p)
    return begun


def test_the_partial_file_of_a_killed_run_goes_once_its_file_is_gone_upstream(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """A run killed while it fetched a big file leaves its partial file to be resumed; but
    the file was deleted upstream before the next run, which then had nothing to resume it
    for, and left it (and its sidecar) in DEST for good: every such kill under a timer
    that stops hung syncs kept a few hundred MiB of an ISO nobody serves. A run whose
    crawl is complete and clean removes the partial files of everything but what failed
    in it (which the next run resumes)."""
    www = tmp_path / "www"
    (www / "iso").mkdir(parents=True)
    (www / "iso" / "old.iso").write_bytes(os.urandom(4 * MIB))
    (www / "iso" / "kept.iso").write_bytes(os.urandom(3 * MIB))
    (www / "small.txt").write_bytes(b"small")
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        srv.persist("/iso/*", Fault.trickle(MIB))
        argv = [sys.executable, "-m", "fetcher", "--mirror", srv.url, "--dest", str(dest),
                "--procs", "1", "--threads", "2", "-q"]  # fmt: skip
        proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while len(_begun(dest)) < 2:
                assert proc.poll() is None, f"run ended early: {proc.returncode}"
                assert time.monotonic() < deadline, (
                    f"no partial files after 30 s: {_partials(dest)}"
                )
                time.sleep(0.05)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        assert not (dest / "iso" / "old.iso").exists()
        srv.persist("/iso/*", None)
        (www / "iso" / "old.iso").unlink()

        # a run that fails the other one keeps its partial file for the next
        srv.persist("/iso/kept.iso", Fault.status(503))
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--retries", "1")
        assert r.code == 1, r.output
        left = _partials(dest)
        assert len(left) == 2 and {n.rpartition(".")[2] for n in left} == {"part", "json"}, left
        srv.persist("/iso/kept.iso", None)
        r = run_fetch("--mirror", srv.url, "--dest", dest)
    assert r.code == 0, r.output
    assert tree_manifest(dest) == tree_manifest(www)
    assert _partials(dest) == []
    assert srv.count(path="/iso/kept.iso", status=206) >= 1  # resumed, not fetched again


def test_a_signature_is_not_published_beside_an_index_that_was_not(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """``Release.gpg`` signs ``Release`` (and ``repomd.xml.asc`` signs ``repomd.xml``).
    Both went out in one step: upstream rewrote the suite while the run asked for
    ``Release``, the new ``Release`` was refused (it names another ``Packages.gz``) but
    the new ``Release.gpg`` was published beside the old ``Release``, which then failed
    its signature check on every client (BADSIG). A signature goes after what it signs,
    and not when that failed."""
    www = tmp_path / "www"
    (www / "dists" / "stable" / "main" / "binary-amd64").mkdir(parents=True)
    _debian(www, b"Packages, first")
    suite = www / "dists" / "stable"
    (suite / "Release.gpg").write_bytes(b"signature of the first Release")
    _age(www)
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        old = tree_manifest(dest)
        for p in ("Release", "Release.gpg"):
            os.utime(suite / p, (OLD + 7200, OLD + 7200))

        def rewrite() -> None:
            _debian(www, b"Packages, later")
            (suite / "Release.gpg").write_bytes(b"signature of the later Release")

        # the signature, if asked for in the same step, is answered after Release is
        after = threading.Event()
        srv.script("/dists/stable/Release.gpg", [Fault.gated(after)])

        def release_answered() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                q.path == "/dists/stable/Release" and q.finished for q in srv.requests
            ):
                time.sleep(0.01)
            after.set()

        th = threading.Thread(target=release_answered, daemon=True)
        with _changed_when_asked(srv, "/dists/stable/Release", rewrite):
            th.start()
            try:
                r = run_fetch("--mirror", srv.url, "--dest", dest)
            finally:
                after.set()
                th.join(timeout=60)
        assert r.code == 1, r.output
        assert "dists/stable/Release not published" in r.output, r.output
        assert tree_manifest(dest) == old
        r = run_fetch("--mirror", srv.url, "--dest", dest)
    assert r.code == 0, r.output
    assert tree_manifest(dest) == tree_manifest(www)


def test_an_index_updated_in_place_waits_for_the_release_that_names_it(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """``Packages.gz`` keeps its name from one version of the suite to the next. Upstream
    published a new suite, and rewrote it once more while the run asked for ``Release``:
    the new ``Release`` was refused (it names a third ``Packages.gz``), but the second
    ``Packages.gz`` had been published in place already, under the first ``Release``,
    which names other bytes: every client without by-hash failed with a hash mismatch
    until the next run. Indices now wait, staged, for the files that point at them, and
    go with them or not at all."""
    www = tmp_path / "www"
    (www / "dists" / "stable" / "main" / "binary-amd64").mkdir(parents=True)
    (www / "pool").mkdir()
    (www / "pool" / "a.deb").write_bytes(b"a package")
    _debian(www, b"Packages, first")
    _age(www)
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        old = tree_manifest(dest)
        _debian(www, b"Packages, secnd")  # (the same size: only the date tells)
        (www / "pool" / "b.deb").write_bytes(b"a new package")
        _age(www, OLD + 7200)
        with _changed_when_asked(srv, "/dists/stable/Release", lambda: _debian(www, b"P, third")):
            r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete")
        assert r.code == 1, r.output
        assert "dists/stable/Release not published" in r.output, r.output
        assert srv.count(path="/dists/stable/main/binary-amd64/Packages.gz", status=200) == 1
        now = tree_manifest(dest)
        for p in ("dists/stable/Release", "dists/stable/main/binary-amd64/Packages.gz"):
            assert now[p] == old[p], p  # the first suite, whole
        assert (dest / "pool" / "b.deb").read_bytes() == b"a new package"  # (not metadata)
        assert not (dest / ".fetcher" / "staged").exists()
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete")
    assert r.code == 0, r.output
    assert tree_manifest(dest) == tree_manifest(www)
    assert (dest / "dists/stable/main/binary-amd64/Packages.gz").read_bytes() == b"P, third"


def test_an_index_rewritten_after_its_release_was_listed_is_not_published_alone(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """Upstream rewrites ``Packages.gz`` and ``Release`` after the run listed
    ``dists/stable/`` (``Release`` unchanged there: not fetched) but before it listed
    ``binary-amd64/``. The new ``Packages.gz`` was fetched alone and took its name under
    the old ``Release``, which names other bytes: the run said 0 and every client met a
    hash mismatch. A ``Release`` kept in DEST must agree with the set published under it."""
    www = tmp_path / "www"
    (www / "dists" / "stable" / "main" / "binary-amd64").mkdir(parents=True)
    _debian(www, b"Packages, first")
    _age(www)
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        old = tree_manifest(dest)

        def rewritten() -> None:
            _debian(www, b"Packages, later")
            _age(www, OLD + 7200)

        with _changed_when_asked(
            srv, "/dists/stable/main/binary-amd64/", rewritten, after="/dists/stable/"
        ):
            # (listings one per request: none waits in line behind the gated one)
            r = run_fetch("--mirror", srv.url, "--dest", dest, "--pipeline", "1")
        assert srv.count(path="/dists/stable/Release") == 0  # (the case: not fetched again)
        assert r.code == 1, r.output
        assert "main/binary-amd64/Packages.gz not published: dists/stable/Release" in r.output
        assert tree_manifest(dest) == old
        assert not (dest / ".fetcher" / "staged").exists()
        r = run_fetch("--mirror", srv.url, "--dest", dest)
    assert r.code == 0, r.output
    assert tree_manifest(dest) == tree_manifest(www)


def test_staged_metadata_is_published_whole_or_not_at_all(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """A staged index that cannot take its name (someone's directory in the way) holds
    back the ``Release`` that names it; what a killed run left staged is never published."""
    www = tmp_path / "www"
    (www / "dists" / "stable" / "main" / "binary-amd64").mkdir(parents=True)
    _debian(www, b"Packages, first")
    _age(www)
    dest = tmp_path / "d"
    index = "dists/stable/main/binary-amd64/Packages.gz"
    with FaultServer(root=www) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        old = tree_manifest(dest)
        _debian(www, b"Packages, secnd")
        _age(www, OLD + 7200)
        (dest / index).unlink()
        (dest / index).mkdir()
        (dest / index / "someone's").write_bytes(b"kept")
        r = run_fetch("--mirror", srv.url, "--dest", dest)
        assert r.code == 1, r.output
        assert "cannot publish" in r.output, r.output
        assert "dists/stable/Release" in r.output and "metadata not published" in r.output
        assert (dest / "dists/stable/Release").read_bytes() == _release(b"Packages, first")
        assert (dest / index / "someone's").read_bytes() == b"kept"

        shutil.rmtree(dest / index)
        staged = dest / ".fetcher" / "staged" / "dists" / "stable"
        staged.mkdir(parents=True)
        (staged / "Release").write_bytes(b"left by a killed run")
        r = run_fetch("--mirror", srv.url, "--dest", dest)
        assert r.code == 0, r.output
        assert not (dest / ".fetcher" / "staged").exists()
    assert tree_manifest(dest) == tree_manifest(www) != old


_KILLED_AFTER_ONE_PUBLISH = """
import os, signal, sys
real = os.replace

def replace(src, dst, *a, **k):
    real(src, dst, *a, **k)
    if os.fspath(src).endswith("/.fetcher/staged/dists/stable/main/binary-amd64/Packages.gz"):
        os.killpg(0, signal.SIGKILL)  # the new index has its name, its Release not yet

os.replace = replace
from fetcher.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_while_it_publishes_metadata_has_it_published_whole_next(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """Staged metadata takes its names one rename at a time. A run killed between two
    left the new ``Packages.gz`` under the old ``Release`` (which names other bytes), and
    the next run dropped the rest as a stopped run's: with any file failing in it, the
    new metadata was held back, and DEST stayed that way, its clients meeting a checksum
    error, for as long as something failed. A publication once begun is now finished by
    the next run (or the stopped run itself) before anything else."""
    www = tmp_path / "www"
    (www / "repodata").mkdir(parents=True)
    (www / "dists" / "stable" / "main" / "binary-amd64").mkdir(parents=True)
    (www / "Packages").mkdir()
    (www / "Packages" / "p0.rpm").write_bytes(b"p0" * 100)
    _yum(www, b"primary, first")
    _debian(www, b"Packages, first")
    _age(www)
    dest = tmp_path / "d"
    index = "dists/stable/main/binary-amd64/Packages.gz"
    with FaultServer(root=www) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        _yum(www, b"primary, secnd")
        _debian(www, b"Packages, secnd")
        _age(www, OLD + 7200)
        argv = [sys.executable, "-c", _KILLED_AFTER_ONE_PUBLISH, "--mirror", srv.url,
                "--dest", str(dest), "-q"]  # fmt: skip
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, start_new_session=True,
                              timeout=60, check=False)  # fmt: skip
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
        assert (dest / index).read_bytes() == b"Packages, secnd"
        assert (dest / "dists/stable/Release").read_bytes() == _release(b"Packages, first")

        (www / "Packages" / "p1.rpm").write_bytes(b"a new package that fails")
        srv.persist("/Packages/p1.rpm", Fault.status(503))
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--retries", "1")
        assert r.code == 1, r.output
        assert (dest / "dists/stable/Release").read_bytes() == _release(b"Packages, secnd")
        assert (dest / index).read_bytes() == b"Packages, secnd"
        href, xml = _repomd(b"primary, secnd")
        assert (dest / "repodata/repomd.xml").read_bytes() == xml
        assert (dest / href).read_bytes() == b"primary, secnd"
        assert not (dest / ".fetcher" / "staged").exists()

        srv.persist("/Packages/p1.rpm", None)
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete", "--force")
        assert r.code == 0, r.output
    assert tree_manifest(dest) == tree_manifest(www)


def test_a_set_whose_later_file_cannot_take_its_name_leaves_the_old_set_whole(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """Staged metadata takes its names one at a time. When a later one could not (someone's
    directory where ``Sources.gz`` goes), the ones before it had taken theirs already: the
    new ``Packages.gz`` stood under the old ``Release`` that names other bytes. The names
    taken are given back to the old files."""
    www = tmp_path / "www"
    suite = www / "dists" / "stable"
    (suite / "main" / "binary-amd64").mkdir(parents=True)
    (suite / "main" / "source").mkdir()
    (suite / "main" / "source" / "Sources.gz").write_bytes(b"Sources, first")
    _debian(www, b"Packages, first")
    _age(www)
    dest = tmp_path / "d"
    sources = dest / "dists/stable/main/source/Sources.gz"
    with FaultServer(root=www) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        old = tree_manifest(dest)
        _debian(www, b"Packages, secnd")
        (suite / "main" / "source" / "Sources.gz").write_bytes(b"Sources, secnd")
        _age(www, OLD + 7200)
        sources.unlink()
        sources.mkdir()
        (sources / "someone's").write_bytes(b"kept")
        r = run_fetch("--mirror", srv.url, "--dest", dest)
        assert r.code == 1, r.output
        assert "cannot publish" in r.output and "metadata not published" in r.output, r.output
        now = tree_manifest(dest)
        for p in ("dists/stable/Release", "dists/stable/main/binary-amd64/Packages.gz"):
            assert now[p] == old[p], p  # the first suite, whole
        assert not (dest / ".fetcher" / "staged").exists()
        assert not (dest / ".fetcher" / "replaced").exists()
        shutil.rmtree(sources)
        r = run_fetch("--mirror", srv.url, "--dest", dest)
    assert r.code == 0, r.output
    assert tree_manifest(dest) == tree_manifest(www)


def _release_naming(**forms: bytes) -> bytes:
    """A ``Release`` naming each form of ``main/binary-amd64/Packages`` given (its suffix,
    "" for the uncompressed one, as keyword names: plain, gz), as Debian's name every form."""
    lines = "".join(
        f" {hashlib.sha256(body).hexdigest()} {len(body):8d} main/binary-amd64/"
        f"Packages{'' if form == 'plain' else '.' + form}\n"
        for form, body in forms.items()
    )
    return f"Origin: test\nSuite: stable\nSHA256:\n{lines}".encode()


def test_a_release_is_published_past_an_index_form_upstream_no_longer_has(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """Upstream stops carrying the uncompressed ``Packages`` (its ``Release`` names it
    still, as Debian's ``Release`` files name every form). DEST's copy, from before, names
    the old packages: every later ``Release`` was refused over it ("it names
    .../Packages, which has another sha256 in DEST"), on every run, and the mirror's
    suite stayed old for good. A file upstream no longer has is not the mirror's: the
    new ``Release`` is published; the stale copy goes with ``--delete``."""
    www = tmp_path / "www"
    amd64 = www / "dists" / "stable" / "main" / "binary-amd64"
    amd64.mkdir(parents=True)
    first = b"Package: a\nFilename: pool/a.deb\nSize: 9\n"
    (www / "pool").mkdir()
    (www / "pool" / "a.deb").write_bytes(b"package a")
    (amd64 / "Packages").write_bytes(first)
    (amd64 / "Packages.gz").write_bytes(gzip.compress(first, mtime=0))
    (www / "dists" / "stable" / "Release").write_bytes(
        _release_naming(plain=first, gz=gzip.compress(first, mtime=0))
    )
    _age(www)
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        second = first + b"\nPackage: b\nFilename: pool/b.deb\nSize: 9\n"
        (www / "pool" / "b.deb").write_bytes(b"package b")
        (amd64 / "Packages").unlink()
        (amd64 / "Packages.gz").write_bytes(gzip.compress(second, mtime=0))
        release = _release_naming(plain=second, gz=gzip.compress(second, mtime=0))
        (www / "dists" / "stable" / "Release").write_bytes(release)
        _age(www, OLD + 7200)
        for _ in range(2):  # (the second run: nothing left to do, and nothing refused)
            r = run_fetch("--mirror", srv.url, "--dest", dest)
            assert r.code == 0, r.output
            assert "not published" not in r.output, r.output
            assert (dest / "dists" / "stable" / "Release").read_bytes() == release
            assert (dest / "pool" / "b.deb").read_bytes() == b"package b"
            # without --delete a file gone upstream stays, as any other (and is counted)
            assert (dest / "dists/stable/main/binary-amd64/Packages").read_bytes() == first
            assert re.search(r"gone upstream \(kept\) +1\b", r.output), r.output
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--delete", "--force")
    assert r.code == 0, r.output
    assert tree_manifest(dest) == tree_manifest(www)


def test_only_a_form_a_release_need_not_name_is_passed_over_when_gone(tmp_path: Path) -> None:
    """``disagreement``'s ``gone``: a ``Release``'s stale uncompressed ``Packages`` is passed
    over; a file a ``repomd.xml`` names (every one is needed) is checked all the same."""
    from fetcher.config import Transfer
    from fetcher.repo_refs import disagreement

    dest = tmp_path / "d"
    (dest / "dists/stable/main/binary-amd64").mkdir(parents=True)
    (dest / "dists/stable/main/binary-amd64/Packages").write_bytes(b"old")
    (dest / "repodata").mkdir()
    t = Transfer(dest=str(dest), root="http://mirror.test/")
    release = _release_naming(plain=b"new list")
    stale = "dists/stable/main/binary-amd64/Packages"
    assert "has 3 bytes in DEST, not 8" in (disagreement("dists/stable/Release", release, t) or "")
    assert disagreement("dists/stable/Release", release, t, frozenset({stale})) is None
    href, repomd = _repomd(b"primary, new")
    (dest / href).write_bytes(b"primary, old")
    why = disagreement("repodata/repomd.xml", repomd, t, frozenset({href}))
    assert why is not None and "has another sha256 in DEST" in why, why
