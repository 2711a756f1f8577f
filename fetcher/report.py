"""The end of a run: a summary for people, a JSON report, a Prometheus textfile, an exit code."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fetcher.models import Summary
from fetcher.progress import human_bytes

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "exit_code", "preload_render", "render", "summary_dict", "write_metrics", "write_report"
]  # fmt: skip

_SHOW_FAILURES = 20


def exit_code(summaries: list[Summary]) -> int:
    """The worst job's code; an interrupt wins over everything."""
    codes = [s.exit_code for s in summaries] or [0]
    if 130 in codes:
        return 130
    return max(codes)


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


def render(s: Summary, console: Console, name: str | None = None) -> None:
    """Print the final summary table (and the failures) for one job."""
    from rich.markup import escape
    from rich.table import Table

    elapsed = max(s.finished - s.started, 1e-9)
    title = f"{'dry run: ' if s.dry_run else ''}{name + ': ' if name else ''}{s.url} → {s.dest}"
    table = Table(title=title, title_justify="left", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("files", justify="right")
    table.add_column("bytes", justify="right")
    if s.dry_run:
        for key in ("new", "changed", "resume", "check", "skipped"):
            c = s.planned.get(key)
            if c is not None:
                label = {"check": "check (conditional GET)", "skipped": "unchanged (skip)"}.get(
                    key, f"to fetch: {key}"
                )
                table.add_row(label, str(c.files), human_bytes(c.bytes))
        if s.deleted:
            table.add_row("to delete", str(len(s.deleted)), "")
    else:
        rate = human_bytes(s.fetched.bytes / elapsed) + "/s"
        table.add_row("fetched", str(s.fetched.files), f"{human_bytes(s.fetched.bytes)} ({rate})")
        skipped = s.planned.get("skipped")
        unchanged = s.unchanged.files + (skipped.files if skipped else 0)
        table.add_row("unchanged", str(unchanged), "")
        if s.deleted:
            table.add_row("deleted", str(len(s.deleted)), "")
        if s.vanished:
            table.add_row("gone upstream (kept)", str(s.vanished), "")
        if s.post:
            table.add_row(
                "post-processed", ", ".join(f"{k} {v}" for k, v in sorted(s.post.items())), ""
            )
    table.add_row("failed", f"[red]{len(s.failed)}[/]" if s.failed else "0", "")
    if s.listing_errors:
        table.add_row("listing errors", f"[red]{len(s.listing_errors)}[/]", "")
    table.add_row("directories", str(s.directories), f"{elapsed:.1f} s")
    console.print(table)
    if s.deleted and not s.dry_run:
        for p in s.deleted[:_SHOW_FAILURES]:
            console.print(f"  deleted {escape(p)}", highlight=False)
        if len(s.deleted) > _SHOW_FAILURES:
            console.print(f"  … and {len(s.deleted) - _SHOW_FAILURES} more deleted (see --report)")
    for what, items in (
        ("failed", s.failed),
        ("listing error", s.listing_errors),
        ("post-processing failed", s.post_failed),
    ):
        for path, why in items[:_SHOW_FAILURES]:
            console.print(f"  [red]{what}[/] {escape(path)}: {escape(why)}", highlight=False)
        if len(items) > _SHOW_FAILURES:
            console.print(f"  … and {len(items) - _SHOW_FAILURES} more (see --report)")
    for note in s.notices[:_SHOW_FAILURES]:
        console.print(f"  [yellow]note[/] {escape(note)}", highlight=False)
    if s.deleted and s.dry_run:
        for p in s.deleted[:_SHOW_FAILURES]:
            console.print(f"  would delete {escape(p)}", highlight=False)
    if s.fatal:
        console.print(f"[red bold]stopped:[/] {escape(s.fatal)}", highlight=False)
    if s.interrupted:
        console.print("[yellow]interrupted: partial files kept; run again to resume[/]")


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
        "unchanged": {"files": s.unchanged.files + s.planned.get("skipped", _Zero).files},
        "planned": {k: {"files": c.files, "bytes": c.bytes} for k, c in s.planned.items()},
        "deleted": s.deleted,
        "vanished": s.vanished,
        "failed": [{"path": p, "error": e} for p, e in s.failed],
        "listing_errors": [{"url": u, "error": e} for u, e in s.listing_errors],
        "notices": s.notices,
        "directories": s.directories,
        "post": s.post,
        "post_failed": [{"path": p, "error": e} for p, e in s.post_failed],
        "interrupted": s.interrupted,
        "fatal": s.fatal,
        "error": s.error,
    }


class _Zero:
    files = 0
    bytes = 0


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
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
    _atomic_write(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def write_metrics(path: Path, summaries: list[tuple[str | None, Summary]]) -> None:
    """A Prometheus textfile for node_exporter's textfile collector, written atomically."""
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
        ("fetch_exit_code", "gauge", "Exit code of the last run.", []),
    ]
    previous = _previous_success(path)
    for name, s in summaries:
        job = _label(name or s.url)
        unchanged = s.unchanged.files + s.planned.get("skipped", _Zero).files
        ok_ts = s.finished if s.exit_code == 0 else previous.get(job)
        values = [s.finished, ok_ts, s.finished - s.started, s.fetched.files, s.fetched.bytes,
                  unchanged, len(s.failed), len(s.deleted), s.exit_code]  # fmt: skip
        for m, v in zip(metrics, values, strict=True):
            if v is not None:
                m[3].append((job, float(v)))
    lines: list[str] = []
    for name, kind, help_, samples in metrics:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{job="{j}"}} {v:.17g}' for j, v in samples]
    _atomic_write(path, "\n".join(lines) + "\n")


def _previous_success(path: Path) -> dict[str, float]:
    """Keep a job's last success time across failed runs (read back from the old file)."""
    out: dict[str, float] = {}
    try:
        text = path.read_text("utf-8")
    except OSError:
        return out
    prefix = 'fetch_last_success_timestamp_seconds{job="'
    for line in text.splitlines():
        if line.startswith(prefix):
            job, _, rest = line[len(prefix) :].partition('"} ')
            try:
                out[job] = float(rest)
            except ValueError:
                continue
    return out
