"""A Debian archive mirrored by fetch, used by a real apt client.

An archive built as in tests/test_repo_index.py (``debian_repo``) is mirrored with
``--index debian`` and with the default crawl of the HTML listings; then the mirror
(DEST, served by a :class:`FaultServer`) is a ``deb [trusted=yes]`` source of an
``apt-get`` that runs in a private ``Dir`` tree: its own sources, lists, cache and
``dpkg`` status, no lock, none of the system's ``apt.conf.d`` (``APT_CONFIG``).
``apt-get update`` must end with no ``Err:`` / ``W:`` / ``E:`` line, and ``apt-get
download`` must fetch the upstream ``.deb`` byte for byte.

What apt asks a mirror for depends on the ``Release``: with ``Acquire-By-Hash: yes`` it
asks for every index by its digest (``DIR/by-hash/SHA512/...`` when ``Release`` has a
SHA512 section, as apt-ftparchive writes it; apt takes the strongest hash), and it asks
for ``COMP/i18n/Translation-LANG`` (a compressed form) only when ``Release`` names the
uncompressed ``Translation-LANG``, as Debian's does although its servers only carry
the ``.bz2``, and ``Acquire::Languages`` has the language (the default, from the
locale, does for ``en``; the ``none`` of Docker images' apt.conf.d does not);
``Description-md5`` in ``Packages`` plays no part in that. A by-hash copy missing is
no ``Err:`` (apt falls back to the name), so apt's requests to the mirror are checked too.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.faultserver import FaultServer
from tests.test_repo_index import build_deb, debian_repo, release_of, run_mirror

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("apt-get", "dpkg-deb", "apt-ftparchive")),
    reason="needs apt-get, dpkg-deb and apt-ftparchive (Debian packages apt, dpkg-dev, apt-utils)",
)

MODES = ["debian", "html"]
"""``--index debian`` (the file list from Release and Packages) and the listing crawl."""


# --- the archive ----------------------------------------------------------------------


def add_package(root: Path, name: str, version: str) -> Path:
    """Put a new ``.deb`` into the archive's pool (the indices are left as they are)."""
    work = root.parent / f"debwork-{name}"
    work.mkdir()
    pool = root / "pool" / "main" / name[0] / name
    pool.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(build_deb(work, name, version), pool))


def regenerate(root: Path, *, by_hash: bool = False, translation: bool = False) -> None:
    """Write the archive's ``Packages`` (of everything in ``pool/``) and ``Release``
    again, as an archive update does; with ``by_hash``, apt-ftparchive's ``by-hash/``
    copies and ``Acquire-By-Hash: yes``. With ``translation``, ``main/i18n/Translation-en``
    for every package, named by ``Release`` uncompressed and served only as ``.bz2``
    (as Debian's archive does). The new files are dated a minute past the old ones, so
    that an ``If-Modified-Since`` within the same second does not hide the update."""
    suite = root / "dists" / "stable"
    old = (suite / "Release").stat().st_mtime
    packages = subprocess.run(
        ["apt-ftparchive", "packages", "pool"], cwd=root, check=True, capture_output=True
    ).stdout
    written = []
    for arch in ("amd64", "arm64"):
        d = suite / "main" / f"binary-{arch}"
        for name, body in (
            ("Packages", packages),
            ("Packages.gz", gzip.compress(packages)),
            ("Packages.xz", lzma.compress(packages)),
        ):
            (d / name).write_bytes(body)
            written.append(d / name)
    i18n = suite / "main" / "i18n"
    if translation:
        i18n.mkdir(exist_ok=True)
        lines = packages.decode().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Package:")]
        # the md5 of build_deb's description, which ties a translation to its package
        md5 = hashlib.md5(b"tiny test package\n").hexdigest()
        text = "".join(
            f"Package: {n}\nDescription-md5: {md5}\nDescription-en: {n}, translated\n\n"
            for n in names
        ).encode()
        (i18n / "Translation-en").write_bytes(text)
        (i18n / "Translation-en.bz2").write_bytes(bz2.compress(text))
        written.append(i18n / "Translation-en.bz2")
    (suite / "Release").unlink()
    release = release_of(root, *(["APT::FTPArchive::DoByHash=true"] if by_hash else []))
    assert (b"Acquire-By-Hash: yes" in release) is by_hash
    (suite / "Release").write_bytes(release)
    written.append(suite / "Release")
    if translation:
        (i18n / "Translation-en").unlink()  # named by Release, not on the server
    written += suite.rglob("by-hash/*/*")
    for p in written:
        os.utime(p, (old + 60, old + 60))


# --- the client -------------------------------------------------------------------------


class Apt:
    """``apt-get`` in a private tree below ``home``, with ``url`` as its only source."""

    def __init__(self, home: Path, url: str, *, languages: str = "none") -> None:
        self.home = home
        for d in (
            "etc/apt/apt.conf.d",
            "etc/apt/preferences.d",
            "etc/apt/sources.list.d",
            "var/lib/apt/lists/partial",
            "var/cache/apt/archives/partial",
            "download",
        ):
            (home / d).mkdir(parents=True, exist_ok=True)
        (home / "status").write_text("")
        (home / "etc/apt/sources.list").write_text(f"deb [trusted=yes] {url} stable main\n")
        # Read first, before any -o: moves Dir::Etc::parts (the system's apt.conf.d, which
        # may turn translations or indices off) and Dir::Etc::main into the private tree.
        (home / "apt.conf").write_text(f'Dir "{home}/";\n')
        self.options = {
            "Dir": f"{home}/",
            "Dir::State::status": f"{home}/status",
            "Debug::NoLocking": "1",
            "APT::Sandbox::User": "root",
            "APT::Architecture": "amd64",
            "APT::Architectures": "amd64",
            "Acquire::Languages": languages,
        }

    def run(self, *args: str, tool: str = "apt-get") -> subprocess.CompletedProcess[str]:
        argv = [tool, *(x for k, v in self.options.items() for x in ("-o", f"{k}={v}"))]
        env = {**os.environ, "APT_CONFIG": str(self.home / "apt.conf"), "LC_ALL": "C"}
        return subprocess.run(
            [*argv, *args],
            cwd=self.home / "download",
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def update(self) -> str:
        r = self.run("update")
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        bad = [line for line in out.splitlines() if line.startswith(("Err:", "W:", "E:"))]
        assert not bad, out
        return out

    def download(self, package: str) -> bytes:
        """``apt-get download package``: the ``.deb`` it wrote (and removes it)."""
        r = self.run("download", package)
        assert r.returncode == 0, r.stdout + r.stderr
        (deb,) = (self.home / "download").glob(f"{package}_*.deb")
        data = deb.read_bytes()
        deb.unlink()
        return data


def pool_deb(root: Path, package: str) -> bytes:
    (deb,) = root.glob(f"pool/main/*/{package}/{package}_*.deb")
    return deb.read_bytes()


def apt_gets(srv: FaultServer) -> dict[str, int | None]:
    """Path → status of what apt asked the mirror for (the last ask of each path)."""
    return {r.path: r.status for r in srv.requests if r.method == "GET"}


def assert_served(gets: dict[str, int | None]) -> None:
    """Every request apt made was answered, but the optional InRelease / Release.gpg of an
    unsigned archive (404 upstream as well)."""
    optional = {"/dists/stable/InRelease", "/dists/stable/Release.gpg"}
    missing = {p: s for p, s in gets.items() if s not in (200, 304) and p not in optional}
    assert not missing, missing


def mirrored(root: Path, dest: Path, mode: str) -> Path:
    """``dest``, a mirror of the archive at ``root`` made by fetch in ``mode``."""
    with FaultServer(root=root) as up:
        s = run_mirror(up.url, dest, mode)
    assert s.exit_code == 0, (s.failed, s.listing_errors)
    return dest


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("by_hash", [False, True], ids=["by-name", "by-hash"])
@pytest.mark.parametrize("mode", MODES)
def test_apt_updates_and_downloads_from_the_mirror(
    tmp_path: Path, mode: str, by_hash: bool
) -> None:
    root = debian_repo(tmp_path)
    if by_hash:
        regenerate(root, by_hash=True)
    dest = mirrored(root, tmp_path / "dest", mode)
    with FaultServer(root=dest) as srv:
        apt = Apt(tmp_path / "apt", srv.url)
        out = apt.update()
        assert "stable/main amd64 Packages" in out
        for package in ("alpha", "beta+plus"):
            assert apt.download(package) == pool_deb(root, package)
        gets = apt_gets(srv)
    assert_served(gets)
    index = [p for p in gets if p.startswith("/dists/stable/main/binary-amd64/")]
    assert index, gets
    if by_hash:
        assert all("/by-hash/SHA512/" in p for p in index), index
    else:
        assert "/dists/stable/main/binary-amd64/Packages.xz" in index


@pytest.mark.parametrize("mode", MODES)
def test_apt_sees_a_package_added_upstream_after_the_next_run(tmp_path: Path, mode: str) -> None:
    root = debian_repo(tmp_path)
    dest = tmp_path / "dest"
    with FaultServer(root=root) as up, FaultServer(root=dest) as srv:
        s = run_mirror(up.url, dest, mode)
        assert s.exit_code == 0, (s.failed, s.listing_errors)
        apt = Apt(tmp_path / "apt", srv.url)
        apt.update()
        r = apt.run("download", "gamma")
        assert r.returncode != 0  # not there yet
        add_package(root, "gamma", "2.0-1")
        regenerate(root)
        s = run_mirror(up.url, dest, mode)
        assert s.exit_code == 0, (s.failed, s.listing_errors)
        assert s.fetched.files >= 3  # the .deb, Packages, Release at least
        srv.reset_stats()
        apt.update()
        assert apt.download("gamma") == pool_deb(root, "gamma")
        assert apt.download("alpha") == pool_deb(root, "alpha")
        gets = apt_gets(srv)
    assert_served(gets)
    assert gets["/dists/stable/Release"] == 200  # not a 304 for the old one


@pytest.mark.parametrize("by_hash", [False, True], ids=["by-name", "by-hash"])
@pytest.mark.parametrize("mode", MODES)
def test_apt_gets_the_translations_from_the_mirror(
    tmp_path: Path, mode: str, by_hash: bool
) -> None:
    root = debian_repo(tmp_path)
    regenerate(root, by_hash=by_hash, translation=True)
    dest = mirrored(root, tmp_path / "dest", mode)
    with FaultServer(root=dest) as srv:
        apt = Apt(tmp_path / "apt", srv.url, languages="en")
        out = apt.update()
        assert "stable/main Translation-en" in out
        gets = apt_gets(srv)
    assert_served(gets)
    asked = [p for p in gets if p.startswith("/dists/stable/main/i18n/")]
    assert len(asked) == 1, gets
    if by_hash:
        assert "/by-hash/SHA512/" in asked[0]
    else:
        assert asked == ["/dists/stable/main/i18n/Translation-en.bz2"]
    # apt read it: the translated description is the one apt-cache shows.
    shown = apt.run("show", "beta+plus", tool="apt-cache")
    assert shown.returncode == 0, shown.stderr
    assert "Description-en: beta+plus, translated" in shown.stdout
