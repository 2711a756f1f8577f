"""A Debian-style archive's file list from ``dists/SUITE/Release`` and ``Packages``.

The start URL is the archive root (the directory holding ``dists/`` and
``pool/``).  Suites are the directories of the ``dists/`` listing that have a
``Release`` (or ``InRelease``).  For every component and architecture the
``Release`` names, one ``Packages`` index (``.xz``, ``.gz``, ``.bz2``, plain:
the first the server has) is fetched, checked against ``Release``'s SHA256
section, and read: every ``Filename`` is yielded with its ``Size`` and
``SHA256``.  Then the index files a client of those components and architectures
may ask for that the server has (the ``Packages``, translations, AppStream data,
``Contents``; not source or installer indices), their ``by-hash/`` copies (by the
strongest hash ``Release`` gives, as apt asks) when ``Release`` says
``Acquire-By-Hash: yes``, and
``Release`` / ``InRelease`` / ``Release.gpg`` themselves, which the pipeline
publishes last.  GPG signatures are mirrored, not checked.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO

import msgspec

from fetcher.crawl import CrawlItem
from fetcher.errors import HTTPStatusError, ListingError
from fetcher.listing import parse_listing
from fetcher.repo_index import IndexSource, check_digest, decompressed

__all__ = [
    "Release",
    "Suite",
    "find_suites",
    "index_paragraphs",
    "parse_paragraphs",
    "parse_release",
    "walk",
]

_PREFERRED = (".xz", ".gz", ".bz2", ".zst", "")
_RELEASE_FILES = ("Release", "InRelease", "Release.gpg")


class Release(msgspec.Struct, frozen=True):
    """What a ``Release`` file says: its fields and the SHA256 section."""

    fields: dict[str, str]
    sha256: dict[str, tuple[str, int]]
    """Path below ``dists/SUITE/`` → (hex digest, size)."""
    sha512: dict[str, tuple[str, int]] = {}
    """The same from the SHA512 section, if any (apt asks by-hash by the strongest)."""


class Suite(msgspec.Struct, frozen=True):
    name: str
    release: Release
    copies: dict[str, bytes]
    """``Release`` / ``InRelease`` / ``Release.gpg`` as read, by name (those the server has)."""


def _strip_signature(text: str) -> str:
    # InRelease is a clear-signed message: the fields are between the armour header
    # (and its "Hash:" lines) and the signature block.
    if not text.startswith("-----BEGIN PGP SIGNED MESSAGE-----"):
        return text
    body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
    body = body.split("\n-----BEGIN PGP SIGNATURE-----", 1)[0]
    return "\n".join(line[2:] if line.startswith("- ") else line for line in body.split("\n"))


MAX_LINE = 1 << 20
"""Characters in one line of a deb822 file, at most (a Packages line is a few KiB)."""
MAX_PARAGRAPH = 16 << 20
"""Characters in one paragraph, at most (a package's is a few KiB; Release's, its sums)."""


def index_paragraphs(stream: IO[bytes]) -> Iterator[dict[str, str]]:
    """The paragraphs of a decompressed ``Packages`` index, as :func:`parse_paragraphs`
    gives them, each line read no further than :data:`MAX_LINE`: a line longer is a
    :class:`ListingError`. (Iterating the file read a line whole, however long: a
    Packages.xz of a few KiB can hold a line of gigabytes.)"""
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
    return parse_paragraphs(_bounded_lines(text))


def _bounded_lines(text: IO[str]) -> Iterator[str]:
    while line := text.readline(MAX_LINE + 1):
        if len(line) > MAX_LINE:
            raise ListingError(f"a line of over {MAX_LINE} characters: not a deb822 file")
        yield line


def parse_paragraphs(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """deb822 paragraphs as dicts; continuation lines are joined with newlines (pure).

    A paragraph over :data:`MAX_PARAGRAPH` characters is a :class:`ListingError`; the
    lines of a field are gathered in a list and joined once (adding each to the field's
    string copied it whole each time: a million continuation lines took hours)."""
    para: dict[str, list[str]] = {}
    key = None
    size = 0
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line.strip():
            if para:
                yield {k: "\n".join(v) for k, v in para.items()}
            para, key, size = {}, None, 0
            continue
        size += len(line)
        if size > MAX_PARAGRAPH:
            raise ListingError(f"a paragraph of over {MAX_PARAGRAPH} characters: not a deb822 file")
        if line[0] in " \t":
            if key is not None:
                para[key].append(line.strip())
        elif ":" in line:
            key, _, value = line.partition(":")
            para[key] = [value.strip()]
    if para:
        yield {k: "\n".join(v) for k, v in para.items()}


def parse_release(data: bytes) -> Release:
    """``Release`` or ``InRelease`` → :class:`Release` (pure)."""
    text = _strip_signature(data.decode("utf-8", "replace"))
    paras = list(parse_paragraphs(iter(text.split("\n"))))
    if not paras:
        raise ListingError("empty Release file")
    fields = paras[0]
    return Release(fields, _sums(fields, "SHA256"), _sums(fields, "SHA512"))


def _sums(fields: dict[str, str], section: str) -> dict[str, tuple[str, int]]:
    sums: dict[str, tuple[str, int]] = {}
    for line in fields.get(section, "").split("\n"):
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit():
            sums[parts[2]] = (parts[0].lower(), int(parts[1]))
    return sums


def find_suites(src: IndexSource, *, probe: bool = False) -> list[Suite]:
    """The suites below ``dists/`` that have a Release file (none: not a Debian archive)."""
    listing = src.get("dists/", probe=probe)
    if listing is None:
        return []
    names = sorted(
        {
            e.url.rstrip("/").rsplit("/", 1)[-1]
            for e in parse_listing(listing, src.url("dists/"))
            if e.is_dir and src.scope.contains(e.url)
        }
    )
    if src.opts.suites:
        names = [n for n in names if n in src.opts.suites]
    suites = []
    for name in names:
        copies: dict[str, bytes] = {}
        for f in _RELEASE_FILES:
            body = src.get_url(src.url("dists/") + name + "/" + f)
            if body is not None:
                copies[f] = body
        text = copies.get("Release") or copies.get("InRelease")
        if text is not None:
            suites.append(Suite(name, parse_release(text), copies))
    return suites


def walk(src: IndexSource, suites: list[Suite]) -> Iterator[CrawlItem]:
    """Every package file of every suite, then the index and Release files."""
    seen: set[str] = set()  # arch "all" packages appear in every architecture's index
    for suite in suites:
        yield from _suite(src, suite, seen)


def _suite(src: IndexSource, suite: Suite, seen: set[str]) -> Iterator[CrawlItem]:
    base = src.url("dists/") + suite.name + "/"
    rel = suite.release
    comps = rel.fields.get("Components", "").split()
    archs = archs_named(rel)
    if src.opts.components:
        comps = [c for c in comps if c in src.opts.components]
    if src.opts.architectures:
        archs = [a for a in archs if a in src.opts.architectures]
    index_dirs = [f"{c}/binary-{a}/" for c in comps for a in archs]
    for d in index_dirs:
        stem = d + "Packages"
        if not src.scope.contains(base + stem):
            continue  # (a component "../x": never asked for; the loop below says why)
        listed = [stem + ext for ext in _PREFERRED if stem + ext in rel.sha256]
        for name in listed:
            data = src.get_url(base + name)
            if data is None:
                continue
            digest, size = rel.sha256[name]
            check_digest(data, "sha256", digest, size, base + name)
            yield from _packages(src, decompressed(data, name), seen)
            break
        else:
            if listed:
                raise ListingError(f"none of {', '.join(listed)} found below {base}")
    # The index files themselves, those the server has: the Packages read, and what else
    # a client of the selection asks for (_client_index). With "Acquire-By-Hash: yes" apt
    # asks for each by its digest instead (DIR/by-hash/TYPE/DIGEST), not by its name:
    # those copies too, or every client meets a 404. TYPE is the strongest hash Release
    # gives for the file (apt's HashStringList::find): SHA512 where it has that section
    # (apt-ftparchive, aptly), else SHA256 (Debian, Ubuntu).
    by_hash = rel.fields.get("Acquire-By-Hash", "").strip().lower() == "yes"
    left_out = {*archs_named(rel), "source", "udeb"} - {*archs, "all"}
    wanted: dict[str, tuple[str, int]] = {}  # path below the suite -> (digest, size)
    for name, (digest, size) in sorted(rel.sha256.items()):
        if _client_index(name, comps, left_out):
            wanted[name] = (digest, size)
            if by_hash:
                kind, hexdigest = (
                    ("SHA512", rel.sha512[name][0]) if name in rel.sha512 else ("SHA256", digest)
                )
                wanted.setdefault(
                    f"{name.rpartition('/')[0]}/by-hash/{kind}/{hexdigest}", (digest, size)
                )
    # One outside the start URL is not asked for: src.file() says why it is not mirrored.
    inside = [name for name in wanted if src.scope.contains(base + name)]
    there = dict(zip(inside, _all_exist(src, [base + name for name in inside]), strict=True))
    for name, (digest, size) in wanted.items():
        if there.get(name, True):
            yield from src.file(base + name, size, ("sha256", digest))
    for f in _RELEASE_FILES:
        if f in suite.copies:
            body = suite.copies[f]
            yield from src.file(base + f, len(body), ("sha256", hashlib.sha256(body).hexdigest()))


def archs_named(rel: Release) -> list[str]:
    """The architectures a ``Release`` names."""
    return rel.fields.get("Architectures", "").split()


def _client_index(name: str, comps: list[str], left_out: set[str]) -> bool:
    """Whether apt, or a tool beside it, may ask a mirror of the chosen components and
    architectures for the index ``name`` (below ``dists/SUITE/``) that ``Release`` names:
    the ``Packages`` of each, and the translations (``i18n/``), AppStream data
    (``dep11/``), command-not-found data (``cnf/``) and ``Contents`` files; not those of
    an architecture ``left_out``, nor the indices of what fetch does not mirror (source
    and installer packages: ``source/``, ``debian-installer/``, ``Contents-udeb-*``),
    which would name files the mirror lacks. ``by-hash/`` copies come with their file."""
    if "/by-hash/" in name:
        return False
    comp = next((c for c in comps if name.startswith(c + "/")), None)
    if comp is None and "/" in name:
        return False  # a component not chosen
    rest = name[len(comp) + 1 :] if comp else name
    if rest.startswith(("source/", "debian-installer/")):
        return False
    return not any(_arch_token(a).search(rest) for a in left_out)


@functools.cache
def _arch_token(arch: str) -> re.Pattern[str]:
    # binary-arm64/, Contents-arm64.gz, Components-arm64.yml.xz, Commands-arm64.xz,
    # Contents-udeb-amd64.gz ("udeb"), Contents-source.gz ("source")
    return re.compile(rf"(^|[-/]){re.escape(arch)}(?=$|[-./])")


def _all_exist(src: IndexSource, urls: list[str]) -> list[bool]:
    """:func:`_exists` for each of ``urls``, several at once (within the run's connection
    cap): a suite names hundreds of translations, and one round trip each added up."""
    if len(urls) < 2:
        return [_exists(src, u) for u in urls]
    with ThreadPoolExecutor(min(8, len(urls), max(1, src.opts.concurrency))) as pool:
        return list(pool.map(lambda u: _exists(src, u), urls))


def _exists(src: IndexSource, url: str) -> bool:
    for attempt in src.retrying.copy():
        with attempt:
            # A redirect counts as "there": the download follows it, within scope.
            code = src.client.head(url, follow_redirects=False).status_code
            if code >= 500 or code in (408, 429):
                raise HTTPStatusError(code, url)
            return code == 200 or 300 <= code < 400
    raise AssertionError("unreachable")  # pragma: no cover


def _packages(src: IndexSource, stream: IO[bytes], seen: set[str]) -> Iterator[CrawlItem]:
    for para in index_paragraphs(stream):
        filename = para.get("Filename")
        if not filename or filename in seen:
            continue
        seen.add(filename)
        size = para.get("Size", "")
        sha = para.get("SHA256")
        yield from src.file(
            src.url(filename),
            int(size) if size.isdigit() else None,
            ("sha256", sha) if sha else None,
        )
