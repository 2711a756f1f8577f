"""Live progress on a terminal (rich): bytes with rate and ETA, files, active transfers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
)
from fetcher.progress import Tally, human_bytes

if TYPE_CHECKING:
    from fetcher.postprocess import PostCounts, PostOutcome

__all__ = ["RichReporter"]


class RichReporter(Reporter):
    """Live progress on a terminal: bytes with rate and ETA, files, active transfers, failures."""

    def __init__(self, console: Console, get_time: Callable[[], float] | None = None) -> None:
        self.console = console
        self.t = Tally()
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

    def skipped_many(self, n: int) -> None:
        self.t.skipped += n
        self._update_files()

    def transferred(self, nbytes: int) -> None:
        self.t.bytes += nbytes
        self.progress.update(self.bytes_task, advance=nbytes)

    def started(self, ev: FileStarted) -> None:
        size = f" ({human_bytes(ev.size)})" if ev.size else ""
        self.active[ev.worker] = f"{ev.path}{size}"

    def finished(self, out: Outcome) -> None:
        for w, p in list(self.active.items()):
            if p.startswith(out.path):
                del self.active[w]
        if self.t.finished(out):
            self.console.print(
                f"[red]failed[/] {escape(out.path)}: {escape(out.error or '')}", highlight=False
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
        finished = c.done + c.skipped + c.failed + c.failed_before
        extra = f"running {c.running}" + (f", [red]failed {c.failed}[/]" if c.failed else "")
        self.files.update(
            self.post_task, completed=finished, total=finished + c.queued + c.running, extra=extra
        )

    def post_failed(self, out: PostOutcome) -> None:
        self.console.print(
            f"[red]{escape(out.label)} failed[/] {escape(out.rel)}: {escape(out.error or '')}",
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
