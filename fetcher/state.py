"""The run's memory: a SQLite manifest in ``DEST/.fetcher/state.sqlite`` and the run lock.

Only the coordinating process writes here, in batched transactions.  The
schema carries a version; :data:`_MIGRATIONS` brings an older file forward.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fetcher.errors import FatalIOError, LockHeld
from fetcher.models import STATE_DIR, Outcome, RemoteFile, Status

__all__ = ["Row", "RunLock", "State"]

SCHEMA_VERSION = 1

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE files (
        path TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        size INTEGER,
        mtime REAL,
        etag TEXT,
        last_modified TEXT,
        sha256 TEXT,
        stamp TEXT,
        fetched_at REAL,
        last_seen INTEGER,
        status TEXT NOT NULL
    );
    CREATE INDEX files_last_seen ON files(last_seen);
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        url TEXT,
        started REAL,
        finished REAL,
        complete INTEGER DEFAULT 0,
        exit_code INTEGER
    );
    """,
}


@dataclass(frozen=True, slots=True)
class Row:
    path: str
    url: str
    size: int | None
    mtime: float | None
    etag: str | None
    last_modified: str | None
    sha256: str | None
    stamp: str | None
    fetched_at: float | None
    last_seen: int | None
    status: str


class RunLock:
    """``DEST/.fetcher/lock`` held with ``flock`` for the whole run.

    The kernel drops a flock when its holder dies, so a killed run never
    leaves a stale lock behind.  The file names the holder for the message.
    """

    def __init__(self, dest: Path) -> None:
        self.path = dest / STATE_DIR / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(
                f"another fetch is syncing {self.path.parent.parent} ({holder})",
                "wait for it to finish; a lock from a killed run is released automatically",
            ) from None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {stamp}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class State:
    """The manifest of one DEST.  ``readonly`` opens without creating anything."""

    def __init__(self, conn: sqlite3.Connection, readonly: bool) -> None:
        self._db = conn
        self.readonly = readonly
        self._pending: list[tuple[Any, ...]] = []
        self._seen: list[tuple[int, str]] = []
        self._last_flush = time.monotonic()

    @staticmethod
    def open(dest: Path, readonly: bool = False) -> State:
        path = dest / STATE_DIR / "state.sqlite"
        if readonly:
            if not path.exists():
                conn = sqlite3.connect(":memory:")
                _migrate(conn)
                return State(conn, True)
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            return State(conn, True)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            _migrate(conn)
        except sqlite3.OperationalError as exc:
            raise FatalIOError(f"cannot open state database {path}: {exc}") from exc
        return State(conn, False)

    def close(self) -> None:
        self.flush()
        self._db.close()

    # -- runs -------------------------------------------------------------
    def begin_run(self, url: str) -> int:
        if self.readonly:
            row = self._db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM runs").fetchone()
            return int(row[0])
        cur = self._db.execute("INSERT INTO runs (url, started) VALUES (?, ?)", (url, time.time()))
        return int(cur.lastrowid or 0)

    def end_run(self, run_id: int, complete: bool, exit_code: int) -> None:
        self.flush()
        if not self.readonly:
            self._db.execute(
                "UPDATE runs SET finished = ?, complete = ?, exit_code = ? WHERE id = ?",
                (time.time(), int(complete), exit_code, run_id),
            )

    # -- files ------------------------------------------------------------
    def get(self, path: str) -> Row | None:
        r = self._db.execute(
            "SELECT path, url, size, mtime, etag, last_modified, sha256, stamp, fetched_at,"
            " last_seen, status FROM files WHERE path = ?",
            (path,),
        ).fetchone()
        return Row(*r) if r else None

    def seen(self, run_id: int, path: str) -> None:
        """Mark an unchanged file as present upstream in this run."""
        self._seen.append((run_id, path))
        self._maybe_flush()

    def record(self, run_id: int, out: Outcome) -> None:
        if out.status not in (Status.FETCHED, Status.UNCHANGED):
            return
        self._pending.append(
            (out.path, out.url, out.size, out.mtime, out.etag, out.last_modified, out.sha256,
             out.stamp, time.time(), run_id, "ok")
        )  # fmt: skip
        self._maybe_flush()

    def adopt(self, run_id: int, f: RemoteFile, size: int, mtime: float) -> None:
        self._pending.append(
            (f.path, f.url, size, mtime, None, None, None, f.stamp, None, run_id, "adopted")
        )
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._pending) + len(self._seen) >= 2000 or time.monotonic() - self._last_flush > 1:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if self.readonly or not (self._pending or self._seen):
            self._pending.clear()
            self._seen.clear()
            return
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO files (path, url, size, mtime, etag, last_modified, sha256, stamp,"
                    " fetched_at, last_seen, status) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT(path) DO UPDATE SET url=excluded.url, size=excluded.size,"
                    " mtime=excluded.mtime, etag=COALESCE(excluded.etag, files.etag),"
                    " last_modified=COALESCE(excluded.last_modified, files.last_modified),"
                    " sha256=COALESCE(excluded.sha256, files.sha256), stamp=excluded.stamp,"
                    " fetched_at=COALESCE(excluded.fetched_at, files.fetched_at),"
                    " last_seen=excluded.last_seen, status=excluded.status",
                    self._pending,
                )
                self._db.executemany("UPDATE files SET last_seen = ? WHERE path = ?", self._seen)
        except sqlite3.OperationalError as exc:
            raise FatalIOError(f"cannot write state database: {exc}") from exc
        self._pending.clear()
        self._seen.clear()

    def not_seen(self, run_id: int) -> Iterator[str]:
        """Paths recorded before but not seen upstream in ``run_id``."""
        self.flush()
        cur = self._db.execute(
            "SELECT path FROM files WHERE last_seen IS NULL OR last_seen != ? ORDER BY path",
            (run_id,),
        )
        for (path,) in cur:
            yield path

    def invalidate(self, path: str) -> None:
        """Mark a file as bad (it failed a probe): the next run fetches it again."""
        self.flush()
        if not self.readonly:
            self._db.execute("UPDATE files SET status = 'invalid' WHERE path = ?", (path,))

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM files").fetchone()[0])

    def forget(self, paths: list[str]) -> None:
        if self.readonly or not paths:
            return
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in paths])

    def rows(self) -> Iterator[Row]:
        cur = self._db.execute(
            "SELECT path, url, size, mtime, etag, last_modified, sha256, stamp, fetched_at,"
            " last_seen, status FROM files ORDER BY path"
        )
        for r in cur:
            yield Row(*r)


def _migrate(conn: sqlite3.Connection) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise FatalIOError(
            f"state database has schema version {version}, newer than this fetch ({SCHEMA_VERSION})",
            "upgrade fetch, or remove DEST/.fetcher/state.sqlite to start over",
        )
    for v in range(version + 1, SCHEMA_VERSION + 1):
        conn.executescript(f"BEGIN; {_MIGRATIONS[v]} PRAGMA user_version = {v}; COMMIT;")
