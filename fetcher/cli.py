"""The ``fetch`` command: options, display, and errors turned into messages and exit codes.

``main(argv) -> int`` never raises for a user error and never prints a
traceback for one; tests call it directly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO, cast

import msgspec

import fetcher.startup  # noqa: F401 - first: it trims what the pipeline's imports bring
from fetcher import __version__
from fetcher.config import (
    DEPENDENT,
    PATH_KEYS,
    MirrorJob,
    build_job,
    default_procs,
    load_config,
    split_credentials,
)
from fetcher.errors import FetchError, LockHeld, UsageError
from fetcher.models import STATE_DIR, Reporter, Summary
from fetcher.procs import prestart
from fetcher.progress import LineReporter
from fetcher.report import (
    exit_code,
    one_line,
    preload_render,
    render,
    summary_dict,
    write_metrics,
    write_report,
)
from fetcher.stdio import SYNCING

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["build_parser", "entry", "main"]

EPILOG = """\
examples:
  fetch --mirror https://mirrors.example.org/centos/7/os/x86_64/Packages/ --procs 4
  fetch --mirror URL --dest /srv/mirror/pkgs --exclude '*.src.rpm' --delete
  fetch --mirror URL --dry-run              # what would be fetched, skipped, deleted
  fetch --config configs/mirrors.toml --job centos7-os
  fetch demo                                # a local sample mirror, end to end

exit codes: 0 done, 1 some files failed (listed), 2 usage or config error,
            3 another run holds DEST's lock, 4 DEST unwritable or disk full, 130 interrupted
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would sys.exit(2) itself
        raise UsageError(message, f"see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fetch",
        description="Mirror the files below an HTTP directory listing into a local tree: "
        "in parallel, politely, incrementally and safely.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", nargs="?", help=argparse.SUPPRESS)
    g = p.add_argument_group("what to mirror")
    g.add_argument(
        "--mirror",
        metavar="URL",
        help="start URL: a directory listing; nothing above it or off-site is fetched (user:password@ in it, or a ~/.netrc entry for its host, authenticates every request to it)",
    )
    g.add_argument(
        "--dest",
        metavar="DIR",
        help="local directory (default: the URL's last path segment, as lftp does)",
    )
    g.add_argument(
        "--include",
        metavar="GLOB",
        action="append",
        help="fetch only files matching GLOB (repeatable; a GLOB without '/' matches the name, with '/' the relative path)",
    )
    g.add_argument(
        "--exclude",
        metavar="GLOB",
        action="append",
        help="skip files and directories matching GLOB; an excluded directory is not crawled (repeatable)",
    )
    g.add_argument(
        "--depth",
        type=int,
        metavar="N",
        help="how many directory levels below the start URL to crawl (default 64)",
    )
    g.add_argument(
        "--alias",
        dest="aliases",
        metavar="HOST[:PORT]",
        action="append",
        help="another host serving the same tree; redirects to it are followed (repeatable)",
    )
    g.add_argument(
        "--index",
        choices=("auto", "html", "repodata", "debian"),
        help="file list from HTML listings (default), yum repodata, Debian Release/Packages,"
        " or auto (repository metadata when there is some, else HTML)",
    )
    g.add_argument(
        "--verify",
        dest="verify_digests",
        action=argparse.BooleanOptionalAction,
        help="use SHA256SUMS-style files found in the listings: every file they name is checked against its digest",
    )
    g.add_argument(
        "--suite",
        dest="suites",
        metavar="NAME",
        action="append",
        help="with --index debian: mirror only this suite (repeatable; default: all in dists/)",
    )
    g.add_argument(
        "--component",
        dest="components",
        metavar="NAME",
        action="append",
        help="with --index debian: only this component, e.g. main (repeatable)",
    )
    g.add_argument(
        "--arch",
        dest="architectures",
        metavar="NAME",
        action="append",
        help="with --index debian: only this architecture, e.g. amd64 (repeatable)",
    )
    g.add_argument(
        "--verify-only",
        metavar="DEST",
        type=Path,
        help="re-hash DEST's files against the SHA-256 digests in its state; fetch nothing",
    )
    g.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="run the jobs of a TOML config file (see configs/)",
    )
    g.add_argument(
        "--job",
        metavar="NAME",
        action="append",
        help="with --config: run only this job (repeatable)",
    )
    g.add_argument(
        "--check",
        action="store_true",
        help="with --config: validate and print the resolved jobs; no network",
    )

    g = p.add_argument_group("speed and politeness")
    g.add_argument(
        "--procs",
        type=int,
        metavar="N",
        help=(
            "worker processes (default: CPU count, or max-connections ÷ 4 if more; at most 4;"
            f" here {default_procs()} for the default max-connections)"
        ),
    )
    g.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="connections to the mirror across all processes (default 8; big mirrors reset clients above ~12)",
    )
    g.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="download threads per process (default: max-connections ÷ procs, rounded up); threads beyond the cap wait for a connection",
    )
    g.add_argument(
        "--pipeline",
        type=int,
        metavar="N",
        help="small-file requests in flight per download thread, and listings' per crawl "
        "connection (HTTP/1.1 pipelining; default 8, 1 = off); each goes on as few "
        "connections as hold it, at most 32 on one",
    )
    g.add_argument(
        "--segments",
        type=int,
        metavar="N",
        help="fetch each new or updated file of 16 MiB or more as byte ranges on up to N"
        " connections at once, those of the cap that are free (default 1: off; for mirrors that cap each"
        " connection's rate)",
    )
    g.add_argument(
        "--limit-rate", metavar="RATE", help="total bandwidth for the whole run, e.g. 500k, 20M"
    )
    g.add_argument(
        "--listing-rate", type=float, metavar="N", help="at most N directory listings per second"
    )
    g.add_argument(
        "--retries", type=int, metavar="N", help="attempts per file and per listing (default 5)"
    )
    g.add_argument(
        "--executor",
        choices=("local", "dask"),
        default=None,
        help="run shards in local processes (default) or on a Dask cluster (needs fetcher[dask])",
    )
    g.add_argument(
        "--scheduler",
        metavar="tcp://HOST:PORT",
        help="with --executor dask: the Dask scheduler (default: $DASK_SCHEDULER_ADDRESS)",
    )
    g.add_argument(
        "--timeout", type=float, metavar="S", help="read timeout in seconds (default 30)"
    )
    g.add_argument(
        "--connect-timeout", type=float, metavar="S", help="connect timeout in seconds (default 10)"
    )
    g.add_argument(
        "--min-rate",
        metavar="RATE",
        help="fail a file or listing whose body comes slower than RATE (e.g. 10k) over"
        " --min-rate-time seconds, a server that trickles; it is retried, a big file"
        " resumed (default: off)",
    )
    g.add_argument(
        "--min-rate-time",
        type=float,
        metavar="S",
        help="the stretch of seconds --min-rate is measured over (default 30)",
    )

    g = p.add_argument_group("sync")
    g.add_argument(
        "--dry-run",
        action=argparse.BooleanOptionalAction,
        help="print the plan (fetch / skip / delete, with bytes); change nothing",
    )
    g.add_argument(
        "--delete",
        action=argparse.BooleanOptionalAction,
        help="remove local files no longer upstream (only after a complete, error-free crawl)",
    )
    g.add_argument(
        "--max-delete",
        metavar="N|P%",
        help="refuse to delete more than N files or P%% of them (default 10%%)",
    )
    g.add_argument(
        "--force",
        action=argparse.BooleanOptionalAction,
        help="delete even beyond --max-delete",
    )
    g.add_argument(
        "--skip-if-locked",
        action=argparse.BooleanOptionalAction,
        help="when another run holds DEST's lock, say so and exit 0 instead of 3 (for timers)",
    )

    g = p.add_argument_group("post-processing (ffmpeg)")
    g.add_argument(
        "--post",
        metavar="ACTION[=GLOB,...]",
        action="append",
        help="run ffmpeg on finished files: thumbnails, probe, transcode, remux or audio, optionally only for GLOBs (default: common video/audio extensions); repeatable",
    )
    g.add_argument(
        "--post-dest", metavar="DIR", help="where outputs go (default: DEST.derived beside DEST)"
    )
    g.add_argument(
        "--post-jobs", type=int, metavar="N", help="ffmpeg processes at once (default: CPU count)"
    )
    g.add_argument(
        "--retry-failed-post",
        action=argparse.BooleanOptionalAction,
        help="try again the outputs whose ffmpeg timed out or refused the file on an earlier run"
        " (by default not tried again while the file, the rule, its timeout and ffmpeg stay"
        " the same); timeouts: a rule's own, else 60 s + 10 s per 10 MiB, and for transcode,"
        " audio, probe and custom rules at least 60 s + twice the file's duration",
    )

    g = p.add_argument_group("network")
    g.add_argument(
        "--proxy",
        metavar="URL",
        help="HTTP proxy (http://[user:pass@]host:port); default: $https_proxy / $http_proxy /"
        " $all_proxy for the mirror's scheme, minus $no_proxy and loopback hosts; 'direct'"
        " ignores them",
    )
    g.add_argument(
        "--header",
        dest="headers",
        metavar="'NAME: VALUE'",
        action="append",
        help="send this header with every request, e.g. an API token (repeatable)",
    )
    g.add_argument(
        "--user-agent", metavar="TEXT", help="the User-Agent to send (default: fetch/VERSION ...)"
    )
    g.add_argument("--ca-cert", metavar="FILE", help="trust this CA bundle instead of the system's")
    g.add_argument(
        "--insecure",
        action=argparse.BooleanOptionalAction,
        help="do not verify TLS certificates (explicit opt-out)",
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=0,
        help="no progress; only problems and the summary. Twice (-qq): nothing on standard"
        " output unless the run ends with an exit code other than 0, then its summary (cron"
        " mails only what needs a look); errors still go to stderr",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="one line per file and per retry")
    g.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=None,
        help="unattended output format (default text; json = JSON lines)",
    )
    g.add_argument(
        "--log-file", metavar="PATH", type=Path, help="write the unattended log here too (appends)"
    )
    g.add_argument("--report", metavar="PATH", type=Path, help="write a JSON report ('-': stdout)")
    g.add_argument(
        "--metrics",
        metavar="PATH",
        type=Path,
        help="write a Prometheus textfile for node_exporter ('-': stdout)",
    )
    g.add_argument("--version", action="version", version=f"fetch {__version__}")
    return p


_CLI_KEYS = {
    "mirror": "url", "dest": "dest", "include": "include", "exclude": "exclude", "depth": "depth",
    "aliases": "aliases", "procs": "procs", "max_connections": "max_connections", "threads": "threads",
    "pipeline": "pipeline", "limit_rate": "limit_rate", "listing_rate": "listing_rate", "retries": "retries", "timeout": "timeout",
    "min_rate": "min_rate", "min_rate_time": "min_rate_time",
    "connect_timeout": "connect_timeout", "dry_run": "dry_run", "delete": "delete", "max_delete": "max_delete",
    "force": "force", "ca_cert": "ca_cert", "insecure": "insecure", "post_dest": "post_dest",
    "post_jobs": "post_jobs", "retry_failed_post": "retry_failed_post", "skip_if_locked": "skip_if_locked", "index": "index", "verify_digests": "verify_digests", "suites": "suites",
    "components": "components", "architectures": "architectures",
    "executor": "executor", "scheduler": "scheduler", "proxy": "proxy",
    "headers": "headers", "user_agent": "user_agent", "segments": "segments",
}  # fmt: skip


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr, key in _CLI_KEYS.items():
        v = getattr(ns, attr, None)
        if v is None:  # (not given; False is a --no-OPTION, over a config's true)
            continue
        if isinstance(v, list):
            v = tuple(v)
        out[key] = v
    if ns.post:
        from fetcher.postrules import parse_post_spec

        out["post"] = tuple(parse_post_spec(spec) for spec in ns.post)
    if isinstance(out.get("max_delete"), str) and out["max_delete"].isdigit():
        out["max_delete"] = int(out["max_delete"])
    return out


def _flag(key: str) -> str:
    flags = {"url": "mirror", "aliases": "alias", "headers": "header", "suites": "suite",
             "components": "component", "architectures": "arch", "verify_digests": "verify"}  # fmt: skip
    return "--" + flags.get(key, key).replace("_", "-")


def _job_from_cli(ns: argparse.Namespace) -> MirrorJob:
    vals = _overrides(ns)
    if ns.url and "url" in vals:  # (a DEST, most likely, that lost its --dest)
        raise _stray(ns.url, "did you mean --dest?")
    if ns.url:
        vals["url"] = ns.url
    if "url" not in vals:
        raise UsageError(
            "nothing to do: give --mirror URL (or --config FILE, or 'fetch demo')",
            "see 'fetch --help'",
        )
    _validate_cli({k: v for k, v in vals.items() if k != "url"})
    try:
        return build_job(vals, "options")
    except UsageError as exc:
        raise _named_as_flag(exc) from None


def _checked_jobs(ns: argparse.Namespace) -> list[MirrorJob]:
    """The jobs, with what their transfer settings read from the environment (~/.netrc)
    checked too: a bad value fails here, before anything is done."""
    jobs = _jobs(ns)
    for job in jobs:
        job.transfer()
    _unused_flags(_overrides(ns), jobs)
    return jobs


def _unused_flags(given: Mapping[str, Any], jobs: Sequence[MirrorJob]) -> None:
    """A command-line option that no job can use is a mistake to say, not to drop (with
    --config, a job of the file may be what uses it)."""
    for keys, other, value in DEPENDENT:
        for key in keys:
            if given.get(key, False) is not False and all(getattr(j, other) != value for j in jobs):
                shown = "" if value is True else f" {value}"
                raise UsageError(f"{_flag(key)} goes with {_flag(other)}{shown}")
    for key in ("post_dest", "post_jobs", "retry_failed_post"):  # (of no ffmpeg work)
        if key in given and not any(j.post for j in jobs):
            raise UsageError(f"{_flag(key)} goes with --post (or post rules in a config file)")


def _jobs(ns: argparse.Namespace) -> list[MirrorJob]:
    if ns.config is None:
        if ns.job or ns.check:
            raise UsageError("--job and --check go with --config FILE")
        return [_job_from_cli(ns)]
    over = {k: v for k, v in _overrides(ns).items() if k != "url"}
    if ns.mirror or (ns.url and "://" in ns.url):
        raise UsageError("--mirror goes without --config: a config file names its own URLs")
    if ns.url:
        raise _stray(ns.url, "did you mean --job or --dest?")
    for key in PATH_KEYS:
        if key in over:  # the command line's paths are the current directory's, not the file's
            over[key] = str(Path(over[key]).expanduser().absolute())
    _validate_cli(over)
    return list(load_config(ns.config, overrides=over, only=ns.job).values())


def _stray(arg: str, why: str) -> UsageError:
    """A positional argument where none is taken: an error, not quietly dropped."""
    return UsageError(f"unexpected argument {arg!r} ({why})", "see 'fetch --help'")


def _validate_cli(over: dict[str, Any]) -> None:
    try:
        # (without --dest, the DEST to check is the job's own default, checked with it;
        # a dry run: whether a Dask job has its scheduler is the whole job's to say)
        build_job({"dest": os.sep, **over, "url": "http://localhost/", "dry_run": True}, "options")
    except UsageError as exc:
        raise _named_as_flag(exc) from None


def _named_as_flag(exc: UsageError) -> UsageError:
    """``options.dest: …`` → ``--dest: …`` (a message about the environment, such as
    ``$DASK_SCHEDULER_ADDRESS: …``, stays as it is)."""
    msg = exc.message
    if msg.startswith("options."):
        key, _, rest = msg.removeprefix("options.").partition(":")
        msg = f"{_flag(key)}:{rest}" if rest else key
    return UsageError(msg, exc.hint)


class _LazyConsole:
    """A rich ``Console`` for stdout or stderr, made when first used.

    rich is a fifth of the CLI's imports, and a run whose output is not a terminal
    needs it only to print an error (its summary is plain lines): made here, it is
    imported when first needed; on a terminal after the workers' parent is forked (and,
    once the crawl is done, while they download). Whether it would be a terminal
    is answered without it, as rich answers.
    """

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._made: Console | None = None

    @property
    def file(self) -> TextIO:
        if self._made is not None:
            return cast(TextIO, self._made.file)
        return sys.stderr if self._stderr else sys.stdout

    @property
    def made(self) -> bool:
        return self._made is not None

    @property
    def is_terminal(self) -> bool:
        if self._made is None and not _forced_terminal():
            try:
                if not self.file.isatty():
                    return False
            except (AttributeError, ValueError):  # no isatty, or closed: not a terminal
                return False
        return self.made_console().is_terminal

    def made_console(self) -> Console:
        """The rich Console itself, made now if need be (rich's own objects, such as a
        live display, want it rather than this stand-in)."""
        if self._made is None:
            from rich.console import Console

            made = Console(stderr=self._stderr, highlight=False)
            if not made.is_terminal:
                # logs: one line per message, however long, and no colour codes
                made = Console(stderr=self._stderr, highlight=False, soft_wrap=True, width=160)
            self._made = made
        return self._made

    def __getattr__(self, name: str) -> Any:
        return getattr(self.made_console(), name)


def _forced_terminal() -> bool:
    # what makes rich call a file that is not a tty a terminal, or a tty not one
    return os.environ.get("TTY_COMPATIBLE", "") in ("0", "1") or "FORCE_COLOR" in os.environ


def _make_reporter(
    ns: argparse.Namespace, console: Console, log: TextIO | None, job: str | None = None
) -> Any:
    """The live display on a terminal, else lines (of ``job``, a config's, if named)."""
    if console.is_terminal and not ns.quiet and ns.log_format is None and log is None:
        from fetcher.live import RichReporter

        real = console.made_console() if isinstance(console, _LazyConsole) else console
        return RichReporter(real)
    if ns.quiet and log is None:
        rep = Reporter()  # says nothing: no status lines to format and throw away
    else:
        stream: Any = log if log is not None else console.file
        rep = LineReporter(stream, fmt=ns.log_format or "text", verbose=ns.verbose, job=job)
    if isinstance(console, _LazyConsole) and not console.made and console.is_terminal:
        rep.crawl_done = _then_preload(rep.crawl_done)  # (elsewhere the summary is plain)
    return rep


def _then_preload(crawl_done: Any) -> Any:
    """``crawl_done``, then the summary's imports in a thread (the workers download)."""

    def done() -> None:
        crawl_done()
        if "rich.table" not in sys.modules:
            preload_render()

    return done


def _open_log(path: Path) -> TextIO:
    """``--log-file``, appended to (its directory made if need be), behind a guard: a
    log that cannot be written any more is reported once on stderr; the run goes on."""
    from fetcher.stdio import guard_log

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # opening it says why, better
    try:
        stream = path.open("a", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot open --log-file {path}: {exc.strerror or exc}") from None
    return cast(TextIO, guard_log(stream, f"--log-file {path}"))


def _one_file(a: Path | None, b: Path | None) -> bool:
    """``a`` and ``b`` name one file (not standard output), by whatever names."""
    if a is None or b is None or Path("-") in (a, b):
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def _check_outputs_outside_state(ns: argparse.Namespace, jobs: list[MirrorJob]) -> None:
    """--report, --metrics and --log-file are not in a job's DEST/.fetcher: written there,
    they replaced (or grew) fetch's own files, ``--report DEST/.fetcher/state.sqlite``
    the state itself, which the next run could not read."""
    for flag, path in (("--report", ns.report), ("--metrics", ns.metrics),
                       ("--log-file", ns.log_file)):  # fmt: skip
        if path is None or path == Path("-"):
            continue
        where = Path(os.path.realpath(path))
        for job in jobs:
            state = Path(os.path.realpath(job.dest / STATE_DIR))
            if where.is_relative_to(state):
                raise UsageError(
                    f"{flag} {path} lies in {state}, which is fetch's own (state, lock,"
                    " partial files)",
                    "give a path outside it",
                )


_RUN_STOP: threading.Event | None = None
"""The stop event of the run under way (``_run_one``), which :func:`_on_sigterm` sets."""

_STOPPED_EARLY = False
"""A stop signal came while fetch loaded (:mod:`fetcher.console`): the first job is
interrupted as it starts."""


def _take_over_early() -> dict[signal.Signals, Any]:
    """The stop signals :mod:`fetcher.console` noted while fetch loaded: from now on they
    raise as Ctrl-C does (:func:`_on_sigterm`); one that came already stops the first job
    as it starts (:data:`_STOPPED_EARLY`). Returns the dispositions to restore at the end."""
    global _STOPPED_EARLY
    from fetcher.console import early_stops

    early, caught = early_stops()
    if not caught or not _main_thread():
        return {}
    taken = {sig: signal.SIG_DFL for sig in caught}
    for sig in caught:
        signal.signal(sig, _on_sigterm)
    caught.clear()
    _STOPPED_EARLY = bool(early)
    early.clear()
    return taken


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # systemd stops a unit with SIGTERM, a closed terminal (ssh gone) sends SIGHUP: treat
    # them like Ctrl-C (keep partial files, save state, exit 130). The exception is lost
    # when the signal lands in a finalizer (a weak reference's callback, a __del__:
    # "Exception ignored in ..."), and the run went on to its end: the run's stop event,
    # which the coordinator checks between steps, says it too.
    stop = _RUN_STOP
    if stop is not None:
        stop.set()
    raise KeyboardInterrupt


def _verify_only(dest: Path, console: Console) -> int:
    from fetcher.verify import verify_tree

    checked: list[str] = []
    # UsageError (exit 2) when DEST holds no fetch state
    problems = verify_tree(dest, checked=checked.append)
    for path, problem in problems:
        console.print(f"{path}: {problem}", markup=False, highlight=False)
    if problems:
        console.print(f"{len(problems)} file(s) missing or changed", highlight=False)
    elif not checked:  # (not "every recorded digest matches": none was, and nothing checked)
        console.print(
            "no SHA-256 digest recorded in DEST's state: nothing to check (digests come"
            " from repository metadata, --index, or checksum files, --verify)",
            highlight=False,
        )
    else:
        console.print(f"every recorded digest matches ({len(checked)} files)", highlight=False)
    return 1 if problems else 0


def _check_cwd() -> None:
    """Refuse to start in a deleted working directory.

    Relative paths (DEST, --config, --log-file) would then mean nothing, and
    multiprocessing hands every worker its parent's working directory.
    """
    try:
        os.getcwd()
    except FileNotFoundError:
        raise UsageError(
            "the current directory no longer exists (it was deleted after the shell entered it)",
            hint="cd to an existing directory, e.g. `cd /`, and run fetch again",
        ) from None


def main(argv: Sequence[str] | None = None, console: Console | None = None) -> int:
    """Run ``fetch`` with ``argv``; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if console is None:
        console = cast("Console", _LazyConsole())
    err = _err_console(console)
    taken = _take_over_early()
    try:
        return _main(argv, console, err, taken)
    finally:
        global _STOPPED_EARLY
        _STOPPED_EARLY = False
        for sig, handler in taken.items():
            signal.signal(sig, handler)


def _main(argv: list[str], console: Console, err: Console, taken: dict[signal.Signals, Any]) -> int:
    if argv[:1] == ["demo"]:
        from fetcher.demo import demo_main

        try:
            return demo_main(argv[1:], console)
        except FetchError as exc:
            _print_error(err, exc)
            return exc.exit_code
    try:
        ns = build_parser().parse_args(argv)
        if ns.report == ns.metrics == Path("-"):
            raise UsageError("--report - and --metrics -: one standard output for two files")
        if _one_file(ns.report, ns.metrics):
            raise UsageError(
                f"--report {ns.report} and --metrics {ns.metrics}: one file for both"
                ": the metrics would be written over the report"
            )
        for flag, path in (("--report", ns.report), ("--metrics", ns.metrics)):
            if path is not None and path != Path("-") and path.is_dir():
                # (found only once the whole sync was done: exit 4, on every run of a timer)
                raise UsageError(f"{flag} {path}: a directory", "give the file's name too")
            if _one_file(ns.log_file, path):  # (the log, every run's, replaced by it)
                raise UsageError(
                    f"--log-file {ns.log_file} and {flag} {path}: one file for both"
                    f": the {flag.removeprefix('--')} would be written over the log"
                )
        if Path("-") in (ns.report, ns.metrics) and isinstance(console, _LazyConsole):
            console = err  # stdout carries the report (or metrics) alone; the rest to stderr
        _check_cwd()
        if ns.verify_only is not None:
            if ns.url:
                raise _stray(ns.url, "--verify-only takes one DEST")
            if ns.mirror or ns.config:
                raise UsageError("--verify-only checks a DEST on its own: no --mirror or --config")
            ignored = [_flag(key) for key in _overrides(ns)] + [
                flag
                for flag, v in (("--report", ns.report), ("--metrics", ns.metrics),
                                ("--log-file", ns.log_file), ("--log-format", ns.log_format),
                                ("--job", ns.job), ("--check", ns.check))
                if v
            ]  # fmt: skip
            if ignored:  # (a --report or --metrics a timer waits for was never written)
                raise UsageError(
                    f"--verify-only takes no {', '.join(ignored)}: it prints what it finds"
                    " and exits 1 if a file is missing or changed"
                )
            if _STOPPED_EARLY:
                raise KeyboardInterrupt  # (stopped while fetch loaded: nothing read yet)
            return _verify_only(ns.verify_only, console)
        jobs = _checked_jobs(ns)
        _check_outputs_outside_state(ns, jobs)
    except FetchError as exc:
        _print_error(err, exc)
        return exc.exit_code
    if ns.check:
        from rich.markup import escape

        for job in jobs:  # (names, URLs, paths and globs are the user's: not markup)
            console.print(f"[bold]{escape(job.name)}[/]: {escape(f'{job.url} → {job.dest}')}",
                          highlight=False)  # fmt: skip
            for k, v in sorted(_describe(job).items()):
                console.print(f"    {k} = {v}", highlight=False, markup=False)
        console.print(f"{len(jobs)} job(s) valid")
        return 0
    if any(job.executor != "dask" and not job.dry_run for job in jobs):
        # A no-op when this process will fork its workers itself (procs.fork_safe); else
        # the workers' fork server imports while this process imports the pipeline.
        prestart()
    try:
        log = _open_log(ns.log_file) if ns.log_file else None
    except FetchError as exc:
        _print_error(err, exc)
        return exc.exit_code
    stops = [signal.SIGTERM]
    if signal.SIGHUP in taken or signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        stops.append(signal.SIGHUP)  # (nohup: left ignored)
    old = {sig: signal.signal(sig, _on_sigterm) for sig in stops} if _main_thread() else {}
    old.update(taken)  # (the dispositions the console script found)
    results: list[tuple[str | None, Summary]] = []
    stopped = False
    try:
        try:
            for job in jobs:
                if _run_one(job, ns, console, err, log, results, stops) == 130:
                    stopped = True  # the jobs after it do not start
                    break
        finally:
            if log is not None:
                log.close()
        code = max(exit_code([s for _, s in results]), 130 if stopped else 0)
        with _held(stops):  # the report says how the run ended, whatever comes now
            for flag, path, write in (
                ("--report", ns.report, write_report),
                # (the series of jobs this run did not get to, --job's others or those a
                # stop kept from starting, stay as their last run left them)
                (
                    "--metrics",
                    ns.metrics,
                    lambda p, r: write_metrics(p, r, others=bool(ns.job) or len(r) < len(jobs)),
                ),
            ):
                if path:
                    try:
                        write(path, results)
                    except OSError as exc:
                        err.print(f"fetch: error: cannot write {flag} {path}: {exc.strerror or exc}",
                                  highlight=False, markup=False)  # fmt: skip
                        code = max(code, 4)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return code


@contextlib.contextmanager
def _held(stops: Sequence[signal.Signals]) -> Iterator[list[int]]:
    """Stop signals (and Ctrl-C) wait while a job's outcome is written down: they are
    recorded, and the caller stops after it, instead of an exception half-way through
    the summary or before the report."""
    got: list[int] = []
    if not _main_thread():
        yield got
        return
    old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in (*stops, signal.SIGINT)}
    try:
        yield got
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _run_one(job: MirrorJob, ns: argparse.Namespace, console: Console, err: Console,
             log: TextIO | None, results: list[tuple[str | None, Summary]],
             stops: Sequence[signal.Signals] = ()) -> int:  # fmt: skip
    name = job.name if ns.config else None
    reporter = _make_reporter(ns, console, log, name)
    SYNCING.set()
    problem: FetchError | None = None
    global _RUN_STOP, _STOPPED_EARLY
    try:
        if _STOPPED_EARLY:
            _STOPPED_EARLY = False
            raise KeyboardInterrupt  # (as if it came now: nothing done, the run reported)
        from fetcher.pipeline import mirror

        _RUN_STOP = threading.Event()  # one per job: a run sets its own as it ends
        summary = mirror(job, reporter, stop=_RUN_STOP)
    except KeyboardInterrupt:
        # stopped while the run started or wound up, outside the part that counts (which
        # returns its summary marked interrupted): nothing to count, but a run to report
        summary = _no_run(job)
        summary.interrupted = True
    except FetchError as exc:
        problem = exc  # nothing started: a lock held, DEST unusable, the state unreadable
    finally:
        _RUN_STOP = None
    if problem is not None:
        summary = _no_run(job)
        if isinstance(problem, LockHeld) and job.skip_if_locked:
            summary.skipped_run = True
            summary.notices.append(f"skipped: {problem.message}")
        else:
            summary.error, summary.error_code = str(problem), problem.exit_code
    with _held(stops) as got:
        reporter.close()
        prefix = f"{name}: " if name else ""
        json_out = ns.log_format == "json" and log is None  # JSON lines only, -q or not
        # -qq: standard output says nothing of a run that ended well (a log file still does)
        hush = ns.quiet >= 2 and summary.exit_code == 0
        if problem is None:
            said = one_line(summary)
        elif summary.skipped_run:
            said = summary.notices[-1]  # (a log line names the job itself: LineReporter.job)
            if not json_out and not hush:  # (else the summary event below says it)
                console.print(prefix + said, highlight=False, markup=False)
        else:
            said = f"error: {problem.message}"
            _print_error(err, problem, prefix=prefix)
        lines = reporter if isinstance(reporter, LineReporter) else None
        if lines is None and json_out and not hush:  # -q: no status lines, but the summary
            lines = LineReporter(cast(TextIO, console.file), fmt="json", job=name)
        if lines is not None and (log is not None or lines.fmt == "json"):
            lines.summary(said, summary_dict(summary, name))  # the log's last word
        if problem is None and not json_out and not hush:
            render(summary, console, name)  # (JSON lines on stdout: the event above instead)
        results.append((name, summary))
    return 130 if got else summary.exit_code


def _no_run(job: MirrorJob) -> Summary:
    """The summary of a run that counted nothing (what happened is set on it)."""
    now = time.time()
    # (DEST absolute, as a run's own summary has it: a report says where, from any directory)
    return Summary(url=job.url, dest=str(job.dest.absolute()), started=now, finished=now)


def _err_console(console: Console) -> Console:
    # errors go to stderr, unless the caller gave a console of its own (tests, the demo)
    return cast("Console", _LazyConsole(stderr=True)) if console.file is sys.stdout else console


def refused(argv: Sequence[str], console: Console) -> int | None:
    """The exit code ``main(argv)`` would end with on options it refuses before doing
    anything (the error printed as it prints it), or None when it takes them."""
    try:
        _checked_jobs(build_parser().parse_args(list(argv)))
    except FetchError as exc:
        _print_error(_err_console(console), exc)
        return exc.exit_code
    return None


def _print_error(err: Console, exc: FetchError, prefix: str = "") -> None:
    # one line each, however long (paths are copied from it): the terminal wraps them
    err.print(f"fetch: error: {prefix}{exc.message}", highlight=False, markup=False, soft_wrap=True)
    if exc.hint:
        err.print(f"  hint: {exc.hint}", highlight=False, markup=False, soft_wrap=True)


def _plain(v: Any) -> Any:
    """``v`` with its structs (a job's post rules and their options) as dicts, recursively."""
    if isinstance(v, msgspec.Struct):
        return {k: _plain(x) for k, x in msgspec.structs.asdict(v).items()}
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    return v


def _describe(job: MirrorJob) -> dict[str, Any]:
    d: dict[str, Any] = _plain(job)
    d.pop("url")
    d.pop("dest")
    d.pop("name")
    d.pop("max_listing_bytes")  # (a fixed cap, not a key: copied into the file, it was refused)
    if d.pop("auth") is not None:
        d["auth"] = "user and password from the URL (not shown)"
    if d.get("proxy"):
        d["proxy"] = split_credentials(d["proxy"])[0]
    if d.get("headers"):
        d["headers"] = [f"{name}: (not shown)" for name, _ in d["headers"]]
    return d


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def entry() -> None:
    """What the console script runs once :mod:`fetcher.console` has loaded."""
    from fetcher.stdio import guard_std_streams

    guard_std_streams()  # output that cannot be written is dropped; the run goes on
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # written around the guards (a descriptor, not sys.stdout)
        code = 1
    except SystemExit as exc:  # --help, --version, a usage error: argparse exits itself
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    _exit(code)


def _exit(code: int) -> None:
    """End the process as ``sys.exit`` would, without tearing the interpreter down.

    Everything an orderly exit does that anyone could see is done here: threads
    still running are waited for, ``atexit`` handlers run (logging's flush among
    them) and stdout and stderr are flushed. What is skipped is freeing every
    module and object one by one (30 ms of a one-file run, more after a big
    crawl), which the kernel does at once.
    """
    import atexit
    import threading

    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # not behind a guard (swapped in since): output only
            pass
    os._exit(code)
