"""SHA256SUMS-style files: parsed (pure), and used with --verify against a real server."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

from fetcher.checksums import is_sums_file, parse_sums
from tests.faultserver import Fault, FaultServer

H1 = hashlib.sha256(b"one").hexdigest()
H2 = hashlib.sha512(b"two").hexdigest()


def test_parse_gnu_and_bsd_formats() -> None:
    text = f"{H1}  one.iso\n{H1} *star.iso\nnot a line\n{H1[:10]}  short.iso\n{H1}  sub/dir.iso\n"
    assert parse_sums("SHA256SUMS", text) == {"one.iso": ("sha256", H1), "star.iso": ("sha256", H1)}
    bsd = f"# comment\nSHA512 (two.iso) = {H2}\nSHA256 (two.iso) = {H1}\n"
    assert parse_sums("Fedora-38-x86_64-CHECKSUM", bsd) == {"two.iso": ("sha512", H2)}
    assert parse_sums("CHECKSUM", f"{H1}  gnu-line-without-algorithm.iso\n") == {}
    assert is_sums_file("SHA256SUMS") and is_sums_file("Fedora-38-x86_64-CHECKSUM")
    assert not is_sums_file("README")


def test_verify_uses_published_digests(tmp_path: Path, run_fetch) -> None:
    www = tmp_path / "www" / "iso"
    www.mkdir(parents=True)
    good, bad = b"good image" * 1000, b"bad image!" * 1000
    (www / "good.iso").write_bytes(good)
    (www / "bad.iso").write_bytes(bad)
    wrong = hashlib.sha256(b"what the publisher meant").hexdigest()
    (www / "SHA256SUMS").write_text(
        f"{hashlib.sha256(good).hexdigest()}  good.iso\n{wrong}  bad.iso\n"
    )
    with FaultServer(root=tmp_path / "www") as srv:
        r = run_fetch("--mirror", srv.url + "iso/", "--dest", tmp_path / "plain", "--procs", "1")
        assert r.code == 0, r  # without --verify the digests are not looked at
        r = run_fetch(
            "--mirror",
            srv.url + "iso/",
            "--dest",
            tmp_path / "v",
            "--procs",
            "1",
            "--verify",
            "--retries",
            "2",
        )
        assert srv.count(path="/iso/bad.iso") == 1 + 2  # one plain fetch, two verified attempts
    assert r.code == 1, r
    assert "bad.iso" in r.output and "mismatch" in r.output
    assert (tmp_path / "v" / "good.iso").read_bytes() == good
    assert not (tmp_path / "v" / "bad.iso").exists()
    assert not list((tmp_path / "v" / ".fetcher" / "partial").glob("*.part"))
    db = sqlite3.connect(tmp_path / "v" / ".fetcher" / "state.sqlite")
    (sha,) = db.execute("SELECT sha256 FROM files WHERE path = 'good.iso'").fetchone()
    db.close()
    assert sha == hashlib.sha256(good).hexdigest()


def test_a_checksum_file_is_held_back_when_a_file_it_names_fails(tmp_path: Path, run_fetch) -> None:
    """A Fedora-style ``*-CHECKSUM`` is metadata, as ``SHA256SUMS`` is: published last, and
    not at all when a file failed (a client would read digests of files not there)."""
    www = tmp_path / "www" / "iso"
    www.mkdir(parents=True)
    good, lost = b"good image" * 1000, b"lost image" * 1000
    (www / "good.iso").write_bytes(good)
    (www / "lost.iso").write_bytes(lost)
    sums = "".join(
        f"SHA256 ({name}) = {hashlib.sha256(data).hexdigest()}\n"
        for name, data in (("good.iso", good), ("lost.iso", lost))
    )
    (www / "Fedora-38-x86_64-CHECKSUM").write_text(sums)
    (www / "SHA256SUMS").write_text(f"{hashlib.sha256(good).hexdigest()}  good.iso\n")
    dest = tmp_path / "v"
    with FaultServer(root=tmp_path / "www") as srv:
        srv.persist("/iso/lost.iso", Fault.status(404))
        r = run_fetch("--mirror", srv.url + "iso/", "--dest", dest, "--procs", "1", "--verify")
    assert r.code == 1, r
    assert (dest / "good.iso").read_bytes() == good
    for held in ("SHA256SUMS", "Fedora-38-x86_64-CHECKSUM"):
        assert f"failed {held}: metadata not published" in r.output, r.output
        assert not (dest / held).exists(), held


def test_a_file_fetched_again_without_its_digest_does_not_keep_the_old_one(
    tmp_path: Path, run_fetch
) -> None:
    """A file verified once (its SHA-256 recorded) and later fetched again in a run that
    had no digest for it (upstream dropped its SHA256SUMS, or a run without --verify)
    kept the old version's digest in the state: --verify-only then called the new, good
    bytes "changed" (exit 1). A fetch without a digest clears the one recorded."""
    www = tmp_path / "www"
    www.mkdir()
    first = b"first version" * 100
    (www / "a.iso").write_bytes(first)
    (www / "SHA256SUMS").write_text(f"{hashlib.sha256(first).hexdigest()}  a.iso\n")
    os.utime(www / "a.iso", (1_700_000_000, 1_700_000_000))
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest, "--verify").code == 0
        assert run_fetch("--verify-only", dest).code == 0
        (www / "SHA256SUMS").unlink()
        (www / "a.iso").write_bytes(b"second version, longer" * 100)
        r = run_fetch("--mirror", srv.url, "--dest", dest)
        assert r.code == 0, r.output
        assert srv.count(path="/a.iso") == 2
    r = run_fetch("--verify-only", dest)
    assert r.code == 0, r.output
    assert "nothing to check" in r.output, r.output


def test_verify_hashes_the_copies_dest_already_holds(tmp_path: Path, run_fetch) -> None:
    """A mirror made without --verify (or before upstream published its SHA256SUMS): the
    first run with --verify hashes DEST's copies against the published digests instead
    of passing them by, records the digests (for --verify-only), and fetches again only
    a copy whose bytes differ. The next run hashes nothing."""
    www = tmp_path / "www"
    www.mkdir()
    bodies = {f"f{i}.iso": bytes([65 + i]) * 5000 for i in range(3)}
    for name, body in bodies.items():
        (www / name).write_bytes(body)
    (www / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256(b).hexdigest()}  {n}\n" for n, b in bodies.items())
    )
    dest = tmp_path / "d"
    with FaultServer(root=www) as srv:
        assert run_fetch("--mirror", srv.url, "--dest", dest).code == 0
        assert "nothing to check" in run_fetch("--verify-only", dest).output
        # damaged in DEST after the fact, keeping its size and date
        damaged = dest / "f1.iso"
        st = damaged.stat()
        damaged.write_bytes(b"X" * 5000)
        os.utime(damaged, ns=(st.st_atime_ns, st.st_mtime_ns))
        srv.reset_stats()
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--verify", "--dry-run")
        assert "verify (hash DEST's copy)  3" in r.output, r.output
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--verify")
        assert r.code == 0, r.output
        assert srv.count(path="/f1.iso") == 1  # the damaged copy, fetched again
        assert srv.count(path="/f0.iso") == srv.count(path="/f2.iso") == 0  # hashed in DEST
        assert damaged.read_bytes() == bodies["f1.iso"]
        r = run_fetch("--verify-only", dest)
        assert r.code == 0 and "matches (3 files)" in r.output, r.output
        srv.reset_stats()
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--verify", "--dry-run")
        assert "unchanged (skip)  4" in r.output, r.output  # (recorded: nothing to hash)
        assert "hash DEST's copy" not in r.output, r.output
