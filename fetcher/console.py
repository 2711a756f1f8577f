"""The ``fetch`` command's first module (the console script's and ``python -m fetcher``'s).

A stop signal while the rest of fetch loads (SIGTERM from systemd or a cron wrapper's
timeout, SIGHUP from a closed terminal) ended the process at once, exit 143 or 129,
with no ``--report`` or ``--metrics`` written, against what a run stopped at any other
moment does (exit 130, both written, marked interrupted). This module is light: it
notes such a signal before the imports begin, and the CLI stops as soon as it can
(:func:`fetcher.cli.main`): the first job is reported as interrupted, the rest do not
start. A program that imports fetch's modules is left alone.
"""

from __future__ import annotations

import signal
from types import FrameType

__all__ = ["catch_early", "early_stops", "entry"]

_EARLY: list[int] = []
_CAUGHT: list[signal.Signals] = []


def _note(signum: int, frame: FrameType | None) -> None:
    _EARLY.append(signum)


def catch_early() -> None:
    """From now until the CLI installs its own handlers, note SIGTERM (and SIGHUP, unless
    it is ignored, as under ``nohup``) instead of dying of it."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if sig == signal.SIGTERM or signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _note)
            _CAUGHT.append(sig)


def early_stops() -> tuple[list[int], list[signal.Signals]]:
    """The stop signals noted so far, and those :func:`catch_early` took over (the CLI
    takes them over in turn)."""
    return _EARLY, _CAUGHT


def run() -> None:
    from fetcher.cli import entry as cli_entry

    cli_entry()


def entry() -> None:
    """The console script."""
    catch_early()
    run()
