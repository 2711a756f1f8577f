"""Whether an index that points at other metadata agrees with DEST, before it is published.

``repodata/repomd.xml`` names its ``primary`` (and the rest) with their digests, and
``dists/SUITE/Release`` / ``InRelease`` name the ``Packages`` indices below them.
Crawled from the HTML listings, these come last (``plan.is_top_metadata``), after
the files they name; but a mirror rewrites its metadata while clients sync it, and
the copy fetched then may name files this run never saw (a new ``primary`` under a
new name) or other versions of the ones it fetched (a ``Packages.xz`` rewritten in
place), or a ``primary`` / ``Packages`` list naming packages added upstream after their
directory was listed. Published, it would send every client of the mirror to a missing
file or a checksum error. :func:`disagreement` says why, so the old copy stays instead.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Set
from typing import IO, TYPE_CHECKING

from fetcher.plan import wanted

if TYPE_CHECKING:
    from fetcher.config import Transfer

__all__ = ["disagreement"]

_SIGNED_RELEASE = ("Release", "InRelease")


def disagreement(path: str, body: bytes, t: Transfer, gone: Set[str] = frozenset()) -> str | None:
    """Why the index ``path`` (relative to ``t.dest``), whose bytes are ``body``, must not
    be published over DEST as it is now; None when it may (or is not such an index).

    ``repomd.xml``: every file it names must be in DEST with its size and digest.
    ``Release`` / ``InRelease``: every file it names that DEST holds must have its
    size and SHA256 (a ``Release`` also names forms a mirror need not carry, such as
    the uncompressed ``Packages``). And every package the ``primary`` / ``Packages``
    list it names (read from DEST) names must be in DEST with its size: a directory
    listed before upstream added a package to it does not show the package. Files the
    run's selection leaves out (``--exclude``) are not looked at, nor the files of DEST
    in ``gone`` that a ``Release`` names but need not (upstream no longer has them: a
    ``Packages`` it stopped carrying). One that does not parse names nothing here. A file
    this run fetched is read where it waits to be published with ``path``
    (``staged_path``).
    """
    from fetcher.errors import ListingError
    from fetcher.landing import staged_path

    name = posixpath.basename(path)
    lists: list[str] = []  # the package lists it names: primary, or the Packages indices
    try:
        if path == "repodata/repomd.xml" or path.endswith("/repodata/repomd.xml"):
            from fetcher.repo_yum import parse_repomd

            top = posixpath.dirname(posixpath.dirname(path))
            meta = parse_repomd(body)
            wants = [(m.href, m.size, m.checksum, True) for m in meta if m.checksum]
            lists = [m.href for m in meta if m.type == "primary"]
            root = top
        elif name in _SIGNED_RELEASE:
            from fetcher.repo_debian import parse_release

            top = posixpath.dirname(path)
            sums = parse_release(body).sha256
            wants = [
                (href, size, ("sha256", digest), False) for href, (digest, size) in sums.items()
            ]
            lists = [href for href in sums if _PACKAGES.search(href)]
            parts = top.split("/")
            root = "/".join(parts[: parts.index("dists")]) if "dists" in parts else ""
            if "dists" not in parts:
                lists = []  # (not an archive's layout: where its Filename paths start is unknown)
        else:
            return None
    except ListingError:
        return None  # not an index this can read: mirrored as it is, as any other file
    locals_: dict[str, str] = {}
    for href, size, checksum, required in wants:
        rel = _below(top, href)
        if rel is None or not wanted(rel, False, t.include, t.exclude):
            continue  # not below DEST (not this mirror's to check), or left out on purpose
        if not required and rel in gone:
            continue  # a form upstream stopped carrying: DEST's copy is not the mirror's
        staged = staged_path(t.dest, rel)
        local = staged if os.path.lexists(staged) else os.path.join(t.dest, rel)
        why = _differs(local, size, checksum, required)
        if why is not None:
            return f"it names {rel}, which {why}"
        locals_[href] = local
    # The packages those lists name: the listings this run read may be older than the
    # list it fetched (upstream added a package after its directory was listed), and a
    # client that reads the list would meet a 404. Present, and of their size.
    read: set[str] = set()  # (Packages, Packages.xz, ... of one directory: the same list)
    for href in lists:
        at = locals_.get(href)
        if at is None or posixpath.dirname(href) in read or not os.path.isfile(at):
            continue
        read.add(posixpath.dirname(href))
        why = _package_missing(at, href, root, t)
        if why is not None:
            return f"it names {_below(top, href)}, which names {why}"
    return None


_PACKAGES = re.compile(r"(^|/)Packages(\.(gz|xz|bz2|zst))?$")


def _below(top: str, href: str) -> str | None:
    rel = posixpath.normpath(posixpath.join(top, href))
    if rel.startswith("../") or rel == ".." or posixpath.isabs(rel):
        return None
    return rel


def _package_missing(local: str, href: str, root: str, t: Transfer) -> str | None:
    """The first package the list at ``local`` names that DEST lacks or holds with another
    size ("PATH, which ..."); None when none does, or the list does not read."""
    from fetcher.errors import ListingError
    from fetcher.repo_index import decompressed

    try:
        with open(local, "rb") as fh:
            data = fh.read()
        stream = decompressed(data, href)
        entries = _debian_entries(stream) if _PACKAGES.search(href) else _yum_entries(stream)
        for name, size in entries:
            rel = _below(root, name)
            if rel is None or not wanted(rel, False, t.include, t.exclude):
                continue
            why = _differs(os.path.join(t.dest, rel), size, None, True)
            if why is not None:
                return f"{rel}, which {why}"
    except (ListingError, ET.ParseError, OSError, EOFError, ValueError):
        return None  # a list that does not read: mirrored as it is
    return None


def _yum_entries(stream: IO[bytes]) -> Iterator[tuple[str, int | None]]:
    from fetcher.repo_yum import package_elements

    common = "{http://linux.duke.edu/metadata/common}"
    for elem in package_elements(stream, "primary metadata"):
        loc = elem.find(f"{common}location")
        href = loc.get("href") if loc is not None else None
        size = elem.find(f"{common}size")
        package = size.get("package") if size is not None else None
        if href and (loc is None or not loc.get("{http://www.w3.org/XML/1998/namespace}base")):
            yield href, int(package) if package and package.isdigit() else None


def _debian_entries(stream: IO[bytes]) -> Iterator[tuple[str, int | None]]:
    from fetcher.repo_debian import index_paragraphs

    for para in index_paragraphs(stream):
        filename = para.get("Filename")
        size = para.get("Size", "")
        if filename:
            yield filename, int(size) if size.isdigit() else None


def _differs(
    local: str, size: int | None, checksum: tuple[str, str] | None, required: bool
) -> str | None:
    try:
        st = os.stat(local)
    except FileNotFoundError:
        return "is not in DEST" if required else None
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if size is not None and st.st_size != size:
        return f"has {st.st_size} bytes in DEST, not {size}"
    if checksum is None:
        return None
    try:
        with open(local, "rb") as fh:
            h = hashlib.file_digest(fh, checksum[0])
    except ValueError:
        return None  # a digest this Python lacks: the size must do
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if h.hexdigest().lower() != checksum[1].strip().lower():
        return f"has another {checksum[0]} in DEST"
    return None
