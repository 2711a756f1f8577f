"""Standard streams that cannot stop a run: output that fails is dropped, the sync goes on.

A mirror run's output is a by-product. When stdout's reader goes away (``fetch
... | head``, a log collector restarted) or a standard stream was closed before
fetch started (``fetch ... >&-``), the downloads, the state and the exit code
must not change: :func:`guard_std_streams` makes every write to ``sys.stdout``
and ``sys.stderr`` that fails drop that stream's output from then on, says so
once on the other stream, and points the dead descriptor at ``/dev/null`` so
that a child process (ffmpeg) inheriting it gets no ``SIGPIPE`` either. A
``--log-file`` goes behind the same guard (:func:`guard_log`).

File descriptors 0–2 closed at start are opened on ``/dev/null`` first: else the
first file fetch opens would take descriptor 1, and anything written to
"stdout" (by fetch or a child) would land inside a downloaded file.

What goes through a guard is also made safe to show: a C1 control character
(U+0080–U+009F; U+009B is a terminal's CSI, as ESC ``[`` is) or a bidirectional
embedding, override or isolate (U+202A–U+202E, U+2066–U+2069: they reorder what a
reader sees) in a name a mirror serves is written as its ``\\uXXXX`` escape, which
JSON lines read back as the same character. (C0 controls are refused in names.)
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

__all__ = ["GuardedStream", "guard_log", "guard_std_streams", "shown"]


_UNSHOWN = {
    c: f"\\u{c:04x}" for c in (*range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A))
}


def shown(text: str) -> str:
    """``text`` with the characters that would act on a terminal or reorder a line as
    ``\\uXXXX`` escapes (see the module's note)."""
    return text if text.isascii() else text.translate(_UNSHOWN)


class GuardedStream:
    """A text stream whose failures (EPIPE, EIO, a closed file) end its output quietly.

    Everything else is the wrapped stream's (``isatty``, ``fileno``, ``encoding``,
    ...), so rich and logging take it for the stream itself.
    """

    def __init__(self, stream: Any, name: str, on_dead: Any = None) -> None:
        self._stream = stream
        self._name = name
        self._on_dead = on_dead
        self.dead: str | None = None  # why output stopped (None: it has not)

    def _failed(self, exc: Exception) -> None:
        if self.dead is not None:
            return
        self.dead = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if self._on_dead is not None:
            self._on_dead(self)

    def write(self, text: str) -> int:
        if self.dead is None:
            try:
                self._stream.write(shown(text))
                return len(text)
            except (OSError, ValueError) as exc:  # ValueError: the file was closed
                self._failed(exc)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self.dead is None:
            try:
                self._stream.flush()
            except (OSError, ValueError) as exc:
                self._failed(exc)

    def close(self) -> None:
        try:
            self._stream.close()  # (flushes first: what did not fit is dropped)
        except (OSError, ValueError) as exc:
            self._failed(exc)

    @property
    def name(self) -> str:
        return self._name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard_log(stream: Any, name: str) -> GuardedStream:
    """``stream`` (a ``--log-file``) behind a guard that tells stderr once when it fails."""

    def tell(dead: GuardedStream) -> None:
        sys.stderr.write(f"fetch: cannot write {name} ({dead.dead}); the run goes on without it\n")
        sys.stderr.flush()

    return GuardedStream(stream, name, tell)


def _occupy_closed_fds() -> None:
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _std_failed(dead: GuardedStream) -> None:
    try:  # nothing written here, by fetch or a child that inherits it, fails again
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, dead.fileno())
        finally:
            os.close(null)
    except (OSError, ValueError, AttributeError):
        pass
    other = sys.stderr if dead is sys.stdout else sys.stdout
    if SYNCING.is_set() and isinstance(other, GuardedStream) and other.dead is None:
        other.write(f"fetch: {dead.name} is gone ({dead.dead}); the run goes on without it\n")
        other.flush()


SYNCING = threading.Event()
"""Set while a mirror runs: only then is a lost stream worth a line (``fetch --check |
head`` is not: there is nothing left to say, as for any command whose reader left)."""


def guard_std_streams() -> None:
    """Install the guards on ``sys.stdout`` and ``sys.stderr`` (once per process)."""
    _occupy_closed_fds()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, GuardedStream):
            continue
        if stream is None:  # the descriptor was closed when Python started: now /dev/null
            stream = open(  # noqa: SIM115 - lives as long as the process
                1 if name == "stdout" else 2, "w", encoding="utf-8", closefd=False
            )
        setattr(sys, name, GuardedStream(stream, name, _std_failed))
