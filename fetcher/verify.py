"""``fetch --verify-only DEST``: re-hash the mirror against the digests in its state.

Every file whose state row carries a SHA-256 (recorded when an index published
one and the download matched it) is read again and compared.  Nothing is
written: the state is opened read-only, so a verify can run beside a sync.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from fetcher.errors import UsageError
from fetcher.models import STATE_DIR
from fetcher.state import State

__all__ = ["verify_tree"]


def verify_tree(dest: Path, checked: Callable[[str], None] | None = None) -> list[tuple[str, str]]:
    """``(path, problem)`` for every recorded file that is missing or has other bytes;
    ``checked(path)`` is called for each file with a digest to check.

    Raises :class:`UsageError` when DEST holds no fetch state.

    Example::

        for path, problem in verify_tree(Path("mirror")):
            print(f"{path}: {problem}")
    """
    dest = dest.absolute()
    if not (dest / STATE_DIR / "state.sqlite").is_file():
        raise UsageError(f"{dest} has no {STATE_DIR}/state.sqlite: not a fetch mirror")
    problems: list[tuple[str, str]] = []
    state = State.open(dest, readonly=True)
    try:
        for row in state.rows():
            if not row.sha256:
                continue
            if checked is not None:
                checked(row.path)
            problem = _check(dest, row.path, row.sha256)
            if problem is not None:
                problems.append((row.path, problem))
    finally:
        state.close()
    return problems


def _check(dest: Path, rel: str, want: str) -> str | None:
    path = dest / rel
    # Rows come from our own database, but a hand-edited one must not read outside DEST.
    if ".." in rel.split("/") or rel.startswith("/"):
        return "unsafe path in state"
    try:
        with path.open("rb") as fh:
            h = hashlib.file_digest(fh, "sha256")
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    got = h.hexdigest()
    if got != want.lower():
        return f"sha256 mismatch: expected {want}, got {got}"
    return None
