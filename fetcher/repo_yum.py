"""A yum/dnf repository's file list from ``repodata/repomd.xml`` and its ``primary``.

``repomd.xml`` names the metadata files with their checksums; ``primary``
(gzip, xz, bz2 or zstd) lists every package with its location, size, digest
and build time.  ``primary`` is verified against ``repomd.xml`` before a single
package is yielded, and the metadata files themselves are yielded last, with
their digests (``repomd.xml``'s is the digest of the copy that was read), so
the pipeline publishes exactly the metadata this file list came from.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import IO
from urllib.parse import quote

import msgspec

from fetcher.crawl import CrawlItem
from fetcher.errors import ListingError
from fetcher.models import CrawlProblem
from fetcher.repo_index import IndexSource, check_digest, decompressed, normal_algo

__all__ = ["MetaFile", "package_elements", "parse_repomd", "walk"]

_REPO = "{http://linux.duke.edu/metadata/repo}"
_COMMON = "{http://linux.duke.edu/metadata/common}"
_XML_BASE = "{http://www.w3.org/XML/1998/namespace}base"


class MetaFile(msgspec.Struct, frozen=True):
    """One ``<data>`` entry of ``repomd.xml``."""

    type: str
    href: str
    checksum: tuple[str, str] | None
    size: int | None
    timestamp: float | None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def parse_repomd(data: bytes) -> list[MetaFile]:
    """The ``<data>`` entries of ``repomd.xml`` (pure).

    >>> x = b'''<repomd xmlns="http://linux.duke.edu/metadata/repo"><data type="primary">
    ... <checksum type="sha256">ab</checksum><location href="repodata/p.xml.gz"/>
    ... <size>3</size></data></repomd>'''
    >>> parse_repomd(x)[0].href
    'repodata/p.xml.gz'
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ListingError(f"repomd.xml does not parse: {exc}") from None
    if root.tag != f"{_REPO}repomd":
        # (a bare <repomd> read "not a repomd.xml (root element 'repomd')": name the namespace)
        raise ListingError(
            f"not a repomd.xml: its root element is {root.tag!r},"
            f" not 'repomd' in the namespace {_REPO[1:-1]}"
        )
    out: list[MetaFile] = []
    for d in root.iter(f"{_REPO}data"):
        loc = d.find(f"{_REPO}location")
        href = loc.get("href") if loc is not None else None
        if not href:
            raise ListingError(f"repomd.xml: <data type={d.get('type')!r}> without a location")
        cs = d.find(f"{_REPO}checksum")
        checksum = None
        if cs is not None and cs.text and cs.get("type"):
            checksum = (normal_algo(cs.get("type", "")), cs.text.strip())
        size = d.find(f"{_REPO}size")
        ts = d.find(f"{_REPO}timestamp")
        out.append(
            MetaFile(
                d.get("type", ""),
                href,
                checksum,
                _int(size.text if size is not None else None),
                _float(ts.text if ts is not None else None),
            )
        )
    return out


class _EntryBound:
    """A stream as its parser reads it (``read(n)``), at most ``most`` bytes since
    ``since`` was last set to 0 (an entry ended): past it, a :class:`ListingError`."""

    def __init__(self, stream: IO[bytes], most: int, what: str) -> None:
        self._stream = stream
        self._most = most
        self._what = what
        self.since = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n if n >= 0 else 1 << 16)
        self.since += len(data)
        if self.since > self._most:
            raise ListingError(f"{self._what}: an entry of over {self._most} bytes")
        return data


MAX_ENTRY = 16 << 20
"""Bytes of one package's entry in an index, at most (a real one is a few KiB)."""


def walk(src: IndexSource, repomd: bytes) -> Iterator[CrawlItem]:
    """Every package of the repository at ``src.root``, then its metadata files."""
    meta = parse_repomd(repomd)
    primary = next((m for m in meta if m.type == "primary"), None)
    if primary is None:
        raise ListingError("repomd.xml lists no primary metadata")
    purl = src.url(primary.href)
    data = src.get(primary.href)
    if data is None:
        raise ListingError(f"primary metadata missing (404): {purl}")
    if primary.checksum is not None:
        check_digest(data, primary.checksum[0], primary.checksum[1], primary.size, purl)
    try:
        yield from _packages(src, decompressed(data, primary.href), purl)
    except (ET.ParseError, OSError, EOFError) as exc:
        # A truncated or corrupt stream that still matched its checksum, or had none.
        yield CrawlProblem(purl, f"primary metadata does not parse: {exc}", "listing")
        return
    for m in meta:
        yield from src.file(src.url(m.href), m.size, m.checksum, m.timestamp)
    digest = hashlib.sha256(repomd).hexdigest()
    yield from src.file(src.url("repodata/repomd.xml"), len(repomd), ("sha256", digest))


def _packages(src: IndexSource, stream: IO[bytes], url: str) -> Iterator[CrawlItem]:
    for pkg in package_elements(stream, url):
        yield from _package(src, pkg)


def package_elements(stream: IO[bytes], what: str) -> Iterator[ET.Element]:
    """The ``<package>`` elements of a decompressed primary.xml, each cleared once the
    caller is done with it (memory stays flat however many packages there are), and each
    at most :data:`MAX_ENTRY` bytes of the stream: past it, a :class:`ListingError` that
    names ``what``. The XML parser builds an element (its text, its children) until its
    end tag: a primary.xml of a few KiB, compressed, can hold one text of gigabytes, or
    one package of millions of elements."""
    bounded = _EntryBound(stream, MAX_ENTRY, what)
    root: ET.Element | None = None
    for event, elem in ET.iterparse(bounded, events=("start", "end")):
        if event == "start":
            if root is None:
                root = elem
            continue
        if elem.tag != f"{_COMMON}package":
            continue
        bounded.since = 0
        yield elem
        elem.clear()
        if root is not None:
            root.clear()


def _package(src: IndexSource, pkg: ET.Element) -> Iterator[CrawlItem]:
    loc = pkg.find(f"{_COMMON}location")
    href = loc.get("href") if loc is not None else None
    name = pkg.findtext(f"{_COMMON}name") or "?"
    if loc is None or not href:
        yield CrawlProblem(src.root, f"package {name} has no location in primary", "unsafe")
        return
    base = loc.get(_XML_BASE)
    url = base.rstrip("/") + "/" + quote(href, safe="/") if base else src.url(href)
    size_el = pkg.find(f"{_COMMON}size")
    time_el = pkg.find(f"{_COMMON}time")
    cs = pkg.find(f"{_COMMON}checksum")
    checksum = None
    if cs is not None and cs.text and cs.get("type"):
        checksum = (normal_algo(cs.get("type", "")), cs.text.strip())
    size = _int(size_el.get("package") if size_el is not None else None)
    mtime = _float(time_el.get("file") if time_el is not None else None)
    yield from src.file(url, size, checksum, mtime)
