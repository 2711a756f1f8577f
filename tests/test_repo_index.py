"""Repository metadata as the file list (``--index``): yum/dnf repodata and Debian indices.

The end-to-end tests build real repositories: tiny RPMs with ``rpmbuild`` and
``createrepo_c`` (Debian packages ``rpm`` and ``createrepo-c``), tiny ``.deb``
files with ``dpkg-deb`` and indices with ``apt-ftparchive`` (``dpkg-dev``,
``apt-utils``).  They are skipped, with the reason, where those are missing.
The unit tests write repodata by hand (every compression, hostile hrefs) and
use ``httpx.MockTransport``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from fetcher.config import MirrorJob, Transfer
from fetcher.crawl import CrawlOptions
from fetcher.errors import UsageError
from fetcher.models import CrawlProblem, RemoteDir, RemoteFile, Summary
from fetcher.pipeline import mirror
from fetcher.repo_index import index_files
from fetcher.state import State
from fetcher.verify import verify_tree
from tests.faultserver import FaultServer

needs_yum = pytest.mark.skipif(
    not (shutil.which("rpmbuild") and shutil.which("createrepo_c")),
    reason="needs rpmbuild and createrepo_c (Debian packages rpm, createrepo-c)",
)
needs_deb = pytest.mark.skipif(
    not (shutil.which("dpkg-deb") and shutil.which("apt-ftparchive")),
    reason="needs dpkg-deb and apt-ftparchive (Debian packages dpkg-dev, apt-utils)",
)


# --- building repositories ----------------------------------------------------------


def build_rpms(work: Path, names: list[str]) -> list[Path]:
    """One ``rpmbuild`` run: a noarch package per name (subpackages of one spec)."""
    spec = ["Name: tiny", "Version: 1.0", "Release: 1", "Summary: tiny", "License: MIT"]
    spec += ["BuildArch: noarch", "%description", "tiny"]
    for n in names:
        spec += [f"%package {n}", f"Summary: {n}", f"%description {n}", n]
    spec += ["%install", "mkdir -p %{buildroot}/usr/share/tiny"]
    spec += [f"echo {n} > %{{buildroot}}/usr/share/tiny/{n}.txt" for n in names]
    spec += ["%files"]
    for n in names:
        spec += [f"%files {n}", f"/usr/share/tiny/{n}.txt"]
    (work / "tiny.spec").write_text("\n".join(spec) + "\n")
    defines = ["--define", f"_topdir {work}/top", "--define", f"_rpmdir {work}/out"]
    argv = ["rpmbuild", "-bb", "--quiet", *defines, str(work / "tiny.spec")]
    subprocess.run(argv, check=True, capture_output=True)
    return sorted((work / "out" / "noarch").glob("tiny-*.rpm"))


def yum_repo(tmp: Path, layout: dict[str, list[str]]) -> Path:
    """A repository at ``tmp/repo``: ``{"Packages/a": ["p1", ...]}`` → RPMs there."""
    repo = tmp / "repo"
    work = tmp / "rpmwork"
    work.mkdir()
    names = [n for ns in layout.values() for n in ns]
    rpms = {p.name.split("-")[1]: p for p in build_rpms(work, names)}
    for d, ns in layout.items():
        (repo / d).mkdir(parents=True, exist_ok=True)
        for n in ns:
            shutil.copy(rpms[n], repo / d / rpms[n].name)
    subprocess.run(["createrepo_c", "-q", str(repo)], check=True, capture_output=True)
    return repo


def build_deb(work: Path, name: str, version: str) -> Path:
    pkg = work / f"{name}_{version}"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr" / "share" / name).mkdir(parents=True)
    (pkg / "usr" / "share" / name / "hello.txt").write_text(f"{name} {version}\n")
    (pkg / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: Test <test@example.invalid>\nDescription: tiny test package\n"
    )
    out = work / f"{name}_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def debian_repo(tmp: Path) -> Path:
    """An archive at ``tmp/archive``: two packages in ``pool/``, suite ``stable``, amd64 + arm64."""
    root = tmp / "archive"
    work = tmp / "debwork"
    work.mkdir()
    for name, letter in (("alpha", "a"), ("beta+plus", "b")):
        pool = root / "pool" / "main" / letter / name
        pool.mkdir(parents=True)
        shutil.copy(build_deb(work, name, "1.0-1"), pool)
    packages = subprocess.run(
        ["apt-ftparchive", "packages", "pool"], cwd=root, check=True, capture_output=True
    ).stdout
    suite = root / "dists" / "stable"
    for arch in ("amd64", "arm64"):
        d = suite / "main" / f"binary-{arch}"
        d.mkdir(parents=True)
        (d / "Packages").write_bytes(packages)
        (d / "Packages.gz").write_bytes(gzip.compress(packages))
        (d / "Packages.xz").write_bytes(lzma.compress(packages))
        # what else apt (and apt-file, appstream, command-not-found) asks a mirror for
        (suite / "main" / f"Contents-{arch}.gz").write_bytes(gzip.compress(b"usr/bin/a main/a\n"))
        dep11 = suite / "main" / "dep11"
        dep11.mkdir(exist_ok=True)
        (dep11 / f"Components-{arch}.yml.gz").write_bytes(gzip.compress(arch.encode()))
    (suite / "main" / "dep11" / "icons-48x48.tar.gz").write_bytes(gzip.compress(b"icons"))
    (suite / "main" / "i18n").mkdir()
    (suite / "main" / "i18n" / "Translation-en.bz2").write_bytes(bz2.compress(b"Package: a\n"))
    (suite / "Release").write_bytes(release_of(root))
    return root


def release_of(root: Path, *more: str) -> bytes:
    """``dists/stable/Release`` of the archive at ``root``, as apt-ftparchive writes it
    (suite ``stable``, component ``main``, amd64 + arm64; ``more``: other ``-o`` options)."""
    opts = [
        f"APT::FTPArchive::Release::{k}={v}"
        for k, v in [
            ("Suite", "stable"),
            ("Codename", "stable"),
            ("Components", "main"),
            ("Architectures", "amd64 arm64"),
        ]
    ]
    opts += more
    argv = ["apt-ftparchive", *(x for o in opts for x in ("-o", o)), "release", "dists/stable"]
    return subprocess.run(argv, cwd=root, check=True, capture_output=True).stdout


def run_mirror(url: str, dest: Path, index: str, **kw: object) -> Summary:
    job = MirrorJob(url=url, dest=dest, index=index, procs=1, threads=4, **kw)  # type: ignore[arg-type]
    return mirror(job)


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".fetcher" not in p.relative_to(root).parts
    }


def state_sha256(dest: Path) -> dict[str, str | None]:
    st = State.open(dest, readonly=True)
    try:
        return {r.path: r.sha256 for r in st.rows()}
    finally:
        st.close()


def assert_metadata_last(srv: FaultServer, is_meta: Callable[[str], bool]) -> None:
    """Every metadata file's last GET (the download) starts after every package GET ended."""
    reqs = [r for r in srv.requests if r.method == "GET" and r.status == 200 and r.path[-1] != "/"]
    packages = [r for r in reqs if not is_meta(r.path)]
    assert packages
    last_package = max(r.finished or r.started for r in packages)
    last_meta: dict[str, float] = {}
    for r in reqs:
        if is_meta(r.path):
            last_meta[r.path] = max(last_meta.get(r.path, 0.0), r.started)
    assert last_meta
    early = {p: t for p, t in last_meta.items() if t < last_package}
    assert not early, f"metadata fetched before all packages were in: {early}"


# --- yum / dnf ------------------------------------------------------------------------


@needs_yum
@pytest.mark.parametrize("kind", ["repodata", "auto"])
def test_yum_repository_mirrored_from_metadata(tmp_path: Path, kind: str) -> None:
    repo = yum_repo(tmp_path, {"Packages": ["p1", "p2"], "Packages/sub dir": ["p3"]})
    dest = tmp_path / "dest"
    with FaultServer(root=repo) as srv:
        s = run_mirror(srv.url, dest, kind)
        assert s.exit_code == 0, (s.failed, s.listing_errors)
        assert tree(dest) == tree(repo)
        shas = state_sha256(dest)
        rpms = [p for p in tree(repo) if p.endswith(".rpm")]
        assert len(rpms) == 3
        for p in rpms:
            assert shas[p] == hashlib.sha256((repo / p).read_bytes()).hexdigest()
        for p in tree(repo):
            assert shas[p], f"no sha256 recorded for {p}"
        # No directory listing at all: the file list came from repodata.
        listings = [r.path for r in srv.requests if r.path.endswith("/")]
        assert listings == []
        assert_metadata_last(srv, lambda p: p.startswith("/repodata/"))
        # A re-run of the unchanged mirror reads the index and downloads no package.
        srv.reset_stats()
        s2 = run_mirror(srv.url, dest, kind)
        assert s2.exit_code == 0 and s2.fetched.files == 0
        assert not [r for r in srv.requests if r.path.endswith(".rpm")]


@needs_yum
def test_yum_corrupted_package_is_detected_and_never_lands(tmp_path: Path) -> None:
    repo = yum_repo(tmp_path, {"Packages": ["p1", "p2"]})
    bad = sorted((repo / "Packages").glob("*.rpm"))[0]
    data = bytearray(bad.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes
    bad.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    with FaultServer(root=repo) as srv:
        s = run_mirror(srv.url, dest, "repodata", retries=2)
    rel = f"Packages/{bad.name}"
    assert s.exit_code == 1
    reasons = dict(s.failed)
    assert "mismatch" in reasons[rel]
    assert not (dest / rel).exists()
    assert not (dest / "repodata" / "repomd.xml").exists()  # metadata held back
    assert (dest / "Packages").is_dir()


@needs_yum
def test_a_trickled_index_is_a_listing_error_under_min_rate(tmp_path: Path) -> None:
    """``--min-rate`` holds for the repository's indexes as for listings and files."""
    from tests.faultserver import Fault

    repo = yum_repo(tmp_path, {"Packages": ["p1"]})
    primary = next((repo / "repodata").glob("*-primary.xml.gz"))
    assert primary.stat().st_size > 400  # over 1.5 s at the trickle's rate
    with FaultServer(root=repo) as srv:
        srv.persist(f"/repodata/{primary.name}", Fault.trickle(256))
        s = run_mirror(
            srv.url, tmp_path / "dest", "repodata", retries=1, min_rate=8192.0, min_rate_time=1.0
        )
        asked = srv.count("GET", f"/repodata/{primary.name}")
    assert s.exit_code == 1
    assert s.listing_errors and "under --min-rate 8.0 KiB/s" in s.listing_errors[0][1], s
    assert asked == 1
    assert not list((tmp_path / "dest").rglob("*.rpm"))


@needs_yum
def test_yum_primary_not_matching_repomd_is_a_listing_error(tmp_path: Path) -> None:
    repo = yum_repo(tmp_path, {"Packages": ["p1"]})
    primary = next((repo / "repodata").glob("*-primary.xml.gz"))
    primary.write_bytes(gzip.compress(gzip.decompress(primary.read_bytes()) + b" "))
    with FaultServer(root=repo) as srv:
        s = run_mirror(srv.url, tmp_path / "dest", "repodata", delete=True)
    assert s.exit_code == 1
    assert s.listing_errors and "primary" in s.listing_errors[0][1]
    assert not list((tmp_path / "dest").rglob("*.rpm"))


@needs_yum
def test_verify_tree_finds_modified_and_missing_files(tmp_path: Path) -> None:
    repo = yum_repo(tmp_path, {"Packages": ["p1", "p2", "p3"]})
    dest = tmp_path / "dest"
    with FaultServer(root=repo) as srv:
        assert run_mirror(srv.url, dest, "auto").exit_code == 0
    assert verify_tree(dest) == []
    a, b, _ = sorted((dest / "Packages").glob("*.rpm"))
    data = bytearray(a.read_bytes())
    data[-1] ^= 1
    a.write_bytes(bytes(data))
    b.unlink()
    found = dict(verify_tree(dest))
    assert set(found) == {f"Packages/{a.name}", f"Packages/{b.name}"}
    assert "mismatch" in found[f"Packages/{a.name}"]
    assert found[f"Packages/{b.name}"] == "missing"
    with pytest.raises(UsageError):
        verify_tree(tmp_path / "repo")


def test_auto_falls_back_to_html_crawl(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "d").mkdir(parents=True)
    (site / "d" / "f.txt").write_text("plain\n")
    dest = tmp_path / "dest"
    with FaultServer(root=site) as srv:
        s = run_mirror(srv.url, dest, "auto")
    assert s.exit_code == 0
    assert tree(dest) == {"d/f.txt": b"plain\n"}


# --- Debian -----------------------------------------------------------------------------


def _debian_meta(path: str) -> bool:
    return path.startswith("/dists/")


@needs_deb
def test_debian_archive_mirrored_from_release_and_packages(tmp_path: Path) -> None:
    root = debian_repo(tmp_path)
    dest = tmp_path / "dest"
    with FaultServer(root=root) as srv:
        s = run_mirror(srv.url, dest, "debian")
        assert s.exit_code == 0, (s.failed, s.listing_errors)
        assert tree(dest) == tree(root)
        shas = state_sha256(dest)
        for p, data in tree(root).items():
            assert shas[p] == hashlib.sha256(data).hexdigest(), p
        # Only the dists/ listing (to find suites); never a listing below pool/.
        listings = sorted(r.path for r in srv.requests if r.path.endswith("/"))
        assert listings == ["/dists/"]
        assert_metadata_last(srv, _debian_meta)
        # "auto" finds the same archive.
        srv.reset_stats()
        s2 = run_mirror(srv.url, dest, "auto")
        assert s2.exit_code == 0 and s2.fetched.files == 0


@needs_deb
def test_debian_suites_components_architectures_select(tmp_path: Path) -> None:
    root = debian_repo(tmp_path)
    with FaultServer(root=root) as srv:
        s = run_mirror(srv.url, tmp_path / "a", "debian", architectures=("arm64",))
        assert s.exit_code == 0, (s.failed, s.listing_errors)
        got = tree(tmp_path / "a")
        assert any(p.startswith("dists/stable/main/binary-arm64/") for p in got)
        assert not any("binary-amd64" in p for p in got)
        assert not any("binary-amd64" in r.path for r in srv.requests)
        # the other indices of arm64 and of no architecture; none of amd64's
        for p in ("main/Contents-arm64.gz", "main/dep11/Components-arm64.yml.gz",
                  "main/dep11/icons-48x48.tar.gz", "main/i18n/Translation-en.bz2"):  # fmt: skip
            assert f"dists/stable/{p}" in got, p
        assert not any("amd64" in p for p in got), sorted(got)
        assert any(p.startswith("pool/main/a/alpha/") for p in got)
        srv.reset_stats()
        s = run_mirror(srv.url, tmp_path / "b", "debian", suites=("oldstable",))
        assert s.exit_code == 1 and s.fetched.files == 0 and s.listing_errors  # no such suite
        assert not any(r.path.startswith("/dists/stable/") for r in srv.requests)
        s = run_mirror(srv.url, tmp_path / "c", "debian", components=("contrib",))
        assert s.exit_code == 0 and not any(p.startswith("pool/") for p in tree(tmp_path / "c"))


@needs_deb
def test_debian_corrupted_package_is_detected(tmp_path: Path) -> None:
    root = debian_repo(tmp_path)
    deb = next(root.glob("pool/main/a/alpha/*.deb"))
    data = bytearray(deb.read_bytes())
    data[-10] ^= 0xFF
    deb.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    with FaultServer(root=root) as srv:
        s = run_mirror(srv.url, dest, "debian", retries=2)
    rel = deb.relative_to(root).as_posix()
    assert s.exit_code == 1
    assert "mismatch" in dict(s.failed)[rel]
    assert not (dest / rel).exists()
    assert not (dest / "dists" / "stable" / "Release").exists()


@needs_deb
def test_debian_packages_index_not_matching_release(tmp_path: Path) -> None:
    root = debian_repo(tmp_path)
    for arch in ("amd64", "arm64"):
        (root / f"dists/stable/main/binary-{arch}/Packages.xz").write_bytes(lzma.compress(b"\n"))
    with FaultServer(root=root) as srv:
        s = run_mirror(srv.url, tmp_path / "dest", "debian")
    assert s.exit_code == 1
    assert s.listing_errors and "mismatch" in s.listing_errors[0][1]


# --- unit: hand-written repodata over MockTransport ------------------------------------

_COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "gz": gzip.compress,
    "xz": lzma.compress,
    "bz2": bz2.compress,
}
try:
    import zstandard

    _COMPRESS["zst"] = lambda b: zstandard.ZstdCompressor().compress(b)
except ImportError:  # pragma: no cover
    pass


def hand_repodata(pkgs: dict[str, bytes], ext: str) -> dict[str, bytes]:
    """``{url path: body}`` of a repository: the packages, primary.xml.EXT, repomd.xml."""
    entries = []
    for href, body in pkgs.items():
        href_xml = href.replace("&", "&amp;").replace('"', "&quot;")
        entries.append(
            '<package type="rpm"><name>x</name>'
            f'<checksum type="sha256" pkgid="YES">{hashlib.sha256(body).hexdigest()}</checksum>'
            f'<time file="1700000000" build="1700000000"/><size package="{len(body)}"/>'
            f'<location href="{href_xml}"/></package>'
        )
    primary_xml = (
        '<?xml version="1.0"?><metadata xmlns="http://linux.duke.edu/metadata/common" '
        f'packages="{len(pkgs)}">{"".join(entries)}</metadata>'
    ).encode()
    primary = _COMPRESS[ext](primary_xml)
    digest = hashlib.sha256(primary).hexdigest()
    href = f"repodata/{digest}-primary.xml.{ext}"
    repomd = (
        '<?xml version="1.0"?><repomd xmlns="http://linux.duke.edu/metadata/repo">'
        f'<data type="primary"><checksum type="sha256">{digest}</checksum>'
        f'<location href="{href}"/><timestamp>1700000000</timestamp>'
        f"<size>{len(primary)}</size></data></repomd>"
    ).encode()
    return {**pkgs, href: primary, "repodata/repomd.xml": repomd}


def mock_index(files: dict[str, bytes], kind: str = "repodata") -> list[object]:
    prefix = "/repo/7/os/"
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.raw_path.decode()
        seen.append(path)
        from urllib.parse import unquote

        key = unquote(path.removeprefix(prefix))
        if key in files:
            return httpx.Response(200, stream=httpx.ByteStream(files[key]))
        return httpx.Response(404)

    t = Transfer(dest="/nonexistent", root=f"http://mirror.test{prefix}", retries=1)
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        return list(index_files(client, t, CrawlOptions(), kind))


@pytest.mark.parametrize("ext", sorted(_COMPRESS))
def test_primary_in_every_compression(ext: str) -> None:
    files = hand_repodata({"Packages/a.rpm": b"aaa", "Packages/b c+d.rpm": b"bb"}, ext)
    items = mock_index(files)
    got = {i.path: i for i in items if isinstance(i, RemoteFile)}
    assert set(got) == set(files)
    b = got["Packages/b c+d.rpm"]  # type: ignore[index]
    assert b.url == "http://mirror.test/repo/7/os/Packages/b%20c%2Bd.rpm"
    assert b.size == 2 and b.size_exact and b.mtime == 1700000000
    assert b.checksum == ("sha256", hashlib.sha256(b"bb").hexdigest())
    assert [i.path for i in items if isinstance(i, RemoteDir)] == ["Packages", "repodata"]
    # metadata comes after the packages, repomd.xml last
    paths = [i.path for i in items if isinstance(i, RemoteFile)]
    assert paths[-1] == "repodata/repomd.xml"


@pytest.mark.parametrize(
    "href", ["../evil.rpm", "/etc/passwd", "Packages/../../x.rpm", "http://evil.test/x.rpm"]
)
def test_unsafe_location_is_refused(href: str) -> None:
    files = hand_repodata({"Packages/ok.rpm": b"ok", href: b"evil"}, "gz")
    files.pop(href)
    items = mock_index(files)
    unsafe = [i for i in items if isinstance(i, CrawlProblem)]
    assert len(unsafe) == 1 and unsafe[0].kind == "unsafe"
    assert {i.path for i in items if isinstance(i, RemoteFile)} >= {"Packages/ok.rpm"}
    assert all(".." not in i.path for i in items if isinstance(i, RemoteFile | RemoteDir))


def test_repodata_missing_is_a_listing_problem() -> None:
    items = mock_index({}, "repodata")
    assert len(items) == 1 and isinstance(items[0], CrawlProblem)
    assert items[0].kind == "listing"


def test_primary_checksum_mismatch_blocks_the_list() -> None:
    files = hand_repodata({"Packages/a.rpm": b"aaa"}, "gz")
    href = next(k for k in files if "primary" in k)
    files[href] = gzip.compress(b"<metadata/>")
    items = mock_index(files)
    assert [type(i) for i in items] == [CrawlProblem]
    assert "mismatch" in items[0].message  # type: ignore[attr-defined]


def test_inrelease_clear_signed_is_parsed() -> None:
    from fetcher.repo_debian import parse_release

    text = (
        b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n"
        b"Suite: stable\nComponents: main contrib\nArchitectures: amd64\nSHA256:\n"
        b" aa11 120 main/binary-amd64/Packages\n bb22 60 main/binary-amd64/Packages.xz\n"
        b"- -dashed: escaped\n"
        b"-----BEGIN PGP SIGNATURE-----\n\nxyz\n-----END PGP SIGNATURE-----\n"
    )
    rel = parse_release(text)
    assert rel.fields["Components"] == "main contrib"
    assert rel.sha256 == {
        "main/binary-amd64/Packages": ("aa11", 120),
        "main/binary-amd64/Packages.xz": ("bb22", 60),
    }


def test_debian_by_hash_copies_of_the_indices_are_mirrored() -> None:
    """A ``Release`` with ``Acquire-By-Hash: yes`` sends apt to ``DIR/by-hash/SHA256/DIGEST``
    for each index, not to its name. They were left out, and the mirror published that
    ``Release`` without them: every client met a 404 on ``apt update``. The copies the
    server has come with the index files, with their size and digest."""
    deb = b"a package"
    packages = (
        f"Package: a\nFilename: pool/main/a/a_1_all.deb\nSize: {len(deb)}\n"
        f"SHA256: {hashlib.sha256(deb).hexdigest()}\n\n"
    ).encode()
    xz, gz = lzma.compress(packages), gzip.compress(packages)
    sums = "".join(
        f" {hashlib.sha256(b).hexdigest()} {len(b)} main/binary-amd64/{n}\n"
        for n, b in (("Packages", packages), ("Packages.gz", gz), ("Packages.xz", xz))
    )
    release = (
        "Suite: stable\nComponents: main\nArchitectures: amd64\nAcquire-By-Hash: yes\n"
        f"SHA256:\n{sums}"
    ).encode()
    d = "dists/stable/main/binary-amd64/"
    files = {
        "dists/": b'<html><body><a href="stable/">stable/</a></body></html>',
        "dists/stable/Release": release,
        d + "Packages.xz": xz,
        d + "Packages.gz": gz,
        d + f"by-hash/SHA256/{hashlib.sha256(xz).hexdigest()}": xz,
        d + f"by-hash/SHA256/{hashlib.sha256(gz).hexdigest()}": gz,
        "pool/main/a/a_1_all.deb": deb,
    }
    got = {i.path: i for i in mock_index(files, "debian") if isinstance(i, RemoteFile)}
    assert set(got) == set(files) - {"dists/"}
    for path, body in files.items():
        if "/by-hash/" in path:
            f = got[path]  # type: ignore[index]
            assert f.size == len(body)
            assert f.checksum == ("sha256", hashlib.sha256(body).hexdigest())


def test_debian_by_hash_copies_by_the_strongest_hash_release_gives() -> None:
    """apt asks for ``by-hash/SHA512/`` where ``Release`` has a SHA512 section (as
    apt-ftparchive writes it): only ``by-hash/SHA256/`` copies were mirrored, and apt met a
    404 on the index's by-hash path, then fell back to its name (tests/test_apt_client.py)."""
    packages = b"Package: a\n\n"
    release = (
        "Suite: stable\nComponents: main\nArchitectures: amd64\nAcquire-By-Hash: yes\n"
        f"SHA256:\n {hashlib.sha256(packages).hexdigest()} {len(packages)} main/binary-amd64/Packages\n"
        f"SHA512:\n {hashlib.sha512(packages).hexdigest()} {len(packages)} main/binary-amd64/Packages\n"
    ).encode()
    d = "dists/stable/main/binary-amd64/"
    files = {
        "dists/": b'<html><body><a href="stable/">stable/</a></body></html>',
        "dists/stable/Release": release,
        d + "Packages": packages,
        d + f"by-hash/SHA256/{hashlib.sha256(packages).hexdigest()}": packages,
        d + f"by-hash/SHA512/{hashlib.sha512(packages).hexdigest()}": packages,
    }
    got = {i.path: i for i in mock_index(files, "debian") if isinstance(i, RemoteFile)}
    sha512_copy = d + f"by-hash/SHA512/{hashlib.sha512(packages).hexdigest()}"
    assert set(got) == {"dists/stable/Release", d + "Packages", sha512_copy}
    assert got[sha512_copy].checksum == ("sha256", hashlib.sha256(packages).hexdigest())  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "wanted"),
    [
        ("main/binary-arm64/Packages.xz", True),
        ("main/binary-amd64/Packages.xz", False),
        ("main/i18n/Translation-de.bz2", True),
        ("main/dep11/Components-arm64.yml.gz", True),
        ("main/dep11/Components-amd64.yml.gz", False),
        ("main/dep11/icons-64x64@2.tar.gz", True),
        ("main/cnf/Commands-arm64.xz", True),
        ("main/Contents-arm64.gz", True),
        ("Contents-arm64.gz", True),
        ("Contents-amd64.gz", False),
        ("main/Contents-udeb-arm64.gz", False),
        ("main/Contents-source.gz", False),
        ("main/source/Sources.xz", False),
        ("main/debian-installer/binary-arm64/Packages.xz", False),
        ("main/binary-arm64/by-hash/SHA256/00ff", False),
        ("contrib/i18n/Translation-en.bz2", False),
        ("updates/main/i18n/Translation-en.bz2", True),
        ("main/binary-all/Packages.xz", True),
    ],
)
def test_debian_indices_a_client_of_the_selection_asks_for(name: str, wanted: bool) -> None:
    """Which indices a ``Release`` names are mirrored, for components ``main`` (and
    security's ``updates/main``) and architecture arm64 of amd64 and arm64. Only the
    binary ``Packages`` were: a client asking the mirror for translations, AppStream
    data (``dep11``) or apt-file's ``Contents`` met a 404."""
    from fetcher.repo_debian import _client_index

    left_out = {"amd64", "source", "udeb"}
    assert _client_index(name, ["main", "updates/main"], left_out) is wanted


def test_auto_takes_a_refused_or_soft_404_probe_for_no_repository() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/pub/repodata/repomd.xml":
            return httpx.Response(403)
        if path == "/pub/dists/":
            return httpx.Response(200, stream=httpx.ByteStream(b"<html>not found</html>"))
        if path == "/pub/":
            page = b'<html><body><a href="f.txt">f.txt</a></body></html>'
            return httpx.Response(200, headers={"content-type": "text/html"}, content=page)
        return httpx.Response(404)

    t = Transfer(dest="/nonexistent", root="http://mirror.test/pub/", retries=1)
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        items = list(index_files(client, t, CrawlOptions(), "auto"))
    assert [i.path for i in items if isinstance(i, RemoteFile)] == ["f.txt"]
    assert not [i for i in items if isinstance(i, CrawlProblem)]


def _cli_has(flag: str) -> bool:
    from fetcher.cli import build_parser

    return any(flag in a.option_strings for a in build_parser()._actions)


@needs_yum
def test_cli_index_auto_and_verify_only(tmp_path: Path, run_fetch: Callable[..., Any]) -> None:
    repo = yum_repo(tmp_path, {"Packages": ["p1", "p2"]})
    dest = tmp_path / "d"
    with FaultServer(root=repo) as srv:
        r = run_fetch("--mirror", srv.url, "--dest", dest, "--index", "auto")
        assert r.code == 0, r
        assert not [q for q in srv.requests if q.path.endswith("/")]
    r = run_fetch("--verify-only", dest)
    assert r.code == 0 and "every recorded digest matches" in r.output, r
    next((dest / "Packages").glob("*.rpm")).write_bytes(b"x")
    r = run_fetch("--verify-only", dest)
    assert r.code == 1 and "mismatch" in r.output, r
    assert run_fetch("--verify-only", tmp_path).code == 2


def test_a_repomd_xml_outside_its_namespace_is_named_as_such(
    tmp_path: Path, run_fetch: Callable[..., Any]
) -> None:
    """A bare ``<repomd>`` (the demo's sample has one) was refused as "not a repomd.xml
    (root element 'repomd')": the element it asked for, as far as a reader could see."""
    with FaultServer() as srv:
        srv.add_file("/r/repodata/repomd.xml", b"<repomd><!-- sample --></repomd>\n")
        r = run_fetch("--mirror", srv.url + "r/", "--dest", tmp_path / "d", "--index", "auto")
    assert r.code == 1, r
    assert (
        "not a repomd.xml: its root element is 'repomd', not 'repomd' in the namespace"
        " http://linux.duke.edu/metadata/repo" in r.output
    ), r


_IN_A_FRESH_PROCESS = (
    "import re, sys\n"
    "from pathlib import Path\n"
    "from fetcher.config import MirrorJob\n"
    "from fetcher.pipeline import mirror\n"
    "job = MirrorJob(url=sys.argv[1], dest=Path(sys.argv[2]), index=sys.argv[3], procs=1)\n"
    "s = mirror(job)\n"
    "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
    "print(repr([why for _, why in s.listing_errors]), hwm)\n"
)


def _gzip_of(head: bytes, body: bytes, times: int, tail: bytes = b"") -> bytes:
    """gzip of ``head``, ``body`` ``times`` over and ``tail``, made a piece at a time."""
    import zlib

    z = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [z.compress(head), *(z.compress(body) for _ in range(times)), z.compress(tail)]
    return b"".join(parts) + z.flush()


@pytest.mark.parametrize(
    "shape", ["debian-long-line", "debian-long-paragraph", "yum-long-text", "yum-wide-package"]
)
def test_a_hostile_index_is_refused_not_held(tmp_path: Path, shape: str) -> None:
    """An index of ~1 MiB, compressed, that holds one huge entry. A Packages.gz with a line
    of 1 GiB was read into memory whole (as a file's lines are); one with a paragraph of 9
    million continuation lines was added to one string line by line, copying it each
    time (still going after two minutes). A primary.xml.gz with a text of 1 GiB, or a
    package of 9 million elements, was built up whole by the XML parser. Each is now a
    listing error naming the bound, in a fresh process that stays small."""
    from tests.test_churn import _debian, _yum

    www = tmp_path / "www"
    if shape.startswith("debian"):
        (www / "dists" / "stable" / "main" / "binary-amd64").mkdir(parents=True)
        if shape == "debian-long-line":
            index = _gzip_of(b"Package: a\nDescription: ", b"x" * (64 << 20), 16)
        else:
            index = _gzip_of(b"Package: a\nDescription: x\n", b" y\n" * (1 << 20), 9)
        _debian(www, index)
    else:
        (www / "repodata").mkdir(parents=True)
        head = (
            b'<?xml version="1.0"?><metadata xmlns="http://linux.duke.edu/metadata/common"'
            b' xmlns:rpm="http://linux.duke.edu/metadata/rpm"><package><name>'
        )
        if shape == "yum-long-text":
            index = _gzip_of(head, b"x" * (64 << 20), 16, b"</name></package></metadata>")
        else:
            index = _gzip_of(head + b"a</name><format>", b"<rpm:entry/>" * (1 << 20), 9,
                             b"</format></package></metadata>")  # fmt: skip
        _yum(www, index)
    with FaultServer(root=www) as srv:
        out = subprocess.run(
            [sys.executable, "-c", _IN_A_FRESH_PROCESS, srv.url, str(tmp_path / "d"),
             shape.split("-")[0].replace("yum", "repodata")],
            cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    errors, hwm_kib = out.stdout.rsplit(" ", 1)
    bound = {
        "debian-long-line": "a line of over 1048576",
        "debian-long-paragraph": "a paragraph of over 16777216",
    }.get(shape, "an entry of over 16777216 bytes")
    assert bound in errors, errors
    assert int(hwm_kib) < 300 * 1024, f"the index grew fetch to {int(hwm_kib) >> 10} MiB"
