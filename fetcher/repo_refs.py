"""Whether an index that points at other metadata agrees with DEST, before it is published.

``repodata/repomd.xml`` names its ``primary`` (and the rest) with their digests, and
``dists/SUITE/Release`` / ``InRelease`` name the ``Packages`` indices below them.
Crawled from the HTML listings, these come last (``plan.is_top_metadata``), after
the files they name; but a mirror rewrites its metadata while clients sync it, and
the copy fetched then may name files this run never saw (a new ``primary`` under a
new name) or other versions of the ones it fetched (a ``Packages.xz`` rewritten in
place). Published, it would send every client of the mirror to a missing file or a
checksum error. :func:`disagreement` says why, so the old copy stays instead.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from typing import TYPE_CHECKING

from fetcher.plan import wanted

if TYPE_CHECKING:
    from fetcher.config import Transfer

__all__ = ["disagreement"]

_SIGNED_RELEASE = ("Release", "InRelease")


def disagreement(path: str, body: bytes, t: Transfer) -> str | None:
    """Why the index ``path`` (relative to ``t.dest``), whose bytes are ``body``, must not
    be published over DEST as it is now; None when it may (or is not such an index).

    ``repomd.xml``: every file it names must be in DEST with its size and digest.
    ``Release`` / ``InRelease``: every file it names that DEST holds must have its
    size and SHA256 (a ``Release`` also names forms a mirror need not carry, such as
    the uncompressed ``Packages``). Files the run's selection leaves out (``--exclude``)
    are not looked at. One that does not parse names nothing here. A file this run
    fetched is read where it waits to be published with ``path`` (``staged_path``).
    """
    from fetcher.download import staged_path
    from fetcher.errors import ListingError

    name = posixpath.basename(path)
    try:
        if path == "repodata/repomd.xml" or path.endswith("/repodata/repomd.xml"):
            from fetcher.repo_yum import parse_repomd

            top = posixpath.dirname(posixpath.dirname(path))
            wants = [(m.href, m.size, m.checksum, True) for m in parse_repomd(body) if m.checksum]
        elif name in _SIGNED_RELEASE:
            from fetcher.repo_debian import parse_release

            top = posixpath.dirname(path)
            wants = [
                (href, size, ("sha256", digest), False)
                for href, (digest, size) in parse_release(body).sha256.items()
            ]
        else:
            return None
    except ListingError:
        return None  # not an index this can read: mirrored as it is, as any other file
    for href, size, checksum, required in wants:
        rel = posixpath.normpath(posixpath.join(top, href))
        if rel.startswith("../") or rel == ".." or posixpath.isabs(rel):
            continue  # (not below DEST: not this mirror's to check)
        if not wanted(rel, False, t.include, t.exclude):
            continue  # left out of the mirror on purpose
        staged = staged_path(t.dest, rel)
        local = staged if os.path.lexists(staged) else os.path.join(t.dest, rel)
        why = _differs(local, size, checksum, required)
        if why is not None:
            return f"it names {rel}, which {why}"
    return None


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
        h = hashlib.new(checksum[0])
    except ValueError:
        return None  # a digest this Python lacks: the size must do
    try:
        with open(local, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if h.hexdigest().lower() != checksum[1].strip().lower():
        return f"has another {checksum[0]} in DEST"
    return None
