"""The run lock (a second run on one DEST exits 3 at once and names the holder; a stale
lock never blocks) and a full disk (exit 4 with a one-line reason, nothing truncated
under a final name, a re-run with space completes)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faultserver import Fault
from tests.faultserver import serving as _serving
from tests.trees import tree_manifest

RunFetch = Callable[..., Any]
REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def _small_tree(root: Path, n: int = 6) -> None:
    for i in range(n):
        p = root / f"d{i % 2}" / f"f{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"%d\n" % i * 100)


# --- 5. the lock ------------------------------------------------------------------------


def test_second_run_exits_3_naming_the_holder_and_first_completes(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    _small_tree(src)
    gate = threading.Event()
    with _serving(src) as srv:
        srv.persist("/d0/f*", Fault.gated(gate))  # listings pass, these files wait
        argv = [sys.executable, "-m", "fetcher", "--mirror", srv.url, "--dest", str(dest),
                "--procs", "1", "-q"]  # fmt: skip
        out = tmp_path / "first.log"
        with out.open("wb") as log:
            first = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert srv.wait_for(1, path="/d0/f0.txt", timeout=30), "first run never got busy"
            started = time.monotonic()
            # short timeout, one attempt: if the lock did not hold, fail fast, not hang
            r = run_fetch(
                "--mirror", srv.url, "--dest", dest, "--procs", "1", "--timeout", "2",
                "--retries", "1",
            )  # fmt: skip
            took = time.monotonic() - started
            assert r.code == 3, r
            assert f"pid {first.pid}" in r.output, r.output
            assert "started" in r.output, r.output
            assert took < 5, f"the second run waited {took:.1f} s instead of exiting at once"
            assert first.poll() is None, "the second run disturbed the first"
        finally:
            gate.set()
            try:
                code = first.wait(30)
            finally:
                if first.poll() is None:
                    first.kill()
                    first.wait()
        assert code == 0, out.read_text(errors="replace")
    assert tree_manifest(dest) == tree_manifest(src)


@pytest.mark.parametrize(
    "planted",
    [".fetcher", ".fetcher/lock", ".fetcher/state.sqlite-wal", ".fetcher/partial"],
)
def test_a_symbolic_link_in_dests_own_directory_is_refused_untouched(
    tmp_path: Path, run_fetch: RunFetch, planted: str
) -> None:
    """A link planted where fetch keeps its own files (someone who can write DEST; fetch
    run from root's crontab) was written through: the lock truncated its target and wrote
    a line into it, SQLite's journal went into ``state.sqlite-wal``'s. Now exit 4, naming
    the link, and the target as it was."""
    src, dest, outside = tmp_path / "src", tmp_path / "dest", tmp_path / "outside"
    _small_tree(src)
    with _serving(src) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1")
        assert run_fetch(*args).code == 0  # a DEST as a run leaves it, then the link
        (src / "d0" / "f0.txt").write_bytes(b"changed upstream\n")
        os.utime(src / "d0" / "f0.txt", (2_000_000_000, 2_000_000_000))
        link = dest / planted
        if planted in (".fetcher", ".fetcher/partial"):
            os.rename(link, outside)  # the real directory, moved out: its files the targets
            os.symlink(outside, link)
        else:
            outside.mkdir()
            (outside / "precious").write_bytes(b"not fetch's\n")
            link.unlink(missing_ok=True)
            os.symlink(outside / "precious", link)
        before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
        r = run_fetch(*args)
    assert r.code == 4, r
    assert f"{link} is a symbolic link" in r.output and "Traceback" not in r.output, r
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before
    assert (dest / "d0" / "f0.txt").read_bytes() == b"0\n" * 100  # nothing fetched


def test_the_writability_probe_is_never_written_through_a_link(tmp_path: Path) -> None:
    """A Dask worker checks DEST without the lock (the coordinator holds it): its probe's
    name (PID and thread) can be guessed, and a link planted there was written through."""
    import threading

    from fetcher.landing import check_writable

    dest = tmp_path / "dest"
    (dest / ".fetcher").mkdir(parents=True)
    target = tmp_path / "precious"
    target.write_bytes(b"not fetch's\n")
    probe = dest / ".fetcher" / f".probe-{os.getpid()}-{threading.get_ident()}"
    probe.symlink_to(target)
    check_writable(dest)
    assert target.read_bytes() == b"not fetch's\n"
    assert not os.path.lexists(probe)


def test_stale_lock_file_does_not_block(tmp_path: Path, run_fetch: RunFetch) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    _small_tree(src)
    lock = dest / ".fetcher" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"pid 999999, started 1999-01-01 00:00:00\n\x00\xffjunk")
    with _serving(src) as srv:
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--procs", "1")
        assert r.code == 0, r
    assert tree_manifest(dest) == tree_manifest(src)
    assert lock.read_text().startswith(f"pid {os.getpid()}, started ")


# --- 6. disk full -------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {exc} {err!r}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def test_disk_full_exits_4_then_rerun_with_space_completes(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    src = tmp_path / "src"
    rng = random.Random(9)
    for i in range(6):
        p = src / f"d{i % 2}" / f"big{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(3 * MIB))
    (src / "small.txt").write_bytes(b"small\n")
    want = tree_manifest(src)
    with _tmpfs(tmp_path / "mnt", "8m") as mnt, _serving(src) as srv:
        dest = mnt / "dest"
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1", "--threads", "2")
        r = run_fetch(*args)
        assert r.code == 4, r
        reasons = [
            ln.strip()
            for ln in r.output.splitlines()
            if ln.lstrip().startswith(("stopped:", "fetch: error:"))
        ]
        assert reasons, r.output
        assert any("No space left" in ln or "disk is full" in ln for ln in reasons), reasons
        assert "Traceback" not in r.output
        complete = []
        for path, digest in tree_manifest(dest).items():
            if digest is not None:
                assert want.get(path) == digest, f"{path} is truncated or wrong"
                complete.append("/" + path)

        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        srv.reset_stats()
        r = run_fetch(*args)
        assert r.code == 0, r
        again = [q.path for q in srv.requests if q.path in complete]
        assert again == [], f"files finished before the disk filled were fetched again: {again}"
        assert tree_manifest(dest) == want
        assert not list((dest / ".fetcher" / "partial").glob("*.part"))


def test_read_only_dest_exits_4_with_a_reason(tmp_path: Path, run_fetch: RunFetch) -> None:
    src = tmp_path / "src"
    _small_tree(src)
    with _tmpfs(tmp_path / "mnt", "8m") as mnt, _serving(src) as srv:
        dest = mnt / "dest"
        args = ("--mirror", srv.url, "--procs", "1")
        assert run_fetch(*args, "--dest", dest).code == 0
        (src / "d0" / "f0.txt").write_bytes(b"changed upstream\n")
        os.utime(src / "d0" / "f0.txt", (2_000_000_000, 2_000_000_000))
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        for where, dry in itertools.product((dest, mnt / "fresh"), ((), ("--dry-run",))):
            r = run_fetch(*args, "--dest", where, *dry)  # a dry run: as the run would end
            assert r.code == 4, r
            assert "Read-only file system" in r.output and "Traceback" not in r.output, r
        assert (dest / "d0" / "f0.txt").read_bytes() == b"0\n" * 100


def test_a_dest_that_cannot_hold_state_names_what_is_in_the_way(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    src = tmp_path / "src"
    _small_tree(src)
    (tmp_path / "d1").mkdir()
    (tmp_path / "d1" / ".fetcher").write_text("not a directory")
    (tmp_path / "afile").write_text("")
    with _serving(src) as srv:
        r = run_fetch("--mirror", srv.url, "--procs", "1", "--dest", tmp_path / "d1")
        assert r.code == 4, r
        assert (
            f"cannot write to {tmp_path / 'd1'}: {tmp_path / 'd1' / '.fetcher'}: File exists"
            in r.output
        )
        # a file as DEST: was "cannot create DEST: File exists", as if it were made already
        r = run_fetch("--mirror", srv.url, "--procs", "1", "--dest", tmp_path / "afile")
        assert r.code == 4, r
        assert f"cannot write to {tmp_path / 'afile'}: Not a directory\n" in r.output, r
        r = run_fetch("--mirror", srv.url, "--procs", "1", "--dest", tmp_path / "afile" / "x")
        assert r.code == 4, r
        assert f"cannot create {tmp_path / 'afile' / 'x'}: Not a directory" in r.output
        for where in (tmp_path / "afile", tmp_path / "afile" / "x"):  # a dry run says so too
            r = run_fetch("--mirror", srv.url, "--dest", where, "--dry-run")
            assert r.code == 4 and re.search(
                rf"cannot (create|write to) {re.escape(str(where))}: ", r.output
            ), r.output
    assert (tmp_path / "d1" / ".fetcher").read_text() == "not a directory"


def test_a_directory_of_dest_on_another_filesystem_gets_its_files(
    tmp_path: Path, run_fetch: RunFetch
) -> None:
    """A disk mounted inside DEST for a big part of the mirror (``pool/``): no rename
    reaches it from ``DEST/.fetcher/partial/``, and every file there that went through a
    partial file (an update, a body of 1 MiB or more, a segmented one) failed with
    'Invalid cross-device link' on every run, after its whole body came in."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    rng = random.Random(11)
    (src / "pool").mkdir(parents=True)
    (src / "top.txt").write_bytes(b"top\n")
    (src / "pool" / "small.txt").write_bytes(b"small\n")
    (src / "pool" / "big.bin").write_bytes(rng.randbytes(3 * MIB))
    (src / "pool" / "huge.bin").write_bytes(rng.randbytes(16 * MIB))
    with _tmpfs(dest / "pool", "64m"), _serving(src) as srv:
        args = ("--mirror", srv.url, "--dest", dest, "--procs", "1", "--segments", "2")
        r = run_fetch(*args)
        assert r.code == 0, r
        assert tree_manifest(dest) == tree_manifest(src)
        for name in ("small.txt", "big.bin", "huge.bin"):  # upstream, each changes
            p = src / "pool" / name
            p.write_bytes(p.read_bytes()[::-1] + b"!")
            os.utime(p, (2_000_000_000, 2_000_000_000))
        r = run_fetch(*args)
        assert r.code == 0, r
        assert "Invalid cross-device link" not in r.output, r
        assert tree_manifest(dest) == tree_manifest(src)
        mode = (dest / "top.txt").stat().st_mode
        for p in (dest / "pool").iterdir():  # as any file fetch makes, not mkstemp's 0600
            assert p.stat().st_mode == mode, p
            assert p.stat().st_mtime == 2_000_000_000, p
        assert sorted(p.name for p in (dest / "pool").iterdir()) == [
            "big.bin",
            "huge.bin",
            "small.txt",
        ]
        assert not list((dest / ".fetcher" / "partial").iterdir())


@pytest.mark.parametrize("disk", ["dists-on-a-disk-of-its-own", "no-hard-links"])
def test_repository_metadata_is_published_on_awkward_disks(
    tmp_path: Path, run_fetch: RunFetch, monkeypatch: pytest.MonkeyPatch, disk: str
) -> None:
    """``dists/`` on a disk of its own inside DEST: the metadata staged under
    ``DEST/.fetcher/staged/`` could not take its names there (EXDEV), new or updated, and
    every run failed the whole set with 'Invalid cross-device link'.

    DEST on a FAT or exFAT disk (a USB stick with an offline apt repository): no hard
    links (``link(2)`` says EPERM). The old metadata was not kept aside, so a set that
    could not be published whole lost the files it had published."""
    from tests.test_churn import OLD, _age, _debian, _release

    www, dest = tmp_path / "www", tmp_path / "dest"
    (www / "dists" / "stable" / "main" / "binary-amd64").mkdir(parents=True)
    (www / "pool").mkdir()
    (www / "pool" / "p.deb").write_bytes(b"deb" * 100)
    _debian(www, b"Packages, first")
    _age(www)
    index = "dists/stable/main/binary-amd64/Packages.gz"
    with contextlib.ExitStack() as stack:
        if disk == "no-hard-links":

            def no_link(*args: object, **kwargs: object) -> None:
                raise PermissionError(errno.EPERM, "Operation not permitted")

            monkeypatch.setattr(os, "link", no_link)  # (the coordinator's: it publishes)
        else:
            stack.enter_context(_tmpfs(dest / "dists", "16m"))
        srv = stack.enter_context(_serving(www))
        r = run_fetch("--mirror", srv.url, "--dest", dest)
        assert r.code == 0, r.output
        assert tree_manifest(dest) == tree_manifest(www)
        _debian(www, b"Packages, secnd")
        _age(www, OLD + 7200)
        r = run_fetch("--mirror", srv.url, "--dest", dest)
        assert r.code == 0, r.output
        assert "cross-device" not in r.output, r.output
        assert (dest / index).read_bytes() == b"Packages, secnd"
        assert (dest / "dists/stable/Release").read_bytes() == _release(b"Packages, secnd")
        assert os.stat(dest / index).st_mtime == OLD + 7200
        assert tree_manifest(dest) == tree_manifest(www)
        left = [p.name for p in (dest / "dists").rglob("*") if p.name.startswith(".")]
        assert left == [], left
        assert not (dest / ".fetcher" / "staged").exists()
        # A set that cannot be published whole (someone's directory where the Release
        # goes): the index that took its name first gets the old one back, from its copy.
        _debian(www, b"Packages, third")
        _age(www, OLD + 9000)
        (dest / "dists/stable/Release").unlink()
        (dest / "dists/stable/Release").mkdir()
        (dest / "dists/stable/Release/someone's").write_bytes(b"kept")
        r = run_fetch("--mirror", srv.url, "--dest", dest)
        assert r.code == 1 and "cannot publish" in r.output, r.output
        assert "cross-device" not in r.output, r.output
        assert (dest / index).read_bytes() == b"Packages, secnd"
        assert os.stat(dest / index).st_mtime == OLD + 7200
        assert (dest / "dists/stable/Release/someone's").read_bytes() == b"kept"


def test_a_fat_disk_takes_files_and_reports_without_their_modes(
    tmp_path: Path, run_fetch: RunFetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAT and exFAT keep no modes: ``chmod`` is refused (EPERM) unless the disk was
    mounted ``quiet``. A file copied onto such a disk mounted inside DEST, and a report
    written onto one, failed on it; their modes are the mount's, and they land."""
    from fetcher.landing import move_into

    chmod, fchmod = os.chmod, os.fchmod
    refused: list[str] = []
    fat = tmp_path / "fat"

    def on_fat(path: str) -> bool:
        if path.startswith(str(fat)):
            refused.append(path)
            return True
        return False

    def no_chmod(path: Any, *args: Any, **kwargs: Any) -> None:
        if on_fat(os.fspath(path)):
            raise PermissionError(errno.EPERM, "Operation not permitted", path)
        chmod(path, *args, **kwargs)

    def no_fchmod(fd: int, mode: int) -> None:
        if on_fat(os.readlink(f"/proc/self/fd/{fd}")):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        fchmod(fd, mode)

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_fchmod)
    monkeypatch.setattr("fetcher.landing.Out.open_unnamed", lambda self, d: False)
    src = tmp_path / "src"
    (src / "pool").mkdir(parents=True)
    (src / "pool" / "p.deb").write_bytes(b"deb" * 100)
    with _tmpfs(fat, "8m"), _serving(src) as srv:
        # a file checked in DEST's partial directory takes its name on the other disk
        part = tmp_path / "big.part"
        part.write_bytes(b"checked" * 1000)
        os.utime(part, (2_000_000_000, 2_000_000_000))
        move_into(part, str(fat / "big.bin"))
        assert (fat / "big.bin").read_bytes() == b"checked" * 1000
        assert (fat / "big.bin").stat().st_mtime == 2_000_000_000 and not part.exists()
        report = fat / "report.json"
        r = run_fetch("--mirror", srv.url, "--dest", tmp_path / "dest", "--report", report)
        assert r.code == 0, r
        assert '"exit_code": 0' in report.read_text()
    assert {Path(p).parent for p in refused} == {fat}, refused
    assert len(refused) == 2, refused  # the copy's mode, the report's
