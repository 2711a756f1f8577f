"""DEST as the plan sees it: what it held when the run began, asked about file by file.

The coordinator's :class:`Disk` answers the plan's questions about the local side
(is this file there, at what size; is it one this mirror fetched; is a directory's
every file as the last run left it) from one look at DEST and one read of the state,
made while the first listings are on their way (:meth:`Disk.read_rows`), rather than
a ``stat`` and a query per file behind the crawl.
"""

from __future__ import annotations

import itertools
import os
import stat
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from fetcher.landing import partial_dir, partial_name
from fetcher.models import Listing, RelPath, names_digest
from fetcher.plan import LocalFile, racy
from fetcher.prune import local_files
from fetcher.state import ROWS_AT_ONCE, Row, State

__all__ = ["Disk"]

_UNSEEN = object()
_MTIME_STEP = 2.0  # seconds: the coarsest a disk keeps a file's time to (FAT's)


class Disk:
    """What DEST held when the run began, as the plan asks about it file by file.

    Most of a first run's files are in directories the run itself just created,
    and most runs find no partial files: neither needs a ``stat`` per file. Only
    the plan's own view: the workers look again before they resume anything.
    """

    def __init__(self, dest: Path, state: State) -> None:
        self.dest = dest
        self.fresh: set[str] = set()  # directories that did not exist: nothing inside
        try:
            names = os.listdir(partial_dir(dest))
        except OSError:
            names = []
        self.partials = frozenset(names)  # sidecars too: no partial file is named like one
        self.state = state
        self.state_empty = state.is_empty()
        self._rows_dir: str | None = None  # the directory whose rows are at hand
        self._rows: dict[str, Row] | None = None
        self._all: dict[str, Row] | None = None  # every row (read_rows)
        # looked at while the first listings were on their way (read_rows)
        self._looked: dict[str, LocalFile | None] = {}
        self._dirs: set[str] = set()  # directories found in DEST then
        self._by_dir: dict[str, list[tuple[str, Row]]] | None = None  # rows by directory
        self._rows_read = threading.Event()  # read_rows() has built _by_dir, or will not
        # what intact() would say of a kept listing's directory (by its path), found by
        # read_rows() while the first listings were on their way
        self._checked: dict[str, tuple[Listing, tuple[tuple[str, ...], int] | None]] = {}
        self.found: list[str] | None = None  # DEST's files, listed by read_rows() then

    def add_dir(self, path: RelPath, create: bool) -> bool:
        """Note (and with ``create``, make) the directory ``path`` of the mirror. True when
        a file this mirror fetched there, unchanged since, gave way to it (upstream, the
        file became a directory); a file of anyone else's in the way raises, as before."""
        if path in self._dirs:
            return False
        p = self.dest / path
        if not create:  # (a dry run: True if a file of the mirror's would give way)
            if not p.is_dir():
                self.fresh.add(path)
                return not self.state_empty and self._ours(path)
            return False
        replaced = False
        try:
            p.mkdir()
        except FileExistsError:
            replaced = not p.is_dir() and self._give_way(path)
            if not replaced:
                p.mkdir(parents=True, exist_ok=True)  # raises when it is not a directory
                return False
            p.mkdir()
        except FileNotFoundError:
            p.mkdir(parents=True, exist_ok=True)
        self.fresh.add(path)
        return replaced

    def _give_way(self, path: RelPath) -> bool:
        """Remove the file at ``path`` if it is one this mirror fetched and nobody changed
        since; True if it went."""
        if not self._ours(path):
            return False
        os.unlink(os.path.join(self.dest, path))
        self.state.forget([path])
        return True

    def _ours(self, path: str) -> bool:
        """The file at ``path`` is one this mirror fetched and nobody changed since: a
        regular file with its row's size and modification time."""
        r = self.row(RelPath(path))
        if r is None or r.status not in ("ok", "adopted") or r.size is None:
            return False
        try:
            st = os.lstat(os.path.join(self.dest, path))
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != r.size:
            return False
        # written since (an edit of the same size): someone's, kept. The time it was given
        # is the server's, long past; a disk keeps it to its own step (FAT: 2 s).
        return r.mtime is None or abs(st.st_mtime - r.mtime) <= _MTIME_STEP

    def clear_dir(self, path: RelPath, dry: list[str] | None = None) -> bool:
        """Upstream, the directory ``path`` of an earlier run is a file now: remove it, if
        all it holds are files this mirror fetched, unchanged since (and directories of
        such); True if it went. Anything else there (someone's file, a link) keeps it all,
        and the file fails to take its place, naming it. Only a directory the state knows
        of is looked at (no system call for every new file).

        ``dry`` (a dry run): remove nothing; True if it would go, its files added to
        ``dry`` (they would go with it, not as deletions)."""
        if path not in self._dirs and (
            # (_dirs is DEST's directories only when read_rows read every row: not in a
            # dry run, nor past ROWS_AT_ONCE files; then the state is asked)
            self._all is not None or self.state_empty or not self.state.knows_below(path)
        ):
            return False
        top = os.path.join(self.dest, path)
        files: list[str] = []
        dirs: list[str] = []
        for root, dnames, fnames in os.walk(top):
            if any(os.path.islink(os.path.join(root, d)) for d in dnames):
                return False
            dirs.append(root)
            for name in fnames:
                rel = os.path.relpath(os.path.join(root, name), self.dest).replace(os.sep, "/")
                if not self._ours(rel):
                    return False
                files.append(rel)
        if not dirs:
            return False  # (not a directory after all)
        if dry is not None:
            dry.extend(files)
            return True
        gone: list[str] = []
        try:
            for rel in files:
                os.unlink(os.path.join(self.dest, rel))
                gone.append(rel)
            for d in reversed(dirs):  # the deepest first
                os.rmdir(d)
        except OSError:
            return False  # something came in meanwhile: the file fails, naming it
        finally:
            self.state.forget(gone)
        self._dirs = {d for d in self._dirs if d != path and not d.startswith(path + "/")}
        return True

    def local(self, path: RelPath) -> LocalFile | None:
        if path.rpartition("/")[0] in self.fresh:
            return None
        looked = self._looked.pop(path, _UNSEEN)
        if looked is not _UNSEEN:
            return looked  # type: ignore[return-value]
        return _stat(os.path.join(self.dest, path))

    def read_rows(
        self, waiting: Callable[[], bool], kept: Mapping[str, Listing] | None = None
    ) -> None:
        """Read the whole state now, if it is small, instead of a directory at a time as the
        plan goes: while the first listings are on their way nothing else runs here, and
        later each of SQLite's steps would wait for the interpreter lock behind the crawl's
        threads (50 directories' rows, 5,000 files: 16 ms of CPU either way; 46 ms of
        wall time a directory at a time beside the crawl).

        Then, while ``waiting()`` (nothing has come from the crawl yet), look at the
        directories and files the state knows in DEST, as the plan will: a re-sync's
        ``stat`` per file done in the round trip instead of behind the crawl's parsing
        (5,000 files: 30-40 ms of wall time there, for the lock). And then check the
        directories of the ``kept`` listings as :meth:`intact` will be asked to when
        their pages come back unchanged (78 directories: 4 ms less behind the pages)."""
        try:
            if not self.state_empty:
                self._all = self.state.every_row()
            if not self._all:
                return
            by_dir: dict[str, list[tuple[str, Row]]] = {}
            for path, r in self._all.items():
                by_dir.setdefault(path.rpartition("/")[0], []).append((path, r))
            self._by_dir = by_dir
        finally:
            self._rows_read.set()  # the crawl's threads may ask intact() now
        dest = str(self.dest)
        parents = set(by_dir)
        for d in list(parents):
            while "/" in d:
                d = d.rpartition("/")[0]
                parents.add(d)
        parents.discard("")
        for d in sorted(parents):
            try:
                if stat.S_ISDIR(os.stat(os.path.join(dest, d)).st_mode):
                    self._dirs.add(d)
            except (OSError, ValueError):
                pass
        dest += "/"
        for i, path in enumerate(self._all):
            if not i % 64 and not waiting():
                return
            self._looked[path] = _stat(dest + path)
        for last in (kept or {}).values():
            if not waiting():
                return
            self._checked[last.path] = (last, self._check(last.path, last))
        if kept and waiting():
            # and what else is in DEST, for prune() at the end (~4 ms then, for 5,000 files);
            # not past as many files as the state holds at most (prune() walks DEST then)
            found = list(itertools.islice(local_files(self.dest), ROWS_AT_ONCE + 1))
            self.found = found if len(found) <= ROWS_AT_ONCE else None

    def intact(self, directory: str, last: Listing) -> tuple[tuple[str, ...], int] | None:
        """The files of ``directory`` and their bytes, if the state holds exactly the files
        its listing gave the last run, with the same stamps, and each is in DEST with the
        size it was fetched at and no partial file: then the plan would find every one
        unchanged (``decide``). Else None. Asked from the crawl's threads; answered from
        what :meth:`read_rows` found for ``last``, if it got that far."""
        checked = self._checked.get(directory)
        if checked is not None and checked[0] is last:
            return None if directory in self.fresh else checked[1]
        # A listing may come back before the state is read (on loopback it does): wait
        # for it, a few ms, rather than parse what need not be.
        self._rows_read.wait(timeout=5)
        return self._check(directory, last)

    def _check(self, directory: str, last: Listing) -> tuple[tuple[str, ...], int] | None:
        by_dir = self._by_dir
        if by_dir is None:
            return None  # no state, or too big to hold
        rows = by_dir.get(directory, [])
        if len(rows) != last.files or directory in self.fresh:
            return None
        stamps = []
        for path, r in rows:
            if r.status not in ("ok", "adopted") or r.size is None or r.stamp is None:
                return None
            if racy(r):  # its stamp cannot vouch for it: decide() asks the server
                return None
            stamps.append((path, r.stamp))
        if names_digest(stamps) != last.names:
            return None
        total = 0
        dest = f"{self.dest}/"
        for path, r in rows:
            if self.partials and partial_name(RelPath(path)) in self.partials:
                return None
            looked = self._looked.get(path, _UNSEEN)
            local = _stat(dest + path) if looked is _UNSEEN else looked
            if not isinstance(local, LocalFile) or local.size != r.size:
                return None
            total += local.size
        return tuple(path for path, _ in rows), total

    def row(self, path: RelPath) -> Row | None:
        """The state's row for ``path``; a listing's files come together, and so do their rows."""
        if self.state_empty:
            return None
        if self._all is not None:
            return self._all.get(path)
        directory = path.rpartition("/")[0]
        if directory != self._rows_dir:
            self._rows_dir, self._rows = directory, self.state.rows_in(directory)
        if self._rows is None:
            return self.state.get(path)
        return self._rows.get(path)

    def has_partial(self, path: RelPath) -> bool:
        return bool(self.partials) and partial_name(path) in self.partials


def _stat(p: str) -> LocalFile | None:
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):  # one stat per planned file, not two
        return None
    return LocalFile(st.st_size, st.st_mtime)
