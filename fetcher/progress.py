"""What a person (or a log) sees while a run goes on.

:class:`RichReporter` draws live bars on a terminal; :class:`LineReporter`
writes a status line every few seconds and one line per failure, as plain
text or JSON lines, for cron, systemd and pipes.  Both take their console or
stream and their clock from the caller, so tests can inject them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from fetcher.models import (
    CrawlProblem,
    FileStarted,
    Job,
    Outcome,
    RemoteFile,
    Reporter,
    Retried,
    Status,
)

if TYPE_CHECKING:
    from fetcher.postprocess import PostCounts, PostOutcome

__all__ = ["LineReporter", "RichReporter", "human_bytes"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class _Tally:
    def __init__(self) -> None:
        self.planned_files = 0
        self.planned_bytes = 0
        self.done_files = 0
        self.skipped = 0
        self.failed = 0
        self.retries = 0
        self.bytes = 0
        self.crawling = True


class RichReporter(Reporter):
    """Live progress on a terminal: bytes with rate and ETA, files, active transfers, failures."""

    def __init__(self, console: Console, get_time: Callable[[], float] | None = None) -> None:
        self.console = console
        self.t = _Tally()
        kw: dict[str, Any] = {"console": console, "transient": False}
        if get_time is not None:
            kw["get_time"] = get_time
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            **kw,
        )
        self.files = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[extra]}"), **kw)  # fmt: skip
        self.bytes_task: TaskID = self.progress.add_task("crawling", total=None)
        self.files_task: TaskID = self.files.add_task("files", total=None, extra="")
        self.active: dict[int, str] = {}
        self.post_task: TaskID | None = None
        self.live = Live(Group(self.progress, self.files, self._active_view()), console=console,
                         refresh_per_second=8, transient=False)  # fmt: skip

    def begin(self) -> None:
        # Not in __init__: the live display's refresh thread would keep the run from
        # forking its workers (fetcher.procs.fork_safe).
        self.live.start()

    def _active_view(self) -> Any:
        reporter = self

        class _Active:
            def __rich__(self) -> Text:
                lines = [f"  worker {w}: {p}" for w, p in sorted(reporter.active.items())]
                return Text("\n".join(lines[:8]), style="dim")

        return _Active()

    def _update_files(self) -> None:
        t = self.t
        extra = f"skipped {t.skipped}" + (f", [red]failed {t.failed}[/]" if t.failed else "")
        extra += f", retries {t.retries}" if t.retries else ""
        self.files.update(self.files_task, completed=t.done_files,
                          total=None if t.crawling else t.planned_files, extra=extra)  # fmt: skip

    def planned(self, job: Job) -> None:
        self.t.planned_files += 1
        self.t.planned_bytes += job.file.size or 0
        self.progress.update(
            self.bytes_task, total=None if self.t.crawling else self.t.planned_bytes
        )
        self._update_files()

    def skipped(self, f: RemoteFile) -> None:
        self.t.skipped += 1
        self._update_files()

    def transferred(self, nbytes: int) -> None:
        self.t.bytes += nbytes
        self.progress.update(self.bytes_task, advance=nbytes)

    def started(self, ev: FileStarted) -> None:
        size = f" ({human_bytes(ev.size)})" if ev.size else ""
        self.active[ev.worker] = f"{ev.path}{size}"

    def finished(self, out: Outcome) -> None:
        self.t.done_files += 1
        for w, p in list(self.active.items()):
            if p.startswith(out.path):
                del self.active[w]
        if out.status is Status.FAILED and out.error != "interrupted":
            self.t.failed += 1
            self.console.print(
                f"[red]failed[/] {out.path}: {out.error}", highlight=False, markup=True
            )
        self._update_files()

    def retried(self, ev: Retried) -> None:
        self.t.retries += 1
        self._update_files()

    def problem(self, p: CrawlProblem) -> None:
        style = "red" if p.kind in ("listing", "unsafe") else "yellow"
        self.console.print(
            f"[{style}]{p.kind}[/] {escape(p.url)}: {escape(p.message)}", highlight=False
        )

    def notice(self, message: str) -> None:
        self.console.print(f"[yellow]{escape(message)}[/]", highlight=False)

    def crawl_done(self) -> None:
        self.t.crawling = False
        self.progress.update(self.bytes_task, description="bytes", total=self.t.planned_bytes)
        self._update_files()

    def post_progress(self, c: PostCounts) -> None:
        if self.post_task is None:
            self.post_task = self.files.add_task("ffmpeg", total=None, extra="")
        finished = c.done + c.skipped + c.failed
        extra = f"running {c.running}" + (f", [red]failed {c.failed}[/]" if c.failed else "")
        self.files.update(
            self.post_task, completed=finished, total=finished + c.queued + c.running, extra=extra
        )

    def post_failed(self, out: PostOutcome) -> None:
        self.console.print(
            f"[red]{out.action} failed[/] {escape(out.rel)}: {escape(out.error or '')}",
            highlight=False,
        )

    def close(self) -> None:
        self.active.clear()
        refresh = getattr(self.live, "_refresh_thread", None)
        self.live.stop()
        if refresh is not None:
            # stop() only tells it to end: the next job of a config may fork its workers
            # (fetcher.procs.fork_safe) once it is gone
            refresh.join(timeout=2)


class LineReporter(Reporter):
    """Unattended output: a status line every ``interval`` seconds and one per problem."""

    def __init__(
        self,
        stream: TextIO,
        fmt: str = "text",
        interval: float = 5.0,
        get_time: Callable[[], float] = time.monotonic,
        verbose: bool = False,
    ) -> None:
        self.stream = stream
        self.fmt = fmt
        self.interval = interval
        self.get_time = get_time
        self.verbose = verbose
        self.t = _Tally()
        self.start = get_time()
        self.last = self.start
        self.post: PostCounts | None = None

    def _emit(self, kind: str, text: str, **fields: Any) -> None:
        if self.fmt == "json":
            rec = {"ts": round(time.time(), 3), "event": kind, **fields}
            self.stream.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            self.stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self.stream.flush()

    def _tick(self) -> None:
        now = self.get_time()
        if now - self.last >= self.interval:
            self.last = now
            self.status()

    def status(self) -> None:
        t = self.t
        elapsed = max(self.get_time() - self.start, 1e-9)
        total = "?" if t.crawling else str(t.planned_files)
        self._emit(
            "status",
            f"status: {t.done_files}/{total} files, {human_bytes(t.bytes)} at "
            f"{human_bytes(t.bytes / elapsed)}/s, {t.skipped} unchanged, {t.failed} failed, "
            f"{t.retries} retries{' (crawling)' if t.crawling else ''}"
            + (f"; ffmpeg {self.post.done} done, {self.post.queued + self.post.running} to do, {self.post.failed} failed" if self.post else ""),
            files_done=t.done_files, files_planned=t.planned_files, bytes=t.bytes,
            skipped=t.skipped, failed=t.failed, retries=t.retries, crawling=t.crawling,
        )  # fmt: skip

    def planned(self, job: Job) -> None:
        self.t.planned_files += 1
        self.t.planned_bytes += job.file.size or 0
        self._tick()

    def skipped(self, f: RemoteFile) -> None:
        self.t.skipped += 1
        self._tick()

    def transferred(self, nbytes: int) -> None:
        self.t.bytes += nbytes
        self._tick()

    def started(self, ev: FileStarted) -> None:
        self._tick()

    def finished(self, out: Outcome) -> None:
        self.t.done_files += 1
        if out.status is Status.FAILED and out.error != "interrupted":
            self.t.failed += 1
            self._emit("failed", f"failed: {out.path}: {out.error}", path=out.path, error=out.error)
        elif self.verbose:
            self._emit(
                "done",
                f"{out.status.value}: {out.path}",
                path=out.path,
                status=out.status.value,
                size=out.size,
            )
        self._tick()

    def retried(self, ev: Retried) -> None:
        self.t.retries += 1
        if self.verbose:
            self._emit(
                "retry",
                f"retry {ev.attempt}: {ev.path}: {ev.reason}",
                path=ev.path,
                reason=ev.reason,
            )
        self._tick()

    def problem(self, p: CrawlProblem) -> None:
        self._emit(p.kind, f"{p.kind}: {p.url}: {p.message}", url=p.url, message=p.message)

    def notice(self, message: str) -> None:
        self._emit("notice", message, message=message)

    def crawl_done(self) -> None:
        self.t.crawling = False
        if self.verbose:
            self._emit(
                "crawl_done",
                f"crawl done: {self.t.planned_files} files to fetch",
                files=self.t.planned_files,
            )

    def post_progress(self, c: PostCounts) -> None:
        self.post = c
        self._tick()

    def post_failed(self, out: PostOutcome) -> None:
        self._emit(
            "post_failed",
            f"{out.action} failed: {out.rel}: {out.error}",
            path=out.rel,
            action=out.action,
            error=out.error,
        )

    def close(self) -> None:
        self.status()
