"""A download's way into DEST: where its bytes are written, and how they take the name.

A body is written to a partial file in ``DEST/.fetcher/partial/`` (named by a hash of
the path: flat, fixed-length), beside a small sidecar that records the validator
(ETag / Last-Modified) it was fetched under, so that a resume can send ``If-Range``
and never splice two versions; or, for a small new file on Linux, to an unnamed file
(``O_TMPFILE``) in its own directory. Only a complete, checked body takes its final
name: a rename, or a link of the unnamed file, or a copy into an unnamed file beside
the name where DEST spans filesystems. A name holds the old file or all of the new
one, never part of it.

Partial files and sidecars are fetch's own: a symbolic link in their place is
someone else's, and is not written through (:data:`PARTIAL_FLAGS`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import secrets
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

from fetcher.config import Transfer
from fetcher.errors import FatalIOError, IncompleteDownload, StaleIndex
from fetcher.models import STATE_DIR, Job, RelPath, RemoteFile
from fetcher.plan import is_top_metadata
from fetcher.wire import write_all

__all__ = [
    "PARTIAL_FLAGS",
    "UNNAMED",
    "Out",
    "Where",
    "check_writable",
    "discard",
    "ensure_dir",
    "move_into",
    "name_partial",
    "partial_dir",
    "partial_name",
    "partial_paths",
    "read_back",
    "read_sidecar",
    "staged_path",
    "unnamed_ok",
    "unwritable",
    "write_json",
]


# A partial file (or sidecar) is fetch's own, in DEST's state directory: a symbolic link
# there is someone else's, and is not written through (ELOOP: the file fails, naming it).
PARTIAL_FLAGS = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW


def partial_name(path: RelPath) -> str:
    """The partial file's name for ``path`` (in ``.fetcher/partial/``): flat, fixed-length."""
    return hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".part"


def partial_paths(dest: Path, path: RelPath) -> tuple[Path, Path]:
    """The partial file and its sidecar for ``path``."""
    part = partial_dir(dest) / partial_name(path)
    return part, part.with_suffix(".json")


@functools.lru_cache(maxsize=16)
def partial_dir(dest: Path) -> Path:
    """Where DEST's partial files and their sidecars are kept."""
    return dest / STATE_DIR / "partial"


def staged_path(dest: str, path: str) -> str:
    """Where repository metadata waits, checked, for the rest of its group (``Job.stage``):
    ``.fetcher/staged/`` and the file's own path below it (what ``repo_refs`` reads)."""
    return os.path.join(dest, STATE_DIR, "staged", path)


def read_sidecar(meta: Path, url: str) -> dict[str, Any] | None:
    """The sidecar ``meta`` when it is one for ``url``; None when it is missing, unreadable
    or another URL's (a partial file is only ever resumed from its own URL)."""
    try:
        data = json.loads(meta.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("url") != url:
        return None
    return data


def write_json(meta: Path, data: Any) -> None:
    """``meta`` holds ``data`` (JSON), whole: written beside it, then renamed over it (a
    partial file's sidecar; the list of staged metadata being published)."""
    tmp = meta.with_name(meta.name + ".tmp")
    fd = os.open(tmp, PARTIAL_FLAGS | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        write_all(fd, json.dumps(data).encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(tmp, meta)


class Where:
    """Where one file goes: its final name, and its partial file and sidecar when wanted.

    Plain strings for the final name (a ``Path`` per file costs more than the
    syscalls it names); the partial pair is made on first use, which most small
    files never reach. ``target``: the name the checked file takes, its final name
    or, for staged metadata (``Job.stage``), its name under ``.fetcher/staged/``.
    """

    __slots__ = ("_dest", "_part", "_path", "final", "parent", "target")

    def __init__(self, dest: str, path: RelPath, staged: bool = False) -> None:
        self.final = os.path.join(dest, path)
        self.parent = os.path.dirname(self.final)
        self.target = staged_path(dest, path) if staged else self.final
        self._dest = dest
        self._path = path
        self._part: tuple[Path, Path] | None = None

    def partial(self) -> tuple[Path, Path]:
        """The partial file and its sidecar."""
        if self._part is None:
            self._part = partial_paths(Path(self._dest), self._path)
        return self._part


def ensure_dir(d: str, known: set[str] | None) -> None:
    # ``known``: directories this runner made already; saves a mkdir syscall per file.
    if known is None or d not in known:
        try:
            os.makedirs(d, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            # ``filename``: the one in the way; further up (ENOTDIR), the file is found
            raise FileExistsError(
                errno.EEXIST, "a local file where the mirror has a directory", _in_the_way(d)
            ) from exc
        if known is not None and len(known) < 100_000:
            known.add(d)


def _in_the_way(d: str) -> str:
    """The nearest of ``d`` and its parents that exists and is not a directory (else ``d``)."""
    p = d
    while p and p != os.path.dirname(p):
        if os.path.lexists(p) and not os.path.isdir(p):
            return p
        p = os.path.dirname(p)
    return d


class Out:
    """Where one attempt writes its body: a file descriptor, closed by the attempt.

    Either the partial file in ``.fetcher/partial/`` (renamed into place once checked),
    or, for a small new file on Linux, an unnamed file in its own directory
    (``O_TMPFILE``) that gets its name once checked: nothing is left behind when the
    run dies, and nothing is renamed across directories, which takes the filesystem's
    rename lock (on a busy ext4 disk every writer queued behind it:
    ``benchmarks/bench_files.py``). Plain descriptor calls throughout: chunks are
    written as they come, so a buffered file object would only add a copy (and the
    ``fstat``, ``isatty`` and ``lseek`` of setting one up, per file).
    """

    __slots__ = ("fd", "unnamed")

    def __init__(self) -> None:
        self.fd = -1
        self.unnamed = False

    def open_partial(self, part: Path, mode: str) -> None:
        append = os.O_APPEND if mode == "ab" else os.O_TRUNC
        self.fd = os.open(part, PARTIAL_FLAGS | os.O_CREAT | append, 0o666)

    def open_unnamed(self, directory: str) -> bool:
        """An unnamed file in ``directory``; False where the filesystem has none."""
        try:
            self.fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return False  # no O_TMPFILE here (NFS, an old kernel): the partial file
            raise
        self.unnamed = True
        return True

    def publish(self, where: Where, mtime: float | None) -> None:
        """Give the checked unnamed file its name (and the server's time)."""
        if mtime is not None:
            os.utime(self.fd, (mtime, mtime))
        # A src_dir_fd makes os.link call linkat(AT_SYMLINK_FOLLOW): it links the file
        # behind /proc's entry for the descriptor (plain link(2) would refuse, EXDEV).
        src = f"/proc/self/fd/{self.fd}"
        try:
            os.link(src, where.final, src_dir_fd=self.fd, follow_symlinks=True)
        except FileExistsError:
            # The name was taken since the plan looked: replace it, atomically, as any
            # update is replaced (named in the partial directory first).
            part = where.partial()[0]
            part.parent.mkdir(parents=True, exist_ok=True)
            part.unlink(missing_ok=True)
            try:
                os.link(src, part, src_dir_fd=self.fd, follow_symlinks=True)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # (the final name's directory is another filesystem: see move_into)
                part = Path(_hidden_name(where.parent))
                os.link(src, part, src_dir_fd=self.fd, follow_symlinks=True)
            try:
                os.replace(part, where.final)
            except OSError:  # a directory in the way, say: no partial file left for it
                part.unlink(missing_ok=True)
                raise

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


UNNAMED = {"ok": hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")}
"""Whether unnamed files can be used here; off for the process once a filesystem refuses."""


def unnamed_ok(where: Where, out: Out, known_dirs: set[str] | None) -> bool:
    """Open ``out`` as an unnamed file beside the final name if this system can."""
    if not UNNAMED["ok"]:
        return False
    ensure_dir(where.parent, known_dirs)
    if out.open_unnamed(where.parent):
        return True
    UNNAMED["ok"] = False
    return False


def read_back(f: RemoteFile) -> bool:
    """Metadata that names other metadata (``repomd.xml``, ``Release``), crawled from the
    listings: read back before it is published, to see that DEST holds what it names
    (:func:`fetcher.repo_refs.disagreement`). From ``--index``, its digest already ties
    it to the copy the run's file list came from."""
    return f.checksum is None and is_top_metadata(f.path)


def name_partial(
    where: Where,
    part: Path,
    mtime: float | None,
    job: Job,
    t: Transfer,
    known_dirs: set[str] | None = None,
) -> None:
    """The checked partial file takes its final name (and the server's time), atomically.

    Metadata that names other metadata is read back first (:func:`read_back`), against
    the mirror ``t``; ``known_dirs``: directories this runner made already."""
    f = job.file
    if read_back(f):
        from fetcher.repo_refs import disagreement

        why = disagreement(f.path, part.read_bytes(), t, job.gone)
        if why is not None:
            discard(where)
            raise StaleIndex(
                f"{f.path} not published: {why} (rewritten upstream during the run?);"
                " the next run fetches what it names"
            )
    ensure_dir(os.path.dirname(where.target), known_dirs)
    if mtime is not None:
        os.utime(part, (mtime, mtime))
    move_into(part, where.target)


def _hidden_name(directory: str | Path) -> str:
    """A fresh hidden name in ``directory`` for a file about to be renamed over its own
    (``tempfile.mkstemp``'s prefix, for when the file exists already)."""
    return os.path.join(directory, f".fetch-{secrets.token_hex(8)}")


def move_into(part: Path, target: str) -> None:
    """``os.replace(part, target)``, also where ``target``'s directory lies on another
    filesystem than DEST's partial files: a disk mounted inside DEST (or linked into it)
    for a big part of the mirror, which no rename reaches (EXDEV: every file there
    failed, on every run, after its whole body came in). There the checked file is
    copied into an unnamed file beside ``target`` that then takes the name, so the name
    holds the old file or all of the new one, and a run killed while it copies leaves
    nothing in the mirror."""
    try:
        os.replace(part, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    directory = os.path.dirname(target)
    out = Out()
    tmp = None
    try:
        if not out.open_unnamed(directory):  # (no O_TMPFILE there: a hidden name instead)
            out.fd, tmp = tempfile.mkstemp(prefix=".fetch-", dir=directory)
        with open(part, "rb") as src:
            st = os.fstat(src.fileno())
            done = 0
            while done < st.st_size:
                n = os.sendfile(out.fd, src.fileno(), done, st.st_size - done)
                if n == 0:
                    raise IncompleteDownload(f"{part} shrank while it was copied")
                done += n
        with contextlib.suppress(PermissionError):  # FAT, exFAT: modes are the mount's
            os.fchmod(out.fd, stat.S_IMODE(st.st_mode))
        os.utime(out.fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        if tmp is None:
            tmp = _hidden_name(directory)
            os.link(f"/proc/self/fd/{out.fd}", tmp, src_dir_fd=out.fd, follow_symlinks=True)
        os.replace(tmp, target)
        tmp = None
    finally:
        out.close()
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    part.unlink()


def discard(where: Where) -> None:
    part, meta = where.partial()
    part.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)


def check_writable(dest: Path) -> None:
    """Raise :class:`FatalIOError` when DEST cannot hold our state and partial files."""
    try:
        partial_dir(dest).mkdir(parents=True, exist_ok=True)
        # unique per thread: a Dask worker checks DEST from several tasks at once
        probe = dest / STATE_DIR / f".probe-{os.getpid()}-{threading.get_ident()}"
        # a name anyone can guess: made new (one left by a killed run, or a link planted
        # in its place, goes first), never opened through a link
        probe.unlink(missing_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            write_all(fd, b"x")
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise unwritable(dest, exc) from exc


def unwritable(dest: Path, exc: OSError, doing: str = "write to") -> FatalIOError:
    """The error for DEST refused: ``cannot write to DEST: [the path in the way: ]why``."""
    where = f"{exc.filename}: " if exc.filename and str(exc.filename) != str(dest) else ""
    return FatalIOError(f"cannot {doing} {dest}: {where}{exc.strerror or exc}")
