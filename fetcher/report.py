"""The end of a run: a summary for people, a JSON report, a Prometheus textfile, an exit code."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fetcher.models import Counts, Summary
from fetcher.progress import human_bytes, json_text

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "exit_code", "one_line", "preload_render", "render", "render_plain", "summary_dict",
    "write_metrics", "write_report",
]  # fmt: skip

_SHOW_FAILURES = 20


# From the least to the most serious: a job another run held (3) is less so than one
# whose files failed (1), which a timer set to take 3 as success must still see.
_SEVERITY = (0, 3, 1, 2, 4, 130)


def exit_code(summaries: list[Summary]) -> int:
    """The most serious job's code: an interrupt, then fatal I/O, a usage error, failed
    files, and last a DEST another run held."""
    codes = [s.exit_code for s in summaries] or [0]
    return max(codes, key=lambda c: _SEVERITY.index(c) if c in _SEVERITY else len(_SEVERITY))


def _import_render() -> None:
    import rich.console
    import rich.markup
    import rich.table  # noqa: F401


def preload_render() -> threading.Thread:
    """Import what :func:`render` needs, in a thread (started; join it or let it be).

    For a caller that has time to spare before the summary, e.g. once the crawl is
    done and the workers are downloading: the summary then prints without waiting.
    """
    t = threading.Thread(target=_import_render, name="preload-summary", daemon=True)
    t.start()
    return t


def _title(s: Summary, name: str | None) -> str:
    return f"{'dry run: ' if s.dry_run else ''}{name + ': ' if name else ''}{s.url} → {s.dest}"


def _rows(s: Summary) -> list[tuple[str, str, str, bool]]:
    """The summary's rows: (what, files, bytes, whether it is bad news)."""
    rows: list[tuple[str, str, str, bool]] = []
    if s.dry_run:
        for key in ("new", "changed", "resume", "check", "verify", "skipped"):
            c = s.planned.get(key)
            if c is not None:
                label = {
                    "check": "check (conditional GET)",
                    "skipped": "unchanged (skip)",
                    "verify": "verify (hash DEST's copy)",
                }.get(key, f"to fetch: {key}")
                rows.append((label, str(c.files), _planned_bytes(c), False))
        if s.deleted:
            rows.append(("to delete", str(len(s.deleted)), "", False))
    else:
        rate = human_bytes(s.fetched.bytes / s.download_seconds) + "/s"
        fetched = f"{human_bytes(s.fetched.bytes)} ({rate})"
        rows.append(("fetched", str(s.fetched.files), fetched, False))
        rows.append(("unchanged", str(s.unchanged_files), "", False))
        if s.deleted:
            rows.append(("deleted", str(len(s.deleted)), "", False))
        if s.vanished:
            rows.append(("gone upstream (kept)", str(s.vanished), "", False))
        if s.post:
            post = ", ".join(f"{k} {v}" for k, v in sorted(s.post.items()))
            rows.append(("post-processed", post, "", False))
    rows.append(("failed", str(len(s.failed)), "", bool(s.failed)))
    if s.listing_errors:
        rows.append(("listing errors", str(len(s.listing_errors)), "", True))
    rows.append(("directories", str(s.directories), f"{s.elapsed:.1f} s", False))
    return rows


def _planned_bytes(c: Counts) -> str:
    """A plan's bytes; "0 B" said of files whose listing gave no size read as empty files."""
    if not c.unsized:
        return human_bytes(c.bytes)
    if c.unsized == c.files:
        return "size unknown"
    return f"{human_bytes(c.bytes)} + {c.unsized} of unknown size"


def _details(s: Summary) -> list[tuple[str, str, str]]:
    """The lines under the table: (style, lead word, text); text is verbatim (no markup)."""
    out: list[tuple[str, str, str]] = []

    def some(style: str, what: str, items: list[str], more: str) -> None:
        out.extend((style, what, item) for item in items[:_SHOW_FAILURES])
        if len(items) > _SHOW_FAILURES:
            out.append(("", "…", f"and {len(items) - _SHOW_FAILURES} more{more} (see --report)"))

    if not s.dry_run:
        some("", "deleted", s.deleted + s.deleted_dirs, " deleted")
    for what, items in (
        ("failed", s.failed),
        ("listing error", s.listing_errors),
        ("post-processing failed", s.post_failed),
    ):
        some("red", what, [f"{path}: {why}" for path, why in items], "")
    if s.post_failed_before:
        n = len(s.post_failed_before)
        out.append(("yellow", "note", (
            f"{n} post-processing output{'s' if n > 1 else ''} not tried: ffmpeg timed out or"
            " refused the file before, and the file, the rule, its timeout and ffmpeg are"
            " unchanged (--retry-failed-post tries again)"
        )))  # fmt: skip
        before = [f"{path}: {why.splitlines()[0]}" for path, why in s.post_failed_before]
        some("yellow", "failed before", before, " failed before")
    some("yellow", "note", s.notices, "")
    if s.dry_run:
        out.extend(("", "would delete", p) for p in (s.deleted + s.deleted_dirs)[:_SHOW_FAILURES])
    return out


def _closing(s: Summary) -> list[tuple[str, str]]:
    """How the run ended, if not by finishing: (style, text)."""
    out = []
    if s.fatal:
        out.append(("red bold", f"stopped: {s.fatal}"))
    if s.interrupted:
        out.append(("yellow", "interrupted: partial files kept; run again to resume"))
    return out


def render(s: Summary, console: Console, name: str | None = None) -> None:
    """Print the final summary (and the failures) for one job.

    On a terminal, a table. Otherwise (cron mail, a log, a pipe) plain aligned lines:
    no box drawing, and no import of rich's table and console for them (~25 ms of
    CPU in every run); the same rows and lines either way.
    """
    if not console.is_terminal:
        render_plain(s, console.file, name)
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(  # (the title is the user's URL and DEST, brackets and all: not markup)
        title=escape(_title(s, name)), title_justify="left", show_header=True, header_style="bold"
    )
    table.add_column("")
    table.add_column("files", justify="right")
    table.add_column("bytes", justify="right")
    for label, files, size, bad in _rows(s):
        table.add_row(label, f"[red]{files}[/]" if bad else files, size)
    console.print(table)
    for style, what, text in _details(s):
        lead = f"[{style}]{what}[/]" if style else what
        console.print(f"  {lead} {escape(text)}", highlight=False)
    for style, text in _closing(s):
        console.print(f"[{style}]{escape(text)}[/]", highlight=False)


def render_plain(s: Summary, out: IO[str], name: str | None = None) -> None:
    """The summary as plain lines: a title, then one aligned row per count."""
    rows = _rows(s)
    wide = max(len(r[0]) for r in rows)
    count = max(len(r[1]) for r in rows if r[1].isdigit())  # a text cell is not a count
    lines = [_title(s, name)]
    lines += [
        f"  {a:<{wide}}  {b:>{count}}  {c}".rstrip() if b.isdigit() else f"  {a:<{wide}}  {b}"
        for a, b, c, _ in rows
    ]
    lines += [f"  {what} {text}" for _, what, text in _details(s)]
    lines += [text for _, text in _closing(s)]
    out.write("\n".join(lines) + "\n")
    out.flush()


def one_line(s: Summary) -> str:
    """The summary's counts on one line, for a log."""
    parts = [
        f"{s.fetched.files} fetched ({human_bytes(s.fetched.bytes)})",
        f"{s.unchanged_files} unchanged",
        f"{len(s.failed)} failed",
    ]
    if s.deleted:
        parts.append(f"{len(s.deleted)} {'to delete' if s.dry_run else 'deleted'}")
    if s.listing_errors:
        parts.append(f"{len(s.listing_errors)} listing errors")
    if s.post_failed:
        parts.append(f"{len(s.post_failed)} post-processing failed")
    if s.post_failed_before:  # (not tried: a log must say so as the summary does)
        parts.append(f"{len(s.post_failed_before)} post-processing failed before (not tried)")
    end = " (stopped)" if s.fatal else " (interrupted)" if s.interrupted else ""
    dry = "dry run: " if s.dry_run else ""
    return (
        f"summary: {dry}{', '.join(parts)}, {s.directories} directories in {s.elapsed:.1f} s{end}"
    )


def summary_dict(s: Summary, name: str | None = None) -> dict[str, Any]:
    return {
        "job": name,
        "url": s.url,
        "dest": s.dest,
        "started": s.started,
        "finished": s.finished,
        "seconds": round(s.finished - s.started, 3),
        "dry_run": s.dry_run,
        "exit_code": s.exit_code,
        "fetched": {"files": s.fetched.files, "bytes": s.fetched.bytes},
        "unchanged": {"files": s.unchanged_files},
        "planned": {
            k: {"files": c.files, "bytes": c.bytes, **({"unsized": c.unsized} if c.unsized else {})}
            for k, c in s.planned.items()
        },
        "deleted": s.deleted,
        "deleted_dirs": s.deleted_dirs,
        "vanished": s.vanished,
        "failed": [{"path": p, "error": e} for p, e in s.failed],
        "listing_errors": [{"url": u, "error": e} for u, e in s.listing_errors],
        "notices": s.notices,
        "directories": s.directories,
        "post": s.post,
        "post_failed": [{"path": p, "error": e} for p, e in s.post_failed],
        "post_failed_before": [{"path": p, "error": e} for p, e in s.post_failed_before],
        "interrupted": s.interrupted,
        "fatal": s.fatal,
        "error": s.error,
        "skipped_run": s.skipped_run,
    }


def _atomic_write(path: Path, text: str) -> None:
    """Replace the file at ``path`` whole: a reader sees the old text or the new.

    Through a symlink, the file it points to is replaced (the link stays). What is not a
    regular file (``/dev/stdout``, a FIFO a collector reads) is written as it is: there
    is nothing to replace, and replacing it would put a file where the device was.
    ``-`` is standard output.
    """
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        with path.open("w", encoding="utf-8") as out:
            out.write(text)
        return
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        with contextlib.suppress(PermissionError):  # FAT, exFAT: modes are the mount's
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(path: Path, summaries: list[tuple[str | None, Summary]]) -> None:
    """The JSON report: one object per job, plus the run's exit code."""
    doc = {
        "exit_code": exit_code([s for _, s in summaries]),
        "jobs": [summary_dict(s, n) for n, s in summaries],
    }
    _atomic_write(path, json_text(doc, indent=2) + "\n")


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def write_metrics(
    path: Path, summaries: list[tuple[str | None, Summary]], others: bool = False
) -> None:
    """A Prometheus textfile for node_exporter's textfile collector, written atomically.

    Each series is labelled ``mirror`` with its job's name (the start URL without a
    config), not ``job``: Prometheus gives every series it scrapes the ``job`` of its
    scrape (node_exporter's) and renames one the target exposes to ``exported_job``.

    ``others``: this run is some of a config's jobs (``--job``, or a run stopped before
    its last jobs started), and the old file's series of the other jobs are kept as they
    were (a timer per job can share one file)."""
    metrics: list[tuple[str, str, str, list[tuple[str, float]]]] = [
        ("fetch_last_run_timestamp_seconds", "gauge", "When the last run of the job finished.", []),
        (
            "fetch_last_success_timestamp_seconds",
            "gauge",
            "When the job last finished with exit code 0.",
            [],
        ),
        ("fetch_duration_seconds", "gauge", "Wall time of the last run.", []),
        ("fetch_files_fetched", "gauge", "Files downloaded by the last run.", []),
        ("fetch_bytes_fetched", "gauge", "Bytes downloaded by the last run.", []),
        ("fetch_files_unchanged", "gauge", "Files found unchanged by the last run.", []),
        ("fetch_files_failed", "gauge", "Files that failed in the last run.", []),
        ("fetch_files_deleted", "gauge", "Files deleted by the last run.", []),
        (
            "fetch_listing_errors",
            "gauge",
            "Directory listings the last run could not read (their files unseen).",
            [],
        ),
        (
            "fetch_post_failed",
            "gauge",
            "Post-processing outputs (--post) that failed in the last run.",
            [],
        ),
        (
            "fetch_post_failed_before",
            "gauge",
            "Post-processing outputs the last run did not try: they failed before on the same"
            " file, rule and ffmpeg (--retry-failed-post tries them).",
            [],
        ),
        ("fetch_exit_code", "gauge", "Exit code of the last run.", []),
    ]
    previous = _previous(path)
    for name, s in summaries:
        job = _label(name or s.url)
        if s.skipped_run or s.dry_run:
            # another run holds DEST (perhaps hung), or this one only planned: it synced
            # nothing, and must not look like a success to an alert on the last one
            values: list[float | None] = [previous.get((m[0], job)) for m in metrics]
        else:
            last_ok = previous.get(("fetch_last_success_timestamp_seconds", job))
            values = [s.finished, s.finished if s.exit_code == 0 else last_ok,
                      s.finished - s.started, s.fetched.files, s.fetched.bytes,
                      s.unchanged_files, len(s.failed), len(s.deleted), len(s.listing_errors),
                      len(s.post_failed), len(s.post_failed_before),
                      s.exit_code]  # fmt: skip
        for m, v in zip(metrics, values, strict=True):
            if v is not None:
                m[3].append((job, float(v)))
    if others:
        ran = {_label(name or s.url) for name, s in summaries}
        for m in metrics:
            m[3].extend(
                sorted((j, v) for (n, j), v in previous.items() if n == m[0] and j not in ran)
            )
    lines: list[str] = []
    for name, kind, help_, samples in metrics:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{{LABEL}="{j}"}} {v:.17g}' for j, v in samples]
    _atomic_write(path, "\n".join(lines) + "\n")


LABEL = "mirror"
"""The label naming a job in ``--metrics`` (see :func:`write_metrics`)."""


def _previous(path: Path) -> dict[tuple[str, str], float]:
    """The old file's samples by (metric, job label): a job's last success time is kept
    across failed runs, and every series of a job across a skipped or dry one. A file written
    before the label was ``mirror`` (it was ``job``) is read as well.

    Only a regular file has an old text: a FIFO or ``/dev/stdout``, opened to be read,
    would wait for a writer (or for this run's own output) for ever."""
    out: dict[tuple[str, str], float] = {}
    try:
        if str(path) == "-" or not stat.S_ISREG(path.stat().st_mode):
            return out
        text = path.read_text("utf-8", errors="replace")  # (damaged: its lines are skipped)
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        metric, sep, rest = line.partition(f'{{{LABEL}="')
        if not sep:
            metric, sep, rest = line.partition('{job="')
        if not sep:
            continue
        job, _, value = rest.rpartition('"} ')
        try:
            out[(metric, job)] = float(value)
        except ValueError:
            continue
    return out
